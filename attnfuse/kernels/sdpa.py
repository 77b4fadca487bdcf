"""PyTorch's own SDPA backends as attnfuse candidates, so a choice is never worse than they are.

``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient`` and ``sdpa_math`` run
``F.scaled_dot_product_attention`` pinned to one backend (``torch.nn.attention.sdpa_kernel``). A
site that chooses one becomes a call of :func:`call` in the graph: AOTAutograd traces through it to
that backend's aten op, whose derivative PyTorch owns, so training needs nothing from attnfuse.
They are not kernels of the ``attnfuse::attention`` op (they return no log-sum-exp it could use).

What they may run is stricter than what the backends accept, because a rewrite must keep the
model's function (and attnfuse's contract: a row with no key gives 0):

* a mask and a causal band not both (SDPA refuses them together);
* no sliding window, soft-capping or bottom-right causal band with Nq ≠ Nk (SDPA has none of
  them as arguments); no dropout (a different random stream; the site stays on flash or as it is);
* masks: a bool mask must fill with −inf (SDPA's meaning of False); an additive mask only where
  the site already was an SDPA call (additive ``finfo.min`` rows differ between backends, so an
  eager site keeps them on attnfuse's kernels, which follow eager); no mask gradient except on
  ``sdpa_math``; cuDNN takes no mask at all (non-zero fully-masked rows and NaN dQ on H100,
  pytorch#196678);
* on CUDA, PyTorch's own ``can_use_*_attention`` checks (dtype, head dim, alignment, GPU) must
  pass; on CPU only ``sdpa_flash`` (PyTorch's CPU flash kernel) and ``sdpa_math`` exist.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS: dict[str, SDPBackend] = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
SUMMARIES = {
    "sdpa_cudnn": "PyTorch SDPA, cuDNN backend",
    "sdpa_flash": "PyTorch SDPA, FlashAttention-2 backend (CPU: PyTorch's CPU flash kernel)",
    "sdpa_efficient": "PyTorch SDPA, memory-efficient (xFormers) backend",
    "sdpa_math": "PyTorch SDPA, math backend (materialises the scores)",
}
_CUDA_CHECKS = {
    "sdpa_cudnn": "can_use_cudnn_attention",
    "sdpa_flash": "can_use_flash_attention",
    "sdpa_efficient": "can_use_efficient_attention",
}


def call(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
         backend: str) -> Tensor:
    """``F.scaled_dot_product_attention`` on exactly one backend (GQA when heads differ; a
    symbolic head count is settled here, as SDPA takes a plain bool)."""
    gqa = bool(q.shape[1] != k.shape[1])
    with sdpa_kernel([BACKENDS[backend]]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=gqa)


def _torch_accepts(name: str, q: Any, k: Any, v: Any, mask: Any, causal: bool) -> bool:
    """PyTorch's own check for one CUDA backend (works on fake tensors)."""
    params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, causal, q.shape[1] != k.shape[1])
    return bool(getattr(torch.backends.cuda, _CUDA_CHECKS[name])(params, False))


def supports(name: str, q: Any, k: Any, v: Any, mask: Any, causal: str, *,
             window: tuple[int, int] = (-1, -1), dropout_p: float = 0.0, softcap: float = 0.0,
             mask_fill: float = -math.inf, mask_grad: bool = False,
             source: str = "eager_softmax") -> list[str]:
    """Why backend ``name`` cannot run this site unchanged; empty when it can."""
    reasons = []
    device = torch.device(q.device).type
    if device == "cpu" and name not in ("sdpa_flash", "sdpa_math"):
        reasons.append("a CUDA-only SDPA backend")
    elif device not in ("cpu", "cuda"):
        reasons.append(f"device {device} not supported")
    if tuple(window) != (-1, -1):
        reasons.append("SDPA has no sliding window")
    if softcap:
        reasons.append("SDPA has no soft-capping")
    if dropout_p:
        reasons.append("dropout: SDPA draws another random stream")
    if causal == "bottom_right" and q.shape[-2] != k.shape[-2]:
        reasons.append("SDPA's is_causal is top-left; bottom-right with Nq != Nk is not")
    elif causal not in ("none", "top_left", "bottom_right"):
        reasons.append(f"causal {causal!r} unknown")
    if mask is not None:
        if causal != "none":
            reasons.append("SDPA takes a mask or is_causal, not both")
        if name == "sdpa_cudnn":
            reasons.append("cuDNN with a mask gives non-zero fully-masked rows and NaN dQ "
                           "(pytorch#196678)")
        if mask.dtype == torch.bool and not (math.isinf(mask_fill) and mask_fill < 0):
            reasons.append(f"bool mask filled with {mask_fill:g}, SDPA fills with -inf")
        if mask.dtype != torch.bool and source != "sdpa":
            reasons.append("additive mask of an eager softmax: backends differ from eager on "
                           "finfo.min rows; kept on attnfuse's kernels, which follow eager")
        if mask_grad and name != "sdpa_math":
            reasons.append("mask gradient only on sdpa_math")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append("q, k, v dtypes differ")
    if name == "sdpa_flash" and device == "cpu" and any(
            t.shape[-1] > 1 and t.stride(-1) != 1 for t in (q, k, v)):
        reasons.append("PyTorch's CPU flash kernel needs unit last-dim strides")
    if reasons or device != "cuda" or name == "sdpa_math":
        return reasons
    m4 = None if mask is None else mask[(None,) * (4 - mask.dim())]
    try:
        ok = _torch_accepts(name, q, k, v, m4, causal != "none")
    except (RuntimeError, TypeError) as e:  # an unusual operand PyTorch's check itself rejects
        return [f"PyTorch's {_CUDA_CHECKS[name]} failed: {e}"]
    if not ok:
        reasons.append(f"torch.backends.cuda.{_CUDA_CHECKS[name]} says no (dtype, head dim, "
                       f"alignment, GQA or GPU)")
    return reasons
