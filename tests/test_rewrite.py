"""Rewrite tests on attention as models spell it: what fused, equal outputs and gradients."""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfuse
from attnfuse.kernels import registry
from helpers import check_rewrite

B, H, N, D = 2, 3, 17, 8


def qkv(n: int = N, m: int = N, d: int = D, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(n * 1000 + m)
    return (torch.randn(B, H, n, d, generator=g, dtype=dtype),
            torch.randn(B, H, m, d, generator=g, dtype=dtype),
            torch.randn(B, H, m, d, generator=g, dtype=dtype))


class Fn(nn.Module):
    """Wraps a function of (q, k, v, ...) as a module, so optimize() can take it."""

    def __init__(self, fn, **buffers) -> None:
        super().__init__()
        self.fn = fn
        for name, t in buffers.items():
            self.register_buffer(name, t)

    def forward(self, *args):
        return self.fn(self, *args)


SPELLINGS = {
    "matmul_div": lambda s, q, k, v: torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D), -1) @ v,
    "at_mul_permute": lambda s, q, k, v: F.softmax((q @ k.permute(0, 1, 3, 2)) * D ** -0.5, dim=-1) @ v,
    "mT_method_softmax": lambda s, q, k, v: (q @ k.mT * 0.3).softmax(dim=-1).matmul(v),
    "scale_on_q": lambda s, q, k, v: torch.softmax((q * D ** -0.5) @ k.transpose(2, 3), -1) @ v,
    "scale_on_q_and_k": lambda s, q, k, v: torch.softmax((q * D ** -0.25) @ (k * D ** -0.25).transpose(-1, -2), -1) @ v,
    "no_scale": lambda s, q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v,
    "fp32_upcast": lambda s, q, k, v: torch.softmax((q @ k.transpose(-1, -2)).float() / 4.0, -1).to(q.dtype) @ v,
    "softmax_dtype": lambda s, q, k, v: F.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1, dtype=torch.float32).type_as(q) @ v,
    "dropout_eval": lambda s, q, k, v: F.dropout(torch.softmax(q @ k.mT, -1), 0.1, training=False) @ v,
    "bmm_3d": lambda s, q, k, v: torch.bmm(torch.softmax(torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)) * 0.25, -1), v.flatten(0, 1)),
    "k_pretransposed": lambda s, q, k, v: torch.softmax(q @ k.transpose(-1, -2).contiguous() * 0.25, -1) @ v,
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spellings_fuse(name: str) -> None:
    report = check_rewrite(Fn(SPELLINGS[name]), qkv(), fused=1)
    site = report.sites[0]
    assert site.kernel in registry.candidates("cpu") and site.spec.mask.causal == "none"


def test_scale_folded() -> None:
    report = check_rewrite(Fn(SPELLINGS["matmul_div"]), qkv(), fused=1)
    assert report.sites[0].spec.scale == pytest.approx(1 / math.sqrt(D))
    assert report.sites[0].spec.scale_expr in ("sqrt(2)/4", "0.353553")


def test_scale_split_between_q_and_k() -> None:
    report = check_rewrite(Fn(SPELLINGS["scale_on_q_and_k"]), qkv(), fused=1)
    assert report.sites[0].spec.scale == pytest.approx(D ** -0.5)


