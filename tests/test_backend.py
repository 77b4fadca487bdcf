"""The torch.compile backend, its registration and options, and optimize() with Inductor."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnfuse
from helpers import check_rewrite

ROOT = Path(__file__).resolve().parents[1]


def attn(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_backend_string_without_importing_attnfuse_first() -> None:
    """``backend="attnfuse"`` resolves through the entry point (or the guarded fallback)."""
    code = ("import torch\n"
            "f = torch.compile(lambda q, k, v: torch.softmax(q @ k.mT, -1) @ v, backend='attnfuse',"
            " options={'inner': 'eager'})\n"
            "q = torch.randn(1, 2, 5, 8)\n"
            "torch.testing.assert_close(f(q, q, q), torch.softmax(q @ q.mT, -1) @ q)\n"
            "import attnfuse\n"
            "assert len(attnfuse.last_report().fused) == 1, attnfuse.last_report()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_backend_after_import() -> None:
    f = torch.compile(attn, backend="attnfuse", options={"inner": "eager"})
    q = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(f(q, q, q), attn(q, q, q))


def test_unknown_option_raises() -> None:
    with pytest.raises(ValueError, match="unknown attnfuse option"):
        attnfuse.attnfuse_backend(torch.fx.symbolic_trace(torch.nn.Identity()), [],
                                  options={"polcy": "exact"})
    with pytest.raises(ValueError, match="policy must be one of"):
        attnfuse.optimize(torch.nn.Identity(), policy="fastest")
    with pytest.raises(TypeError, match="nn.Module"):
        attnfuse.optimize(attn)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.register_buffer("tri", torch.tril(torch.ones(32, 32)))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) * 8 ** -0.5
        s = s.masked_fill(self.tri[:t, :t] == 0, float("-inf"))
        return (F.softmax(s, dim=-1) @ v).sum(1)


@pytest.mark.slow
def test_optimize_with_inductor_trains() -> None:
    """Inductor compiles the rest; AOTAutograd differentiates the fused op."""
    report = check_rewrite(Tiny(), (torch.randn(2, 13, 16),), fused=1, inner="inductor")
    assert report.sites[0].spec.mask.causal == "top_left"


@pytest.mark.slow
def test_quickstart_runs() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--device", "cpu"],
                         check=True, capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "2 fused" in out.stdout and "matches eager" in out.stdout, out.stdout
