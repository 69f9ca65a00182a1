"""Hooked LLaVA-1.5 / LLaVA-Med / LLaVA-NeXT / LLaVA-OneVision / LLaVA-NeXT-Video equal transformers' classes.

Tiny random models (hooked_vlm.tiny, eager attention, fp32); logits compared at non-padding positions
(max |diff| <= 1e-4), greedy generate == HF generate, hooks fire with the documented shapes, vision edits reach
the logits, token layouts describe crops / newlines / frames, and bad inputs raise InputError.
"""

from __future__ import annotations

import json

import pytest
import torch

from hooked_vlm.errors import InputError
from helpers.llava_cases import IMG, PAD, VID, case, left_pad, next_tokens, px
from hooked_vlm.families.llava_inputs import BASE, CLS, FRAME, GRID, NEWLINE, expand_placeholders, image_tokens

torch.set_num_threads(1)
TOL = 1e-4


# ----- fixtures and inputs -----------------------------------------------------------------------------------------
_PAIRS: dict = {}


def pair(name: str, **overrides):
    """(hf, hooked) with identical weights, cached per (name, overrides)."""
    key = (name, json.dumps(overrides, sort_keys=True, default=str))
    if key not in _PAIRS:
        from hooked_vlm.loading import from_hf
        from hooked_vlm.tiny import tiny_hf_model

        hf = tiny_hf_model(name, seed=0, **overrides)
        _PAIRS[key] = (hf, from_hf(hf))
    return _PAIRS[key]


def hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(**inputs).logits


def assert_close(hf, model, inputs, tol=TOL):
    ref = hf_logits(hf, inputs)
    with torch.no_grad():
        ours = model(**inputs)
    assert ours.shape == ref.shape
    am = inputs.get("attention_mask")
    if am is not None:
        ref, ours = ref[am.bool()], ours[am.bool()]
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"max |diff| {diff:.2e}"
    return diff


FAMILY_ARGS = {
    "tiny-llava": ("tiny-llava", {}),
    "tiny-llava-med": ("tiny-llava", {"text": "mistral", "text_overrides": {"sliding_window": 6}}),
    "tiny-llava-next": ("tiny-llava-next", {}),
    "tiny-llava-onevision": ("tiny-llava-onevision", {}),
    "tiny-llava-next-video": ("tiny-llava-next-video", {}),
    "tiny-llava-dinov2": ("tiny-llava-dinov2", {}),
}
CASES = [
    ("tiny-llava", "text"), ("tiny-llava", "image"), ("tiny-llava", "two_images"), ("tiny-llava", "batch"),
    ("tiny-llava-med", "image"), ("tiny-llava-med", "batch"), ("tiny-llava-dinov2", "image"), ("tiny-llava-dinov2", "batch"),
    ("tiny-llava-next", "image"), ("tiny-llava-next", "two_images"), ("tiny-llava-next", "batch"),
    ("tiny-llava-onevision", "image"), ("tiny-llava-onevision", "video"), ("tiny-llava-onevision", "image_video"),
    ("tiny-llava-onevision", "multi_image"), ("tiny-llava-onevision", "batch"),
    ("tiny-llava-next-video", "video"), ("tiny-llava-next-video", "image_video"), ("tiny-llava-next-video", "batch"),
]


def family_pair(family):
    name, kw = FAMILY_ARGS[family]
    return pair(name, **kw)


# ----- equivalence ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,name", CASES)
def test_logits_match_hf(family, name):
    hf, model = family_pair(family)
    assert_close(hf, model, case(family, name, model))


def test_mistral_sliding_window_is_active():
    """LLaVA-Med's Mistral decoder with a 6-token window: the mask differs from plain causal and still matches HF."""
    hf, model = family_pair("tiny-llava-med")
    assert model.cfg.layer_types == ["sliding_attention"] * 2
    inputs = case("tiny-llava-med", "image", model)
    masks = model._prepare(dict(inputs), None).masks
    assert masks["sliding_attention"].window == 6
    hf_full = pair("tiny-llava", text="mistral", text_overrides={"sliding_window": None})[0]
    assert not torch.allclose(hf_logits(hf, inputs), hf_logits(hf_full, inputs), atol=1e-4)