MASKS = {
    "additive_NN": lambda: torch.randn(N, N),
    "additive_B11N": lambda: torch.randn(B, 1, 1, N),
    "additive_B1NN": lambda: torch.randn(B, 1, N, N),
    "additive_BHNN": lambda: torch.randn(B, H, N, N),
    "additive_expanded": lambda: torch.randn(1, 1, 1, N).expand(B, H, N, N),
    "finfo_min_padding": lambda: torch.where(torch.arange(N) < 11, 0.0, torch.finfo(torch.float32).min).expand(B, 1, 1, N),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_additive_masks(name: str) -> None:
    fn = lambda s, q, k, v, m: torch.softmax(q @ k.mT * 0.25 + m, -1) @ v
    q, k, v = qkv()
    report = check_rewrite(Fn(fn), (q, k, v, MASKS[name]()), fused=1)
    assert report.sites[0].spec.mask.kind == "additive"


def test_bias_requires_grad_gets_gradient() -> None:
    bias = nn.Parameter(torch.randn(H, N, N))
    mod = Fn(lambda s, q, k, v: torch.softmax(q @ k.mT * 0.25 + s.bias, -1) @ v)
    mod.bias = bias
    check_rewrite(mod, qkv(), fused=1)


def test_bool_mask_masked_fill_and_where() -> None:
    keep = torch.rand(B, 1, N, N) > 0.3
    keep[..., 0] = True
    q, k, v = qkv()
    f1 = lambda s, q, k, v, m: torch.softmax((q @ k.mT).masked_fill(~m, float("-inf")), -1) @ v
    f2 = lambda s, q, k, v, m: torch.softmax(torch.where(m, q @ k.mT, float("-inf")) * 0.5, -1) @ v
    for fn in (f1, f2):
        r = check_rewrite(Fn(fn), (q, k, v, keep), fused=1)
        assert r.sites[0].spec.mask.kind == "bool"


def test_finite_fill_keeps_eager_semantics_on_fully_masked_rows() -> None:
    keep = torch.rand(B, 1, N, N) > 0.5
    keep[:, :, 3] = False                                   # a row with no key: eager averages V
    fn = lambda s, q, k, v, m: torch.softmax((q @ k.mT).masked_fill(~m, -1e9), -1) @ v
    r = check_rewrite(Fn(fn), (*qkv(), keep), fused=1)
    assert r.sites[0].spec.mask.fill == -1e9


@pytest.mark.parametrize("buffer,expr", [
    ("tril", lambda s, t: s.bias[:, :, :t, :t] == 0),
    ("triu", lambda s, t: s.bias[:t, :t].bool()),
])
def test_causal_buffer_recognised(buffer: str, expr) -> None:
    full = torch.ones(64, 64)
    buf = full.tril().view(1, 1, 64, 64) if buffer == "tril" else full.triu(1)

    def fn(s, q, k, v):
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        att = att.masked_fill(expr(s, q.shape[2]), float("-inf"))
        return F.softmax(att.float(), dim=-1).to(q.dtype) @ v

    report = check_rewrite(Fn(fn, bias=buf), qkv(), fused=1)
    spec = report.sites[0].spec
    assert spec.mask.causal == "top_left" and spec.mask.kind == "none"


def test_bottom_right_causal_from_constant_mask() -> None:
    nq, nk = 5, N
    buf = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    fn = lambda s, q, k, v: torch.softmax((q @ k.mT).masked_fill(~s.keep, float("-inf")), -1) @ v
    report = check_rewrite(Fn(fn, keep=buf), qkv(nq, nk), fused=1)
    assert report.sites[0].spec.mask.causal == "bottom_right"


def test_non_causal_constant_mask_stays_dense() -> None:
    buf = torch.rand(N, N) > 0.5
    buf[:, 0] = True
    fn = lambda s, q, k, v: torch.softmax((q @ k.mT).masked_fill(~s.keep, float("-inf")), -1) @ v
    report = check_rewrite(Fn(fn, keep=buf), qkv(), fused=1)
    assert report.sites[0].spec.mask.causal == "none" and report.sites[0].spec.mask.kind == "bool"


def test_cross_attention_nq_ne_nk() -> None:
    check_rewrite(Fn(SPELLINGS["matmul_div"]), qkv(5, 23), fused=1)


def test_sdpa_calls_kept_by_default_and_replaced_when_forced() -> None:
    fn = lambda s, q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    fc = lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)
    q, k, v = qkv()
    r = check_rewrite(Fn(fn), (q, k, v, torch.randn(N, N)), fused=1)
    assert r.sites[0].kernel == "sdpa"
    r = check_rewrite(Fn(fn), (q, k, v, torch.randn(N, N)), fused=1, kernel="reference")
    assert r.sites[0].kernel == "reference"
    r = check_rewrite(Fn(fc), (q, k, v), fused=1, kernel="reference")
    assert r.sites[0].spec.mask.causal == "top_left" and r.sites[0].spec.scale == 0.2


def test_sdpa_gqa_forced() -> None:
    q = torch.randn(B, 4, N, D)
    k, v = torch.randn(B, 2, N, D), torch.randn(B, 2, N, D)
    fn = lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    r = check_rewrite(Fn(fn), (q, k, v), fused=1, kernel="reference")
    assert r.sites[0].spec.gqa_groups == 2


# -- sites that must be left alone ----------------------------------------------------------------

def test_probabilities_returned_are_not_fused() -> None:
    def fn(s, q, k, v):
        p = torch.softmax(q @ k.mT * 0.25, -1)
        return p @ v, p

    r = check_rewrite(Fn(fn), qkv(), fused=0, kept=1, out_of=lambda o: o[0])
    assert "users" in r.sites[0].reason and "returned or reused" in r.sites[0].reason


