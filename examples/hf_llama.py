"""transformers with ``attn_implementation="attnfuse"``: a Llama-style model (GQA, rotary
embeddings, causal masks with left padding) on attnfuse, checked against transformers' own SDPA.

``attnfuse.register_hf()`` registers attnfuse's attention function and transformers' SDPA mask
builder under the name "attnfuse" (without the mask function transformers would pass no mask and
padded batches would attend to padding). Every attention layer then calls
``attnfuse.attention``, which picks the kernel. By default the model is a small random one (no
download); ``--pretrained NAME`` loads real weights instead. CPU by default, the GPU when there is
one. Run: ``python examples/hf_llama.py``.
"""
from __future__ import annotations

import argparse
import copy

import torch

import attnfuse


def build(pretrained: str | None, device: torch.device, dtype: torch.dtype):
    """The same model twice: on transformers' SDPA and on attnfuse."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if pretrained:
        load = dict(dtype=dtype)
        ref = AutoModelForCausalLM.from_pretrained(pretrained, attn_implementation="sdpa", **load)
        fast = AutoModelForCausalLM.from_pretrained(pretrained, attn_implementation="attnfuse",
                                                    **load)
    else:
        big = device.type == "cuda"
        cfg = LlamaConfig(vocab_size=32000 if big else 1000, hidden_size=1024 if big else 64,
                          intermediate_size=2816 if big else 128, num_hidden_layers=4 if big else 2,
                          num_attention_heads=16 if big else 4, num_key_value_heads=4 if big else 2)
        torch.manual_seed(0)
        # One config copy per model: _from_config keeps the implementation in the config.
        ref = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa",
                                            dtype=dtype)
        fast = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="attnfuse",
                                             dtype=dtype)
        fast.load_state_dict(ref.state_dict())
    return ref.to(device).eval(), fast.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pretrained", default=None, help="a model name or path (downloads)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--kernel", default="auto",
                        help="attnfuse.attention's kernel: auto (chosen per call: on CPU often "
                             "PyTorch's own SDPA, so the difference can be exactly 0), reference, "
                             "flash (GPU), sdpa_math, ...")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    attnfuse.register_hf(kernel=args.kernel)     # attn_implementation="attnfuse" is now valid
    ref, fast = build(args.pretrained, device, dtype)
    vocab = ref.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 48), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, :16] = 0                              # the second prompt is left-padded

    calls = 0
    real = attnfuse.ops.attention

    def counting(*a, **kw):
        nonlocal calls
        calls += 1
        return real(*a, **kw)

    attnfuse.ops.attention = counting            # only to show that attnfuse ran
    try:
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).logits.float()
            got = fast(input_ids=ids, attention_mask=mask).logits.float()
            out_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   do_sample=False)
            out = fast.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                do_sample=False)
    finally:
        attnfuse.ops.attention = real
    real_tokens = mask.bool()
    err = (want - got)[real_tokens].abs().max().item()
    scale = want[real_tokens].abs().max().item()
    print(f"{ref.config.num_hidden_layers} layers, attnfuse.attention (kernel={args.kernel!r}) "
          f"called {calls} times (forward + generate)")
    print(f"max |attnfuse - sdpa| logits on real tokens = {err:.3g} (logits up to {scale:.3g})")
    same = (out == out_ref).float().mean().item()
    print(f"greedy generation: {same:.0%} of tokens identical to transformers' SDPA")
    tol = (5e-2 if dtype == torch.bfloat16 else 1e-4) * scale
    if calls == 0 or not err <= tol:
        raise SystemExit(f"attnfuse did not reproduce SDPA: {calls} calls, error {err:.3g}")
    print("attn_implementation='attnfuse' matches transformers' SDPA")


if __name__ == "__main__":
    main()
