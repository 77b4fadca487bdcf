"""One semantic matcher: from each softmax, walk back to Q·Kᵀ and forward to P·V.

The walk reads nodes only through the canonicalization rules, so every spelling those rules know
is matched by the same code. The result per softmax is a :class:`Match` (everything the rewrite
needs) or a :class:`~attnfuse.spec.Reject` with the reason the site stays as written.

Soundness rules (a rewrite never changes what the model computes):
  * every intermediate between Q·Kᵀ and P·V has exactly one user (the next step);
  * the softmax runs over the key axis; dropout on the probabilities is inactive;
  * q, k, v share a dtype and batch/head dims, and P·V's result has q's dtype;
  * the scale is a product of constants and, under dynamic shapes, of Python scalars computed
    in the graph (``SymFloat``: Dynamo's unspecialised float attributes read by ``.item()``, or
    expressions of sizes); such a scalar is passed to the op as its ``scale`` argument, so the
    fused site computes with its value at run time (a soft-cap ``c·tanh(s/c)`` by such a
    scalar likewise becomes the op's ``softcap``, as ``|c|``). It must not scale a mask (a
    mask applied before it);
  * causality and sliding windows are recognised only from a constant mask (built from buffers,
    shapes and constants) whose values equal a band exactly at the graph's static shape:
    query i keeps key j iff i + off - left <= j <= i + off + right (off = 0 or Nk - Nq, each side
    possibly unbounded). At symbolic sizes the mask must depend on sizes and constants only, and
    be the same band at every size assignment tried (``sizes.py``). Such a mask becomes the op's
    ``causal``/``window`` arguments. A band
    masked with -inf converts unless a finite masked_fill is applied after it (that fill would
    overwrite the -inf); a band masked with a huge finite value (finfo.min, -1e9, ...) converts
    only when it is the site's only mask and leaves no row fully masked, since only rows that
    keep a key give the same softmax whether the masked scores are huge-negative or -inf.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import sympy
import torch
from torch.fx import GraphModule, Node

from ..spec import AttentionSpec, MaskSpec, Reject, TensorInfo
from . import canonicalize as C
from .sizes import SizeEvaluator, free_symbols, substitute

_MAX_CONST_EVAL_NUMEL = 1 << 24


Step = tuple[str, tuple]          # a method call applied to an operand: ("permute", (0, 2, 1, 3))


@dataclass
class Operand:
    """A tensor the fused op needs: ``node`` with view ``ops`` applied (into the op's 4-D domain)."""

    node: Node
    ops: tuple[Step, ...] = ()

    def then(self, *steps: Step) -> "Operand":
        return Operand(self.node, self.ops + steps)


@dataclass
class MaskTerm:
    """A mask between Q·Kᵀ and softmax. ``factor``: scales applied after it (walking outward)."""

    kind: str                      # "add" or "fill"
    node: Node
    factor: sympy.Expr
    fill: float = float("-inf")
    negate: bool = False           # fill masks: True when the node marks positions to drop
    domain: tuple = ()             # the batch dims of the scores where the mask was applied
    ops: tuple[Step, ...] = ()     # views that bring it into the op's [B, H, Nq, Nk] domain


NO_WINDOW = (-1, -1)

# A finite masked score counts as masked only at or below this value (after the scales applied to
# it): exp(fill + O(|scores|)) is then exactly 0 in fp32 and fp64 for any |score| < 4,000, so such
# a fill and -inf give the same softmax on every row that keeps a key.
_HUGE_NEGATIVE = -1e4


@dataclass
class Match:
    softmax: Node
    pv: Node
    q: Operand
    k: Operand                     # [B, Hkv, Nk, D] after its ops
    v: Operand
    scale: sympy.Expr
    masks: list[MaskTerm]
    causal: str
    dead: list[Node]               # nodes the fused op replaces
    rules: list[str] = field(default_factory=list)
    softcap: float = 0.0
    out_ops: tuple[Step, ...] = ()  # from the op's [B, H, Nq, Dv] back to P·V's layout
    gqa_groups: int = 1
    window: tuple[int, int] = NO_WINDOW   # (left, right) band around the diagonal; -1 = unbounded
    runtime: tuple[tuple[Node, int], ...] = ()  # scalars of the graph, each ** ±1, times ``scale``
    softcap_runtime: tuple[tuple[Node, int], ...] = ()   # the same for the soft-cap (abs taken)

    def scale_hint(self) -> float:
        """The scale at the example's values (the runtime scalars at Dynamo's hints)."""
        return float(self.scale) * _hint_product(self.runtime)

    def softcap_hint(self) -> float:
        return abs(self.softcap * _hint_product(self.softcap_runtime))


def net_powers(factors: Sequence[tuple[Node, int]]) -> list[tuple[Node, int]]:
    """Runtime factors with each scalar's exponents summed, those that cancel dropped (``c`` and
    ``1/c`` around a soft-cap's tanh), in order of first appearance."""
    total: dict[Node, int] = {}
    for node, sign in factors:
        total[node] = total.get(node, 0) + sign
    return [(n, p) for n, p in total.items() if p]


def _hint_product(factors: Sequence[tuple[Node, int]]) -> float:
    value = 1.0
    for node, power in net_powers(factors):
        value = value * C.scalar_hint(node) ** power
    return value


class Context:
    """Per-graph facts the matcher reads: the graph, its example inputs, node order."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> None:
        self.gm, self.example_inputs = gm, example_inputs
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._const: dict[Node, Optional[torch.Tensor]] = {}
        self.sizes = SizeEvaluator(gm, example_inputs, self.order, self.placeholders, _is_state)

    def constant(self, node: Node) -> Optional[torch.Tensor]:
        if node not in self._const:
            self._const[node] = constant_value(node, self.gm, self.example_inputs, self)
        return self._const[node]

    def mask_samples(self, nodes: Sequence[Node], nq: Any, nk: Any
                     ) -> Optional[list[tuple[int, int, dict[Node, Optional[torch.Tensor]]]]]:
        """``(Nq, Nk, {node: its value or None})`` at each size assignment the masks ``nodes``
        must be read at: one, the graph's own sizes, when nothing is symbolic; at symbolic
        sizes, each assignment :class:`~attnfuse.passes.sizes.SizeEvaluator` tries (a node
        that is not a function of sizes and constants is None throughout). None when the
        sizes cannot be substituted."""
        fixed = {n: self.constant(n) for n in nodes}
        subs = {n: self.sizes.subgraph(n) for n in nodes if fixed[n] is None}
        symbolic = [n for n, sub in subs.items() if sub is not None and sub.symbols]
        if _static(nq, nk) and not symbolic:
            return [(nq, nk, fixed)]
        symbols = free_symbols(nq, nk).union(*(subs[n].symbols for n in symbolic))
        literals = set().union(*(subs[n].literals for n in symbolic))
        envs = self.sizes.assignments(symbols, literals)
        if envs is None:
            return None
        out = []
        for env in envs:
            a, b = substitute(nq, env), substitute(nk, env)
            if a is None or b is None or a < 1 or b < 1:
                return None
            values = dict(fixed)
            for n in symbolic:
                values[n] = self.sizes.evaluate(n, env)
            out.append((a, b, values))
        return out


def _is_meta_user(user: Node, node: Node) -> bool:
    """``y.type_as(node)`` reads only ``node``'s dtype."""
    return (user.op == "call_method" and user.target == "type_as" and len(user.args) == 2
            and user.args[1] is node and user.args[0] is not node)


def _users(node: Node, meta_users: Optional[list[Node]] = None) -> list[Node]:
    real = []
    for u in node.users:
        if meta_users is not None and _is_meta_user(u, node):
            meta_users.append(u)
        else:
            real.append(u)
    return real


def _op_name(node: Node) -> str:
    if node.op == "output":
        return "the graph output"
    return str(node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target))


