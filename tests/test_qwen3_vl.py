"""Hooked Qwen3-VL against transformers' Qwen3VLForConditionalGeneration (same weights, fp32, eager).

Logits agree to ~1e-6 on every case (images, a non-square grid that resamples the position table, several images,
videos written as timestamped slices, image + video, left / right padding); TOL = 2e-5. ``tiny-qwen3-vl`` takes
DeepStack features after vision blocks 0 and 1 and adds them after LM blocks 0 and 1 of 3.
"""

from __future__ import annotations

import pytest
import torch

from hooked_vlm.errors import InputError
from hooked_vlm.layout import IMAGE, SPECIAL, TEXT, VIDEO

from helpers.family_checks import cli_inspect, reload_saved, same_logits, stats_rows_match_pattern, tiny_pair
from helpers.family_checks import max_logit_diff as max_diff
from helpers.qwen3_cases import CASES, IMG, PADID, VID, image_block, make, video_block

TOL = 2e-5


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("tiny-qwen3-vl", seed=0)


# ----------------------------------------------------------------------------------------------- equivalence
def test_logits_match_transformers_on_every_input_kind(pair):
    hf, model = pair
    diffs = {name: max_diff(hf, model, case()) for name, case in CASES.items()}
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("name", ["video", "image_and_video", "padded_right"])
def test_position_ids_match_get_rope_index(pair, name):
    hf, model = pair
    inputs = CASES[name]()
    ref, deltas = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
                                          inputs.get("video_grid_thw"), inputs["attention_mask"])
    lay = model.layout(**inputs)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(lay.position_ids[:, valid], ref[:, valid])
    assert torch.equal(lay.rope_deltas, deltas.flatten())


def test_image_and_deepstack_features_match_transformers(pair):
    """vision.hook_out is transformers' pooler_output and blocks.{k}.hook_deepstack its k-th DeepStack feature, at the
    visual positions in sequence order (zeros elsewhere)."""
    hf, model = pair
    inputs = CASES["two_images"]()
    with torch.no_grad():
        ref = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n in ("vision.hook_out", "blocks.0.hook_deepstack", "blocks.1.hook_deepstack"))
    assert (cache["vision.hook_out"][0] - torch.cat(ref.pooler_output)).abs().max() <= 1e-5
    visual = model.layout(**inputs).item[0] >= 0
    for k in range(2):
        added = cache[f"blocks.{k}.hook_deepstack"][0]
        assert (added[visual] - torch.cat(ref.deepstack_features[k])).abs().max() <= 1e-5
        assert torch.equal(added[~visual], torch.zeros_like(added[~visual]))
    assert "blocks.2.hook_deepstack" not in model.hook_dict  # only the first len(deepstack_visual_indexes) blocks


@pytest.mark.parametrize("name", ["image", "padded_left"])
def test_generate_matches_transformers(pair, name):
    hf, model = pair
    inputs = CASES[name]()
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=PADID, eos_token_id=None)
    assert torch.equal(ref, model.generate(max_new_tokens=5, **inputs))


# ----------------------------------------------------------------------------------------------- hooks
def test_every_hook_fires_and_the_residual_decomposes_exactly(pair):
    _, model = pair
    inputs = CASES["image_and_video"]()
    model.set_use_attn_result(True)
    try:
        logits, cache = model.run_with_cache(**inputs)
    finally:
        model.set_use_attn_result(False)
    from hooked_vlm.families.qwen3_vl import FAMILY
    from hooked_vlm.families.registry import expand_hooks

    declared = expand_hooks(FAMILY.hooks, model.cfg.n_layers, len(model.vision.blocks))
    missing = [n for n in declared if n not in cache.keys()]
    assert not missing, missing
    c, (b, length) = model.cfg, inputs["input_ids"].shape
    assert tuple(cache["blocks.2.attn.hook_result"].shape) == (b, length, c.n_heads, c.d_model)
    assert (cache["blocks.1.attn.hook_result"].sum(2) - cache["blocks.1.hook_attn_out"]).abs().max() < 1e-5
    assert tuple(cache["vision.blocks.1.attn.hook_pattern"].shape)[:2] == (b, 2)
    n = c.n_layers
    final = cache[f"blocks.{n - 1}.hook_resid_post"]
    without = cache["hook_embed"] + sum(cache[f"blocks.{i}.hook_attn_out"] + cache[f"blocks.{i}.hook_mlp_out"] for i in range(n))
    deepstack = cache["blocks.0.hook_deepstack"] + cache["blocks.1.hook_deepstack"]
    assert (without + deepstack - final).abs().max() < 1e-5 and (without - final).abs().max() > 1e-3
    stack, labels = cache.decompose_resid(layer=n, return_labels=True)
    assert labels[:5] == ["embed", "0_attn_out", "0_mlp_out", "0_deepstack", "1_attn_out"] and len(labels) == 1 + 3 * 2 + 2
    assert (stack.sum(0) - final).abs().max() < 1e-5
    # decomposition at an inner layer: the residual entering block 2 (after block 1's DeepStack addition)
    assert (cache.decompose_resid(layer=2).sum(0) - cache["blocks.2.hook_resid_pre"]).abs().max() < 1e-5
    with torch.no_grad():
        assert (model.unembed(model.ln_final(final)) - logits).abs().max() < 1e-5


