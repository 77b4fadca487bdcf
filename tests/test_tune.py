"""Kernel choice: cost formulas, the selector's sources (cost model, timing, cache, pins), SDPA
backends as candidates, and what explain() shows of it."""
from __future__ import annotations

import math
import threading

import pytest
import sympy as sp
import torch
import torch.nn.functional as F

import attnfuse
from attnfuse.testing import assert_error_ratio
from attnfuse.kernels import registry, sdpa
from attnfuse.tune import cache, cost, select
from attnfuse.tune.select import Problem, choose


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test sees an empty cache directory and an empty in-process memory."""
    monkeypatch.setenv("ATTNFUSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNFUSE_DISABLE_CACHE", raising=False)
    monkeypatch.delenv("ATTNFUSE_PIN", raising=False)
    cache.unpin()
    select.forget()
    yield
    cache.unpin()
    select.forget()


def _qkv(b=2, h=4, nq=64, nk=64, d=32, hkv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hkv = hkv or h
    return (torch.randn(b, h, nq, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, nk, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, nk, d, generator=g, dtype=dtype))


# ----------------------------------------------------------------------------- cost formulas

@pytest.mark.parametrize("nq,nk,causal,window", [
    (17, 17, "top_left", (-1, -1)), (17, 40, "bottom_right", (-1, -1)), (40, 17, "top_left", (-1, -1)),
    (40, 17, "bottom_right", (-1, -1)), (64, 64, "top_left", (7, 0)), (33, 50, "none", (3, 5)),
    (1, 1000, "bottom_right", (100, 0)), (50, 50, "none", (-1, -1))])
def test_band_fraction_counts_the_reference_band(nq, nk, causal, window):
    from attnfuse.kernels.reference import outside_band
    out = outside_band(torch.arange(nq)[:, None], torch.arange(nk)[None, :], causal, window, nq, nk)
    inside = nq * nk if out is None else int((~out).sum())
    assert cost.band_fraction(nq, nk, causal, window) == pytest.approx(inside / (nq * nk))


def test_formulas_are_the_flash_counts():
    """Forward FLOPs are 2 matmuls of 2·N²·D; bytes follow the I/O bound (K/V per query tile)."""
    f = cost.Facts(b=2, hq=8, hkv=2, nq=1000, nk=512, d=64, dv=64, rho=1.0, elem=2,
                   dtype=torch.bfloat16)
    p = cost.Profile(matmul=1.0, exp=1.0, bwd_matmul=1.0, block_m=128)
    c = cost.counts(p, f)
    assert c["flops_fwd"] == 2 * 2 * 8 * 1000 * 512 * (64 + 64)
    assert c["exps_fwd"] == 2 * 8 * 1000 * 512
    tiles = math.ceil(1000 / 128)
    assert c["bytes_fwd"] == 2 * (2 * 8 * 1000 * 128 + 2 * 2 * 512 * 128)   # each operand once
    assert c["reread_fwd"] == 2 * 2 * 8 * tiles * 512 * 128                  # K/V per query tile
    # the backward's five matmuls, plus one more Q·Kᵀ and dO·Vᵀ when P is computed twice
    p2 = cost.Profile(matmul=1.0, exp=1.0, bwd_matmul=1.0, recompute=2)
    assert cost.counts(p2, f)["flops_bwd"] - c["flops_bwd"] == c["flops_fwd"]
    assert set(cost.formulas()) >= {"flops_fwd", "bytes_fwd", "flops_bwd"}
    assert cost.FLOPS_FWD.has(sp.Symbol("rho", positive=True))


def test_prediction_grows_with_work_and_materialising_costs_memory():
    base = dict(b=1, hq=8, hkv=8, d=128, dv=128, rho=1.0, elem=2, dtype=torch.bfloat16)
    flash_like = cost.Profile(matmul=0.6, exp=0.4, bwd_matmul=0.6)
    math_like = cost.Profile(matmul=0.6, exp=0.4, bwd_matmul=0.6, materializes=True)
    rates = (7e14, 4e12, 3e12, 5e-6)
    t = [cost.predict(flash_like, cost.Facts(nq=n, nk=n, **base), *rates) for n in (1024, 4096)]
    assert t[1] > 10 * t[0]
    long = cost.Facts(nq=8192, nk=8192, **base)
    assert cost.predict(math_like, long, *rates) > 2 * cost.predict(flash_like, long, *rates)
    train = cost.Facts(nq=4096, nk=4096, training=True, **base)
    assert cost.predict(flash_like, train, *rates) > 2 * t[1]


# ----------------------------------------------------------------------------- problems and keys

def test_key_buckets_lengths_and_reads_layout():
    q, k, v = _qkv(nq=1000, nk=1000)
    a = Problem.of(q, k, v, None, "none").key()
    q2, k2, v2 = _qkv(nq=1024, nk=1024)
    assert Problem.of(q2, k2, v2, None, "none").key() == a
    q3, k3, v3 = _qkv(nq=1025, nk=1025)
    assert Problem.of(q3, k3, v3, None, "none").key()["nq"] == 2048
    bshd = torch.randn(2, 64, 4, 32).transpose(1, 2)
    assert Problem.of(bshd, bshd, bshd, None, "none").layout == "bshd"
    assert Problem.of(q, k, v, None, "none").layout == "bhsd"
    pad = torch.ones(2, 1, 1, 1000, dtype=torch.bool)
    key = Problem.of(q, k, v, pad, "none").key()
    assert key["mask"] == "bool" and key["mask_rows"] == "bcast"
    qg, kg, vg = _qkv(h=8, hkv=2)
    assert Problem.of(qg, kg, vg, None, "top_left").key()["gqa"] == 4


# ----------------------------------------------------------------------------- SDPA candidates

def test_sdpa_candidates_refuse_what_would_change_the_function():
    q, k, v = _qkv(nq=16, nk=32)
    r = lambda name, **kw: registry.rejections(name, q, k, v, kw.pop("mask", None),  # noqa: E731
                                               kw.pop("causal", "none"), **kw)
    assert r("sdpa_math") == [] and r("sdpa_flash") == []
    assert any("window" in x for x in r("sdpa_math", window=(4, 0)))
    assert any("soft-capping" in x for x in r("sdpa_flash", softcap=30.0))
    assert any("dropout" in x for x in r("sdpa_math", dropout_p=0.1))
    assert any("bottom-right" in x for x in r("sdpa_math", causal="bottom_right"))
    assert any("CUDA-only" in x for x in r("sdpa_cudnn"))
    bias = torch.zeros(1, 1, 16, 32)
    assert any("eager" in x for x in r("sdpa_math", mask=bias))
    assert r("sdpa_math", mask=bias, source="sdpa") == []
    keep = torch.ones(1, 1, 16, 32, dtype=torch.bool)
    assert any("filled with" in x for x in r("sdpa_math", mask=keep, mask_fill=-1e4))
    assert r("sdpa_math", mask=keep) == []


@pytest.mark.parametrize("name", ["sdpa_math", "sdpa_flash"])
def test_pinned_sdpa_call_matches_sdpa(name):
    q, k, v = _qkv(h=4, hkv=2, nq=17, nk=33)
    got = sdpa.call(q, k, v, None, 0.3, True, name)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got, want)
    assert torch.allclose(attnfuse.attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True,
                                             kernel=name), want, atol=1e-6)


def test_forcing_an_sdpa_backend_that_cannot_run_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="sdpa_cudnn.*CUDA-only"):
        attnfuse.attention(q, k, v, kernel="sdpa_cudnn")
    with pytest.raises(ValueError, match="window"):
        attnfuse.attention(q, k, v, kernel="sdpa_math", window=(3, 0), is_causal=True)


# ----------------------------------------------------------------------------- the selector

def test_untimed_choice_is_the_best_prediction():
    q, k, v = _qkv()
    c = choose(Problem.of(q, k, v, None, "top_left"), q, k, v, None, tune=False)
    eligible = [x for x in c.candidates if x.eligible]
    assert c.kernel == min(eligible, key=lambda x: x.predicted_ms).kernel
    assert c.cache == "miss" and "untimed" in c.reason
    assert all(x.measured_ms is None for x in c.candidates)
    assert {x.kernel for x in c.candidates} == set(registry.candidates("cpu"))
    assert any(not x.eligible and "CUDA-only" in x.reasons[0] for x in c.candidates)


def _count_benches(monkeypatch) -> list:
    """Every timing: each timed candidate is measured in ``select.ROUNDS`` rounds."""
    calls = []
    real = select._bench

    def counted(fn, device, *args):
        calls.append(fn)
        return real(fn, device, *args)
    monkeypatch.setattr(select, "_bench", counted)
    return calls


def test_timed_choice_is_stored_and_reused_across_processes(monkeypatch):
    calls = _count_benches(monkeypatch)
    q, k, v = _qkv(nq=48, nk=80)
    p = Problem.of(q, k, v, None, "none")
    first = choose(p, q, k, v, None, tune=True)
    timed = [c for c in first.candidates if c.measured_ms is not None]
    rounds = select.ROUNDS
    assert first.cache == "miss" and len(timed) >= 2 and len(calls) == rounds * len(timed)
    assert len({id(f) for f in calls}) == len(timed)   # rounds reuse each candidate's runner
    assert first.kernel == select._winner(sorted(timed, key=lambda c: c.measured_ms))[0].kernel
    assert choose(p, q, k, v, None, tune=True) is first   # memory: nothing timed again
    assert len(calls) == rounds * len(timed)
    select.forget()                      # a new process: only the disk remains
    again = choose(p, q, k, v, None, tune=True)
    assert again.cache == "hit" and again.kernel == first.kernel
    assert len(calls) == rounds * len(timed)
    assert len(cache.store("calibration")) >= 1      # timings refined the cost model
    # the same bucket (48 -> 64, 80 -> 128) hits; another bucket does not
    q2, k2, v2 = _qkv(nq=60, nk=100)
    assert choose(Problem.of(q2, k2, v2, None, "none"), q2, k2, v2, None, tune=True).cache == "hit"


def test_calibration_scales_predictions(monkeypatch):
    q, k, v = _qkv()
    p = Problem.of(q, k, v, None, "none")
    raw = select.predict(p, "sdpa_math", calibrate=False)
    env = select._environment_key(p)
    select._learn(p, "sdpa_math", env, 3.0)
    assert select.predict(p, "sdpa_math", env=env) == pytest.approx(3.0 * raw)


def test_disabled_cache_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNFUSE_DISABLE_CACHE", "1")
    q, k, v = _qkv()
    c = choose(Problem.of(q, k, v, None, "none"), q, k, v, None, tune=True)
    assert c.cache == "disabled"
    assert not list((tmp_path / "cache").glob("choices*"))


def test_pinned_choices_reproduce_without_timing(monkeypatch, tmp_path):
    q, k, v = _qkv(nq=40, nk=40)
    p = Problem.of(q, k, v, None, "top_left")
    first = choose(p, q, k, v, None, tune=True)
    pins = tmp_path / "pins.json"
    assert cache.export(pins, ["choices"]) == 1
    cache.clear()
    select.forget()
    cache.pin(pins)
    monkeypatch.setattr(select, "_bench", lambda fn, device: pytest.fail("timed while pinned"))
    again = choose(p, q, k, v, None, tune=True)
    assert again.cache == "pinned" and again.kernel == first.kernel
    q2, k2, v2 = _qkv(nq=300, nk=300)      # not in the table: best prediction, still untimed
    other = choose(Problem.of(q2, k2, v2, None, "top_left"), q2, k2, v2, None, tune=True)
    assert other.cache == "pinned" and "no entry" in other.reason


def test_timing_rounds_are_interleaved_and_the_fastest_round_counts(monkeypatch):
    """A clock that speeds up while tuning (a GPU leaving idle) must not decide the choice: the
    candidate timed first is the fastest, but its first round ran at a third of the clock."""
    real_runner, order = select.runner, []

    def tagged(problem, kernel):
        fn = real_runner(problem, kernel)
        fn.kernel = kernel
        return fn
    true_ms: dict[str, float] = {}

    def fake_bench(fn, device, *args):
        order.append(fn.kernel)
        true_ms.setdefault(fn.kernel, 1.0 + 0.1 * len(true_ms))   # first timed = fastest
        slow = 3.0 if len(order) == 1 else 1.0
        return true_ms[fn.kernel] * slow * 1e-3
    monkeypatch.setattr(select, "runner", tagged)
    monkeypatch.setattr(select, "_bench", fake_bench)
    q, k, v = _qkv(nq=40, nk=40)
    c = choose(Problem.of(q, k, v, None, "none"), q, k, v, None, tune=True)
    timed = [x.kernel for x in c.candidates if x.measured_ms is not None]
    first = order[0]
    assert len(timed) >= 2 and order == order[:len(timed)] * select.ROUNDS   # interleaved
    assert c.kernel == first
    assert c.candidates[[x.kernel for x in c.candidates].index(first)].measured_ms == \
        pytest.approx(true_ms[first])


@pytest.mark.parametrize("flash_ms,cudnn_ms,expected", [
    (1.00, 1.02, "sdpa_cudnn"),    # within TIE: PyTorch's backend
    (1.00, 1.10, "flash"),         # clearly faster: attnfuse's kernel
    (1.10, 1.00, "sdpa_cudnn")])   # fastest anyway
def test_a_tie_goes_to_the_sdpa_backend(flash_ms, cudnn_ms, expected):
    from attnfuse.report import Candidate
    timed = sorted([Candidate("flash", 1.0, measured_ms=flash_ms),
                    Candidate("sdpa_cudnn", 1.0, measured_ms=cudnn_ms),
                    Candidate("sdpa_math", 1.0, measured_ms=9.0)], key=lambda c: c.measured_ms)
    win, why = select._winner(timed)
    assert win.kernel == expected
    assert ("tie" in why) == (expected == "sdpa_cudnn" and flash_ms < cudnn_ms)


def test_concurrent_first_calls_tune_once(monkeypatch):
    calls = _count_benches(monkeypatch)
    q, k, v = _qkv(nq=72, nk=72)
    p = Problem.of(q, k, v, None, "none")
    results, errors = [], []

    def work():
        try:
            results.append(choose(p, q, k, v, None, tune=True))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    assert len({id(r) for r in results}) == 1
    timed = sum(1 for c in results[0].candidates if c.measured_ms is not None)
    assert len(calls) == select.ROUNDS * timed


# ----------------------------------------------------------------------------- through the doors

class _Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1) @ v


def test_explain_shows_candidates_and_cache():
    q, k, v = _qkv()
    report = attnfuse.explain(_Attn(), (q, k, v))
    site = report.sites[0]
    assert site.fused and site.cache == "miss"
    assert {c.kernel for c in site.candidates} == set(registry.candidates("cpu"))
    assert any(c.predicted_ms for c in site.candidates)
    assert site.kernel in site.reason


@pytest.mark.parametrize("kernel", ["sdpa_math", "reference"])
def test_compiled_training_through_either_kind_of_kernel(kernel):
    q, k, v = (t.requires_grad_(True) for t in _qkv(nq=24, nk=40))
    fast = attnfuse.optimize(_Attn(), inner="inductor", kernel=kernel)
    out = fast(q, k, v)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    eager = _Attn()(q, k, v)
    eq, ek, ev = torch.autograd.grad(eager.sum(), (q, k, v))
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = _Attn()(q2, k2, v2)
    wq, wk, wv = torch.autograd.grad(want.sum(), (q2, k2, v2))
    for name, got, ref, low in (("out", out, want, eager), ("dq", dq, wq, eq), ("dk", dk, wk, ek),
                                ("dv", dv, wv, ev)):
        assert_error_ratio(name, got, ref, low)
    assert fast.attnfuse_report.sites[0].kernel == kernel


def test_inductor_graph_cache_keys_on_the_choice(monkeypatch, tmp_path):
    """The choice is part of the rewritten graph, so Inductor's FX graph cache never serves a
    graph compiled for another kernel: same choice hits, another choice misses."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    q, k, v = _qkv(nq=16, nk=16)

    def compile_once(kernel):
        torch._dynamo.reset()
        counters.clear()
        # Inductor's own patch context: monkeypatching its config module leaks past the test.
        with inductor_config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
            out = attnfuse.optimize(_Attn(), inner="inductor", kernel=kernel)(q, k, v)
        return out, dict(counters["inductor"])

    _, first = compile_once("sdpa_math")
    _, same = compile_once("sdpa_math")
    out, other = compile_once("reference")
    assert first.get("fxgraph_cache_miss") == 1
    assert same.get("fxgraph_cache_hit") == 1
    assert other.get("fxgraph_cache_miss") == 1 and not other.get("fxgraph_cache_hit")
    assert_error_ratio("out", out, _Attn()(q.double(), k.double(), v.double()), _Attn()(q, k, v))


