"""Exploration: which forward structure is fastest on this GPU (pointer vs tensor descriptors,
warp specialization, lazy rescaling, a software-pipelined loop, blocks, stages). Core loop only
(no user masks). Prints a table.

``PIPE``: FlashAttention-3's intra-warpgroup order for the unmasked tiles. Q·Kᵀ of tile j+1 is
issued before P·V of tile j, and tile j+1's softmax comes after both, so that (if the compiler
leaves the second dot in flight) the exponentials overlap the P·V matmul; the accumulator is
rescaled after that. ``python benchmarks/explore_fwd.py --shapes 128:4k:0,64:16k:0 --variants
0000,1001`` (variant digits: desc, ws, lazy, pipe)."""
from __future__ import annotations

import itertools
import math
import time

import torch
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


@triton.jit
def _inner(acc, l_i, m_i, q, K, V, desc_k, desc_v, b, hk, offs_m, lo, hi, skn, svn, NK, qk2,
           offset, MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_DESC: tl.constexpr,
           WS: tl.constexpr, LAZY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_D: tl.constexpr, D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if USE_DESC:
            kT = desc_k.load([b.to(tl.int32), hk.to(tl.int32), start_n, 0]).reshape(BLOCK_N, BLOCK_D).T
        elif MASKED:
            kT = tl.load(K + offs_n[None, :] * skn + offs_d[:, None],
                         mask=(offs_n[None, :] < NK) & (offs_d[:, None] < D), other=0.0)
        else:
            kT = tl.load(K + offs_n[None, :] * skn + offs_d[:, None],
                         mask=offs_d[:, None] < D, other=0.0)
        s = tl.dot(q, kT)
        if MASKED:
            ok = offs_n[None, :] < NK
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
            s = tl.where(ok, s * qk2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        elif LAZY:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk2)
            if tl.max(m_new - m_i, 0) > 8.0:
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            p = tl.math.exp2(s * qk2 - m_i[:, None])
            m_new = m_i
            alpha = tl.full([BLOCK_M], 1.0, tl.float32)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk2)
            m_safe = m_new
            p = tl.math.exp2(s * qk2 - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        if LAZY and not MASKED:
            l_i = l_i + tl.sum(p, 1)
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
        if USE_DESC:
            v = desc_v.load([b.to(tl.int32), hk.to(tl.int32), start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        elif MASKED:
            v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :],
                        mask=(offs_n[:, None] < NK) & (offs_d[None, :] < D), other=0.0)
        else:
            v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=offs_d[None, :] < D,
                        other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _kt(K, desc_k, b, hk, start_n, skn, offs_d, D: tl.constexpr, USE_DESC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    if USE_DESC:
        kT = desc_k.load([b.to(tl.int32), hk.to(tl.int32), start_n, 0]).reshape(BLOCK_N, BLOCK_D).T
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = tl.load(K + offs_n[None, :] * skn + offs_d[:, None], mask=offs_d[:, None] < D,
                     other=0.0)
    return kT


@triton.jit
def _vt(V, desc_v, b, hk, start_n, svn, offs_d, D: tl.constexpr, USE_DESC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    if USE_DESC:
        v = desc_v.load([b.to(tl.int32), hk.to(tl.int32), start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=offs_d[None, :] < D,
                    other=0.0)
    return v


@triton.jit
def _step(s, m_i, l_i, acc, qk2):
    """Online-softmax update for one unmasked score tile: p, and l, acc, m rescaled."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk2)
    p = tl.math.exp2(s * qk2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None], m_new


@triton.jit
def _inner_pipe(acc, l_i, m_i, q, K, V, desc_k, desc_v, b, hk, lo, hi, skn, svn, qk2,
                USE_DESC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Unmasked tiles [lo, hi), software-pipelined across the two matmuls (see PIPE)."""
    offs_d = tl.arange(0, BLOCK_D)
    if lo < hi:
        s = tl.dot(q, _kt(K, desc_k, b, hk, lo, skn, offs_d, D, USE_DESC, BLOCK_N, BLOCK_D))
        p, l_i, acc, m_i = _step(s, m_i, l_i, acc, qk2)
        for start_n in tl.range(lo, hi - BLOCK_N, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            s = tl.dot(q, _kt(K, desc_k, b, hk, start_n + BLOCK_N, skn, offs_d, D, USE_DESC,
                               BLOCK_N, BLOCK_D))
            v = _vt(V, desc_v, b, hk, start_n, svn, offs_d, D, USE_DESC, BLOCK_N, BLOCK_D)
            acc = tl.dot(p.to(v.dtype), v, acc)
            p, l_i, acc, m_i = _step(s, m_i, l_i, acc, qk2)
        v = _vt(V, desc_v, b, hk, hi - BLOCK_N, svn, offs_d, D, USE_DESC, BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def _fwd(Q, K, V, Out, desc_q, desc_k, desc_v, desc_o, sqb, sqh, sqm, skb, skh, skn,
         svb, svh, svn, sob, soh, som, H, NQ, NK, qk2, offset,
         CAUSAL: tl.constexpr, USE_DESC: tl.constexpr, WS: tl.constexpr, REVERSE: tl.constexpr,
         LAZY: tl.constexpr, PIPE: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    start_m = pid * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if USE_DESC:
        q = desc_q.load([b.to(tl.int32), h.to(tl.int32), start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D), other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), NK)
        lo = tl.minimum(tl.maximum(start_m + offset + 1, 0) // BLOCK_N * BLOCK_N, hi)
    else:
        hi = NK
        lo = NK // BLOCK_N * BLOCK_N
    if PIPE:
        acc, l_i, m_i = _inner_pipe(acc, l_i, m_i, q, K, V, desc_k, desc_v, b, hk, 0, lo, skn, svn,
                                    qk2, USE_DESC, BLOCK_M, BLOCK_N, BLOCK_D, D)
    else:
        acc, l_i, m_i = _inner(acc, l_i, m_i, q, K, V, desc_k, desc_v, b, hk, offs_m, 0, lo, skn,
                               svn, NK, qk2, offset, False, CAUSAL, USE_DESC, WS, LAZY, BLOCK_M,
                               BLOCK_N, BLOCK_D, D)
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, K, V, desc_k, desc_v, b, hk, offs_m, lo, hi, skn, svn,
                           NK, qk2, offset, True, CAUSAL, USE_DESC, False, LAZY, BLOCK_M, BLOCK_N, BLOCK_D, D)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
    if USE_DESC:
        desc_o.store([b.to(tl.int32), h.to(tl.int32), start_m, 0], out.reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out,
                 mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D))


def run(q, k, v, causal, use_desc, ws, rev, bm, bn, warps, stages, lazy=False, pipe=False):
    b, h, n, d = q.shape
    out = torch.empty_like(q)
    bd = max(16, triton.next_power_of_2(d))
    if use_desc:
        dq = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, bm, bd])
        dk = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, bn, bd])
        dv = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, bn, bd])
        do = TensorDescriptor(out, list(out.shape), list(out.stride()), [1, 1, bm, bd])
    else:
        dq = dk = dv = do = q
    grid = (triton.cdiv(n, bm), h, b)
    _fwd[grid](q, k, v, out, dq, dk, dv, do, q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
               out.stride(0), out.stride(1), out.stride(2), h, n, n,
               (1 / math.sqrt(d)) * 1.4426950408889634, 0, CAUSAL=causal, USE_DESC=use_desc,
               WS=ws, REVERSE=rev, LAZY=lazy, PIPE=pipe, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, D=d, num_warps=warps,
               num_stages=stages)
    return out


