"""The model zoo: real library models (tiny configs, random weights) through ``attnfuse.optimize``.

Each entry builds one model from a tiny, seeded config (no downloads) with example inputs, padded
where the model takes an attention mask. :func:`run_entry` then

* counts the model's attention computations, independently of attnfuse's matcher: one eager run
  under a :class:`~torch.overrides.TorchFunctionMode` that counts calls of softmax (``torch.softmax``,
  ``F.softmax``, ``Tensor.softmax``, ``torch.special.softmax``, ``torch._softmax``),
  ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward`` (one attention; the mode
  is off inside it), ``torch._native_multi_head_attention`` and
  ``torch._transformer_encoder_layer_fwd``. Rule ``"all"`` (the default, used by every entry):
  every such call is one attention. The same run also counts the calls made inside modules whose
  class name contains ``Attention``/``Attn``; a difference between the two is reported in
  ``ZooResult.notes`` (rule ``"attention"`` would count only those);
* compiles it with ``attnfuse.optimize(model, inner="eager", keep_sdpa=False)`` (existing SDPA calls
  are rewritten too) and reads the report, aggregated over every Dynamo graph: ``found`` sites,
  ``fused`` sites (kernel not None and not ``"sdpa"``);
* checks the main output tensor with FlashAttention's rule against an fp64 deepcopy of the model
  and the eager fp32 model (:func:`attnfuse.testing.error_ratio`), as ``tests/helpers.py`` does;
* in ``"train"`` mode (``model.train()``, dropout probabilities 0 except where an entry keeps
  attention dropout on purpose): the same, plus the gradients of every parameter and floating
  input for one seeded cotangent, judged as one concatenated vector (``magnitude_floor=True``).

An entry passes when found == fused == ground truth and both checks hold.

What the two sides see for ``nn.MultiheadAttention``: the counting mode makes
``has_torch_function`` true, so eagerly MHA (and ``TransformerEncoderLayer``) take the slow path
and one ``F.multi_head_attention_forward`` call is counted per attention. Dynamo's graph holds
``F.multi_head_attention_forward`` as a single node, except ``TransformerEncoderLayer`` in eval
under ``no_grad``, whose graph holds the fast path ``torch._transformer_encoder_layer_fwd``; both are
one attention each, as counted.
``python -m attnfuse.zoo [--models substr,...] [--train] [--markdown] [--verbose]`` prints a table.
Libraries (transformers, timm, torchvision, diffusers) are imported inside the builders only; an
entry whose library is missing is reported as skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch.overrides import TorchFunctionMode

from . import backend as _backend
from .report import Report
from .testing import ErrorRatio, error_ratio, gradient_error_ratio

Inputs = Union[tuple, dict]

BATCH, SEQ, PAD, VOCAB, SEED = 2, 13, 4, 100, 0


class ZooSkip(Exception):
    """Raised by a builder when the installed library cannot build the entry (reason given)."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    library: str                                   # what the builder imports ("torch" = nothing)
    build: Callable[[], tuple[torch.nn.Module, Inputs]]
    output: Callable[[Any], torch.Tensor]          # the model output's main tensor
    count: str = "all"                             # ground-truth rule: "all" or "attention"
    fast_train: bool = False                       # in the default (not slow) training test subset
    train_dropout: bool = False                    # attention dropout > 0 in train mode: every
                                                   # site must be found and left unfused for it
    modes: tuple[str, ...] = ("eval", "train")
    note: str = ""


