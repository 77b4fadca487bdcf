"""Training-free block masks for the sparse kernels: prediction, and reuse across calls.

Legend (``sparse.py``'s symbols; blocks of MB_M x MB_N, each cut into S pieces of
PM = MB_M / S query rows and PN = MB_N / S keys, S = ``sub``; S = 1 is plain block pooling)::

    q̄_a   mean of q over query piece a                      [B, Hq, ceil(Nq/PM), D] fp32
    k̄_b   mean of k over the kept keys of key piece b, n_b of them   [B, Hkv, ceil(Nk/PN), D]
    ℓ_ab  = scale·log2e·q̄_a·k̄_bᵀ + log2 n_b    (base 2; -inf where the pieces share no pair
            inside the band, or b holds no kept key): the log-mass of piece b for the rows of a
    P_a   = softmax_b(ℓ_ab)                     piece a's estimated distribution over key pieces
    p_ij  = Σ_{a ∈ i} w_a Σ_{b ∈ j} P_a(b) / Σ_{a ∈ i} w_a    (w_a: a's rows; Σ_j p_ij = 1)
            the estimated share of key block j in the mass of query block i's rows
    keep  = the smallest set of key blocks, largest p first, whose p sum to >= τ (ties kept),
            plus the diagonal blocks (every row keeps a key of its own band) and, for causal
            attention, key block 0 (the "attention sink" of causal LMs); τ >= 1 keeps every
            block the band allows, so the output equals the dense kernel's.

Pieces matter: exp of a mean logit underestimates the mean of exp (Jensen) where logits vary
within a block, most where attention is sharp near block edges; smaller pieces shrink the gap at
(S²) times the scoring work, still a small fraction of the attention's (S = 4: 128-token blocks
scored by 32-token pieces). The keep set only grows with τ, so density is monotone in τ.

Kernels (three launches, no host synchronisation): ``_pool_kernel`` (the means of q and k per
piece and the kept-key counts n_b; a key-padding mask [B|1, 1, 1, Nk] weights the keys, so
padded blocks drop out), ``_score_kernel`` (p per block row: each piece row's online softmax
over key pieces, then its masses summed per key block) and ``_select_kernel`` (per block row:
the threshold by bisection, the keep set, full/partial classification, and FlexAttention's
lists written directly). ``predict_reference`` states the same in PyTorch (tests).

Reuse (``MaskReuse``): a diffusion model calls the same attention every step with slowly
changing inputs. A site keeps its layout and re-estimates every ``every`` calls or when the
*probe* (the means of the first ``probe_rows`` rows of every block, a fraction of the pooling
reads), centred per head, has cosine < ``min_cosine`` to the probe that produced the layout.
The decision is a device flag that gates the three kernels (``GATED``), which then refresh the
kept layout in place: no host synchronisation, so a CUDA graph can capture the call and its
replays keep deciding (``test_mask_reuse_in_a_cuda_graph``, a GPU test).

Registry glue: :class:`SparseConfig` names a configured kernel (``sparse:tau=0.9``, with
``every=``/``site=`` for reuse); ``kernel_forward``/``kernel_backward`` are its registry entry
points. The τ gate of ``policy="sparse"`` is ``attnfuse/tune/sparse_gate.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl

from . import sparse
from .reference import NO_WINDOW, band_offset, cdiv, check_window, next_pow2
from .sparse_layout import (BlockLayout, band_sides, block_structure, default_block)

__all__ = ["predict", "predict_reference", "pool", "MaskReuse", "SparseConfig"]

_LOG2E_F = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _pool_pieces(X, piece0, N, sxn, Keep, skn, D: tl.constexpr, HAS_KEEP: tl.constexpr,
                 PS: tl.constexpr, RD: tl.constexpr, RC: tl.constexpr, G: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Sums (fp32 [G, BLOCK_D]) and counts ([G]) of the kept rows among the first RD of each of
    the G pieces of PS rows from piece ``piece0`` on, RC rows of each piece per load."""
    offs_g = piece0 + tl.arange(0, G)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([G, BLOCK_D], tl.float32)
    cnt = tl.zeros([G, RC], tl.float32)
    for r in range(0, RD, RC):
        rows = offs_g[:, None] * PS + r + tl.arange(0, RC)[None, :]  # [G, RC]
        w = (rows < N).to(tl.float32)
        if HAS_KEEP:
            w = w * (tl.load(Keep + rows * skn, mask=rows < N, other=0) != 0).to(tl.float32)
        x = tl.load(X + rows[:, :, None] * sxn + offs_d[None, None, :],
                    mask=(rows[:, :, None] < N) & (offs_d[None, None, :] < D), other=0.0)
        acc += tl.sum(x.to(tl.float32) * w[:, :, None], 1)  # [G, BLOCK_D]
        cnt += w
    return acc, tl.sum(cnt, 1)


