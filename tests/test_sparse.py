"""Block-sparse attention (kernels/sparse*.py, tune/sparse_gate.py) and policy="sparse".

The kernels against the reference with the block mask expanded to element level (ANDed with the
model's own mask), forward and backward under FlashAttention's error-ratio rule; τ = 1 against
the dense flash kernel; FlexAttention BlockMask input; the prediction against its PyTorch
statement and its properties (diagonal and first block kept, monotone in τ); mask reuse; the τ
gate; policy="sparse" through attnfuse.optimize. Without a GPU the kernels run under Triton's
interpreter (blocks of 16 there), hence the import order below.
"""
import math
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import attnfuse  # noqa: E402
from attnfuse.kernels import registry, sparse, sparse_predict  # noqa: E402
from attnfuse.kernels.flash import flash_forward  # noqa: E402
from attnfuse.kernels.reference import attention_backward, attention_forward  # noqa: E402
from attnfuse.kernels.sparse_layout import (block_structure, dense_layout,  # noqa: E402
                                            layout_from_block_mask, layout_from_blocks)
from attnfuse.testing import assert_error_ratio, reference_dtype  # noqa: E402
from attnfuse.tune import sparse_gate  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEG_INF = float("-inf")
# Blocks of 16 on every device: small inputs then have many blocks (the GPU default is 128).
BLOCK = 16


def _gen(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh inputs per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _qkv(gen, b=1, hq=2, hkv=2, nq=17, nk=17, d=32, dtype=torch.float16):
    return tuple(torch.randn(shape, generator=gen).to(DEVICE, dtype) for shape in
                 ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d)))


def _random_blocks(gen, lb, lh, nq, nk, p=0.6):
    shape = (lb, lh, -(-nq // BLOCK), -(-nk // BLOCK))
    return (torch.rand(shape, generator=gen) < p).to(DEVICE)


def _combined(layout, mask):
    """The user's mask with the layout's skipped pairs removed, as the reference takes it."""
    keep = layout.element_mask()
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask + torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, NEG_INF)


def assert_grad(name, g, ref, low, zero_bound):
    """Error-ratio rule; where the reference is identically 0 only rounding noise is allowed."""
    if ref.any():
        assert_error_ratio(name, g, ref, low)
    else:
        assert g.abs().max().item() <= zero_bound, f"{name}: {g.abs().max().item()} should be ~0"


def check(gen, q, k, v, layout, mask=None, causal="none", mask_fill=NEG_INF, scale=None,
          window=(-1, -1), backward=True, mask_grad=False):
    """Forward (and backward) of the sparse kernels against the reference with the layout's
    element mask, FlashAttention's error-ratio rule on out, lse, dq, dk, dv (and the additive
    mask's gradient with ``mask_grad``)."""
    rd = reference_dtype(q.dtype)
    full = _combined(layout, mask)
    rmask = full if full.dtype == torch.bool else full.to(rd)
    out, lse = sparse.sparse_forward(q, k, v, layout, mask, scale, causal, mask_fill, window)
    args = (rmask, scale, causal, mask_fill)
    ref_out, ref_lse = attention_forward(q.to(rd), k.to(rd), v.to(rd), *args, window=window)
    low_out, low_lse = attention_forward(q, k, v, full, scale, causal, mask_fill, window=window,
                                         acc_dtype=q.dtype)
    assert out.shape == ref_out.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(lse == NEG_INF, ref_lse == NEG_INF), "empty rows (lse = -inf) disagree"
    assert_error_ratio("out", out, ref_out, low_out)
    assert_error_ratio("lse", lse, ref_lse, low_lse)
    if not backward:
        return out, lse, None
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, q.dtype)
    grads = sparse.sparse_backward(dout, q, k, v, layout, mask, out, lse, scale, causal,
                                   mask_fill, window, mask_grad)
    ref = attention_backward(dout.to(rd), q.to(rd), k.to(rd), v.to(rd), rmask, ref_out, ref_lse,
                             scale, causal, mask_fill, mask_grad, window=window)
    low = attention_backward(dout, q, k, v, full, low_out, low_lse, scale, causal, mask_fill,
                             mask_grad, window=window, acc_dtype=q.dtype)
    n = max(q.shape[2] * q.shape[1] // k.shape[1], k.shape[2])
    ds_noise = 2 * v.shape[-1] * torch.finfo(torch.float32).eps * (
        dout.abs().max() * v.float().abs().max()).item()
    qk = max(q.float().abs().max().item(), k.float().abs().max().item())
    sc = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    for name, g, r, lo, t in zip(("dq", "dk", "dv"), grads, ref, low, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.isnan().any(), name
        assert_grad(name, g, r, lo, n * ds_noise * sc * qk)
    if mask_grad:  # the references' dS is shaped like the combined mask: reduce it to the mask's
        assert grads[3].shape == mask.shape and grads[3].dtype == mask.dtype
        def reduced(ds):  # summed over the dims the mask broadcasts on
            dims = [i for i, size in enumerate(mask.shape) if size == 1 and ds.shape[i] != 1]
            return ds.sum(dim=dims, keepdim=True) if dims else ds
        assert_grad("dmask", grads[3], reduced(ref[3]), reduced(low[3].float()).to(mask.dtype),
                    n * ds_noise)
    else:
        assert grads[3] is None
    return out, lse, grads


# ----------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("nq,nk,hq,d", [(1, 1, 2, 64), (17, 17, 2, 40), (127, 127, 1, 72),
                                        (17, 45, 2, 64), (45, 17, 2, 40), (200, 200, 1, 40)])