@dataclass
class ZooResult:
    name: str
    library: str
    mode: str                                      # "eval" or "train"
    status: str = "ok"                             # "ok", "FAIL", "skip", "error"
    found: int = 0
    fused: int = 0
    truth: int = 0
    truth_calls: dict = field(default_factory=dict)  # {"softmax": n, "sdpa": n, ...}
    truth_scoped: int = 0                          # of those, calls inside *Attention* modules
    graphs: int = 0
    output: Optional[ErrorRatio] = None
    grad: Optional[ErrorRatio] = None
    reasons: list[str] = field(default_factory=list)   # one per site left unfused
    chains: list[str] = field(default_factory=list)    # op chains of unfused / unfound sites
    error: str = ""
    seconds: float = 0.0                           # compile + first run of the optimized model
    rewrite_seconds: float = 0.0                   # inside attnfuse's rewrite_attention
    notes: list[str] = field(default_factory=list)
    train_dropout_expected: bool = False           # the entry's attention dropout is active
    degenerate: bool = False                       # both batch rows give the same output
    report: Optional[Report] = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (f"ZooResult({self.name!r}, {self.mode!r}, {self.status!r}, found={self.found}, "
                f"fused={self.fused}, truth={self.truth})")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @staticmethod
    def ratio(r: Optional[ErrorRatio]) -> Optional[float]:
        if r is None:
            return None
        bound = 2.0 * r.baseline + r.floor
        return r.err / bound if bound > 0 else (0.0 if r.err == 0 else math.inf)

    @property
    def output_ratio(self) -> Optional[float]:
        return self.ratio(self.output)

    @property
    def grad_ratio(self) -> Optional[float]:
        return self.ratio(self.grad)

    def failures(self) -> list[str]:
        """What does not meet the requirement, most important first."""
        if self.status == "skip":
            return []
        if self.error:
            return [self.error]
        out = []
        if self.found != self.truth:
            out.append(f"found {self.found} of {self.truth} attention computations")
        if self.train_dropout_expected:
            if self.fused:
                out.append(f"{self.fused} site(s) fused although attention dropout is active")
            bad = [r for r in self.reasons if "dropout" not in r]
            if bad:
                out.append(f"unfused for a reason other than dropout: {bad[0]}")
        elif self.fused != self.found:
            out.append(f"{self.found - self.fused} of {self.found} sites unfused: "
                       f"{self.reasons[0] if self.reasons else '?'}")
        for r in (self.output, self.grad):
            if r is not None and not r.ok:
                out.append(str(r))
        if self.degenerate:
            out.append("the output is identical for both batch rows: it cannot show attention errors")
        return out


    def summary(self) -> str:
        head = (f"{self.name} [{self.mode}]: {self.status}; found {self.found}, fused {self.fused}, "
                f"truth {self.truth} {dict(self.truth_calls)}, {self.graphs} graph(s)")
        lines = [head] + [f"  - {f}" for f in self.failures()]
        if self.status == "skip":
            lines.append(f"  - skipped: {self.error}")
        lines += [f"  reason: {r}" for r in dict.fromkeys(self.reasons)]
        lines += [f"  chain: {c}" for c in self.chains]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- ground truth -----------------------------------------------------------------------------------

_SOFTMAX_NAMES = {"softmax", "_softmax", "special_softmax"}
_SINGLE_NAMES = {"scaled_dot_product_attention": "sdpa",
                 "multi_head_attention_forward": "multi_head_attention_forward",
                 "_native_multi_head_attention": "_native_multi_head_attention",
                 "_transformer_encoder_layer_fwd": "_transformer_encoder_layer_fwd"}


def _call_kind(func: Any) -> Optional[str]:
    name = getattr(func, "__name__", "")
    if name in _SOFTMAX_NAMES:
        return "softmax"
    return _SINGLE_NAMES.get(name)


def _is_attention_module(m: torch.nn.Module) -> bool:
    n = type(m).__name__
    return "Attention" in n or "Attn" in n


