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

PyTorch's SDPA backends (``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_math``,
``kernels/sdpa.py``) are registered too, with ``runs="sdpa"``: a site that picks one becomes a
pinned SDPA call, not an ``attnfuse::attention`` op. Each kernel carries its cost
:class:`~attnfuse.tune.cost.Profile`; ``attnfuse/tune`` ranks the candidates with it, times the
best few and remembers the winner. :func:`select` (the first supported op kernel in a fixed
order) remains for ``kernel="auto"`` inside the op itself.

A kernel with a ``configure`` hook takes parameters in its name: ``get("sparse:tau=0.9")`` is the
block-sparse kernel configured by ``sparse_predict.SparseConfig``; the name travels through the
rewritten graph like any other.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..tune.cost import Profile
from . import reference, sdpa

log = logging.getLogger(__name__)


FEATURES = ("window", "dropout", "softcap")


@dataclass(frozen=True)
class Kernel:
    name: str
    exact: bool
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[Any, ...]]
    supports: Callable[..., list[str]]
    summary: str
    features: frozenset = frozenset()
    profile: Profile = Profile(matmul=0.5, exp=0.3, bwd_matmul=0.4)
    runs: str = "op"                 # "op": inside attnfuse::attention; "sdpa": a pinned SDPA call
    auto: tuple[str, ...] = ("cuda", "cpu")  # device types where the selector may choose it
    # Parametrised kernels: "name:params" is configure(params), a Kernel of its own.
    configure: Optional[Callable[[str], "Kernel"]] = None
    # forward/backward without the kernel's own operand check, for callers that just had
    # ``rejections`` (``select``) pass these operands: the op calls them, saving a second check
    # per call. None: forward/backward check anyway.
    forward_selected: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None
    backward_selected: Optional[Callable[..., tuple[Any, ...]]] = None


def _needs(window: tuple[int, int], dropout_p: float, softcap: float = 0.0) -> list[str]:
    """The optional features a call with these arguments uses."""
    needs = []
    if tuple(window) != reference.NO_WINDOW:
        needs.append("window")
    if dropout_p > 0:
        needs.append("dropout")
    if softcap:
        needs.append("softcap")
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

    # H100 priors (benchmarks/RESULTS.md): ~480 TFLOP/s forward at D=128 and ~0.4 of the exp
    # ceiling at D=64; the two-kernel backward computes P twice. On CPU it runs only through the
    # Triton interpreter (tests), so it is never chosen there unless forced.
    return Kernel("flash", True, flash.flash_forward, flash.flash_backward, flash.supports,
                  "Triton FlashAttention-2, forward and backward", frozenset(FEATURES),
                  Profile(matmul=0.60, exp=0.39, bwd_matmul=0.64, recompute=2,
                          row_broadcast_mask=True, host_fwd_us=250, host_bwd_us=600),
                  auto=("cuda",),
                  forward_selected=functools.partial(flash.flash_forward, operands_checked=True),
                  backward_selected=functools.partial(flash.flash_backward,
                                                      operands_checked=True))


def _sage() -> dict[str, Kernel]:
    """The quantized kernels (not exact: only under policy="fast", after the accuracy gate)."""
    try:
        from . import sage
    except ImportError as e:  # triton missing
        log.info("sage kernel unavailable: %s", e)
        return {}

    def make(pv: str) -> Kernel:
        def forward(q, k, v, mask, scale, causal, mask_fill, softcap=0.0,
                    window=reference.NO_WINDOW, dropout_p=0.0, seed=None):
            return sage.sage_forward(q, k, v, mask, scale, causal, mask_fill, pv)

        def backward(*args: Any, **kwargs: Any) -> Any:
            raise ValueError(f"sage_{pv} is inference only: it has no backward; a site that "
                             f"needs gradients runs on an exact kernel (kernel='flash')")

        summary = (f"Triton SageAttention-style: INT8 Q·Kᵀ (K smoothed), "
                   f"{'FP8 e4m3' if pv == 'fp8' else 'FP16'} P·V; inference only")
        # The SageAttention2 paper reports ~900 TOPS on an H100: INT8/FP8 dots at twice the
        # bf16 rate, bound by the exponentials at D <= 128; plus the quantization passes.
        profile = Profile(matmul=1.1 if pv == "fp8" else 0.8, exp=0.45, bwd_matmul=0.5,
                          launches_fwd=4, host_fwd_us=300, row_broadcast_mask=True)
        return Kernel(f"sage_{pv}", False, forward, backward,
                      functools.partial(_sage_supports, sage, pv), summary, frozenset(), profile,
                      auto=("cuda",))

    return {"sage_fp8": make("fp8"), "sage_fp16": make("fp16")}


