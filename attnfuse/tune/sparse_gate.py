"""The accuracy gate of ``policy="sparse"``: tune τ per site on its own activations.

For one site, :func:`tune_tau` bisects a ladder of mass thresholds τ (``kernels/sparse_predict``)
for the sparsest whose output keeps relative L1 Σ|o' − o| / Σ|o| within the budget against the
exact attention on the site's example operands (cosine is reported too). The keep sets grow with
τ, so the error falls as τ rises and bisection needs ~log2(len(ladder)) sparse runs.
:func:`site_choice` turns the answer into the site's decision next to the exact choice:

* the site stays dense when the sparse kernel cannot run it (reasons from ``supports``), when it
  needs gradients (the gate measures forward outputs), when no τ meets the budget, or when the
  τ that does keeps every block;
* otherwise the configured kernel (``sparse:tau=...``) runs it if it is faster than the best
  exact kernel: timed on the site's activations (prediction included) when tuning is on, else
  by the cost model (the dense profile scaled by the realised density, plus the prediction).

The sparse candidate joins the site's candidates with ``accuracy`` = τ, density, relative L1 and
cosine, which ``explain()`` prints.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..kernels.reference import NO_WINDOW, attention_forward

# The τ ladder the gate searches, sparsest first.
TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
# Prediction's share of a dense run, for the cost model (benchmarks/bench_sparse.py measures it).
PREDICT_SHARE = 0.05


def _metrics(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L1 Σ|o − r| / Σ|r|, cosine) in fp64 over finite entries."""
    o, r = out.detach().double().flatten(), ref.detach().double().flatten()
    ok = torch.isfinite(o) & torch.isfinite(r)
    o, r = o[ok], r[ok]
    rel = float((o - r).abs().sum() / r.abs().sum().clamp_min(1e-30))
    cos = float(torch.nn.functional.cosine_similarity(o, r, dim=0)) if o.numel() else 1.0
    return rel, cos


@dataclass
class TauChoice:
    """The gate's answer: ``tau`` (None: the site stays dense, ``reason`` says why) with the
    realised block ``density`` and the output's ``rel_l1`` and ``cosine`` against the exact
    attention; ``tried`` lists every τ measured."""

    tau: Optional[float]
    density: float
    rel_l1: float
    cosine: float
    reason: str
    tried: list = field(default_factory=list)

    def numbers(self) -> dict[str, float]:
        return {"tau": self.tau if self.tau is not None else float("nan"),
                "density": self.density, "rel_l1": self.rel_l1, "cosine": self.cosine}


def tune_tau(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: Optional[torch.Tensor] = None, *, scale: Optional[float] = None,
             causal: str = "none", window: tuple[int, int] = NO_WINDOW,
             mask_fill: float = float("-inf"), max_rel_l1: float = 0.05,
             taus: tuple[float, ...] = TAUS, block: Any = None,
             exact: Optional[torch.Tensor] = None) -> TauChoice:
    """The sparsest τ of ``taus`` whose output stays within ``max_rel_l1`` of ``exact`` (default:
    the fp32 reference) on these operands. A τ that keeps every block is no saving: the site
    then stays dense, as it does when no τ meets the budget."""
    from ..kernels import sparse, sparse_predict
    if not max_rel_l1 >= 0.0:
        raise ValueError(f"max_rel_l1: expected a non-negative budget, got {max_rel_l1!r}")
    taus = tuple(sorted(float(t) for t in taus))
    if not taus or not all(0.0 < t <= 1.0 for t in taus):
        raise ValueError(f"taus: expected thresholds in (0, 1], got {taus!r}")
    tried: dict[float, dict] = {}
    with torch.no_grad():
        if exact is None:
            rmask = mask if mask is None or mask.dtype == torch.bool else mask.float()
            exact, _ = attention_forward(q.float(), k.float(), v.float(), rmask, scale, causal,
                                         mask_fill, window=window)

        def passes(tau: float) -> bool:
            layout = sparse_predict.predict(q, k, tau, causal=causal, window=window, scale=scale,
                                            block=block, mask=mask, mask_fill=mask_fill)
            out, _ = sparse.sparse_forward(q, k, v, layout, mask, scale, causal, mask_fill,
                                           window)
            rel, cos = _metrics(out, exact)
            tried[tau] = {"tau": tau, "density": layout.density(), "rel_l1": rel,
                          "cosine": cos}
            return rel <= max_rel_l1

        lo, hi = -1, len(taus)  # taus[lo] fails (or lo = -1); taus[hi] passes (or hi = len)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if passes(taus[mid]):
                hi = mid
            else:
                lo = mid
    order = [tried[t] for t in sorted(tried)]
    if hi == len(taus):
        r = tried[taus[-1]]
        return TauChoice(None, r["density"], r["rel_l1"], r["cosine"],
                         f"no τ up to {taus[-1]} keeps rel L1 <= {max_rel_l1} (τ={taus[-1]}: "
                         f"rel L1 {r['rel_l1']:.4f}, density {r['density']:.3f})", order)
    r = tried[taus[hi]]
    if r["density"] >= 1.0:
        return TauChoice(None, 1.0, r["rel_l1"], r["cosine"],
                         f"no block can be skipped within rel L1 {max_rel_l1} (τ={r['tau']:g} "
                         "keeps them all)", order)
    return TauChoice(r["tau"], r["density"], r["rel_l1"], r["cosine"],
                     f"τ={r['tau']:g}: density {r['density']:.3f}, rel L1 {r['rel_l1']:.4f} "
                     f"<= {max_rel_l1}, cosine {r['cosine']:.5f}", order)


