"""Canonicalization rules: the many spellings of one operation, read as one form.

Each rule looks at a single FX node of a Dynamo (torch-level) graph and, when the node is one
spelling of its operation, returns the canonical reading plus the rule's name (for ``explain()``).
Rules only *read* the graph: nothing is rewritten unless a whole attention site matches, so a
model's other arithmetic is never perturbed. A new spelling in the wild is one new entry here.

Canonical forms:
  matmul(a, b)              a @ b, torch.matmul, torch.bmm, Tensor.matmul/bmm; einsum with one
                            contracted and one free index per operand (operands read through
                            permutations); baddbmm(bias, a, b, beta, alpha) = alpha·a@b + beta·bias
  transpose_last2(x)        x.transpose(-2, -1), permute(..., -1, -2), x.mT, x.swapaxes(-1, -2)
  batch_view(x)             view/reshape/flatten/unflatten/(un)squeeze that keep the last two dims
                            (B·H ↔ B, H head splits around the scores)
  scale(x, c)               x * c, c * x, x / c, torch.mul/div, in-place forms, with c a Python
                            number, or a one-element tensor (``scale_by_tensor``; its value is
                            read by the matcher only if it is a compile-time constant)
  runtime_scale(x, c)       x * c, x / c with c a Python scalar computed in the graph
                            (``scale_by_scalar``): under dynamic shapes Dynamo passes a float
                            module attribute (``self.scaling``) as a 0-dim tensor input read by
                            ``.item()``, and ``1 / math.sqrt(q.size(-1))`` is an expression of a
                            size; either is a ``SymFloat`` (or ``SymInt``) node
  cast(x, dtype)            x.float(), .half(), .bfloat16(), .to(dtype), .type(dtype), .type_as(y)
  identity(x)               dropout in eval mode or with p = 0, .contiguous(), .clone()
  tanh(x)                   torch.tanh, Tensor.tanh, F.tanh (soft-capping: c·tanh(s/c))
  softmax(x, dim, dtype)    torch.softmax, F.softmax, Tensor.softmax, nn.Softmax (inlined), and
                            log_softmax(x).exp(): exp(x − m − log Σ exp(x − m)) is softmax exactly
  add_mask(x, m)            x + m, m + x, torch.add, x += m, x - m (a negated additive term)
  fill_mask(x, keep, fill)  x.masked_fill(m, v) (keep = ~m), torch.where(m, x, v), where(m, v, x)
  repeat_heads(x, g)        repeat_kv (x[:, :, None].expand(..., g, ...).reshape), repeat_interleave
                            on the head dim, expand of a single head: GQA/MQA K and V
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import sympy
import torch
import torch.nn.functional as F
from torch.fx import Node

Rule = Callable[[Node], Optional["Reading"]]


@dataclass(frozen=True)
class Reading:
    """The canonical reading of one node: ``op`` with operands, and the rule that saw it."""

    op: str
    rule: str
    x: Any = None                 # the main operand (a Node)
    other: Any = None             # second operand: matmul rhs, mask node, scale factor, ...
    fill: Any = None              # masked_fill/where fill value
    negate: bool = False          # fill_mask: the mask marks positions to *drop*
    dim: Any = None               # softmax dim
    dtype: Any = None             # cast / softmax dtype
    perm_a: Optional[tuple] = None    # matmul: permute x to [batch..., i, c] (None = as is)
    perm_b: Optional[tuple] = None    # matmul: permute other to [batch..., c, j]
    out_perm: Optional[tuple] = None  # matmul: result = canonical [batch..., i, j].permute(out_perm)
    bias: Any = None              # matmul: baddbmm's input (None when beta = 0)
    alpha: Any = 1                # matmul: baddbmm's alpha (the product's factor)
    beta: Any = 1                 # matmul: baddbmm's beta (the bias' factor)
    spans: Any = None             # softmax: the log_softmax node under exp(log_softmax(x))
    sign: int = 1                 # add_mask: -1 for ``x - m``; scale_by_tensor: -1 for ÷


def meta(node: Any) -> Any:
    """The fake tensor (or value) a Dynamo graph recorded for ``node``."""
    if not isinstance(node, Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def ndim(node: Any) -> Optional[int]:
    v = meta(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is(node: Node, functions: tuple, methods: tuple) -> bool:
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# -- products -------------------------------------------------------------------------------------

def matmul(node: Node) -> Optional[Reading]:
    if _is(node, (operator.matmul, torch.matmul, torch.bmm), ("matmul", "bmm", "__matmul__")):
        a, b = node.args[0], node.args[1]
        if ndim(a) is not None and ndim(a) >= 2 and ndim(b) is not None and ndim(b) >= 2:
            return Reading("matmul", f"{getattr(node.target, '__name__', node.target)}->matmul", a, b)
    if _is(node, (torch.baddbmm,), ("baddbmm",)):
        return _baddbmm(node)
    if node.op == "call_function" and node.target is torch.einsum:
        return _einsum(node)
    return None


def _baddbmm(node: Node) -> Optional[Reading]:
    """``baddbmm(bias, a, b, beta=β, alpha=α)`` = α·(a @ b) + β·bias; β = 0 ignores ``bias``."""
    bias, a, b = _arg(node, 0, "input"), _arg(node, 1, "batch1"), _arg(node, 2, "batch2")
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    if not (_number(alpha) and _number(beta)) or not isinstance(a, Node) or not isinstance(b, Node):
        return None
    if beta != 0 and not isinstance(bias, Node):
        return None
    return Reading("matmul", "baddbmm->alpha*matmul+beta*bias", a, b, alpha=alpha, beta=beta,
                   bias=bias if beta != 0 else None)


def _einsum_letters(spec: str, n: Optional[int]) -> Optional[str]:
    if "..." in spec:
        if n is None:
            return None
        free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in spec]
        spec = spec.replace("...", "".join(free[:n - (len(spec) - 3)]))
    return spec if n is None or len(spec) == n else None


def _einsum(node: Node) -> Optional[Reading]:
    """Two-operand einsums that are a batched matmul: one contracted index, one free per side."""
    eq, ops = node.args[0], list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or len(ops) != 2 or not all(isinstance(o, Node) for o in ops):
        return None
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    if lhs.count(",") != 1:
        return None
    a_s, b_s = lhs.split(",")
    a_s, b_s = _einsum_letters(a_s, ndim(ops[0])), _einsum_letters(b_s, ndim(ops[1]))
    out = _einsum_letters(out, ndim(node))
    if a_s is None or b_s is None or out is None:
        return None
    if any(len(set(x)) != len(x) for x in (a_s, b_s, out)) or not set(out) <= set(a_s) | set(b_s):
        return None
    batch = [c for c in out if c in a_s and c in b_s]
    contracted = [c for c in a_s if c in b_s and c not in out]
    a_free = [c for c in a_s if c not in b_s]
    b_free = [c for c in b_s if c not in a_s]
    if len(contracted) != 1 or len(a_free) != 1 or len(b_free) != 1:
        return None
    if any(c not in out for c in a_free + b_free) or len(batch) + 2 != len(out):
        return None
    (c,), (i,), (j,) = contracted, a_free, b_free
    perm_a = tuple(a_s.index(x) for x in batch) + (a_s.index(i), a_s.index(c))
    perm_b = tuple(b_s.index(x) for x in batch) + (b_s.index(c), b_s.index(j))
    canon = batch + [i, j]
    out_perm = tuple(canon.index(x) for x in out)
    ident = lambda p: None if p == tuple(range(len(p))) else p  # noqa: E731
    return Reading("matmul", f"einsum('{eq}')->matmul", ops[0], ops[1],
                   perm_a=ident(perm_a), perm_b=ident(perm_b), out_perm=ident(out_perm))


def _norm_dim(d: Any, n: int) -> Any:
    return d + n if isinstance(d, int) and d < 0 else d


def transpose_last2(node: Node) -> Optional[Reading]:
    n = ndim(node)
    if n is None or n < 2:
        return None
    x = node.args[0] if node.args else None
    if _is(node, (torch.transpose, torch.swapaxes, torch.swapdims),
           ("transpose", "swapaxes", "swapdims")):
        d0, d1 = _norm_dim(_arg(node, 1, "dim0"), n), _norm_dim(_arg(node, 2, "dim1"), n)
        if {d0, d1} == {n - 2, n - 1}:
            return Reading("transpose_last2", "transpose->mT", x)
    if _is(node, (torch.permute,), ("permute",)):
        dims = node.args[1:] if node.op == "call_method" else (node.args[1],)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        dims = tuple(_norm_dim(d, n) for d in dims)
        if dims == tuple(range(n - 2)) + (n - 1, n - 2):
            return Reading("transpose_last2", "permute->mT", x)
    if node.op == "call_function" and (
            (node.target is getattr and node.args[1] == "mT")
            or node.target in (torch.ops.aten.mT, torch.ops.aten.mT.default)):
        return Reading("transpose_last2", "mT", x)
    if _is(node, (torch.t,), ("t",)) and n == 2:
        return Reading("transpose_last2", "t->mT", x)
    return None


_VIEWS = ("view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze")


def batch_view(node: Node) -> Optional[Reading]:
    """A reshape of the leading (batch/head) dims only: the last two dims pass through intact."""
    if not _is(node, (torch.reshape, torch.flatten, torch.unflatten, torch.unsqueeze, torch.squeeze),
               _VIEWS) or not node.args or not isinstance(node.args[0], Node):
        return None
    src, out = meta(node.args[0]), meta(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    if src.dim() < 2 or out.dim() < 2:
        return None
    if src.shape == out.shape:
        return Reading("batch_view", "no-op view->identity", node.args[0])
    same_last2 = all(a is b or str(a) == str(b) for a, b in zip(src.shape[-2:], out.shape[-2:]))
    if not same_last2:
        return None
    return Reading("batch_view", f"{getattr(node.target, '__name__', node.target)}(batch dims)->batch_view",
                   node.args[0])


# -- elementwise ----------------------------------------------------------------------------------

_MUL = ((operator.mul, operator.imul, torch.mul), ("mul", "mul_", "__mul__", "__rmul__", "__imul__"))
_DIV = ((operator.truediv, operator.itruediv, torch.div, torch.true_divide),
        ("div", "div_", "__truediv__", "__itruediv__", "true_divide"))


def scale(node: Node) -> Optional[Reading]:
    if _is(node, *_MUL):
        a, b = node.args[0], node.args[1]
        if _number(b) and isinstance(a, Node):
            return Reading("scale", "mul", a, sympy.Float(b) if isinstance(b, float) else sympy.Integer(b))
        if _number(a) and isinstance(b, Node):
            return Reading("scale", "mul", b, sympy.Float(a) if isinstance(a, float) else sympy.Integer(a))
    if _is(node, *_DIV):
        a, b = node.args[0], node.args[1]
        rounding = node.kwargs.get("rounding_mode")
        if _number(b) and b != 0 and isinstance(a, Node) and rounding is None:
            c = sympy.Float(b) if isinstance(b, float) else sympy.Integer(b)
            return Reading("scale", "div->mul", a, 1 / c)
    return None


def _one_element(x: Any) -> bool:
    v = meta(x)
    return isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point() or (
        isinstance(v, torch.Tensor) and v.dim() == 0)


def scale_by_tensor(node: Node) -> Optional[Reading]:
    """``x * t`` / ``x / t`` with ``t`` a one-element tensor: ``other`` is ``t``, ``sign`` -1 for ÷.

    Whether ``t`` is a constant (a buffer, ``torch.tensor(d).rsqrt()``) is the matcher's call.
    """
    if not node.args or len(node.args) < 2 or node.kwargs.get("rounding_mode") is not None:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    if _is(node, *_MUL):
        if _one_element(b):        # with two one-element operands, the matcher may swap them
            return Reading("scale", "mul(tensor)->scale", a, b)
        if _one_element(a):
            return Reading("scale", "mul(tensor)->scale", b, a)
    if _is(node, *_DIV) and _one_element(b):
        return Reading("scale", "div(tensor)->scale", a, b, sign=-1)
    return None


def scalar_hint(node: Any) -> Optional[float]:
    """The example value of a Python scalar computed in the graph (a ``SymFloat``/``SymInt``
    node), read without adding a guard; None when it has none (data-dependent) or is no scalar."""
    v = meta(node)
    if not isinstance(v, (torch.SymFloat, torch.SymInt)):
        return None
    try:
        hint = v.node.hint if v.node.has_hint() else None
        return None if hint is None else float(hint)
    except (AttributeError, TypeError, ValueError):
        return None


def _symbolic_scalar(x: Any) -> bool:
    return isinstance(x, Node) and isinstance(meta(x), (torch.SymFloat, torch.SymInt))


def scale_by_scalar(node: Node) -> Optional[Reading]:
    """``x * c`` / ``x / c`` with ``c`` a symbolic Python scalar: ``other`` is ``c``'s node,
    ``sign`` -1 for ÷. Its value is known only at run time (see :func:`scalar_hint`)."""
    if len(node.args) < 2 or node.kwargs.get("rounding_mode") is not None:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(meta(a), torch.Tensor) or isinstance(meta(b), torch.Tensor)):
        return None
    if _is(node, *_MUL):
        if _symbolic_scalar(b) and isinstance(a, Node):
            return Reading("runtime_scale", "mul(runtime scalar)->scale", a, b)
        if _symbolic_scalar(a) and isinstance(b, Node):
            return Reading("runtime_scale", "mul(runtime scalar)->scale", b, a)
    if _is(node, *_DIV) and _symbolic_scalar(b) and isinstance(a, Node):
        return Reading("runtime_scale", "div(runtime scalar)->scale", a, b, sign=-1)
    return None


_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                 "double": torch.float64}


def cast(node: Node) -> Optional[Reading]:
    if node.op != "call_method" or not node.args:
        return None
    x, out = node.args[0], meta(node)
    if not isinstance(out, torch.Tensor) or not isinstance(meta(x), torch.Tensor):
        return None
    if node.target in _CAST_METHODS:
        return Reading("cast", f"{node.target}()->cast", x, dtype=out.dtype)
    if node.target in ("to", "type", "type_as"):
        same_device = out.device == meta(x).device
        if same_device and out.shape == meta(x).shape:
            return Reading("cast", f"{node.target}()->cast", x, dtype=out.dtype)
    return None


def identity(node: Node) -> Optional[Reading]:
    if node.op == "call_function" and node.target is F.dropout:
        p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
        if training is False or p == 0:
            return Reading("identity", "dropout(eval)->identity", node.args[0])
    if _is(node, (torch.clone,), ("contiguous", "clone")) and node.args:
        return Reading("identity", f"{node.target if node.op == 'call_method' else 'clone'}->identity",
                       node.args[0])
    return None


def active_dropout(node: Node) -> Optional[str]:
    """A reason string when ``node`` is a dropout that is active (training, p > 0)."""
    if node.op == "call_function" and node.target is F.dropout:
        p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
        if not (training is False or p == 0):
            return f"dropout is active on the probabilities (p={p}, training={training}); " \
                   f"fused dropout is not implemented yet, call model.eval() to fuse"
    return None


def tanh(node: Node) -> Optional[Reading]:
    if _is(node, (torch.tanh, F.tanh, torch.Tensor.tanh), ("tanh",)) and node.args:
        return Reading("tanh", "tanh->softcap", node.args[0])
    return None


def softmax(node: Node) -> Optional[Reading]:
    if _is(node, (torch.exp,), ("exp",)) and node.args and isinstance(node.args[0], Node):
        inner = node.args[0]
        if len(inner.users) == 1:
            r = _softmax_call(inner, _LOG_SOFTMAX)
            if r is not None:
                return Reading("softmax", "exp(log_softmax)->softmax", r.x, dim=r.dim, dtype=r.dtype,
                               spans=inner)
        return None
    return _softmax_call(node, _SOFTMAX)


_SOFTMAX = ((torch.softmax, F.softmax, torch.Tensor.softmax), ("softmax",))
_LOG_SOFTMAX = ((torch.log_softmax, F.log_softmax, torch.Tensor.log_softmax), ("log_softmax",))


def _softmax_call(node: Node, kind: tuple) -> Optional[Reading]:
    if _is(node, *kind) and node.args:
        x = node.args[0]
        dim = _arg(node, 1, "dim")
        dtype = _arg(node, 3 if node.target in (F.softmax, F.log_softmax) else 2, "dtype")
        if node.target in (F.softmax, F.log_softmax) and dim is None:
            dim = node.kwargs.get("dim")
        return Reading("softmax", f"{getattr(node.target, '__name__', node.target)}->softmax",
                       x, dim=dim, dtype=dtype)
    return None


def add_mask(node: Node) -> Optional[Reading]:
    if _is(node, (operator.add, operator.iadd, torch.add), ("add", "add_", "__add__", "__radd__", "__iadd__")):
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
            return None
        a, b = node.args[0], node.args[1]
        if isinstance(a, Node) and isinstance(b, Node):
            return Reading("add_mask", "add->additive_mask", a, b)
    if _is(node, (operator.sub, operator.isub, torch.sub), ("sub", "sub_", "__sub__", "__isub__")):
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
            return None
        a, b = node.args[0], node.args[1]
        if isinstance(a, Node) and isinstance(b, Node):
            return Reading("add_mask", "sub->negated additive_mask", a, b, sign=-1)
    return None


def fill_mask(node: Node) -> Optional[Reading]:
    if _is(node, (torch.masked_fill,), ("masked_fill",)):
        x, m, v = node.args[0], node.args[1], _arg(node, 2, "value")
        if isinstance(m, Node) and _number(v):
            return Reading("fill_mask", "masked_fill->bool_mask", x, m, fill=float(v), negate=True)
    if node.op == "call_function" and node.target is torch.where and len(node.args) == 3:
        m, a, b = node.args
        if isinstance(a, Node) and _number(b):
            return Reading("fill_mask", "where->bool_mask", a, m, fill=float(b), negate=False)
        if isinstance(b, Node) and _number(a):
            return Reading("fill_mask", "where->bool_mask", b, m, fill=float(a), negate=True)
    return None


def repeat_heads(node: Node) -> Optional[Reading]:
    """K/V repeated over query-head groups: ``x`` with ``other`` = the group count.

    Query head ``h`` then reads head ``h // g`` of ``x``, the kernels' GQA convention; ``repeat``
    (tiling, ``h % Hkv``) is deliberately not read, except of a single head.
    """
    out = meta(node)
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or not node.args:
        return None
    x = node.args[0]
    if not isinstance(x, Node):
        return None
    if _is(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        g, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if isinstance(g, int) and _norm_dim(dim, 4) == 1 and ndim(x) == 4:
            return Reading("repeat_heads", "repeat_interleave(heads)->GQA", x, g)
        return None
    src = meta(x)
    if not isinstance(src, torch.Tensor) or src.dim() not in (4, 5):
        return None
    if _is(node, (), ("expand", "repeat")) and src.dim() == 4 and isinstance(src.shape[1], int) \
            and src.shape[1] == 1 and isinstance(out.shape[1], int):
        if _same(src.shape[0], out.shape[0]) and all(_same(a, b) for a, b in zip(src.shape[2:], out.shape[2:])):
            return Reading("repeat_heads", f"{node.target}(one head)->MQA", x, out.shape[1])
        return None
    if _is(node, (torch.reshape, torch.flatten), ("reshape", "view", "flatten")) and src.dim() == 5:
        expand = x
        if not (_is(expand, (), ("expand",)) and isinstance(expand.args[0], Node)):
            return None
        e_src, e_out = meta(expand.args[0]), meta(expand)
        if not isinstance(e_src, torch.Tensor) or e_src.dim() != 5 or e_src.shape[2] != 1:
            return None
        g = e_out.shape[2]
        if not (isinstance(g, int) and _same(out.shape[1], e_out.shape[1] * g) and
                all(_same(a, b) for a, b in zip(e_src.shape[3:], out.shape[2:]))):
            return None
        unsq = expand.args[0]
        base = _unsqueezed_dim2(unsq)
        if base is None:
            return None
        return Reading("repeat_heads", "repeat_kv(expand+reshape)->GQA", base, g)
    return None


def _same(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, int) and isinstance(b, int) and a == b) or str(a) == str(b)


def _unsqueezed_dim2(node: Node) -> Optional[Node]:
    """``x`` when ``node`` is ``x.unsqueeze(2)`` or ``x[:, :, None]`` of a 4-D ``x``."""
    if not isinstance(node, Node) or not node.args or not isinstance(node.args[0], Node):
        return None
    x = node.args[0]
    if ndim(x) != 4:
        return None
    if _is(node, (torch.unsqueeze,), ("unsqueeze",)) and _norm_dim(_arg(node, 1, "dim"), 5) == 2:
        return x
    if node.op == "call_function" and node.target is operator.getitem:
        idx = node.args[1]
        if not isinstance(idx, tuple):
            return None
        full = slice(None, None, None)
        items = list(idx)
        if items[:3] == [full, full, None] and all(i == full or i is Ellipsis for i in items[3:]):
            return x
    return None


def negation_of(node: Any) -> Optional[Node]:
    """``x`` when ``node`` is ``~x`` / ``logical_not(x)`` of a bool tensor, else None."""
    if isinstance(node, Node) and _is(node, (operator.invert, torch.logical_not, torch.bitwise_not),
                                      ("logical_not", "bitwise_not", "__invert__")):
        return node.args[0] if isinstance(node.args[0], Node) else None
    return None


def read(node: Any, *rules: Rule) -> Optional[Reading]:
    """The first of ``rules`` that reads ``node``, or None."""
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    for rule in rules:
        r = rule(node)
        if r is not None:
            return r
    return None


def is_sdpa(node: Node) -> bool:
    return node.op == "call_function" and node.target in (
        F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def run_node(n: "torch.fx.Node", env: dict) -> Any:
    """Execute one call node on the values of its inputs in ``env`` (no autograd)."""
    args = torch.fx.node.map_arg(n.args, lambda a: env[a])
    kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
    with torch.no_grad():
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)
