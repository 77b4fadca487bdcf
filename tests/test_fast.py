"""policy="fast": quantized kernels are admitted per site by an accuracy gate measured on the
site's own activations, never for sites that need gradients, never under policy="exact"."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import attnfuse
from attnfuse.kernels import registry
from attnfuse.tune import select

pytest.importorskip("attnfuse.kernels.sage")
QUANTIZED = ("sage_fp8", "sage_fp16")


@pytest.fixture(autouse=True)
def _quantized_on_cpu(monkeypatch, tmp_path):
    """Let the selector consider the quantized kernels on CPU (they run interpreted here)."""
    monkeypatch.setenv("ATTNFUSE_CACHE_DIR", str(tmp_path))
    for name in QUANTIZED:
        k = registry.KERNELS[name]
        monkeypatch.setitem(registry.KERNELS, name, dataclasses.replace(k, auto=("cuda", "cpu")))
    select.forget()
    yield
    select.forget()


class Attn(torch.nn.Module):
    """Projections feed the attention, so the gate must see activations, not the inputs."""

    def __init__(self, d: int = 64, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv = heads, torch.nn.Linear(d * heads, 3 * d * heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return (torch.softmax(s.float(), -1).to(q.dtype) @ v).transpose(1, 2).reshape(b, n, -1)


def _model_and_input(seed: int = 0):
    torch.manual_seed(seed)
    model = Attn().to(torch.bfloat16).eval()
    x = torch.randn(1, 48, 128, dtype=torch.bfloat16)
    return model, x


def _site(**kw) -> attnfuse.Site:
    model, x = _model_and_input()
    report = attnfuse.explain(model, (x,), policy="fast", tune=False, **kw)
    assert len(report.sites) == 1, str(report)
    return report.sites[0]


def test_gate_admits_on_measured_accuracy():
    site = _site()
    cands = {c.kernel: c for c in site.candidates}
    for name in QUANTIZED:
        c = cands[name]
        assert c.accuracy, f"{name} was not measured: {c.reasons}"
        assert 0.99 < c.accuracy["cosine"] <= 1.0 and c.accuracy["rel_l1"] >= 0
    fp16 = cands["sage_fp16"]
    assert fp16.eligible, fp16.reasons                    # FP16 P·V keeps cos >= 0.999
    assert fp16.accuracy["cosine"] >= 0.999 and fp16.accuracy["rel_l1"] <= 0.03
    assert "cos " in str(attnfuse.explain(*_model_and_input(), policy="fast", tune=False))


def test_gate_thresholds_are_the_users():
    site = _site(min_cosine=1.0 - 1e-12, max_rel_l1=1e-6)
    for name in QUANTIZED:
        c = next(c for c in site.candidates if c.kernel == name)
        assert not c.eligible and "accuracy gate" in c.reasons[0] and "failed" in c.reasons[0]
        assert c.accuracy["cosine"] < 1.0                 # the measured numbers are kept
    assert site.kernel not in QUANTIZED and site.fused


def test_gate_measures_the_activations_it_is_given():
    """The same shapes, other data: the gate's numbers come from the site's own values."""
    a = _site()
    model, x = _model_and_input(seed=1)
    b = attnfuse.explain(model, (x * 3,), policy="fast", tune=False).sites[0]
    ca = next(c for c in a.candidates if c.kernel == "sage_fp16").accuracy
    cb = next(c for c in b.candidates if c.kernel == "sage_fp16").accuracy
    assert ca["rel_l1"] != cb["rel_l1"]


def test_exact_policy_and_training_never_quantize():
    model, x = _model_and_input()
    exact = attnfuse.explain(model, (x,), tune=False).sites[0]
    for name in QUANTIZED:
        c = next(c for c in exact.candidates if c.kernel == name)
        assert c.reasons == ["not exact (policy='exact')"]
    fast = attnfuse.optimize(model, policy="fast", inner="eager", tune=False)
    out = fast(x.requires_grad_(True))
    site = fast.attnfuse_report.sites[-1]
    assert site.kernel not in QUANTIZED
    for name in QUANTIZED:
        c = next(c for c in site.candidates if c.kernel == name)
        assert "inference only" in c.reasons[0]
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_quantized_kernels_have_no_backward():
    q = torch.randn(1, 2, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="inference only"):
        registry.get("sage_fp16").backward(q, q, q, q, None, q, None, 0.1, "none", -1e9, False, 0.0)


def test_gate_does_not_measure_a_kernel_that_cannot_run_the_site(monkeypatch):
    """Head dim 72 (DiT-XL): the quantized kernels take 64/128 only. The gate must not try them
    on the activations (nothing to measure); the candidates say why they cannot run."""
    from attnfuse import backend
    measured = []
    real = backend._measure

    def spy(values, problem, name):
        measured.append(name)
        return real(values, problem, name)
    monkeypatch.setattr(backend, "_measure", spy)
    torch.manual_seed(0)
    model = Attn(d=72).to(torch.bfloat16).eval()
    x = torch.randn(1, 40, 144, dtype=torch.bfloat16)
    site = attnfuse.explain(model, (x,), policy="fast", tune=False).sites[0]
    assert site.fused and site.kernel not in QUANTIZED
    assert not measured
    for name in QUANTIZED:
        c = next(c for c in site.candidates if c.kernel == name)
        assert not c.eligible and any("head dim" in r for r in c.reasons), c.reasons
        assert not any("could not be measured" in r for r in c.reasons), c.reasons
