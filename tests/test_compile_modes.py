"""Inductor modes through the backend (CUDA graphs, autotuning), dynamic shapes, determinism."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import attnfuse
from attnfuse.kernels import registry
from attnfuse.backend import Options, make_backend, mode_config
from attnfuse.testing import assert_error_ratio
from helpers import fused_op_count

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
MODES = tuple(torch._inductor.list_mode_options())
LENGTHS = (16, 33, 64, 100)


def attn(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


# ----------------------------------------------------------------------------- models
# The width (24) is none of the sequence lengths: Dynamo gives equal sizes one symbol ("duck
# sizing"), so a length equal to a static width would be specialised with it.

class Plain(torch.nn.Module):
    """softmax(Q·Kᵀ/√d)·V with heads split by views."""

    def __init__(self, width: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.heads, self.d = heads, width // heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)

    def split(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, o):
        b, _, t, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(b, t, self.heads * self.d))

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d), dim=-1) @ v)


class Causal(Plain):
    """A causal mask from a ``torch.tril`` buffer sliced to the length."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("tri", torch.tril(torch.ones(128, 128)))

    def forward(self, x):
        q, k, v = self.split(x)
        t = x.shape[1]
        s = (q @ k.transpose(-2, -1)) * self.d ** -0.5
        s = s.masked_fill(self.tri[:t, :t] == 0, float("-inf"))
        return self.merge(F.softmax(s, dim=-1) @ v)


class Counting:
    """A backend that counts the graphs it compiles and keeps attnfuse's report."""

    def __init__(self, **options) -> None:
        self.graphs, self.report = 0, attnfuse.Report()
        self.backend = make_backend(Options(**options), self.report)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


def _check_output(model, got, *inputs) -> None:
    """The error-ratio rule against an fp64 copy of the model."""
    want = model(*inputs)
    ref = copy.deepcopy(model).double()(*[x.double() if x.is_floating_point() else x
                                          for x in inputs])
    assert_error_ratio("output", got, ref, want)


def _symbolic(site) -> bool:
    return any(isinstance(n, str) for n in site.spec.q.shape)


def _assert_all_fused(report: attnfuse.Report, graphs: int) -> None:
    assert len(report.after) == graphs, str(report)
    assert report.sites and not report.kept, str(report)
    assert all(s.kernel not in (None, "sdpa") for s in report.sites), str(report)
    for g in report.after:      # the graph handed to Inductor holds the fused op, no softmax
        assert fused_op_count(g) >= 1, g.code
        assert "softmax" not in g.code, g.code


# ----------------------------------------------------------------------------- modes

@pytest.mark.parametrize("mode", MODES)
def test_mode_config_is_inductors_table(mode: str) -> None:
    want = {} if mode == "default" else torch._inductor.list_mode_options(mode)
    assert mode_config(mode) == want
    assert mode_config(None) == {}
    assert mode_config("reduce-overhead") == {"triton.cudagraphs": True}


def test_unknown_mode_raises() -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    with pytest.raises(ValueError, match="reduce-overhead") as e:
        attnfuse.attnfuse_backend(gm, [], mode="fastest")
    for m in MODES:
        assert repr(m) in str(e.value)
    with pytest.raises(ValueError, match="mode must be one of"):
        attnfuse.optimize(torch.nn.Identity(), mode="fastest")
    # Dynamo wraps the backend's ValueError (BackendCompilerFailed) at the first call
    with pytest.raises(Exception, match="mode must be one of"):
        torch.compile(attn, backend="attnfuse", mode="fastest")(*[torch.randn(1, 1, 4, 8)] * 3)
    with pytest.raises(ValueError, match="needs inner='inductor'"):
        Options(inner="eager", mode="reduce-overhead")
    with pytest.raises(ValueError, match="disagree"):
        attnfuse.attnfuse_backend(gm, [], mode="max-autotune",
                                  options={"mode": "reduce-overhead"})


