"""FlashAttention-2 in Triton: forward, backward, and the check that says when they apply.

Legend (the symbols of ``reference.py``; every tile comment uses them)::

    q   [B, Hq,  Nq, D]     k [B, Hkv, Nk, D]     v [B, Hkv, Nk, Dv]     G = Hq // Hkv
    out [B, Hq,  Nq, Dv]    lse [B, Hq, Nq]   (fp32, natural log, -inf on rows with no key)
    mask read through strides as [B, Hq, Nq, Nk] (stride 0 on broadcast dims), never expanded

    s   = scale·q·kᵀ                                                         (natural units)
    s   = softcap·t,  t = tanh(s / softcap)          only with HAS_SOFTCAP (softcap > 0), pre-mask
    s   = s + mask   or  mask_fill where a bool mask is False
    s   = -inf outside the causal band and outside [0, Nq) x [0, Nk)
    m   = running row max of s    p = exp2(s·log2e − m·log2e)  (one FMA: log2 e folded into exp2)
    l   = running row sum of p    acc = Σ p·v    out = acc / l    lse = m + ln l
    backward: p = exp2(s·log2e − lse·log2e)   dP = dO·vᵀ   δ = rowsum(dO ∘ out)   dS = p ∘ (dP − δ)
              (dS = 0 where a bool mask filled the score: a constant has no gradient)
              dmask = dS   then dS = dS ∘ (1 − t²) with HAS_SOFTCAP (through the cap)
              dq = scale·dS·k   dk = scale·Σ_group dSᵀ·q   dv = Σ_group pᵀ·dO

Kernels: ``_fwd_kernel`` (grid: query blocks x Hq x B), ``_bwd_preprocess`` (δ),
``_bwd_dkdv_kernel`` (a K/V block stays put, loops over the G query heads and the query blocks; no
atomics) and ``_bwd_dq_kernel`` (a Q block stays put, loops over key blocks; optionally stores dS
for the mask gradient). Variants (mask kind, causal, soft-cap, fp32 dots, dS output) are constexpr
flags; ``softcap=0`` compiles the same code as a kernel without the cap.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import CAUSAL_KINDS, check_softcap

_LOG2E_F = 1.4426950408889634
_LN2_F = 0.6931471805599453
_FP32_MAX = 3.4028234663852886e38
_MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)

_LOG2E = tl.constexpr(_LOG2E_F)
_LN2 = tl.constexpr(_LN2_F)
# Finite fills and additive-mask entries are clamped to at least this (finfo(bf16/fp32).min would
# overflow to -inf in s·log2e), so they stay "huge but finite", as the reference sees them.
_MIN_SCORE_F = -_FP32_MAX * _LN2_F * 0.999
_MIN_SCORE = tl.constexpr(_MIN_SCORE_F)
_NO_MASK = tl.constexpr(0)
_BOOL_MASK = tl.constexpr(1)
_ADD_MASK = tl.constexpr(2)


# ----------------------------------------------------------------------------- shared helpers

@triton.jit
def _keep(Mask, rows, cols, smm, smn, inside):
    """Bool-mask tile (True = attend), read as uint8; out-of-bounds entries count as kept."""
    return tl.load(Mask + rows * smm + cols * smn, mask=inside, other=1) != 0


@triton.jit
def _mask_scores(s, rows, cols, Mask, smm, smn, NQ, NK, offset, fill,
                 MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """Apply user mask, causal band and bounds to scaled scores; rows/cols broadcast to s."""
    inside = (rows < NQ) & (cols < NK)
    if MASK_KIND == _BOOL_MASK:
        s = tl.where(_keep(Mask, rows, cols, smm, smn, inside), s, fill)
    elif MASK_KIND == _ADD_MASK:
        bias = tl.load(Mask + rows * smm + cols * smn, mask=inside, other=0.0).to(tl.float32)
        s = s + tl.where(bias == float("-inf"), bias, tl.maximum(bias, _MIN_SCORE))
    if CAUSAL:
        inside = inside & (cols <= rows + offset)
    return tl.where(inside, s, float("-inf"))


@triton.jit
def _tanh_parts(x):
    """``(tanh x, 1 − tanh² x)`` in fp32 to a few ulp for every finite x, from exp2 alone.

    |x| < 0.625: Cephes' tanhf polynomial (1 − 2/(e^{2x} + 1) would cancel near 0). Otherwise
    r = 1 − tanh|x| = 2/(e^{2|x|} + 1) has no cancellation, and 1 − tanh² = r·(2 − r) keeps
    its relative accuracy where tanh rounds to ±1. The exponent is clamped at |x| = 44 (e^{88}
    is still finite in fp32, and 1 − tanh² there is ~2e-38), so no inf or NaN arises at any x."""
    a = tl.abs(x)
    e = tl.math.exp2(tl.minimum(a, 44.0) * (2.0 * _LOG2E))
    r = 2.0 / (e + 1.0)
    a_small = tl.minimum(a, 0.625)
    z = a_small * a_small
    poly = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
             + 1.33314422036e-1) * z - 3.33332819422e-1) * z * a_small + a_small
    small = a < 0.625
    t = tl.where(small, poly, 1.0 - r)
    dt = tl.where(small, 1.0 - poly * poly, r * (2.0 - r))
    return tl.where(x < 0.0, -t, t), dt


@triton.jit
def _scaled_scores(q, kT, scale, softcap, PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``(s, 1 − t²)``: scale·q·kᵀ, soft-capped with HAS_SOFTCAP (else 1 − t² is a dummy 1)."""
    s = tl.dot(q, kT, input_precision=PREC) * scale
    if HAS_SOFTCAP:
        t, dt = _tanh_parts(s * (1.0 / softcap))
        s = softcap * t
    else:
        dt = 1.0
    return s, dt