class AttentionCounter(TorchFunctionMode):
    """Counts attention computations (see the module docstring) while active.

    ``calls``: every call; ``scoped``: only calls made inside a module whose class name contains
    ``Attention``/``Attn`` (tracked with forward hooks on ``model``, removed on exit). A composite
    call (``multi_head_attention_forward``) runs with the mode off, so its inner softmax/SDPA is
    not counted a second time.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None) -> None:
        super().__init__()
        self.calls: Counter = Counter()
        self.scoped: Counter = Counter()
        self._depth = 0
        self._model = model
        self._handles: list = []

    def __enter__(self):
        if self._model is not None:
            for m in self._model.modules():
                if _is_attention_module(m):
                    self._handles.append(m.register_forward_pre_hook(self._pre))
                    self._handles.append(m.register_forward_hook(self._post, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def _pre(self, *_: Any) -> None:
        self._depth += 1

    def _post(self, *_: Any) -> None:
        self._depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _call_kind(func)
        if kind is not None:
            self.calls[kind] += 1
            if self._depth > 0:
                self.scoped[kind] += 1
        return func(*args, **(kwargs or {}))


# -- inputs -----------------------------------------------------------------------------------------

def _gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def _ids(n: int = SEQ, offset: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, n), generator=_gen(offset))


def _mask(n: int = SEQ) -> torch.Tensor:
    # Right padding in the second row. (Left padding fully masks the first rows of a causal model;
    # HF's finfo.min mask then overflows to -inf in the fp64 oracle and gives NaN.)
    m = torch.ones(BATCH, n, dtype=torch.long)
    m[1, -PAD:] = 0
    return m


def _randn(*shape: int, offset: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(100 + offset))


def _map(inputs: Inputs, fn: Callable[[torch.Tensor], Any]) -> Inputs:
    if isinstance(inputs, dict):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return tuple(fn(v) if isinstance(v, torch.Tensor) else v for v in inputs)


def _values(inputs: Inputs) -> list:
    return list(inputs.values()) if isinstance(inputs, dict) else list(inputs)


def _call(fn: Callable, inputs: Inputs) -> Any:
    return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


# -- outputs ----------------------------------------------------------------------------------------

def _last_hidden(o: Any) -> torch.Tensor:
    return o.last_hidden_state


def _sample(o: Any) -> torch.Tensor:
    return o.sample


def _itself(o: Any) -> torch.Tensor:
    return o


def _first(o: Any) -> torch.Tensor:
    return o[0]


def _clip_embeds(o: Any) -> torch.Tensor:
    return torch.cat([o.text_embeds.flatten(), o.image_embeds.flatten()])


# -- transformers -----------------------------------------------------------------------------------

_NO_DROP = dict(attention_dropout=0.0)
_LM = dict(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
           max_position_embeddings=64, use_cache=False, **_NO_DROP)

# base name -> (config class, model class, config kwargs, input kind, output, note)
_HF: dict[str, tuple] = {
    "gpt2": ("GPT2Config", "GPT2Model",
             dict(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, use_cache=False,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
             "text", _last_hidden, ""),
    "bert": ("BertConfig", "BertModel",
             dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                  vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
             "text", _last_hidden, ""),
    "llama": ("LlamaConfig", "LlamaModel", dict(_LM, num_attention_heads=4, num_key_value_heads=2),
              "text", _last_hidden, "GQA 4 q heads / 2 kv heads"),
    "mistral": ("MistralConfig", "MistralModel",
                dict(_LM, num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
                "text", _last_hidden, f"GQA; sliding_window=5 < seq {SEQ}"),
    "qwen2": ("Qwen2Config", "Qwen2Model", dict(_LM, num_attention_heads=4, num_key_value_heads=2),
              "text", _last_hidden, "GQA"),
    "gemma2": ("Gemma2Config", "Gemma2Model",
               dict(_LM, num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=6),
               "text", _last_hidden,
               "attn_logit_softcapping=50 (default); layer 0 sliding (window 6 < seq), layer 1 full"),
    "t5": ("T5Config", "T5Model",
           dict(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=8, use_cache=False,
                decoder_start_token_id=0, pad_token_id=0),
           "seq2seq", _last_hidden, "relative position bias added to the scores; no 1/sqrt(d)"),
    "bart": ("BartConfig", "BartModel",
             dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, use_cache=False),
             "seq2seq", _last_hidden, ""),
    "whisper": ("WhisperConfig", "WhisperModel",
                dict(vocab_size=VOCAB, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=2, decoder_attention_heads=2, d_model=32,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=15,
                     max_target_positions=32, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, use_cache=False, pad_token_id=0,
                     decoder_start_token_id=1, bos_token_id=1, eos_token_id=2),
                "whisper", _last_hidden, "input_features [2, 8, 30] -> 15 encoder positions"),
    "vit": ("ViTConfig", "ViTModel",
            dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0),
            "image", _last_hidden, "17 tokens (16 patches + CLS)"),
    "clip": ("CLIPConfig", "CLIPModel",
             dict(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   max_position_embeddings=32, attention_dropout=0.0,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2),
                  vision_config=dict(image_size=32, patch_size=8, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, attention_dropout=0.0),
                  projection_dim=16),
             "clip", _clip_embeds, "text (causal + padding) and vision towers; output: both embeddings"),
    "opt": ("OPTConfig", "OPTModel",
            dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                 num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                 dropout=0.0, attention_dropout=0.0, use_cache=False),
            "text", _last_hidden, ""),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXModel",
                 dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, attention_dropout=0.0,
                      hidden_dropout=0.0, use_cache=False),
                 "text", _last_hidden, ""),
    "bloom": ("BloomConfig", "BloomModel",
              dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=2, hidden_dropout=0.0,
                   attention_dropout=0.0, use_cache=False),
              "text", _last_hidden, "ALiBi"),
    "falcon-alibi": ("FalconConfig", "FalconModel",
                     dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, alibi=True, multi_query=True,
                          new_decoder_architecture=False, parallel_attn=True, bias=False,
                          hidden_dropout=0.0, attention_dropout=0.0, use_cache=False),
                     "text", _last_hidden, "ALiBi added before the scale, multi-query K/V"),
}


def _hf_inputs(kind: str) -> dict:
    if kind == "text":
        return dict(input_ids=_ids(), attention_mask=_mask())
    if kind == "seq2seq":
        return dict(input_ids=_ids(), attention_mask=_mask(), decoder_input_ids=_ids(7, offset=1))
    if kind == "whisper":
        return dict(input_features=_randn(BATCH, 8, 30), decoder_input_ids=_ids(7, offset=1))
    if kind == "image":
        return dict(pixel_values=_randn(BATCH, 3, 32, 32))
    if kind == "clip":
        return dict(input_ids=_ids(), attention_mask=_mask(), pixel_values=_randn(BATCH, 3, 32, 32))
    raise ValueError(kind)


def _build_hf(base: str, impl: str, overrides: Optional[dict] = None) -> tuple[torch.nn.Module, Inputs]:
    import transformers

    cfg_name, model_name, kwargs, kind, _, _ = _HF[base]
    cfg = getattr(transformers, cfg_name)(**{**kwargs, **(overrides or {})})
    cls = getattr(transformers, model_name)
    if impl == "sdpa" and not getattr(cls, "_supports_sdpa", True):
        raise ZooSkip(f"transformers {transformers.__version__}: {model_name} has no SDPA "
                      f"attention (_supports_sdpa=False)")
    torch.manual_seed(SEED)
    model = cls._from_config(cfg, attn_implementation=impl)
    if model.config._attn_implementation != impl:
        raise ZooSkip(f"{model_name} runs {model.config._attn_implementation!r}, not {impl!r}")
    return model, _hf_inputs(kind)


# -- timm -------------------------------------------------------------------------------------------

_TIMM = {
    "vit": ("vit_tiny_patch16_224",
            dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=100)),
    "deit": ("deit_tiny_distilled_patch16_224",
             dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=100)),
    "beit": ("beit_base_patch16_224",
             dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=100,
                  use_rel_pos_bias=True)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
                  num_heads=(2, 4), num_classes=100)),
}


def _build_timm(base: str, fused: bool) -> tuple[torch.nn.Module, Inputs]:
    import timm

    arch, kwargs = _TIMM[base]
    torch.manual_seed(SEED)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    flags = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused        # per module: timm.layers.set_fused_attn is process-global
            flags += 1
    if not flags:
        raise ZooSkip(f"timm {timm.__version__}: {arch} has no fused_attn attribute")
    _no_dropout(model)
    return model, (_randn(BATCH, 3, 32, 32),)


# -- torchvision, torch.nn --------------------------------------------------------------------------

def _build_torchvision_vit() -> tuple[torch.nn.Module, Inputs]:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(SEED)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                              mlp_dim=64, num_classes=100)
    # torchvision zero-initialises the head: the logits would not depend on attention at all.
    torch.nn.init.normal_(model.heads.head.weight, std=0.2)
    return model, (_randn(BATCH, 3, 32, 32),)


def _build_encoder(padding: bool) -> tuple[torch.nn.Module, Inputs]:
    torch.manual_seed(SEED)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, dropout=0.0,
                                             batch_first=True)
    # enable_nested_tensor=False: with nested tensors the eager fast path zeroes padded rows,
    # which no traced graph reproduces; the comparison would measure that, not attention.
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = _randn(BATCH, SEQ, 32)
    if not padding:
        return model, (x,)
    kpm = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    kpm[1, -PAD:] = True                 # True = padding
    return model, dict(src=x, src_key_padding_mask=kpm)


class _MHA(torch.nn.Module):
    """``nn.MultiheadAttention`` called directly, as user code does.

    ``"self"``: ``mha(x, x, x)[0]`` (need_weights=True by default, weights dropped);
    ``"self-padded"``: need_weights=False with a key_padding_mask (eligible for the eval fast path,
    ``torch._native_multi_head_attention``); ``"cross"``: 7 queries on 13 keys, key_padding_mask.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.attn = torch.nn.MultiheadAttention(32, 2, batch_first=True)

    def forward(self, x: torch.Tensor, mem: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.kind == "self":
            return self.attn(x, x, x)[0]
        if self.kind == "self-padded":
            return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.attn(x, mem, mem, key_padding_mask=key_padding_mask, need_weights=False)[0]


def _build_mha(kind: str) -> tuple[torch.nn.Module, Inputs]:
    torch.manual_seed(SEED)
    model = _MHA(kind)
    x = _randn(BATCH, 7 if kind == "cross" else SEQ, 32)
    if kind == "self":
        return model, (x,)
    kpm = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    kpm[1, -PAD:] = True
    return model, (x, _randn(BATCH, SEQ, 32, offset=1) if kind == "cross" else None, kpm)


# -- diffusers --------------------------------------------------------------------------------------

def _set_processor(model: torch.nn.Module, sdpa: bool) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
            n += 1
    if not n:
        raise ZooSkip("no diffusers Attention module found")


def _build_unet(sdpa: bool) -> tuple[torch.nn.Module, Inputs]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    _set_processor(model, sdpa)
    return model, dict(sample=_randn(BATCH, 4, 8, 8), timestep=torch.tensor([10, 500]),
                       encoder_hidden_states=_randn(BATCH, 7, 32, offset=1))


def _build_dit(sdpa: bool) -> tuple[torch.nn.Module, Inputs]:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(SEED)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  num_layers=2, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=1000)
    _set_processor(model, sdpa)
    return model, dict(hidden_states=_randn(BATCH, 4, 8, 8), timestep=torch.tensor([10, 500]),
                       class_labels=torch.tensor([1, 7]))


