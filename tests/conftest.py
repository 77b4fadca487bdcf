"""Test set-up: matcher bugs raise instead of being reported; Triton runs interpreted on CPU."""
import os

import torch

os.environ["ATTNFUSE_STRICT"] = "1"
if not torch.cuda.is_available():
    # Must precede the first import of triton-jitted code: triton reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: shared forward code must not hit Dynamo's recompile limit."""
    torch._dynamo.reset()
    yield
