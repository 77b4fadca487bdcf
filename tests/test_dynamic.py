"""Dynamic shapes: runtime scalar scales (Dynamo's unspecialised floats) and causal masks built from
symbolic sizes; one graph per Dynamo frame in the report."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

import attnfuse
from attnfuse.backend import Options, make_backend
from attnfuse.testing import assert_error_ratio
from helpers import fused_op_count, softmax_count

D = 16


def attend(s, v):
    return torch.matmul(torch.softmax(s, dim=-1), v)


def qkv(n: int, nk: int = None, d: int = D, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1000 * n)
    nk = n if nk is None else nk
    return (torch.randn(1, 2, n, d, generator=g), torch.randn(1, 2, nk, d, generator=g),
            torch.randn(1, 2, nk, d, generator=g))


def check_output(model, got, *inputs) -> None:
    """The error-ratio rule against an fp64 copy of the model."""
    want = model(*inputs)
    ref = copy.deepcopy(model).double()(*[x.double() if isinstance(x, torch.Tensor)
                                          and x.is_floating_point() else x for x in inputs])
    assert_error_ratio("output", got, ref, want)


def compiled(model, example, **kw):
    counters.clear()
    return attnfuse.optimize(model, example, dynamic=True, inner=kw.pop("inner", "eager"), **kw)


def only_site(fast):
    report = fast.attnfuse_report
    assert len(report.after) == 1, str(report)
    (site,) = report.sites
    return site


def assert_one_graph() -> None:
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# ----------------------------------------------------------------------------- runtime scales

class FloatScale(torch.nn.Module):
    """HF Llama's spelling: a float attribute as the scale (a graph input under dynamic=True)."""

    def __init__(self, scaling: float = D ** -0.5) -> None:
        super().__init__()
        self.scaling = scaling

    def forward(self, q, k, v):
        return attend(torch.matmul(q, k.transpose(2, 3)) * self.scaling, v)


def test_float_attribute_scale_fuses_and_follows_its_value() -> None:
    model = FloatScale()
    fast = compiled(model, qkv(32))
    site = only_site(fast)
    assert site.kernel is not None, site.reason
    assert site.spec.scale == pytest.approx(D ** -0.5)
    assert "runtime" in site.spec.scale_expr and "self.scaling" in site.spec.scale_expr
    (after,) = fast.attnfuse_report.after
    assert fused_op_count(after) == 1 and softmax_count(after) == 0, after.code
    with torch.no_grad():
        for n in (32, 45, 17):
            check_output(model, fast(*qkv(n)), *qkv(n))
        assert_one_graph()       # new lengths: no recompile
        # A new value: the op reads the scalar at run time, or (where Dynamo specialises float
        # attributes, e.g. torch 2.11) a guard on the value recompiles; never a stale constant.
        model.scaling = 0.5
        check_output(model, fast(*qkv(20)), *qkv(20))


@pytest.mark.parametrize("spelling", ["div", "q_prescaled", "sqrt_of_size"])
def test_other_runtime_scale_spellings(spelling: str) -> None:
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.scaling = 4.0, 0.25

        def forward(self, q, k, v):
            if spelling == "div":
                return attend(q @ k.transpose(-2, -1) / self.norm, v)
            if spelling == "q_prescaled":
                return attend((q * self.scaling) @ k.transpose(-2, -1), v)
            return attend(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), v)

    model = M()
    fast = compiled(model, qkv(32))
    site = only_site(fast)
    assert site.kernel is not None and site.spec.scale == pytest.approx(0.25), site.reason
    with torch.no_grad():
        for n in (32, 40):
            check_output(model, fast(*qkv(n)), *qkv(n))
    assert_one_graph()


