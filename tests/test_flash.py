"""FlashAttention-2 kernel against the reference, with FlashAttention's error-ratio rule.

Without a GPU the kernels run under Triton's interpreter; TRITON_INTERPRET must be set before
triton decorates them, hence the import order below.
"""
import math
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from attnfuse.kernels import flash  # noqa: E402
from attnfuse.kernels.flash import (  # noqa: E402
    _tanh_parts, dropout_keep_mask, flash_backward, flash_forward, supports)
from attnfuse.kernels.reference import attention_backward, attention_forward  # noqa: E402
from attnfuse.testing import assert_error_ratio, reference_dtype  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEG_INF = float("-inf")


def _gen(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh inputs per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(gen, shape, dtype, transposed=False):
    """Random [B, H, N, E]; ``transposed`` builds [B, N, H, E] and views it as [B, H, N, E]."""
    if transposed:
        b, h, n, e = shape
        return torch.randn(b, n, h, e, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def _qkv(gen, b=1, hq=2, hkv=2, nq=17, nk=17, d=32, dv=None, dtype=torch.float16,
         transposed=False):
    return (_randn(gen, (b, hq, nq, d), dtype, transposed),
            _randn(gen, (b, hkv, nk, d), dtype, transposed),
            _randn(gen, (b, hkv, nk, d if dv is None else dv), dtype, transposed))


def assert_grad(name, g, ref, low, zero_bound):
    """Error-ratio rule; where dS cancels exactly (every row sees at most one key) the reference
    is identically 0 and only the fp32 rounding of dP − δ (``zero_bound``) is left to allow."""
    if ref.any():
        assert_error_ratio(name, g, ref, low)
    else:
        assert g.abs().max().item() <= zero_bound, f"{name}: {g.abs().max().item()} should be ~0"


def check(gen, q, k, v, mask=None, causal="none", mask_fill=NEG_INF, scale=None, mask_grad=False,
          softcap=0.0, window=(-1, -1), dropout_p=0.0):
    """Run forward + backward and compare every output with the reference; returns them.
    With dropout the reference gets the kernel's own keep mask (``dropout_keep_mask``)."""
    inputs = [t.clone() for t in (q, k, v) + ((mask,) if mask is not None else ())]
    rd = reference_dtype(q.dtype)
    rmask = mask if mask is None or mask.dtype == torch.bool else mask.to(rd)
    seed = None
    extra = dict(softcap=softcap, window=window)
    if dropout_p > 0:
        seed = torch.randint(0, 2**62, (1,), generator=gen).to(DEVICE)
        keep = dropout_keep_mask(seed, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p)
        extra.update(dropout_p=dropout_p, dropout_mask=keep)
    kern = dict(softcap=softcap, window=window, dropout_p=dropout_p, seed=seed)
    out, lse = flash_forward(q, k, v, mask, scale, causal, mask_fill, **kern)
    ref_out, ref_lse = attention_forward(q.to(rd), k.to(rd), v.to(rd), rmask, scale, causal,
                                         mask_fill, **extra)
    low_out, low_lse = attention_forward(q, k, v, mask, scale, causal, mask_fill, **extra,
                                         acc_dtype=q.dtype)
    assert out.shape == ref_out.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(lse == NEG_INF, ref_lse == NEG_INF), "empty rows (lse = -inf) disagree"
    assert_error_ratio("out", out, ref_out, low_out)
    assert_error_ratio("lse", lse, ref_lse, low_lse)

    dout = _randn(gen, out.shape, q.dtype)
    grads = flash_backward(dout, q, k, v, mask, out, lse, scale, causal, mask_fill, mask_grad,
                           **kern)
    ref = attention_backward(dout.to(rd), q.to(rd), k.to(rd), v.to(rd), rmask, ref_out, ref_lse,
                             scale, causal, mask_fill, mask_grad, **extra)
    low = attention_backward(dout, q, k, v, mask, low_out, low_lse, scale, causal, mask_fill,
                             mask_grad, **extra, acc_dtype=q.dtype)
    # |dP − δ| rounding: D products of |dO|·|v| in fp32; summed over at most n rows or keys.
    n = max(q.shape[2] * q.shape[1] // k.shape[1], k.shape[2])
    ds_noise = 2 * v.shape[-1] * torch.finfo(torch.float32).eps * (
        dout.abs().max() * v.float().abs().max()).item()
    qk = max(q.float().abs().max().item(), k.float().abs().max().item())
    sc = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    for name, g, r, lo, t in zip(("dq", "dk", "dv"), grads, ref, low, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous(), name
        assert not g.isnan().any(), name
        assert_grad(name, g, r, lo, n * ds_noise * sc * qk)
    if mask_grad:
        assert grads[3].shape == mask.shape and grads[3].dtype == mask.dtype
        assert_grad("dmask", grads[3], ref[3], low[3], n * ds_noise)
    else:
        assert grads[3] is None
    for before, after in zip(inputs, (q, k, v, mask)):
        assert torch.equal(before, after), "kernel wrote to an input"
    return out, lse, grads


def check_empty_rows(out, lse, dq, rows):
    """Rows with no allowed key: out 0, lse -inf, dq 0."""
    assert rows.any()
    assert (out[:, :, rows] == 0).all()
    assert (lse[:, :, rows] == NEG_INF).all()
    assert (dq[:, :, rows] == 0).all()


# ----------------------------------------------------------------------------- shapes and dtypes

@pytest.mark.parametrize("nq,nk", [(1, 1), (17, 17), (127, 127), (17, 45), (45, 1), (3, 1000)])
def test_lengths(nq, nk):
    gen = _gen("lengths", nq, nk)
    check(gen, *_qkv(gen, nq=nq, nk=nk, hq=1, hkv=1))


@pytest.mark.parametrize("d", [16, 40, 72, 80, 96, 160, 256])
def test_head_dims(d):
    gen = _gen("head_dims", d)
    dtype = torch.bfloat16 if d in (40, 160) else torch.float16
    check(gen, *_qkv(gen, nq=33, nk=20, d=d, hq=1, hkv=1, dtype=dtype))


def test_value_dim_differs():
    gen = _gen("dv")
    check(gen, *_qkv(gen, nq=19, nk=37, d=40, dv=72), causal="top_left")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype):
    gen = _gen("dtypes", dtype)
    check(gen, *_qkv(gen, nq=40, nk=50, dtype=dtype), scale=0.3)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1)])
@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_gqa(hq, hkv, causal):
    gen = _gen("gqa", hq, hkv, causal)
    check(gen, *_qkv(gen, b=2, hq=hq, hkv=hkv, nq=21, nk=35), causal=causal)


# ----------------------------------------------------------------------------- causal

