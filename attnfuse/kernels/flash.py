"""FlashAttention-2 in Triton: forward, backward, and the check that says when they apply.

Legend (the symbols of ``reference.py``; every tile comment uses them)::

    q   [B, Hq,  Nq, D]     k [B, Hkv, Nk, D]     v [B, Hkv, Nk, Dv]     G = Hq // Hkv
    out [B, Hq,  Nq, Dv]    lse [B, Hq, Nq]   (fp32, natural log, -inf on rows with no key)
    mask read through strides as [B, Hq, Nq, Nk] (stride 0 on broadcast dims), never expanded;
    with query-row stride 0 (key padding [B,1,1,Nk], biases [B,Hq,1,Nk]) MASK_ROWS_BCAST reads
    one [BLOCK_N] row per key tile and broadcasts it over the query rows

    Scores are kept in base 2 (log2 e folded into the scale, so every exponential is one exp2):
    s   = scale·log2e·q·kᵀ
    s   = softcap·log2e·t,  t = tanh(scale·q·kᵀ / softcap)     only with HAS_SOFTCAP, pre-mask
    s   = s + log2e·mask   or  log2e·mask_fill where a bool mask is False
          MASK_ROWS_BCAST: one FMA per score, s = y·c' + b' where y·c is the unmasked s and,
          per key, c' = c, b' = log2e·mask (additive), b' = 0 (kept) or c' = 0, b' = log2e·fill
    s   = -inf outside the band  i + off − left <= j <= i + off + right  and outside Nk
          (causal is the band with right = 0; off = Nk − Nq for bottom-right alignment, else 0)
    m   = running row max of s    p = exp2(s − m)    l = running row sum of p
    acc = Σ (p ∘ keep)·v    out = acc / l / (1 − p_drop)    lse = (m + log2 l)·ln 2
    keep = Philox(seed; j, i, b·Hq + h) >= p_drop           only with DROPOUT (else all kept)
    backward: p = exp2(s − m2 − l2) with (m2, l2) = (lse·log2e, 0), or, where finite scores of
              any size can occur (EXACT_ROWS: additive masks, finite fills), the row's own max m
              and log2 l for rows whose |lse·log2e| >= 1024 (beside such an m, log2 l vanishes
              in one fp32: a row fully masked by finfo.min would lose its gradients)
              dP = dO·vᵀ ∘ keep/(1 − p_drop)   δ = rowsum(dO ∘ out)
              dS = p ∘ (dP − δ)  (0 where a bool mask filled the score: a constant has no gradient)
              dmask = dS   then dS = dS ∘ (1 − t²) with HAS_SOFTCAP (through the cap)
              dq = scale·dS·k   dk = scale·Σ_group dSᵀ·q   dv = Σ_group (p ∘ keep/(1 − p_drop))ᵀ·dO

Tiles. For one query block the key tiles split into *full* tiles, every (row, key) pair inside
the band and in bounds, which run with no masking arithmetic at all, and *edge* tiles (the band's
diagonals, the ragged last tile), which are masked; the same split over query tiles serves the
dK/dV kernel. Tiles wholly outside the band are never visited (causal and sliding-window skip),
nor, with a row-broadcast mask whose dropped keys score -inf (key padding), tiles before its
first or after its last kept key (TRIM_KEYS: the padded tail of each sequence costs nothing).

Kernels: ``_fwd_kernel`` (grid: query blocks x Hq x B, longest causal blocks first),
``_bwd_preprocess`` (δ), ``_bwd_row_stats`` (EXACT_ROWS only: (m2, l2), recomputing m and l for
the rare query block with a huge row), ``_bwd_dkdv_kernel`` (a K/V block stays put, loops over
the G query heads and their query tiles) and ``_bwd_dq_kernel`` (a Q block stays put, loops over
key tiles; optionally stores dS for the mask gradient). Each loop body is one tile step
(``_fwd_step``, ``_dkdv_step``, ``_dq_step``) that the block-sparse kernels (``sparse.py``) run
over their block lists. The backward uses no atomics, so it is
deterministic: the same inputs give bitwise the same gradients, run after run. Variants (mask kind,
row-broadcast mask, soft-cap, dropout, fp32 dots, dS output, tensor-descriptor loads) are
constexpr flags; ``softcap=0``/``dropout_p=0`` compile no cap/RNG code. On Hopper (sm_90+) the
forward may load through TMA tensor descriptors when strides allow; every other GPU (and the
interpreter, unless asked) uses pointer loads, so the same kernel builds for sm_80.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import (cdiv, check_dropout, check_seed, check_softcap, check_window,
                        next_pow2, operand_reasons)

try:  # TMA tensor descriptors built on the host (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

_LOG2E_F = 1.4426950408889634
_LN2_F = 0.6931471805599453
_FP32_MAX = 3.4028234663852886e38
_MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# An unbounded side of the band: far beyond any index, small enough that i ± it fits in int32.
_UNBOUNDED = 1 << 30

_LOG2E = tl.constexpr(_LOG2E_F)
_LN2 = tl.constexpr(_LN2_F)
# Finite fills and additive-mask entries (base 2) are clamped to at least this, so that they stay
# "huge but finite" (as the reference sees them) and s − m never overflows.
_MIN_SCORE2_F = -_FP32_MAX * 0.999
_MIN_SCORE2 = tl.constexpr(_MIN_SCORE2_F)
# Rows whose base-2 lse reaches this size (natural-log scores past ~710: only masks' fills
# produce them) get exact row statistics in the backward (_bwd_row_stats); below it the fp32
# lse's rounding changes p by less than 2^-13 relative.
_EXACT_ROW_BOUND = tl.constexpr(1024.0)
_NO_MASK = tl.constexpr(0)
_BOOL_MASK = tl.constexpr(1)
_ADD_MASK = tl.constexpr(2)


# ----------------------------------------------------------------------------- shared helpers

@triton.jit
def _load(Ptr, rows, cols, stride, NR, NC, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Tile ``Ptr[rows, cols]`` (unit column stride); out-of-range entries read as 0. Bounds are
    checked only where asked, so full tiles issue unpredicated loads."""
    ptrs = Ptr + rows[:, None] * stride + cols[None, :]
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < NR) & (cols[None, :] < NC), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < NR, other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < NC, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _bias2(bias):
    """Additive-mask entries in base 2 (fp32), finite ones clamped to at least _MIN_SCORE2."""
    bias = bias.to(tl.float32)
    return tl.where(bias == float("-inf"), bias, tl.maximum(bias * _LOG2E, _MIN_SCORE2))


@triton.jit
def _user_mask(s, rows, cols, Mask, smm, smn, NQ, NK, fill2, MASK_KIND: tl.constexpr,
               FULL: tl.constexpr = False, FAST: tl.constexpr = False):
    """Apply the user's bool/additive mask (a dense tile read by strides) to base-2 scores.
    FULL (every key of the tile < Nk): no per-entry bounds test; rows past Nq read row Nq − 1
    (they are never stored). FAST: an additive entry is added as log2e·bias in one FMA, without
    _bias2's clamp, so an entry below -FLT_MAX/log2e (a finfo.min fill) overflows to -inf. That
    changes nothing for a row that keeps any other key; a row left with no key (sum 0) is
    recomputed exactly by the caller."""
    if MASK_KIND != _NO_MASK:
        if FULL:
            ptrs = Mask + tl.minimum(rows, NQ - 1) * smm + cols * smn
            tile = tl.load(ptrs)
        else:
            inside = (rows < NQ) & (cols < NK)
            ptrs = Mask + rows * smm + cols * smn
            # out-of-range entries count as kept / add 0 (the band drops those keys)
            if MASK_KIND == _BOOL_MASK:
                tile = tl.load(ptrs, mask=inside, other=1)
            else:
                tile = tl.load(ptrs, mask=inside, other=0.0)
        if MASK_KIND == _BOOL_MASK:  # read as uint8
            s = tl.where(tile != 0, s, fill2)
        elif FAST:
            s = s + tile.to(tl.float32) * _LOG2E
        else:
            s = s + _bias2(tile)
    return s


