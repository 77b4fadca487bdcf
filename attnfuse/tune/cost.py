"""Cost formulas for attention kernels (sympy) and the roofline that turns them into times.

Symbols (one attention call)::

    B, Hq, Hkv, Nq, Nk, D, Dv     shapes (G = Hq / Hkv query heads per key/value head)
    rho                            fraction of (query, key) pairs inside the causal band/window
    BM                             the kernel's query tile (K/V are re-read once per query tile)
    e, e_m                         bytes per element of q/k/v and of the mask (0 without a mask)
    r_m                            mask rows read per query tile: BM for a dense mask, 1 for a
                                   mask broadcast over query rows (key padding)
    R                              times the backward computes P = exp(S - lse) (1 in FA2's
                                   fused backward, 2 in attnfuse's deterministic two-kernel one)

Forward: pairs = B·Hq·Nq·Nk·rho; FLOPs = 2·pairs·(D + Dv) (Q·Kᵀ and P·V); exponentials = pairs;
bytes from the I/O-complexity bound of FlashAttention: Q, K, V read and O written once
(e·B·(Hq·Nq + Hkv·Nk)·(D+Dv)) plus the mask tiles (e_m·B·Hq·⌈Nq/BM⌉·Nk·rho·r_m) from HBM, and
K and V re-read once per query tile (e·B·Hq·⌈Nq/BM⌉·Nk·rho·(D+Dv)), which on a GPU the L2 cache
serves (measured on the H100: evaluating the re-reads at HBM bandwidth predicted 2x too slow). Backward: the five matmuls of FA2 (Q·Kᵀ, dO·Vᵀ, Pᵀ·dO, dS·K, dSᵀ·Q)
plus (R − 1) recomputations of Q·Kᵀ and dO·Vᵀ; Q, dO, dQ, O and K, V, dK, dV move once, K/V or
Q/dO tiles R times. A kernel that materialises the scores (the math backend, the reference)
computes every pair (rho = 1) and moves the Nq x Nk matrix ``passes`` times.

Time on a device: per pass, max(FLOPs / (matmul ceiling · eff), exps / (exp ceiling · eff),
bytes / (bandwidth · eff)) + launches · launch latency, but never less than the host time to
issue the call (Python and launch overhead bound small calls): a roofline with each kernel's efficiency
(its measured fraction of the ceiling) as the profile below states it. The autotuner's timings
refine the efficiencies per device and class of shapes (``select.calibration``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import sympy as sp
import torch

B, HQ, HKV, NQ, NK, D, DV, RHO, BM, E, EM, RM, R = sp.symbols(
    "B H_q H_kv N_q N_k D D_v rho BM e e_m r_m R", positive=True)

PAIRS = B * HQ * NQ * NK * RHO
FLOPS_FWD = 2 * PAIRS * (D + DV)
EXPS_FWD = PAIRS
_KV_TILES = B * HQ * sp.ceiling(NQ / BM) * NK * RHO   # key rows read, summed over query tiles
# Compulsory HBM traffic (each operand once; a dense mask once per pair it covers) and the K/V
# re-reads per query tile, which the L2 cache serves (one head's K/V is a few MB).
BYTES_FWD = E * (B * HQ * NQ * (D + DV) + B * HKV * NK * (D + DV)) + EM * _KV_TILES * RM
REREAD_FWD = E * _KV_TILES * (D + DV)
FLOPS_BWD = 2 * PAIRS * ((3 * D + 2 * DV) + (R - 1) * (D + DV))
EXPS_BWD = R * PAIRS
BYTES_BWD = (E * (2 * B * HQ * NQ * (D + DV) + 2 * B * HKV * NK * (D + DV))
             + R * EM * _KV_TILES * RM)
REREAD_BWD = R * E * _KV_TILES * (D + DV)
SCORES = B * HQ * NQ * NK          # entries of the materialised score matrix

_SYMBOLS = (B, HQ, HKV, NQ, NK, D, DV, RHO, BM, E, EM, RM, R)
_COMPILED: dict[str, Callable[..., float]] = {
    name: sp.lambdify(_SYMBOLS, expr, modules="math")
    for name, expr in {"flops_fwd": FLOPS_FWD, "exps_fwd": EXPS_FWD, "bytes_fwd": BYTES_FWD,
                       "reread_fwd": REREAD_FWD, "flops_bwd": FLOPS_BWD, "exps_bwd": EXPS_BWD,
                       "bytes_bwd": BYTES_BWD, "reread_bwd": REREAD_BWD,
                       "scores": SCORES}.items()}


@dataclass(frozen=True)
class Profile:
    """How one kernel spends the device: fractions of each ceiling it reaches, and its shape.

    Efficiencies are priors from measurements on an H100 (benchmarks/RESULTS.md);
    measurement on the user's device refines them per shape class."""

    matmul: float                 # fraction of the dense-matmul ceiling its dots reach (forward)
    exp: float                    # fraction of the exponential ceiling
    bwd_matmul: float             # the same for the backward's dots
    bandwidth: float = 0.8
    recompute: int = 1            # R: P computed this many times in the backward
    block_m: int = 128            # BM
    launches_fwd: int = 1
    launches_bwd: int = 3
    skips_band: bool = True       # visits only tiles inside a causal band or window
    materializes: bool = False    # writes the N_q x N_k scores to memory
    score_bytes: int = 4          # bytes per materialised score
    passes_fwd: int = 4           # score-matrix passes: write S, read S, write P, read P
    passes_bwd: int = 8
    row_broadcast_mask: bool = False  # reads a key-padding mask as one row per tile
    compute_fp32: bool = False    # upcasts to fp32: its dots run at the fp32 matmul rate
    host_fwd_us: float = 20.0     # CPU time to issue one forward call: a small call's floor
    host_bwd_us: float = 40.0     # the same for the backward


