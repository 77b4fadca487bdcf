"""End to end: whole models through eager, SDPA, Inductor and ``attnfuse.optimize``.

Models (``--models``, comma list; random weights from configs, nothing downloaded; bf16 on CUDA):

- ``llama``: a Llama-style decoder of ~1.1B parameters (transformers ``LlamaForCausalLM``:
  16 layers, hidden 2048, 32 heads of 64, 8 KV heads (GQA 4:1), MLP 8192, vocab 32000).
  Prefill of one sequence at ``--lengths`` (default 2k, 8k, 32k; last-token logits only, no
  KV cache), and one training step (forward + cross-entropy + backward, no optimizer) at
  ``--train-length`` (4k).
- ``vit``: timm ``vit_large_patch16_224`` (``img_size`` 224 and 448), batch 32.
- ``dit``: diffusers ``DiTTransformer2DModel`` (DiT-XL/2: 28 layers, 16 heads of 72) on 64×64
  latents (1024 tokens), one denoising step, batch 8.
- ``unet``: diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.5's config) on 64×64
  latents (self-attention over 4096 tokens in the first blocks), one denoising step, batch 8.
  diffusers may be missing: its models are then reported as "skipped (not installed)".

Variants (``--variants``): ``eager`` (the library's eager attention: HF
``attn_implementation="eager"``, timm ``fused_attn=False``, diffusers ``AttnProcessor``),
``sdpa`` (the library's SDPA attention: HF ``"sdpa"``, timm ``fused_attn=True``, diffusers
``AttnProcessor2_0``), ``inductor`` (``torch.compile`` of the eager model), ``inductor_sdpa``
(``torch.compile`` of the SDPA model), ``attnfuse`` (``attnfuse.optimize`` of the eager model)
and ``attnfuse_fast`` (the same with ``policy="fast"``; whether a site took a quantized kernel,
and each quantized candidate's gate, is read from ``.attnfuse_report``). Only when named:
``attnfuse_sdpa`` (``optimize`` of the SDPA model), ``attnfuse_sparse`` (``policy="sparse"``,
where this attnfuse has it). Training runs every variant but the fast and sparse ones; there
``optimize`` gets no example inputs (an example runs under ``no_grad`` and would compile an
inference graph first). ``--attnfuse-options JSON`` passes more arguments to ``optimize``.

Parts (``--parts``, comma list; default ``prefill,train``):

- ``prefill``: the inference forward of every model (Llama prefill, ViT forward, one denoising
  step). ``train``: Llama's training step.
  Per variant: the first call's wall time (compilation included; caches as the process finds
  them), then ``--warmup`` calls (on CUDA for at least a second, so the clocks leave idle) and
  up to ``--reps`` calls timed with CUDA events (at least
  3, stopping after ``--rep-seconds``); latency = median. Peak memory =
  ``torch.cuda.max_memory_allocated`` over those steady-state calls (weights included; the first
  call's peak is in the JSON). A variant that runs out of memory is recorded as ``OOM``, one that
  fails as ``error`` with the exception. Every variant's output is compared with the ``sdpa``
  variant's (``rel err`` = ‖out − ref‖ / ‖ref‖; last-token logits, ViT logits, the denoiser's
  output; in training the gradient of layer 0's q_proj weight).
  ``--interleave ROUNDS``: every variant of a case stays in memory after its own timing, then
  all are timed again in ROUNDS rounds that take them in turn (order rotating), each round
  about 100 ms of back-to-back calls per variant; latency = the median round (the sequential
  median stays in the JSON as ``seq_latency_ms``). Where variants differ by less than the
  drift of clocks and host between their sequential timings, this is the fair comparison.
  Memory is then counted above what the other variants hold.
  ``× eager`` = eager latency / latency; ``× best other`` = the best latency of the variants that
  are not attnfuse's (eager, sdpa, inductor, inductor_sdpa), itself excluded, / latency.
- ``compile``: optimize's own overhead. Each of ``inductor`` and ``attnfuse`` compiles the eager
  model in a fresh process with empty Inductor, Triton and attnfuse caches (``cold``: wall time
  of ``torch.compile(m)`` + first call, resp. ``optimize(m, x)``, which makes that call), then
  again in that process after ``torch._dynamo.reset()`` (``warm``: on-disk caches filled);
  ``steady`` is the median of 3 calls after the cold compile, ``passes`` attnfuse's own rewrite
  time (matching, kernel choice and timing) within the cold compile. Llama compiles at
  ``--compile-length``; with ``--tiny`` only the first model is compiled this way.
- ``recompile`` (Llama): compile at the first of ``--recompile-lengths``, call at the others;
  count the graphs Dynamo compiled at each call (``counters["stats"]["unique_graphs"]``), for
  ``dynamic=None`` (Dynamo's automatic dynamic: one recompile at the second length is expected)
  and ``dynamic=True``, for ``inductor`` and ``attnfuse``; attnfuse's report says whether the
  dynamic graph's sites are still fused.

Targets (printed as a table): attnfuse ≥ 1.0× the best other variant on every model and length,
≥ 1.15× on the Llama prefill at 8k and 32k; attnfuse's peak memory ≤ the sdpa variant's;
cold compile ≤ inductor's + 20 %; no recompilation when only the sequence length changes.

One GPU command runs at most 10 minutes: split the work by ``--models``, ``--parts`` and
``--lengths`` and merge the JSON files with ``--append`` (or ``--table a.json b.json``):

    python benchmarks/e2e.py --models llama --parts prefill --lengths 2k --out r.json
    python benchmarks/e2e.py --models llama --parts prefill --lengths 8k --out r.json --append
    python benchmarks/e2e.py --models llama --parts compile --out r.json --append
    python benchmarks/e2e.py --table r.json --plot          # tables and plots only, no GPU
    python benchmarks/e2e.py --table a.json b.json --out merged.json   # merge runs

``--budget SECONDS``: start no new variant after that long (the rest is recorded as "not run
(budget)"); ``--out`` is rewritten after every variant, so an interrupted call keeps what it
measured. ``--tiny``: tiny configs and few tokens (CPU: fp32), every model, variant and part
(timing numbers are meaningless there), a check that the script works. ``--plot``: bar charts
of each variant's speed relative to the best non-attnfuse variant, and peak memory, one PNG per
model in ``--plot-dir`` (default benchmarks/plots/e2e_<model>.png; needs matplotlib).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import inspect
import itertools
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("llama", "vit", "dit", "unet")
PARTS = ("prefill", "train", "compile", "recompile")
VARIANTS = ("eager", "sdpa", "inductor", "inductor_sdpa", "attnfuse", "attnfuse_fast",
            "attnfuse_sdpa", "attnfuse_sparse")
DEFAULT_VARIANTS = VARIANTS[:-2]
POLICY = {"attnfuse_fast": "fast", "attnfuse_sparse": "sparse"}   # the others: "exact"
OTHERS = ("eager", "sdpa", "inductor", "inductor_sdpa")   # the variants attnfuse is held against
COMPILERS = ("inductor", "attnfuse")                        # the compile and recompile parts
TRAIN_SKIP = ("attnfuse_fast", "attnfuse_sparse")          # their kernels are inference-only
PACKAGES = {"llama": "transformers", "vit": "timm", "dit": "diffusers", "unet": "diffusers"}
TARGET_ALL, TARGET_LONG, LONG = 1.0, 1.15, 8192           # × best other; Llama prefill N ≥ LONG
COMPILE_OVERHEAD = 0.20
CHILD_TAG = "E2E_CHILD_RESULT "
ATTNFUSE_OPTIONS: dict[str, Any] = {}   # more keyword arguments of optimize (--attnfuse-options)
GIB = 2 ** 30


# -- sizes ----------------------------------------------------------------------------------------

@dataclass
class Sizes:
    lengths: tuple[int, ...] = (2048, 8192, 32768)
    train_length: int = 4096
    compile_length: int = 2048
    recompile_lengths: tuple[int, ...] = (2048, 3072, 4096)
    llama_batch: int = 1
    resolutions: tuple[int, ...] = (224, 448)
    vit_batch: int = 32
    latent: int = 64
    diffusion_batch: int = 8
    tiny: bool = False


TINY = dict(lengths=(64,), train_length=32, compile_length=32, recompile_lengths=(32, 48, 64),
            resolutions=(32,), vit_batch=2, latent=8, diffusion_batch=2)


# -- model cases ----------------------------------------------------------------------------------

@dataclass
class Case:
    """One measured workload: a model family at one size, inference or a training step."""

    model: str
    part: str                                    # "prefill" or "train"
    label: str
    build: Callable[[str], torch.nn.Module]      # "eager" | "sdpa" -> model on the device
    inputs: Callable[[], dict]                   # keyword arguments of one call
    items: int                                   # tokens or images per call
    unit: str                                    # "tokens/s" or "images/s"
    n: int                                       # tokens per sequence (attention length)
    batch: int
    output: Callable[[Any, torch.nn.Module], torch.Tensor]  # small result for the cross-check
    loss: Optional[Callable[[Any], torch.Tensor]] = None     # training cases only

    @property
    def train(self) -> bool:
        return self.loss is not None


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _parse_lengths(text: str) -> tuple[int, ...]:
    out = []
    for word in text.split(","):
        word = word.strip().lower()
        if word:
            out.append(int(float(word[:-1]) * 1024) if word.endswith("k") else int(word))
    return tuple(out)


def _seeded(device: torch.device) -> contextlib.AbstractContextManager:
    torch.manual_seed(0)
    return torch.device(device)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


class Env:
    """Device, dtype and sizes every builder reads."""

    def __init__(self, device: str, dtype: torch.dtype, sizes: Sizes) -> None:
        self.device, self.dtype, self.sizes = torch.device(device), dtype, sizes

    def to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)


def llama_config(env: Env) -> Any:
    from transformers import LlamaConfig
    s = env.sizes
    longest = max((*s.lengths, s.train_length, s.compile_length, *s.recompile_lengths))
    if s.tiny:
        dims = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2)
    else:
        dims = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
    return LlamaConfig(**dims, max_position_embeddings=max(longest, 32768), use_cache=False,
                       attention_dropout=0.0, tie_word_embeddings=False)


def _build_llama(env: Env, train: bool, impl: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM
    cfg = llama_config(env)   # one config per model: _from_config keeps the implementation in it
    with _seeded(env.device):
        model = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation=impl)
    got = getattr(model.config, "_attn_implementation", impl)
    if got != impl:
        raise RuntimeError(f"LlamaForCausalLM runs attention {got!r}, not {impl!r}")
    model = model.to(env.device, env.dtype)
    return model.train() if train else model.eval()


def _keeps_last_logits() -> bool:
    from transformers import LlamaForCausalLM
    return "logits_to_keep" in inspect.signature(LlamaForCausalLM.forward).parameters


def llama_cases(env: Env, parts: tuple[str, ...]) -> list[Case]:
    s, out = env.sizes, []
    vocab = 1000 if s.tiny else 32000
    b = s.llama_batch

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (b, n), generator=_generator()).to(env.device)

    last = _keeps_last_logits()
    for n in s.lengths if "prefill" in parts else ():
        def inputs(n: int = n) -> dict:
            return dict(input_ids=ids(n), **({"logits_to_keep": 1} if last else {}))
        out.append(Case("llama", "prefill", f"prefill {_length_label(n)}",
                        lambda impl: _build_llama(env, False, impl), inputs, b * n, "tokens/s", n,
                        b, lambda o, m: o.logits[:, -1].float()))
    if "train" in parts:
        n = s.train_length

        def train_inputs(n: int = n) -> dict:
            x = ids(n)
            return dict(input_ids=x, labels=x)

        def grad(o: Any, m: torch.nn.Module) -> torch.Tensor:
            g = m.model.layers[0].self_attn.q_proj.weight.grad
            return g.float() if g is not None else torch.full((1,), math.nan)

        out.append(Case("llama", "train", f"train {_length_label(n)}",
                        lambda impl: _build_llama(env, True, impl), train_inputs, b * n,
                        "tokens/s", n, b, grad, loss=lambda o: o.loss))
    return out


def _build_vit(env: Env, res: int, impl: str) -> torch.nn.Module:
    import timm
    kw: dict[str, Any] = dict(img_size=res)
    if env.sizes.tiny:
        kw.update(patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    with _seeded(env.device):
        model = timm.create_model("vit_large_patch16_224", pretrained=False, **kw)
    flags = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = impl == "sdpa"   # per module: timm.layers.set_fused_attn is global
            flags += 1
    if not flags:
        raise RuntimeError(f"timm {timm.__version__}: no module with a fused_attn attribute")
    return model.to(env.device, env.dtype).eval()


def vit_cases(env: Env, parts: tuple[str, ...]) -> list[Case]:
    if "prefill" not in parts:
        return []
    s, out = env.sizes, []
    patch = 8 if s.tiny else 16
    for res in s.resolutions:
        def inputs(res: int = res) -> dict:
            return dict(x=env.to(torch.randn(s.vit_batch, 3, res, res, generator=_generator())))
        out.append(Case("vit", "prefill", f"{res}px b{s.vit_batch}",
                        lambda impl, res=res: _build_vit(env, res, impl), inputs, s.vit_batch,
                        "images/s", (res // patch) ** 2 + 1, s.vit_batch,
                        lambda o, m: o.float()))
    return out


def _set_processors(model: torch.nn.Module, impl: str) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()   # not the .to(dtype) advice for every build
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0() if impl == "sdpa" else AttnProcessor())
            n += 1
    if not n:
        raise RuntimeError("no diffusers Attention module found")


def _build_dit(env: Env, impl: str) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel
    s = env.sizes
    kw: dict[str, Any] = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28)
    if s.tiny:
        kw = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2)
    with _seeded(env.device):
        model = DiTTransformer2DModel(**kw, in_channels=4, sample_size=s.latent, patch_size=2,
                                      num_embeds_ada_norm=1000)
    _set_processors(model, impl)
    return model.to(env.device, env.dtype).eval()


def _build_unet(env: Env, impl: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    s = env.sizes
    with _seeded(env.device):
        if s.tiny:   # one cross-attention block down and one up: 6 attention sites
            model = UNet2DConditionModel(
                sample_size=s.latent, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        else:   # Stable Diffusion 1.5's UNet (the library's defaults, text width 768)
            model = UNet2DConditionModel(sample_size=s.latent, cross_attention_dim=768)
    _set_processors(model, impl)
    return model.to(env.device, env.dtype).eval()


def diffusion_cases(env: Env, parts: tuple[str, ...], which: str) -> list[Case]:
    if "prefill" not in parts:
        return []
    s = env.sizes
    b, lat = s.diffusion_batch, s.latent

    def latents() -> torch.Tensor:
        return env.to(torch.randn(b, 4, lat, lat, generator=_generator()))

    steps = torch.full((b,), 500, dtype=torch.long)
    if which == "dit":
        def dit_inputs() -> dict:
            labels = torch.randint(0, 1000, (b,), generator=_generator())
            return dict(hidden_states=latents(), timestep=steps.to(env.device),
                        class_labels=labels.to(env.device))
        tokens = (lat // 2) ** 2
        return [Case("dit", "prefill", f"{lat}x{lat} latents b{b} ({tokens} tok)",
                     lambda impl: _build_dit(env, impl), dit_inputs, b, "images/s", tokens, b,
                     lambda o, m: o.sample.float())]
    width = 32 if s.tiny else 768

    def unet_inputs() -> dict:
        text = env.to(torch.randn(b, 77, width, generator=_generator()))
        return dict(sample=latents(), timestep=steps.to(env.device), encoder_hidden_states=text)
    return [Case("unet", "prefill", f"{lat}x{lat} latents b{b} ({lat * lat} tok)",
                 lambda impl: _build_unet(env, impl), unet_inputs, b, "images/s", lat * lat, b,
                 lambda o, m: o.sample.float())]


def cases_of(model: str, env: Env, parts: tuple[str, ...]) -> list[Case]:
    if model == "llama":
        return llama_cases(env, parts)
    if model == "vit":
        return vit_cases(env, parts)
    return diffusion_cases(env, parts, model)


def compile_case(model: str, env: Env) -> Case:
    """The inference case the compile part compiles (Llama at --compile-length)."""
    if model == "llama":
        env = Env(str(env.device), env.dtype,
                  dataclasses.replace(env.sizes, lengths=(env.sizes.compile_length,)))
    return cases_of(model, env, ("prefill",))[0]


# -- running one variant --------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleanup(device: torch.device, reset: bool = True) -> None:
    """Free a variant; ``reset=False`` keeps Dynamo's caches (variants still to be called)."""
    if reset:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                              getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(e, types) or "out of memory" in str(e).lower()


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:400]


