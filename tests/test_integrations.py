"""The integrations: transformers' attn_implementation="attnfuse", sdpa_override() and
inductor_pass(). Each test checks the output against the model without the integration AND that
attnfuse actually ran (calls counted, sites reported, ops in the graph)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import attnfuse
from attnfuse import ops
from attnfuse.integrations import hf, inductor
from attnfuse.integrations.inductor import ChainedPass, InductorPass

ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
CLOSE = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(autouse=True)
def _private_caches(monkeypatch, tmp_path):
    """Fresh attnfuse and Inductor caches: a cache hit would skip the pass under test."""
    monkeypatch.setenv("ATTNFUSE_CACHE_DIR", str(tmp_path / "attnfuse"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


@pytest.fixture
def calls(monkeypatch):
    """Every attnfuse.attention call the integrations make, with its arguments by name."""
    seen: list[dict] = []
    real = ops.attention

    def counting(*args, **kwargs):
        seen.append({**dict(zip(ARGS, args)), **kwargs})
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "attention", counting)
    return seen


def _qkv(b=2, h=2, nq=6, nk=6, d=8, hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(b, hkv or h, nk, d, generator=g)
    v = torch.randn(b, hkv or h, nk, d, generator=g)
    return q, k, v


# -- transformers ---------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
VOCAB = 100


def _hf(name: str):
    T = transformers
    return {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=VOCAB)),
        "mistral": (T.MistralForCausalLM, T.MistralConfig(
            num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=VOCAB, sliding_window=4)),
        "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=64, vocab_size=VOCAB, sliding_window=4,
            attn_logit_softcapping=2.0)),
        "t5": (T.T5Model, T.T5Config(num_layers=1, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                     vocab_size=VOCAB)),
    }[name]


def _pair(name: str, ref_impl: str = "sdpa", impl: str = "attnfuse", **cfg_changes):
    """The same tiny model twice (same weights): with ``ref_impl`` and with ``impl``. Each gets
    its own config copy (``_from_config`` keeps the implementation in the config it is given)."""
    cls, cfg = _hf(name)
    for key, value in cfg_changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation=ref_impl).eval()
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == impl
    return ref, ours


def _batch(n=9, pad=3):
    ids = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :pad] = 0                  # left padding, as generation uses
    return ids, mask


def test_register_hf_registers_attention_and_mask_functions():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert attnfuse.register_hf() == "attnfuse"
    assert "attnfuse" in AttentionInterface._global_mapping
    assert "attnfuse" in AttentionMaskInterface._global_mapping   # else padding masks are dropped
    assert attnfuse.register_hf(kernel="reference") == "attnfuse"  # re-registering is fine
    attnfuse.register_hf()
    with pytest.raises(ValueError, match="already registered by transformers"):
        attnfuse.register_hf("sdpa")
    with pytest.raises(ValueError, match="other than 'eager'"):
        attnfuse.register_hf("eager")
    with pytest.raises(ValueError, match="kernel must be one of"):
        attnfuse.register_hf(kernel="fastest")


def test_hf_llama_padded_batch_matches_sdpa_and_runs_attnfuse(calls):
    attnfuse.register_hf()
    ref, ours = _pair("llama")
    ids, mask = _batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **CLOSE)
    assert len(calls) == 2                                   # one per layer
    for c in calls:
        assert c["attn_mask"] is not None and c["attn_mask"].dtype == torch.bool
        assert tuple(c["attn_mask"].shape) == (2, 1, 9, 9)
        assert c["enable_gqa"] and c["is_causal"] == "none"  # the mask carries causality
    # No padding: transformers skips the mask and attnfuse applies causality itself.
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids[:1]).logits, ref(input_ids=ids[:1]).logits,
                                   **CLOSE)
    assert [c["is_causal"] for c in calls] == ["top_left", "top_left"]
    assert all(c["attn_mask"] is None for c in calls)


def test_hf_generate_matches_sdpa(calls):
    attnfuse.register_hf()
    ref, ours = _pair("llama")
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        want, got = ref.generate(ids, **kw), ours.generate(ids, **kw)
    assert torch.equal(got, want)
    assert len(calls) == 2 * 5                               # prefill + 4 decode steps, 2 layers
    assert calls[-1]["query"].shape[2] == 1 and calls[-1]["attn_mask"].shape[-1] == 9 + 4


def test_hf_without_the_mask_function_padding_leaks():
    """Why both registrations matter: with the attention function alone, transformers passes
    attention_mask=None and the padded batch attends to padding (the comparison above fails)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    attnfuse.register_hf("attnfuse_nomask")
    del AttentionMaskInterface._global_mapping["attnfuse_nomask"]
    try:
        ref, ours = _pair("llama", impl="attnfuse_nomask")
        ids, mask = _batch()
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).logits
            got = ours(input_ids=ids, attention_mask=mask).logits
        assert (got[1, 3:] - want[1, 3:]).abs().max() > 1e-3
    finally:
        AttentionInterface._global_mapping.pop("attnfuse_nomask", None)


