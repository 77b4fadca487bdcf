"""The fused attention op, ``attnfuse::attention``, and the public drop-in for SDPA.

``torch.ops.attnfuse.attention(q, k, v, mask, scale, causal, mask_fill, kernel, softcap) -> (out, lse)``
is a
``torch.library`` custom op: functional (no input is mutated or aliased), with a fake impl for
compile/export and an autograd formula through ``attnfuse::attention_backward``. The graph
rewrite inserts it; :func:`attention` wraps it for users.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .kernels import registry
from .kernels.reference import check_softcap

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_4d(mask: Optional[Tensor]) -> Optional[Tensor]:
    """Prefix a mask with size-1 dims up to rank 4 (a view; broadcasting is unchanged)."""
    if mask is None or mask.dim() >= 4:
        return mask
    return mask[(None,) * (4 - mask.dim())]


def _run_forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                 causal: str, mask_fill: float, kernel: str, softcap: float) -> tuple[Tensor, Tensor]:
    name, _ = registry.select(q, k, v, as_4d(mask), causal, prefer=kernel)
    if kernel not in ("auto", name):
        reasons = registry.rejections(kernel, q, k, v, as_4d(mask), causal)
        raise ValueError(f"kernel={kernel!r} cannot run these inputs: {'; '.join(reasons)}")
    out, lse = registry.get(name).forward(q, k, v, as_4d(mask), scale, causal, mask_fill, softcap)
    return out.contiguous(), lse.to(torch.float32).contiguous()


@torch.library.custom_op("attnfuse::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                 causal: str, mask_fill: float, kernel: str, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    return _run_forward(q, k, v, mask, scale, causal, mask_fill, kernel, softcap)


@attention_op.register_fake
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                    causal: str, mask_fill: float, kernel: str,
                    softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    b, h, nq, _ = q.shape
    out = q.new_empty((b, h, nq, v.shape[-1]))
    lse = q.new_empty((b, h, nq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attnfuse::attention_backward", mutates_args=())
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                          out: Tensor, lse: Tensor, scale: float, causal: str, mask_fill: float,
                          kernel: str, mask_grad: bool,
                          softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m4 = as_4d(mask)
    name, _ = registry.select(q, k, v, m4, causal, prefer=kernel)
    dq, dk, dv, dm = registry.get(name).backward(
        dout.contiguous(), q, k, v, m4, out, lse, scale, causal, mask_fill, mask_grad, softcap)
    dm = dm.reshape(mask.shape) if dm is not None else q.new_empty((0,))
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dm.contiguous()


@attention_backward_op.register_fake
def _attention_backward_fake(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                             out: Tensor, lse: Tensor, scale: float, causal: str, mask_fill: float,
                             kernel: str, mask_grad: bool,
                             softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dm = mask.new_empty(mask.shape) if mask_grad and mask is not None else q.new_empty((0,))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            dm.contiguous())


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, scale, causal, mask_fill, kernel, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.args = (scale, causal, mask_fill, kernel, softcap)


def _backward(ctx, dout: Tensor, _dlse: Optional[Tensor]):
    q, k, v, mask, out, lse = ctx.saved_tensors
    scale, causal, mask_fill, kernel, softcap = ctx.args
    mask_grad = bool(mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3])
    dq, dk, dv, dm = torch.ops.attnfuse.attention_backward(
        dout, q, k, v, mask, out, lse, scale, causal, mask_fill, kernel, mask_grad, softcap)
    return dq, dk, dv, (dm if mask_grad else None), None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check(cond: bool, message: str, exc: type = ValueError) -> None:
    if not cond:
        raise exc(message)


def validate(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], enable_gqa: bool) -> None:
    """SDPA's input contract, with errors that say what was expected, what came, and the fix."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check(isinstance(t, Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        _check(t.dtype in _FLOATS, f"{name} must be float16, bfloat16, float32 or float64, got "
               f"{t.dtype}; cast it with .to(torch.bfloat16) (or another float dtype)", TypeError)
        _check(t.dim() == 4, f"{name} must be 4-D [batch, heads, tokens, head_dim], got "
               f"{t.dim()}-D shape {tuple(t.shape)}; add the missing dims with .unsqueeze()")
    _check(q.dtype == k.dtype == v.dtype, f"query, key and value must share a dtype, got "
           f"{q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype", TypeError)
    _check(q.device == k.device == v.device, f"query, key and value must be on one device, got "
           f"{q.device}, {k.device}, {v.device}; move them with .to(device)")
    _check(q.shape[0] == k.shape[0] == v.shape[0], f"batch sizes differ: query {q.shape[0]}, "
           f"key {k.shape[0]}, value {v.shape[0]}")
    _check(k.shape[1] == v.shape[1] and k.shape[2] == v.shape[2], f"key and value must have the "
           f"same heads and tokens, got key {tuple(k.shape)} and value {tuple(v.shape)}")
    _check(q.shape[-1] == k.shape[-1], f"query and key head dims differ: {q.shape[-1]} vs "
           f"{k.shape[-1]}; Q·Kᵀ needs equal head dims")
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        _check(enable_gqa, f"Expected query and key/value to have the same number of heads but got "
               f"Hq={hq} and Hkv={hkv}. Try setting enable_gqa=True for GQA.")
        _check(hkv > 0 and hq % hkv == 0, f"GQA needs query heads divisible by key/value heads, "
               f"got Hq={hq} and Hkv={hkv}")
    if attn_mask is not None:
        _check(isinstance(attn_mask, Tensor), f"attn_mask must be a Tensor or None, got "
               f"{type(attn_mask).__name__}", TypeError)
        _check(attn_mask.dtype == torch.bool or attn_mask.is_floating_point(), f"attn_mask must be "
               f"bool (True = attend) or float (added to scores), got {attn_mask.dtype}", TypeError)
        _check(attn_mask.device == q.device, f"attn_mask is on {attn_mask.device} but query is on "
               f"{q.device}; move it with .to(query.device)")
        target = (q.shape[0], hq, q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(attn_mask.shape, target)
            ok = len(attn_mask.shape) <= 4 and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            ok = False
        _check(ok, f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
               f"[B, Hq, Nq, Nk] = {list(target)}")


def _causal(is_causal: Union[bool, str]) -> str:
    if is_causal is True:
        return "top_left"
    if is_causal is False:
        return "none"
    if is_causal in ("none", "top_left", "bottom_right"):
        return is_causal
    raise ValueError(f"is_causal must be a bool, 'none', 'top_left' or 'bottom_right', "
                     f"got {is_causal!r}")


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
              is_causal: Union[bool, str] = False, scale: Optional[float] = None, *,
              enable_gqa: bool = False, kernel: str = "auto", softcap: float = 0.0) -> Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` on [B, H, N, D] tensors.

    Same semantics as SDPA (bool masks: True = attend; float masks are added to the scaled
    scores; ``is_causal=True`` is top-left aligned), plus: ``is_causal="bottom_right"`` (the
    alignment KV caches need), a mask *and* causality together, and ``kernel=`` to force one of
    ``"auto"``, ``"flash"``, ``"reference"``, and ``softcap`` (Gemma 2's tanh soft-capping of the
    scaled scores, ``softcap·tanh(s/softcap)``, applied before the mask; 0 = off). Rows with no key
    to attend give 0.
    """
    validate(q, k, v, attn_mask, enable_gqa)
    _check(isinstance(softcap, (int, float)) and not isinstance(softcap, bool),
           f"softcap must be a float (0 disables it), got {type(softcap).__name__}", TypeError)
    softcap = check_softcap(softcap)
    if kernel not in registry.kernel_names():
        raise ValueError(f"unknown kernel {kernel!r}: expected one of {registry.kernel_names()}")
    causal = _causal(is_causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = torch.ops.attnfuse.attention(q, k, v, attn_mask, scale, causal, float("-inf"), kernel,
                                          softcap)
    return out