@triton.jit
def _key_range(start_m, NK, offset, CAUSAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks [0, lo) lie inside this query block's causal band; blocks [lo, hi) cross it."""
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), NK)
        lo = tl.minimum(tl.maximum(start_m + offset + 1, 0) // BLOCK_N * BLOCK_N, hi)
    else:
        hi = NK
        lo = NK
    return lo, hi


@triton.jit
def _operand(x, EMU_BF16: tl.constexpr):
    """A loaded dot operand. EMU_BF16: the interpreter cannot multiply bf16, so use fp32 values."""
    if EMU_BF16:
        x = x.to(tl.float32)
    return x


@triton.jit
def _lowp(x, like, EMU_BF16: tl.constexpr):
    """fp32 rounded to the dot-operand dtype of ``like`` (FA2 feeds P and dS to the MMA in it)."""
    if EMU_BF16:
        # The interpreter's fp32 -> bf16 cast truncates: round to nearest even on the bits.
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    return x.to(like.dtype)


@triton.jit
def _for_store(x, Ptr, EMU_BF16: tl.constexpr):
    """fp32 result in the output pointer's dtype."""
    return _lowp(x, x, EMU_BF16).to(Ptr.dtype.element_ty)


@triton.jit
def _load_lse2(ptrs, valid):
    """Saved lse times log2 e; empty rows (-inf) become +inf so that exp2(s·log2e − lse2) = 0."""
    lse = tl.load(ptrs, mask=valid, other=float("-inf")).to(tl.float32)
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, Mask, offs_m, offs_d, offs_dv, lo, hi,
               skn, skd, svn, svd, smm, smn, NQ, NK, D, DV, scale, fill, offset, softcap,
               MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
               EMU_BF16: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key blocks [lo, hi): the FlashAttention-2 inner loop."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _operand(tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd,
                              mask=(offs_n[None, :] < NK) & (offs_d[:, None] < D), other=0.0),
                      EMU_BF16)  # [BLOCK_D, BLOCK_N]
        s, _ = _scaled_scores(q, kT, scale, softcap, PREC, HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
        s = _mask_scores(s, offs_m[:, None], offs_n[None, :], Mask, smm, smn, NQ, NK, offset,
                         fill, MASK_KIND, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
        # A row with no key so far has m = -inf: subtract 0 instead, so p = 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # [BLOCK_M]
        p = tl.math.exp2(s * _LOG2E - (m_safe * _LOG2E)[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2((m_i - m_safe) * _LOG2E)  # [BLOCK_M]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _operand(tl.load(V + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                             mask=(offs_n[:, None] < NK) & (offs_dv[None, :] < DV), other=0.0),
                     EMU_BF16)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None]  # [BLOCK_M, BLOCK_DV]
        acc = tl.dot(_lowp(p, v, EMU_BF16), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Mask, Out, Lse,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                smb, smh, smm, smn, sob, soh, som, sod, slb, slh, slm,
                GROUP, NQ, NK, D, DV, scale, fill, offset, softcap, NQ_BUCKET, NK_BUCKET,
                MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                EMU_BF16: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out and lse for one query block of one query head."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP  # GQA: the kv head this query head reads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _operand(tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                         mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D), other=0.0),
                 EMU_BF16)  # [BLOCK_M, BLOCK_D]
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    Mask += b * smb + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, hi = _key_range(start_m, NK, offset, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, Mask, offs_m, offs_d, offs_dv, 0, lo,
                               skn, skd, svn, svd, smm, smn, NQ, NK, D, DV, scale, fill,
                               offset, softcap, MASK_KIND, False, PREC, EMU_BF16, HAS_SOFTCAP,
                               BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, Mask, offs_m, offs_d, offs_dv, lo, hi,
                               skn, skd, svn, svd, smm, smn, NQ, NK, D, DV, scale, fill,
                               offset, softcap, MASK_KIND, CAUSAL, PREC, EMU_BF16, HAS_SOFTCAP,
                               BLOCK_N)
    empty = l_i == 0.0  # no key at all: out = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]  # [BLOCK_M, BLOCK_DV]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe) * _LN2)  # [BLOCK_M]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             _for_store(out, Out, EMU_BF16), mask=(offs_m[:, None] < NQ) & (offs_dv[None, :] < DV))
    tl.store(Lse + b * slb + h * slh + offs_m * slm, lse, mask=offs_m < NQ)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _bwd_preprocess(Out, DO, Delta, sob, soh, som, sod, sdb, sdh, sdm, sdd, NQ, DV,
                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """δ = rowsum(dO ∘ out) in fp32, stored contiguous [B, Hq, Nq]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid = (offs_m[:, None] < NQ) & (offs_dv[None, :] < DV)
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
                mask=valid, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DV]
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=valid, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DV]
    row = (b * tl.num_programs(1) + h) * NQ
    tl.store(Delta + row + offs_m, tl.sum(o * do, 1), mask=offs_m < NQ)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, Mask, offs_n, offs_d, offs_dv, lo, hi,
                sqm, sqd, sdm, sdd, slm, smm, smn, NQ, NK, D, DV, scale, fill, offset, softcap,
                MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                EMU_BF16: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dk, dv of one key block over the query blocks [lo, hi) of one query head."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_m = offs_m < NQ
        qT = _operand(tl.load(Q + offs_m[None, :] * sqm + offs_d[:, None] * sqd,
                              mask=in_m[None, :] & (offs_d[:, None] < D), other=0.0),
                      EMU_BF16)  # [BLOCK_D, BLOCK_M]
        sT, dtT = _scaled_scores(k, qT, scale, softcap, PREC, HAS_SOFTCAP)  # [BLOCK_N, BLOCK_M]
        sT = _mask_scores(sT, offs_m[None, :], offs_n[:, None], Mask, smm, smn, NQ, NK, offset,
                          fill, MASK_KIND, CAUSAL)
        lse2 = _load_lse2(Lse + offs_m * slm, in_m)  # [BLOCK_M]
        # p <= 1 in exact arithmetic; the clamp stops rounding of a huge lse from giving inf.
        pT = tl.math.exp2(tl.minimum(sT * _LOG2E - lse2[None, :], 0.0))  # [BLOCK_N, BLOCK_M]
        do = _operand(tl.load(DO + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                              mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0.0),
                      EMU_BF16)  # [BLOCK_M, BLOCK_DV]
        dv = tl.dot(_lowp(pT, do, EMU_BF16), do, dv, input_precision=PREC)  # [BLOCK_N, BLOCK_DV]
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # [BLOCK_N, BLOCK_M]
        delta = tl.load(Delta + offs_m, mask=in_m, other=0.0)  # [BLOCK_M]
        dsT = pT * (dpT - delta[None, :])  # [BLOCK_N, BLOCK_M]
        if MASK_KIND == _BOOL_MASK:  # filled scores are constants: probability but no gradient
            dsT = tl.where(_keep(Mask, offs_m[None, :], offs_n[:, None], smm, smn,
                                 in_m[None, :] & (offs_n[:, None] < NK)), dsT, 0.0)
        if HAS_SOFTCAP:  # through the cap: d(softcap·tanh(x/softcap))/dx = 1 − t²
            dsT = dsT * dtT
        dk = tl.dot(_lowp(dsT, qT, EMU_BF16), tl.trans(qT), dk,
                    input_precision=PREC)  # [BLOCK_N, BLOCK_D]
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, Mask, DO, Lse, Delta, DK, DV_,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     smb, smh, smm, smn, sdb, sdh, sdm, sdd, slb, slh, slm,
                     sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                     HQ, GROUP, NQ, NK, D, DV, scale, fill, offset, softcap, NQ_BUCKET,
                     NK_BUCKET, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                     PREC: tl.constexpr, EMU_BF16: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr):
    """dk, dv for one key block of one kv head, summed over its G query heads (no atomics)."""
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _operand(tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                         mask=(offs_n[:, None] < NK) & (offs_d[None, :] < D), other=0.0),
                 EMU_BF16)  # [BLOCK_N, BLOCK_D]
    v = _operand(tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                         mask=(offs_n[:, None] < NK) & (offs_dv[None, :] < DV), other=0.0),
                 EMU_BF16)  # [BLOCK_N, BLOCK_DV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # Query blocks [lo, mid) cross the causal band of this key block; [mid, NQ) are fully inside.
    if CAUSAL:
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        mid = tl.maximum(start_n + BLOCK_N - 1 - offset, 0)
        mid = tl.minimum((mid + BLOCK_M - 1) // BLOCK_M * BLOCK_M, NQ)
        lo = tl.minimum(lo, mid)
    else:
        lo = 0
        mid = 0
    for g in range(0, GROUP):  # sum over the query heads sharing this kv head
        h = hk * GROUP + g
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdb + h * sdh
        Lseh = Lse + b * slb + h * slh
        Deltah = Delta + (b * HQ + h) * NQ
        Maskh = Mask + b * smb + h * smh
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, Lseh, Deltah, Maskh, offs_n, offs_d, offs_dv,
                             lo, mid, sqm, sqd, sdm, sdd, slm, smm, smn, NQ, NK, D, DV, scale,
                             fill, offset, softcap, MASK_KIND, CAUSAL, PREC, EMU_BF16,
                             HAS_SOFTCAP, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, Lseh, Deltah, Maskh, offs_n, offs_d, offs_dv,
                             mid, NQ, sqm, sqd, sdm, sdd, slm, smm, smn, NQ, NK, D, DV, scale,
                             fill, offset, softcap, MASK_KIND, False, PREC, EMU_BF16,
                             HAS_SOFTCAP, BLOCK_M)
    dk = dk * scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             _for_store(dk, DK, EMU_BF16), mask=(offs_n[:, None] < NK) & (offs_d[None, :] < D))
    tl.store(DV_ + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             _for_store(dv, DV_, EMU_BF16), mask=(offs_n[:, None] < NK) & (offs_dv[None, :] < DV))


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K, V, Mask, DS, offs_m, offs_d, offs_dv, lo, hi,
              skn, skd, svn, svd, smm, smn, sdsm, NQ, NK, D, DV, scale, fill, offset, softcap,
              MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
              EMU_BF16: tl.constexpr, WRITE_DS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Accumulate dq of one query block over the key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _operand(tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd,
                              mask=(offs_n[None, :] < NK) & (offs_d[:, None] < D), other=0.0),
                      EMU_BF16)  # [BLOCK_D, BLOCK_N]
        vT = _operand(tl.load(V + offs_n[None, :] * svn + offs_dv[:, None] * svd,
                              mask=(offs_n[None, :] < NK) & (offs_dv[:, None] < DV), other=0.0),
                      EMU_BF16)  # [BLOCK_DV, BLOCK_N]
        s, dt = _scaled_scores(q, kT, scale, softcap, PREC, HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
        s = _mask_scores(s, offs_m[:, None], offs_n[None, :], Mask, smm, smn, NQ, NK, offset,
                         fill, MASK_KIND, CAUSAL)
        p = tl.math.exp2(tl.minimum(s * _LOG2E - lse2[:, None], 0.0))  # [BLOCK_M, BLOCK_N]
        dp = tl.dot(do, vT, input_precision=PREC)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N]
        if MASK_KIND == _BOOL_MASK:  # filled scores are constants: probability but no gradient
            ds = tl.where(_keep(Mask, offs_m[:, None], offs_n[None, :], smm, smn,
                                (offs_m[:, None] < NQ) & (offs_n[None, :] < NK)), ds, 0.0)
        if WRITE_DS:  # the additive mask's gradient: dS of the capped scores
            tl.store(DS + offs_m[:, None] * sdsm + offs_n[None, :], ds,
                     mask=(offs_m[:, None] < NQ) & (offs_n[None, :] < NK))
        if HAS_SOFTCAP:  # through the cap: d(softcap·tanh(x/softcap))/dx = 1 − t²
            ds = ds * dt
        dq = tl.dot(_lowp(ds, kT, EMU_BF16), tl.trans(kT), dq,
                    input_precision=PREC)  # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, Mask, DO, Lse, Delta, DQ, DS,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   smb, smh, smm, smn, sdb, sdh, sdm, sdd, slb, slh, slm,
                   sdqb, sdqh, sdqm, sdqd, sdsb, sdsh, sdsm,
                   GROUP, NQ, NK, D, DV, scale, fill, offset, softcap, NQ_BUCKET, NK_BUCKET,
                   MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                   EMU_BF16: tl.constexpr, WRITE_DS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    """dq for one query block of one query head; with WRITE_DS also dS into an fp32 buffer."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_m = offs_m < NQ
    q = _operand(tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                         mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0),
                 EMU_BF16)  # [BLOCK_M, BLOCK_D]
    do = _operand(tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                          mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0.0),
                  EMU_BF16)  # [BLOCK_M, BLOCK_DV]
    lse2 = _load_lse2(Lse + b * slb + h * slh + offs_m * slm, in_m)  # [BLOCK_M]
    delta = tl.load(Delta + (b * tl.num_programs(1) + h) * NQ + offs_m, mask=in_m, other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    Mask += b * smb + h * smh
    DS += b * sdsb + h * sdsh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, NK, offset, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, Mask, DS, offs_m, offs_d, offs_dv, 0, lo,
                   skn, skd, svn, svd, smm, smn, sdsm, NQ, NK, D, DV, scale, fill, offset,
                   softcap, MASK_KIND, False, PREC, EMU_BF16, WRITE_DS, HAS_SOFTCAP, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, Mask, DS, offs_m, offs_d, offs_dv, lo, hi,
                   skn, skd, svn, svd, smm, smn, sdsm, NQ, NK, D, DV, scale, fill, offset,
                   softcap, MASK_KIND, CAUSAL, PREC, EMU_BF16, WRITE_DS, HAS_SOFTCAP, BLOCK_N)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             _for_store(dq * scale, DQ, EMU_BF16), mask=in_m[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------- launch configs

def _is_interpreted(kernel: object) -> bool:
    """Whether triton built this kernel for its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


_INTERPRET = _is_interpreted(_fwd_kernel)
# Autotuning keys: sequence lengths by power-of-two bucket, so a new length rarely retunes.
_TUNE_KEY = ["NQ_BUCKET", "NK_BUCKET", "D", "DV", "MASK_KIND", "CAUSAL", "HAS_SOFTCAP"]
# Under the interpreter blocks are tiny so that tests cover many blocks quickly.
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
_PREPROCESS_BLOCK_M = 16 if _INTERPRET else 64


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                         num_stages=stages)


# Hopper-oriented candidates; configs that overflow shared memory (large D, fp32) fail to compile
# and the autotuner skips them, so each list ends with a small config that always fits.
# Pruned to three per kernel: every new (length bucket, D, mask, causal) key compiles and times
# each candidate, so a long list costs minutes of first-call latency per shape.
_FWD_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 2), _cfg(32, 32, 4, 1)]
_DKDV_CONFIGS = [_cfg(32, 64, 4, 2), _cfg(64, 64, 8, 2), _cfg(16, 32, 4, 1)]
_DQ_CONFIGS = [_cfg(64, 32, 4, 2), _cfg(128, 64, 8, 2), _cfg(32, 16, 4, 1)]


def _tuned(kernel: object, configs: list[triton.Config]) -> object:
    """Autotuned on GPUs; plain (fixed small blocks) under the interpreter, where timing is moot."""
    return kernel if _INTERPRET else triton.autotune(configs=configs, key=_TUNE_KEY)(kernel)


_fwd = _tuned(_fwd_kernel, _FWD_CONFIGS)
_dkdv = _tuned(_bwd_dkdv_kernel, _DKDV_CONFIGS)
_dq = _tuned(_bwd_dq_kernel, _DQ_CONFIGS)
_BLOCKS = _INTERPRET_BLOCKS if _INTERPRET else {}


# ----------------------------------------------------------------------------- host helpers

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
             causal: str) -> list[str]:
    """Human-readable reasons the kernel cannot run these inputs; empty list = supported."""
    reasons: list[str] = []
    tensors = (("q", q), ("k", k), ("v", v))
    if q.dtype not in _DTYPES:
        reasons.append(f"dtype {_dtype_name(q.dtype)} not supported: use float16/bfloat16/float32")
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
    if q.device.type == "cpu" and not _INTERPRET:
        reasons.append("device cpu needs TRITON_INTERPRET=1")
    elif q.device.type not in ("cpu", "cuda"):
        reasons.append(f"device {q.device.type} not supported")
    if any(t.dim() != 4 for _, t in tensors):
        return reasons
    b, hq, nq, d = q.shape
    if d > _MAX_HEAD_DIM:
        reasons.append(f"head dim {d} > {_MAX_HEAD_DIM}")
    if v.shape[-1] > _MAX_HEAD_DIM:
        reasons.append(f"value head dim {v.shape[-1]} > {_MAX_HEAD_DIM}")
    if k.shape[-1] != d:
        reasons.append(f"q head dim {d} != k head dim {k.shape[-1]}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b:
        reasons.append(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if k.shape[1] == 0 or hq % k.shape[1]:
        reasons.append(f"{hq} query heads not a multiple of {k.shape[1]} kv heads")
    if mask is not None:
        full = (b, hq, nq, k.shape[2])
        if mask.dtype not in _MASK_DTYPES:
            reasons.append(f"mask dtype {_dtype_name(mask.dtype)} not supported: "
                           "use bool or a float dtype")
        if mask.dim() != 4 or any(n not in (1, f) for n, f in zip(mask.shape, full)):
            reasons.append(f"mask {tuple(mask.shape)} is not a 4-D view broadcastable to {full}")
        if mask.device != q.device:
            reasons.append(f"mask is on {mask.device}, q on {q.device}")
    return reasons


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
           causal: str) -> None:
    reasons = supports(q, k, v, mask, causal)
    if reasons:
        raise ValueError("flash attention cannot run these inputs: " + "; ".join(reasons))


def _mask_args(mask: Optional[torch.Tensor], dummy: torch.Tensor
               ) -> tuple[torch.Tensor, tuple[int, int, int, int], int]:
    """(tensor to read, strides with 0 on broadcast dims, mask kind); bool is read as uint8."""
    if mask is None:
        return dummy, (0, 0, 0, 0), _NO_MASK.value
    strides = tuple(0 if n == 1 else s for n, s in zip(mask.shape, mask.stride()))
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), strides, _BOOL_MASK.value
    return mask, strides, _ADD_MASK.value


def _clamp_fill(mask_fill: float) -> float:
    """A finite fill stays finite in s·log2e (see _MIN_SCORE); ±inf passes through."""
    fill = float(mask_fill)
    return fill if not math.isfinite(fill) else max(_MIN_SCORE_F, min(-_MIN_SCORE_F, fill))


def _block(n: int) -> int:
    """Padded head-dim block: next power of two, at least 16 (the smallest tl.dot size)."""
    return max(16, triton.next_power_of_2(n))


def _device_ctx(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _common(q: torch.Tensor, k: torch.Tensor, scale: Optional[float], causal: str,
            mask_fill: float, softcap: float) -> dict:
    """Kernel arguments shared by the forward and both backward kernels."""
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return dict(GROUP=q.shape[1] // k.shape[1], NQ=nq, NK=nk, D=d, scale=scale,
                fill=_clamp_fill(mask_fill), offset=nk - nq if causal == "bottom_right" else 0,
                softcap=softcap, HAS_SOFTCAP=softcap > 0.0,
                NQ_BUCKET=triton.next_power_of_2(nq), NK_BUCKET=triton.next_power_of_2(nk),
                CAUSAL=causal != "none", PREC="ieee" if q.dtype == torch.float32 else "tf32",
                EMU_BF16=_INTERPRET and q.dtype == torch.bfloat16,
                BLOCK_D=_block(d))


# ----------------------------------------------------------------------------- public API

def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                  causal: str = "none", mask_fill: float = float("-inf"),
                  softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B,Hq,Nq,Dv] in q.dtype (contiguous), lse [B,Hq,Nq] fp32 (natural log; -inf on empty
    rows). ``scale=None`` means 1/sqrt(D); ``softcap > 0`` soft-caps the scores, 0 disables it.
    Raises ValueError with ``supports``' reasons, or for a negative/NaN/inf softcap."""
    softcap = check_softcap(softcap)
    _check(q, k, v, mask, causal)
    b, hq, nq, _ = q.shape
    dv_dim = v.shape[3]
    out = torch.empty((b, hq, nq, dv_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse
    m, m_strides, kind = _mask_args(mask, q)
    args = _common(q, k, scale, causal, mask_fill, softcap)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(nq, meta["BLOCK_M"]), hq, b)

    with _device_ctx(q):
        _fwd[grid](q, k, v, m, out, lse, *q.stride(), *k.stride(), *v.stride(), *m_strides,
                   *out.stride(), *lse.stride(), DV=dv_dim, MASK_KIND=kind,
                   BLOCK_DV=_block(dv_dim), **args, **_BLOCKS)
    return out, lse


def flash_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                   scale: Optional[float] = None, causal: str = "none",
                   mask_fill: float = float("-inf"), mask_grad: bool = False,
                   softcap: float = 0.0,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """dq, dk, dv (same dtype/shape as q, k, v; contiguous), dmask shaped like mask (only when
    mask_grad, else None). ``lse`` is the forward's (natural log); ``out``/``dout`` any strides.
    ``softcap`` must be the forward's; dmask is the gradient of the capped scores."""
    softcap = check_softcap(softcap)
    _check(q, k, v, mask, causal)
    if mask_grad and (mask is None or mask.dtype == torch.bool):
        raise ValueError("mask_grad=True needs an additive float mask")
    if dout.dtype != q.dtype or dout.shape != out.shape:
        raise ValueError(f"dout {dout.dtype} {tuple(dout.shape)} must match out {q.dtype} "
                         f"{tuple(out.shape)}")
    b, hq, nq, _ = q.shape
    hkv, nk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # dS for the mask gradient: fp32 [B, Hq, Nq, Nk]; entries outside the causal band stay 0.
    ds = torch.zeros((b, hq, nq, nk), dtype=torch.float32, device=q.device) if mask_grad else None
    if b * hq * nq * nk == 0:
        for t in (dq, dk, dv):
            t.zero_()
    else:
        m, m_strides, kind = _mask_args(mask, q)
        args = _common(q, k, scale, causal, mask_fill, softcap)
        delta = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
        bdv = _block(dv_dim)
        shared = (*q.stride(), *k.stride(), *v.stride(), *m_strides, *dout.stride(), *lse.stride())
        ds_arg, ds_strides = (ds, ds.stride()[:3]) if ds is not None else (q, (0, 0, 0))

        def grid_q(meta: dict) -> tuple[int, int, int]:
            return (triton.cdiv(nq, meta["BLOCK_M"]), hq, b)

        def grid_k(meta: dict) -> tuple[int, int, int]:
            return (triton.cdiv(nk, meta["BLOCK_N"]), hkv, b)

        with _device_ctx(q):
            _bwd_preprocess[grid_q](out, dout, delta, *out.stride(), *dout.stride(), nq, dv_dim,
                                    BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_DV=bdv)
            _dkdv[grid_k](q, k, v, m, dout, lse, delta, dk, dv, *shared, *dk.stride(),
                          *dv.stride(), HQ=hq, DV=dv_dim, MASK_KIND=kind, BLOCK_DV=bdv,
                          **args, **_BLOCKS)
            _dq[grid_q](q, k, v, m, dout, lse, delta, dq, ds_arg, *shared, *dq.stride(),
                        *ds_strides, DV=dv_dim, MASK_KIND=kind, WRITE_DS=mask_grad, BLOCK_DV=bdv,
                        **args, **_BLOCKS)
    dmask = None
    if ds is not None:
        # dS summed over the dims the mask broadcasts on (size 1), like autograd's expand backward.
        dims = [i for i, n in enumerate(mask.shape) if n == 1 and ds.shape[i] != 1]
        dmask = (ds.sum(dim=dims, keepdim=True) if dims else ds).to(mask.dtype)
    return dq, dk, dv, dmask