def test_scores_reused_are_not_fused() -> None:
    def fn(s, q, k, v):
        sc = q @ k.mT * 0.25
        return torch.softmax(sc, -1) @ v + sc.mean()

    r = check_rewrite(Fn(fn), qkv(), fused=0, kept=1)
    assert "scores have" in r.sites[0].reason


def test_active_dropout_is_not_fused() -> None:
    fn = lambda s, q, k, v: F.dropout(torch.softmax(q @ k.mT, -1), 0.5, training=True) @ v
    r = check_rewrite(Fn(fn), qkv(), fused=0, kept=1, grad=False,
                      out_of=lambda o: torch.zeros(()))
    assert "dropout is active" in r.sites[0].reason


def test_softmax_over_other_axis_is_not_fused() -> None:
    fn = lambda s, q, k, v: torch.softmax(q @ k.mT, dim=-2) @ v
    r = check_rewrite(Fn(fn), qkv(), fused=0, kept=1)
    assert "not the key axis" in r.sites[0].reason


class Gate(nn.Module):
    """A mixture-of-experts style gate: softmax(x W) @ E; the "keys" are a weight, not tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 5))

    def forward(self, x, e):
        return torch.softmax(x @ self.w, -1) @ e


def test_gating_softmax_is_not_attention() -> None:
    r = check_rewrite(Gate(), (torch.randn(2, 4, 8), torch.randn(2, 5, 3)), fused=0, kept=1)
    assert "module weights" in r.sites[0].reason and "gate" in r.sites[0].reason


def test_unsupported_score_mod_is_named() -> None:
    fn = lambda s, q, k, v: torch.softmax(torch.sigmoid(q @ k.mT / 50.0) * 50.0, -1) @ v
    r = check_rewrite(Fn(fn), qkv(), fused=0, kept=1)
    assert "`sigmoid`" in r.sites[0].reason


def test_report_renders() -> None:
    r = attnfuse.explain(Fn(SPELLINGS["matmul_div"]), qkv(), kernel="reference")
    text = str(r)
    assert "1 fused" in text and "attnfuse::reference" in text and "test_rewrite.py" in text
    assert "attnfuse.attention" in r.after[0].code and "softmax" not in r.after[0].code
    auto = attnfuse.explain(Fn(SPELLINGS["matmul_div"]), qkv())
    site = auto.sites[0]      # the selector's choice, with every candidate and its prediction
    assert site.kernel in str(auto) and all(c.kernel in str(auto) for c in site.candidates)
    assert "softmax" in r.before[0].code and "-" in r.diff()


def _op_keep(nq: int, nk: int, causal: str, window: tuple) -> torch.Tensor:
    from attnfuse.kernels import reference
    rows, cols = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    out = reference.outside_band(rows, cols, causal, window, nq, nk)
    return torch.ones(nq, nk, dtype=torch.bool) if out is None else ~out


def test_band_of_reads_every_band_back_exactly() -> None:
    """Every band on small shapes: what ``band_of`` returns keeps exactly the pattern (through the
    kernels' own band semantics), and bands with off = 0 or a diagonal right edge are found."""
    from attnfuse.passes.match import band_of
    for nq in range(1, 6):
        for nk in range(1, 7):
            for off in sorted({0, nk - nq}):
                for left in range(-1, 7):
                    for right in range(-1, 7):
                        i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
                        keep = torch.ones(nq, nk, dtype=torch.bool)
                        if left >= 0:
                            keep &= j >= i + off - left
                        if right >= 0:
                            keep &= j <= i + off + right
                        got = band_of(keep[None, None], nq, nk)
                        if got is not None:
                            assert torch.equal(_op_keep(nq, nk, *got), keep), (nq, nk, off, left,
                                                                              right, got)
                        elif keep.any() and (off == 0 or right == 0):
                            raise AssertionError(f"band missed: {(nq, nk, off, left, right)}")


def test_band_of_never_misreads_other_patterns() -> None:
    from attnfuse.passes.match import band_of
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        nq, nk = (int(x) for x in torch.randint(1, 7, (2,), generator=g))
        keep = torch.rand(nq, nk, generator=g) > 0.3
        got = band_of(keep, nq, nk)
        assert got is None or torch.equal(_op_keep(nq, nk, *got), keep)
    per_head = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    per_head[1] = True                              # differs between heads: not one pattern
    assert band_of(per_head, 4, 4) is None


@pytest.mark.parametrize("base,windows", [("mistral", [5, 5]), ("gemma2", [6, None])])
def test_hf_sliding_window_without_padding_becomes_window_args(base: str, windows) -> None:
    """Without an attention_mask input, transformers builds the sliding-window mask from positions
    alone: a constant band, read back as the op's causal flag and window. (With a padding mask
    the band and the padding are one input-dependent tensor, which stays a dense mask.)"""
    pytest.importorskip("transformers")
    from attnfuse.zoo import _build_hf
    model, inputs = _build_hf(base, "eager")
    r = check_rewrite(model.eval(), (inputs["input_ids"],), fused=2,
                      out_of=lambda o: o.last_hidden_state)
    got = [s.spec.mask.window[0] + 1 if s.spec.mask.window != (-1, -1) else None
           for s in r.sites]
    assert got == windows and all(s.spec.mask.causal == "top_left" for s in r.sites), str(r)
    assert all(s.spec.mask.kind == "none" for s in r.sites)


class _MergedHeads(nn.Module):
    """Attention as diffusers' eager ``AttnProcessor`` spells it: heads reshaped into the batch
    (``head_to_batch_dim``), ``baddbmm`` with the scale as ``alpha`` (and the mask as its input),
    ``bmm``, then ``batch_to_head_dim``."""

    def __init__(self, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

    def head_to_batch(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        t = t.reshape(b, n, self.heads, d // self.heads).permute(0, 2, 1, 3)
        return t.reshape(b * self.heads, n, d // self.heads)

    def batch_to_head(self, t: torch.Tensor) -> torch.Tensor:
        bh, n, d = t.shape
        t = t.reshape(bh // self.heads, self.heads, n, d)
        return t.permute(0, 2, 1, 3).reshape(bh // self.heads, n, d * self.heads)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = (self.head_to_batch(f(x)) for f in (self.to_q, self.to_k, self.to_v))
        if mask is None:
            base, beta = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype), 0
        else:
            base, beta = mask, 1
        scores = torch.baddbmm(base, q, k.transpose(-1, -2), beta=beta,
                               alpha=(q.shape[-1]) ** -0.5)
        return self.to_out(self.batch_to_head(torch.bmm(scores.softmax(-1), v)))


def _merged(report: attnfuse.Report, shape: tuple) -> int:
    """Nodes of the rewritten graphs with the heads-in-batch shape ``shape``."""
    return sum(1 for g in report.after for n in g.graph.nodes
               if tuple(getattr(n.meta.get("example_value"), "shape", ())) == shape)


@pytest.mark.parametrize("mask", ["none", "per_head", "shared"])
def test_heads_merged_into_the_batch_are_read_as_4d_views(mask: str) -> None:
    """No [B·H, N, D] copies around the fused op: it reads the 4-D tensors the heads were merged
    from and the model's reshape back to [B, H, N, D] becomes the op's output; values, masks
    (per head [B·H, 1, Nk] or shared [1, Nq, Nk]) and gradients as eager."""
    torch.manual_seed(0)
    model = _MergedHeads()
    x = torch.randn(2, 11, 24)
    args: tuple = (x,)
    if mask == "per_head":
        m = torch.zeros(2 * 3, 1, 11)
        m[:3, :, -4:] = -1e4              # padding of the first sequence, repeated per head
        args = (x, m)
    elif mask == "shared":
        args = (x, torch.randn(1, 11, 11))
    report = check_rewrite(model, args, fused=1)
    site = report.sites[0]
    assert any("heads merged into the batch" in r for r in site.spec.rules), site.spec.rules
    assert tuple(site.spec.q.shape) == (2, 3, 11, 8)
    assert _merged(report, (2 * 3, 11, 8)) == 0, report.diff()


def test_batch_merged_from_another_layout_is_left_as_is() -> None:
    """``nn.MultiheadAttention``'s [N, B·H, D] -> transpose: not a reshape of a [B, H, N, D]
    tensor, so the site fuses without the unmerge."""
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 7, 16)
    report = attnfuse.explain(Fn(lambda s, x: mha(x, x, x, need_weights=False)[0]), (x,))
    assert len(report.fused) == 1, str(report)
    assert not any("heads merged" in r for r in report.sites[0].spec.rules)