class Capped(torch.nn.Module):
    """Gemma 2's soft-cap, both factors float attributes: cap·tanh(scaling·s/cap)."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self.scaling, self.cap = 0.25, cap

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        return attend(torch.tanh(s / self.cap) * self.cap, v)


@pytest.mark.parametrize("cap", [5.0, -5.0])
def test_runtime_softcap(cap: float) -> None:
    model = Capped(cap)
    fast = compiled(model, qkv(32))
    site = only_site(fast)
    assert site.kernel is not None, site.reason
    assert site.spec.softcap == pytest.approx(abs(cap)) and site.spec.scale == pytest.approx(0.25)
    with torch.no_grad():
        for n in (32, 40):
            x = [t * 8 for t in qkv(n)]          # scores large enough for the cap to matter
            check_output(model, fast(*x), *x)


def test_mask_before_a_runtime_scale_is_left_alone() -> None:
    class M(FloatScale):
        def forward(self, q, k, v):
            n = q.shape[-2]
            bias = torch.arange(n, dtype=q.dtype)[None, :] * 0.01
            return attend((torch.matmul(q, k.transpose(2, 3)) + bias) * self.scaling, v)

    site = only_site(compiled(M(), qkv(32)))
    assert site.kernel is None and "mask is applied before the runtime scalar" in site.reason


def test_tensor_temperatures_are_left_alone() -> None:
    """A per-head temperature [H, 1, 1] or a learned scalar is a tensor, not the op's scale."""

    class M(torch.nn.Module):
        def __init__(self, shape) -> None:
            super().__init__()
            self.temp = torch.nn.Parameter(torch.full(shape, 0.25))

        def forward(self, q, k, v):
            return attend(q @ k.transpose(-2, -1) * self.temp, v)

    per_head = only_site(compiled(M((2, 1, 1)), qkv(32)))
    assert per_head.kernel is None
    assert "tensor" in per_head.reason and "(2, 1, 1)" in per_head.reason, per_head.reason
    torch._dynamo.reset()
    learned = only_site(compiled(M(()), qkv(32)))
    assert learned.kernel is None and "not a compile-time constant" in learned.reason


def test_inductor_restart_keeps_one_attempt_in_the_report() -> None:
    """AOTAutograd specialises a float the fused op takes as its scale and restarts the frame's
    analysis: the report holds the attempt that was compiled (its scale a constant), once."""
    model = FloatScale()
    fast = compiled(model, qkv(32), inner="inductor", kernel="reference")
    site = only_site(fast)
    assert site.kernel == "reference" and site.spec.scale == pytest.approx(D ** -0.5)
    with torch.no_grad():
        check_output(model, fast(*qkv(40)), *qkv(40))
    assert_one_graph()


# ----------------------------------------------------------------------------- masks from sizes

def arange_mask(keep_fn):
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("tri", torch.tril(torch.ones(64, 64, dtype=torch.bool)))

        def forward(self, q, k, v, pos=3):
            nq, nk = q.shape[-2], k.shape[-2]
            i = torch.arange(nq, device=q.device)[:, None]
            j = torch.arange(nk, device=q.device)[None, :]
            keep = keep_fn(self, i, j, nq, nk, pos)
            s = torch.matmul(q, k.transpose(2, 3)) * 0.25
            return attend(s.masked_fill(~keep, float("-inf")), v)

    return M()


