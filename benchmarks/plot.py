"""Plot bench_kernels.py results: TFLOP/s against sequence length, one line per kernel.

Writes two PNGs (forward and backward) into benchmarks/plots/ (or --out-dir); each has one panel
per (head dim, causal) of the bf16 grid, N on a log2 axis. Several JSON files are merged, later
ones winning for the same measurement, as in ``bench_kernels.py --table``.

Usage: python benchmarks/plot.py results.json [more.json ...] [--out-dir DIR] [--dtype bf16]
Needs matplotlib (``pip install -e ".[bench]"``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernels import KERNELS, TITLES, _merge  # noqa: E402

STYLE = {"attnfuse": dict(color="#d62728", marker="o", linewidth=2.2),
         "cudnn": dict(color="#1f77b4", marker="s"),
         "fa2": dict(color="#2ca02c", marker="^"),
         "flex": dict(color="#9467bd", marker="D")}
DIRECTIONS = {"fwd": "forward", "bwd": "backward"}


def _series(records: list[dict], dtype: str, direction: str) -> dict:
    """{(d, causal): {kernel: [(N, TFLOP/s), ...]}} of the speed grid."""
    out: dict = {}
    for r in records:
        if (r["part"] != "speed" or r["dtype"] != dtype or r["direction"] != direction
                or r.get("tflops") is None):
            continue
        panel = out.setdefault((r["d"], bool(r["causal"])), {})
        panel.setdefault(r["kernel"], []).append((r["n"], r["tflops"]))
    for panel in out.values():
        for pts in panel.values():
            pts.sort()
    return out


def plot(records: list[dict], out_dir: str, dtype: str = "bf16", title: str = "") -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for direction, word in DIRECTIONS.items():
        series = _series(records, dtype, direction)
        if not series:
            continue
        dims = sorted({d for d, _ in series})
        causals = sorted({c for _, c in series})
        fig, axes = plt.subplots(len(dims), len(causals), squeeze=False, sharex=True,
                                 figsize=(5.2 * len(causals), 3.6 * len(dims)))
        ymax = max(t for panel in series.values() for pts in panel.values() for _, t in pts)
        lengths = sorted({n for panel in series.values() for pts in panel.values()
                          for n, _ in pts})
        for i, d in enumerate(dims):
            for j, causal in enumerate(causals):
                ax = axes[i][j]
                panel = series.get((d, causal), {})
                for kernel in KERNELS:
                    pts = panel.get(kernel)
                    if not pts:
                        continue
                    ax.plot([n for n, _ in pts], [t for _, t in pts], label=TITLES[kernel],
                            **STYLE.get(kernel, {}))
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_locator(FixedLocator(lengths))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_major_formatter(FuncFormatter(
                    lambda x, _: f"{int(x) // 1024}k" if x >= 1024 else f"{int(x)}"))
                ax.set_ylim(0, ymax * 1.12)
                ax.grid(True, alpha=0.3)
                ax.set_title(f"d = {d}, {'causal' if causal else 'not causal'}")
                if i == len(dims) - 1:
                    ax.set_xlabel("sequence length N")
                if j == 0:
                    ax.set_ylabel("TFLOP/s")
                if panel:
                    ax.legend(fontsize=8, loc="lower right")
        head = f"Attention {word}, {dtype}, B·N = 16k tokens, H·d = 2048"
        fig.suptitle(head + (f"\n{title}" if title else ""))
        fig.tight_layout()
        path = os.path.join(out_dir, f"tflops_{direction}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="bench_kernels.py --out files")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "plots"))
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    datas = []
    for path in args.json:
        with open(path) as f:
            datas.append(json.load(f))
    data = _merge(datas)
    runs = data.get("runs", [])
    title = ""
    if runs:
        last = runs[-1]
        title = ", ".join(f"{k} {last[k]}" for k in ("device", "torch", "triton") if k in last)
    written = plot(data["records"], args.out_dir, args.dtype, title)
    if not written:
        sys.exit(f"no {args.dtype} speed measurements in {', '.join(args.json)}")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
