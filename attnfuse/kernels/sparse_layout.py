"""Block masks for the block-sparse kernels (``sparse.py``): the layout and its conversions.

A block mask cuts the (query, key) plane into blocks of MB_M x MB_N, NQB = ceil(Nq / MB_M) by
NKB = ceil(Nk / MB_N). ``BlockLayout.state[b, h, i, j]`` (int8 [Bl, Hl, NQB, NKB], Bl in {1, B},
Hl in {1, Hq}, broadcast) says what the kernels do with block pair (i, j):

    0 skipped: never visited; its scores count as -inf (probability 0, no gradient)
    1 partial: visited with bounds, causal band and window applied
    2 full:    every (row, key) pair inside the bounds and the band: no masking arithmetic

Pairs wholly outside the band are never visited, whatever the block mask says; which pairs are
full depends on the band, so a layout is built for one (causal, window) and checked against the
call. The kernels read FlexAttention-style lists derived from ``state``: per (b, h, query block)
the count and ascending indices of its partial and of its full key blocks (forward, dQ), and
the transposed lists per key block (dK/dV).

Sources: :func:`layout_from_blocks` (a dense bool block mask), :func:`layout_from_block_mask`
(FlexAttention's ``BlockMask``), :func:`dense_layout` (every block the band allows) and
``sparse_predict.predict`` (training-free, from pooled Q and K).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .reference import NO_WINDOW, band_offset, check_window

__all__ = ["BlockLayout", "block_structure", "dense_layout", "layout_from_blocks",
           "layout_from_block_mask", "default_block", "SKIP", "PARTIAL", "FULL"]

SKIP, PARTIAL, FULL = 0, 1, 2
# An unbounded side of the band: far beyond any index, small enough that i ± it fits in int32.
UNBOUNDED = 1 << 30


def default_block() -> int:
    """The block-mask granularity used when none is given: 128 on GPUs (one kernel tile), 16
    under Triton's interpreter (CPU tests), so that small inputs have many blocks."""
    from .sparse import _INTERPRET  # how the kernels were built decides
    return 16 if _INTERPRET else 128


def band_sides(causal: str, window: tuple[int, int]) -> tuple[int, int]:
    """(left, right) of the band as the kernels take them (unbounded sides as UNBOUNDED)."""
    left = UNBOUNDED if window[0] < 0 else min(window[0], UNBOUNDED)
    right = UNBOUNDED if window[1] < 0 else min(window[1], UNBOUNDED)
    if causal != "none":  # causal is the band's right edge on the diagonal
        right = 0
    return left, right


