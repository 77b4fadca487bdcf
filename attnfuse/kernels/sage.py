"""SageAttention-style quantized attention in Triton: INT8 Q·Kᵀ, FP8 or FP16 P·V; inference only.

Legend (the symbols of ``reference.py`` and ``flash.py``; every tile comment uses them)::

    q [B, Hq, Nq, D]   k [B, Hkv, Nk, D]   v [B, Hkv, Nk, Dv]   G = Hq // Hkv
    D, Dv in {32, 64, 128} (the int8 Q·Kᵀ dot reduces over D, the P·V dot over BLOCK_N >= 32)
    out [B, Hq, Nq, Dv] in q's dtype        lse [B, Hq, Nq] fp32, natural log, -inf on empty rows
    mask read through strides as [B, Hq, Nq, Nk] (stride 0 on broadcast dims), never expanded;
    query-row stride 0 (key padding [B,1,1,Nk]): MASK_ROWS_BCAST reads one [BLOCK_N] row per tile

    Quantization (``quantize``; the caller's tensors are never written): torch reduces over
    tokens first (μ; FP8: max|v| per channel, one read each), then two memory-bound launches
    over (token blocks, heads, batch) read each tile once and keep it in registers: q → q8,
    s_q, r (``_quant_q_kernel``); k and v → k8, s_k, vt8, s_v (``_quant_kv_kernel``)
    c     = scale·log2e                      folded into q, so scores come out in base 2
    μ     = mean over tokens of k            [B, Hkv, D] fp32 (K smoothing; 0 with smooth_k=False)
    s_q   = max|c·q| / 127 per group of BQ query tokens      q8 = round(c·q / s_q)        int8
    s_k   = max|k − μ| / 127 per group of BK key tokens      k8 = round((k − μ) / s_k)    int8
            BQ = BK = 1 (a scale per token) by default: the kernel applies s_q[m], s_k[n] as
            row and column vectors whatever the grouping, so finer costs nothing, and an outlier
            then coarsens only its own token (blocks of 128/64, SageAttention's, on request)
    r     = c·q·μ per query                  [B, Hq, Nq]: the row shift smoothing removed (lse only)
    s_v   = max over tokens |v[:, ch]| / 448 per channel     vt8 = e4m3(v / s_v)ᵀ  [B, Hkv, Dv, Nk']
            stored K-major (tokens contiguous, Nk' = Nk rounded up to 16): Hopper's FP8 dot B layout

    Attention (``_sage_fwd_kernel``; one program per query block and head):
    s     = fp32(q8·k8ᵀ) · s_k[n] · s_q[m]   int32 accumulate, exact: |q8·k8ᵀ| <= 127²·D < 2^24
          = c·q·(k − μ)ᵀ ± quantization error = c·q·kᵀ − r: each row shifted by a constant, which
          softmax ignores. Smoothing matters when k has per-channel offsets (real LLM/DiT keys):
          the offsets would dominate max|k| and leave few int8 levels for the part that varies.
    s     = s + log2e·mask | log2e·mask_fill where a bool mask is False | −inf outside the
            causal band j <= i + off (off = Nk − Nq bottom-right, 0 top-left) and outside Nk
    m     = running row max   p = exp2(s − m) in [0, 1]   l = running row sum of p (fp32)
    PV_FP16: acc = Σ p̃·v, p̃ = p rounded to v's dtype (fp16; bf16 for bf16 inputs, whose v
             need not fit fp16), fp32 accumulate, v not quantized        out = acc / l
    PV_FP8:  acc = Σ e4m3(448·p)·e4m3 v (sm_89+ FP8 MMA), each tile's product promoted to fp32
             (max_num_imprecise_acc: Hopper otherwise keeps ~22-bit sums across tiles)
             out = acc · s_v / (448·l)
    lse   = (m + log2 l + r)·ln 2            rows with no key: out = 0, lse = −inf

Error budget: int8 keeps ~7 bits of each group's largest entry; e4m3 keeps 3 mantissa bits
(~2.5% rms per probability and per value, not averaged away when v has zero mean), so FP8 P·V
costs more than INT8 Q·Kᵀ. Against ``reference.attention_forward`` (tests: causal, N=256, d=128,
Gaussian / channel-offset / 0.1% outlier data) FP16 P·V gives cosine >= 0.99973 and relative L1
<= 0.020; FP8 P·V cosine >= 0.99933 and relative L1 0.033-0.036, which is e4m3's own floor
(rounding only P and v, with exact scores, already gives 0.034 on Gaussian v).

Interpreter (TRITON_INTERPRET=1, CPU tensors): its fp32 → e4m3 cast loses the carry of a
round-up into the exponent (31.99 → 16) and truncates subnormals, its fp32 → bf16 cast
truncates, so EMU_FP8 / EMU_BF16 round to nearest even on the bits first (the casts are then
exact) and bf16 products run in fp32. GPUs cast with cvt.rn (round to nearest even).
``sage_reference`` replays the same arithmetic in PyTorch (same quantized tensors, same key-tile
width for the online softmax) so the kernel can be checked tightly, quantization aside.
No backward: callers that need gradients use the exact kernels.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .reference import cdiv, next_pow2, operand_reasons

__all__ = ["Quantized", "quantize", "sage_forward", "sage_reference", "supports"]

_LOG2E_F = 1.4426950408889634
_LN2_F = 0.6931471805599453
_MIN_SCORE2_F = -3.4028234663852886e38 * 0.999  # finite fills stay finite, s − m never overflows
_LOG2E = tl.constexpr(_LOG2E_F)
_LN2 = tl.constexpr(_LN2_F)
_MIN_SCORE2 = tl.constexpr(_MIN_SCORE2_F)
_FP8_MAX = 448.0  # largest finite e4m3 (fn) value
# Jitted code may read globals only as constexprs; host code uses their .value.
_NO_MASK, _BOOL_MASK, _ADD_MASK = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_HEAD_DIMS = (32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16)
_PV_MODES = ("auto", "fp8", "fp16")
# FP8 exists when both sides name e4m3 (feature test, never a version compare).
_FP8 = hasattr(torch, "float8_e4m3fn") and hasattr(tl, "float8e4nv")


# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def _rne(x, DROP: tl.constexpr):
    """fp32 rounded to nearest even with its DROP low mantissa bits cleared (carry included)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) >> DROP << DROP
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3(x, EMU_FP8: tl.constexpr):
    """fp32 with |x| <= 448 as e4m3, rounded to nearest even (see EMU_FP8 in the legend)."""
    if EMU_FP8:
        a = tl.abs(x)
        # Subnormals are multiples of 2^-9, the fp32 ulp at 2^14: adding 2^14 rounds to them.
        a = tl.where(a < 0.015625, (a + 16384.0) - 16384.0, _rne(a, 20))
        x = tl.where(x < 0.0, -a, a)
    return x.to(tl.float8e4nv)


