"""The shared pipeline case runner: dataset checks, per-case resumable results, failures, manifest, Ray."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.pipelines import (
    CaseError, CaseFailedError, DatasetError, Field, RunConfig, Schema, Section, add_common_args, config_from_args,
    load_failures, load_results, model_fingerprint, read_dataset, run_pipeline, write_index_html,
)
from analyses.results_store import ConfigMismatchError

from pipeline_demo import DEMO, make_dataset

HERE = Path(__file__).resolve().parent
VALUE_COLUMNS = ["case_id", "case_index", "answer_id", "answer_token", "answer_logprob", "image_mass", "noise"]


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(**kw) -> RunConfig:
    return RunConfig(model="tiny-qwen2-vl", progress=False, threads=1, **kw)


def _values(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame[VALUE_COLUMNS].copy()
    out["image_mass"] = out["image_mass"].map(lambda v: list(map(float, v)))
    return out.reset_index(drop=True)


# ------------------------------------------------------------------------------------------ dataset checks
def test_missing_dataset_file_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.jsonl does not exist"):
        read_dataset(tmp_path / "nope.jsonl", DEMO.schema)
    with pytest.raises(DatasetError, match="is a folder; pass the annotations file"):
        read_dataset(tmp_path, DEMO.schema, format="jsonl")


@pytest.mark.parametrize("name,text", [("a.jsonl", "\n\n"), ("a.json", "[]"), ("a.csv", "id,image,question\n")])
def test_empty_dataset_is_a_clear_error(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=r"holds no cases; add at least one .* record with fields \['id', 'image'"):
        read_dataset(tmp_path / name, DEMO.schema)


def test_malformed_line_wrong_type_missing_path_each_named(tmp_path):
    make_dataset(tmp_path, 2)
    path = _jsonl(tmp_path / "data.jsonl", [
        '{"id": "ok", "image": "images/img_000.png", "question": "q"}',
        '{"id": "broken", "image": ',                                                   # line 2: malformed
        '{"id": "typ", "image": "images/img_001.png", "question": "q", "size": "big"}',  # wrong type
        '{"id": "gone", "image": "images/missing.png", "question": "q"}',               # path missing
        '{"id": "flag", "image": "images/img_001.png", "question": "q", "size": true}',  # bool is no int
        '{"id": "odd", "image": "images/img_001.png", "question": "q", "size": 30}',     # check fails
        '{"id": "split", "image": "images/img_001.png", "question": "q", "split": "dev"}',
        '{"id": "noq", "image": "images/img_001.png"}',
        '{"id": "ok", "image": "images/img_001.png", "question": "again"}',              # duplicate id
    ])
    data = read_dataset(path, DEMO.schema)
    assert [c.id for c in data.cases] == ["ok"]
    assert data.cases[0].path("image") == (tmp_path / "images/img_000.png").resolve()
    errors = {bad.id: str(bad.error) for bad in data.invalid}
    assert errors["case-2"].startswith(f"{path}:2: malformed JSON")
    assert f"{path}:3: field 'size' is 'big' (str); expected an integer" in errors["typ"]
    assert f"{path}:4: field 'image' points to {tmp_path / 'images/missing.png'}, which does not exist" in errors["gone"]
    assert "field 'size' is True (bool); expected an integer" in errors["flag"]
    assert "field 'size' is 30; expected a positive multiple of 28" in errors["odd"]
    assert "field 'split' is 'dev'; expected one of ['train', 'test']" in errors["split"]
    assert f"{path}:8: missing required field 'question' (expected a string)" in errors["noq"]
    assert f"{path}:9: duplicate case id 'ok' (first at {path}:1)" in errors["ok@9"]
    assert [bad.index for bad in data.invalid] == list(range(1, 9))


def test_json_list_and_csv_readers(tmp_path):
    make_dataset(tmp_path, 2)
    schema = Schema((Field("id", str), Field("image", str, path=True), Field("size", int), Field("w", float, required=False),
                     Field("tags", list, required=False)))
    (tmp_path / "d.csv").write_text('id,image,size,w,tags\na,images/img_000.png,56,0.5,"[1, 2]"\nb,images/img_001.png,5x,,\n')
    data = read_dataset(tmp_path / "d.csv", schema)
    assert [(c.id, c.data["size"], c.data["w"], c.data["tags"]) for c in data.cases] == [("a", 56, 0.5, [1, 2])]
    assert str(data.invalid[0].error) == f"{tmp_path / 'd.csv'} row 2 (line 3): field 'size' is '5x'; expected an integer."
    (tmp_path / "d.json").write_text('[{"id": "a", "image": "images/img_000.png", "size": 28}, 7]')
    data = read_dataset(tmp_path / "d.json", schema)
    assert [c.id for c in data.cases] == ["a"] and data.cases[0].source == f"{tmp_path / 'd.json'} item 0"
    assert str(data.invalid[0].error) == f"{tmp_path / 'd.json'} item 1: expected a JSON object (dict), got int."
    (tmp_path / "e.json").write_text('{"id": "a"}')
    with pytest.raises(DatasetError, match=r"expected a JSON list of case objects at the top level, got dict"):
        read_dataset(tmp_path / "e.json", schema)
    with pytest.raises(CaseError, match="missing required field 'size'"):
        raise read_dataset([{"id": "z", "image": str(tmp_path / "images/img_000.png")}], schema).invalid[0].error


# ------------------------------------------------------------------------------------------ a full run
def _reference_row(case_image: Path, question: str, case_id: str) -> dict:
    """The demo's values from transformers' own eager model (full attention matrix), independently."""
    from PIL import Image

    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.tiny import tiny_hf_model
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    hf = tiny_hf_model("tiny-qwen2-vl", seed=0)
    inputs = build_qwen_inputs(tok, f"<image> {question}", [Image.open(case_image).convert("RGB")])
    with torch.no_grad():
        out = hf(**inputs, output_attentions=True)
    logprobs = out.logits[0, -1].log_softmax(-1)
    answer = int(logprobs.argmax())
    image = inputs["input_ids"][0] == 100
    mass = [float(a[0, :, -1, image].sum(-1).mean()) for a in out.attentions]
    seed = int.from_bytes(hashlib.sha256(f"0:{case_id}".encode()).digest()[:4], "little")
    return {"answer_id": answer, "answer_logprob": float(logprobs[answer]), "image_mass": mass,
            "noise": float(np.random.default_rng(seed).normal())}


def test_run_records_failures_resumes_and_writes_manifest(tmp_path, monkeypatch):
    make_dataset(tmp_path, 3)
    (tmp_path / "images/corrupt.png").write_bytes(b"not a png")
    path = _jsonl(tmp_path / "data.jsonl", [
        '{"id": "c000", "image": "images/img_000.png", "question": "what color is it ?"}',
        '{"id": "c001", "image": ',
        '{"id": "bad", "image": "images/corrupt.png", "question": "q"}',
        '{"id": "c002", "image": "images/img_002.png", "question": "where is it ?"}',
    ])
    log = tmp_path / "calls.log"
    monkeypatch.setenv("DEMO_CALL_LOG", str(log))
    out = tmp_path / "run"
    summary = run_pipeline(DEMO, path, out, _config(), argv=["demo", str(path)])
    assert summary.counts == {"total": 4, "selected": 4, "done": 2, "failed": 2, "skipped": 0}

    results = load_results(out)
    assert list(results["case_id"]) == ["c000", "c002"] and list(results["case_index"]) == [0, 3]
    for row in results.itertuples():
        ref = _reference_row(tmp_path / f"images/img_{row.case_id[1:]}.png",
                             "what color is it ?" if row.case_id == "c000" else "where is it ?", row.case_id)
        assert row.answer_id == ref["answer_id"]
        assert row.answer_logprob == pytest.approx(ref["answer_logprob"], abs=1e-5)
        np.testing.assert_allclose(list(row.image_mass), ref["image_mass"], atol=1e-5)
        assert row.noise == pytest.approx(ref["noise"], abs=0)
    failures = load_failures(out)
    assert list(failures["case_id"]) == ["case-2", "bad"]
    assert list(failures["stage"]) == ["validate", "run"]
    assert list(failures["error_type"]) == ["CaseError", "UnidentifiedImageError"]
    assert failures["message"].iloc[0].startswith(f"{path}:2: malformed JSON")
    assert "corrupt.png" in failures["message"].iloc[1]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["pipeline"] == "demo"
    assert manifest["command_line"] == ["demo", str(path)]
    assert manifest["counts"] == summary.counts
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["versions"]["python"] == sys.version.split()[0]
    assert manifest["model"]["name"] == "tiny-qwen2-vl" and manifest["model"]["dtype"] == "float32"
    from hooked_vlm.tiny import tiny_model
    assert manifest["model"]["fingerprint"] == model_fingerprint(tiny_model("tiny-qwen2-vl", seed=0))
    assert manifest["dataset"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["started_at"] <= manifest["finished_at"] and manifest["elapsed_s"] > 0
    assert manifest["workers"] == {"backend": "serial", "workers": 1}

    # rerun: nothing finished is recomputed, only the failed case is retried; no duplicates
    calls_before = log.read_text().splitlines()
    assert calls_before == ["c000", "c002"]
    again = run_pipeline(DEMO, path, out, _config(), argv=["demo"])
    assert again.counts == {"total": 4, "selected": 4, "done": 0, "failed": 2, "skipped": 2}
    assert log.read_text().splitlines() == calls_before
    pd.testing.assert_frame_equal(load_results(out), results)
    assert list(load_failures(out)["case_id"]) == ["case-2", "bad"]
    assert [r["counts"]["done"] for r in again.manifest["previous_runs"]] == [2]

    # the failed case's file is repaired: the retry succeeds and it leaves the failure table
    from PIL import Image
    Image.open(tmp_path / "images/img_001.png").save(tmp_path / "images/corrupt.png", format="PNG")
    assert len(list((out / "cases/cells").glob("part-*.parquet"))) == 2  # one part per finished case
    monkeypatch.setattr("analyses.pipelines.runner.CONSOLIDATE_ABOVE", 1)
    repaired = run_pipeline(DEMO, path, out, _config())
    assert repaired.counts == {"total": 4, "selected": 4, "done": 1, "failed": 1, "skipped": 2}
    assert len(list((out / "cases/cells").glob("part-*.parquet"))) == 1  # consolidated at the end
    assert list(load_results(out)["case_id"]) == ["c000", "bad", "c002"]
    pd.testing.assert_frame_equal(load_results(out).drop(index=1).reset_index(drop=True), results)
    assert list(load_failures(out)["case_id"]) == ["case-2"]

    # other options -> refused (not mixed); a changed case -> refused; overwrite starts over
    with pytest.raises(ConfigMismatchError, match=r"differs in: config\['options'\].*pass --overwrite"):
        run_pipeline(DEMO, path, out, _config(options={"templates": 2}))
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("where is it", "where is the circle")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigMismatchError, match=r"1 case\(s\) changed in the dataset since they were computed \(e.g. \['c002'\]\)"):
        run_pipeline(DEMO, path, out, _config())
    assert json.loads((out / "manifest.json").read_text())["run_id"] == repaired.manifest["run_id"]  # refused runs leave it
    fresh = run_pipeline(DEMO, path, out, _config(overwrite=True, limit=1))
    assert fresh.counts == {"total": 4, "selected": 1, "done": 1, "failed": 0, "skipped": 0}
    assert list(load_results(out)["case_id"]) == ["c000"]


def test_strict_stops_at_first_bad_or_failing_case(tmp_path):
    make_dataset(tmp_path, 2)
    (tmp_path / "images/corrupt.png").write_bytes(b"not a png")
    malformed = _jsonl(tmp_path / "m.jsonl", ['{"id": "a", "image": "images/img_000.png", "question": "q"}', "{oops"])
    with pytest.raises(CaseFailedError, match=r"m\.jsonl:2: malformed JSON .*strict: fix the dataset"):
        run_pipeline(DEMO, malformed, tmp_path / "out1", _config(strict=True))
    failing = _jsonl(tmp_path / "f.jsonl", ['{"id": "bad", "image": "images/corrupt.png", "question": "q"}',
                                            '{"id": "a", "image": "images/img_000.png", "question": "q"}'])
    with pytest.raises(CaseFailedError, match=r"case 'bad' \(.*f\.jsonl:1\) failed: UnidentifiedImageError"):
        run_pipeline(DEMO, failing, tmp_path / "out2", _config(strict=True))
    assert list(load_failures(tmp_path / "out2")["case_id"]) == ["bad"]
    assert len(load_results(tmp_path / "out2")) == 0
    assert json.loads((tmp_path / "out2/manifest.json").read_text())["status"] == "failed"


# ------------------------------------------------------------------------------------------ kill and resume
@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_results(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", 6)
    out, log1, log2 = tmp_path / "run", tmp_path / "calls1", tmp_path / "calls2"
    env = dict(os.environ, OMP_NUM_THREADS="1", DEMO_DELAY_S="0.4", DEMO_CALL_LOG=str(log1))
    cmd = [sys.executable, str(HERE / "pipeline_demo.py"), str(data), "--output-dir", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env)
    cells = out / "cases" / "cells"
    deadline = time.time() + 120
    while time.time() < deadline and not (cells.is_dir() and len(list(cells.glob("part-*.parquet"))) >= 2):
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed; raise DEMO_DELAY_S")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = pd.concat([pd.read_parquet(p) for p in cells.glob("part-*.parquet")])
    assert 2 <= len(stored) < 6
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # killed: never finished

    monkeypatch.setenv("DEMO_CALL_LOG", str(log2))
    resumed = run_pipeline(DEMO, data, out, _config())
    assert resumed.counts["skipped"] == len(stored) and resumed.counts["done"] == 6 - len(stored)
    recomputed = set(log2.read_text().split())
    assert recomputed.isdisjoint(set(stored["case_id"])) and len(recomputed) == 6 - len(stored)
    assert resumed.manifest["previous_runs"][-1]["status"] == "running"

    monkeypatch.delenv("DEMO_CALL_LOG")
    reference = run_pipeline(DEMO, data, tmp_path / "ref", _config())
    final = load_results(out)
    all_parts = pd.concat([pd.read_parquet(p) for p in cells.glob("part-*.parquet")])
    assert not all_parts["case_id"].duplicated().any()
    pd.testing.assert_frame_equal(_values(final), _values(reference.results()))


# ------------------------------------------------------------------------------------------ Ray
@pytest.mark.slow
def test_ray_two_local_workers_give_the_serial_results(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is in the dev extra; install hooked-vlm[dev]")
    data = make_dataset(tmp_path / "data", 4)
    serial = run_pipeline(DEMO, data, tmp_path / "serial", _config())
    pythonpath = os.environ.get("PYTHONPATH")
    parallel = run_pipeline(DEMO, data, tmp_path / "ray", _config(workers=2))
    assert parallel.counts == serial.counts == {"total": 4, "selected": 4, "done": 4, "failed": 0, "skipped": 0}
    workers = parallel.manifest["workers"]
    assert workers["backend"] == "ray" and workers["workers"] == 2 and workers["node_ip"] == "127.0.0.1"
    assert len(set(workers["worker_pids"])) == 2 and os.getpid() not in workers["worker_pids"]
    assert not ray.is_initialized()  # the local Ray started by the run was stopped
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # the loopback switch was undone
    assert os.environ.get("PYTHONPATH") == pythonpath
    pd.testing.assert_frame_equal(_values(parallel.results()), _values(serial.results()))
    assert parallel.manifest["model"]["fingerprint"] == serial.manifest["model"]["fingerprint"]


def test_workers_without_ray_installed_say_how_to_install(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r'Ray is not installed; `pip install "hooked-vlm\[ray\]"`'):
        run_pipeline(DEMO, data, tmp_path / "out", _config(workers=2))


def test_gpu_share_per_ray_actor():
    from analyses.pipelines.ray_backend import gpus_per_actor

    assert [gpus_per_actor("cpu", 8, 2), gpus_per_actor("cuda", 8, 2), gpus_per_actor("cuda:0", 1, 4)] == [0.0, 1.0, 0.25]
    with pytest.raises(RuntimeError, match="--device cuda was asked for, but the Ray cluster has no GPU; use --device cpu"):
        gpus_per_actor("cuda", 0, 2)


# ------------------------------------------------------------------------------------------ helpers
def test_model_fingerprint_tracks_weights_and_config():
    from hooked_vlm.tiny import tiny_model

    a, b, other = tiny_model("tiny-qwen2-vl", seed=0), tiny_model("tiny-qwen2-vl", seed=0), tiny_model("tiny-qwen2-vl", seed=1)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(other)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    with pytest.raises(TypeError, match="pass a torch.nn.Module or an object with a .model module"):
        model_fingerprint(object())


def test_common_args_build_the_run_config():
    parser = add_common_args(argparse.ArgumentParser(), default_model="tiny-qwen2-vl")
    args = parser.parse_args(["--limit", "3", "--dtype", "bf16", "--seed", "7", "--workers", "2", "--ray-address", "auto",
                              "--output-dir", "o", "--strict", "--overwrite", "--device", "cpu"])
    config = config_from_args(args, query="green circle")
    assert (config.model, config.limit, config.dtype, config.seed, config.workers, config.ray_address) == ("tiny-qwen2-vl", 3, "bf16", 7, 2, "auto")
    assert (config.strict, config.overwrite, config.options) == (True, True, {"query": "green circle"})
    assert config_from_args(parser.parse_args([])).overwrite is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--resume", "--overwrite"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--limit", "0"])
    help_text = parser.format_help()
    for flag in ("--model", "--limit", "--device", "--dtype", "--seed", "--workers", "--ray-address", "--output-dir", "--strict", "--resume", "--overwrite"):
        assert flag in help_text
    with pytest.raises(ValueError, match="CUDA is not available here; use --device cpu") if not torch.cuda.is_available() else pytest.raises(ValueError, match="Unknown device"):
        run_pipeline(DEMO, [{"id": "x"}], "unused", RunConfig(model="m", device="cuda" if not torch.cuda.is_available() else "gpu9"))


def test_index_html_is_self_contained_with_tables_and_relative_figures(tmp_path):
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs/a.png").write_bytes(b"\x89PNG")
    frame = pd.DataFrame({"head": [1, 2], "q <0.05": [0.01, 0.2]})
    manifest = {"pipeline": "demo", "status": "finished", "model": {"name": "tiny", "dtype": "float32", "device": "cpu", "fingerprint": "ab12"},
                "counts": {"done": 2, "failed": 0}}
    page = write_index_html(tmp_path / "index.html", "Demo <run>", [
        Section("Heads", "ranked by q", tables=[frame], figures=[tmp_path / "figs/a.png"], links=["per_case.csv"]),
        Section("Plain", tables=[(["a", "b"], [[1, "x&y"]])]),
    ], manifest)
    text = page.read_text()
    assert "<title>Demo &lt;run&gt;</title>" in text and "q &lt;0.05" in text and "x&amp;y" in text
    assert "<img src='figs/a.png'" in text and "<a href='per_case.csv'>" in text
    assert "fingerprint ab12" in text and "<td>0.01</td>" in text
    assert "http" not in text and "<script" not in text
