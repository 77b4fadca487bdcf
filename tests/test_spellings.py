"""The spellings of issue #3 beyond the v0 set: products, head splits, scales, masks, GQA, softmax.

Each test builds a small module the way some model family writes attention, and checks (through
``check_rewrite``) that the site fuses with the expected spec and that outputs and gradients match
eager under FlashAttention's error-ratio rule against an fp64 copy.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnfuse.kernels import registry
from helpers import check_rewrite
from test_rewrite import B, D, H, N, Fn, qkv


def bnhd(n: int = N, h: int = H, d: int = D):
    """q, k, v in [B, N, H, D] (the layout before heads are moved in front)."""
    g = torch.Generator().manual_seed(7 * n + h)
    return tuple(torch.randn(B, n, h, d, generator=g) for _ in range(3))


PRODUCTS = {
    "einsum_bhqd": lambda s, q, k, v: torch.einsum(
        "bhqk,bhkd->bhqd", torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.3, -1), v),
    "einsum_ellipsis": lambda s, q, k, v: torch.einsum(
        "...qk,...kd->...qd", (torch.einsum("...qd,...kd->...qk", q, k) / 3.0).softmax(-1), v),
    "einsum_k_pretransposed": lambda s, q, k, v: torch.softmax(
        torch.einsum("bhqd,bhdk->bhqk", q, k.mT.contiguous()), -1) @ v,
    "baddbmm_alpha": lambda s, q, k, v: torch.bmm(torch.softmax(torch.baddbmm(
        torch.empty(B * H, N, N, dtype=q.dtype), q.flatten(0, 1), k.flatten(0, 1).mT, beta=0.0, alpha=0.25),
        -1), v.flatten(0, 1)),
}


@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_products(name: str) -> None:
    r = check_rewrite(Fn(PRODUCTS[name]), qkv(), fused=1)
    assert r.sites[0].kernel in registry.candidates("cpu")


def test_einsum_bqhd_layout_and_output_permuted() -> None:
    """q, k, v in [B, N, H, D] contracted directly; the output is written back in [B, N, H, D]."""
    fn = lambda s, q, k, v: torch.einsum(
        "bhqk,bkhd->bqhd", torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5, -1), v)
    r = check_rewrite(Fn(fn), bnhd(), fused=1)
    assert r.sites[0].spec.q.shape == (B, H, N, D)


def test_baddbmm_bias_is_an_additive_mask_alibi_style() -> None:
    """Bloom: alibi.baddbmm(q, kᵀ, beta=1, alpha=1/√d) in (B·H) layout, viewed to 4-D for the
    padding mask, back to 3-D for P·V."""
    alibi = torch.randn(B * H, 1, N)
    pad = torch.zeros(B, 1, N, N)
    pad[1, ..., -3:] = torch.finfo(torch.float32).min

    def fn(s, q, k, v, alibi, pad):
        q3, k3, v3 = q.reshape(B * H, N, D), k.reshape(B * H, N, D), v.reshape(B * H, N, D)
        sc = alibi.baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0, alpha=D ** -0.5)
        sc = sc.view(B, H, N, N) + pad
        p = F.softmax(sc, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.bmm(p.view(B * H, N, N), v3)
        return out.view(B, H, N, D)

    r = check_rewrite(Fn(fn), (*qkv(), alibi, pad), fused=1)
    assert r.sites[0].spec.mask.kind == "additive"


class HeadSplit(nn.Module):
    """Projections to heads, spelled several ways; the result merges heads back."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.qkv = nn.Linear(H * D, 3 * H * D)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.how == "view_transpose":
            return x.view(b, n, H, D).transpose(1, 2)
        if self.how == "reshape_permute":
            return x.reshape(b, n, H, D).permute(0, 2, 1, 3)
        if self.how == "unflatten":
            return x.unflatten(-1, (H, D)).transpose(1, 2)
        if self.how == "einops":
            import einops
            return einops.rearrange(x, "b n (h d) -> b h n d", h=H)
        raise AssertionError(self.how)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
        out = att.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], H * D)


@pytest.mark.parametrize("how", ["view_transpose", "reshape_permute", "unflatten", "einops"])
def test_head_splits(how: str) -> None:
    if how == "einops":
        pytest.importorskip("einops")
    check_rewrite(HeadSplit(how), (torch.randn(B, N, H * D),), fused=1)


