"""Exploration: which forward structure is fastest on this GPU (pointer vs tensor descriptors,
warp specialization, blocks, stages). Core loop only (no user masks). Prints a table."""
from __future__ import annotations

import itertools
import math
import sys
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
def _fwd(Q, K, V, Out, desc_q, desc_k, desc_v, desc_o, sqb, sqh, sqm, skb, skh, skn,
         svb, svh, svn, sob, soh, som, H, NQ, NK, qk2, offset,
         CAUSAL: tl.constexpr, USE_DESC: tl.constexpr, WS: tl.constexpr, REVERSE: tl.constexpr,
         LAZY: tl.constexpr,
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
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, K, V, desc_k, desc_v, b, hk, offs_m, 0, lo, skn, svn,
                           NK, qk2, offset, False, CAUSAL, USE_DESC, WS, LAZY, BLOCK_M, BLOCK_N, BLOCK_D, D)
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, K, V, desc_k, desc_v, b, hk, offs_m, lo, hi, skn, svn,
                           NK, qk2, offset, True, CAUSAL, USE_DESC, False, LAZY, BLOCK_M, BLOCK_N, BLOCK_D, D)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
    if USE_DESC:
        desc_o.store([b.to(tl.int32), h.to(tl.int32), start_m, 0], out.reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out,
                 mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D))


def run(q, k, v, causal, use_desc, ws, rev, bm, bn, warps, stages, lazy=False):
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
               WS=ws, REVERSE=rev, LAZY=lazy, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, D=d, num_warps=warps,
               num_stages=stages)
    return out


def bench(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    dev = "cuda"
    shapes = [(128, 4096, False), (128, 4096, True), (64, 4096, False), (128, 1024, True),
              (128, 16384, False)]
    configs = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
               (128, 64, 4, 4), (64, 64, 4, 3), (128, 64, 8, 4)]
    variants = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1)]
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
        best = None
        for (bm, bn, w, st), (desc, ws, lazy) in itertools.product(configs, variants):
            if d == 64 and bn == 128 and w == 4:
                continue
            name = f"{bm}x{bn} w{w} s{st} desc{desc} ws{ws} lazy{lazy}"
            try:
                o = run(q, k, v, causal, bool(desc), bool(ws), causal, bm, bn, w, st, bool(lazy))
                err = (o.float() - ref.float()).abs().max().item()
                t = bench(lambda: run(q, k, v, causal, bool(desc), bool(ws), causal, bm, bn, w, st,
                                      bool(lazy)))
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