@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("nq,nk", [(40, 40), (23, 61), (61, 23)])
def test_causal(causal, nq, nk):
    gen = _gen("causal", causal, nq, nk)
    dtype = torch.float32 if nq == nk else torch.float16
    out, lse, grads = check(gen, *_qkv(gen, nq=nq, nk=nk, dtype=dtype), causal=causal)
    if causal == "bottom_right" and nq > nk:
        check_empty_rows(out, lse, grads[0], torch.arange(nq, device=DEVICE) < nq - nk)


# ----------------------------------------------------------------------------- masks

def _bool_mask(gen, shape, p=0.7):
    return (torch.rand(shape, generator=gen) < p).to(DEVICE)


@pytest.mark.parametrize("fill", [NEG_INF, -1e4])
@pytest.mark.parametrize("kind", ["broadcast", "key_padding", "full", "expanded"])
def test_bool_masks(kind, fill):
    gen = _gen("bool", kind, fill)
    b, h, nq, nk = 2, 2, 19, 40
    q, k, v = _qkv(gen, b=b, hq=h, hkv=h, nq=nq, nk=nk)
    shape = {"broadcast": (1, 1, nq, nk), "key_padding": (b, 1, 1, nk), "full": (b, h, nq, nk),
             "expanded": (1, 1, 1, nk)}[kind]
    mask = _bool_mask(gen, shape)
    if kind == "expanded":
        mask = mask.expand(b, h, nq, nk)
        assert mask.stride() == (0, 0, 0, 1)
    check(gen, q, k, v, mask, mask_fill=fill)


@pytest.mark.parametrize("fill,dtype", [(NEG_INF, torch.float32), (-1e4, torch.float16),
                                        (-1e4, torch.bfloat16), (-1e4, torch.float32)])
def test_bool_mask_fully_masked_rows(fill, dtype):
    """An all-False row is empty with -inf fill, and a uniform average with a finite fill (fp32
    too: the backward's exact row statistics avoid the fp32 lse's rounding, |fill|·2⁻²⁴)."""
    gen = _gen("bool_rows", fill, dtype)
    q, k, v = _qkv(gen, nq=20, nk=24, dtype=dtype)
    mask = _bool_mask(gen, (1, 2, 20, 24))
    mask[:, :, 3] = False
    mask[:, 1, 17] = False
    out, lse, grads = check(gen, q, k, v, mask, mask_fill=fill, causal="top_left")
    if fill == NEG_INF:
        rows = torch.arange(20, device=DEVICE)
        check_empty_rows(out[:, :1], lse[:, :1], grads[0][:, :1], rows == 3)
        check_empty_rows(out[:, 1:], lse[:, 1:], grads[0][:, 1:], (rows == 3) | (rows == 17))


