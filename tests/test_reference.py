"""The reference kernel's sliding windows and dropout against plain math in float64.

The oracle here is the definition itself: a dense keep-mask built entry by entry from the window
semantics, and ``softmax`` followed by an explicit ``keep / (1 − p)`` for dropout.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnfuse.kernels import reference

F64 = torch.float64


def band_keep(nq: int, nk: int, causal: str, window: tuple[int, int]) -> torch.Tensor:
    """[Nq, Nk] bool: query i may see key j, written out from the contract one entry at a time."""
    off = nk - nq if causal == "bottom_right" else 0
    left, right = window
    keep = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            ok = (left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right)
            if causal != "none":
                ok = ok and j <= i + off
            keep[i, j] = ok
    return keep


def plain(q, k, v, keep=None, scale=None, drop=None, p=0.0):
    """softmax(scale·q·kᵀ where keep) · v with empty rows giving 0; ``drop``: bool keep-mask of
    dropout applied after the softmax as ``drop / (1 − p)``."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.mT * scale
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    probs = torch.softmax(s, -1).nan_to_num(0.0)
    if drop is not None:
        probs = probs * drop / (1 - p) if p < 1 else probs * 0
    return probs @ v


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


WINDOWS = [(2, -1), (-1, 1), (2, 1), (0, 0), (3, 0), (0, 2), (-1, -1)]
SHAPES = [(9, 9), (5, 12), (12, 5)]


@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("nq,nk", SHAPES)
@pytest.mark.parametrize("window", WINDOWS)
def test_window_equals_dense_band(causal: str, nq: int, nk: int, window: tuple[int, int]) -> None:
    q, k, v = rand(2, 4, nq, 8, seed=1), rand(2, 2, nk, 8, seed=2), rand(2, 2, nk, 6, seed=3)
    keep = band_keep(nq, nk, causal, window)
    out, lse = reference.attention_forward(q, k, v, None, 0.4, causal, window=window, chunk=4)
    torch.testing.assert_close(out, plain(q, k, v, keep, 0.4), rtol=1e-12, atol=1e-12)
    # Rows the window leaves empty follow the contract: out 0, lse -inf.
    empty = ~keep.any(-1)
    assert torch.equal(torch.isneginf(lse), empty.expand_as(lse))
    assert not out[..., empty, :].any()
    # The backward equals the backward of the same band given as a dense bool mask.
    dout = rand(*out.shape, seed=4)
    got = reference.attention_backward(dout, q, k, v, None, out, lse, 0.4, causal, window=window,
                                       chunk=4)
    want = reference.attention_backward(dout, q, k, v, keep, out, lse, 0.4, "none")
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal,window", [("top_left", (2, 0)), ("none", (1, 1)),
                                           ("bottom_right", (0, -1))])
def test_window_combines_with_a_bool_mask_and_empties_rows(causal, window) -> None:
    nq, nk = 7, 10
    q, k, v = rand(1, 2, nq, 8, seed=5), rand(1, 2, nk, 8, seed=6), rand(1, 2, nk, 8, seed=7)
    user = torch.rand(1, 1, nq, nk, generator=torch.Generator().manual_seed(8)) > 0.4
    user[..., 3, :] = False                          # one row masked out entirely by the user
    keep = band_keep(nq, nk, causal, window) & user
    out, lse = reference.attention_forward(q, k, v, user, None, causal, window=window)
    torch.testing.assert_close(out, plain(q, k, v, keep), rtol=1e-12, atol=1e-12)
    empty = ~keep.any(-1)
    assert empty.any()
    assert torch.equal(torch.isneginf(lse), empty.expand_as(lse))