@triton.jit
def _mask_row(Mask, start_n, smn, NK, CHECK: tl.constexpr, MASK_KIND: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """The mask row every query row shares (MASK_ROWS_BCAST: query-row stride 0, e.g. key
    padding) over keys [start_n, start_n + BLOCK_N): keep flags (bool mask, read as uint8) or
    the base-2 additive bias. With CHECK, keys past Nk read as kept / 0 (the band drops them).
    Addressed from the scalar start_n, not from the tile's key indices: a software-pipelined
    prefetch of this load then carries no [BLOCK_N] index vector across stages."""
    idx = tl.arange(0, BLOCK_N)
    ptrs = Mask + start_n * smn + idx * smn  # [BLOCK_N]
    if MASK_KIND == _BOOL_MASK:
        if CHECK:
            row = tl.load(ptrs, mask=idx < NK - start_n, other=1) != 0
        else:
            row = tl.load(ptrs) != 0
    else:
        if CHECK:
            row = _bias2(tl.load(ptrs, mask=idx < NK - start_n, other=0.0))
        else:
            row = _bias2(tl.load(ptrs))
    return row


@triton.jit
def _kept_range(Mask, smn, NK, MASK_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """[first, last + 1) of the keys a row-broadcast mask keeps (bool True, additive > -inf)
    in one head's mask row; (Nk, 0) when it keeps none. TRIM_KEYS bounds the key loop by it: a
    key outside adds exp2(-inf) = 0 to every row, so skipping its tile changes nothing (the
    host sets TRIM_KEYS only when a masked key's score is -inf, not a finite fill)."""
    first = NK
    last = NK * 0 - 1
    for start in range(0, NK, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inside = idx < NK
        if MASK_KIND == _BOOL_MASK:
            kept = tl.load(Mask + idx * smn, mask=inside, other=0) != 0
        else:
            kept = tl.load(Mask + idx * smn, mask=inside, other=float("-inf")) != float("-inf")
        first = tl.minimum(first, tl.min(tl.where(kept, idx, NK), 0))
        last = tl.maximum(last, tl.max(tl.where(kept, idx, -1), 0))
    return first, last + 1


@triton.jit
def _masked_scores2(y, c, mrow, rows, cols, Mask, smm, smn, NQ, NK, fill2,
                    MASK_KIND: tl.constexpr, MASK_ROWS_BCAST: tl.constexpr,
                    FULL: tl.constexpr = False, FAST: tl.constexpr = False):
    """Base-2 scores c·y (see ``_raw_scores``) under the user's mask. MASK_ROWS_BCAST: ``mrow``
    (``_mask_row`` broadcast over the query axis, [1, BLOCK_N] or [BLOCK_N, 1]) rides on the
    scale in one FMA, no mask tile is read; otherwise the dense tile (``_user_mask``)."""
    if MASK_ROWS_BCAST:
        if MASK_KIND == _BOOL_MASK:
            # A filled score is exactly the fill (the score plus the fill only agrees for an
            # infinite fill). A select keeps one [BLOCK_N] vector of flags live, not two fp32
            # vectors (multiplier and addend), for fewer registers (sm_90, 128x128 tiles).
            s = tl.where(mrow, y * c, fill2)
        else:
            s = y * c + mrow
    else:
        s = _user_mask(y * c, rows, cols, Mask, smm, smn, NQ, NK, fill2, MASK_KIND, FULL, FAST)
    return s


@triton.jit
def _band(s, rows, cols, NK, offset, left, right):
    """-inf outside the band i + off − left <= j <= i + off + right and outside [0, Nk)."""
    diag = rows + offset
    inside = (cols < NK) & (cols >= diag - left) & (cols <= diag + right)
    return tl.where(inside, s, float("-inf"))


@triton.jit
def _keep_bool(Mask, rows, cols, smm, smn, NQ, NK):
    """Bool-mask tile (True = attend), read as uint8; out-of-bounds entries count as kept."""
    return tl.load(Mask + rows * smm + cols * smn, mask=(rows < NQ) & (cols < NK), other=1) != 0


@triton.jit
def _dropout_keep(seed, bh, rows, cols, drop_p):
    """Which (row, key) pairs dropout keeps: Philox keyed by ``seed`` with counters (key, row,
    batch·Hq + head), so any tile shape and any kernel (forward, both backward kernels) draws the
    same number for the same pair."""
    c0 = cols + rows * 0
    c1 = rows + cols * 0
    c2 = c0 * 0 + bh
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c2 * 0)
    return tl.uint_to_uniform_float(r0) >= drop_p


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
def _raw_scores(q, kT, scale, softcap, PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``(y, c, 1 − t²)`` with the unmasked base-2 scores s = c·y: y = q·kᵀ and c = scale·log2e;
    with HAS_SOFTCAP y = t = tanh(scale·q·kᵀ / softcap) and c = softcap·log2e (else 1 − t² is a
    dummy 1). The caller multiplies, so a row-broadcast mask can share that FMA."""
    x = tl.dot(q, kT, input_precision=PREC)
    if HAS_SOFTCAP:
        y, dt = _tanh_parts(x * (scale / softcap))
        c = softcap * _LOG2E
    else:
        y = x
        c = scale * _LOG2E
        dt = 1.0
    return y, c, dt


@triton.jit
def _split(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Tiles of BLOCK covering [lo, hi): edge tiles [t0, f0) and [f1, t1), full tiles [f0, f1)
    (inside [full_lo, full_hi)). All four are multiples of BLOCK; lo, full_lo >= 0."""
    t0 = lo // BLOCK * BLOCK
    t1 = tl.maximum((tl.maximum(hi, lo) + BLOCK - 1) // BLOCK * BLOCK, t0)
    f0 = tl.minimum(tl.maximum((full_lo + BLOCK - 1) // BLOCK * BLOCK, t0), t1)
    f1 = tl.minimum(tl.maximum(tl.maximum(full_hi, 0) // BLOCK * BLOCK, f0), t1)
    return t0, f0, f1, t1


@triton.jit
def _key_tiles(start_m, NK, offset, left, right, klo, khi, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key tiles of the query block [start_m, start_m + BLOCK_M): see ``_split``; only keys in
    [klo, khi) (the mask's kept range, ``_kept_range``; else 0, Nk) are visited."""
    last = start_m + BLOCK_M - 1
    lo = tl.maximum(tl.maximum(start_m + offset - left, 0), klo)  # some row sees keys from here
    hi = tl.minimum(tl.minimum(last + offset + right + 1, NK), khi)
    full_lo = tl.maximum(last + offset - left, 0)  # every row sees keys [full_lo, full_hi)
    full_hi = tl.minimum(start_m + offset + right + 1, NK)
    return _split(lo, hi, full_lo, full_hi, BLOCK_N)


@triton.jit
def _query_tiles(start_n, NQ, NK, offset, left, right, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Query tiles that see the key block [start_n, start_n + BLOCK_N): see ``_split``. A key
    block that runs past Nk has edge tiles only."""
    last = start_n + BLOCK_N - 1
    lo = tl.maximum(start_n - offset - right, 0)
    hi = tl.minimum(last - offset + left + 1, NQ)
    full_lo = tl.maximum(last - offset - right, 0)
    full_hi = tl.where(last < NK, tl.minimum(start_n - offset + left + 1, NQ), 0)
    return _split(lo, hi, full_lo, full_hi, BLOCK_M)


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
    """Saved lse times log2 e; empty rows (-inf) become +inf so that exp2(s − lse2) = 0."""
    lse = tl.load(ptrs, mask=valid, other=float("-inf")).to(tl.float32)
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


@triton.jit
def _row_stats(Lse, offs_m, slm, NQ, EXACT_ROWS: tl.constexpr):
    """``(m2, l2)`` of one query head's rows, such that the backward's p = exp2(s − m2 − l2).
    Default: ``Lse`` is the saved lse, m2 = lse·log2e, l2 = 0. EXACT_ROWS: ``Lse`` points at
    this head's [2, Nq] of ``_bwd_row_stats``' output, where rows of huge finite scores keep
    the row max and log2 of the sum apart (the sum vanishes beside the max in one fp32)."""
    valid = offs_m < NQ
    if EXACT_ROWS:
        m2 = tl.load(Lse + offs_m * slm, mask=valid, other=float("inf"))
        l2 = tl.load(Lse + (NQ + offs_m) * slm, mask=valid, other=0.0)
    else:
        m2 = _load_lse2(Lse + offs_m * slm, valid)
        l2 = tl.zeros_like(m2)
    return m2, l2


@triton.jit
def _probs(s, m2, l2, EXACT_ROWS: tl.constexpr):
    """p = exp2(s − m2 − l2) (m2, l2 broadcast like ``s``), at most 1: the clamp stops rounding
    of a huge m2 from giving inf. The subtraction of l2 apart is only compiled for EXACT_ROWS."""
    if EXACT_ROWS:
        d = (s - m2) - l2
    else:
        d = s - m2
    return tl.math.exp2(tl.minimum(d, 0.0))


# ----------------------------------------------------------------------------- forward

@triton.jit
def _fwd_step(acc, l_i, m_i, q, K, V, desc_k, desc_v, Mask, seed, bh, b32, hk32, offs_m, start_n,
              skn, svn, smm, smn, NQ, NK, scale, fill2, offset, left, right, softcap, drop_p,
              EDGE: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS_BCAST: tl.constexpr,
              DROPOUT: tl.constexpr, FOLD_SCALE: tl.constexpr, PREC: tl.constexpr,
              EMU_BF16: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_DESC: tl.constexpr,
              BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, FAST_MASK: tl.constexpr, STATS_ONLY: tl.constexpr):
    """One key tile [start_n, start_n + BLOCK_N) of the online softmax (FlashAttention-2's
    inner step; the block-sparse kernels take it too). EDGE tiles apply the band and bounds;
    full tiles skip them. A row-broadcast mask (MASK_ROWS_BCAST) is one [BLOCK_N] load per key
    tile, folded with the scale into one FMA. STATS_ONLY: m and l alone (no V, no P·V; the
    backward's exact row statistics)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if USE_DESC:  # TMA: out-of-range rows arrive as zeros
        k = desc_k.load([b32, hk32, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        k = _load(K, offs_n, tl.arange(0, BLOCK_D), skn, NK, D, EDGE, D != BLOCK_D)
    kT = tl.trans(_operand(k, EMU_BF16))  # [BLOCK_D, BLOCK_N]
    if FOLD_SCALE and not EDGE and MASK_KIND == _NO_MASK and not HAS_SOFTCAP:
        # Plain full tile: the scale rides on the row max and on one FMA before exp2.
        x = tl.dot(q, kT, input_precision=PREC)  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(x, 1) * (scale * _LOG2E))  # [BLOCK_M]
        m_safe = m_new
        p = tl.math.exp2(x * (scale * _LOG2E) - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    else:
        y, c, _ = _raw_scores(q, kT, scale, softcap, PREC, HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
        if MASK_ROWS_BCAST:  # the same mask for every query row: a vector, no tile
            mrow = _mask_row(Mask, start_n, smn, NK, EDGE, MASK_KIND,
                             BLOCK_N)[None, :]  # [1, BLOCK_N]
        else:
            mrow = 0
        s = _masked_scores2(y, c, mrow, offs_m[:, None], offs_n[None, :], Mask, smm, smn,
                            NQ, NK, fill2, MASK_KIND, MASK_ROWS_BCAST, not EDGE,
                            FAST_MASK)  # [BLOCK_M, BLOCK_N]
        if EDGE:
            s = _band(s, offs_m[:, None], offs_n[None, :], NK, offset, left, right)
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
        # A row with no key so far has m = -inf: subtract 0 instead, so p = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.math.exp2(m_i - m_safe)  # [BLOCK_M]
    l_i = l_i * alpha + tl.sum(p, 1)
    if not STATS_ONLY:
        if USE_DESC:
            v = desc_v.load([b32, hk32, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v = _load(V, offs_n, tl.arange(0, BLOCK_DV), svn, NK, DV, EDGE, DV != BLOCK_DV)
        v = _operand(v, EMU_BF16)  # [BLOCK_N, BLOCK_DV]
        if DROPOUT:  # l keeps every p (the softmax's denominator); acc only the kept ones
            p = tl.where(_dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], drop_p),
                         p, 0.0)
        acc = acc * alpha[:, None]  # [BLOCK_M, BLOCK_DV]
        acc = tl.dot(_lowp(p, v, EMU_BF16), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, desc_k, desc_v, Mask, seed, bh, b32, hk32, offs_m, lo, hi,
               skn, svn, smm, smn, NQ, NK, scale, fill2, offset, left, right, softcap, drop_p,
               EDGE: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS_BCAST: tl.constexpr,
               DROPOUT: tl.constexpr, FOLD_SCALE: tl.constexpr, PREC: tl.constexpr,
               EMU_BF16: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_DESC: tl.constexpr,
               BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, FAST_MASK: tl.constexpr, STATS_ONLY: tl.constexpr):
    """``_fwd_step`` over the key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, desc_k, desc_v, Mask, seed, bh, b32,
                                  hk32, offs_m, start_n, skn, svn, smm, smn, NQ, NK, scale,
                                  fill2, offset, left, right, softcap, drop_p, EDGE, MASK_KIND,
                                  MASK_ROWS_BCAST, DROPOUT, FOLD_SCALE, PREC, EMU_BF16,
                                  HAS_SOFTCAP, USE_DESC, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV,
                                  FAST_MASK, STATS_ONLY)
    return acc, l_i, m_i


@triton.jit
def _fwd_rows(q, K, V, desc_k, desc_v, Mask, seed, bh, b32, hk32, offs_m, t0, f0, f1, t1,
              skn, svn, smm, smn, NQ, NK, scale, fill2, offset, left, right, softcap, drop_p,
              MASK_KIND: tl.constexpr, MASK_ROWS_BCAST: tl.constexpr, DROPOUT: tl.constexpr,
              FOLD_SCALE: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, USE_DESC: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, FAST_MASK: tl.constexpr, STATS_ONLY: tl.constexpr = False):
    """acc, l, m of one query block: full key tiles [f0, f1), then the edge tiles [t0, f0) and
    [f1, t1). STATS_ONLY: l and m alone (acc stays 0)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, desc_k, desc_v, Mask, seed, bh, b32, hk32,
                               offs_m, f0, f1, skn, svn, smm, smn, NQ, NK, scale, fill2, offset,
                               left, right, softcap, drop_p, False, MASK_KIND, MASK_ROWS_BCAST,
                               DROPOUT, FOLD_SCALE, PREC, EMU_BF16, HAS_SOFTCAP, USE_DESC,
                               BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, FAST_MASK, STATS_ONLY)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, desc_k, desc_v, Mask, seed, bh, b32, hk32,
                               offs_m, t0, f0, skn, svn, smm, smn, NQ, NK, scale, fill2, offset,
                               left, right, softcap, drop_p, True, MASK_KIND, MASK_ROWS_BCAST,
                               DROPOUT, FOLD_SCALE, PREC, EMU_BF16, HAS_SOFTCAP, USE_DESC,
                               BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, FAST_MASK, STATS_ONLY)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, desc_k, desc_v, Mask, seed, bh, b32, hk32,
                               offs_m, f1, t1, skn, svn, smm, smn, NQ, NK, scale, fill2, offset,
                               left, right, softcap, drop_p, True, MASK_KIND, MASK_ROWS_BCAST,
                               DROPOUT, FOLD_SCALE, PREC, EMU_BF16, HAS_SOFTCAP, USE_DESC,
                               BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, FAST_MASK, STATS_ONLY)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Mask, Out, Lse, Seed, desc_q, desc_k, desc_v, desc_o,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, smb, smh, smm, smn,
                sob, soh, som, slb, slh, slm,
                HQ, GROUP, NQ, NK, scale, fill2, offset, left, right, softcap, drop_p, keep_scale,
                NQ_BUCKET, NK_BUCKET, BANDED, DESC_OK,
                D: tl.constexpr, DV: tl.constexpr, MASK_KIND: tl.constexpr,
                MASK_ROWS_BCAST: tl.constexpr, TRIM_KEYS: tl.constexpr, FAST_MASK: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                FOLD_SCALE: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr,
                USE_DESC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """out and lse for one query block of one query head."""
    # Last query blocks first: under a causal band they have the most keys (shortest tail).
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h32 = tl.program_id(1)
    b32 = tl.program_id(2)
    hk32 = h32 // GROUP  # GQA: the kv head this query head reads
    h = h32.to(tl.int64)
    b = b32.to(tl.int64)
    hk = hk32.to(tl.int64)
    bh = b32 * HQ + h32
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if USE_DESC:
        q = desc_q.load([b32, h32, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q = _load(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, NQ, D, True, D != BLOCK_D)
    q = _operand(q, EMU_BF16)  # [BLOCK_M, BLOCK_D]
    seed = tl.load(Seed) if DROPOUT else 0
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    Mask += b * smb + h * smh
    klo, khi = 0, NK
    if TRIM_KEYS:  # e.g. key padding: no tile past the last kept key (or before the first)
        klo, khi = _kept_range(Mask, smn, NK, MASK_KIND, 1024)
    t0, f0, f1, t1 = _key_tiles(start_m, NK, offset, left, right, klo, khi, BLOCK_M, BLOCK_N)
    # FAST_MASK (a dense additive mask): the fast FMA first (see _user_mask); the rare block
    # with a row left without keys (a fully masked row) is recomputed with the exact clamp.
    acc, l_i, m_i = _fwd_rows(q, K, V, desc_k, desc_v, Mask, seed, bh, b32, hk32, offs_m,
                              t0, f0, f1, t1, skn, svn, smm, smn, NQ, NK, scale, fill2, offset,
                              left, right, softcap, drop_p, MASK_KIND, MASK_ROWS_BCAST, DROPOUT,
                              FOLD_SCALE, PREC, EMU_BF16, HAS_SOFTCAP, USE_DESC, BLOCK_M,
                              BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, FAST_MASK)
    if FAST_MASK:
        if tl.min(l_i, 0) == 0.0:
            acc, l_i, m_i = _fwd_rows(q, K, V, desc_k, desc_v, Mask, seed, bh, b32, hk32, offs_m,
                                      t0, f0, f1, t1, skn, svn, smm, smn, NQ, NK, scale, fill2,
                                      offset, left, right, softcap, drop_p, MASK_KIND,
                                      MASK_ROWS_BCAST, DROPOUT, FOLD_SCALE, PREC, EMU_BF16,
                                      HAS_SOFTCAP, USE_DESC, BLOCK_M, BLOCK_N, D, DV, BLOCK_D,
                                      BLOCK_DV, False)
    empty = l_i == 0.0  # no key at all: out = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (keep_scale / l_safe)[:, None]  # [BLOCK_M, BLOCK_DV]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)  # [BLOCK_M]
    if USE_DESC:  # TMA clips the rows past Nq
        desc_o.store([b32, h32, start_m, 0],
                     _for_store(out, Out, EMU_BF16).reshape(1, 1, BLOCK_M, BLOCK_DV))
    else:
        ptrs = Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :]
        tl.store(ptrs, _for_store(out, Out, EMU_BF16),
                 mask=(offs_m[:, None] < NQ) & (offs_dv[None, :] < DV))
    tl.store(Lse + b * slb + h * slh + offs_m * slm, lse, mask=offs_m < NQ)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _bwd_preprocess(Out, DO, Delta, sob, soh, som, sdb, sdh, sdm, NQ, DV,
                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """δ = rowsum(dO ∘ out) in fp32, stored contiguous [B, Hq, Nq]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load(Out + b * sob + h * soh, offs_m, offs_dv, som, NQ, DV, True, True).to(tl.float32)
    do = _load(DO + b * sdb + h * sdh, offs_m, offs_dv, sdm, NQ, DV, True, True).to(tl.float32)
    row = (b * tl.num_programs(1) + h) * NQ
    tl.store(Delta + row + offs_m, tl.sum(o * do, 1), mask=offs_m < NQ)


@triton.jit
def _saved_stats(Lse, offs_m, slm, NQ):
    """(m2, l2) = (lse·log2e, 0) of one head's rows from the saved lse (+inf where a row has no
    key), and whether any of them is huge (|m2| >= _EXACT_ROW_BOUND: recompute the block)."""
    m2 = _load_lse2(Lse + offs_m * slm, offs_m < NQ)  # [BLOCK_M]
    big = tl.max(tl.where(m2 == float("inf"), 0.0, tl.abs(m2)), 0)
    return m2, tl.zeros_like(m2), big >= _EXACT_ROW_BOUND


@triton.jit
def _stats_of(m_i, l_i):
    """(m2, l2) = (m, log2 l) of rows with running max m and sum l; (+inf, 0) for a row with no
    key (p = 0 there)."""
    empty = l_i == 0.0
    return (tl.where(empty, float("inf"), m_i),
            tl.where(empty, 0.0, tl.math.log2(tl.where(empty, 1.0, l_i))))


@triton.jit
def _store_stats(Stats, offs_m, NQ, m2, l2):
    """One head's rows of the row statistics ([2, Nq]: m2, then l2)."""
    tl.store(Stats + offs_m, m2, mask=offs_m < NQ)
    tl.store(Stats + NQ + offs_m, l2, mask=offs_m < NQ)


@triton.jit
def _bwd_row_stats(Q, K, Mask, Lse, Stats, sqb, sqh, sqm, skb, skh, skn, smb, smh, smm, smn,
                   slb, slh, slm, HQ, GROUP, NQ, NK, scale, fill2, offset, left, right, softcap,
                   D: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS_BCAST: tl.constexpr,
                   TRIM_KEYS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                   EMU_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """Stats [B, Hq, 2, Nq] = (m2, l2) per row for the backward's p = exp2(s − m2 − l2).

    lse2 = m + log2 l in one fp32 loses log2 l once |m| is huge: a row whose every key carries
    a finite fill (finfo.min, -1e9) has m near the fill and l up to Nk, and exp2(s − lse2) then
    gives 1 or 0 instead of 1/l. A query block with such a row (|lse2| >= _EXACT_ROW_BOUND)
    recomputes m and l with the forward's loop (scores only); every other block keeps
    (lse2, 0) and costs one load and two stores."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m2, l2, huge = _saved_stats(Lse + b * slb + h * slh, offs_m, slm, NQ)  # [BLOCK_M] each
    if huge:
        q = _operand(_load(Q + b * sqb + h * sqh, offs_m, tl.arange(0, BLOCK_D), sqm, NQ, D,
                           True, D != BLOCK_D), EMU_BF16)  # [BLOCK_M, BLOCK_D]
        Kh = K + b * skb + (h // GROUP) * skh
        Maskh = Mask + b * smb + h * smh
        klo, khi = 0, NK
        if TRIM_KEYS:
            klo, khi = _kept_range(Maskh, smn, NK, MASK_KIND, 1024)
        t0, f0, f1, t1 = _key_tiles(start_m, NK, offset, left, right, klo, khi, BLOCK_M,
                                    BLOCK_N)
        _, l_i, m_i = _fwd_rows(q, Kh, Kh, Kh, Kh, Maskh, 0, 0, 0, 0, offs_m, t0, f0, f1, t1,
                                skn, skn, smm, smn, NQ, NK, scale, fill2, offset, left, right,
                                softcap, 0.0, MASK_KIND, MASK_ROWS_BCAST, False, False, PREC,
                                EMU_BF16, HAS_SOFTCAP, False, BLOCK_M, BLOCK_N, D, D, BLOCK_D,
                                BLOCK_D, False, True)
        m2, l2 = _stats_of(m_i, l_i)
    _store_stats(Stats + (b * HQ + h) * 2 * NQ, offs_m, NQ, m2, l2)


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, Lse, Delta, Mask, mrow, seed, bh, offs_n, start_m,
               sqm, sdm, slm, smm, smn, NQ, NK, scale, fill2, offset, left, right, softcap,
               drop_p, keep_scale, EDGE: tl.constexpr, EXACT_ROWS: tl.constexpr,
               MASK_KIND: tl.constexpr, MASK_ROWS_BCAST: tl.constexpr, DROPOUT: tl.constexpr,
               PREC: tl.constexpr, EMU_BF16: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               BLOCK_M: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr):
    """dk, dv of one key block from the query tile [start_m, start_m + BLOCK_M) of one query
    head (the block-sparse kernels take it too). MASK_ROWS_BCAST: ``mrow`` [BLOCK_N, 1] is the
    key block's mask row (``_mask_row``)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    in_m = offs_m < NQ
    q = _operand(_load(Q, offs_m, tl.arange(0, BLOCK_D), sqm, NQ, D, EDGE, D != BLOCK_D),
                 EMU_BF16)  # [BLOCK_M, BLOCK_D]
    yT, c, dtT = _raw_scores(k, tl.trans(q), scale, softcap, PREC,
                             HAS_SOFTCAP)  # [BLOCK_N, BLOCK_M]
    sT = _masked_scores2(yT, c, mrow, offs_m[None, :], offs_n[:, None], Mask, smm, smn, NQ,
                         NK, fill2, MASK_KIND, MASK_ROWS_BCAST)  # [BLOCK_N, BLOCK_M]
    if EDGE:
        sT = _band(sT, offs_m[None, :], offs_n[:, None], NK, offset, left, right)
    m2, l2 = _row_stats(Lse, offs_m, slm, NQ, EXACT_ROWS)  # [BLOCK_M] each
    delta = tl.load(Delta + offs_m, mask=in_m, other=0.0)  # [BLOCK_M]
    pT = _probs(sT, m2[None, :], l2[None, :], EXACT_ROWS)  # [BLOCK_N, BLOCK_M]
    do = _operand(_load(DO, offs_m, tl.arange(0, BLOCK_DV), sdm, NQ, DV, EDGE, DV != BLOCK_DV),
                  EMU_BF16)  # [BLOCK_M, BLOCK_DV]
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # [BLOCK_N, BLOCK_M]
    if DROPOUT:
        keepT = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], drop_p)
        pdT = tl.where(keepT, pT * keep_scale, 0.0)
        dpT = tl.where(keepT, dpT * keep_scale, 0.0)
    else:
        pdT = pT
    dv = tl.dot(_lowp(pdT, do, EMU_BF16), do, dv, input_precision=PREC)  # [BLOCK_N, BLOCK_DV]
    dsT = pT * (dpT - delta[None, :])  # [BLOCK_N, BLOCK_M]
    if MASK_KIND == _BOOL_MASK:  # filled scores are constants: probability but no gradient
        if MASK_ROWS_BCAST:
            attendT = mrow  # [BLOCK_N, 1]
        else:
            attendT = _keep_bool(Mask, offs_m[None, :], offs_n[:, None], smm, smn, NQ,
                                 NK)  # [BLOCK_N, BLOCK_M]
        dsT = tl.where(attendT, dsT, 0.0)
    if HAS_SOFTCAP:  # through the cap: d(softcap·tanh(x/softcap))/dx = 1 − t²
        dsT = dsT * dtT
    dk = tl.dot(_lowp(dsT, q, EMU_BF16), q, dk, input_precision=PREC)  # [BLOCK_N, BLOCK_D]
    return dk, dv


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, Lse, Delta, Mask, mrow, seed, bh, offs_n, lo, hi,
                sqm, sdm, slm, smm, smn, NQ, NK, scale, fill2, offset, left, right, softcap,
                drop_p, keep_scale, EDGE: tl.constexpr, EXACT_ROWS: tl.constexpr,
                MASK_KIND: tl.constexpr, MASK_ROWS_BCAST: tl.constexpr, DROPOUT: tl.constexpr,
                PREC: tl.constexpr, EMU_BF16: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                BLOCK_M: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """``_dkdv_step`` over the query tiles [lo, hi)."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, Lse, Delta, Mask, mrow, seed, bh, offs_n,
                            start_m, sqm, sdm, slm, smm, smn, NQ, NK, scale, fill2, offset, left,
                            right, softcap, drop_p, keep_scale, EDGE, EXACT_ROWS, MASK_KIND,
                            MASK_ROWS_BCAST, DROPOUT, PREC, EMU_BF16, HAS_SOFTCAP, BLOCK_M, D,
                            DV, BLOCK_D, BLOCK_DV)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, Mask, DO, Lse, Delta, DK, DV_, Seed,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                     smb, smh, smm, smn, sdb, sdh, sdm, slb, slh, slm,
                     sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                     HQ, GROUP, NQ, NK, scale, fill2, offset, left, right, softcap, drop_p,
                     keep_scale, NQ_BUCKET, NK_BUCKET, BANDED,
                     D: tl.constexpr, DV: tl.constexpr, MASK_KIND: tl.constexpr,
                     MASK_ROWS_BCAST: tl.constexpr, TRIM_KEYS: tl.constexpr,
                     EXACT_ROWS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     DROPOUT: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr):
    """dk, dv for one key block of one kv head, summed over its G query heads (no atomics)."""
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _operand(_load(K + b * skb + hk * skh, offs_n, offs_d, skn, NK, D, True, D != BLOCK_D),
                 EMU_BF16)  # [BLOCK_N, BLOCK_D]
    v = _operand(_load(V + b * svb + hk * svh, offs_n, offs_dv, svn, NK, DV, True,
                       DV != BLOCK_DV), EMU_BF16)  # [BLOCK_N, BLOCK_DV]
    seed = tl.load(Seed) if DROPOUT else 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    t0, f0, f1, t1 = _query_tiles(start_n, NQ, NK, offset, left, right, BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):  # sum over the query heads sharing this kv head
        h = hk * GROUP + g
        bh = (b * HQ + h).to(tl.int32)
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdb + h * sdh
        Lseh = Lse + b * slb + h * slh
        Deltah = Delta + (b * HQ + h) * NQ
        Maskh = Mask + b * smb + h * smh
        g0, g1, g2, g3 = t0, f0, f1, t1
        if MASK_ROWS_BCAST:  # this head's mask row over the key block, once for every query tile
            mrow = _mask_row(Maskh, start_n, smn, NK, True, MASK_KIND, BLOCK_N)  # [BLOCK_N]
            if TRIM_KEYS:  # a block of keys the mask drops wholly: zero gradients, no work
                if MASK_KIND == _BOOL_MASK:
                    kept = mrow
                else:
                    kept = mrow != float("-inf")
                live = tl.max((kept & (offs_n < NK)).to(tl.int32), 0) > 0
                g1 = tl.where(live, f0, t0)
                g2 = tl.where(live, f1, t0)
                g3 = tl.where(live, t1, t0)
            mrow = mrow[:, None]  # [BLOCK_N, 1]
        else:
            mrow = 0
        dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, Lseh, Deltah, Maskh, mrow, seed, bh,
                             offs_n, g1, g2, sqm, sdm, slm, smm, smn, NQ, NK, scale, fill2,
                             offset, left, right, softcap, drop_p, keep_scale, False, EXACT_ROWS,
                             MASK_KIND,
                             MASK_ROWS_BCAST, DROPOUT, PREC, EMU_BF16, HAS_SOFTCAP, BLOCK_M, D,
                             DV, BLOCK_D, BLOCK_DV)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, Lseh, Deltah, Maskh, mrow, seed, bh,
                             offs_n, g0, g1, sqm, sdm, slm, smm, smn, NQ, NK, scale, fill2,
                             offset, left, right, softcap, drop_p, keep_scale, True, EXACT_ROWS,
                             MASK_KIND,
                             MASK_ROWS_BCAST, DROPOUT, PREC, EMU_BF16, HAS_SOFTCAP, BLOCK_M, D,
                             DV, BLOCK_D, BLOCK_DV)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, Lseh, Deltah, Maskh, mrow, seed, bh,
                             offs_n, g2, g3, sqm, sdm, slm, smm, smn, NQ, NK, scale, fill2,
                             offset, left, right, softcap, drop_p, keep_scale, True, EXACT_ROWS,
                             MASK_KIND,
                             MASK_ROWS_BCAST, DROPOUT, PREC, EMU_BF16, HAS_SOFTCAP, BLOCK_M, D,
                             DV, BLOCK_D, BLOCK_DV)
    dk = dk * scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
             _for_store(dk, DK, EMU_BF16), mask=(offs_n[:, None] < NK) & (offs_d[None, :] < D))
    tl.store(DV_ + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :],
             _for_store(dv, DV_, EMU_BF16), mask=(offs_n[:, None] < NK) & (offs_dv[None, :] < DV))


@triton.jit
def _dq_step(dq, q, do, m2, l2, delta, K, V, Mask, DS, seed, bh, offs_m, start_n,
             skn, svn, smm, smn, sdsm, NQ, NK, scale, fill2, offset, left, right, softcap,
             drop_p, keep_scale, EDGE: tl.constexpr, EXACT_ROWS: tl.constexpr,
             MASK_KIND: tl.constexpr, MASK_ROWS_BCAST: tl.constexpr, DROPOUT: tl.constexpr,
             PREC: tl.constexpr, EMU_BF16: tl.constexpr, WRITE_DS: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
             DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq of one query block from the key tile [start_n, start_n + BLOCK_N) (the block-sparse
    kernels take it too); with WRITE_DS also that tile's dS."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _operand(_load(K, offs_n, tl.arange(0, BLOCK_D), skn, NK, D, EDGE, D != BLOCK_D),
                 EMU_BF16)  # [BLOCK_N, BLOCK_D]
    v = _operand(_load(V, offs_n, tl.arange(0, BLOCK_DV), svn, NK, DV, EDGE, DV != BLOCK_DV),
                 EMU_BF16)  # [BLOCK_N, BLOCK_DV]
    y, c, dt = _raw_scores(q, tl.trans(k), scale, softcap, PREC,
                           HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
    if MASK_ROWS_BCAST:  # the same mask for every query row: a vector, no tile
        mrow = _mask_row(Mask, start_n, smn, NK, EDGE, MASK_KIND,
                         BLOCK_N)[None, :]  # [1, BLOCK_N]
    else:
        mrow = 0
    s = _masked_scores2(y, c, mrow, offs_m[:, None], offs_n[None, :], Mask, smm, smn, NQ, NK,
                        fill2, MASK_KIND, MASK_ROWS_BCAST)  # [BLOCK_M, BLOCK_N]
    if EDGE:
        s = _band(s, offs_m[:, None], offs_n[None, :], NK, offset, left, right)
    p = _probs(s, m2[:, None], l2[:, None], EXACT_ROWS)  # [BLOCK_M, BLOCK_N]
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # [BLOCK_M, BLOCK_N]
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], drop_p)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N]
    if MASK_KIND == _BOOL_MASK:  # filled scores are constants: probability but no gradient
        if MASK_ROWS_BCAST:
            attend = mrow  # [1, BLOCK_N]
        else:
            attend = _keep_bool(Mask, offs_m[:, None], offs_n[None, :], smm, smn, NQ,
                                NK)  # [BLOCK_M, BLOCK_N]
        ds = tl.where(attend, ds, 0.0)
    if WRITE_DS:  # the additive mask's gradient: dS of the capped scores
        tl.store(DS + offs_m[:, None] * sdsm + offs_n[None, :], ds,
                 mask=(offs_m[:, None] < NQ) & (offs_n[None, :] < NK))
    if HAS_SOFTCAP:  # through the cap: d(softcap·tanh(x/softcap))/dx = 1 − t²
        ds = ds * dt
    dq = tl.dot(_lowp(ds, k, EMU_BF16), k, dq, input_precision=PREC)  # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit
def _dq_tiles(dq, q, do, m2, l2, delta, K, V, Mask, DS, seed, bh, offs_m, lo, hi,
              skn, svn, smm, smn, sdsm, NQ, NK, scale, fill2, offset, left, right, softcap,
              drop_p, keep_scale, EDGE: tl.constexpr, EXACT_ROWS: tl.constexpr,
              MASK_KIND: tl.constexpr, MASK_ROWS_BCAST: tl.constexpr, DROPOUT: tl.constexpr,
              PREC: tl.constexpr, EMU_BF16: tl.constexpr, WRITE_DS: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
              DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``_dq_step`` over the key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _dq_step(dq, q, do, m2, l2, delta, K, V, Mask, DS, seed, bh, offs_m, start_n, skn,
                      svn, smm, smn, sdsm, NQ, NK, scale, fill2, offset, left, right, softcap,
                      drop_p, keep_scale, EDGE, EXACT_ROWS, MASK_KIND, MASK_ROWS_BCAST,
                      DROPOUT, PREC, EMU_BF16, WRITE_DS, HAS_SOFTCAP, BLOCK_N, D, DV, BLOCK_D,
                      BLOCK_DV)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, Mask, DO, Lse, Delta, DQ, DS, Seed,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                   smb, smh, smm, smn, sdb, sdh, sdm, slb, slh, slm,
                   sdqb, sdqh, sdqm, sdsb, sdsh, sdsm,
                   HQ, GROUP, NQ, NK, scale, fill2, offset, left, right, softcap, drop_p,
                   keep_scale, NQ_BUCKET, NK_BUCKET, BANDED,
                   D: tl.constexpr, DV: tl.constexpr, MASK_KIND: tl.constexpr,
                   MASK_ROWS_BCAST: tl.constexpr, TRIM_KEYS: tl.constexpr,
                   EXACT_ROWS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   DROPOUT: tl.constexpr, PREC: tl.constexpr,
                   EMU_BF16: tl.constexpr, WRITE_DS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq for one query block of one query head; with WRITE_DS also dS into an fp32 buffer."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    bh = (b * HQ + h).to(tl.int32)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_m = offs_m < NQ
    q = _operand(_load(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, NQ, D, True, D != BLOCK_D),
                 EMU_BF16)  # [BLOCK_M, BLOCK_D]
    do = _operand(_load(DO + b * sdb + h * sdh, offs_m, offs_dv, sdm, NQ, DV, True,
                        DV != BLOCK_DV), EMU_BF16)  # [BLOCK_M, BLOCK_DV]
    m2, l2 = _row_stats(Lse + b * slb + h * slh, offs_m, slm, NQ, EXACT_ROWS)  # [BLOCK_M] each
    delta = tl.load(Delta + (b * HQ + h) * NQ + offs_m, mask=in_m, other=0.0)
    seed = tl.load(Seed) if DROPOUT else 0
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    Mask += b * smb + h * smh
    DS += b * sdsb + h * sdsh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    klo, khi = 0, NK
    if TRIM_KEYS:
        klo, khi = _kept_range(Mask, smn, NK, MASK_KIND, 1024)
    t0, f0, f1, t1 = _key_tiles(start_m, NK, offset, left, right, klo, khi, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, m2, l2, delta, K, V, Mask, DS, seed, bh, offs_m, f0, f1,
                   skn, svn, smm, smn, sdsm, NQ, NK, scale, fill2, offset, left, right, softcap,
                   drop_p, keep_scale, False, EXACT_ROWS, MASK_KIND, MASK_ROWS_BCAST,
                   DROPOUT, PREC,
                   EMU_BF16, WRITE_DS, HAS_SOFTCAP, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV)
    dq = _dq_tiles(dq, q, do, m2, l2, delta, K, V, Mask, DS, seed, bh, offs_m, t0, f0,
                   skn, svn, smm, smn, sdsm, NQ, NK, scale, fill2, offset, left, right, softcap,
                   drop_p, keep_scale, True, EXACT_ROWS, MASK_KIND, MASK_ROWS_BCAST,
                   DROPOUT, PREC,
                   EMU_BF16, WRITE_DS, HAS_SOFTCAP, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV)
    dq = _dq_tiles(dq, q, do, m2, l2, delta, K, V, Mask, DS, seed, bh, offs_m, f1, t1,
                   skn, svn, smm, smn, sdsm, NQ, NK, scale, fill2, offset, left, right, softcap,
                   drop_p, keep_scale, True, EXACT_ROWS, MASK_KIND, MASK_ROWS_BCAST,
                   DROPOUT, PREC,
                   EMU_BF16, WRITE_DS, HAS_SOFTCAP, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             _for_store(dq * scale, DQ, EMU_BF16), mask=in_m[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dropout_mask_kernel(Keep, Seed, HQ, NQ, NK, drop_p, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """The keep mask the kernels above draw, materialised as uint8 [B, Hq, Nq, Nk] (tests)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    seed = tl.load(Seed)
    base = Keep + bh.to(tl.int64) * NQ * NK
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], drop_p)
        tl.store(base + offs_m[:, None] * NK + offs_n[None, :], keep.to(tl.uint8),
                 mask=(offs_m[:, None] < NQ) & (offs_n[None, :] < NK))


# ----------------------------------------------------------------------------- launch configs

def _is_interpreted(kernel: object) -> bool:
    """Whether triton built this kernel for its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


_INTERPRET = _is_interpreted(_fwd_kernel)
# Autotuning keys: lengths by power-of-two bucket (a new length rarely retunes), banded or not
# (causal and windows favour smaller query blocks), whether TMA descriptors are usable, and
# whether the mask is one row shared by every query (a vector per key tile, no mask tile).
_TUNE_KEY = ["NQ_BUCKET", "NK_BUCKET", "BANDED", "DESC_OK", "D", "DV", "MASK_KIND",
             "MASK_ROWS_BCAST", "HAS_SOFTCAP", "DROPOUT"]
# Under the interpreter blocks are tiny so that tests cover many tiles quickly. Tests may set
# INTERPRET_DESC to run the forward's tensor-descriptor loads through the interpreter too.
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
INTERPRET_DESC = False
_PREPROCESS_BLOCK_M = 16 if _INTERPRET else 64


def _desc_blocks(nargs: dict) -> None:
    """Autotuner pre-hook: give the tensor descriptors this config's tile shapes."""
    shapes = {"desc_q": (nargs["BLOCK_M"], nargs["BLOCK_D"]),
              "desc_k": (nargs["BLOCK_N"], nargs["BLOCK_D"]),
              "desc_v": (nargs["BLOCK_N"], nargs["BLOCK_DV"]),
              "desc_o": (nargs["BLOCK_M"], nargs["BLOCK_DV"])}
    for name, (rows, cols) in shapes.items():
        if TensorDescriptor is not None and isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = [1, 1, rows, cols]


def _cfg(block_m: int, block_n: int, warps: int, stages: int,
         desc: Optional[bool] = None) -> triton.Config:
    """A launch config; ``desc`` (forward only) picks TMA descriptor loads."""
    kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    if desc is not None:
        kwargs["USE_DESC"] = desc
    return triton.Config(kwargs, num_warps=warps, num_stages=stages,
                         pre_hook=_desc_blocks if desc else None)


# Candidates measured on an H100 (benchmarks/RESULTS.md, benchmarks/explore_fwd.py): 128x128 tiles
# with 8 warps lead on long unmasked rows at D=128, 64x64 with 4 warps and TMA loads on banded
# (causal, windowed) rows, 128x64 at D <= 64; wide heads (D > 128) and fp32 need small tiles.
# ``_pruner`` keeps three per situation: every new autotuning key compiles and times each
# candidate on its first call, and each compile of these kernels costs seconds. With
# ATTNFUSE_FLASH_AUTOTUNE=0 the always-fitting last candidate runs untimed (checks, quick starts).
# Wide forward (D > 128): 128x64 with 8 warps and TMA loads measured 538 TFLOP/s at d=256, N=4k
# (explore_fwd.py; 64x64 with 4 warps 383-433); without descriptors 64x64 is the runner-up.
# The wide backward lists come from benchmarks/explore_bwd.py at d=256, N=8k: dK/dV with 32 K/V
# rows stationary and 4 warps (+14 % over 64x64/8 warps), dQ with 128 Q rows, 64-key tiles and
# one stage (+20 %).
_FWD_CONFIGS = {
    "narrow": [_cfg(128, 64, 8, 3, False), _cfg(128, 64, 8, 4, False), _cfg(64, 64, 4, 2, False)],
    "plain": [_cfg(128, 128, 8, 3, False), _cfg(128, 128, 8, 3, True), _cfg(64, 64, 4, 2, False)],
    "banded": [_cfg(64, 64, 4, 3, True), _cfg(128, 128, 8, 3, True), _cfg(64, 64, 4, 2, False)],
    "masked": [_cfg(128, 128, 8, 2, False), _cfg(128, 64, 8, 3, False), _cfg(64, 64, 4, 2, False)],
    "wide": [_cfg(128, 64, 8, 2, True), _cfg(128, 64, 8, 2, False), _cfg(64, 64, 4, 2, False),
             _cfg(32, 32, 4, 1, False)],
}
_DKDV_CONFIGS = {"narrow": [_cfg(64, 128, 8, 3), _cfg(64, 128, 8, 2), _cfg(32, 64, 4, 2)],
                 "masked": [_cfg(64, 64, 4, 3), _cfg(32, 128, 4, 3), _cfg(32, 64, 4, 2)],
                 "wide": [_cfg(64, 32, 4, 2), _cfg(64, 64, 8, 2), _cfg(16, 32, 4, 1)]}
_DQ_CONFIGS = {"narrow": [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)],
               "masked": [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2)],
               "wide": [_cfg(128, 64, 8, 1), _cfg(128, 32, 8, 2), _cfg(32, 16, 4, 1)]}
_AUTOTUNE = os.environ.get("ATTNFUSE_FLASH_AUTOTUNE", "1") != "0"


def _situation(args: dict, forward: bool) -> str:
    """Which candidate list applies: wide heads or fp32; a dense mask tile (it is pipelined too,
    so large tiles overflow shared memory); else (forward) banded / D <= 64 / plain. A
    row-broadcast mask (MASK_ROWS_BCAST, e.g. key padding) is a [BLOCK_N] vector per key tile,
    no tile of shared memory: it takes the unmasked lists."""
    if max(args["BLOCK_D"], args["BLOCK_DV"]) > 128 or args["PREC"] == "ieee":
        return "wide"
    if args["MASK_KIND"] != _NO_MASK.value and not args.get("MASK_ROWS_BCAST"):
        return "masked"
    if not forward:
        return "narrow"
    if args.get("BANDED"):
        return "banded"
    return "narrow" if args["BLOCK_D"] <= 64 else "plain"


def _pruner(table: dict, forward: bool):
    def prune(configs: list, named_args: dict, **kwargs) -> list:
        """The situation's two leading candidates and its always-fitting last one, without TMA
        configs when descriptors are unusable; just the last one without autotuning."""
        args = {**named_args, **kwargs}
        keep = [c for c in table[_situation(args, forward)]
                if args.get("DESC_OK") or not c.kwargs.get("USE_DESC")]
        if not _AUTOTUNE:
            return keep[-1:]
        return keep[:2] + [c for c in keep[-1:] if c not in keep[:2]]
    return prune


def _tuned(kernel: object, table: dict, forward: bool = False) -> object:
    """Autotuned on GPUs; plain (fixed small blocks) under the interpreter, where timing is moot."""
    if _INTERPRET:
        return kernel
    configs = [c for cands in table.values() for c in cands]
    return triton.autotune(configs=configs, key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(table, forward)})(kernel)


_fwd = _tuned(_fwd_kernel, _FWD_CONFIGS, forward=True)
_dkdv = _tuned(_bwd_dkdv_kernel, _DKDV_CONFIGS)
_dq = _tuned(_bwd_dq_kernel, _DQ_CONFIGS)
# The config each autotuning key settled on, so launches under CUDA-graph capture (where the
# autotuner cannot time anything) reuse it; a key never tuned uses its situation's safe config.
_CHOSEN: dict[tuple, triton.Config] = {}
_TABLES = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _arg_names(kernel: object) -> list[str]:
    names = getattr(kernel, "arg_names", None)
    if names is None:  # the interpreter's wrapper keeps the python function
        import inspect
        names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    return list(names)


def _launch(name: str, tuned: object, grid, args: tuple, kwargs: dict) -> None:
    """Launch an autotuned kernel. A key with a remembered config (tuned earlier in this process
    or preloaded from attnfuse's cache) launches it directly; under graph capture, where nothing
    can be timed, an unseen key takes its situation's always-fitting config; otherwise Triton's
    autotuner times the candidates and the winner is remembered."""
    if _INTERPRET:
        blocks = dict(_INTERPRET_BLOCKS)
        if name == "fwd":
            blocks["USE_DESC"] = bool(kwargs.get("DESC_OK")) and INTERPRET_DESC
            if blocks["USE_DESC"]:
                _desc_blocks({**dict(zip(_arg_names(tuned), args)), **kwargs, **blocks})
        tuned[grid](*args, **kwargs, **blocks)
        return
    key = (name, str(args[0].dtype), args[0].device.index,
           *(kwargs[k] if k in kwargs else None for k in _TUNE_KEY))
    if _RECORDING is not None:
        _RECORDING.append(key)
    config = _CHOSEN.get(key)
    if config is None and _capturing(args[0]):
        config = _TABLES[name][_situation(kwargs, name == "fwd")][-1]
    if config is not None:
        meta = config.all_kwargs()
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(_arg_names(tuned.fn), args)), **kwargs, **meta})
        tuned.fn[grid](*args, **kwargs, **meta)
        return
    tuned[grid](*args, **kwargs)
    best = getattr(tuned, "best_config", None)
    if best is not None:
        _CHOSEN[key] = best


# Keys launched inside :func:`recording` (None = not recording).
_RECORDING: Optional[list] = None


@contextlib.contextmanager
def recording():
    """Collect the autotuning keys launched in the block; :func:`tuned_configs` then tells which
    config each settled on, so attnfuse's cache can remember them across processes."""
    global _RECORDING
    outer, inner = _RECORDING, []
    _RECORDING = inner
    try:
        yield inner
    finally:
        _RECORDING = outer
        if outer is not None:
            outer.extend(inner)


def tuned_configs(keys: Optional[list] = None) -> list[dict]:
    """The remembered configs (of ``keys``, default all) as JSON-able records for :func:`preload`."""
    out = []
    for key in dict.fromkeys(tuple(k) for k in (keys if keys is not None else _CHOSEN)):
        config = _CHOSEN.get(key)
        if config is None:
            continue
        out.append({"key": list(key), "kwargs": dict(config.kwargs),
                    "num_warps": config.num_warps, "num_stages": config.num_stages})
    return out


def preload(records: list[dict]) -> int:
    """Remember configs exported by :func:`tuned_configs` (e.g. read from the disk cache); their
    keys then launch without autotuning. Records of unknown kernels or tile names are skipped."""
    count = 0
    for r in records:
        key = tuple(r.get("key", ()))
        kw = dict(r.get("kwargs", {}))
        if not key or key[0] not in _TABLES or not {"BLOCK_M", "BLOCK_N"} <= set(kw):
            continue
        _CHOSEN[key] = _cfg(int(kw["BLOCK_M"]), int(kw["BLOCK_N"]), int(r["num_warps"]),
                            int(r["num_stages"]), kw.get("USE_DESC"))
        count += 1
    return count


# ----------------------------------------------------------------------------- host helpers

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
             causal: str) -> list[str]:
    """Human-readable reasons the kernel cannot run these inputs; empty list = supported."""
    reasons: list[str] = []
    if q.dtype not in _DTYPES:
        reasons.append(f"dtype {_dtype_name(q.dtype)} not supported: use float16/bfloat16/float32")
    reasons += operand_reasons(q, k, v, mask, causal, interpreted=_INTERPRET)
    if any(t.dim() != 4 for t in (q, k, v)):
        return reasons
    d = q.shape[-1]
    if d > _MAX_HEAD_DIM:
        reasons.append(f"head dim {d} > {_MAX_HEAD_DIM}")
    if v.shape[-1] > _MAX_HEAD_DIM:
        reasons.append(f"value head dim {v.shape[-1]} > {_MAX_HEAD_DIM}")
    if k.shape[-1] != d:
        reasons.append(f"q head dim {d} != k head dim {k.shape[-1]}")
    return reasons


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
           causal: str) -> None:
    reasons = supports(q, k, v, mask, causal)
    if reasons:
        raise ValueError("flash attention cannot run these inputs: " + "; ".join(reasons))


def _mask_args(mask: Optional[torch.Tensor], dummy: torch.Tensor, mask_fill: float
               ) -> tuple[torch.Tensor, tuple[int, int, int, int], dict]:
    """(tensor to read, strides with 0 on broadcast dims, the mask's constexpr flags); bool is
    read as uint8. MASK_ROWS_BCAST: query-row stride 0 (key padding [B,1,1,Nk], biases
    [B,H,1,Nk] / [1,1,1,Nk], expanded views, Nq = 1): the kernels read one mask row per key tile
    as a vector instead of a [BLOCK_M, BLOCK_N] tile. TRIM_KEYS: such a row whose dropped keys
    score -inf (additive -inf, or a bool mask with fill -inf) also bounds the key loops by its
    first and last kept key, so padded tails cost nothing. With a finite fill a fully masked row
    still averages its masked keys (the eager model's result), so nothing is trimmed."""
    if mask is None:
        return dummy, (0, 0, 0, 0), dict(MASK_KIND=_NO_MASK.value, MASK_ROWS_BCAST=False,
                                         TRIM_KEYS=False)
    strides = tuple(0 if n == 1 else s for n, s in zip(mask.shape, mask.stride()))
    rows_bcast = strides[2] == 0
    flags = dict(MASK_ROWS_BCAST=rows_bcast, TRIM_KEYS=rows_bcast)
    if mask.dtype == torch.bool:
        flags["TRIM_KEYS"] = rows_bcast and _fill2(mask_fill) == float("-inf")
        return mask.view(torch.uint8), strides, dict(flags, MASK_KIND=_BOOL_MASK.value)
    return mask, strides, dict(flags, MASK_KIND=_ADD_MASK.value)


def _backward_rows(lse: torch.Tensor, common: dict) -> tuple[torch.Tensor, tuple[int, ...]]:
    """What the backward kernels read as each row's statistics, and its (b, h, row) strides:
    ``lse`` itself, or, when finite scores of any size can occur (an additive mask, a bool
    mask's finite fill: a row's lse can absorb log2 of its sum), a [B, Hq, 2, Nq] buffer for
    the exact (m2, l2) of ``_bwd_row_stats``. Sets ``common["EXACT_ROWS"]`` accordingly."""
    kind = common["MASK_KIND"]
    exact = kind == _ADD_MASK.value or (kind == _BOOL_MASK.value
                                        and math.isfinite(common["fill2"]))
    common["EXACT_ROWS"] = exact
    if not exact:
        return lse, lse.stride()
    b, hq, nq = lse.shape
    rows = torch.empty((b, hq, 2, nq), dtype=torch.float32, device=lse.device)
    return rows, (rows.stride(0), rows.stride(1), rows.stride(3))


def _fill2(mask_fill: float) -> float:
    """The bool-mask fill in base 2; a finite fill stays finite (see _MIN_SCORE2); ±inf pass."""
    fill = float(mask_fill)
    if not math.isfinite(fill):
        return fill
    return max(_MIN_SCORE2_F, min(-_MIN_SCORE2_F, fill * _LOG2E_F))


def _block(n: int) -> int:
    """Padded head-dim block: next power of two, at least 16 (the smallest tl.dot size)."""
    return max(16, next_pow2(n))


def _device_ctx(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_TMA_DEVICES: dict[int, bool] = {}


def _has_tma(t: torch.Tensor) -> bool:
    """Hopper or newer (TMA), where the forward may load through tensor descriptors."""
    if _INTERPRET:
        return INTERPRET_DESC
    if not t.is_cuda:
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _TMA_DEVICES:
        _TMA_DEVICES[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _TMA_DEVICES[index]


def _descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor
                 ) -> tuple[tuple, bool]:
    """4-D TMA descriptors for q, k, v, out when the hardware and every layout allow them (16-byte
    aligned base and strides, power-of-two head dims), else the tensors themselves."""
    tensors = (q, k, v, out)
    usable = (TensorDescriptor is not None and q.dtype in (torch.float16, torch.bfloat16)
              and q.shape[-1] == _block(q.shape[-1]) and v.shape[-1] == _block(v.shape[-1])
              and _has_tma(q))
    for t in tensors if usable else ():
        size = t.element_size()
        usable = usable and (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                             and all(s > 0 and s * size % 16 == 0 for s in t.stride()[:-1]))
    if not usable:
        return tensors, False
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.shape[-1]])
                 for t in tensors), True


