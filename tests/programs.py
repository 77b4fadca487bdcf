"""Random attention programs, and non-attention decoys, for the property tests.

A program is one :class:`Prog` (one choice per spelling axis, plus shapes, dtype and a seed). It
becomes an ``nn.Module`` through :class:`Program`, parametrized by the dtype it computes in, so the
same program can be evaluated in fp64 as the accuracy oracle (FlashAttention's rule). Every
spelling axis is written out literally in :meth:`Program.forward`: Dynamo traces exactly the code a
model author would write.

Axes (see ``AXES``): layout/heads, Q·Kᵀ product and K's transpose, scale (where, how spelled),
mask (additive / boolean / causal constant / padding), softmax (which function, upcast), GQA
repetition, eval-mode dropout, P·V product. ``defect`` turns a program into a decoy: one change
that makes it *not* attention (or not fusable), placed right next to the softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
L_MAX = 64                                  # causal buffers are L_MAX x L_MAX, sliced per call

LAYOUTS = ("bhnd", "proj_view_transpose", "proj_reshape_permute", "proj_unflatten",
           "proj_einops", "flat3d")
PRODUCTS_4D = ("matmul", "at", "method", "einsum", "einsum_bqhd")
PRODUCTS_3D = ("matmul", "at", "bmm", "baddbmm", "einsum")
KTRANS = ("transpose", "transpose_pos", "mT", "permute")
PV_4D = ("matmul", "at", "einsum")
PV_3D = ("matmul", "at", "bmm", "einsum")
GQA = ("none", "repeat_kv", "repeat_interleave", "mqa_expand")
SCALE_SITES = ("none", "scores", "q", "k", "split")          # + "alpha" for baddbmm
SCALE_FORMS = ("float", "math_sqrt", "tensor_rsqrt", "tensor_const", "torch_rsqrt", "buffer")
MASKS = ("none", "add_NN", "add_B11N", "add_B1NN", "add_BHNN", "add_expand", "add_hf_padding",
         "masked_fill", "where_keep", "where_drop", "causal_tril_buffer", "causal_bool_buffer",
         "causal_triu_ones", "causal_arange")
FILLS = ("-inf", "finfo_min", "-1e4", "-1e9")
KEEP_SHAPES = ("NN", "B11N", "B1NN", "BHNN")
SOFTMAXES = ("torch", "F", "method", "module")
UPCASTS = ("none", "dtype_arg", "float", "to")
BACKS = ("to", "type_as")
DROPOUTS = ("none", "F_eval", "F_self_training", "module")
BADD_INPUTS = ("zeros1", "zeros0", "empty0", "mask")

DEFECTS = ("softmax_dim", "log_softmax", "tanh", "scores_reused", "probs_returned",
           "probs_reused", "elementwise_pv", "dropout_train")
GATES = ("gate_2d_weight", "gate_bmm_weight", "gate_linear", "gate_per_token", "gate_einsum")

# What a rejected decoy's Site.reason must name (any of, case-insensitive): the blocking piece.
DEFECT_WORDS = {
    "softmax_dim": ("dim",),
    "log_softmax": ("log_softmax",),
    "tanh": ("tanh",),
    "tanh/squared": ("pow", "tanh"),
    "tanh/plus_scores": ("users", "tanh", "depends on the scores"),
    "tanh/tensor_cap": ("tanh", "constant", "users"),
    "scores_reused": ("users",),
    "probs_returned": ("users",),
    "probs_reused": ("users",),
    "elementwise_pv": ("mul",),
    "dropout_train": ("dropout",),
    # Gates: the keys are a weight (the matcher's reason), or the structure that blocks it.
    "gate_2d_weight": ("weight", "parameter", "gate", "rank"),
    "gate_bmm_weight": ("weight", "parameter", "gate"),
    "gate_linear": ("weight", "parameter", "gate", "linear"),
    "gate_per_token": ("weight", "parameter", "gate", "unsqueeze"),
    "gate_einsum": ("weight", "parameter", "gate", "einsum"),
}


def blocking_words(decoy: Any) -> tuple[str, ...]:
    """Words of which a rejected decoy's reason must contain one (by defect and variant)."""
    variant = getattr(decoy, "variant", "")
    return DEFECT_WORDS.get(f"{decoy.defect}/{variant}", DEFECT_WORDS[decoy.defect])