def site_choice(choice: Any, problem: Any, q: Any, k: Any, v: Any, mask: Any,
                values: Optional[Callable[[], tuple]], *, max_rel_l1: float = 0.05,
                every: int = 1, tune: Optional[bool] = None) -> Any:
    """``choice`` (the exact policy's :class:`~attnfuse.tune.select.Choice` for the site) with the
    sparse candidate added, and chosen when the gate admits it and it is faster."""
    from ..kernels import registry, sparse_predict
    from ..report import Candidate
    from . import select
    cand = Candidate("sparse")
    cand.reasons = registry.rejections(
        "sparse", q, k, v, mask, problem.causal, window=problem.window,
        dropout_p=problem.dropout_p, softcap=problem.softcap, mask_fill=problem.mask_fill,
        mask_grad=problem.mask_grad, source=problem.source)
    if problem.facts.training:
        cand.reasons.append("inference only under policy='sparse': the gate measures outputs, "
                            "a site that needs gradients runs dense")
    if values is None and not cand.reasons:
        cand.reasons.append("no example activations to tune τ on: pass example_inputs")
    result = None
    if not cand.reasons:
        try:
            qv, kv, vv, mv = values()
            mv = None if mv is None else mv[(None,) * (4 - mv.dim())]
            result = tune_tau(qv, kv, vv, mv, scale=problem.scale, causal=problem.causal,
                              window=problem.window, mask_fill=problem.mask_fill,
                              max_rel_l1=max_rel_l1)
        except Exception as e:  # a kernel that cannot be measured is not admitted
            cand.reasons.append(f"could not be measured on the site's activations: {e!r}")
    if result is not None:
        cand.accuracy = result.numbers()
        if result.tau is None:
            cand.reasons.append(f"sparse gate on this site's activations: {result.reason}")
    candidates = [*choice.candidates, cand]
    if cand.reasons:
        return dataclasses.replace(choice, candidates=candidates)
    config = sparse_predict.SparseConfig(result.tau, every, site=sparse_predict.new_site()
                                         if every > 1 else "")
    cand.kernel = config.name()
    dense = next((c for c in choice.candidates if c.kernel == choice.kernel), None)
    dense_ms = None if dense is None else (dense.measured_ms if dense.measured_ms is not None
                                           else dense.predicted_ms)
    if select.should_tune(problem, tune) and dense is not None and dense.measured_ms is not None:
        # Timed like the exact candidates, on the site's own operands (the density is theirs),
        # predicting every call (reuse would time the cheap path).
        qv, kv, vv, mv = values()
        mv = None if mv is None else mv[(None,) * (4 - mv.dim())]
        timed = registry.get(sparse_predict.SparseConfig(result.tau).name())
        cand.measured_ms = 1e3 * select._bench(
            lambda: timed.forward(qv, kv, vv, mv, problem.scale, problem.causal,
                                  problem.mask_fill, 0.0, problem.window),
            torch.device(problem.device))
        sparse_ms = cand.measured_ms
    else:
        sparse_ms = cand.predicted_ms = 1e3 * select.predict(problem, "sparse") * (
            result.density + PREDICT_SHARE)
    if dense_ms is not None and sparse_ms >= dense_ms:
        return dataclasses.replace(choice, candidates=candidates)
    versus = f" ({sparse_ms:.3g} ms vs {choice.kernel} {dense_ms:.3g} ms)" if dense_ms else ""
    return select.Choice(cand.kernel, f"block-sparse, {result.reason}{versus}", candidates,
                         choice.cache)
