"""``with attnfuse.sdpa_override(): ...``: models that call ``F.scaled_dot_product_attention``
(timm, diffusers, transformers' "sdpa") run their attention on attnfuse, in eager mode, without
changing a line of the model and without patching ``torch.nn.functional``.

Each model runs twice, without and with the override; the script prints how many SDPA calls
attnfuse ran, any call it left to PyTorch (with the reason) and the largest output difference.
Models whose library is not installed are skipped. Small random models; CPU by default, the GPU
when there is one. Run: ``python examples/sdpa_override.py``.
"""
from __future__ import annotations

import argparse
import copy
from typing import Callable

import torch

import attnfuse


def timm_vit(device: torch.device, dtype: torch.dtype):
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True                 # timm's SDPA path
    x = torch.randn(2, 3, 224, 224)
    return model, lambda m: m(x.to(device, dtype))


def diffusers_dit(device: torch.device, dtype: torch.dtype):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                  num_layers=2, sample_size=16, patch_size=2,
                                  num_embeds_ada_norm=1000)
    x = torch.randn(2, 4, 16, 16)
    t, labels = torch.tensor([10, 500]), torch.tensor([1, 7])
    return model, lambda m: m(hidden_states=x.to(device, dtype), timestep=t.to(device),
                              class_labels=labels.to(device)).sample


def hf_bert(device: torch.device, dtype: torch.dtype):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, vocab_size=1000)
    model = BertModel._from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    ids = torch.randint(0, 1000, (2, 32))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0                            # right padding: a boolean key mask
    return model, lambda m: m(input_ids=ids.to(device),
                              attention_mask=mask.to(device)).last_hidden_state


MODELS: dict[str, Callable] = {"timm ViT": timm_vit, "diffusers DiT": diffusers_dit,
                               "transformers BERT (sdpa)": hf_bert}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernel", default="auto", help="attnfuse.attention's kernel")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    failed = []
    for name, build in MODELS.items():
        try:
            torch.manual_seed(0)
            model, run = build(device, dtype)
        except ImportError as e:
            print(f"{name}: skipped ({e.name or e} not installed)")
            continue
        model = model.to(device).eval()
        if dtype != torch.float32:
            model = model.to(dtype)
        with torch.no_grad():
            want = run(model).float()
            with attnfuse.sdpa_override(kernel=args.kernel) as mode:
                got = run(model).float()
        err = (got - want).abs().max().item()
        scale = want.abs().max().item()
        left = ", ".join(f"{n}x {why}" for why, n in mode.fallbacks.items()) or "none"
        print(f"{name}: attnfuse ran {mode.routed} SDPA calls (left to PyTorch: {left}); "
              f"max |override - sdpa| = {err:.3g} (outputs up to {scale:.3g})")
        tol = (5e-2 if dtype == torch.bfloat16 else 1e-4) * max(scale, 1.0)
        if mode.routed == 0 or not err <= tol:
            failed.append(name)
    if failed:
        raise SystemExit(f"the override did not reproduce SDPA for {failed}")


if __name__ == "__main__":
    main()
