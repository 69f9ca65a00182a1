"""shapes-clip + phi: the generator, the shipped CLIP and phi, composed retrieval, and the training code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_vlm.organisms import checkpoint_dir, get_organism, is_trained
from hooked_vlm.organisms.shapes_clip import (
    BACKGROUND, COLORS, PLACES, PSEUDO_TOKEN, SIZE, caption, combos, compose_text_embeds, load_phi, pseudo_word_embeds,
    recall_at, render,
)


# ----- generator ---------------------------------------------------------------------------------------------------
def test_generator_is_deterministic_and_batches_have_distinct_combinations():
    org = get_organism("shapes-clip")
    a, b = org.generate(20, 3), org.generate(20, 3)
    assert all(np.array_equal(x.image, y.image) and x.prompt == y.prompt for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, org.generate(20, 4)[0].image)
    keys = [(e.truth["color"], e.truth["shape"], e.truth["place"]) for e in org.generate(100, 5)]
    assert len(set(keys)) == 100 and set(keys) == set(combos())


def test_pixels_match_the_annotation():
    """The shape's pixels have the named colour and their centroid lies in the named place's quadrant."""
    for e in get_organism("shapes-clip").generate(40, 6):
        t = e.truth
        mask = np.all(e.image == np.array(COLORS[t["color"]], np.uint8), axis=-1)
        assert mask.sum() > 40
        assert np.all((e.image == np.array(BACKGROUND, np.uint8)).all(-1) | mask)  # nothing else is drawn
        ys, xs = np.nonzero(mask)
        fx, fy = PLACES[t["place"]]
        assert abs(xs.mean() + 0.5 - fx * SIZE) < 6 and abs(ys.mean() + 0.5 - fy * SIZE) < 8


def test_captions_name_the_attributes_and_the_modifier_wins():
    assert caption("red", "circle", "top left") == "a red circle top left"
    assert caption("red", "circle", "top left", 2, decoy="blue") == "a photo of a blue circle top left that is red"
    with pytest.raises(ValueError, match="caption style must be 0, 1 or 2"):
        caption("red", "circle", "top left", 5)
    for e in get_organism("shapes-clip").generate(30, 7):
        words = e.prompt.split()
        colour = words[-1] if e.truth["style"] == 2 else [w for w in words if w in COLORS][0]
        assert colour == e.truth["color"]


def test_recall_at_counts_ties_against_the_target():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.5, 0.5, 0.2], [0.1, 0.2, 0.3]])
    targets = torch.tensor([0, 1, 0])
    assert recall_at(scores, targets, 1).tolist() == [True, False, False]
    assert recall_at(scores, targets, 2).tolist() == [True, True, False]


def test_pseudo_word_replaces_exactly_one_position():
    ids = torch.tensor([[0, 5, 7, 1], [0, 7, 5, 1]])
    emb = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    words = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    out = pseudo_word_embeds(emb, ids, 7, words)
    expected = emb.clone()
    expected[0, 2], expected[1, 1] = words[0], words[1]
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="exactly once"):
        pseudo_word_embeds(emb, torch.tensor([[0, 5, 5, 1], [0, 7, 7, 1]]), 7, words)


# ----- shipped checkpoint ------------------------------------------------------------------------------------------
def _shipped():
    if not is_trained("shapes-clip"):
        pytest.fail(f"shapes-clip has no shipped checkpoint in {checkpoint_dir('shapes-clip')}; train it with "
                    "`hooked-vlm organisms train shapes-clip`")
    org = get_organism("shapes-clip")
    return (org, *org.load(checkpoint_dir("shapes-clip")))


@pytest.mark.slow
def test_checkpoint_loads_in_transformers_and_hooked_vlm_and_they_agree():
    """Image, text and composed (pseudo-word) embeddings of transformers' CLIPModel and the hooked CLIP agree."""
    from hooked_vlm import HookedVLM

    org, hf, tok, phi = _shipped()
    hooked = HookedVLM.from_pretrained(checkpoint_dir("shapes-clip"), dtype=torch.float32)
    ex = org.generate(6, 11)
    pv = org.pixel_values([e.image for e in ex])
    t = org.text_inputs([e.prompt for e in ex], tok)
    q = org.text_inputs([f"a photo of {PSEUDO_TOKEN} that is blue"] * 6, tok)
    pid = tok.convert_tokens_to_ids(PSEUDO_TOKEN)
    with torch.no_grad():
        img_hf, img_ours = hf.get_image_features(pixel_values=pv).pooler_output, hooked.encode_image(pv)
        txt_hf, txt_ours = hf.get_text_features(**t).pooler_output, hooked.encode_text(**t)
        words = phi(img_hf)
        comp_hf = compose_text_embeds(hf, q["input_ids"], q["attention_mask"], pid, words)
        hook = ("text.hook_token_embed", lambda x, hook: pseudo_word_embeds(x, q["input_ids"], pid, words))
        with hooked.hooks(fwd_hooks=[hook]):
            comp_ours = hooked.encode_text(**q)
    for ours, ref in ((img_ours, img_hf), (txt_ours, txt_hf), (comp_ours, comp_hf)):
        assert (ours - ref).abs().max().item() <= 1e-4
    assert (comp_hf - hf.get_text_features(**q).pooler_output).abs().max() > 1e-2  # the pseudo-word really went in


@pytest.mark.slow
def test_retrieval_and_composed_retrieval_are_above_threshold_on_a_fresh_database():
    org, hf, tok, phi = _shipped()
    acc = org.measure(hf, tok, phi, seed=9_000_001)
    assert acc["retrieval_r1"].accuracy >= 0.85, acc
    assert acc["composed_r5"].accuracy >= 0.5, acc


@pytest.mark.slow
def test_sixty_training_steps_from_scratch_lower_the_loss_below_chance(tmp_path, monkeypatch):
    org = get_organism("shapes-clip")
    monkeypatch.setattr(type(org), "batch_size", 32)
    # CLIP's symmetric InfoNCE sits at chance (ln 32) for its first ~30 steps, so this run takes 60
    result = org.train(tmp_path / "clip", steps=60, phi_steps=5, eval_n=0, log_every=0)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.1, result.losses
    assert np.mean(result.losses[-5:]) < np.log(32) - 0.1, result.losses  # below chance for a batch of 32
    assert (tmp_path / "clip" / "phi" / "model.safetensors").is_file()
    load_phi(tmp_path / "clip")  # loads with strict key matching