@pytest.mark.parametrize("mdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["full", "broadcast", "key_padding"])
def test_additive_masks_with_grad(mdtype, shape):
    gen = _gen("additive", mdtype, shape)
    b, h, nq, nk = 2, 2, 21, 33
    q, k, v = _qkv(gen, b=b, hq=h, hkv=1, nq=nq, nk=nk)
    dims = {"full": (b, h, nq, nk), "broadcast": (1, 1, nq, nk),
            "key_padding": (b, 1, 1, nk)}[shape]
    mask = torch.randn(dims, generator=gen)
    mask[torch.rand(dims, generator=gen) < 0.2] = NEG_INF
    if shape != "key_padding":
        mask[..., 4, :] = NEG_INF                       # a whole row masked: an empty row
    check(gen, q, k, v, mask.to(DEVICE, mdtype), causal="top_left" if shape == "full" else "none",
          mask_grad=True)


def test_additive_mask_expanded_and_noncontiguous():
    gen = _gen("additive_views")
    q, k, v = _qkv(gen, b=2, hq=2, hkv=2, nq=17, nk=30)
    base = torch.randn(1, 2, 60, 17, generator=gen).to(DEVICE).transpose(-1, -2)[..., ::2]
    mask = base.expand(2, 2, 17, 30)                    # stride 0 on batch, stride 2 on keys
    _, _, grads = check(gen, q, k, v, mask, mask_grad=True)
    assert grads[3].shape == (2, 2, 17, 30)


# ----------------------------------------------------------------------------- row-broadcast masks
# A mask with query-row stride 0 (key padding [B,1,1,Nk], biases [B,H,1,Nk] / [1,H,1,Nk]) runs
# the kernels' MASK_ROWS_BCAST variant: one [BLOCK_N] mask row per key tile, broadcast over rows.

def _key_padding(lengths, nk):
    """Bool key-padding mask [B, 1, 1, Nk]: batch b attends to its first lengths[b] keys."""
    keep = torch.arange(nk)[None, :] < torch.tensor(lengths)[:, None]
    return keep[:, None, None, :].to(DEVICE)


def _rows_bcast(mask, q):
    return flash._mask_args(mask, q, float("-inf"))[2]["MASK_ROWS_BCAST"]


def check_empty_batch(out, lse, grads, b):
    """Batch ``b`` attends to no key at all: out 0, lse -inf, and dq, dk, dv all 0."""
    assert (out[b] == 0).all() and (lse[b] == NEG_INF).all()
    for g in grads[:3]:
        assert (g[b] == 0).all()


@pytest.mark.parametrize("fill,dtype,causal,d", [
    (NEG_INF, torch.float16, "none", 40),
    (-1e4, torch.bfloat16, "none", 72),
    (torch.finfo(torch.float16).min, torch.float16, "none", 40),
    (NEG_INF, torch.bfloat16, "top_left", 72),
    (NEG_INF, torch.float16, "bottom_right", 40),
    (-1e4, torch.float16, "bottom_right", 72),
])
def test_key_padding_bool(fill, dtype, causal, d):
    """Bool key padding [B,1,1,Nk]; batch 1 has every key padded: with -inf fill it is empty
    (out 0, lse -inf, zero grads), with a finite fill a uniform average (filled scores are the
    fill itself, not score + fill)."""
    gen = _gen("key_padding_bool", fill, dtype, causal, d)
    q, k, v = _qkv(gen, b=2, hq=2, hkv=2, nq=17, nk=33, d=d, dtype=dtype)
    mask = _key_padding([21, 0], 33)
    assert _rows_bcast(mask, q)
    out, lse, grads = check(gen, q, k, v, mask, causal=causal, mask_fill=fill)
    if fill == NEG_INF:
        check_empty_batch(out, lse, grads, 1)
    else:
        assert lse[1].isfinite().all()
        uniform = v[1].float().mean(1, keepdim=True).expand(2, 17, d)
        if causal == "none":
            torch.testing.assert_close(out[1].float(), uniform, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_key_padding_trims_key_tiles(kind):
    """Left and right padding, holes, a row with one kept key, per batch and per head: the key
    loops run only between the first and last kept key (TRIM_KEYS), and the results are the
    reference's. A finite bool fill is not trimmed (a fully masked row averages its keys)."""
    gen = _gen("trim_keys", kind)
    nk = 70
    q, k, v = _qkv(gen, b=3, hq=2, hkv=1, nq=37, nk=nk, d=40, dtype=torch.bfloat16)
    keep = torch.zeros(3, 2, 1, nk, dtype=torch.bool)
    keep[0, :, :, 20:55] = True                      # left and right padding
    keep[0, 1, :, 30:33] = False                     # a hole in one head
    keep[1, 0, :, 69] = True                         # the last key only
    keep[1, 1, :, :3] = True                         # the first keys only
    keep[2, :, :, 5:6] = True                        # one key, both heads
    keep = keep.to(DEVICE)
    mask = keep if kind == "bool" else torch.zeros(keep.shape, device=DEVICE).masked_fill(
        ~keep, NEG_INF)
    assert flash._mask_args(mask, q, NEG_INF)[2]["TRIM_KEYS"]
    for causal in ("none", "bottom_right"):
        check(gen, q, k, v, mask, causal=causal)
    if kind == "bool":
        assert not flash._mask_args(mask, q, -1e4)[2]["TRIM_KEYS"]
        check(gen, q, k, v, mask, mask_fill=-1e4)


@pytest.mark.skipif(DEVICE == "cuda", reason="tile size 16 is the interpreter's")
def test_key_padding_skips_padded_tiles():
    """Key tiles wholly outside the kept range are never read: NaN keys and values there leave
    out, dq finite and dk, dv of those keys 0 (a read would spread the NaN, as 0·NaN = NaN)."""
    gen = _gen("skips_padded_tiles")
    q, k, v = _qkv(gen, b=1, hq=2, hkv=2, nq=20, nk=80, d=32)
    keep = torch.zeros(1, 1, 1, 80, dtype=torch.bool, device=DEVICE)
    keep[..., 20:45] = True                          # tiles [16, 48) are visited
    clean_out, _ = flash_forward(q, k, v, keep)
    k[:, :, :16], v[:, :, :16], k[:, :, 48:], v[:, :, 48:] = (float("nan"),) * 4
    out, lse = flash_forward(q, k, v, keep)
    torch.testing.assert_close(out, clean_out, atol=0, rtol=0)
    dq, dk, dv, _ = flash_backward(torch.ones_like(out), q, k, v, keep, out, lse)
    assert dq.isfinite().all() and dk[:, :, 16:48].isfinite().all()
    assert (dk[:, :, :16] == 0).all() and (dv[:, :, 48:] == 0).all()


def test_key_padding_finite_fill_bf16_min():
    """fill = finfo(bfloat16).min (as HF models pad; ~-3.4e38, clamped to a huge finite base-2
    score) on partly padded rows, the lengths ending inside different key tiles."""
    gen = _gen("key_padding_bf16_min")
    q, k, v = _qkv(gen, b=2, hq=1, hkv=1, nq=19, nk=40, d=40, dtype=torch.bfloat16)
    check(gen, q, k, v, _key_padding([33, 7], 40), mask_fill=torch.finfo(torch.bfloat16).min)


@pytest.mark.parametrize("hq,hkv,causal", [(4, 2, "none"), (4, 1, "bottom_right")])
def test_key_padding_gqa(hq, hkv, causal):
    """GQA with key padding, Nq != Nk; also [B,Hq,1,Nk] (per-head rows) read the same way."""
    gen = _gen("key_padding_gqa", hq, hkv, causal)
    q, k, v = _qkv(gen, b=2, hq=hq, hkv=hkv, nq=21, nk=35, d=40, dtype=torch.bfloat16)
    mask = _key_padding([35, 9], 35)
    assert _rows_bcast(mask, q)
    check(gen, q, k, v, mask, causal=causal)
    per_head = _bool_mask(gen, (2, hq, 1, 35), p=0.8)
    per_head[1, 0] = False                              # one head of batch 1 sees no key
    assert _rows_bcast(per_head, q)
    out, lse, grads = check(gen, q, k, v, per_head, causal=causal)
    assert (out[1, 0] == 0).all() and (lse[1, 0] == NEG_INF).all() and (grads[0][1, 0] == 0).all()


@pytest.mark.parametrize("shape,mdtype,d", [("key_padding", torch.float32, 40),
                                            ("key_padding", torch.bfloat16, 72),
                                            ("per_head", torch.float32, 72),
                                            ("per_head", torch.float16, 40)])
def test_row_broadcast_bias_with_grad(shape, mdtype, d):
    """Additive biases [B,1,1,Nk] and [1,H,1,Nk] with -inf entries, requiring grad: dmask (dS
    summed over the broadcast rows, heads or batches) against the reference. For [B,1,1,Nk]
    batch 1's keys are all -inf: an empty batch."""
    gen = _gen("row_bias", shape, mdtype, d)
    b, h, nq, nk = 2, 2, 17, 33
    q, k, v = _qkv(gen, b=b, hq=h, hkv=1, nq=nq, nk=nk, d=d)
    dims = {"key_padding": (b, 1, 1, nk), "per_head": (1, h, 1, nk)}[shape]
    mask = _additive_mask(gen, dims)
    if shape == "key_padding":
        mask[1] = NEG_INF
    mask = mask.to(DEVICE, mdtype)
    assert _rows_bcast(mask, q)
    out, lse, grads = check(gen, q, k, v, mask, mask_grad=True)
    assert grads[3].shape == dims and grads[3].dtype == mdtype
    if shape == "key_padding":
        check_empty_batch(out, lse, grads, 1)
        assert (grads[3][1] == 0).all()


@pytest.mark.parametrize("nq,nk,causal", [(17, 33, "top_left"), (33, 17, "bottom_right"),
                                          (1, 40, "none")])
def test_row_broadcast_bias_odd_lengths(nq, nk, causal):
    """Ragged key tiles (the row is bounds-checked on edge tiles only), causal, decode (Nq = 1:
    a full [B,H,1,Nk] mask is a row-broadcast one)."""
    gen = _gen("row_bias_lengths", nq, nk, causal)
    q, k, v = _qkv(gen, b=2, hq=2, hkv=2, nq=nq, nk=nk, d=40, dtype=torch.bfloat16)
    mask = _additive_mask(gen, (2, 2 if nq == 1 else 1, 1, nk)).to(DEVICE, torch.bfloat16)
    assert _rows_bcast(mask, q)
    check(gen, q, k, v, mask, causal=causal, mask_grad=True)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_row_broadcast_with_softcap_dropout_window(mask_kind):
    """Key padding under a soft-cap (the row rides on the cap's scale), dropout and a window."""
    gen = _gen("row_cap_drop", mask_kind)
    q, k, v = _capped_qkv(gen, 5.0, b=2, hq=2, hkv=1, nq=19, nk=37, d=40, dtype=torch.bfloat16)
    if mask_kind == "bool":
        mask, grad = _key_padding([37, 11], 37), False
    else:
        mask, grad = _additive_mask(gen, (2, 1, 1, 37)).to(DEVICE, torch.bfloat16), True
    assert _rows_bcast(mask, q)
    check(gen, q, k, v, mask, causal="bottom_right", mask_fill=-1e4, softcap=5.0,
          window=(20, -1), dropout_p=0.2, mask_grad=grad)


@pytest.mark.parametrize("kind", ["bool_inf", "bool_finite", "additive"])
def test_row_broadcast_matches_dense(kind):
    """The row-broadcast reads agree with the dense-tile reads of the same mask materialised
    [B,H,Nq,Nk] (bitwise under the interpreter, where the arithmetic is the same)."""
    gen = _gen("row_vs_dense", kind)
    b, h, nq, nk = 2, 2, 20, 37
    q, k, v = _qkv(gen, b=b, hq=h, hkv=h, nq=nq, nk=nk, d=40)
    fill = -1e4 if kind == "bool_finite" else NEG_INF
    if kind == "additive":
        row = _additive_mask(gen, (b, 1, 1, nk)).to(DEVICE)
    else:
        row = _key_padding([30, 3], nk)
    dense = row.expand(b, h, nq, nk).contiguous()
    assert _rows_bcast(row, q) and not _rows_bcast(dense, q)
    dout = _randn(gen, (b, h, nq, q.shape[-1]), q.dtype)
    grad = kind == "additive"
    results = []
    for m in (row, dense):
        out, lse = flash_forward(q, k, v, m, mask_fill=fill, causal="top_left")
        results.append((out, lse, *flash_backward(dout, q, k, v, m, out, lse, causal="top_left",
                                                  mask_fill=fill, mask_grad=grad)))
    names = ("out", "lse", "dq", "dk", "dv", "dmask")
    for name, a, c in zip(names, *results):
        if name == "dmask":
            if not grad:
                continue
            c = c.sum((1, 2), keepdim=True)              # the dense mask's grad, reduced
        if flash._INTERPRET and name != "dmask":
            assert torch.equal(a, c), name
        else:
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-3, msg=name)


def test_row_broadcast_flag_and_configs():
    """Which masks take the row-broadcast variant, and that they autotune like unmasked launches
    (the narrow/plain/banded tables) under their own autotuning key."""
    q = torch.zeros(2, 2, 17, 64, device=DEVICE, dtype=torch.float16)
    kp = torch.ones(2, 1, 1, 33, dtype=torch.bool, device=DEVICE)
    assert _rows_bcast(kp, q)
    assert _rows_bcast(torch.zeros(1, 2, 1, 33, device=DEVICE), q)
    assert _rows_bcast(kp.expand(2, 2, 17, 33), q)                   # stride-0 query rows
    assert not _rows_bcast(torch.ones(2, 1, 17, 33, dtype=torch.bool, device=DEVICE), q)
    assert not _rows_bcast(None, q)
    assert "MASK_ROWS_BCAST" in flash._TUNE_KEY
    base = dict(BLOCK_D=64, BLOCK_DV=64, PREC="tf32", BANDED=0)
    row = dict(base, MASK_KIND=flash._BOOL_MASK.value, MASK_ROWS_BCAST=True)
    dense = dict(base, MASK_KIND=flash._BOOL_MASK.value, MASK_ROWS_BCAST=False)
    none = dict(base, MASK_KIND=flash._NO_MASK.value, MASK_ROWS_BCAST=False)
    for forward in (True, False):
        assert flash._situation(row, forward) == flash._situation(none, forward)
        assert flash._situation(dense, forward) == "masked"
    assert flash._situation(dict(row, BANDED=1), True) == "banded"
    assert flash._situation(dict(row, BLOCK_D=128, BLOCK_DV=128), True) == "plain"


def test_mask_grad_needs_float_mask():
    gen = _gen("mask_grad_bool")
    q, k, v = _qkv(gen)
    mask = _bool_mask(gen, (1, 1, 17, 17))
    out, lse = flash_forward(q, k, v, mask)
    with pytest.raises(ValueError):
        flash_backward(out, q, k, v, mask, out, lse, mask_grad=True)


# ----------------------------------------------------------------------------- layouts

def test_noncontiguous_inputs():
    gen = _gen("noncontig")
    q, k, v = _qkv(gen, b=2, hq=4, hkv=2, nq=23, nk=31, d=40, transposed=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    check(gen, q, k, v, causal="bottom_right")


def test_strided_dout_and_out():
    """dout from autograd may be an expanded (all-stride-0) view; out may be a strided view."""
    gen = _gen("dout_views")
    q, k, v = _qkv(gen, hq=2, hkv=1, nq=20, nk=18)
    out, lse = flash_forward(q, k, v)
    dout = torch.full((), 0.5, dtype=q.dtype, device=DEVICE).expand(out.shape)
    out_view = out.transpose(1, 2).contiguous().transpose(1, 2)
    got = flash_backward(dout, q, k, v, None, out_view, lse)
    want = flash_backward(dout.contiguous(), q, k, v, None, out, lse)
    for g, w in zip(got[:3], want[:3]):
        assert torch.equal(g, w)


def test_supports_reasons():
    gen = _gen("supports")
    q, k, v = _qkv(gen)
    assert supports(q, k, v, None, "none") == []
    big = torch.zeros(1, 2, 17, 300, device=DEVICE, dtype=torch.float16)
    assert any("head dim 300 > 256" in r for r in supports(big, big, big, None, "none"))
    q64, k64, v64 = (t.double() for t in (q, k, v))
    assert any("float64 not supported" in r for r in supports(q64, k64, v64, None, "none"))
    strided = torch.zeros(1, 2, 17, 64, device=DEVICE, dtype=torch.float16)[..., ::2]
    assert any("last-dim stride of k is 2" in r for r in supports(q, strided, v, None, "none"))
    assert any("causal" in r for r in supports(q, k, v, None, "diagonal"))
    bad_mask = torch.ones(1, 3, 17, 17, dtype=torch.bool, device=DEVICE)
    assert any("broadcastable" in r for r in supports(q, k, v, bad_mask, "none"))
    with pytest.raises(ValueError, match="head dim 300"):
        flash_forward(big, big, big)


# ----------------------------------------------------------------------------- property test

@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 2),
       nq=st.integers(1, 40), nk=st.integers(1, 40), d=st.sampled_from([16, 24, 40]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       causal=st.sampled_from(["none", "top_left", "bottom_right"]),
       mask_kind=st.sampled_from([None, "bool", "float"]), seed=st.integers(0, 2**16))
def test_property(b, hkv, group, nq, nk, d, dtype, causal, mask_kind, seed):
    """Random small problems. fp16/bf16 only: against torch's fp32 math the 2x rule is a near tie
    for an lse-recomputing, block-accumulating fp32 kernel on tiny random shapes (see test_dtypes,
    test_causal and test_bool_mask_fully_masked_rows for fixed fp32 cases)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(gen, b=b, hq=hkv * group, hkv=hkv, nq=nq, nk=nk, d=d, dtype=dtype)
    mask = None
    if mask_kind == "bool":
        mask = _bool_mask(gen, (b, 1, nq, nk))
    elif mask_kind == "float":
        mask = torch.randn(1, hkv * group, nq, nk, generator=gen).to(DEVICE)
    check(gen, q, k, v, mask, causal, scale=1.0 / math.sqrt(d) * 1.5,
          mask_grad=mask_kind == "float")


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(b=st.integers(1, 2), group=st.integers(1, 2), nq=st.integers(1, 40),
       nk=st.integers(1, 40), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       causal=st.sampled_from(["none", "top_left", "bottom_right"]), seed=st.integers(0, 2**16))
def test_property_padded_finite_masks(b, group, nq, nk, dtype, causal, seed):
    """Random transformers-style additive masks: a finite fill on each sequence's left padding
    and on some query rows, so that rows are fully masked by a finite fill (the backward's exact
    row statistics), with the mask's gradient. The fill is -1e9 in bf16 (beside it, an fp32 lse
    keeps nothing of log2 l) and -65504 in fp16 (its largest)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(gen, b=b, hq=2 * group, hkv=2, nq=nq, nk=nk, d=24, dtype=dtype)
    pad = torch.randint(0, nk + 1, (b,), generator=gen)
    rows = torch.rand(b, nq, generator=gen) < 0.2
    drop = (torch.arange(nk)[None, None, :] < pad[:, None, None]) | rows[:, :, None]
    fill = -1e9 if dtype == torch.bfloat16 else -65504.0
    mask = torch.zeros(b, 1, nq, nk).masked_fill(drop[:, None], fill).to(DEVICE, dtype)
    check(gen, q, k, v, mask, causal, mask_grad=True)