def test_window_with_additive_mask_gradcheck() -> None:
    q, k, v = (rand(1, 2, 5, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    bias = rand(1, 2, 5, 5, seed=4).requires_grad_()

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, bias):
            out, lse = reference.attention_forward(q, k, v, bias, 0.5, "top_left", window=(1, 0))
            ctx.save_for_backward(q, k, v, bias, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, bias, out, lse = ctx.saved_tensors
            return reference.attention_backward(dout, q, k, v, bias, out, lse, 0.5, "top_left",
                                                mask_grad=True, window=(1, 0))

    torch.autograd.gradcheck(Op.apply, (q, k, v, bias))


def _dropout_fn(p: float, keep: torch.Tensor, **kw):
    """An autograd function over the reference's forward and backward with a fixed keep-mask."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, *mask):
            m = mask[0] if mask else None
            out, lse = reference.attention_forward(q, k, v, m, None, dropout_p=p,
                                                   dropout_mask=keep, **kw)
            ctx.save_for_backward(q, k, v, out, lse, *mask)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse, *mask = ctx.saved_tensors
            m = mask[0] if mask else None
            dq, dk, dv, dm = reference.attention_backward(
                dout, q, k, v, m, out, lse, None, mask_grad=m is not None, dropout_p=p,
                dropout_mask=keep, **kw)
            return (dq, dk, dv, *([dm] if mask else []))

    return Op.apply


@pytest.mark.parametrize("p", [0.2, 0.6])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)])
def test_dropout_with_explicit_mask_equals_plain_math(p: float, heads) -> None:
    hq, hkv = heads
    q, k, v = rand(2, hq, 6, 8, seed=1), rand(2, hkv, 9, 8, seed=2), rand(2, hkv, 9, 5, seed=3)
    keep = torch.rand(2, hq, 6, 9, generator=torch.Generator().manual_seed(9)) >= p
    out, lse = reference.attention_forward(q, k, v, dropout_p=p, dropout_mask=keep, chunk=4)
    torch.testing.assert_close(out, plain(q, k, v, drop=keep, p=p), rtol=1e-12, atol=1e-12)
    # lse is that of the softmax before dropout.
    _, lse0 = reference.attention_forward(q, k, v, chunk=4)
    torch.testing.assert_close(lse, lse0, rtol=0, atol=0)
    # Gradients: the reference's backward against autograd of the plain math.
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = rand(*out.shape, seed=4)
    want = torch.autograd.grad(plain(*leaves, drop=keep, p=p), leaves, dout)
    got = reference.attention_backward(dout, q, k, v, None, out, lse, dropout_p=p,
                                       dropout_mask=keep, chunk=4)
    for a, b in zip(got[:3], want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["plain", "window_causal", "bias_softcap", "broadcast_mask"])
def test_dropout_gradcheck(case: str) -> None:
    q, k, v = (rand(1, 2, 4, 3, seed=s).requires_grad_() for s in (1, 2, 3))
    keep = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(5)) >= 0.3
    kw, extra = {}, ()
    if case == "window_causal":
        kw = dict(causal="top_left", window=(1, 0))
    elif case == "bias_softcap":
        kw = dict(softcap=2.0)
        extra = (rand(1, 2, 4, 4, seed=4).requires_grad_(),)
    elif case == "broadcast_mask":
        keep = keep[:1, :1]                           # one mask shared by batch and heads
    torch.autograd.gradcheck(_dropout_fn(0.3, keep, **kw), (q, k, v, *extra))


def test_dropout_one_gives_zeros_and_zero_gradients() -> None:
    q, k, v = rand(1, 2, 5, 4, seed=1), rand(1, 2, 7, 4, seed=2), rand(1, 2, 7, 4, seed=3)
    out, lse = reference.attention_forward(q, k, v, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isfinite(lse).all()
    dq, dk, dv, _ = reference.attention_backward(rand(*out.shape, seed=4), q, k, v, None, out, lse,
                                                 dropout_p=1.0)
    for g in (dq, dk, dv):
        assert torch.equal(g, torch.zeros_like(g))


def test_dropout_zero_is_no_dropout_and_mask_is_required_between() -> None:
    q, k, v = rand(1, 1, 3, 4, seed=1), rand(1, 1, 3, 4, seed=2), rand(1, 1, 3, 4, seed=3)
    assert torch.equal(reference.attention_forward(q, k, v, dropout_p=0.0)[0],
                       reference.attention_forward(q, k, v)[0])
    with pytest.raises(ValueError, match="dropout_mask"):
        reference.attention_forward(q, k, v, dropout_p=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reference.attention_forward(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="bool"):
        reference.attention_forward(q, k, v, dropout_p=0.5, dropout_mask=torch.ones(3, 3))


def test_window_argument_checked() -> None:
    assert reference.check_window((3, -7)) == (3, -1)
    for bad in [(1,), 3, (1.5, 0), (True, 0)]:
        with pytest.raises(ValueError, match="window"):
            reference.check_window(bad)


def test_outside_band_is_the_complement_of_the_contract() -> None:
    for nq, nk in SHAPES:
        for causal, window in itertools.product(["none", "top_left", "bottom_right"], WINDOWS):
            rows, cols = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
            drop = reference.outside_band(rows, cols, causal, window, nq, nk)
            drop = torch.zeros(nq, nk, dtype=torch.bool) if drop is None else drop
            assert torch.equal(~drop, band_keep(nq, nk, causal, window)), (nq, nk, causal, window)
