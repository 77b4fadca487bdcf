"""``with attnfuse.sdpa_override(): ...``: eager ``F.scaled_dot_product_attention`` calls on
:func:`attnfuse.attention`.

A :class:`torch.overrides.TorchFunctionMode` sees every torch function call made while it is
active, including SDPA calls inside timm, diffusers (legacy processors and the ``native``
dispatcher backend) and transformers' ``"sdpa"`` implementation; nothing in
``torch.nn.functional`` is reassigned. Calls whose arguments attnfuse cannot take unchanged run
PyTorch's SDPA exactly as they would without the mode (with the reason logged once per mode).

Re-entrancy and nesting: while the mode handles a call it is off the mode stack (torch's rule),
and a thread-local flag makes every other ``sdpa_override`` in the stack leave SDPA calls made
by attnfuse itself alone (its ``sdpa_*`` kernels run SDPA pinned to one backend). SDPA calls
made inside ``torch.nn.attention.sdpa_kernel(...)`` opened within the region keep their
backend choice and run on SDPA. The innermost ``sdpa_override`` decides.

``torch.compile`` inside the region traces the mode: the compiled graph calls attnfuse's op
where the model called SDPA, and Dynamo guards on the mode, so the same function called
outside the region compiles again, without it.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import ops
from ..kernels import registry

log = logging.getLogger(__name__)

_SDPA = F.scaled_dot_product_attention
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_POSITIONAL = 6                    # scale and enable_gqa are keyword-only
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
             "enable_gqa": False}
_BACKEND_FLAGS = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled",
                  "cudnn_sdp_enabled")
_state = threading.local()


def _inside_attnfuse() -> bool:
    return getattr(_state, "depth", 0) > 0


def _backend_flags() -> tuple[bool, ...]:
    cuda = torch.backends.cuda
    return tuple(bool(getattr(cuda, n)()) for n in _BACKEND_FLAGS if hasattr(cuda, n))


def _bind(args: tuple, kwargs: dict) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """SDPA's arguments by name, or ``(None, reason)`` for a call attnfuse does not read."""
    if len(args) > _POSITIONAL:
        return None, f"{len(args)} positional arguments (SDPA takes at most {_POSITIONAL})"
    bound = dict(_DEFAULTS)
    bound.update(zip(_PARAMS, args))
    for name, value in kwargs.items():
        if name not in _PARAMS:
            return None, f"argument {name!r} unknown to attnfuse"
        if name in _PARAMS[:len(args)]:
            return None, f"argument {name!r} given twice"
        bound[name] = value
    missing = [n for n in _PARAMS[:3] if n not in bound]
    if missing:
        return None, f"missing {missing}"
    return bound, None


def _plain(t: Any) -> bool:
    """A dense strided tensor of no subclass attnfuse would have to know about."""
    return (isinstance(t, torch.Tensor)
            and (type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter))
            and t.layout == torch.strided and not t.is_nested)