@pytest.mark.parametrize("layers,strategy", [([-2, -1], "default"), ([0, -1], "full"), (-1, "full")])
def test_feature_layers_and_strategy(layers, strategy):
    hf, model = pair("tiny-llava", vision_feature_layer=layers, vision_feature_select_strategy=strategy)
    inputs = case("tiny-llava", "image", model)
    assert model.geometry().tokens_per_crop == (17 if strategy == "full" else 16)
    assert_close(hf, model, inputs)
    # the selected features are visible at projector.hook_in and equal HF's selection
    _, cache = model.run_with_cache(**inputs, names_filter=["projector.hook_in"])
    with torch.no_grad():
        hs = hf.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    ls = [layers] if isinstance(layers, int) else layers
    want = torch.cat([hs[i][:, (1 if strategy == "default" else 0):] for i in ls], dim=-1)
    assert (cache["projector.hook_in"] - want).abs().max() < 1e-5


def test_per_call_feature_layer_override():
    hf, model = pair("tiny-llava")
    inputs = case("tiny-llava", "image", model)
    with torch.no_grad():
        ref = hf(**inputs, vision_feature_layer=-1).logits
        ours = model(**inputs, vision_feature_layer=-1)
        default = model(**inputs)
    assert (ours - ref).abs().max() <= TOL
    assert (ours - default).abs().max() > 1e-4


def test_onevision_anyres_max_interpolation():
    """A large grid (4x4 crops -> 8x8 patches > 9 crops' worth) is bilinearly shrunk as in transformers."""
    pins = [[28, 28], [56, 56], [112, 112]]
    hf, model = pair("tiny-llava-onevision", image_grid_pinpoints=pins)
    size = (110, 112)
    geom = model.geometry()
    _, _, rows, cols = geom.unpadded(size)
    target = geom.interpolated(rows, cols)
    assert target is not None and target[0] < rows
    n = image_tokens(geom, size)
    assert n == 4 + target[0] * (target[1] + 1)
    inputs = dict(input_ids=torch.tensor([[0, 5] + [IMG] * n + [6]]), pixel_values=px(1, 17, 3, 28, 28, seed=20),
                  image_sizes=torch.tensor([list(size)]))
    assert_close(hf, model, inputs)
    lay = model.layout(**inputs)
    assert int((lay.part[0] == NEWLINE).sum()) == target[0]


def test_next_accepts_concatenated_crops():
    """transformers also takes a 4-D stack of every image's crops (no padding crops) with image_sizes."""
    hf, model = family_pair("tiny-llava-next")
    inputs = case("tiny-llava-next", "two_images", model)
    n2 = model.geometry().n_crops(tuple(inputs["image_sizes"][1].tolist()))
    flat = dict(inputs, pixel_values=torch.cat([inputs["pixel_values"][0], inputs["pixel_values"][1, :n2]]))
    assert_close(hf, model, flat)


@pytest.mark.parametrize("mode", ["max", "conv"])
def test_next_video_pool_modes(mode):
    hf, model = pair("tiny-llava-next-video", spatial_pool_mode=mode)
    assert_close(hf, model, case("tiny-llava-next-video", "video", model))


def test_bf16_within_bf16_tolerance():
    from hooked_vlm.loading import from_hf

    hf, _ = family_pair("tiny-llava-onevision")
    model16 = from_hf(hf, dtype=torch.bfloat16)
    inputs = case("tiny-llava-onevision", "image_video", model16)
    ref = hf_logits(hf, inputs)
    with torch.no_grad():
        ours = model16(**{k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inputs.items()})
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref).abs().max() <= 0.05 * ref.abs().max() + 0.02


def test_derived_image_sizes_when_omitted():
    hf, model = family_pair("tiny-llava-next")
    inputs = case("tiny-llava-next", "two_images", model)
    ref = hf_logits(hf, inputs)
    no_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with torch.no_grad():
        ours = model(**no_sizes)
    assert (ours - ref).abs().max() <= TOL


# ----- generate -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,name", [("tiny-llava", "batch"), ("tiny-llava-med", "image"), ("tiny-llava-next", "image"),
                                         ("tiny-llava-onevision", "image_video"), ("tiny-llava-next-video", "video")])
def test_generate_matches_hf(family, name):
    hf, model = family_pair(family)
    inputs = case(family, name, model)
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    ours = model.generate(**inputs, max_new_tokens=5)
    assert ours.tolist() == ref.tolist()


