"""Replace a matched site with one ``attnfuse::attention`` call and delete what it made dead.

A site that chose one of PyTorch's SDPA backends becomes a call of ``kernels.sdpa.call`` (SDPA
pinned to that backend) instead.

Only nodes of the site itself (and mask-building nodes nothing else uses any more) are erased;
every other user of q, k, v and the masks is left intact. A constant mask the matcher read as a
causal band or sliding window becomes the op's ``causal``/``window`` arguments, so its nodes go
dead with the site.
"""
from __future__ import annotations

import contextlib
import math
import operator
from typing import Any, Callable, Optional

import torch
from torch.fx import Graph, GraphModule, Node

from ..kernels import registry, sdpa
from . import canonicalize as C
from .match import RESHAPES, UNMERGED_OUT, Match, Operand, net_powers, same_dims

def _fake_mode(nodes: list[Node]) -> Any:
    for n in nodes:
        v = C.meta(n)
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _evaluate(op: str, target: Any, args: tuple, kwargs: dict, mode: Any) -> Any:
    """Run one call_function/call_method on (fake) tensors, inside ``mode`` when there is one."""
    with mode if mode is not None else contextlib.nullcontext():
        if op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)


def _propagate(node: Node, mode: Any) -> None:
    """Record the fake value of a node we inserted, so later passes see shapes as Dynamo's do."""
    if mode is None:
        return
    args = torch.fx.node.map_arg(node.args, C.meta)
    kwargs = torch.fx.node.map_arg(node.kwargs, C.meta)
    try:
        val = _evaluate(node.op, node.target, args, kwargs, mode)
    except Exception:  # metadata is a courtesy to later passes; the rewrite is valid without it
        return
    node.meta["example_value"] = val


