"""Shared fixtures: one torch thread, the Triton interpreter, and tiny Qwen models paired with their
transformers reference.

``TRITON_INTERPRET=1`` is forced (not defaulted) before anything imports triton: the suite runs the Triton
kernels on CPU tensors under the interpreter whatever the calling environment says (``TRITON_INTERPRET`` unset,
``=1`` or ``=0``). Tests that need another value set it for themselves (monkeypatch, or a subprocess
environment).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

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


@pytest.fixture(scope="session")
def sensitive_qwen_pair():
    """family -> (hf_model, hooked_model) on configs where every M-RoPE axis turns visibly (tests/helpers/sensitive.py)."""
    from helpers.sensitive import sensitive_qwen_hf

    from hooked_vlm.loading import from_hf

    cache = {}

    def get(family: str):
        if family not in cache:
            hf = sensitive_qwen_hf(family, seed=0)
            cache[family] = (hf, from_hf(hf))
        return cache[family]

    return get