@triton.jit
def _pool_kernel(Q, K, Keep, PQ, PK, CK, Go, sqb, sqh, sqm, skb, skh, skn, smb, smn,
                 HQ, NQ, NK, NQS, NKS, D: tl.constexpr, HAS_KEEP: tl.constexpr,
                 SQ_: tl.constexpr, SK_: tl.constexpr, RD_Q: tl.constexpr, RD_K: tl.constexpr,
                 RC: tl.constexpr, G: tl.constexpr, BLOCK_D: tl.constexpr,
                 GATED: tl.constexpr):
    """Program (G pieces, head, batch): heads [0, Hq) pool q, heads [Hq, Hq + Hkv) pool k.
    GATED: nothing unless the device flag ``Go[0]`` is set (as every kernel here)."""
    if GATED:
        if tl.load(Go) == 0:
            return
    piece0 = tl.program_id(0) * G
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hkv = tl.num_programs(1) - HQ
    offs_g = piece0 + tl.arange(0, G)
    offs_d = tl.arange(0, BLOCK_D)
    if h < HQ:
        if piece0 < NQS:
            acc, cnt = _pool_pieces(Q + b * sqb + h * sqh, piece0, NQ, sqm, Keep, 0, D, False,
                                    SQ_, RD_Q, RC, G, BLOCK_D)
            tl.store(PQ + ((b * HQ + h) * NQS + offs_g[:, None]) * BLOCK_D + offs_d[None, :],
                     acc / tl.maximum(cnt, 1.0)[:, None], mask=offs_g[:, None] < NQS)
    else:
        hk = h - HQ
        if piece0 < NKS:
            acc, cnt = _pool_pieces(K + b * skb + hk * skh, piece0, NK, skn, Keep + b * smb, smn,
                                    D, HAS_KEEP, SK_, RD_K, RC, G, BLOCK_D)
            row = (b * hkv + hk) * NKS + offs_g
            tl.store(PK + row[:, None] * BLOCK_D + offs_d[None, :],
                     acc / tl.maximum(cnt, 1.0)[:, None], mask=offs_g[:, None] < NKS)
            tl.store(CK + row, cnt, mask=offs_g < NKS)


@triton.jit
def _sub_band(r0, r1, c0, c1, offset, left, right):
    """Whether rows [r0, r1] x keys [c0, c1] hold a pair inside the band (broadcasting)."""
    return (c0 <= r1 + offset + right) & (c1 >= r0 + offset - left)


@triton.jit
def _logits(pq, PK, CK, kv_sub, offs_b, ar0, ar1, NQ, NK, NKS, c2, offset, left, right,
            PN: tl.constexpr, BLOCK_D: tl.constexpr):
    """Base-2 log-masses ℓ = c2·q̄_a·k̄_b + log2 n_b of sub-rows a against key sub-blocks
    ``offs_b`` [KCS], -inf where the pair is empty or outside the band."""
    in_b = offs_b < NKS
    pk = tl.load(PK + (kv_sub + offs_b[:, None]) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :],
                 mask=in_b[:, None], other=0.0)  # [KCS, BLOCK_D]
    nb = tl.load(CK + kv_sub + offs_b, mask=in_b, other=0.0)  # [KCS]
    x = tl.dot(pq, tl.trans(pk))  # [RS, KCS]
    br0 = offs_b * PN
    br1 = tl.minimum(br0 + PN, NK) - 1
    ok = (nb > 0.0)[None, :] & _sub_band(ar0[:, None], ar1[:, None], br0[None, :], br1[None, :],
                                         offset, left, right)
    return tl.where(ok, x * c2 + tl.math.log2(tl.maximum(nb, 1.0))[None, :], float("-inf"))