def _common(q: torch.Tensor, k: torch.Tensor, scale: Optional[float], causal: str,
            mask_fill: float, softcap: float, window: tuple[int, int], dropout_p: float) -> dict:
    """Kernel arguments shared by the forward and both backward kernels."""
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    left = _UNBOUNDED if window[0] < 0 else min(window[0], _UNBOUNDED)
    right = _UNBOUNDED if window[1] < 0 else min(window[1], _UNBOUNDED)
    if causal != "none":  # causal is the band's right edge on the diagonal
        right = 0
    return dict(HQ=q.shape[1], GROUP=q.shape[1] // k.shape[1], NQ=nq, NK=nk, scale=scale,
                fill2=_fill2(mask_fill), offset=nk - nq if causal == "bottom_right" else 0,
                left=left, right=right, softcap=softcap, drop_p=dropout_p,
                keep_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0,
                NQ_BUCKET=next_pow2(nq), NK_BUCKET=next_pow2(nk),
                BANDED=int(left < _UNBOUNDED or right < _UNBOUNDED), D=d,
                HAS_SOFTCAP=softcap > 0.0, DROPOUT=0.0 < dropout_p < 1.0,
                PREC="ieee" if q.dtype == torch.float32 else "tf32",
                EMU_BF16=_INTERPRET and q.dtype == torch.bfloat16, BLOCK_D=_block(d))


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- public API

