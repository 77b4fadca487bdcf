"""attnfuse: find attention in any PyTorch model and run it on the fastest exact kernel.

Doors::

    fast = attnfuse.optimize(model, example_inputs)          # a module with its attention fused
    compiled = torch.compile(model, backend="attnfuse")      # the same, as a torch.compile backend
    print(attnfuse.explain(model, example_inputs))           # every site, the kernel chosen, why
    attnfuse.cache.clear()                                   # forget tuned choices ($ATTNFUSE_CACHE_DIR)
    out = attnfuse.attention(q, k, v, attn_mask, dropout_p, is_causal)  # drop-in for SDPA
    out = attnfuse.attention(q, k, v, is_causal=True, window=(4095, 0))  # + sliding windows
    attnfuse.register_hf()                                   # attn_implementation="attnfuse"
    with attnfuse.sdpa_override(): out = model(x)            # eager F.scaled_dot_product_attention
    with attnfuse.inductor_pass(): torch.compile(model)(x)   # backend="inductor" kept
"""
from __future__ import annotations

from .backend import Options, attnfuse_backend, explain, last_report, optimize
from .integrations import inductor_pass, register_hf, sdpa_override
from .ops import attention
from .report import Candidate, Report, Site
from .tune import cache
from .spec import AttentionSpec, MaskSpec, Reject

__version__ = "0.1.0"

__all__ = ["attention", "optimize", "explain", "last_report", "attnfuse_backend", "Options",
           "Report", "Site", "Candidate", "AttentionSpec", "MaskSpec", "Reject", "cache",
           "__version__"]
__all__ += ["register_hf", "sdpa_override", "inductor_pass"]


def _maybe_register() -> None:
    """Make ``backend="attnfuse"`` work from a source checkout too, without a duplicate name.

    When the package is installed, torch discovers the ``torch_dynamo_backends`` entry point
    and registers the backend itself; registering here as well would fail with "duplicate name".
    """
    try:
        from torch._dynamo.backends import registry as r

        if "attnfuse" in r._COMPILER_FNS:
            return
        from importlib.metadata import entry_points

        if any(ep.name == "attnfuse" for ep in entry_points(group="torch_dynamo_backends")):
            return
        r.register_backend(attnfuse_backend, name="attnfuse")
    except (ImportError, AttributeError):  # private registry moved: fall back to the public call
        import torch._dynamo

        try:
            torch._dynamo.register_backend(attnfuse_backend, name="attnfuse")
        except AssertionError:  # already registered by the entry point
            pass


_maybe_register()