def _frames(e: BaseException, keep: int = 6) -> list[str]:
    tb = traceback.extract_tb(e.__traceback__)
    return [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in tb[-keep:]]


class _Warnings(logging.Handler):
    """attnfuse's warnings during one variant (e.g. a gate that could not run the graph)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < 8:
            self.messages.append(" ".join(record.getMessage().split())[:300])


@contextlib.contextmanager
def attnfuse_warnings() -> Any:
    handler, logger = _Warnings(), logging.getLogger("attnfuse")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _call(fn: Callable, inputs: dict) -> Any:
    return fn(**inputs)


def impl_of(variant: str) -> str:
    return "sdpa" if variant in ("sdpa", "inductor_sdpa", "attnfuse_sdpa") else "eager"


def report_summary(report: Any) -> dict[str, Any]:
    """The parts of an attnfuse Report the tables use: kernels per site, kept reasons."""
    kernels = Counter(str(s.kernel) if s.kernel else "kept" for s in report.sites)
    masks = Counter(s.spec.mask.describe() if s.spec is not None else "-" for s in report.sites)
    kept = list(dict.fromkeys(s.reason for s in report.sites if not s.kernel))[:3]
    gate: dict[str, Any] = {}   # policy="fast": each quantized candidate's gate, over the sites
    for s in report.sites:
        for c in s.candidates:
            if not c.kernel.startswith("sage"):
                continue
            g = gate.setdefault(c.kernel, dict(admitted=0, rejected=0, min_cosine=None,
                                               max_rel_l1=None, reasons=[]))
            g["rejected" if c.reasons else "admitted"] += 1
            for r in c.reasons:
                if r not in g["reasons"] and len(g["reasons"]) < 2:
                    g["reasons"].append(r[:200])
            if c.accuracy.get("cosine") is not None:
                g["min_cosine"] = min(c.accuracy["cosine"], g["min_cosine"] or 2.0)
            if c.accuracy.get("rel_l1") is not None:
                g["max_rel_l1"] = max(c.accuracy["rel_l1"], g["max_rel_l1"] or 0.0)
    why = list(dict.fromkeys(s.reason for s in report.sites if s.kernel))[:3]
    return dict(graphs=len(report.before), sites=len(report.sites), fused=len(report.fused),
                kernels=dict(kernels), masks=dict(masks), kept_reasons=kept, why=why, gate=gate,
                quantized=any(str(s.kernel).startswith("sage") for s in report.sites),
                approximate=sorted(k for k in kernels if not _exact(k)))


def _exact(kernel: str) -> bool:
    """Whether attnfuse's registry calls ``kernel`` exact (unknown names count as exact)."""
    try:
        from attnfuse.kernels import registry
        return bool(registry.get(kernel).exact)
    except Exception:  # noqa: BLE001  ("kept", "sdpa", names of other versions)
        return True