SCALES = {
    "tensor_constant": lambda s, q, k, v: torch.softmax(q @ k.mT * torch.tensor(0.3), -1) @ v,
    "rsqrt_of_constant": lambda s, q, k, v: torch.softmax(
        q @ k.mT * torch.rsqrt(torch.tensor(float(D))), -1) @ v,
    "divide_by_buffer": lambda s, q, k, v: torch.softmax(q @ k.mT / s.temp, -1) @ v,
    "on_k_only": lambda s, q, k, v: torch.softmax(q @ (k / math.sqrt(D)).transpose(-1, -2), -1) @ v,
    "in_place_mul": lambda s, q, k, v: torch.softmax((q @ k.mT).mul_(0.3), -1) @ v,
}


@pytest.mark.parametrize("name", sorted(SCALES))
def test_scales(name: str) -> None:
    r = check_rewrite(Fn(SCALES[name], temp=torch.tensor(math.sqrt(D))), qkv(), fused=1)
    want = {"tensor_constant": 0.3, "in_place_mul": 0.3}.get(name, D ** -0.5)
    assert r.sites[0].spec.scale == pytest.approx(want, rel=1e-6)


def test_learned_temperature_is_not_a_constant() -> None:
    mod = Fn(lambda s, q, k, v: torch.softmax(q @ k.mT * s.t.exp(), -1) @ v)
    mod.t = nn.Parameter(torch.tensor(0.1))
    r = check_rewrite(mod, qkv(), fused=0, kept=1)
    assert "not a compile-time constant" in r.sites[0].reason


def test_t5_style_no_scale_in_place_bias_and_type_as() -> None:
    """T5: no scale, ``scores += position_bias`` (a learned bias), softmax(float).type_as(scores)."""
    mod = Fn(lambda s, q, k, v: _t5(s, q, k, v))
    mod.rel = nn.Parameter(torch.randn(1, H, N, N))
    r = check_rewrite(mod, qkv(), fused=1)
    assert r.sites[0].spec.scale == 1.0 and r.sites[0].spec.mask.requires_grad


def _t5(s, q, k, v):
    scores = torch.matmul(q, k.transpose(3, 2))
    scores += s.rel
    w = F.softmax(scores.float(), dim=-1).type_as(scores)
    w = F.dropout(w, p=0.1, training=False)
    return torch.matmul(w, v)


def test_subtracted_mask() -> None:
    fn = lambda s, q, k, v, m: torch.softmax(q @ k.mT * 0.3 - 1e4 * m, -1) @ v
    m = (torch.rand(B, 1, 1, N) > 0.7).float()
    m[..., 0] = 0
    check_rewrite(Fn(fn), (*qkv(), m), fused=1)


CAUSAL = {
    "arange_compare": lambda s, q, k, v: torch.softmax((q @ k.mT * 0.3).masked_fill(
        torch.arange(N)[None, :] > torch.arange(N)[:, None], float("-inf")), -1) @ v,
    "full_triu_additive": lambda s, q, k, v: torch.softmax(
        q @ k.mT * 0.3 + torch.full((N, N), float("-inf")).triu(1), -1) @ v,
    "where_tril": lambda s, q, k, v: torch.softmax(torch.where(
        torch.ones(N, N, dtype=torch.bool).tril(), q @ k.mT, float("-inf")), -1) @ v,
    "finfo_min_fill_tril_buffer": lambda s, q, k, v: torch.softmax((q @ k.mT).masked_fill(
        s.keep[:N, :N] == 0, torch.finfo(torch.float32).min), -1) @ v,
}


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_causal_spellings(name: str) -> None:
    r = check_rewrite(Fn(CAUSAL[name], keep=torch.ones(32, 32).tril()), qkv(), fused=1)
    assert r.sites[0].spec.mask.causal == "top_left" and r.sites[0].spec.mask.kind == "none"


def test_finite_additive_causal_alone_becomes_causal() -> None:
    """A finfo.min additive causal mask that is the site's only mask and leaves every row a key
    gives the softmax of -inf: it becomes the op's causal flag."""
    fn = lambda s, q, k, v: torch.softmax(q @ k.mT + s.m[:N, :N], -1) @ v
    m = torch.full((32, 32), torch.finfo(torch.float32).min).triu(1)
    r = check_rewrite(Fn(fn, m=m), qkv(), fused=1)
    assert r.sites[0].spec.mask.causal == "top_left" and r.sites[0].spec.mask.kind == "none"


