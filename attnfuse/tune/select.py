"""Kernel choice per site: candidates, cost model, timing, and the cache that remembers.

For one :class:`Problem` (a site's shapes, dtype, mask, band, options):

1. every registered kernel the policy allows on the device is a candidate; each says why it
   cannot run the site, or is eligible;
2. the cost model predicts each eligible kernel's time (``cost.predict`` against the device's
   measured ``ceilings``, scaled by what earlier timings taught about that kernel on that class of
   shapes: ``calibration``);
3. the choice comes from, in order: a pinned table (``attnfuse.cache.pin``; never times), this
   process's memory, the on-disk cache, or timing the best few candidates on the site's shapes
   (GPU time of back-to-back calls replayed from a CUDA graph, floored at the kernel's host
   cost; outside graph capture; a rich progress bar when it takes more than a second); the
   fastest wins, except that a PyTorch SDPA backend within ``TIE`` (3 %) of it wins a tie;
   without timing, the best prediction wins.

Timing is on by default on CUDA; ``ATTNFUSE_AUTOTUNE=0`` (or ``tune=False``) turns it off, and
``tune=True`` also times on CPU. The winner, its timings and its config (flash's tile choice) go
to the cache under the problem's key; the process-wide ``cache.tuning_lock`` makes concurrent
first calls tune once.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..report import Candidate
from . import cache, cost
from .ceilings import _timer, ceilings

log = logging.getLogger(__name__)

TOP_K = 3            # candidates timed per problem
WITHIN = 4.0         # ... among those predicted within this factor of the best
ROUNDS = 3           # interleaved timing rounds per candidate (the fastest round counts)
ROUND_MS = 15.0      # measuring time per candidate and round
SPIN_UP_S = 0.05     # GPU busy time before timing (clocks out of idle)
BATCH_MS = 1.0       # least time of one timing sample (a graph replay of back-to-back calls)
TIE = 0.03           # a PyTorch SDPA backend within this fraction of the fastest wins the site
_MEMO: dict[str, "Choice"] = {}
_MEMO_LOCK = threading.Lock()


def _hint(x: Any, default: int = 1024) -> int:
    """A concrete size for a possibly symbolic one (its hint), without adding a guard."""
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    hint = getattr(node, "hint", None) if node is not None else None
    return int(hint) if hint is not None else default


def _layout(q: Any) -> str:
    """``bhsd`` (heads outside tokens in memory), ``bshd`` (tokens outside heads) or other."""
    try:
        s = [_hint(x) for x in q.stride()]
    except (AttributeError, TypeError):
        return "other"
    if len(s) != 4 or s[3] != 1:
        return "other"
    return "bhsd" if s[1] >= s[2] else "bshd"


@dataclass(frozen=True)
class Problem:
    """What kernel choice depends on, from a site's (possibly fake) operands."""

    device: str
    facts: cost.Facts
    causal: str = "none"
    window: tuple[int, int] = (-1, -1)
    mask_kind: str = "none"             # "none", "bool", "additive"
    mask_shape: tuple[int, ...] = ()
    mask_dtype: Optional[torch.dtype] = None
    mask_fill: float = -math.inf
    mask_grad: bool = False
    softcap: float = 0.0
    dropout_p: float = 0.0
    source: str = "eager_softmax"
    layout: str = "bhsd"
    scale: float = 0.0

    @staticmethod
    def of(q: Any, k: Any, v: Any, mask: Any, causal: str, *, window: tuple[int, int] = (-1, -1),
           softcap: float = 0.0, dropout_p: float = 0.0, mask_fill: float = -math.inf,
           mask_grad: bool = False, training: bool = False, source: str = "eager_softmax",
           scale: Optional[float] = None) -> "Problem":
        b, hq, nq, d = (_hint(x) for x in q.shape)
        hkv, nk, dv = _hint(k.shape[1]), _hint(k.shape[2]), _hint(v.shape[-1])
        kind, shape, mdt, rows_bcast, melem = "none", (), None, False, 0
        if mask is not None:
            shape = tuple(_hint(x) for x in ((1,) * (4 - mask.dim()) + tuple(mask.shape)))
            kind = "bool" if mask.dtype == torch.bool else "additive"
            mdt, melem = mask.dtype, mask.element_size()
            rows_bcast = shape[2] == 1
        facts = cost.Facts(b, hq, hkv, nq, nk, d, dv, cost.band_fraction(nq, nk, causal, window),
                           q.element_size(), q.dtype, melem, rows_bcast, bool(training))
        return Problem(str(torch.device(q.device).type), facts, causal, tuple(window), kind,
                       shape, mdt, float(mask_fill), bool(mask_grad), float(softcap),
                       float(dropout_p), source, _layout(q),
                       float(scale) if scale is not None else 1.0 / math.sqrt(max(d, 1)))

    def key(self) -> dict[str, Any]:
        """The cache key: everything but the exact lengths (power-of-two buckets)."""
        f = self.facts
        left, right = self.window
        return {"dtype": str(f.dtype), "d": f.d, "dv": f.dv, "gqa": f.hq // max(f.hkv, 1),
                "causal": self.causal, "window": [cache.bucket(left + 1) if left >= 0 else -1,
                                                  cache.bucket(right + 1) if right >= 0 else -1],
                "mask": self.mask_kind, "mask_rows": "bcast" if f.mask_rows_bcast else "dense",
                "mask_dtype": str(self.mask_dtype), "mask_grad": self.mask_grad,
                "fill": "-inf" if math.isinf(self.mask_fill) else "finite",
                "softcap": self.softcap > 0, "dropout": self.dropout_p > 0,
                "training": f.training, "source": "sdpa" if self.source == "sdpa" else "eager",
                "layout": self.layout, "nq": cache.bucket(max(f.nq, 1)),
                "nk": cache.bucket(max(f.nk, 1)), "bh": cache.bucket(max(f.b * f.hq, 1))}

    def describe(self) -> str:
        f = self.facts
        return f"{str(f.dtype).replace('torch.', '')} {f.b}x{f.hq}x{f.nq}x{f.nk}x{f.d}"