def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                  causal: str = "none", mask_fill: float = float("-inf"),
                  softcap: float = 0.0, window: tuple[int, int] = (-1, -1),
                  dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None, *,
                  operands_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B,Hq,Nq,Dv] in q.dtype (contiguous), lse [B,Hq,Nq] fp32 (natural log; -inf on empty
    rows). ``scale=None`` means 1/sqrt(D); ``softcap > 0`` soft-caps the scores, 0 disables it;
    ``window=(left, right)`` keeps keys i + off − left <= j <= i + off + right (-1: unbounded;
    ``off`` as for ``causal``), combined with ``causal`` and ``mask``; ``dropout_p > 0`` drops
    probabilities with the Philox stream of ``seed`` (int64 [1] on q's device). Raises ValueError
    with ``supports``' reasons, or for a bad softcap/window/dropout argument.
    ``operands_checked``: the caller ran ``supports`` on these operands (the registry's
    selection did); the scalar arguments are still checked."""
    softcap, window = check_softcap(softcap), check_window(window)
    dropout_p = check_dropout(dropout_p)
    check_seed(seed, dropout_p, q.device)
    if not operands_checked:
        _check(q, k, v, mask, causal)
    b, hq, nq, _ = q.shape
    dv_dim = v.shape[3]
    out = torch.empty((b, hq, nq, dv_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse
    m, m_strides, mask_flags = _mask_args(mask, q, mask_fill)
    common = _common(q, k, scale, causal, mask_fill, softcap, window, dropout_p)
    descs, desc_ok = _descriptors(q, k, v, out)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (cdiv(nq, meta["BLOCK_M"]), hq, b)

    args = (q, k, v, m, out, lse, seed if common["DROPOUT"] else q, *descs, *q.stride()[:3],
            *k.stride()[:3], *v.stride()[:3], *m_strides, *out.stride()[:3], *lse.stride())
    with _device_ctx(q):
        _launch("fwd", _fwd, grid, args,
                dict(common, DV=dv_dim, DESC_OK=int(desc_ok), FOLD_SCALE=common["scale"] > 0.0,
                     BLOCK_DV=_block(dv_dim), FAST_MASK=mask_flags["MASK_KIND"] == _ADD_MASK.value
                     and not mask_flags["MASK_ROWS_BCAST"], **mask_flags))
    return out, lse


def _row_stats_launch(q: torch.Tensor, k: torch.Tensor, m: torch.Tensor,
                      m_strides: tuple[int, int, int, int], lse: torch.Tensor,
                      stats: torch.Tensor, common: dict) -> None:
    """Fill ``stats`` ([B, Hq, 2, Nq]) with the backward's exact row statistics. Fixed tiles, no
    autotuning: a block without a huge row only copies its lse. fp32 dots take 32x32 tiles (at
    64x64 ptxas spilled tens of KB for sm_90: compile_targets.py)."""
    b, hq, nq, _ = q.shape
    if _INTERPRET:
        block_m, block_n = 16, 16
    elif common["PREC"] == "ieee":
        block_m, block_n = 32, 32
    else:
        block_m, block_n = 64, 32 if common["BLOCK_D"] > 128 else 64
    names = ("HQ", "GROUP", "NQ", "NK", "scale", "fill2", "offset", "left", "right", "softcap",
             "D", "MASK_KIND", "MASK_ROWS_BCAST", "TRIM_KEYS", "HAS_SOFTCAP", "PREC", "EMU_BF16",
             "BLOCK_D")
    _bwd_row_stats[(cdiv(nq, block_m), hq, b)](
        q, k, m, lse, stats, *q.stride()[:3], *k.stride()[:3], *m_strides, *lse.stride(),
        **{n: common[n] for n in names}, BLOCK_M=block_m, BLOCK_N=block_n,
        **({} if _INTERPRET else {"num_warps": 4}))


def flash_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                   scale: Optional[float] = None, causal: str = "none",
                   mask_fill: float = float("-inf"), mask_grad: bool = False,
                   softcap: float = 0.0, window: tuple[int, int] = (-1, -1),
                   dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None, *,
                   operands_checked: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """dq, dk, dv (same dtype/shape as q, k, v; contiguous), dmask shaped like mask (only when
    mask_grad, else None). ``lse`` is the forward's (natural log); ``out``/``dout`` any strides.
    ``softcap``, ``window``, ``dropout_p`` and ``seed`` must be the forward's; dmask is the
    gradient of the capped scores. Deterministic: no atomics anywhere (an atomic-dq schedule,
    five matmuls per tile pair instead of seven, measured slower on the H100: RESULTS.md).
    ``operands_checked`` as for :func:`flash_forward`."""
    softcap, window = check_softcap(softcap), check_window(window)
    dropout_p = check_dropout(dropout_p)
    check_seed(seed, dropout_p, q.device)
    if not operands_checked:
        _check(q, k, v, mask, causal)
    if mask_grad and (mask is None or mask.dtype == torch.bool):
        raise ValueError("mask_grad=True needs an additive float mask")
    if dout.dtype != q.dtype or dout.shape != out.shape:
        raise ValueError(f"dout {dout.dtype} {tuple(dout.shape)} must match out {q.dtype} "
                         f"{tuple(out.shape)}")
    dout, out = _unit_stride(dout), _unit_stride(out)
    b, hq, nq, _ = q.shape
    hkv, nk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # dS for the mask gradient: fp32 [B, Hq, Nq, Nk]; entries outside the band stay 0.
    ds = torch.zeros((b, hq, nq, nk), dtype=torch.float32, device=q.device) if mask_grad else None
    if b * hq * nq * nk == 0 or dropout_p >= 1.0:  # nothing attended, or everything dropped
        for t in (dq, dk, dv):
            t.zero_()
    else:
        m, m_strides, mask_flags = _mask_args(mask, q, mask_fill)
        common = dict(_common(q, k, scale, causal, mask_fill, softcap, window, dropout_p),
                      DV=dv_dim, BLOCK_DV=_block(dv_dim), **mask_flags)
        rows, row_strides = _backward_rows(lse, common)
        delta = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
        seed_arg = seed if common["DROPOUT"] else q
        shared = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *m_strides,
                  *dout.stride()[:3], *row_strides)
        ds_arg, ds_strides = (ds, ds.stride()[:3]) if ds is not None else (q, (0, 0, 0))

        def grid_q(meta: dict) -> tuple[int, int, int]:
            return (cdiv(nq, meta["BLOCK_M"]), hq, b)

        def grid_k(meta: dict) -> tuple[int, int, int]:
            return (cdiv(nk, meta["BLOCK_N"]), hkv, b)

        with _device_ctx(q):
            _bwd_preprocess[(cdiv(nq, _PREPROCESS_BLOCK_M), hq, b)](
                out, dout, delta, *out.stride()[:3], *dout.stride()[:3], nq, dv_dim,
                BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_DV=common["BLOCK_DV"])
            if common["EXACT_ROWS"]:
                _row_stats_launch(q, k, m, m_strides, lse, rows, common)
            _launch("dkdv", _dkdv, grid_k,
                    (q, k, v, m, dout, rows, delta, dk, dv, seed_arg, *shared, *dk.stride()[:3],
                     *dv.stride()[:3]), common)
            _launch("dq", _dq, grid_q,
                    (q, k, v, m, dout, rows, delta, dq, ds_arg, seed_arg, *shared,
                     *dq.stride()[:3], *ds_strides), dict(common, WRITE_DS=mask_grad))
    return dq, dk, dv, None if ds is None else _mask_gradient(ds, mask)


def _mask_gradient(ds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The additive mask's gradient from dS [B, Hq, Nq, Nk]: summed over the dims the mask
    broadcasts on (size 1), like autograd's expand backward, in the mask's dtype."""
    dims = [i for i, n in enumerate(mask.shape) if n == 1 and ds.shape[i] != 1]
    return (ds.sum(dim=dims, keepdim=True) if dims else ds).to(mask.dtype)


def dropout_keep_mask(seed: torch.Tensor, shape: tuple[int, int, int, int],
                      dropout_p: float) -> torch.Tensor:
    """The keep mask (bool [B, Hq, Nq, Nk]) the kernels draw for ``seed`` and ``dropout_p``:
    for tests and for checking a dropout run against the reference."""
    b, hq, nq, nk = shape
    keep = torch.empty((b, hq, nq, nk), dtype=torch.uint8, device=seed.device)
    if keep.numel():
        block_m = 16 if _INTERPRET else 64
        with _device_ctx(seed):
            _dropout_mask_kernel[(cdiv(nq, block_m), b * hq)](
                keep, seed, hq, nq, nk, float(dropout_p), BLOCK_M=block_m,
                BLOCK_N=16 if _INTERPRET else 64)
    return keep.bool()