@dataclass(frozen=True)
class Prog:
    """One random program: a spelling per axis, shapes, dtype, data seed (and an optional defect)."""

    dtype: str = "float32"
    B: int = 1
    H: int = 1
    Hkv: int = 1
    Nq: int = 1
    Nk: int = 1
    D: int = 8
    layout: str = "bhnd"
    product: str = "matmul"
    ktrans: str = "transpose"
    pv: str = "matmul"
    gqa: str = "none"
    scale_site: str = "none"
    scale_form: str = "float"
    scale_op: str = "mul"
    scale_after_mask: bool = False
    mask: str = "none"
    fill: str = "-inf"
    keep_shape: str = "NN"
    causal: str = "top_left"
    full_row: bool = False
    badd_input: str = "zeros1"
    softmax: str = "torch"
    upcast: str = "none"
    back: str = "to"
    dropout: str = "none"
    defect: str = "none"
    variant: str = ""
    seed: int = 0

    def __repr__(self) -> str:
        # Non-default fields only, shapes first: hypothesis prints this for falsifying examples.
        head = (f"{self.dtype} B={self.B} H={self.H} Hkv={self.Hkv} Nq={self.Nq} Nk={self.Nk} "
                f"D={self.D}")
        skip = {"dtype", "B", "H", "Hkv", "Nq", "Nk", "D", "seed"}
        rest = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                if f.name not in skip and getattr(self, f.name) != f.default]
        return f"Prog({head}; {', '.join(rest)}; seed={self.seed})"

    @property
    def three_d(self) -> bool:
        return self.layout == "flat3d"

    @property
    def additive(self) -> bool:
        return self.mask.startswith("add_")

    @property
    def bool_input(self) -> bool:
        return self.mask in ("masked_fill", "where_keep", "where_drop")

    @property
    def finite_fill(self) -> bool:
        return self.fill != "-inf"


# -- the module ------------------------------------------------------------------------------------

