"""Hooked Gemma 3 / MedGemma against transformers' Gemma3ForConditionalGeneration (same weights, fp32, eager).

Logits agree to ~9e-7 (measured over every case, default and sensitive configs); TOL = 2e-5.

Two tiny models: ``tiny-gemma3`` (4 tokens per image, sliding window 8, 2 SigLIP blocks) and a "long image"
variant (16 tokens per image > sliding window 4, no SigLIP blocks so each token's pixel box is exact).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hooked_vlm.errors import InputError
from hooked_vlm.layout import IMAGE, PAD, SPECIAL, TEXT

from helpers.family_checks import reload_saved, same_logits, tiny_pair
from helpers.family_checks import max_logit_diff as max_diff
from helpers.gemma_cases import BOI, CASES, EOI, IMG, PADID, make, prompt

TOL = 2e-5


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("tiny-gemma3", seed=0)


@pytest.fixture(scope="module")
def long_pair():
    """16 tokens per image (pool kernel 1 on the 4x4 patch grid), window 4, no ViT blocks."""
    return tiny_pair("tiny-gemma3", seed=1, mm_tokens_per_image=16, sliding_window=4, vision_layers=0)


# ----------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(pair, name):
    hf, model = pair
    assert max_diff(hf, model, CASES[name]()) <= TOL


@pytest.fixture(scope="module")
def sensitive_pair():
    """query_pre_attn_scalar 40 != head_dim 16, rope thetas 10 (sliding) / 100 (full): see tests/helpers/sensitive.py."""
    from helpers.sensitive import sensitive_gemma3_hf

    from hooked_vlm.loading import from_hf

    hf = sensitive_gemma3_hf(seed=0)
    return hf, from_hf(hf)


@pytest.mark.parametrize("name", ["text", "image", "padded_left"])  # text: the plain-causal SDPA path of full layers
def test_logits_match_where_every_constant_matters(sensitive_pair, name):
    hf, model = sensitive_pair
    assert model.blocks[0].attn.scale == pytest.approx(40**-0.5)
    assert max_diff(hf, model, CASES[name]()) <= TOL


def test_long_image_matches_and_image_matters(long_pair):
    hf, model = long_pair
    inputs = make([prompt(1, per_image=16), prompt(1, per_image=16, pre=(9,))], 2)
    assert max_diff(hf, model, inputs) <= TOL
    # the bidirectional mask matters: transformers without token_type_ids (causal images) differs ...
    causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        ref_causal = hf(**causal).logits
        assert (ref_causal - hf(**inputs).logits).abs().max() > 1e-3
        # ... and bidirectional_images=False reproduces it
        model.bidirectional_images = False
        try:
            out = model(**inputs)
        finally:
            model.bidirectional_images = True
    assert float((ref_causal - out)[inputs["attention_mask"].bool()].abs().max()) <= TOL
    # the image reaches the logits (zero-initialised projector weights were randomised)
    other = dict(inputs, pixel_values=inputs["pixel_values"] + 1.0)
    with torch.no_grad():
        assert (model(**other) - model(**inputs)).abs().max() > 1e-3


def test_image_features_match_transformers(pair):
    hf, model = pair
    inputs = CASES["two_images"]()
    with torch.no_grad():
        ref = hf.model.get_image_features(inputs["pixel_values"]).pooler_output
        ours = model.image_features(inputs["pixel_values"])
        enc = model.encode_vision(**inputs)
    assert ours.shape == (2, 4, model.cfg.d_model)
    assert (ref - ours).abs().max() <= 1e-5
    assert (enc[0] - ref.reshape(8, -1)).abs().max() <= 1e-5  # per prompt: both images in sequence order


def test_vision_features_skip_the_tower(pair):
    _, model = pair
    inputs = CASES["padded_left"]()
    with torch.no_grad():
        feats = model.encode_vision(**inputs)
        base = model(**inputs)
        calls = []
        handle = model.vision.blocks[0].register_forward_hook(lambda *a: calls.append(1))
        try:
            again = model(**{k: v for k, v in inputs.items() if k != "pixel_values"}, vision_features=feats)
        finally:
            handle.remove()
    assert not calls
    assert torch.equal(base, again)


# ----------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("name", ["image", "padded_left"])
def test_generate_matches_transformers(pair, name):
    hf, model = pair
    inputs = CASES[name]()
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=PADID)
    ours = model.generate(max_new_tokens=6, **inputs)
    assert torch.equal(ref, ours)


# ----------------------------------------------------------------------------------------------- hooks
def expected_hooks(model) -> list[str]:
    names = ["hook_embed", "vision.hook_patch_embed", "vision.hook_pos_embed", "vision.hook_embed", "vision.hook_last_hidden",
             "vision.ln_post.hook_normalized", "vision.hook_out", "projector.hook_pooled", "projector.mm_soft_emb_norm.hook_scale",
             "projector.mm_soft_emb_norm.hook_normalized", "projector.hook_out", "ln_final.hook_scale", "ln_final.hook_normalized"]
    for j in range(len(model.vision.blocks)):
        names += [f"vision.blocks.{j}.{s}" for s in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                                                     "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern",
                                                     "mlp.hook_pre", "mlp.hook_post", "ln1.hook_scale", "ln2.hook_normalized")]
    for i in range(model.cfg.n_layers):
        names += [f"blocks.{i}.{s}" for s in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                                              "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln1_post.hook_scale",
                                              "ln1_post.hook_normalized", "ln2_post.hook_scale", "ln2_post.hook_normalized",
                                              "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
                                              "attn.q_norm.hook_scale", "attn.q_norm.hook_normalized", "attn.k_norm.hook_scale",
                                              "attn.k_norm.hook_normalized", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
                                              "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")]
    return names


def test_every_hook_fires_with_its_shape(pair):
    hf, model = pair
    inputs = CASES["batch_two_prompts"]()
    logits, cache = model.run_with_cache(**inputs)
    missing = [n for n in expected_hooks(model) if n not in cache.keys()]
    assert not missing, missing
    c, b, length = model.cfg, *inputs["input_ids"].shape
    dv, n_img = model.vision_spec.width, 2
    shapes = {
        "hook_embed": (b, length, c.d_model),
        "vision.hook_patch_embed": (n_img, 16, dv),
        "vision.blocks.1.attn.hook_pattern": (n_img, 2, 16, 16),
        "vision.hook_last_hidden": (n_img, 16, dv),
        "projector.hook_pooled": (n_img, 4, dv),
        "projector.mm_soft_emb_norm.hook_scale": (n_img, 4, 1),
        "projector.hook_out": (n_img, 4, c.d_model),
        "vision.hook_out": (b, 4, c.d_model),
        "blocks.0.attn.hook_q": (b, length, c.n_heads, c.d_head),
        "blocks.0.attn.hook_k": (b, length, c.n_key_value_heads, c.d_head),
        "blocks.0.attn.q_norm.hook_scale": (b, length, c.n_heads, 1),
        "blocks.1.attn.k_norm.hook_normalized": (b, length, c.n_key_value_heads, c.d_head),
        "blocks.0.attn.hook_pattern": (b, c.n_heads, length, length),
        "blocks.1.ln2_post.hook_normalized": (b, length, c.d_model),
        "blocks.1.mlp.hook_post": (b, length, c.d_mlp),
    }
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, (name, tuple(cache[name].shape))
    # the pooled grid is transformers' AvgPool2d of the post-layernormed tower output
    with torch.no_grad():
        last = hf.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state
    assert (cache["vision.hook_last_hidden"] - last).abs().max() <= 1e-5
    grid = last.transpose(1, 2).reshape(2, dv, 4, 4)
    pooled = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    assert (cache["projector.hook_pooled"] - pooled).abs().max() <= 1e-5
    # QK-norm: q_norm's normalised value has unit RMS per head
    rms = cache["blocks.0.attn.q_norm.hook_normalized"].pow(2).mean(-1).sqrt()
    assert (rms - 1).abs().max() < 1e-3


def test_embedding_scale_and_residual_accounting(pair):
    _, model = pair
    inputs = CASES["two_images"]()
    logits, cache = model.run_with_cache(**inputs)
    lay = model.layout(**inputs)
    emb = cache["hook_embed"][0]
    text = (lay.kind[0] != IMAGE).nonzero().flatten()
    ids = inputs["input_ids"][0, text]
    scaled = model.embed.weight[ids] * model.cfg.d_model**0.5
    assert torch.allclose(emb[text], scaled, atol=1e-6)  # text tokens: embeddings x sqrt(d_model)
    img = lay.kind[0] == IMAGE
    assert torch.equal(emb[img], cache["vision.hook_out"][0, : int(img.sum())])  # image features unscaled
    assert torch.equal(cache["vision.hook_out"][0], cache["projector.hook_out"].reshape(-1, model.cfg.d_model))
    n = model.cfg.n_layers
    total = cache["hook_embed"] + sum(cache[f"blocks.{i}.hook_attn_out"] + cache[f"blocks.{i}.hook_mlp_out"] for i in range(n))
    assert (total - cache[f"blocks.{n - 1}.hook_resid_post"]).abs().max() < 1e-5
    # attn_out is after the post-attention norm
    post = cache["blocks.0.ln1_post.hook_normalized"] * (1 + model.blocks[0].ln1_post.w)
    assert (post - cache["blocks.0.hook_attn_out"]).abs().max() < 1e-5
    stack = cache.decompose_resid(layer=n)
    assert (stack.sum(0) - cache[f"blocks.{n - 1}.hook_resid_post"]).abs().max() < 1e-5
    final = model.unembed(model.ln_final(cache[f"blocks.{n - 1}.hook_resid_post"]))
    assert (final - logits).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["vision.hook_out", "projector.hook_pooled", "projector.mm_soft_emb_norm.hook_normalized",
                                  "vision.blocks.0.hook_resid_post", "blocks.0.attn.q_norm.hook_normalized",
                                  "blocks.0.ln1_post.hook_normalized", "blocks.1.attn.hook_pattern"])
def test_edits_change_logits(pair, name):
    _, model = pair
    inputs = CASES["image"]()
    with torch.no_grad():
        base = model(**inputs)

    def edit(x, hook):
        if name.endswith("hook_pattern"):
            y = torch.zeros_like(x)
            y[..., 0] = 1.0
            return y
        return x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 0.5

    with torch.no_grad():
        edited = model.run_with_hooks(**inputs, fwd_hooks=[(name, edit)])
    assert (edited - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- masks
def test_image_tokens_attend_bidirectionally_in_sliding_layers(long_pair):
    """Window 4 < 16 image tokens: the first image token still sees the last one (15 positions later)."""
    _, model = long_pair
    assert model.cfg.layer_types[0] == "sliding_attention" and model.sliding_window == 4
    inputs = make([prompt(1, per_image=16)], 1)
    lay = model.layout(**inputs)
    pos = lay.positions(image=0)
    first, last = int(pos[0]), int(pos[-1])
    _, cache = model.run_with_cache(**inputs, names_filter=["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"])
    for layer in (0, 1):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # H Lq Lk
        assert (pat[:, first, last] > 0).all(), f"layer {layer}: image token does not see a later token of its image"
        assert (pat[:, first - 2, first] == 0).all()  # text before the image never sees it
        assert (pat[:, last + 1, last + 2] == 0).all()  # text stays causal
    sliding = cache["blocks.0.attn.hook_pattern"][0]
    assert (sliding[:, last, first] == 0).all()  # the window still bounds the past (15 >= 4)
    assert (sliding[:, last + 3, last] > 0).all() and (sliding[:, last + 3, first] == 0).all()


def test_two_images_are_separate_blocks(pair):
    _, model = pair
    inputs = CASES["two_images"]()
    lay = model.layout(**inputs)
    p0, p1 = lay.positions(image=0), lay.positions(image=1)
    assert lay.meta["bidir_ids"][0, p0].tolist() == [0] * 4 and lay.meta["bidir_ids"][0, p1].tolist() == [1] * 4
    _, cache = model.run_with_cache(**inputs, names_filter="blocks.1.attn.hook_pattern")
    pat = cache["blocks.1.attn.hook_pattern"][0]
    assert (pat[:, p0[0], p0[-1]] > 0).all()
    assert (pat[:, p0[0], p1[0]] == 0).all()  # an image never sees a later image
    assert (pat[:, p1[0], p0[0]] > 0).all()  # but a later image sees an earlier one (causal)


# ----------------------------------------------------------------------------------------------- layout
def test_layout(pair):
    _, model = pair
    inputs = CASES["padded_left"]()
    lay = model.layout(**inputs)
    ids = inputs["input_ids"]
    assert lay.kind[ids == BOI].eq(SPECIAL).all() and lay.kind[ids == EOI].eq(SPECIAL).all()
    assert lay.kind[inputs["attention_mask"] == 0].eq(PAD).all()
    assert lay.kind[ids == IMG].eq(IMAGE).all()
    assert lay.kind[(ids == 5)].eq(TEXT).all()
    assert len(lay.items) == 2 and [it.batch for it in lay.items] == [0, 1]
    it = lay.items[1]
    spec = model.vision_spec
    assert it.merged_grid == (1, 2, 2) and it.n_tokens == 4 and it.grid_thw == (1, 4, 4)
    assert it.cell_pixels == spec.cell_pixels == 28 and it.pixel_size == (56, 56) and it.pixel_offset == 1
    pos = lay.positions(image=1)
    assert torch.equal(pos, (ids[1] == IMG).nonzero().flatten())
    assert lay.cell(1, 0, image=1) == int(pos[2])
    assert lay.pixel_box(1, int(pos[3])) == (28, 28, 56, 56)
    assert lay.box(0, 30, 20, 56, image=1).tolist() == [int(pos[1])]
    assert lay.group_ids("cell")[1, pos].tolist() == [0, 1, 2, 3]
    assert "image 1: 1 slice(s) x 2x2 cells of 28px" in lay.summary()


def test_pixel_box_of_each_token_is_exact(long_pair):
    """With no ViT blocks, changing the pixels of token k's box changes vision.hook_out at token k only."""
    _, model = long_pair
    inputs = make([prompt(1, per_image=16)], 1)
    lay = model.layout(**inputs)
    assert lay.items[0].merged_grid == (1, 4, 4) and lay.items[0].cell_pixels == 14
    with torch.no_grad():
        base = model.encode_vision(**inputs)[0]
        for k in (0, 6, 15):
            p = lay.cell(k // 4, k % 4, image=0)
            y0, x0, y1, x1 = lay.pixel_box(0, p)
            pv = inputs["pixel_values"].clone()
            pv[:, :, y0:y1, x0:x1] += 1.0
            changed = (model.encode_vision(**dict(inputs, pixel_values=pv))[0] - base).abs().amax(-1) > 1e-6
            assert changed.nonzero().flatten().tolist() == [int(p - lay.items[0].start)]


def test_layout_matches_the_processor(pair):
    """Gemma3Processor (tiny tokenizer, PIL image processor) and build_gemma3_inputs agree; the model runs on both."""
    import numpy as np
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from hooked_vlm.families.gemma3_inputs import build_gemma3_inputs
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    hf, model = pair
    tok = build_tiny_tokenizer()
    img = np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)
    proc = Gemma3Processor(Gemma3ImageProcessorPil(size={"height": 56, "width": 56}), tok, image_seq_length=4)
    text = "what color is <start_of_image> the circle ?"
    ref = proc(text=[text], images=[[img]], return_tensors="pt")
    ours = build_gemma3_inputs(tok, text, [img], image_size=56, mm_tokens_per_image=4)
    assert torch.equal(ref["input_ids"], ours["input_ids"]) and torch.equal(ref["token_type_ids"], ours["token_type_ids"])
    assert torch.allclose(ref["pixel_values"], ours["pixel_values"])
    inputs = {k: ref[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}
    assert max_diff(hf, model, inputs) <= TOL


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(pair):
    _, model = pair
    good = CASES["image"]()
    ids = good["input_ids"]
    with pytest.raises(InputError, match="found 3 image tokens .* 1 image"):
        bad = ids[ids != IMG][None]
        bad = torch.cat([bad[:, :4], torch.full((1, 3), IMG), bad[:, 4:]], dim=1)
        model(input_ids=bad, pixel_values=good["pixel_values"])
    with pytest.raises(InputError, match="found 4 image tokens .* 2 image"):
        model(input_ids=ids, pixel_values=torch.cat([good["pixel_values"]] * 2))
    with pytest.raises(InputError, match="no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(InputError, match="token_type_ids disagrees"):
        model(**dict(good, token_type_ids=torch.zeros_like(ids)))
    with pytest.raises(InputError, match=r"pixel_values must be \[n_images, 3, 56, 56\]"):
        model(**dict(good, pixel_values=torch.randn(1, 3, 28, 28)))
    with pytest.raises(InputError, match="floating"):
        model(**dict(good, pixel_values=torch.zeros(1, 3, 56, 56, dtype=torch.uint8)))
    with pytest.raises(InputError, match="not consecutive"):
        split = torch.tensor([[0, BOI, IMG, IMG, 5, IMG, IMG, EOI]])
        model(input_ids=split, pixel_values=good["pixel_values"])
    with pytest.raises(TypeError, match="unexpected input"):
        model(**good, image_grid_thw=torch.tensor([[1, 4, 4]]))


def test_missing_token_type_ids_are_derived(pair):
    hf, model = pair
    inputs = CASES["two_images"]()
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    model._warned_token_types = False
    with pytest.warns(UserWarning, match="derived it from the image token id"):
        with torch.no_grad():
            out = model(**without)
    with torch.no_grad():
        assert (out - hf(**inputs).logits).abs().max() <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**inputs)  # no warning when given


# ----------------------------------------------------------------------------------------------- loading
def test_from_pretrained_and_released_layout(pair, tmp_path):
    from hooked_vlm.families.gemma3 import HookedGemma3
    from hooked_vlm.loading import build

    hf, model = pair
    loaded = reload_saved(hf, tmp_path, HookedGemma3)
    assert loaded.unembed.weight.data_ptr() == loaded.embed.weight.data_ptr()  # tied
    inputs = CASES["image"]()
    assert same_logits(loaded, model, inputs)
    # the released checkpoints' names (transformers 4.5x on-disk layout), no lm_head (tied)
    legacy = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            continue
        k = k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.vision_model.")
        legacy[k.replace("model.multi_modal_projector.", "multi_modal_projector.")] = v
    again = build("Gemma3ForConditionalGeneration", hf.config, legacy, None, None)
    with torch.no_grad():
        assert torch.equal(again(**inputs), model(**inputs))


def test_linear_rope_on_full_layers():
    """Real Gemma 3 4B+ scale the global RoPE linearly (factor 8); local layers keep theta 1e4."""
    from hooked_vlm.loading import from_hf
    from hooked_vlm.tiny import tiny_hf_model

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    hf = tiny_hf_model("tiny-gemma3", seed=2, rope_parameters=rope, num_hidden_layers=4)
    model = from_hf(hf)
    assert model.cfg.layer_types == ["sliding_attention", "full_attention"] * 2
    default = model.inv_freq_sliding_attention.new_tensor(1e6) ** -(torch.arange(0, 16, 2).float() / 16)
    assert torch.allclose(model.inv_freq_full_attention, default / 8)
    inputs = make([list(range(3, 40)) + prompt(1)], 1)
    assert max_diff(hf, model, inputs) <= TOL


def test_cli_input_builder(pair):
    import numpy as np

    from hooked_vlm.cli import INPUT_BUILDERS, InputRequest
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    hf, model = pair
    img = np.zeros((30, 50, 3), dtype=np.uint8)
    request = InputRequest(build_tiny_tokenizer(), "what color is <image> the circle ?", images=[img], tiny=True)
    inputs = INPUT_BUILDERS["gemma3"](request)
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert int((inputs["input_ids"] == IMG).sum()) == 4 and torch.equal(inputs["token_type_ids"], (inputs["input_ids"] == IMG).long())
    assert max_diff(hf, model, inputs) <= TOL


def test_attention_statistics_kernels_use_the_gemma_mask(long_pair):
    """The kernels' statistics path sees the same mask (window + bidirectional images + padding): same
    logits, and its exact probability rows equal the materialised pattern."""
    from hooked_vlm.components.attention import AttnStatsRequest, attn_stats_request

    _, model = long_pair
    inputs = make([prompt(1, per_image=16), prompt(1, per_image=16, pre=(9, 10, 11))], 2)
    lay = model.layout(**inputs)
    first = int(lay.positions(image=1)[0])
    rows = torch.tensor([[first, first + 5], [first, first + 5]])
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter="blocks.0.attn.hook_pattern")
        req = AttnStatsRequest(rows=rows, key_group_ids=lay.group_ids("item"), backend="torch")
        with attn_stats_request(model, req):
            logits, stats = model.run_with_cache(**inputs, names_filter=["blocks.0.attn.hook_rows", "blocks.0.attn.hook_region"])
    ref = model(**inputs)
    valid = inputs["attention_mask"].bool()
    assert (logits - ref)[valid].abs().max() < 1e-5
    pattern = cache["blocks.0.attn.hook_pattern"]
    got = stats["blocks.0.attn.hook_rows"]  # B H S L
    for b in range(2):
        assert torch.allclose(got[b], pattern[b][:, rows[b]], atol=1e-5)
    assert (got[1, :, 0, first + 15] > 0).all()  # image token -> later token of its image, sliding layer