def bench(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def parse_length(text: str) -> int:
    """"4k" -> 4096, "1000" -> 1000."""
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def parse_configs(text: str) -> list[tuple[int, int, int, int]]:
    """"128x64w8s3,..." -> [(BLOCK_M, BLOCK_N, warps, stages), ...]."""
    configs = []
    for c in text.split(","):
        blocks, rest = c.split("w")
        warps, stages = rest.split("s")
        bm, bn = blocks.split("x")
        configs.append((int(bm), int(bn), int(warps), int(stages)))
    return configs


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="128:4k:0,128:4k:1,64:4k:0,128:1k:1,128:16k:0",
                    help="d:N:causal, comma list")
    ap.add_argument("--configs", default="128x64w4s3,128x64w8s3,128x128w8s2,128x128w8s3,"
                                         "128x64w4s4,64x64w4s3,128x64w8s4")
    ap.add_argument("--variants", default="0000,1000,0100,1100,1010,0110",
                    help="digits desc, ws, lazy, pipe")
    args = ap.parse_args()
    dev = "cuda"
    shapes = [(int(d), parse_length(n), c == "1")
              for d, n, c in (x.split(":") for x in args.shapes.split(","))]
    configs = parse_configs(args.configs)
    variants = [tuple(int(ch) for ch in x) for x in args.variants.split(",")]
    rows = []
    t0 = time.time()
    for d, n, causal in shapes:
        b, h = 16384 // n, 2048 // d
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            tc = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        for (bm, bn, w, st), (desc, ws, lazy, pipe) in itertools.product(configs, variants):
            if d == 64 and bn == 128 and w == 4:
                continue
            name = f"{bm}x{bn} w{w} s{st} desc{desc} ws{ws} lazy{lazy} pipe{pipe}"
            try:
                o = run(q, k, v, causal, bool(desc), bool(ws), causal, bm, bn, w, st, bool(lazy),
                        bool(pipe))
                err = (o.float() - ref.float()).abs().max().item()
                t = bench(lambda: run(q, k, v, causal, bool(desc), bool(ws), causal, bm, bn, w, st,
                                      bool(lazy), bool(pipe)))
            except Exception as e:  # noqa: BLE001
                print(f"{d} {n} {causal} {name}: FAIL {type(e).__name__}: {str(e).splitlines()[0][:150]}",
                      flush=True)
                continue
            tf = flops / t * 1e-9
            rows.append((d, n, causal, name, tf, flops / tc * 1e-9, err))
            print(f"d{d} N{n} c{int(causal)} {name}: {tf:.0f} TF/s (cudnn {flops / tc * 1e-9:.0f})"
                  f" err {err:.3g}  [{time.time() - t0:.0f}s]", flush=True)
    print("\n| d | N | causal | best config | TF/s | cuDNN | ratio |")
    for key in sorted({r[:3] for r in rows}):
        sel = [r for r in rows if r[:3] == key]
        r = max(sel, key=lambda r: r[4])
        print(f"| {key[0]} | {key[1]} | {key[2]} | {r[3]} | {r[4]:.0f} | {r[5]:.0f} | "
              f"{r[4] / r[5]:.2f} |")


if __name__ == "__main__":
    main()
