"""compare-attention: the generated data, the per-row maps, the statistics, the command on organisms and tiny folders, bad input."""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.pipelines import ModelSpec, RunConfig
from analyses.pipelines.compare_attention.data import make_data, parse_box, study_problems

torch.set_num_threads(1)


def _tiny_folder(folder: Path, name: str) -> Path:
    from hooked_vlm.tiny import tiny_hf_model
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    tiny_hf_model(name, seed=1).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def test_make_data_writes_six_paraphrases_per_study_with_the_generator_boxes(tmp_path):
    from hooked_vlm.organisms.radiograph import PARAPHRASES, make_sample

    frame = pd.read_csv(make_data(tmp_path, studies=3, seed=3), dtype=str, keep_default_na=False)
    assert len(frame) == 18 and frame.groupby("study_id")["variant_id"].apply(lambda v: sorted(map(int, v))).tolist() == [list(range(6))] * 3
    samples = [make_sample((3, i), "random") for i in range(3)]
    # this draw holds a yes study, a marker, and a no study whose image shows another kind (its box is not the asked one)
    assert any(s.answer == "no" and s.finding not in (None, s.asked) for s in samples) and any(s.marker_box for s in samples)
    for i, s in enumerate(samples):
        rows = frame[frame["study_id"] == f"study_{i:03d}"]
        assert rows["question"].tolist() == list(PARAPHRASES[s.asked]) and set(rows["answer_gt"]) == {s.answer}
        assert parse_box(rows["marker_box"].iloc[0]) == s.marker_box
        assert parse_box(rows["finding_box"].iloc[0]) == (s.finding_box if s.answer == "yes" else None)
        assert np.array_equal(np.asarray(s.image), np.asarray(__import__("PIL.Image").Image.open(tmp_path / rows["image_path"].iloc[0])))


