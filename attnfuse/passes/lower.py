"""Lowering of PyTorch's multi-head attention calls, which Dynamo keeps as single graph nodes.

``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` reach a Dynamo graph as one of
``F.multi_head_attention_forward`` (the general path), ``torch._native_multi_head_attention`` (the
inference fast path of ``nn.MultiheadAttention``) or ``torch._transformer_encoder_layer_fwd`` (the
fast path of the encoder layer). None of them exposes a softmax to match, so each supported call is
replaced by the same computation written with ``attnfuse::attention``: input projections,
heads, fused attention, output projection (and, for the encoder layer, norms and feed-forward).

Mask conventions follow PyTorch's: boolean ``attn_mask``/``key_padding_mask`` mark positions to
*drop* (True = not allowed); float masks are added to the scores. A query row whose every key is
dropped gives 0 (the SDPA path's answer; the ``need_weights=True`` math path gives NaN there).
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Node

from ..kernels import registry, sdpa
from . import canonicalize as C

MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
            "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
            "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
            "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
            "static_k", "static_v", "average_attn_weights", "is_causal")
MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
                "v_proj_weight": None, "static_k": None, "static_v": None,
                "average_attn_weights": True, "is_causal": False}
NATIVE_ARGS = ("query", "key", "value", "embed_dim", "num_head", "qkv_weight", "qkv_bias",
               "proj_weight", "proj_bias", "mask", "need_weights", "average_attn_weights", "mask_type")
ENCODER_ARGS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight",
                "proj_bias", "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1",
                "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2",
                "ffn_bias_2", "mask", "mask_type")


def _named(node: Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def kind_of(node: Node) -> Optional[str]:
    if node.op != "call_function":
        return None
    if node.target is F.multi_head_attention_forward:
        return "mha"
    if node.target in (torch._native_multi_head_attention,
                       getattr(torch.ops.aten, "_native_multi_head_attention", None)):
        return "native_mha"
    if node.target in (torch._transformer_encoder_layer_fwd,
                       getattr(torch.ops.aten, "_transformer_encoder_layer_fwd", None)):
        return "encoder_layer"
    return None


def _weights_used(node: Node) -> bool:
    """Whether anything reads output 1 (the attention weights) of ``node``."""
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0:
            continue
        return True
    return False


def check(node: Node) -> tuple[Optional[str], dict[str, Any]]:
    """``(reason it cannot be lowered or None, {shape facts})`` for a call :func:`kind_of` names."""
    kind = kind_of(node)
    if kind == "mha":
        a = _named(node, MHA_ARGS, MHA_DEFAULTS)
        q, k = C.meta(a["query"]), C.meta(a["key"])
        if a["bias_k"] is not None or a["bias_v"] is not None:
            return "add_bias_kv=True (learned extra key/value) is not lowered", {}
        if a["add_zero_attn"]:
            return "add_zero_attn=True is not lowered", {}
        if a["static_k"] is not None or a["static_v"] is not None:
            return "static_k/static_v are not lowered", {}
        if a["training"] and a["dropout_p"]:
            return (f"attention dropout is active (p={a['dropout_p']}, training); fused dropout "
                    f"is not implemented yet, call model.eval() to fuse"), {}
        if a["need_weights"] and _weights_used(node):
            return ("the attention weights are returned and used (need_weights=True); pass "
                    "need_weights=False to fuse"), {}
        if not isinstance(q, Tensor) or q.dim() != 3:
            return "unbatched (2-D) inputs are not lowered", {}
        e, h = a["embed_dim_to_check"], a["num_heads"]
        if not isinstance(e, int) or not isinstance(h, int) or e % h:
            return "embed_dim/num_heads are not static", {}
        return None, {"b": q.shape[1], "h": h, "nq": q.shape[0], "nk": k.shape[0], "d": e // h,
                      "like": q, "masks": [C.meta(a["attn_mask"]), C.meta(a["key_padding_mask"])]}
    if kind in ("native_mha", "encoder_layer"):
        names = NATIVE_ARGS if kind == "native_mha" else ENCODER_ARGS
        a = _named(node, names, {"mask": None, "mask_type": None, "need_weights": True,
                                 "average_attn_weights": True})
        x = C.meta(a["query"] if kind == "native_mha" else a["src"])
        k = C.meta(a["key"]) if kind == "native_mha" else x
        if kind == "native_mha" and a["need_weights"] and _weights_used(node):
            return "the attention weights are returned and used (need_weights=True)", {}
        if not isinstance(x, Tensor) or x.is_nested or x.dim() != 3:
            return "nested or unbatched inputs are not lowered", {}
        e, h = a["embed_dim"], a["num_head" if kind == "native_mha" else "num_heads"]
        if not isinstance(e, int) or not isinstance(h, int) or e % h:
            return "embed_dim/num_heads are not static", {}
        if a["mask"] is not None and a["mask_type"] not in (0, 1, 2):
            return f"mask_type={a['mask_type']} is not lowered", {}
        return None, {"b": x.shape[0], "h": h, "nq": x.shape[1], "nk": k.shape[1], "d": e // h,
                      "like": x, "masks": [C.meta(a["mask"])]}
    return "not a multi-head attention call", {}


def mask_meta(f: dict[str, Any]) -> Optional[Tensor]:
    """A stand-in for the additive mask the lowering builds from :func:`check`'s facts (for kernel
    choice): [B, 1, Nq, Nk] in q's dtype, requiring grad when a float mask does; None if none."""
    masks = [m for m in f.get("masks", ()) if isinstance(m, Tensor)]
    if not masks:
        return None
    like = f["like"]
    grad = any(m.requires_grad and m.is_floating_point() for m in masks)
    return like.new_empty((f["b"], 1, f["nq"], f["nk"])).requires_grad_(grad)