def make_compiled(case: Case, variant: str, model: torch.nn.Module, inputs: dict, *,
                  dynamic: Optional[bool] = None) -> Callable:
    """The callable of ``variant`` around ``model``; attnfuse's inference variants compile here
    (``optimize`` makes the first call), the others at their first call."""
    if variant in ("eager", "sdpa"):
        return model
    if variant.startswith("inductor"):
        return torch.compile(model, dynamic=dynamic)
    import attnfuse
    kw = dict(ATTNFUSE_OPTIONS, policy=POLICY.get(variant, "exact"), dynamic=dynamic)
    if case.train:
        return attnfuse.optimize(model, **kw)
    return attnfuse.optimize(model, inputs, **kw)


def make_step(case: Case, fn: Callable, model: torch.nn.Module, inputs: dict) -> Callable[[], Any]:
    if case.train:
        def step() -> Any:
            model.zero_grad(set_to_none=True)
            out = _call(fn, inputs)
            case.loss(out).backward()
            return out
        return step

    def infer() -> Any:
        with torch.no_grad():
            return _call(fn, inputs)
    return infer


@dataclass
class Timing:
    warmup: int = 2
    reps: int = 10
    min_reps: int = 3
    seconds: float = 3.0
    profile: int = 0      # > 0: also record the top GPU kernels of this many extra calls
    warm_seconds: float = 1.0   # CUDA: warm-up lasts at least this long (a GPU idle through a
    #                             compile runs its first calls at a fraction of its clock)


def measure(step: Callable[[], Any], device: torch.device, t: Timing) -> tuple[list[float], Any]:
    """Milliseconds of each timed call (CUDA events, or the host clock on CPU), last output."""
    out = None
    t0 = time.perf_counter()
    for i in itertools.count():   # warm-up calls, and long enough for the clocks to leave idle
        if i >= t.warmup and (device.type != "cuda" or time.perf_counter() - t0 >= t.warm_seconds):
            break
        out = step()
        _sync(device)
    times: list[float] = []
    while len(times) < max(t.min_reps, 1) or (len(times) < t.reps
                                               and sum(times) < 1000 * t.seconds):
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            out = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = step()
            times.append(1000 * (time.perf_counter() - t0))
    return times, out


