"""Smoke test of scripts/bench_patching.py: our sweep equals TransformerLens's on its bridge."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_agrees_with_transformerlens_bridge():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_patching
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    res = bench_patching.bench_one("tiny", "image", repeats=1, batch_size=16)
    assert res["cells"] == res["n_layers"] * res["seq_len"] > 0
    diffs = {r["method"]: r["max_abs_diff_vs_tl"] for r in res["rows"]}
    assert len(diffs) == 6 and max(diffs.values()) < 1e-5
    assert "| tiny | image |" in bench_patching.to_markdown([res])
