"""``attnfuse.attention`` and the ``attnfuse::attention`` op: semantics, registration, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import attnfuse
from attnfuse.kernels import reference
from attnfuse.testing import assert_error_ratio


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
    for args in [(q, k, v, torch.randn(9, 11), 0.3, "top_left", -math.inf, "auto"),
                 (q, k, v, torch.rand(2, 1, 1, 11) > 0.2, 0.3, "none", -1e4, "reference"),
                 (q, k, v, None, 0.3, "bottom_right", -math.inf, "auto")]:
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


def test_mask_and_causal_together_and_bottom_right() -> None:
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    bias = torch.randn(5, 9)
    got = attnfuse.attention(q, k, v, bias, is_causal="bottom_right")
    keep = torch.ones(5, 9, dtype=torch.bool).tril(9 - 5)
    want = _sdpa_math(q, k, v, bias.masked_fill(~keep, -math.inf))
    torch.testing.assert_close(got, want)


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
