"""Block-sparse attention in Triton: FlashAttention-2 over the key blocks a block mask lists.

Legend (the symbols of ``reference.py`` and ``flash.py``; every tile comment uses them)::

    q [B, Hq, Nq, D]   k [B, Hkv, Nk, D]   v [B, Hkv, Nk, Dv]   G = Hq // Hkv
    out [B, Hq, Nq, Dv]     lse [B, Hq, Nq] (fp32, natural log, -inf on rows with no key)
    the model's own mask as flash reads it: causal (top_left / bottom_right), window (left,
    right), a bool or additive mask tensor by strides (row-broadcast key padding as a vector)

    Block mask (``sparse_layout.BlockLayout``): blocks of MB_M x MB_N, each pair (query block
    i, key block j) skipped (never visited: its scores count as -inf), partial (visited with
    bounds, band and window) or full (every pair inside them: no masking arithmetic); the
    user's mask tensor applies on every visited tile. The kernels read FlexAttention-style
    lists: per (b, h, i) the count and ascending indices of partial and of full key blocks
    (forward, dQ), per (b, h, j) the same over query blocks (dK/dV).

    Math: flash's FlashAttention-2 with S = -inf on skipped pairs:
    s = scale·log2e·q·kᵀ (+ log2e·mask | log2e·fill), m, l, acc online, out = acc / l,
    lse = (m + log2 l)·ln 2; backward p = exp2(s − m2 − l2) with flash's row statistics
    (lse·log2e and 0, or exact for huge rows: ``_sparse_row_stats``), δ = rowsum(dO ∘ out),
    dS = p ∘ (dO·vᵀ − δ), dq = scale·dS·k, dk = scale·Σ_group dSᵀ·q, dv = Σ_group pᵀ·dO.

Tiles: BLOCK_M x BLOCK_N divide MB_M x MB_N. A query tile reads its block row's lists and runs
MB_N / BLOCK_N key tiles per listed key block (full blocks first, unmasked, then partial ones);
the dK/dV kernel does the same over the transposed lists. Each tile is flash's own step
(``flash._fwd_step``, ``_dkdv_step``, ``_dq_step``): only the walk over the lists is this
file's. The backward uses no atomics. Variants (mask kind, row-broadcast mask) are constexpr
flags.

A block mask comes from ``sparse_layout`` (a bool block tensor, FlexAttention's ``BlockMask``,
the dense band) or ``sparse_predict.predict`` (training-free, from pooled Q and K).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .flash import (_backward_rows, _block, _bwd_preprocess, _device_ctx, _dkdv_step, _dq_step,
                    _fill2, _for_store, _fwd_step, _is_interpreted, _load, _mask_gradient,
                    _mask_row, _operand, _row_stats, _saved_stats, _stats_of, _store_stats)
from .flash import _mask_args as flash_mask_args
from .reference import NO_WINDOW, band_offset, cdiv, check_window, operand_reasons
from .sparse_layout import (BlockLayout, band_sides, default_block, layout_from_block_mask,
                            layout_from_blocks)

__all__ = ["BlockLayout", "default_block", "sparse_forward", "sparse_backward", "sparse_attention",
           "as_layout", "supports"]

_LN2 = tl.constexpr(0.6931471805599453)
_NO_MASK = tl.constexpr(0)
_MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _listed_rows(q, K, V, Mask, offs_m, FCnt, FIdx, PCnt, PIdx, cnt, idx, skn, svn, smm, smn,
                 NQ, NK, scale, fill2, offset, left, right, MASK_KIND: tl.constexpr,
                 MASK_ROWS_BCAST: tl.constexpr, FOLD_SCALE: tl.constexpr, PREC: tl.constexpr,
                 EMU_BF16: tl.constexpr, MB_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, STATS_ONLY: tl.constexpr):
    """acc, l, m of one query tile over its block row's listed key blocks: flash's tile step
    on every key tile of the full blocks (unmasked), then of the partial ones (bounds, band).
    STATS_ONLY: l and m alone."""
    SUB: tl.constexpr = MB_N // BLOCK_N  # key tiles per key block
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    n_full = tl.load(FCnt + cnt)
    n_part = tl.load(PCnt + cnt)
    for t in range(0, n_full * SUB):
        start_n = tl.load(FIdx + idx + t // SUB) * MB_N + (t % SUB) * BLOCK_N
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, K, V, Mask, 0, 0, 0, 0, offs_m,
                                  start_n, skn, svn, smm, smn, NQ, NK, scale, fill2, offset, left,
                                  right, 0.0, 0.0, False, MASK_KIND, MASK_ROWS_BCAST, False,
                                  FOLD_SCALE, PREC, EMU_BF16, False, False, BLOCK_N, D, DV,
                                  BLOCK_D, BLOCK_DV, False, STATS_ONLY)
    for t in range(0, n_part * SUB):
        start_n = tl.load(PIdx + idx + t // SUB) * MB_N + (t % SUB) * BLOCK_N
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, K, V, Mask, 0, 0, 0, 0, offs_m,
                                  start_n, skn, svn, smm, smn, NQ, NK, scale, fill2, offset, left,
                                  right, 0.0, 0.0, True, MASK_KIND, MASK_ROWS_BCAST, False,
                                  FOLD_SCALE, PREC, EMU_BF16, False, False, BLOCK_N, D, DV,
                                  BLOCK_D, BLOCK_DV, False, STATS_ONLY)
    return acc, l_i, m_i


@triton.jit
def _sparse_fwd_kernel(Q, K, V, Mask, Out, Lse, PCnt, PIdx, FCnt, FIdx,
                       sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, smb, smh, smm, smn,
                       sob, soh, som, slb, slh, slm, scb, sch, scr, sib, sih, sir,
                       GROUP, NQ, NK, scale, fill2, offset, left, right,
                       D: tl.constexpr, DV: tl.constexpr, MASK_KIND: tl.constexpr,
                       MASK_ROWS_BCAST: tl.constexpr, FOLD_SCALE: tl.constexpr,
                       PREC: tl.constexpr, EMU_BF16: tl.constexpr, MB_M: tl.constexpr,
                       MB_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out and lse for one query tile of one query head, over its block row's listed blocks."""
    # Last query tiles first: under a causal band they list the most key blocks.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP  # GQA: the kv head this query head reads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _operand(_load(Q + b * sqb + h * sqh, offs_m, tl.arange(0, BLOCK_D), sqm, NQ, D, True,
                       D != BLOCK_D), EMU_BF16)  # [BLOCK_M, BLOCK_D]
    row = start_m // MB_M  # this tile's block row
    acc, l_i, m_i = _listed_rows(q, K + b * skb + hk * skh, V + b * svb + hk * svh,
                                 Mask + b * smb + h * smh, offs_m, FCnt, FIdx, PCnt, PIdx,
                                 b * scb + h * sch + row * scr, b * sib + h * sih + row * sir,
                                 skn, svn, smm, smn, NQ, NK, scale, fill2, offset, left, right,
                                 MASK_KIND, MASK_ROWS_BCAST, FOLD_SCALE, PREC, EMU_BF16, MB_N,
                                 BLOCK_M, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV, False)
    empty = l_i == 0.0  # no key at all: out = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]  # [BLOCK_M, BLOCK_DV]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)  # [BLOCK_M]
    ptrs = Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :]
    tl.store(ptrs, _for_store(out, Out, EMU_BF16),
             mask=(offs_m[:, None] < NQ) & (offs_dv[None, :] < DV))
    tl.store(Lse + b * slb + h * slh + offs_m * slm, lse, mask=offs_m < NQ)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _sparse_row_stats(Q, K, Mask, Lse, Stats, PCnt, PIdx, FCnt, FIdx,
                      sqb, sqh, sqm, skb, skh, skn, smb, smh, smm, smn, slb, slh, slm,
                      scb, sch, scr, sib, sih, sir, HQ, GROUP, NQ, NK, scale, fill2, offset,
                      left, right, D: tl.constexpr, MASK_KIND: tl.constexpr,
                      MASK_ROWS_BCAST: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr,
                      MB_M: tl.constexpr, MB_N: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stats [B, Hq, 2, Nq] = (m2, l2) per row, as ``flash._bwd_row_stats`` (which says why),
    over the listed blocks: a query tile with a huge finite lse recomputes m and l."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m2, l2, huge = _saved_stats(Lse + b * slb + h * slh, offs_m, slm, NQ)  # [BLOCK_M] each
    if huge:
        q = _operand(_load(Q + b * sqb + h * sqh, offs_m, tl.arange(0, BLOCK_D), sqm, NQ, D,
                           True, D != BLOCK_D), EMU_BF16)  # [BLOCK_M, BLOCK_D]
        Kh = K + b * skb + (h // GROUP) * skh
        row = start_m // MB_M
        _, l_i, m_i = _listed_rows(q, Kh, Kh, Mask + b * smb + h * smh, offs_m, FCnt, FIdx,
                                   PCnt, PIdx, b * scb + h * sch + row * scr,
                                   b * sib + h * sih + row * sir, skn, skn, smm, smn, NQ, NK,
                                   scale, fill2, offset, left, right, MASK_KIND,
                                   MASK_ROWS_BCAST, False, PREC, EMU_BF16, MB_N, BLOCK_M,
                                   BLOCK_N, D, D, BLOCK_D, BLOCK_D, True)
        m2, l2 = _stats_of(m_i, l_i)
    _store_stats(Stats + (b * HQ + h) * 2 * NQ, offs_m, NQ, m2, l2)


@triton.jit
def _sparse_dkdv_kernel(Q, K, V, Mask, DO, Lse, Delta, DK, DV_, PCnt, PIdx, FCnt, FIdx,
                        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, smb, smh, smm, smn,
                        sdb, sdh, sdm, slb, slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                        scb, sch, scr, sib, sih, sir,
                        HQ, GROUP, NQ, NK, scale, fill2, offset, left, right,
                        D: tl.constexpr, DV: tl.constexpr, MASK_KIND: tl.constexpr,
                        MASK_ROWS_BCAST: tl.constexpr, EXACT_ROWS: tl.constexpr,
                        PREC: tl.constexpr, EMU_BF16: tl.constexpr, MB_M: tl.constexpr,
                        MB_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk, dv for one key tile of one kv head, summed over its G query heads (no atomics);
    the lists are the transposed ones (query blocks per key block), each query tile one
    ``flash._dkdv_step``."""
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
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    col = start_n // MB_N  # this tile's block column
    SUB: tl.constexpr = MB_M // BLOCK_M  # query tiles per query block
    for g in range(0, GROUP):  # sum over the query heads sharing this kv head
        h = hk * GROUP + g
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdb + h * sdh
        Lseh = Lse + b * slb + h * slh
        Deltah = Delta + (b * HQ + h) * NQ
        Maskh = Mask + b * smb + h * smh
        if MASK_ROWS_BCAST:  # this head's mask row over the key tile, once for every query tile
            mrow = _mask_row(Maskh, start_n, smn, NK, True, MASK_KIND, BLOCK_N)[:, None]
        else:
            mrow = 0
        cnt = b * scb + h * sch + col * scr
        idx = b * sib + h * sih + col * sir
        n_full = tl.load(FCnt + cnt)
        n_part = tl.load(PCnt + cnt)
        for t in range(0, n_full * SUB):
            start_m = tl.load(FIdx + idx + t // SUB) * MB_M + (t % SUB) * BLOCK_M
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv = _dkdv_step(dk, dv, k, v, Qh, DOh, Lseh, Deltah, Maskh, mrow, 0, 0,
                                offs_n, start_m, sqm, sdm, slm, smm, smn, NQ, NK, scale, fill2,
                                offset, left, right, 0.0, 0.0, 1.0, False, EXACT_ROWS,
                                MASK_KIND, MASK_ROWS_BCAST, False, PREC, EMU_BF16, False,
                                BLOCK_M, D, DV, BLOCK_D, BLOCK_DV)
        for t in range(0, n_part * SUB):
            start_m = tl.load(PIdx + idx + t // SUB) * MB_M + (t % SUB) * BLOCK_M
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv = _dkdv_step(dk, dv, k, v, Qh, DOh, Lseh, Deltah, Maskh, mrow, 0, 0,
                                offs_n, start_m, sqm, sdm, slm, smm, smn, NQ, NK, scale, fill2,
                                offset, left, right, 0.0, 0.0, 1.0, True, EXACT_ROWS,
                                MASK_KIND, MASK_ROWS_BCAST, False, PREC, EMU_BF16, False,
                                BLOCK_M, D, DV, BLOCK_D, BLOCK_DV)
    dk = dk * scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
             _for_store(dk, DK, EMU_BF16), mask=(offs_n[:, None] < NK) & (offs_d[None, :] < D))
    tl.store(DV_ + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :],
             _for_store(dv, DV_, EMU_BF16), mask=(offs_n[:, None] < NK) & (offs_dv[None, :] < DV))


@triton.jit
def _sparse_dq_kernel(Q, K, V, Mask, DO, Lse, Delta, DQ, DS, PCnt, PIdx, FCnt, FIdx,
                      sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, smb, smh, smm, smn,
                      sdb, sdh, sdm, slb, slh, slm, sdqb, sdqh, sdqm, sdsb, sdsh, sdsm,
                      scb, sch, scr, sib, sih, sir,
                      HQ, GROUP, NQ, NK, scale, fill2, offset, left, right,
                      D: tl.constexpr, DV: tl.constexpr, MASK_KIND: tl.constexpr,
                      MASK_ROWS_BCAST: tl.constexpr, EXACT_ROWS: tl.constexpr,
                      WRITE_DS: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr,
                      MB_M: tl.constexpr, MB_N: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq for one query tile of one query head, over its block row's listed key blocks, each
    key tile one ``flash._dq_step``; with WRITE_DS also dS (the additive mask's gradient) of
    the visited tiles into a zeroed fp32 buffer."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_m = offs_m < NQ
    q = _operand(_load(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, NQ, D, True, D != BLOCK_D),
                 EMU_BF16)  # [BLOCK_M, BLOCK_D]
    do = _operand(_load(DO + b * sdb + h * sdh, offs_m, tl.arange(0, BLOCK_DV), sdm, NQ, DV,
                        True, DV != BLOCK_DV), EMU_BF16)  # [BLOCK_M, BLOCK_DV]
    m2, l2 = _row_stats(Lse + b * slb + h * slh, offs_m, slm, NQ, EXACT_ROWS)  # [BLOCK_M] each
    delta = tl.load(Delta + (b * HQ + h) * NQ + offs_m, mask=in_m, other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    Mask += b * smb + h * smh
    DS += b * sdsb + h * sdsh
    row = start_m // MB_M
    cnt = b * scb + h * sch + row * scr
    idx = b * sib + h * sih + row * sir
    n_full = tl.load(FCnt + cnt)
    n_part = tl.load(PCnt + cnt)
    SUB: tl.constexpr = MB_N // BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(0, n_full * SUB):
        start_n = tl.load(FIdx + idx + t // SUB) * MB_N + (t % SUB) * BLOCK_N
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _dq_step(dq, q, do, m2, l2, delta, K, V, Mask, DS, 0, 0, offs_m, start_n, skn,
                      svn, smm, smn, sdsm, NQ, NK, scale, fill2, offset, left, right, 0.0, 0.0,
                      1.0, False, EXACT_ROWS, MASK_KIND, MASK_ROWS_BCAST, False, PREC, EMU_BF16,
                      WRITE_DS, False, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV)
    for t in range(0, n_part * SUB):
        start_n = tl.load(PIdx + idx + t // SUB) * MB_N + (t % SUB) * BLOCK_N
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _dq_step(dq, q, do, m2, l2, delta, K, V, Mask, DS, 0, 0, offs_m, start_n, skn,
                      svn, smm, smn, sdsm, NQ, NK, scale, fill2, offset, left, right, 0.0, 0.0,
                      1.0, True, EXACT_ROWS, MASK_KIND, MASK_ROWS_BCAST, False, PREC, EMU_BF16,
                      WRITE_DS, False, BLOCK_N, D, DV, BLOCK_D, BLOCK_DV)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             _for_store(dq * scale, DQ, EMU_BF16), mask=in_m[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------- launch configs

_INTERPRET = _is_interpreted(_sparse_fwd_kernel)
_PREPROCESS_BLOCK_M = 16 if _INTERPRET else 64
_AUTOTUNE = os.environ.get("ATTNFUSE_SPARSE_AUTOTUNE", "1") != "0"


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Candidates per situation, modelled on flash's measured lists: 128x128 tiles with 8 warps for
# D <= 128 unmasked, smaller tiles with a dense mask tile or D > 128 (shared memory). Each list
# ends with configs that fit any block size >= 16. A config whose tile does not divide the
# block mask's MB_M x MB_N is pruned.
_FWD = {"narrow": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3)],
        "plain": [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
        "masked": [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3)],
        "wide": [_cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2)]}
_DKDV = {"narrow": [_cfg(64, 128, 8, 3), _cfg(64, 64, 4, 3)],
         "plain": [_cfg(64, 128, 8, 3), _cfg(64, 64, 4, 3)],
         "masked": [_cfg(64, 64, 4, 3), _cfg(32, 64, 4, 2)],
         "wide": [_cfg(64, 64, 8, 2), _cfg(32, 64, 4, 2)]}
_DQ = {"narrow": [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
       "plain": [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
       "masked": [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3)],
       "wide": [_cfg(64, 64, 8, 2), _cfg(64, 32, 4, 2)]}
_SMALL = [_cfg(32, 32, 4, 2), _cfg(16, 16, 4, 1)]
_TUNE_KEY = ["D", "DV", "MASK_KIND", "MASK_ROWS_BCAST", "PREC", "MB_M", "MB_N", "EMU_BF16"]


def _situation(args: dict) -> str:
    if max(args["BLOCK_D"], args["BLOCK_DV"]) > 128 or args["PREC"] == "ieee":
        return "wide"
    if args["MASK_KIND"] != _NO_MASK.value and not args["MASK_ROWS_BCAST"]:
        return "masked"
    return "narrow" if args["BLOCK_D"] <= 64 else "plain"


def _pruner(table: dict):
    def prune(configs: list, named_args: dict, **kwargs: Any) -> list:
        """The situation's candidates whose tiles divide the block mask's blocks; else the
        largest small config that does. Without autotuning, the first that fits."""
        args = {**named_args, **kwargs}
        fits = [c for c in table[_situation(args)] + _SMALL
                if args["MB_M"] % c.kwargs["BLOCK_M"] == 0
                and args["MB_N"] % c.kwargs["BLOCK_N"] == 0]
        lead = [c for c in fits if c not in _SMALL] or fits[:1]
        return lead if _AUTOTUNE else lead[:1]
    return prune


def _tuned(kernel: Any, table: dict) -> Any:
    if _INTERPRET:
        return kernel
    configs = [c for cands in table.values() for c in cands] + _SMALL
    return triton.autotune(configs=configs, key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(table)})(kernel)


_fwd = _tuned(_sparse_fwd_kernel, _FWD)
_dkdv = _tuned(_sparse_dkdv_kernel, _DKDV)
_dq = _tuned(_sparse_dq_kernel, _DQ)
# The config each tuning key settled on, for launches under CUDA-graph capture (nothing can be
# timed there); an unseen key takes the first candidate that fits.
_CHOSEN: dict[tuple, triton.Config] = {}


def _launch(name: str, tuned: Any, table: dict, grid: Any, args: tuple, kwargs: dict) -> None:
    if _INTERPRET:
        tuned[grid](*args, **kwargs, BLOCK_M=min(16, kwargs["MB_M"]),
                    BLOCK_N=min(16, kwargs["MB_N"]))
        return
    key = (name, str(args[0].dtype), *(kwargs[k] for k in _TUNE_KEY))
    config = _CHOSEN.get(key)
    if config is None and args[0].is_cuda and torch.cuda.is_current_stream_capturing():
        config = _pruner(table)([], {}, **kwargs)[0]
    if config is not None:
        tuned.fn[grid](*args, **kwargs, **config.all_kwargs())
        return
    tuned[grid](*args, **kwargs)
    best = getattr(tuned, "best_config", None)
    if best is not None:
        _CHOSEN[key] = best


# ----------------------------------------------------------------------------- host

def supports(q: Any, k: Any, v: Any, mask: Any, causal: str) -> list[str]:
    """Human-readable reasons the sparse kernels cannot run these inputs; empty = supported.
    (Soft-capping and dropout are not implemented: ``registry`` rejects them by feature.)"""
    reasons: list[str] = []
    if q.dtype not in _DTYPES:
        reasons.append(f"dtype {str(q.dtype).replace('torch.', '')} not supported: use "
                       "float16/bfloat16/float32")
    reasons += operand_reasons(q, k, v, mask, causal, interpreted=_INTERPRET)
    if any(t.dim() != 4 for t in (q, k, v)):
        return reasons
    if q.shape[-1] > _MAX_HEAD_DIM or v.shape[-1] > _MAX_HEAD_DIM:
        reasons.append(f"head dims {q.shape[-1]}/{v.shape[-1]}: at most {_MAX_HEAD_DIM}")
    if k.shape[-1] != q.shape[-1]:
        reasons.append(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    return reasons


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
           causal: str) -> None:
    reasons = supports(q, k, v, mask, causal)
    if reasons:
        raise ValueError("sparse attention cannot run these inputs: " + "; ".join(reasons))


def _strides(t: torch.Tensor, dims: int) -> tuple[int, ...]:
    """The first ``dims`` strides with 0 on size-1 dims (broadcast)."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape[:dims], t.stride()[:dims]))


def _list_args(lists: tuple[torch.Tensor, ...]) -> tuple:
    pcnt, pidx, fcnt, fidx = lists
    return (pcnt, pidx, fcnt, fidx, *_strides(pcnt, 3), *_strides(pidx, 3))


def _common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
            scale: Optional[float], causal: str, mask_fill: float,
            window: tuple[int, int]) -> dict:
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    left, right = band_sides(causal, window)
    return dict(GROUP=q.shape[1] // k.shape[1], NQ=nq, NK=nk, scale=scale,
                fill2=_fill2(mask_fill), offset=band_offset(causal, nq, nk), left=left,
                right=right, D=d, DV=v.shape[3], PREC="ieee" if q.dtype == torch.float32 else
                "tf32", EMU_BF16=_INTERPRET and q.dtype == torch.bfloat16,
                MB_M=layout.block[0], MB_N=layout.block[1], BLOCK_D=_block(d),
                BLOCK_DV=_block(v.shape[3]))


def _prepare(q, k, v, layout, mask, causal, window) -> tuple[tuple[int, int], Any]:
    window = check_window(window)
    _check(q, k, v, mask, causal)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout (layout_from_blocks, "
                        f"layout_from_block_mask, sparse_predict.predict), got "
                        f"{type(layout).__name__}")
    layout.check(q, k, causal, window)
    if layout.state.device != q.device:
        raise ValueError(f"block layout is on {layout.state.device}, q on {q.device}")
    return window, _mask_args(mask, q)


def _mask_args(mask: Optional[torch.Tensor], dummy: torch.Tensor
               ) -> tuple[torch.Tensor, tuple[int, int, int, int], dict]:
    """The mask as flash reads it (``flash._mask_args``); the block lists already skip what a
    key-padding trim would, so flash's TRIM_KEYS flag is not one of these kernels'."""
    m, strides, flags = flash_mask_args(mask, dummy, float("-inf"))
    flags.pop("TRIM_KEYS")
    return m, strides, flags


def sparse_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                   mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   causal: str = "none", mask_fill: float = float("-inf"),
                   window: tuple[int, int] = NO_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B,Hq,Nq,Dv] in q.dtype, lse [B,Hq,Nq] fp32: the reference attention with the
    skipped block pairs of ``layout`` masked out (rows left with no key: out 0, lse -inf).
    Raises ValueError with ``supports``' reasons or when the layout does not fit the call."""
    window, (m, m_strides, mask_flags) = _prepare(q, k, v, layout, mask, causal, window)
    b, hq, nq, _ = q.shape
    out = torch.empty((b, hq, nq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    if lse.numel() == 0 or k.shape[2] == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    common = _common(q, k, v, layout, scale, causal, mask_fill, window)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (cdiv(nq, meta["BLOCK_M"]), hq, b)

    args = (q, k, v, m, out, lse, *_list_args(layout.kv_lists())[:4], *q.stride()[:3],
            *k.stride()[:3], *v.stride()[:3], *m_strides, *out.stride()[:3], *lse.stride(),
            *_list_args(layout.kv_lists())[4:])
    with _device_ctx(q):
        _launch("fwd", _fwd, _FWD, grid, args,
                dict(common, FOLD_SCALE=common["scale"] > 0.0, **mask_flags))
    return out, lse


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _stats_block(mb: int, prec: str) -> int:
    """The row-statistics tile along a block of ``mb`` (a multiple of 16): 16 under the
    interpreter, else the largest of 64, 32, 16 dividing it (at most 32 for fp32 dots, as
    flash's ``_row_stats_launch``)."""
    if _INTERPRET:
        return 16
    return next(t for t in ((32, 16) if prec == "ieee" else (64, 32, 16)) if mb % t == 0)


def sparse_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    layout: BlockLayout, mask: Optional[torch.Tensor], out: torch.Tensor,
                    lse: torch.Tensor, scale: Optional[float] = None, causal: str = "none",
                    mask_fill: float = float("-inf"), window: tuple[int, int] = NO_WINDOW,
                    mask_grad: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """dq, dk, dv (dtypes and shapes of q, k, v; contiguous) of :func:`sparse_forward` with the
    same (fixed) ``layout``; ``out``/``lse`` are its outputs. ``mask_grad``: also the additive
    mask's gradient, shaped like ``mask`` (0 on skipped pairs, whose p is 0), else None.
    Deterministic: no atomics."""
    window, (m, m_strides, mask_flags) = _prepare(q, k, v, layout, mask, causal, window)
    if dout.shape != out.shape or dout.dtype != q.dtype:
        raise ValueError(f"dout {dout.dtype} {tuple(dout.shape)} must match out {q.dtype} "
                         f"{tuple(out.shape)}")
    if mask_grad and (mask is None or mask.dtype == torch.bool):
        raise ValueError("mask_grad=True needs an additive float mask")
    dout, out = _unit_stride(dout), _unit_stride(out)
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    # dS for the mask gradient: fp32 [B, Hq, Nq, Nk]; skipped pairs stay 0.
    ds = torch.zeros((b, hq, nq, nk), dtype=torch.float32, device=q.device) if mask_grad else None
    if b * hq * nq * nk == 0:
        return (dq.zero_(), dk.zero_(), dv.zero_(),
                None if ds is None else _mask_gradient(ds, mask))
    common = dict(_common(q, k, v, layout, scale, causal, mask_fill, window), HQ=hq,
                  **mask_flags)
    rows, row_strides = _backward_rows(lse, common)
    delta = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    shared = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *m_strides, *dout.stride()[:3],
              *row_strides)
    kv_args, q_args = _list_args(layout.kv_lists()), _list_args(layout.q_lists())

    def grid_q(meta: dict) -> tuple[int, int, int]:
        return (cdiv(nq, meta["BLOCK_M"]), hq, b)

    def grid_k(meta: dict) -> tuple[int, int, int]:
        return (cdiv(nk, meta["BLOCK_N"]), hkv, b)

    with _device_ctx(q):
        _bwd_preprocess[(cdiv(nq, _PREPROCESS_BLOCK_M), hq, b)](
            out, dout, delta, *out.stride()[:3], *dout.stride()[:3], nq, v.shape[3],
            BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_DV=common["BLOCK_DV"])
        if common["EXACT_ROWS"]:
            bm, bn = (_stats_block(mb, common["PREC"]) for mb in layout.block)
            names = ("HQ", "GROUP", "NQ", "NK", "scale", "fill2", "offset", "left", "right", "D",
                     "MASK_KIND", "MASK_ROWS_BCAST", "PREC", "EMU_BF16", "MB_M", "MB_N",
                     "BLOCK_D")
            _sparse_row_stats[(cdiv(nq, bm), hq, b)](
                q, k, m, lse, rows, *kv_args[:4], *q.stride()[:3], *k.stride()[:3], *m_strides,
                *lse.stride(), *kv_args[4:], **{n: common[n] for n in names}, BLOCK_M=bm,
                BLOCK_N=bn, **({} if _INTERPRET else {"num_warps": 4}))
        _launch("dkdv", _dkdv, _DKDV, grid_k,
                (q, k, v, m, dout, rows, delta, dk, dv, *q_args[:4], *shared, *dk.stride()[:3],
                 *dv.stride()[:3], *q_args[4:]), common)
        ds_arg, ds_strides = (ds, ds.stride()[:3]) if ds is not None else (q, (0, 0, 0))
        _launch("dq", _dq, _DQ, grid_q,
                (q, k, v, m, dout, rows, delta, dq, ds_arg, *kv_args[:4], *shared,
                 *dq.stride()[:3], *ds_strides, *kv_args[4:]), dict(common, WRITE_DS=mask_grad))
    return dq, dk, dv, None if ds is None else _mask_gradient(ds, mask)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, layout, mask, scale, causal, mask_fill, window):
        out, lse = sparse_forward(q, k, v, layout, mask, scale, causal, mask_fill, window)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.args = (layout, scale, causal, mask_fill, window)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, _dlse: Any):
        q, k, v, mask, out, lse = ctx.saved_tensors
        layout, scale, causal, mask_fill, window = ctx.args
        mask_grad = bool(mask is not None and mask.is_floating_point() and ctx.needs_input_grad[4])
        dq, dk, dv, dmask = sparse_backward(dout.contiguous(), q, k, v, layout, mask, out, lse,
                                            scale, causal, mask_fill, window, mask_grad)
        return dq, dk, dv, None, dmask, None, None, None, None


