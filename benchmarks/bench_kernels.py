"""Check, then time, attnfuse's flash kernel against PyTorch's attention kernels on one GPU.

1. Correctness on the GPU: attnfuse's Triton kernel vs the fp32 reference (FlashAttention's
   error-ratio rule) for out, dq, dk, dv on odd sizes, masks, GQA, causal alignments, dtypes.
2. Speed, bf16, FA3-paper shapes (B·N = 16k tokens, H·d = 2048): forward and backward TFLOP/s of
   attnfuse flash, SDPA cuDNN, SDPA flash (FA2) and FlexAttention (compiled), in one run.
   FLOPs = 4·B·H·N²·d (halved when causal); backward counted as 2.5× forward. Median of do_bench.

Usage: python benchmarks/bench_kernels.py [--quick] [--out results.json]
Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import attnfuse
from attnfuse.kernels import reference
from attnfuse.testing import error_ratio, reference_dtype


def bench(fn: Callable[[], object], grad_to_none: Optional[list] = None) -> float:
    """Median milliseconds (Triton's do_bench: CUDA events, L2 flushed between runs)."""
    from triton.testing import do_bench
    try:
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    except TypeError:  # older signature: quantiles only
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5])[0]


# -- 1. correctness ------------------------------------------------------------------------------

CASES = [
    # (B, Hq, Hkv, Nq, Nk, D, Dv, causal, mask, dtype)
    (2, 4, 4, 1, 1, 64, 64, "none", None, torch.bfloat16),
    (2, 4, 4, 17, 17, 40, 40, "top_left", None, torch.bfloat16),
    (1, 8, 2, 127, 1000, 72, 72, "none", "padding", torch.float16),
    (1, 4, 1, 1000, 127, 96, 96, "bottom_right", None, torch.bfloat16),
    (2, 4, 4, 257, 257, 160, 160, "none", "additive", torch.bfloat16),
    (1, 2, 2, 300, 300, 256, 256, "top_left", "bool", torch.float16),
    (1, 4, 2, 1000, 1000, 128, 128, "top_left", None, torch.float32),
    (2, 8, 8, 1024, 1024, 64, 64, "none", "bias_grad", torch.bfloat16),
    # Gemma 2 soft-capping (cap 50; q scaled x30 so the cap bends the scores), GQA, masks
    (2, 8, 2, 517, 517, 128, 128, "top_left", "bias_grad", torch.bfloat16, 50.0),
    (1, 4, 4, 1000, 1000, 256, 256, "none", "padding", torch.float16, 50.0),
]


def _mask(kind: Optional[str], b: int, h: int, nq: int, nk: int, dtype, dev) -> Optional[torch.Tensor]:
    if kind is None:
        return None
    if kind == "padding":
        keep = torch.rand(b, 1, 1, nk, device=dev) > 0.2
        keep[..., 0] = True
        return keep
    if kind == "bool":
        keep = torch.rand(nq, nk, device=dev) > 0.3
        keep[:, 0] = True
        return keep
    t = torch.randn(1, h, nq, nk, device=dev, dtype=dtype)
    return t.requires_grad_(kind == "bias_grad")


def check_correctness() -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    for b, hq, hkv, nq, nk, d, dv, causal, mk, dtype, *cap in CASES:
        softcap = cap[0] if cap else 0.0
        torch.manual_seed(0)
        q = (torch.randn(b, hq, nq, d, device=dev, dtype=dtype) * (30.0 if softcap else 1.0)
             ).requires_grad_(True)
        k = torch.randn(b, hkv, nk, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, nk, dv, device=dev, dtype=dtype, requires_grad=True)
        mask = _mask(mk, b, hq, nq, nk, dtype, dev)
        leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
        out = attnfuse.attention(q, k, v, mask, is_causal=causal, enable_gqa=True, kernel="flash",
                                 softcap=softcap)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
        rd = reference_dtype(dtype)
        up = [t.detach().to(rd).requires_grad_(t.requires_grad) for t in leaves]
        m_ref = up[3] if len(up) > 3 else mask
        ref, _ = reference.attention_forward(up[0], up[1], up[2], m_ref, None, causal,
                                             softcap=softcap)
        ref_g = torch.autograd.grad(ref, up, dout.to(rd))
        low = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
        m_low = low[3] if len(low) > 3 else mask
        lowp, _ = reference.attention_forward(low[0], low[1], low[2], m_low, None, causal,
                                              softcap=softcap, acc_dtype=dtype)
        low_g = torch.autograd.grad(lowp, low, dout)
        names = ["out", "dq", "dk", "dv", "dbias"]
        results = [error_ratio("out", out, ref, lowp)] + [
            error_ratio(n, g, r, l) for n, g, r, l in zip(names[1:], grads, ref_g, low_g)]
        ok = all(r.ok for r in results)
        worst = max(results, key=lambda r: r.err / max(2 * r.baseline + r.floor, 1e-30))
        rows.append(dict(case=f"B{b} H{hq}/{hkv} N{nq}x{nk} D{d} {causal} {mk or '-'} "
                              f"{str(dtype).replace('torch.', '')}"
                              + (f" softcap {softcap:g}" if softcap else ""),
                         ok=ok, worst=str(worst)))
        print(("PASS " if ok else "FAIL ") + rows[-1]["case"] + " | " + worst.__str__(), flush=True)
    return rows


