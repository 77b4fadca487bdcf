"""The model zoo (attnfuse/zoo.py): every attention computation of real library models fuses.

Ground truth is counted independently of the matcher (softmax / SDPA / MHA calls in one eager run);
outputs and gradients follow FlashAttention's rule against an fp64 copy of the model, as in
tests/helpers.py. An entry whose library is not installed (or cannot build the configuration, e.g.
a model without SDPA support) is skipped.

Runtime on 2 CPU cores: the whole file ~3 min on an idle machine (8.5 min on a shared, loaded
one), of which eval ~55%. Training runs for a representative subset (``ZooEntry.fast_train``, one
entry per attention spelling); the other training cases are marked ``slow``.
"""
from __future__ import annotations

import pytest

from attnfuse import zoo


def _params(mode: str) -> list:
    out = []
    for e in zoo.ZOO:
        if mode not in e.modes:
            continue
        slow = mode == "train" and not e.fast_train
        out.append(pytest.param(e, id=e.name, marks=[pytest.mark.slow] if slow else []))
    return out


def _run(entry: zoo.ZooEntry, mode: str) -> zoo.ZooResult:
    r = zoo.run_entry(entry, mode, catch=False)
    if r.status == "skip":
        pytest.skip(r.error)
    return r


def _assert_all_fused(r: zoo.ZooResult) -> None:
    assert not r.degenerate, f"the output cannot show attention errors\n{r.summary()}"
    assert r.found == r.truth, f"found {r.found} of {r.truth} attention computations\n{r.summary()}"
    assert r.fused == r.found, f"{r.found - r.fused} site(s) not fused\n{r.summary()}"


@pytest.mark.parametrize("entry", _params("eval"))
def test_zoo_eval(entry: zoo.ZooEntry) -> None:
    r = _run(entry, "eval")
    _assert_all_fused(r)
    assert r.output.ok, f"{r.output}\n{r.summary()}"


@pytest.mark.parametrize("entry", _params("train"))
def test_zoo_train(entry: zoo.ZooEntry) -> None:
    r = _run(entry, "train")
    if entry.train_dropout:
        # Attention dropout is active: every site is found, none fused, each says why.
        assert not r.degenerate and r.found == r.truth, r.summary()
        assert r.fused == 0, r.summary()
        assert r.reasons and all("dropout" in reason for reason in r.reasons), r.summary()
    else:
        _assert_all_fused(r)
    assert r.output.ok, f"{r.output}\n{r.summary()}"
    assert r.grad.ok, f"{r.grad}\n{r.summary()}"


def test_zoo_registry() -> None:
    """Names are unique; the selection helper and the ground-truth counter behave."""
    import torch
    import torch.nn.functional as F

    names = [e.name for e in zoo.ZOO]
    assert len(names) == len(set(names))
    assert [e.name for e in zoo.select(["gpt2"])] == ["gpt2-eager", "gpt2-sdpa"]
    x = torch.randn(2, 3, 4)
    with zoo.AttentionCounter() as c:
        x.softmax(-1), torch.softmax(x, -1), F.softmax(x, -1), F.log_softmax(x, -1)
        F.scaled_dot_product_attention(x, x, x)
    assert c.calls == {"softmax": 3, "sdpa": 1}
