"""The torch.compile backend and the user-facing doors: ``optimize`` and ``explain``.

Data flow: Dynamo hands a torch-level GraphModule to :func:`attnfuse_backend`; every softmax and
SDPA call is matched (canonicalize + match), a kernel is chosen per site, the site is rewritten
into ``attnfuse::attention``, and the graph goes to the inner compiler (Inductor by default).
Autograd is derived later by AOTAutograd, through the op's registered backward.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.fx import GraphModule, Node

from . import ops  # noqa: F401  (registers torch.ops.attnfuse.*)
from .kernels import registry, sdpa
from .passes import canonicalize as C
from .passes import lower
from .passes.match import (Context, match_softmax, module_path, scalar_name, softmax_nodes,
                            source_location, spec_of)
from .passes.rewrite import leaves, operand_metas, operand_values, rewrite_sdpa, rewrite_site
from .passes.values import capture
from .report import GraphSnapshot, Report, Site
from .spec import AttentionSpec, MaskSpec, Reject, TensorInfo
from .tune.select import Choice, Gate, Problem, accuracy, choose

log = logging.getLogger(__name__)

POLICIES = ("exact", "fast", "sparse")
INNER = ("inductor", "eager")


def inductor_modes() -> tuple[str, ...]:
    """The ``mode=`` names Inductor accepts (``"default"``, ``"reduce-overhead"``, ...)."""
    from torch._inductor import list_mode_options
    return tuple(list_mode_options())


def mode_config(mode: Optional[str]) -> dict[str, Any]:
    """Inductor's config patches for ``torch.compile(mode=...)``, from Inductor's own table.

    ``None`` and ``"default"`` patch nothing; ``"reduce-overhead"`` turns on CUDA graphs
    (``triton.cudagraphs``); ``"max-autotune"`` adds autotuning. Raises ValueError for other names.
    """
    if mode is None or mode == "default":
        return {}
    modes = inductor_modes()
    if not isinstance(mode, str) or mode not in modes:
        raise ValueError(f"mode must be one of {modes} or None, got {mode!r}")
    from torch._inductor import list_mode_options
    return dict(list_mode_options(mode))


@dataclass(frozen=True)
class Options:
    """How attnfuse compiles a model."""

    policy: str = "exact"
    """Which kernels may run a site: ``"exact"`` allows only kernels that compute the same function
    within floating-point error; ``"fast"`` also quantized kernels (``sage``: INT8 Q·Kᵀ, FP8 or
    FP16 P·V), each admitted per site only if, on the site's own activations (the example
    inputs run through the model), its output keeps ``min_cosine`` and ``max_rel_l1`` against
    the exact one; never for a site that needs gradients; ``"sparse"`` also the block-sparse
    kernel, with its mass threshold τ tuned per site to the sparsest whose output stays within
    ``sparse_max_rel_l1`` of the exact one on the site's activations (inference sites only;
    ``tune/sparse_gate.py``)."""
    min_cosine: float = 0.999
    """``policy="fast"``: least cosine similarity of a quantized site's output to the exact one."""
    max_rel_l1: float = 0.03
    """``policy="fast"``: largest relative L1 error, Σ|o' − o| / Σ|o|, of a quantized site."""
    sparse_max_rel_l1: float = 0.05
    """``policy="sparse"``: largest relative L1 error of a block-sparse site's output against the
    exact attention on its example activations; a site that cannot meet it stays dense."""
    sparse_reuse: int = 1
    """``policy="sparse"``: a site re-estimates its block mask every ``sparse_reuse`` calls, and
    sooner when its pooled Q/K drift (diffusion steps); 1 = every call."""
    inner: str = "inductor"
    """The compiler for the rest of the graph: ``"inductor"`` or ``"eager"`` (for debugging)."""
    kernel: Optional[str] = None
    """Force one kernel (``"flash"``, ``"reference"``, ``"sdpa_cudnn"``, ...) on every site it
    supports; ``None`` = choose per site (cost model + timing)."""
    keep_sdpa: bool = False
    """Leave the model's own SDPA calls to PyTorch's default dispatch. ``False``: they are sites
    like any other, and get the fastest candidate (which may be one of SDPA's backends, pinned)."""
    mode: Optional[str] = None
    """Inductor's mode for the rest of the graph, as in ``torch.compile(mode=...)``:
    ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"``, ...; ``None`` = Inductor's default.
    Only with ``inner="inductor"``."""
    tune: Optional[bool] = None
    """Time the best candidate kernels on each site's shapes at compile time (the winner is
    cached on disk): ``None`` = on CUDA unless ``ATTNFUSE_AUTOTUNE=0``; ``False`` = cost model
    only; ``True`` = also on CPU."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.inner not in INNER:
            raise ValueError(f"inner must be one of {INNER}, got {self.inner!r}")
        if not self.sparse_max_rel_l1 >= 0.0 or not (isinstance(self.sparse_reuse, int)
                                                     and self.sparse_reuse >= 1):
            raise ValueError(f"sparse_max_rel_l1 must be >= 0 and sparse_reuse an int >= 1, got "
                             f"{self.sparse_max_rel_l1!r} and {self.sparse_reuse!r}")
        if not (0.0 < self.min_cosine <= 1.0) or not self.max_rel_l1 >= 0.0:
            raise ValueError(f"min_cosine must be in (0, 1] and max_rel_l1 >= 0, got "
                             f"{self.min_cosine!r} and {self.max_rel_l1!r}")
        if self.kernel is not None and self.kernel not in registry.kernel_names():
            raise ValueError(f"kernel must be one of {registry.kernel_names()} or None, "
                             f"got {self.kernel!r}")
        patches = mode_config(self.mode)   # raises for an unknown mode
        if patches and self.inner != "inductor":
            raise ValueError(f"mode={self.mode!r} configures Inductor and needs inner='inductor', "
                             f"got inner={self.inner!r}")

    def inductor_config(self) -> dict[str, Any]:
        """Config patches for Inductor's ``compile_fx`` (empty for the default mode)."""
        return mode_config(self.mode)

    @staticmethod
    def parse(options: Optional[dict[str, Any]]) -> "Options":
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(Options)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown attnfuse option(s) {unknown}; expected some of {sorted(names)}")
        return Options(**options)