def top_kernels(step: Callable[[], Any], calls: int, keep: int = 12) -> list[dict]:
    """The GPU kernels of ``calls`` calls of ``step`` by total device time (torch.profiler):
    where two variants' latencies differ, this says which kernels differ. Device events only: a
    CPU op's self device time is that of the kernels it launched, which are listed themselves."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if getattr(e, "device_type", DeviceType.CUDA) != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append(dict(name=e.key[:90], us_per_call=us / calls, count=e.count // calls))
    rows.sort(key=lambda r: -r["us_per_call"])
    total = sum(r["us_per_call"] for r in rows)
    return [dict(name="(all kernels)", us_per_call=total, count=sum(r["count"] for r in rows))] \
        + rows[:keep]


def run_variant(case: Case, variant: str, env: Env, timing: Timing,
                keep: Optional[dict[str, Callable[[], Any]]] = None) -> tuple[dict, Any]:
    """Build, compile, time and free one variant; returns its record and its small output.
    With ``keep``, a variant that ran is not freed: its step goes into ``keep`` (for
    :func:`interleaved`), and its memory is counted above what was allocated before its build."""
    dev = env.device
    rec: dict[str, Any] = dict(model=case.model, part=case.part, case=case.label,
                               variant=variant, n=case.n, batch=case.batch, unit=case.unit,
                               items=case.items)
    output = None
    model = fn = step = None
    t_start = time.perf_counter()
    with attnfuse_warnings() as warned:
        try:
            base = 0.0
            if dev.type == "cuda" and keep:   # other variants' models are still allocated
                _sync(dev)
                base = torch.cuda.memory_allocated(dev) / GIB
            model = case.build(impl_of(variant))
            inputs = case.inputs()
            if dev.type == "cuda":
                _sync(dev)
                rec["static_gib"] = torch.cuda.memory_allocated(dev) / GIB - base
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            fn = make_compiled(case, variant, model, inputs)
            step = make_step(case, fn, model, inputs)
            if not (variant.startswith("attnfuse") and not case.train):
                step()               # optimize() made the inference variants' first call
            _sync(dev)
            rec["first_call_s"] = time.perf_counter() - t0
            if dev.type == "cuda":
                rec["first_peak_gib"] = torch.cuda.max_memory_allocated(dev) / GIB - base
                torch.cuda.reset_peak_memory_stats(dev)
            times, out = measure(step, dev, timing)
            rec.update(status="ok", latency_ms=statistics.median(times), reps=len(times),
                       spread_ms=[min(times), max(times)])
            rec["throughput"] = case.items / (rec["latency_ms"] / 1000)
            if dev.type == "cuda":
                rec["peak_gib"] = torch.cuda.max_memory_allocated(dev) / GIB - base
            if timing.profile:
                rec["kernels"] = top_kernels(step, timing.profile)
            output = case.output(out, model).detach().to("cpu", torch.float32)
            if case.train:
                rec["loss"] = float(case.loss(out).detach())
            del out
            report = getattr(fn, "attnfuse_report", None)
            if report is not None:
                rec["attnfuse"] = report_summary(report)
            if keep is not None:
                keep[variant] = step
        except Exception as e:  # noqa: BLE001  (OOM and every failure are results here)
            if is_oom(e):
                rec.update(status="OOM", error=_short(e))
            else:
                rec.update(status="error", error=_short(e), traceback=_frames(e))
                report = getattr(fn, "attnfuse_report", None)
                if report is not None:
                    rec["attnfuse"] = report_summary(report)
        finally:
            rec["warnings"] = list(warned)
    del model, fn, step
    cleanup(dev, reset=keep is None)   # kept variants' compiled code must not recompile
    rec["seconds"] = time.perf_counter() - t_start
    return rec, output


def interleaved(steps: dict[str, Callable[[], Any]], device: torch.device, rounds: int,
                t: Timing, round_ms: float = 100.0) -> dict[str, list[float]]:
    """Milliseconds per call of each step, timed in ``rounds`` rounds that take the variants in
    turn (the order rotating each round), so slow drifts of the GPU's clocks and of the host
    fall on every variant alike. In a round a variant makes one untimed call, then about
    ``round_ms`` of calls back to back (no sync between them: the host queues the next call
    while the GPU runs, as in serving) timed as one span; its sample is the span / calls."""
    names = list(steps)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < (t.warm_seconds if device.type == "cuda" else 0.0):
        for v in names:   # clocks out of idle before anything counts
            steps[v]()
    _sync(device)
    each = {}
    for v in names:
        s0 = time.perf_counter()
        steps[v]()
        _sync(device)
        each[v] = max(time.perf_counter() - s0, 1e-6) * 1000
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            calls = max(1, min(50, round(round_ms / each[v])))
            steps[v]()
            _sync(device)
            if device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                for _ in range(calls):
                    steps[v]()
                end.record()
                end.synchronize()
                span = start.elapsed_time(end)
            else:
                s0 = time.perf_counter()
                for _ in range(calls):
                    steps[v]()
                span = 1000 * (time.perf_counter() - s0)
            times[v].append(span / calls)
    return times


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> Optional[float]:
    if out.shape != ref.shape:
        return None
    num = torch.linalg.vector_norm((out - ref).double()).item()
    den = torch.linalg.vector_norm(ref.double()).item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# -- the compile and recompile parts --------------------------------------------------------------

def _graph_count() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def timed_rewrites(acc: list[float]) -> Any:
    """Adds the time of each attnfuse rewrite (matching, kernel choice, timing) to ``acc``."""
    from attnfuse import backend
    original = backend.rewrite_attention

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            acc.append(time.perf_counter() - t)

    backend.rewrite_attention = timed
    try:
        yield
    finally:
        backend.rewrite_attention = original


def _warm_device(device: torch.device) -> None:
    """Create the CUDA context and the matmul handles before anything is timed."""
    if device.type == "cuda":
        a = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
        (a @ a).sum().item()
        del a


def _compile_once(case: Case, variant: str, env: Env) -> dict[str, Any]:
    """Wall time of compile + first call of ``variant`` on a fresh model, in this process."""
    model = case.build("eager")
    inputs = case.inputs()
    _sync(env.device)
    passes: list[float] = []
    g0 = _graph_count()
    ctx = timed_rewrites(passes) if variant == "attnfuse" else contextlib.nullcontext()
    with ctx:
        t0 = time.perf_counter()
        fn = make_compiled(case, variant, model, inputs)
        step = make_step(case, fn, model, inputs)
        if variant != "attnfuse":
            step()
        _sync(env.device)
        first = time.perf_counter() - t0
    res: dict[str, Any] = dict(seconds=first, graphs=_graph_count() - g0)
    if variant == "attnfuse":
        res["passes_s"] = sum(passes)
        res["attnfuse"] = report_summary(fn.attnfuse_report)
    times, _ = measure(step, env.device, Timing(warmup=1, reps=3, min_reps=3, seconds=0))
    res["steady_s"] = statistics.median(times) / 1000
    del model, fn, step
    cleanup(env.device)
    return res


def child_compile(spec: dict) -> dict[str, Any]:
    """The compile part of one (model, variant), run in a fresh process with empty caches."""
    env = env_from(spec)
    ATTNFUSE_OPTIONS.update(spec.get("options") or {})
    case = compile_case(spec["model"], env)
    _warm_device(env.device)
    with attnfuse_warnings() as warned:
        cold = _compile_once(case, spec["variant"], env)
        warm = _compile_once(case, spec["variant"], env)
    return dict(cold=cold, warm=warm, warnings=list(warned))


def env_from(spec: dict) -> Env:
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["sizes"].items()})
    return Env(spec["device"], getattr(torch, spec["dtype"]), sizes)


def run_compile(model: str, variant: str, env: Env, timeout: float) -> dict[str, Any]:
    """One child process per (model, variant): fresh Inductor, Triton and attnfuse caches."""
    case = compile_case(model, env)
    rec: dict[str, Any] = dict(model=model, part="compile", case=case.label, variant=variant,
                               n=case.n, batch=case.batch)
    spec = dict(model=model, variant=variant, device=str(env.device), options=ATTNFUSE_OPTIONS,
                dtype=str(env.dtype).replace("torch.", ""),
                sizes=dataclasses.asdict(env.sizes))
    tmp = tempfile.mkdtemp(prefix="e2e-compile-")
    child_env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                     TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
                     ATTNFUSE_CACHE_DIR=os.path.join(tmp, "attnfuse"), PYTHONUNBUFFERED="1")
    child_env.pop("ATTNFUSE_PIN", None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-compile",
                               json.dumps(spec)], env=child_env, capture_output=True, text=True,
                              timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1][len(CHILD_TAG):])
            if "error" in result:
                rec.update(status="OOM" if result.get("oom") else "error",
                           error=result["error"], traceback=result.get("traceback"))
            else:
                rec.update(status="ok", **result)
        else:
            tail = (proc.stderr or proc.stdout)[-1500:]
            rec.update(status="error", error=f"child exited with {proc.returncode}: {tail}")
    except subprocess.TimeoutExpired:
        rec.update(status="error", error=f"child timed out after {timeout:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec["seconds"] = time.perf_counter() - t0
    return rec


def run_recompile(case_at: Callable[[int], Case], variant: str, lengths: tuple[int, ...],
                  dynamic: Optional[bool], env: Env) -> dict[str, Any]:
    """Compile at lengths[0], call at the others; graphs Dynamo compiled at each call."""
    first = case_at(lengths[0])
    rec: dict[str, Any] = dict(model=first.model, part="recompile", variant=variant,
                               case=f"dynamic={dynamic}", dynamic=dynamic, lengths=list(lengths),
                               n=first.n, batch=first.batch)
    model = fn = None
    calls: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with attnfuse_warnings() as warned:
        try:
            model = first.build("eager")
            for i, n in enumerate(lengths):
                case = case_at(n)
                inputs = case.inputs()
                g0 = _graph_count()
                report = getattr(fn, "attnfuse_report", None)
                seen = len(report.sites) if report is not None else 0
                t0 = time.perf_counter()
                if i == 0:
                    fn = make_compiled(case, variant, model, inputs, dynamic=dynamic)
                    if variant != "attnfuse":
                        make_step(case, fn, model, inputs)()
                else:
                    make_step(case, fn, model, inputs)()
                _sync(env.device)
                call = dict(n=n, seconds=time.perf_counter() - t0, new_graphs=_graph_count() - g0)
                steady, _ = measure(make_step(case, fn, model, inputs), env.device, Timing(
                    warmup=0, reps=3, min_reps=1 if env.device.type == "cpu" else 3, seconds=0))
                call["steady_ms"] = statistics.median(steady)
                call["more_graphs"] = _graph_count() - g0 - call["new_graphs"]
                report = getattr(fn, "attnfuse_report", None)
                if report is not None:
                    new = report.sites[seen:]
                    call["sites"] = len(new)
                    call["fused"] = sum(1 for s in new if s.kernel)
                    call["kernels"] = dict(Counter(str(s.kernel) if s.kernel else "kept"
                                                   for s in new))
                    call["masks"] = dict(Counter(s.spec.mask.describe() if s.spec is not None
                                                 else "-" for s in new))
                    call["kept_reasons"] = list(dict.fromkeys(s.reason for s in new
                                                              if not s.kernel))[:2]
                calls.append(call)
            if calls and calls[0]["new_graphs"] + calls[0]["more_graphs"] == 0:
                raise RuntimeError("torch._dynamo's counters['stats']['unique_graphs'] did not "
                                   "move on the first compile: graphs cannot be counted here")
            rec.update(status="ok", calls=calls,
                       recompiles=sum(c["new_graphs"] + c["more_graphs"] > 0 for c in calls[1:])
                       + (calls[0]["more_graphs"] > 0))
        except Exception as e:  # noqa: BLE001
            rec.update(status="OOM" if is_oom(e) else "error", error=_short(e),
                       traceback=_frames(e), calls=calls)
        finally:
            rec["warnings"] = list(warned)
    del model, fn
    cleanup(env.device)
    rec["seconds"] = time.perf_counter() - t_start
    return rec


# -- results --------------------------------------------------------------------------------------

def record_key(r: dict) -> tuple:
    return r["model"], r["part"], r["case"], r["variant"]


def merge(*lists: list[dict]) -> list[dict]:
    """Records of several runs, later ones winning for the same (model, part, case, variant)."""
    out: dict[tuple, dict] = {}
    for records in lists:
        for r in records:
            out.pop(record_key(r), None)
            out[record_key(r)] = r
    return list(out.values())


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                                python=platform.python_version(), argv=sys.argv[1:],
                                attnfuse_options=dict(ATTNFUSE_OPTIONS))
    for name in ("triton", "transformers", "timm", "diffusers"):
        try:
            info[name] = importlib.import_module(name).__version__ if importlib.util.find_spec(
                name) else None
        except Exception as e:  # noqa: BLE001
            info[name] = f"import failed: {_short(e)}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["device"] = f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / GIB:.0f} GiB)"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def save(path: Optional[str], records: list[dict], meta: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(dict(meta=meta, records=records), indent=1, default=str))
    tmp.replace(path)


def load(paths: list[str]) -> tuple[list[dict], list[dict]]:
    metas, lists = [], []
    for p in paths:
        data = json.loads(Path(p).read_text())
        metas.append(data.get("meta", {}))
        lists.append(data.get("records", []))
    return merge(*lists), metas


# -- derived numbers and tables -------------------------------------------------------------------

def _ok(r: Optional[dict]) -> bool:
    return bool(r) and r.get("status") == "ok" and r.get("latency_ms") is not None


def groups(records: list[dict]) -> dict[tuple[str, str, str], dict[str, dict]]:
    """{(model, part, case): {variant: record}} of the timed parts, in first-seen order."""
    out: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in records:
        if r["part"] in ("prefill", "train"):
            out.setdefault((r["model"], r["part"], r["case"]), {})[r["variant"]] = r

    def order(item: tuple) -> tuple:
        (model, part, case), row = item
        n = next((r["n"] for r in row.values() if r.get("n") is not None), 0)
        return (MODELS.index(model) if model in MODELS else len(MODELS), part != "prefill", n,
                case)
    return dict(sorted(out.items(), key=order))


def best_other(row: dict[str, dict], variant: str) -> tuple[Optional[str], Optional[float]]:
    """The fastest variant that is not attnfuse's (and not ``variant``): its name and latency."""
    cands = [(r["latency_ms"], v) for v, r in row.items()
             if v in OTHERS and v != variant and _ok(r)]
    if not cands:
        return None, None
    ms, v = min(cands)
    return v, ms


