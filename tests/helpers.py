"""Shared checks for rewrite tests: which sites fused, equal outputs and gradients, chain gone."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import copy

import torch

import attnfuse
from attnfuse.testing import assert_error_ratio, gradient_error_ratio
from attnfuse.passes import canonicalize as C


def softmax_count(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if C.read(n, C.softmax) is not None)


def fused_op_count(gm: torch.fx.GraphModule) -> int:
    """Fused ops in the graph: the attnfuse op, pinned SDPA calls, and lowered multi-head attention
    calls (one fused call inside each)."""
    from attnfuse.kernels import sdpa
    from attnfuse.passes.lower import LOWERINGS
    fused = (*LOWERINGS.values(), sdpa.call, torch.ops.attnfuse.attention.default)
    return sum(1 for n in gm.graph.nodes if n.target in fused)


def check_rewrite(model: torch.nn.Module, inputs: Sequence[Any], *, fused: int, kept: int = 0,
                  grad: bool = True, inner: str = "eager", kernel: Optional[str] = None,
                  out_of: Callable[[Any], torch.Tensor] = lambda o: o,
                  keep_sdpa: bool = True) -> attnfuse.Report:
    """Optimize ``model`` and assert the report, the graph, outputs and gradients."""
    fast = attnfuse.optimize(model, inner=inner, kernel=kernel, keep_sdpa=keep_sdpa)
    params = [p for p in model.parameters() if p.requires_grad]
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    for x in leaves:
        x.requires_grad_(grad)
    want = out_of(model(*inputs))
    got = out_of(fast(*inputs))
    report = fast.attnfuse_report
    assert len(report.fused) == fused, str(report)
    assert len(report.kept) == kept, str(report)
    after_softmax = sum(softmax_count(g) for g in report.after)
    before_softmax = sum(softmax_count(g) for g in report.before)
    eager_fused = sum(1 for s in report.fused if s.pattern == "eager_softmax")
    assert after_softmax == before_softmax - eager_fused, report.diff()
    assert sum(fused_op_count(g) for g in report.after) == sum(
        1 for s in report.fused if s.kernel != "sdpa"), report.diff()
    # FlashAttention's rule at model level: the fused model's error against an fp64 copy of the
    # model may be at most twice the eager model's own error, plus rounding noise.
    ref_model = copy.deepcopy(model).double()
    ref_inputs = [x.detach().double().requires_grad_(grad) if isinstance(x, torch.Tensor)
                  and x.is_floating_point() else x for x in inputs]
    ref = out_of(ref_model(*ref_inputs))
    assert_error_ratio("output", got, ref, want)
    if grad:
        cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(0), dtype=want.dtype)
        ref_wrt = [p for p in ref_model.parameters() if p.requires_grad] + [
            x for x in ref_inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
        r = gradient_error_ratio(got, want, ref, params + leaves, ref_wrt, cot)
        assert r.ok, str(r)
    return report
