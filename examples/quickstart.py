"""attnfuse quickstart: a small GPT written the way many models write attention, optimized.

The attention below is spelled by hand: a causal mask by ``masked_fill`` of a registered ``tril``
buffer, the scale by ``/ math.sqrt(d)``, softmax in fp32. ``attnfuse.optimize`` finds each site,
recognises the mask as causal, and runs each site on the kernel its cost model picks (on a GPU,
after timing the best candidates: attnfuse's Triton kernel or one of PyTorch's SDPA backends;
``explain`` prints every candidate and why). Run: ``python examples/quickstart.py``.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfuse


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att.float(), dim=-1).to(q.dtype)
        att = self.drop(att)
        y = att @ v
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, max_len)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 128, heads: int = 4, layers: int = 2,
                 max_len: int = 256) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, max_len) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _time(fn, x: torch.Tensor, iters: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--inner", default="inductor", choices=("inductor", "eager"))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        cfg = dict(vocab=32000, dim=2048, heads=16, layers=4, max_len=4096)
        batch, length, dtype = 4, 2048, torch.bfloat16
    else:
        cfg = dict(vocab=512, dim=128, heads=4, layers=2, max_len=256)
        batch, length, dtype = 2, 200, torch.float32
    model = GPT(**cfg).to(device=device, dtype=dtype).eval()
    idx = torch.randint(0, cfg["vocab"], (batch, length), device=device)

    print(attnfuse.explain(model, (idx,)))
    fast = attnfuse.optimize(model, (idx,), inner=args.inner)
    with torch.no_grad():
        want, got = model(idx).float(), fast(idx).float()
    err = (want - got).abs().max().item()
    scale = want.abs().max().item()
    print(f"\nmax |optimized - eager| = {err:.3g} (logits up to {scale:.3g})")
    # bf16 logits carry ~3 significant digits; fp32 agrees to rounding.
    tol = 5e-2 * scale if dtype == torch.bfloat16 else 1e-4 * scale
    if not err <= tol:
        raise SystemExit(f"optimized output differs from eager by {err:.3g} > {tol:.3g}")
    print("optimized output matches eager")
    if device.type == "cuda":
        eager_ms = _time(model, idx, 10)
        fast_ms = _time(fast, idx, 10)
        print(f"eager {eager_ms:.2f} ms, attnfuse {fast_ms:.2f} ms: {eager_ms / fast_ms:.2f}x "
              f"(B={batch}, N={length}, {cfg['layers']} layers, {dtype})")


if __name__ == "__main__":
    main()