# -- 2. speed ------------------------------------------------------------------------------------

_FLEX = None


def _flex(causal: bool, n: int, dev):
    """Compiled FlexAttention (one compiled function; a block mask for causal)."""
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _FLEX is None:
        # One compile per shape and grad mode: raise Dynamo's limit so the grid never falls
        # back to the unfused eager implementation.
        torch._dynamo.config.recompile_limit = 256
        _FLEX = torch.compile(flex_attention, dynamic=False)
    block = None
    if causal:
        block = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, n, n, device=dev)
    return lambda q, k, v: _FLEX(q, k, v, block_mask=block)


def time_kernels(quick: bool, dims: tuple[int, ...] = (64, 128)) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = torch.device("cuda")
    rows = []
    lengths = (1024, 4096) if quick else (1024, 4096, 16384)
    for d in dims:
        for causal in (False, True):
            for n in lengths:
                b, h = 16384 // n, 2048 // d
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn_like(q)

                def sdpa(backend):
                    def run(q, k, v):
                        with sdpa_kernel([backend]):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    return run

                impls = {
                    "attnfuse": lambda q, k, v: attnfuse.attention(q, k, v, is_causal=causal, kernel="flash"),
                    "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
                    "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
                    "flex": _flex(causal, n, dev),
                }
                row = dict(d=d, n=n, causal=causal)
                for name, fn in impls.items():
                    try:
                        with torch.no_grad():
                            ms = bench(lambda: fn(q, k, v))
                        out = fn(q, k, v)
                        ms_b = bench(lambda: out.backward(dout, retain_graph=True), [q, k, v])
                        row[name] = flops / ms / 1e9
                        row[name + "_bwd"] = 2.5 * flops / ms_b / 1e9
                        del out
                    except Exception as e:  # report, don't hide: a kernel that fails shows as error
                        row[name] = row[name + "_bwd"] = float("nan")
                        print(f"{name} d={d} n={n} causal={causal}: {type(e).__name__}: {e}"[:300])
                rows.append(row)
                print(row, flush=True)
                del q, k, v, dout
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    names = ("attnfuse", "cudnn", "sdpa_flash", "flex")
    head = ("| d | N | causal | " + " | ".join(f"{n} fwd" for n in names) + " | "
            + " | ".join(f"{n} bwd" for n in names) + " | fwd ratio vs cuDNN | bwd ratio vs cuDNN |")
    lines = [head, "|" + "---|" * (3 + 2 * len(names) + 2)]
    for r in rows:
        fwd = " | ".join(f"{r[n]:.0f}" for n in names)
        bwd = " | ".join(f"{r[n + '_bwd']:.0f}" for n in names)
        lines.append(f"| {r['d']} | {r['n']} | {'yes' if r['causal'] else 'no'} | {fwd} | {bwd} | "
                     f"{r['attnfuse'] / r['cudnn']:.2f} | {r['attnfuse_bwd'] / r['cudnn_bwd']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer lengths")
    parser.add_argument("--out", default=None, help="write all numbers as JSON here")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness cases")
    parser.add_argument("--no-speed", action="store_true", help="skip the timing grid")
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims to time")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    import triton
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    checks = [] if args.no_check else check_correctness()
    speed = [] if args.no_speed else time_kernels(args.quick, tuple(args.d))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(checks=checks, speed=speed, device=torch.cuda.get_device_name(),
                           torch=torch.__version__, triton=triton.__version__), f, indent=1)
    passed = sum(c["ok"] for c in checks)
    print(f"\ncorrectness: {passed}/{len(checks)} cases pass the error-ratio rule")
    if speed:
        print("TFLOP/s, bf16, B·N = 16k, H·d = 2048\n")
        print(table(speed))
    if passed != len(checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