def test_deepstack_matters_and_its_hook_edits_take_effect(pair):
    _, model = pair
    inputs = CASES["image"]()
    with torch.no_grad():
        base = model(**inputs)
        no_deepstack = model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.hook_deepstack", lambda x, hook: torch.zeros_like(x)),
                                                                  ("blocks.1.hook_deepstack", lambda x, hook: torch.zeros_like(x))])
    assert (no_deepstack - base).abs().max() > 1e-3


def test_interleaved_mrope_uses_each_axis():
    """Frequency j takes H when j % 3 == 1 (< 3 s_H), W when j % 3 == 2 (< 3 s_W), else T (sections [2, 3, 3])."""
    from hooked_vlm.families.qwen3_vl.model import interleaved_mrope_cos_sin

    inv_freq = torch.arange(1, 9).float()
    pos = torch.tensor([[[1]], [[10]], [[100]]])  # T=1, H=10, W=100 at one position
    cos, _ = interleaved_mrope_cos_sin(pos, inv_freq, [2, 3, 3])
    angle = torch.acos(cos[0, 0, :8].clamp(-1, 1))
    expected_pos = torch.tensor([1, 10, 100, 1, 10, 100, 1, 10]).float()  # j = 0..7: T H W T H W T H
    assert torch.allclose(torch.cos(expected_pos * inv_freq), cos[0, 0, :8], atol=1e-6)
    assert angle.shape == (8,)


# ----------------------------------------------------------------------------------------------- layout
def test_video_layout_separates_timestamped_slices(pair):
    _, model = pair
    inputs = CASES["image_and_video"]()
    lay = model.layout(**inputs)
    ids = inputs["input_ids"][0]
    assert lay.kind[0, ids == IMG].eq(IMAGE).all() and lay.kind[0, ids == VID].eq(VIDEO).all()
    assert lay.kind[0, ids == 102].eq(SPECIAL).all() and lay.kind[0, ids == 70].eq(TEXT).all()
    vid = lay.videos()[0]
    assert vid.merged_grid == (2, 1, 2) and vid.pixel_size == (28, 56)
    slices = [lay.positions(video=0, frame=f) for f in range(2)]
    video_positions = (ids == VID).nonzero().flatten()
    assert torch.equal(torch.cat(slices), video_positions) and int(slices[1][0]) - int(slices[0][-1]) == 5  # end, 2 stamp, start
    assert lay.cell(0, 1, video=0, frame=1) == int(slices[1][1])  # looked up across the timestamp gap
    frames = lay.group_ids("frame")[0]
    assert frames[slices[0]].unique().tolist() == [1] and frames[slices[1]].unique().tolist() == [2]  # image is frame group 0
    _, rows = lay.vision_rows(video=0, frame=1)
    assert rows.tolist() == list(range(24, 32))  # after the image's 16 patches and the video's first slice (8)