def test_finite_additive_causal_with_padding_stays_additive() -> None:
    """Next to another mask a row may be fully masked, where finfo.min and -inf differ: the
    constant mask stays an additive mask, so eager semantics are kept exactly."""
    fn = lambda s, q, k, v, pad: torch.softmax(q @ k.mT + s.m[:N, :N] + pad, -1) @ v
    m = torch.full((32, 32), torch.finfo(torch.float32).min).triu(1)
    pad = torch.zeros(B, 1, 1, N)
    pad[1, ..., :3] = torch.finfo(torch.float32).min        # rows 0-2 of batch 1: no key left
    r = check_rewrite(Fn(fn, m=m), (*qkv(), pad), fused=1)
    assert r.sites[0].spec.mask.causal == "none" and r.sites[0].spec.mask.kind == "additive"


def test_sliding_window_and_key_padding() -> None:
    """Mistral-style: causal band of width 4 as a bool mask AND a key-padding mask."""
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    band = (j <= i) & (j > i - 4)
    pad = torch.ones(B, 1, 1, N, dtype=torch.bool)
    pad[0, ..., 5:8] = False                     # every row keeps a key: eager has no NaN rows
    fn = lambda s, q, k, v, pad: torch.softmax(
        (q @ k.mT * 0.3).masked_fill(~(s.band & pad), float("-inf")), -1) @ v
    r = check_rewrite(Fn(fn, band=band), (*qkv(), pad), fused=1)
    assert r.sites[0].spec.mask.kind == "bool"


def _op_window(r) -> tuple:
    """The (causal, window_left, window_right) the rewritten graph passes to the fused op."""
    (node,) = [n for g in r.after for n in g.graph.nodes
               if n.target is torch.ops.attnfuse.attention.default]
    return (node.args[5], *node.args[9:11])


W = 4


def _band_buffer(n: int = 32, w: int = W) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril().triu(-(w - 1))     # keys i-w+1 .. i


SLIDING = {
    "tril_triu_bool_buffer": lambda s, q, k, v: torch.softmax(
        (q @ k.mT * 0.3).masked_fill(~s.band[:N, :N], float("-inf")), -1) @ v,
    "tril_minus_tril_float_buffer": lambda s, q, k, v: torch.softmax(
        (q @ k.mT * 0.3).masked_fill(s.bandf[:N, :N] == 0, torch.finfo(q.dtype).min), -1) @ v,
    "arange_compare": lambda s, q, k, v: torch.softmax(torch.where(
        (torch.arange(N)[None, :] <= torch.arange(N)[:, None])
        & (torch.arange(N)[None, :] > torch.arange(N)[:, None] - W), q @ k.mT * 0.3,
        float("-inf")), -1) @ v,
    "finfo_min_additive_hf_style": lambda s, q, k, v: torch.softmax(q @ k.mT * 0.3 + torch.zeros(
        N, N, dtype=q.dtype).masked_fill(~s.band[:N, :N], torch.finfo(q.dtype).min), -1) @ v,
    "causal_then_window_two_masks": lambda s, q, k, v: torch.softmax(
        (q @ k.mT * 0.3).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
        .masked_fill(torch.ones(N, N, dtype=torch.bool).tril(-W), float("-inf")), -1) @ v,
}


@pytest.mark.parametrize("name", sorted(SLIDING))
def test_sliding_window_band_becomes_window_args(name: str) -> None:
    """A constant causal band of W keys: the op's causal flag and window (W - 1, 0), no mask."""
    full = torch.ones(32, 32)
    mod = Fn(SLIDING[name], band=_band_buffer(), bandf=full.tril() - full.tril(-W))
    r = check_rewrite(mod, qkv(), fused=1)
    spec = r.sites[0].spec
    assert (spec.mask.causal, spec.mask.window, spec.mask.kind) == ("top_left", (W - 1, 0), "none")
    assert f"causal (top-left), window {W}" in spec.describe()
    assert _op_window(r) == ("top_left", W - 1, 0)


def test_two_sided_arange_band_is_a_window() -> None:
    """|i - j| limits on both sides (a local, non-causal window)."""
    def fn(s, q, k, v):
        i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
        return torch.softmax((q @ k.mT * 0.3).masked_fill((j > i + 2) | (j < i - 3),
                                                          float("-inf")), -1) @ v

    r = check_rewrite(Fn(fn), qkv(), fused=1)
    spec = r.sites[0].spec
    assert (spec.mask.causal, spec.mask.window, spec.mask.kind) == ("none", (3, 2), "none")
    assert "window left 3, right 2" in spec.describe()
    assert _op_window(r) == ("none", 3, 2)