def _describe_users(node: Node) -> str:
    return ", ".join(_op_name(u) for u in node.users)


def _fmt(expr: sympy.Expr) -> str:
    """Readable form of a folded scale: ``1/sqrt(64)`` becomes ``1/8``, 0.0883883 ``sqrt(2)/16``."""
    return _fmt_value(float(expr))


@functools.lru_cache(maxsize=256)
def _fmt_value(value: float) -> str:
    guess = sympy.nsimplify(value, [sympy.sqrt(2), sympy.sqrt(3), sympy.sqrt(5)], tolerance=1e-12)
    if abs(float(guess) - value) <= 1e-12 * abs(value) and len(str(guess)) < 16:
        return str(guess)
    return f"{value:.6g}"


def _forward_chain(sm: Node, rules: list[str]) -> Union[tuple[Node, C.Reading, list[Node]], Reject]:
    """From the softmax to the P·V matmul, through casts, views and inactive dropout."""
    cur, chain = sm, []
    while True:
        users = _users(cur)
        if len(users) != 1:
            return Reject(f"attention probabilities have {len(users)} users ({_describe_users(cur)}): "
                          f"they are returned or reused (e.g. output_attentions=True), so the "
                          f"softmax must stay")
        (user,) = users
        reason = C.active_dropout(user)
        if reason:
            return Reject(reason)
        step = C.read(user, C.cast, C.identity, C.batch_view)
        if step is not None and step.x is cur:
            rules.append(step.rule)
            chain.append(user)
            cur = user
            continue
        mm = C.read(user, C.matmul)
        if mm is not None and mm.x is cur and mm.other is not cur:
            if mm.perm_a is not None:
                return Reject(f"{mm.rule} reads the probabilities transposed; not a P·V product")
            if mm.bias is not None or mm.alpha != 1:
                return Reject("P·V via baddbmm with a bias or alpha != 1; not fused")
            rules.append(mm.rule)
            return user, mm, chain
        return Reject(f"softmax output feeds {_describe_users(cur)}, not a P·V matmul")


def _batch(node: Any) -> tuple:
    return tuple(C.meta(node).shape[:-2])


def _backward_chain(start: Node, rules: list[str], ctx: Context, meta_users: list[Node],
                    runtime: list[tuple[Node, int]], cap_runtime: list[tuple[Node, int]]
                    ) -> Union[tuple[Node, C.Reading, sympy.Expr, float, list[MaskTerm],
                                     list[Node]], Reject]:
    """From the softmax input back to Q·Kᵀ: scales, masks, soft-capping, upcasts and views.

    Runtime scalar factors are appended to ``runtime`` (they multiply the returned factor);
    those applied after a tanh soft-cap also to ``cap_runtime`` (they multiply the soft-cap).
    The op computes ``|cap|·tanh(scale·s/|cap|)`` with ``cap`` the factor applied after the
    tanh and ``scale`` all factors: for ``cap·tanh(inner·s)`` that is exact whatever ``cap``'s
    sign, tanh being odd."""
    cur, factor, masks, chain, softcap = start, sympy.Integer(1), [], [], 0.0
    while True:
        users = _users(cur, meta_users)
        if len(users) != 1:
            return Reject(f"attention scores have {len(users)} users ({_describe_users(cur)}); "
                          f"fusing would drop the other use")
        r = C.read(cur, C.matmul, C.cast, C.identity, C.batch_view, C.scale, C.scale_by_tensor,
                   C.scale_by_scalar, C.tanh, C.add_mask, C.fill_mask)
        if r is None:
            return Reject(_unsupported(cur))
        if r.op == "runtime_scale":
            why = runtime_scalar_reason(r.other)
            if why:
                return Reject(why)
            rules.append(r.rule)
            chain.append(cur)
            runtime.append((r.other, r.sign))
            cur = r.x
            continue
        if runtime and r.op in ("add_mask", "fill_mask"):
            return Reject(f"a mask is applied before the runtime scalar `{runtime[-1][0].name}` "
                          f"(a Python float of the graph) scales the scores; the fused op scales "
                          f"only Q·Kᵀ, so the site stays as written")
        if r.op == "scale" and isinstance(r.other, Node):
            if r.sign > 0 and ctx.constant(r.other) is None and ctx.constant(r.x) is not None:
                r = C.Reading("scale", r.rule, r.other, r.x)        # c * s with both 1-element
            c = _tensor_factor(r, ctx)
            if c is None:
                return Reject(f"scores are scaled by a tensor (`{r.other.name}`) that is not a "
                              f"compile-time constant (or is zero); not fused")
            r = C.Reading("scale", r.rule, r.x, c)
        rules.append(r.rule)
        chain.append(cur)
        if r.op == "matmul":
            return cur, r, factor, softcap, masks, chain
        if r.op == "cast":
            src = C.meta(r.x)
            if torch.finfo(r.dtype).bits < torch.finfo(src.dtype).bits:
                return Reject(f"scores are cast down to {r.dtype} before softmax; not fused")
        elif r.op == "scale":
            if masks and float(r.other) <= 0:
                return Reject("a non-positive scale applied after a mask would flip it")
            factor = factor * r.other
        elif r.op == "tanh":
            if softcap:
                return Reject("two tanh soft-caps on the scores; not fused")
            cap = float(factor) * _hint_product(runtime)
            if cap == 0 or not math.isfinite(cap):
                return Reject(f"tanh soft-capping scaled by {cap}; not fused")
            cap_runtime.extend(runtime)
            softcap = abs(float(factor))        # c·tanh(x) = |c|·tanh(sign(c)·x)
        elif r.op in ("add_mask", "fill_mask") and softcap:
            return Reject("a mask applied inside the tanh soft-cap; the fused op applies masks "
                          "after the cap, so the site stays as written")
        elif r.op == "add_mask":
            m = r.other
            if _depends_on(m, r.x):
                return Reject("the additive term depends on the scores (not a mask or bias)")
            mm = C.meta(m)
            if not isinstance(mm, torch.Tensor) or not mm.is_floating_point():
                return Reject(f"additive mask has dtype {getattr(mm, 'dtype', type(mm).__name__)}; "
                              f"expected a float mask")
            masks.append(MaskTerm("add", m, factor * r.sign, domain=_batch(cur)))
        elif r.op == "fill_mask":
            mm = C.meta(r.other)
            if not isinstance(mm, torch.Tensor) or mm.dtype != torch.bool:
                return Reject(f"masked_fill/where mask has dtype {getattr(mm, 'dtype', None)}; "
                              f"expected bool")
            masks.append(MaskTerm("fill", r.other, factor, r.fill, r.negate, domain=_batch(cur)))
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


