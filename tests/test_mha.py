"""nn.MultiheadAttention and the nn.Transformer layers: every path PyTorch takes is lowered."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import check_rewrite

E, HEADS, L = 32, 4, 9


class SelfAttn(nn.Module):
    def __init__(self, batch_first: bool = True, **kw) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kw)

    def forward(self, x, *masks):
        kw = dict(zip(("key_padding_mask", "attn_mask"), masks))
        return self.mha(x, x, x, need_weights=False, **kw)[0]


def _x(b: int = 2, n: int = L, seq_first: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(b, n, E, generator=g)
    return x.transpose(0, 1).contiguous() if seq_first else x


def test_mha_default_need_weights_discarded() -> None:
    """``out, _ = mha(x, x, x)``: weights are computed by default but nobody reads them."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, HEADS, batch_first=True)

        def forward(self, x):
            out, _ = self.mha(x, x, x)
            return out

    r = check_rewrite(M(), (_x(),), fused=1)
    assert r.sites[0].pattern == "mha"


def test_mha_need_weights_used_is_left_alone() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, HEADS, batch_first=True)

        def forward(self, x):
            out, w = self.mha(x, x, x)
            return out + w.sum()

    r = check_rewrite(M(), (_x(),), fused=0, kept=1)
    assert "need_weights" in r.sites[0].reason


@pytest.mark.parametrize("masks", ["none", "padding_bool", "attn_float", "attn_bool_and_padding"])
def test_mha_masks(masks: str) -> None:
    x = _x()
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[1, -3:] = True
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    args = {"none": (), "padding_bool": (pad,), "attn_float": (None, torch.randn(L, L)),
            "attn_bool_and_padding": (pad, causal)}[masks]
    check_rewrite(SelfAttn(), (x, *args), fused=1)


def test_mha_cross_attention_seq_first_separate_kv_dims() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, HEADS, kdim=16, vdim=24)

        def forward(self, q, kv16, kv24):
            return self.mha(q, kv16, kv24, need_weights=False)[0]

    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 2, E, generator=g)
    r = check_rewrite(M(), (q, torch.randn(11, 2, 16, generator=g), torch.randn(11, 2, 24, generator=g)),
                      fused=1)
    assert r.sites[0].spec.k.shape[2] == 11


def test_mha_bias_kv_is_left_alone_with_reason() -> None:
    r = check_rewrite(SelfAttn(add_bias_kv=True), (_x(),), fused=0, kept=1)
    assert "add_bias_kv" in r.sites[0].reason


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_training_path(norm_first: bool) -> None:
    layer = nn.TransformerEncoderLayer(E, HEADS, 64, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    r = check_rewrite(enc, (_x(),), fused=2)
    assert {s.pattern for s in r.sites} == {"mha"}


def test_encoder_layer_inference_fast_path() -> None:
    """Under no_grad in eval mode PyTorch calls torch._transformer_encoder_layer_fwd."""
    import attnfuse
    layer = nn.TransformerEncoderLayer(E, HEADS, 64, batch_first=True).eval()
    x = _x()
    fast = attnfuse.optimize(layer, inner="eager")
    with torch.no_grad():
        want, got = layer(x), fast(x)
    report = fast.attnfuse_report
    assert [s.pattern for s in report.sites] == ["encoder_layer"] and report.sites[0].kernel
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mha_inference_fast_path() -> None:
    import attnfuse
    m = SelfAttn().eval()
    x = _x()
    fast = attnfuse.optimize(m, inner="eager")
    with torch.no_grad():
        want, got = m(x), fast(x)
    report = fast.attnfuse_report
    # Dynamo takes the general path here; the fast path (native_mha) is lowered when it appears.
    assert [s.pattern for s in report.sites] in (["native_mha"], ["mha"]) and report.sites[0].kernel
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nn_transformer_encoder_decoder() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Transformer(E, HEADS, 1, 1, 64, dropout=0.0, batch_first=True)

        def forward(self, src, tgt, mask):
            # tgt_is_causal given: PyTorch's own causal-mask detection is a data-dependent branch
            return self.t(src, tgt, tgt_mask=mask, tgt_is_causal=True)

    g = torch.Generator().manual_seed(5)
    src, tgt = torch.randn(2, 7, E, generator=g), torch.randn(2, 5, E, generator=g)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    check_rewrite(M(), (src, tgt, mask), fused=3)