def test_bottom_right_sliding_window_on_a_kv_cache() -> None:
    """Queries are the last Nq of Nk positions: the band is aligned bottom-right."""
    nq, nk = 5, N
    keep = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq).triu(nk - nq - (W - 1))
    fn = lambda s, q, k, v: torch.softmax((q @ k.mT).masked_fill(~s.keep, float("-inf")), -1) @ v
    r = check_rewrite(Fn(fn, keep=keep), qkv(nq, nk), fused=1)
    mask = r.sites[0].spec.mask
    assert (mask.causal, mask.window) == ("bottom_right", (W - 1, 0))


def test_window_band_and_key_padding_as_two_masks() -> None:
    """The constant band becomes window args; the padding stays a dense bool mask."""
    pad = torch.ones(B, 1, 1, N, dtype=torch.bool)
    pad[0, ..., 5:7] = False                     # every row keeps a key
    fn = lambda s, q, k, v, pad: torch.softmax((q @ k.mT * 0.3).masked_fill(
        ~s.band[:N, :N], float("-inf")).masked_fill(~pad, float("-inf")), -1) @ v
    r = check_rewrite(Fn(fn, band=_band_buffer()), (*qkv(), pad), fused=1)
    spec = r.sites[0].spec
    assert (spec.mask.causal, spec.mask.window, spec.mask.kind) == ("top_left", (W - 1, 0), "bool")


def test_window_args_under_inductor_match_eager() -> None:
    r = check_rewrite(Fn(SLIDING["arange_compare"]), qkv(), fused=1, inner="inductor")
    assert r.sites[0].spec.mask.window == (W - 1, 0)


KEPT_DENSE = {
    # A finite fill next to another mask: a row may be fully masked, where fills matter.
    "finite_band_with_padding": (
        lambda s, q, k, v, pad: torch.softmax((q @ k.mT).masked_fill(
            ~(s.band[:N, :N]), -1e9).masked_fill(~pad, -1e9), -1) @ v, "bool"),
    # A finite masked_fill applied after a -inf band overwrites some of its -inf entries (the
    # site then mixes fills and is left alone).
    "finite_fill_after_band": (
        lambda s, q, k, v, pad: torch.softmax((q @ k.mT).masked_fill(
            ~s.band[:N, :N], float("-inf")).masked_fill(~pad, -1e9), -1) @ v, None),
    # Not a band: one key inside the window is masked.
    "band_with_a_hole": (
        lambda s, q, k, v, pad: torch.softmax((q @ k.mT).masked_fill(
            ~s.holed[:N, :N], float("-inf")).masked_fill(~pad, float("-inf")), -1) @ v, "bool"),
    # A fill that is not huge is a real score, not a mask.
    "small_fill": (
        lambda s, q, k, v, pad: torch.softmax((q @ k.mT).masked_fill(
            ~s.band[:N, :N], -3.0), -1) @ v + 0 * pad.sum(), "bool"),
}


@pytest.mark.parametrize("name", sorted(KEPT_DENSE))
def test_band_that_cannot_be_converted_stays_dense(name: str) -> None:
    fn, kind = KEPT_DENSE[name]
    holed = _band_buffer().clone()
    holed[6, 5] = False
    pad = torch.ones(B, 1, 1, N, dtype=torch.bool)
    pad[1, ..., :2] = False                      # rows 0-1 of batch 1 lose every key in the band
    if name == "band_with_a_hole":
        pad[1, ..., :2] = True                   # -inf everywhere would give NaN rows in eager
    mod = Fn(fn, band=_band_buffer(), holed=holed)
    r = check_rewrite(mod, (*qkv(), pad), fused=int(kind is not None), kept=int(kind is None))
    if kind is None:
        assert "different finite fill" in r.sites[0].reason
        return
    spec = r.sites[0].spec
    assert spec.mask.window == (-1, -1) and spec.mask.kind == kind, spec.describe()
    if name != "small_fill":                     # -3.0 is a score, not a mask: no candidate
        assert any(rule.startswith("constant mask kept dense") for rule in spec.rules), spec.rules


