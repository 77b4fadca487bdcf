"""Real library models (tiny configs, random weights, eager attention): every site fuses."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import check_rewrite

transformers = pytest.importorskip("transformers")

VOCAB, LAYERS = 100, 2


def _models():
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig,
                              LlamaModel)
    return {
        "gpt2": (GPT2Model, GPT2Config(n_layer=LAYERS, n_embd=32, n_head=2, vocab_size=VOCAB,
                                       n_positions=64, bos_token_id=0, eos_token_id=0)),
        "bert": (BertModel, BertConfig(num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=VOCAB)),
        "llama": (LlamaModel, LlamaConfig(num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB)),
    }


class Wrap(torch.nn.Module):
    """input_ids, attention_mask -> last hidden state (the tensor whose gradients we compare)."""

    def __init__(self, model: torch.nn.Module, **kwargs) -> None:
        super().__init__()
        self.model, self.kwargs = model, kwargs

    def forward(self, ids: torch.Tensor, mask: torch.Tensor):
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **self.kwargs)
        return out


def _build(name: str, **kwargs) -> Wrap:
    cls, cfg = _models()[name]
    torch.manual_seed(0)
    model = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    return Wrap(model, **kwargs)


def _inputs():
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    # Right padding in the second row. (Left padding fully masks the first rows of a causal
    # model; HF's finfo.min mask then overflows to -inf in the fp64 oracle and gives NaN.)
    mask[1, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_hf_model_fuses_every_layer(name: str) -> None:
    report = check_rewrite(_build(name), _inputs(), fused=LAYERS,
                           out_of=lambda o: o.last_hidden_state)
    for site in report.sites:
        assert site.kernel == "reference"
        assert site.spec.mask.kind == "additive"       # HF's finfo.min mask, kept additive
        assert "modeling_" in site.location


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_output_attentions_is_left_alone(name: str) -> None:
    report = check_rewrite(_build(name, output_attentions=True), _inputs(), fused=0, kept=LAYERS,
                           out_of=lambda o: o.last_hidden_state)
    assert all("returned or reused" in s.reason for s in report.sites)