def test_hf_training_gradients_and_dropout(calls):
    attnfuse.register_hf()
    ref, ours = _pair("llama")
    ref.train(), ours.train()
    ids, mask = _batch()
    for m in (ref, ours):
        m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for (name, p), (_, r) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert len(calls) == 2 and all(c["dropout_p"] == 0.0 for c in calls)
    # transformers passes the module's attention dropout in training; attnfuse applies it.
    _, drop = _pair("llama", attention_dropout=1.0)
    drop.train()
    calls.clear()
    out = drop.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert [c["dropout_p"] for c in calls] == [1.0, 1.0]
    drop.eval()
    calls.clear()
    with torch.no_grad():
        assert not torch.allclose(drop.model(input_ids=ids, attention_mask=mask).last_hidden_state,
                                  out)
    assert [c["dropout_p"] for c in calls] == [0.0, 0.0]


def test_hf_mistral_sliding_window_matches_sdpa(calls):
    attnfuse.register_hf()
    ref, ours = _pair("mistral")
    ids, mask = _batch(n=11)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **CLOSE)
    assert len(calls) == 1 and calls[0]["attn_mask"] is not None   # the window is in the mask


def test_hf_gemma2_softcap_and_windows_match_eager(calls):
    """Gemma 2 soft-caps the scores (transformers' SDPA refuses it): compared with eager."""
    attnfuse.register_hf()
    ref, ours = _pair("gemma2", ref_impl="eager")
    ids, mask = _batch(n=11)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **CLOSE)
    assert [c["softcap"] for c in calls] == [2.0, 2.0]


def test_hf_t5_position_bias_matches_sdpa(calls):
    attnfuse.register_hf()
    ref, ours = _pair("t5")
    ids, mask = _batch()
    dec = ids[:, :5]
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state
    torch.testing.assert_close(got, want, **CLOSE)
    assert len(calls) == 3                   # encoder self, decoder self, decoder cross
    assert all(c["attn_mask"] is not None and c["attn_mask"].is_floating_point() for c in calls)
    assert all(c["scale"] == 1.0 for c in calls)            # T5 does not scale its scores


class _Module(torch.nn.Module):
    def __init__(self, is_causal: bool = True) -> None:
        super().__init__()
        self.is_causal = is_causal


def _keep(nq: int, nk: int, window: int) -> torch.Tensor:
    """transformers' sliding-window causal mask with the last query at the last key."""
    i = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)[None, :]
    return (j <= i) & (j > i - window)


@pytest.mark.parametrize("nq,nk", [(10, 10), (1, 10), (3, 3)])
def test_hf_sliding_window_without_mask_is_applied_exactly(nq, nk, calls):
    q, k, v = _qkv(nq=nq, nk=nk, hkv=1)
    out, weights = hf.attention_forward(_Module(), q, k, v, None, sliding_window=4)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_keep(nq, nk, 4), enable_gqa=True)
    assert weights is None and out.shape == (2, nq, 2, 8)    # transformers' [B, N, H, D]
    torch.testing.assert_close(out, want.transpose(1, 2), **CLOSE)
    assert len(calls) == 1


def test_hf_sliding_window_refused_where_alignment_is_unknown():
    q, k, v = _qkv(nq=3, nk=10)
    with pytest.raises(ValueError, match="where the queries sit"):
        hf.attention_forward(_Module(), q, k, v, None, sliding_window=4)
    with pytest.raises(ValueError, match="non-causal module"):
        hf.attention_forward(_Module(is_causal=False), q, k, v, None, sliding_window=4)


def test_hf_refuses_what_it_cannot_honour():
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    m = _Module()
    with pytest.raises(ValueError, match="output_attentions"):
        hf.attention_forward(m, q, k, v, mask, output_attentions=True)
    with pytest.raises(ValueError, match="attention sinks"):
        hf.attention_forward(m, q, k, v, mask, s_aux=torch.zeros(2))
    with pytest.raises(TypeError, match="unexpected keyword argument alibi_slopes"):
        hf.attention_forward(m, q, k, v, mask, alibi_slopes=torch.ones(2))
    # Unset options, known harmless arguments and declared ones pass.
    out, _ = hf.attention_forward(m, q, k, v, mask, output_attentions=False, s_aux=None,
                                  position_ids=torch.arange(6), use_cache=True,
                                  max_length_q=6, my_flag=3,
                                  ignore=frozenset({"my_flag"}))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, want, **CLOSE)


