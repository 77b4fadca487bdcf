"""Regret of attnfuse's kernel choice: chosen kernel's time vs the fastest candidate, measured.

For each problem of the grid (the FlashAttention-3 paper's shapes: B·N = 16k tokens, H·d = 2048; plus GQA, masked,
short-query and training cases) every eligible candidate is timed (``do_bench``, median) to find
the fastest; then the selector chooses twice from an empty cache:

* cold: cost model only, no timing and no calibration (``tune=False``);
* tuned: the default on CUDA (the best few candidates timed on the shapes, winner cached).

regret = time(chosen) / time(fastest) − 1, with both times from the exhaustive measurement.
Prints a table, the geometric-mean and worst regret of both, and writes JSON with ``--out``.

    python benchmarks/bench_select.py [--quick] [--out benchmarks/results/select.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def grid(quick: bool) -> list[dict]:
    """Problems as dicts: shape (B, Hq, Hkv, Nq, Nk, D), causal, mask, training."""
    out = []
    lengths = (1024, 4096) if quick else (1024, 4096, 16384)
    for d in (64, 128, 256):
        for n in lengths:
            for causal in ("none", "top_left"):
                out.append(dict(b=16384 // n, hq=2048 // d, hkv=2048 // d, nq=n, nk=n, d=d,
                                causal=causal, mask="none", training=False))
    more = [
        dict(b=4, hq=16, hkv=2, nq=4096, nk=4096, d=128, causal="top_left", mask="none"),  # GQA
        dict(b=4, hq=32, hkv=8, nq=4096, nk=4096, d=128, causal="none", mask="none"),
        dict(b=2, hq=16, hkv=16, nq=8192, nk=8192, d=128, causal="none", mask="padding"),
        dict(b=2, hq=16, hkv=16, nq=4096, nk=4096, d=128, causal="none", mask="bias"),
        dict(b=8, hq=32, hkv=8, nq=1, nk=4096, d=128, causal="bottom_right", mask="none"),
        dict(b=8, hq=32, hkv=8, nq=16, nk=8192, d=128, causal="bottom_right", mask="none"),
        dict(b=1, hq=32, hkv=8, nq=512, nk=8192, d=128, causal="bottom_right", mask="none"),
        dict(b=4, hq=16, hkv=16, nq=4096, nk=4096, d=128, causal="top_left", mask="none",
             training=True),
        dict(b=4, hq=32, hkv=32, nq=2048, nk=2048, d=64, causal="none", mask="none",
             training=True),
        dict(b=32, hq=16, hkv=16, nq=197, nk=197, d=64, causal="none", mask="none"),  # ViT-L/16
    ]
    for m in more:
        m.setdefault("training", False)
    return out + (more[:5] if quick else more)


def operands(p: dict, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(p["b"], p["hq"], p["nq"], p["d"], device="cuda", dtype=dtype, generator=g)
    k = torch.randn(p["b"], p["hkv"], p["nk"], p["d"], device="cuda", dtype=dtype, generator=g)
    v = torch.randn(p["b"], p["hkv"], p["nk"], p["d"], device="cuda", dtype=dtype, generator=g)
    mask = None
    if p["mask"] == "padding":   # bool key padding, a quarter of the keys padded
        mask = torch.ones(p["b"], 1, 1, p["nk"], device="cuda", dtype=torch.bool)
        mask[..., -p["nk"] // 4:] = False
    elif p["mask"] == "bias":    # a dense additive bias shared over the batch
        mask = torch.randn(1, p["hq"], p["nq"], p["nk"], device="cuda", dtype=dtype)
    if p["training"]:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, mask


def label(p: dict) -> str:
    tag = f"{p['b']}x{p['hq']}/{p['hkv']}x{p['nq']}x{p['nk']}x{p['d']}"
    extra = [x for x in (p["causal"] if p["causal"] != "none" else "", p["mask"]
                         if p["mask"] != "none" else "", "train" if p["training"] else "") if x]
    return tag + (" " + ",".join(extra) if extra else "")


def run(problems: list[dict]) -> list[dict]:
    from attnfuse.tune import cache, select
    rows = []
    for i, p in enumerate(problems):
        q, k, v, mask = operands(p)
        source = "sdpa" if p["mask"] == "bias" else "eager_softmax"
        prob = select.Problem.of(q, k, v, mask, p["causal"], training=p["training"],
                                 source=source)
        cands = select._candidates(prob, q, k, v, mask, "exact", select._environment_key(prob))
        times = {}
        for c in cands:
            if c.reasons:
                continue
            try:
                times[c.kernel] = select._bench(select.runner(prob, c.kernel),
                                                torch.device("cuda")) * 1e3
            except Exception as e:  # report, don't drop
                times[c.kernel] = math.inf
                print(f"  {c.kernel} failed: {e!r}"[:200], file=sys.stderr)
            torch.cuda.empty_cache()
        finite = {kname: t for kname, t in times.items() if math.isfinite(t)}
        best = min(finite, key=finite.get)
        with tempfile.TemporaryDirectory() as d:
            os.environ["ATTNFUSE_CACHE_DIR"] = d
            select.forget()
            cold = select.choose(prob, q, k, v, mask, tune=False)
            select.forget()
            t0 = time.perf_counter()
            tuned = select.choose(prob, q, k, v, mask, tune=True)
            tune_s = time.perf_counter() - t0
        row = dict(problem=label(p), times_ms=times, best=best, best_ms=finite[best],
                   cold=cold.kernel, cold_regret=times[cold.kernel] / finite[best] - 1,
                   tuned=tuned.kernel, tuned_regret=times[tuned.kernel] / finite[best] - 1,
                   tune_s=tune_s,
                   predicted_ms={c.kernel: c.predicted_ms for c in cold.candidates if c.eligible})
        rows.append(row)
        print(f"[{i + 1}/{len(problems)}] {row['problem']}: best {best} {finite[best]:.3f} ms; "
              f"cold {cold.kernel} +{row['cold_regret']:.1%}; tuned {tuned.kernel} "
              f"+{row['tuned_regret']:.1%}", flush=True)
        del q, k, v, mask
        torch.cuda.empty_cache()
    del cache
    return rows


def geomean_regret(values: list[float]) -> float:
    return math.exp(sum(math.log1p(r) for r in values) / len(values)) - 1


def table(rows: list[dict]) -> str:
    names = sorted({kname for r in rows for kname in r["times_ms"]})
    head = ["problem", *names, "best", "cold", "regret", "tuned", "regret"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["problem"]] + [f"{r['times_ms'][n]:.3f}" if n in r["times_ms"] else "-"
                                  for n in names]
        cells += [r["best"], r["cold"], f"{r['cold_regret']:.1%}", r["tuned"],
                  f"{r['tuned_regret']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    cold = [r["cold_regret"] for r in rows]
    tuned = [r["tuned_regret"] for r in rows]
    lines.append("")
    lines.append(f"cold (cost model only): geomean regret {geomean_regret(cold):.1%}, "
                 f"worst {max(cold):.1%}")
    lines.append(f"tuned (default):        geomean regret {geomean_regret(tuned):.1%}, "
                 f"worst {max(tuned):.1%}")
    return "\n".join(lines)


def check() -> list[str]:
    """GPU smoke checks of the selection path; returns failures (printed as a table row each)."""
    import attnfuse
    from torch._subclasses.fake_tensor import FakeTensorMode
    from attnfuse.kernels import registry
    from attnfuse.testing import error_ratio
    from attnfuse.tune.ceilings import ceilings
    fails = []
    c = ceilings(torch.device("cuda"))
    print(f"ceilings: bf16 {c.matmul['bfloat16'] / 1e12:.0f} TFLOP/s, exp {c.exp / 1e12:.2f} T/s, "
          f"copy {c.bandwidth / 1e12:.2f} TB/s, launch {c.launch * 1e6:.1f} us", flush=True)
    # PyTorch's backend checks must say the same on fake tensors (compile time) as on real ones
    for shape, dtype in (((2, 8, 256, 128), torch.bfloat16), ((2, 8, 256, 256), torch.bfloat16),
                         ((2, 8, 256, 72), torch.float16), ((2, 8, 256, 64), torch.float32)):
        real = torch.randn(shape, device="cuda", dtype=dtype)
        with FakeTensorMode() as mode:
            fake = mode.from_tensor(real)
            on_fake = {n: registry.rejections(n, fake, fake, fake, None, "none")
                       for n in registry.candidates("cuda")}
        on_real = {n: registry.rejections(n, real, real, real, None, "none")
                   for n in registry.candidates("cuda")}
        ok = {n for n, r in on_real.items() if not r}
        print(f"  {shape} {dtype}: eligible {sorted(ok)}")
        if on_fake != on_real:
            fails.append(f"fake/real rejections differ for {shape} {dtype}")

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            causal = torch.ones(q.shape[-2], k.shape[-2], device=q.device, dtype=torch.bool).tril()
            return torch.softmax(s.masked_fill(~causal, float("-inf")).float(), -1).to(q.dtype) @ v

    for training in (False, True):
        p = dict(b=2, hq=8, hkv=8, nq=1024, nk=1024, d=128, causal="top_left", mask="none",
                 training=training)
        q, k, v, _ = operands(p)
        fast = attnfuse.optimize(Attn())
        got = fast(q, k, v)
        site = fast.attnfuse_report.sites[0]
        want = Attn()(q, k, v)
        ref = Attn()(*(t.detach().double() for t in (q, k, v)))
        r = error_ratio("out", got, ref, want)
        print(f"  optimize (training={training}): {site.kernel} [{site.cache}] {r}; candidates " + ", ".join(
                  f"{c.kernel} {c.measured_ms if c.measured_ms else c.predicted_ms:.3f}"
                  for c in site.candidates if c.eligible), flush=True)
        if not r.ok:
            fails.append(f"optimize output: {r} (training={training})")
        if training:
            got.sum().backward()
            if any(t.grad is None or not torch.isfinite(t.grad).all() for t in (q, k, v)):
                fails.append("training through the chosen kernel gave no/NaN grads")
    return fails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer lengths and extra cases")
    ap.add_argument("--out", help="write rows as JSON here")
    ap.add_argument("--check", action="store_true", help="run the GPU smoke checks first")
    ap.add_argument("--no-grid", action="store_true", help="skip the regret grid")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_select.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"triton {__import__('triton').__version__}", flush=True)
    if args.check:
        fails = check()
        print("checks: " + ("all ok" if not fails else "; ".join(fails)), flush=True)
    if args.no_grid:
        return
    rows = run(grid(args.quick))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    print(table(rows))


if __name__ == "__main__":
    main()