def block_structure(nq: int, nk: int, block: tuple[int, int], causal: str = "none",
                    window: tuple[int, int] = NO_WINDOW, device: Any = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(allowed, full, diagonal)``, bool [NQB, NKB]: block pairs with some (row, key) pair inside
    the bounds and the band; those with every pair inside both (and whole blocks, no ragged
    edge); and those holding the band's diagonal j = i + off (``reference.band_offset``)."""
    mb_m, mb_n = block
    off = band_offset(causal, nq, nk)
    left, right = band_sides(causal, window)
    r0 = torch.arange(0, nq, mb_m, device=device)[:, None]
    c0 = torch.arange(0, nk, mb_n, device=device)[None, :]
    r1, c1 = (r0 + mb_m).clamp(max=nq) - 1, (c0 + mb_n).clamp(max=nk) - 1
    allowed = (c0 <= r1 + off + right) & (c1 >= r0 + off - left)
    full = (allowed & (r0 + mb_m <= nq) & (c0 + mb_n <= nk) & (c0 + mb_n - 1 <= r0 + off + right)
            & (c0 >= r0 + mb_m - 1 + off - left))
    diagonal = allowed & (c0 <= r1 + off) & (c1 >= r0 + off)
    return allowed, full, diagonal


def _lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts [..., R] and ascending indices [..., R, C] (int32) of the True entries per row."""
    cnt = sel.sum(-1, dtype=torch.int32)
    # A stable sort of "not selected" puts the selected columns first, in ascending order.
    idx = torch.sort((~sel).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return cnt.contiguous(), idx.contiguous()


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A block mask for the sparse kernels: ``state`` int8 [Bl, Hl, NQB, NKB] (0 skipped, 1
    partial, 2 full; see the module legend) for blocks of ``block`` = (MB_M, MB_N) over
    ``nq`` x ``nk`` tokens, classified for ``causal`` and ``window`` (a layout is only valid
    for the band it was built for). The kernels' lists are derived on first use and kept."""

    state: torch.Tensor
    block: tuple[int, int]
    nq: int
    nk: int
    causal: str = "none"
    window: tuple[int, int] = NO_WINDOW
    _lists: dict = field(default_factory=dict, repr=False)

    @property
    def blocks(self) -> torch.Tensor:
        """Visited block pairs, bool [Bl, Hl, NQB, NKB]."""
        return self.state > 0

    def kv_lists(self) -> tuple[torch.Tensor, ...]:
        """(partial count, partial indices, full count, full indices) per query block."""
        if "kv" not in self._lists:
            self._lists["kv"] = (*_lists(self.state == PARTIAL), *_lists(self.state == FULL))
        return self._lists["kv"]

    def q_lists(self) -> tuple[torch.Tensor, ...]:
        """The same per key block, over query blocks (the transposed lists of the backward)."""
        if "q" not in self._lists:
            st = self.state.transpose(-1, -2)
            self._lists["q"] = (*_lists(st == PARTIAL), *_lists(st == FULL))
        return self._lists["q"]

    def density(self) -> float:
        """Visited block pairs over the pairs the band allows (what a dense kernel visits);
        1.0 when the band allows none."""
        allowed, _, _ = block_structure(self.nq, self.nk, self.block, self.causal, self.window,
                                        self.state.device)
        total = allowed.sum().item() * self.state.shape[0] * self.state.shape[1]
        return self.blocks.sum().item() / total if total else 1.0

    def element_mask(self) -> torch.Tensor:
        """The visited pairs at element level, bool [Bl, Hl, nq, nk] (for checks against the
        reference: the kernels compute the reference with this mask ANDed in)."""
        mb_m, mb_n = self.block
        full = self.blocks.repeat_interleave(mb_m, dim=2).repeat_interleave(mb_n, dim=3)
        return full[..., :self.nq, :self.nk]

    def check(self, q: Any, k: Any, causal: str, window: tuple[int, int]) -> None:
        """ValueError unless this layout was built for these lengths, heads and band."""
        b, hq, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        nqb, nkb = -(-nq // self.block[0]), -(-nk // self.block[1])
        got = tuple(self.state.shape)
        if (self.nq, self.nk) != (nq, nk) or got[2:] != (nqb, nkb):
            raise ValueError(f"block layout is for Nq={self.nq}, Nk={self.nk} (blocks {got[2:]}), "
                             f"the inputs have Nq={nq}, Nk={nk}: build it for these lengths")
        if got[0] not in (1, b) or got[1] not in (1, hq):
            raise ValueError(f"block layout batch/heads {got[:2]} do not broadcast to B={b}, "
                             f"Hq={hq}: use 1 or the full size")
        if (self.causal, tuple(self.window)) != (causal, tuple(window)):
            raise ValueError(f"block layout was classified for causal={self.causal!r}, "
                             f"window={self.window}, the call has causal={causal!r}, "
                             f"window={tuple(window)}: full blocks differ between bands, so "
                             "build the layout with the call's causal and window")


def _check_block(block: Any) -> tuple[int, int]:
    pair = (block, block) if isinstance(block, int) else tuple(block)
    if len(pair) != 2 or not all(isinstance(n, int) and n >= 16 and n & (n - 1) == 0
                                 for n in pair):
        raise ValueError(f"block: expected a power of two >= 16 (or a pair of them) for the "
                         f"block mask's (query, key) granularity, got {block!r}")
    return pair  # type: ignore[return-value]


def _from_state(blocks: torch.Tensor, nq: int, nk: int, block: tuple[int, int], causal: str,
                window: tuple[int, int]) -> BlockLayout:
    allowed, full, _ = block_structure(nq, nk, block, causal, window, blocks.device)
    state = torch.where(blocks & allowed, torch.where(full, FULL, PARTIAL), SKIP).to(torch.int8)
    return BlockLayout(state.contiguous(), block, nq, nk, causal, window)


def layout_from_blocks(blocks: torch.Tensor, nq: int, nk: int, *, block: Any = None,
                       causal: str = "none", window: tuple[int, int] = NO_WINDOW) -> BlockLayout:
    """A layout from a dense bool block mask [B|1, H|1, NQB, NKB] (or [NQB, NKB]; True = visit)
    for blocks of ``block`` (default :func:`default_block`) over ``nq`` x ``nk`` tokens."""
    block = _check_block(default_block() if block is None else block)
    window = check_window(window)
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool:
        raise TypeError(f"blocks: expected a bool tensor [B|1, H|1, NQB, NKB], got "
                        f"{getattr(blocks, 'dtype', type(blocks).__name__)}")
    if blocks.dim() < 2 or blocks.dim() > 4:
        raise ValueError(f"blocks: expected 2 to 4 dims ([B|1, H|1, NQB, NKB]), got shape "
                         f"{tuple(blocks.shape)}")
    blocks = blocks[(None,) * (4 - blocks.dim())]
    want = (-(-nq // block[0]), -(-nk // block[1]))
    if tuple(blocks.shape[2:]) != want:
        raise ValueError(f"blocks: {tuple(blocks.shape[2:])} blocks, expected {want} for "
                         f"Nq={nq}, Nk={nk} in blocks of {block}; pass block= to match")
    return _from_state(blocks, nq, nk, block, causal, window)


def dense_layout(b: int, h: int, nq: int, nk: int, *, block: Any = None, causal: str = "none",
                 window: tuple[int, int] = NO_WINDOW, device: Any = "cpu") -> BlockLayout:
    """Every block pair the band allows (the dense kernel's work), for [1, 1] or [b, h]."""
    block = _check_block(default_block() if block is None else block)
    allowed, _, _ = block_structure(nq, nk, block, causal, check_window(window), device)
    return layout_from_blocks(allowed.expand(b, h, -1, -1), nq, nk, block=block, causal=causal,
                              window=window)


def _dense_from_lists(num: torch.Tensor, idx: torch.Tensor, nkb: int) -> torch.Tensor:
    """Bool [B, H, NQB, nkb] from BlockMask-style counts and indices (entries past the count are
    undefined and ignored)."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    cols = idx.long()
    if bool((valid & ((cols < 0) | (cols >= nkb))).any()):
        raise ValueError(f"BlockMask lists key blocks outside [0, {nkb}): it was made for other "
                         "lengths; create it for this call's Q_LEN and KV_LEN")
    out = torch.zeros((*idx.shape[:-1], nkb), dtype=torch.int32, device=idx.device)
    out.scatter_add_(-1, cols.clamp(0, max(nkb - 1, 0)), valid.to(torch.int32))
    return out > 0


def _reblock(blocks: torch.Tensor, have: tuple[int, int], want: tuple[int, int],
             nq: int, nk: int) -> torch.Tensor:
    """Blocks of ``have`` as blocks of ``want``, where each ``want`` divides ``have`` (exact:
    every fine block inherits its coarse block)."""
    for axis, (h_, w_, n) in enumerate(zip(have, want, (nq, nk))):
        if h_ != w_:
            blocks = blocks.repeat_interleave(h_ // w_, dim=2 + axis)
            blocks = blocks.narrow(2 + axis, 0, -(-n // w_))
    return blocks


def layout_from_block_mask(block_mask: Any, nq: int, nk: int, *, causal: str = "none",
                           window: tuple[int, int] = NO_WINDOW, block: Any = None,
                           has_mask: bool = False) -> BlockLayout:
    """A layout from FlexAttention's ``BlockMask`` (its partial and full key-block lists and
    ``BLOCK_SIZE``). Its blocks become the kernel's block mask, re-blocked to ``block`` when
    that divides ``BLOCK_SIZE`` (default: ``BLOCK_SIZE`` itself if a power of two <= 128, else
    128 when 128 divides it); a coarser ``block`` would visit pairs the BlockMask skips, so it
    is refused.

    Element-level masking inside partial blocks comes from the call's ``causal``, ``window`` and
    mask tensor: the BlockMask's ``mask_mod`` is not evaluated. So a BlockMask that marks a
    block partial where this band makes it full (its ``mask_mod`` masks something there) is
    refused unless ``has_mask`` says the call passes an element-level mask tensor."""
    for name in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE"):
        if not hasattr(block_mask, name):
            raise TypeError(f"block_mask: expected torch.nn.attention.flex_attention.BlockMask "
                            f"(with {name}), got {type(block_mask).__name__}")
    window = check_window(window)
    bs = block_mask.BLOCK_SIZE
    have = (int(bs), int(bs)) if isinstance(bs, int) else (int(bs[0]), int(bs[1]))
    if block is None:
        want = tuple(h if h & (h - 1) == 0 and 16 <= h <= 128 else 128 if h % 128 == 0 else h
                     for h in have)
        if any(w % 128 and not (w & (w - 1) == 0 and 16 <= w) for w in want):
            raise ValueError(f"BlockMask BLOCK_SIZE {have} cannot be run: the kernel needs "
                             "blocks that are powers of two >= 16, or multiples of 128; create "
                             "the BlockMask with BLOCK_SIZE=128 (the default)")
        block = want
    block = _check_block(block)
    if any(h % w for h, w in zip(have, block)):
        raise ValueError(f"BlockMask BLOCK_SIZE {have} is not a multiple of the kernel block "
                         f"{block}: coarser blocks would visit pairs the BlockMask skips; create "
                         f"the BlockMask with BLOCK_SIZE={block} or pass block={have}")
    nqb, nkb = -(-nq // have[0]), -(-nk // have[1])
    num = block_mask.kv_num_blocks
    if num.dim() != 3 or num.shape[-1] != nqb:
        raise ValueError(f"BlockMask has {tuple(num.shape)} query-block rows, expected "
                         f"[B|1, H|1, {nqb}] for Q_LEN={nq} in blocks of {have[0]}")
    partial = _dense_from_lists(num, block_mask.kv_indices, nkb)
    full_num = getattr(block_mask, "full_kv_num_blocks", None)
    full = (_dense_from_lists(full_num, block_mask.full_kv_indices, nkb)
            if full_num is not None else torch.zeros_like(partial))
    blocks = _reblock(partial | full, have, block, nq, nk)
    layout = _from_state(blocks, nq, nk, block, causal, window)
    if not has_mask and _masks_something(block_mask):
        ours = _reblock(partial, have, block, nq, nk) & (layout.state == FULL)
        if bool(ours.any()):
            raise ValueError("BlockMask marks blocks partial (its mask_mod masks elements "
                             "there) that this call's causal/window make full: the kernel does "
                             "not evaluate mask_mod. Pass the element-level mask as causal=/"
                             "window= (causal='top_left' for a causal mask_mod) or as a mask "
                             "tensor (create_mask(mask_mod, ...)) with has_mask=True")
    return layout


def _masks_something(block_mask: Any) -> bool:
    """Whether the BlockMask's mask_mod is a real mask (not FlexAttention's no-op)."""
    try:
        from torch.nn.attention.flex_attention import noop_mask
    except ImportError:  # pragma: no cover - torch without FlexAttention
        return True
    return getattr(block_mask, "mask_mod", noop_mask) is not noop_mask


