"""Masks built from sizes alone, read at symbolic sizes.

Under dynamic shapes a causal mask such as ``arange(n)[None, :] <= arange(n)[:, None]`` has no
value at compile time: ``n`` is a symbol. Such a subgraph depends only on sizes (symbolic ints)
and constants, so it can be evaluated at concrete sizes: the example's own (Dynamo's hints) and a
few others, each symbol substituted consistently everywhere (in the size inputs and in the shapes
of the tensors whose sizes are read). The matcher converts a mask to the op's ``causal``/
``window`` arguments only when every evaluation is exactly the same band.

What is evaluated (:meth:`SizeEvaluator.evaluate`) and what is refused (``None``):
  * size inputs (``SymInt`` placeholders) take their substituted values;
  * inputs read only for their shape (activations) become ``meta`` tensors of the substituted
    shape: any value computed from their data stays on ``meta`` and is refused;
  * module state (buffers, parameters) and graph constants are data that no substitution
    reaches: only one-element ones are admitted (their value counts as a constant below); a
    mask read from a larger buffer is left to the static path or kept dense;
  * a Python float computed in the graph (``SymFloat``: an unspecialised float attribute, a
    square root of a size) is refused: a mask is built from integers.
The sizes tried for each symbol are small (up to about twice the smaller of Dynamo's hint and
:data:`BASE`, whatever the example's length) and include each integer constant ``c`` of the
subgraph (and each float constant it compares or adds) with ``c + 1`` and ``c + 2``, so a
threshold such as a window of ``W`` tokens, a comparison of an index with a constant, or a
period, is exercised on both sides; when such a size makes an evaluation too large
(:data:`MAX_NUMEL`), the mask is kept dense rather than judged on small sizes only.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import sympy
import torch
from torch.fx import GraphModule, Node

from . import canonicalize as C

MAX_NODES = 256                 # a mask subgraph larger than this is not evaluated
MAX_NUMEL = 1 << 23             # elements of the largest tensor one evaluation may create
MAX_SAMPLES = 32                # size assignments per site (each symbol's own moves must fit)
BASE = 64                       # sizes are tried around min(hint, BASE), not at a long example

_COMPARE_OR_SHIFT = {
    operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne, operator.add,
    operator.sub, operator.iadd, operator.isub, torch.lt, torch.le, torch.gt, torch.ge, torch.eq,
    torch.ne, torch.add, torch.sub, torch.less, torch.less_equal, torch.greater,
    torch.greater_equal, torch.clamp, torch.clamp_min, torch.clamp_max,
    "lt", "le", "gt", "ge", "eq", "ne", "add", "sub", "__lt__", "__le__", "__gt__", "__ge__",
    "__eq__", "__ne__", "__add__", "__radd__", "__sub__", "__rsub__", "less", "less_equal",
    "greater", "greater_equal", "clamp", "clamp_min", "clamp_max", "clip",
}


def sym_expr(x: Any) -> Optional[sympy.Expr]:
    """The sympy expression of a size (``SymInt`` or int); None for anything else."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, torch.SymInt):
        e = x.node.expr
        return sympy.Integer(e) if isinstance(e, int) else e
    return None


def free_symbols(*xs: Any) -> set:
    out: set = set()
    for x in xs:
        e = sym_expr(x)
        if e is not None:
            out |= e.free_symbols
    return out


def _shape_env(xs: Iterable[Any]) -> Any:
    for x in xs:
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return x.node.shape_env
        if isinstance(x, torch.Tensor):
            for d in x.shape:
                if isinstance(d, torch.SymInt):
                    return d.node.shape_env
    return None


def _hints(env: Any) -> dict:
    """Dynamo's example value of every backed symbol (``backed_var_to_val`` from torch 2.14,
    ``var_to_val`` before)."""
    table = getattr(env, "backed_var_to_val", None)
    if table is None:
        table = getattr(env, "var_to_val", None)
    return dict(table or {})


def _bound(x: Any) -> Optional[int]:
    try:
        return int(x) if bool(sympy.sympify(x).is_finite) else None
    except (TypeError, ValueError, AttributeError):
        return None