# ----------------------------------------------------------------------------- soft-capping

def _capped_qkv(gen, softcap, **kw):
    """q scaled so that the scores reach the bend of the cap: about 30x for Gemma 2's 50 (scores
    of std ~30), 4x for a cap of 5 (std ~4); unscaled scores (std ~1) would barely be capped."""
    q, k, v = _qkv(gen, **kw)
    return q * (30 if softcap == 50.0 else 4), k, v


def _additive_mask(gen, shape):
    mask = torch.randn(shape, generator=gen)
    mask[torch.rand(shape, generator=gen) < 0.2] = NEG_INF
    return mask


@pytest.mark.parametrize("softcap", [50.0, 5.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softcap_dtypes(dtype, softcap):
    """GQA, bottom-right causal and a grad-requiring additive mask (gradient of the capped
    scores), for out, lse, dq, dk, dv and dmask."""
    gen = _gen("softcap_dtypes", dtype, softcap)
    d = 72 if dtype == torch.bfloat16 else 40
    q, k, v = _capped_qkv(gen, softcap, hq=4, hkv=2, nq=17, nk=29, d=d, dtype=dtype)
    mask = _additive_mask(gen, (1, 4, 17, 29)).to(DEVICE, torch.float32)
    check(gen, q, k, v, mask, causal="bottom_right", mask_grad=True, softcap=softcap)


def test_softcap_fp32():
    """fp32 with a cap of 5, on test_dtypes' shape.

    Not fp32 with Gemma 2's cap: scores bent near ±50 give |lse| ~ 50, and the backward's
    p = exp(s − lse) inherits the fp32 lse's rounding, |lse|·2⁻²⁴, several times torch's fp32
    error (torch renormalises by the row sum); uncapped scores of that size fail alike (see
    test_bool_mask_fully_masked_rows). fp32 with the additive mask of test_softcap_dtypes is a
    near tie with or without the cap (see test_property)."""
    gen = _gen("softcap_fp32")
    q, k, v = _capped_qkv(gen, 5.0, nq=40, nk=50, d=40, dtype=torch.float32)
    check(gen, q, k, v, softcap=5.0)


@pytest.mark.parametrize("nq,nk,causal,dtype", [
    (1, 1, "top_left", torch.float16), (1, 17, "bottom_right", torch.bfloat16),
    (17, 17, "top_left", torch.bfloat16), (127, 127, "bottom_right", torch.float16),
    (127, 17, "top_left", torch.float16)])
def test_softcap_lengths(nq, nk, causal, dtype):
    """Odd lengths with Gemma 2's cap, GQA 2:1, head dim 72 and a broadcast additive mask."""
    gen = _gen("softcap_lengths", nq, nk, causal, dtype)
    q, k, v = _capped_qkv(gen, 50.0, hq=2, hkv=1, nq=nq, nk=nk, d=72, dtype=dtype)
    mask = _additive_mask(gen, (1, 1, nq, nk)).to(DEVICE, dtype)
    check(gen, q, k, v, mask, causal=causal, mask_grad=True, softcap=50.0)


@pytest.mark.parametrize("fill", [NEG_INF, -1e4])
def test_softcap_bool_mask(fill):
    """A bool mask fills after the cap: filled scores are exactly ``fill`` and get no gradient."""
    gen = _gen("softcap_bool", fill)
    q, k, v = _capped_qkv(gen, 5.0, hq=2, hkv=2, nq=19, nk=24, d=40)
    check(gen, q, k, v, _bool_mask(gen, (1, 2, 19, 24)), causal="top_left", mask_fill=fill,
          softcap=5.0)


def test_softcap_huge_scores():
    """Raw scores of ~1e4 saturate tanh: the capped scores sit at ±cap, nothing overflows."""
    gen = _gen("softcap_huge")
    q, k, v = _qkv(gen, hq=2, hkv=1, nq=18, nk=20, d=40, dtype=torch.float32)
    q = q * 2e3
    out, lse, grads = check(gen, q, k, v, causal="bottom_right", softcap=5.0)
    assert lse.isfinite().all() and all(g.isfinite().all() for g in grads[:3])
    assert (lse <= 5.0 + math.log(20) + 1e-5).all()   # every capped score is at most 5


def test_softcap_changes_scores():
    """The cap is applied (and not a no-op) in the kernel: capped and uncapped outputs differ by
    far more than the kernel's own error."""
    gen = _gen("softcap_changes")
    q, k, v = _capped_qkv(gen, 50.0, nq=17, nk=17, d=40, dtype=torch.float32)
    capped, _ = flash_forward(q, k, v, softcap=50.0)
    plain, _ = flash_forward(q, k, v)
    assert (capped - plain).abs().max().item() > 0.1
    assert torch.equal(plain, flash_forward(q, k, v, softcap=0.0)[0])


@pytest.mark.parametrize("bad", [-1.0, -0.0 - 1e-3, float("nan"), float("inf"), float("-inf")])
def test_softcap_rejects_bad_values(bad):
    gen = _gen("softcap_bad")
    q, k, v = _qkv(gen)
    out, lse = flash_forward(q, k, v)
    msg = "expected a positive finite float, or 0 to disable"
    for call in (lambda: flash_forward(q, k, v, softcap=bad),
                 lambda: flash_backward(out, q, k, v, None, out, lse, softcap=bad),
                 lambda: attention_forward(q, k, v, softcap=bad),
                 lambda: attention_backward(out, q, k, v, None, out, lse, softcap=bad)):
        with pytest.raises(ValueError, match=msg):
            call()


@triton.jit
def _tanh_parts_kernel(X, T, DT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t, dt = _tanh_parts(tl.load(X + offs, mask=offs < N))
    tl.store(T + offs, t, mask=offs < N)
    tl.store(DT + offs, dt, mask=offs < N)


def test_tanh_parts_accuracy():
    """The kernel's exp2-based (tanh x, 1 − tanh² x) against fp64: tanh within 4 eps relative
    (a GPU's exp2 and division are 2-ulp approximations); 1 − tanh² within eps·(4 + 2|x|)
    relative (rounding the exponent 2|x|·log2 e costs |x|·eps) for |x| <= 40, below 1e-34
    beyond; finite everywhere, ±1e4 and ±3e38 included. The naive 1 − 2/(e^{2x} + 1) fails the
    first near 0, and 1 − t² the second for |x| > 2 or so."""
    grid = torch.linspace(-48, 48, 20001)
    tiny = torch.logspace(-30, 0, 301)
    edges = torch.tensor([0.0, 0.625, 0.6249999, 0.6250001, 1e4, 3e38])
    x = torch.cat([grid, tiny, -tiny, edges, -edges]).to(DEVICE, torch.float32)
    t, dt = torch.empty_like(x), torch.empty_like(x)
    _tanh_parts_kernel[(triton.cdiv(x.numel(), 1024),)](x, t, dt, x.numel(), BLOCK=1024)
    assert t.isfinite().all() and dt.isfinite().all()
    eps = torch.finfo(torch.float32).eps
    x64, t64, dt64 = (y.double().cpu() for y in (x, t, dt))
    want = torch.tanh(x64)
    assert ((t64 - want).abs() <= 4 * eps * want.abs()).all(), "tanh"
    a = x64.abs()
    want_dt = 4 * torch.exp(-2 * a) / (1 + torch.exp(-2 * a)) ** 2     # 1 − tanh², no cancellation
    inside = a <= 40
    assert ((dt64 - want_dt).abs() <= eps * (4 + 2 * a) * want_dt)[inside].all(), "1 - tanh^2"
    assert (dt64[~inside] <= 1e-34).all() and (t64[~inside].abs() == 1).all()


def _eager_capped(q, k, v, mask, scale, causal, softcap, mask_fill=NEG_INF):
    """The semantics written out in plain PyTorch: GQA by repeat_interleave, cap, mask, causal."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = scale * q @ k.transpose(-1, -2)
    s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, mask_fill) if mask.dtype == torch.bool else s + mask
    if causal != "none":
        nq, nk = s.shape[-2:]
        offset = 0 if causal == "top_left" else nk - nq
        band = torch.ones(nq, nk, dtype=torch.bool).tril(offset).to(s.device)
        s = s.masked_fill(~band, NEG_INF)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


@pytest.mark.parametrize("mask_kind,causal", [("additive", "bottom_right"),
                                              ("bool", "top_left"), (None, "none")])
def test_reference_softcap_matches_eager(mask_kind, causal):
    """The oracle itself, in fp64, against the eager formula and its autograd: out, lse, and
    dq, dk, dv, dmask from both attention_backward and autograd through attention_forward."""
    gen = _gen("softcap_oracle", mask_kind, causal)
    softcap, scale = 50.0, 0.3
    q, k, v = _capped_qkv(gen, softcap, b=2, hq=4, hkv=2, nq=13, nk=21, d=24,
                          dtype=torch.float64)
    mask = None
    if mask_kind == "additive":
        mask = torch.randn(2, 1, 13, 21, generator=gen, dtype=torch.float64).to(DEVICE) * 3
    elif mask_kind == "bool":
        mask = _bool_mask(gen, (2, 4, 13, 21))
        mask[..., 0] = True                                     # no empty row: eager gives NaN
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if mask_kind == "additive":
        leaves.append(mask.clone().requires_grad_())
    m = leaves[3] if mask_kind == "additive" else mask
    want_out, want_lse = _eager_capped(*leaves[:3], m, scale, causal, softcap)
    dout = torch.randn(want_out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    want_grads = torch.autograd.grad(want_out, leaves, dout)
    out, lse = attention_forward(*leaves[:3], m, scale, causal, softcap=softcap, chunk=5)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    autograd_grads = torch.autograd.grad(out, leaves, dout)
    grads = attention_backward(dout, q, k, v, mask, out.detach(), lse.detach(), scale, causal,
                               mask_grad=mask_kind == "additive", softcap=softcap, chunk=5)
    for name, w, a, g in zip(("dq", "dk", "dv", "dmask"), want_grads, autograd_grads, grads):
        torch.testing.assert_close(a, w, msg=f"autograd {name}")
        torch.testing.assert_close(g, w, msg=f"attention_backward {name}")
    # The cap bends these scores: without it the output is far away.
    plain, _ = attention_forward(q, k, v, mask, scale, causal)
    assert (plain - out).abs().max().item() > 0.1


# ----------------------------------------------------------------------------- sliding windows

def _band(nq, nk, causal, window):
    """Dense bool band of the window semantics (independent of the kernel's tile arithmetic)."""
    left, right = window
    off = nk - nq if causal == "bottom_right" else 0
    if causal != "none":
        right = 0
    i = torch.arange(nq)[:, None] + off
    j = torch.arange(nk)[None, :]
    keep = torch.ones(nq, nk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


@pytest.mark.parametrize("nq,nk,causal,window", [
    (100, 100, "top_left", (31, 0)),        # Mistral-style sliding window
    (100, 100, "none", (7, 9)),             # local bidirectional
    (47, 130, "bottom_right", (20, -1)),    # KV-cache alignment, Nq < Nk
    (130, 47, "bottom_right", (5, -1)),     # Nq > Nk: leading rows see nothing
    (64, 64, "none", (0, 0)),               # diagonal only
    (33, 90, "none", (-1, 3)),              # right edge only
    (1, 77, "bottom_right", (16, 0)),       # decode step
])
def test_window(nq, nk, causal, window):
    gen = _gen("window", nq, nk, causal, window)
    q, k, v = _qkv(gen, b=1, hq=4, hkv=2, nq=nq, nk=nk, d=40, dtype=torch.bfloat16)
    out, lse, (dq, *_) = check(gen, q, k, v, causal=causal, window=window)
    empty = ~_band(nq, nk, causal, window).any(-1)
    if empty.any():
        check_empty_rows(out, lse, dq, empty.to(DEVICE))


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_window_with_mask(mask_kind):
    gen = _gen("window_mask", mask_kind)
    q, k, v = _qkv(gen, b=2, hq=2, hkv=1, nq=70, nk=70, d=32)
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 1, 70, generator=gen).to(DEVICE) > 0.25
        check(gen, q, k, v, mask, causal="top_left", window=(12, 0))
    else:
        mask = torch.randn(1, 2, 70, 70, generator=gen).to(DEVICE, torch.float16)
        check(gen, q, k, v, mask, window=(9, 4), mask_grad=True)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(nq=st.integers(1, 70), nk=st.integers(1, 70),
       causal=st.sampled_from(["none", "top_left", "bottom_right"]),
       left=st.integers(-1, 40), right=st.integers(-1, 40))
def test_window_tiles_property(nq, nk, causal, left, right):
    """Every (length, band) combination: the full/edge tile split never drops or adds a key."""
    gen = _gen("window_prop", nq, nk, causal, left, right)
    q, k, v = _qkv(gen, hq=1, hkv=1, nq=nq, nk=nk, d=16, dtype=torch.float32)
    out, lse = flash_forward(q, k, v, None, None, causal, window=(left, right))
    band = _band(nq, nk, causal, (left, right)).to(DEVICE)
    ref_out, ref_lse = attention_forward(q.double(), k.double(), v.double(), band[None, None])
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-4)


def test_window_validation():
    q, k, v = _qkv(_gen("wv"), nq=4, nk=4)
    for bad in [(1,), (1.5, 0), (None, 0), "left", (True, 0)]:
        with pytest.raises(ValueError, match="window"):
            flash_forward(q, k, v, window=bad)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("causal,mask_kind,hkv", [("none", None, 2), ("top_left", "bool", 1),
                                                   ("bottom_right", "additive", 2)])
def test_dropout_matches_reference(causal, mask_kind, hkv):
    """Forward and backward with dropout against the reference given the kernel's keep mask:
    the forward and both backward kernels draw the same Philox numbers for each (row, key)."""
    gen = _gen("dropout", causal, mask_kind, hkv)
    q, k, v = _qkv(gen, b=2, hq=2, hkv=hkv, nq=37, nk=53, d=32, dtype=torch.bfloat16)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 37, 53, generator=gen).to(DEVICE) > 0.2
    elif mask_kind == "additive":
        mask = torch.randn(1, 2, 37, 53, generator=gen).to(DEVICE, torch.bfloat16)
    check(gen, q, k, v, mask, causal=causal, dropout_p=0.3, window=(20, -1),
          mask_grad=mask_kind == "additive")


def test_dropout_mask_statistics_and_reproducibility():
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    keep = dropout_keep_mask(seed, (2, 3, 64, 96), 0.25)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - 0.75) < 5 * math.sqrt(0.75 * 0.25 / n), rate
    assert torch.equal(keep, dropout_keep_mask(seed, (2, 3, 64, 96), 0.25)), "not reproducible"
    # Heads and batches draw different streams; a different seed gives a different mask.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep, dropout_keep_mask(seed + 1, (2, 3, 64, 96), 0.25))


def test_dropout_reproducible_and_extremes():
    gen = _gen("dropout_extremes")
    q, k, v = _qkv(gen, nq=20, nk=30, d=16)
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    a, lse_a = flash_forward(q, k, v, dropout_p=0.5, seed=seed)
    b, lse_b = flash_forward(q, k, v, dropout_p=0.5, seed=seed)
    assert torch.equal(a, b) and torch.equal(lse_a, lse_b)
    plain, lse_plain = flash_forward(q, k, v)
    assert torch.equal(lse_a, lse_plain), "dropout must not change the softmax statistics"
    zero, _ = flash_forward(q, k, v, dropout_p=1.0, seed=seed)
    assert (zero == 0).all()
    unseeded, lse_unseeded = flash_forward(q, k, v, dropout_p=1.0)   # nothing random to draw
    assert (unseeded == 0).all() and torch.equal(lse_unseeded, lse_plain)
    grads = flash_backward(torch.ones_like(zero), q, k, v, None, zero, lse_plain, dropout_p=1.0,
                           seed=seed)
    assert all((g == 0).all() for g in grads[:3])
    with pytest.raises(ValueError, match="seed"):
        flash_forward(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_forward(q, k, v, dropout_p=1.5, seed=seed)


def test_backward_is_deterministic():
    """No atomics: two backward runs are bitwise equal (GQA, bias gradient, dropout)."""
    gen = _gen("deterministic")
    q, k, v = _qkv(gen, b=1, hq=4, hkv=2, nq=45, nk=45, d=32)
    bias = torch.randn(1, 4, 45, 45, generator=gen).to(DEVICE, torch.float16)
    seed = torch.tensor([3], dtype=torch.int64, device=DEVICE)
    out, lse = flash_forward(q, k, v, bias, causal="top_left", dropout_p=0.1, seed=seed)
    dout = _randn(gen, out.shape, out.dtype)
    runs = [flash_backward(dout, q, k, v, bias, out, lse, causal="top_left", mask_grad=True,
                           dropout_p=0.1, seed=seed) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- TMA descriptors

@pytest.mark.skipif(DEVICE == "cuda", reason="descriptor choice is the hardware's on a GPU")
@pytest.mark.skipif(flash.TensorDescriptor is None, reason="triton without tensor descriptors")
@pytest.mark.parametrize("causal,window,transposed", [("none", (-1, -1), False),
                                                       ("top_left", (-1, -1), True),
                                                       ("bottom_right", (9, -1), False)])
def test_descriptor_loads(monkeypatch, causal, window, transposed):
    """The forward's tensor-descriptor path (Hopper's TMA loads), run by the interpreter."""
    monkeypatch.setattr(flash, "INTERPRET_DESC", True)
    gen = _gen("desc", causal, window, transposed)
    q, k, v = _qkv(gen, b=2, hq=4, hkv=2, nq=45, nk=70, d=32, dtype=torch.bfloat16,
                   transposed=transposed)
    _, ok = flash._descriptors(q, k, v, torch.empty_like(q))
    assert ok, "these layouts are 16-byte aligned: descriptors must be used"
    check(gen, q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_additive_mask_huge_fills(dtype):
    """A dense additive mask takes a fast path (log2e·bias in one FMA, no clamp), where a
    finfo.min entry overflows to -inf; a block whose row is left with no key is recomputed
    exactly. Row 3: every key finfo.min (bf16: the eager model averages the keys); row 35: every key
    -inf (empty: 0); other rows partly finfo.min; the block of rows 16-31 has no such row."""
    gen = _gen("dense_huge_fills", dtype)
    q, k, v = _qkv(gen, b=2, hq=2, hkv=2, nq=40, nk=50, d=32, dtype=dtype)
    lo = torch.finfo(dtype).min
    mask = _randn(gen, (2, 2, 40, 50), dtype)
    mask[..., 7:50:3] = lo                  # partly masked rows
    mask[:, :, 3] = lo                      # fully masked, finite
    mask[:, :, 35] = NEG_INF                # fully masked, -inf
    out, lse = flash_forward(q, k, v, mask)
    rd = reference_dtype(dtype)
    ref_out, ref_lse = attention_forward(q.to(rd), k.to(rd), v.to(rd), mask.to(rd))
    low_out, low_lse = attention_forward(q, k, v, mask, acc_dtype=dtype)
    assert_error_ratio("out", out, ref_out, low_out)
    rows = torch.arange(40) != 3   # row 3's lse: its base-2 scores are clamped to finite
    assert_error_ratio("lse", lse[:, :, rows], ref_lse[:, :, rows], low_lse[:, :, rows])
    assert lse[:, :, 3].isfinite().all()
    if lo < -1e38:   # bf16: q·k vanishes beside the fill, the scores are equal (fp16: -65504)
        uniform = v.float().mean(2)         # [B, H, D]
        torch.testing.assert_close(out[:, :, 3].float(), uniform, atol=2e-2, rtol=2e-2)
    assert (out[:, :, 35] == 0).all() and (lse[:, :, 35] == NEG_INF).all()
    # the backward, row 3 included (exact row statistics); mask_grad checks dS (the bias
    # gradient) too.
    dout = _randn(gen, out.shape, dtype)
    grads = flash_backward(dout, q, k, v, mask, out, lse, mask_grad=True)
    ref = attention_backward(dout.to(rd), q.to(rd), k.to(rd), v.to(rd), mask.to(rd), ref_out,
                             ref_lse, None, "none", NEG_INF, True)
    low = attention_backward(dout, q, k, v, mask, low_out, low_lse, None, "none", NEG_INF, True,
                             acc_dtype=dtype)
    for name, g, r, lo in zip(("dq", "dk", "dv", "dmask"), grads, ref, low):
        assert_error_ratio(name, g, r, lo)


@pytest.mark.parametrize("kind,fill,dtype,causal", [
    ("additive", "min", torch.bfloat16, "none"),     # base-2 scores clamped to _MIN_SCORE2
    ("additive", "min", torch.float16, "top_left"),  # -65504: base-2 lse near -94500
    ("additive", -1e9, torch.float32, "bottom_right"),
    ("additive", -1e4, torch.float32, "none"),
    ("bool", -1e9, torch.bfloat16, "none"),          # filled keys: probability, no dS
    ("bool", "min", torch.float32, "bottom_right"),
    ("key_padding", "min", torch.bfloat16, "none"),  # a whole sequence padded, row-broadcast
])
def test_fully_finite_masked_row_gradients(kind, fill, dtype, causal):
    """Rows whose every key carries a finite fill average their keys in the eager model, and
    their gradients flow (dq of the row, its share of dk and dv, the bias's dS). The fp32 lse
    = (m + log2 l)·ln2 loses log2 l beside such a fill, so the backward reads exact row
    statistics (flash._bwd_row_stats); every gradient obeys the error-ratio rule with a dout
    that is nonzero on those rows too. GQA 2:1; rows 0-15 of one block are ordinary."""
    gen = _gen("finite_masked_rows", kind, fill, dtype, causal)
    b, hq, hkv, nq, nk = 2, 4, 2, 40, 50
    q, k, v = _qkv(gen, b=b, hq=hq, hkv=hkv, nq=nq, nk=nk, d=32, dtype=dtype)
    fill = torch.finfo(dtype).min if fill == "min" else fill
    if kind == "bool":
        mask = _bool_mask(gen, (b, 1, nq, nk))
        mask[:, :, 3] = False
        mask[1, :, 22] = False
        mask_fill, rows = fill, [3, 22]
    elif kind == "additive":
        mask = _randn(gen, (b, hq, nq, nk), dtype)
        mask[..., 5:nk:4] = fill
        mask[:, :, 3] = fill
        mask[0, 1, 22] = fill
        mask_fill, rows = NEG_INF, [3, 22]
    else:
        mask = torch.zeros(b, 1, 1, nk, dtype=dtype, device=DEVICE)
        mask[0] = fill                          # batch 0: every key padded, every row fully masked
        mask[1, ..., 40:] = fill
        mask_fill, rows = NEG_INF, list(range(nq))
    mask_grad = mask.dtype != torch.bool
    out, lse = flash_forward(q, k, v, mask, None, causal, mask_fill)
    rd = reference_dtype(dtype)
    rmask = mask if mask.dtype == torch.bool else mask.to(rd)
    ref_out, ref_lse = attention_forward(q.to(rd), k.to(rd), v.to(rd), rmask, None, causal,
                                         mask_fill)
    low_out, low_lse = attention_forward(q, k, v, mask, None, causal, mask_fill, acc_dtype=dtype)
    assert_error_ratio("out", out, ref_out, low_out)
    assert lse.isfinite().all()
    dout = _randn(gen, out.shape, dtype)
    grads = flash_backward(dout, q, k, v, mask, out, lse, None, causal, mask_fill, mask_grad)
    ref = attention_backward(dout.to(rd), q.to(rd), k.to(rd), v.to(rd), rmask, ref_out, ref_lse,
                             None, causal, mask_fill, mask_grad)
    low = attention_backward(dout, q, k, v, mask, low_out, low_lse, None, causal, mask_fill,
                             mask_grad, acc_dtype=dtype)
    names = ("dq", "dk", "dv", "dmask")[:4 if mask_grad else 3]
    for name, g, r, lo in zip(names, grads, ref, low):
        assert_error_ratio(name, g, r, lo)
    if mask_grad:  # those rows' own dq is not 0 (a bool fill is a constant: there dv is hit)
        full = (ref[0][:, :, rows].abs().amax(-1) > 0).nonzero(as_tuple=True)
        assert full[0].numel() and (grads[0][:, :, rows].abs().amax(-1)[full] > 0).all()