@dataclass(frozen=True)
class Facts:
    """The numbers a cost formula needs, taken from a site's (possibly fake) operands."""

    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    dv: int
    rho: float          # fraction of pairs inside the band (1 = all)
    elem: int           # bytes per q/k/v element
    dtype: torch.dtype
    mask_elem: int = 0  # bytes per mask element (0 = no mask)
    mask_rows_bcast: bool = False
    training: bool = False


def band_fraction(nq: int, nk: int, causal: str, window: tuple[int, int]) -> float:
    """Fraction of the Nq x Nk pairs with i + off − left <= j <= i + off + right (exact count)."""
    if nq <= 0 or nk <= 0:
        return 0.0
    left, right = window
    if causal == "none" and left < 0 and right < 0:
        return 1.0
    off = nk - nq if causal == "bottom_right" else 0
    if causal != "none":  # the causal bound j <= i + off is the tighter right side
        right = 0
    rows = torch.arange(nq, dtype=torch.int64) + off
    lo = torch.zeros_like(rows) if left < 0 else (rows - left).clamp(min=0)
    hi = torch.full_like(rows, nk - 1) if right < 0 else (rows + right).clamp(max=nk - 1)
    return float((hi - lo + 1).clamp(min=0).sum()) / (nq * nk)


def counts(p: Profile, f: Facts) -> dict[str, float]:
    """FLOPs, exponentials and bytes of the forward (and backward when training)."""
    rho = f.rho if p.skips_band else 1.0
    values = (f.b, f.hq, f.hkv, f.nq, f.nk, f.d, f.dv, rho, p.block_m, f.elem, f.mask_elem,
              1 if (f.mask_rows_bcast and p.row_broadcast_mask) else p.block_m, p.recompute)
    out = {name: float(fn(*values)) for name, fn in _COMPILED.items()}
    if p.materializes:
        out["bytes_fwd"] += out["scores"] * p.score_bytes * p.passes_fwd
        out["bytes_bwd"] += out["scores"] * p.score_bytes * p.passes_bwd
    return out


def predict(p: Profile, f: Facts, matmul_rate: float, exp_rate: float, bandwidth: float,
            launch: float, l2_bandwidth: float = 0.0) -> float:
    """Predicted seconds of one call (forward, plus backward when ``f.training``). Re-reads go
    at ``l2_bandwidth`` (HBM ``bandwidth`` when 0: the pure I/O bound)."""
    c = counts(p, f)
    l2 = l2_bandwidth or bandwidth

    def roof(flops: float, exps: float, nbytes: float, reread: float, mm_eff: float,
             launches: int) -> float:
        memory = nbytes / (bandwidth * p.bandwidth) + reread / (l2 * p.bandwidth)
        return max(flops / (matmul_rate * mm_eff), exps / (exp_rate * p.exp), memory) + (
            launches * launch)

    # A call is bound by the device or by the host issuing it, whichever is slower.
    t = max(roof(c["flops_fwd"], c["exps_fwd"], c["bytes_fwd"], c["reread_fwd"], p.matmul,
                 p.launches_fwd), p.host_fwd_us * 1e-6)
    if f.training:
        t += max(roof(c["flops_bwd"], c["exps_bwd"], c["bytes_bwd"], c["reread_bwd"],
                      p.bwd_matmul, p.launches_bwd), p.host_bwd_us * 1e-6)
    return t


def formulas() -> dict[str, sp.Expr]:
    """The symbolic formulas, for reading and for explain()."""
    return {"flops_fwd": FLOPS_FWD, "exps_fwd": EXPS_FWD, "bytes_fwd": BYTES_FWD,
            "reread_fwd": REREAD_FWD, "flops_bwd": FLOPS_BWD, "exps_bwd": EXPS_BWD,
            "bytes_bwd": BYTES_BWD, "reread_bwd": REREAD_BWD}


def tflops(f: Facts, seconds: float) -> float:
    """The benchmark convention: 4·B·Hq·Nq·Nk·D·rho forward FLOPs (x3.5 with the backward)."""
    work = 4 * f.b * f.hq * f.nq * f.nk * f.d * f.rho * (3.5 if f.training else 1.0)
    return work / seconds / 1e12 if seconds > 0 else math.inf