@dataclass(frozen=True)
class Gate:
    """What a non-exact (quantized) kernel must keep on the site's own activations.

    ``measure(kernel)`` runs ``kernel`` and the exact reference on the captured operands and
    returns :func:`accuracy`'s numbers; a kernel below ``min_cosine`` or above ``max_rel_l1``
    is rejected with them."""

    measure: Callable[[str], dict[str, float]]
    min_cosine: float = 0.999
    max_rel_l1: float = 0.03


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine similarity, relative L1 (Σ|o − r| / Σ|r|) and RMSE of ``out`` against ``ref``."""
    o, r = out.detach().double().flatten(), ref.detach().double().flatten()
    finite = torch.isfinite(r) & torch.isfinite(o)
    o, r = o[finite], r[finite]
    cos = float(torch.nn.functional.cosine_similarity(o, r, dim=0)) if o.numel() else 1.0
    rel = float((o - r).abs().sum() / r.abs().sum().clamp_min(1e-30))
    rmse = float(((o - r) ** 2).mean().sqrt()) if o.numel() else 0.0
    return {"cosine": cos, "rel_l1": rel, "rmse": rmse}


def _rejections(problem: Problem, name: str, q: Any, k: Any, v: Any, mask: Any) -> list[str]:
    from ..kernels import registry
    return registry.rejections(
        name, q, k, v, mask, problem.causal, window=problem.window, dropout_p=problem.dropout_p,
        softcap=problem.softcap, mask_fill=problem.mask_fill, mask_grad=problem.mask_grad,
        source=problem.source)


def _gate_verdicts(problem: Problem, policy: str, gate: Optional[Gate], q: Any = None,
                   k: Any = None, v: Any = None, mask: Any = None) -> dict[str, list]:
    """For each non-exact candidate: ``[reasons, accuracy]`` (no reasons = admitted). One that
    cannot run the site at all (head dim, dtype, ...) is not measured: its rejections say why."""
    from ..kernels import registry
    out: dict[str, list] = {}
    for name in registry.candidates(problem.device):
        if registry.get(name).exact:
            continue
        if policy != "fast":  # quantized kernels: policy="fast" only
            out[name] = [[f"not exact (policy={policy!r})"], {}]
        elif problem.facts.training:
            out[name] = [["inference only: the site needs gradients, an exact kernel runs it"], {}]
        elif gate is None:
            out[name] = [["no example activations to measure its accuracy on"], {}]
        elif q is not None and _rejections(problem, name, q, k, v, mask):
            out[name] = [[], {}]
        else:
            try:
                acc = gate.measure(name)
            except Exception as e:  # a kernel that cannot run the site is not admitted
                out[name] = [[f"could not be measured on the site's activations: {e!r}"], {}]
                continue
            bad = acc["cosine"] < gate.min_cosine or acc["rel_l1"] > gate.max_rel_l1
            why = (f"accuracy gate on this site's activations: cosine {acc['cosine']:.5f} "
                   f"(min {gate.min_cosine}), rel L1 {acc['rel_l1']:.4f} "
                   f"(max {gate.max_rel_l1})")
            out[name] = [[why + ": failed"] if bad else [], acc]
    return out


@dataclass
class Choice:
    """The selector's answer for one problem."""

    kernel: str
    reason: str
    candidates: list[Candidate] = field(default_factory=list)
    cache: str = ""
    config: dict = field(default_factory=dict)