# -- the registry -----------------------------------------------------------------------------------

def _entries() -> list[ZooEntry]:
    out: list[ZooEntry] = []
    # One training entry per distinct attention spelling runs in the default test run.
    fast_hf = {"gpt2-eager", "llama-eager", "t5-eager", "bloom-eager", "gemma2-eager", "clip-sdpa"}
    fast = {"timm-swin-eager", "timm-vit-fused", "torchvision-vit", "torch-transformer-encoder-padded",
            "torch-mha", "diffusers-dit-classic"}
    for base, (_, _, _, _, output, note) in _HF.items():
        for impl in ("eager", "sdpa"):
            name = f"{base}-{impl}"
            out.append(ZooEntry(name, "transformers", functools.partial(_build_hf, base, impl), output,
                                fast_train=name in fast_hf, note=note))
    out.append(ZooEntry(
        "bert-eager-attn-dropout", "transformers",
        functools.partial(_build_hf, "bert", "eager", {"attention_probs_dropout_prob": 0.1}),
        _last_hidden, fast_train=True, train_dropout=True, modes=("train",),
        note="attention_probs_dropout_prob=0.1: training must leave every site unfused, with a reason"))
    for base in _TIMM:
        for fused in (False, True):
            name = f"timm-{base}-{'fused' if fused else 'eager'}"
            out.append(ZooEntry(name, "timm", functools.partial(_build_timm, base, fused), _itself,
                                fast_train=name in fast))
    out.append(ZooEntry("torchvision-vit", "torchvision", _build_torchvision_vit, _itself,
                        fast_train=True, note="nn.MultiheadAttention(need_weights=False) inside"))
    out.append(ZooEntry("torch-transformer-encoder", "torch", functools.partial(_build_encoder, False),
                        _itself))
    out.append(ZooEntry("torch-transformer-encoder-padded", "torch",
                        functools.partial(_build_encoder, True), _itself, fast_train=True,
                        note="src_key_padding_mask; enable_nested_tensor=False"))
    out.append(ZooEntry("torch-mha", "torch", functools.partial(_build_mha, "self"), _itself,
                        fast_train=True, note="mha(x, x, x)[0]: need_weights=True, weights dropped"))
    out.append(ZooEntry("torch-mha-padded", "torch", functools.partial(_build_mha, "self-padded"),
                        _itself, note="self attention, key_padding_mask, need_weights=False"))
    out.append(ZooEntry("torch-mha-cross-padded", "torch", functools.partial(_build_mha, "cross"),
                        _itself, note="cross attention 7x13, key_padding_mask, need_weights=False"))
    for sdpa in (False, True):
        suffix = "sdpa" if sdpa else "classic"
        out.append(ZooEntry(f"diffusers-unet-{suffix}", "diffusers",
                            functools.partial(_build_unet, sdpa), _sample,
                            note="AttnProcessor2_0" if sdpa else "AttnProcessor (baddbmm scores)"))
        out.append(ZooEntry(f"diffusers-dit-{suffix}", "diffusers", functools.partial(_build_dit, sdpa),
                            _sample, fast_train=f"diffusers-dit-{suffix}" in fast,
                            note="AttnProcessor2_0" if sdpa else "AttnProcessor"))
    return out