def substitute(x: Any, env: dict) -> Optional[int]:
    """``x`` (an int or ``SymInt``) at the sizes ``env``; None if that is not an integer."""
    e = sym_expr(x)
    if e is None:
        return None
    v = sympy.sympify(e.xreplace({s: sympy.Integer(n) for s, n in env.items()})
                      if e.free_symbols else e)
    if not v.is_number:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f) or f != int(f):
        return None
    return int(f)


def _flat(x: Any) -> Iterable[Any]:
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat(y)
    elif isinstance(x, slice):
        yield from _flat((x.start, x.stop, x.step))
    else:
        yield x


@dataclass
class Subgraph:
    """The nodes a value depends on, in graph order, and what substitution they need."""

    nodes: list[Node]
    symbols: set
    literals: set = field(default_factory=set)  # |integer constants| (and compared floats) in it
    state: dict[Node, torch.Tensor] = field(default_factory=dict)


class SizeEvaluator:
    """Evaluates size-only subgraphs of ``gm`` at substituted sizes (see the module docstring)."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any], order: dict[Node, int],
                 placeholders: list[Node], is_state: Callable[[Node], bool]) -> None:
        self.gm, self.example_inputs, self.is_state = gm, example_inputs, is_state
        self.order, self.placeholders = order, placeholders
        self._sub: dict[Node, Optional[Subgraph]] = {}
        self._cache: dict[tuple, Optional[torch.Tensor]] = {}
        self._env: Any = None

    # -- structure --------------------------------------------------------------------------

    def subgraph(self, node: Node) -> Optional[Subgraph]:
        """What ``node`` depends on, or None when it is not a function of sizes and constants."""
        if node not in self._sub:
            self._sub[node] = self._collect(node)
        return self._sub[node]

    def _collect(self, node: Node) -> Optional[Subgraph]:
        seen, stack, nodes = set(), [node], []
        symbols: set = set()
        literals: set = set()
        state: dict[Node, torch.Tensor] = {}
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            nodes.append(n)
            if len(nodes) > MAX_NODES:
                return None
            val = C.meta(n)
            if isinstance(val, (torch.SymFloat, torch.SymBool)):
                return None                      # a float or a condition: not a size
            if n.op == "placeholder":
                if isinstance(val, torch.SymInt):
                    symbols |= free_symbols(val)
                elif isinstance(val, torch.Tensor):
                    if self.is_state(n):
                        real = self.example_inputs[self.placeholders.index(n)]
                        ok = self._scalar_state(real)
                        if ok is None:
                            return None
                        state[n] = real
                        literals.add(ok)
                    else:
                        symbols |= free_symbols(*val.shape)
                elif not isinstance(val, int):
                    return None
                continue
            if n.op == "get_attr":
                real = getattr(self.gm, n.target, None)
                ok = self._scalar_state(real)
                if ok is None:
                    return None
                state[n] = real
                literals.add(ok)
                continue
            if n.op not in ("call_function", "call_method"):
                return None
            if isinstance(val, torch.Tensor):
                symbols |= free_symbols(*val.shape)
            elif isinstance(val, torch.SymInt):
                symbols |= free_symbols(val)
            literals |= self._literals(n)
            stack.extend(n.all_input_nodes)
        nodes.sort(key=self.order.__getitem__)
        return Subgraph(nodes, symbols, literals, state)

    @staticmethod
    def _scalar_state(t: Any) -> Optional[int]:
        """For one-element state: the magnitude its value brings as a constant; else None."""
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.device.type == "meta":
            return None
        v = float(t.reshape(()).double())
        return int(min(abs(v), 1e9)) if math.isfinite(v) else 0

    @staticmethod
    def _literals(n: Node) -> set:
        compares = n.target in _COMPARE_OR_SHIFT
        out = set()
        for x in _flat((n.args, n.kwargs)):
            if isinstance(x, bool):
                continue
            if isinstance(x, int):
                out.add(abs(x))
            elif isinstance(x, float) and compares and math.isfinite(x):
                out.add(int(min(abs(x), 1e9)))
        return out

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, node: Node, env: dict) -> Optional[torch.Tensor]:
        """The value of ``node`` with the symbols set as in ``env``; None if it cannot be had."""
        sub = self.subgraph(node)
        if sub is None:
            return None
        key = (node, tuple(sorted((str(s), v) for s, v in env.items() if s in sub.symbols)))
        if key not in self._cache:
            self._cache[key] = self._run(node, sub, env)
        return self._cache[key]

    def _numel(self, val: Any, env: dict) -> Optional[int]:
        if not isinstance(val, torch.Tensor):
            return 0
        total = 1
        for d in val.shape:
            s = substitute(d, env)
            if s is None or s < 0:
                return None
            total *= s
        return total

    def _run(self, node: Node, sub: Subgraph, env: dict) -> Optional[torch.Tensor]:
        for n in sub.nodes:
            size = self._numel(C.meta(n), env)
            if size is None or size > MAX_NUMEL:
                return None
        vals: dict[Node, Any] = {}
        try:
            for n in sub.nodes:
                val = C.meta(n)
                if n in sub.state:
                    vals[n] = sub.state[n].clone()        # never mutate the module's own
                elif n.op == "placeholder":
                    if isinstance(val, torch.SymInt):
                        vals[n] = substitute(val, env)
                        if vals[n] is None:
                            return None
                    elif isinstance(val, torch.Tensor):
                        shape = [substitute(d, env) for d in val.shape]
                        if any(s is None for s in shape):
                            return None
                        vals[n] = torch.empty(shape, dtype=val.dtype, device="meta")
                    else:
                        vals[n] = val
                else:
                    vals[n] = C.run_node(n, vals)
        except Exception:  # evaluation is best effort: unknown means "not size-only"
            return None
        out = vals.get(node)
        if not isinstance(out, torch.Tensor) or out.device.type == "meta":
            return None
        return out

    # -- the sizes tried ----------------------------------------------------------------------

    def assignments(self, symbols: set, literals: set) -> Optional[list[dict]]:
        """Size assignments to try: a base (each symbol at ``min(hint, BASE)``) first, then each
        symbol moved alone to other values in its range (small ones, one past twice its base,
        and each constant ``c`` of ``literals`` with ``c + 1`` and ``c + 2``, so thresholds and
        periods are crossed), then all symbols moved together and apart. None when a symbol has
        no hint, or when its own moves do not fit in :data:`MAX_SAMPLES`."""
        if not symbols:
            return [{}]
        if self._env is None:
            self._env = _shape_env(C.meta(p) for p in self.placeholders)
        if self._env is None:
            return None
        hints = _hints(self._env)
        ranges = getattr(self._env, "var_to_range", {})
        syms = sorted(symbols, key=str)
        base: dict = {}
        options: dict = {}
        for s in syms:
            h = _bound(hints.get(s))
            if h is None:
                return None
            r = ranges.get(s)
            lo = max(2, _bound(getattr(r, "lower", None)) or 2)
            hi = _bound(getattr(r, "upper", None))
            b = min(h, max(BASE, lo)) if hi is None else min(h, max(BASE, lo), hi)
            want = [b, lo, lo + 1, lo + 3, 2 * b + 1]
            want += [c + d for c in sorted(literals) for d in (0, 1, 2)]
            vals: list[int] = []
            for v in want:
                if v >= lo and (hi is None or v <= hi) and v not in vals:
                    vals.append(v)
            base[s], options[s] = vals[0], vals
        out = [dict(base)]
        out += [{**base, s: v} for s in syms for v in options[s] if v != base[s]]
        if len(out) > MAX_SAMPLES:
            return None
        for i in range(max(len(o) for o in options.values())):
            out.append({s: options[s][min(i, len(options[s]) - 1)] for s in syms})
            out.append({s: options[s][(i + k) % len(options[s])] for k, s in enumerate(syms)})
        unique, keys = [], set()
        for a in out:
            key = tuple(a[s] for s in syms)
            if key not in keys:
                keys.add(key)
                unique.append(a)
        return unique[:MAX_SAMPLES]
