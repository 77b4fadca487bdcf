"""The quantized kernel on the GPU: accuracy and speed against cuDNN, attnfuse's flash, SageAttention.

Parts (``--parts check,speed,breakdown``):

* ``check``: ``sage_forward`` against ``sage_reference`` (same quantization, same key-tile width:
  measures the kernel) and against the exact fp32 reference (measures the method): cosine,
  relative L1 and RMSE on Gaussian data, keys with per-channel offsets, and 0.1 % outliers, with
  PyTorch's own bf16 SDPA (math) as the floor; causal and not, d = 64 and 128.
* ``speed``: forward TFLOP/s (4·B·H·N²·d, halved when causal) at B·N = 16k, H·d = 2048, with the
  quantization kernels inside the timed region, for sage (FP8 and FP16 P·V), attnfuse's flash,
  cuDNN SDPA, and SageAttention 1.0.6 (``sageattn``, when importable; it mutates k in place, so it
  gets its own copy).
* ``breakdown``: the quantization kernels' share of sage's time at d = 128.

    python benchmarks/bench_sage.py [--parts check,speed] [--n 4096,8192,16384] [--out r.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def data(kind: str, b: int, h: int, n: int, d: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float32, generator=g)
               for _ in range(3))
    if kind == "offsets":      # per-channel key offsets, as real LLM/DiT keys have
        k = k + 5 * torch.randn(1, h, 1, d, device="cuda", generator=g)
    elif kind == "outliers":   # 0.1 % of entries of q, k, v large
        for t in (q, k, v):
            hit = torch.rand(t.shape, device="cuda", generator=g) < 1e-3
            t[hit] = 15 * torch.sign(torch.randn(int(hit.sum()), device="cuda", generator=g))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check(args) -> list[dict]:
    from attnfuse.kernels import reference, sage
    from attnfuse.tune.select import accuracy
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for d in (64, 128):
        for causal in ("none", "top_left"):
            for kind in ("gaussian", "offsets", "outliers"):
                q, k, v = data(kind, 2, 8, 4096, d)
                exact, _ = reference.attention_forward(q.float(), k.float(), v.float(), None,
                                                       None, causal, -float("inf"))
                with sdpa_kernel(SDPBackend.MATH):
                    floor = torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=causal != "none")
                row = dict(d=d, causal=causal, data=kind,
                           sdpa_bf16=accuracy(floor, exact))
                for pv in ("fp8", "fp16"):
                    out, _ = sage.sage_forward(q, k, v, None, None, causal, pv=pv, block_n=64)
                    emu, _ = sage.sage_reference(q, k, v, None, None, causal, pv, block_n=64)
                    row[f"sage_{pv}"] = accuracy(out, exact)
                    row[f"sage_{pv}_vs_emulation_maxabs"] = float((out.float() - emu.float())
                                                                  .abs().max())
                rows.append(row)
                print(f"d={d} {causal:8s} {kind:9s} | sdpa bf16 cos {row['sdpa_bf16']['cosine']:.6f} "
                      f"L1 {row['sdpa_bf16']['rel_l1']:.4f} | " + " | ".join(
                          f"{pv} cos {row[f'sage_{pv}']['cosine']:.6f} L1 "
                          f"{row[f'sage_{pv}']['rel_l1']:.4f} emu {row[f'sage_{pv}_vs_emulation_maxabs']:.2e}"
                          for pv in ("fp8", "fp16")), flush=True)
    return rows


def speed(args) -> list[dict]:
    from triton.testing import do_bench
    from attnfuse.kernels import flash, sage
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        from sageattention import sageattn
    except ImportError as e:
        sageattn = None
        print(f"SageAttention not importable ({e}); its column stays empty", flush=True)
    rows = []
    for d in (64, 128):
        for n in args.n:
            for causal in (False, True):
                b, h = max(16384 // n, 1), 2048 // d
                q, k, v = data("gaussian", b, h, n, d)
                flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
                c = "top_left" if causal else "none"

                def cudnn():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=causal)
                calls = {"cudnn": cudnn,
                         "flash": lambda: flash.flash_forward(q, k, v, None, None, c),
                         "sage_fp8": lambda: sage.sage_forward(q, k, v, None, None, c, pv="fp8"),
                         "sage_fp16": lambda: sage.sage_forward(q, k, v, None, None, c,
                                                                pv="fp16")}
                if sageattn is not None:
                    k_own = k.clone()
                    calls["sageattention_1.0.6"] = lambda: sageattn(q, k_own, v, is_causal=causal)
                row = dict(d=d, n=n, b=b, h=h, causal=causal, tflops={})
                for name, fn in calls.items():
                    try:
                        ms = do_bench(fn, warmup=25, rep=100)
                        row["tflops"][name] = flops / ms / 1e9
                    except Exception as e:  # report, don't drop
                        row["tflops"][name] = None
                        print(f"  {name} failed: {e!r}"[:300], flush=True)
                rows.append(row)
                base = row["tflops"]["cudnn"]
                print(f"d={d} N={n} causal={causal}: " + ", ".join(
                    f"{k_} {t:.0f}" + (f" ({t / base:.2f}x)" if base else "")
                    for k_, t in row["tflops"].items() if t), flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    return rows


def breakdown(args) -> list[dict]:
    """Where sage's time goes at d=128: the quantization kernels vs the attention kernel."""
    from triton.testing import do_bench
    from attnfuse.kernels import sage
    rows = []
    for n in args.n:
        b, h, d = max(16384 // n, 1), 16, 128
        q, k, v = data("gaussian", b, h, n, d)
        for pv in ("fp8", "fp16"):
            quant = do_bench(lambda: sage.quantize(q, k, v, pv=pv), warmup=25, rep=100)
            total = do_bench(lambda: sage.sage_forward(q, k, v, pv=pv), warmup=25, rep=100)
            flops = 4 * b * h * n * n * d
            rows.append(dict(n=n, pv=pv, quant_ms=quant, total_ms=total,
                             kernel_tops=flops / (total - quant) / 1e9,
                             total_tops=flops / total / 1e9))
            print(f"N={n} {pv}: quantize {quant:.3f} ms of {total:.3f} ms; attention kernel alone "
                  f"{rows[-1]['kernel_tops']:.0f} TOPS, with quantization "
                  f"{rows[-1]['total_tops']:.0f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="check,speed")
    ap.add_argument("--n", default="4096,8192,16384",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sage.py needs a CUDA GPU")
    import triton
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
          f"{triton.__version__}", flush=True)
    result = {}
    parts = args.parts.split(",")
    if "check" in parts:
        result["check"] = check(args)
    if "speed" in parts:
        result["speed"] = speed(args)
    if "breakdown" in parts:
        result["breakdown"] = breakdown(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