def test_attention_map_equals_the_pattern_hook_computation(tmp_path):
    """The kernels' answer-token map (mean over heads, last quarter of layers, renormalised over the image) against
    the full L x L ``hook_pattern`` on a tiny LLaVA."""
    from analyses.attention_maps import pool_grid
    from analyses.pipelines.compare_attention.maps import answer_ids, build_inputs, row_maps
    from analyses.pipelines.runner import load_hooked_model

    loaded = load_hooked_model(ModelSpec(str(_tiny_folder(tmp_path / "llava", "tiny-llava"))))
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    prompt = "user : <image> is there a red circle ? assistant :"
    yes_no = answer_ids(loaded.tokenizer, ("yes", "no"), "tiny")
    r = row_maps(loaded, image, prompt, yes_no, "cpu", "mean", ("attention",))
    inputs = build_inputs(loaded, image, prompt, "cpu")
    model = loaded.model
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(names_filter=lambda n: n in names, **inputs)
    pos = model.layout(**inputs).positions(image=0)
    n = len(names)
    used = list(range(n - max(1, n // 4), n))
    rows = torch.stack([cache[names[i]][0, :, -1, :][:, pos] for i in used])  # layers, heads, image tokens
    want = (rows / rows.sum(-1, keepdim=True)).mean(1).mean(0)
    side = int(len(pos) ** 0.5)
    want_pixels = pool_grid(want.reshape(side, side).double(), (48, 48), mode="mass").double()
    torch.testing.assert_close(r.maps["attention"], want_pixels, atol=1e-6, rtol=1e-5)
    assert r.answer == ("yes" if logits[0, -1, yes_no[0]] >= logits[0, -1, yes_no[1]] else "no")
    mass = torch.stack([cache[names[i]][0, :, -1, :][:, pos].sum(-1) for i in range(n)])
    np.testing.assert_allclose(r.answer_image_mass, mass.numpy(), atol=1e-6)


def test_permutation_and_cluster_statistics_against_brute_force():
    from analyses.pipelines.compare_attention.report import _tests, robustness_table

    rng = np.random.default_rng(3)
    x, y = rng.normal(1, 1, 8), rng.normal(0, 1, 8)
    d = x - y
    flips = np.array(list(product([1, -1], repeat=8)))
    null = (flips * d).mean(1)
    exact = float(np.mean(np.abs(null) >= abs(d.mean()) - 1e-12))
    assert _tests(x, y, 0)["permutation_p"] == pytest.approx(exact, abs=1e-9)  # 256 sign flips < 9999: scipy is exact
    rows = pd.DataFrame({"study_id": ["a"] * 3 + ["b"] * 3, "variant_id": [0, 1, 2] * 2, "answer": ["yes", "yes", "no", "no", "no", "no"],
                         "attention_empty": False, "attention_map": [np.eye(2).ravel() + 0.1 * k for k in range(6)]})
    table, summary = robustness_table(rows, ["attention"])
    assert table.set_index("study_id")["flip_rate"].to_dict() == {"a": pytest.approx(1 / 3), "b": 0.0}
    assert summary["mean_flip_rate"] == pytest.approx(1 / 6)


@pytest.mark.slow
def test_study_problems_and_bad_rows_are_recorded_and_the_rest_runs(tmp_path):
    from analyses.pipelines.compare_attention.cli import compare

    csv = make_data(tmp_path / "data", studies=2, seed=1)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    (tmp_path / "data" / "images" / "broken.png").write_bytes(b"not a png")
    bad = [dict(frame.iloc[0], study_id="s_missing", image_path="images/none.png"),
           dict(frame.iloc[0], study_id="s_broken", image_path="images/broken.png"),
           dict(frame.iloc[0], study_id="s_variant", variant_id="7"),
           dict(frame.iloc[0], study_id="s_answer", answer_gt="maybe")]
    frame = pd.concat([frame[frame["variant_id"].isin(["0", "1"])], pd.DataFrame(bad)], ignore_index=True)
    frame.to_csv(csv, index=False)
    problems = {p["study_id"]: p["problem"] for p in study_problems(csv)}
    assert set(problems) == {"s_variant"} and "no variant with variant_id 0-5" in problems["s_variant"]
    llava, gemma = _tiny_folder(tmp_path / "llava", "tiny-llava"), _tiny_folder(tmp_path / "gemma", "tiny-gemma3")
    config = RunConfig(model="", progress=False, options={"methods": ["attention", "gradcam", "saliency"], "head_fusion": "entropy", "n_resamples": 99,
                                                          "prompt_template": "user : <image> {question} assistant :", "answer_words": ["yes", "no"]})
    summary = compare(csv, [str(llava), str(gemma)], tmp_path / "out", config, ["attention", "gradcam", "saliency"], max_figures=1)
    fails = pd.DataFrame(summary["failures"])
    by = {(m, r["message"].split(":")[0]) for m, r in zip(fails["model"], fails.to_dict("records"))}
    assert len(fails) == 8 and len(by) == 8  # 4 bad rows x 2 models
    msgs = " | ".join(fails["message"])
    assert "images/none.png" in msgs or "none.png" in msgs
    assert "broken.png" in msgs and "Cannot read" in msgs
    assert "'variant_id' is 7; expected a paraphrase number 0-5" in msgs and "'answer_gt' is 'maybe'" in msgs
    per_row = pd.read_csv(tmp_path / "out" / "per_row.csv")
    assert len(per_row) == 8 and set(per_row["model"]) == {str(llava), str(gemma)}  # 2 studies x 2 variants x 2 models
    for m in ("attention", "gradcam", "saliency"):
        assert per_row[f"{m}_entropy"].between(0, 1).all() or per_row[f"{m}_empty"].any()
    for name in ("summary.json", "robustness.csv", "stats.csv", "index.html"):
        assert (tmp_path / "out" / name).is_file()
    assert any(f.endswith("_paraphrases.png") for f in summary["files"]["figures"])


def test_attention_that_cannot_be_extracted_names_the_model(tmp_path, monkeypatch):
    import analyses.pipelines.compare_attention.maps as maps
    from analyses.attention_maps import MethodNotApplicableError
    from analyses.pipelines.runner import load_hooked_model

    loaded = load_hooked_model(ModelSpec(str(_tiny_folder(tmp_path / "gemma", "tiny-gemma3"))))

    def refuse(*args, **kwargs):
        raise MethodNotApplicableError("attention layers [1] of the lm tower did not run in this forward")

    monkeypatch.setattr(maps, "attention_map", refuse)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(maps.AttentionUnavailableError, match=r"gemma: the answer token's attention to the image cannot be extracted \(MethodNotApplicableError"):
        maps.row_maps(loaded, image, "user : <image> any line ? assistant :", (3, 4), "cpu")
    with pytest.raises(maps.AttentionUnavailableError, match="tiny-x: the saliency map is not finite"):
        maps._to_pixels(torch.tensor([[float("nan")]]), (4, 4), "saliency", "tiny-x")


@pytest.mark.slow
def test_organisms_surface_the_planted_shortcut(tmp_path):
    """rad-llava (trained with the marker as a shortcut) puts more saliency on the marker than rad-gemma3 (the control)."""
    from analyses.pipelines.compare_attention.cli import compare

    csv = make_data(tmp_path / "data", studies=12, seed=2)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame = frame[(frame["marker_box"] != "") & frame["variant_id"].isin(["0"])]
    frame.to_csv(csv, index=False)
    assert frame["study_id"].nunique() >= 5  # one paraphrase per marked study keeps this test short
    options = {"methods": ["saliency"], "head_fusion": "mean", "n_resamples": 499,
               "prompt_template": "user : <image> {question} assistant :", "answer_words": ["yes", "no"]}
    summary = compare(csv, ["rad-llava", "rad-gemma3"], tmp_path / "out", RunConfig(model="", progress=False, options=options),
                      ["saliency"], max_figures=0)
    stats = pd.read_csv(tmp_path / "out" / "stats.csv").set_index(["model", "metric"])
    llava, gemma = stats.loc[("rad-llava", "saliency_marker_ratio")], stats.loc[("rad-gemma3", "saliency_marker_ratio")]
    assert llava["low"] > 1.0 and llava["estimate"] > 2 * gemma["estimate"], (llava.to_dict(), gemma.to_dict())
    assert stats.loc[("rad-llava - rad-gemma3", "saliency_marker_ratio")]["low"] > 0
    assert summary["models"]["rad-llava"]["accuracy"]["estimate"] >= 0.5


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    from analyses.pipelines.compare_attention.cli import compare

    csv = make_data(tmp_path / "data", studies=2, seed=5)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame[frame["variant_id"].isin(["0"])].to_csv(csv, index=False)
    models = [str(_tiny_folder(tmp_path / "llava", "tiny-llava")), str(_tiny_folder(tmp_path / "gemma", "tiny-gemma3"))]
    options = {"methods": ["attention"], "head_fusion": "max", "prompt_template": "user : <image> {question} assistant :",
               "answer_words": ["yes", "no"], "n_resamples": 99}

    def run(out, limit=None):
        return compare(csv, models, out, RunConfig(model="", progress=False, limit=limit, options=options), ["attention"], max_figures=0)

    assert run(tmp_path / "out", limit=1)["models"][models[0]]["rows"] == 1  # stopped after one row
    run(tmp_path / "out")
    run(tmp_path / "fresh")
    manifest = json.loads((tmp_path / "out" / "models" / "llava" / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == 1 and manifest["counts"]["done"] == 1
    for name in ("per_row.csv", "stats.csv", "robustness.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / name), pd.read_csv(tmp_path / "fresh" / name))


def test_command_line_refuses_bad_arguments(tmp_path, capsys):
    from hooked_vlm.cli import main

    assert main(["compare-attention", "--output-dir", str(tmp_path)]) == 2
    assert "give --csv FILE, or --make-data" in capsys.readouterr().err
    assert main(["compare-attention", "--make-data", "--prompt-template", "{question} ?", "--output-dir", str(tmp_path)]) == 2
    assert "must hold <image> and {question}" in capsys.readouterr().err
    assert main(["cir", "query", "--database", "x", "--dataset-path", str(tmp_path), "--caption", "is red"]) == 2
    assert "a single query needs both --reference-image and --caption" in capsys.readouterr().err