ZOO: list[ZooEntry] = _entries()
BY_NAME: dict[str, ZooEntry] = {e.name: e for e in ZOO}


def select(names: Optional[Sequence[str]] = None) -> list[ZooEntry]:
    """Entries whose name equals, or contains, one of ``names`` (all when None)."""
    if not names:
        return list(ZOO)
    exact = [BY_NAME[n] for n in names if n in BY_NAME]
    subs = [n for n in names if n not in BY_NAME]
    return [e for e in ZOO if e in exact or any(s in e.name for s in subs)]


# -- running ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _timed_rewrites(acc: list[float]) -> Iterator[None]:
    """Time attnfuse's rewrite_attention (the backend looks it up at call time)."""
    original = _backend.rewrite_attention

    def timed(*args: Any, **kwargs: Any) -> Report:
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            acc.append(time.perf_counter() - t)

    _backend.rewrite_attention = timed
    try:
        yield
    finally:
        _backend.rewrite_attention = original


def _node_label(n: torch.fx.Node) -> str:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
    consts = [repr(a) if not isinstance(a, float) else f"{a:.4g}" for a in n.args[1:]
              if isinstance(a, (int, float)) and not isinstance(a, bool)]
    consts += [f"{k}={v!r}" for k, v in n.kwargs.items() if isinstance(v, (int, float, bool, str))
               or v is None]
    return f"{name}({', '.join(consts)})" if consts else str(name)


