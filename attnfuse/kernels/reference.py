"""Exact attention in PyTorch: the oracle every kernel is checked against.

Legend (shared by every kernel in this package)::

    q    [B, Hq,  Nq, D]      k [B, Hkv, Nk, D]      v [B, Hkv, Nk, Dv]
    mask broadcastable to [B, Hq, Nq, Nk]: bool (True = attend) or additive float
    out  [B, Hq,  Nq, Dv]     lse [B, Hq, Nq] (natural log, fp32; -inf on rows with no key)

    S = scale * q @ kᵀ
    S = softcap * tanh(S / softcap)      only if softcap > 0 (Gemma 2's soft-capping; before masks)
    S = where(mask, S, mask_fill) | S + mask ; S = -inf outside the causal band and the window
    P = softmax(S) ; lse = logsumexp(S)
    P' = P ∘ keep / (1 − dropout_p)      only if dropout_p > 0 (keep: a bool mask, True = kept)
    out = P' @ v

Backward: dV = P'ᵀ·dO, dP' = dO·Vᵀ, dP = dP' ∘ keep / (1 − dropout_p), and dS = P ∘ (dP − δ) with
δ = rowsum(P ∘ dP) (= rowsum(dO ∘ O)) is the gradient of the capped, masked scores (an additive
mask gets it as is); q and k get dS ∘ (1 − tanh²(S_raw / softcap)), the cap's derivative, with
S_raw the uncapped ``scale * q @ kᵀ``.

GQA: query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (the order ``repeat_interleave``
and ``repeat_kv`` produce). Causal ``"top_left"`` keeps key ``j`` for query ``i`` when ``j <= i``;
``"bottom_right"`` when ``j <= i + Nk - Nq``.

Sliding window ``window = (left, right)`` (ints, -1 = unbounded on that side): with
``offset = Nk - Nq`` when causal is ``"bottom_right"`` and 0 otherwise, query ``i`` keeps key ``j``
only if ``(left < 0 or j >= i + offset - left) and (right < 0 or j <= i + offset + right)``. It is
ANDed with causality and with any mask; Mistral's window of W tokens is ``causal="top_left",
window=(W - 1, 0)``.

Dropout: ``dropout_p`` in [0, 1] drops probabilities after the softmax (``lse`` stays that of the
undropped softmax, as in FlashAttention). The reference takes the keep-mask explicitly
(``dropout_mask``, broadcastable to [B, Hq, Nq, Nk]); drawing it from a seed is the registry's job
(``registry.py``), so forward and backward see the same mask. ``dropout_p == 1`` gives out = 0 and
zero gradients, and needs no mask.

A row whose every score is ``-inf`` gives ``out = 0``, ``lse = -inf`` and no gradient, the
contract of FlashAttention and FlexAttention. Queries are processed ``chunk`` rows at a time, so
memory stays O(N·chunk) rather than O(N²) (an explicit dropout mask is the one O(N²) input).
Accumulation is fp32 (fp64 for fp64 inputs) unless ``acc_dtype`` asks otherwise: the tests pass
``acc_dtype=q.dtype`` to get "PyTorch's own low-precision math", the baseline of FlashAttention's
error-ratio rule.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

CAUSAL_KINDS = ("none", "top_left", "bottom_right")
NO_WINDOW = (-1, -1)


def _acc(dtype: torch.dtype, acc_dtype: Optional[torch.dtype]) -> torch.dtype:
    return acc_dtype if acc_dtype is not None else torch.promote_types(dtype, torch.float32)


def check_softcap(softcap: float) -> float:
    """``softcap`` as a float: positive and finite caps the scores, 0 disables; else ValueError."""
    cap = float(softcap)
    if not (cap == 0.0 or 0.0 < cap < math.inf):
        raise ValueError(f"softcap: expected a positive finite float, or 0 to disable "
                         f"soft-capping, got {softcap!r}")
    return cap


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1). Plain Python: triton's own is a
    constexpr function whose call from the host costs microseconds per launch."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for launch grids (plain Python, as ``next_pow2``)."""
    return -(-int(a) // int(b))


def check_window(window: tuple[int, int]) -> tuple[int, int]:
    """``window`` as a pair of ints with every negative side (unbounded) written -1; else
    ValueError."""
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(f"window: expected a pair (left, right) of ints, -1 for unbounded, "
                         f"got {window!r}") from None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right)):
        raise ValueError(f"window: expected a pair (left, right) of ints, -1 for unbounded, "
                         f"got {window!r}")
    return max(int(left), -1), max(int(right), -1)