# ----- hooks ----------------------------------------------------------------------------------------------------------
def test_hooks_fire_batch_first_and_vision_out_is_injected():
    hf, model = family_pair("tiny-llava-next")
    inputs = case("tiny-llava-next", "batch", model)
    logits, cache = model.run_with_cache(**inputs)
    ref = hf_logits(hf, inputs)
    am = inputs["attention_mask"].bool()
    assert (logits[am] - ref[am]).abs().max() <= TOL
    lay = model.layout(**inputs)
    rows = lay.meta["tower_rows"]
    geom = model.geometry()
    assert rows == sum(it.n_rows for it in lay.items) == sum(geom.n_crops(tuple(s)) for s in inputs["image_sizes"].tolist())
    spec = model.vision.spec
    assert cache["vision.blocks.0.hook_resid_post"].shape == (rows, spec.n_positions, spec.width)
    assert cache["vision.blocks.1.attn.hook_pattern"].shape == (rows, spec.n_heads, spec.n_positions, spec.n_positions)
    assert cache["projector.hook_in"].shape == (rows, spec.grid**2, spec.width)
    assert cache["projector.hook_out"].shape == (rows, spec.grid**2, model.cfg.d_model)
    out = cache["vision.hook_out"]
    assert out.shape[0] == 2 and out.shape[1] == max(int((lay.item[b] >= 0).sum()) for b in range(2))
    for b in range(2):  # vision.hook_out is exactly what hook_embed holds at the visual positions
        pos = (lay.item[b] >= 0).nonzero().flatten()
        assert torch.equal(cache["hook_embed"][b, pos], out[b, : pos.numel()])
    # newline positions carry the learned image_newline vector
    nl = (lay.part == NEWLINE)
    assert torch.allclose(cache["hook_embed"][nl], model.image_newline.expand(int(nl.sum()), -1))
    # residual accounting in the language model
    total = cache["hook_embed"] + sum(cache[f"blocks.{i}.hook_attn_out"] + cache[f"blocks.{i}.hook_mlp_out"] for i in range(model.cfg.n_layers))
    assert torch.allclose(total, cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"], atol=1e-5)
    # every vision block and LM block hook fired
    for name in model.hook_dict:
        standard = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_scale",
                    "hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
                    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "mlp.hook_pre", "mlp.hook_post")
        if name.startswith(("vision.blocks.", "blocks.")) and name.endswith(standard):
            assert name in cache, name


@pytest.mark.parametrize("family,layer", [("tiny-llava", -2), ("tiny-llava-onevision", -1), ("tiny-llava-dinov2", -2)])
def test_vision_block_edit_changes_logits(family, layer):
    """Zeroing the output of the block that feeds the feature layer changes logits; later blocks do not matter."""
    hf, model = family_pair(family)
    inputs = case(family, "image", model)
    depth = model.vision.depth
    fed = depth + 1 + layer  # hidden_states[layer] = hidden_states[fed] = output of block fed - 1
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    with torch.no_grad():
        clean = model(**inputs)
        edited = model.run_with_hooks(**inputs, fwd_hooks=[(f"vision.blocks.{fed - 1}.hook_resid_post", zero)])
    assert (edited - clean).abs().max() > 1e-3
    if fed < depth:  # blocks after the feature layer cannot influence the output
        with torch.no_grad():
            later = model.run_with_hooks(**inputs, fwd_hooks=[(f"vision.blocks.{fed}.hook_resid_post", zero)])
        assert torch.equal(later, clean)
    # editing the projector or vision.hook_out propagates too
    with torch.no_grad():
        p = model.run_with_hooks(**inputs, fwd_hooks=[("projector.mlp.hook_post", lambda a, hook: a * 0.5)])
    assert (p - clean).abs().max() > 1e-3


def test_truncated_tower_same_logits_fewer_hooks():
    """vision_run_all_blocks=False stops after the deepest feature layer: same logits, later blocks do not fire."""
    _, model = family_pair("tiny-llava")
    inputs = case("tiny-llava", "image", model)
    names = ["vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post"]
    full_logits, full = model.run_with_cache(**inputs, names_filter=names)
    model.vision_run_all_blocks = False
    try:
        short_logits, short = model.run_with_cache(**inputs, names_filter=names)
    finally:
        model.vision_run_all_blocks = True
    assert torch.equal(full_logits, short_logits)
    assert set(full.keys()) == set(names) and set(short.keys()) == {names[0]}


