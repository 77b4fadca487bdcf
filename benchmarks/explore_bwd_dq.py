"""Exploration: a five-matmul flash backward whose dQ is summed by TMA reduce-adds.

attnfuse's backward is two kernels (dK/dV with K/V stationary, dQ with Q stationary): seven
matmuls per (query tile, key tile), deterministic. FlashAttention-2/3 and cuDNN compute dQ in the
dK/dV loop as well (five matmuls) and sum the key blocks' contributions in fp32. A pointer
``tl.atomic_add`` for that measured no faster than the split (RESULTS.md: one red per element);
here each [BLOCK_M, D] contribution goes out as one bulk tensor-descriptor reduce-add
(``desc.atomic_add``, TMA's ``cp.reduce.async.bulk`` on Hopper). Unmasked or causal (top-left),
Nq = Nk divisible by the blocks, no GQA: the core loop only. Timed region: δ, zeroing the fp32
dQ buffer, the kernel, and dQ's conversion; compared in the same run with attnfuse's split
backward and cuDNN's. GPU only (Triton's interpreter has no descriptor reduce).

    python benchmarks/explore_bwd_dq.py [--d 64 128] [--n 4k 16k] [--configs 64x128w8s2,...]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from attnfuse.kernels import flash  # noqa: E402
from explore_fwd import parse_configs, parse_length  # noqa: E402  (beside this file)

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

LOG2E = 1.4426950408889634


@triton.jit
def _tile(dk, dv, k, v, Q, DO, LSE2, DELTA, desc_dq, row0, start_m, offs_n, sm, scale2, scale,
          DIAG: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * sm + offs_d[None, :])
    do = tl.load(DO + offs_m[:, None] * sm + offs_d[None, :])
    lse2 = tl.load(LSE2 + offs_m)
    delta = tl.load(DELTA + offs_m)
    pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * scale2 - lse2[None, :])  # [BLOCK_N, BLOCK_M]
    if DIAG:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv)
    dpT = tl.dot(v, tl.trans(do))
    dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
    dk = tl.dot(dsT, q, dk)
    dq = tl.dot(tl.trans(dsT), k) * scale  # [BLOCK_M, D] fp32
    desc_dq.atomic_add([row0 + start_m, 0], dq)
    return dk, dv


@triton.jit
def _bwd(Q, K, V, DO, LSE2, DELTA, DK, DV, desc_dq, N, scale2, scale,
         CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    row0 = bh * N
    base = bh.to(tl.int64) * N * D
    Q += base
    K += base
    V += base
    DO += base
    LSE2 += bh.to(tl.int64) * N
    DELTA += bh.to(tl.int64) * N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + offs_n[:, None] * D + offs_d[None, :])
    v = tl.load(V + offs_n[:, None] * D + offs_d[None, :])
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = start_n  # query tiles before the key block see none of it
        for start_m in range(lo, start_n + BLOCK_N, BLOCK_M):   # the diagonal
            dk, dv = _tile(dk, dv, k, v, Q, DO, LSE2, DELTA, desc_dq, row0, start_m, offs_n, D,
                           scale2, scale, True, BLOCK_M, D)
        lo = start_n + BLOCK_N
    for start_m in range(lo, N, BLOCK_M):
        dk, dv = _tile(dk, dv, k, v, Q, DO, LSE2, DELTA, desc_dq, row0, start_m, offs_n, D,
                       scale2, scale, False, BLOCK_M, D)
    tl.store(DK + base + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(k.dtype))
    tl.store(DV + base + offs_n[:, None] * D + offs_d[None, :], dv.to(k.dtype))


def backward(do, q, k, v, out, lse2, causal, bm, bn, warps, stages):
    b, h, n, d = q.shape
    delta = (out.float() * do.float()).sum(-1)
    dq32 = torch.zeros(b * h * n, d, device=q.device, dtype=torch.float32)
    desc = TensorDescriptor(dq32, [b * h * n, d], [d, 1], [bm, d])
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    scale = 1.0 / math.sqrt(d)
    _bwd[(n // bn, b * h)](q, k, v, do, lse2, delta, dk, dv, desc, n, scale * LOG2E, scale,
                           CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, D=d, num_warps=warps,
                           num_stages=stages)
    return dq32.view(b, h, n, d).to(q.dtype), dk, dv


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--n", nargs="+", default=["4k", "16k"])
    ap.add_argument("--configs", default="64x128w8s2,64x128w8s1,32x128w4s2,64x64w4s2,128x128w8s1")
    args = ap.parse_args()
    configs = parse_configs(args.configs)
    rows = []
    for d in args.d:
        for n in map(parse_length, args.n):
            for causal in (False, True):
                b, h = max(1, 16384 // n), 2048 // d
                torch.manual_seed(0)
                q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
                               for _ in range(4))
                out, lse = flash.flash_forward(q, k, v, causal="top_left" if causal else "none")
                lse2 = lse * LOG2E
                ref = flash.flash_backward(do, q, k, v, None, out, lse,
                                           causal="top_left" if causal else "none")[:3]
                flops = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)
                t_split = do_bench(lambda: flash.flash_backward(
                    do, q, k, v, None, out, lse, causal="top_left" if causal else "none"),
                    return_mode="median")
                qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    o = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr,
                                                                         is_causal=causal)
                t_cudnn = do_bench(lambda: torch.autograd.grad(o, (qr, kr, vr), do,
                                                               retain_graph=True),
                                   return_mode="median")
                line = (f"d{d} N{n} causal{int(causal)}: split {flops / t_split * 1e-9:.0f}, "
                        f"cudnn {flops / t_cudnn * 1e-9:.0f} TFLOP/s")
                print(line, flush=True)
                for bm, bn, warps, stages in configs:
                    name = f"{bm}x{bn}w{warps}s{stages}"
                    try:
                        got = backward(do, q, k, v, out, lse2, causal, bm, bn, warps, stages)
                        err = max((g.float() - r.float()).abs().max().item()
                                  for g, r in zip(got, ref))
                        t = do_bench(lambda: backward(do, q, k, v, out, lse2, causal, bm, bn,
                                                      warps, stages), return_mode="median")
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name}: FAIL {type(e).__name__}: {str(e).splitlines()[0][:120]}",
                              flush=True)
                        continue
                    tf = flops / t * 1e-9
                    rows.append((d, n, causal, name, tf, flops / t_split * 1e-9,
                                 flops / t_cudnn * 1e-9, err))
                    print(f"  {name}: {tf:.0f} TFLOP/s (vs split {tf * t_split / flops * 1e9:.2f}x)"
                          f" max|diff| vs split {err:.3g}", flush=True)
    print("\n| d | N | causal | best TMA-dq config | TFLOP/s | split | cuDNN | / split | / cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted({r[:3] for r in rows}):
        r = max((r for r in rows if r[:3] == key), key=lambda r: r[4])
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.0f} | "
              f"{r[4] / r[5]:.2f} | {r[4] / r[6]:.2f} |")


if __name__ == "__main__":
    main()
