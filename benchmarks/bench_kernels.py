"""Check, then time, attnfuse's flash kernel against PyTorch's attention kernels on one GPU.

Parts (``--parts``, comma list; default all):

- ``check``: correctness on the GPU. attnfuse's Triton kernel vs the fp32 reference
  (FlashAttention's error-ratio rule) for out, dq, dk, dv (and dbias) on odd sizes, masks, GQA,
  causal alignments, soft-capping, sliding windows and dtypes.
- ``speed``: bf16, FA3-paper shapes (B·N = 16k tokens, H·d = 2048, N in 1k..16k, d in
  64/128/256, causal and not): forward and backward TFLOP/s of attnfuse flash
  (``flash_forward`` / ``flash_backward`` called directly), SDPA cuDNN, SDPA flash (FA2) and
  FlexAttention (``torch.compile(flex_attention)``, a block mask when causal).
- ``fp16``: d = 128, N in 4k/16k, causal and not, attnfuse and cuDNN in fp16 (vs bf16).
- ``features``: the cost of each kernel feature at N = 8k, d = 128, bf16, B = 2, H = 16:
  GQA 8:1, a sliding window, additive biases read through strides, key padding; TFLOP/s
  counting only visible (query, key) pairs, and the ratio to the plain kernel.

Conventions: FLOPs = 4·B·H·N²·d (halved when causal); backward = 2.5× forward FLOPs. Times are
the median of ``triton.testing.do_bench`` (CUDA events, L2 flushed). The backward time is the
backward alone from saved forward results: ``flash_backward`` on a precomputed (out, lse) for
attnfuse, ``out.backward(dout, retain_graph=True)`` (grads reset to None each call) for PyTorch's
kernels; both produce dq, dk, dv. A backend that refuses a shape is recorded as None.

Usage: the whole grid takes longer than ten minutes on one GPU (each new shape compiles Flex and
autotunes attnfuse), so split it, one (d, causal) per invocation, and merge with --append:
    python benchmarks/bench_kernels.py --parts check --out r.json
    python benchmarks/bench_kernels.py --parts speed --d 128 --causal no --out r.json --append
    python benchmarks/bench_kernels.py --parts speed --d 128 --causal yes --out r.json --append
    python benchmarks/bench_kernels.py --parts fp16,features --out r.json --append
    python benchmarks/bench_kernels.py --table r.json [more.json ...]   # tables only, no GPU
Other flags: --n 1k,4k (lengths), --no-bwd, --peers cudnn,fa2 (or none), --budget SECONDS (start
no new shape after that long). Prints progress lines, then markdown tables; --out is rewritten
after every shape, so an interrupted call keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Optional

PEERS = ("cudnn", "fa2", "flex")
KERNELS = ("attnfuse",) + PEERS
TITLES = {"attnfuse": "attnfuse", "cudnn": "cuDNN", "fa2": "FA2", "flex": "Flex"}
ALIASES = {"sdpa_flash": "fa2", "flash": "fa2", "sdpa_cudnn": "cudnn", "flexattention": "flex"}
PARTS = ("check", "speed", "fp16", "features")
TOKENS, WIDTH = 16384, 2048  # B·N and H·d of the FA3 paper's benchmark
FEATURE_SHAPE = dict(b=2, h=16, n=8192, d=128)
FEATURE_TARGET = 0.90
# Feature rows shown for context (the window row is causal) but not held to FEATURE_TARGET.
CONTEXT_FEATURES = ("causal (context)",)


# -- timing ---------------------------------------------------------------------------------------

def bench(fn: Callable[[], object], grad_to_none: Optional[list] = None) -> float:
    """Median milliseconds (Triton's do_bench: CUDA events, L2 flushed between runs)."""
    from triton.testing import do_bench
    try:
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    except TypeError:  # a do_bench without return_mode
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5])[0]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:240]


def _dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# -- 1. correctness -------------------------------------------------------------------------------

def _case(b, hq, hkv, nq, nk, d, dv, causal, mask, dtype, softcap=0.0, window=None) -> dict:
    return dict(b=b, hq=hq, hkv=hkv, nq=nq, nk=nk, d=d, dv=dv, causal=causal, mask=mask,
                dtype=dtype, softcap=softcap, window=window)