def _sage_supports(sage: Any, pv: str, q: Any, k: Any, v: Any, mask: Any, causal: str) -> list[str]:
    return sage.supports(q, k, v, mask, causal, pv)


def _sparse() -> dict[str, Kernel]:
    """The block-sparse kernel (not exact: only under policy="sparse", after its τ gate).
    ``"sparse"`` predicts its block mask with τ = 0.95; ``"sparse:tau=0.9,..."`` names a
    configured one (``sparse_predict.SparseConfig``)."""
    try:
        from . import sparse_predict
    except ImportError as e:  # triton missing
        log.info("sparse kernel unavailable: %s", e)
        return {}

    def configure(params: str) -> Kernel:
        config = sparse_predict.SparseConfig.parse(params)
        # Priors: flash's efficiency on the visited blocks (the density scales the work) and
        # three launches (pooling, selection, attention).
        reuse = f", re-estimated every {config.every} calls" if config.every > 1 else ""
        return Kernel(config.name(), False,
                      functools.partial(sparse_predict.kernel_forward, config),
                      functools.partial(sparse_predict.kernel_backward, config),
                      sparse_predict.sparse.supports,
                      f"Triton block-sparse attention, block mask predicted from pooled Q·Kᵀ "
                      f"(τ={config.tau:g}{reuse})", frozenset({"window"}),
                      Profile(matmul=0.55, exp=0.36, bwd_matmul=0.6, recompute=2, launches_fwd=3,
                              launches_bwd=5, row_broadcast_mask=True, host_fwd_us=300,
                              host_bwd_us=700),
                      auto=())

    return {"sparse": dataclasses.replace(configure(""), name="sparse",
                                          configure=functools.lru_cache(maxsize=256)(configure))}


# SDPA backends' priors, measured on an H100 (benchmarks/RESULTS.md): cuDNN ~610 TFLOP/s
# forward and ~525 backward at D=128, FA2 ~341/300, memory-efficient ~172; the math backend
# materialises scores.
_SDPA_PROFILES = {
    "sdpa_cudnn": Profile(matmul=0.77, exp=0.43, bwd_matmul=0.66, launches_bwd=2, host_fwd_us=30),
    "sdpa_flash": Profile(matmul=0.43, exp=0.29, bwd_matmul=0.38, launches_bwd=2),
    "sdpa_efficient": Profile(matmul=0.215, exp=0.13, bwd_matmul=0.2, block_m=64,
                              launches_bwd=2, row_broadcast_mask=True),
    "sdpa_math": Profile(matmul=0.7, exp=0.3, bwd_matmul=0.6, launches_fwd=5, launches_bwd=10,
                         skips_band=False, materializes=True, host_fwd_us=60, host_bwd_us=120),
}


def _sdpa_kernels() -> dict[str, Kernel]:
    def unusable(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("SDPA kernels run as pinned F.scaled_dot_product_attention calls "
                         "(attnfuse.kernels.sdpa.call), not inside attnfuse::attention")

    return {name: Kernel(name, True, unusable, unusable, functools.partial(sdpa.supports, name),
                         sdpa.SUMMARIES[name], frozenset(), _SDPA_PROFILES[name], runs="sdpa")
            for name in sdpa.BACKENDS}


def _build() -> dict[str, Kernel]:
    # The reference upcasts to fp32 and materialises fp32 scores chunk by chunk.
    kernels = {"reference": Kernel(
        "reference", True, _reference_forward, _reference_backward,
        _reference_supports, "exact PyTorch math, fp32 accumulation, chunked over queries",
        frozenset(FEATURES), Profile(matmul=0.5, exp=0.3, bwd_matmul=0.4, launches_fwd=8,
                                     launches_bwd=16, skips_band=False, materializes=True,
                                     passes_fwd=6, passes_bwd=12, compute_fp32=True,
                                     host_fwd_us=300, host_bwd_us=600))}
    fl = _flash()
    if fl is not None:
        kernels["flash"] = fl
    kernels.update(_sage())
    kernels.update(_sparse())
    kernels.update(_sdpa_kernels())
    return kernels


KERNELS: dict[str, Kernel] = _build()

# The order op kernels are tried in by kernel="auto" inside the op (the rewrite and
# attnfuse.attention choose with the cost model instead); the first that supports the inputs wins.
PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("flash", "reference"), "cpu": ("reference",)}


