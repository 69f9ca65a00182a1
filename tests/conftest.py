"""Shared fixtures: one torch thread, the Triton interpreter (set before anything imports triton),
and tiny Qwen models paired with their transformers reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def qwen_pair():
    """name -> (hf_model, hooked_model) with identical weights; built once per session."""
    from hooked_vlm.loading import from_hf
    from hooked_vlm.tiny import tiny_hf_model

    cache = {}

    def get(name: str):
        if name not in cache:
            hf = tiny_hf_model(name, seed=0)
            cache[name] = (hf, from_hf(hf))
        return cache[name]

    return get