def test_vision_features_reuse_and_video_pool_hooks():
    _, model = family_pair("tiny-llava-next-video")
    inputs = case("tiny-llava-next-video", "image_video", model)
    _, cache = model.run_with_cache(**inputs, names_filter=["video_pool.hook_in", "video_pool.hook_out", "vision.hook_out"])
    spec = model.vision.spec
    assert cache["video_pool.hook_in"].shape == (4, spec.grid**2, spec.width)
    assert cache["video_pool.hook_out"].shape == (4, (spec.grid // 2) ** 2, spec.width)
    feats = model.encode_vision(**inputs)
    assert torch.equal(feats, cache["vision.hook_out"])
    with torch.no_grad():
        a = model(**inputs)
        b = model(**inputs, vision_features=feats)
    assert torch.equal(a, b)


# ----- layout --------------------------------------------------------------------------------------------------------
def test_layout_next_crops_newlines_and_cells():
    _, model = family_pair("tiny-llava-next")
    inputs = case("tiny-llava-next", "image", model)
    lay = model.layout(**inputs)
    it = lay.items[0]
    assert it.crop_grid == (2, 2) and it.n_rows == 5 and it.image_size == (30, 50)
    top, left, rows, cols = it.unpad
    assert (rows, cols) == (2, 4) and top == 1 and left == 0
    parts = lay.part[0][lay.item[0] >= 0].tolist()
    side = model.geometry().side
    assert parts[: side * side] == [BASE] * (side * side)
    assert parts[side * side :] == ([GRID] * cols + [NEWLINE]) * rows
    # grid tokens come from crops 1..4 in raster order; the unpadded rows sit in the middle of the crop grid
    grid = lay.positions(image=0, part=GRID)
    assert set(lay.crop[0, grid].tolist()) == {1, 2, 3, 4}
    assert lay.crop[0, lay.cell(0, 0, image=0, part=GRID)].item() == 1  # row 0 + top 1 -> crop row 0
    assert lay.crop[0, lay.cell(1, 3, image=0, part=GRID)].item() == 4
    assert lay.cell(1, 1, image=0) == it.start + side + 1
    assert lay.pixel_box(0, lay.cell(0, 0, image=0, part=GRID)) == (14, 0, 28, 14)
    assert lay.tower_rows(image=0).tolist() == [0, 1, 2, 3, 4]
    row, idx = lay.vision_rows(image=0, crop=3)
    assert row == 3 and idx.tolist() == [1, 2, 3, 4]  # CLS at 0 skipped
    _, cache = model.run_with_cache(**inputs, names_filter=["vision.blocks.0.hook_resid_post"])
    act = cache["vision.blocks.0.hook_resid_post"]
    assert torch.equal(lay.vision_grid(act, image=0, crop=3)[1, 0], act[3, 1 + side])
    assert "2x2 crops" in lay.summary()


def test_layout_video_frames_and_cls():
    _, model = family_pair("tiny-llava-onevision")
    lay = model.layout(**case("tiny-llava-onevision", "video", model))
    it = lay.videos()[0]
    gh, gw = model.geometry().video_grid()
    assert it.grid_thw == (4, gh, gw) and it.n_tokens == 4 * gh * gw + 1
    assert lay.positions(video=0, frame=2).numel() == gh * gw
    assert int((lay.part == FRAME).sum()) == 4 * gh * gw and int((lay.part == NEWLINE).sum()) == 1
    _, full = pair("tiny-llava", vision_feature_select_strategy="full")
    lay2 = full.layout(**case("tiny-llava", "image", full))
    assert int((lay2.part == CLS).sum()) == 1 and int((lay2.part == BASE).sum()) == 16


# ----- errors --------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    _, model = family_pair("tiny-llava")
    good = case("tiny-llava", "image", model)
    with pytest.raises(InputError, match="placeholder tokens"):
        model(input_ids=good["input_ids"][:, :-4], pixel_values=good["pixel_values"])
    with pytest.raises(InputError, match="no pixel_values"):
        model(input_ids=good["input_ids"])
    with pytest.raises(InputError, match="3 x 56 x 56"):
        model(input_ids=good["input_ids"], pixel_values=px(1, 3, 28, 28))
    with pytest.raises(InputError, match="projector"):
        model(**good, vision_feature_layer=[-2, -1])
    with pytest.raises(KeyError, match="Closest"):
        model.run_with_hooks(**good, fwd_hooks=[("vision.blocks.0.hook_resid_pots", lambda a, hook: a)])
    _, nxt = family_pair("tiny-llava-next")
    inputs = case("tiny-llava-next", "image", nxt)
    with pytest.raises(InputError, match="concatenated crops but image_sizes implies 5"):
        nxt(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:, 0], image_sizes=inputs["image_sizes"])
    with pytest.raises(InputError, match="needs image_sizes"):
        nxt(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][0])
    _, nfull = pair("tiny-llava-next", vision_feature_select_strategy="full")
    with pytest.raises(InputError, match="CLS"):
        nfull.layout(**case("tiny-llava-next", "image", nfull))
    # two images in one placeholder run: image_sizes cannot be derived -> say so
    ids = torch.tensor([[0] + [IMG] * 28 + [5]])
    with pytest.raises(InputError, match="image_sizes is required"):
        nxt(input_ids=ids, pixel_values=px(2, 5, 3, 28, 28))