def _drop_mask(mask: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """PyTorch's "True = drop" boolean masks as additive float masks; float masks as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            mask, float("-inf"))
    return mask


def _heads(x: Tensor, h: int, batch_first: bool) -> Tensor:
    """[L, N, E] (or [N, L, E]) -> [N, H, L, E/H]."""
    if batch_first:
        n, length, e = x.shape
        return x.view(n, length, h, e // h).transpose(1, 2)
    length, n, e = x.shape
    return x.view(length, n, h, e // h).permute(1, 2, 0, 3)


def _project(query: Tensor, key: Tensor, value: Tensor, w: Optional[Tensor], b: Optional[Tensor],
             ws: Optional[tuple] = None) -> tuple[Tensor, Tensor, Tensor]:
    if ws is None and query is key and key is value:
        return F.linear(query, w, b).chunk(3, dim=-1)
    wq, wk, wv = ws if ws is not None else w.chunk(3)
    bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
    return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool,
            kernel: str) -> Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    if registry.is_sdpa(kernel):
        return sdpa.call(q, k, v, mask, scale, causal, kernel)
    out, _ = torch.ops.attnfuse.attention(q, k, v, mask, scale, "top_left" if causal else "none",
                                          float("-inf"), kernel, 0.0)
    return out


def mha_forward(query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int, num_heads: int,
                in_proj_weight: Optional[Tensor], in_proj_bias: Optional[Tensor], bias_k: Any,
                bias_v: Any, add_zero_attn: bool, dropout_p: float, out_proj_weight: Tensor,
                out_proj_bias: Optional[Tensor], training: bool = True,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, use_separate_proj_weight: bool = False,
                q_proj_weight: Optional[Tensor] = None, k_proj_weight: Optional[Tensor] = None,
                v_proj_weight: Optional[Tensor] = None, static_k: Any = None, static_v: Any = None,
                average_attn_weights: bool = True, is_causal: bool = False, *,
                kernel: str = "auto") -> tuple[Tensor, None]:
    """``F.multi_head_attention_forward`` (seq-first, batched, the subset :func:`check` admits)."""
    length, n, e = query.shape
    causal = bool(is_causal and key_padding_mask is None and not need_weights)
    if causal:            # PyTorch's rule: the hint replaces the mask (which must be causal)
        attn_mask = None
    ws = (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight else None
    q, k, v = _project(query, key, value, in_proj_weight, in_proj_bias, ws)
    q, k, v = (_heads(t, num_heads, False) for t in (q, k, v))
    mask = _drop_mask(attn_mask, q)
    if mask is not None and mask.dim() == 3:
        mask = mask.view(n, num_heads, length, k.shape[2])
    pad = _drop_mask(key_padding_mask, q)
    if pad is not None:
        pad = pad.view(n, 1, 1, k.shape[2])
        mask = pad if mask is None else mask + pad
    out = _attend(q, k, v, mask, causal, kernel)
    out = out.permute(2, 0, 1, 3).reshape(length, n, e)
    return F.linear(out, out_proj_weight, out_proj_bias), None


def _native_mask(mask: Optional[Tensor], mask_type: Optional[int], n: int, h: int, nq: int,
                 nk: int, like: Tensor) -> Optional[Tensor]:
    mask = _drop_mask(mask, like)
    if mask is None:
        return None
    if mask_type == 1:
        return mask.view(n, 1, 1, nk)
    if mask_type == 0:
        return mask.view(1, 1, nq, nk)
    return mask


def native_mha(query: Tensor, key: Tensor, value: Tensor, embed_dim: int, num_head: int,
               qkv_weight: Tensor, qkv_bias: Optional[Tensor], proj_weight: Tensor,
               proj_bias: Optional[Tensor], mask: Optional[Tensor] = None, need_weights: bool = True,
               average_attn_weights: bool = True, mask_type: Optional[int] = None, *,
               kernel: str = "auto") -> tuple[Tensor, None]:
    """``torch._native_multi_head_attention`` (batch-first)."""
    n, nq, e = query.shape
    q, k, v = _project(query, key, value, qkv_weight, qkv_bias)
    q, k, v = (_heads(t, num_head, True) for t in (q, k, v))
    m = _native_mask(mask, mask_type, n, num_head, nq, k.shape[2], q)
    out = _attend(q, k, v, m, False, kernel).transpose(1, 2).reshape(n, nq, e)
    return F.linear(out, proj_weight, proj_bias), None


def encoder_layer(src: Tensor, embed_dim: int, num_heads: int, qkv_weight: Tensor,
                  qkv_bias: Optional[Tensor], proj_weight: Tensor, proj_bias: Optional[Tensor],
                  use_gelu: bool, norm_first: bool, eps: float, norm_weight_1: Tensor,
                  norm_bias_1: Tensor, norm_weight_2: Tensor, norm_bias_2: Tensor,
                  ffn_weight_1: Tensor, ffn_bias_1: Tensor, ffn_weight_2: Tensor,
                  ffn_bias_2: Tensor, mask: Optional[Tensor] = None,
                  mask_type: Optional[int] = None, *, kernel: str = "auto") -> Tensor:
    """``torch._transformer_encoder_layer_fwd``: the encoder layer's inference fast path."""
    act = F.gelu if use_gelu else F.relu

    def sa(x: Tensor) -> Tensor:
        return native_mha(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                          proj_bias, mask, False, True, mask_type, kernel=kernel)[0]

    def ff(x: Tensor) -> Tensor:
        return F.linear(act(F.linear(x, ffn_weight_1, ffn_bias_1)), ffn_weight_2, ffn_bias_2)

    norm1 = lambda x: F.layer_norm(x, (embed_dim,), norm_weight_1, norm_bias_1, eps)  # noqa: E731
    norm2 = lambda x: F.layer_norm(x, (embed_dim,), norm_weight_2, norm_bias_2, eps)  # noqa: E731
    if norm_first:
        x = src + sa(norm1(src))
        return x + ff(norm2(x))
    x = norm1(src + sa(src))
    return norm2(x + ff(x))


LOWERINGS = {"mha": mha_forward, "native_mha": native_mha, "encoder_layer": encoder_layer}


def lower(node: Node, kernel: str, note: str) -> None:
    """Point ``node`` at its attnfuse lowering (same arguments, plus the chosen kernel)."""
    node.target = LOWERINGS[kind_of(node)]
    node.kwargs = {**node.kwargs, "kernel": kernel}
    node.meta["attnfuse"] = note
