"""transformers: ``attnfuse.register_hf()`` makes ``attn_implementation="attnfuse"`` valid.

transformers looks an attention implementation up in two registries under one name:

* ``AttentionInterface``: the function each attention module calls with ``(module, query, key,
  value, attention_mask, **kwargs)``, q/k/v as ``[B, H, N, D]`` (K/V not repeated for GQA),
  returning ``(output as [B, N, H, Dv], attention weights or None)``;
* ``AttentionMaskInterface``: the function that builds ``attention_mask``. A name missing there
  makes transformers pass ``attention_mask=None``, so padded batches would silently attend to
  padding. attnfuse registers transformers' own SDPA mask builder: a boolean ``[B, 1, Nq, Nk]``
  mask (True = attend) carrying causality, padding, sliding windows, chunks and packed
  sequences, or ``None`` where SDPA's ``is_causal`` says the same (no padding, and a window, if
  any, that cannot cut anything).

The attention function hands the call to :func:`attnfuse.attention` (so the kernel is chosen
there), honouring what it can express and raising on what it cannot.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from .. import ops
from ..kernels import registry

# Keyword arguments attention modules pass that attnfuse turns into attnfuse.attention's.
HONOURED = frozenset({"dropout", "scaling", "is_causal", "sliding_window", "softcap",
                      "position_bias"})
# Passed along by transformers without bearing on the attention itself: rotary embeddings and
# caches were applied before the call, and these only steer other parts of the model.
HARMLESS = frozenset({
    "position_ids", "use_cache", "cache_position", "past_key_values", "past_key_value",
    "layer_idx", "output_hidden_states", "output_router_logits", "num_items_in_batch",
    "return_dict", "encoder_hidden_states", "deterministic", "seq_idx", "max_length_q",
    "max_length_k",
})
# Packed sequences (FlashAttention's varlen boundaries): honoured as a block-diagonal mask.
PACKING = frozenset({"cu_seq_lens_q", "cu_seq_lens_k"})
# Features attnfuse.attention does not have: refused whenever they are set.
REFUSED = {
    "output_attentions": "attention weights cannot be returned by a fused kernel",
    "s_aux": "attention sinks (s_aux) are not implemented",
    "sinks": "attention sinks are not implemented",
    "cache": "paged KV caches (continuous batching) are not implemented",
    "head_mask": "head masks are not implemented",
    "layer_head_mask": "head masks are not implemented",
    "indices": "index-selected (sparse) attention is not implemented",
    "block_indices": "index-selected (sparse) attention is not implemented",
}
_FIX = "use attn_implementation='sdpa' or 'eager' for this model"


def _unset(value: Any) -> bool:
    return value is None or value is False


def _check_kwargs(kwargs: dict[str, Any], mask: Optional[Tensor], ignore: frozenset[str]) -> None:
    for name, value in kwargs.items():
        if name in HARMLESS or name in ignore or _unset(value):
            continue
        if name in REFUSED:
            raise ValueError(f"attn_implementation='attnfuse' got {name}={_short(value)}: "
                             f"{REFUSED[name]}; {_FIX}")
        if name in PACKING:
            continue
        raise TypeError(
            f"attn_implementation='attnfuse' got an unexpected keyword argument {name}="
            f"{_short(value)} and cannot tell whether it changes the attention; expected only "
            f"{sorted(HONOURED | PACKING)}, {sorted(HARMLESS)} or unset {sorted(REFUSED)}. If it "
            f"does not change the attention, declare it with attnfuse.register_hf(ignore="
            f"({name!r},)); otherwise {_FIX}")


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"attn_implementation='attnfuse' expects {name} to be a number, got "
                        f"{type(value).__name__} ({_short(value)})")
    return float(value)


def _with_bias(mask: Optional[Tensor], bias: Tensor) -> Tensor:
    """An additive bias (T5-style ``position_bias``) folded into the mask, as transformers' SDPA
    path does: added to a float mask, kept where a bool mask attends and -inf elsewhere."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, float("-inf"))
    return bias + mask


