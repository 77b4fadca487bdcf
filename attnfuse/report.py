"""What attnfuse found and did: one row per attention site, the graphs before and after."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule

from .spec import AttentionSpec


class GraphSnapshot:
    """A copy of one graph at one point of the pipeline; its module and code are built on demand
    (code generation costs more than the attention passes themselves on large graphs)."""

    def __init__(self, root: torch.nn.Module, graph: torch.fx.Graph) -> None:
        self.graph, self._root, self._module = graph, root, None

    @property
    def module(self) -> GraphModule:
        if self._module is None:
            self._module = GraphModule(self._root, self.graph)
        return self._module

    @property
    def code(self) -> str:
        return self.module.code

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@dataclass
class Site:
    """One attention subgraph (one softmax, or one SDPA call)."""

    index: int
    graph: int
    pattern: str                          # "eager_softmax" or "sdpa"
    kernel: Optional[str]                 # the kernel that runs it; None when left unfused
    reason: str                           # why this kernel, or why the site was left alone
    spec: Optional[AttentionSpec] = None
    location: str = ""
    module_path: str = ""
    rejected: dict[str, list[str]] = field(default_factory=dict)

    @property
    def fused(self) -> bool:
        return self.kernel is not None

    def shape(self) -> str:
        if self.spec is None:
            return ""
        s = self.spec
        nk = s.k.shape[-2]
        return "[" + ",".join(str(x) for x in (*s.q.shape[:-1], nk, s.q.shape[-1])) + "]"


@dataclass
class Report:
    """``explain()``'s result: ``sites``, per-graph ``before``/``after`` graph snapshots (each with
    ``.graph``, ``.code``, ``.module``), renderings."""

    sites: list[Site] = field(default_factory=list)
    before: list[GraphSnapshot] = field(default_factory=list)
    after: list[GraphSnapshot] = field(default_factory=list)

    @property
    def fused(self) -> list[Site]:
        return [s for s in self.sites if s.fused]

    @property
    def kept(self) -> list[Site]:
        return [s for s in self.sites if not s.fused]

    def extend(self, other: "Report") -> None:
        base = len(self.before)
        for s in other.sites:
            self.sites.append(dataclasses.replace(s, graph=s.graph + base, index=len(self.sites)))
        self.before.extend(other.before)
        self.after.extend(other.after)

    def diff(self) -> str:
        """Unified diff of each graph's code before and after the rewrite."""
        chunks = []
        for i, (b, a) in enumerate(zip(self.before, self.after)):
            chunks.extend(difflib.unified_diff(
                b.code.splitlines(), a.code.splitlines(), f"graph{i}.before", f"graph{i}.after",
                lineterm=""))
        return "\n".join(chunks)

    def __str__(self) -> str:
        head = (f"attnfuse: {len(self.sites)} attention site(s) in {len(self.before)} graph(s), "
                f"{len(self.fused)} fused, {len(self.kept)} kept")
        cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        lines = [head, f"torch {torch.__version__} | {cuda}", ""]
        rows = [("#", "module", "source", "pattern", "shape [B,H,Nq,Nk,D]", "dtype", "mask",
                 "-> decision")]
        for s in self.sites:
            dtype = str(s.spec.dtype).replace("torch.", "") if s.spec else ""
            mask = s.spec.mask.describe() if s.spec else ""
            decision = f"attnfuse::{s.kernel}" if s.kernel not in (None, "sdpa") else (
                "sdpa (kept)" if s.kernel == "sdpa" else "KEPT")
            rows.append((str(s.index), s.module_path or "-", s.location or "-", s.pattern,
                         s.shape(), dtype, mask, decision))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        notes = [f" [{s.index}] {s.reason}" for s in self.sites]
        if notes:
            lines += ["", "why:"] + notes
        return "\n".join(lines)
