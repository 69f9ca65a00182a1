"""``hooked-vlm video`` end to end on the video organism: make-data, infer, trace, probe, bad input, resume, planted truth."""

from __future__ import annotations

import io
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

from hooked_vlm.cli import main
from hooked_vlm.organisms.video_qwen import FRAMES

pytest.importorskip("av", reason="PyAV is in the dev extra; install hooked-vlm[video]")

ORGANISM = "video-qwen2-vl"
TRACE_FLAGS = ["--counterfactuals", "reverse,swap", "--swap_spans", "0:2,2:4", "--token_slice", "visual_frames:2:6",
               "--dump_representations", "--no-progress"]


def _cli(*argv: str) -> str:
    out = io.StringIO()
    assert main(list(argv), stdout=out) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from analyses.pipelines.video.annotations import make_data

    return make_data(3, tmp_path_factory.mktemp("video") / "data", seed=0)


@pytest.fixture(scope="module")
def traced(data) -> Path:
    out = data.parent / "trace.json"
    _cli("video", "trace", "--annotations", str(data), "--output", str(out), *TRACE_FLAGS)
    return out


# ------------------------------------------------------------------------------------------ make-data
def test_make_data_writes_the_organism_clips_and_their_truth(data):
    from analyses.pipelines.video.decoding import read_video
    from hooked_vlm.organisms import get_organism

    entries = json.loads(data.read_text())
    assert [e["task_name"] for e in entries] == ["direction", "order", "motion"]
    organism = get_organism(ORGANISM)
    for k, entry in enumerate(entries):
        example = organism.generate_task(entry["task_name"], 1, 1000 * k)[0]
        video = read_video(data.parent / entry["video_name"])
        assert np.abs(video.frames.astype(int) - example.video).max() <= 2
        assert entry["candidates"][entry["answer_number"]] == entry["answer"] == example.answer
    present = [t for t, p in enumerate(json.loads((data.parent / "truth.json").read_text())[0]["tracks"][0]["positions"]) if p is not None]
    assert entries[0]["frames_with_answer_object"] == present  # the direction shape is drawn exactly on those frames


def test_make_data_flag_writes_the_clips_and_runs_on_them(tmp_path):
    out = _cli("video", "infer", "--make-data", "1", str(tmp_path / "d"), "--output", str(tmp_path / "i.json"),
               "--max_new_tokens", "1", "--no-progress")
    assert (tmp_path / "d" / "videos" / "clip_0000.mp4").is_file() and "'done': 1" in out
    entry = json.loads((tmp_path / "i.json").read_text())["entries"][0]
    assert entry["video_name"] == "videos/clip_0000.mp4" and entry["n_frames"] == FRAMES
    with pytest.raises(ValueError, match="N must be a number of clips, got 'x'"):
        main(["--debug", "video", "infer", "--make-data", "x", str(tmp_path / "e"), "--output", str(tmp_path / "j.json")])


# ------------------------------------------------------------------------------------------ infer
@pytest.mark.slow
def test_infer_chooses_the_likeliest_candidate_and_counts_accuracy(data):
    out = data.parent / "infer.json"
    _cli("video", "infer", "--annotations", str(data), "--output", str(out), "--max_new_tokens", "2", "--no-progress")
    result = json.loads(out.read_text())
    entries = result["entries"]
    from analyses.pipelines.runner import ModelSpec
    from analyses.pipelines.video.decoding import read_video
    from analyses.pipelines.video.model_io import load_video_model
    from hooked_vlm.inputs import build_qwen_inputs

    vm = load_video_model(ModelSpec(ORGANISM))
    first = json.loads(data.read_text())[0]
    frames = read_video(data.parent / first["video_name"]).frames
    from hooked_vlm.organisms import get_organism

    settings = get_organism(ORGANISM).input_kwargs  # the pixel limits and frame rate the organism was trained with
    inputs = build_qwen_inputs(vm.tokenizer, "<video> " + first["question"], videos=[frames], **settings)
    with torch.no_grad():
        logp = vm.model(**inputs)[0, -1].log_softmax(-1)
    expected = [float(logp[vm.tokenizer.convert_tokens_to_ids(c)]) for c in first["candidates"]]
    np.testing.assert_allclose(entries[0]["candidate_logprobs"], expected, atol=1e-5)
    assert entries[0]["chosen"] == first["candidates"][int(np.argmax(expected))]
    by_task = {r["task_name"]: r for r in result["accuracy"]}
    assert by_task["all"]["correct"] == sum(e["chosen"] == e["answer"] for e in entries) and by_task["all"]["n"] == 3
    assert (data.parent / "infer" / "index.html").is_file()


