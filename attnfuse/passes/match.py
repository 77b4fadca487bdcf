"""One semantic matcher: from each softmax, walk back to Q·Kᵀ and forward to P·V.

The walk reads nodes only through the canonicalization rules, so every spelling those rules know
is matched by the same code. The result per softmax is a :class:`Match` (everything the rewrite
needs) or a :class:`~attnfuse.spec.Reject` with the reason the site stays as written.

Soundness rules (a rewrite never changes what the model computes):
  * every intermediate between Q·Kᵀ and P·V has exactly one user (the next step);
  * the softmax runs over the key axis; dropout on the probabilities is inactive;
  * q, k, v share a dtype and batch/head dims, and P·V's result has q's dtype;
  * a causal mask is recognised only from a constant boolean mask (built from buffers, shapes
    and constants) whose values equal the causal pattern at the graph's static shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import sympy
import torch
from torch.fx import GraphModule, Node

from ..spec import AttentionSpec, MaskSpec, Reject, TensorInfo
from . import canonicalize as C

_MAX_CONST_EVAL_NUMEL = 1 << 24


@dataclass
class MaskTerm:
    """A mask between Q·Kᵀ and softmax. ``factor``: scales applied after it (walking outward)."""

    kind: str                      # "add" or "fill"
    node: Node
    factor: sympy.Expr
    fill: float = float("-inf")
    negate: bool = False           # fill masks: True when the node marks positions to drop


@dataclass
class Match:
    softmax: Node
    pv: Node
    q: Node
    k: Node
    v: Node
    k_transposed: bool             # False: K must be recovered as ``kt.mT``
    scale: sympy.Expr
    masks: list[MaskTerm]
    causal: str
    dead: list[Node]               # nodes the fused op replaces
    rules: list[str] = field(default_factory=list)


def _single_user(node: Node) -> bool:
    return len(node.users) == 1


def _op_name(node: Node) -> str:
    if node.op == "output":
        return "the graph output"
    return str(node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target))


def _describe_users(node: Node) -> str:
    return ", ".join(_op_name(u) for u in node.users)


def _fmt(expr: sympy.Expr) -> str:
    """Readable form of a folded scale: ``1/sqrt(64)`` becomes ``1/8``, 0.0883883 ``sqrt(2)/16``."""
    value = float(expr)
    guess = sympy.nsimplify(value, [sympy.sqrt(2), sympy.sqrt(3), sympy.sqrt(5)], tolerance=1e-12)
    if abs(float(guess) - value) <= 1e-12 * abs(value) and len(str(guess)) < 16:
        return str(guess)
    return f"{value:.6g}"


def _forward_chain(sm: Node, rules: list[str]) -> Union[tuple[Node, list[Node]], Reject]:
    """From the softmax to the P·V matmul, through casts and inactive dropout."""
    cur, chain = sm, []
    while True:
        if not _single_user(cur):
            return Reject(f"attention probabilities have {len(cur.users)} users ({_describe_users(cur)}): "
                          f"they are returned or reused (e.g. output_attentions=True), so the "
                          f"softmax must stay")
        (user,) = cur.users
        reason = C.active_dropout(user)
        if reason:
            return Reject(reason)
        step = C.read(user, C.cast, C.identity)
        if step is not None and step.x is cur:
            rules.append(step.rule)
            chain.append(user)
            cur = user
            continue
        mm = C.read(user, C.matmul)
        if mm is not None and mm.x is cur and mm.other is not cur:
            rules.append(mm.rule)
            return user, chain
        return Reject(f"softmax output feeds {_describe_users(cur)}, not a P·V matmul")


def _backward_chain(start: Node, rules: list[str]) -> Union[
        tuple[Node, sympy.Expr, list[MaskTerm], list[Node]], Reject]:
    """From the softmax input back to Q·Kᵀ: scales, masks and upcasts in between."""
    cur, factor, masks, chain = start, sympy.Integer(1), [], []
    while True:
        if not _single_user(cur):
            return Reject(f"attention scores have {len(cur.users)} users ({_describe_users(cur)}); "
                          f"fusing would drop the other use")
        r = C.read(cur, C.matmul, C.cast, C.identity, C.scale, C.add_mask, C.fill_mask)
        if r is None:
            return Reject(f"unsupported score modification `{_op_name(cur)}` between Q·Kᵀ and "
                          f"softmax; the site stays as written")
        rules.append(r.rule)
        chain.append(cur)
        if r.op == "matmul":
            return cur, factor, masks, chain
        if r.op == "cast":
            src = C.meta(r.x)
            if torch.finfo(r.dtype).bits < torch.finfo(src.dtype).bits:
                return Reject(f"scores are cast down to {r.dtype} before softmax; not fused")
        elif r.op == "scale":
            if masks and float(r.other) <= 0:
                return Reject("a non-positive scale applied after a mask would flip it")
            factor = factor * r.other
        elif r.op == "add_mask":
            m = r.other
            if _depends_on(m, r.x):
                return Reject("the additive term depends on the scores (not a mask or bias)")
            if not C.meta(m).is_floating_point():
                return Reject(f"additive mask has dtype {C.meta(m).dtype}; expected a float mask")
            masks.append(MaskTerm("add", m, factor))
        elif r.op == "fill_mask":
            if C.meta(r.other).dtype != torch.bool:
                return Reject(f"masked_fill/where mask has dtype {C.meta(r.other).dtype}; expected bool")
            masks.append(MaskTerm("fill", r.other, factor, r.fill, r.negate))
        cur = r.x


def _depends_on(node: Node, target: Node, limit: int = 10_000) -> bool:
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes)
    return False


def _peel_scales(node: Node, factor: sympy.Expr, rules: list[str],
                 dead: list[Node]) -> tuple[Node, sympy.Expr]:
    """``q * c`` (used only here) reads as ``q`` with ``c`` folded into the scale."""
    while True:
        r = C.read(node, C.scale)
        if r is None or not _single_user(node):
            return node, factor
        rules.append(f"{r.rule} on operand->scale")
        dead.append(node)
        node, factor = r.x, factor * r.other


def _is_buffer(ph: Node) -> bool:
    arg = ph.meta.get("grapharg")
    source = getattr(arg, "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else name   # a method before torch 2.12, a property after
    return "_buffers" in str(name) or "buffers" in ph.name


def constant_value(node: Node, gm: GraphModule, example_inputs: Sequence[Any]) -> Optional[torch.Tensor]:
    """Evaluate ``node`` if it depends only on buffers, attributes and constants (else None)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    order, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        if n.op == "placeholder":
            if not _is_buffer(n):
                return None
        elif n.op not in ("call_function", "call_method", "get_attr"):
            return None
        stack.extend(n.all_input_nodes)
    env: dict[Node, Any] = {}
    try:
        for n in sorted(order, key=lambda n: list(gm.graph.nodes).index(n)):
            if n.op == "placeholder":
                val = example_inputs[placeholders.index(n)]
                if not isinstance(val, torch.Tensor) or val.numel() > _MAX_CONST_EVAL_NUMEL:
                    return None
                env[n] = val
            elif n.op == "get_attr":
                env[n] = getattr(gm, n.target)
            else:
                args = torch.fx.node.map_arg(n.args, lambda a: env[a])
                kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
                if n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                else:
                    env[n] = n.target(*args, **kwargs)
    except Exception:  # evaluation is best effort: unknown means "not a constant"
        return None
    out = env.get(node)
    return out if isinstance(out, torch.Tensor) else None