class _Spy:
    """Stands in for Inductor's compile_fx: records its config patches (the mode's; the cache
    marking of ``sdpa.call`` is tested on its own), runs the graph eagerly."""

    def __init__(self) -> None:
        self.patches: list[dict] = []

    def __call__(self, gm, example_inputs, **kwargs):
        patches = dict(kwargs.get("config_patches") or {})
        patches.pop("unsafe_marked_cacheable_functions", None)
        self.patches.append(patches)
        return gm.forward


@pytest.fixture
def spy(monkeypatch) -> _Spy:
    import torch._inductor.compile_fx as cfx
    s = _Spy()
    monkeypatch.setattr(cfx, "compile_fx", s)
    return s


@pytest.mark.parametrize("mode", MODES)
def test_mode_reaches_compile_fx(spy: _Spy, mode: str) -> None:
    """torch.compile(mode=...), options={"mode": ...} and optimize(mode=...) all patch Inductor's
    config exactly as torch.compile(mode=...) with the inductor backend would."""
    want = {} if mode == "default" else torch._inductor.list_mode_options(mode)
    q = torch.randn(1, 2, 5, 8)
    f = torch.compile(attn, backend="attnfuse", mode=mode)
    torch.testing.assert_close(f(q, q, q), attn(q, q, q))
    torch._dynamo.reset()
    g = torch.compile(attn, backend="attnfuse", options={"mode": mode, "kernel": "reference"})
    torch.testing.assert_close(g(q, q, q), attn(q, q, q))
    torch._dynamo.reset()
    fast = attnfuse.optimize(Plain(), torch.randn(2, 7, 24), mode=mode)
    assert spy.patches == [want] * 3
    assert len(fast.attnfuse_report.fused) == 1, str(fast.attnfuse_report)


def test_no_mode_no_patches(spy: _Spy) -> None:
    q = torch.randn(1, 2, 5, 8)
    torch.compile(attn, backend="attnfuse")(q, q, q)
    assert spy.patches == [{}]


@pytest.mark.skipif(not hasattr(torch._inductor.config, "unsafe_marked_cacheable_functions"),
                    reason="this torch has no unsafe_marked_cacheable_functions")
