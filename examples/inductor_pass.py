"""``attnfuse.inductor_pass()``: keep ``torch.compile(model)`` (Inductor) and let attnfuse rewrite
the attention it finds, as an Inductor graph pass.

The model writes attention by hand (``softmax(q @ kᵀ / sqrt(d))`` with a causal ``tril`` buffer)
in one block and calls ``F.scaled_dot_product_attention`` in another. The pass runs in Inductor's
``pre_grad_custom_pass`` slot, the one that sees Dynamo's torch-level graph; it has a ``uuid()``,
so Inductor's FX graph cache stays on (and is keyed on attnfuse's version, sources and options).
Three ways to use it are shown. CPU by default, the GPU when there is one.
Run: ``python examples/inductor_pass.py``.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnfuse


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, sdpa: bool) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            s = s.masked_fill(~self.causal[:n, :n], float("-inf"))
            y = torch.softmax(s, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Model(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 4, max_len: int = 256) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Attention(dim, heads, max_len, sdpa) for sdpa in (False, True))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(self.norm(x))
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Model().to(device, dtype).eval()
    x = torch.randn(2, 200, 128, device=device, dtype=dtype)
    with torch.no_grad():
        want = model(x).float()

        # 1. A block: everything compiled inside it (on the first call) gets the pass; the
        #    slot's previous content (a pass of your own, say) runs first and is restored after.
        with attnfuse.inductor_pass() as p:
            got = torch.compile(model)(x).float()
        print(p.report)
        check("with attnfuse.inductor_pass()", got, want, p.report)

        # 2. Per compile, with Inductor's own option (it stands instead of a global pass).
        torch._dynamo.reset()
        p = attnfuse.inductor_pass(kernel="reference")
        got = torch.compile(model, options={"pre_grad_custom_pass": p})(x).float()
        check("options={'pre_grad_custom_pass': ...}", got, want, p.report)

        # 3. For the rest of the program (until uninstall()); keep_sdpa=True leaves the model's
        #    own SDPA call to PyTorch.
        torch._dynamo.reset()
        p = attnfuse.inductor_pass(keep_sdpa=True).install()
        try:
            got = torch.compile(model)(x).float()
        finally:
            p.uninstall()
        check("attnfuse.inductor_pass(keep_sdpa=True).install()", got, want, p.report)


def check(how: str, got: torch.Tensor, want: torch.Tensor, report: attnfuse.Report) -> None:
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    tol = (5e-2 if got.dtype == torch.bfloat16 else 1e-4) * max(scale, 1.0)
    if report.sites:
        # "sdpa" = left on PyTorch's default SDPA dispatch (keep_sdpa=True)
        found = f"{len(report.sites)} sites on {', '.join(str(s.kernel) for s in report.sites)}"
    else:  # a later run of this script: the compiled code (rewrite included) comes from the cache
        found = "served from Inductor's cache, no pass needed"
    print(f"{how}: {found}, max |compiled - eager| = {err:.3g}")
    if not err <= tol:
        raise SystemExit(f"{how}: compiled output differs from eager by {err:.3g} > {tol:.3g}")


if __name__ == "__main__":
    main()
