"""``hooked-vlm spatial``: mirrored data, option / caption scoring, attention, mirror patching, probes' features,
AdaptVis key scaling (against the materialised scores), reports, bad input, another family.

Values are checked against independent computations (direct forwards, hand-written hooks, eager patterns,
hand formulas). Nothing assumes the organism is accurate.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from analyses.pipelines import RunConfig, load_failures, load_results, run_pipeline
from analyses.pipelines.spatial import SPATIAL, gated_factor, key_scaling_hooks, make_dataset, write_reports
from analyses.pipelines.spatial.data import parse_relation
from analyses.pipelines.spatial.report import accuracy_table, adaptvis_table
from hooked_vlm.cli import load_model, main
from hooked_vlm.inputs import build_qwen_inputs

ORGANISM = "grid-qwen2.5-vl"
OPTIONS = {"template": "{question} <image>", "caption_template": "<image> {caption}", "adapt_factors": [0.5],
           "adapt_layers": None, "gate_threshold": 0.6, "gate_low": 0.5, "gate_high": 1.5, "seed": 0}


def _config(**kw) -> RunConfig:
    return RunConfig(model=kw.pop("model", ORGANISM), progress=False, threads=1, options=dict(OPTIONS, **kw.pop("options", {})), **kw)


@pytest.fixture(scope="module")
def organism():
    return load_model(ORGANISM, torch.float32, "cpu", 0)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spatial")
    data = make_dataset(folder / "data", 4, seed=2)
    summary = run_pipeline(SPATIAL, data, folder / "reports", _config())
    report = write_reports(folder / "reports", OPTIONS, summary.manifest, max_figures=1)
    return folder, data, summary, report


def _inputs(tok, prompt, image):
    return build_qwen_inputs(tok, prompt, [image])


# ------------------------------------------------------------------------------------------ AdaptVis key scaling
def test_key_scaling_multiplies_exactly_the_image_logits_in_the_chosen_layer(organism):
    model, tok = organism.model, organism.tokenizer
    image = Image.new("RGB", (280, 280), (200, 180, 220))
    inputs = _inputs(tok, "is the red square left of the blue circle ? <image>", image)
    image_cols = (inputs["input_ids"][0] == tok.convert_tokens_to_ids("<|image_pad|>")).nonzero().flatten()
    names = lambda n: n.endswith("attn.hook_attn_scores")  # noqa: E731
    with torch.no_grad():
        base_logits, base = model.run_with_cache(**inputs, names_filter=names)
        with model.hooks(fwd_hooks=key_scaling_hooks(model, inputs, 0.25, layers=[1])):
            fast_logits = model(**inputs)  # sdpa / kernels: no scores built
            slow_logits, scaled = model.run_with_cache(**inputs, names_filter=names)
    s0, s1 = base["blocks.1.attn.hook_attn_scores"][0], scaled["blocks.1.attn.hook_attn_scores"][0]  # H L L
    others = torch.ones(s0.shape[-1], dtype=torch.bool)
    others[image_cols] = False
    finite = torch.isfinite(s0[..., image_cols])
    # hand computation: image-key logits x 0.25, every other logit unchanged (layer 0 runs before the edit)
    torch.testing.assert_close(s1[..., image_cols][finite], 0.25 * s0[..., image_cols][finite], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1[..., others], s0[..., others])
    torch.testing.assert_close(scaled["blocks.0.attn.hook_attn_scores"], base["blocks.0.attn.hook_attn_scores"])
    torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-5, atol=1e-5)  # the fast path sees the same edit
    assert not torch.allclose(fast_logits, base_logits)


def test_gated_factor_and_bad_layers(organism):
    assert gated_factor(0.55, 0.6, 0.5, 1.5) == 0.5 and gated_factor(0.6, 0.6, 0.5, 1.5) == 1.5
    inputs = _inputs(organism.tokenizer, "is there a red square ? <image>", Image.new("RGB", (56, 56)))
    with pytest.raises(ValueError, match=r"--adapt-layers \[7\] do not exist: the language model has 3 layers"):
        key_scaling_hooks(organism.model, inputs, 2.0, layers=[7])


# ------------------------------------------------------------------------------------------ data
def test_generated_pairs_are_mirrors_with_flipped_answers(tmp_path):
    from hooked_vlm.organisms.grid_qwen import render

    path = make_dataset(tmp_path, 4, seed=1)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 4
    for a, b in zip(lines[::2], lines[1::2]):
        assert a["pair_id"] == b["pair_id"] and a["question"] == b["question"] and {a["answer"], b["answer"]} == {"yes", "no"}
        assert a["mirror_image_path"] == b["image_path"] and b["mirror_image_path"] == a["image_path"]
        col = parse_relation(a["question"])[0] in ("left", "right")
        for oa, ob in zip(a["objects"], b["objects"]):
            assert (ob["r"], ob["c"]) == ((oa["r"], 9 - oa["c"]) if col else (9 - oa["r"], oa["c"]))
        # the named objects' relation holds in exactly one of the two images
        rel = parse_relation(a["question"])[0]
        (pa, qa), (pb, qb) = [(o["r"], o["c"]) for o in a["objects"]]
        holds = {"left": qa < qb, "right": qa > qb, "above": pa < pb, "below": pa > pb}[rel]
        assert holds == (a["answer"] == "yes")
        first = [{"color": o["color"], "shape": o["shape"], "row": o["r"], "col": o["c"]} for o in b["objects"]]
        drawn = np.asarray(Image.open(tmp_path / b["image_path"]))
        for o in first:  # the mirror is drawn again: each named object sits on its mirrored cell
            cell = drawn[o["row"] * 28:(o["row"] + 1) * 28, o["col"] * 28:(o["col"] + 1) * 28]
            assert np.array_equal(cell, render([o])[o["row"] * 28:(o["row"] + 1) * 28, o["col"] * 28:(o["col"] + 1) * 28])


def test_relation_parsing():
    assert parse_relation("is the red square left of the blue circle ?") == ("left", "left of")
    assert parse_relation("The cup is to the right of the plate") == ("right", "to the right of")
    assert parse_relation("a dog under a table") == ("below", "under")
    assert parse_relation("a red square") is None


# ------------------------------------------------------------------------------------------ per-case values
@pytest.mark.slow
def test_answers_attention_and_residuals_match_direct_computations(qa_run, organism):
    folder, data, summary, _ = qa_run
    model, tok = organism.model, organism.tokenizer
    results = summary.results()
    line = json.loads(data.read_text().splitlines()[1])
    row = results.set_index("case_id").loc[line["id"]]
    image = Image.open(data.parent / line["image_path"]).convert("RGB")
    inputs = _inputs(tok, f"{line['question']} <image>", image)
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith(("hook_pattern", "hook_resid_post")))
    ids = [tok.convert_tokens_to_ids(w) for w in ("yes", "no")]
    two = logits[0, -1, ids].double()
    p = torch.softmax(two, 0)
    gold = ["yes", "no"].index(line["answer"])
    assert row["prediction"] == ["yes", "no"][int(two.argmax())] and row["p_gold"] == pytest.approx(float(p[gold]), abs=1e-6)
    image_pos = (inputs["input_ids"][0] == tok.convert_tokens_to_ids("<|image_pad|>")).nonzero().flatten()
    share = [float(cache[f"blocks.{l}.attn.hook_pattern"][0, :, -1, image_pos].sum(-1).mean()) for l in range(3)]
    np.testing.assert_allclose(row["answer_image_share"], share, atol=1e-5)
    (ra, ca), _ = [(o["r"], o["c"]) for o in line["objects"]]
    cell = image_pos[ra * 10 + ca]
    np.testing.assert_allclose(row["answer_mass_a"], [float(cache[f"blocks.{l}.attn.hook_pattern"][0, :, -1, cell].mean()) for l in range(3)], atol=1e-6)
    with np.load(folder / "reports" / row["act_cache"]) as z:
        np.testing.assert_allclose(z["resid"], np.stack([cache[f"blocks.{l}.hook_resid_post"][0, -1].numpy() for l in range(3)]), atol=1e-5)


def _comparable(results: pd.DataFrame) -> pd.DataFrame:
    """Per-case results without the columns that name files or run order."""
    drop = [c for c in results.columns if c in ("act_cache", "attn_cache", "case_index")]
    return results.drop(columns=drop).sort_values("case_id").reset_index(drop=True)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_uninterrupted_results(qa_run, tmp_path):
    """A run stopped after two cases (as a kill at a case boundary leaves it) resumes without redoing them."""
    _, data, full, _ = qa_run
    out = tmp_path / "resumed"
    first = run_pipeline(SPATIAL, data, out, _config(limit=2))
    assert first.manifest["counts"]["done"] == 2
    rest = run_pipeline(SPATIAL, data, out, _config())
    assert rest.manifest["counts"]["skipped"] == 2 and rest.manifest["counts"]["done"] == len(full.results()) - 2
    pd.testing.assert_frame_equal(_comparable(rest.results()), _comparable(full.results()))


@pytest.mark.slow
def test_ray_two_local_workers_give_the_serial_results(qa_run, tmp_path):
    pytest.importorskip("ray", reason="Ray is in the dev extra; install hooked-vlm[dev]")
    _, data, serial, _ = qa_run
    parallel = run_pipeline(SPATIAL, data, tmp_path / "ray", _config(workers=2, limit=2))
    assert parallel.manifest["workers"]["backend"] == "ray" and parallel.manifest["workers"]["workers"] == 2
    expected = _comparable(serial.results())
    got = _comparable(parallel.results())
    pd.testing.assert_frame_equal(got, expected[expected["case_id"].isin(got["case_id"])].reset_index(drop=True))


def test_mirror_patching_equals_a_hand_patched_forward(qa_run, organism):
    _, data, summary, _ = qa_run
    model, tok = organism.model, organism.tokenizer
    line = json.loads(data.read_text().splitlines()[0])
    row = summary.results().set_index("case_id").loc[line["id"]]
    prompt = f"{line['question']} <image>"
    clean = _inputs(tok, prompt, Image.open(data.parent / line["image_path"]).convert("RGB"))
    corrupt = _inputs(tok, prompt, Image.open(data.parent / line["mirror_image_path"]).convert("RGB"))
    a, b = (tok.convert_tokens_to_ids(w) for w in ((line["answer"], "no" if line["answer"] == "yes" else "yes")))
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        image_pos = (clean["input_ids"][0] == tok.convert_tokens_to_ids("<|image_pad|>")).nonzero().flatten()
        for layer in (0, 2):
            for group, pos in (("image", image_pos), ("last", torch.tensor([clean["input_ids"].shape[1] - 1]))):
                def patch(act, hook, pos=pos, layer=layer):
                    act = act.clone()
                    act[:, pos] = cache[f"blocks.{layer}.hook_resid_pre"][:, pos]
                    return act

                with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)]):
                    logits = model(**corrupt)
                assert row[f"patch_{group}"][layer] == pytest.approx(float(logits[0, -1, a] - logits[0, -1, b]), abs=1e-5)
        clean_logits = model(**clean)
    assert row["patch_clean"] == pytest.approx(float(clean_logits[0, -1, a] - clean_logits[0, -1, b]), abs=1e-5)


@pytest.mark.slow
def test_caption_form_scores_are_summed_caption_log_likelihoods(tmp_path, organism):
    data = make_dataset(tmp_path / "data", 2, seed=4, form="captions")
    items = json.loads(data.read_text())
    assert all(len(it["caption_options"]) == 2 for it in items)
    summary = run_pipeline(SPATIAL, data, tmp_path / "out", _config(limit=1))
    row = summary.results().iloc[0]
    model, tok = organism.model, organism.tokenizer
    image = Image.open(data.parent / items[0]["image_path"]).convert("RGB")
    scores = []
    for caption in items[0]["caption_options"]:
        inputs = _inputs(tok, f"<image> {caption}", image)
        n = len(tok(caption, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            lp = model(**inputs)[0].log_softmax(-1)
        ids = inputs["input_ids"][0]
        L = ids.shape[0]
        scores.append(sum(float(lp[p - 1, ids[p]]) for p in range(L - n, L)))  # the caption's own tokens
    p = np.exp(np.array(scores) - max(scores))
    p /= p.sum()
    assert row["form"] == "captions" and row["p_gold"] == pytest.approx(p[0], abs=1e-5)
    assert row["prediction"] == items[0]["caption_options"][int(np.argmax(scores))]


# ------------------------------------------------------------------------------------------ reports
def test_report_tables_and_files(qa_run):
    folder, _, summary, report = qa_run
    out = folder / "reports"
    for name in ("per_case.csv", "summary.json", "accuracy.csv", "attention_by_layer.csv", "patching.csv", "probes.csv",
                 "adaptvis.csv", "index.html", "figs/adaptvis_accuracy.png", "figs/patching_effect.png"):
        assert (out / name).is_file(), name
    json.loads((out / "summary.json").read_text())
    results = summary.results()
    patching = pd.read_csv(out / "patching.csv")
    sel = patching[(patching["layer"] == 1) & (patching["group"] == "image")].iloc[0]
    patched = np.mean([v[1] for v in results["patch_image"]])
    clean, corrupt = results["patch_clean"].mean(), results["patch_corrupt"].mean()
    expected = (patched - corrupt) / (clean - corrupt) if clean != corrupt else np.nan  # undefined without a gap
    assert sel["recovery"] == pytest.approx(expected, nan_ok=True) and sel["patched"] == pytest.approx(patched)


def test_accuracy_and_adaptvis_tables_by_hand():
    results = pd.DataFrame({"relation": ["left", "left", "right", "above"], "correct": [True, False, True, True],
                            "pair_id": ["p1", "p1", "p2", "p2"], "set_id": [None, None, None, None],
                            "adapt_correct": [[True, False], [True, True], [False, False], [True, False]],
                            "gated_correct": [True, True, False, False]})
    acc = accuracy_table(results).set_index(["scope", "kind"])
    assert acc.loc[("all", "case"), "accuracy"] == 0.75 and acc.loc[("left", "case"), "accuracy"] == 0.5
    assert acc.loc[("all", "pair"), "accuracy"] == 0.5 and acc.loc[("all", "pair"), "n"] == 2  # p1 has a miss
    assert ("all", "set") not in acc.index
    adapt = adaptvis_table(results, [0.5, 2.0]).set_index("setting")
    assert adapt.loc["0.5", "accuracy"] == 0.75 and adapt.loc["2", "accuracy"] == 0.25 and adapt.loc["gated", "accuracy"] == 0.5
    assert adapt.loc["1.0 (unscaled)", "accuracy"] == 0.75


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.slow
def test_each_bad_input_is_a_named_failure(qa_run, tmp_path):
    folder = qa_run[0]
    shutil.copytree(folder / "data" / "images", tmp_path / "images")
    Image.new("RGB", (100, 100)).save(tmp_path / "images" / "small.png")
    img = "images/rel_00000_a.png"
    q = "is the red square left of the blue circle ?"
    rows = [
        {"id": "good", "image_path": img, "question": q, "answer": "yes"},
        {"id": "neither", "image_path": img},
        {"id": "notoption", "image_path": img, "question": q, "answer": "maybe"},
        {"id": "multitoken", "image_path": img, "question": q, "answer": "perhaps", "options": ["perhaps", "no"]},
        {"id": "outside", "image_path": img, "question": q, "answer": "yes", "grid": 10, "patch": 28, "objects": [{"r": 3, "c": 11}]},
        {"id": "norelation", "image_path": img, "question": "is there a red square ?", "answer": "yes"},
        {"id": "mirrorsize", "image_path": img, "question": q, "answer": "yes", "mirror_image_path": "images/small.png"},
        {"id": "missing", "image_path": "images/none.png", "question": q, "answer": "yes"},
    ]
    data = tmp_path / "qa.json"
    data.write_text(json.dumps(rows))
    summary = run_pipeline(SPATIAL, data, tmp_path / "out", _config())
    assert summary.counts["done"] == 1 and summary.counts["failed"] == 7
    msg = load_failures(tmp_path / "out").set_index("case_id")["message"]
    assert "needs 'caption_options' (what's-up form) or 'question' and 'answer' (QA form)" in msg["neither"]
    assert "answer 'maybe' is not one of the options ['yes', 'no']" in msg["notoption"]
    assert "answer word 'perhaps' is not one token" in msg["multitoken"]
    assert "lies outside the 10x10 grid; fix r / c (0..9)" in msg["outside"]
    assert "no relation word in 'is there a red square ?'; add a 'relation' field" in msg["norelation"]
    assert "mirrored pairs must share a size" in msg["mirrorsize"]
    assert "does not exist" in msg["missing"] and f"{data} item 7" in msg["missing"]
    assert list(load_results(tmp_path / "out")["case_id"]) == ["good"]


# ------------------------------------------------------------------------------------------ another family
@pytest.mark.slow
def test_tiny_llava_checkpoint_runs_the_command_with_its_own_token_grid(tmp_path):
    from hooked_vlm.tiny import tiny_hf_model
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    ckpt = tmp_path / "ckpt"
    tiny_hf_model("tiny-llava", seed=2).save_pretrained(ckpt)
    build_tiny_tokenizer().save_pretrained(ckpt)
    (tmp_path / "data").mkdir()
    rows = []
    for i, (ra, ca, rb, cb) in enumerate([(0, 0, 1, 1), (1, 1, 0, 0)]):
        image = Image.new("RGB", (56, 56), (200, 200, 220))
        image.paste((220, 30, 30), (ca * 28 + 6, ra * 28 + 6, ca * 28 + 22, ra * 28 + 22))
        image.paste((30, 70, 230), (cb * 28 + 6, rb * 28 + 6, cb * 28 + 22, rb * 28 + 22))
        image.save(tmp_path / "data" / f"{i}.png")
        rows.append({"id": f"c{i}", "image_path": f"{i}.png", "question": "is the red square left of the blue square ?",
                     "answer": "yes" if ca < cb else "no", "grid": 2, "patch": 28, "pair_id": "p",
                     "objects": [{"r": ra, "c": ca}, {"r": rb, "c": cb}]})
    (tmp_path / "data" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["spatial", str(tmp_path / "data" / "qa.jsonl"), "--model", str(ckpt), "--output-dir", str(tmp_path / "out"),
            "--no-progress", "--figures", "0", "--adapt-factors", "0.5", "--threads", "1"]
    assert main(argv, stdout=io.StringIO()) == 0
    results = load_results(tmp_path / "out")
    assert set(results["pooling"]) == {"area-pooled 4x4 tokens -> 2x2 cells (mass preserving)"}
    assert all(v is not None and len(v) == 2 for v in results["patch_objects"])  # 2 LLaVA layers, object cells found
