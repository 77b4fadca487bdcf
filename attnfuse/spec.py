"""The one typed record of an attention site, in FlexAttention's vocabulary.

The matcher produces an :class:`AttentionSpec` per site (or a :class:`Reject` with the reason);
kernel selection and the rewrite read only the spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

Shape = tuple[Union[int, str], ...]


@dataclass(frozen=True)
class Reject:
    """A failed check: falsy, and carries the human-readable reason."""

    reason: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and device of one operand, as the graph's fake tensors report them."""

    shape: Shape
    dtype: torch.dtype
    device: str
    stride: Shape = ()

    @staticmethod
    def of(t: Any) -> "TensorInfo":
        def plain(xs: Sequence[Any]) -> Shape:
            return tuple(int(x) if isinstance(x, int) else str(x) for x in xs)

        return TensorInfo(plain(t.shape), t.dtype, str(t.device), plain(t.stride()))

    def describe(self) -> str:
        return "x".join(str(s) for s in self.shape)


@dataclass(frozen=True)
class MaskSpec:
    """What sits between Q·Kᵀ and the softmax, besides the scale.

    ``causal``: ``"none"``, ``"top_left"`` (SDPA's ``is_causal``) or ``"bottom_right"``.
    ``window``: ``(left, right)``, the keys each query may see around its diagonal (measured from
    the causal alignment; -1 = unbounded; ``(-1, -1)`` = no window). A causal window
    ``(W - 1, 0)`` is the sliding window of W tokens of Mistral and Gemma 2.
    ``kind``: ``"none"``, ``"bool"`` (True = attend; masked scores become ``fill``) or
    ``"additive"`` (added to the scaled scores). ``tensor``: shape/dtype of the dense mask.
    """

    causal: str = "none"
    kind: str = "none"
    tensor: Optional[TensorInfo] = None
    fill: float = float("-inf")
    requires_grad: bool = False
    window: tuple[int, int] = (-1, -1)

    def describe_window(self) -> str:
        """``"window 4096"`` for a causal sliding window of 4096 tokens, else the two sides."""
        left, right = self.window
        if (left, right) == (-1, -1):
            return ""
        if self.causal != "none" and right in (0, -1) and left >= 0:
            return f"window {left + 1}"
        sides = [f"{name} {n}" for name, n in (("left", left), ("right", right)) if n >= 0]
        return "window " + ", ".join(sides)

    def describe(self) -> str:
        parts = []
        if self.causal != "none":
            parts.append(f"causal ({self.causal.replace('_', '-')})")
        if self.window != (-1, -1):
            parts.append(self.describe_window())
        if self.kind == "bool":
            fill = "-inf" if math.isinf(self.fill) else f"{self.fill:.3g}"
            parts.append(f"bool mask {self.tensor.describe()} (fill {fill})")
        elif self.kind == "additive":
            dtype = str(self.tensor.dtype).replace("torch.", "")
            parts.append(f"additive mask {self.tensor.describe()} {dtype}")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class AttentionSpec:
    """One attention site: ``softmax(scale · Q·Kᵀ ⊕ mask) · V`` on [B, H, N, D] operands."""

    q: TensorInfo
    k: TensorInfo
    v: TensorInfo
    scale: float
    scale_expr: str = ""
    mask: MaskSpec = field(default_factory=MaskSpec)
    gqa_groups: int = 1
    softcap: float = 0.0                    # scores become softcap·tanh(s/softcap); 0 = off
    dropout_p: float = 0.0
    softmax_dtype: Optional[torch.dtype] = None
    requires_grad: bool = False
    source: str = "eager_softmax"          # "eager_softmax" or "sdpa"
    location: str = ""
    module_path: str = ""
    rules: tuple[str, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> str:
        return self.q.device

    @property
    def head_dim(self) -> int:
        d = self.q.shape[-1]
        return d if isinstance(d, int) else -1

    def describe(self) -> str:
        """E.g. ``causal (top-left), scale 1/8, fp16, BxHxNqxNkxD = 2x4x64x64x32``."""
        b, h, nq, d = (self.q.shape + (1,) * 4)[:4] if len(self.q.shape) == 4 else (
            1, *self.q.shape[-3:])
        nk = self.k.shape[-2]
        dtype = str(self.dtype).replace("torch.", "")
        parts = [self.mask.describe(), f"scale {self.scale_expr or f'{self.scale:.4g}'}"]
        if self.gqa_groups > 1:
            parts.append(f"GQA {self.gqa_groups}:1")
        if self.softcap:
            parts.append(f"softcap {self.softcap:g}")
        parts.append(dtype)
        parts.append(f"BxHxNqxNkxD = {b}x{h}x{nq}x{nk}x{d}")
        return ", ".join(parts)
