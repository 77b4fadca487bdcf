"""One registry of attention kernels: what each supports (with reasons) and in what order to try them.

A kernel is a forward ``(q, k, v, mask, scale, causal, mask_fill, softcap, window, dropout_p,
seed) -> (out, lse)`` and a backward ``(dout, q, k, v, mask, out, lse, scale, causal, mask_fill,
mask_grad, softcap, window, dropout_p, seed) -> (dq, dk, dv, dmask)`` on the tensors of
``reference.py``'s legend, plus ``supports(q, k, v, mask, causal) -> [reasons]`` and the set of
optional ``features`` it implements (``"window"``, ``"dropout"``). ``supports`` also accepts fake
tensors, so the rewrite pass asks it at compile time.

``window`` is ``(left, right)`` (-1 = unbounded), ``seed`` an int64 tensor of shape [1] on q's
device that determines the dropout keep-mask; forward and backward must be given the same seed.
Each kernel draws its mask from the seed its own way: the reference with torch's generator
(:func:`reference_keep_mask`), flash with an in-kernel Philox stream. One seed therefore gives
different masks on the two kernels, each reproducible on its own.

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


FEATURES = ("window", "dropout")


@dataclass(frozen=True)
class Kernel:
    name: str
    exact: bool
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[Any, ...]]
    supports: Callable[..., list[str]]
    summary: str
    features: frozenset = frozenset()


def _needs(window: tuple[int, int], dropout_p: float) -> list[str]:
    """The optional features a call with these arguments uses."""
    needs = []
    if tuple(window) != reference.NO_WINDOW:
        needs.append("window")
    if dropout_p > 0:
        needs.append("dropout")
    return needs


def _reference_supports(q: Any, k: Any, v: Any, mask: Any, causal: str) -> list[str]:
    return []


def reference_keep_mask(q: torch.Tensor, k: torch.Tensor, dropout_p: float,
                        seed: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The reference kernel's dropout keep-mask [B, Hq, Nq, Nk] (True = kept) for ``seed``.

    Drawn with a generator seeded from ``seed`` on q's device, so the same seed gives the same
    mask in the forward, in the backward and across runs. None when no mask is needed
    (``dropout_p`` 0 or 1)."""
    if not 0.0 < dropout_p < 1.0:
        return None
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed: an int64 tensor of shape [1] on q's device")
    gen = torch.Generator(device=q.device).manual_seed(int(seed.reshape(-1)[0]))
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.rand(shape, generator=gen, device=q.device) >= dropout_p


def _reference_forward(q, k, v, mask, scale, causal, mask_fill, softcap, window=reference.NO_WINDOW,
                       dropout_p=0.0, seed=None):
    keep = reference_keep_mask(q, k, dropout_p, seed)
    return reference.attention_forward(q, k, v, mask, scale, causal, mask_fill, softcap,
                                       window=window, dropout_p=dropout_p, dropout_mask=keep)


def _reference_backward(dout, q, k, v, mask, out, lse, scale, causal, mask_fill, mask_grad,
                        softcap, window=reference.NO_WINDOW, dropout_p=0.0, seed=None):
    keep = reference_keep_mask(q, k, dropout_p, seed)
    return reference.attention_backward(dout, q, k, v, mask, out, lse, scale, causal, mask_fill,
                                        mask_grad, softcap, window=window, dropout_p=dropout_p,
                                        dropout_mask=keep)


def _flash() -> Optional[Kernel]:
    try:
        from . import flash
    except ImportError as e:  # triton missing (e.g. macOS, Windows)
        log.info("flash kernel unavailable: %s", e)
        return None

    return Kernel("flash", True, flash.flash_forward, flash.flash_backward, flash.supports,
                  "Triton FlashAttention-2, forward and backward", frozenset(FEATURES))


def _build() -> dict[str, Kernel]:
    kernels = {"reference": Kernel(
        "reference", True, _reference_forward, _reference_backward,
        _reference_supports, "exact PyTorch math, fp32 accumulation, chunked over queries",
        frozenset(FEATURES))}
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


_FEATURE_WORDS = {"window": "sliding windows", "dropout": "dropout"}


def rejections(name: str, q: Any, k: Any, v: Any, mask: Any, causal: str, *,
               window: tuple[int, int] = reference.NO_WINDOW,
               dropout_p: float = 0.0) -> list[str]:
    """Why kernel ``name`` cannot run these (possibly fake) tensors with this window and dropout;
    empty when it can."""
    kernel = get(name)
    reasons = list(kernel.supports(q, k, v, mask, causal))
    for need in _needs(window, dropout_p):
        if need not in kernel.features:
            reasons.append(f"{_FEATURE_WORDS[need]} not implemented by this {name} kernel")
    return reasons


def select(q: Any, k: Any, v: Any, mask: Any, causal: str,
           prefer: Optional[str] = None, *, window: tuple[int, int] = reference.NO_WINDOW,
           dropout_p: float = 0.0) -> tuple[str, dict[str, list[str]]]:
    """Pick a kernel for these tensors: ``(name, {rejected kernel: reasons})``.

    ``prefer`` (a kernel name) is tried first; otherwise the device's preference order applies.
    ``window``/``dropout_p``: a kernel that lacks the feature they need is rejected.
    """
    order = PREFERENCE.get(torch.device(q.device).type, ("reference",))
    if prefer is not None and prefer != "auto":
        order = (prefer, *[n for n in order if n != prefer])
    rejected: dict[str, list[str]] = {}
    for name in order:
        if name not in KERNELS:
            rejected[name] = ["not available in this installation (triton missing)"]
            continue
        reasons = rejections(name, q, k, v, mask, causal, window=window, dropout_p=dropout_p)
        if (name == "flash" and prefer != "flash" and q.dtype == torch.float32
                and torch.device(q.device).type == "cuda"):
            # Measured on the H100 (benchmarks/RESULTS.md): fp32 dv misses the error-ratio rule.
            reasons.append("float32 on CUDA misses FlashAttention's accuracy rule for dv in the "
                           "benchmark; the exact reference runs fp32 until that is fixed")
        if not reasons:
            return name, rejected
        rejected[name] = reasons
    return "reference", rejected