def _unsupported(node: Node) -> str:
    """Why ``node`` (between Q·Kᵀ and the softmax, read by no rule) keeps the site unfused."""
    if C._is(node, *C._MUL) or C._is(node, *C._DIV):
        other = [a for a in node.args[:2] if isinstance(a, Node)
                 and isinstance(C.meta(a), torch.Tensor) and C.meta(a).numel() != 1]
        if len(other) == 2:
            small = min(other, key=lambda a: C.meta(a).numel())
            return (f"scores are {'multiplied' if C._is(node, *C._MUL) else 'divided'} by a "
                    f"tensor (`{small.name}`, shape {tuple(C.meta(small).shape)}: e.g. a learned "
                    f"per-head temperature), not by one scalar; that is a score modification the "
                    f"fused op does not take, so the site stays as written")
    return (f"unsupported score modification `{_op_name(node)}` between Q·Kᵀ and softmax; the "
            f"site stays as written")


def runtime_scalar_reason(node: Node) -> Optional[str]:
    """None when ``node`` (a scalar computed in the graph) may be the op's runtime scale."""
    hint = C.scalar_hint(node)
    if hint is None:
        return (f"scores are scaled by a data-dependent scalar (`{node.name}`); its value is "
                f"unknown when compiling, so the site stays as written")
    if hint == 0 or not math.isfinite(hint):
        return f"scores are scaled by a runtime scalar (`{node.name}`) equal to {hint}; not fused"
    return None


def _tensor_factor(r: C.Reading, ctx: Context) -> Optional[sympy.Expr]:
    """The factor of a ``scale_by_tensor`` reading when its tensor is a nonzero constant."""
    value = ctx.constant(r.other)
    if value is None or float(value.reshape(())) == 0:
        return None
    c = sympy.Float(float(value.reshape(())))
    return c if r.sign > 0 else 1 / c


def _peel_scales(node: Node, factor: sympy.Expr, rules: list[str], dead: list[Node],
                 ctx: Context, runtime: list[tuple[Node, int]]) -> tuple[Node, sympy.Expr]:
    """``q * c`` (used only here) reads as ``q`` with ``c`` folded into the scale (a runtime
    scalar ``c`` joins ``runtime``)."""
    while True:
        r = C.read(node, C.scale, C.scale_by_tensor, C.scale_by_scalar)
        if r is None or len(node.users) != 1:
            return node, factor
        if r.op == "runtime_scale":
            if runtime_scalar_reason(r.other):
                return node, factor
            rules.append(f"{r.rule} on operand->scale")
            dead.append(node)
            runtime.append((r.other, r.sign))
            node = r.x
            continue
        c = _tensor_factor(r, ctx) if isinstance(r.other, Node) else r.other
        if c is None:
            return node, factor
        rules.append(f"{r.rule} on operand->scale")
        dead.append(node)
        node, factor = r.x, factor * c


def _source_name(ph: Node) -> str:
    arg = ph.meta.get("grapharg")
    source = getattr(arg, "source", None)
    name = getattr(source, "name", "")
    return str(name() if callable(name) else name)   # a method before torch 2.12, a property after


def _is_buffer(ph: Node) -> bool:
    return "_buffers" in _source_name(ph) or "buffers" in ph.name


def _is_state(ph: Node) -> bool:
    """A placeholder Dynamo lifted from module state (a parameter or buffer), not an input."""
    return _is_buffer(ph) or "_parameters" in _source_name(ph) or "parameters" in ph.name


def _from_inputs(node: Node, limit: int = 2000) -> bool:
    """Whether ``node`` depends on a graph input other than module parameters and buffers."""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and not _is_state(n):
            return True
        stack.extend(n.all_input_nodes)
    return len(seen) >= limit


