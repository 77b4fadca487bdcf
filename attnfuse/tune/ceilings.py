"""The device's ceilings the cost model divides by, measured once per device and remembered.

* ``matmul``: dense matmul rate per dtype (FLOP/s), from a square matmul big enough to saturate;
* ``exp``: exponentials per second, from a Triton kernel that chains ``exp2`` in registers (on the
  GPU the exponential unit, not the tensor core, limits attention at head dims <= 128); on CPU
  from ``torch.exp`` on a cache-resident tensor;
* ``bandwidth``: bytes per second of a device copy (read + write);
* ``l2_bandwidth``: bytes per second read from a buffer resident in the L2 cache (where K/V
  re-reads land), from a Triton kernel that sweeps it block by block;
* ``launch``: seconds per kernel launch (an empty-ish op).

Measured on first use (a second or two on a GPU) and stored in the ``ceilings`` namespace of
attnfuse's cache under the device's identity, so later processes read them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import cache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ceilings:
    matmul: dict[str, float]   # dtype name -> FLOP/s
    exp: float                 # exponentials / s
    bandwidth: float           # bytes / s (read + write counted)
    launch: float              # s per launch
    l2_bandwidth: float = 0.0  # bytes / s for an L2-resident buffer (0: unknown, use bandwidth)

    def matmul_rate(self, dtype: torch.dtype) -> float:
        name = str(dtype).replace("torch.", "")
        return self.matmul.get(name, min(self.matmul.values()))


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median seconds of one call: CUDA events on a GPU, perf_counter on CPU."""
    def cuda(fn: Callable[[], object]) -> float:
        fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    def cpu(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return cuda if device.type == "cuda" else cpu


def _exp_rate_triton(device: torch.device, timer: Callable) -> float:
    import triton
    import triton.language as tl

    @triton.jit
    def chain(X, N_ITER: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs)
        for _ in range(N_ITER):  # each step one exp2: the loop is bound by the exp unit
            x = tl.math.exp2(x * -0.5)
        tl.store(X + offs, x)

    n, iters = 1 << 22, 256
    x = torch.zeros(n, device=device, dtype=torch.float32)
    seconds = timer(lambda: chain[(n // 1024,)](x, N_ITER=iters, BLOCK=1024))
    return n * iters / seconds


def _l2_rate_triton(device: torch.device, timer: Callable) -> float:
    import triton
    import triton.language as tl

    @triton.jit
    def sweep(X, Out, N_BLOCKS, N_ITER: tl.constexpr, BLOCK: tl.constexpr):
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(N_ITER):  # a different block each step: the L2, not the L1, serves it
            blk = (pid + i * nprog) % N_BLOCKS
            acc += tl.load(X + blk * BLOCK + tl.arange(0, BLOCK))
        tl.store(Out + pid * BLOCK + tl.arange(0, BLOCK), acc)

    block, iters = 2048, 256
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    n_blocks = max(l2 // 4 // (block * 4), 1)   # a quarter of the L2
    x = torch.ones(n_blocks * block, device=device, dtype=torch.float32)
    programs = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    out = torch.empty(programs * block, device=device, dtype=torch.float32)
    seconds = timer(lambda: sweep[(programs,)](x, out, n_blocks, N_ITER=iters, BLOCK=block))
    return programs * iters * block * 4 / seconds


def measure(device: torch.device) -> Ceilings:
    """Time the four ceilings on ``device`` (about a second on a GPU, less on CPU)."""
    timer = _timer(device)
    gpu = device.type == "cuda"
    n = 4096 if gpu else 256
    rates = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a = torch.randn(n, n, device=device, dtype=dtype)
        rates[str(dtype).replace("torch.", "")] = 2 * n ** 3 / timer(lambda: a @ a)
    if gpu:
        try:
            exp = _exp_rate_triton(device, timer)
        except Exception as e:  # no triton or no compiler: the elementwise rate is a floor
            log.info("exp ceiling via torch (triton unusable: %r)", e)
            x = torch.randn(1 << 24, device=device)
            exp = x.numel() / timer(lambda: torch.exp2(x))
    else:
        x = torch.randn(1 << 16)
        exp = x.numel() / timer(lambda: torch.exp(x))
    big = torch.empty((1 << 27) if gpu else (1 << 23), device=device, dtype=torch.float32)
    bandwidth = 2 * big.numel() * 4 / timer(lambda: big.clone())
    l2_bandwidth = 0.0
    if gpu:
        try:
            l2_bandwidth = _l2_rate_triton(device, timer)
        except Exception as e:  # no triton: re-reads are then costed at HBM bandwidth
            log.info("no L2 ceiling (triton unusable: %r)", e)
    tiny = torch.zeros(1, device=device)
    launch = timer(lambda: [tiny.add_(1) for _ in range(100)]) / 100
    return Ceilings(rates, exp, bandwidth, launch, l2_bandwidth)


_MEMO: dict[str, Ceilings] = {}


def ceilings(device: torch.device) -> Ceilings:
    """The device's ceilings: from memory, else from the cache, else measured (and stored)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = str(device)
    if name in _MEMO:
        return _MEMO[name]
    key = {"kind": "ceilings", "format": 3, **cache.environment(device)}
    stored = cache.store("ceilings").get(key)
    if stored is not None:
        found = Ceilings(**stored)
    else:
        found = measure(device)
        log.info("attnfuse: measured %s ceilings: %s", name, found)
        cache.store("ceilings").put(key, asdict(found))
    _MEMO[name] = found
    return found