CASES = [
    _case(2, 4, 4, 1, 1, 64, 64, "none", None, "bf16"),
    _case(2, 4, 4, 17, 17, 40, 40, "top_left", None, "bf16"),
    _case(1, 8, 2, 127, 1000, 72, 72, "none", "padding", "fp16"),
    _case(1, 4, 1, 1000, 127, 96, 96, "bottom_right", None, "bf16"),
    _case(2, 4, 4, 257, 257, 160, 160, "none", "additive", "bf16"),
    _case(1, 2, 2, 300, 300, 256, 256, "top_left", "bool", "fp16"),
    _case(1, 4, 2, 1000, 1000, 128, 128, "top_left", None, "fp32"),
    _case(2, 8, 8, 1024, 1024, 64, 64, "none", "bias_grad", "bf16"),
    # Gemma 2 soft-capping (cap 50; q scaled x30 so the cap bends the scores), GQA, masks
    _case(2, 8, 2, 517, 517, 128, 128, "top_left", "bias_grad", "bf16", softcap=50.0),
    _case(1, 4, 4, 1000, 1000, 256, 256, "none", "padding", "fp16", softcap=50.0),
    # sliding window (Mistral-style: 255 keys back plus the diagonal), causal
    _case(2, 4, 4, 1000, 1000, 128, 128, "top_left", None, "bf16", window=(255, 0)),
    # GQA 8:1
    _case(2, 16, 2, 1000, 1000, 128, 128, "top_left", None, "bf16"),
    # fp16 at the common head dim
    _case(2, 4, 4, 1000, 1000, 128, 128, "none", None, "fp16"),
    # dense masks with 16-byte aligned rows: the forward reads their tiles through TMA
    _case(2, 8, 8, 1000, 1000, 128, 128, "none", "additive", "bf16"),
    _case(1, 4, 4, 1024, 1024, 128, 128, "top_left", "bool", "bf16"),
    # transformers-style additive mask (finfo.min fills) with fully masked rows, bias gradient
    # too: the backward's exact row statistics (EXACT_ROWS)
    _case(2, 8, 8, 1000, 1000, 128, 128, "none", "finite_rows", "bf16"),
    _case(1, 4, 4, 517, 517, 64, 64, "none", "finite_rows_grad", "fp16"),
]


def _mask(kind: Optional[str], b: int, h: int, nq: int, nk: int, dtype, dev):
    import torch
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
    if kind.startswith("finite_rows"):
        # left padding of 100 keys in batch 0, and its first 37 query rows masked wholly
        t = torch.zeros(b, 1, nq, nk, device=dev, dtype=dtype)
        t[0, :, :, :100] = torch.finfo(dtype).min
        t[0, :, :37] = torch.finfo(dtype).min
        return t.requires_grad_(kind.endswith("_grad"))
    t = torch.randn(1, h, nq, nk, device=dev, dtype=dtype)
    return t.requires_grad_(kind == "bias_grad")


def window_band(nq: int, nk: int, window, causal: str, dev):
    """Bool [Nq, Nk]: key j visible to query i iff i − left <= j <= i + right (−1 = unbounded),
    with the diagonal moved by Nk − Nq for bottom-right alignment."""
    import torch
    left, right = window
    offset = nk - nq if causal == "bottom_right" else 0
    i = torch.arange(nq, device=dev)[:, None] + offset
    j = torch.arange(nk, device=dev)[None, :]
    band = torch.ones(nq, nk, dtype=torch.bool, device=dev)
    if left >= 0:
        band &= j >= i - left
    if right >= 0:
        band &= j <= i + right
    return band


def _with_window(mask, band):
    """The user mask with the window folded in: the reference sees the band as a plain mask, an
    independent check of the kernel's own window logic."""
    import torch
    if band is None:
        return mask
    if mask is None:
        return band[None, None]
    if mask.dtype == torch.bool:
        return mask & band
    return torch.where(band, mask, torch.full_like(mask, float("-inf")))


def _case_name(c: dict) -> str:
    name = (f"B{c['b']} H{c['hq']}/{c['hkv']} N{c['nq']}x{c['nk']} D{c['d']} {c['causal']} "
            f"{c['mask'] or '-'} {str(_dtype(c['dtype'])).replace('torch.', '')}")
    if c["softcap"]:
        name += f" softcap {c['softcap']:g}"
    if c["window"]:
        name += " window ({}, {})".format(*c["window"])
    return name


