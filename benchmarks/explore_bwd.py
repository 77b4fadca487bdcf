"""Exploration: which launch configs the flash backward's two kernels (dK/dV with K/V stationary,
dQ with Q stationary) run fastest with on this GPU, per head dim. Each candidate config is forced
for one kernel while the other keeps its default; the whole backward is timed (median of
``do_bench``), so differences between rows of one kernel are that kernel's. Prints a table per
(d, N, causal) and the best config of each kernel, and writes JSON with ``--out``.

    python benchmarks/explore_bwd.py --d 256 --n 4k 16k [--causal no yes] [--out r.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from attnfuse.kernels import flash  # noqa: E402
from explore_fwd import parse_length  # noqa: E402  (beside this file)

# (BLOCK_M, BLOCK_N, warps, stages) candidates per kernel and head-dim class
CANDIDATES = {
    "wide": {
        "dkdv": [(64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2), (32, 64, 8, 3),
                 (64, 64, 8, 1), (32, 128, 8, 2), (16, 128, 8, 2), (64, 32, 4, 2),
                 (64, 128, 8, 1)],
        "dq": [(64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2), (128, 64, 8, 1),
               (32, 64, 4, 2), (64, 64, 8, 3), (64, 16, 4, 2), (128, 32, 8, 1), (64, 64, 8, 1)],
    },
    "narrow": {
        "dkdv": [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3),
                 (128, 128, 8, 2), (32, 128, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3)],
        "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2),
               (64, 128, 8, 3), (128, 32, 4, 3), (64, 64, 8, 3), (128, 64, 4, 3)],
    },
}
FORCED: dict[str, triton.Config] = {}
_orig_launch = flash._launch


def _forced_launch(name, tuned, grid, args, kwargs):
    cfg = FORCED.get(name)
    if cfg is None:
        return _orig_launch(name, tuned, grid, args, kwargs)
    tuned.fn[grid](*args, **kwargs, **cfg.all_kwargs())


def run(d: int, n: int, causal: bool, dtype=torch.bfloat16) -> list[dict]:
    from triton.testing import do_bench
    b, h = max(1, 16384 // n), max(1, 2048 // d)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    c = "top_left" if causal else "none"
    out, lse = flash.flash_forward(q, k, v, None, causal=c)
    dout = torch.randn_like(out)
    flops = 2.5 * 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    klass = "wide" if d > 128 else "narrow"
    rows = []
    for kernel in ("dkdv", "dq"):
        for cand in CANDIDATES[klass][kernel]:
            FORCED.clear()
            FORCED[kernel] = flash._cfg(*cand)
            label = f"{kernel} M{cand[0]} N{cand[1]} w{cand[2]} s{cand[3]}"
            t0 = time.perf_counter()
            try:
                fn = lambda: flash.flash_backward(dout, q, k, v, None, out, lse, causal=c)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                rows.append(dict(d=d, n=n, causal=causal, kernel=kernel, config=cand, ms=ms,
                                 tflops=flops / ms / 1e9, compile_s=time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001  (out of resources etc. are results)
                rows.append(dict(d=d, n=n, causal=causal, kernel=kernel, config=cand,
                                 error=repr(e)[:160]))
            r = rows[-1]
            print(f"  d={d} n={n} causal={causal} {label}: "
                  + (f"{r['tflops']:.0f} TFLOP/s ({r['ms']:.3f} ms)" if "ms" in r else r["error"]),
                  flush=True)
    FORCED.clear()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, nargs="+", default=[256])
    ap.add_argument("--n", nargs="+", default=["4k", "16k"])
    ap.add_argument("--causal", nargs="+", default=["no", "yes"])
    ap.add_argument("--out")
    args = ap.parse_args()
    flash._launch = _forced_launch
    rows = []
    for d in args.d:
        for n in map(parse_length, args.n):
            for causal in (c == "yes" for c in args.causal):
                rows += run(d, n, causal)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(rows, f, indent=1)
    print("\n| d | N | causal | kernel | best config (M, N, warps, stages) | TFLOP/s | default | "
          "TFLOP/s | gain |")
    print("|---|---|---|---|---|---|---|---|---|")
    seen = {}
    for r in rows:
        if "tflops" in r:
            seen.setdefault((r["d"], r["n"], r["causal"], r["kernel"]), []).append(r)
    for (d, n, causal, kernel), rs in seen.items():
        best = max(rs, key=lambda r: r["tflops"])
        default = rs[0]
        print(f"| {d} | {n} | {causal} | {kernel} | {tuple(best['config'])} | "
              f"{best['tflops']:.0f} | {tuple(default['config'])} | {default['tflops']:.0f} | "
              f"{best['tflops'] / default['tflops']:.2f}x |")


if __name__ == "__main__":
    main()