# ------------------------------------------------------------------------------------------ trace
@pytest.mark.slow
def test_trace_writes_json_parquet_figures_and_representations(traced):
    result = json.loads(traced.read_text())
    assert len(result["entries"]) == 3 and result["failures"] == []
    entry = result["entries"][0]
    assert [c["counterfactual"] for c in entry["conditions"]] == ["reverse", "swap 0:2<->2:4"]
    assert entry["n_visual_tokens"] == 64 and entry["temporal_patch_size"] == 2  # 4 slices x 4x4 merged cells
    slices = {c["token_slice"] for c in entry["conditions"][0]["cells"]}
    assert slices == {"visual", "text", "visual_frames:2:6", "frames 0-1", "frames 2-3", "frames 4-5", "frames 6-7"}
    cells = pd.read_parquet(traced.with_suffix(".parquet"))
    assert len(cells) == 3 * 2 * 3 * 7  # entries x counterfactuals x layers x token slices
    ok = cells["recovery"].notna()
    expected = (cells["patched_margin"] - cells["cf_margin"]) / (cells["clean_margin"] - cells["cf_margin"])
    np.testing.assert_allclose(cells.loc[ok, "recovery"], expected[ok], rtol=1e-9)
    assert ((cells["clean_margin"] - cells["cf_margin"]).abs()[~ok] < 1e-12).all()  # NaN only where clean == cf
    run = traced.with_suffix("")
    assert (run / "index.html").is_file() and (run / "figures" / "counterfactuals.png").is_file()
    assert (run / "figures" / "recovery_reverse_frame.png").is_file() and (run / "figures" / "recovery_reverse_slice.png").is_file()
    from analyses.pipelines.video.representations import load_representations

    index, arrays = load_representations(traced.parent / "trace_representations.npz")
    assert list(index["condition"][:3]) == ["clean", "reverse", "swap 0:2<->2:4"] and arrays["last_token"].shape == (9, 3, 96)


def test_traced_cells_match_patching_by_hand(traced, data):
    """Three cells of the reversal recomputed with a plain hook on resid_pre of a full forward: layer 1 slice 2 (input
    frames 4-5), layer 0 ``text`` (every text position, the prompt's prefix included) and layer 0 ``visual``."""
    from analyses.pipelines.runner import ModelSpec
    from analyses.pipelines.video.decoding import read_video
    from analyses.pipelines.video.model_io import load_video_model
    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.layout import TEXT

    vm = load_video_model(ModelSpec(ORGANISM))
    entry = json.loads(data.read_text())[0]
    frames = read_video(data.parent / entry["video_name"]).frames
    from hooked_vlm.organisms import get_organism

    settings = get_organism(ORGANISM).input_kwargs  # the pixel limits and frame rate the organism was trained with
    build = lambda f: build_qwen_inputs(vm.tokenizer, "<video> " + entry["question"], videos=[f], **settings)  # noqa: E731
    clean, cf = build(frames), build(frames[::-1].copy())
    is_video = clean["input_ids"][0] == vm.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    first = int(is_video.nonzero()[0])
    cells = {(1, "frames 4-5"): list(range(first + 2 * 16, first + 3 * 16)),  # slice 2: 16 tokens after two slices of 4x4
             (0, "text"): (vm.model.layout(**clean).kind[0] == TEXT).nonzero().flatten().tolist(),
             (0, "visual"): is_video.nonzero().flatten().tolist()}
    ids = [vm.tokenizer.convert_tokens_to_ids(c) for c in entry["candidates"]]
    right = entry["answer_number"]

    def margin(logits):
        x = logits[0, -1]
        return float(x[ids[right]] - max(x[i] for k, i in enumerate(ids) if k != right))

    got = json.loads(traced.read_text())["entries"][0]
    cond = got["conditions"][0]
    with torch.no_grad():
        clean_logits, cache = vm.model.run_with_cache(**clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        assert got["clean_margin"] == pytest.approx(margin(clean_logits), abs=1e-5)
        assert cond["cf_margin"] == pytest.approx(margin(vm.model(**cf)), abs=1e-5)
        for (layer, group), positions in cells.items():
            saved = cache[f"blocks.{layer}.hook_resid_pre"]

            def patch(act, hook, positions=positions, saved=saved):
                act[:, positions] = saved[:, positions]
                return act

            patched = vm.model.run_with_hooks(**cf, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)])
            cell = next(c for c in cond["cells"] if c["layer"] == layer and c["token_slice"] == group)
            assert cell["n_positions"] == len(positions)
            assert cell["patched_margin"] == pytest.approx(margin(patched), abs=1e-5), (layer, group)


