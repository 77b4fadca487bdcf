"""``attnfuse.inductor_pass()``: attnfuse's rewrite as an Inductor graph pass, for users who keep
``torch.compile(model)`` (``backend="inductor"``).

Which hook: Inductor offers ``pre_grad_custom_pass``, ``joint_custom_pre/post_pass`` and
``post_grad_custom_pre/post_pass``. Only the pre-grad one sees the graph attnfuse's matcher
reads, Dynamo's torch-level graph (``q @ k.transpose(-2, -1)``, ``torch.softmax``, one
``F.scaled_dot_product_attention`` node, with Dynamo's fake-tensor metadata). The joint graph
already has softmax decomposed into ``amax/sub/exp/sum/div`` and SDPA lowered to a device-specific
aten op; by the post-grad passes Inductor's own ``fuse_attention`` has replaced the attention.
Running before AOTAutograd also means training works: AOTAutograd differentiates the
``attnfuse::attention`` op through its registered backward. The pass is
:func:`attnfuse.backend.rewrite_attention`, the same rewrite the ``"attnfuse"`` backend does.

Cache correctness: the pass is a ``CustomGraphPass`` whose ``uuid()`` hashes attnfuse's
version, every source file of the package (passes, kernels, cost model), the options, the
environment switches that steer kernel choice and any pinned choices, so Inductor's FX graph
cache hits when nothing changed and misses when any of them did. The tuned-choice cache on
disk is not part of it: under the exact policy every kernel it can name computes the same
function, so a graph compiled with an earlier choice is still correct (clear Inductor's cache
as well as ``attnfuse.cache`` to re-time).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..backend import Options, rewrite_attention
from ..report import Report

log = logging.getLogger(__name__)

_ENV = ("ATTNFUSE_AUTOTUNE", "ATTNFUSE_DISABLE_CACHE", "ATTNFUSE_PIN", "ATTNFUSE_FLASH_AUTOTUNE",
        "ATTNFUSE_STRICT")
_lock = threading.RLock()
_NOTHING = object()
_source_memo: dict[tuple, str] = {}     # (root, files' names, sizes, mtimes) -> digest


def source_digest(root: Optional[Path] = None) -> str:
    """sha256 of every Python source file under ``root`` (default: the attnfuse package: passes,
    kernels, cost model, ops), re-read whenever a file's size or modification time changes."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    files = sorted(root.rglob("*.py"))
    stamp = (str(root), *((str(p.relative_to(root)), p.stat().st_mtime_ns, p.stat().st_size)
                          for p in files))
    if stamp not in _source_memo:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
        if len(_source_memo) > 16:
            _source_memo.clear()
        _source_memo[stamp] = h.hexdigest()
    return _source_memo[stamp]


def _pins() -> str:
    from ..tune import cache
    if not cache.pinned():
        return ""
    table = json.dumps(cache._pinned, sort_keys=True, default=str)
    return hashlib.sha256(table.encode()).hexdigest()


def _uuid_of(p: Any) -> Optional[Any]:
    uuid = getattr(p, "uuid", None)
    return uuid() if callable(uuid) else None


class ChainedPass(CustomGraphPass):
    """Several graph passes run in order in one Inductor slot (torch 2.11 holds one pass per
    slot). Its uuid combines theirs; it is None (no FX graph caching, as Inductor does for any
    pass without a uuid) when one of them has none."""

    def __init__(self, *passes: Callable[[torch.fx.Graph], None]) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Optional[Any]:
        ids = tuple(_uuid_of(p) for p in self.passes)
        return None if any(i is None for i in ids) else ("attnfuse.ChainedPass", ids)

    def __repr__(self) -> str:
        return f"ChainedPass({', '.join(map(repr, self.passes))})"


def _flatten(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, ChainedPass):
        return list(value.passes)
    if isinstance(value, (list, tuple)):   # torch >= 2.13 also accepts lists of passes
        return [p for v in value for p in _flatten(v)]
    return [value]


def _compose(passes: Sequence[Any]) -> Any:
    if not passes:
        return None
    return passes[0] if len(passes) == 1 else ChainedPass(*passes)


def _config() -> Any:
    from torch._inductor import config
    return config


def _example_inputs(graph: torch.fx.Graph) -> list[Any]:
    """The values Dynamo traced the graph with (its placeholders' ``grapharg``), as the
    ``"attnfuse"`` backend receives them; None where unknown. The matcher reads them only to
    evaluate buffers (constant causal masks); without them those masks stay explicit."""
    out = []
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        try:
            out.append(n.meta["grapharg"].example)
        except Exception:  # no grapharg (a subgraph) or the weak reference is gone
            out.append(None)
    return out


def _is_aten_level(graph: torch.fx.Graph) -> bool:
    aten = any(isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"
               for n in graph.nodes)
    return aten and not any("example_value" in n.meta for n in graph.nodes)