def test_second_compile_hits_aotautograd_cache(tmp_path, monkeypatch) -> None:
    """A rewritten graph calls ``sdpa.call`` (SDPA pinned to a backend); AOTAutograd's cache
    refuses unknown Python functions unless marked, and then every compile traces again. Marked
    (keyed by its source), a second compile of the same model is a cache hit."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, x = Plain().eval(), torch.randn(2, 7, 24)
    stats = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        with torch._functorch.config.patch(enable_autograd_cache=True):
            fast = attnfuse.optimize(model, x, kernel="sdpa_math")
        assert fast.attnfuse_report.sites[0].kernel == "sdpa_math"   # an sdpa.call in the graph
        stats.append(dict(counters["aot_autograd"]))
    assert stats[0].get("autograd_cache_bypass", 0) == 0, stats
    assert stats[1].get("autograd_cache_hit", 0) == 1, stats


@pytest.mark.slow
def test_reduce_overhead_on_cpu() -> None:
    """Inductor skips CUDA graphs on CPU; the compiled model still runs, fused and correct."""
    torch.manual_seed(0)
    model = Causal().eval()
    backend = Counting(mode="reduce-overhead")
    f = torch.compile(model, backend=backend)
    x = torch.randn(2, 16, 24)
    counters.clear()
    with torch.no_grad():
        for _ in range(3):
            got = f(x)
            _check_output(model, got, x)
    assert backend.graphs == 1
    # the mode reached Inductor, which declined CUDA graphs for a CPU graph
    assert counters["inductor"]["cudagraph_skips"] == 1, dict(counters["inductor"])
    _assert_all_fused(backend.report, graphs=1)
    # and the string form, with torch.compile's own mode argument
    torch._dynamo.reset()
    g = torch.compile(model, backend="attnfuse", mode="reduce-overhead")
    with torch.no_grad():
        _check_output(model, g(x), x)


class GpuAttention(torch.nn.Module):
    def __init__(self, width: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.d = heads, width // heads
        self.qkv = torch.nn.Linear(width, 3 * width)

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        return (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(b, t, w)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", ["flash", None])
def test_reduce_overhead_cuda_graphs(kernel) -> None:
    """mode="reduce-overhead": CUDA graphs replay the fused kernel without host syncs, for the
    flash kernel and for whatever the selector picks (timed at compile time, before capture)."""
    from torch._inductor import cudagraph_trees

    from attnfuse import backend

    torch.manual_seed(0)
    torch._dynamo.reset()
    backend._REPORTS.clear()     # last_report() below: this compile's sites only
    model = GpuAttention().cuda().half().eval()
    counters.clear()
    f = torch.compile(model, backend="attnfuse",
                      options={"kernel": kernel, "mode": "reduce-overhead"})
    x = torch.randn(2, 128, 256, device="cuda", dtype=torch.half)
    with torch.no_grad():
        for _ in range(3):       # warm-up run, then recording
            f(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):   # replays: a host sync here would raise
                got = f(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        got = got.clone()
        torch.cuda.synchronize()
        want = model(x)
        ref = copy.deepcopy(model).double()(x.double())
    assert_error_ratio("output", got, ref, want)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    manager = cudagraph_trees.get_container(x.device.index).tree_manager
    assert manager is not None and manager.current_node is not None, "no CUDA graph recorded"
    report = attnfuse.last_report()
    mine = [s for s in report.sites if s.spec is not None and s.spec.q.shape == (2, 4, 128, 64)]
    want_kernels = {kernel} if kernel else set(registry.candidates("cuda"))
    assert mine and all(s.kernel in want_kernels for s in mine), str(report)


# ----------------------------------------------------------------------------- dynamic shapes

@pytest.mark.parametrize("cls", [Plain, Causal])
def test_dynamic_true_compiles_once(cls) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    counters.clear()
    backend = Counting()
    f = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for t in LENGTHS:
            x = torch.randn(2, t, 24)
            _check_output(model, f(x), x)
    assert backend.graphs == 1 and counters["stats"]["unique_graphs"] == 1
    _assert_all_fused(backend.report, graphs=1)
    (site,) = backend.report.sites
    assert _symbolic(site), site.spec
    if cls is Causal:
        # Causality is read from the mask's values at a static shape; at a symbolic length the
        # sliced tril stays a dense bool mask on the fused op (never dropped).
        assert site.spec.mask.causal == "top_left" or site.spec.mask.kind == "bool", site.spec


@pytest.mark.parametrize("cls", [Plain, Causal])
def test_dynamic_default_recompiles_once(cls) -> None:
    """dynamic=None: static first graph, one automatic-dynamic recompile, then no more."""
    torch.manual_seed(0)
    model = cls().eval()
    backend = Counting()
    f = torch.compile(model, backend=backend)
    with torch.no_grad():
        for i, t in enumerate(LENGTHS):
            x = torch.randn(2, t, 24)
            _check_output(model, f(x), x)
            assert backend.graphs == min(i + 1, 2)
    _assert_all_fused(backend.report, graphs=2)
    static, dynamic = backend.report.sites
    assert not _symbolic(static) and _symbolic(dynamic)
    if cls is Causal:
        assert static.spec.mask.causal == "top_left", static.spec
        assert dynamic.spec.mask.causal == "top_left" or dynamic.spec.mask.kind == "bool"


@pytest.mark.slow
def test_optimize_dynamic_with_inductor_trains() -> None:
    """optimize(dynamic=True): one symbolic graph for inference (compiled on the example, under
    no_grad) and one for training (grad mode is guarded), whatever the length."""
    torch.manual_seed(0)
    model = Causal()
    fast = attnfuse.optimize(model, torch.randn(2, LENGTHS[0], 24), dynamic=True)
    report = fast.attnfuse_report
    with torch.no_grad():
        for t in LENGTHS:
            x = torch.randn(2, t, 24)
            _check_output(model, fast(x), x)
    _assert_all_fused(report, graphs=1)
    for t in LENGTHS:
        x = torch.randn(2, t, 24, requires_grad=True)
        got = fast(x)
        _check_output(model, got, x)
        cot = torch.randn(got.shape)
        g_got = torch.autograd.grad(got, [x, *model.parameters()], cot)
        g_want = torch.autograd.grad(model(x), [x, *model.parameters()], cot)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    _assert_all_fused(report, graphs=2)
    assert all(_symbolic(s) for s in report.sites)


def test_dynamic_flash_and_sdpa_forced() -> None:
    """The Triton kernel (interpreted on CPU) at symbolic lengths; an SDPA call rewritten too."""

    class Sdpa(Plain):
        def forward(self, x):
            q, k, v = self.split(x)
            return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    device = "cuda" if CUDA else "cpu"
    for cls in (Plain, Sdpa):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = cls().eval().to(device)
        backend = Counting(kernel="flash", inner="eager")
        f = torch.compile(model, backend=backend, dynamic=True)
        with torch.no_grad():
            for t in (16, 33):
                x = torch.randn(2, t, 24, device=device)
                _check_output(model, f(x), x)
        assert backend.graphs == 1
        assert [s.kernel for s in backend.report.sites] == ["flash"], str(backend.report)
        assert _symbolic(backend.report.sites[0])


# ----------------------------------------------------------------------------- HF Llama

def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.LlamaModel._from_config(cfg, attn_implementation="eager").eval()

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    return Wrap()


def _llama_inputs(t: int):
    ids = torch.randint(0, 100, (2, t), generator=torch.Generator().manual_seed(t))
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, -3:] = 0            # right padding
    return ids, mask


def _run_llama(dynamic, lengths=(11, 20, 37)) -> Counting:
    model = _llama()
    backend = Counting(inner="eager")
    f = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch.no_grad():
        for t in lengths:
            ids, mask = _llama_inputs(t)
            _check_output(model, f(ids, mask), ids, mask)
    return backend


def test_llama_dynamic_default() -> None:
    backend = _run_llama(None)
    assert backend.graphs == 2
    _assert_all_fused(backend.report, graphs=2)
    assert [_symbolic(s) for s in backend.report.sites] == [False, False, True, True]


def test_llama_dynamic_true_runs_once() -> None:
    """Correct at every length from one graph."""
    backend = _run_llama(True)
    assert backend.graphs == 1
    assert len(backend.report.sites) == 2, str(backend.report)


def test_llama_dynamic_true_specialized_floats_fuse() -> None:
    with torch._dynamo.config.patch(specialize_float=True):
        backend = _run_llama(True)
    assert backend.graphs == 1
    _assert_all_fused(backend.report, graphs=1)
    assert all(_symbolic(s) for s in backend.report.sites)


def test_llama_dynamic_true_fuses() -> None:
    """dynamic=True turns LlamaAttention.scaling (a Python float) into a graph input read by
    .item(): the fused op takes it as its runtime scale."""
    backend = _run_llama(True, lengths=(11, 20))
    _assert_all_fused(backend.report, graphs=1)
    assert all("runtime" in s.spec.scale_expr for s in backend.report.sites)


# ----------------------------------------------------------------------------- determinism

@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_backward_is_bitwise_reproducible(deterministic, causal: bool) -> None:
    """Two backward runs of the flash kernel give identical dq, dk, dv and dbias (GQA, a bias
    broadcast over the batch that requires grad)."""
    device = "cuda" if CUDA else "cpu"
    dtype = torch.float16 if CUDA else torch.float32
    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, n, d = 2, 4, 2, 37, 16

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

    q, k, v = leaf(b, hq, n, d), leaf(b, hkv, n, d), leaf(b, hkv, n, d)
    bias = leaf(1, hq, n, n)
    dout = torch.randn(b, hq, n, d, generator=gen).to(device, dtype)

    def grads():
        out = attnfuse.attention(q, k, v, bias, is_causal=causal, enable_gqa=True, kernel="flash")
        return torch.autograd.grad(out, (q, k, v, bias), dout)

    first, second = grads(), grads()
    for name, a, b_ in zip(("dq", "dk", "dv", "dbias"), first, second):
        assert a is not None and a.abs().sum() > 0, name
        assert torch.equal(a, b_), f"{name} differs between two backward runs"