_PRODUCTS = ("matmul", "bmm", "baddbmm", "einsum", "__matmul__", "mm", "addmm")


def _is_product(n: torch.fx.Node) -> bool:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
    return str(name) in _PRODUCTS


def op_chain(node: torch.fx.Node, limit: int = 14) -> str:
    """The ops from the Q·Kᵀ product through ``node`` (a softmax or SDPA) to the P·V product."""
    back, cur = [], node
    for _ in range(limit):
        args = [a for a in cur.args if isinstance(a, torch.fx.Node)]
        if not args or _is_product(cur) and cur is not node:
            break
        cur = args[0]
        if cur.op != "call_function" and cur.op != "call_method":
            break
        back.append(cur)
        if _is_product(cur):
            break
    fwd, cur = [], node
    for _ in range(limit):
        if len(cur.users) != 1:
            if cur.users:
                fwd.append("{" + ", ".join(_node_label(u) for u in cur.users) + "}")
            break
        (cur,) = cur.users
        if cur.op == "output":
            fwd.append("output")
            break
        fwd.append(_node_label(cur))
        if _is_product(cur):
            break
    users = f"[{len(node.users)} users] " if len(node.users) > 1 else ""
    return " -> ".join([_node_label(n) for n in reversed(back)] + [f"*{_node_label(node)}*{users}"]
                       + fwd)


def _site_nodes(report: Report) -> dict[int, torch.fx.Node]:
    """Site index -> its node in ``report.before`` (sites are listed softmaxes first, then SDPA)."""
    from .passes import canonicalize as C
    from .passes.match import softmax_nodes

    out, by_graph = {}, {}
    for s in report.sites:
        by_graph.setdefault(s.graph, []).append(s)
    for g, sites in by_graph.items():
        gm = report.before[g]
        nodes = softmax_nodes(gm) + [n for n in gm.graph.nodes if C.is_sdpa(n)]
        for s, n in zip(sites, nodes):
            out[s.index] = n
    return out


_SUSPECTS = ("_native_multi_head_attention", "_transformer_encoder_layer_fwd",
             "multi_head_attention_forward", "einsum", "baddbmm", "log_softmax")


def _diagnose(res: ZooResult, report: Report) -> None:
    nodes = _site_nodes(report)
    seen = set()
    for s in report.sites:
        if s.kernel is None or s.kernel == "sdpa":
            n = nodes.get(s.index)
            chain = f"[{s.module_path or '?'} {s.location}] " + (op_chain(n) if n is not None else "?")
            key = chain.split("] ", 1)[1]
            if key not in seen:
                seen.add(key)
                res.chains.append(chain)
    if res.found < res.truth:
        for g, gm in enumerate(report.before):
            for n in gm.graph.nodes:
                if n.op in ("call_function", "call_method") and any(
                        s in str(getattr(n.target, "__name__", n.target)) for s in _SUSPECTS):
                    res.chains.append(f"graph {g} has {_node_label(n)} (not a softmax/SDPA site)")
        if len(report.before) > 1:
            res.notes.append(f"{len(report.before)} Dynamo graphs (graph breaks)")


def _leaves(inputs: Inputs, grad: bool) -> tuple[Inputs, list[torch.Tensor]]:
    fresh = _map(inputs, lambda t: t.detach().clone().requires_grad_(grad)
                 if t.is_floating_point() else t)
    return fresh, [t for t in _values(fresh) if isinstance(t, torch.Tensor) and t.requires_grad]