def causal_kind(keep: torch.Tensor, nq: int, nk: int) -> Optional[str]:
    """``"top_left"``/``"bottom_right"`` when ``keep`` (broadcast over batch/heads) is causal."""
    if keep.dtype != torch.bool or keep.dim() < 2 or tuple(keep.shape[-2:]) != (nq, nk):
        return None
    flat = keep.reshape(-1, nq, nk)
    if not bool((flat == flat[:1]).all()):
        return None
    pattern = flat[0].cpu()
    ones = torch.ones(nq, nk, dtype=torch.bool)
    if torch.equal(pattern, ones.tril(0)):
        return "top_left"
    if torch.equal(pattern, ones.tril(nk - nq)):
        return "bottom_right"
    return None


def _static(*xs: Any) -> bool:
    return all(isinstance(x, int) for x in xs)


def _same_dims(a: Sequence[Any], b: Sequence[Any]) -> bool:
    if len(a) != len(b):
        return False
    return all(x is y or (_static(x, y) and x == y) or str(x) == str(y) for x, y in zip(a, b))


def match_softmax(sm: Node, gm: GraphModule, example_inputs: Sequence[Any]) -> Union[Match, Reject]:
    """Match the attention site anchored on softmax node ``sm``."""
    rules: list[str] = []
    r = C.read(sm, C.softmax)
    if r is None:
        return Reject("not a softmax")
    rules.append(r.rule)
    n = C.ndim(sm)
    if n is None:
        return Reject("softmax input has no recorded shape")
    if r.dim is None or (r.dim % n if isinstance(r.dim, int) else None) != n - 1:
        return Reject(f"softmax over dim {r.dim} of a {n}-D tensor, not the key axis (-1)")
    if n not in (3, 4):
        return Reject(f"{n}-D attention scores; fused attention takes [B, H, N, N] or [B·H, N, N]")
    fwd = _forward_chain(sm, rules)
    if isinstance(fwd, Reject):
        return fwd
    pv, after = fwd
    back = _backward_chain(r.x, rules)
    if isinstance(back, Reject):
        return back
    qk, factor, masks, before = back
    dead = [pv, *reversed(after), sm, *before]
    mm = C.read(qk, C.matmul)
    q, factor = _peel_scales(mm.x, factor, rules, dead)
    kt, factor = _peel_scales(mm.other, factor, rules, dead)
    t = C.read(kt, C.transpose_last2)
    if t is not None and _single_user(kt):
        rules.append(t.rule)
        dead.append(kt)
        k, k_transposed = t.x, True
        k, factor = _peel_scales(k, factor, rules, dead)
    else:
        k, k_transposed = kt, False
        rules.append("K from untransposed operand (kt.mT)")
    v = pv.args[1]
    qm, ktm, vm, outm = C.meta(q), C.meta(kt), C.meta(v), C.meta(pv)
    if not all(isinstance(t, torch.Tensor) for t in (qm, ktm, vm, outm)):
        return Reject("operands have no recorded tensor metadata")
    if not (qm.dim() == ktm.dim() == vm.dim() == n):
        return Reject(f"operand ranks differ: q {qm.dim()}-D, k {ktm.dim()}-D, v {vm.dim()}-D "
                      f"(broadcasting matmul); not fused")
    if not (_same_dims(qm.shape[:-2], ktm.shape[:-2]) and _same_dims(qm.shape[:-2], vm.shape[:-2])):
        return Reject(f"batch/head dims differ: q {tuple(qm.shape)}, kᵀ {tuple(ktm.shape)}, "
                      f"v {tuple(vm.shape)} (broadcast K/V); not fused")
    if not (qm.dtype == ktm.dtype == vm.dtype == outm.dtype):
        return Reject(f"dtypes differ: q {qm.dtype}, k {ktm.dtype}, v {vm.dtype}, output "
                      f"{outm.dtype}; the fused op needs one dtype")
    if qm.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return Reject(f"dtype {qm.dtype} is not a floating type")
    nq, nk = qm.shape[-2], ktm.shape[-1]
    causal, kept = "none", []
    for term in masks:
        if term.kind == "fill" and causal == "none" and _static(nq, nk):
            value = constant_value(term.node, gm, example_inputs)
            if value is not None:
                keep = ~value if term.negate else value
                kind = causal_kind(keep, nq, nk)
                # A finite fill keeps eager semantics only if no row is fully masked.
                safe = math.isinf(term.fill) or kind == "top_left" or nq <= nk
                if kind is not None and safe:
                    rules.append(f"constant bool mask->causal({kind})")
                    causal = kind
                    continue
        kept.append(term)
    fills = {t.fill * float(t.factor) for t in kept if t.kind == "fill"}
    if len(fills) > 1 and any(math.isfinite(f) for f in fills):
        return Reject(f"masked_fill with different finite fill values {sorted(fills)}; not fused")
    if fills and any(math.isfinite(f) for f in fills) and any(t.kind == "add" for t in kept):
        return Reject("a finite masked_fill combined with an additive mask: fusing would change "
                      "fully masked rows")
    return Match(sm, pv, q, k, v, k_transposed, factor, kept, causal, dead, rules)


