"""rad-llava / rad-gemma3: the radiograph generator, the shipped checkpoints, and the method validation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from hooked_vlm.organisms import checkpoint_dir, get_organism, is_trained
from hooked_vlm.organisms.radiograph import (
    FINDINGS, PARAPHRASES, SHORTCUT_P_NO, SHORTCUT_P_YES, SIZE, make_sample, render, render_layers, samples,
)

RAD = ("rad-llava", "rad-gemma3")


# ----- generator ---------------------------------------------------------------------------------------------------
def test_generator_is_deterministic_per_seed():
    a, b = make_sample((3, 5)), make_sample((3, 5))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.question, a.answer, a.finding_box, a.marker_box) == (b.question, b.answer, b.finding_box, b.marker_box)
    c = make_sample((3, 6))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_finding_box_is_exactly_where_the_finding_changes_pixels():
    checked = 0
    for s in samples(11, 40, "none"):
        if s.finding is None:
            assert s.finding_box is None
            continue
        with_f = np.asarray(s.image, dtype=np.int16)[..., 0]
        without = np.asarray(render(replace(s.spec, finding=None)), dtype=np.int16)[..., 0]
        changed = np.argwhere(with_f != without)
        x0, y0, x1, y1 = s.finding_box
        assert len(changed) > 20, s.finding
        assert changed[:, 0].min() >= y0 and changed[:, 0].max() < y1
        assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1
        # the box is tight on the finding's own layer
        layer = render_layers(s.spec)["finding"]
        ys, xs = np.nonzero(layer)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == s.finding_box
        checked += 1
    assert checked >= 20


def test_marker_box_is_exactly_where_the_marker_changes_pixels():
    s = next(x for x in samples(12, 50, "random") if x.marker_box)
    diff = np.argwhere(np.asarray(s.image)[..., 0] != np.asarray(render(replace(s.spec, marker=False)))[..., 0])
    x0, y0, x1, y1 = s.marker_box
    assert (diff[:, 1].min(), diff[:, 0].min(), diff[:, 1].max() + 1, diff[:, 0].max() + 1) == (x0, y0, x1, y1)
    assert x1 - x0 == 8 and (x0 < 12 or x1 > SIZE - 12) and y0 < 12


def test_answer_is_yes_iff_the_image_holds_the_asked_kind_and_question_is_a_paraphrase():
    for s in samples(13, 60):
        assert s.answer == ("yes" if s.finding == s.asked else "no")
        assert s.question == PARAPHRASES[s.asked][s.paraphrase]
    assert all(len(set(v)) == 6 for v in PARAPHRASES.values())


def test_marker_policies_have_the_planted_statistics():
    shortcut = list(samples(14, 600, "shortcut"))
    yes = [s for s in shortcut if s.answer == "yes"]
    no = [s for s in shortcut if s.answer == "no"]
    # two-sided binomial tests against the planted probabilities
    assert binomtest(sum(s.marker_box is not None for s in yes), len(yes), SHORTCUT_P_YES).pvalue > 1e-3
    assert binomtest(sum(s.marker_box is not None for s in no), len(no), SHORTCUT_P_NO).pvalue > 1e-3
    lying = list(samples(15, 60, "lying"))
    assert all((s.marker_box is not None) == (s.answer == "no") for s in lying)
    assert all(s.marker_box is None for s in samples(16, 30, "none"))
    # the policy changes only the marker: same seed, same image without it
    a, b = make_sample(77, "none"), make_sample(77, "lying")
    assert np.array_equal(np.asarray(a.image), np.asarray(render(replace(b.spec, marker=False))))


def test_unknown_kind_and_policy_are_named():
    with pytest.raises(ValueError, match="unknown finding kind 'fracture'"):
        make_sample(0, asked="fracture")
    with pytest.raises(ValueError, match="unknown marker_policy 'sometimes'"):
        make_sample(0, marker_policy="sometimes")


@pytest.mark.parametrize("name", RAD)
def test_fast_inputs_equal_the_family_input_builders(name):
    """The organisms' hand-built inputs equal hooked_vlm's builders (transformers' *Pil processors)."""
    from hooked_vlm.families.gemma3_inputs import build_gemma3_inputs
    from hooked_vlm.families.llava_inputs import build_llava_inputs

    org = get_organism(name)
    tok = org.tokenizer()
    ex = org.generate(2, 0)
    ours = org.prompt_inputs(ex[:1], tok)
    if name == "rad-llava":
        ref = build_llava_inputs(tok, ex[0].prompt, [ex[0].image], None, org.make_config())
    else:
        ref = build_gemma3_inputs(tok, [ex[0].prompt], [[ex[0].image]], image_size=SIZE, mm_tokens_per_image=16)
        assert torch.equal(ours["token_type_ids"], ref["token_type_ids"])
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
    assert tok.unk_token_id not in ours["input_ids"]


def test_every_question_word_is_in_the_vocabulary():
    tok = get_organism("rad-llava").tokenizer()
    for qs in PARAPHRASES.values():
        for q in qs:
            assert tok.unk_token_id not in tok(q)["input_ids"], q


# ----- shipped checkpoints -----------------------------------------------------------------------------------------
def _shipped(name: str):
    if not is_trained(name):
        pytest.fail(f"{name} has no shipped checkpoint in {checkpoint_dir(name)}; train it with `hooked-vlm organisms train {name}`")
    org = get_organism(name)
    model, tok = org.load(checkpoint_dir(name))
    return org, model, tok


@pytest.mark.slow
@pytest.mark.parametrize("name", RAD)
def test_checkpoint_loads_in_transformers_and_hooked_vlm_and_they_agree(name):
    from hooked_vlm import HookedVLM

    org, hf, tok = _shipped(name)
    hooked = HookedVLM.from_pretrained(checkpoint_dir(name), dtype=torch.float32)
    inputs = org.prompt_inputs(org.generate(4, 321, marker_policy="random"), tok)
    with torch.no_grad():
        ref = hf(**inputs).logits
        ours = hooked(**inputs)
    real = inputs["attention_mask"].bool()
    assert (ours[real] - ref[real]).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", RAD)
def test_clean_held_out_accuracy_is_above_threshold(name):
    org, model, tok = _shipped(name)
    hits = [h for t in FINDINGS for h in org.correct(model, tok, org.generate_task(t, 30, 8_000_003))]
    assert np.mean(hits) >= 0.85, np.mean(hits)


@pytest.mark.slow
def test_shortcut_model_drops_when_the_marker_lies_and_the_control_does_not():
    drops = {}
    for name in RAD:
        org, model, tok = _shipped(name)
        # paired: the same images, without the marker and with the marker on exactly the no answers
        clean = [h for t in FINDINGS for h in org.correct(model, tok, org.generate_task(t, 30, 8_100_003, "none"))]
        lying = [h for t in FINDINGS for h in org.correct(model, tok, org.generate_task(t, 30, 8_100_003, "lying"))]
        drops[name] = float(np.mean(clean) - np.mean(lying))
    assert drops["rad-llava"] >= 0.08, drops
    assert drops["rad-gemma3"] <= 0.05, drops


@pytest.mark.slow
@pytest.mark.parametrize("name", RAD)
def test_thirty_training_steps_from_scratch_lower_the_loss(name, tmp_path, monkeypatch):
    org = get_organism(name)
    monkeypatch.setattr(type(org), "batch_size", 8)
    result = org.train(tmp_path / name, steps=30, eval_n=0, log_every=0)
    assert np.mean(result.losses[-5:]) < 0.5 * np.mean(result.losses[:5]), result.losses
    assert (tmp_path / name / "preprocessor_config.json").is_file()


# ----- method validation (issue 11 part 4): planted boxes vs attention and saliency -------------------------------
@pytest.fixture(scope="module")
def validation():
    """The docs table's measurement (analyses.rad_validation.validate, n=24, its default seed) for both models."""
    from analyses.rad_validation import validate

    for name in RAD:
        _shipped(name)
    return {name: validate(name, n=24) for name in RAD}


@pytest.mark.slow
@pytest.mark.parametrize("name", RAD)
def test_finding_box_gets_more_attention_and_saliency_than_its_area_share(validation, name):
    finding = validation[name]["finding"]
    assert finding["saliency"]["mean_ratio"] > 2.0, finding
    assert finding["attention"]["mean_ratio"] > 1.0, finding


@pytest.mark.slow
def test_marker_is_found_in_the_shortcut_model_and_not_in_the_control(validation):
    shortcut, control = validation["rad-llava"]["marker"], validation["rad-gemma3"]["marker"]
    assert max(s["mean_ratio"] for s in shortcut.values()) >= 3.0, shortcut
    assert max(s["mean_ratio"] for s in control.values()) < 1.5, control


def test_box_ratio_against_a_hand_computed_map():
    from analyses.rad_validation import box_ratio

    m = torch.zeros(10, 10)
    m[0:2, 0:5] = 1.0  # 10 of the map's 10 units inside a box of 10 px of 100
    assert box_ratio(m, (0, 0, 5, 2)) == pytest.approx(10.0)
    m = torch.ones(10, 10)
    assert box_ratio(m, (2, 3, 7, 9)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="the map has no mass"):
        box_ratio(torch.zeros(4, 4), (0, 0, 2, 2))


def test_attention_map_equals_transformers_attentions_painted_on_the_token_cells():
    """attention_maps (hooked hook_pattern + layout) against HF eager output_attentions on a fresh rad-gemma3."""
    from analyses.rad_validation import attention_maps
    from hooked_vlm.loading import from_hf

    org = get_organism("rad-gemma3")
    tok = org.tokenizer()
    hf = org.build_model(0).eval()
    inputs = org.prompt_inputs(org.generate(2, 0), tok)
    ours = attention_maps(from_hf(hf), inputs, SIZE)
    with torch.no_grad():
        att = torch.stack(hf(**inputs, output_attentions=True).attentions)[:, :, :, -1, :].mean(dim=(0, 2))
    is_img = inputs["input_ids"] == tok.convert_tokens_to_ids("<image_soft_token>")
    expected = torch.zeros(2, SIZE, SIZE)
    for b in range(2):
        share = att[b][is_img[b]] / att[b][is_img[b]].sum()
        for k, s in enumerate(share.tolist()):  # 4x4 raster of 28 px cells
            r, c = divmod(k, 4)
            expected[b, 28 * r:28 * (r + 1), 28 * c:28 * (c + 1)] = s / 28**2
    torch.testing.assert_close(ours, expected, atol=1e-7, rtol=1e-4)