def _same_sequence(q: Tensor, k: Tensor, cu_q: Optional[Tensor],
                   cu_k: Optional[Tensor]) -> Optional[Tensor]:
    """Packed sequences (one row of concatenated sequences, ``cu_seq_lens`` = their cumulative
    lengths, FlashAttention's varlen format) as a ``[N, N]`` mask: True where query and key
    belong to the same sequence. Refused where the packing is not that one self-attention row."""
    if cu_q is None and cu_k is None:
        return None
    cu_q = cu_k if cu_q is None else cu_q
    cu_k = cu_q if cu_k is None else cu_k
    if (q.shape[0] != 1 or q.shape[2] != k.shape[2]
            or (cu_k is not cu_q and not torch.equal(cu_q, cu_k))):
        raise ValueError(
            f"attn_implementation='attnfuse' got packed sequences (cu_seq_lens_q/k) with query "
            f"{tuple(q.shape)} and key {tuple(k.shape)}; only one packed row attending to itself "
            f"(batch 1, the same boundaries for queries and keys) is supported; {_FIX}")
    pos = torch.arange(q.shape[2], device=q.device)
    seq = torch.searchsorted(cu_q[1:].to(device=q.device), pos, right=True)
    return seq[:, None] == seq[None, :]


def _band(module: torch.nn.Module, q: Tensor, k: Tensor, mask: Optional[Tensor],
          is_causal: Optional[bool], sliding_window: Any) -> tuple[str, Optional[tuple]]:
    """``(causal, window)`` for attnfuse.attention.

    Causality as transformers' SDPA path reads it: the module's ``is_causal`` (or the kwarg),
    applied only when there is no mask (a mask already carries it) and more than one query (a
    single query is the last position and sees every key). A sliding window is likewise already
    in the mask when there is one; without a mask it is applied here, aligned so that the last
    query is the last key's position, and refused where that alignment is unknown.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    nq, nk = q.shape[2], k.shape[2]
    if mask is not None:
        return "none", None
    kind = "top_left" if (bool(causal) and nq > 1) else "none"
    if sliding_window is None:
        return kind, None
    if (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
            or sliding_window < 1):
        raise ValueError(f"attn_implementation='attnfuse' got sliding_window={sliding_window!r} "
                         f"with no attention mask; only a positive int (a causal window of that "
                         f"many tokens) can be applied without one; {_FIX}")
    if nk <= sliding_window:
        return kind, None              # no query can reach further back than the window
    if not causal:
        raise ValueError(f"attn_implementation='attnfuse' got sliding_window={sliding_window} on "
                         f"a non-causal module with no attention mask; the window's shape is "
                         f"model-specific there; let transformers build the mask (pass an "
                         f"attention_mask) or {_FIX}")
    window = (sliding_window - 1, 0)
    if nq == nk:
        return "top_left", window
    if nq == 1:
        return "bottom_right", window  # the single query is the newest token
    raise ValueError(f"attn_implementation='attnfuse' got sliding_window={sliding_window} with "
                     f"{nq} queries on {nk} keys and no attention mask, so where the queries sit "
                     f"among the keys is unknown; pass an attention_mask (transformers then "
                     f"builds the windowed mask) or {_FIX}")


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      sliding_window: Any = None, softcap: Optional[float] = None,
                      position_bias: Optional[Tensor] = None, *, kernel: str = "auto",
                      ignore: frozenset[str] = frozenset(),
                      **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function contract on :func:`attnfuse.attention`.

    ``query`` ``[B, Hq, Nq, D]``, ``key``/``value`` ``[B, Hkv, Nk, D]`` (GQA when Hkv < Hq);
    returns ``(output [B, Nq, Hq, Dv], None)``. ``dropout`` is the probability transformers
    passes (0 in eval mode), ``scaling`` the scale (None = 1/sqrt(D)), ``softcap`` Gemma 2's
    tanh soft-capping, ``position_bias`` an additive bias folded into the mask,
    ``cu_seq_lens_q/k`` packed sequences (kept apart by a block-diagonal mask).
    """
    mask = attention_mask
    _check_kwargs(kwargs, mask, ignore)
    if mask is not None and not isinstance(mask, Tensor):
        raise TypeError(f"attn_implementation='attnfuse' expects attention_mask to be a tensor or "
                        f"None, got {type(mask).__name__}; register the mask function with "
                        f"attnfuse.register_hf() (it builds boolean masks)")
    causal, window = _band(module, query, key, mask, is_causal, sliding_window)
    same = _same_sequence(query, key, kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"))
    if same is not None:         # ANDed in: a mask that already separates the sequences is kept
        mask = same if mask is None else (mask & same if mask.dtype == torch.bool
                                          else mask.masked_fill(~same, float("-inf")))
    if position_bias is not None:
        mask = _with_bias(mask, position_bias)
    cap = _number("softcap", softcap)
    out = ops.attention(
        query, key, value, attn_mask=mask, dropout_p=_number("dropout", dropout) or 0.0,
        is_causal=causal, scale=_number("scaling", scaling),
        enable_gqa=query.shape[1] != key.shape[1], kernel=kernel, softcap=cap or 0.0,
        window=window)
    return out.transpose(1, 2).contiguous(), None


def _is_ours(fn: Any) -> bool:
    return bool(getattr(fn, "__attnfuse__", False))


def register_hf(name: str = "attnfuse", *, kernel: str = "auto",
                ignore: Iterable[str] = ()) -> str:
    """Make ``attn_implementation=name`` (default ``"attnfuse"``) valid in transformers.

    Registers the attention function (``AttentionInterface``) and the mask function
    (``AttentionMaskInterface``, transformers' SDPA masks) under ``name``; then
    ``AutoModel.from_pretrained(..., attn_implementation="attnfuse")`` or
    ``model.set_attn_implementation("attnfuse")`` runs every attention layer through
    :func:`attnfuse.attention`. Calling it again re-registers (e.g. with another ``kernel``).

    ``kernel``: as :func:`attnfuse.attention`'s (``"auto"`` = chosen per call). ``ignore``:
    names of extra keyword arguments a model passes that do not change the attention (unknown
    ones raise TypeError rather than being ignored). Returns ``name``.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(f"attnfuse.register_hf() needs transformers 5 (AttentionInterface and "
                          f"AttentionMaskInterface): pip install 'transformers>=5' ({e})") from e
    if not isinstance(name, str) or not name or name == "eager":
        raise ValueError(f"name must be a non-empty string other than 'eager', got {name!r}")
    for registry_cls in (AttentionInterface, AttentionMaskInterface):
        current = registry_cls._global_mapping.get(name)
        if current is not None and not _is_ours(current):
            raise ValueError(f"attn_implementation {name!r} is already registered by transformers "
                             f"or another library ({getattr(current, '__qualname__', current)}); "
                             f"register attnfuse under another name, e.g. register_hf('attnfuse')")
    if kernel not in registry.kernel_names():
        raise ValueError(f"kernel must be one of {registry.kernel_names()}, got {kernel!r}")
    ignore = frozenset(ignore)
    if not all(isinstance(x, str) for x in ignore):
        raise TypeError(f"ignore must be names (strings), got {sorted(map(repr, ignore))}")
    sdpa_mask = AttentionMaskInterface._global_mapping.get("sdpa")
    if sdpa_mask is None:
        raise ImportError("this transformers has no 'sdpa' mask function to register; "
                          "pip install 'transformers>=5'")

    @functools.wraps(attention_forward)
    def forward(*args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        return attention_forward(*args, kernel=kernel, ignore=ignore, **kwargs)

    @functools.wraps(sdpa_mask)
    def mask(*args: Any, **kwargs: Any) -> Optional[Tensor]:
        return sdpa_mask(*args, **kwargs)

    forward.__attnfuse__ = mask.__attnfuse__ = True
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, mask)
    return name