def constant_value(node: Node, gm: GraphModule, example_inputs: Sequence[Any],
                   ctx: Optional[Context] = None) -> Optional[torch.Tensor]:
    """Evaluate ``node`` if it depends only on buffers, attributes and constants (else None)."""
    ctx = ctx or Context(gm, example_inputs)
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
        if len(seen) > 256:
            return None
        stack.extend(n.all_input_nodes)
    env: dict[Node, Any] = {}
    try:
        for n in sorted(order, key=ctx.order.__getitem__):
            if n.op == "placeholder":
                val = example_inputs[ctx.placeholders.index(n)]
                if not isinstance(val, torch.Tensor) or val.numel() > _MAX_CONST_EVAL_NUMEL:
                    return None
                env[n] = val
            elif n.op == "get_attr":
                env[n] = getattr(gm, n.target)
            else:
                env[n] = C.run_node(n, env)
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


def _pattern(keep: torch.Tensor, nq: int, nk: int) -> Optional[torch.Tensor]:
    """``keep`` as one [Nq, Nk] bool pattern when it is the same for every batch/head (else None)."""
    if keep.dtype != torch.bool:
        return None
    if keep.dim() < 2:
        keep = keep.reshape((1,) * (2 - keep.dim()) + tuple(keep.shape))
    try:
        keep = keep.broadcast_to(tuple(keep.shape[:-2]) + (nq, nk))
    except RuntimeError:
        return None
    flat = keep.reshape(-1, nq, nk)
    if flat.shape[0] == 0 or not bool((flat == flat[:1]).all()):
        return None
    return flat[0].cpu()


def _band(nq: int, nk: int, off: int, left: int, right: int) -> torch.Tensor:
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    return (j >= i + off - left) & (j <= i + off + right)


def band_of(keep: torch.Tensor, nq: int, nk: int) -> Optional[tuple[str, tuple[int, int]]]:
    """``(causal, window)`` of the op that keeps exactly what ``keep`` keeps, when ``keep``
    (broadcast over batch/heads) is a band ``i + off - left <= j <= i + off + right`` with
    ``left, right >= 0`` or unbounded; else None.

    Causal forms are preferred: a band whose right edge is the diagonal becomes ``causal`` (top-left
    when off = 0, bottom-right when off = Nk - Nq) with ``window=(left, 0)`` (no window when the
    left side is unbounded). Other bands need off = 0: ``causal="none", window=(left, right)``.
    An all-True pattern is ``("none", (-1, -1))``: no mask at all.
    """
    pattern = _pattern(keep, nq, nk)
    if pattern is None or nq == 0 or nk == 0:
        return None
    if bool(pattern.all()):
        return "none", NO_WINDOW
    live = pattern.any(-1)
    if not bool(live.any()):
        return None
    rows = torch.arange(nq)[live]
    first = pattern[live].to(torch.uint8).argmax(-1)               # first kept key per row
    last = nk - 1 - pattern[live].flip(-1).to(torch.uint8).argmax(-1)
    plain = None
    for causal, off in (("top_left", 0), ("bottom_right", nk - nq)):
        left = int((rows + off - first).max())                      # diagonal distances
        right = int((last - rows - off).max())
        if left < 0 or right < 0 or not torch.equal(pattern, _band(nq, nk, off, left, right)):
            continue
        left = -1 if left >= nq - 1 + off else left        # reaches key 0 on every row
        if right == 0:
            return causal, (NO_WINDOW if left < 0 else (left, 0))
        if off == 0 and plain is None:
            plain = ("none", (left, -1 if right >= nk - 1 else right))
    return plain


def _sym(x: Union[int, float]) -> sympy.Expr:
    return sympy.Float(x) if isinstance(x, float) else sympy.Integer(x)


def _static(*xs: Any) -> bool:
    return all(isinstance(x, int) for x in xs)


