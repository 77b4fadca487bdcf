"""Time attnfuse's graph passes (canonicalize + match + rewrite) on a 32-layer model's graph, CPU.

The model is a transformers Llama with 32 layers (tiny width, real structure: GQA repeat_kv,
additive 4-D masks, fp32 softmax upcast). Dynamo captures the graph once; the passes are then
timed alone on fresh copies of it, so tracing and Inductor time are excluded.

    python benchmarks/compile_time.py [--layers 32] [--repeat 5]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def capture(layers: int, impl: str) -> tuple[torch.fx.GraphModule, list]:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl).eval()
    ids = torch.randint(0, 128, (2, 64))
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, :5] = 0
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab)(input_ids=ids, attention_mask=mask)
    return max(graphs, key=lambda g: len(g[0].graph.nodes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from attnfuse.backend import Options, rewrite_attention
    rows = []
    for impl in ("eager", "sdpa"):
        gm, ex = capture(args.layers, impl)
        times, report = [], None
        for _ in range(args.repeat):
            g = copy.deepcopy(gm)
            t0 = time.perf_counter()
            report = rewrite_attention(g, ex, Options(inner="eager", keep_sdpa=False))
            times.append(time.perf_counter() - t0)
        rows.append((impl, len(gm.graph.nodes), len(report.sites), len(report.fused),
                     statistics.median(times), max(times)))
    print(f"torch {torch.__version__}, {args.layers} layers, CPU, median of {args.repeat}")
    print("| attn_implementation | graph nodes | sites | fused | passes median (s) | max (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} |")


if __name__ == "__main__":
    main()