class InductorPass(CustomGraphPass):
    """attnfuse's attention rewrite for Inductor's ``pre_grad_custom_pass`` slot.

    Three ways to use it::

        with attnfuse.inductor_pass():               # for what is compiled inside the block
            out = torch.compile(model)(x)            # (the first call compiles)
        attnfuse.inductor_pass().install()           # from now on (undo: .uninstall())
        torch.compile(model, options={"pre_grad_custom_pass": attnfuse.inductor_pass()})

    ``install()``/``with`` put the pass after a pass already set in the slot (a chain, never a
    replacement), replacing only an attnfuse pass (the innermost one decides), and restore the
    slot on exit. ``options={"pre_grad_custom_pass": ...}`` is Inductor's own per-compile
    setting and, as always there, stands instead of the global one. ``report``: every site this
    pass found (in graphs it actually compiled: an FX graph cache hit runs no pass).
    """

    def __init__(self, options: Options) -> None:
        self.options = options
        self.report = Report()
        self._installed: Any = _NOTHING
        self._saved: list[Any] = []

    # -- the pass ---------------------------------------------------------------------------------

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        if gm is None or _is_aten_level(graph):
            raise ValueError(
                "attnfuse.inductor_pass() rewrites Dynamo's torch-level graph, which only "
                "Inductor's pre_grad_custom_pass sees; it got an aten-level graph (joint or "
                "post-grad slot?). Use options={'pre_grad_custom_pass': attnfuse.inductor_pass()} "
                "or attnfuse.inductor_pass().install()")
        report = rewrite_attention(gm, _example_inputs(graph), self.options)
        with _lock:
            self.report.extend(report)

    def uuid(self) -> str:
        from .. import __version__
        parts = {
            "pass": "attnfuse.inductor_pass/1",
            "version": __version__,
            "sources": source_digest(),
            "options": dataclasses.asdict(self.options),
            "env": {k: os.environ.get(k) for k in _ENV},
            "pins": _pins(),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def __repr__(self) -> str:
        o = self.options
        return (f"attnfuse.inductor_pass(policy={o.policy!r}, kernel={o.kernel!r}, "
                f"keep_sdpa={o.keep_sdpa!r}, tune={o.tune!r})")

    # -- installing it ----------------------------------------------------------------------------

    def installed(self) -> bool:
        """Whether this pass is in Inductor's global ``pre_grad_custom_pass`` slot."""
        return any(p is self for p in _flatten(_config().pre_grad_custom_pass))

    def install(self) -> "InductorPass":
        """Add this pass to Inductor's global ``pre_grad_custom_pass`` slot, after a pass that is
        already there (another attnfuse pass is replaced instead). Returns ``self``. Each
        ``install()`` is undone by one :meth:`uninstall`."""
        config = _config()
        with _lock:
            if self.installed():
                self._saved.append(_NOTHING)
                return self
            current = config.pre_grad_custom_pass
            others = [p for p in _flatten(current) if not isinstance(p, InductorPass)]
            self._installed = _compose([*others, self])
            self._saved.append(current)
            config.pre_grad_custom_pass = self._installed
        return self

    def uninstall(self) -> None:
        """Undo the last :meth:`install`: the slot gets back what it held before, or, if
        something else changed it meanwhile, keeps that without this pass."""
        config = _config()
        with _lock:
            if not self._saved:
                return
            previous = self._saved.pop()
            if previous is _NOTHING:
                return
            current = config.pre_grad_custom_pass
            if current is self._installed:
                config.pre_grad_custom_pass = previous
            elif any(p is self for p in _flatten(current)):
                config.pre_grad_custom_pass = _compose(
                    [p for p in _flatten(current) if p is not self])
            self._installed = _NOTHING

    def __enter__(self) -> "InductorPass":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


def inductor_pass(*, policy: str = "exact", kernel: Optional[str] = None,
                  keep_sdpa: bool = False, tune: Optional[bool] = None) -> InductorPass:
    """attnfuse's attention rewrite as an Inductor pre-grad pass (see :class:`InductorPass`).

    ``kernel``, ``keep_sdpa`` and ``tune`` are :class:`attnfuse.Options`'. Only
    ``policy="exact"``: the other policies admit kernels by their accuracy on the example
    inputs' activations, which a pass does not have and Inductor's FX graph cache would not key
    on; use ``torch.compile(model, backend="attnfuse", options={"policy": ...})`` for them.
    """
    if policy != "exact":
        raise ValueError(
            f"attnfuse.inductor_pass() supports policy='exact' only, got {policy!r}: other "
            f"policies measure accuracy on the model's activations, which an Inductor pass does "
            f"not see; use torch.compile(model, backend='attnfuse', options={{'policy': "
            f"{policy!r}}}) instead")
    return InductorPass(Options(policy=policy, kernel=kernel, keep_sdpa=keep_sdpa, tune=tune))