def same_dims(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Equal sizes: the same int, the same symbol, or the same printed expression."""
    if len(a) != len(b):
        return False
    return all(x is y or (_static(x, y) and x == y) or str(x) == str(y) for x, y in zip(a, b))


# -- domains: the scores' batch dims as the softmax sees them, and the op's [B, H] -----------------

def _to_op(smb: tuple) -> tuple[Step, ...]:
    """Views taking a tensor in the softmax's batch domain into the op's 4-D [B, H, ...] domain."""
    r = len(smb)
    if r == 2:
        return ()
    if r < 2:
        return (("unsqueeze", (0,)),) * (2 - r)
    return (("flatten", (0, r - 2)),)


def _from_op(smb: tuple) -> Union[tuple[Step, ...], Reject]:
    r = len(smb)
    if r == 2:
        return ()
    if r < 2:
        return (("squeeze", (0,)),) * (2 - r)
    lead = _sizes(smb[:-1])
    if lead is None:
        return Reject("scores with more than 4 dims and dynamic leading sizes; not fused")
    return (("unflatten", (0, lead)),)


def _sizes(dims: Sequence[Any]) -> Optional[tuple]:
    """Static sizes for view ops, with at most one dynamic size written as -1."""
    out = tuple(d if isinstance(d, int) else -1 for d in dims)
    return out if out.count(-1) <= 1 else None


def _rebatch(src: tuple, dst: tuple) -> Union[tuple[Step, ...], Reject]:
    """Views from batch dims ``src`` to ``dst`` (same number of elements), last two dims kept."""
    if same_dims(src, dst):
        return ()
    steps: list[Step] = []
    if len(src) == 0:
        steps.append(("unsqueeze", (0,)))
    elif len(src) > 1:
        steps.append(("flatten", (0, len(src) - 1)))
    if len(dst) == 0:
        steps.append(("squeeze", (0,)))
    elif len(dst) > 1:
        sizes = _sizes(dst)
        if sizes is None:
            return Reject(f"the scores' batch dims are reshaped {src} -> {dst} with more than one "
                          f"dynamic size; not fused")
        steps.append(("unflatten", (0, sizes)))
    return tuple(steps)


def _mask_ops(term: MaskTerm, smb: tuple) -> Union[tuple[Step, ...], Reject]:
    """Views that make a mask applied in ``term.domain`` broadcast in the op's domain."""
    m = C.meta(term.node)
    rank = len(term.domain) + 2
    if m.dim() > rank:
        return Reject(f"mask of {m.dim()} dims on {rank}-D scores; not fused")
    lead = (1,) * (rank - m.dim()) + tuple(m.shape[:-2]) if m.dim() >= 2 else (1,) * (rank - 2)
    if all(isinstance(d, int) and d == 1 for d in lead):
        # Broadcast over every batch dim: only its rank may need trimming for the op's 4 dims.
        return (("flatten", (0, m.dim() - 4)),) if m.dim() > 4 else ()
    if same_dims(term.domain, smb) and len(smb) <= 2:
        return ()
    if not _static(*term.domain) or m.dim() < 2:
        return Reject("a mask on reshaped scores with dynamic batch dims; not fused")
    full = tuple(term.domain) + (-1, -1)
    pad = (("reshape", ((1,) * (rank - m.dim()) + tuple(m.shape),)),) if m.dim() < rank else ()
    rebatch = _rebatch(term.domain, smb)
    if isinstance(rebatch, Reject):
        return rebatch
    return pad + (("expand", full),) + rebatch + _to_op(smb)


def _operand_view(node: Node, perm: Optional[tuple]) -> Operand:
    return Operand(node, (("permute", perm),) if perm is not None else ())


def _swap_last2(perm: tuple) -> tuple:
    return perm[:-2] + (perm[-1], perm[-2])


def _broadcast_heads(qm: Any, km: Any, vm: Any, qk_b: tuple, pv_b: tuple, smb: tuple) -> bool:
    """K and V of one head that the matmuls broadcast over the query heads (Falcon's MQA)."""
    if not (len(smb) == 2 and same_dims(qk_b, smb) and same_dims(pv_b, smb)
            and km.dim() == vm.dim() == qm.dim() == 4 and same_dims(qm.shape[:-2], smb)):
        return False
    one = lambda t: isinstance(t.shape[1], int) and t.shape[1] == 1  # noqa: E731
    return (one(km) and one(vm) and isinstance(qm.shape[1], int) and qm.shape[1] > 1
            and same_dims(km.shape[:1], smb[:1]) and same_dims(vm.shape[:1], smb[:1]))


def _fold_repeats(k: Operand, v: Operand, rules: list[str]) -> tuple[Operand, Operand, int]:
    """repeat_kv / repeat_interleave / expand on K and V (same groups) read as GQA by index."""
    rk, rv = C.read(k.node, C.repeat_heads), C.read(v.node, C.repeat_heads)
    keeps_heads = all(name == "permute" and args[:2] == (0, 1) or name == "transpose"
                      and set(args) == {-2, -1} or name == "transpose" and set(args) == {2, 3}
                      for name, args in k.ops + v.ops)
    if rk is None or rv is None or rk.other != rv.other or not keeps_heads:
        return k, v, 1
    if C.meta(rk.x).shape[1] != C.meta(rv.x).shape[1]:
        return k, v, 1
    rules.append(f"{rk.rule} on K and V")
    return Operand(rk.x, k.ops), Operand(rv.x, v.ops), int(rk.other)


def match_softmax(sm: Node, gm: GraphModule, example_inputs: Sequence[Any],
                  ctx: Optional[Context] = None) -> Union[Match, Reject]:
    """Match the attention site anchored on softmax node ``sm``."""
    ctx = ctx or Context(gm, example_inputs)
    rules: list[str] = []
    r = C.read(sm, C.softmax)
    if r is None:
        return Reject("not a softmax")
    rules.append(r.rule)
    n = C.ndim(sm)
    if n is None:
        return Reject("softmax input has no recorded shape")
    if r.dim is None or not isinstance(r.dim, int) or r.dim % max(n, 1) != n - 1:
        return Reject(f"softmax over dim {r.dim} of a {n}-D tensor, not the key axis (-1)")
    if n < 2:
        return Reject(f"{n}-D scores; attention needs a query and a key axis")
    fwd = _forward_chain(sm, rules)
    if isinstance(fwd, Reject):
        return fwd
    pv, pv_read, after = fwd
    meta_users: list[Node] = []
    runtime: list[tuple[Node, int]] = []
    cap_runtime: list[tuple[Node, int]] = []
    back = _backward_chain(r.x, rules, ctx, meta_users, runtime, cap_runtime)
    if isinstance(back, Reject):
        return back
    qk, mm, factor, softcap, masks, before = back
    if any(u not in after for u in meta_users):
        return Reject("the scores' dtype is read outside the attention site (type_as); not fused")
    if mm.out_perm is not None:
        return Reject(f"{mm.rule} writes the scores with the key axis not last; not fused")
    if mm.alpha == 0:                                  # baddbmm: alpha·(a @ b) + beta·bias
        return Reject("baddbmm with alpha=0 ignores Q·Kᵀ; not attention")
    if mm.bias is not None:
        if runtime:
            return Reject("baddbmm's bias is scaled by a runtime scalar; not fused")
        bm = C.meta(mm.bias)
        if not isinstance(bm, torch.Tensor) or not bm.is_floating_point():
            return Reject("baddbmm's bias is not a float tensor; not fused")
        masks.append(MaskTerm("add", mm.bias, factor * _sym(mm.beta), domain=_batch(qk)))
    factor = factor * _sym(mm.alpha)
    dead = [pv, *reversed(after), sm, *([r.spans] if r.spans is not None else []), *before]
    q_node, factor = _peel_scales(mm.x, factor, rules, dead, ctx, runtime)
    kt_node, factor = _peel_scales(mm.other, factor, rules, dead, ctx, runtime)
    q = _operand_view(q_node, mm.perm_a)
    if mm.perm_b is not None:
        k = Operand(kt_node, (("permute", _swap_last2(mm.perm_b)),))
    else:
        t = C.read(kt_node, C.transpose_last2)
        if t is not None and len(kt_node.users) == 1:
            rules.append(t.rule)
            dead.append(kt_node)
            k_node, factor = _peel_scales(t.x, factor, rules, dead, ctx, runtime)
            k = Operand(k_node)
        else:
            k = Operand(kt_node, (("transpose", (-2, -1)),))
            rules.append("K from untransposed operand (kt.mT)")
    v = _operand_view(pv_read.other, pv_read.perm_b)
    return _finish(sm, r, pv, pv_read, qk, q, k, v, factor, softcap, masks, dead, rules, ctx,
                   tuple(runtime), tuple(cap_runtime))


def _view_meta(op: Operand) -> Any:
    x = C.meta(op.node)
    for name, args in op.ops:
        x = getattr(x, name)(*args)
    return x


def _finish(sm: Node, r: C.Reading, pv: Node, pv_read: C.Reading, qk: Node, q: Operand, k: Operand,
            v: Operand, factor: sympy.Expr, softcap: float, masks: list[MaskTerm], dead: list[Node],
            rules: list[str], ctx: Context, runtime: tuple[tuple[Node, int], ...] = (),
            cap_runtime: tuple[tuple[Node, int], ...] = ()) -> Union[Match, Reject]:
    if not _from_inputs(k.node):
        return Reject(f"the keys (`{k.node.name}`) are module weights, not activations: a gate or "
                      f"classifier softmax(x·W)·E, not attention; left alone")
    try:
        qm, km, vm = _view_meta(q), _view_meta(k), _view_meta(v)
    except Exception as e:  # a permutation or view that does not apply: not the layout we read
        return Reject(f"operands do not have the layout the product implies ({e}); not fused")
    outm, scores = C.meta(pv), C.meta(r.x)
    if not all(isinstance(t, torch.Tensor) for t in (qm, km, vm, outm, scores)):
        return Reject("operands have no recorded tensor metadata")
    if not (qm.dim() == km.dim() and vm.dim() >= 2):
        return Reject(f"operand ranks differ: q {qm.dim()}-D, k {km.dim()}-D (broadcasting "
                      f"matmul); not fused")
    qk_b, smb = tuple(C.meta(qk).shape[:-2]), tuple(scores.shape[:-2])
    pv_canon = tuple(outm.shape) if pv_read.out_perm is None else tuple(
        outm.shape[pv_read.out_perm.index(i)] for i in range(outm.dim()))
    pv_b = pv_canon[:-2]
    broadcast_kv = _broadcast_heads(qm, km, vm, qk_b, pv_b, smb)
    if broadcast_kv:
        rules.append(f"K/V with one head broadcast over {qm.shape[1]} query heads->MQA")
    elif not (same_dims(qm.shape[:-2], qk_b) and same_dims(km.shape[:-2], qk_b)
              and same_dims(vm.shape[:-2], pv_b)):
        return Reject(f"batch/head dims differ: q {tuple(qm.shape)}, k {tuple(km.shape)}, "
                      f"v {tuple(vm.shape)} (broadcast K/V); not fused")
    if not (qm.dtype == km.dtype == vm.dtype == outm.dtype):
        return Reject(f"dtypes differ: q {qm.dtype}, k {km.dtype}, v {vm.dtype}, output "
                      f"{outm.dtype}; the fused op needs one dtype")
    if qm.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return Reject(f"dtype {qm.dtype} is not a floating type")
    groups = qm.shape[1] if broadcast_kv else 1
    if not broadcast_kv and same_dims(qk_b, smb) and same_dims(pv_b, smb) and len(smb) == 2:
        k, v, groups = _fold_repeats(k, v, rules)
    to_op = _to_op(smb)
    parts = [_rebatch(qk_b, smb), _rebatch(pv_b, smb), _from_op(smb), _rebatch(smb, pv_b)]
    for p in parts:
        if isinstance(p, Reject):
            return p
    qk_in, pv_in, op_out, sm_to_pv = parts
    if qk_in or pv_in:
        rules.append(f"batch dims {qk_b} -> {smb} -> {pv_b} (views)")
    q, k = q.then(*qk_in, *to_op), k.then(*qk_in, *to_op)
    v = v.then(*pv_in, *to_op)
    out_ops = op_out + sm_to_pv + ((("permute", pv_read.out_perm),) if pv_read.out_perm else ())
    nq, nk = qm.shape[-2], km.shape[-2]
    nonzero = [t for t in masks if not (t.kind == "add" and _is_zero(t, ctx, nq, nk))]
    rules.extend(["all-zero additive term dropped"] * (len(masks) - len(nonzero)))
    causal, window, kept = _bands(nonzero, nq, nk, ctx, rules)
    for term in kept:
        ops = _mask_ops(term, smb)
        if isinstance(ops, Reject):
            return ops
        term.ops = ops
    fills = {t.fill * float(t.factor) for t in kept if t.kind == "fill"}
    if len(fills) > 1 and any(math.isfinite(f) for f in fills):
        return Reject(f"masked_fill with different finite fill values {sorted(fills)}; not fused")
    if fills and any(math.isfinite(f) for f in fills) and any(t.kind == "add" for t in kept):
        return Reject("a finite masked_fill combined with an additive mask: fusing would change "
                      "fully masked rows")
    if any(float(t.factor) <= 0 for t in kept if t.kind == "fill"):
        return Reject("a masked_fill followed by a non-positive scale; not fused")
    return unmerge_heads(Match(sm, pv, q, k, v, factor, kept, causal, dead, rules, softcap,
                               out_ops, groups, window, runtime, cap_runtime))


# -- heads merged into the batch: read the 4-D tensor they were merged from -------------------------

def _known_equal(a: Any, b: Any) -> bool:
    """``a == b`` for sizes, without adding a guard on symbolic ones."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001  (an expression it cannot decide: not known equal)
        return False


RESHAPES = {("call_method", "reshape"), ("call_method", "view"), ("call_method", "flatten"),
             ("call_function", torch.reshape), ("call_function", torch.flatten)}


def merged_from(node: Node) -> Optional[Node]:
    """The 4-D ``[B, H, N, D]`` tensor that ``node``, a ``[B·H, N, D]`` tensor, is a reshape of
    (diffusers' ``head_to_batch_dim``, ``x.reshape(B * H, N, D)``), or None. With the last two
    sizes kept, any reshape between those shapes is ``flatten(0, 1)``."""
    if (node.op, node.target) not in RESHAPES or not node.args:
        return None
    src = node.args[0]
    if not isinstance(src, Node):
        return None
    s, d = C.meta(src), C.meta(node)
    if not (isinstance(s, torch.Tensor) and isinstance(d, torch.Tensor)):
        return None
    if s.dim() != 4 or d.dim() != 3 or not same_dims(d.shape[1:], s.shape[2:]):
        return None
    return src if _known_equal(d.shape[0], s.shape[0] * s.shape[1]) else None


_TO_3D_OP, _FROM_3D_OP = (("unsqueeze", (0,)),), (("squeeze", (0,)),)
UNMERGED_OUT = ("flatten", (0, 1))


def unmerge_heads(m: Match) -> Match:
    """A site on ``[B·H, N, D]`` operands that were reshaped from ``[B, H, N, D]`` tensors
    (the reshape copies when the 4-D tensor is a permuted view, as it is after a projection)
    reads the 4-D tensors instead, and its output is flattened back; the rewrite then folds a
    reshape of that output back to ``[B, H, Nq, Dv]`` away, so neither side copies. Same values:
    only the views differ."""
    if m.out_ops != _FROM_3D_OP or any(x.ops != _TO_3D_OP for x in (m.q, m.k, m.v)):
        return m
    srcs = [merged_from(x.node) for x in (m.q, m.k, m.v)]
    if any(s is None for s in srcs):
        return m
    heads = [tuple(C.meta(s).shape[:2]) for s in srcs]
    if not (same_dims(heads[0], heads[1]) and same_dims(heads[0], heads[2])):
        return m
    b, h = heads[0]
    masks = []
    for t in m.masks:   # masks broadcast right-aligned: the merged dim is the third from last
        shape = _shape_after(t)
        if shape is None:
            return m
        r = len(shape)
        if r < 3 or (isinstance(shape[r - 3], int) and shape[r - 3] == 1):
            masks.append(t)
        elif _static(b, h):        # [(1,) B·H, Nq, Nk] -> [B, H, Nq, Nk]
            split = (("squeeze", (0,)),) if r == 4 else ()
            masks.append(dataclasses.replace(t, ops=t.ops + split + (("unflatten", (0, (b, h))),)))
        else:
            return m
    rules = m.rules + ["heads merged into the batch ([B·H, N, D] reshapes) -> the [B, H, N, D] "
                       "tensors they came from (no copies)"]
    q, k, v = (Operand(s) for s in srcs)
    return dataclasses.replace(m, q=q, k=k, v=v, masks=masks, out_ops=(UNMERGED_OUT,),
                               rules=rules)


def _shape_after(t: MaskTerm) -> Optional[tuple]:
    """The shape of mask term ``t`` after its views, from its fake value."""
    x = C.meta(t.node)
    if not isinstance(x, torch.Tensor):
        return None
    try:
        for name, args in t.ops:
            x = getattr(x, name)(*args)
    except Exception:  # noqa: BLE001
        return None
    return tuple(x.shape) if x.dim() <= 4 else None


def _is_zero(term: MaskTerm, ctx: Context, nq: Any, nk: Any) -> bool:
    """A constant additive term that is all zeros (``baddbmm(torch.zeros(...), q, kᵀ)``), at
    every size assignment tried when it is built from symbolic sizes."""
    samples = ctx.mask_samples([term.node], nq, nk) or []
    return bool(samples) and all(vals[term.node] is not None and not bool(vals[term.node].any())
                                 for _, _, vals in samples)


@dataclass
class _BandTerm:
    term: MaskTerm
    keep: torch.Tensor              # [Nq, Nk] pattern the term keeps
    exact: bool                     # its masked scores are -inf (not a huge finite value)


def _effective_fill(term: MaskTerm) -> float:
    return term.fill * float(term.factor)


def _band_term(term: MaskTerm, nq: int, nk: int, value: Optional[torch.Tensor]
               ) -> Optional[_BandTerm]:
    """The keep-pattern of a constant mask (``value``) that only keeps or masks (bool with a
    -inf or huge fill; additive with entries 0 and -inf or huge negative values), else None."""
    if float(term.factor) <= 0 or value is None:
        return None
    if term.kind == "fill":
        fill = _effective_fill(term)
        if value.dtype != torch.bool or not (fill == -math.inf or fill <= _HUGE_NEGATIVE):
            return None
        keep, exact = (~value if term.negate else value), fill == -math.inf
    else:
        if not value.is_floating_point():
            return None
        ninf = torch.isneginf(value)
        huge = ~ninf & (value.double() * float(term.factor) <= _HUGE_NEGATIVE)
        keep = value == 0
        if not bool((keep | ninf | huge).all()):
            return None
        exact = not bool(huge.any())
    pattern = _pattern(keep, nq, nk)
    return None if pattern is None else _BandTerm(term, pattern, exact)


@dataclass
class _Decision:
    taken: tuple[int, ...]              # the masks that together spell a band
    acc: Optional[torch.Tensor]         # their joint keep-pattern
    why: dict[int, str]                 # why each other constant mask stays dense


def _decide(masks: list[MaskTerm], nq: int, nk: int, values: dict[Node, Optional[torch.Tensor]]
            ) -> _Decision:
    """Which constant masks (with ``values`` at sizes ``nq``, ``nk``) fold into one band."""
    cands = {i: b for i, t in enumerate(masks)
             if (b := _band_term(t, nq, nk, values.get(t.node))) is not None}
    finite_fill = [t.kind == "fill" and math.isfinite(_effective_fill(t)) for t in masks]
    acc: Optional[torch.Tensor] = None
    taken: list[int] = []
    why: dict[int, str] = {}
    for exact in (True, False):
        for i, b in cands.items():
            if b.exact != exact:
                continue
            if exact and any(finite_fill[:i]):
                why[i] = "a finite masked_fill applied after it overwrites its -inf entries"
                continue
            trial = b.keep if acc is None else acc & b.keep
            if band_of(trial, nq, nk) is None:
                why[i] = "not a causal band or sliding window" + (
                    " (together with the other constant masks)" if acc is not None else "")
                continue
            acc, taken = trial, taken + [i]
    if any(not cands[i].exact for i in taken):
        alone = len(taken) == len(masks)
        if not (alone and bool(acc.any(-1).all())):
            for i in taken:
                if not cands[i].exact:
                    why[i] = ("its huge finite fill equals -inf only when no row is fully masked, "
                              "which holds only for the site's only mask leaving every row a key")
            taken = [i for i in taken if cands[i].exact]
            acc = None
            for i in taken:
                acc = cands[i].keep if acc is None else acc & cands[i].keep
    return _Decision(tuple(taken), acc, why)


def band_keep(causal: str, window: tuple[int, int], nq: int, nk: int) -> torch.Tensor:
    """The [Nq, Nk] pattern the op keeps for ``causal`` and ``window`` (``kernels/reference.py``)."""
    off = nk - nq if causal == "bottom_right" else 0
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    keep = torch.ones(nq, nk, dtype=torch.bool)
    if causal != "none":
        keep &= j <= i + off
    left, right = window
    if left >= 0:
        keep &= j >= i + off - left
    if right >= 0:
        keep &= j <= i + off + right
    return keep


def _bands(masks: list[MaskTerm], nq: Any, nk: Any, ctx: Context, rules: list[str]
           ) -> tuple[str, tuple[int, int], list[MaskTerm]]:
    """Fold the constant masks that together spell a band into ``(causal, window)``; returns
    them with the mask terms that stay dense (in their original order).

    ``masks`` run from the softmax inwards, so ``masks[:i]`` are applied after ``masks[i]``.
    A -inf band converts unless a finite masked_fill is applied after it (it would overwrite the
    -inf; an addition cannot). A huge-finite band converts only if, once converted, the site has
    no other mask and no row is fully masked: only rows that keep a key give the same softmax
    whether the masked scores are huge or -inf.

    At symbolic sizes the masks are read at every size assignment of
    :meth:`Context.mask_samples`; a band converts only if the same masks are taken at each, and
    their joint pattern is, at each, exactly the band read at the largest.
    """
    samples = ctx.mask_samples([t.node for t in masks], nq, nk) if masks else None
    if not samples:
        return "none", NO_WINDOW, list(masks)
    decisions = [_decide(masks, a, b, values) for a, b, values in samples]
    d = decisions[0]                       # at the graph's own sizes, or the base assignment
    for i in sorted(d.why):
        rules.append(f"constant mask kept dense: {d.why[i]}")
    if not d.taken:
        return "none", NO_WINDOW, list(masks)
    kinds = sorted({"bool" if masks[i].kind == "fill" else "additive" for i in d.taken})
    what = "constant"
    if len(samples) == 1:
        causal, window = band_of(d.acc, samples[0][0], samples[0][1])
        checked = ""
    else:
        what = "size-only"
        missing = [(a, b) for a, b, values in samples
                   if any(values[masks[i].node] is None for i in d.taken)]
        if missing:
            rules.append(f"size-only {'+'.join(kinds)} mask kept dense: it could not be evaluated "
                         f"at every size tried (e.g. Nq, Nk = {missing[0]}: over the evaluation "
                         f"limit, or undefined there)")
            return "none", NO_WINDOW, list(masks)
        big = max(range(len(samples)), key=lambda s: samples[s][0] * samples[s][1])
        band = band_of(decisions[big].acc, samples[big][0], samples[big][1]) \
            if decisions[big].taken == d.taken else None
        same = band is not None and all(
            e.taken == d.taken and torch.equal(_pattern(e.acc, a, b), band_keep(*band, a, b))
            for e, (a, b, _) in zip(decisions, samples))
        if not same:
            rules.append(f"size-only {'+'.join(kinds)} mask kept dense: not the same causal band "
                         f"or window at every size tried ({len(samples)} size assignments)")
            return "none", NO_WINDOW, list(masks)
        causal, window = band
        checked = f" (the same band at all {len(samples)} size assignments tried)"
    band = [f"causal({causal})"] * (causal != "none") + [f"window{window}"] * (window != NO_WINDOW)
    rules.append(f"{what} {'+'.join(kinds)} mask->{'+'.join(band) or 'no mask'}{checked}")
    return causal, window, [t for i, t in enumerate(masks) if i not in d.taken]


def scalar_name(node: Node) -> str:
    """Where a runtime scalar comes from: ``self.scaling`` for a module attribute Dynamo reads by
    ``.item()``, else the node's name."""
    src = node.args[0] if (node.op == "call_method" and node.target == "item" and node.args
                           and isinstance(node.args[0], Node)) else node
    if src.op == "placeholder":
        name = _source_name(src)
        if name:
            name = re.sub(r"\._modules\['([^']+)'\]", r".\1", name)
            return name.replace("L['self'].", "self.").replace("L['self']", "self")
    return node.name


def scale_expr(m: Match) -> str:
    """The scale as the report shows it: ``1/8``, or ``self.scaling (0.125 when compiled)``."""
    if not m.runtime:
        return _fmt(m.scale)
    parts = [scalar_name(n) + ("" if p == 1 else f"^{p}") for n, p in net_powers(m.runtime)]
    if float(m.scale) != 1.0:
        parts.insert(0, _fmt(m.scale))
    return f"{'·'.join(parts)} (runtime, {_fmt_value(m.scale_hint())} when compiled)"


def spec_of(m: Match, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: Optional[torch.Tensor], fill: float, location: str,
            module_path: str) -> AttentionSpec:
    """The typed record the kernel choice reads (``q, k, v, mask``: the op's operand metadata)."""
    sdt = C.read(m.softmax, C.softmax).dtype
    kind, info = "none", None
    if mask is not None:
        kind = "bool" if mask.dtype == torch.bool else "additive"
        info = TensorInfo.of(mask)
    mask_rg = bool(mask is not None and getattr(mask, "requires_grad", False))
    rg = any(getattr(t, "requires_grad", False) for t in (q, k, v)) or mask_rg
    return AttentionSpec(
        q=TensorInfo.of(q), k=TensorInfo.of(k), v=TensorInfo.of(v),
        scale=m.scale_hint(), scale_expr=scale_expr(m),
        mask=MaskSpec(m.causal, kind, info, fill if kind == "bool" else float("-inf"), mask_rg,
                      m.window),
        gqa_groups=m.gqa_groups, softcap=m.softcap_hint(),
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


__all__ = ["Context", "Match", "MaskTerm", "Operand", "match_softmax", "spec_of", "softmax_nodes", "source_location",
           "module_path", "constant_value", "causal_kind", "band_of", "NO_WINDOW"]