def spec_of(m: Match, mask_meta: Optional[torch.Tensor], location: str,
            module_path: str) -> AttentionSpec:
    """The typed record the kernel choice reads."""
    qm, vm = C.meta(m.q), C.meta(m.v)
    km = C.meta(m.k) if m.k_transposed else C.meta(m.k).transpose(-2, -1)
    sdt = C.read(m.softmax, C.softmax).dtype
    kind, fill, info = "none", float("-inf"), None
    if mask_meta is not None:
        kind = "bool" if mask_meta.dtype == torch.bool else "additive"
        info = TensorInfo.of(mask_meta)
        fills = [t.fill * float(t.factor) for t in m.masks if t.kind == "fill"]
        fill = fills[0] if fills and kind == "bool" else float("-inf")
    mask_rg = bool(mask_meta is not None and getattr(mask_meta, "requires_grad", False))
    rg = any(getattr(t, "requires_grad", False) for t in (qm, km, vm)) or mask_rg
    return AttentionSpec(
        q=TensorInfo.of(qm), k=TensorInfo.of(km), v=TensorInfo.of(vm),
        scale=float(m.scale), scale_expr=_fmt(m.scale),
        mask=MaskSpec(m.causal, kind, info, fill, mask_rg),
        softmax_dtype=sdt, requires_grad=rg, source="eager_softmax",
        location=location, module_path=module_path, rules=tuple(m.rules))


def softmax_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if C.read(n, C.softmax) is not None]


def source_location(node: Node) -> str:
    """``file.py:line`` of the user frame that created ``node`` (from Dynamo's stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return "?"
    last = lines[-1]
    try:
        path = last.split('"')[1]
        line = last.split("line ")[1].split(",")[0]
        return f"{path.rsplit('/', 1)[-1]}:{line}"
    except IndexError:
        return last


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L['self']", "model")


__all__ = ["Match", "MaskTerm", "match_softmax", "spec_of", "softmax_nodes", "source_location",
           "module_path", "constant_value", "causal_kind"]