# ----- loading -------------------------------------------------------------------------------------------------------
def test_from_pretrained_hf_and_original_layouts(tmp_path):
    from safetensors.torch import save_file

    from hooked_vlm import HookedVLM

    hf, model = family_pair("tiny-llava")
    inputs = case("tiny-llava", "image", model)
    ref = hf_logits(hf, inputs)
    hf.save_pretrained(tmp_path / "hf")
    loaded = HookedVLM.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        assert (loaded(**inputs) - ref).abs().max() <= TOL

    # the original LLaVA layout: Llama keys at the top, model.mm_projector.{0,2}, model.vision_tower.vision_tower.*
    sd = {}
    for k, v in hf.state_dict().items():
        if k.startswith("model.language_model."):
            sd["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.multi_modal_projector."):
            sd[k.replace("multi_modal_projector.linear_1", "mm_projector.0").replace("multi_modal_projector.linear_2", "mm_projector.2")] = v
        elif k.startswith("model.vision_tower."):
            sd["model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower."):]] = v
        else:
            sd[k] = v
    orig = tmp_path / "orig"
    orig.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(orig / "model.safetensors"))
    t = hf.config.text_config.to_dict()
    raw = {k: t[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act")}
    raw.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", mm_projector_type="mlp2x_gelu",
               mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=32,
               mm_vision_tower="openai/clip-vit-large-patch14-336", image_aspect_ratio="pad", rope_theta=10000.0)
    # (a) tower weights inside the checkpoint; the tiny tower's head count (2) cannot be read from weights
    (orig / "config.json").write_text(json.dumps(dict(raw, vision_config={"num_attention_heads": 2})))
    original = HookedVLM.from_pretrained(str(orig))
    assert original.image_token_id == -200
    n = original.geometry().tokens_per_crop
    ids, mask = expand_placeholders(torch.tensor([[0, 5, 6, -200, 7, 8]]), [n], -200)
    assert ids[0].tolist().count(-200) == n
    with torch.no_grad():
        ours = original(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"])
    assert (ours - ref).abs().max() <= TOL

    # (b) tower loaded separately (as the original code loads openai/clip-vit-large-patch14-336)
    from transformers import CLIPVisionModel

    from hooked_vlm.errors import CheckpointError
    from hooked_vlm.families.llava import HookedLlava

    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("model.vision_tower.")}, str(orig / "model.safetensors"))
    (orig / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="vision_tower="):
        HookedVLM.from_pretrained(str(orig))
    clip = CLIPVisionModel(hf.config.vision_config)
    clip.load_state_dict({k[len("model.vision_tower."):]: v for k, v in hf.state_dict().items() if k.startswith("model.vision_tower.")})
    clip.save_pretrained(tmp_path / "clip")
    separate = HookedLlava.from_original_checkpoint(str(orig), vision_tower=str(tmp_path / "clip"))
    with torch.no_grad():
        ours = separate(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"])
    assert (ours - ref).abs().max() <= TOL


def test_token_counts_match_hf_processors_at_real_geometry():
    """Our counts == the HF processors' own counting code over many image sizes (LLaVA-NeXT 336 px CLIP with the
    llava-v1.6 pinpoints; OneVision 384 px SigLIP with anyres_max_9), so nothing depends on a fixed 576."""
    from types import SimpleNamespace

    from transformers import LlavaNextProcessor, LlavaOnevisionProcessor

    from hooked_vlm.families.llava_inputs import LlavaGeometry

    next_pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    ov_pins = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    nxt = LlavaGeometry("llava_next", 336, 14, True, "default", tuple(map(tuple, next_pins)))
    ov = LlavaGeometry("llava_onevision", 384, 14, False, "full", tuple(map(tuple, ov_pins)), max_crops_anyres=9,
                       video_pool="bilinear_after")
    p_next = object.__new__(LlavaNextProcessor)
    p_next.image_processor = SimpleNamespace(image_grid_pinpoints=next_pins)
    p_next.patch_size, p_next.num_additional_image_tokens = 14, 1
    p_ov = object.__new__(LlavaOnevisionProcessor)
    p_ov.image_processor = SimpleNamespace(image_grid_pinpoints=ov_pins)
    p_ov.num_image_tokens, p_ov.vision_aspect_ratio = 27 * 27, "anyres_max_9"
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(20, 2500, (150, 2), generator=g).tolist() + [[336, 336], [480, 640], [1080, 1920], [30, 2000]]
    for h, w in sizes:
        assert image_tokens(nxt, (h, w)) == p_next._get_number_of_features(h, w, 336, 336) - 1, (h, w)
        assert image_tokens(ov, (h, w)) == p_ov._get_number_of_features(h, w, 384, 384), (h, w)
    assert nxt.tokens_per_crop == 576 and ov.video_tokens(8) == 8 * 14 * 14 + 1


@pytest.mark.parametrize("family,name,kw", [("tiny-llava-onevision", "image_video", {}), ("tiny-llava-dinov2", "image", {}),
                                            ("tiny-llava-next-video", "image_video", {"spatial_pool_mode": "conv"})])
def test_save_pretrained_round_trip(tmp_path, family, name, kw):
    """transformers' on-disk layout (``language_model.model.*``, ``vision_tower.*``, ``image_newline``, legacy DINOv2
    attention names, NeXT-Video's conv resampler) loads with the same logits."""
    from hooked_vlm import HookedVLM

    hf, model = pair(family, **kw)
    hf.save_pretrained(tmp_path)
    loaded = HookedVLM.from_pretrained(str(tmp_path))
    assert_close(hf, loaded, case(family, name, model))


def test_hf_processor_output_runs_unchanged():
    """The real LlavaNextProcessor (Pil image processor, tiny tokenizer) feeds the hooked model as is: its
    placeholder expansion agrees with our token counts and the logits match HF."""
    import numpy as np
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    hf, model = family_pair("tiny-llava-next")
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    image_grid_pinpoints=hf.config.image_grid_pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=build_tiny_tokenizer(), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (30, 50, 3), dtype=np.uint8), rng.integers(0, 255, (70, 20, 3), dtype=np.uint8)]
    inputs = dict(proc(images=images, text=["what is <|image_pad|> this ?", "describe <|image_pad|>"], return_tensors="pt", padding=True))
    assert_close(hf, model, inputs)
    lay = model.layout(**inputs)
    assert [it.image_size for it in lay.items] == [(30, 50), (70, 20)]


