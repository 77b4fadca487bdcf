"""Host time of one flash call before its kernel launch: attnfuse's own Python (checks, argument
building, descriptors), with the launch itself replaced by a no-op. Runs on CPU under
TRITON_INTERPRET=1 (the interpreter is never entered) or on a GPU; prints microseconds per call
for ``flash_forward``, the ``attnfuse::attention`` op and ``attnfuse.attention``.

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py [--calls 2000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import attnfuse  # noqa: E402
from attnfuse.kernels import flash  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(50, calls)):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flash._launch = lambda *a, **k: None   # everything but the launch
    q = torch.randn(32, 16, 197, 64, dtype=torch.bfloat16, device=device)
    k, v = torch.randn_like(q), torch.randn_like(q)
    rows = {
        "flash.flash_forward": lambda: flash.flash_forward(q, k, v, None),
        "torch.ops.attnfuse.attention": lambda: torch.ops.attnfuse.attention(
            q, k, v, None, 0.125, "none", float("-inf"), "flash", 0.0, -1, -1, 0.0, None),
        "attnfuse.attention": lambda: attnfuse.attention(q, k, v, kernel="flash"),
    }
    print(f"| call ({device}, launch stubbed) | µs per call |\n|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {per_call_us(fn, args.calls):.1f} |")


if __name__ == "__main__":
    main()