def test_layout_matches_the_processor(pair):
    """Images: Qwen3VLProcessor (the image processor with Qwen3-VL's geometry; its video processor needs torchvision)
    and build_qwen3_vl_inputs give the same ids, types and pixels. Videos: our timestamped block is the processor's
    own replace_video_token text. The model matches transformers on the processor's output."""
    import numpy as np
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin
    from transformers.video_utils import VideoMetadata

    from hooked_vlm.families.qwen3_vl.preprocess import build_qwen3_vl_inputs, slice_timestamps
    from hooked_vlm.families.qwen3_vl.preprocess import video_block as text_video_block
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    class ImageOnlyProcessor(Qwen3VLProcessor):  # torchvision-free: no video processor
        def __init__(self, image_processor, tokenizer):
            for name in ("image_token", "video_token", "vision_start_token", "vision_end_token"):
                setattr(self, name, getattr(tokenizer, name))
                setattr(self, name + "_id", tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)))
            ProcessorMixin.__init__(self, image_processor, tokenizer)

    hf, model = pair
    tok = build_tiny_tokenizer()
    image_proc = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56,
                                          max_pixels=28 * 28 * 16, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = ImageOnlyProcessor(image_proc, tok)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (50, 90, 3), dtype=np.uint8), rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)]
    marked = "what <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|> ?"
    ref = proc(text=[marked], images=imgs, return_tensors="pt")
    ours = build_qwen3_vl_inputs(tok, "what <image> and <image> ?", imgs, patch_size=14, max_pixels=28 * 28 * 16)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(ref[key], ours[key]), key
    assert torch.allclose(ref["pixel_values"], ours["pixel_values"])
    lay = model.layout(**ours)
    assert [lay.positions(image=i).tolist() for i in range(2)] == [
        (ref["input_ids"][0] == IMG).nonzero().flatten().tolist()[: ref["image_grid_thw"][0].prod() // 4],
        (ref["input_ids"][0] == IMG).nonzero().flatten().tolist()[ref["image_grid_thw"][0].prod() // 4 :],
    ]
    assert max_diff(hf, model, {k: ref[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")}) <= TOL
    # video text: 4 frames at 2 fps -> 2 slices at 0.25 s and 1.25 s, as the processor writes them
    proc.video_processor = type("VP", (), {"merge_size": 2, "temporal_patch_size": 2})()
    meta = VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3])
    expected = proc.replace_video_token({"video_grid_thw": torch.tensor([[2, 4, 4]]), "video_metadata": [meta]}, video_idx=0)
    tokens = {"video": tok.video_token, "vision_start": tok.vision_start_token, "vision_end": tok.vision_end_token}
    assert text_video_block(2, 4, slice_timestamps(2, 2.0), tokens) == expected


def test_builder_video_runs_and_matches_transformers(pair):
    """build_qwen3_vl_inputs with a 4-frame video (two timestamped slices) and an image, batched with padding."""
    import numpy as np

    from hooked_vlm.families.qwen3_vl.preprocess import build_qwen3_vl_inputs
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    hf, model = pair
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (4, 56, 84, 3), dtype=np.uint8)
    img = rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)
    inputs = build_qwen3_vl_inputs(build_tiny_tokenizer(), ["describe <video> and <image> .", "what moves ?"], [img], [frames],
                                   patch_size=14, video_min_pixels=56 * 56, fps=2.0)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]] and int((inputs["input_ids"] == VID).sum()) == 12
    assert max_diff(hf, model, inputs) <= TOL


def test_attention_statistics_path_matches_the_pattern(pair):
    _, model = pair
    inputs = CASES["padded_right"]()
    lay = model.layout(**inputs)
    rows = torch.stack([lay.last_token(), lay.last_token() - 1], dim=1)
    stats = stats_rows_match_pattern(model, inputs, rows, lay.group_ids("frame"))
    for layer in range(model.cfg.n_layers):
        region = stats[f"blocks.{layer}.attn.hook_region"]  # B H 1 n_frame_groups: mass of all queries per frame group
        assert region.shape[-1] == 3 and (region >= 0).all()


# ----------------------------------------------------------------------------------------------- errors, loading
def test_bad_inputs_raise_clear_errors(pair):
    _, model = pair
    good = CASES["video"]()
    joined = make([[0, 5, 102] + [VID] * 12 + [103, 7]], videos=[(3, 4, 4)])  # three slices as one run
    with pytest.raises(InputError, match="slices 0 and 1 are one run of placeholders"):
        model(**joined)
    with pytest.raises(InputError, match="needs the pixel inputs as well"):
        feats = model.encode_vision(**good)
        model(**{k: v for k, v in good.items() if k != "pixel_values_videos"}, vision_features=feats)
    with pytest.raises(InputError, match="mm_token_type_ids disagrees"):
        model(**dict(good, mm_token_type_ids=torch.zeros_like(good["input_ids"])))
    with pytest.raises(InputError, match="found 12 video placeholder tokens"):
        model(**dict(good, video_grid_thw=torch.tensor([[2, 4, 4]]), pixel_values_videos=good["pixel_values_videos"][:32]))
    extra = make([[0] + image_block(2, 2) + video_block(1, 2, 2)], images=[(2, 2)], videos=[(1, 2, 2)])
    with torch.no_grad():
        model(**extra)  # a one-slice video right after an image is fine


def test_vision_features_replace_the_merged_features_only(pair):
    _, model = pair
    inputs = CASES["image"]()
    with torch.no_grad():
        feats = model.encode_vision(**inputs)
        base = model(**inputs)
        assert torch.equal(model(**inputs, vision_features=feats), base)
        edited = model(**inputs, vision_features=feats * 0)
    assert (edited - base).abs().max() > 1e-3


def test_from_pretrained_round_trip(pair, tmp_path):
    from hooked_vlm.families.qwen3_vl import HookedQwen3VL

    hf, model = pair
    assert same_logits(reload_saved(hf, tmp_path, HookedQwen3VL), model, CASES["video"]())


def test_cli_inspect_runs_on_tiny_qwen3_vl(tmp_path):
    code, text, saved = cli_inspect(tmp_path, "tiny-qwen3-vl", "blocks.0.hook_deepstack", "--image", "synthetic",
                                    "--video", "synthetic")
    assert code == 0 and "image 0: 1 slice(s) x 4x4 cells of 28px" in text and "video 0: 4 slice(s) x 2x2 cells" in text
    assert saved.shape[0] == 1 and saved.shape[2] == 64