class Program(nn.Module):
    """``Prog`` as a module computing in ``dtype`` (fp64 for the oracle copy)."""

    def __init__(self, p: Prog, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.p = p
        self.dtype = dtype or DTYPES[p.dtype]
        self.acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        if p.softmax == "module":
            self.sm = nn.Softmax(dim=-2 if p.defect == "softmax_dim" else -1)
        if p.dropout == "module" or (p.defect == "dropout_train" and p.variant == "module"):
            self.drop = nn.Dropout(0.1)
        if p.mask == "causal_tril_buffer":
            self.register_buffer("bias", torch.ones(L_MAX, L_MAX, dtype=self.dtype).tril()
                                 .view(1, 1, L_MAX, L_MAX), persistent=False)
        if p.mask == "causal_bool_buffer":
            self.register_buffer("causal_keep", torch.ones(L_MAX, L_MAX, dtype=torch.bool).tril(),
                                 persistent=False)
        if p.scale_form == "buffer" and p.scale_site not in ("none", "alpha"):
            e = 0.25 if p.scale_site == "split" else 0.5
            value = p.D ** (-e if p.scale_op == "mul" else e)
            self.register_buffer("scale_t", torch.tensor(value, dtype=torch.float32),
                                 persistent=False)
        self.train(p.defect == "dropout_train")

    # heads ---------------------------------------------------------------------------------------

    def _heads(self, x: torch.Tensor, h: int, bnhd: bool) -> torch.Tensor:
        """[B, h, N, D] (or [B, N, h, D] when ``bnhd``) from the layout's input."""
        p = self.p
        if p.layout in ("bhnd", "flat3d"):
            return x
        b, n = x.shape[0], x.shape[1]
        if p.layout == "proj_view_transpose":
            x = x.view(b, n, h, p.D)
            return x if bnhd else x.transpose(1, 2)
        if p.layout == "proj_reshape_permute":
            x = x.reshape(b, n, h, p.D)
            return x if bnhd else x.permute(0, 2, 1, 3)
        if p.layout == "proj_unflatten":
            x = x.unflatten(-1, (h, p.D))
            return x if bnhd else x.transpose(1, 2)
        if p.layout == "proj_einops":
            if bnhd:
                return einops.rearrange(x, "b n (h d) -> b n h d", h=h)
            return einops.rearrange(x, "b n (h d) -> b h n d", h=h)
        raise AssertionError(p.layout)

    def _repeat(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """GQA/MQA: repeat KV heads (on ``dim``: 1 for [B,H,N,D], 2 for [B,N,H,D])."""
        p = self.p
        g = p.H // p.Hkv
        if p.gqa == "none":
            return x
        if p.gqa == "repeat_interleave":
            return x.repeat_interleave(g, dim=dim)
        if p.gqa == "repeat_kv":
            b, s1, s2, d = x.shape
            if dim == 1:
                return x[:, :, None, :, :].expand(b, s1, g, s2, d).reshape(b, s1 * g, s2, d)
            return x[:, :, :, None, :].expand(b, s1, s2, g, d).reshape(b, s1, s2 * g, d)
        if p.gqa == "mqa_expand":
            b, s1, s2, d = x.shape
            return x.expand(b, p.H, s2, d) if dim == 1 else x.expand(b, s1, p.H, d)
        raise AssertionError(p.gqa)

    # scale ---------------------------------------------------------------------------------------

    def _factor(self, e: float) -> Any:
        """D**-e (for ``scale_op == "mul"``) or D**e (for "div"), spelled as ``scale_form``."""
        p, d = self.p, self.p.D
        mul = p.scale_op == "mul"
        f = p.scale_form
        if f == "float":
            return d ** (-e if mul else e)
        if f == "math_sqrt":
            r = math.sqrt(d) if e == 0.5 else math.sqrt(math.sqrt(d))
            return 1 / r if mul else r
        if f == "tensor_rsqrt":
            t = torch.tensor(d)
            r = t.rsqrt() if mul else t.sqrt()
            return r.sqrt() if e == 0.25 else r
        if f == "tensor_const":
            return torch.tensor(d ** (-e if mul else e))
        if f == "torch_rsqrt":
            t = torch.tensor(float(d) if e == 0.5 else math.sqrt(d))
            return torch.rsqrt(t) if mul else torch.sqrt(t)
        if f == "buffer":
            return self.scale_t
        raise AssertionError(f)

    def _scaled(self, x: torch.Tensor, e: float) -> torch.Tensor:
        f = self._factor(e)
        return x * f if self.p.scale_op == "mul" else x / f

    # masks ---------------------------------------------------------------------------------------

    def _fill(self, s: torch.Tensor) -> float:
        return {"-inf": float("-inf"), "finfo_min": torch.finfo(s.dtype).min,
                "-1e4": -1e4, "-1e9": -1e9}[self.p.fill]

    def _to3d(self, m: torch.Tensor) -> torch.Tensor:
        """A 4-D mask [B|1, H|1, Nq|1, Nk] as the 3-D layout's [B·H, Nq|1, Nk]."""
        p = self.p
        if not p.three_d or m.dim() != 4:
            return m
        return m.expand(p.B, p.H, m.shape[-2], m.shape[-1]).reshape(p.B * p.H, m.shape[-2], m.shape[-1])

    def _mask(self, s: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
        p = self.p
        nq, nk = p.Nq, p.Nk
        off = nk - nq if p.causal == "bottom_right" else 0
        if p.mask == "none" or (p.product == "baddbmm" and p.badd_input == "mask"):
            return s
        if p.mask == "add_expand":
            if p.three_d:
                return s + m.expand(p.B * p.H, nq, nk)
            return s + m.expand(p.B, p.H, nq, nk)
        if p.mask == "add_hf_padding":
            ext = (1.0 - m[:, None, None, :].to(s.dtype)) * torch.finfo(s.dtype).min
            return s + self._to3d(ext)
        if p.additive:
            return s + self._to3d(m)
        if p.mask == "masked_fill":
            return s.masked_fill(~self._to3d(m), self._fill(s))
        if p.mask == "where_keep":
            return torch.where(self._to3d(m), s, self._fill(s))
        if p.mask == "where_drop":
            return torch.where(self._to3d(m), self._fill(s), s)
        if p.mask == "causal_tril_buffer":
            if p.three_d:
                return s.masked_fill(self.bias[0, 0, off:off + nq, :nk] == 0, self._fill(s))
            return s.masked_fill(self.bias[:, :, off:off + nq, :nk] == 0, self._fill(s))
        if p.mask == "causal_bool_buffer":
            return torch.where(self.causal_keep[off:off + nq, :nk], s, self._fill(s))
        if p.mask == "causal_triu_ones":
            drop = torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu(1 + off)
            return s.masked_fill(drop, self._fill(s))
        if p.mask == "causal_arange":
            i = torch.arange(nq, device=s.device)[:, None]
            j = torch.arange(nk, device=s.device)[None, :]
            return torch.where(i + off >= j, s, self._fill(s))
        raise AssertionError(p.mask)

    # the program ---------------------------------------------------------------------------------

    def _kt(self, k: torch.Tensor) -> torch.Tensor:
        t = self.p.ktrans
        if t == "transpose":
            return k.transpose(-2, -1)
        if t == "transpose_pos":
            return k.transpose(1, 2) if k.dim() == 3 else k.transpose(2, 3)
        if t == "mT":
            return k.mT
        if t == "permute":
            return k.permute(0, 2, 1) if k.dim() == 3 else k.permute(0, 1, 3, 2)
        raise AssertionError(t)

    def _product(self, q: torch.Tensor, k: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
        p = self.p
        if p.product == "einsum":
            return torch.einsum("bqd,bkd->bqk" if p.three_d else "bhqd,bhkd->bhqk", q, k)
        if p.product == "einsum_bqhd":
            return torch.einsum("bqhd,bkhd->bhqk", q, k)
        kt = self._kt(k)
        if p.product == "matmul":
            return torch.matmul(q, kt)
        if p.product == "at":
            return q @ kt
        if p.product == "method":
            return q.matmul(kt)
        if p.product == "bmm":
            return torch.bmm(q, kt)
        if p.product == "baddbmm":
            alpha = 1.0
            if p.scale_site == "alpha":
                alpha = p.D ** -0.5 if p.scale_form == "float" else 1 / math.sqrt(p.D)
            shape = (q.shape[0], q.shape[1], kt.shape[2])
            if p.badd_input == "mask":
                return torch.baddbmm(self._to3d(m), q, kt, alpha=alpha)
            if p.badd_input == "empty0":
                return torch.baddbmm(torch.empty(shape, dtype=q.dtype, device=q.device), q, kt,
                                     beta=0.0, alpha=alpha)
            zeros = torch.zeros(shape, dtype=q.dtype, device=q.device)
            return torch.baddbmm(zeros, q, kt, beta=0.0 if p.badd_input == "zeros0" else 1.0,
                                 alpha=alpha)
        raise AssertionError(p.product)

    def _tanh(self, s: torch.Tensor) -> torch.Tensor:
        """tanh on the scores that no soft-cap ``c·tanh(x/c)`` (any c > 0, any scale) expresses.

        (``tanh(s)``, ``tanh(s/c)`` and ``c·tanh(s)`` all *are* soft-caps, with cap 1 or c and a
        scale: see ``test_plain_tanh_is_not_rewritten``.)
        """
        p = self.p
        if p.variant == "plain":                    # = soft-cap 1: not generated as a decoy
            return torch.tanh(s)
        if p.variant == "plain_div":                # = scale 1/30, soft-cap 1: not generated
            return torch.tanh(s / 30.0)
        if p.variant == "squared":
            return torch.tanh(s) ** 2
        if p.variant == "double":
            return torch.tanh(torch.tanh(s / 30.0)) * 30.0
        if p.variant == "of_masked":                # the mask inside the cap: -inf becomes -1
            keep = torch.arange(s.shape[-1], device=s.device) <= 0
            return torch.tanh(s.masked_fill(~keep, float("-inf")))
        if p.variant == "tensor_cap":               # a cap that is an activation, not a constant
            cap = s.detach().abs().amax() + 1.0
            return torch.tanh(s / cap) * cap
        if p.variant == "plus_scores":
            return s + torch.tanh(s)
        raise AssertionError(p.variant)

    def _softmax(self, s: torch.Tensor) -> torch.Tensor:
        p = self.p
        dim = -2 if p.defect == "softmax_dim" and p.variant == "-2" else (
            1 if p.defect == "softmax_dim" else -1)
        if p.defect == "log_softmax":
            if p.softmax == "F":
                return F.log_softmax(s, dim=-1)
            if p.softmax == "method":
                return s.log_softmax(-1)
            return torch.log_softmax(s, -1)
        if p.softmax == "module":
            return self.sm(s)
        dt = self.acc if p.upcast == "dtype_arg" else None
        if p.softmax == "torch":
            return torch.softmax(s, dim) if dt is None else torch.softmax(s, dim, dtype=dt)
        if p.softmax == "F":
            return F.softmax(s, dim=dim) if dt is None else F.softmax(s, dim=dim, dtype=dt)
        if p.softmax == "method":
            return s.softmax(dim) if dt is None else s.softmax(dim, dtype=dt)
        raise AssertionError(p.softmax)

    def _pv(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.p
        if p.pv == "matmul":
            return torch.matmul(a, v)
        if p.pv == "at":
            return a @ v
        if p.pv == "bmm":
            return torch.bmm(a, v)
        if p.pv == "einsum":
            return torch.einsum("bqk,bkd->bqd" if p.three_d else "bhqk,bhkd->bhqd", a, v)
        raise AssertionError(p.pv)

    def forward(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, *extra: torch.Tensor):
        p = self.p
        m = extra[0] if extra else None
        bnhd = p.product == "einsum_bqhd"
        q = self._heads(xq, p.H, bnhd)
        k = self._repeat(self._heads(xk, p.Hkv, bnhd), 2 if bnhd else 1)
        v = self._repeat(self._heads(xv, p.Hkv, False), 1)
        if p.three_d:
            q, k, v = (t.reshape(p.B * p.H, t.shape[2], p.D) for t in (q, k, v))

        if p.scale_site == "q":
            q = self._scaled(q, 0.5)
        elif p.scale_site == "k":
            k = self._scaled(k, 0.5)
        elif p.scale_site == "split":
            q, k = self._scaled(q, 0.25), self._scaled(k, 0.25)

        s = self._product(q, k, m)
        raw = s
        if p.scale_site == "scores" and not p.scale_after_mask:
            s = self._scaled(s, 0.5)
        s = self._mask(s, m)
        if p.scale_site == "scores" and p.scale_after_mask:
            s = self._scaled(s, 0.5)

        if p.upcast == "float":
            s = s.float() if self.acc == torch.float32 else s.double()
        elif p.upcast == "to":
            s = s.to(self.acc)
        if p.defect == "tanh":
            s = self._tanh(s)
        a = self._softmax(s)
        if p.upcast != "none":
            a = a.to(q.dtype) if p.back == "to" else a.type_as(q)

        if p.defect == "dropout_train":
            a = self.drop(a) if p.variant == "module" else F.dropout(a, 0.1, training=True)
        elif p.dropout == "F_eval":
            a = F.dropout(a, 0.1, training=False)
        elif p.dropout == "F_self_training":
            a = F.dropout(a, p=0.1, training=self.training)
        elif p.dropout == "module":
            a = self.drop(a)

        if p.defect == "elementwise_pv":
            return (a * v[..., 0].unsqueeze(-2)).sum(-1)
        o = self._pv(a, v)
        if p.defect == "scores_reused":
            o = o + (raw if p.variant == "raw" else s).amax(-1, keepdim=True).to(o.dtype)
        if p.defect == "probs_reused":
            o = o + a.amax(-1, keepdim=True)

        if p.three_d:
            o = o.view(p.B, p.H, p.Nq, p.D)
        elif p.layout != "bhnd":
            o = o.transpose(1, 2).reshape(p.B, p.Nq, p.H * p.D)
        if p.defect == "probs_returned":
            return o, a
        return o


# -- inputs ----------------------------------------------------------------------------------------

def _keep(shape: tuple[int, ...], p: Prog, g: torch.Generator) -> torch.Tensor:
    """Random bool keep-mask: every row keeps a key, unless ``full_row`` empties the first one."""
    keep = torch.rand(shape, generator=g) > 0.4
    nk = shape[-1]
    col = torch.randint(0, nk, shape[:-1] + (1,), generator=g)
    keep.scatter_(-1, col, True)
    if p.full_row and p.finite_fill:
        keep[(0,) * (len(shape) - 1)] = False       # one row (or one batch's keys) fully masked
    return keep


def make_inputs(p: Prog, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, ...]:
    """The program's inputs, in ``dtype``; values are drawn in fp64 then rounded to the program's dtype,
    so an fp64 copy (``.double()`` of these) sees the very same numbers."""
    dtype = dtype or DTYPES[p.dtype]
    g = torch.Generator().manual_seed(p.seed)
    base = DTYPES[p.dtype]
    bnhd = p.product == "einsum_bqhd"

    # fp64 programs get fp32-representable values: their "torch's own math" baseline is an fp32
    # evaluation of the same program (see test_properties), which must see the same numbers.
    grid = torch.float32 if base == torch.float64 else base

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(grid).to(dtype)

    if p.layout in ("bhnd", "flat3d"):
        if bnhd:
            q, k = rnd(p.B, p.Nq, p.H, p.D), rnd(p.B, p.Nk, p.Hkv, p.D)
        else:
            q, k = rnd(p.B, p.H, p.Nq, p.D), rnd(p.B, p.Hkv, p.Nk, p.D)
        v = rnd(p.B, p.Hkv, p.Nk, p.D)
    else:
        q, k, v = rnd(p.B, p.Nq, p.H * p.D), rnd(p.B, p.Nk, p.Hkv * p.D), rnd(p.B, p.Nk, p.Hkv * p.D)
    xs: tuple[torch.Tensor, ...] = (q, k, v)
    B, H, nq, nk = p.B, p.H, p.Nq, p.Nk
    if p.mask == "add_expand":
        xs += (rnd(1, 1, nk) if p.three_d else rnd(1, 1, 1, nk),)
    elif p.mask == "add_hf_padding":
        am = _keep((B, nk), p, g).to(torch.int64)
        xs += (am,)
    elif p.additive:
        shape = {"add_NN": (nq, nk), "add_B11N": (B, 1, 1, nk), "add_B1NN": (B, 1, nq, nk),
                 "add_BHNN": (B, H, nq, nk)}[p.mask]
        xs += (rnd(*shape),)
    elif p.bool_input:
        shape = {"NN": (nq, nk), "B11N": (B, 1, 1, nk), "B1NN": (B, 1, nq, nk),
                 "BHNN": (B, H, nq, nk)}[p.keep_shape]
        keep = _keep(shape, p, g)
        xs += (~keep if p.mask == "where_drop" else keep,)
    return xs


def cast_inputs(xs: tuple[torch.Tensor, ...], dtype: torch.dtype,
                grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Float inputs as fresh ``dtype`` leaves (requiring grad if ``grad``); bool/int ones as they are."""
    return tuple(x.detach().to(dtype).requires_grad_(grad) if x.is_floating_point() else x
                 for x in xs)


def to_reference(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return cast_inputs(xs, torch.float64)


# -- strategies ------------------------------------------------------------------------------------

SIZES = (1, 2, 7, 17, 33)


@st.composite
def programs(draw: Any, dtypes: tuple[str, ...] = ("float32", "float64", "bfloat16"),
             defect: str = "none") -> Prog:
    """A random attention program (every axis independent where the spellings allow it)."""
    dtype = draw(st.sampled_from(dtypes))
    B = draw(st.sampled_from((1, 2)))
    H = draw(st.sampled_from((1, 2, 4)))
    nq, nk = draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))
    D = draw(st.sampled_from((8, 16, 40)))
    layout = draw(st.sampled_from(LAYOUTS))
    three_d = layout == "flat3d"
    product = draw(st.sampled_from(PRODUCTS_3D if three_d else PRODUCTS_4D))
    ktrans = "transpose" if product.startswith("einsum") else draw(st.sampled_from(KTRANS))
    pv = draw(st.sampled_from(PV_3D if three_d else PV_4D))
    gqa = draw(st.sampled_from(GQA)) if H > 1 else "none"
    hkv = H
    if gqa in ("repeat_kv", "repeat_interleave"):
        hkv = draw(st.sampled_from([h for h in (1, 2) if H % h == 0 and h < H]))
    elif gqa == "mqa_expand":
        hkv = 1

    mask = draw(st.sampled_from(MASKS))
    causal = "top_left"
    if mask.startswith("causal_") and nq <= nk:
        causal = draw(st.sampled_from(("top_left", "bottom_right")))
    fill = draw(st.sampled_from(FILLS)) if (
        mask.startswith("causal_") or mask in ("masked_fill", "where_keep", "where_drop")) else "-inf"
    keep_shape = draw(st.sampled_from(KEEP_SHAPES)) if mask in (
        "masked_fill", "where_keep", "where_drop") else "NN"
    # Fully masked rows: only with finite fills (eager's answer is then a uniform row, which the
    # fused op must reproduce); an -inf row is NaN in eager and is outside the contract.
    full_row = False
    if (mask in ("masked_fill", "where_keep", "where_drop") and fill != "-inf") or mask == "add_hf_padding":
        full_row = draw(st.booleans())

    badd_input = "zeros1"
    if product == "baddbmm":
        dense = mask in ("add_NN", "add_B11N", "add_B1NN", "add_BHNN")
        badd_input = draw(st.sampled_from(BADD_INPUTS if dense else BADD_INPUTS[:3]))
    sites = SCALE_SITES + (("alpha",) if product == "baddbmm" else ())
    if badd_input == "mask":
        sites = tuple(s for s in sites if s != "scores")
    scale_site = draw(st.sampled_from(sites))
    scale_form, scale_op, after = "float", "mul", False
    if scale_site == "alpha":
        scale_form = draw(st.sampled_from(("float", "math_sqrt")))
    elif scale_site != "none":
        scale_form = draw(st.sampled_from(SCALE_FORMS))
        scale_op = draw(st.sampled_from(("mul", "div")))
        after = scale_site == "scores" and mask != "none" and draw(st.booleans())

    softmax = draw(st.sampled_from(SOFTMAXES))
    upcast = draw(st.sampled_from(UPCASTS if softmax != "module" else ("none", "float", "to")))
    back = draw(st.sampled_from(BACKS)) if upcast != "none" else "to"
    dropout = "none" if defect == "dropout_train" else draw(st.sampled_from(DROPOUTS))
    seed = draw(st.integers(0, 2 ** 16))
    return Prog(dtype, B, H, hkv, nq, nk, D, layout, product, ktrans, pv, gqa, scale_site,
                scale_form, scale_op, after, mask, fill, keep_shape, causal, full_row, badd_input,
                softmax, upcast, back, dropout, defect, "", seed)


VARIANTS = {
    "softmax_dim": ("-2", "1"),
    "tanh": ("squared", "double", "of_masked", "tensor_cap", "plus_scores"),
    "scores_reused": ("final", "raw"),
    "dropout_train": ("F", "module"),
}


@st.composite
def decoys(draw: Any) -> Any:
    """A decoy: an attention program with one defect next to its softmax, or a gating program."""
    kind = draw(st.sampled_from(DEFECTS + GATES))
    if kind in GATES:
        return Gate(kind, draw(st.sampled_from(("float32", "float64", "bfloat16"))),
                    draw(st.sampled_from((1, 2))), draw(st.sampled_from(SIZES)),
                    draw(st.sampled_from((8, 16))), draw(st.sampled_from((2, 4, 8))),
                    draw(st.sampled_from((4, 8))), draw(st.integers(0, 2 ** 16)))
    p = draw(programs(defect=kind))
    variant = draw(st.sampled_from(VARIANTS.get(kind, ("",))))
    if kind == "softmax_dim" and p.softmax == "module":
        variant = "-2"
    return replace(p, defect=kind, variant=variant)


# -- gating decoys ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gate:
    """Mixture-of-experts gating, softmax(x·W_gate) combining expert outputs: not attention."""

    kind: str
    dtype: str = "float32"
    B: int = 1
    T: int = 1
    Dm: int = 8
    E: int = 4
    Dout: int = 4
    seed: int = 0

    @property
    def defect(self) -> str:
        return self.kind


class GateProgram(nn.Module):
    def __init__(self, g: Gate, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.g = g
        dtype = dtype or DTYPES[g.dtype]
        gen = torch.Generator().manual_seed(g.seed + 1)
        w = torch.randn(g.Dm, g.E, generator=gen, dtype=torch.float64).to(dtype)
        if g.kind == "gate_linear":
            self.gate = nn.Linear(g.Dm, g.E, bias=False).to(dtype)
            with torch.no_grad():
                self.gate.weight.copy_(w.T)
        else:
            self.w_gate = nn.Parameter(w)
        if g.kind in ("gate_2d_weight", "gate_linear"):
            self.experts = nn.Parameter(torch.randn(g.E, g.Dout, generator=gen,
                                                    dtype=torch.float64).to(dtype))

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        g = self.g
        if g.kind == "gate_2d_weight":          # [B,T,Dm] @ [Dm,E] -> gates @ [E,Dout]
            return torch.softmax(x @ self.w_gate, dim=-1) @ self.experts
        if g.kind == "gate_linear":
            return F.softmax(self.gate(x), dim=-1) @ self.experts
        if g.kind == "gate_bmm_weight":         # ranks match: bmm with the expanded gate weight
            w = self.w_gate.expand(x.shape[0], g.Dm, g.E)
            return torch.bmm(torch.softmax(torch.bmm(x, w), dim=-1), y)
        if g.kind == "gate_per_token":          # y: [B,T,E,Dout] per-token expert outputs
            gates = torch.softmax(x @ self.w_gate, dim=-1)
            return (gates.unsqueeze(-2) @ y).squeeze(-2)
        if g.kind == "gate_einsum":
            gates = torch.softmax(torch.einsum("btd,de->bte", x, self.w_gate), dim=-1)
            return torch.einsum("bte,bted->btd", gates, y)
        raise AssertionError(g.kind)


def gate_inputs(g: Gate) -> tuple[torch.Tensor, ...]:
    dtype = DTYPES[g.dtype]
    gen = torch.Generator().manual_seed(g.seed)
    x = torch.randn(g.B, g.T, g.Dm, generator=gen, dtype=torch.float64).to(dtype)
    if g.kind == "gate_bmm_weight":
        return x, torch.randn(g.B, g.E, g.Dout, generator=gen, dtype=torch.float64).to(dtype)
    if g.kind in ("gate_per_token", "gate_einsum"):
        return x, torch.randn(g.B, g.T, g.E, g.Dout, generator=gen, dtype=torch.float64).to(dtype)
    return (x,)


def build(d: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Module and inputs for a Prog or a Gate."""
    if isinstance(d, Gate):
        return GateProgram(d), gate_inputs(d)
    return Program(d), make_inputs(d)