def test_probe_commands_run_on_planted_representations(tmp_path):
    """Have-1 labels come from the answers in the tracing results; a planted direction is found (AUROC ~ 1)."""
    rng = np.random.default_rng(0)
    entries, rows, labels = [], [], {}
    for i in range(24):
        conds = [{"counterfactual": "reverse", "cf_answer": "left" if i % 2 else "right"}]
        entries.append({"question_id": f"{i:02d}", "clean_answer": "right", "conditions": conds})
        for cond, changed in (("clean", 0), ("reverse", i % 2)):
            x = rng.normal(size=(2, 8)).astype(np.float32)
            x[1, 0] += 8.0 * changed  # layer 1 carries the label, layer 0 does not
            rows.append((f"{i:02d}", f"v{i}", cond, x))
            labels[(f"{i:02d}", cond)] = changed
    (tmp_path / "trace.json").write_text(json.dumps({"entries": entries}))
    stack = np.stack([r[3] for r in rows])
    np.savez(tmp_path / "rep.npz", question_id=np.array([r[0] for r in rows]), video_name=np.array([r[1] for r in rows]),
             condition=np.array([r[2] for r in rows]), layers_mean=stack, last_token=stack, frames_mean=stack)
    ann = [{"video_name": f"v{i}", "question": "q", "question_id": f"{i:02d}", **({"kind": "odd" if i % 2 else "even"} if i < 22 else {})}
           for i in range(24)]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    _cli("video", "probe", "--tracing_results", str(tmp_path / "trace.json"), "--representations", str(tmp_path / "rep.npz"),
         "--probe_type", "have1", "--output", str(tmp_path / "h1.json"), "--n_resamples", "50")
    have1 = json.loads((tmp_path / "h1.json").read_text())
    assert have1["n_samples"] == 24 and have1["n_videos"] == 24
    by_layer = {r["layer"]: r for r in have1["layers"]}
    assert by_layer[1]["auroc"] > 0.95 and by_layer[0]["auroc"] < 0.8
    from analyses.pipelines.video.probe import probe_samples
    from analyses.pipelines.video.representations import load_representations

    index, _ = load_representations(tmp_path / "rep.npz")
    picked, y, groups, _ = probe_samples("have1", entries, index)
    assert [labels[(index["question_id"][r], index["condition"][r])] for r in picked] == list(y)
    assert list(groups) == [index["video_name"][r] for r in picked] and set(index["condition"][picked]) == {"reverse"}
    _cli("video", "probe", "--tracing_results", str(tmp_path / "trace.json"), "--representations", str(tmp_path / "rep.npz"),
         "--probe_type", "have2", "--annotations", str(tmp_path / "ann.json"), "--label_key", "kind", "--layer_idx", "1",
         "--output", str(tmp_path / "h2.json"), "--n_resamples", "50")
    have2 = json.loads((tmp_path / "h2.json").read_text())
    assert have2["n_samples"] == 22 and [s["question_id"] for s in have2["skipped"]] == ["22", "23"]
    assert have2["classes"] == ["even", "odd"] and [r["layer"] for r in have2["layers"]] == [1]
    from analyses.pipelines.video.probe import ProbeInputError, run_probe

    with pytest.raises(ProbeInputError, match="--label_key 'nope' is in no annotation entry"):
        run_probe(tmp_path / "trace.json", tmp_path / "rep.npz", "have2", annotations=tmp_path / "ann.json", label_key="nope")
    with pytest.raises(ProbeInputError, match=r"--layer_idx 5: the representations have 2 layers"):
        run_probe(tmp_path / "trace.json", tmp_path / "rep.npz", "have1", layer_idx=5)