def test_hf_packed_sequences_are_kept_apart(calls):
    """FlashAttention-style packing (cu_seq_lens): one row of several sequences, none attending
    to another, with or without a mask that already says so."""
    q, k, v = _qkv(b=1, nq=7, nk=7)
    cu = torch.tensor([0, 3, 7])
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    keep = (seq[:, None] == seq[None, :]) & torch.ones(7, 7, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2)
    for mask in (None, keep[None, None]):
        out, _ = hf.attention_forward(_Module(), q, k, v, mask, cu_seq_lens_q=cu,
                                      cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
        torch.testing.assert_close(out, want, **CLOSE)
    with pytest.raises(ValueError, match="packed sequences"):
        hf.attention_forward(_Module(), *_qkv(b=2), None, cu_seq_lens_q=cu)
    # A whole model: the packed row gives what the two sequences give when run one by one.
    attnfuse.register_hf()
    ref, ours = _pair("llama")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    cu = torch.tensor([0, 4, 10])
    calls.clear()
    with torch.no_grad():
        packed = ours(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=6, max_length_k=6).logits
        alone = torch.cat([ref(input_ids=ids[:, :4]).logits, ref(input_ids=ids[:, 4:]).logits], 1)
    torch.testing.assert_close(packed, alone, **CLOSE)
    assert len(calls) == 2


# -- sdpa_override --------------------------------------------------------------------------------

def test_sdpa_override_does_not_patch_torch():
    sdpa = F.scaled_dot_product_attention
    with attnfuse.sdpa_override():
        assert F.scaled_dot_product_attention is sdpa
        assert torch.nn.functional.scaled_dot_product_attention is sdpa
    with pytest.raises(ValueError, match="kernel must be one of"):
        attnfuse.sdpa_override(kernel="fastest")


def test_sdpa_override_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=10).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True           # timm's SDPA path (the default on recent torch)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        with attnfuse.sdpa_override(kernel="reference") as mode:
            got = model(x)
    torch.testing.assert_close(got, want, **CLOSE)
    assert mode.routed == 2 and not mode.fallbacks


def test_sdpa_override_diffusers_dit():
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  num_layers=2, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=1000).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                  timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 7]))
    with torch.no_grad():
        want = model(**inputs).sample
        with attnfuse.sdpa_override(kernel="reference") as mode:
            got = model(**inputs).sample
    torch.testing.assert_close(got, want, **CLOSE)
    assert mode.routed == 2 and not mode.fallbacks


def test_sdpa_override_hf_sdpa_model_trains(calls):
    ref, ours = _pair("llama", impl="sdpa")
    ids, mask = _batch()
    ref.train(), ours.train()
    ref(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    with attnfuse.sdpa_override(kernel="reference") as mode:
        ours(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert mode.routed == 2 == len(calls)
    for (name, p), (_, r) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sdpa_override_falls_through_on_what_attnfuse_cannot_take(calls):
    q, k, v = _qkv()
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    with attnfuse.sdpa_override() as mode:
        three_d = F.scaled_dot_product_attention(q[0], k[0], v[0])           # [H, N, D]
        with pytest.raises(RuntimeError):                                    # SDPA's own error
            F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=True)
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v, attn_mask=keep.double().log())
    assert not calls and mode.routed == 0
    assert sorted(mode.fallbacks) == sorted([
        "3-D/3-D/3-D operands (attnfuse takes [B, H, N, D])",
        "attn_mask together with is_causal=True (SDPA refuses it)",
        "float attn_mask of dtype torch.float64 with torch.float32 query (SDPA refuses it)"])
    torch.testing.assert_close(three_d, F.scaled_dot_product_attention(q[0], k[0], v[0]))
    with attnfuse.sdpa_override(strict=True):
        with pytest.raises(ValueError, match="strict=True.*3-D"):
            F.scaled_dot_product_attention(q[0], k[0], v[0])