def speedups(row: dict[str, dict], variant: str) -> tuple[Optional[float], Optional[float]]:
    r = row.get(variant)
    if not _ok(r):
        return None, None
    eager = row.get("eager")
    x_eager = eager["latency_ms"] / r["latency_ms"] if _ok(eager) and variant != "eager" else None
    _, other = best_other(row, variant)
    return x_eager, (other / r["latency_ms"] if other else None)


def _f(x: Optional[float], fmt: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _x(x: Optional[float]) -> str:
    """A speed ratio: two decimals, three significant digits under 0.1."""
    if x is None:
        return "-"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3g}"


def _status(r: dict) -> str:
    s = r.get("status", "?")
    return s if s != "error" else f"error: {r.get('error', '')[:80]}"


def _attention(r: dict) -> str:
    a = r.get("attnfuse")
    if not a:
        return ""
    ks = ", ".join(f"{k}×{v}" for k, v in sorted(a["kernels"].items()))
    ks += f" (not exact: {', '.join(a['approximate'])})" if a.get("approximate") else ""
    for name, g in (a.get("gate") or {}).items():
        ks += (f"; gate {name}: {g['admitted']}/{g['admitted'] + g['rejected']} admitted"
               + (f", min cos {g['min_cosine']:.4f}" if g.get("min_cosine") is not None else "")
               + (f" ({g['reasons'][0][:60]})" if g["reasons"] and not g["admitted"] else ""))
    return ks