def test_flash_configs_round_trip_through_the_cache_format():
    """What the cache stores for flash (its tile choice per autotuning key) preloads back."""
    flash = pytest.importorskip("attnfuse.kernels.flash")
    key = ("fwd", "torch.bfloat16", 0, 4096, 4096, 0, 1, 128, 128, 0, False, False, False)
    records = [{"key": list(key), "kwargs": {"BLOCK_M": 128, "BLOCK_N": 64, "USE_DESC": True},
                "num_warps": 8, "num_stages": 3},
               {"key": ["nonsense"], "kwargs": {}, "num_warps": 4, "num_stages": 1}]
    saved = dict(flash._CHOSEN)
    try:
        assert flash.preload(records) == 1
        config = flash._CHOSEN[key]
        assert (config.kwargs["BLOCK_N"], config.num_warps, config.num_stages) == (64, 8, 3)
        assert config.pre_hook is not None               # TMA configs size their descriptors
        assert flash.tuned_configs([key]) == records[:1]
        assert flash.tuned_configs([key, list(key), key]) == records[:1]   # each key once
        with flash.recording() as outer:
            with flash.recording() as inner:
                flash._RECORDING.append(key)
        assert inner == [key] and outer == [key]
    finally:
        flash._CHOSEN.clear()
        flash._CHOSEN.update(saved)


def test_logging_shows_sites_rules_and_candidates():
    import logging
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("attnfuse")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        q, k, v = _qkv()
        attnfuse.explain(_Attn(), (q, k, v))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    text = "\n".join(r.getMessage() for r in records)
    assert "attnfuse site 0" in text and "rules:" in text and "candidate sdpa_math" in text
    assert "1 fused" in text