def check_correctness(dims: Optional[list[int]] = None) -> list[dict]:
    """The CASES (only those with head dim in ``dims`` when given) against the reference."""
    import torch
    import attnfuse
    from attnfuse.kernels import reference
    from attnfuse.testing import error_ratio, reference_dtype
    dev = torch.device("cuda")
    rows = []
    for c in CASES:
        if dims and c["d"] not in dims:
            continue
        dtype, softcap, causal, window = _dtype(c["dtype"]), c["softcap"], c["causal"], c["window"]
        b, hq, hkv, nq, nk, d, dv = (c[k] for k in ("b", "hq", "hkv", "nq", "nk", "d", "dv"))
        name = _case_name(c)
        torch.manual_seed(0)
        q = (torch.randn(b, hq, nq, d, device=dev, dtype=dtype) * (30.0 if softcap else 1.0)
             ).requires_grad_(True)
        k = torch.randn(b, hkv, nk, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, nk, dv, device=dev, dtype=dtype, requires_grad=True)
        mask = _mask(c["mask"], b, hq, nq, nk, dtype, dev)
        leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
        extra = {"window": tuple(window)} if window else {}
        try:
            out = attnfuse.attention(q, k, v, mask, is_causal=causal, enable_gqa=True,
                                     kernel="flash", softcap=softcap, **extra)
            dout = torch.randn_like(out)
            grads = torch.autograd.grad(out, leaves, dout)
        except Exception as e:
            if window and ("window" in str(e) or isinstance(e, TypeError)):
                rows.append(dict(case=name, ok=None, worst=f"skipped: {_short(e)}"))
                print("SKIP " + name + " | " + rows[-1]["worst"], flush=True)
                continue
            rows.append(dict(case=name, ok=False, worst=f"error: {_short(e)}"))
            print("FAIL " + name + " | " + rows[-1]["worst"], flush=True)
            continue
        band = window_band(nq, nk, window, causal, dev) if window else None
        rd = reference_dtype(dtype)
        up = [t.detach().to(rd).requires_grad_(t.requires_grad) for t in leaves]
        m_ref = _with_window(up[3] if len(up) > 3 else mask, band)
        ref, _ = reference.attention_forward(up[0], up[1], up[2], m_ref, None, causal,
                                             softcap=softcap)
        ref_g = torch.autograd.grad(ref, up, dout.to(rd))
        low = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
        m_low = _with_window(low[3] if len(low) > 3 else mask, band)
        lowp, _ = reference.attention_forward(low[0], low[1], low[2], m_low, None, causal,
                                              softcap=softcap, acc_dtype=dtype)
        low_g = torch.autograd.grad(lowp, low, dout)
        names = ["out", "dq", "dk", "dv", "dbias"]
        results = [error_ratio("out", out, ref, lowp)] + [
            error_ratio(n, g, r, l) for n, g, r, l in zip(names[1:], grads, ref_g, low_g)]
        ok = all(r.ok for r in results)
        worst = max(results, key=lambda r: r.err / max(2 * r.baseline + r.floor, 1e-30))
        rows.append(dict(case=name, ok=ok, worst=str(worst)))
        print(("PASS " if ok else "FAIL ") + name + " | " + str(worst), flush=True)
    return rows


# -- 2. speed -------------------------------------------------------------------------------------

_FLEX = None


def _flex_fn():
    """One compiled flex_attention (a compile per shape and grad mode)."""
    global _FLEX
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    if _FLEX is None:
        # Raise Dynamo's limits so the grid never falls back to the unfused eager implementation.
        for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                    "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, 1024)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _causal_str(causal: bool) -> str:
    return "top_left" if causal else "none"


def kernel_calls(name: str, q, k, v, causal: bool):
    """``(ctx, fwd, bwd_of)`` for one kernel: ``ctx()`` a context to time under, ``fwd()`` the
    forward, ``bwd_of()`` runs a forward and returns ``(step, grads)``: ``step()`` runs only the
    backward of it, ``grads`` the tensors whose .grad must be reset between calls (or None)."""
    import contextlib
    import torch
    import torch.nn.functional as F
    if name == "attnfuse":
        return _feature_calls(q, k, v, None, causal, None)
    if name in ("cudnn", "fa2"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION

        def call():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ctx = lambda: sdpa_kernel([backend])  # noqa: E731
    elif name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask
        flex = _flex_fn()
        n = q.shape[2]
        block = None
        if causal:
            block = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, n, n,
                                      device=q.device)

        def call():
            return flex(q, k, v, block_mask=block)
        ctx = contextlib.nullcontext
    else:
        raise ValueError(f"unknown kernel {name!r}")

    def fwd():
        with torch.no_grad():
            return call()

    def bwd_of():
        out = call()
        dout = torch.randn_like(out)
        return (lambda: out.backward(dout, retain_graph=True)), [q, k, v]
    return ctx, fwd, bwd_of


class Run:
    """Measurements of one invocation, saved to --out after every shape."""

    def __init__(self, args, meta: dict):
        self.args, self.meta = args, meta
        self.records: list[dict] = []
        self.checks: list[dict] = []
        self.t0 = time.time()
        self.stopped = False
        self.base = {"runs": [], "records": [], "checks": []}
        if args.out and args.append and os.path.exists(args.out):
            with open(args.out) as f:
                self.base = _normalize(json.load(f))

    def over_budget(self) -> bool:
        if self.args.budget and time.time() - self.t0 > self.args.budget:
            if not self.stopped:
                print(f"budget of {self.args.budget:.0f} s spent: stopping here", flush=True)
            self.stopped = True
        return self.stopped

    def add(self, rec: dict) -> None:
        self.records.append(rec)
        t = f"{rec['tflops']:.0f} TFLOP/s ({rec['ms']:.3f} ms)" if rec["ms"] is not None \
            else f"n/a ({rec['error']})"
        tag = f" {rec['feature']}" if rec.get("feature") else ""
        print(f"[{time.time() - self.t0:5.0f}s] {rec['part']:8} {rec['kernel']:8} "
              f"{rec['direction']} {rec['dtype']} d={rec['d']} N={rec['n']} "
              f"causal={'yes' if rec['causal'] else 'no'}{tag}: {t}", flush=True)

    def save(self) -> None:
        if not self.args.out:
            return
        merged = _merge([self.base, {"runs": [self.meta], "records": self.records,
                                     "checks": self.checks}])
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(merged, f, indent=1)
        os.replace(tmp, self.args.out)


