"""The fused attention op, ``attnfuse::attention``, and the public drop-in for SDPA.

``torch.ops.attnfuse.attention(q, k, v, mask, scale, causal, mask_fill, kernel, softcap=0.0,
window_left=-1, window_right=-1, dropout_p=0.0, seed=None) -> (out, lse)`` is a ``torch.library``
custom op: functional (no input is mutated or aliased), with a fake impl for compile/export and an
autograd formula through ``attnfuse::attention_backward`` (same arguments after ``mask_grad``).
The graph rewrite inserts it; :func:`attention` wraps it for users.

``window_left``/``window_right`` bound each query's keys to a band around its diagonal (-1 =
unbounded; semantics in ``kernels/reference.py``). ``dropout_p > 0`` drops probabilities after
the softmax with a keep-mask determined by ``seed`` (an int64 tensor of shape [1] on q's device);
autograd saves the seed, so the backward regenerates the forward's mask. ``lse`` is always that of
the undropped softmax.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .kernels import registry, sdpa
from .kernels.reference import NO_WINDOW, check_dropout, check_seed, check_softcap, check_window

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_4d(mask: Optional[Tensor]) -> Optional[Tensor]:
    """Prefix a mask with size-1 dims up to rank 4 (a view; broadcasting is unchanged)."""
    if mask is None or mask.dim() >= 4:
        return mask
    return mask[(None,) * (4 - mask.dim())]


def _window(left: int, right: int) -> tuple[int, int]:
    return check_window((int(left), int(right)))


def _pick(q: Tensor, k: Tensor, v: Tensor, m4: Optional[Tensor], causal: str, kernel: str,
          window: tuple[int, int], dropout_p: float) -> str:
    name, _ = registry.select(q, k, v, m4, causal, prefer=kernel, window=window,
                              dropout_p=dropout_p)
    if kernel not in ("auto", name):
        reasons = registry.rejections(kernel, q, k, v, m4, causal, window=window,
                                      dropout_p=dropout_p)
        raise ValueError(f"kernel={kernel!r} cannot run these inputs: {'; '.join(reasons)}")
    return name


def _run_forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                 causal: str, mask_fill: float, kernel: str, softcap: float,
                 window: tuple[int, int], dropout_p: float,
                 seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    dropout_p = check_dropout(dropout_p)
    check_seed(seed, dropout_p, q.device)
    m4 = as_4d(mask)
    name = _pick(q, k, v, m4, causal, kernel, window, dropout_p)
    kern = registry.get(name)   # _pick ran its operand check: no second one
    out, lse = (kern.forward_selected or kern.forward)(q, k, v, m4, scale, causal, mask_fill,
                                                       softcap, window, dropout_p, seed)
    return out.contiguous(), lse.to(torch.float32).contiguous()


@torch.library.custom_op("attnfuse::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                 causal: str, mask_fill: float, kernel: str, softcap: float = 0.0,
                 window_left: int = -1, window_right: int = -1, dropout_p: float = 0.0,
                 seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _run_forward(q, k, v, mask, scale, causal, mask_fill, kernel, softcap,
                        _window(window_left, window_right), dropout_p, seed)


@attention_op.register_fake
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                    causal: str, mask_fill: float, kernel: str, softcap: float = 0.0,
                    window_left: int = -1, window_right: int = -1, dropout_p: float = 0.0,
                    seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    b, h, nq, _ = q.shape
    out = q.new_empty((b, h, nq, v.shape[-1]))
    lse = q.new_empty((b, h, nq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attnfuse::attention_backward", mutates_args=())
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                          out: Tensor, lse: Tensor, scale: float, causal: str, mask_fill: float,
                          kernel: str, mask_grad: bool, softcap: float = 0.0,
                          window_left: int = -1, window_right: int = -1, dropout_p: float = 0.0,
                          seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    window = _window(window_left, window_right)
    dropout_p = check_dropout(dropout_p)
    check_seed(seed, dropout_p, q.device)
    m4 = as_4d(mask)
    name = _pick(q, k, v, m4, causal, kernel, window, dropout_p)
    kern = registry.get(name)
    dq, dk, dv, dm = (kern.backward_selected or kern.backward)(
        dout.contiguous(), q, k, v, m4, out, lse, scale, causal, mask_fill, mask_grad, softcap,
        window, dropout_p, seed)
    dm = dm.reshape(mask.shape) if dm is not None else q.new_empty((0,))
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dm.contiguous()


@attention_backward_op.register_fake
def _attention_backward_fake(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                             out: Tensor, lse: Tensor, scale: float, causal: str, mask_fill: float,
                             kernel: str, mask_grad: bool, softcap: float = 0.0,
                             window_left: int = -1, window_right: int = -1,
                             dropout_p: float = 0.0, seed: Optional[Tensor] = None
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dm = mask.new_empty(mask.shape) if mask_grad and mask is not None else q.new_empty((0,))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            dm.contiguous())


def _setup_context(ctx, inputs, output) -> None:
    (q, k, v, mask, scale, causal, mask_fill, kernel, softcap, window_left, window_right,
     dropout_p, seed) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse, seed)
    ctx.args = (scale, causal, mask_fill, kernel, softcap, window_left, window_right, dropout_p)


def _backward(ctx, dout: Tensor, _dlse: Optional[Tensor]):
    q, k, v, mask, out, lse, seed = ctx.saved_tensors
    scale, causal, mask_fill, kernel, softcap, window_left, window_right, dropout_p = ctx.args
    mask_grad = bool(mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3])
    dq, dk, dv, dm = torch.ops.attnfuse.attention_backward(
        dout, q, k, v, mask, out, lse, scale, causal, mask_fill, kernel, mask_grad, softcap,
        window_left, window_right, dropout_p, seed)
    return (dq, dk, dv, (dm if mask_grad else None)) + (None,) * 9


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


def _dropout_arg(dropout_p: float) -> float:
    _check(isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool),
           f"dropout_p must be a float in [0, 1], got {type(dropout_p).__name__} "
           f"({dropout_p!r}); pass a probability such as 0.1 (0.0 disables dropout)", TypeError)
    _check(0.0 <= float(dropout_p) <= 1.0, f"dropout_p must be in [0, 1], got {dropout_p!r}; "
           f"pass a probability such as 0.1 (0.0 disables dropout; eval code usually passes "
           f"dropout_p=p if self.training else 0.0)")
    return float(dropout_p)


def _window_arg(window: Optional[Sequence[Optional[int]]]) -> tuple[int, int]:
    """``window=(left, right)``, None for an unbounded side, as the op's (left, right), -1 there."""
    if window is None:
        return NO_WINDOW
    fix = ("pass window=(left, right) with non-negative ints or None for an unbounded side, e.g. "
           "window=(W - 1, 0) with is_causal=True for a sliding window of W tokens")
    _check(isinstance(window, (tuple, list)) and len(window) == 2,
           f"window must be None or a pair (left, right), got {window!r}; {fix}", TypeError)
    sides = []
    for name, x in zip(("left", "right"), window):
        if x is None:
            sides.append(-1)
            continue
        _check(isinstance(x, int) and not isinstance(x, bool), f"window {name} must be an int "
               f"or None, got {type(x).__name__} ({x!r}); {fix}", TypeError)
        _check(x >= 0, f"window {name} must be >= 0 (or None for unbounded), got {x}; {fix}")
        sides.append(int(x))
    return sides[0], sides[1]


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, is_causal: Union[bool, str] = False,
              scale: Optional[float] = None, *, enable_gqa: bool = False, kernel: str = "auto",
              softcap: float = 0.0,
              window: Optional[Sequence[Optional[int]]] = None) -> Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` on [B, H, N, D] tensors.

    Same arguments, in the same order, and the same semantics as SDPA (bool masks: True = attend;
    float masks are added to the scaled scores; ``is_causal=True`` is top-left aligned;
    ``dropout_p`` drops attention probabilities after the softmax and rescales the rest by
    1/(1 − p), whenever it is > 0, as SDPA does), plus:

    * ``is_causal="bottom_right"`` (the alignment KV caches need), and a mask *and* causality
      together;
    * ``window=(left, right)``: a sliding window; query ``i`` sees key ``j`` only if
      ``i + off - left <= j <= i + off + right`` (``off = Nk - Nq`` with
      ``is_causal="bottom_right"``, else 0), None on a side for unbounded. Mistral's window of
      W tokens is ``is_causal=True, window=(W - 1, 0)``. It combines with the mask and causality;
    * ``softcap``: Gemma 2's tanh soft-capping of the scaled scores, ``softcap·tanh(s/softcap)``,
      applied before the mask; 0 = off;
    * ``kernel=``: ``"auto"`` (the cost model's choice, timed and cached on CUDA: see
      ``attnfuse/tune``), or one of ``"flash"``, ``"reference"``, ``"sdpa_cudnn"``,
      ``"sdpa_flash"``, ``"sdpa_efficient"``, ``"sdpa_math"`` (PyTorch's backends, pinned).

    Rows with no key to attend give 0. With dropout, the keep-mask comes from a seed drawn from
    torch's generator on the query's device (``torch.manual_seed`` makes a run reproducible, and
    the draw is CUDA-graph safe); the backward reuses that seed, so it sees the forward's mask. The
    reference and flash kernels turn one seed into different masks.
    """
    q, k, v = query, key, value
    validate(q, k, v, attn_mask, enable_gqa)
    dropout_p = _dropout_arg(dropout_p)
    _check(isinstance(softcap, (int, float)) and not isinstance(softcap, bool),
           f"softcap must be a float (0 disables it), got {type(softcap).__name__}", TypeError)
    softcap = check_softcap(softcap)
    left, right = _window_arg(window)
    if kernel not in registry.kernel_names():
        raise ValueError(f"unknown kernel {kernel!r}: expected one of {registry.kernel_names()}")
    causal = _causal(is_causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if (kernel == "auto" and not torch.compiler.is_compiling()) or registry.is_sdpa(kernel):
        kernel = _choose_eager(q, k, v, attn_mask, causal, kernel, (left, right), softcap,
                               dropout_p, scale)
    if registry.is_sdpa(kernel):
        return sdpa.call(q, k, v, attn_mask, scale, causal != "none", kernel)
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 2 ** 62, (1,), device=q.device, dtype=torch.int64)
    out, _ = torch.ops.attnfuse.attention(q, k, v, attn_mask, scale, causal, float("-inf"), kernel,
                                          softcap, left, right, dropout_p, seed)
    return out


def _choose_eager(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: str,
                  kernel: str, window: tuple[int, int], softcap: float, dropout_p: float,
                  scale: float) -> str:
    """The kernel for an eager call: the selector's (remembered per exact call shape), or a
    forced SDPA backend after checking it can run these inputs."""
    m4 = as_4d(mask)
    kw = dict(window=window, softcap=softcap, dropout_p=dropout_p, source="sdpa",
              mask_grad=bool(m4 is not None and m4.requires_grad))
    if kernel != "auto":
        reasons = registry.rejections(kernel, q, k, v, m4, causal, **kw)
        if reasons:
            raise ValueError(f"kernel={kernel!r} cannot run these inputs: {'; '.join(reasons)}")
        return kernel
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, m4))
    from .tune.select import Problem, choose_eager
    fast = (q.shape, k.shape, v.shape, q.stride(), q.dtype, q.device, causal, window, softcap,
            dropout_p, training, None if m4 is None else (m4.shape, m4.stride(), m4.dtype))
    return choose_eager(fast, lambda: Problem.of(q, k, v, m4, causal, training=training,
                                                 scale=scale, **kw), q, k, v, m4)