def _choose(q: Any, k: Any, v: Any, mask: Any, causal: str, opts: Options, *,
            window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
            mask_fill: float = -math.inf, scale: Optional[float] = None,
            source: str = "eager_softmax", values: Optional[Callable[[], tuple]] = None
            ) -> tuple[Optional[str], str, dict, Optional[Choice]]:
    """Kernel for one site: ``(name or None, why, {rejected: reasons}, the selector's Choice)``."""
    m4 = ops.as_4d(mask)
    training = any(getattr(t, "requires_grad", False) for t in (q, k, v, m4) if t is not None)
    mask_grad = bool(m4 is not None and getattr(m4, "requires_grad", False))
    kw = dict(window=window, softcap=softcap, mask_fill=mask_fill, mask_grad=mask_grad,
              source=source)
    if opts.kernel not in (None, "auto"):
        reasons = registry.rejections(opts.kernel, q, k, v, m4, causal, **kw)
        if reasons:
            return None, (f"kernel={opts.kernel!r} was forced but cannot run this site: "
                          + "; ".join(reasons)), {opts.kernel: reasons}, None
        return opts.kernel, f"kernel={opts.kernel!r} forced by options", {}, Choice(
            opts.kernel, "forced", cache="forced")
    problem = Problem.of(q, k, v, m4, causal, training=training, scale=scale, **kw)
    gate = None
    if values is not None and opts.policy == "fast":
        gate = Gate(functools.partial(_measure, values, problem), opts.min_cosine,
                    opts.max_rel_l1)
    choice = choose(problem, q, k, v, m4, policy=opts.policy, tune=opts.tune, gate=gate)
    if opts.policy == "sparse":
        from .tune.sparse_gate import site_choice
        choice = site_choice(choice, problem, q, k, v, m4, values, tune=opts.tune,
                             max_rel_l1=opts.sparse_max_rel_l1, every=opts.sparse_reuse)
    rejected = {c.kernel: c.reasons for c in choice.candidates if c.reasons}
    if not choice.kernel:
        return None, choice.reason, rejected, choice
    return choice.kernel, f"{choice.kernel}: {choice.reason}", rejected, choice


def _measure(values: Callable[[], tuple], p: Problem, kernel: str) -> dict[str, float]:
    """A non-exact kernel's accuracy on the site's captured operands, against the reference."""
    q, k, v, mask = values()
    m4 = ops.as_4d(mask)
    args = (q, k, v, m4, p.scale, p.causal, p.mask_fill, p.softcap, p.window)
    with torch.no_grad():
        exact, _ = registry.get("reference").forward(*args)
        out, _ = registry.get(kernel).forward(*args)
    return accuracy(out, exact)