def test_finite_band_with_empty_rows_stays_dense() -> None:
    """Bottom-right band with Nq > Nk leaves the first rows empty: finfo.min averages V there."""
    nq, nk = N, 6
    keep = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    fn = lambda s, q, k, v: torch.softmax(
        (q @ k.mT).masked_fill(~s.keep, torch.finfo(q.dtype).min), -1) @ v
    r = check_rewrite(Fn(fn, keep=keep), qkv(nq, nk), fused=1)
    assert r.sites[0].spec.mask.causal == "none" and r.sites[0].spec.mask.kind == "bool"


def test_all_true_constant_mask_is_dropped() -> None:
    fn = lambda s, q, k, v: torch.softmax(
        (q @ k.mT).masked_fill(~torch.ones(N, N, dtype=torch.bool), float("-inf")), -1) @ v
    r = check_rewrite(Fn(fn), qkv(), fused=1)
    assert r.sites[0].spec.mask.kind == "none" and r.sites[0].spec.mask.describe() == "none"


def repeat_kv(x: torch.Tensor, g: int) -> torch.Tensor:
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, g, n, d).reshape(b, h * g, n, d)


GQA = {
    "repeat_kv": lambda k, g: repeat_kv(k, g),
    "unsqueeze_expand_flatten": lambda k, g: k.unsqueeze(2).expand(-1, -1, g, -1, -1).flatten(1, 2),
    "repeat_interleave": lambda k, g: k.repeat_interleave(g, dim=1),
    "torch_repeat_interleave": lambda k, g: torch.repeat_interleave(k, g, dim=1),
}


@pytest.mark.parametrize("name", sorted(GQA))
def test_gqa_folded(name: str) -> None:
    rep = GQA[name]
    q = torch.randn(B, 4, N, D)
    k, v = torch.randn(B, 2, N, D), torch.randn(B, 2, N, D)
    fn = lambda s, q, k, v: torch.softmax(q @ rep(k, 2).transpose(2, 3) * 0.3, -1) @ rep(v, 2)
    r = check_rewrite(Fn(fn), (q, k, v), fused=1)
    spec = r.sites[0].spec
    assert spec.gqa_groups == 2 and spec.k.shape[1] == 2
    code = r.after[0].code
    assert "expand" not in code and "repeat_interleave" not in code


def test_mqa_expand_single_head() -> None:
    q = torch.randn(B, 4, N, D)
    k, v = torch.randn(B, 1, N, D), torch.randn(B, 1, N, D)
    fn = lambda s, q, k, v: torch.softmax(q @ k.expand(B, 4, N, D).mT * 0.3, -1) @ v.expand(B, 4, N, D)
    r = check_rewrite(Fn(fn), (q, k, v), fused=1)
    assert r.sites[0].spec.gqa_groups == 4


def test_tiling_repeat_is_not_read_as_gqa() -> None:
    """``k.repeat(1, 2, 1, 1)`` maps head h to h % Hkv, not h // G: passed as materialized K/V."""
    q = torch.randn(B, 4, N, D)
    k, v = torch.randn(B, 2, N, D), torch.randn(B, 2, N, D)
    fn = lambda s, q, k, v: torch.softmax(q @ k.repeat(1, 2, 1, 1).mT * 0.3, -1) @ v.repeat(1, 2, 1, 1)
    r = check_rewrite(Fn(fn), (q, k, v), fused=1)
    assert r.sites[0].spec.gqa_groups == 1


def test_log_softmax_exp_is_softmax() -> None:
    """exp(log_softmax(x)) equals softmax(x) in exact arithmetic (both subtract the row max)."""
    fn = lambda s, q, k, v: torch.log_softmax(q @ k.mT * 0.3, -1).exp() @ v
    r = check_rewrite(Fn(fn), qkv(), fused=1)
    assert "exp(log_softmax)->softmax" in r.sites[0].spec.rules


def test_log_softmax_alone_is_not_attention() -> None:
    fn = lambda s, q, k, v: torch.log_softmax(q @ k.mT * 0.3, -1) @ v
    r = check_rewrite(Fn(fn), qkv(), fused=0, kept=0)
    assert not r.sites


def test_nn_softmax_module_and_dropout_module_eval() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.sm, self.drop = nn.Softmax(dim=-1), nn.Dropout(0.2)

        def forward(self, q, k, v):
            return self.drop(self.sm(q @ k.mT * 0.3)) @ v

    check_rewrite(M().eval(), qkv(), fused=1)


