"""Backend dispatch, import hygiene, and the name clash with Hugging Face's ``kernels`` distribution."""

from __future__ import annotations

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


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_import_touches_neither_triton_nor_a_driver():
    out = _run("import sys, kernels; print('triton' in sys.modules, 'torch.cuda' in sys.modules and "
               "__import__('torch').cuda.is_initialized())")
    assert out == "False False"


def test_transformers_does_not_mistake_ours_for_hf_kernels():
    out = _run(
        "import importlib.util, kernels; from transformers.utils import is_kernels_available; "
        "print(importlib.util.find_spec('kernels').origin.startswith(%r), is_kernels_available())" % str(ROOT)
    )
    assert out == "True False"
