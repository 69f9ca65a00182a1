"""Every mutation file in tests/mutations/ is well formed, so the curated list cannot rot: the schema holds,
each ``find`` text occurs exactly once in its file, ids are unique and every listed test file exists.
(The mutation run itself is ``python scripts/mutation_check.py``, not part of pytest.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "tests" / "mutations").glob("*.json"))


def _checker():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


mc = _checker()


def test_there_is_a_curated_core_list():
    core = mc.load_mutations(ROOT / "tests" / "mutations" / "core.json")
    assert len(core) >= 40
    assert len({m.file for m in core}) >= 15  # spread over the core, not one module


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_mutation_file_is_valid(path):
    muts = mc.load_mutations(path)
    assert [m.id for m in muts] == [e["id"] for e in json.loads(path.read_text())]


def test_ids_are_unique_across_files():
    mc.load_all(FILES)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"id": "x", "file": "hooked_vlm/layout.py", "find": "torch", "replace": "t", "tests": ["tests/test_layout.py"], "why": "w"},
         r"find text occurs \d+ times in hooked_vlm/layout.py; it must occur exactly once"),
        ({"id": "x", "file": "nope.py", "find": "a", "replace": "b", "tests": ["tests/test_layout.py"], "why": "w"},
         r"file 'nope.py' does not exist"),
        ({"id": "x", "file": "hooked_vlm/layout.py", "find": "def _check_frame(", "replace": "def f(", "tests": ["tests/nope.py::t"], "why": "w"},
         r"test path 'tests/nope.py' does not exist"),
        ({"id": "x", "file": "hooked_vlm/layout.py", "find": "def _check_frame(", "replace": "def f(", "tests": []},
         r"missing keys \['why'\]"),
    ],
)
def test_bad_entries_are_rejected_with_the_reason(tmp_path, entry, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([entry]))
    with pytest.raises(mc.MutationFileError, match=message):
        mc.load_mutations(bad)