def test_sdpa_override_routes_every_supported_argument(calls):
    q, k, v = _qkv(hkv=1)
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[..., 0] = True
    with attnfuse.sdpa_override(kernel="reference") as mode:
        got = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.2, enable_gqa=True)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5,
                                                enable_gqa=True)
    assert mode.routed == 2 and len(calls) == 2
    assert calls[0]["scale"] == 0.2 and calls[0]["attn_mask"] is mask and calls[0]["enable_gqa"]
    torch.testing.assert_close(
        got, F.scaled_dot_product_attention(q, k, v, mask, scale=0.2, enable_gqa=True), **CLOSE)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.5, enable_gqa=True), **CLOSE)


def test_sdpa_override_nesting_and_reentrancy(calls):
    """The innermost override handles a call; SDPA calls made by attnfuse itself (its sdpa_*
    kernels, here forced) reach no override, not even an outer one; an explicit sdpa_kernel()
    choice inside the region is left to SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = _qkv()
    with attnfuse.sdpa_override() as outer:
        with attnfuse.sdpa_override(kernel="sdpa_math") as inner:
            got = F.scaled_dot_product_attention(q, k, v)
        direct = attnfuse.attention(q, k, v, kernel="sdpa_math")   # calls SDPA inside
        with sdpa_kernel([SDPBackend.MATH]):
            pinned = F.scaled_dot_product_attention(q, k, v)
    assert inner.routed == 1 and not inner.fallbacks
    assert outer.routed == 0 and list(outer.fallbacks) == [
        "SDPA backends pinned with sdpa_kernel() inside the region"] and outer.fallbacks[
        "SDPA backends pinned with sdpa_kernel() inside the region"] == 2
    want = F.scaled_dot_product_attention(q, k, v)
    for out in (got, direct, pinned):
        torch.testing.assert_close(out, want, **CLOSE)
    assert len(calls) == 1                  # the inner override routed one call


def test_sdpa_override_under_torch_compile(calls):
    """Compiling inside the region traces the override: the graph calls attnfuse's op. Dynamo
    guards on the mode, so the same function outside the region recompiles, without it."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sin()

    q, k, v = _qkv()
    compiled = torch.compile(f, backend=capture, fullgraph=True)
    with attnfuse.sdpa_override():
        got = compiled(q, k, v)
    outside = compiled(q, k, v)
    assert len(graphs) == 2
    inside_ops = {n.target for n in graphs[0].graph.nodes if n.op == "call_function"}
    outside_ops = {n.target for n in graphs[1].graph.nodes if n.op == "call_function"}
    assert inside_ops & {torch.ops.attnfuse.attention, torch.ops.attnfuse.attention.default}, \
        inside_ops
    assert F.scaled_dot_product_attention not in inside_ops
    assert F.scaled_dot_product_attention in outside_ops
    want = f(q, k, v)
    torch.testing.assert_close(got, want, **CLOSE)
    torch.testing.assert_close(outside, want, **CLOSE)
    assert len(calls) == 1                  # traced once inside the region


# -- inductor_pass --------------------------------------------------------------------------------

