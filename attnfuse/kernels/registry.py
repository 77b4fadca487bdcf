"""One registry of attention kernels: what each supports (with reasons) and in what order to try them.

A kernel is a forward ``(q, k, v, mask, scale, causal, mask_fill, softcap) -> (out, lse)`` and a
backward ``(dout, q, k, v, mask, out, lse, scale, causal, mask_fill, mask_grad, softcap) ->
(dq, dk, dv, dmask)`` on
the tensors of ``reference.py``'s legend, plus ``supports(q, k, v, mask, causal) -> [reasons]``.
``supports`` also accepts fake tensors, so the rewrite pass asks it at compile time.

Selection (v0): the first kernel in the device's preference order whose ``supports`` is empty.
The cost model and autotuner that replace the fixed order live in ``attnfuse/tune`` (planned).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import reference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernel:
    name: str
    exact: bool
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[Any, ...]]
    supports: Callable[..., list[str]]
    summary: str


def _reference_supports(q: Any, k: Any, v: Any, mask: Any, causal: str) -> list[str]:
    return []


def _flash() -> Optional[Kernel]:
    try:
        from . import flash
    except ImportError as e:  # triton missing (e.g. macOS, Windows)
        log.info("flash kernel unavailable: %s", e)
        return None
    return Kernel("flash", True, flash.flash_forward, flash.flash_backward, flash.supports,
                  "Triton FlashAttention-2, forward and backward")


def _build() -> dict[str, Kernel]:
    kernels = {"reference": Kernel(
        "reference", True, reference.attention_forward, reference.attention_backward,
        _reference_supports, "exact PyTorch math, fp32 accumulation, chunked over queries")}
    fl = _flash()
    if fl is not None:
        kernels["flash"] = fl
    return kernels


KERNELS: dict[str, Kernel] = _build()

# The order kernels are tried in, per device type; the first that supports the inputs wins.
PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("flash", "reference"), "cpu": ("reference",)}


def kernel_names() -> tuple[str, ...]:
    return ("auto", *KERNELS)


def get(name: str) -> Kernel:
    if name not in KERNELS:
        if name == "flash":
            raise ValueError("kernel='flash' needs triton (pip install triton); it is not importable here")
        raise ValueError(f"unknown kernel {name!r}: expected one of {kernel_names()}")
    return KERNELS[name]


def rejections(name: str, q: Any, k: Any, v: Any, mask: Any, causal: str) -> list[str]:
    """Why kernel ``name`` cannot run these (possibly fake) tensors; empty when it can."""
    return list(get(name).supports(q, k, v, mask, causal))


def select(q: Any, k: Any, v: Any, mask: Any, causal: str,
           prefer: Optional[str] = None) -> tuple[str, dict[str, list[str]]]:
    """Pick a kernel for these tensors: ``(name, {rejected kernel: reasons})``.

    ``prefer`` (a kernel name) is tried first; otherwise the device's preference order applies.
    """
    order = PREFERENCE.get(torch.device(q.device).type, ("reference",))
    if prefer is not None and prefer != "auto":
        order = (prefer, *[n for n in order if n != prefer])
    rejected: dict[str, list[str]] = {}
    for name in order:
        if name not in KERNELS:
            rejected[name] = ["not available in this installation (triton missing)"]
            continue
        reasons = rejections(name, q, k, v, mask, causal)
        if (name == "flash" and prefer != "flash" and q.dtype == torch.float32
                and torch.device(q.device).type == "cuda"):
            # Measured on the H100 (benchmarks/RESULTS.md): fp32 dv misses the error-ratio rule.
            reasons.append("float32 on CUDA misses FlashAttention's accuracy rule for dv in the "
                           "benchmark; the exact reference runs fp32 until that is fixed")
        if not reasons:
            return name, rejected
        rejected[name] = reasons
    return "reference", rejected