def test_dinov2_tower_hooks():
    """LLaVA with a DINOv2 tower (LLaVA-Rad geometry): shared blocks with layer scale, every hook batch-first."""
    _, model = family_pair("tiny-llava-dinov2")
    inputs = case("tiny-llava-dinov2", "image", model)
    _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("vision."))
    spec = model.vision.spec
    assert spec.n_positions == 17 and model.geometry().tokens_per_crop == 16
    assert cache["vision.blocks.1.attn.hook_pattern"].shape == (1, spec.n_heads, 17, 17)
    b0 = model.vision.blocks[0]
    # attn_out is already layer-scaled: resid_mid = resid_pre + attn_out exactly
    assert torch.allclose(cache["vision.blocks.0.hook_resid_mid"], cache["vision.blocks.0.hook_resid_pre"] + cache["vision.blocks.0.hook_attn_out"])
    assert b0.ln1_post.lambda1.shape == (spec.width,)


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-llava-next", "tiny-llava-onevision", "tiny-llava-next-video"])
def test_build_llava_inputs_without_torchvision(family):
    """The hand input builder (Pil image processor + our token counts; frames resized by hand) feeds both models."""
    import numpy as np

    from hooked_vlm.families.llava_inputs import build_llava_inputs
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    hf, model = family_pair(family)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)
    video = rng.integers(0, 255, (3, 40, 60, 3), dtype=np.uint8) if model.geometry().video_pool else None
    prompt = "what is <image> this" + (" and <video> that ?" if video is not None else " ?")
    inputs = build_llava_inputs(build_tiny_tokenizer(), prompt, [image], [video] if video is not None else [], hf.config)
    assert_close(hf, model, inputs)
    lay = model.layout(**inputs)
    assert len(lay.images()) == 1 and len(lay.videos()) == (1 if video is not None else 0)
