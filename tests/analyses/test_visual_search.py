"""``hooked-vlm visual-search``: data generation, answers, attention caches, features, rankings, bad input, resume, Ray.

Values are checked against independent computations (a direct forward, the materialised attention pattern,
scipy / statsmodels, hand formulas), never against the pipeline's own output. Nothing assumes the organism is
accurate: it may answer at chance.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats as sps

from analyses.pipelines import CaseFailedError, RunConfig, load_failures, load_results, run_pipeline
from analyses.pipelines.visual_search import VISUAL_SEARCH, make_dataset, write_reports
from analyses.pipelines.visual_search.report import evaluation, head_features, head_rankings, prompt_sensitivity
from hooked_vlm.cli import load_model, main

ORGANISM = "grid-qwen2.5-vl"
TEMPLATES = ["is there a {query} ? <image>", "<image> is there a {query} ?"]
OPTIONS = {"query": None, "templates": TEMPLATES, "answers": ["yes", "no"]}


def _config(**kw) -> RunConfig:
    return RunConfig(model=kw.pop("model", ORGANISM), progress=False, threads=1, options=dict(OPTIONS, **kw.pop("options", {})), **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vs")
    data = make_dataset(folder / "data", 6, seed=3)
    summary = run_pipeline(VISUAL_SEARCH, data, folder / "reports", _config())
    report = write_reports(folder / "reports", TEMPLATES, summary.manifest, max_figures=2)
    return folder, data, summary, report


@pytest.fixture(scope="module")
def organism():
    return load_model(ORGANISM, torch.float32, "cpu", 0)


# ------------------------------------------------------------------------------------------ data
@pytest.mark.slow
def test_generated_lines_follow_the_format_and_the_organisms_presence_task(tmp_path):
    from hooked_vlm.organisms import get_organism

    path = make_dataset(tmp_path, 8, seed=5)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    examples = get_organism(ORGANISM).generate_task("presence", 8, 5)
    for line, ex in zip(lines, examples):
        assert set(line) == {"id", "image", "grid", "patch", "objects", "query"} and (line["grid"], line["patch"]) == (10, 28)
        assert np.array_equal(np.asarray(Image.open(tmp_path / line["image"])), ex.image)  # the organism's own image
        assert ex.prompt == f"is there a {line['query']} ? <image>"
        present = any({o["color"], o["shape"]} == set(line["query"].split()) for o in line["objects"])
        assert present == (ex.answer == "yes")
        for o in line["objects"]:
            assert o["bbox"] == [28 * o["c"], 28 * o["r"], 28 * o["c"] + 28, 28 * o["r"] + 28]


# ------------------------------------------------------------------------------------------ stages 2 and 3
@pytest.mark.slow
def test_answers_and_attention_cache_match_a_direct_forward_and_the_eager_pattern(run, organism):
    from hooked_vlm.inputs import build_qwen_inputs

    folder, data, summary, _ = run
    results = summary.results()
    tok, model = organism.tokenizer, organism.model
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    line = json.loads(data.read_text().splitlines()[0])
    row = results.iloc[0]
    image = Image.open(data.parent / line["image"]).convert("RGB")
    for t, template in enumerate(TEMPLATES):
        inputs = build_qwen_inputs(tok, template.format(query=line["query"]), [image])
        with torch.no_grad():
            logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("attn.hook_pattern"))
        diff = float(logits[0, -1, yes] - logits[0, -1, no])
        assert row["template_answers"][t] == ("yes" if diff > 0 else "no")
        assert row["template_p_yes"][t] == pytest.approx(1 / (1 + np.exp(-diff)), abs=1e-6)
        if t == 0:
            lay = model.layout(**inputs)
            cells = [lay.cell(r, c, image=0) for r in range(10) for c in range(10)]
            eager = np.stack([cache[f"blocks.{l}.attn.hook_pattern"][0, :, -1, cells].reshape(-1, 10, 10).numpy() for l in range(3)])
    with np.load(folder / "reports" / row["attn_cache"]) as z:
        np.testing.assert_allclose(z["attention"], eager, atol=1e-5)
        target = z["target"]
    present = any({o["color"], o["shape"]} == set(line["query"].split()) for o in line["objects"])
    assert row["present"] == present and target.sum() == int(present)
    said_yes = row["answer"] == "yes"
    assert row["outcome"] == {(True, True): "TP", (True, False): "FN", (False, True): "FP", (False, False): "TN"}[(present, said_yes)]


def test_report_files_and_values(run):
    folder, _, summary, report = run
    out = folder / "reports"
    for name in ("per_case.csv", "summary.json", "prompt_sensitivity.csv", "stats/per_head_features.parquet",
                 "stats/head_rankings.csv", "index.html"):
        assert (out / name).is_file(), name
    per_case = pd.read_csv(out / "per_case.csv")
    results = summary.results()
    assert list(per_case["case_id"]) == list(results["case_id"])
    assert json.loads(per_case["target_cells"].iloc[0]) == [list(map(int, c)) for c in results["target_cells"].iloc[0]]
    on_disk = json.loads((out / "summary.json").read_text())  # strict JSON: NaN written as null
    conf = on_disk["evaluation"]["confusion"]
    assert sum(conf.values()) == 6 and conf == {o: int((results["outcome"] == o).sum()) for o in ("TP", "FN", "FP", "TN")}
    html = (out / "index.html").read_text()
    figs = sorted(p.name for p in (out / "figs").glob("*.png"))
    assert figs and all(f"figs/{f}" in html for f in figs)
    order = {"TP": 0, "FN": 1, "FP": 2, "TN": 3}
    first = sorted(results.itertuples(), key=lambda r: (order[r.outcome], r.case_index))[0]
    assert any(f.startswith(f"{first.outcome}_{first.case_id}") for f in figs)  # TP, then FN, first


def test_features_equal_hand_formulas_on_a_cached_map(run):
    folder, _, summary, _ = run
    results = summary.results()
    features = head_features(results, folder / "reports")
    row = results[results["present"]].iloc[0] if results["present"].any() else results.iloc[0]
    with np.load(folder / "reports" / row["attn_cache"]) as z:
        m, target = z["attention"][1, 2].astype(float), z["target"]
    got = features[(features["case_id"] == row["case_id"]) & (features["layer"] == 1) & (features["head"] == 2)].set_index("feature")["value"]
    p = m.ravel() / m.sum()
    assert got["entropy"] == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum(), rel=1e-6)
    assert got["gini_simpson"] == pytest.approx(1 - (p**2).sum(), rel=1e-6)
    x = np.sort(m.ravel())
    n = x.size
    assert got["gini"] == pytest.approx(np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * x.mean()), rel=1e-6)
    assert got["image_share"] == pytest.approx(m.sum(), rel=1e-6)
    if target.any():
        assert got["target_mass"] == pytest.approx(m[target].sum() / m.sum(), rel=1e-6)
        assert got["contrast"] == pytest.approx(m[target].mean() / (m[~target].mean() + 1e-12), rel=1e-6)
    else:
        assert np.isnan(got["target_mass"]) and np.isnan(got["contrast"])
    mean = features[(features["case_id"] == row["case_id"]) & (features["layer"] == 1) & (features["head"] == -1) & (features["feature"] == "image_share")]
    with np.load(folder / "reports" / row["attn_cache"]) as z:
        assert float(mean["value"].iloc[0]) == pytest.approx(z["attention"][1].sum((-2, -1)).mean(), rel=1e-6)


# ------------------------------------------------------------------------------------------ stage 4 and evaluation
def _synthetic_features(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i, outcome in enumerate(["TP"] * 7 + ["FN"] * 5 + ["FP"] * 3):
        for layer in range(2):
            for head in (0, 1, -1):
                shift = 0.8 if (layer, head, outcome) == (1, 0, "TP") else 0.0
                rows.append({"case_id": f"c{i}", "outcome": outcome, "layer": layer, "head": head, "feature": "entropy",
                             "value": rng.normal() + shift})
    return pd.DataFrame(rows)


def test_head_rankings_equal_scipy_mann_whitney_and_hand_bh():
    features = _synthetic_features()
    table = head_rankings(features)
    tp_fn = table[table["comparison"] == "TP vs FN"]
    assert len(tp_fn) == 6 and list(tp_fn["rank"]) == list(range(1, 7))
    pvals = []
    for _, r in tp_fn.iterrows():
        sel = features[(features["layer"] == r["layer"]) & (features["head"] == r["head"])]
        a = sel.loc[sel["outcome"] == "TP", "value"].to_numpy()
        b = sel.loc[sel["outcome"] == "FN", "value"].to_numpy()
        res = sps.mannwhitneyu(a, b, alternative="two-sided")
        assert r["p_value"] == pytest.approx(res.pvalue)
        greater = (a[:, None] > b[None, :]).mean() - (a[:, None] < b[None, :]).mean()
        assert r["rank_biserial"] == pytest.approx(greater)
        pvals.append(res.pvalue)
    p = np.asarray(pvals)
    order = np.argsort(p)
    bh = np.minimum.accumulate((p[order] * len(p) / np.arange(1, len(p) + 1))[::-1])[::-1]
    expected = np.empty_like(p)
    expected[order] = np.minimum(bh, 1)
    np.testing.assert_allclose(tp_fn["q_bh"], expected)
    assert (np.diff(tp_fn["q_bh"].to_numpy()) >= 0).all()  # sorted by q
    wrong = table[table["comparison"] == "correct vs wrong"]
    assert set(wrong["n_b"]) == {5 + 3} and set(wrong["n_a"]) == {7}  # FN and FP are wrong, TP correct


def test_evaluation_intervals_equal_the_wilson_formula():
    results = pd.DataFrame({"outcome": ["TP"] * 6 + ["FN"] * 2 + ["FP"] * 3 + ["TN"] * 9})
    results["correct"] = results["outcome"].isin(["TP", "TN"])
    ev = evaluation(results)

    def wilson(k, n, z=1.959963984540054):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return centre - half, centre + half

    for name, (k, n) in {"precision": (6, 9), "recall": (6, 8), "accuracy": (15, 20)}.items():
        assert ev[name]["value"] == pytest.approx(k / n)
        assert (ev[name]["low"], ev[name]["high"]) == pytest.approx(wilson(k, n))


def test_prompt_sensitivity_flip_rate_by_hand():
    results = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "present": [True, False, True, False],
                            "template_answers": [["yes", "yes", "no"], ["yes", "no", "no"], ["no", "no", "no"], ["no", "yes", "yes"]]})
    table, summary = prompt_sensitivity(results, ["t0", "t1", "t2"])
    assert list(table["flip_rate_vs_first"]) == [0.0, 0.5, 0.75]
    assert list(table["accuracy"]) == [0.5, 0.5, 0.25] and list(table["yes_rate"]) == [0.5, 0.5, 0.25]
    # per case: share of the other templates whose answer differs from template 0: a 1/2, b 1, c 0, d 1
    assert summary["mean_flip_rate"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)


# ------------------------------------------------------------------------------------------ bad input
def _line(**kw) -> str:
    base = {"image": "images/img_00000.png", "grid": 10, "patch": 28, "objects": [{"shape": "circle", "color": "green", "r": 3, "c": 7}], "query": "green circle"}
    return json.dumps({**base, **kw})


def test_each_bad_input_is_a_named_failure_and_the_rest_still_run(run, tmp_path):
    folder = run[0]
    shutil.copytree(folder / "data" / "images", tmp_path / "images")
    Image.new("RGB", (300, 280)).save(tmp_path / "images" / "wrong_size.png")
    lines = [
        _line(id="good"),
        _line(id="missing", image="images/nope.png"),
        '{"id": "broken", "image": ',
        _line(id="outside", objects=[{"shape": "circle", "color": "green", "r": 12, "c": 3}]),
        _line(id="size", image="images/wrong_size.png"),
        _line(id="noquery", query=None),
    ]
    data = tmp_path / "annotations.jsonl"
    data.write_text("\n".join(lines) + "\n")
    summary = run_pipeline(VISUAL_SEARCH, data, tmp_path / "out", _config())
    assert summary.counts["done"] == 1 and summary.counts["failed"] == 5
    msg = load_failures(tmp_path / "out").set_index("case_id")["message"]
    assert "images/nope.png" in msg["missing"] and "does not exist" in msg["missing"]
    assert f"{data}:3: malformed JSON" in msg["case-3"]
    assert "r=12, c=3 lies outside the 10x10 grid; fix r / c (0..9)" in msg["outside"]
    assert "is 300x280 px but grid 10 x patch 28 = 280x280" in msg["size"]
    assert "names no target: add a 'query' field" in msg["noquery"]
    assert list(load_results(tmp_path / "out")["case_id"]) == ["good"]
    with pytest.raises(CaseFailedError, match=r"images/nope.png.*strict"):
        run_pipeline(VISUAL_SEARCH, data, tmp_path / "strict", _config(strict=True))


def test_multi_token_answer_word_and_empty_dataset_are_clear_errors(run, tmp_path):
    from analyses.pipelines import DatasetError

    folder, data = run[0], run[1]
    summary = run_pipeline(VISUAL_SEARCH, data, tmp_path / "out", _config(limit=1, options={"answers": ["yes", "perhaps"]}))
    assert summary.counts["failed"] == 1
    msg = load_failures(tmp_path / "out")["message"].iloc[0]
    assert "answer word 'perhaps' is not one token of this tokenizer" in msg and "single tokens" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="holds no cases"):
        run_pipeline(VISUAL_SEARCH, empty, tmp_path / "e", _config())
    err = io.StringIO()
    sys_stderr, sys.stderr = sys.stderr, err
    try:
        assert main(["visual-search", str(empty), "--output-dir", str(tmp_path / "cli"), "--no-progress"]) == 2
    finally:
        sys.stderr = sys_stderr
    assert "holds no cases" in err.getvalue()


# ------------------------------------------------------------------------------------------ another family, pooling
@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    from hooked_vlm.tiny import tiny_hf_model
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("llava")
    tiny_hf_model("tiny-llava", seed=1).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_tiny_llava_checkpoint_pools_its_token_grid_to_the_dataset_grid(llava_folder, tmp_path):
    out = tmp_path / "reports"
    argv = ["visual-search", "--make-data", "3", str(tmp_path / "data"), "--grid", "2", "--patch", "28", "--model", str(llava_folder),
            "--output-dir", str(out), "--no-progress", "--figures", "1", "--threads", "1"]
    assert main(argv, stdout=io.StringIO()) == 0
    results = load_results(out)
    assert set(results["pooling"]) == {"area-pooled 4x4 tokens -> 2x2 cells (mass preserving)"}
    loaded = load_model(str(llava_folder), torch.float32, "cpu", 0)
    line = json.loads((tmp_path / "data" / "annotations.jsonl").read_text().splitlines()[0])
    from hooked_vlm.families.llava_inputs import build_llava_inputs

    cfg = json.loads((llava_folder / "config.json").read_text())
    inputs = build_llava_inputs(loaded.tokenizer, f"is there a {line['query']} ? <image>", [Image.open(tmp_path / "data" / line["image"]).convert("RGB")], [], cfg, llava_folder)
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    image_pos = (inputs["input_ids"][0] == cfg["image_token_index"]).nonzero().flatten()  # 16 tokens, raster order
    with np.load(out / results["attn_cache"].iloc[0]) as z:
        got = z["attention"]
    for layer in range(got.shape[0]):
        tokens = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1, image_pos].reshape(-1, 4, 4).numpy()
        blocks = tokens.reshape(-1, 2, 2, 2, 2).sum((2, 4))  # each 2x2 block of tokens is one dataset cell
        np.testing.assert_allclose(got[layer], blocks, atol=1e-6)
        np.testing.assert_allclose(got[layer].sum((-2, -1)), tokens.sum((-2, -1)), atol=1e-6)  # mass preserved


def test_dataset_grid_finer_than_the_tokens_is_refused_with_the_reason(llava_folder, tmp_path):
    data = make_dataset(tmp_path / "data", 1, seed=0, grid=8, patch=7)  # 56 px, 8x8 cells on 4x4 tokens
    summary = run_pipeline(VISUAL_SEARCH, data, tmp_path / "out", _config(model=str(llava_folder)))
    assert summary.counts["failed"] == 1
    msg = load_failures(tmp_path / "out")["message"].iloc[0]
    assert "the dataset grid is 8x8 cells but the model turns this image into a 4x4 token grid" in msg
    assert "a dataset grid of at most 4x4 cells" in msg


# ------------------------------------------------------------------------------------------ resume and Ray
def _report_files(out: Path) -> dict[str, str]:
    names = ["per_case.csv", "prompt_sensitivity.csv", "stats/head_rankings.csv"]
    files = {n: (out / n).read_text().replace(str(out), "OUT") for n in names}
    summary = json.loads((out / "summary.json").read_text())
    files["summary"] = json.dumps(summary, sort_keys=True)
    files["features"] = pd.read_parquet(out / "stats" / "per_head_features.parquet").to_csv()
    return files


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_reports(tmp_path):
    data = make_dataset(tmp_path / "data", 12, seed=1)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hooked_vlm.cli", "visual-search", str(data), "--output-dir", str(out), "--no-progress",
           "--threads", "1", "--figures", "1"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    cells = out / "cases" / "cells"
    deadline = time.time() + 120
    while time.time() < deadline and not (cells.is_dir() and len(list(cells.glob("part-*.parquet"))) >= 2):
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = len(list(cells.glob("part-*.parquet")))
    assert 2 <= stored < 12 and not (out / "per_case.csv").exists()
    assert main(cmd[3:], stdout=io.StringIO()) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["skipped"] >= stored
    ref = tmp_path / "reference"
    assert main([*cmd[3:6], str(ref), *cmd[7:]], stdout=io.StringIO()) == 0
    assert _report_files(out) == {k: v.replace("reference", "killed") for k, v in _report_files(ref).items()}


@pytest.mark.slow
def test_ray_two_local_workers_give_the_serial_results_and_caches(run, tmp_path):
    pytest.importorskip("ray", reason="Ray is in the dev extra; install hooked-vlm[dev]")
    folder, data, serial, _ = run
    parallel = run_pipeline(VISUAL_SEARCH, data, tmp_path / "ray", _config(workers=2, limit=4))
    assert parallel.manifest["workers"]["backend"] == "ray" and parallel.manifest["workers"]["workers"] == 2
    a = serial.results().head(4).drop(columns=["attn_cache", "case_index"])
    b = parallel.results().drop(columns=["attn_cache", "case_index"])
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    for rel in parallel.results()["attn_cache"]:
        with np.load(folder / "reports" / rel) as x, np.load(tmp_path / "ray" / rel) as y:
            np.testing.assert_array_equal(x["attention"], y["attention"])


def test_commands_are_listed_in_the_cli_help():
    from hooked_vlm.cli import COMMANDS, build_parser

    assert {"visual-search", "spatial"} <= set(COMMANDS)
    text = build_parser(["visual-search"]).format_help()
    assert "visual-search" in text and "spatial" in text