def kernel_names() -> tuple[str, ...]:
    return ("auto", *KERNELS)


def accuracy_misses(name: str, q: Any, training: bool = True) -> list[str]:
    """Kernels that are exact by construction but measured outside FlashAttention's error-ratio
    rule on some inputs; the selector does not choose them there (forcing still works)."""
    device = torch.device(q.device).type
    if name == "flash" and device == "cuda" and q.dtype == torch.float32:
        # Measured on the H100 (benchmarks/RESULTS.md): fp32 dk/dv miss the rule.
        return ["float32 on CUDA misses FlashAttention's accuracy rule for dk/dv"]
    if name == "sdpa_flash" and device == "cpu" and training and q.dtype == torch.float32:
        # Measured in tests: its fp32 GQA gradients miss the rule (3.3x eager's error).
        return ["float32 gradients of PyTorch's CPU flash kernel miss FlashAttention's "
                "accuracy rule"]
    return []


def is_sdpa(name: str) -> bool:
    """Whether kernel ``name`` runs as a pinned SDPA call rather than inside the op."""
    return name in KERNELS and KERNELS[name].runs == "sdpa"


def source_files() -> tuple[str, ...]:
    """The files whose code decides what the kernels compute and cost (the cache key's hash)."""
    import pathlib
    here = pathlib.Path(__file__).resolve().parent
    files = sorted(str(p) for p in here.glob("*.py"))
    return (*files, str(here.parent / "tune" / "cost.py"))


def candidates(device_type: str) -> tuple[str, ...]:
    """The kernels the selector may choose on this device type (all exact so far)."""
    return tuple(n for n, k in KERNELS.items() if device_type in k.auto)


def known(name: str) -> bool:
    """Whether ``name`` is a registered kernel or a configured one (``"sparse:tau=0.9"``)."""
    base, sep, _ = name.partition(":")
    return name in KERNELS or bool(sep and base in KERNELS and KERNELS[base].configure)


def get(name: str) -> Kernel:
    base, sep, params = name.partition(":")
    if name not in KERNELS and sep and base in KERNELS and KERNELS[base].configure is not None:
        return KERNELS[base].configure(params)
    if name not in KERNELS:
        if name == "flash":
            raise ValueError("kernel='flash' needs triton (pip install triton); it is not importable here")
        raise ValueError(f"unknown kernel {name!r}: expected one of {kernel_names()}")
    return KERNELS[name]


_FEATURE_WORDS = {"window": "sliding windows", "dropout": "dropout", "softcap": "soft-capping"}


def rejections(name: str, q: Any, k: Any, v: Any, mask: Any, causal: str, *,
               window: tuple[int, int] = reference.NO_WINDOW, dropout_p: float = 0.0,
               softcap: float = 0.0, mask_fill: float = -math.inf, mask_grad: bool = False,
               source: str = "eager_softmax") -> list[str]:
    """Why kernel ``name`` cannot run these (possibly fake) tensors with this window, dropout,
    soft-cap and mask fill; empty when it can. ``source`` is what the site was in the model
    (``"sdpa"`` for an SDPA call, whose mask semantics SDPA backends keep)."""
    kernel = get(name)
    if kernel.runs == "sdpa":
        return kernel.supports(q, k, v, mask, causal, window=window, dropout_p=dropout_p,
                               softcap=softcap, mask_fill=mask_fill, mask_grad=mask_grad,
                               source=source)
    reasons = list(kernel.supports(q, k, v, mask, causal))
    for need in _needs(window, dropout_p, softcap):
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
    if prefer is not None and prefer in KERNELS and KERNELS[prefer].runs != "op":
        return prefer, {n: ["not an attnfuse::attention kernel"] for n in order}
    if prefer is not None and prefer != "auto":
        order = (prefer, *[n for n in order if n != prefer])
    rejected: dict[str, list[str]] = {}
    for name in order:
        if not known(name):
            rejected[name] = ["not available in this installation (triton missing)"]
            continue
        reasons = rejections(name, q, k, v, mask, causal, window=window, dropout_p=dropout_p)
        if name != prefer:
            reasons += accuracy_misses(name, q)
        if not reasons:
            return name, rejected
        rejected[name] = reasons
    return "reference", rejected