# ------------------------------------------------------------------------------------------ bad input
def test_each_bad_entry_is_recorded_and_the_run_goes_on(data, tmp_path):
    good = json.loads(data.read_text())[0]
    (tmp_path / "garbage.mp4").write_bytes(b"\x00" * 64)
    entries = [
        dict(good, question_id="good", video_name=str(data.parent / good["video_name"])),
        dict(good, question_id="missing", video_name="nowhere.mp4"),
        dict(good, question_id="garbage", video_name="garbage.mp4"),
        {"video_name": str(data.parent / good["video_name"]), "question": good["question"], "question_id": "no-candidates"},
        dict(good, question_id="oov", candidates=["left", "sideways"], answer="left", answer_number=0,
             video_name=str(data.parent / good["video_name"])),
        dict(good, question_id="short", end=1.0, video_name=str(data.parent / good["video_name"])),  # 2 frames: 2:4 is past its end
        dict(good, question_id="bad-answer", answer="north", answer_number=None),
    ]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    out = tmp_path / "trace.json"
    _cli("video", "trace", "--annotations", str(tmp_path / "ann.json"), "--output", str(out), "--counterfactuals", "swap", "--no-progress")
    result = json.loads(out.read_text())
    assert [e["question_id"] for e in result["entries"]] == ["good"]
    messages = {f["case_id"]: f"{f['error_type']}: {f['message']}" for f in result["failures"]}
    assert "VideoDecodeError" in messages["missing"] and "nowhere.mp4 does not exist; check video_name and --video_root" in messages["missing"]
    assert "garbage.mp4 cannot be decoded" in messages["garbage"]
    assert "AnnotationError: `hooked-vlm video trace` needs field(s) ['candidates']" in messages["no-candidates"]
    assert "candidate 'sideways' is not in the model's vocabulary as stated" in messages["oov"]
    assert "--swap_spans 2:4 goes past the clip's end: it has 2 input frames" in messages["short"]
    assert "answer 'north' is not one of the candidates" in messages["bad-answer"]


def test_a_video_command_on_an_image_model_fails_per_entry_with_the_fix(data, tmp_path):
    out = tmp_path / "trace.json"
    _cli("video", "trace", "--model", "tiny-llava", "--annotations", str(data), "--output", str(out), "--limit", "1",
         "--counterfactuals", "reverse", "--token_slice", "visual_frames:0:2", "--no-progress")
    (failure,) = json.loads(out.read_text())["failures"]
    assert failure["error_type"] == "UnsupportedModelError"
    assert "cannot take a video" in failure["message"] and "a visual_frames token slice has no frames to point at on an image model" in failure["message"]


def test_bad_flags_are_refused_before_any_work(data, tmp_path):
    err = io.StringIO()
    from contextlib import redirect_stderr

    with redirect_stderr(err):
        code = main(["video", "trace", "--annotations", str(data), "--output", str(tmp_path / "t.json"), "--swap_spans", "0:2"])
    assert code == 2 and "--swap_spans needs spans in pairs" in err.getvalue()
    with redirect_stderr(err):
        code = main(["video", "trace", "--annotations", str(data), "--output", str(tmp_path / "t.json"), "--counterfactuals", "rewind"])
    assert code == 2 and "unknown ['rewind']" in err.getvalue()


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_trace_resumes_after_a_kill_with_identical_results(data, tmp_path):
    """Kill a run (SIGKILL) after its first entry, resume it, and compare with a run that was never interrupted."""
    flags = ["--annotations", str(data), "--counterfactuals", "reverse", "--dump_representations", "--no-progress"]
    out = tmp_path / "killed" / "trace.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "hooked_vlm.cli", "video", "trace", "--output", str(out), *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out.with_suffix("") / "cases" / "cells"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (parts.is_dir() and any(parts.glob("part-*"))):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= len(list(parts.glob("part-*"))) < 3, "the kill should land after the first entry and before the last"
    _cli("video", "trace", "--output", str(out), *flags)
    reference = tmp_path / "whole" / "trace.json"
    _cli("video", "trace", "--output", str(reference), *flags)
    assert json.loads(out.read_text())["entries"] == json.loads(reference.read_text())["entries"]
    manifest = json.loads((out.with_suffix("") / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] >= 1 and manifest["previous_runs"][0]["status"] == "running"
    a, b = (np.load(p.parent / "trace_representations.npz") for p in (out, reference))
    assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in b.files)