def as_layout(blocks: Any, q: torch.Tensor, k: torch.Tensor, causal: str,
              window: tuple[int, int], block: Any = None, has_mask: bool = False) -> BlockLayout:
    """A BlockLayout from any accepted block-mask form: a BlockLayout, FlexAttention's
    BlockMask, or a bool block tensor [B|1, H|1, NQB, NKB]."""
    if isinstance(blocks, BlockLayout):
        return blocks
    if isinstance(blocks, torch.Tensor):
        return layout_from_blocks(blocks, q.shape[2], k.shape[2], block=block, causal=causal,
                                  window=window)
    return layout_from_block_mask(blocks, q.shape[2], k.shape[2], causal=causal, window=window,
                                  block=block, has_mask=has_mask)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: Any,
                     mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     causal: str = "none", mask_fill: float = float("-inf"),
                     window: tuple[int, int] = NO_WINDOW, *, block: Any = None) -> torch.Tensor:
    """Block-sparse attention with a fixed block mask, differentiable in q, k and v.

    ``blocks``: a :class:`BlockLayout`, FlexAttention's ``BlockMask`` or a bool block tensor
    [B|1, H|1, NQB, NKB] (blocks of ``block``, default :func:`default_block`). ``mask``,
    ``causal``, ``window`` are the model's own mask, applied inside visited blocks (an
    additive mask that requires grad gets its gradient)."""
    window = check_window(window)
    layout = as_layout(blocks, q, k, causal, window, block, has_mask=mask is not None)
    out, _ = _SparseAttention.apply(q, k, v, layout, mask, scale, causal, mask_fill, window)
    return out