def _record(part: str, kernel: str, direction: str, dtype: str, b: int, h: int, hkv: int, n: int,
            d: int, causal: bool, flops: float, ms: Optional[float], error: Optional[str] = None,
            feature: str = "", note: str = "") -> dict:
    return dict(part=part, kernel=kernel, direction=direction, dtype=dtype, b=b, h=h, hkv=hkv,
                n=n, d=d, causal=causal, feature=feature, flops=flops, ms=ms,
                tflops=None if ms is None else flops / ms / 1e9, error=error, note=note)


def _measure(run: Run, part: str, kernel: str, q, k, v, causal: bool, dtype: str,
             flops: float, bwd: bool, calls=None, feature: str = "", note: str = "") -> None:
    """Forward (and backward) of one kernel on one input; failures become None entries."""
    import torch
    b, h, n, d = q.shape
    hkv = k.shape[1]
    directions = ("fwd", "bwd") if bwd else ("fwd",)
    try:
        ctx, fwd, bwd_of = calls if calls is not None else kernel_calls(kernel, q, k, v, causal)
    except Exception as e:  # the backend is missing altogether
        for direction in directions:
            run.add(_record(part, kernel, direction, dtype, b, h, hkv, n, d, causal,
                            flops * (2.5 if direction == "bwd" else 1.0), None, _short(e),
                            feature, note))
        return
    for direction in directions:
        work = flops * (2.5 if direction == "bwd" else 1.0)
        ms, err = None, None
        try:
            with ctx():
                if direction == "fwd":
                    fwd()  # compile / autotune outside the timing
                    torch.cuda.synchronize()
                    ms = bench(fwd)
                else:
                    step, grads = bwd_of()
                    step()
                    torch.cuda.synchronize()
                    ms = bench(step, grads)
                    del step
        except Exception as e:  # a backend that refuses the shape: None in the table
            err = _short(e)
            if isinstance(e, torch.cuda.OutOfMemoryError):
                err = "out of memory"
        finally:
            for t in (q, k, v):
                if getattr(t, "grad", None) is not None:
                    t.grad = None
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as e:  # a sticky device error: keep recording, the rest will fail too
                err = err or _short(e)
        run.add(_record(part, kernel, direction, dtype, b, h, hkv, n, d, causal, work, ms, err,
                        feature, note))


def _inputs(b: int, h: int, hkv: int, n: int, d: int, dtype: str):
    import torch
    dt = _dtype(dtype)
    dev = torch.device("cuda")
    q = torch.randn(b, h, n, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, hkv, n, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, hkv, n, d, device=dev, dtype=dt, requires_grad=True)
    return q, k, v


def grid_flops(b: int, h: int, n: int, d: int, causal: bool) -> float:
    return 4.0 * b * h * n * n * d / (2 if causal else 1)