def check_dropout(dropout_p: float) -> float:
    """``dropout_p`` as a float in [0, 1]; else ValueError."""
    p = float(dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1], got {dropout_p!r}")
    return p


MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def operand_reasons(q: Any, k: Any, v: Any, mask: Any, causal: str, *,
                    interpreted: bool) -> list[str]:
    """What every Triton kernel here needs of its operands (possibly fake tensors), as reasons:
    equal dtypes, [B, H, N, D] with unit last-dim stride on one device (CPU only through the
    interpreter), k/v matching q with whole GQA groups, a known causal kind, and a bool or float
    mask broadcastable to [B, Hq, Nq, Nk] by strides. Kernels add their dtype and head-dim rules."""
    reasons: list[str] = []
    tensors = (("q", q), ("k", k), ("v", v))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        names = ", ".join(_dtype_name(t.dtype) for _, t in tensors)
        reasons.append(f"q, k, v dtypes differ ({names})")
    for name, t in tensors:
        if t.dim() != 4:
            reasons.append(f"{name} is {t.dim()}-D, kernel needs [B, H, N, D]")
        elif t.shape[-1] > 1 and t.stride(-1) != 1:
            reasons.append(f"last-dim stride of {name} is {t.stride(-1)}, kernel needs 1")
        if t.device != q.device:
            reasons.append(f"{name} is on {t.device}, q on {q.device}")
    if causal not in CAUSAL_KINDS:
        reasons.append(f"causal {causal!r} not one of {CAUSAL_KINDS}")
    if q.device.type == "cpu" and not interpreted:
        reasons.append("device cpu needs TRITON_INTERPRET=1")
    elif q.device.type not in ("cpu", "cuda"):
        reasons.append(f"device {q.device.type} not supported")
    if any(t.dim() != 4 for _, t in tensors):
        return reasons
    b, hq, nq, _ = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b:
        reasons.append(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if k.shape[1] == 0 or hq % k.shape[1]:
        reasons.append(f"{hq} query heads not a multiple of {k.shape[1]} kv heads")
    if mask is not None:
        full = (b, hq, nq, k.shape[2])
        if mask.dtype not in MASK_DTYPES:
            reasons.append(f"mask dtype {_dtype_name(mask.dtype)} not supported: "
                           "use bool or a float dtype")
        if mask.dim() != 4 or any(n not in (1, f) for n, f in zip(mask.shape, full)):
            reasons.append(f"mask {tuple(mask.shape)} is not a 4-D view broadcastable to {full}")
        if mask.device != q.device:
            reasons.append(f"mask is on {mask.device}, q on {q.device}")
    return reasons


def check_seed(seed: Optional[torch.Tensor], dropout_p: float, device: torch.device) -> None:
    """A seed is needed, as an int64 tensor of shape [1] on ``device``, when 0 < dropout_p < 1;
    else ValueError saying how to make one."""
    if not 0.0 < dropout_p < 1.0:
        return
    if (not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1
            or seed.device != torch.device(device)):
        got = (f"{seed.dtype} of shape {tuple(seed.shape)} on {seed.device}"
               if isinstance(seed, torch.Tensor) else repr(seed))
        raise ValueError(f"dropout_p={dropout_p} needs seed, an int64 tensor of shape [1] on "
                         f"{device} (e.g. torch.randint(0, 2**62, (1,), device=q.device)), "
                         f"got {got}")


def band_offset(causal: str, nq: int, nk: int) -> int:
    """The diagonal the causal band and the window are measured from: ``Nk - Nq`` when the
    alignment is bottom-right, else 0."""
    return nk - nq if causal == "bottom_right" else 0


def outside_band(rows: torch.Tensor, cols: torch.Tensor, causal: str, window: tuple[int, int],
                 nq: int, nk: int) -> Optional[torch.Tensor]:
    """True where key ``cols`` is outside query ``rows``' causal band or window (None: nowhere).

    ``rows`` and ``cols`` broadcast against each other (e.g. [c, 1] and [1, Nk])."""
    offset = band_offset(causal, nq, nk)
    left, right = window
    bounds, out = [], None
    if causal != "none":
        bounds.append(cols > rows + offset)
    if right >= 0:
        bounds.append(cols > rows + offset + right)
    if left >= 0:
        bounds.append(cols < rows + offset - left)
    for b in bounds:
        out = b if out is None else out | b
    return out


def _scores(q_c, k, mask_c, scale, causal, row0, nq, nk, mask_fill, acc, softcap=0.0,
            window=NO_WINDOW):
    """Masked, scaled (and soft-capped) scores for query rows [row0, row0 + q_c.shape[-2]), and
    ``tanh(S_raw / softcap)`` (None without a cap) for the backward.   # both [B, Hkv, G, c, Nk]"""
    s = torch.matmul(q_c, k.transpose(-1, -2).unsqueeze(2)) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if mask_c is not None:
        if mask_c.dtype == torch.bool:
            s = s.masked_fill(~mask_c, mask_fill)
        else:
            s = s + mask_c.to(acc)
    if causal != "none" or window != NO_WINDOW:
        rows = torch.arange(row0, row0 + q_c.shape[-2], device=s.device)[:, None]
        cols = torch.arange(nk, device=s.device)[None, :]
        s = s.masked_fill(outside_band(rows, cols, causal, window, nq, nk), float("-inf"))
    return s, t


def _softmax(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(s), logsumexp(s))`` over the last dim, max-subtracted like eager softmax.

    Normalising by the row sum (not by ``exp(lse)``) keeps rows of huge finite fills
    (``-1e9``) exact, and rows with no key give p = 0 and lse = -inf instead of NaN.
    """
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    total = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(total == 0, torch.ones_like(total), total)
    return p, (m + torch.log(total)).squeeze(-1)


def _split(q, k, mask):
    """View q as [B, Hkv, G, Nq, D] and the mask as [B, Hkv, G, Nq, Nk], without copies."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.unflatten(1, (hkv, g))
    return qg, _split_mask(mask, b, hq, hkv, nq, nk), g


def _split_mask(mask, b, hq, hkv, nq, nk):
    if mask is None:
        return None
    if mask.dim() > 4:
        raise ValueError(f"mask of {mask.dim()} dims; expected at most 4 ([B, Hq, Nq, Nk])")
    return mask.expand(b, hq, nq, nk).unflatten(1, (hkv, hq // hkv))


def _dropout_keep(dropout_p: float, dropout_mask: Optional[torch.Tensor], q, k):
    """``(keep, 1 / (1 − p))`` with ``keep`` the keep-mask viewed as [B, Hkv, G, Nq, Nk] (no
    copy); ``None`` without dropout, and ``(None, 0.0)`` for ``dropout_p == 1`` (all dropped)."""
    p = check_dropout(dropout_p)
    if p == 0.0:
        return None
    if p == 1.0:
        return None, 0.0
    if dropout_mask is None:
        raise ValueError("dropout_p in (0, 1) needs dropout_mask, the bool keep-mask "
                         "(True = kept) broadcastable to [B, Hq, Nq, Nk]")
    if dropout_mask.dtype != torch.bool:
        raise ValueError(f"dropout_mask must be bool (True = kept), got {dropout_mask.dtype}")
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    return _split_mask(dropout_mask, b, hq, hkv, nq, nk), 1.0 / (1.0 - p)


def _drop_factor(drop, r0: int, r1: int, acc: torch.dtype):
    """``keep / (1 − p)`` for query rows [r0, r1) in ``acc`` (the scalar 0 when all drop)."""
    keep, inv = drop
    if keep is None:
        return inv
    return keep[..., r0:r1, :].to(acc) * inv


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: str = "none",
    mask_fill: float = float("-inf"),
    softcap: float = 0.0,
    *,
    window: tuple[int, int] = NO_WINDOW,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
    acc_dtype: Optional[torch.dtype] = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``; ``out`` in q's dtype, ``lse`` in the accumulation dtype.

    ``softcap > 0`` soft-caps the scores (see the legend); 0 disables it. ``window=(left,
    right)`` restricts each query to a band of keys (-1 = unbounded side). ``dropout_p > 0``
    drops probabilities where ``dropout_mask`` (bool, True = kept) is False and rescales the rest
    by 1/(1 − p); ``lse`` is that of the undropped softmax. Differentiable by autograd as well as
    through :func:`attention_backward`."""
    softcap = check_softcap(softcap)
    window = check_window(window)
    acc = _acc(q.dtype, acc_dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    nq, nk = q.shape[2], k.shape[2]
    qg, mg, _ = _split(q.to(acc), k, mask)
    drop = _dropout_keep(dropout_p, dropout_mask, q, k)
    kf, vf = k.to(acc), v.to(acc)
    outs, lses = [], []
    for r0 in range(0, nq, chunk):
        r1 = min(nq, r0 + chunk)
        s, _ = _scores(qg[..., r0:r1, :], kf, None if mg is None else mg[..., r0:r1, :],
                       scale, causal, r0, nq, nk, mask_fill, acc, softcap, window)
        p, lse = _softmax(s)
        if drop is not None:
            p = p * _drop_factor(drop, r0, r1, acc)
        outs.append(torch.matmul(p, vf.unsqueeze(2)))
        lses.append(lse)
    out = torch.cat(outs, dim=-2).flatten(1, 2)
    lse = torch.cat(lses, dim=-1).flatten(1, 2)
    return out.to(q.dtype), lse


def _sum_to(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to ``shape`` (the inverse of ``expand``)."""
    lead = x.dim() - len(shape)
    if lead:
        x = x.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: Optional[float] = None,
    causal: str = "none",
    mask_fill: float = float("-inf"),
    mask_grad: bool = False,
    softcap: float = 0.0,
    *,
    window: tuple[int, int] = NO_WINDOW,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
    acc_dtype: Optional[torch.dtype] = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Returns ``(dq, dk, dv, dmask)``; ``dmask`` (shaped like ``mask``) only when ``mask_grad``.

    P is recomputed from the scores (``out`` and ``lse`` are accepted for interface parity).

    dP = dO·Vᵀ, dS = P ∘ (dP − δ) with δ = rowsum(P ∘ dP), dQ = scale·dS·K, dK = scale·dSᵀ·Q,
    dV = Pᵀ·dO; an additive mask gets dS itself, summed over the dimensions it was broadcast on.
    With ``softcap > 0`` dQ and dK use dS ∘ (1 − tanh²(S_raw / softcap)) in place of dS (the mask,
    added after the cap, still gets dS). ``window``, ``dropout_p`` and ``dropout_mask`` must be the
    forward's: with dropout, dV = P'ᵀ·dO and dP = (dO·Vᵀ) ∘ keep / (1 − p).
    """
    softcap = check_softcap(softcap)
    window = check_window(window)
    acc = _acc(q.dtype, acc_dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    qg, mg, g = _split(q.to(acc), k, mask)
    drop = _dropout_keep(dropout_p, dropout_mask, q, k)
    kf, vf = k.to(acc), v.to(acc)
    dog = dout.to(acc).unflatten(1, (k.shape[1], g))
    dq_parts = []
    dk = torch.zeros(kf.shape, dtype=acc, device=q.device)
    dv = torch.zeros(vf.shape, dtype=acc, device=q.device)
    dmask = None
    if mask_grad:
        if mask is None or mask.dtype == torch.bool:
            raise ValueError("mask_grad=True needs an additive float mask")
        dmask = torch.zeros(mask.shape, dtype=acc, device=mask.device)
    for r0 in range(0, nq, chunk):
        r1 = min(nq, r0 + chunk)
        s, t = _scores(qg[..., r0:r1, :], kf, None if mg is None else mg[..., r0:r1, :],
                       scale, causal, r0, nq, nk, mask_fill, acc, softcap, window)
        p, _ = _softmax(s)                                                     # [B, Hkv, G, c, Nk]
        do = dog[..., r0:r1, :]
        dp = torch.matmul(do, vf.transpose(-1, -2).unsqueeze(2))               # dP' = dO·Vᵀ
        pd = p                                                                 # P', what V saw
        if drop is not None:
            d_c = _drop_factor(drop, r0, r1, acc)
            pd, dp = p * d_c, dp * d_c                                   # dP = dP' ∘ keep/(1−p)
        # δ = rowsum(P ∘ dP) (softmax's own backward) rather than rowsum(dO ∘ O): no cancellation.
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        if mg is not None and mg.dtype == torch.bool:
            # Filled scores are constants: with a finite fill they carry probability, not gradient.
            ds = ds.masked_fill(~mg[..., r0:r1, :], 0.0)
        # Through the cap, d(c·tanh(x/c))/dx = 1 − tanh²; the mask, added after it, gets dS.
        ds_raw = ds if t is None else ds * (1 - t * t)
        dq_parts.append(torch.matmul(ds_raw, kf.unsqueeze(2)) * scale)
        dk += (torch.matmul(ds_raw.transpose(-1, -2), qg[..., r0:r1, :]) * scale).sum(2)
        dv += torch.matmul(pd.transpose(-1, -2), do).sum(2)
        if dmask is not None:
            full = ds.flatten(1, 2)                                            # [B, Hq, c, Nk]
            rows = slice(r0, r1) if mask.shape[-2] != 1 else slice(None)
            dmask[..., rows, :] += _sum_to(full, dmask[..., rows, :].shape)
    dq = torch.cat(dq_parts, dim=-2).flatten(1, 2)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            None if dmask is None else dmask.to(mask.dtype))
