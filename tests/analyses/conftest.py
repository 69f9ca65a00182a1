"""Shared fixtures for the analyses tests: one thread, the repo root importable, tiny models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(scope="module")
def tiny():
    from tiny_lm import TinyConfig, TinyHookedLM

    return TinyHookedLM(TinyConfig()).eval()


@pytest.fixture(scope="module")
def tiny_pair(tiny):
    """Clean and corrupted inputs with the same layout: other tokens at 2 positions and other pixels."""
    from tiny_lm import make_inputs

    clean = make_inputs(tiny.cfg, seed=0)
    corrupt = {k: v.clone() for k, v in clean.items()}
    corrupt["input_ids"][0, 7] = 9 if int(clean["input_ids"][0, 7]) != 9 else 10
    corrupt["input_ids"][0, 1] = 11 if int(clean["input_ids"][0, 1]) != 11 else 12
    corrupt["pixel_values"] = torch.randn(clean["pixel_values"].shape, generator=torch.Generator().manual_seed(5))
    return clean, corrupt
