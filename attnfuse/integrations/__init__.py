"""One-liners for code attnfuse does not compile itself.

* ``attnfuse.register_hf()``: ``attn_implementation="attnfuse"`` in transformers (:mod:`.hf`);
* ``with attnfuse.sdpa_override(): ...``: eager ``F.scaled_dot_product_attention`` calls (timm,
  diffusers, transformers' ``"sdpa"``) on :func:`attnfuse.attention` (:mod:`.override`);
* ``attnfuse.inductor_pass()``: the rewrite as an Inductor pre-grad pass, for
  ``torch.compile(model)`` with the default backend (:mod:`.inductor`).
"""
from .hf import register_hf
from .inductor import ChainedPass, InductorPass, inductor_pass
from .override import SDPAOverride, sdpa_override

__all__ = ["register_hf", "sdpa_override", "SDPAOverride", "inductor_pass", "InductorPass",
           "ChainedPass"]