def _environment_key(problem: Problem) -> dict[str, str]:
    from ..kernels import registry
    device = torch.device(problem.device)
    return {**cache.environment(device), "kernels": cache.source_hash(*registry.source_files())}


def _class_key(problem: Problem, kernel: str, env: dict[str, str]) -> dict[str, Any]:
    """The shape class a calibration factor holds for: kernel, dtype, head dim, mask, band,
    training, and the amount of work in factors of 8 (small calls are overhead-bound, large
    ones are not, so one factor cannot serve both)."""
    f = problem.facts
    work = max(f.b * f.hq * f.nq * f.nk * f.rho, 1.0)
    return {**env, "kernel": kernel, "dtype": str(f.dtype), "d": cache.bucket(max(f.d, 1)),
            "mask": problem.mask_kind, "banded": f.rho < 1.0, "training": f.training,
            "work": int(math.log2(work) // 3)}


def calibration(problem: Problem, kernel: str, env: dict[str, str]) -> float:
    """measured / predicted for this kernel on this class of shapes (geometric mean; 1 if none)."""
    entry = cache.store("calibration").get(_class_key(problem, kernel, env))
    if not entry or not entry.get("n"):
        return 1.0
    return math.exp(entry["log_sum"] / entry["n"])


def _learn(problem: Problem, kernel: str, env: dict[str, str], ratio: float) -> None:
    if not (ratio > 0 and math.isfinite(ratio)):
        return
    store, key = cache.store("calibration"), _class_key(problem, kernel, env)
    entry = store.get(key) or {"log_sum": 0.0, "n": 0}
    store.put(key, {"log_sum": entry["log_sum"] + math.log(ratio), "n": entry["n"] + 1})


def predict(problem: Problem, kernel: str, calibrate: bool = True,
            env: Optional[dict[str, str]] = None) -> float:
    """Predicted seconds of ``kernel`` on ``problem`` (raw roofline x calibration)."""
    from ..kernels import registry
    profile = registry.get(kernel).profile
    c = ceilings(torch.device(problem.device))
    dtype = torch.float32 if profile.compute_fp32 else problem.facts.dtype
    t = cost.predict(profile, problem.facts, c.matmul_rate(dtype), c.exp, c.bandwidth, c.launch,
                     c.l2_bandwidth)
    if calibrate:
        t *= calibration(problem, kernel, env if env is not None else _environment_key(problem))
    return t


# ----------------------------------------------------------------------------- timing

def _inputs(problem: Problem) -> tuple:
    """Random operands of the problem's shapes, dtype and layout on its device."""
    f, device = problem.facts, torch.device(problem.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    def make(h: int, n: int, d: int) -> torch.Tensor:
        if problem.layout == "bshd":
            return torch.randn(f.b, n, h, d, device=device, dtype=f.dtype).transpose(1, 2)
        return torch.randn(f.b, h, n, d, device=device, dtype=f.dtype)

    q, k, v = make(f.hq, f.nq, f.d), make(f.hkv, f.nk, f.d), make(f.hkv, f.nk, f.dv)
    mask = None
    if problem.mask_kind == "bool":
        mask = torch.ones(problem.mask_shape, device=device, dtype=torch.bool)
    elif problem.mask_kind == "additive":
        mask = torch.zeros(problem.mask_shape, device=device, dtype=problem.mask_dtype)
    if f.training:
        for t in (q, k, v):
            t.requires_grad_(True)
        if mask is not None and problem.mask_grad:
            mask.requires_grad_(True)
    return q, k, v, mask


def runner(problem: Problem, kernel: str) -> Callable[[], Any]:
    """A zero-argument function running ``kernel`` once on random inputs of ``problem``."""
    from .. import ops  # noqa: F401  (registers the op)
    from ..kernels import registry, sdpa
    q, k, v, mask = _inputs(problem)
    left, right = problem.window
    seed = None
    if problem.dropout_p > 0:
        seed = torch.zeros(1, dtype=torch.int64, device=q.device)

    if registry.get(kernel).runs == "sdpa":
        def forward() -> torch.Tensor:
            return sdpa.call(q, k, v, mask, problem.scale, problem.causal != "none", kernel)
    else:
        def forward() -> torch.Tensor:
            return torch.ops.attnfuse.attention(q, k, v, mask, problem.scale, problem.causal,
                                                problem.mask_fill, kernel, problem.softcap, left,
                                                right, problem.dropout_p, seed)[0]
    if not problem.facts.training:
        return forward
    grads = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]

    def train() -> Any:
        out = forward()
        return torch.autograd.grad(out, grads, torch.ones_like(out))
    return train


def _bench(fn: Callable[[], Any], device: torch.device, rep_ms: float = 40.0) -> float:
    """Seconds per call of ``fn``: on CUDA its GPU time, on CPU a perf_counter median.

    On CUDA the calls are captured back to back in a CUDA graph and the graph's replays are timed
    with CUDA events (the median of at least 5 samples of >= ``BATCH_MS``): the GPU time of the
    kernels alone, as a compiled model runs them, without the Python of the timing harness (the
    SDPA backend pinning, the op's dispatch), which at ViT-sized sites costs more than the kernels
    and made the order of cuDNN, flash and efficient depend on the host. (``do_bench`` also
    clears the L2 cache before each call, so a 30 µs kernel waits for its own issue.) What a call
    costs the host is the kernel profile's floor, applied by the caller. A function that cannot
    be captured is timed as plain back-to-back calls."""
    if device.type != "cuda":
        return _timer(device)(fn)
    events = lambda: (torch.cuda.Event(enable_timing=True),  # noqa: E731
                      torch.cuda.Event(enable_timing=True))

    def batch(calls: int) -> float:
        start, end = events()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls

    fn()
    torch.cuda.synchronize(device)
    per_call = max(batch(3), 1e-3)                       # ms, an upper bound of the GPU time
    calls = int(min(max(BATCH_MS / per_call, 1), 200))
    graph: Optional[torch.cuda.CUDAGraph] = None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()                                         # warm on the capture stream
        torch.cuda.current_stream(device).wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(calls):
                fn()
        graph = captured
    except Exception:  # noqa: BLE001  (not capturable: host syncs, CPU work between launches)
        torch.cuda.synchronize(device)

    def sample() -> float:
        if graph is None:
            return batch(calls)
        start, end = events()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    samples = [sample()]
    while len(samples) < 5 or (sum(samples) * calls < rep_ms and len(samples) < 100):
        samples.append(sample())
    samples.sort()
    return samples[len(samples) // 2] / 1e3


def host_floor_ms(problem: Problem, kernel: str) -> float:
    """What issuing one call costs the host at least (the kernel profile's figure): a call
    cannot run faster than that however short its kernels are."""
    from ..kernels import registry
    p = registry.get(kernel).profile
    return (p.host_fwd_us + (p.host_bwd_us if problem.facts.training else 0.0)) / 1e3


def _spin_up(fn: Callable[[], Any], device: torch.device, seconds: float = SPIN_UP_S) -> None:
    """Keep the GPU busy for ``seconds`` so its clocks leave the idle state before anything is
    timed: a GPU idle through a compile starts at a fraction of its clock, and whichever
    candidate is timed first would look slower than it is."""
    if device.type != "cuda":
        return
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            fn()
        torch.cuda.synchronize(device)


def should_tune(problem: Problem, tune: Optional[bool]) -> bool:
    if tune is not None:
        return tune
    if os.environ.get("ATTNFUSE_AUTOTUNE", "1") == "0":
        return False
    if problem.device != "cuda":
        return False
    return not torch.cuda.is_current_stream_capturing()


class _Progress:
    """A transient rich progress bar that appears only once tuning has taken over a second."""

    def __init__(self, total: int, title: str) -> None:
        self.total, self.title, self.t0, self.bar, self.task = total, title, time.monotonic(), None, None

    def step(self, label: str) -> None:
        if self.bar is None and time.monotonic() - self.t0 > 1.0 and sys.stderr.isatty():
            try:
                from rich.progress import Progress
            except ImportError:
                self.total = -1
                return
            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.title, total=self.total)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{self.title}: {label}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _time_candidates(problem: Problem, ranked: list[Candidate]) -> None:
    """Time the best few eligible candidates: fill ``measured_ms`` (and flash's tuned configs).

    After a first call of each (flash autotunes there) and a spin-up of the GPU's clocks, the
    candidates are timed in ``ROUNDS`` interleaved rounds and each keeps its fastest round's
    median, so a clock or thermal drift during tuning favours none of them."""
    device = torch.device(problem.device)
    best = ranked[0].predicted_ms
    chosen = [c for c in ranked if c.predicted_ms <= best * WITHIN][:TOP_K]
    progress = _Progress(len(chosen) * (ROUNDS + 1), f"attnfuse: tuning {problem.describe()}")
    flash = _flash_module()
    runners: dict[str, Callable[[], Any]] = {}

    def failed(c: Candidate, e: BaseException) -> None:
        runners.pop(c.kernel, None)
        if isinstance(e, torch.cuda.OutOfMemoryError):
            c.reasons.append("out of memory when timed on the site's shapes")
            return
        log.warning("attnfuse: timing %s on %s failed: %r", c.kernel, problem.describe(), e)
        c.reasons.append(f"failed when timed: {e!r}")

    try:
        for c in chosen:   # build and run each once: compiles, autotunes, and catches failures
            progress.step(c.kernel)
            try:
                fn = runner(problem, c.kernel)
                if c.kernel == "flash":
                    with flash.recording() as keys:
                        fn()
                    c.config = {"flash": flash.tuned_configs(keys)}
                else:
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                runners[c.kernel] = fn
            except Exception as e:  # a kernel that fails here must not be chosen
                failed(c, e)
        if runners:
            _spin_up(next(iter(runners.values())), device)
        for _ in range(ROUNDS):
            for c in chosen:
                fn = runners.get(c.kernel)
                if fn is None:
                    continue
                progress.step(c.kernel)
                try:
                    ms = max(_bench(fn, device, ROUND_MS) * 1e3,
                             host_floor_ms(problem, c.kernel))
                except Exception as e:  # noqa: BLE001
                    failed(c, e)
                    c.measured_ms = None
                    continue
                c.measured_ms = ms if c.measured_ms is None else min(c.measured_ms, ms)
    finally:
        runners.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress.close()


def _flash_module() -> Any:
    from ..kernels import flash
    return flash


# ----------------------------------------------------------------------------- the choice

def _candidates(problem: Problem, q: Any, k: Any, v: Any, mask: Any, policy: str,
                env: dict[str, str], verdicts: Optional[dict[str, list]] = None) -> list[Candidate]:
    from ..kernels import registry
    out = []
    verdicts = verdicts if verdicts is not None else {}
    for name in registry.candidates(problem.device):
        kernel = registry.get(name)
        reasons, acc = list(verdicts.get(name, [[], {}])[0]), verdicts.get(name, [[], {}])[1]
        reasons += _rejections(problem, name, q, k, v, mask)
        reasons += registry.accuracy_misses(name, q, problem.facts.training)
        if kernel.profile.materializes and problem.device == "cuda":
            need = problem.facts.b * problem.facts.hq * problem.facts.nq * problem.facts.nk * 4
            total = torch.cuda.get_device_properties(torch.device(problem.device)).total_memory
            if need > total // 4:
                reasons.append(f"would materialise {need / 2**30:.1f} GiB of scores")
        c = Candidate(name, reasons=reasons, accuracy=dict(acc))
        if not reasons:
            c.predicted_ms = predict(problem, name, env=env) * 1e3
        out.append(c)
    return out


def _summary(cands: list[Candidate]) -> str:
    parts = []
    for c in cands:
        if c.reasons:
            continue
        t = f"{c.measured_ms:.3g} ms" if c.measured_ms is not None else f"~{c.predicted_ms:.3g} ms"
        parts.append(f"{c.kernel} {t}")
    return ", ".join(parts)


def choose(problem: Problem, q: Any, k: Any, v: Any, mask: Any, *, policy: str = "exact",
           tune: Optional[bool] = None, gate: Optional[Gate] = None) -> Choice:
    """The kernel for ``problem`` (operands ``q, k, v, mask`` may be fake tensors). ``gate``
    measures non-exact kernels on the site's activations (``policy="fast"``); which of them it
    admitted is part of the cache key, since another site of the same shape may not pass."""
    env = _environment_key(problem)
    verdicts = _gate_verdicts(problem, policy, gate, q, k, v, mask)
    admitted = sorted(n for n, (reasons, _) in verdicts.items() if not reasons)
    key = {**env, "policy": policy, "admitted": admitted, **problem.key()}
    digest = repr(sorted(key.items()))
    with _MEMO_LOCK:
        memo = _MEMO.get(digest) if gate is None else None
    if memo is not None:
        return memo
    with cache.tuning_lock(digest):
        with _MEMO_LOCK:
            if gate is None and digest in _MEMO:
                return _MEMO[digest]
        choice = _decide(problem, q, k, v, mask, policy, tune, env, key, verdicts)
        if gate is None:  # measured verdicts belong to one site's data: not memoised
            with _MEMO_LOCK:
                _MEMO[digest] = choice
    log.info("attnfuse: %s -> %s (%s)", problem.describe(), choice.kernel, choice.reason)
    return choice


def _decide(problem: Problem, q: Any, k: Any, v: Any, mask: Any, policy: str,
            tune: Optional[bool], env: dict[str, str], key: dict[str, Any],
            verdicts: dict[str, list]) -> Choice:
    cands = _candidates(problem, q, k, v, mask, policy, env, verdicts)
    eligible = sorted((c for c in cands if not c.reasons), key=lambda c: c.predicted_ms)
    if not eligible:
        return Choice("", "no kernel can run this site: " + "; ".join(
            f"{c.kernel}: {', '.join(c.reasons)}" for c in cands), cands, "")
    names = {c.kernel for c in eligible}
    if cache.pinned():
        hit = cache.pinned_value("choices", key)
        if hit is not None and hit.get("kernel") in names:
            _preload(hit)
            return Choice(hit["kernel"], f"pinned ({_summary(cands)})", cands, "pinned",
                          hit.get("config", {}))
        return Choice(eligible[0].kernel, "pinned table has no entry for this shape: best "
                      f"prediction, untimed ({_summary(cands)})", cands, "pinned")
    stored = cache.store("choices").get(key)
    if stored is not None and stored.get("kernel") in names:
        _preload(stored)
        for c in cands:
            c.measured_ms = stored.get("measured_ms", {}).get(c.kernel, c.measured_ms)
        return Choice(stored["kernel"], f"cache hit: {stored.get('why', '')}", cands, "hit",
                      stored.get("config", {}))
    status = "disabled" if cache.disabled() else "miss"
    if not should_tune(problem, tune):
        why = f"cost model: best predicted time, untimed ({_summary(cands)})"
        return Choice(eligible[0].kernel, why, cands, status)
    _time_candidates(problem, eligible)
    timed = sorted((c for c in eligible if c.measured_ms is not None and not c.reasons),
                   key=lambda c: c.measured_ms)
    if not timed:
        return Choice(eligible[0].kernel, f"cost model (timing failed) ({_summary(cands)})",
                      cands, status)
    for c in timed:
        _learn(problem, c.kernel, env, (c.measured_ms / 1e3) / predict(problem, c.kernel, False, env))
    win, why = _winner(timed)
    why = f"{why} ({_summary(cands)})"
    config = win.config
    cache.store("choices").put(key, {
        "kernel": win.kernel, "why": why, "config": config,
        "measured_ms": {c.kernel: c.measured_ms for c in timed},
        "predicted_ms": {c.kernel: c.predicted_ms for c in eligible}})
    return Choice(win.kernel, why, cands, status, config)


def _winner(timed: list[Candidate]) -> tuple[Candidate, str]:
    """The fastest of ``timed`` (sorted by measured time), except that a PyTorch SDPA backend
    within ``TIE`` of it wins: a difference that small is inside the spread of repeated timings,
    and the backend costs less on the host (a C++ op, no Triton launcher), which a model whose
    GPU queue runs dry between kernels pays per call."""
    from ..kernels import registry
    best = timed[0]
    why = f"fastest of {len(timed)} timed on the site's shapes"
    if registry.is_sdpa(best.kernel):
        return best, why
    vendor = next((c for c in timed if registry.is_sdpa(c.kernel)), None)
    if vendor is None or vendor.measured_ms > best.measured_ms * (1 + TIE):
        return best, why
    return vendor, (f"{vendor.kernel} within {TIE:.0%} of the fastest ({best.kernel}): a tie goes "
                    f"to PyTorch's backend (less host time per call)")


def _preload(entry: dict) -> None:
    records = entry.get("config", {}).get("flash")
    if records:
        try:
            _flash_module().preload(records)
        except ImportError:
            pass


# Exact-shape memory for eager calls (attnfuse.attention), whose per-call cost must stay small:
# building a Problem and its key costs more than a small attention call. Bounded: a decode loop
# sees a new KV length every step.
_EAGER: dict[tuple, str] = {}
_EAGER_MAX = 4096


def choose_eager(fast_key: tuple, problem: Callable[[], Problem], q: Any, k: Any, v: Any,
                 mask: Any) -> str:
    """The kernel name for an eager call, remembered under ``fast_key`` (an exact description
    of the call); raises ValueError when no kernel can run it."""
    name = _EAGER.get(fast_key)
    if name is None:
        choice = choose(problem(), q, k, v, mask)
        if not choice.kernel:
            raise ValueError(choice.reason)
        if len(_EAGER) >= _EAGER_MAX:
            _EAGER.clear()
        name = _EAGER[fast_key] = choice.kernel
    return name


def forget() -> None:
    """Drop this process's memory of choices (the disk cache is ``attnfuse.cache.clear()``)."""
    with _MEMO_LOCK:
        _MEMO.clear()
        _EAGER.clear()