def _site(gi: int, pattern: str, kernel: Optional[str], why: str, spec: Optional[AttentionSpec],
          loc: str, mod: str, rejected: dict, choice: Optional[Choice]) -> Site:
    site = Site(0, gi, pattern, kernel, why, spec, loc, mod, rejected)
    if choice is not None:
        site.candidates, site.cache, site.config = choice.candidates, choice.cache, choice.config
    return site


def _eager_site(gm: GraphModule, sm: Node, ctx: Context, opts: Options, gi: int,
                captured: Optional[dict] = None) -> Site:
    loc, mod = source_location(sm), module_path(sm)
    m = match_softmax(sm, gm, ctx.example_inputs, ctx)
    if isinstance(m, Reject):
        return Site(0, gi, "eager_softmax", None, m.reason, location=loc, module_path=mod)
    qm, km, vm, mask_meta, fill = operand_metas(m)
    spec = spec_of(m, qm, km, vm, mask_meta, fill, loc, mod)
    values = None
    if captured is not None and all(n in captured for n in leaves(m)):
        values = lambda: operand_values(m, captured)[:4]  # noqa: E731
    name, why, rejected, choice = _choose(qm, km, vm, mask_meta, m.causal, opts,
                                          window=tuple(m.window), softcap=spec.softcap,
                                          mask_fill=fill, scale=spec.scale, values=values)
    if name is None:
        return _site(gi, "eager_softmax", None, why, spec, loc, mod, rejected, choice)
    rewrite_site(gm, m, name, f"attnfuse: {spec.describe()} -> {name}")
    return _site(gi, "eager_softmax", name, why, spec, loc, mod, rejected, choice)


