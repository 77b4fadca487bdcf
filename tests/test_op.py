"""``attnfuse.attention`` and the ``attnfuse::attention`` op: semantics, registration, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import attnfuse
from attnfuse.kernels import reference, registry
from attnfuse.testing import assert_error_ratio

KERNELS = ["reference"] + (["flash"] if "flash" in registry.KERNELS else [])


def _sdpa_math(q, k, v, mask=None, is_causal=False, scale=None, enable_gqa=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "causal", "bool", "additive", "gqa", "cross"])
def test_matches_sdpa_math(dtype: torch.dtype, case: str) -> None:
    torch.manual_seed(0)
    b, hq, hkv, nq, nk, d = 2, 4, 4, 17, 17, 40
    if case == "gqa":
        hkv = 2
    if case == "cross":
        nq, nk = 5, 33
    q = torch.randn(b, hq, nq, d, dtype=dtype)
    k, v = torch.randn(b, hkv, nk, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype)
    mask = None
    if case == "bool":
        mask = torch.rand(b, 1, nq, nk) > 0.3
        mask[..., 0] = True
    elif case == "additive":
        mask = torch.randn(1, hq, nq, nk, dtype=dtype)
    kw = dict(is_causal=case == "causal", enable_gqa=case == "gqa")
    got = attnfuse.attention(q, k, v, mask, **kw)
    ref = _sdpa_math(*(t.double() for t in (q, k, v)), None if mask is None else
                     (mask if mask.dtype == torch.bool else mask.double()), **kw)
    low = _sdpa_math(q, k, v, mask, **kw)
    assert_error_ratio("out", got, ref, low)


def test_gradients_match_autograd_of_sdpa_fp64() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 7, 9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: attnfuse.attention(*a), (q, k, v, bias))
    torch.autograd.gradcheck(lambda q, k, v: attnfuse.attention(q, k, v, is_causal="bottom_right"),
                             (q, k, v))


def test_opcheck() -> None:
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    seed = torch.tensor([1234], dtype=torch.int64)
    for args in [(q, k, v, torch.randn(9, 11), 0.3, "top_left", -math.inf, "auto"),
                 (q, k, v, torch.rand(2, 1, 1, 11) > 0.2, 0.3, "none", -1e4, "reference"),
                 (q, k, v, None, 0.3, "bottom_right", -math.inf, "auto"),
                 (q, k, v, torch.randn(9, 11), 0.3, "top_left", -math.inf, "auto", 0.0, 3, 0),
                 (q, k, v, None, 0.3, "none", -math.inf, "reference", 0.0, 2, 1, 0.25, seed),
                 (q, k, v, torch.randn(1, 4, 9, 11), 0.3, "bottom_right", -math.inf, "auto", 5.0,
                  -1, 0, 0.5, seed)]:
        for rg in (False, True):
            args = tuple(a.detach().requires_grad_(rg) if isinstance(a, torch.Tensor)
                         and a.is_floating_point() else a for a in args)
            torch.library.opcheck(torch.ops.attnfuse.attention.default, args)


def test_inputs_are_not_mutated_and_strides_are_free() -> None:
    x = torch.randn(2, 9, 3, 16)                  # [B, N, H, D] viewed as [B, H, N, D]
    q = k = v = x.transpose(1, 2)
    before = x.clone()
    out = attnfuse.attention(q, k, v)
    assert torch.equal(x, before)
    torch.testing.assert_close(out, _sdpa_math(q, k, v))


def test_fully_masked_rows_give_zero() -> None:
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out = attnfuse.attention(q, k, v, mask)
    assert torch.equal(out[0, 0, 2], torch.zeros(8))
    _, lse = reference.attention_forward(q, k, v, mask)
    assert lse[0, 0, 2] == -math.inf


@pytest.mark.parametrize("kernel", KERNELS)
def test_left_padded_finite_mask_gradients(kernel: str) -> None:
    """transformers' eager mask of a left-padded causal batch: causal and padding both as
    finfo.min, so the padding rows are fully masked by a finite fill. The eager model averages
    every key there and its gradients flow through those rows; attnfuse's output and q, k, v
    gradients match autograd of the eager math (fp64 oracle, bf16 eager as the baseline)."""
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 21, 16
    leaves = [torch.randn(b, h, n, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, :6] = False                                         # six pad tokens on the left
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & keep[:, None, None, :]
    mask = torch.zeros(b, 1, n, n, dtype=torch.bfloat16).masked_fill(
        ~allowed, torch.finfo(torch.bfloat16).min)
    out = attnfuse.attention(*leaves, mask, kernel=kernel)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)

    def eager(q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(d) + mask.to(q.dtype)
        return s.softmax(-1) @ v

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = eager(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    low = eager(*leaves)
    low_grads = torch.autograd.grad(low, leaves, dout)
    assert_error_ratio("out", out, ref, low)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_error_ratio(name, g, r, lo)
    assert grads[0][0, :, :6].abs().amax(-1).amin() > 0        # the padding rows' own dq


def test_mask_and_causal_together_and_bottom_right() -> None:
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    bias = torch.randn(5, 9)
    got = attnfuse.attention(q, k, v, bias, is_causal="bottom_right")
    keep = torch.ones(5, 9, dtype=torch.bool).tril(9 - 5)
    want = _sdpa_math(q, k, v, bias.masked_fill(~keep, -math.inf))
    torch.testing.assert_close(got, want)


def _op(q, k, v, mask=None, causal="none", window=(-1, -1), p=0.0, seed=None, scale=0.5,
        softcap=0.0, kernel="reference"):
    return torch.ops.attnfuse.attention(q, k, v, mask, scale, causal, -math.inf, kernel, softcap,
                                        window[0], window[1], p, seed)[0]


def _seed(x: int) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.int64)


def _dense_band(nq: int, nk: int, causal: str, window: tuple[int, int]) -> torch.Tensor:
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    off = nk - nq if causal == "bottom_right" else 0
    keep = torch.ones(nq, nk, dtype=torch.bool)
    if window[0] >= 0:
        keep &= j >= i + off - window[0]
    if window[1] >= 0:
        keep &= j <= i + off + window[1]
    if causal != "none":
        keep &= j <= i + off
    return keep


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,window,nq,nk", [
    (True, (4, 0), 17, 17), (False, (3, 2), 17, 17), ("bottom_right", (4, None), 7, 20),
    (False, (None, 1), 20, 7), (True, (0, None), 5, 9)])
def test_window_matches_sdpa_with_the_dense_band(kernel, dtype, causal, window, nq, nk) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 4, nq, 16, dtype=dtype)
    k, v = torch.randn(2, 2, nk, 16, dtype=dtype), torch.randn(2, 2, nk, 16, dtype=dtype)
    pad = torch.rand(2, 1, 1, nk) > 0.2
    got = attnfuse.attention(q, k, v, pad, is_causal=causal, window=window, enable_gqa=True,
                             kernel=kernel)
    ops_window = tuple(-1 if w is None else w for w in window)
    kind = {True: "top_left", False: "none"}.get(causal, causal)
    keep = _dense_band(nq, nk, kind, ops_window) & pad
    live = keep.any(-1, keepdim=True)            # SDPA gives NaN on rows with no key; we give 0
    ref = _sdpa_math(*(t.double() for t in (q, k, v)), keep, enable_gqa=True)
    low = _sdpa_math(q, k, v, keep, enable_gqa=True)
    ref, low = ref.masked_fill(~live, 0.0), low.masked_fill(~live, 0.0)
    assert_error_ratio("out", got, ref, low)


def test_window_gradients_fp64() -> None:
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64, requires_grad=True) for n in (6, 8, 8))
    bias = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: attnfuse.attention(*a, is_causal="bottom_right",
                                                           window=(2, 0)), (q, k, v, bias))
    torch.autograd.gradcheck(lambda q, k, v: attnfuse.attention(q, k, v, window=(1, 1)),
                             (q, k, v))


def test_positional_call_is_sdpa_order() -> None:
    q, k, v = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    got = attnfuse.attention(q, k, v, None, 0.0, True)
    torch.testing.assert_close(got, _sdpa_math(q, k, v, None, True))
    got = attnfuse.attention(q, k, v, None, 0.0, False, 0.2)
    torch.testing.assert_close(got, _sdpa_math(q, k, v, scale=0.2))


@pytest.mark.parametrize("kernel", KERNELS)
def test_dropout_is_reproducible_per_seed(kernel: str) -> None:
    q, k, v = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    a, b, c = (_op(q, k, v, p=0.3, seed=_seed(x), kernel=kernel) for x in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    x = attnfuse.attention(q, k, v, dropout_p=0.3, kernel=kernel)
    y = attnfuse.attention(q, k, v, dropout_p=0.3, kernel=kernel)     # a new seed: a new mask
    torch.manual_seed(3)
    assert torch.equal(attnfuse.attention(q, k, v, dropout_p=0.3, kernel=kernel), x)
    assert not torch.equal(x, y)


def _keep_of(kernel: str, b: int, h: int, nq: int, nk: int, p: float,
             seed: torch.Tensor) -> torch.Tensor:
    """The keep-mask ``kernel`` draws for ``seed``, read off its output: with uniform
    probabilities and V = the identity, out[i, j] = keep[i, j] / ((1 − p)·Nk)."""
    q, k = torch.zeros(b, h, nq, 16), torch.zeros(b, h, nk, 16)
    v = torch.eye(nk).expand(b, h, nk, nk).contiguous()
    scaled = _op(q, k, v, p=p, seed=seed, kernel=kernel).double() * (1 - p) * nk
    keep = scaled > 0.5
    torch.testing.assert_close(scaled, keep.double(), rtol=0, atol=1e-5)   # only 0 or 1/(1 − p)
    return keep


@pytest.mark.parametrize("kernel", KERNELS)
def test_dropout_keep_rate_is_one_minus_p(kernel: str) -> None:
    """The kept fraction lies within 5 standard deviations of 1 − p."""
    p = 0.3
    keep = _keep_of(kernel, 2, 4, 64, 64, p, _seed(123))
    n = keep.numel()
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    if kernel == "reference":
        assert torch.equal(keep, registry.reference_keep_mask(torch.zeros(2, 4, 64, 1),
                                                              torch.zeros(2, 4, 64, 1), p,
                                                              _seed(123)))


@pytest.mark.parametrize("kernel", KERNELS)
def test_dropout_forward_and_backward_share_the_mask(kernel: str) -> None:
    """Output and gradients of the op with one seed equal those of the reference given the
    keep-mask that seed stands for (read off the kernel's own output), under FlashAttention's
    error-ratio rule (bf16 against fp32): the backward regenerates the forward's mask. (A wrong
    mask shows as errors of the size of the outputs, far above the rule's bound.)"""
    b, h, n, p, seed = 1, 2, 32, 0.25, _seed(21)
    keep = _keep_of(kernel, b, h, n, n, p, seed)
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.bfloat16, requires_grad=True)
               for d in (16, 16, n))
    out = _op(q, k, v, None, "top_left", (5, 0), p, seed, kernel=kernel)
    kw = dict(causal="top_left", window=(5, 0), dropout_p=p, dropout_mask=keep)
    q64, k64, v64 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference.attention_forward(q64, k64, v64, None, 0.5, **kw)[0]
    low = reference.attention_forward(q, k, v, None, 0.5, acc_dtype=torch.bfloat16, **kw)[0]
    assert_error_ratio("out", out, ref, low)
    dout = torch.randn_like(out)
    grads = zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                torch.autograd.grad(ref, (q64, k64, v64), dout.float()),
                torch.autograd.grad(low, (q, k, v), dout))
    for name, got, want, lowp in grads:
        assert_error_ratio(name, got, want, lowp)


