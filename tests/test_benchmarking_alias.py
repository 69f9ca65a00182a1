"""``hooked_vlm.benchmarking`` moved to ``scripts/benchmarking.py``; the old path is a deprecated alias of that file."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest


def test_the_old_module_path_warns_and_gives_the_moved_helpers():
    sys.modules.pop("hooked_vlm.benchmarking", None)
    with pytest.warns(DeprecationWarning, match="moved to scripts/benchmarking.py"):
        old = importlib.import_module("hooked_vlm.benchmarking")
    moved = sys.modules["benchmarking"]
    assert Path(moved.__file__).resolve() == Path(__file__).resolve().parents[1] / "scripts" / "benchmarking.py"
    for name in ("rss_mib", "reset_peak_rss", "measure", "run_cell_in_subprocess", "tl_bridge", "append_jsonl"):
        assert getattr(old, name) is getattr(moved, name), name
    calls = []
    out = old.measure(lambda: calls.append(1), repeats=3, warmup=1)
    assert len(calls) == 4 and len(out["times"]) == 3