class FinfoCausal(torch.nn.Module):
    """The causal spelling of the report: ``where(j <= i, 0, finfo.min)`` added to the scores."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        i = torch.arange(n, device=q.device)
        mask = torch.where(i[None, :] <= i[:, None], 0.0, torch.finfo(torch.float32).min)
        return attend(torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask, v)


def test_arange_causal_mask_at_symbolic_length() -> None:
    model = FinfoCausal()
    fast = compiled(model, qkv(32))
    site = only_site(fast)
    assert site.spec.mask.causal == "top_left" and site.spec.mask.kind == "none", site.spec
    assert any("size-only additive mask->causal(top_left)" in r for r in site.spec.rules)
    with torch.no_grad():
        for n in (32, 45, 17):
            check_output(model, fast(*qkv(n)), *qkv(n))
    assert_one_graph()


def test_arange_causal_mask_at_the_automatic_dynamic_recompile() -> None:
    model = FinfoCausal()
    fast = attnfuse.optimize(model, qkv(32), inner="eager")
    with torch.no_grad():
        check_output(model, fast(*qkv(40)), *qkv(40))
    static, dynamic = fast.attnfuse_report.sites
    assert isinstance(dynamic.spec.q.shape[2], str), dynamic.spec      # the symbolic graph
    assert static.spec.mask.causal == dynamic.spec.mask.causal == "top_left"


BANDS = {
    # name: (keep(i, j, ...), Nk - Nq, expected (causal, window) or None = a dense mask)
    "causal_nq_ne_nk": (lambda m, i, j, nq, nk, p: j <= i, 5, ("top_left", (-1, -1))),
    "bottom_right": (lambda m, i, j, nq, nk, p: j <= i + (nk - nq), 5, ("bottom_right", (-1, -1))),
    "window_4": (lambda m, i, j, nq, nk, p: (j <= i) & (j > i - 4), 0, ("top_left", (3, 0))),
    # not causal at any length: one key beyond the diagonal (a window, never "causal")
    "offset_plus_1": (lambda m, i, j, nq, nk, p: j <= i + 1, 0, ("none", (-1, 1))),
    # causal up to the example's length (32) only: beyond, the first keys are seen by every row
    "causal_up_to_32": (lambda m, i, j, nq, nk, p: (j <= i) | (j < nq - 32), 0, None),
    # a runtime offset (a KV-cache position as an int argument: a symbol of its own)
    "runtime_offset": (lambda m, i, j, nq, nk, p: j <= i + p, 0, None),
    # causal below a constant row, everything beyond it
    "threshold_row_40": (lambda m, i, j, nq, nk, p: (j <= i) | (i >= 40), 0, None),
    # a window wider than any length the mask can be evaluated at
    "window_100000": (lambda m, i, j, nq, nk, p: (j <= i) & (j > i - 100000), 0, None),
    # a buffer sliced to the length: data no substitution reaches
    "buffer_slice": (lambda m, i, j, nq, nk, p: m.tri[:nq, :nk], 0, None),
}


@pytest.mark.parametrize("name", list(BANDS))
def test_masks_from_sizes(name: str) -> None:
    keep_fn, extra, expected = BANDS[name]
    model = arange_mask(keep_fn)
    pos = name == "runtime_offset"
    args = lambda n, p=7: (*qkv(n, n + extra), *((p,) if pos else ()))  # noqa: E731
    fast = compiled(model, args(32))
    site = only_site(fast)
    assert site.kernel is not None, site.reason
    mask = site.spec.mask
    if expected is None:
        assert mask.causal == "none" and mask.window == (-1, -1) and mask.kind == "bool", mask
    else:
        assert (mask.causal, mask.window, mask.kind) == (*expected, "none"), mask
    with torch.no_grad():
        for n, p in ((32, 7), (45, 5), (17, 9)):
            if name == "buffer_slice" and n + extra > 64:
                continue
            check_output(model, fast(*args(n, p)), *args(n, p))
    assert_one_graph()


# ----------------------------------------------------------------------------- HF Llama

def _llama(attn: str = "eager"):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.LlamaModel._from_config(cfg, attn_implementation=attn).eval()

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids, mask=None):
            return self.model(input_ids=ids, attention_mask=mask,
                              use_cache=False).last_hidden_state

    return Wrap()


def _ids(t: int, padded: bool):
    ids = torch.randint(0, 100, (2, t), generator=torch.Generator().manual_seed(t))
    if not padded:
        return (ids,)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, -3:] = 0
    return ids, mask


@pytest.mark.parametrize("padded", [False, True])
def test_llama_dynamic_fuses_without_recompiling(padded: bool) -> None:
    model = _llama()
    report = attnfuse.Report()
    calls = []
    backend = make_backend(Options(inner="eager"), report)
    counters.clear()
    f = torch.compile(model, backend=lambda gm, ex: calls.append(1) or backend(gm, ex),
                      dynamic=True)
    with torch.no_grad():
        for t in (11, 24):
            check_output(model, f(*_ids(t, padded)), *_ids(t, padded))
    assert len(calls) == 1 and counters["frames"]["ok"] == 1, dict(counters["frames"])
    assert_one_graph()
    assert len(report.sites) == 2 and not report.kept, str(report)
    for s in report.sites:
        assert "runtime" in s.spec.scale_expr
        if padded:        # HF folds the padding into the mask: one dense additive mask, as static
            assert s.spec.mask.kind == "additive" and s.spec.mask.causal == "none"
        else:
            assert s.spec.mask.causal == "top_left" and s.spec.mask.kind == "none", s.spec


def test_llama_sdpa_dynamic_scale_is_passed_on() -> None:
    """attn_implementation="sdpa": SDPA's ``scale=self.scaling`` is a runtime scalar too."""
    model = _llama("sdpa")
    fast = compiled(model, _ids(11, False))
    assert [s.kernel for s in fast.attnfuse_report.sites].count("sdpa") == 0, \
        str(fast.attnfuse_report)
    with torch.no_grad():
        check_output(model, fast(*_ids(24, False)), *_ids(24, False))
    assert_one_graph()