def unsupported(a: dict[str, Any]) -> Optional[str]:
    """Why ``attnfuse.attention`` cannot take these SDPA arguments unchanged (None if it can).

    Beyond attnfuse's own input contract, SDPA's stricter rules stay SDPA's: a call SDPA would
    refuse (a mask together with ``is_causal``, a float mask of another dtype than the query)
    goes to SDPA, which raises its own error.
    """
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if not all(_plain(t) for t in (q, k, v)):
        return "query, key or value is not a dense torch.Tensor (subclass, nested or sparse)"
    if mask is not None and not _plain(mask):
        return "attn_mask is not a dense torch.Tensor"
    if not (q.dim() == k.dim() == v.dim() == 4):
        return f"{q.dim()}-D/{k.dim()}-D/{v.dim()}-D operands (attnfuse takes [B, H, N, D])"
    if not isinstance(a["is_causal"], bool):
        return f"is_causal is {type(a['is_causal']).__name__}, not a bool"
    if not isinstance(a["enable_gqa"], bool):
        return f"enable_gqa is {type(a['enable_gqa']).__name__}, not a bool"
    if mask is not None and a["is_causal"]:
        return "attn_mask together with is_causal=True (SDPA refuses it)"
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        return f"float attn_mask of dtype {mask.dtype} with {q.dtype} query (SDPA refuses it)"
    p, scale = a["dropout_p"], a["scale"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        return f"dropout_p={p!r} is not a number in [0, 1]"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        return f"scale={scale!r} is not a finite number"
    try:
        ops.validate(q, k, v, mask, a["enable_gqa"])
    except (ValueError, TypeError) as e:
        return str(e)
    return None


class SDPAOverride(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to :func:`attnfuse.attention` while active.

    ``kernel``: :func:`attnfuse.attention`'s (``"auto"``: chosen per call). ``strict=True``
    raises instead of falling back to SDPA on arguments attnfuse cannot take. Counters:
    ``routed`` (calls attnfuse ran) and ``fallbacks`` (reason -> calls left to SDPA), counted
    in eager execution (not while ``torch.compile`` traces).
    """

    def __init__(self, kernel: str = "auto", *, strict: bool = False) -> None:
        super().__init__()
        if kernel not in registry.kernel_names():
            raise ValueError(f"kernel must be one of {registry.kernel_names()}, got {kernel!r}")
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.kernel, self.strict = kernel, strict
        self.routed = 0
        self.fallbacks: collections.Counter[str] = collections.Counter()
        self._flags: Optional[tuple[bool, ...]] = None

    def __enter__(self) -> "SDPAOverride":
        self._flags = _backend_flags()
        return super().__enter__()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is not _SDPA or _inside_attnfuse():
            return func(*args, **kwargs)
        compiling = torch.compiler.is_compiling()
        if not compiling and self._flags is not None and _backend_flags() != self._flags:
            # A deliberate backend choice (the user's, or one of attnfuse's sdpa_* kernels
            # called directly): honoured, without a warning.
            return self._fallback(func, args, kwargs, "SDPA backends pinned with sdpa_kernel() "
                                  "inside the region", compiling, deliberate=True)
        a, reason = _bind(args, kwargs)
        if reason is None:
            reason = unsupported(a)
        if reason is not None:
            return self._fallback(func, args, kwargs, reason, compiling)
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            out = ops.attention(a["query"], a["key"], a["value"], a["attn_mask"], a["dropout_p"],
                                a["is_causal"], a["scale"], enable_gqa=a["enable_gqa"],
                                kernel=self.kernel)
        finally:
            _state.depth -= 1
        if not compiling:
            self.routed += 1
        return out

    def _fallback(self, func: Any, args: tuple, kwargs: dict, reason: str, compiling: bool,
                  deliberate: bool = False) -> Any:
        if self.strict and not deliberate:
            raise ValueError(f"sdpa_override(strict=True): attnfuse cannot take this "
                             f"scaled_dot_product_attention call: {reason}; drop strict=True "
                             f"to run it on PyTorch's SDPA")
        if not compiling:
            if reason not in self.fallbacks:
                (log.debug if deliberate else log.warning)(
                    "attnfuse.sdpa_override: a scaled_dot_product_attention call runs on "
                    "PyTorch's SDPA: %s", reason)
            self.fallbacks[reason] += 1
        return func(*args, **kwargs)


def sdpa_override(kernel: str = "auto", *, strict: bool = False) -> SDPAOverride:
    """``with attnfuse.sdpa_override(): out = model(x)``: every
    ``F.scaled_dot_product_attention`` call in the block runs on :func:`attnfuse.attention`.

    Calls attnfuse cannot take unchanged (non-4-D or nested tensors, tensor subclasses, a mask
    together with ``is_causal``, ...) run on PyTorch's SDPA, as without the block; ``strict=True``
    raises instead. The returned mode counts ``routed`` calls and ``fallbacks`` by reason.
    """
    return SDPAOverride(kernel, strict=strict)

