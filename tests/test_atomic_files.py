"""The one atomic-write helper: readers never see a partial file, a failed write keeps the old file, and the
result has the permissions any other file written under the umask would have (not mkstemp's 0600)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from hooked_vlm.atomic_files import atomic_output, atomic_write_json, atomic_write_text


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"b": 2, "a": 1})
    atomic_write_json(target, {"c": 3})
    assert json.loads(target.read_text()) == {"c": 3}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_permissions_follow_the_umask_whatever_wrote_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_output(tmp_path / "a.safetensors") as tmp:  # safetensors itself creates 0600 files
            save_file({"x": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644