# ------------------------------------------------------------------------------------------ Ray
@pytest.mark.slow
def test_ray_two_local_workers_give_the_serial_trace(traced, data, tmp_path):
    """``--workers 2`` runs the entries on two local Ray actors: same cells and representations as the serial run."""
    pytest.importorskip("ray", reason="Ray is in the dev extra; install hooked-vlm[dev]")
    out = tmp_path / "trace.json"
    _cli("video", "trace", "--annotations", str(data), "--output", str(out), *TRACE_FLAGS, "--workers", "2")
    manifest = json.loads((out.with_suffix("") / "manifest.json").read_text())
    assert manifest["workers"]["backend"] == "ray" and manifest["workers"]["workers"] == 2
    serial, parallel = (json.loads(p.read_text())["entries"] for p in (traced, out))
    assert [e["question_id"] for e in parallel] == [e["question_id"] for e in serial]
    for a, b in zip(parallel, serial):
        assert a["clean_answer"] == b["clean_answer"] and a["clean_margin"] == pytest.approx(b["clean_margin"], abs=1e-5)
        cells_a, cells_b = (pd.DataFrame([{**c, "cf": cond["counterfactual"]} for cond in e["conditions"] for c in cond["cells"]])
                            for e in (a, b))
        assert len(cells_a) == len(cells_b) == 2 * 3 * 7  # counterfactuals x layers x token slices (visual, text, span, 4 slices)
        np.testing.assert_allclose(cells_a["patched_margin"], cells_b["patched_margin"], atol=1e-5)
        assert list(cells_a["token_slice"]) == list(cells_b["token_slice"])
    ray_reps, serial_reps = (np.load(p.parent / f"{p.stem}_representations.npz") for p in (out, traced))
    assert list(ray_reps["question_id"]) == list(serial_reps["question_id"])
    np.testing.assert_allclose(ray_reps["layers_mean"], serial_reps["layers_mean"], atol=1e-5)


# ------------------------------------------------------------------------------------------ planted truth (part 8)
def _organism_at_chance() -> bool:
    from hooked_vlm.organisms import checkpoint_dir, get_organism

    card = json.loads((checkpoint_dir(ORGANISM) / "organism.json").read_text())
    return card["accuracy"]["direction"]["accuracy"] < get_organism(ORGANISM).target_accuracy


@pytest.mark.slow
@pytest.mark.xfail(_organism_at_chance(), strict=True,
                   reason="the shipped video-qwen2-vl checkpoint is at chance (direction accuracy below its 90% target): "
                   "reversal cannot flip an answer the model does not give; passes once the retrained organism ships")
def test_trace_shows_the_planted_truth_on_the_organism(tmp_path):
    """Direction clips: reversing the clip flips the model's answer to the opposite direction, and at layer 0 the
    per-frame recovery is larger on the frames that show the moving shape than on the empty ones."""
    from analyses.pipelines.video.annotations import make_data
    from hooked_vlm.organisms.video_qwen import OPPOSITE

    ann = make_data(12, tmp_path / "data", seed=5, tasks=["direction"])
    out = tmp_path / "trace.json"
    _cli("video", "trace", "--annotations", str(ann), "--output", str(out), "--counterfactuals", "reverse", "--no-progress")
    result = json.loads(out.read_text())
    correct = [e for e in result["entries"] if e["clean_answer"] == e["candidates"][e["answer_number"]]]
    assert len(correct) >= 10
    flipped = [e["conditions"][0]["cf_answer"] == OPPOSITE[e["clean_answer"]] for e in correct]
    assert np.mean(flipped) >= 0.8
    table = pd.DataFrame(result["answer_frame_recovery"])
    layer0 = table[(table["counterfactual"] == "reverse") & (table["layer"] == 0)].iloc[0]
    assert layer0["answer_frames"] > 2 * max(layer0["other_frames"], 0.0)


# ------------------------------------------------------------------------------------------ other video families
@pytest.mark.slow
def test_infer_and_trace_run_on_a_tiny_llava_video_model(data, tmp_path):
    """LLaVA-OneVision (one slice per frame, pooled tokens): same commands, per-frame groups = frames."""
    _cli("video", "infer", "--model", "tiny-llava-onevision", "--annotations", str(data), "--output", str(tmp_path / "i.json"),
         "--limit", "1", "--max_new_tokens", "1", "--no-progress")
    assert json.loads((tmp_path / "i.json").read_text())["entries"][0]["chosen"] in ["left", "right", "up", "down"]
    _cli("video", "trace", "--model", "tiny-llava-onevision", "--annotations", str(data), "--output", str(tmp_path / "t.json"),
         "--limit", "1", "--counterfactuals", "reverse", "--token_slice", "visual_frames:3:5", "--no-progress")
    entry = json.loads((tmp_path / "t.json").read_text())["entries"][0]
    assert entry["temporal_patch_size"] == 1 and entry["frame_groups"]["frame 3"] == [3]
    cells = {c["token_slice"]: c["n_positions"] for c in entry["conditions"][0]["cells"] if c["layer"] == 0}
    assert cells["visual_frames:3:5"] == cells["frame 3"] + cells["frame 4"]


def test_check_indexing_command(tmp_path):
    out = _cli("video", "check-indexing", "--models", "tiny-qwen2-vl", "--output", str(tmp_path / "rows.json"))
    assert "5/5 spans land on the right tokens" in out
    assert [r["slices"] for r in json.loads((tmp_path / "rows.json").read_text())][2] == [1, 2]
