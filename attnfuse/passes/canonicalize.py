"""Canonicalization rules: the many spellings of one operation, read as one form.

Each rule looks at a single FX node of a Dynamo (torch-level) graph and, when the node is one
spelling of its operation, returns the canonical reading plus the rule's name (for ``explain()``).
Rules only *read* the graph: nothing is rewritten unless a whole attention site matches, so a
model's other arithmetic is never perturbed. A new spelling in the wild is one new entry here.

Canonical forms:
  matmul(a, b)              a @ b, torch.matmul, torch.bmm, Tensor.matmul/bmm
  transpose_last2(x)        x.transpose(-2, -1), permute(..., -1, -2), x.mT, x.swapaxes(-1, -2)
  scale(x, c)               x * c, c * x, x / c, torch.mul/div, with c a Python number
  cast(x, dtype)            x.float(), .half(), .bfloat16(), .to(dtype), .type(dtype), .type_as(y)
  identity(x)               dropout in eval mode or with p = 0, .contiguous(), .clone()
  softmax(x, dim, dtype)    torch.softmax, F.softmax, Tensor.softmax, nn.Softmax (inlined)
  add_mask(x, m)            x + m, m + x, torch.add
  fill_mask(x, keep, fill)  x.masked_fill(m, v) (keep = ~m), torch.where(m, x, v), where(m, v, x)
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
    return None


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


# -- elementwise ----------------------------------------------------------------------------------

def scale(node: Node) -> Optional[Reading]:
    if _is(node, (operator.mul, torch.mul), ("mul", "__mul__", "__rmul__")):
        a, b = node.args[0], node.args[1]
        if _number(b) and isinstance(a, Node):
            return Reading("scale", "mul", a, sympy.Float(b) if isinstance(b, float) else sympy.Integer(b))
        if _number(a) and isinstance(b, Node):
            return Reading("scale", "mul", b, sympy.Float(a) if isinstance(a, float) else sympy.Integer(a))
    if _is(node, (operator.truediv, torch.div, torch.true_divide), ("div", "__truediv__", "true_divide")):
        a, b = node.args[0], node.args[1]
        rounding = node.kwargs.get("rounding_mode")
        if _number(b) and b != 0 and isinstance(a, Node) and rounding is None:
            c = sympy.Float(b) if isinstance(b, float) else sympy.Integer(b)
            return Reading("scale", "div->mul", a, 1 / c)
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


def softmax(node: Node) -> Optional[Reading]:
    if _is(node, (torch.softmax, F.softmax, torch.Tensor.softmax), ("softmax",)):
        x = node.args[0]
        dim = _arg(node, 1, "dim")
        dtype = _arg(node, 2 if node.target is not F.softmax else 3, "dtype")
        if node.target is F.softmax and dim is None:
            dim = node.kwargs.get("dim")
        return Reading("softmax", f"{getattr(node.target, '__name__', node.target)}->softmax",
                       x, dim=dim, dtype=dtype)
    return None


def add_mask(node: Node) -> Optional[Reading]:
    if _is(node, (operator.add, torch.add), ("add", "__add__", "__radd__")):
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
            return None
        a, b = node.args[0], node.args[1]
        if isinstance(a, Node) and isinstance(b, Node):
            return Reading("add_mask", "add->additive_mask", a, b)
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