@triton.jit
def _score_kernel(PQ, PK, CK, P, Go, HQ, GROUP, NQ, NK, NQB, NKB, NQS, NKS, c2, offset, left,
                  right, PM: tl.constexpr, PN: tl.constexpr, SQ: tl.constexpr, SK: tl.constexpr,
                  ROWS: tl.constexpr, KC: tl.constexpr, BLOCK_D: tl.constexpr,
                  GATED: tl.constexpr):
    """p[i, j] for ROWS query blocks of one query head: each sub-row's softmax over key
    sub-blocks (two passes: its max and sum, then the masses), summed per key block and
    averaged over the block's sub-rows weighted by their rows."""
    if GATED:
        if tl.load(Go) == 0:
            return
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    offs_a = tl.program_id(0) * (ROWS * SQ) + tl.arange(0, ROWS * SQ)  # sub-rows
    in_a = offs_a < NQS
    pq = tl.load(PQ + ((b * HQ + h) * NQS + offs_a[:, None]) * BLOCK_D
                 + tl.arange(0, BLOCK_D)[None, :], mask=in_a[:, None], other=0.0)  # [RS, BD]
    ar0 = offs_a * PM
    ar1 = tl.minimum(ar0 + PM, NQ) - 1
    kv_sub = (b * (HQ // GROUP) + hk) * NKS
    m = tl.full([ROWS * SQ], float("-inf"), tl.float32)
    z = tl.zeros([ROWS * SQ], tl.float32)
    for kc in range(0, NKS, KC * SK):  # pass 1: each sub-row's max and sum (online)
        lg = _logits(pq, PK, CK, kv_sub, kc + tl.arange(0, KC * SK), ar0, ar1, NQ, NK, NKS, c2,
                     offset, left, right, PN, BLOCK_D)  # [RS, KC·SK]
        m_new = tl.maximum(m, tl.max(lg, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.math.exp2(m - m_safe) + tl.sum(tl.math.exp2(lg - m_safe[:, None]), 1)
        m = m_new
    # Sub-rows weigh by their rows in [0, Nq) (0 for none, or none with a key: z = 0).
    w = tl.where(in_a & (z > 0.0), (tl.minimum(ar1 + 1, NQ) - ar0).to(tl.float32), 0.0)
    inv = tl.where(z > 0.0, w / tl.where(z > 0.0, z, 1.0), 0.0)  # [RS]
    m = tl.where(m == float("-inf"), 0.0, m)
    wsum = tl.sum(tl.reshape(w, [ROWS, SQ]), 1)  # [ROWS]
    offs_i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    for kc in range(0, NKS, KC * SK):  # pass 2: the masses, per key block
        lg = _logits(pq, PK, CK, kv_sub, kc + tl.arange(0, KC * SK), ar0, ar1, NQ, NK, NKS, c2,
                     offset, left, right, PN, BLOCK_D)
        e = tl.math.exp2(lg - m[:, None]) * inv[:, None]  # [RS, KC·SK]
        mass = tl.sum(tl.sum(tl.reshape(e, [ROWS, SQ, KC, SK]), 3), 1)  # [ROWS, KC]
        offs_j = kc // SK + tl.arange(0, KC)
        tl.store(P + ((b * HQ + h) * NQB + offs_i[:, None]) * NKB + offs_j[None, :],
                 mass / tl.maximum(wsum, 1.0)[:, None],
                 mask=(offs_i[:, None] < NQB) & (offs_j[None, :] < NKB))


@triton.jit
def _select_kernel(P, CK, State, PCnt, PIdx, FCnt, FIdx, Go, HQ, GROUP, NQ, NK, NQB, NKB, NKS,
                   offset, left, right, tau, MB_M: tl.constexpr, MB_N: tl.constexpr,
                   SK: tl.constexpr, KEEP_ALL: tl.constexpr, KEEP_FIRST: tl.constexpr,
                   ROWS: tl.constexpr, NKB_P2: tl.constexpr, GATED: tl.constexpr):
    """The keep sets of ROWS query blocks of one query head, classified and listed (every
    count and state entry of the rows is written, so a layout can be refreshed in place)."""
    if GATED:
        if tl.load(Go) == 0:
            return
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # query blocks
    offs_j = tl.arange(0, NKB_P2)  # key blocks
    in_i = offs_i < NQB
    in_j = offs_j < NKB
    kv_sub = (b * (HQ // GROUP) + h // GROUP) * NKS
    subs = offs_j[:, None] * SK + tl.arange(0, SK)[None, :]
    cnt = tl.sum(tl.load(CK + kv_sub + subs, mask=subs < NKS, other=0.0), 1)  # kept keys
    # The band at block level (as sparse_layout.block_structure).
    r0 = offs_i[:, None] * MB_M
    r1 = tl.minimum(r0 + MB_M, NQ) - 1
    c0 = offs_j[None, :] * MB_N
    c1 = tl.minimum(c0 + MB_N, NK) - 1
    allowed = (in_i[:, None] & in_j[None, :] & (cnt > 0.0)[None, :]
               & _sub_band(r0, r1, c0, c1, offset, left, right))  # [ROWS, NKB_P2]
    full = (allowed & (r0 + MB_M <= NQ) & (c0 + MB_N <= NK) & (c0 + MB_N - 1 <= r0 + offset + right)
            & (c0 >= r0 + MB_M - 1 + offset - left))
    if KEEP_ALL:
        keep = allowed
    else:
        rows = (b * HQ + h) * NQB + offs_i
        p = tl.load(P + rows[:, None] * NKB + offs_j[None, :], mask=allowed, other=0.0)
        # The threshold: the largest t with Σ p[p >= t] >= τ (the last entry of the smallest
        # prefix of the sorted p that reaches τ; ties with it are kept), by bisection on log2 t:
        # 24 halvings of [-40, 1] leave 2.4e-6 of the exponent (blocks below 2^-40 of a row's
        # mass are never worth a visit).
        lo = tl.full([ROWS], -40.0, tl.float32)
        hi = tl.full([ROWS], 1.0, tl.float32)
        for _ in range(24):
            mid = (lo + hi) * 0.5
            up = tl.sum(tl.where(p >= tl.math.exp2(mid)[:, None], p, 0.0), 1) >= tau
            lo = tl.where(up, mid, lo)
            hi = tl.where(up, hi, mid)
        keep = allowed & (p >= tl.math.exp2(lo)[:, None]) & (p > 0.0)
        keep = keep | (allowed & (c0 <= r1 + offset) & (c1 >= r0 + offset))  # the diagonal
        if KEEP_FIRST:
            keep = keep | (allowed & (c0 == 0))
    is_full = keep & full
    is_part = keep ^ is_full
    rows = (b * HQ + h) * NQB + offs_i  # [ROWS]
    tl.store(State + rows[:, None] * NKB + offs_j[None, :],
             tl.where(is_full, 2, tl.where(is_part, 1, 0)).to(tl.int8),
             mask=in_i[:, None] & in_j[None, :])
    # Compact the kept indices: each kept block's slot is the count of kept ones before it.
    part = is_part.to(tl.int32)
    tl.store(PCnt + rows, tl.sum(part, 1), mask=in_i)
    tl.store(PIdx + rows[:, None] * NKB + tl.cumsum(part, 1) - 1, offs_j[None, :] + 0 * part,
             mask=is_part)
    whole = is_full.to(tl.int32)
    tl.store(FCnt + rows, tl.sum(whole, 1), mask=in_i)
    tl.store(FIdx + rows[:, None] * NKB + tl.cumsum(whole, 1) - 1, offs_j[None, :] + 0 * whole,
             mask=is_full)


# ----------------------------------------------------------------------------- prediction

def _key_keep(mask: Optional[torch.Tensor], mask_fill: float, b: int, nk: int
              ) -> Optional[torch.Tensor]:
    """The keys a key-padding mask keeps, uint8 [B|1, Nk] (a view), when ``mask`` is one
    (bool [B|1, 1, 1, Nk] with fill -inf: its dropped keys get probability 0); else None (the
    prediction then ignores the mask, and the kernel still applies it)."""
    if (mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[2] != 1 or mask_fill != float("-inf")):
        return None
    return mask[:, 0, 0, :].view(torch.uint8).expand(mask.shape[0], nk)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: expected [B, Hq, Nq, D] "
                         "and [B, Hkv, Nk, D] with Hq a multiple of Hkv")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need unit stride on the head dim: pass .contiguous() tensors")


def pool(q: torch.Tensor, k: torch.Tensor, size: tuple[int, int], *, rows: Optional[int] = None,
         keep: Optional[torch.Tensor] = None, go: Optional[torch.Tensor] = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q̄ [B, Hq, ceil(Nq/sq), BD], k̄ [B, Hkv, ceil(Nk/sk), BD], n [B, Hkv, ceil(Nk/sk)]) in
    fp32 for pieces of ``size`` = (sq, sk) tokens, BD the padded head dim (zeros past D): means
    over all rows of a piece, or over its first ``rows`` (the reuse probe); ``n`` counts the
    kept keys (``keep``, uint8 [B|1, Nk], weights them). ``go`` (int32 [1] on the device):
    computed only where ``go[0] != 0``, else left unwritten."""
    _check_qk(q, k)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    sq, sk = size
    nqs, nks = -(-nq // sq), -(-nk // sk)
    bd = max(16, next_pow2(d))
    pq = torch.empty((b, hq, nqs, bd), dtype=torch.float32, device=q.device)
    pk = torch.empty((b, hkv, nks, bd), dtype=torch.float32, device=q.device)
    ck = torch.empty((b, hkv, nks), dtype=torch.float32, device=q.device)
    if pq.numel() + pk.numel() == 0:
        return pq, pk, ck.zero_()
    rq, rk = (sq, sk) if rows is None else (min(rows, sq), min(rows, sk))
    # RC rows of G pieces per load (32 rows); pieces read in RC-row steps.
    rc = min(32, next_pow2(min(rq, rk)))
    g = max(1, 32 // rc)
    rq, rk = -(-rq // rc) * rc, -(-rk // rc) * rc
    keep_arg, keep_strides = (keep, (keep.stride(0) if keep.shape[0] > 1 else 0, keep.stride(1))) \
        if keep is not None else (q, (0, 0))
    with sparse._device_ctx(q):
        _pool_kernel[(cdiv(max(nqs, nks, 1), g), hq + hkv, b)](
            q, k, keep_arg, pq, pk, ck, q if go is None else go, *q.stride()[:3],
            *k.stride()[:3], *keep_strides, hq, nq, nk, nqs, nks, D=d, HAS_KEEP=keep is not None,
            SQ_=sq, SK_=sk, RD_Q=rq, RD_K=rk, RC=rc, G=g, BLOCK_D=bd, GATED=go is not None,
            num_warps=4)
    return pq, pk, ck


def _resolve(block: Any, sub: int, causal: str, window: tuple[int, int],
             keep_first: Optional[bool]) -> tuple[tuple[int, int], tuple[int, int], bool]:
    from .sparse_layout import _check_block
    block = _check_block(default_block() if block is None else block)
    if not (isinstance(sub, int) and sub >= 1 and sub & (sub - 1) == 0
            and all(n % sub == 0 for n in block)):
        raise ValueError(f"sub: expected a power of two dividing the block {block} (pieces "
                         f"per block), got {sub!r}")
    return block, check_window(window), (causal != "none") if keep_first is None else keep_first


def predict(q: torch.Tensor, k: torch.Tensor, tau: float, *, causal: str = "none",
            window: tuple[int, int] = NO_WINDOW, scale: Optional[float] = None, block: Any = None,
            sub: int = 4, mask: Optional[torch.Tensor] = None, mask_fill: float = float("-inf"),
            keep_first: Optional[bool] = None, out: Optional[BlockLayout] = None,
            go: Optional[torch.Tensor] = None) -> BlockLayout:
    """The predicted block layout [B, Hq, NQB, NKB] for threshold ``tau`` (see the legend):
    three launches, no host synchronisation. ``sub`` pieces per block on each side (1: plain
    block means); ``keep_first`` defaults to ``causal != "none"``; ``mask`` is the call's mask
    (a key-padding mask also shapes the prediction).

    ``out``: a layout that an earlier prediction for the same shapes, band and block returned,
    refreshed in place (its block state and forward lists; returned). ``go`` (int32 [1] on the
    device): the kernels run only where ``go[0] != 0`` and otherwise leave ``out`` as it was,
    so the decision to re-estimate can stay on the device (``MaskReuse``)."""
    if not 0.0 < tau:
        raise ValueError(f"tau: expected a mass threshold in (0, 1] (1 keeps every block), "
                         f"got {tau!r}")
    block, window, keep_first = _resolve(block, sub, causal, window, keep_first)
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    mb_m, mb_n = block
    pm, pn = mb_m // sub, mb_n // sub
    nqb, nkb = -(-nq // mb_m), -(-nk // mb_n)
    if go is not None and out is None:
        raise ValueError("go (a device flag) needs out, the layout it may leave as it was")
    layout = _output_layout(out, (b, hq, nqb, nkb), block, nq, nk, causal, window, q.device)
    state = layout.state
    cnts, idxs = layout._lists["kv"][0::2], layout._lists["kv"][1::2]
    if not state.numel():
        return layout
    pq, pk, ck = pool(q, k, (pm, pn), keep=_key_keep(mask, mask_fill, b, nk), go=go)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    left, right = band_sides(causal, window)
    offset = band_offset(causal, nq, nk)
    group = hq // k.shape[1]
    nkb_p2 = max(16, next_pow2(nkb))
    p = q  # unused with tau >= 1: every allowed block is kept
    gate = q if go is None else go
    with sparse._device_ctx(q):
        if tau < 1.0:
            p = torch.empty((b, hq, nqb, nkb), dtype=torch.float32, device=q.device)
            # 64 piece rows against 64 key pieces per step (32 rows for head dims over 128).
            pieces = 64 if pq.shape[3] <= 128 else 32
            rows, kc = max(1, pieces // sub), max(1, 64 // sub)
            _score_kernel[(cdiv(nqb, rows), hq, b)](
                pq, pk, ck, p, gate, hq, group, nq, nk, nqb, nkb, pq.shape[2], pk.shape[2],
                scale * _LOG2E_F, offset, left, right, PM=pm, PN=pn, SQ=sub, SK=sub, ROWS=rows,
                KC=kc, BLOCK_D=pq.shape[3], GATED=go is not None,
                num_warps=4 if pq.shape[3] <= 64 else 8)
        rows = max(16, min(64, 8192 // nkb_p2))  # query blocks per program: a bounded tile
        _select_kernel[(cdiv(nqb, rows), hq, b)](
            p, ck, state, cnts[0], idxs[0], cnts[1], idxs[1], gate, hq, group, nq, nk, nqb, nkb,
            pk.shape[2], offset, left, right, float(tau), MB_M=mb_m, MB_N=mb_n, SK=sub,
            KEEP_ALL=tau >= 1.0, KEEP_FIRST=keep_first, ROWS=rows, NKB_P2=nkb_p2,
            GATED=go is not None, num_warps=4 if rows * nkb_p2 <= 4096 else 8)
    return layout


def _output_layout(out: Optional[BlockLayout], shape: tuple[int, int, int, int],
                   block: tuple[int, int], nq: int, nk: int, causal: str,
                   window: tuple[int, int], device: torch.device) -> BlockLayout:
    """A new layout with empty lists for ``shape`` [B, Hq, NQB, NKB], or ``out`` after checking
    that it was made for the same shapes, band and block (its transposed lists are dropped:
    they would not follow an in-place refresh)."""
    if out is None:
        layout = BlockLayout(torch.empty(shape, dtype=torch.int8, device=device), block, nq, nk,
                             causal, window)
        cnts = [torch.zeros(shape[:3], dtype=torch.int32, device=device) for _ in range(2)]
        idxs = [torch.empty(shape, dtype=torch.int32, device=device) for _ in range(2)]
        layout._lists["kv"] = (cnts[0], idxs[0], cnts[1], idxs[1])
        return layout
    made = (tuple(out.state.shape), out.block, out.nq, out.nk, out.causal, tuple(out.window),
            out.state.device)
    want = (shape, block, nq, nk, causal, tuple(window), torch.device(device))
    if made != want or "kv" not in out._lists:
        raise ValueError(f"out: a layout predicted for (shape, block, Nq, Nk, causal, window, "
                         f"device) = {want} is needed, got {made}")
    out._lists.pop("q", None)
    return out


def block_masses(q: torch.Tensor, k: torch.Tensor, *, causal: str = "none",
                 window: tuple[int, int] = NO_WINDOW, scale: Optional[float] = None,
                 block: Any = None, sub: int = 4, mask: Optional[torch.Tensor] = None,
                 mask_fill: float = float("-inf")) -> torch.Tensor:
    """The estimated masses p [B, Hq, NQB, NKB] (fp32, PyTorch; see the legend), for tests and
    :func:`predict_reference`."""
    block, window, _ = _resolve(block, sub, causal, window, None)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    (mb_m, mb_n), (pm, pn) = block, (block[0] // sub, block[1] // sub)
    nqs, nks = -(-nq // pm), -(-nk // pn)
    keep = _key_keep(mask, mask_fill, b, nk)
    w = torch.ones(b, nk, device=q.device) if keep is None else keep.float()
    wk = torch.nn.functional.pad(w, (0, nks * pn - nk)).view(b, 1, nks, pn, 1)
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, nks * pn - nk)).view(b, hkv, nks, pn, d)
    n = wk.sum(3)[..., 0]                                                  # [B, 1, NKS]
    kbar = (kf * wk).sum(3) / n.clamp(min=1)[..., None]                    # [B, Hkv, NKS, D]
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, nqs * pm - nq)).view(b, hq, nqs, pm, d)
    rows = (torch.arange(nqs * pm, device=q.device) < nq).view(nqs, pm)
    qbar = (qf * rows[..., None]).sum(3) / rows.sum(1).view(nqs, 1)        # [B, Hq, NQS, D]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    allowed, _, _ = block_structure(nq, nk, (pm, pn), causal, window, q.device)
    ok = allowed & (n[:, :, None, :] > 0)                                  # [B, 1, NQS, NKS]
    lg = (qbar @ kbar.repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * (scale * _LOG2E_F)
    lg = (lg + torch.log2(n.clamp(min=1))[:, :, None, :]).masked_fill(~ok, float("-inf"))
    m = lg.amax(-1, keepdim=True)
    e = torch.exp2(lg - torch.where(m == float("-inf"), 0.0, m))
    z = e.sum(-1, keepdim=True)
    wr = rows.sum(1).float()[:, None] * (z > 0)                            # [B, Hq, NQS, 1]
    e = e / torch.where(z > 0, z, 1.0) * wr
    e = torch.nn.functional.pad(e, (0, -(-nks // sub) * sub - nks, 0, -(-nqs // sub) * sub - nqs))
    mass = e.view(b, hq, -1, sub, e.shape[-1] // sub, sub).sum((3, 5))
    wsum = torch.nn.functional.pad(wr, (0, 0, 0, -(-nqs // sub) * sub - nqs)).view(
        b, hq, -1, sub).sum(-1, keepdim=True)
    return (mass / wsum.clamp(min=1))[:, :, :-(-nq // mb_m), :-(-nk // mb_n)]


def predict_reference(q: torch.Tensor, k: torch.Tensor, tau: float, *, causal: str = "none",
                      window: tuple[int, int] = NO_WINDOW, scale: Optional[float] = None,
                      block: Any = None, sub: int = 4, mask: Optional[torch.Tensor] = None,
                      mask_fill: float = float("-inf"), keep_first: Optional[bool] = None
                      ) -> torch.Tensor:
    """:func:`predict`'s ``state`` (int8 [B, Hq, NQB, NKB]) computed in PyTorch, with the
    keep set taken from the sorted masses, for tests."""
    block, window, keep_first = _resolve(block, sub, causal, window, keep_first)
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    keep = _key_keep(mask, mask_fill, b, nk)
    n = torch.ones(b, nk, device=q.device) if keep is None else keep.float()
    n = torch.nn.functional.pad(n, (0, -(-nk // block[1]) * block[1] - nk)).view(
        b, 1, 1, -1, block[1]).sum(-1)                                     # [B, 1, 1, NKB]
    allowed, full, diag = block_structure(nq, nk, block, causal, window, q.device)
    allowed = allowed & (n > 0)
    if tau >= 1.0:
        keep_set = allowed.expand(b, hq, -1, -1)
    else:
        p = block_masses(q, k, causal=causal, window=window, scale=scale, block=block,
                         sub=sub, mask=mask, mask_fill=mask_fill).masked_fill(~allowed, 0.0)
        ps = p.sort(-1, descending=True).values
        before = ps.cumsum(-1) - ps
        thr = torch.where(before < tau, ps, torch.full_like(ps, float("inf"))).amin(-1, True)
        keep_set = allowed & (p >= thr) & (p > 0) | (allowed & diag)
        if keep_first:
            keep_set[..., 0] |= allowed[..., 0]
    return torch.where(keep_set, torch.where(full, 2, 1), 0).to(torch.int8)


# ----------------------------------------------------------------------------- reuse

def _probe_cosine(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The least cosine, over (batch, head), between two probes (pooled q and k, centred over
    blocks so that a constant offset does not hide a change): a 0-d tensor on their device."""
    worst = []
    for x, y in zip(a, b):
        x = (x - x.mean(2, keepdim=True)).flatten(2)
        y = (y - y.mean(2, keepdim=True)).flatten(2)
        worst.append(torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12).amin())
    return torch.stack(worst).amin()


@dataclass
class MaskReuse:
    """One site's block mask across calls: re-estimated every ``every`` calls, or earlier when
    the probe drifts below ``min_cosine`` to the probe that produced it, or when the mask's
    per-batch sums change (a new padding); a new layout when the call's shapes or arguments
    change. ``stats`` counts calls, estimates and drift-triggered ones.

    The decision stays on the device: each call computes the probe, the drift and a flag, and
    runs the prediction kernels gated by that flag into the kept layout's buffers (they return
    at once when it is 0), then updates the kept probe, sums and age in place. No host
    synchronisation, so CUDA-graph replays keep deciding: nothing but a change of shapes or
    arguments takes a host branch. ``estimate(out=None, go=None)`` predicts a layout (into
    ``out``, gated by ``go``: :func:`predict`'s arguments)."""

    every: int = 8
    min_cosine: float = 0.99
    probe_rows: int = 16
    layout: Optional[BlockLayout] = None
    _key: Any = None
    _probe: Any = None      # (pooled q, pooled k) that produced the layout
    _sums: Any = None       # the mask's per-batch sums then (None without a mask)
    _age: Any = None        # int32 [1]: calls since the last estimate
    _counts: Any = None     # int64 [3]: calls, estimates, drift-triggered estimates

    def __post_init__(self) -> None:
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"every: expected an int >= 1 (calls per estimate), got "
                             f"{self.every!r}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine: expected a cosine in [-1, 1], got {self.min_cosine!r}")

    @property
    def stats(self) -> dict:
        """{"calls", "estimates", "drift"} (reads the device counters: a synchronisation)."""
        if self._counts is None:
            return {"calls": 0, "estimates": 0, "drift": 0}
        calls, estimates, drift = (int(x) for x in self._counts.tolist())
        return {"calls": calls, "estimates": estimates, "drift": drift}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, key: Any,
                 estimate: Callable[..., BlockLayout], block: tuple[int, int],
                 mask: Optional[torch.Tensor] = None) -> BlockLayout:
        """The layout for this call: the kept one, refreshed in place on the device when due,
        or a new ``estimate()`` when ``key`` (the call's other arguments), the shapes or the
        mask's shape changed."""
        key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, key,
               None if mask is None else (tuple(mask.shape), mask.dtype))
        probe = pool(q, k, block, rows=self.probe_rows)[:2] if self.every > 1 else None
        sums = None if mask is None else mask.reshape(mask.shape[0], -1).sum(
            1, dtype=torch.float64)
        if self.layout is None or key != self._key or self.every == 1:
            self.layout, self._key, self._probe, self._sums = estimate(), key, probe, sums
            self._age = torch.zeros(1, dtype=torch.int32, device=q.device)
            if self._counts is None:
                self._counts = torch.zeros(3, dtype=torch.int64, device=q.device)
            self._counts += torch.tensor([1, 1, 0], device=q.device)
            return self.layout
        due = self._age + 1 >= self.every                                   # [1] bool
        changed = torch.zeros_like(due) if sums is None else (sums != self._sums).any()[None]
        drift = (_probe_cosine(probe, self._probe) < self.min_cosine)[None] & ~due & ~changed
        go = due | changed | drift
        estimate(out=self.layout, go=go.to(torch.int32))
        for kept, new in zip(self._probe, probe):
            kept.copy_(torch.where(go, new, kept))
        if sums is not None:
            self._sums.copy_(torch.where(go, sums, self._sums))
        self._age.copy_(torch.where(go, 0, self._age + 1))
        self._counts += torch.cat([torch.ones_like(go), go, drift]).to(torch.int64)
        return self.layout


# ----------------------------------------------------------------------------- registry glue

@dataclass(frozen=True)
class SparseConfig:
    """A configured sparse kernel as the registry names it: ``sparse:tau=0.9`` (predict every
    call) or ``sparse:tau=0.9,every=8,drift=0.99,site=s3`` (reuse per site, see
    :class:`MaskReuse`); ``block=64`` sets the block granularity (default
    ``default_block()``)."""

    tau: float = 0.95
    every: int = 1
    drift: float = 0.99
    site: str = ""
    block: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"sparse kernel: tau must be in (0, 1], got {self.tau!r}")
        if self.every < 1 or (self.every > 1 and not self.site.isidentifier()):
            raise ValueError(f"sparse kernel: every must be >= 1, and reuse (every > 1) needs a "
                             f"site name (an identifier), got every={self.every}, "
                             f"site={self.site!r}")

    def name(self) -> str:
        parts = [f"tau={self.tau:g}"]
        if self.every > 1:
            parts += [f"every={self.every}", f"drift={self.drift:g}", f"site={self.site}"]
        if self.block:
            parts.append(f"block={self.block}")
        return "sparse:" + ",".join(parts)

    @classmethod
    def parse(cls, text: str) -> "SparseConfig":
        """The configuration in a kernel name's parameters (``"tau=0.9,every=8,..."``)."""
        kinds = {"tau": float, "every": int, "drift": float, "site": str, "block": int}
        values: dict[str, Any] = {}
        for item in filter(None, text.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in kinds:
                raise ValueError(f"sparse kernel parameter {item!r}: expected key=value with "
                                 f"key one of {sorted(kinds)}")
            try:
                values[key] = kinds[key](value)
            except ValueError:
                raise ValueError(f"sparse kernel parameter {item!r}: {key} must be "
                                 f"{kinds[key].__name__}") from None
        return cls(**values)


# Reuse state per site (bounded: sites of discarded models are forgotten oldest first).
_SITES: dict[str, MaskReuse] = {}
_SITES_MAX = 1024
_SITE_COUNT = [0]


def new_site() -> str:
    """A process-unique site name for :class:`SparseConfig` (reuse state is per site)."""
    _SITE_COUNT[0] += 1
    return f"s{_SITE_COUNT[0]}"


def site_state(config: SparseConfig) -> MaskReuse:
    state = _SITES.get(config.site)
    if state is None or (state.every, state.min_cosine) != (config.every, config.drift):
        if len(_SITES) >= _SITES_MAX:
            _SITES.pop(next(iter(_SITES)))
        state = _SITES[config.site] = MaskReuse(config.every, config.drift)
    return state


def _layout(config: SparseConfig, q: torch.Tensor, k: torch.Tensor, mask: Any, scale: Any,
            causal: str, mask_fill: float, window: tuple[int, int]) -> BlockLayout:
    block = config.block or None

    def estimate(**into: Any) -> BlockLayout:
        return predict(q, k, config.tau, causal=causal, window=window, scale=scale, block=block,
                       mask=mask, mask_fill=mask_fill, **into)
    if config.every == 1:
        return estimate()
    from .sparse_layout import _check_block
    return site_state(config)(q, k, (scale, causal, tuple(window), mask_fill), estimate,
                              _check_block(block or default_block()), mask)


def kernel_forward(config: SparseConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: Optional[torch.Tensor], scale: Optional[float], causal: str,
                   mask_fill: float, softcap: float = 0.0, window: tuple[int, int] = NO_WINDOW,
                   dropout_p: float = 0.0, seed: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The registry's forward: predict (or reuse) the layout, run the sparse kernel."""
    if softcap or dropout_p:
        raise ValueError("the sparse kernel implements neither soft-capping nor dropout: run "
                         "such sites on kernel='flash'")
    window = check_window(window)
    layout = _layout(config, q, k, mask, scale, causal, mask_fill, window)
    return sparse.sparse_forward(q, k, v, layout, mask, scale, causal, mask_fill, window)


def kernel_backward(config: SparseConfig, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, mask: Optional[torch.Tensor], out: torch.Tensor,
                    lse: torch.Tensor, scale: Optional[float], causal: str, mask_fill: float,
                    mask_grad: bool, softcap: float = 0.0, window: tuple[int, int] = NO_WINDOW,
                    dropout_p: float = 0.0, seed: Any = None) -> tuple[Any, ...]:
    """The registry's backward: the forward's layout, predicted again from the same q and k
    (prediction is deterministic), and the fixed-mask backward kernels (with the additive
    mask's gradient when ``mask_grad``)."""
    if config.every > 1:
        raise ValueError("mask reuse (every > 1) is inference only: the backward needs the "
                         "forward's layout; use a sparse kernel without every=")
    window = check_window(window)
    layout = predict(q, k, config.tau, causal=causal, window=window, scale=scale,
                     block=config.block or None, mask=mask, mask_fill=mask_fill)
    return sparse.sparse_backward(dout, q, k, v, layout, mask, out, lse, scale, causal,
                                  mask_fill, window, mask_grad)