def test_dropout_backward_matches_autograd_of_the_reference_fp64() -> None:
    """Gradients of the op with a fixed seed equal autograd through the reference given the keep
    mask the seed stands for, tightly in fp64; and gradcheck holds through the op itself."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 6, 9, dtype=torch.float64, requires_grad=True)
    seed, p = _seed(11), 0.4
    out = _op(q, k, v, bias, "top_left", (3, 0), p, seed)
    keep = registry.reference_keep_mask(q, k, p, seed)
    want = reference.attention_forward(q, k, v, bias, 0.5, "top_left", window=(3, 0),
                                       dropout_p=p, dropout_mask=keep)[0]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(out)
    got_g = torch.autograd.grad(out, (q, k, v, bias), dout)
    want_g = torch.autograd.grad(want, (q, k, v, bias), dout)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    small = [t.detach()[..., :3, :].clone().requires_grad_() for t in (q, k, v)]
    torch.autograd.gradcheck(lambda q, k, v: _op(q, k, v, p=0.5, seed=seed), small)


@pytest.mark.parametrize("kernel", KERNELS)
def test_dropout_zero_and_one(kernel: str) -> None:
    q, k, v = (torch.randn(1, 2, 7, 16, requires_grad=True) for _ in range(3))
    plain = attnfuse.attention(q, k, v, kernel=kernel)
    assert torch.equal(attnfuse.attention(q, k, v, dropout_p=0.0, kernel=kernel), plain)
    assert torch.equal(_op(q, k, v, p=0.0, seed=_seed(1), kernel=kernel),
                       _op(q, k, v, kernel=kernel))
    out = attnfuse.attention(q, k, v, dropout_p=1.0, is_causal=True, kernel=kernel)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_dropout_and_window_trace_in_one_graph() -> None:
    """Under torch.compile the seed is drawn inside the graph from torch's generator: with one
    manual seed, compiled and eager runs (and their gradients) agree."""
    q, k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: attnfuse.attention(q, k, v, None, 0.2, True, window=(3, 0))  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    want = fn(q, k, v)
    torch.manual_seed(0)
    got = compiled(q, k, v)
    assert torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)),
                    torch.autograd.grad(want.sum(), (q, k, v))):
        assert torch.equal(a, b)


def test_dropout_needs_a_seed_at_the_op() -> None:
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="seed"):
        _op(q, q, q, p=0.5)
    with pytest.raises(ValueError, match="int64"):
        _op(q, q, q, p=0.5, seed=torch.tensor([1.0]))


def test_auto_kernel_with_window_on_cpu_is_the_reference() -> None:
    q = torch.randn(1, 1, 3, 4)
    name, _ = registry.select(q, q, q, None, "top_left", window=(2, 0), dropout_p=0.1)
    assert name == "reference"


BAD = {
    "rank": (lambda q, k, v: attnfuse.attention(q[0], k, v), ValueError, "4-D"),
    "heads": (lambda q, k, v: attnfuse.attention(q, k[:, :2], v[:, :2]), ValueError, "enable_gqa=True"),
    "gqa_divisible": (lambda q, k, v: attnfuse.attention(q[:, :3], k[:, :2], v[:, :2], enable_gqa=True), ValueError, "divisible"),
    "head_dim": (lambda q, k, v: attnfuse.attention(q, k[..., :4], v), ValueError, "head dims differ"),
    "int_dtype": (lambda q, k, v: attnfuse.attention(q.long(), k.long(), v.long()), TypeError, "torch.int64"),
    "mixed_dtype": (lambda q, k, v: attnfuse.attention(q.double(), k, v), TypeError, "share a dtype"),
    "device": (lambda q, k, v: attnfuse.attention(q.to("meta"), k, v), ValueError, "one device"),
    "not_tensor": (lambda q, k, v: attnfuse.attention(q.tolist(), k, v), TypeError, "list"),
    "mask_shape": (lambda q, k, v: attnfuse.attention(q, k, v, torch.zeros(3, 5)), ValueError, "does not broadcast"),
    "mask_dtype": (lambda q, k, v: attnfuse.attention(q, k, v, torch.zeros(9, 9, dtype=torch.int32)), TypeError, "bool"),
    "kernel": (lambda q, k, v: attnfuse.attention(q, k, v, kernel="nope"), ValueError, "expected one of"),
    "causal": (lambda q, k, v: attnfuse.attention(q, k, v, is_causal="left"), ValueError, "bottom_right"),
    "dropout_type": (lambda q, k, v: attnfuse.attention(q, k, v, dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    "dropout_bool": (lambda q, k, v: attnfuse.attention(q, k, v, dropout_p=True), TypeError, "got bool"),
    "dropout_range": (lambda q, k, v: attnfuse.attention(q, k, v, dropout_p=1.5), ValueError, "must be in .0, 1., got 1.5"),
    "dropout_nan": (lambda q, k, v: attnfuse.attention(q, k, v, dropout_p=float("nan")), ValueError, "got nan"),
    "window_type": (lambda q, k, v: attnfuse.attention(q, k, v, window=4), TypeError, "pair"),
    "window_len": (lambda q, k, v: attnfuse.attention(q, k, v, window=(1, 2, 3)), TypeError, "pair"),
    "window_negative": (lambda q, k, v: attnfuse.attention(q, k, v, window=(-1, 0)), ValueError, "left must be >= 0"),
    "window_float": (lambda q, k, v: attnfuse.attention(q, k, v, window=(2.0, 0)), TypeError, "left must be an int"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_errors_say_expected_and_got(name: str) -> None:
    fn, exc, words = BAD[name]
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    with pytest.raises(exc, match=words.replace("(", r"\(")):
        fn(q, k, v)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 3),
       nq=st.sampled_from([1, 2, 17, 33]), nk=st.sampled_from([1, 3, 17, 40]),
       d=st.sampled_from([8, 24, 40]), causal=st.sampled_from([False, True, "bottom_right"]),
       mask=st.sampled_from([None, "bool", "additive", "padding"]))
def test_property_reference_op_matches_sdpa_math(b, hkv, groups, nq, nk, d, causal, mask) -> None:
    q = torch.randn(b, hkv * groups, nq, d, dtype=torch.float64)
    k, v = torch.randn(b, hkv, nk, d, dtype=torch.float64), torch.randn(b, hkv, nk, d, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.rand(nq, nk) > 0.4
    elif mask == "additive":
        m = torch.randn(b, 1, nq, nk, dtype=torch.float64)
    elif mask == "padding":
        m = torch.rand(b, 1, 1, nk) > 0.3
    got = attnfuse.attention(q, k, v, m, is_causal=causal, enable_gqa=True)
    full = torch.zeros(nq, nk, dtype=torch.float64)
    if causal:
        off = 0 if causal is True else nk - nq
        full = full.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(1 + off), -math.inf)
    if m is not None:
        full = full + (m if m.dtype != torch.bool else torch.zeros_like(m, dtype=torch.float64).masked_fill(~m, -math.inf))
    s = q @ k.repeat_interleave(groups, 1).mT / math.sqrt(d) + full
    p = torch.softmax(s, -1).nan_to_num(0.0)           # rows with no key: 0 (attnfuse's contract)
    torch.testing.assert_close(got, p @ v.repeat_interleave(groups, 1))


@pytest.mark.skipif(not registry.known("flash"), reason="triton missing")
def test_op_checks_flash_operands_once(monkeypatch) -> None:
    """The op's kernel selection runs flash's operand check; the kernel does not run it again
    (a second check per call is host time a ViT-sized call pays), a direct call still does."""
    from attnfuse.kernels import flash
    calls = []
    real = flash.supports

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(flash, "supports", counted)   # what flash's own _check calls
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    out, _ = torch.ops.attnfuse.attention(q, k, v, None, 0.25, "none", float("-inf"), "flash")
    assert calls == []
    ref, _ = flash.flash_forward(q, k, v, None, 0.25)
    assert calls == [1] and torch.equal(out, ref)
    with pytest.raises(ValueError, match="cannot run"):   # the selection still refuses bad input
        torch.ops.attnfuse.attention(q, k[..., :8], v, None, 0.25, "none", float("-inf"),
                                     "flash")
