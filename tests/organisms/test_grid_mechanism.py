"""scripts/grid_mechanism.py on the shipped grid organism: binding heads exist, roles appear after block 0 only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from analyses import organism_validation as ov

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mechanism():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import grid_mechanism
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return grid_mechanism


@pytest.fixture(scope="module")
def grid():
    return ov.load_organism("grid-qwen2.5-vl")


def test_some_head_binds_each_feature_to_its_word(mechanism, grid):
    rows = mechanism.binding_heads(*grid, n=8, seed=5)
    assert len(rows) == 3 * 4  # every (layer, head) of the 3-layer, 4-head language model
    for feature in ("colour", "shape"):
        best = max(rows, key=lambda r: r[f"{feature}_match"] - r[f"{feature}_other"])
        assert best[f"{feature}_match"] > 0.5 > best[f"{feature}_other"] + 0.3, (feature, best)


def test_the_named_objects_roles_are_read_after_the_first_block(mechanism, grid):
    probes = mechanism.relation_probes(*grid, n=40, seed=6)
    ab = probes["named cells: A or B"]
    # the LM input cannot know which object the question names first (the vision tower never sees the question)
    assert ab["blocks.0.hook_resid_pre"] < 0.75
    assert ab["blocks.1.hook_resid_pre"] > 0.85
    assert set(probes["answer position"]) >= {"relation word", "A row", "B column", "answer"}
    assert all(0.0 <= v <= 1.0 for per_layer in probes["answer position"].values() for v in per_layer.values())