def model_table(model: str, grouped: dict) -> list[str]:
    lines = [f"### {model}", "",
             "| case | variant | latency ms | throughput | peak GiB | × eager | × best other "
             "| first call s | rel err | attention / note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (m, part, case), row in grouped.items():
        if m != model:
            continue
        for v in VARIANTS:
            r = row.get(v)
            if r is None:
                continue
            xe, xo = speedups(row, v)
            note = _attention(r)
            if r.get("status") != "ok":
                note = _status(r) + (f"; {note}" if note else "")
            elif r.get("warnings"):
                note += ("; " if note else "") + f"warning: {r['warnings'][0][:80]}"
            thr = f"{r['throughput']:,.0f} {r['unit']}" if _ok(r) else "-"
            lines.append(
                f"| {case} | {v} | {_f(r.get('latency_ms'), '.1f', r.get('status', '-'))} | {thr} "
                f"| {_f(r.get('peak_gib'))} | {_x(xe)} | {_x(xo)} "
                f"| {_f(r.get('first_call_s'), '.1f')} "
                f"| {_f(r.get('rel_err'), '.1e')} | {note} |")
    return lines


def target_table(grouped: dict) -> list[str]:
    lines = ["### targets: attnfuse.optimize on the eager model", "",
             "| model | case | attnfuse ms | best other | × best other | target | speed "
             "| peak GiB (sdpa) | memory |", "|---|---|---|---|---|---|---|---|---|"]
    for (m, part, case), row in grouped.items():
        r = row.get("attnfuse")
        if r is None:
            continue
        name, other = best_other(row, "attnfuse")
        target = TARGET_LONG if (m == "llama" and part == "prefill" and r["n"] >= LONG) \
            else TARGET_ALL
        if _ok(r):
            x = other / r["latency_ms"] if other else None
            speed = "no other ran" if x is None else ("pass" if x >= target else "FAIL")
        else:
            x, speed = None, f"FAIL ({_status(r)[:40]})"
        sdpa = row.get("sdpa")
        mem = "-"
        if _ok(r) and r.get("peak_gib") is not None:
            if _ok(sdpa) and sdpa.get("peak_gib") is not None:
                mem = "pass" if r["peak_gib"] <= sdpa["peak_gib"] else "FAIL"
            else:
                mem = f"sdpa {sdpa.get('status') if sdpa else 'not run'}"
        peaks = f"{_f(r.get('peak_gib'))} ({_f(sdpa.get('peak_gib')) if sdpa else '-'})"
        lines.append(f"| {m} | {case} | {_f(r.get('latency_ms'), '.1f', r.get('status', '-'))} "
                     f"| {name or '-'} {_f(other, '.1f', '')} | {_x(x)} | ≥ {target:.2f} "
                     f"| {speed} | {peaks} | {mem} |")
    return lines


def compile_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["part"] == "compile"]
    if not rows:
        return []
    lines = ["### compile time: wall time of compile + first call, seconds (cold: fresh process, "
             "empty caches; warm: again in that process)", "",
             "| model | case | variant | cold | warm | steady call | attnfuse passes (cold) "
             "| graphs | cold vs inductor | warm vs inductor | target ≤ +20 % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["variant"]): r for r in rows}

    def overhead(r: dict, which: str) -> Optional[float]:
        ind = (by.get((r["model"], "inductor")) or {}).get(which) or {}
        mine = r.get(which) or {}
        if r["variant"] != "attnfuse" or not mine.get("seconds") or not ind.get("seconds"):
            return None
        return mine["seconds"] / ind["seconds"] - 1

    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{100 * x:+.0f} %"

    for r in rows:
        cold, warm = r.get("cold") or {}, r.get("warm") or {}
        oc, ow = overhead(r, "cold"), overhead(r, "warm")
        verdict = "-" if oc is None else ("pass" if oc <= COMPILE_OVERHEAD else "FAIL") + " (cold)"
        status = "" if r.get("status") == "ok" else f" ({_status(r)[:60]})"
        lines.append(f"| {r['model']} | {r['case']} | {r['variant']}{status} "
                     f"| {_f(cold.get('seconds'), '.1f')} | {_f(warm.get('seconds'), '.1f')} "
                     f"| {_f(cold.get('steady_s'), '.3f')} | {_f(cold.get('passes_s'), '.1f')} "
                     f"| {cold.get('graphs', '-')} | {pct(oc)} | {pct(ow)} | {verdict} |")
    return lines


def recompile_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["part"] == "recompile"]
    if not rows:
        return []
    lines = ["### recompilation when only the sequence length changes", "",
             "| model | variant | dynamic | per length: N: graphs compiled, first call s, steady ms"
             " [attnfuse kernels of the new graphs] | recompiles | verdict |",
             "|---|---|---|---|---|---|"]

    def kernels(c: dict) -> str:
        if not c.get("sites"):
            return ""
        why = f": {c['kept_reasons'][0][:70]}" if c.get("kept_reasons") else ""
        return " [" + ", ".join(f"{k}×{v}" for k, v in sorted(c["kernels"].items())) + why + "]"

    for r in rows:
        calls = "; ".join(
            f"{c['n']}: {c['new_graphs']}, {c['seconds']:.1f} s, {_f(c.get('steady_ms'), '.1f')} ms"
            + kernels(c) for c in r.get("calls", []))
        if r.get("status") != "ok":
            calls += f" [{_status(r)[:80]}]"
        rc = r.get("recompiles")
        verdict = "-" if rc is None else ("none" if rc == 0 else f"{rc} recompile(s)")
        lines.append(f"| {r['model']} | {r['variant']} | {r['dynamic']} | {calls} | "
                     f"{_f(rc, 'd')} | {verdict} |")
    return lines


def print_tables(records: list[dict], metas: list[dict]) -> None:
    grouped = groups(records)
    out: list[str] = [""]
    for meta in metas[:1] + [m for m in metas[1:] if m.get("device") != metas[0].get("device")]:
        out.append(f"device {meta.get('device')} | torch {meta.get('torch')} | triton "
                   f"{meta.get('triton')} | transformers {meta.get('transformers')} | timm "
                   f"{meta.get('timm')} | diffusers {meta.get('diffusers')} | {meta.get('date')}")
        if str(meta.get("device", "")).startswith("cpu"):
            out.append("(CPU: one untimed-quality call per variant; these numbers only show that "
                       "the script runs)")
    targets = target_table(grouped)
    for block in (compile_table(records), recompile_table(records),
                  targets if len(targets) > 4 else []):
        if block:
            out += [""] + block
    models = list(dict.fromkeys(m for m, _, _ in grouped))
    for m in models:
        out += [""] + model_table(m, grouped)
    print("\n".join(out), flush=True)