class _TwoSites(torch.nn.Module):
    """An eager softmax attention with a causal buffer, and an SDPA call."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.register_buffer("causal", torch.ones(6, 6, dtype=torch.bool).tril())

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], 6, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) / 8 ** 0.5
        s = s.masked_fill(~self.causal, float("-inf"))
        a = torch.softmax(s, dim=-1) @ v
        return a + F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _attnfuse_ops(report) -> int:
    return sum(1 for g in report.after for n in g.graph.nodes
               if n.target is torch.ops.attnfuse.attention.default)


def test_inductor_pass_context_manager_rewrites_and_trains():
    torch.manual_seed(0)
    model = _TwoSites()
    x = torch.randn(2, 6, 16, requires_grad=True)
    with attnfuse.inductor_pass(kernel="reference") as p:
        got = torch.compile(model)(x)
    assert len(p.report.fused) == 2 and _attnfuse_ops(p.report) == 2, str(p.report)
    assert {s.spec.mask.causal for s in p.report.fused} == {"top_left"}  # buffer read as causal
    (gx,) = torch.autograd.grad(got.sum(), x)
    want = model(x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(got, want, **CLOSE)
    torch.testing.assert_close(gx, wx, **CLOSE)
    assert not p.installed()
    from torch._inductor import config
    assert config.pre_grad_custom_pass is None


def test_inductor_pass_uuid_covers_version_sources_options_and_pins(monkeypatch, tmp_path):
    a, b = attnfuse.inductor_pass(), attnfuse.inductor_pass()
    assert isinstance(a.uuid(), str) and a.uuid() == b.uuid()
    assert attnfuse.inductor_pass(kernel="reference").uuid() != a.uuid()
    assert attnfuse.inductor_pass(keep_sdpa=True).uuid() != a.uuid()
    base = a.uuid()
    monkeypatch.setattr(attnfuse, "__version__", "9.9.9")
    assert a.uuid() != base
    monkeypatch.undo()
    monkeypatch.setenv("ATTNFUSE_AUTOTUNE", "0")
    assert a.uuid() != base
    monkeypatch.delenv("ATTNFUSE_AUTOTUNE")
    assert a.uuid() == base
    monkeypatch.setattr(inductor, "source_digest", lambda: "edited")
    assert a.uuid() != base
    monkeypatch.undo()
    # Pinned choices are part of it (a graph compiled before pinning would ignore the pins).
    import json
    from attnfuse.tune import cache
    pins = tmp_path / "pins.json"
    pins.write_text(json.dumps({"format": 1, "pinned": {"choice": {"x": {
        "key": {"shape": [1]}, "value": {"kernel": "reference"}}}}}))
    cache.pin(pins)
    try:
        assert a.uuid() != base
    finally:
        cache.unpin()
    assert a.uuid() == base
    # The digest follows the files' content.
    (tmp_path / "k.py").write_text("x = 1\n")
    first = inductor.source_digest(tmp_path)
    (tmp_path / "k.py").write_text("x = 22\n")
    assert inductor.source_digest(tmp_path) != first
    with pytest.raises(ValueError, match="policy='exact' only"):
        attnfuse.inductor_pass(policy="fast")


def test_inductor_pass_fx_graph_cache_hits_and_misses_on_options():
    from torch._dynamo.utils import counters
    from torch._inductor import config
    q, k, v = _qkv()

    def f(q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1)) * 0.3, dim=-1) @ v

    def compile_once(**options):
        torch._dynamo.reset()
        counters.clear()
        p = attnfuse.inductor_pass(**options)
        with config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
            out = torch.compile(f, options={"pre_grad_custom_pass": p})(q, k, v)
        return out, dict(counters["inductor"]), p

    out, first, p1 = compile_once(kernel="reference")
    _, same, p2 = compile_once(kernel="reference")
    _, other, p3 = compile_once(kernel="sdpa_math")
    assert first.get("fxgraph_cache_miss") == 1 and not first.get("fxgraph_cache_bypass")
    assert same.get("fxgraph_cache_hit") == 1 and not same.get("fxgraph_cache_miss")
    assert other.get("fxgraph_cache_miss") == 1 and not other.get("fxgraph_cache_hit")
    assert len(p1.report.fused) == 1 and len(p3.report.fused) == 1
    assert p3.report.fused[0].kernel == "sdpa_math"
    torch.testing.assert_close(out, f(q, k, v), **CLOSE)


class _Counting(torch._inductor.custom_graph_pass.CustomGraphPass):
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph) -> None:
        self.graphs += 1

    def uuid(self) -> str:
        return "user-pass"


def test_inductor_pass_chains_with_a_users_pass():
    from torch._inductor import config
    user = _Counting()
    with config.patch(pre_grad_custom_pass=user):
        p = attnfuse.inductor_pass(kernel="reference").install()
        try:
            chain = config.pre_grad_custom_pass
            assert isinstance(chain, ChainedPass) and chain.passes == (user, p)
            assert chain.uuid() == ("attnfuse.ChainedPass", ("user-pass", p.uuid()))
            with attnfuse.inductor_pass(kernel="sdpa_math") as inner:   # replaces p, keeps user
                assert config.pre_grad_custom_pass.passes == (user, inner)
                q, k, v = _qkv()
                out = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))(
                    q, k, v)
            assert config.pre_grad_custom_pass is chain
        finally:
            p.uninstall()
        assert config.pre_grad_custom_pass is user
    assert user.graphs == 1 and len(inner.report.fused) == 1 and not p.report.sites
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **CLOSE)
    assert ChainedPass(user, lambda g: None).uuid() is None     # a plain function: no caching


def test_inductor_pass_install_is_counted_and_refuses_aten_graphs():
    from torch._inductor import config
    p = attnfuse.inductor_pass()
    p.install()
    p.install()
    assert config.pre_grad_custom_pass is p
    p.uninstall()
    assert p.installed()
    p.uninstall()
    assert config.pre_grad_custom_pass is None and not p.installed()
    q, k, v = _qkv()
    aten = torch.fx.experimental.proxy_tensor.make_fx(
        lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), -1) @ v)(q, k, v)
    with pytest.raises(ValueError, match="pre_grad_custom_pass"):
        p(aten.graph)
    assert isinstance(p, InductorPass)