class _Builder:
    """Inserts nodes before an anchor, copying the anchor's provenance and computing metadata."""

    def __init__(self, graph: Graph, anchor: Node, mode: Any, note: str) -> None:
        self.graph, self.anchor, self.mode, self.note = graph, anchor, mode, note

    def leaf(self, node: Node) -> Node:
        return node

    def __call__(self, op: str, target: Any, *args: Any, **kwargs: Any) -> Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        node.meta["attnfuse"] = self.note
        _propagate(node, self.mode)
        return node

    def fn(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        return self("call_function", target, *args, **kwargs)


class _MetaBuilder(_Builder):
    """The same construction evaluated on the graph's fake tensors: operand metadata, no nodes."""

    def __init__(self, mode: Any) -> None:
        self.mode = mode

    def leaf(self, node: Node) -> Any:
        return C.meta(node)

    def __call__(self, op: str, target: Any, *args: Any, **kwargs: Any) -> Any:
        return _evaluate(op, target, args, kwargs, self.mode)


def build_operand(b: _Builder, op: Operand) -> Any:
    x = b.leaf(op.node)
    for name, args in op.ops:
        x = b("call_method", name, x, *args)
    return x


def build_mask(b: _Builder, m: Match) -> tuple[Optional[Any], float]:
    """One mask for the op: additive terms summed, bool terms ANDed; and the fill value."""
    adds, keeps, fill = [], [], float("-inf")
    for t in m.masks:
        factor = float(t.factor)
        if t.kind == "add":
            node = build_operand(b, Operand(t.node, t.ops))
            adds.append(node if factor == 1.0 else b.fn(operator.mul, node, factor))
        else:
            inner = C.negation_of(t.node) if t.negate else None
            if inner is not None:
                keeps.append(build_operand(b, Operand(inner, t.ops)))
            elif t.negate:
                keeps.append(b.fn(torch.logical_not, build_operand(b, Operand(t.node, t.ops))))
            else:
                keeps.append(build_operand(b, Operand(t.node, t.ops)))
            fill = t.fill * factor
    keep = None
    for k in keeps:
        keep = k if keep is None else b.fn(operator.and_, keep, k)
    if keep is not None and not adds:
        return keep, fill
    if keep is not None:
        # Only reached with an infinite fill (the matcher refuses finite fills mixed with adds).
        adds.append(b.fn(torch.where, keep, 0.0, -math.inf))
    total = None
    for a in adds:
        total = a if total is None else b.fn(operator.add, total, a)
    return total, float("-inf")


def operands(b: _Builder, m: Match) -> tuple[Any, Any, Any, Optional[Any], float]:
    """``(q, k, v, mask, fill)`` as the op takes them, as nodes or as fake tensors."""
    q, k, v = (build_operand(b, x) for x in (m.q, m.k, m.v))
    mask, fill = build_mask(b, m)
    return q, k, v, mask, fill


def operand_metas(m: Match) -> tuple[Any, Any, Any, Optional[Any], float]:
    return operands(_MetaBuilder(_fake_mode([m.q.node, m.k.node, m.v.node, m.pv])), m)


class _ValueBuilder(_MetaBuilder):
    """The same construction on real values captured from a run of the graph."""

    def __init__(self, values: dict[Node, Any]) -> None:
        self.mode, self.values = None, values

    def leaf(self, node: Node) -> Any:
        return self.values[node]


def leaves(m: Match) -> list[Node]:
    """The graph nodes :func:`operands` reads for ``m`` (what a capture must record)."""
    nodes = [m.q.node, m.k.node, m.v.node]
    for t in m.masks:
        nodes.append(t.node)
        inner = C.negation_of(t.node) if t.negate else None
        if inner is not None:
            nodes.append(inner)
    return nodes


def operand_values(m: Match, values: dict[Node, Any]) -> tuple[Any, Any, Any, Optional[Any], float]:
    """``(q, k, v, mask, fill)`` as the op takes them, from captured values of :func:`leaves`."""
    with torch.no_grad():
        return operands(_ValueBuilder(values), m)


def erase_dead(graph: Graph, nodes: list[Node]) -> None:
    """Erase ``nodes`` (in order) once user-less, then any pure producers left without users."""
    erased: set[Node] = set()

    def erase(n: Node) -> None:
        frontier.extend(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)

    frontier: list[Node] = []
    for n in nodes:
        if n not in erased and not n.users:
            erase(n)
    while frontier:
        n = frontier.pop()
        if n in erased or n.users or n.op not in ("call_function", "call_method") or n.is_impure():
            continue
        erase(n)


def _fused(b: _Builder, q: Any, k: Any, v: Any, mask: Any, scale: Any, causal: str,
           fill: float, kernel: str, softcap: Any = 0.0,
           window: tuple[int, int] = (-1, -1)) -> Node:
    """The output node of one fused call: ``attnfuse::attention``, or the pinned SDPA call of an
    SDPA kernel (whose sites carry no fill, soft-cap or window: the selector refused those).
    ``scale`` is a float or the node of a runtime scalar (a ``SymFloat``)."""
    if registry.is_sdpa(kernel):
        return b.fn(sdpa.call, q, k, v, mask, scale, causal != "none", kernel)
    fused = b.fn(torch.ops.attnfuse.attention.default, q, k, v, mask, scale, causal, fill, kernel,
                 softcap, *window)
    return b.fn(operator.getitem, fused, 0)


def runtime_argument(b: _Builder, const: float, factors: tuple, absolute: bool = False) -> Any:
    """``const`` times the runtime scalars of the graph in ``factors`` (``SymFloat``/``SymInt``
    nodes with integer powers), computed in the graph so the op gets their run-time value; the
    float ``const`` when there are none."""
    value: Any = None
    for node, power in net_powers(factors):
        x = b.leaf(node)
        for _ in range(abs(power)):
            if value is None:
                value = x if power > 0 else b.fn(operator.truediv, 1.0, x)
            else:
                value = b.fn(operator.mul if power > 0 else operator.truediv, value, x)
    if value is None:
        return abs(const) if absolute else const
    if const != 1.0 or not isinstance(C.meta(value), torch.SymFloat):
        value = b.fn(operator.mul, value, const)       # a float, even for a SymInt product
    return b.fn(operator.abs, value) if absolute else value


def scale_argument(b: _Builder, m: Match) -> Any:
    """The op's ``scale``: a float, or the node computing it from runtime scalars."""
    return runtime_argument(b, float(m.scale), m.runtime)


def softcap_argument(b: _Builder, m: Match) -> Any:
    """The op's ``softcap`` (0 = none): a float, or ``|c|`` of a runtime scalar ``c``."""
    if not m.softcap_runtime:
        return float(m.softcap)
    return runtime_argument(b, float(m.softcap), m.softcap_runtime, absolute=True)


def rewrite_site(gm: GraphModule, m: Match, kernel: str, note: str) -> Node:
    """Replace P·V of ``m`` with the fused op; returns the new output node."""
    graph = gm.graph
    mode = _fake_mode([m.q.node, m.k.node, m.v.node, m.pv])
    b = _Builder(graph, m.pv, mode, note)
    q, k, v, mask, fill = operands(b, m)
    left, right = m.window
    out = _fused(b, q, k, v, mask, scale_argument(b, m), m.causal, fill, kernel,
                 softcap_argument(b, m),
                 (int(left), int(right)))
    fused = out
    for name, args in m.out_ops:
        out = b("call_method", name, out, *args)
    m.pv.replace_all_uses_with(out)
    erase_dead(graph, m.dead)
    if m.out_ops == (UNMERGED_OUT,):
        out = _fold_unflatten(graph, out, fused)
    return out


def _fold_unflatten(graph: Graph, flat: Node, out4: Node) -> Node:
    """``flat = out4.flatten(0, 1)`` whose one user reshapes it back to ``out4``'s shape (the
    model splitting heads out of the batch again): that user becomes ``out4`` itself."""
    users = list(flat.users)
    if len(users) != 1:
        return flat
    u = users[0]
    if (u.op, u.target) not in RESHAPES or not u.args or u.args[0] is not flat:
        return flat
    a, o = C.meta(u), C.meta(out4)
    if not (isinstance(a, torch.Tensor) and isinstance(o, torch.Tensor)) \
            or not same_dims(a.shape, o.shape):
        return flat
    u.replace_all_uses_with(out4)
    graph.erase_node(u)
    graph.erase_node(flat)
    return out4


def rewrite_sdpa(gm: GraphModule, node: Node, q: Any, k: Any, v: Any, mask: Any, scale: Any,
                 causal: str, kernel: str, note: str) -> Node:
    """Replace an SDPA call with the fused op (same operands; GQA and masks carry over)."""
    b = _Builder(gm.graph, node, _fake_mode([node]), note)
    out = _fused(b, q, k, v, mask, scale, causal, float("-inf"), kernel)
    node.replace_all_uses_with(out)
    erase_dead(gm.graph, [node])
    return out
