"""CellStore: atomic parts, de-duplication, manifest checks, and kill-and-resume of a real sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from analyses.results_store import CellStore, ConfigMismatchError, config_hash

KEYS = ("site", "layer", "head", "group")


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_append_load_dedupe_and_reopen(tmp_path, fmt):
    cfg = {"a": 1, "sites": ("resid_pre",)}
    s = CellStore(tmp_path, cfg, KEYS, format=fmt)
    recs = [
        {"site": "resid_pre", "layer": 0, "head": None, "group": "0", "value": 1.5},
        {"site": "z", "layer": 1, "head": 2, "group": "img", "value": -2.0},
    ]
    assert s.append(recs) == 2
    # repeated keys (even with a different value) are dropped, within a call and across calls
    assert s.append([recs[0] | {"value": 99.0}, recs[0]]) == 0
    assert len(s) == 2
    s2 = CellStore(tmp_path, cfg, KEYS, format=fmt)  # reopen: keys come back from disk
    assert s2.is_done({"site": "resid_pre", "layer": 0, "head": None, "group": "0"})
    assert s2.is_done({"site": "z", "layer": 1, "head": 2.0, "group": "img"})  # float head from a round trip
    assert not s2.is_done({"site": "z", "layer": 1, "head": 3, "group": "img"})
    df = s2.load()
    assert len(df) == 2 and sorted(df["value"]) == [-2.0, 1.5]
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["config"] == {"a": 1, "sites": ["resid_pre"]}
    assert man["config_hash"] == config_hash(cfg)
    assert man["key_columns"] == list(KEYS)


def test_two_writers_of_one_key_first_write_wins(tmp_path):
    """Two stores opened on one folder before either writes (two workers) both store a key; load() keeps the
    first write's value, also after consolidate()."""
    cfg = {"a": 1}
    first, second = CellStore(tmp_path, cfg, KEYS), CellStore(tmp_path, cfg, KEYS)
    key = {"site": "resid_pre", "layer": 0, "head": None, "group": "0"}
    assert first.append([key | {"value": 1.0}]) == 1
    assert second.append([key | {"value": 2.0}, {**key, "layer": 1, "value": 3.0}]) == 2
    assert CellStore(tmp_path, cfg, KEYS).load().sort_values("layer")["value"].tolist() == [1.0, 3.0]
    CellStore(tmp_path, cfg, KEYS).consolidate()
    assert CellStore(tmp_path, cfg, KEYS).load().sort_values("layer")["value"].tolist() == [1.0, 3.0]


def test_config_mismatch_raises_and_overwrite_clears(tmp_path):
    s = CellStore(tmp_path, {"a": 1, "b": 2}, KEYS)
    s.append([{"site": "x", "layer": 0, "head": None, "group": "g", "value": 0.0}])
    with pytest.raises(ConfigMismatchError, match=r"config\['b'\]"):
        CellStore(tmp_path, {"a": 1, "b": 3}, KEYS)
    s2 = CellStore(tmp_path, {"a": 1, "b": 3}, KEYS, overwrite=True)
    assert len(s2) == 0 and s2.load().empty


def test_partial_tmp_files_are_ignored_and_cleaned(tmp_path):
    s = CellStore(tmp_path, {"a": 1}, KEYS)
    s.append([{"site": "x", "layer": 0, "head": None, "group": "g", "value": 0.0}])
    junk = tmp_path / "cells" / ".tmp-part-123.parquet"
    junk.write_bytes(b"half a parquet file")  # what a kill during a write leaves behind
    s2 = CellStore(tmp_path, {"a": 1}, KEYS)
    assert not junk.exists()
    assert len(s2.load()) == 1


def test_consolidate_keeps_content(tmp_path):
    s = CellStore(tmp_path, {"a": 1}, KEYS)
    for i in range(4):
        s.append([{"site": "x", "layer": i, "head": None, "group": "g", "value": float(i)}])
    assert len(list((tmp_path / "cells").glob("part-*"))) == 4
    s.consolidate()
    assert len(list((tmp_path / "cells").glob("part-*"))) == 1
    assert sorted(s.load()["value"]) == [0.0, 1.0, 2.0, 3.0]