def _grad_ratio(model: torch.nn.Module, ref_model: torch.nn.Module, want: torch.Tensor,
                got: torch.Tensor, ref: torch.Tensor, leaves: list[torch.Tensor],
                ref_leaves: list[torch.Tensor]) -> ErrorRatio:
    """All parameters' and input leaves' gradients under one seeded cotangent."""
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in ref_model.parameters() if p.requires_grad]
    cot = torch.randn(want.shape, generator=_gen(7), dtype=want.dtype)
    return gradient_error_ratio(got, want, ref, params + leaves, ref_params + ref_leaves, cot)


def _run(entry: ZooEntry, mode: str, res: ZooResult) -> None:
    import attnfuse

    train = mode == "train"
    model, inputs = entry.build()
    model.train(train)
    grad_ctx = contextlib.nullcontext if train else torch.no_grad

    # Ground truth: one eager run under the counting mode.
    counter = AttentionCounter(model)
    with grad_ctx(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        with counter:
            _call(model, inputs)
    res.truth_calls = dict(counter.calls)
    all_calls, scoped = sum(counter.calls.values()), sum(counter.scoped.values())
    res.truth = all_calls if entry.count == "all" else scoped
    res.truth_scoped = scoped
    if all_calls != scoped:
        res.notes.append(f"{all_calls} softmax/SDPA calls in all, {scoped} inside *Attention* "
                         f"modules; rule {entry.count!r}")

    leaves_in, leaves = _leaves(inputs, train)
    with grad_ctx(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        want = entry.output(_call(model, leaves_in))

    rewrites: list[float] = []
    with _timed_rewrites(rewrites), grad_ctx(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        t0 = time.perf_counter()
        fast = attnfuse.optimize(model, inner="eager", keep_sdpa=False)
        got = entry.output(_call(fast, leaves_in))
        res.seconds = time.perf_counter() - t0
    res.rewrite_seconds = sum(rewrites)
    report: Report = fast.attnfuse_report
    res.report = report
    res.graphs = len(report.before)
    res.found = len(report.sites)
    res.fused = sum(1 for s in report.sites if s.kernel not in (None, "sdpa"))
    res.reasons = [s.reason for s in report.sites if s.kernel in (None, "sdpa")]

    ref_model = copy.deepcopy(model).double()
    ref_in, ref_leaves = _leaves(_map(inputs, lambda t: t.double() if t.is_floating_point() else t),
                                 train)
    with grad_ctx(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        ref = entry.output(_call(ref_model, ref_in))
    res.output = error_ratio("output", got, ref, want)
    if want.dim() and want.shape[0] == BATCH and torch.equal(want[0], want[1]):
        res.degenerate = True       # e.g. a zero-initialised head: the check would see nothing
    if train:
        res.grad = _grad_ratio(model, ref_model, want, got, ref, leaves, ref_leaves)
    _diagnose(res, report)


def run_entry(entry: Union[ZooEntry, str], mode: str = "eval", *, catch: bool = True) -> ZooResult:
    """Build, count, optimize and check one entry in ``mode`` ("eval" or "train").

    ``catch=False`` lets an exception from the compile or the run propagate (the tests want the
    traceback); a missing library or an unsupported configuration is always a "skip".
    """
    if isinstance(entry, str):
        entry = BY_NAME[entry]
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    res = ZooResult(entry.name, entry.library, mode,
                    train_dropout_expected=entry.train_dropout and mode == "train")
    if entry.note:
        res.notes.append(entry.note)
    if mode not in entry.modes:
        res.status, res.error = "skip", f"{entry.name} runs only in {entry.modes}"
        return res
    torch._dynamo.reset()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run(entry, mode, res)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == entry.library:
            res.status, res.error = "skip", f"{entry.library} is not installed"
            return res
        if not catch:
            raise
        res.status, res.error = "error", f"{type(e).__name__}: {e}"
    except ZooSkip as e:
        res.status, res.error = "skip", str(e)
        return res
    except Exception as e:  # noqa: BLE001 - reported per entry
        if not catch:
            raise
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
        first = str(e).splitlines()[0] if str(e) else ""
        res.status, res.error = "error", f"{type(e).__name__}: {first}{where}"
    finally:
        torch._dynamo.reset()
    if res.status == "ok" and res.failures():
        res.status = "FAIL"
    return res


def run_zoo(names: Optional[Sequence[str]] = None, train: bool = False,
            progress: Optional[Callable[[ZooResult], None]] = None) -> list[ZooResult]:
    """Run the selected entries in eval mode, and also in train mode with ``train=True``."""
    results = []
    for entry in select(names):
        for mode in ("eval", "train") if train else ("eval",):
            if mode not in entry.modes:
                continue
            r = run_entry(entry, mode)
            results.append(r)
            if progress is not None:
                progress(r)
    return results


# -- the table --------------------------------------------------------------------------------------

def _fmt_ratio(x: Optional[float]) -> str:
    return "" if x is None else ("inf" if math.isinf(x) else f"{x:.3f}")


def _status(r: ZooResult) -> str:
    if r.status == "ok":
        return "ok"
    if r.status == "skip":
        return f"skip: {r.error}"
    fails = r.failures()
    return f"{r.status}: {fails[0] if fails else r.error}"


def _rows(results: Sequence[ZooResult], train: bool) -> tuple[list[str], list[list[str]]]:
    head = ["model", "mode", "found", "fused", "truth", "out err", "grad err", "graphs", "s",
            "rewrite s", "status"]
    if not train:
        head.remove("mode")
        head.remove("grad err")
    rows = []
    for r in results:
        row = {"model": r.name, "mode": r.mode, "found": str(r.found), "fused": str(r.fused),
               "truth": str(r.truth), "out err": _fmt_ratio(r.output_ratio),
               "grad err": _fmt_ratio(r.grad_ratio), "graphs": str(r.graphs),
               "s": f"{r.seconds:.1f}", "rewrite s": f"{r.rewrite_seconds:.2f}", "status": _status(r)}
        if r.status == "skip":
            row.update({k: "" for k in ("found", "fused", "truth", "graphs", "s", "rewrite s")})
        rows.append([row[h] for h in head])
    return head, rows


def totals(results: Sequence[ZooResult]) -> str:
    run = [r for r in results if r.status != "skip"]
    c = Counter(r.status for r in results)
    return (f"{c['ok']} ok, {c['FAIL']} FAIL, {c['error']} error, {c['skip']} skipped of "
            f"{len(results)}; sites: {sum(r.fused for r in run)} fused / {sum(r.found for r in run)} "
            f"found / {sum(r.truth for r in run)} true; "
            f"compile+run {sum(r.seconds for r in run):.1f} s, "
            f"rewrite {sum(r.rewrite_seconds for r in run):.2f} s")


def markdown(results: Sequence[ZooResult], train: bool = False) -> str:
    head, rows = _rows(results, train)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines + ["", totals(results)])


def plain(results: Sequence[ZooResult], train: bool = False) -> str:
    head, rows = _rows(results, train)
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head) - 1)]
    out = []
    for row in [head] + rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(out + ["", totals(results)])