# -- plots ----------------------------------------------------------------------------------------

COLORS = {"eager": "#7f7f7f", "sdpa": "#1f77b4", "inductor": "#2ca02c",
          "inductor_sdpa": "#17becf", "attnfuse": "#d62728", "attnfuse_fast": "#ff7f0e",
          "attnfuse_sdpa": "#9467bd"}


def plot(records: list[dict], out_dir: str) -> list[str]:
    """One PNG per model: speed relative to the best non-attnfuse variant, and peak memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(records)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for model in dict.fromkeys(m for m, _, _ in grouped):
        cases = [(k, row) for k, row in grouped.items() if k[0] == model]
        variants = [v for v in VARIANTS if any(v in row for _, row in cases)]
        has_mem = any(r.get("peak_gib") is not None for _, row in cases for r in row.values())
        labels = [case for (_, _, case), _ in cases]
        wide = max(6.0, 1.1 * len(cases) * len(variants) / 2.5)
        fig, axes = plt.subplots(2 if has_mem else 1, 1, squeeze=False,
                                 figsize=(wide, 7 if has_mem else 4))
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(cases))]
            speed, mem = [], []
            for _, row in cases:
                r = row.get(v)
                _, best = best_other({k: x for k, x in row.items()}, "")
                speed.append(best / r["latency_ms"] if _ok(r) and best else 0.0)
                mem.append((r.get("peak_gib") or 0.0) if _ok(r) else 0.0)
            for ax, vals, fmt in ((axes[0][0], speed, "{:.2f}"),
                                  *(((axes[1][0], mem, "{:.1f}"),) if has_mem else ())):
                ax.bar(xs, vals, width, label=v, color=COLORS.get(v))
                for x, val, (_, row) in zip(xs, vals, cases):
                    r = row.get(v)
                    if r is None:
                        continue
                    tag = fmt.format(val) if _ok(r) else {"OOM": "OOM", "error": "error"}.get(
                        r.get("status"), "not run")
                    ax.text(x, val, tag, rotation=90, ha="center", va="bottom", fontsize=6)
        ax = axes[0][0]
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel("speed vs best non-attnfuse (×)")
        ax.set_title(f"{model}: end to end (higher is faster)")
        ax.set_xticks(range(len(cases)), labels)
        ax.set_ylim(0, max(1.3, ax.get_ylim()[1] * 1.15))
        ax.legend(fontsize=7, ncol=min(len(variants), 4), loc="upper left")
        if has_mem:
            axes[1][0].set_ylim(0, axes[1][0].get_ylim()[1] * 1.15)
            axes[1][0].set_ylabel("peak GiB (steady state)")
            axes[1][0].set_xticks(range(len(cases)), labels)
        fig.tight_layout()
        path = os.path.join(out_dir, f"e2e_{model}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# -- main -----------------------------------------------------------------------------------------

def _available(model: str) -> Optional[str]:
    pkg = PACKAGES[model]
    return None if importlib.util.find_spec(pkg) else f"skipped ({pkg} not installed)"


def run(args: argparse.Namespace, env: Env) -> list[dict]:
    t_start = time.perf_counter()
    parts = tuple(args.parts)
    variants = tuple(args.variants)
    meta = environment(env.device)
    records: list[dict] = []
    if args.append and args.out and Path(args.out).exists():
        records, old = load([args.out])
        meta["runs"] = old[0].get("runs", [old[0]]) + [dict(meta)]
    fresh: list[dict] = []

    def over_budget() -> bool:
        return args.budget is not None and time.perf_counter() - t_start > args.budget

    def add(rec: dict) -> None:
        rec.setdefault("device", meta["device"])
        fresh.append(rec)
        records[:] = merge(records, [rec])
        save(args.out, records, meta)
        extra = ""
        if rec.get("status") == "ok" and rec.get("latency_ms") is not None:
            extra = f"{rec['latency_ms']:.2f} ms, first call {rec.get('first_call_s', 0):.1f} s"
            if rec.get("peak_gib") is not None:
                extra += f", peak {rec['peak_gib']:.2f} GiB"
            if rec.get("attnfuse"):
                extra += f", {_attention(rec)}"
        elif rec.get("status") != "ok":
            extra = rec.get("error", "")[:160]
        print(f"[{time.perf_counter() - t_start:6.0f} s] {rec['model']} {rec['part']} "
              f"{rec['case']} {rec['variant']}: {rec.get('status')} {extra}", flush=True)
        for why in (rec.get("attnfuse") or {}).get("why", [])[:2]:
            print(f"    why: {why[:400]}", flush=True)
        for k in rec.get("kernels", [])[:8]:
            print(f"    {k['us_per_call']:9.1f} us  x{k['count']:<4d} {k['name']}", flush=True)

    timing = Timing(warmup=args.warmup, reps=args.reps, seconds=args.rep_seconds,
                    profile=args.profile if env.device.type == "cuda" else 0)
    if env.device.type == "cpu":
        timing = Timing(warmup=0, reps=1, min_reps=1, seconds=0)
    for model in args.models:
        missing = _available(model)
        if missing:
            try:   # the cases' labels need no model library (Llama's need transformers)
                labels = [(c.part, c.label) for c in cases_of(model, env, parts)]
                if "compile" in parts:
                    labels.append(("compile", compile_case(model, env).label))
            except ImportError:
                labels = [(p, "-") for p in parts if p != "recompile"]
            for part, label in labels:
                for v in variants:
                    if (part == "train" and v in TRAIN_SKIP) or (part == "compile"
                                                                 and v not in COMPILERS):
                        continue
                    add(dict(model=model, part=part, case=label, variant=v, status=missing))
            continue
        cases = cases_of(model, env, parts)
        for case in cases:
            outputs: dict[str, torch.Tensor] = {}
            case_records: list[dict] = []
            keep: Optional[dict[str, Callable[[], Any]]] = {} if args.interleave else None
            for v in variants:
                if case.train and v in TRAIN_SKIP:
                    continue
                if over_budget():
                    rec = dict(model=case.model, part=case.part, case=case.label, variant=v,
                               n=case.n, batch=case.batch, unit=case.unit,
                               status="not run (budget)")
                else:
                    rec, out = run_variant(case, v, env, timing, keep)
                    if out is not None:
                        outputs[v] = out
                case_records.append(rec)
                add(rec)
            if keep:
                for rec in case_records:   # the sequential numbers stay in the JSON
                    if rec["variant"] in keep:
                        rec["seq_latency_ms"] = rec["latency_ms"]
                        rec["seq_spread_ms"] = rec["spread_ms"]
                try:
                    samples = interleaved(keep, env.device, args.interleave, timing)
                except Exception as e:  # noqa: BLE001
                    print(f"    interleaved timing failed: {_short(e)}", flush=True)
                    samples = {}
                for rec in case_records:
                    ms = samples.get(rec["variant"])
                    if ms:
                        rec.update(latency_ms=statistics.median(ms), spread_ms=[min(ms), max(ms)],
                                   reps=len(ms), timing="interleaved",
                                   throughput=case.items / (statistics.median(ms) / 1000))
                        print(f"    interleaved {rec['variant']}: {rec['latency_ms']:.2f} ms "
                              f"(sequential {rec['seq_latency_ms']:.2f}; rounds "
                              f"{min(ms):.2f}-{max(ms):.2f})", flush=True)
                keep.clear()
                cleanup(env.device)
            ref = next((v for v in ("sdpa", "eager", *variants) if v in outputs), None)
            for rec in case_records:
                if ref is not None and rec["variant"] in outputs:
                    rec["rel_err"] = relative_error(outputs[rec["variant"]], outputs[ref])
                    rec["ref"] = ref
            records[:] = merge(records, case_records)
            save(args.out, records, meta)
        if "compile" in parts and not (args.tiny and model != args.models[0]):
            # (--tiny: the first model only; the code path is the same for every model)
            for v in [c for c in COMPILERS if c in variants]:
                if over_budget():
                    add(dict(model=model, part="compile", case=compile_case(model, env).label,
                             variant=v, status="not run (budget)"))
                    continue
                timeout = args.child_timeout
                if args.budget is not None:   # a child started in budget ends near it
                    left = args.budget - (time.perf_counter() - t_start)
                    timeout = min(timeout, max(60.0, left + 60.0))
                add(run_compile(model, v, env, timeout))
        if "recompile" in parts and model == "llama":
            def case_at(n: int) -> Case:
                return compile_case("llama", Env(str(env.device), env.dtype, dataclasses.replace(
                    env.sizes, compile_length=n)))
            for v in [c for c in COMPILERS if c in variants]:
                for dynamic in (None, True):
                    if over_budget():
                        add(dict(model=model, part="recompile", case=f"dynamic={dynamic}",
                                 variant=v, dynamic=dynamic, status="not run (budget)"))
                        continue
                    add(run_recompile(case_at, v, env.sizes.recompile_lengths, dynamic, env))
    print(f"\n{len(fresh)} record(s) in {time.perf_counter() - t_start:.0f} s"
          + (f"; results in {args.out}" if args.out else ""), flush=True)
    return records


@contextlib.contextmanager
def serial_compiles(on: bool) -> Any:
    """Tiny graphs on CPU compile faster in-process than through a pool of compile workers."""
    if not on:
        yield
        return
    import torch._inductor.config as inductor_config
    old_threads, old_env = inductor_config.compile_threads, os.environ.get(
        "TORCHINDUCTOR_COMPILE_THREADS")
    inductor_config.compile_threads = 1
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"      # the compile part's children
    try:
        yield
    finally:
        inductor_config.compile_threads = old_threads
        if old_env is None:
            os.environ.pop("TORCHINDUCTOR_COMPILE_THREADS", None)
        else:
            os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = old_env


def _list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [w.strip() for w in text.split(",") if w.strip()]
        if items == ["all"]:
            return list(choices)
        bad = [w for w in items if w not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_list(MODELS), default=list(MODELS),
                   help=f"comma list of {', '.join(MODELS)} (default all)")
    p.add_argument("--parts", type=_list(PARTS), default=["prefill", "train"],
                   help=f"comma list of {', '.join(PARTS)}, or all (default prefill,train)")
    p.add_argument("--variants", type=_list(VARIANTS), default=list(DEFAULT_VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)} (default all but attnfuse_sdpa)")
    lengths = dict(type=_parse_lengths, default=None)
    p.add_argument("--lengths", **lengths, help="Llama prefill lengths (2k,8k,32k)")
    p.add_argument("--train-length", **lengths, help="Llama training length (4k)")
    p.add_argument("--compile-length", **lengths, help="Llama compile part length (2k)")
    p.add_argument("--recompile-lengths", **lengths,
                   help="Llama recompile part: compile at the first, call at the rest (2k,3k,4k)")
    p.add_argument("--resolutions", **lengths, help="ViT image sizes (224,448)")
    p.add_argument("--llama-batch", type=int, default=None, help="Llama sequences per call (1)")
    p.add_argument("--vit-batch", type=int, default=None, help="ViT batch (32)")
    p.add_argument("--diffusion-batch", type=int, default=None, help="DiT/UNet batch (8)")
    p.add_argument("--latent", type=int, default=None, help="DiT/UNet latent side (64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true",
                   help="tiny configs: checks the script (any device)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (2)")
    p.add_argument("--reps", type=int, default=10, help="most timed calls per variant (10)")
    p.add_argument("--rep-seconds", type=float, default=3.0,
                   help="stop timing a variant after this many seconds (after 3 calls)")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="also time all variants of a case in ROUNDS alternating rounds (all "
                        "kept in memory at once); latency = their median")
    p.add_argument("--profile", type=int, default=0, metavar="CALLS",
                   help="CUDA: also record each variant's top kernels over CALLS calls")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no new variant is started")
    p.add_argument("--child-timeout", type=float, default=480.0,
                   help="compile part: seconds one child process may take (480)")
    p.add_argument("--out",
                   help="JSON of every record (e.g. benchmarks/results/e2e-h100-DATE.json)")
    p.add_argument("--append", action="store_true", help="merge into an existing --out file")
    p.add_argument("--table", nargs="+", metavar="JSON",
                   help="print tables of saved results only (with --out: save them merged)")
    p.add_argument("--plot", action="store_true", help="write bar charts (needs matplotlib)")
    p.add_argument("--plot-dir", default=str(ROOT / "benchmarks" / "plots"))
    p.add_argument("--attnfuse-options", type=json.loads, default={},
                   help='more keyword arguments of attnfuse.optimize, as JSON, e.g. '
                        '\'{"mode": "reduce-overhead"}\' or \'{"kernel": "flash"}\'')
    p.add_argument("--child-compile", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ATTNFUSE_OPTIONS.clear()
    ATTNFUSE_OPTIONS.update(args.attnfuse_options)

    if args.child_compile:
        spec = json.loads(args.child_compile)
        try:
            result = child_compile(spec)
        except Exception as e:  # noqa: BLE001
            result = dict(error=_short(e), traceback=_frames(e), oom=is_oom(e))
        print(CHILD_TAG + json.dumps(result, default=str), flush=True)
        return

    if args.table:
        records, metas = load(args.table)
        if args.out:   # the merged records, later files winning
            save(args.out, records, dict(metas[-1], runs=[r for m in metas
                                                          for r in m.get("runs", [m])]))
        print_tables(records, metas)
        if args.plot:
            for path in plot(records, args.plot_dir):
                print(f"wrote {path}")
        return

    sizes = Sizes(**(TINY if args.tiny else {}), tiny=args.tiny)
    for name in ("lengths", "resolutions", "recompile_lengths"):
        if getattr(args, name):
            setattr(sizes, name, getattr(args, name))
    for name in ("train_length", "compile_length"):
        if getattr(args, name):
            setattr(sizes, name, getattr(args, name)[0])
    for name in ("llama_batch", "vit_batch", "diffusion_batch", "latent"):
        if getattr(args, name):
            setattr(sizes, name, getattr(args, name))
    if args.tiny and args.parts == ["prefill", "train"]:
        args.parts = list(PARTS)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = Env(args.device, dtype, sizes)
    with serial_compiles(args.tiny and device.type == "cpu"):
        records = run(args, env)
    meta = environment(device)
    print_tables(records, [meta])
    if args.plot:
        for path in plot(records, args.plot_dir):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