def test_random_block_masks(nq, nk, hq, d):
    """A given block mask equals the reference with the mask expanded to elements."""
    gen = _gen("random", nq, nk, hq, d)
    b = 2 if nq < 100 else 1
    q, k, v = _qkv(gen, b=b, hq=hq, hkv=hq, nq=nq, nk=nk, d=d)
    layout = layout_from_blocks(_random_blocks(gen, b, hq, nq, nk), nq, nk, block=BLOCK)
    check(gen, q, k, v, layout, backward=nq <= 127)


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("nq,nk", [(40, 40), (23, 61), (61, 23)])
def test_causal(causal, nq, nk):
    """Causal in both alignments, GQA, a block mask shared by batch and heads; diagonal blocks
    are partial, blocks below it full."""
    gen = _gen("causal", causal, nq, nk)
    q, k, v = _qkv(gen, b=1, hq=4, hkv=2, nq=nq, nk=nk, dtype=torch.bfloat16)
    layout = layout_from_blocks(_random_blocks(gen, 1, 1, nq, nk, 0.7), nq, nk, block=BLOCK,
                                causal=causal)
    _, full, _ = block_structure(nq, nk, (BLOCK, BLOCK), causal)
    assert torch.equal(layout.state[0, 0] == 2, layout.blocks[0, 0] & full)
    check(gen, q, k, v, layout, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_gqa_window(dtype):
    gen = _gen("dtypes", dtype)
    q, k, v = _qkv(gen, b=1, hq=4, hkv=1, nq=40, nk=40, d=40, dtype=dtype)
    layout = layout_from_blocks(_random_blocks(gen, 1, 4, 40, 40), 40, 40, block=BLOCK,
                                window=(20, 5))
    check(gen, q, k, v, layout, window=(20, 5), scale=0.3)


def test_head_dim_160_value_dim_differs():
    gen = _gen("d160")
    q, k, v = _qkv(gen, nq=33, nk=20, d=160, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 20, 96, generator=gen).to(DEVICE, torch.bfloat16)
    layout = layout_from_blocks(_random_blocks(gen, 1, 2, 33, 20), 33, 20, block=BLOCK)
    check(gen, q, k, v, layout, backward=False)


@pytest.mark.parametrize("kind", ["key_padding", "bool", "additive"])
def test_model_masks(kind):
    """The model's mask inside visited blocks: key padding (one row per key tile), a dense bool
    mask, an additive mask with -inf entries; batch 1 pads every key (an empty batch)."""
    gen = _gen("masks", kind)
    b, h, nq, nk = 2, 2, 30, 37
    q, k, v = _qkv(gen, b=b, hq=h, hkv=1, nq=nq, nk=nk)
    if kind == "key_padding":
        mask = (torch.arange(nk)[None, :] < torch.tensor([25, 0])[:, None])[:, None, None]
    elif kind == "bool":
        mask = torch.rand(b, h, nq, nk, generator=gen) < 0.7
    else:
        mask = torch.randn(1, h, nq, nk, generator=gen)
        mask[torch.rand(mask.shape, generator=gen) < 0.2] = NEG_INF
    layout = layout_from_blocks(_random_blocks(gen, b, h, nq, nk, 0.7), nq, nk, block=BLOCK,
                                causal="bottom_right")
    out, lse, grads = check(gen, q, k, v, layout, mask.to(DEVICE), causal="bottom_right")
    if kind == "key_padding":
        assert (out[1] == 0).all() and (lse[1] == NEG_INF).all()
        assert all((g[1] == 0).all() for g in grads[:3])


@pytest.mark.parametrize("fill,dtype", [(-1e4, torch.float16), (-1e4, torch.bfloat16)])
def test_finite_fill_dense_layout(fill, dtype):
    """With a finite fill a fully masked row averages its keys (the eager result): on the dense
    layout the kernels equal the reference, a bool-masked row included."""
    gen = _gen("fill", fill, dtype)
    q, k, v = _qkv(gen, nq=20, nk=24, dtype=dtype)
    mask = (torch.rand(1, 2, 20, 24, generator=gen) < 0.7).to(DEVICE)
    mask[:, :, 3] = False
    layout = dense_layout(1, 1, 20, 24, block=BLOCK, device=DEVICE)
    check(gen, q, k, v, layout, mask, mask_fill=fill)


@pytest.mark.parametrize("kind,fill,dtype", [("bool", -1e9, torch.bfloat16),
                                             ("additive", -1e9, torch.float32)])
def test_fully_finite_masked_rows_gradients(kind, fill, dtype):
    """Rows whose every visited key carries a huge finite fill average those keys, and their
    gradients flow: the backward reads exact row statistics (the fp32 lse loses log2 of the
    row's sum beside the fill), over the listed blocks only. Random layout, GQA 2:1."""
    gen = _gen("finite_rows", kind, fill, dtype)
    b, hq, nq, nk = 1, 4, 40, 45
    q, k, v = _qkv(gen, b=b, hq=hq, hkv=2, nq=nq, nk=nk, dtype=dtype)
    blocks = _random_blocks(gen, b, hq, nq, nk, 0.6)
    blocks[..., 0] = True                  # every block row visits key block 0
    if kind == "bool":
        # A skipped pair scores -inf, the reference's bool mask gives it the finite fill: the
        # two agree on a fully masked row only where its block row skips nothing.
        blocks[:, :, [3 // BLOCK, 21 // BLOCK]] = True
    layout = layout_from_blocks(blocks, nq, nk, block=BLOCK)
    if kind == "bool":
        mask = (torch.rand(b, hq, nq, nk, generator=gen) < 0.7).to(DEVICE)
        mask[:, :, [3, 21]] = False
        mask_fill = fill
    else:
        mask = torch.randn(b, hq, nq, nk, generator=gen).to(DEVICE)
        mask[:, :, [3, 21]] = fill
        mask_fill = NEG_INF
    _, _, grads = check(gen, q, k, v, layout, mask, mask_fill=mask_fill)
    if kind == "additive":  # a bool fill is a constant: those rows' dq is 0, their dv is not
        assert grads[0][:, :, [3, 21]].abs().amin(-1).amin() > 0


@pytest.mark.parametrize("shape", ["dense", "key_padding"])
def test_additive_mask_gradient(shape):
    """The additive mask's gradient (dS of the visited pairs, 0 on skipped ones, summed over
    the dims the mask broadcasts on): a bias shared by the batch [1, H, Nq, Nk] and a
    row-broadcast key-padding bias [B, 1, 1, Nk]; through ``sparse_attention`` too."""
    gen = _gen("mask_grad", shape)
    b, h, nq, nk = 2, 2, 30, 37
    q, k, v = _qkv(gen, b=b, hq=h, hkv=1, nq=nq, nk=nk, dtype=torch.bfloat16)
    dims = (1, h, nq, nk) if shape == "dense" else (b, 1, 1, nk)
    mask = torch.randn(dims, generator=gen).to(DEVICE, torch.bfloat16)
    blocks = _random_blocks(gen, b, h, nq, nk, 0.7)
    layout = layout_from_blocks(blocks, nq, nk, block=BLOCK, causal="top_left")
    _, _, grads = check(gen, q, k, v, layout, mask, causal="top_left", mask_grad=True)
    leaf = mask.clone().requires_grad_()
    out = sparse.sparse_attention(q, k, v, blocks, leaf, causal="top_left", block=BLOCK)
    out.backward(torch.randn(out.shape, generator=gen).to(DEVICE, out.dtype))
    assert leaf.grad is not None and leaf.grad.shape == mask.shape and leaf.grad.any()


def test_rows_with_no_block_are_empty():
    """Query blocks whose every key block is skipped: out 0, lse -inf, no gradient from them."""
    gen = _gen("empty_rows")
    q, k, v = _qkv(gen, nq=40, nk=40)
    blocks = torch.ones(1, 1, 3, 3, dtype=torch.bool, device=DEVICE)
    blocks[..., 1, :] = False
    out, lse, grads = check(gen, q, k, v, layout_from_blocks(blocks, 40, 40, block=BLOCK))
    rows = slice(BLOCK, 2 * BLOCK)
    assert (out[:, :, rows] == 0).all() and (lse[:, :, rows] == NEG_INF).all()
    assert (grads[0][:, :, rows] == 0).all()


def test_autograd_with_block_mask():
    """``sparse_attention`` (a FlexAttention BlockMask in, gradients through autograd) equals
    the reference's autograd with the BlockMask's mask, for a blockwise (document) mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask
    gen = _gen("autograd_blockmask")
    q, k, v = (t.float().requires_grad_() for t in _qkv(gen, nq=64, nk=64, d=32))

    def document(b, h, q_idx, kv_idx):  # blocks of 2·BLOCK tokens attend within themselves
        return q_idx // (2 * BLOCK) == kv_idx // (2 * BLOCK)

    bm = create_block_mask(document, None, None, 64, 64, device=DEVICE,
                           BLOCK_SIZE=2 * BLOCK)
    out = sparse.sparse_attention(q, k, v, bm, block=BLOCK)      # re-blocked to the kernel's
    emask = create_mask(document, 1, 1, 64, 64, device=DEVICE)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_forward(qd, kd, vd, emask)
    low, _ = attention_forward(*(t.detach().requires_grad_() for t in (q, k, v)), emask,
                               acc_dtype=torch.float32)
    assert_error_ratio("out", out, ref, low)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        assert (g.double() - r).abs().max().item() < 1e-4, name


def test_block_mask_conversion():
    """BlockMask: partial and full lists become visited blocks (a causal mask_mod with
    causal='top_left' visits what the band allows); a coarser kernel block, lists for other
    lengths and a mask_mod the call does not express are refused."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    bm = create_block_mask(causal_mod, None, None, 48, 48, device=DEVICE, BLOCK_SIZE=BLOCK)
    layout = layout_from_block_mask(bm, 48, 48, causal="top_left")
    allowed, full, _ = block_structure(48, 48, (BLOCK, BLOCK), "top_left")
    assert torch.equal(layout.blocks[0, 0], allowed)
    assert torch.equal(layout.state[0, 0] == 2, full)
    with pytest.raises(ValueError, match="does not evaluate mask_mod"):
        layout_from_block_mask(bm, 48, 48)
    with pytest.raises(ValueError, match="not a multiple"):
        layout_from_block_mask(bm, 48, 48, causal="top_left", block=2 * BLOCK)
    with pytest.raises(ValueError, match="query-block rows"):
        layout_from_block_mask(bm, 96, 96, causal="top_left")
    with pytest.raises(TypeError, match="BlockMask"):
        layout_from_block_mask(object(), 48, 48)


def test_layout_mismatch_and_rejections():
    gen = _gen("errors")
    q, k, v = _qkv(gen, nq=20, nk=20)
    layout = layout_from_blocks(_random_blocks(gen, 1, 1, 20, 20), 20, 20, block=BLOCK)
    with pytest.raises(ValueError, match="classified for causal='none'"):
        sparse.sparse_forward(q, k, v, layout, causal="top_left")
    with pytest.raises(ValueError, match="Nq=20, Nk=20"):
        sparse.sparse_forward(q[:, :, :10], k, v, layout)
    with pytest.raises(ValueError, match="blocks"):
        layout_from_blocks(torch.ones(1, 1, 5, 5, dtype=torch.bool), 20, 20, block=BLOCK)
    with pytest.raises(TypeError, match="bool"):
        layout_from_blocks(torch.ones(1, 1, 2, 2), 20, 20, block=BLOCK)
    assert sparse.supports(q.double(), k.double(), v.double(), None, "none")
    assert sparse.supports(*(torch.zeros(1, 1, 4, 512, device=DEVICE),) * 3, None, "none")
    reasons = registry.rejections("sparse", q, k, v, None, "none", softcap=5.0, dropout_p=0.1)
    assert any("soft-capping" in r for r in reasons) and any("dropout" in r for r in reasons)
    with pytest.raises(ValueError, match="key=value"):
        registry.get("sparse:tau")
    assert registry.get("sparse:tau=0.9").name == "sparse:tau=0.9"


# ----------------------------------------------------------------------------- prediction

def _local(gen, b, h, n, d, sharp=1.5, dtype=torch.float16):
    """q = k = smooth positional features plus noise: nearby tokens attend to each other."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.linspace(0.02, 0.4, d // 2)[None, :]
    feat = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], -1) * sharp
    q = feat + 0.3 * torch.randn(b, h, n, d, generator=gen)
    k = feat + 0.3 * torch.randn(b, h, n, d, generator=gen)
    v = torch.randn(b, h, n, d, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


@pytest.mark.parametrize("causal,hq,hkv,nq,nk,pad", [("none", 2, 2, 70, 70, False),
                                                     ("bottom_right", 4, 2, 40, 75, False),
                                                     ("top_left", 2, 1, 75, 75, True)])
def test_prediction_matches_its_statement(causal, hq, hkv, nq, nk, pad):
    """The fused kernels give predict_reference's block states and consistent lists."""
    gen = _gen("predict", causal, nq, nk)
    q, k, _ = _qkv(gen, b=2, hq=hq, hkv=hkv, nq=nq, nk=nk, d=40)
    q, k = q * 3, k * 3
    mask = None
    if pad:
        mask = (torch.arange(nk)[None, :] < torch.tensor([nk, 20])[:, None])[:, None, None]
        mask = mask.to(DEVICE)
    for tau, sub in ((0.5, 4), (0.9, 1)):
        layout = sparse_predict.predict(q, k, tau, causal=causal, mask=mask, sub=sub, block=BLOCK)
        want = sparse_predict.predict_reference(q, k, tau, causal=causal, mask=mask, sub=sub,
                                                  block=BLOCK)
        assert torch.equal(layout.state, want), (tau, sub)
        fresh = layout_from_blocks(layout.blocks, nq, nk, block=BLOCK, causal=causal)
        assert torch.equal(fresh.state, layout.state)
        got, want = layout.kv_lists(), fresh.kv_lists()
        for i in (0, 2):  # (count, indices) of partial, then of full blocks
            assert torch.equal(got[i], want[i])
            valid = torch.arange(got[i + 1].shape[-1], device=DEVICE) < got[i][..., None]
            assert torch.equal(got[i + 1][valid], want[i + 1][valid])
    if pad:  # batch 1's keys past 20 are padding: their blocks are never visited
        assert not layout.blocks[1, :, :, -(-20 // BLOCK) + 1:].any()


def test_prediction_keeps_diagonal_first_block_and_is_monotone():
    gen = _gen("monotone")
    q, k, _ = _local(gen, 1, 2, 96, 32)
    _, _, diag = block_structure(96, 96, (BLOCK, BLOCK), "top_left")
    previous = None
    for tau in (0.3, 0.5, 0.8, 0.95, 1.0):
        blocks = sparse_predict.predict(q, k, tau, causal="top_left", block=BLOCK).blocks
        assert blocks[..., diag].all() and blocks[..., 0].all(), tau
        if previous is not None:
            assert (blocks | ~previous).all() and blocks.sum() >= previous.sum(), tau
        previous = blocks
    allowed, _, _ = block_structure(96, 96, (BLOCK, BLOCK), "top_left")
    assert torch.equal(previous[0, 0], allowed)                       # τ = 1: every block
    assert sparse_predict.predict(q, k, 0.3, causal="top_left", block=BLOCK).density() < 0.7


def test_tau_one_equals_dense_kernel():
    """τ = 1 keeps every block the band allows: the output is the dense flash kernel's."""
    gen = _gen("tau1")
    for causal, nq, nk in (("none", 45, 45), ("bottom_right", 30, 50)):
        q, k, v = _qkv(gen, b=1, hq=2, hkv=1, nq=nq, nk=nk, d=40)
        layout = sparse_predict.predict(q, k, 1.0, causal=causal, block=BLOCK)
        assert layout.density() == 1.0
        out, _ = sparse.sparse_forward(q, k, v, layout, causal=causal)
        dense, _ = flash_forward(q, k, v, None, None, causal)
        ref, _ = attention_forward(q.float(), k.float(), v.float(), None, None, causal)
        assert_error_ratio("out vs flash", out, ref, dense)


def test_mask_reuse_every_k_calls_and_on_drift():
    """Reuse decides on the device: the kept layout is refreshed in place when due (every k
    calls), on drift, or on a new padding, and left as it was otherwise; a change of arguments
    makes a new layout. The host calls ``estimate`` every time, gated by the device flag."""
    gen = _gen("reuse")
    q, k, _ = _local(gen, 1, 2, 64, 32)
    reuse = sparse_predict.MaskReuse(every=3, min_cosine=0.99)

    def estimate(**into):
        return sparse_predict.predict(q_now, k, 0.8, block=BLOCK, **into)

    def fresh(x):
        return sparse_predict.predict(x, k, 0.8, block=BLOCK).state

    q_now = q
    first = reuse(q_now, k, "site", estimate, (BLOCK, BLOCK))
    kept = first.state.clone()
    for _ in range(2):
        q_now = q.flip(2) if _ else q * 1.001
        if _:  # a drifted call refreshes at once, the near-identical one does not
            assert reuse(q_now, k, "site", estimate, (BLOCK, BLOCK)) is first
            assert not torch.equal(kept, fresh(q_now))
            assert torch.equal(first.state, fresh(q_now))
        else:
            assert reuse(q_now, k, "site", estimate, (BLOCK, BLOCK)) is first
            assert torch.equal(first.state, kept)
    assert reuse.stats == {"calls": 3, "estimates": 2, "drift": 1}
    for _ in range(3):  # the inputs of the last refresh: the third call is due (every=3)
        assert reuse(q_now, k, "site", estimate, (BLOCK, BLOCK)) is first
    assert reuse.stats == {"calls": 6, "estimates": 3, "drift": 1}
    assert torch.equal(first.state, fresh(q_now))
    other = reuse(q_now, k, "other args", estimate, (BLOCK, BLOCK))
    assert other is not first and reuse.stats == {"calls": 7, "estimates": 4, "drift": 1}
    pad = torch.ones(1, 1, 1, 64, dtype=torch.bool, device=DEVICE)
    shorter = pad & (torch.arange(64, device=DEVICE) < 40)
    for m, estimates in ((pad, 5), (pad.clone(), 5), (shorter, 6)):  # a new padding: new mask
        reuse(q_now, k, "other args", estimate, (BLOCK, BLOCK), m)
        assert reuse.stats["estimates"] == estimates


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mask_reuse_in_a_cuda_graph():
    """The reuse decision needs no host synchronisation: one call captured in a CUDA graph
    (a host sync would fail the capture) keeps deciding on replay, refreshing the kept layout
    when the inputs drift and keeping it when they do not."""
    gen = _gen("reuse_graph")
    q, k, _ = _local(gen, 1, 2, 256, 64)
    qs, ks = q.clone(), k.clone()               # the graph's static inputs
    reuse = sparse_predict.MaskReuse(every=1000, min_cosine=0.99)

    def estimate(**into):
        return sparse_predict.predict(qs, ks, 0.8, block=64, **into)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):               # warm-up: the first estimate, gated kernels
        for _ in range(3):
            layout = reuse(qs, ks, "site", estimate, (64, 64))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert reuse(qs, ks, "site", estimate, (64, 64)) is layout
    kept = layout.state.clone()
    graph.replay()                              # the same inputs: no refresh
    torch.cuda.synchronize()
    assert torch.equal(layout.state, kept)
    qs.copy_(q.flip(2))
    graph.replay()                              # drifted inputs: refreshed in place
    torch.cuda.synchronize()
    assert torch.equal(layout.state, sparse_predict.predict(q.flip(2), k, 0.8, block=64).state)
    assert not torch.equal(layout.state, kept)
    assert reuse.stats == {"calls": 5, "estimates": 2, "drift": 1}  # a capture runs nothing


def test_predict_into_a_layout_gated_by_a_device_flag():
    gen = _gen("gated")
    q, k, _ = _local(gen, 1, 2, 64, 32)
    layout = sparse_predict.predict(q, k, 0.8, block=BLOCK)
    before = [t.clone() for t in (layout.state, *layout.kv_lists())]
    layout.q_lists()
    off = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    same = sparse_predict.predict(q.flip(2), k, 0.8, block=BLOCK, out=layout, go=off)
    assert same is layout and "q" not in layout._lists
    assert all(torch.equal(a, b) for a, b in zip(before, (layout.state, *layout.kv_lists())))
    sparse_predict.predict(q.flip(2), k, 0.8, block=BLOCK, out=layout, go=off + 1)
    want = sparse_predict.predict(q.flip(2), k, 0.8, block=BLOCK)
    assert torch.equal(layout.state, want.state)
    for got, ref in zip(layout.kv_lists(), want.kv_lists()):
        assert torch.equal(got, ref) or got.dim() == 4  # indices past each count are free
    with pytest.raises(ValueError, match="out: a layout predicted for"):
        sparse_predict.predict(q[:, :, :48], k, 0.8, block=BLOCK, out=layout)
    with pytest.raises(ValueError, match="go .* needs out"):
        sparse_predict.predict(q, k, 0.8, block=BLOCK, go=off)


# ----------------------------------------------------------------------------- the τ gate

def test_gate_is_sparser_with_a_looser_budget():
    gen = _gen("gate")
    q, k, v = _local(gen, 1, 2, 64, 32)
    exact, _ = attention_forward(q.float(), k.float(), v.float())
    tight = sparse_gate.tune_tau(q, k, v, max_rel_l1=0.01, exact=exact, block=BLOCK)
    loose = sparse_gate.tune_tau(q, k, v, max_rel_l1=0.2, exact=exact, block=BLOCK)
    assert loose.tau is not None and tight.tau is not None, (loose, tight)
    assert loose.tau < tight.tau and loose.density < tight.density
    assert loose.rel_l1 <= 0.2 and tight.rel_l1 <= 0.01 and loose.cosine > 0.9
    assert [t["tau"] for t in loose.tried] == sorted(t["tau"] for t in loose.tried)
    never = sparse_gate.tune_tau(q, k, v, max_rel_l1=0.0, taus=(0.999,), exact=exact,
                                   block=BLOCK)
    assert never.tau is None and "no τ" in never.reason


# ----------------------------------------------------------------------------- policy="sparse"

class LocalAttention(torch.nn.Module):
    """q = k = projected positional features (local attention), v projected from the input."""

    def __init__(self, n: int = 64, d: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        pos = torch.arange(n, dtype=torch.float32)[:, None]
        freqs = torch.linspace(0.02, 0.4, d // 2)[None, :]
        self.register_buffer("pos", torch.cat([torch.cos(pos * freqs),
                                               torch.sin(pos * freqs)], -1) * 1.5)
        self.v = torch.nn.Linear(d * heads, d * heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qk = (self.pos + 0.1 * x.view(b, n, self.heads, -1).transpose(1, 2))
        v = self.v(x).view(b, n, self.heads, -1).transpose(1, 2)
        s = qk @ qk.transpose(-1, -2) * qk.shape[-1] ** -0.5
        return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, -1)


def test_forced_kernel_through_the_op_with_gradients():
    """kernel="sparse" in attnfuse.attention: the op's backward predicts the forward's layout
    again (prediction is deterministic), so autograd gives the fixed-mask gradients."""
    gen = _gen("forced")
    n = 3 * sparse.default_block()  # the registry's kernel uses the device's block size
    q, k, v = (t.float().requires_grad_() for t in _local(gen, 1, 2, n, 32))
    out = attnfuse.attention(q, k, v, kernel="sparse", is_causal=True)
    layout = sparse_predict.predict(q.detach(), k.detach(), 0.95, causal="top_left")
    assert layout.density() < 1.0
    want = sparse.sparse_attention(*(t.detach().requires_grad_() for t in (q, k, v)), layout,
                                   causal="top_left")
    assert torch.equal(out, want)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    got = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(sparse.sparse_attention(*leaves, layout, causal="top_left"),
                              leaves, dout)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_policy_sparse_end_to_end(monkeypatch, tmp_path):
    """The gate tunes τ on the site's activations and the site runs the configured sparse
    kernel; the cost model gives every kernel the same dense time (CPU ceilings are noisy), so
    the density decides. A budget no τ meets keeps the site dense."""
    from attnfuse.tune import select
    monkeypatch.setenv("ATTNFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(select, "predict", lambda problem, kernel, calibrate=True, env=None: 1e-3)
    gen = _gen("policy")
    n = 4 * sparse.default_block()  # the registry's kernel uses the device's block size
    model = LocalAttention(n).to(DEVICE).eval()
    x = torch.randn(1, n, 64, generator=gen).to(DEVICE)
    fast = attnfuse.optimize(model, (x,), policy="sparse", inner="eager", tune=False,
                             sparse_max_rel_l1=0.1, sparse_reuse=2)
    site = fast.attnfuse_report.sites[0]
    assert site.kernel is not None and site.kernel.startswith("sparse:tau="), str(
        fast.attnfuse_report)
    cand = next(c for c in site.candidates if c.kernel == site.kernel)
    assert cand.accuracy["density"] < 0.8 and cand.accuracy["rel_l1"] <= 0.1
    assert "density" in str(fast.attnfuse_report)
    with torch.no_grad():
        got, want = fast(x), model(x)
    rel = ((got - want).abs().sum() / want.abs().sum()).item()
    assert rel <= 0.1, rel
    # The site re-estimates every second call (sparse_reuse=2).
    config = sparse_predict.SparseConfig.parse(site.kernel.partition(":")[2])
    assert config.every == 2
    state = sparse_predict._SITES[config.site]
    assert state.stats == {"calls": 2, "estimates": 1, "drift": 0}  # optimize's run, then ours
    with torch.no_grad():
        fast(x)
    assert state.stats == {"calls": 3, "estimates": 2, "drift": 0}
    strict = attnfuse.explain(model, (x,), policy="sparse", tune=False, sparse_max_rel_l1=1e-9)
    s = strict.sites[0]
    assert s.fused and not s.kernel.startswith("sparse")
    reasons = next(c for c in s.candidates if c.kernel == "sparse").reasons
    assert "no τ" in reasons[0], reasons