def test_dropout_p0_in_training_fuses() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.0)

        def forward(self, q, k, v):
            return self.drop(torch.softmax(q @ k.mT * 0.3, -1)) @ v

    check_rewrite(M().train(), qkv(), fused=1)


def test_swin_style_window_mask_through_5d_view() -> None:
    """Swin: scores [B·nW, H, N, N] + rel-pos bias, viewed to [B, nW, H, N, N] to add the shifted
    window mask [nW, N, N], viewed back."""
    nw, bw = 4, B
    rel = nn.Parameter(torch.randn(H, N, N))
    wmask = torch.where(torch.rand(nw, N, N) > 0.3, 0.0, -100.0)

    def fn(s, q, k, v):
        attn = (q * D ** -0.5) @ k.transpose(-2, -1)
        attn = attn + s.rel.unsqueeze(0)
        attn = attn.view(-1, nw, H, N, N) + s.wmask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, H, N, N)
        return attn.softmax(-1) @ v

    mod = Fn(fn, wmask=wmask)
    mod.rel = rel
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(bw * nw, H, N, D, generator=g) for _ in range(3))
    r = check_rewrite(mod, (q, k, v), fused=1)
    assert r.sites[0].spec.mask.kind == "additive"


def _gemma2(s, q, k, v, mask):
    """Gemma 2: scaling, tanh soft-cap in the scores' dtype, an additive mask, fp32 softmax."""
    w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    w = w / 5.0
    w = torch.tanh(w)
    w = w * 5.0
    w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def test_softcap_gemma2_style() -> None:
    q, k, v = qkv()
    q = q * 8                                      # scores well past the cap: tanh bends them
    mask = torch.zeros(B, 1, N, N)
    mask[0, ..., -4:] = torch.finfo(torch.float32).min
    r = check_rewrite(Fn(_gemma2), (q, k, v, mask), fused=1)
    spec = r.sites[0].spec
    assert spec.softcap == pytest.approx(5.0) and spec.scale == pytest.approx(D ** -0.5)


def test_bare_tanh_is_softcap_one() -> None:
    """softmax(tanh(s)) is soft-capping with cap 1: 1·tanh(s/1)."""
    fn = lambda s, q, k, v: torch.softmax(torch.tanh(q @ k.mT * 0.5), -1) @ v
    r = check_rewrite(Fn(fn), qkv(), fused=1)
    assert r.sites[0].spec.softcap == 1.0 and r.sites[0].spec.scale == 0.5


def test_mask_inside_tanh_is_left_alone() -> None:
    fn = lambda s, q, k, v, m: torch.softmax(torch.tanh((q @ k.mT + m) / 5.0) * 5.0, -1) @ v
    r = check_rewrite(Fn(fn), (*qkv(), torch.randn(N, N)), fused=0, kept=1)
    assert "inside the tanh" in r.sites[0].reason


def test_mqa_by_matmul_broadcast() -> None:
    """Falcon: K and V keep one head and the matmuls broadcast it over the query heads."""
    q = torch.randn(B, 4, N, D)
    k, v = torch.randn(B, 1, N, D), torch.randn(B, 1, N, D)
    fn = lambda s, q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v
    r = check_rewrite(Fn(fn), (q, k, v), fused=1)
    assert r.sites[0].spec.gqa_groups == 4


def test_sdpa_broadcast_single_kv_head_forced() -> None:
    q = torch.randn(B, 4, N, D)
    k, v = torch.randn(B, 1, N, D), torch.randn(B, 1, N, D)
    fn = lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v)
    r = check_rewrite(Fn(fn), (q, k, v), fused=1, kernel="reference")
    assert r.sites[0].kernel == "reference" and r.sites[0].spec.gqa_groups == 4


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_additive_mask_dtypes(mask_dtype: torch.dtype) -> None:
    """A low-precision bias on fp32 scores: type promotion keeps the scores fp32; so does the op."""
    m = torch.randn(B, 1, N, N).to(mask_dtype)
    fn = lambda s, q, k, v, m: torch.softmax(q @ k.mT * 0.3 + m, -1) @ v
    q, k, v = qkv()
    r = check_rewrite(Fn(fn), (q, k, v, m), fused=1)       # the bias' gradient included
    assert r.sites[0].spec.mask.tensor.dtype == mask_dtype
