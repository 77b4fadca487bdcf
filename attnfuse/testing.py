"""Accuracy rules shared by the tests and the GPU benchmark.

FlashAttention's rule: a kernel's error against an fp32 (fp64 for fp32 inputs) reference may be at
most twice the error of PyTorch's own math in the input precision, plus a floor of rounding noise.
Tolerances therefore come from data, never from hand-picked constants.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the oracle computes in for inputs of ``dtype``: fp64 for fp32/fp64, else fp32."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def ulp_noise(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """FlashAttention's floor: twice the rounding noise of ``x + 0.3 - 0.3`` in ``dtype``."""
    if not ref.numel():
        return 0.0
    low = ref.to(dtype)
    return 2.0 * ((low + 0.3 - 0.3) - low).abs().max().item()


@dataclass(frozen=True)
class ErrorRatio:
    name: str
    err: float          # max |out - ref|
    baseline: float     # max |lowp - ref|
    floor: float

    @property
    def ok(self) -> bool:
        return self.err <= 2.0 * self.baseline + self.floor

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{self.name}: err {self.err:.3g} vs 2x torch {self.baseline:.3g} "
                f"+ floor {self.floor:.3g} [{verdict}]")


def error_ratio(name: str, out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor,
                *, magnitude_floor: bool = False) -> ErrorRatio:
    """Compare ``out`` (kernel) and ``lowp`` (torch math in the input dtype) with ``ref``.

    Non-finite entries must agree in position (a NaN where the reference has a number fails).
    ``magnitude_floor``: the floor is the rounding unit at the reference's largest magnitude
    (``2·eps·max|ref|``) instead of at 0.3; for whole-model gradients, whose entries reach tens
    and whose eager error is itself only rounding noise.
    """
    out64, ref64, low64 = (t.detach().to(torch.float64) for t in (out, ref, lowp))
    finite = torch.isfinite(ref64)
    if not torch.equal(torch.isfinite(out64), finite):
        return ErrorRatio(name, float("inf"), 0.0, 0.0)
    if not finite.any():
        return ErrorRatio(name, 0.0, 0.0, 0.0)
    err = (out64 - ref64)[finite].abs().max().item()
    base = (low64 - ref64)[finite].abs().nan_to_num(0.0).max().item()
    floor = ulp_noise(ref64[finite], out.dtype)
    if magnitude_floor:
        floor = max(floor, 2.0 * torch.finfo(out.dtype).eps * ref64[finite].abs().max().item())
    return ErrorRatio(name, err, base, floor)


def assert_error_ratio(name: str, out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor,
                       *, magnitude_floor: bool = False) -> None:
    r = error_ratio(name, out, ref, lowp, magnitude_floor=magnitude_floor)
    if not r.ok:
        raise AssertionError(str(r))


def gradient_error_ratio(got: torch.Tensor, want: torch.Tensor, ref: torch.Tensor,
                         wrt: Sequence[torch.Tensor], ref_wrt: Sequence[torch.Tensor],
                         cotangent: torch.Tensor) -> ErrorRatio:
    """The rule for a whole model's gradients: the gradients of ``got`` (the rewritten model),
    ``want`` (eager) and ``ref`` (an fp64 copy) w.r.t. ``wrt`` / ``ref_wrt`` under one cotangent,
    judged as one concatenated vector with the magnitude floor.

    As one vector, a tensor whose true gradient is 0 (a key bias, to which softmax is invariant)
    is measured against the gradient's own scale. A gradient where eager has none must be zero.
    """
    g_want = torch.autograd.grad(want, wrt, cotangent, allow_unused=True, retain_graph=True)
    g_got = torch.autograd.grad(got, wrt, cotangent, allow_unused=True)
    g_ref = torch.autograd.grad(ref, ref_wrt, cotangent.to(ref.dtype), allow_unused=True)
    for a, b in zip(g_got, g_want):
        if b is None and a is not None and a.any():
            return ErrorRatio("gradients (nonzero where eager has none)", math.inf, 0.0, 0.0)
    zero = lambda t, like: t if t is not None else torch.zeros_like(like)  # noqa: E731
    flat = [(zero(a, b), b, zero(r, b)) for a, b, r in zip(g_got, g_want, g_ref) if b is not None]
    got_v, want_v, ref_v = (torch.cat([t[i].flatten() for t in flat]) for i in range(3))
    return error_ratio("gradients", got_v, ref_v, want_v, magnitude_floor=True)