SWEEP_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    sys.path[:0] = [{root!r}, {here!r}]
    from tiny_lm import TinyConfig, TinyHookedLM, make_inputs
    from analyses.metrics import as_metric, logit_diff
    from analyses.patching import activation_patching

    out_dir, calls_log, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    model = TinyHookedLM(TinyConfig()).eval()
    clean = make_inputs(model.cfg, seed=0)
    corrupt = {{k: v.clone() for k, v in clean.items()}}
    corrupt["input_ids"][0, 7] = 9
    corrupt["pixel_values"] = torch.randn(clean["pixel_values"].shape, generator=torch.Generator().manual_seed(5))
    base = logit_diff(4, 8)
    n_calls = [0]

    def slow(logits):
        n_calls[0] += 1
        with open(calls_log, "a") as f:
            f.write("x\\n")
        time.sleep(delay)
        return base(logits)

    res = activation_patching(model, clean, corrupt, as_metric(slow, "slow_logit_diff"),
                              sites=["resid_pre", "z"], batch_size=3, store=out_dir, progress=False)
    res.frame.to_csv(out_dir + "/final.csv", index=False)
    """
)


def _script(tmp_path: Path) -> Path:
    here = Path(__file__).resolve().parent
    p = tmp_path / "sweep.py"
    p.write_text(SWEEP_SCRIPT.format(root=str(here.parents[1]), here=str(here)))
    return p


def _calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _reference_sweep(out_dir: Path) -> pd.DataFrame:
    """The sweep of SWEEP_SCRIPT, uninterrupted, in this process; checks it calls the metric once per cell + 2."""
    from tiny_lm import TinyConfig, TinyHookedLM, make_inputs

    from analyses.metrics import as_metric, logit_diff
    from analyses.patching import activation_patching

    model = TinyHookedLM(TinyConfig()).eval()
    clean = make_inputs(model.cfg, seed=0)
    corrupt = {k: v.clone() for k, v in clean.items()}
    corrupt["input_ids"][0, 7] = 9
    corrupt["pixel_values"] = torch.randn(clean["pixel_values"].shape, generator=torch.Generator().manual_seed(5))
    base, calls = logit_diff(4, 8), [0]

    def counted(logits):
        calls[0] += 1
        return base(logits)

    res = activation_patching(model, clean, corrupt, as_metric(counted, "slow_logit_diff"), sites=["resid_pre", "z"],
                              batch_size=3, store=str(out_dir), progress=False)
    assert calls[0] == len(res.frame) + 2
    return res.frame


@pytest.mark.slow
def test_kill_and_resume_gives_identical_results(tmp_path):
    script = _script(tmp_path)
    out = tmp_path / "store"
    log1, log2 = tmp_path / "calls1", tmp_path / "calls2"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    # 1) start a slow sweep and SIGKILL it once a few batches are on disk
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(log1), "0.05"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        parts = list((out / "cells").glob("part-*.parquet")) if (out / "cells").exists() else []
        if len(parts) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("sweep finished before it could be killed; increase the delay")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final.csv").exists()
    done_after_kill = len(pd.concat([pd.read_parquet(p) for p in (out / "cells").glob("part-*.parquet")]))
    assert done_after_kill >= 9

    # 2) rerun: resumes, computes only the missing cells (metric is called twice more for the
    #    clean and corrupted baselines)
    subprocess.run([sys.executable, str(script), str(out), str(log2), "0"], env=env, check=True)
    resumed = pd.read_csv(out / "final.csv")

    # 3) an uninterrupted reference run in a fresh directory, in this process (same script body, no sleep)
    ref_dir = tmp_path / "ref"
    ref = _reference_sweep(ref_dir)
    ref.to_csv(ref_dir / "final.csv", index=False)
    ref = pd.read_csv(ref_dir / "final.csv")  # the same CSV round trip as the resumed run's

    n_cells = len(ref)
    assert n_cells == 3 * 10 + 3 * 4 * 10  # resid_pre: 3 layers x 10 positions; z: 3 x 4 heads x 10
    assert _calls(log2) == (n_cells - done_after_kill) + 2
    keys = ["site", "layer", "head", "group"]
    assert not resumed.duplicated(keys).any()
    pd.testing.assert_frame_equal(resumed.reset_index(drop=True), ref.reset_index(drop=True))