@triton.jit
def _int8_rows(x, rows, blk, bh, Xq, Scale, N, G: tl.constexpr, D: tl.constexpr,
               BLOCK: tl.constexpr):
    """Tile x [BLOCK, D] fp32 (0 past N) of head bh: scales s = max|x|/127 per G tokens (G
    divides BLOCK; G = 1: row maxima) and codes round(x/s), from registers: one pass."""
    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    offs_g = blk * (BLOCK // G) + tl.arange(0, BLOCK // G)
    amax = tl.max(tl.reshape(tl.abs(x), [BLOCK // G, G * D]), 1)  # [BLOCK/G]: G tokens a row
    tl.store(Scale + bh * tl.cdiv(N, G) + offs_g, amax / 127.0, mask=offs_g < tl.cdiv(N, G))
    # An all-zero token/group (padding too) keeps scale 0 and codes 0, dividing by 1, not 0.
    inv = tl.broadcast_to((127.0 / tl.where(amax > 0.0, amax, 1.0))[:, None], [BLOCK // G, G])
    y = x * tl.reshape(inv, [BLOCK])[:, None]  # [BLOCK, D]
    # Round half away from zero: the float -> int cast truncates toward zero.
    q8 = (y + tl.where(y >= 0.0, 0.5, -0.5)).to(tl.int8)
    tl.store(Xq + (bh * N + offs_n[:, None]) * D + tl.arange(0, D)[None, :], q8, mask=rows)


@triton.jit
def _quant_q_kernel(Q, Mu, Q8, Sq, Shift, sqb, sqh, sqn, N, HKV, GROUP, c, G: tl.constexpr,
                    D: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK query tokens of one head: x = c·q, its codes and scales, r = x·μ (its kv head's)."""
    blk, h, b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    offs_n, offs_d = blk * BLOCK + tl.arange(0, BLOCK), tl.arange(0, D)
    rows = offs_n[:, None] < N
    x = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :], mask=rows,
                other=0.0).to(tl.float32) * c  # [BLOCK, D]
    mu = tl.load(Mu + (b * HKV + h // GROUP) * D + offs_d)  # [D]
    bh = b * tl.num_programs(1) + h
    _int8_rows(x, rows, blk, bh, Q8, Sq, N, G, D, BLOCK)
    tl.store(Shift + bh * N + offs_n, tl.sum(x * mu[None, :], 1), mask=offs_n < N)


@triton.jit
def _quant_kv_kernel(K, Mu, K8, Sk, V, Vmax, Sv, Vt, skb, skh, skn, svb, svh, svn, N, NPAD,
                     SUBTRACT: tl.constexpr, PV_FP8: tl.constexpr, EMU_FP8: tl.constexpr,
                     G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK key tokens of one kv head: codes and scales of k − μ; PV_FP8: vt8 = e4m3(v/s_v)ᵀ,
    s_v = Vmax/448 (block 0 stores it): a [BLOCK, DV] tile loaded along channels, transposed
    (via shared memory) and stored along tokens in 16-byte rows; tokens in [N, NPAD) get 0."""
    blk, h, b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    bh = b * tl.num_programs(1) + h
    offs_n, offs_d = blk * BLOCK + tl.arange(0, BLOCK), tl.arange(0, D)
    rows = offs_n[:, None] < N
    x = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=rows,
                other=0.0).to(tl.float32)  # [BLOCK, D]
    if PV_FP8:  # issued before k's arithmetic: both tiles' loads in flight together
        offs_c = tl.arange(0, DV)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_c[None, :], mask=rows,
                    other=0.0).to(tl.float32)  # [BLOCK, DV]
    if SUBTRACT:
        x = tl.where(rows, x - tl.load(Mu + bh * D + offs_d)[None, :], 0.0)
    _int8_rows(x, rows, blk, bh, K8, Sk, N, G, D, BLOCK)
    if PV_FP8:
        # IEEE divisions (div_rn; "/" is approximate on GPUs): torch's v / s_v, bit for bit.
        s = tl.div_rn(tl.load(Vmax + bh * DV + offs_c).to(tl.float32), 448.0)  # s_v [DV]
        tl.store(Sv + bh * DV + offs_c, s, mask=(offs_c < DV) & (blk == 0))
        y = tl.div_rn(v, tl.where(s > 0.0, s, 1.0)[None, :])  # all-zero channel: s_v = 0, y = 0
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)  # rounding of v / s_v may pass 448 by an ulp
        tl.store(Vt + (bh * DV + offs_c[:, None]) * NPAD + offs_n[None, :],
                 tl.trans(_e4m3(y, EMU_FP8)), mask=offs_n[None, :] < NPAD)  # [DV, BLOCK]


@triton.jit
def _bias2(bias):
    """Additive-mask entries in base 2 (fp32), finite ones clamped to at least _MIN_SCORE2."""
    bias = bias.to(tl.float32)
    return tl.where(bias == float("-inf"), bias, tl.maximum(bias * _LOG2E, _MIN_SCORE2))


@triton.jit
def _load(ptrs, valid, EDGE: tl.constexpr):
    """Edge tiles load under ``valid`` (0 elsewhere); full tiles issue unpredicated loads."""
    if EDGE:
        x = tl.load(ptrs, mask=valid, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _sage_tiles(acc, l_i, m_i, q8, sq, K8, Sk, V, Mask, offs_m, lo, hi, svn, smm, smn,
                NQ, NK, NPAD, fill2, offset, EDGE: tl.constexpr, CAUSAL: tl.constexpr,
                MASK_KIND: tl.constexpr, MASK_ROWS_BCAST: tl.constexpr, PV_FP8: tl.constexpr,
                EMU_FP8: tl.constexpr, EMU_BF16: tl.constexpr, QBLOCK_K: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key tiles [lo, hi). EDGE tiles (the causal diagonal, the ragged
    last tile) check bounds and the band; full tiles load and run unmasked."""
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, DV)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < NK
        k8 = _load(K8 + offs_n[:, None] * D + offs_d[None, :], in_n[:, None],
                   EDGE)  # [BLOCK_N, D]
        sk = _load(Sk + offs_n // QBLOCK_K, in_n, EDGE)  # [BLOCK_N]
        qk = tl.dot(q8, tl.trans(k8), out_dtype=tl.int32)  # [BLOCK_M, BLOCK_N]
        s = qk.to(tl.float32) * sk[None, :] * sq[:, None]  # base 2 (c is inside s_q)
        if MASK_KIND != _NO_MASK:
            if MASK_ROWS_BCAST:  # one row for every query: a [BLOCK_N] vector, no tile
                ptrs = Mask + offs_n * smn
                if MASK_KIND == _BOOL_MASK:
                    s = tl.where(tl.load(ptrs, mask=in_n, other=1)[None, :] != 0, s, fill2)
                else:
                    s = s + _bias2(tl.load(ptrs, mask=in_n, other=0.0))[None, :]
            else:
                ptrs = Mask + offs_m[:, None] * smm + offs_n[None, :] * smn
                inside = (offs_m[:, None] < NQ) & in_n[None, :]
                if MASK_KIND == _BOOL_MASK:
                    s = tl.where(tl.load(ptrs, mask=inside, other=1) != 0, s, fill2)
                else:
                    s = s + _bias2(tl.load(ptrs, mask=inside, other=0.0))
        if EDGE:
            keep = in_n[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
        # A row with no key so far has m = -inf: subtract 0 instead, so p = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_safe)  # [BLOCK_M]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]  # [BLOCK_M, DV]
        if PV_FP8:
            vt = _load(V + offs_c[:, None] * NPAD + offs_n[None, :], in_n[None, :],
                       EDGE)  # [DV, BLOCK_N] K-major
            acc = tl.dot(_e4m3(p * 448.0, EMU_FP8), tl.trans(vt), acc,
                         max_num_imprecise_acc=BLOCK_N)
        else:
            v = _load(V + offs_n[:, None] * svn + offs_c[None, :], in_n[:, None],
                      EDGE)  # [BLOCK_N, DV]
            if EMU_BF16:  # interpreter: no bf16 products; bf16-rounded p times exact v in fp32
                acc = tl.dot(_rne(p, 16), v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sage_fwd_kernel(Q8, Sq, Shift, K8, Sk, V, Sv, Mask, Out, Lse,
                     svb, svh, svn, smb, smh, smm, smn,
                     HQ, GROUP, NQ, NK, NPAD, fill2, offset, NQ_BUCKET, NK_BUCKET,
                     CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                     MASK_ROWS_BCAST: tl.constexpr, PV_FP8: tl.constexpr,
                     EMU_FP8: tl.constexpr, EMU_BF16: tl.constexpr, QBLOCK_Q: tl.constexpr,
                     QBLOCK_K: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out and lse for one query block of one query head."""
    # Last query blocks first: under a causal band they have the most keys (shortest tail).
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP  # GQA: the kv head this query head reads
    bh = b * HQ + h
    bhk = b * (HQ // GROUP) + hk
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, DV)
    in_m = offs_m < NQ
    q8 = tl.load(Q8 + (bh * NQ + offs_m[:, None]) * D + offs_d[None, :], mask=in_m[:, None],
                 other=0)  # [BLOCK_M, D]
    sq = tl.load(Sq + bh * tl.cdiv(NQ, QBLOCK_Q) + offs_m // QBLOCK_Q, mask=in_m,
                 other=0.0)  # [BLOCK_M]
    K8 += bhk * NK * D
    Sk += bhk * tl.cdiv(NK, QBLOCK_K)
    if PV_FP8:
        V += bhk * DV * NPAD
    else:
        V += b * svb + hk * svh
    Mask += b * smb + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    # Keys [0, full) are seen by every row of the block; [full, hi) by some (causal diagonal).
    if CAUSAL:
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + offset, NK), 0)
        full = tl.maximum(tl.minimum(start_m + offset + 1, NK), 0)
    else:
        hi = NK
        full = NK
    f1 = full // BLOCK_N * BLOCK_N
    t1 = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _sage_tiles(acc, l_i, m_i, q8, sq, K8, Sk, V, Mask, offs_m, 0, f1, svn, smm,
                                smn, NQ, NK, NPAD, fill2, offset, False, CAUSAL, MASK_KIND,
                                MASK_ROWS_BCAST, PV_FP8, EMU_FP8, EMU_BF16, QBLOCK_K, D, DV,
                                BLOCK_N)
    acc, l_i, m_i = _sage_tiles(acc, l_i, m_i, q8, sq, K8, Sk, V, Mask, offs_m, f1, t1, svn, smm,
                                smn, NQ, NK, NPAD, fill2, offset, True, CAUSAL, MASK_KIND,
                                MASK_ROWS_BCAST, PV_FP8, EMU_FP8, EMU_BF16, QBLOCK_K, D, DV,
                                BLOCK_N)
    empty = l_i == 0.0  # no key at all: out = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    if PV_FP8:
        sv = tl.load(Sv + bhk * DV + offs_c)  # [DV]
        out = acc * (sv * (1.0 / 448.0))[None, :] / l_safe[:, None]
    else:
        out = acc / l_safe[:, None]  # [BLOCK_M, DV]
    if EMU_BF16:
        out = _rne(out, 16)
    tl.store(Out + (bh * NQ + offs_m[:, None]) * DV + offs_c[None, :],
             out.to(Out.dtype.element_ty), mask=in_m[:, None])
    r = tl.load(Shift + bh * NQ + offs_m, mask=in_m, other=0.0)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe) + r) * _LN2)
    tl.store(Lse + bh * NQ + offs_m, lse, mask=in_m)


# ----------------------------------------------------------------------------- launch configs

# Whether triton built the kernels for its CPU interpreter (TRITON_INTERPRET=1 at import).
_INTERPRET = type(_sage_fwd_kernel).__name__ == "InterpretedFunction"
# Interpreter tiles: small, so tests cover many tiles; BLOCK_N 32 as the GPU's int8/fp8 dots
# need a reduction dim of at least 32 (BLOCK_N is the FP8 P·V dot's).
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32}
_QUANT_BLOCK = 32 if _INTERPRET else 64  # tokens per quantization program (at least)
_AUTOTUNE = os.environ.get("ATTNFUSE_SAGE_AUTOTUNE", "1") != "0"
_TUNE_KEY = ["NQ_BUCKET", "NK_BUCKET", "D", "DV", "CAUSAL", "MASK_KIND", "MASK_ROWS_BCAST",
             "PV_FP8"]


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                         num_stages=stages)


# Per situation: two fast candidates and an always-fitting last one (used untimed with
# ATTNFUSE_SAGE_AUTOTUNE=0, under CUDA-graph capture, and with a forced block_n). A dense mask
# tile is pipelined too, so it gets fewer stages.
_CONFIGS = {
    "d64": [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 2)],
    "d128": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 2)],
    "masked": [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3), _cfg(64, 64, 4, 2)],
}


def _situation(args: dict) -> str:
    if args["MASK_KIND"] != _NO_MASK.value and not args["MASK_ROWS_BCAST"]:
        return "masked"
    return "d64" if max(args["D"], args["DV"]) <= 64 else "d128"  # d32 (MiniLM) runs d64's


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    keep = _CONFIGS[_situation({**named_args, **kwargs})]
    return keep if _AUTOTUNE else keep[-1:]


_sage_fwd = _sage_fwd_kernel if _INTERPRET else triton.autotune(
    configs=[c for cands in _CONFIGS.values() for c in cands], key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune})(_sage_fwd_kernel)
# The config each key settled on: launches under CUDA-graph capture (no timing) reuse it.
_CHOSEN: dict[tuple, triton.Config] = {}


def _launch(grid, args: tuple, kwargs: dict, block_n: Optional[int], dtype: torch.dtype
            ) -> None:
    """Interpreter: fixed small tiles. GPU: the autotuner, unless block_n forces the tile width
    or a CUDA graph is being captured (then the remembered or always-fitting config)."""
    if _INTERPRET:
        blocks = dict(_INTERPRET_BLOCKS, **({"BLOCK_N": block_n} if block_n else {}))
        _sage_fwd[grid](*args, **kwargs, **blocks)
        return
    key = (str(args[0].device), str(dtype), *(kwargs[k] for k in _TUNE_KEY))
    config = _CHOSEN.get(key)
    capturing = args[0].is_cuda and torch.cuda.is_current_stream_capturing()
    if block_n is not None or (config is None and capturing):
        fallback = _CONFIGS[_situation(kwargs)][-1]
        config = _cfg(fallback.kwargs["BLOCK_M"], block_n or fallback.kwargs["BLOCK_N"],
                      fallback.num_warps, fallback.num_stages)
    if config is not None:
        _sage_fwd.fn[grid](*args, **kwargs, **config.all_kwargs())
        return
    _sage_fwd[grid](*args, **kwargs)
    if getattr(_sage_fwd, "best_config", None) is not None:
        _CHOSEN[key] = _sage_fwd.best_config


# ----------------------------------------------------------------------------- host helpers

class Quantized(NamedTuple):
    """What ``quantize`` returns (see the legend); BQ / BK tokens share a scale (1: per token)."""
    q: torch.Tensor                  # int8 [B, Hq, Nq, D]: round(c·q / s_q)
    q_scale: torch.Tensor            # fp32 [B, Hq, ⌈Nq/BQ⌉]
    k: torch.Tensor                  # int8 [B, Hkv, Nk, D]: round((k − μ) / s_k)
    k_scale: torch.Tensor            # fp32 [B, Hkv, ⌈Nk/BK⌉]
    k_mean: torch.Tensor             # fp32 [B, Hkv, D]: μ (zeros without smoothing)
    shift: torch.Tensor              # fp32 [B, Hq, Nq]: r = c·q·μ
    v: Optional[torch.Tensor]        # e4m3 [B, Hkv, Dv, Nk'] K-major (pv="fp8"), else None
    v_scale: Optional[torch.Tensor]  # fp32 [B, Hkv, Dv]: s_v (pv="fp8"), else None
    block_q: int
    block_k: int


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _resolve_pv(pv: str, q: torch.Tensor) -> str:
    """"auto": FP8 P·V on Hopper and newer when fp8 exists, FP16 elsewhere (and interpreted)."""
    if pv != "auto":
        return pv
    hopper = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
    return "fp8" if _FP8 and hopper else "fp16"


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
             causal: str, pv: str = "auto") -> list[str]:
    """Human-readable reasons the kernel cannot run these inputs; empty list = supported.
    (No dropout, window or soft-cap: those sites go to the exact kernels.)"""
    reasons: list[str] = []
    if q.dtype not in _DTYPES:
        reasons.append(f"dtype {_name(q.dtype)} not supported: the quantized kernel takes "
                       "float16/bfloat16 (use the flash kernel for float32)")
    reasons += operand_reasons(q, k, v, mask, causal, interpreted=_INTERPRET)
    if pv not in _PV_MODES:
        reasons.append(f"pv {pv!r} not one of {_PV_MODES}")
    elif pv == "fp8" and not _FP8:
        reasons.append("pv='fp8' needs float8_e4m3fn in torch and float8e4nv in triton")
    elif pv == "fp8" and q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        reasons.append("pv='fp8' needs an FP8 tensor core (sm_89+)")
    if any(t.dim() != 4 for t in (q, k, v)):
        return reasons
    d = q.shape[-1]
    if d not in _HEAD_DIMS or k.shape[-1] != d:
        reasons.append(f"head dims q {d}, k {k.shape[-1]}: the quantized kernel needs both "
                       f"in {_HEAD_DIMS}")
    if v.shape[-1] not in _HEAD_DIMS:
        reasons.append(f"value head dim {v.shape[-1]} not in {_HEAD_DIMS}")
    return reasons


def _check_blocks(block_q: int, block_k: int) -> None:
    for name, n in (("block_q", block_q), ("block_k", block_k)):
        if not (isinstance(n, int) and (n == 1 or n >= 16 and n & (n - 1) == 0)):
            raise ValueError(f"{name}: expected 1 (a scale per token) or a power of two >= 16 "
                             f"(a scale per block of tokens), got {n!r}")


def _device_ctx(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
             *, pv: str = "fp16", smooth_k: bool = True, block_q: int = 1,
             block_k: int = 1) -> Quantized:
    """INT8 q and k (a scale per ``block_q`` / ``block_k`` tokens, 1 = per token; k smoothed
    unless ``smooth_k=False``) and, with ``pv="fp8"``, the K-major e4m3 v with per-channel scales.
    New tensors only: the inputs are read, never written (structure: see the legend)."""
    _check_blocks(block_q, block_k)
    pv = _resolve_pv(pv, q)
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    dev, fp8 = q.device, pv == "fp8"
    f32, i8 = dict(dtype=torch.float32, device=dev), dict(dtype=torch.int8, device=dev)
    smooth = smooth_k and nk > 0  # μ in fp32 straight from k's dtype (no fp32 copy of k)
    mu = k.mean(dim=2, dtype=torch.float32).contiguous() if smooth else \
        torch.zeros((b, hkv, d), **f32)  # zeros: smoothing off, same code
    q8, k8 = torch.empty((b, hq, nq, d), **i8), torch.empty((b, hkv, nk, d), **i8)
    sq = torch.empty((b, hq, cdiv(nq, block_q)), **f32)
    sk = torch.empty((b, hkv, cdiv(nk, block_k)), **f32)
    shift = torch.empty((b, hq, nq), **f32)
    npad, vt8, sv, vmax = cdiv(max(nk, 1), 16) * 16, None, None, None  # 16-byte rows
    if fp8:  # written by the k/v launch, which does not run without keys (zeros then)
        new = torch.empty if k.numel() else torch.zeros
        vt8 = new((b, hkv, dv, npad), dtype=torch.float8_e4m3fn, device=dev)
        sv = new((b, hkv, dv), **f32)
        # max|v| per channel: one read, no |v| copy, exact in v's dtype (s_v = it/448 in-kernel)
        vmax = torch.linalg.vector_norm(v, float("inf"), dim=2).contiguous() if nk else None
    tok_q, tok_k = (max(_QUANT_BLOCK, n) for n in (block_q, block_k))
    c = (1.0 / math.sqrt(d) if scale is None else float(scale)) * _LOG2E_F
    with _device_ctx(q):
        if q.numel():
            _quant_q_kernel[(cdiv(nq, tok_q), hq, b)](
                q, mu, q8, sq, shift, *q.stride()[:3], nq, hkv, hq // hkv, c, G=block_q, D=d,
                BLOCK=tok_q, num_warps=4 if _INTERPRET or d <= 64 else 8)
        if k.numel():
            _quant_kv_kernel[(cdiv(nk, tok_k), hkv, b)](
                k, mu, k8, sk, v, vmax if fp8 else mu, sv if fp8 else mu, vt8 if fp8 else k8,
                *k.stride()[:3], *v.stride()[:3], nk, npad, SUBTRACT=smooth, PV_FP8=fp8,
                EMU_FP8=_INTERPRET, G=block_k, D=d, DV=dv, BLOCK=tok_k,
                num_warps=4 if _INTERPRET or max(d, dv if fp8 else 0) <= 64 else 8)
    return Quantized(q8, sq, k8, sk, mu, shift, vt8, sv, block_q, block_k)


def _mask_args(mask: Optional[torch.Tensor], dummy: torch.Tensor
               ) -> tuple[torch.Tensor, tuple, dict]:
    """(tensor to read, strides with 0 on broadcast dims, the mask's constexpr flags); bool is
    read as uint8; query-row stride 0 reads one row vector per key tile (MASK_ROWS_BCAST)."""
    if mask is None:
        return dummy, (0, 0, 0, 0), dict(MASK_KIND=_NO_MASK.value, MASK_ROWS_BCAST=False)
    strides = tuple(0 if n == 1 else s for n, s in zip(mask.shape, mask.stride()))
    kind = _BOOL_MASK.value if mask.dtype == torch.bool else _ADD_MASK.value
    m = mask.view(torch.uint8) if kind == _BOOL_MASK.value else mask
    return m, strides, dict(MASK_KIND=kind, MASK_ROWS_BCAST=strides[2] == 0)


def _fill2(mask_fill: float) -> float:
    """The bool-mask fill in base 2; a finite fill stays finite (see _MIN_SCORE2); ±inf pass."""
    fill = float(mask_fill)
    return fill if not math.isfinite(fill) else max(_MIN_SCORE2_F, min(-_MIN_SCORE2_F,
                                                                       fill * _LOG2E_F))


def _check(q, k, v, mask, causal, pv) -> None:
    reasons = supports(q, k, v, mask, causal, pv)
    if reasons:
        raise ValueError("sage attention cannot run these inputs: " + "; ".join(reasons))


# ----------------------------------------------------------------------------- public API

def sage_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                 causal: str = "none", mask_fill: float = float("-inf"), pv: str = "auto",
                 *, smooth_k: bool = True, block_q: int = 1, block_k: int = 1,
                 block_n: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B,Hq,Nq,Dv] in q.dtype (contiguous), lse [B,Hq,Nq] fp32 (natural log of the
    quantized scores; -inf on rows with no key). ``pv``: "fp8" (e4m3 P·V, sm_89+), "fp16" (P in
    v's dtype, v unquantized) or "auto" (fp8 on sm_90+). ``block_q``/``block_k``: tokens per
    quantization scale; ``block_n`` forces the key-tile width (to compare with
    ``sage_reference``; on GPUs it skips autotuning). Raises ValueError with ``supports``'
    reasons. Inference only: nothing here has a backward."""
    _check(q, k, v, mask, causal, pv)
    _check_blocks(block_q, block_k)
    if block_n is not None and (block_n < 32 or block_n & (block_n - 1)):
        raise ValueError(f"block_n: expected a power of two >= 32, got {block_n!r}")
    pv = _resolve_pv(pv, q)
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((b, hq, nq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    if lse.numel() == 0 or nk == 0:  # nothing to compute, or no key for any row
        return out.zero_(), lse.fill_(float("-inf"))
    qz = quantize(q, k, v, scale, pv=pv, smooth_k=smooth_k, block_q=block_q, block_k=block_k)
    m, m_strides, mask_flags = _mask_args(mask, q)
    fp8 = pv == "fp8"
    npad = qz.v.shape[3] if fp8 else nk
    args = (qz.q, qz.q_scale, qz.shift, qz.k, qz.k_scale, qz.v if fp8 else v,
            qz.v_scale if fp8 else qz.q_scale, m, out, lse, *v.stride()[:3], *m_strides,
            hq, hq // hkv, nq, nk, npad, _fill2(mask_fill),
            nk - nq if causal == "bottom_right" else 0)
    kwargs = dict(NQ_BUCKET=next_pow2(nq), NK_BUCKET=next_pow2(nk),
                  CAUSAL=causal != "none", PV_FP8=fp8, EMU_FP8=_INTERPRET,
                  EMU_BF16=_INTERPRET and q.dtype == torch.bfloat16, QBLOCK_Q=block_q,
                  QBLOCK_K=block_k, D=d, DV=dv, **mask_flags)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (cdiv(nq, meta["BLOCK_M"]), hq, b)

    with _device_ctx(q):
        _launch(grid, args, kwargs, block_n, q.dtype)
    return out, lse


def sage_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   causal: str = "none", pv: str = "fp16", *, mask_fill: float = float("-inf"),
                   smooth_k: bool = True, block_q: int = 1, block_k: int = 1,
                   block_n: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic replayed in PyTorch (fp32 out, fp32 lse), for tests: the same
    ``quantize`` output, scores from the exact integer products, the online softmax over key
    tiles of ``block_n`` (default: the kernel's fixed tile under the interpreter, else the GPU
    fallback's, 64; pass the kernel's ``block_n``), P rounded exactly as the kernel rounds it.
    Memory O(Nq·Nk) per head: small inputs only."""
    _check(q, k, v, mask, causal, pv)
    pv = _resolve_pv(pv, q)
    block_n = block_n or (_INTERPRET_BLOCKS["BLOCK_N"] if _INTERPRET else 64)
    qz = quantize(q, k, v, scale, pv=pv, smooth_k=smooth_k, block_q=block_q, block_k=block_k)
    b, hq, nq, _ = q.shape
    g, nk = hq // k.shape[1], k.shape[2]
    sq = qz.q_scale.repeat_interleave(block_q, dim=-1)[..., :nq]  # [B, Hq, Nq]
    sk = qz.k_scale.repeat_interleave(block_k, dim=-1)[..., :nk].repeat_interleave(g, dim=1)
    # Integer products below 2^24 are exact in fp32, whatever the summation order.
    qk = torch.matmul(qz.q.float(), qz.k.float().repeat_interleave(g, dim=1).transpose(-1, -2))
    s = qk * sk[..., None, :] * sq[..., :, None]  # [B, Hq, Nq, Nk] base 2
    if mask is not None:
        mk = mask.expand(b, hq, nq, nk)
        if mask.dtype == torch.bool:
            s = torch.where(mk, s, torch.full_like(s, _fill2(mask_fill)))
        else:
            bias = mk.float()
            s = s + torch.where(bias == float("-inf"), bias, (bias * _LOG2E_F).clamp_min(
                _MIN_SCORE2_F))
    if causal != "none":
        offset = nk - nq if causal == "bottom_right" else 0
        rows = torch.arange(nq, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(nk, device=q.device)[None, :] > rows + offset, -math.inf)
    if pv == "fp8":
        vv = qz.v[..., :nk].float().transpose(-1, -2).repeat_interleave(g, dim=1)
    else:
        vv = v.repeat_interleave(g, dim=1)
    m = torch.full((b, hq, nq), -math.inf, device=q.device)
    l = torch.zeros((b, hq, nq), device=q.device)
    acc = torch.zeros((b, hq, nq, v.shape[3]), device=q.device)
    for j in range(0, nk, block_n):
        sj = s[..., j:j + block_n]
        m_new = torch.maximum(m, sj.amax(dim=-1))
        m_safe = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        p = torch.exp2(sj - m_safe[..., None])
        alpha = torch.exp2(m - m_safe)
        l = l * alpha + p.sum(dim=-1)
        if pv == "fp8":
            pr = (p * _FP8_MAX).to(torch.float8_e4m3fn).float()
        else:
            pr = p.to(v.dtype).float()
        acc = acc * alpha[..., None] + torch.matmul(pr, vv[..., j:j + block_n, :].float())
        m = m_new
    l_safe = torch.where(l == 0, torch.ones_like(l), l)
    if pv == "fp8":
        acc = acc * (qz.v_scale.repeat_interleave(g, dim=1) / _FP8_MAX)[..., None, :]
    out = torch.where((l == 0)[..., None], torch.zeros_like(acc), acc / l_safe[..., None])
    lse = torch.where(l == 0, torch.full_like(l, -math.inf),
                      (m + torch.log2(l_safe) + qz.shift) * _LN2_F)
    return out, lse