def _print_rich(results: Sequence[ZooResult], train: bool) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    head, rows = _rows(results, train)
    table = Table(title=f"attnfuse zoo (torch {torch.__version__})")
    for h in head:
        left = h in ("model", "mode", "status")
        table.add_column(h, overflow="fold", justify="left" if left else "right")
    for r, row in zip(results, rows):
        style = {"ok": "green", "FAIL": "red", "error": "red", "skip": "dim"}[r.status]
        table.add_row(*row[:-1], f"[{style}]{row[-1]}[/{style}]" if row[-1] else "")
    console = Console(width=None if sys.stdout.isatty() else 240)
    console.print(table)
    console.print(totals(results))
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnfuse.zoo", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="", help="comma-separated names or substrings (default: all)")
    p.add_argument("--train", action="store_true", help="also run training mode (gradients)")
    p.add_argument("--markdown", action="store_true", help="print a GitHub markdown table")
    p.add_argument("--verbose", action="store_true",
                   help="print each failure's reasons and op chains (softmax/SDPA site in *stars*)")
    p.add_argument("--list", action="store_true", help="list the entries and exit")
    args = p.parse_args(argv)
    if args.list:
        for e in ZOO:
            print(f"{e.name:34s} {e.library:13s} {e.note}")
        return 0
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    names = [n.strip() for n in args.models.split(",") if n.strip()] or None
    if not select(names):
        p.error(f"no zoo entry matches {args.models!r}; try --list")

    def progress(r: ZooResult) -> None:
        print(f"[{r.status:5s}] {r.name} ({r.mode}) {r.seconds:.1f}s", file=sys.stderr, flush=True)

    results = run_zoo(names, train=args.train, progress=progress)
    if args.markdown:
        print(markdown(results, args.train))
    elif not _print_rich(results, args.train):
        print(plain(results, args.train))
    if args.verbose:
        for r in results:
            rule_differs = r.truth_scoped != sum(r.truth_calls.values())
            if r.status in ("FAIL", "error") or r.chains or rule_differs:
                print("\n" + r.summary())
    return 0 if all(r.status in ("ok", "skip") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
