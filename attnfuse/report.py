"""What attnfuse found and did: one row per attention site, the graphs before and after."""
from __future__ import annotations

import dataclasses
import difflib
import html
import importlib.metadata
import importlib.util
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch.fx import GraphModule

from .spec import AttentionSpec, TensorInfo


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
class Candidate:
    """One kernel considered for a site: its predicted and (when timed) measured time."""

    kernel: str
    predicted_ms: Optional[float] = None  # cost model (roofline against the device's ceilings)
    measured_ms: Optional[float] = None   # autotuner timing on the site's shapes; None = not timed
    reasons: list[str] = field(default_factory=list)  # why it cannot run the site; empty = eligible
    config: dict = field(default_factory=dict)        # the kernel's own tuned config, if any
    accuracy: dict = field(default_factory=dict)      # measured gate numbers (quantized, sparse)

    @property
    def eligible(self) -> bool:
        return not self.reasons


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
    candidates: list[Candidate] = field(default_factory=list)  # every kernel considered
    cache: str = ""        # the choice's source: "hit", "miss", "pinned", "disabled", "forced", ""
    config: dict = field(default_factory=dict)  # the chosen kernel's config (e.g. flash tiles)

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
        lines = [head, f"torch {torch.__version__} | {_device_name()}", ""]
        rows = [("#", "module", "source", "pattern", "shape [B,H,Nq,Nk,D]", "dtype", "mask",
                 "-> decision")]
        for s in self.sites:
            dtype = str(s.spec.dtype).replace("torch.", "") if s.spec else ""
            mask = s.spec.mask.describe() if s.spec else ""
            rows.append((str(s.index), s.module_path or "-", s.location or "-", s.pattern,
                         s.shape(), dtype, mask, _decision(s.kernel)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        notes = [line for s in self.sites for line in _site_notes(s)]
        if notes:
            lines += ["", "why:"] + notes
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as plain JSON types (dtypes and shapes as strings)."""
        return {"torch": torch.__version__, "triton": _triton_version(), "device": _device_name(),
                "graphs": len(self.before), "fused": len(self.fused), "kept": len(self.kept),
                "sites": [_site_dict(s) for s in self.sites]}

    def to_json(self, **json_kwargs: Any) -> str:
        json_kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **json_kwargs)

    def to_html(self, path: Union[str, Path]) -> Path:
        """Write one self-contained HTML page (site table, per-graph code diffs); returns its path."""
        out = Path(path)
        out.write_text("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                       "<title>attnfuse report</title></head>\n<body>\n"
                       f"{self._html_body()}\n</body></html>\n", encoding="utf-8")
        return out

    def _repr_html_(self) -> str:
        return self._html_body()

    def _html_body(self) -> str:
        e = html.escape
        triton = _triton_version() or "not installed"
        parts = [f"<div class=\"attnfuse-report\">\n<style>{_CSS}</style>",
                 "<h1>attnfuse report</h1>",
                 f"<p class=\"meta\">torch {e(torch.__version__)} | triton {e(triton)} | "
                 f"device {e(_device_name())}</p>",
                 f"<p>{len(self.sites)} attention site(s) in {len(self.before)} graph(s): "
                 f"<b>{len(self.fused)} fused</b>, {len(self.kept)} kept</p>",
                 "<h2>Sites</h2>", _site_table(self.sites), "<h2>Graphs</h2>"]
        differ = difflib.HtmlDiff(tabsize=4)
        for i, (b, a) in enumerate(zip(self.before, self.after)):
            parts.append(f"<h3>graph {i}</h3>")
            if a is b:
                parts.append("<p class=\"unchanged\">unchanged (no attention site rewritten)</p>")
                continue
            table = differ.make_table(b.code.splitlines(), a.code.splitlines(),
                                      f"graph {i} before", f"graph {i} after",
                                      context=True, numlines=4)
            parts.append(f"<div class=\"diff-wrap\">{table}</div>")
            svg = _svg(a.module, f"graph{i}_after")
            if svg:
                parts.append(f"<details><summary>graph {i} after (drawing)</summary>"
                             f"<div class=\"svg-wrap\">{svg}</div></details>")
        parts.append("</div>")
        return "\n".join(parts)


_CSS = """
.attnfuse-report { font-family: system-ui, sans-serif; font-size: 14px; color: #222; }
.attnfuse-report table.sites { border-collapse: collapse; margin: 8px 0; }
.attnfuse-report table.sites th, .attnfuse-report table.sites td {
  border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; text-align: left; }
.attnfuse-report table.sites th { background: #f0f0f0; }
.attnfuse-report tr.kept td.decision { color: #a40; }
.attnfuse-report tr.fused td.decision { color: #060; font-weight: bold; }
.attnfuse-report .rules, .attnfuse-report .meta { color: #666; font-size: 12px; }
.attnfuse-report .chosen { font-weight: bold; color: #060; }
.attnfuse-report .rejected { color: #999; }
.attnfuse-report .diff-wrap, .attnfuse-report .svg-wrap { overflow-x: auto; }
.attnfuse-report table.diff { font-family: ui-monospace, monospace; font-size: 12px;
  border: 1px solid #ccc; }
.attnfuse-report .diff_header { background: #e0e0e0; padding: 0 4px; }
.attnfuse-report td.diff_header { text-align: right; }
.attnfuse-report .diff_next { background: #c0c0c0; }
.attnfuse-report .diff_add { background: #aaffaa; }
.attnfuse-report .diff_chg { background: #ffff77; }
.attnfuse-report .diff_sub { background: #ffaaaa; }
"""


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _triton_version() -> Optional[str]:
    # metadata, not import: importing triton is slow and may fail without a GPU toolchain
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _decision(kernel: Optional[str]) -> str:
    if kernel is None:
        return "KEPT"
    if kernel == "sdpa":
        return "sdpa (kept)"
    if kernel.startswith("sdpa_"):
        return f"torch sdpa ({kernel[len('sdpa_'):]})"
    return f"attnfuse::{kernel}"


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "?"
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def _config_text(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def _candidate_text(c: Candidate, chosen: bool) -> str:
    """E.g. ``flash 0.41 ms (pred 0.45) chosen`` or ``reference rejected: head_dim > 256``."""
    if c.reasons:
        return f"{c.kernel} rejected: " + "; ".join(c.reasons)
    text = c.kernel
    if c.measured_ms is not None:
        text += f" {_ms(c.measured_ms)} ms"
        if c.predicted_ms is not None:
            text += f" (pred {_ms(c.predicted_ms)})"
    elif c.predicted_ms is not None:
        text += f" pred {_ms(c.predicted_ms)} ms"
    if c.accuracy:  # a kernel admitted by an accuracy gate: what it measured
        text += f" [cos {c.accuracy['cosine']:.5f}, rel L1 {c.accuracy['rel_l1']:.4f}"
        if "density" in c.accuracy:  # block-sparse: the realised density at the tuned τ
            text += f", density {c.accuracy['density']:.3f}, τ {c.accuracy['tau']:g}"
        text += "]"
    return text + (" chosen" if chosen else "")


def _site_notes(s: Site) -> list[str]:
    """The site's block under "why:": the reason, then spec, rules, candidates, cache/config."""
    pad = " " * (len(str(s.index)) + 4)
    lines = [f" [{s.index}] {s.reason}"]
    if s.spec is not None:
        lines.append(f"{pad}spec: {s.spec.describe()}")
        if s.spec.rules:
            lines.append(f"{pad}rules: {', '.join(s.spec.rules)}")
    if s.candidates:
        head, line = f"{pad}candidates: ", ""
        for i, text in enumerate(_candidate_text(c, c.kernel == s.kernel) for c in s.candidates):
            if i and len(line) + len(text) > 96:  # wrap long lists, "| " under the first candidate
                lines.append(line)
                line = " " * (len(head) - 2) + "| " + text
            else:
                line = (line + " | " + text) if i else head + text
        lines.append(line)
    tail = ([f"cache: {s.cache}"] if s.cache else []) + (
        [f"config: {_config_text(s.config)}"] if s.config else [])
    if tail:
        lines.append(pad + " | ".join(tail))
    return lines


def _jsonable(o: Any) -> Any:
    """Plain JSON values: dtypes, devices and shapes as strings, non-finite floats as strings."""
    if isinstance(o, TensorInfo):
        return {"shape": o.describe(), "dtype": str(o.dtype).replace("torch.", ""),
                "device": o.device, "stride": "x".join(str(x) for x in o.stride)}
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return {f.name: _jsonable(getattr(o, f.name)) for f in dataclasses.fields(o)}
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set)):
        return [_jsonable(x) for x in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)  # "inf", "-inf", "nan": strict JSON has no such numbers
    if o is None or isinstance(o, (bool, int, float, str)):
        return o
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    return str(o)


def _site_dict(s: Site) -> dict[str, Any]:
    d = {f.name: _jsonable(getattr(s, f.name)) for f in dataclasses.fields(s)}
    for c, cd in zip(s.candidates, d["candidates"]):
        cd["eligible"] = c.eligible
    d.update(fused=s.fused, decision=_decision(s.kernel), shape=s.shape(),
             description=s.spec.describe() if s.spec else "")
    return d


def _site_table(sites: list[Site]) -> str:
    e = html.escape
    head = ("#", "module", "source", "pattern", "shape [B,H,Nq,Nk,D]", "dtype", "mask",
            "decision", "candidates", "cache", "why")
    rows = ["<table class=\"sites\"><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
            + "</tr></thead><tbody>"]
    for s in sites:
        spec = s.spec
        cands = "<br>".join(
            f"<span class=\"{'rejected' if c.reasons else 'chosen' if c.kernel == s.kernel else 'ok'}\">"
            f"{e(_candidate_text(c, c.kernel == s.kernel))}</span>" for c in s.candidates)
        why = e(s.reason)
        if spec is not None:
            why += f"<div class=\"rules\">{e(spec.describe())}</div>"
            if spec.rules:
                why += f"<div class=\"rules\">rules: {e(', '.join(spec.rules))}</div>"
        if s.config:
            why += f"<div class=\"rules\">config: {e(_config_text(s.config))}</div>"
        cells = (str(s.index), s.module_path or "-", s.location or "-", s.pattern, s.shape(),
                 str(spec.dtype).replace("torch.", "") if spec else "",
                 spec.mask.describe() if spec else "")
        rows.append(f"<tr class=\"{'fused' if s.fused and s.kernel != 'sdpa' else 'kept'}\">"
                    + "".join(f"<td>{e(c)}</td>" for c in cells)
                    + f"<td class=\"decision\">{e(_decision(s.kernel))}</td><td>{cands}</td>"
                    f"<td>{e(s.cache)}</td><td>{why}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _svg(gm: GraphModule, name: str) -> str:
    """An inline SVG drawing of ``gm`` when pydot and Graphviz's ``dot`` exist, else ""."""
    if importlib.util.find_spec("pydot") is None or shutil.which("dot") is None:
        return ""
    try:
        from torch.fx.passes.graph_drawer import FxGraphDrawer
        svg = FxGraphDrawer(gm, name).get_dot_graph().create_svg().decode("utf-8")
    except Exception:  # drawing is a nicety: any failure leaves the diff alone
        return ""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else ""  # drop the XML prolog and external DTD reference