def _sdpa_args(node: Node) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    out = dict(zip(names, defaults))
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _sdpa_site(gm: GraphModule, node: Node, opts: Options, gi: int,
               captured: Optional[dict] = None) -> Site:
    loc, mod = source_location(node), module_path(node)
    a = _sdpa_args(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    qm, km, vm = C.meta(q), C.meta(k), C.meta(v)
    mm = C.meta(mask) if mask is not None else None
    if a["dropout_p"] != 0:
        return Site(0, gi, "sdpa", "sdpa", f"dropout_p={a['dropout_p']}: kept on PyTorch's SDPA "
                    f"(fused dropout is not implemented yet)", location=loc, module_path=mod)
    if not isinstance(a["is_causal"], bool) or not all(isinstance(x, torch.Tensor) for x in (qm, km, vm)):
        return Site(0, gi, "sdpa", "sdpa", "is_causal or operand shapes are not static: kept",
                    location=loc, module_path=mod)
    mqa = (qm.dim() == km.dim() == 4 and km.shape[1] == 1 and C.meta(v).shape[1] == 1
           and isinstance(qm.shape[1], int))    # one K/V head, broadcast by SDPA's matmuls
    if qm.dim() != 4 or km.dim() != 4 or (qm.shape[1] != km.shape[1] and not a["enable_gqa"]
                                          and not mqa):
        return Site(0, gi, "sdpa", "sdpa", f"{qm.dim()}-D operands or mismatched heads: kept",
                    location=loc, module_path=mod)
    d = qm.shape[-1]
    scale = a["scale"] if a["scale"] is not None else (1.0 / math.sqrt(d) if isinstance(d, int) else None)
    # A Python float of the graph (dynamic shapes: ``scale=self.scaling``) is passed on as is.
    hint = C.scalar_hint(scale) if isinstance(scale, Node) else None
    if not isinstance(scale, (int, float)) and hint is None:
        return Site(0, gi, "sdpa", "sdpa", "scale is symbolic: kept", location=loc, module_path=mod)
    value = float(scale) if hint is None else hint
    shown = f"{value:.6g}" + (f" (runtime {scalar_name(scale)})" if hint is not None else "")
    causal = "top_left" if a["is_causal"] else "none"
    kind = "none" if mm is None else ("bool" if mm.dtype == torch.bool else "additive")
    spec = AttentionSpec(
        q=TensorInfo.of(qm), k=TensorInfo.of(km), v=TensorInfo.of(vm), scale=value,
        scale_expr=shown,
        mask=MaskSpec(causal, kind, TensorInfo.of(mm) if mm is not None else None,
                      requires_grad=bool(mm is not None and mm.requires_grad)),
        gqa_groups=qm.shape[1] // km.shape[1] if isinstance(km.shape[1], int) and km.shape[1] else 1,
        requires_grad=any(t.requires_grad for t in (qm, km, vm)), source="sdpa",
        location=loc, module_path=mod, rules=("scaled_dot_product_attention",))
    if opts.keep_sdpa and opts.kernel in (None, "auto"):
        return Site(0, gi, "sdpa", "sdpa", "existing SDPA call kept on PyTorch's default "
                    "dispatch (keep_sdpa=True)", spec, loc, mod)
    values = None
    nodes = [x for x in (q, k, v, mask) if isinstance(x, Node)]
    if captured is not None and all(n in captured for n in nodes):
        values = lambda: tuple(captured[x] if isinstance(x, Node) else x  # noqa: E731
                               for x in (q, k, v, mask))
    name, why, rejected, choice = _choose(qm, km, vm, mm, causal, opts, scale=value,
                                          source="sdpa", values=values)
    if name is None:
        return _site(gi, "sdpa", "sdpa", why + "; kept on PyTorch's SDPA", spec, loc, mod,
                     rejected, choice)
    rewrite_sdpa(gm, node, q, k, v, mask, scale if hint is not None else value, causal, name,
                 f"attnfuse: {spec.describe()} -> {name}")
    return _site(gi, "sdpa", name, why, spec, loc, mod, rejected, choice)


def _mha_site(gm: GraphModule, node: Node, opts: Options, gi: int) -> Site:
    """nn.MultiheadAttention / TransformerEncoderLayer calls: lowered onto the fused op."""
    loc, mod = source_location(node), module_path(node)
    pattern = lower.kind_of(node)
    reason, f = lower.check(node)
    if reason is not None:
        return Site(0, gi, pattern, None, reason, location=loc, module_path=mod)
    like = f["like"]
    qm = like.new_empty((f["b"], f["h"], f["nq"], f["d"]))
    km = like.new_empty((f["b"], f["h"], f["nk"], f["d"]))
    spec = AttentionSpec(
        q=TensorInfo.of(qm), k=TensorInfo.of(km), v=TensorInfo.of(km), scale=f["d"] ** -0.5,
        scale_expr=f"1/sqrt({f['d']})", requires_grad=bool(like.requires_grad), source=pattern,
        location=loc, module_path=mod, rules=(f"{pattern}->lowered onto attnfuse::attention",))
    # The lowering builds PyTorch's own masks (additive -inf), so SDPA backends keep its meaning.
    name, why, rejected, choice = _choose(qm, km, km, lower.mask_meta(f), "none", opts,
                                          source="sdpa")
    if name is None:
        return _site(gi, pattern, None, why, spec, loc, mod, rejected, choice)
    lower.lower(node, name, f"attnfuse: {spec.describe()} -> {name}")
    return _site(gi, pattern, name, why, spec, loc, mod, rejected, choice)


def _snapshot(gm: GraphModule) -> GraphSnapshot:
    """A copy of the graph (sharing parameters) for the report."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return GraphSnapshot(gm, graph)


def _guarded(site_fn: Callable[..., Site], node: Node, *args: Any) -> Site:
    """A matcher bug must not break the user's compile: keep the site, say why, log it.

    ``ATTNFUSE_STRICT=1`` (the test suite sets it) re-raises instead.
    """
    try:
        return site_fn(node, *args)
    except Exception as e:
        if os.environ.get("ATTNFUSE_STRICT") == "1":
            raise
        log.warning("attnfuse: internal error on %s, site kept: %r", node.name, e)
        return Site(0, args[-1], "sdpa" if C.is_sdpa(node) else "eager_softmax", None,
                    f"internal error, site kept unchanged: {e!r}", location=source_location(node),
                    module_path=module_path(node))


def _capture_for_gates(gm: GraphModule, example_inputs: Sequence[Any], ctx: Context,
                       opts: Options) -> Optional[dict]:
    """Under ``policy="fast"`` or ``"sparse"``, the values of every site's operands on the
    example inputs (one eager run of the graph, before any rewrite), for the accuracy gates;
    None otherwise or when the inputs are not real tensors."""
    if opts.policy not in ("fast", "sparse") or not all(
            isinstance(x, (torch.Tensor, int, float, bool)) for x in example_inputs):
        return None
    device = next((x.device.type for x in example_inputs if isinstance(x, torch.Tensor)), "cpu")
    if opts.policy == "fast" and all(registry.get(n).exact for n in registry.candidates(device)):
        return None
    nodes: list[Node] = []
    for sm in softmax_nodes(gm):
        m = match_softmax(sm, gm, example_inputs, ctx)
        if not isinstance(m, Reject):
            nodes += leaves(m)
    for n in gm.graph.nodes:
        if C.is_sdpa(n):
            a = _sdpa_args(n)
            nodes += [x for x in (a["query"], a["key"], a["value"], a["attn_mask"])
                      if isinstance(x, Node)]
    try:
        return capture(gm, example_inputs, nodes)
    except Exception as e:  # without values the quantized kernels are simply not admitted
        log.warning("attnfuse: could not run the graph to measure quantized kernels: %r", e)
        return None


def rewrite_attention(gm: GraphModule, example_inputs: Sequence[Any], opts: Options,
                      graph_index: int = 0) -> Report:
    """Find and rewrite every attention site of ``gm`` in place; returns the report."""
    before = _snapshot(gm)
    ctx = Context(gm, example_inputs)
    captured = _capture_for_gates(gm, example_inputs, ctx, opts)
    eager = functools.partial(_eager_site, gm, captured=captured)
    sdpa = functools.partial(_sdpa_site, gm, captured=captured)
    sites = [_guarded(eager, sm, ctx, opts, graph_index) for sm in softmax_nodes(gm)]
    sites += [_guarded(sdpa, n, opts, graph_index) for n in list(gm.graph.nodes) if C.is_sdpa(n)]
    mha = functools.partial(_mha_site, gm)
    sites += [_guarded(mha, n, opts, graph_index) for n in list(gm.graph.nodes) if lower.kind_of(n)]
    changed = any(s.kernel not in (None, "sdpa") for s in sites)
    if changed:
        gm.graph.lint()
        gm.recompile()
    for i, s in enumerate(sites):
        s.index = i
        _log_site(s)
    report = Report(sites, [before], [_snapshot(gm) if changed else before])
    log.info("attnfuse: graph with %d attention site(s): %d fused, %d kept", len(sites),
             len(report.fused), len(report.kept))
    _trace(report)
    return report


def _log_site(s: Site) -> None:
    """INFO: one line per site; DEBUG (``TORCH_LOGS="+attnfuse"``): rules, spec, candidates."""
    log.info("attnfuse site %d %s %s -> %s: %s", s.index, s.module_path, s.location, s.kernel,
             s.reason)
    if s.spec is not None:
        log.debug("attnfuse site %d: %s; rules: %s", s.index, s.spec.describe(),
                  ", ".join(s.spec.rules))
    for c in s.candidates:
        log.debug("attnfuse site %d candidate %s: predicted %s ms, measured %s ms%s", s.index,
                  c.kernel, c.predicted_ms, c.measured_ms,
                  f", rejected: {'; '.join(c.reasons)}" if c.reasons else "")


def _trace(report: Report) -> None:
    """The report as an ``attnfuse_rewrites`` artifact of ``TORCH_TRACE`` (shown by tlparse)."""
    try:
        from torch._logging import trace_structured
    except ImportError:
        return
    trace_structured("artifact", metadata_fn=lambda: {"name": "attnfuse_rewrites",
                                                      "encoding": "json"},
                     payload_fn=report.to_json)


_REPORTS: list[Report] = []


def last_report() -> Report:
    """Everything ``torch.compile(..., backend="attnfuse")`` rewrote in this process so far."""
    merged = Report()
    for r in _REPORTS:
        merged.extend(r)
    return merged


def make_backend(opts: Options, sink: Optional[Report] = None) -> Callable:
    """A Dynamo backend that rewrites attention, records into ``sink``, then compiles."""

    def backend(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        report = rewrite_attention(gm, example_inputs, opts)
        compiled = _inner_compile(gm, example_inputs, opts)
        # Recorded only once the inner compiler accepted the graph: when it asks Dynamo to
        # restart the frame's analysis (AOTAutograd specialising a Python float it could not
        # turn into a tensor, e.g. one a fused op takes as its scale), this attempt is
        # discarded and the next one is the frame's graph.
        if sink is not None:
            sink.extend(report)
        else:
            _REPORTS.append(report)
        return compiled

    return backend


def _inner_compile(gm: GraphModule, example_inputs: Sequence[Any], opts: Options) -> Callable:
    if opts.inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    patches = {**opts.inductor_config(), **_cacheable_calls()}
    if patches:
        return compile_fx(gm, example_inputs, config_patches=patches)
    return compile_fx(gm, example_inputs)


def _cacheable_calls() -> dict[str, Any]:
    """Inductor config marking the plain function the rewrite puts in graphs (``sdpa.call``, SDPA
    pinned to one backend) as cacheable, keyed by its module's source: AOTAutograd's cache
    refuses any graph calling a Python function it does not know, so every compile of a
    rewritten graph would trace it again. Its behaviour is fixed by its arguments (constants of
    the graph, hence of the cache key) and its source (the value here)."""
    from torch._inductor import config
    marked = getattr(config, "unsafe_marked_cacheable_functions", None)
    if not isinstance(marked, dict):
        return {}
    name = f"{sdpa.call.__module__}.{sdpa.call.__name__}"
    return {"unsafe_marked_cacheable_functions": {**marked, name: _sdpa_source_digest()}}


@functools.lru_cache(maxsize=1)
def _sdpa_source_digest() -> str:
    return hashlib.sha256(Path(sdpa.__file__).read_bytes()).hexdigest()[:16]


def attnfuse_backend(gm: GraphModule, example_inputs: Sequence[Any], *,
                     options: Optional[dict[str, Any]] = None, mode: Optional[str] = None) -> Callable:
    """``torch.compile(model, backend="attnfuse", options={...})`` or ``mode="reduce-overhead"``.

    ``torch.compile`` accepts ``mode`` or ``options``, not both; to combine them put the mode in
    the options: ``options={"kernel": "flash", "mode": "reduce-overhead"}``.
    """
    options = dict(options or {})
    if mode is not None and mode != "default":
        if options.get("mode", mode) != mode:
            raise ValueError(f"mode={mode!r} and options['mode']={options['mode']!r} disagree")
        options["mode"] = mode
    return make_backend(Options.parse(options))(gm, example_inputs)


def _call(fn: Callable, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return fn(**example_inputs)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    return fn(*example_inputs)


def optimize(model: torch.nn.Module, example_inputs: Any = None, *, policy: str = "exact",
             inner: str = "inductor", kernel: Optional[str] = None, dynamic: Optional[bool] = None,
             keep_sdpa: bool = False, mode: Optional[str] = None,
             tune: Optional[bool] = None, min_cosine: float = 0.999,
             max_rel_l1: float = 0.03, sparse_max_rel_l1: float = 0.05,
             sparse_reuse: int = 1) -> torch.nn.Module:
    """Return a module computing what ``model`` computes, with its attention fused.

    With ``example_inputs`` (a tensor, a tuple of positional args, or a dict of keyword args) the
    model is compiled here, once; the report is at ``.attnfuse_report``. ``dynamic`` is
    ``torch.compile``'s; ``mode`` is Inductor's (``"reduce-overhead"`` for CUDA graphs,
    ``"max-autotune"``, ...), as in ``torch.compile(mode=...)``. ``tune``: time candidate
    kernels on each site's shapes (default: on CUDA); ``policy="fast"`` with ``min_cosine`` /
    ``max_rel_l1``: quantized kernels where they keep that accuracy on the site's activations
    (measured on ``example_inputs``, so pass them); ``policy="sparse"`` with
    ``sparse_max_rel_l1`` / ``sparse_reuse``: block-sparse attention within that error, τ tuned
    per site on the same activations; see :class:`Options`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}; "
                        f"for a function use torch.compile(fn, backend='attnfuse')")
    opts = Options(policy=policy, inner=inner, kernel=kernel, keep_sdpa=keep_sdpa, mode=mode,
                   tune=tune, min_cosine=min_cosine, max_rel_l1=max_rel_l1,
                   sparse_max_rel_l1=sparse_max_rel_l1, sparse_reuse=sparse_reuse)
    report = Report()
    compiled = torch.compile(model, backend=make_backend(opts, report), dynamic=dynamic)
    compiled.attnfuse_report = report
    if example_inputs is not None:
        with torch.no_grad():
            _call(compiled, example_inputs)
    return compiled


def explain(model: torch.nn.Module, example_inputs: Any, *, policy: str = "exact",
            kernel: Optional[str] = None, keep_sdpa: bool = False,
            tune: Optional[bool] = None, min_cosine: float = 0.999,
            max_rel_l1: float = 0.03, sparse_max_rel_l1: float = 0.05) -> Report:
    """Capture ``model`` on ``example_inputs`` and report every attention site and decision.

    Runs the model once (without gradients); the rest of the graph runs eagerly.
    """
    fast = optimize(model, example_inputs, policy=policy, inner="eager", kernel=kernel,
                    keep_sdpa=keep_sdpa, tune=tune, min_cosine=min_cosine, max_rel_l1=max_rel_l1,
                    sparse_max_rel_l1=sparse_max_rel_l1)
    return fast.attnfuse_report