def time_grid(run: Run, part: str, dims, lengths, causals, kernels, dtype: str, bwd: bool) -> None:
    import torch
    for d in dims:
        for causal in causals:
            for n in lengths:
                if run.over_budget():
                    return
                b, h = max(1, TOKENS // n), max(1, WIDTH // d)
                flops = grid_flops(b, h, n, d, causal)
                q, k, v = _inputs(b, h, h, n, d, dtype)
                for name in kernels:
                    _measure(run, part, name, q, k, v, causal, dtype, flops, bwd)
                del q, k, v
                torch.cuda.empty_cache()
                run.save()


def band_pairs(n: int, left: int, right: int) -> int:
    """Visible (query, key) pairs of an N x N window band (−1 = unbounded)."""
    total = 0
    for i in range(n):
        lo = 0 if left < 0 else max(0, i - left)
        hi = n - 1 if right < 0 else min(n - 1, i + right)
        total += max(0, hi - lo + 1)
    return total


def time_features(run: Run, bwd: bool) -> None:
    """attnfuse's cost per feature at N = 8k, d = 128, bf16, B = 2, H = 16."""
    import inspect
    import torch
    from attnfuse.kernels import flash
    b, h, n, d = (FEATURE_SHAPE[k] for k in ("b", "h", "n", "d"))
    dev = torch.device("cuda")
    dt = _dtype("bf16")
    params = set(inspect.signature(flash.flash_forward).parameters)
    pad = n - n // 10  # the last 10 % of keys are padding
    full = float(n * n)
    window = (2047, 0)
    rows = [
        # (feature, hkv, causal, mask builder, window, visible pairs, note)
        ("plain", h, False, None, None, full, ""),
        ("causal (context)", h, True, None, None, n * (n + 1) / 2,
         "visible pairs N(N+1)/2; not a target"),
        ("gqa 8:1", h // 8, False, None, None, full, "Hkv = 2"),
        ("window (2047, 0)", h, True, None, window, float(band_pairs(n, *window)),
         "causal; visible pairs = band area"),
        ("bias [1,H,N,N]", h, False,
         lambda: torch.randn(1, h, n, n, device=dev, dtype=dt), None, full,
         "additive bf16, read by strides, no bias gradient"),
        ("bias [B,1,1,N]", h, False, lambda: _keypad(b, n, pad, dev, dt), None, full,
         "additive key-padding bias (0 / -inf); pairs counted as full N²"),
        ("padding bool [B,1,1,N]", h, False, lambda: _keypad(b, n, pad, dev, torch.bool), None,
         full, "10 % of keys masked at the end; pairs counted as full N²"),
    ]
    only = getattr(run.args, "features", None)
    for feature, hkv, causal, make_mask, win, pairs, note in rows:
        if only and not any(word in feature for word in only.split(",")):
            continue
        if run.over_budget():
            return
        flops = 4.0 * b * h * d * pairs
        q, k, v = _inputs(b, h, hkv, n, d, "bf16")
        try:
            if win is not None and "window" not in params:
                raise TypeError("flash_forward has no window parameter")
            mask = make_mask() if make_mask is not None else None
            calls = _feature_calls(q, k, v, mask, causal, win)
        except Exception as e:
            calls = _failing(e)
        _measure(run, "features", "attnfuse", q, k, v, causal, "bf16", flops, bwd, calls=calls,
                 feature=feature, note=note)
        del q, k, v, calls
        torch.cuda.empty_cache()
        run.save()


def _keypad(b: int, n: int, pad: int, dev, dtype):
    import torch
    if dtype == torch.bool:
        keep = torch.ones(b, 1, 1, n, dtype=torch.bool, device=dev)
        keep[..., pad:] = False
        return keep
    bias = torch.zeros(b, 1, 1, n, dtype=dtype, device=dev)
    bias[..., pad:] = float("-inf")
    return bias


def _failing(exc: BaseException):
    def raise_():
        raise exc
    return lambda: raise_(), raise_, raise_


def _feature_calls(q, k, v, mask, causal: bool, window):
    """attnfuse's flash kernel called directly."""
    import contextlib
    import torch
    from attnfuse.kernels.flash import flash_backward, flash_forward
    cs = _causal_str(causal)
    extra = {"window": tuple(window)} if window is not None else {}

    def fwd():
        return flash_forward(q, k, v, mask, None, cs, **extra)[0]

    def bwd_of():
        out, lse = flash_forward(q, k, v, mask, None, cs, **extra)
        dout = torch.randn_like(out)
        return (lambda: flash_backward(dout, q, k, v, mask, out, lse, None, cs, **extra)), None
    return contextlib.nullcontext, fwd, bwd_of


# -- results files --------------------------------------------------------------------------------

def _key(r: dict) -> tuple:
    return (r["part"], r["kernel"], r["dtype"], r["d"], r["n"], bool(r["causal"]),
            r["direction"], r.get("feature", ""))


def _normalize(data: dict) -> dict:
    """Today's layout from a results file (the first version's ``speed`` rows included)."""
    if "records" in data:
        return dict(runs=list(data.get("runs", [])), records=list(data["records"]),
                    checks=list(data.get("checks", [])))
    records = []
    for row in data.get("speed", []):
        d, n, causal = row["d"], row["n"], bool(row["causal"])
        b, h = max(1, TOKENS // n), max(1, WIDTH // d)
        flops = grid_flops(b, h, n, d, causal)
        for name, val in row.items():
            if name in ("d", "n", "causal"):
                continue
            direction = "bwd" if name.endswith("_bwd") else "fwd"
            kernel = ALIASES.get(name.removesuffix("_bwd"), name.removesuffix("_bwd"))
            ok = isinstance(val, (int, float)) and math.isfinite(val)
            work = flops * (2.5 if direction == "bwd" else 1.0)
            records.append(_record("speed", kernel, direction, "bf16", b, h, h, n, d, causal,
                                   work, work / val / 1e9 if ok else None,
                                   None if ok else "failed"))
    meta = {k: data[k] for k in ("device", "torch", "triton") if k in data}
    return dict(runs=[meta] if meta else [], records=records, checks=list(data.get("checks", [])))


def _merge(datas: list[dict]) -> dict:
    """Later files win for the same (part, kernel, dtype, d, N, causal, direction, feature)."""
    out: dict = {}
    runs, checks = [], {}
    for data in datas:
        data = _normalize(data)
        runs += data["runs"]
        for r in data["records"]:
            out[_key(r)] = r
        for c in data["checks"]:
            checks[c["case"]] = c
    return dict(runs=runs, records=list(out.values()), checks=list(checks.values()))


# -- tables ---------------------------------------------------------------------------------------

def _index(records: list[dict]) -> dict:
    return {_key(r): r for r in records}


def _tf(idx: dict, key: tuple) -> Optional[float]:
    r = idx.get(key)
    return r["tflops"] if r is not None else None


def _fmt(x: Optional[float], digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _nlabel(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def grid_table(records: list[dict], part: str = "speed", dtype: str = "bf16") -> str:
    idx = _index(records)
    shapes = sorted({(r["d"], bool(r["causal"]), r["n"]) for r in records
                     if r["part"] == part and r["dtype"] == dtype})
    if not shapes:
        return ""
    head = ("| d | N | causal | " + " | ".join(f"{TITLES[k]} fwd" for k in KERNELS) + " | "
            + " | ".join(f"{TITLES[k]} bwd" for k in KERNELS)
            + " | fwd / cuDNN | bwd / cuDNN |")
    lines = [head, "|" + "---|" * (3 + 2 * len(KERNELS) + 2)]
    for d, causal, n in shapes:
        val = {(k, dr): _tf(idx, (part, k, dtype, d, n, causal, dr, ""))
               for k in KERNELS for dr in ("fwd", "bwd")}
        cells = [_fmt(val[(k, "fwd")]) for k in KERNELS] + [_fmt(val[(k, "bwd")]) for k in KERNELS]
        rf = _ratio(val[("attnfuse", "fwd")], val[("cudnn", "fwd")])
        rb = _ratio(val[("attnfuse", "bwd")], val[("cudnn", "bwd")])
        lines.append(f"| {d} | {_nlabel(n)} | {'yes' if causal else 'no'} | "
                     + " | ".join(cells) + f" | {_fmt(rf, 2)} | {_fmt(rb, 2)} |")
    return "\n".join(lines)


def fp16_table(records: list[dict]) -> str:
    idx = _index(records)
    shapes = sorted({(r["d"], bool(r["causal"]), r["n"]) for r in records if r["part"] == "fp16"})
    if not shapes:
        return ""
    lines = ["| d | N | causal | dir | attnfuse fp16 | cuDNN fp16 | fp16 / cuDNN | attnfuse bf16 "
             "| cuDNN bf16 | bf16 / cuDNN |", "|" + "---|" * 10]
    for d, causal, n in shapes:
        for dr in ("fwd", "bwd"):
            a16 = _tf(idx, ("fp16", "attnfuse", "fp16", d, n, causal, dr, ""))
            c16 = _tf(idx, ("fp16", "cudnn", "fp16", d, n, causal, dr, ""))
            if a16 is None and c16 is None and ("fp16", "attnfuse", "fp16", d, n, causal, dr,
                                                "") not in idx:
                continue
            ab = _tf(idx, ("speed", "attnfuse", "bf16", d, n, causal, dr, ""))
            cb = _tf(idx, ("speed", "cudnn", "bf16", d, n, causal, dr, ""))
            lines.append(f"| {d} | {_nlabel(n)} | {'yes' if causal else 'no'} | {dr} | "
                         f"{_fmt(a16)} | {_fmt(c16)} | {_fmt(_ratio(a16, c16), 2)} | {_fmt(ab)} | "
                         f"{_fmt(cb)} | {_fmt(_ratio(ab, cb), 2)} |")
    return "\n".join(lines)


def feature_rows(records: list[dict]) -> list[dict]:
    """Per feature: TFLOP/s fwd/bwd and the ratio to the plain row."""
    feats = [r for r in records if r["part"] == "features"]
    order = []
    for r in feats:
        if r["feature"] not in order:
            order.append(r["feature"])
    by = {(r["feature"], r["direction"]): r for r in feats}
    out = []
    for f in order:
        row = dict(feature=f, note=next((r.get("note", "") for r in feats if r["feature"] == f), ""))
        for dr in ("fwd", "bwd"):
            r = by.get((f, dr))
            plain = by.get(("plain", dr))
            row[dr] = r["tflops"] if r else None
            row[dr + "_ratio"] = _ratio(row[dr], plain["tflops"] if plain else None)
            row[dr + "_error"] = r.get("error") if r else None
        out.append(row)
    return out


def feature_table(records: list[dict]) -> str:
    rows = feature_rows(records)
    if not rows:
        return ""
    s = FEATURE_SHAPE
    lines = [f"attnfuse, bf16, B={s['b']}, H={s['h']}, N={_nlabel(s['n'])}, d={s['d']}; "
             "TFLOP/s over visible (query, key) pairs only; ratio to the plain row "
             f"(target ≥ {FEATURE_TARGET:.2f}).", "",
             "| feature | fwd TFLOP/s | fwd / plain | bwd TFLOP/s | bwd / plain | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        note = r["note"]
        errs = [r[d + "_error"] for d in ("fwd", "bwd") if r[d + "_error"]]
        if errs:
            note = (note + "; " if note else "") + errs[0]
        lines.append(f"| {r['feature']} | {_fmt(r['fwd'])} | {_fmt(r['fwd_ratio'], 2)} | "
                     f"{_fmt(r['bwd'])} | {_fmt(r['bwd_ratio'], 2)} | {note} |")
    return "\n".join(lines)


def _target_rows(records: list[dict]) -> list[tuple[str, list[tuple[str, Optional[float]]], float]]:
    """(target, [(row label, ratio)], threshold) for each issue target."""
    idx = _index(records)
    shapes = sorted({(r["d"], bool(r["causal"]), r["n"]) for r in records
                     if r["part"] == "speed" and r["dtype"] == "bf16"})

    def ratios(pred, directions, peer="cudnn"):
        out = []
        for d, causal, n in shapes:
            if not pred(d, n):
                continue
            for dr in directions:
                a = _tf(idx, ("speed", "attnfuse", "bf16", d, n, causal, dr, ""))
                p = _tf(idx, ("speed", peer, "bf16", d, n, causal, dr, ""))
                if p is None:  # the peer refused the shape (or was not run): nothing to compare
                    continue
                label = f"d={d} N={_nlabel(n)} {'causal' if causal else 'full'} {dr}"
                out.append((label, _ratio(a, p)))
        return out

    fr = feature_rows(records)
    feats = [(f"{r['feature']} {dr}", r[dr + "_ratio"]) for r in fr
             if r["feature"] != "plain" and r["feature"] not in CONTEXT_FEATURES
             for dr in ("fwd", "bwd") if r[dr] is not None or r[dr + "_error"]]
    return [
        ("fwd, d=128, N ≥ 4k: attnfuse / cuDNN", ratios(lambda d, n: d == 128 and n >= 4096,
                                                       ("fwd",)), 1.00),
        ("fwd, d=64, N ≥ 4k: attnfuse / cuDNN", ratios(lambda d, n: d == 64 and n >= 4096,
                                                      ("fwd",)), 1.00),
        ("bwd, d=128, N ≥ 4k: attnfuse / cuDNN", ratios(lambda d, n: d == 128 and n >= 4096,
                                                       ("bwd",)), 0.95),
        ("N = 1k, fwd and bwd: attnfuse / cuDNN", ratios(lambda d, n: n == 1024,
                                                         ("fwd", "bwd")), 0.90),
        ("d=256 fwd: attnfuse / cuDNN", ratios(lambda d, n: d == 256, ("fwd",)), 0.95),
        ("never slower than Flex (fwd and bwd)", ratios(lambda d, n: True, ("fwd", "bwd"),
                                                        "flex"), 1.00),
        ("never slower than SDPA-flash / FA2 (fwd and bwd)",
         ratios(lambda d, n: True, ("fwd", "bwd"), "fa2"), 1.00),
        ("features: TFLOP/s / plain (N=8k, d=128)", feats, FEATURE_TARGET),
    ]


def targets_table(records: list[dict]) -> str:
    lines = ["| target | threshold | rows | rows meeting | worst row | worst ratio | met |",
             "|---|---|---|---|---|---|---|"]
    for name, rows, thr in _target_rows(records):
        valued = [(lab, r) for lab, r in rows if r is not None]
        missing = len(rows) - len(valued)
        if not rows:
            lines.append(f"| {name} | ≥ {thr:.2f} | 0 | - | - | - | no data |")
            continue
        meeting = sum(r >= thr for _, r in valued)
        worst = min(valued, key=lambda x: x[1]) if valued else ("-", None)
        met = "yes" if valued and meeting == len(valued) and not missing else "no"
        if missing and meeting == len(valued):
            met = f"no ({missing} rows without a number)"
        lines.append(f"| {name} | ≥ {thr:.2f} | {len(rows)} | {meeting} | {worst[0]} | "
                     f"{_fmt(worst[1], 2)} | {met} |")
    return "\n".join(lines)


def checks_block(checks: list[dict]) -> str:
    if not checks:
        return ""
    lines = ["```"]
    for c in checks:
        verdict = "SKIP" if c["ok"] is None else ("PASS" if c["ok"] else "FAIL")
        lines.append(f"{verdict} {c['case']} | {c['worst']}")
    lines.append("```")
    passed = sum(c["ok"] is True for c in checks)
    skipped = sum(c["ok"] is None for c in checks)
    lines.append(f"\n{passed}/{len(checks) - skipped} cases pass the error-ratio rule"
                 + (f" ({skipped} skipped)" if skipped else ""))
    return "\n".join(lines)


def all_tables(data: dict, with_checks: bool = True) -> str:
    records = data["records"]
    out = []
    for run in data.get("runs", []):
        bits = [f"{k} {run[k]}" for k in ("device", "torch", "triton", "date") if k in run]
        if bits:
            out.append("- " + ", ".join(bits) + (f" — `{run['command']}`" if run.get("command")
                                                 else ""))
    if with_checks and data.get("checks"):
        out += ["", "### Correctness on the GPU", "", checks_block(data["checks"])]
    grid = grid_table(records)
    if grid:
        out += ["", "### Speed, bf16, B·N = 16k tokens, H·d = 2048 (TFLOP/s; median of do_bench)",
                "", "FLOPs = 4·B·H·N²·d (halved when causal), backward counted as 2.5× forward; "
                "n/a = the backend refused the shape.", "", grid]
    fp16 = fp16_table(records)
    if fp16:
        out += ["", "### fp16 vs bf16 (TFLOP/s, same shapes)", "", fp16]
    feats = feature_table(records)
    if feats:
        out += ["", "### Cost of each feature", "", feats]
    if records:
        out += ["", "### Targets", "", targets_table(records)]
    return "\n".join(out).strip()


# -- main -----------------------------------------------------------------------------------------

def _ints(values: Optional[list[str]]) -> Optional[list[int]]:
    if not values:
        return None
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip().lower()
            if part:
                out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def _names(text: str, allowed: tuple[str, ...]) -> list[str]:
    if text.strip().lower() in ("none", ""):
        return []
    if text.strip().lower() == "all":
        return list(allowed)
    out = []
    for name in text.split(","):
        name = ALIASES.get(name.strip().lower(), name.strip().lower())
        if name not in allowed:
            raise SystemExit(f"unknown name {name!r}: expected some of {', '.join(allowed)}")
        out.append(name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma list of check,speed,fp16,features (default all)")
    parser.add_argument("--d", nargs="+", default=None,
                        help="head dims (default 64,128,256); the check part: only cases of them")
    parser.add_argument("--n", nargs="+", default=None,
                        help="sequence lengths, e.g. 1k,4k or 1024 4096 (default 1k..16k)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--no-bwd", action="store_true", help="forward only")
    parser.add_argument("--peers", default="all",
                        help="comma list of cudnn,fa2,flex (default all; 'none' for attnfuse only)")
    parser.add_argument("--quick", action="store_true", help="N in 1k,4k unless --n is given")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which no new shape is started (results so far kept)")
    parser.add_argument("--features", default=None,
                        help="features part: only rows whose name contains one of these "
                             "comma-separated words (e.g. plain,padding)")
    parser.add_argument("--out", default=None, help="JSON file of every measurement")
    parser.add_argument("--append", action="store_true", help="merge into an existing --out file")
    parser.add_argument("--table", nargs="+", default=None, metavar="PATH",
                        help="only read these JSON files and print the markdown tables")
    args = parser.parse_args()

    if args.table:
        datas = []
        for path in args.table:
            with open(path) as f:
                datas.append(json.load(f))
        print(all_tables(_merge(datas)))
        return

    parts = _names(args.parts, PARTS)
    peers = _names(args.peers, PEERS)
    kernels = ["attnfuse"] + peers
    dims = _ints(args.d) or [64, 128, 256]
    lengths = _ints(args.n) or ([1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384])
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]

    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (use --table to print tables from JSON)")
    import triton
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                command="python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:]))
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']}", flush=True)
    run = Run(args, meta)
    if "check" in parts:
        run.checks = check_correctness(_ints(args.d) if args.d else None)
        run.save()
    if "speed" in parts:
        time_grid(run, "speed", dims, lengths, causals, kernels, "bf16", not args.no_bwd)
    if "fp16" in parts:
        fp16_n = [n for n in lengths if n in (4096, 16384)] if args.n else [4096, 16384]
        time_grid(run, "fp16", [128], fp16_n, causals,
                  [k for k in kernels if k in ("attnfuse", "cudnn")], "fp16", not args.no_bwd)
    if "features" in parts:
        time_features(run, not args.no_bwd)
    run.save()

    print()
    print(all_tables(dict(runs=[meta], records=run.records, checks=run.checks)))
    if any(c["ok"] is False for c in run.checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
