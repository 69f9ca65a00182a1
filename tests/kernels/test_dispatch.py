"""Backend dispatch, import hygiene, and the name clash with Hugging Face's ``kernels`` distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import ENV_VAR, resolve_backend

ROOT = Path(__file__).resolve().parents[2]


def test_env_var_and_argument_override(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv(ENV_VAR, "naive")
    assert resolve_backend(x) == "naive"
    assert resolve_backend(x, "torch") == "torch"  # the argument wins over the environment
    monkeypatch.setenv(ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend(x)
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend(x) == "torch"  # CPU without the interpreter: chunked torch
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(x) == "triton"


ISOLATION_SCRIPT = f"""
import importlib.util, json, sys
import kernels
report = {{"triton": "triton" in sys.modules,
           "cuda_initialised": "torch.cuda" in sys.modules and __import__("torch").cuda.is_initialized(),
           "kernels_is_ours": importlib.util.find_spec("kernels").origin.startswith({str(ROOT)!r})}}
from transformers.utils import is_kernels_available
report["hf_kernels_available"] = is_kernels_available()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def isolation() -> dict:
    """One fresh interpreter (no TRITON_INTERPRET, no backend override) that imports ``kernels``, then
    transformers' check for the Hugging Face ``kernels`` distribution; shared by the isolation tests."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", ISOLATION_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    return json.loads(out.splitlines()[-1])


def test_import_touches_neither_triton_nor_a_driver(isolation):
    assert isolation["triton"] is False and isolation["cuda_initialised"] is False


def test_transformers_does_not_mistake_ours_for_hf_kernels(isolation):
    assert isolation["kernels_is_ours"] is True and isolation["hf_kernels_available"] is False
