"""Hooked PaliGemma / PaliGemma 2 against transformers' PaliGemmaForConditionalGeneration (same weights, fp32, eager).

Logits agree to ~8e-7 on every case; TOL = 2e-5. ``tiny-paligemma``: Gemma text; ``tiny-paligemma2``: Gemma 2 text
(four norms, query_pre_attn_scalar 24 != head_dim 16, attention / final soft-capping, layer 0 sliding with window 40).
Each image is 16 tokens (56 px / 14 px patches, no pooling).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hooked_vlm.errors import InputError
from hooked_vlm.layout import IMAGE, PAD, SPECIAL, TEXT

from helpers.family_checks import cli_inspect, reload_saved, same_logits, stats_rows_match_pattern, tiny_pair
from helpers.family_checks import max_logit_diff as max_diff

TOL = 2e-5
IMG, BOS, EOS, PADID, PER_IMAGE = 100, 0, 1, 2, 16
VARIANTS = ["tiny-paligemma", "tiny-paligemma2"]


def prompt(n_images: int, question=(5, 6, 7), answer=()) -> tuple[list[int], list[int]]:
    """(ids, token types): images, <bos>, question (prefix, type 0), then the answer (type 1)."""
    prefix = [IMG] * (PER_IMAGE * n_images) + [BOS, *question]
    return prefix + list(answer), [0] * len(prefix) + [1] * len(answer)


def make(rows: list[tuple[list[int], list[int]]], n_images: int, side: str = "left", token_types: bool = True, seed: int = 0):
    width = max(len(ids) for ids, _ in rows)

    def pad(r: list[int], value: int) -> list[int]:
        fill = [value] * (width - len(r))
        return fill + r if side == "left" else r + fill

    out = {"input_ids": torch.tensor([pad(ids, PADID) for ids, _ in rows]),
           "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in rows])}
    if token_types:
        out["token_type_ids"] = torch.tensor([pad(tt, 0) for _, tt in rows])
    if n_images:
        out["pixel_values"] = torch.randn(n_images, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    return out


CASES = {
    "text": lambda: make([prompt(0, answer=(8, 9))], 0),
    "image": lambda: make([prompt(1)], 1),
    "image_with_answer": lambda: make([prompt(1, answer=(8, 9, 1))], 1),
    "two_images": lambda: make([prompt(2, question=(10,), answer=(11,))], 2),
    "padded_left": lambda: make([prompt(1, answer=(8, 9, 1)), prompt(1, question=(12, 13, 14, 15))], 2),
    "padded_right": lambda: make([prompt(1, answer=(8, 9, 1)), prompt(2, question=(12,))], 3, side="right"),
    "long_answer": lambda: make([prompt(1, answer=tuple(range(3, 33)))], 1),  # 51 positions > window 40
}


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request):
    return tiny_pair(request.param, seed=0)


@pytest.fixture(scope="module")
def pg1():
    return tiny_pair("tiny-paligemma", seed=0)


# ----------------------------------------------------------------------------------------------- equivalence
def test_logits_match_transformers_on_every_input_kind(pair):
    hf, model = pair
    diffs = {name: max_diff(hf, model, case()) for name, case in CASES.items()}
    assert max(diffs.values()) <= TOL, diffs


def test_without_token_types_the_model_is_causal_as_transformers(pair):
    """transformers' PaliGemma without token_type_ids builds a plain causal mask; so does ours (with a warning)."""
    hf, model = pair
    inputs = CASES["image_with_answer"]()
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    model._warned_token_types = False
    with pytest.warns(UserWarning, match="token_type_ids was not given"):
        with torch.no_grad():
            causal = model(**without)
    assert max_diff(hf, model, without) <= TOL
    with torch.no_grad():
        assert (causal - model(**inputs)).abs().max() > 1e-3  # the prefix-LM mask changes the outputs


def test_image_features_match_transformers(pair):
    hf, model = pair
    inputs = CASES["two_images"]()
    with torch.no_grad():
        ref = hf.model.get_image_features(inputs["pixel_values"]).pooler_output
        ours = model.image_features(inputs["pixel_values"])
        enc = model.encode_vision(**inputs)
    assert (ref - ours).abs().max() <= 1e-5
    assert (enc[0] - ref.reshape(2 * PER_IMAGE, -1)).abs().max() <= 1e-5  # per prompt, images in sequence order


@pytest.mark.parametrize("name", ["image", "padded_left"])
def test_generate_matches_transformers(pair, name):
    hf, model = pair
    inputs = CASES[name]()
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=PADID, eos_token_id=EOS)
    ours = model.generate(max_new_tokens=5, eos_token_id=EOS, **inputs)
    new = ours[:, inputs["input_ids"].shape[1] :]
    after_eos = (new == EOS).long().cumsum(-1) - (new == EOS).long() > 0  # transformers pads finished rows, we repeat eos
    ours[:, inputs["input_ids"].shape[1] :] = new.masked_fill(after_eos, PADID)
    assert torch.equal(ref, ours[:, : ref.shape[1]])


# ----------------------------------------------------------------------------------------------- hooks
def expected_hooks(model) -> list[str]:
    names = ["hook_embed", "vision.hook_patch_embed", "vision.hook_pos_embed", "vision.hook_embed", "vision.hook_last_hidden",
             "vision.ln_post.hook_normalized", "projector.hook_out", "vision.hook_out", "ln_final.hook_scale",
             "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]
    for j in range(len(model.vision.blocks)):
        names += [f"vision.blocks.{j}.{s}" for s in ("hook_resid_pre", "hook_resid_post", "attn.hook_pattern", "attn.hook_z", "mlp.hook_post")]
    per_block = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "ln1.hook_scale",
                 "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                 "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
                 "attn.hook_result", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"]
    if model.is_gemma2:
        per_block += ["ln1_post.hook_normalized", "ln2_post.hook_normalized"]
        names.append("unembed.hook_pre_softcap")
    return names + [f"blocks.{i}.{s}" for i in range(model.cfg.n_layers) for s in per_block]


def test_every_hook_fires_and_the_residual_decomposes_exactly(pair):
    hf, model = pair
    inputs = CASES["padded_left"]()
    model.set_use_attn_result(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits, cache = model.run_with_cache(**inputs)
    finally:
        model.set_use_attn_result(False)
    missing = [n for n in expected_hooks(model) if n not in cache.keys()]
    assert not missing, missing
    c, (b, length) = model.cfg, inputs["input_ids"].shape
    assert tuple(cache["blocks.0.attn.hook_result"].shape) == (b, length, c.n_heads, c.d_model)
    assert tuple(cache["blocks.1.attn.hook_pattern"].shape) == (b, c.n_heads, length, length)
    assert tuple(cache["vision.hook_out"].shape) == (b, PER_IMAGE, c.d_model)
    # per-head results sum to the attention output (before Gemma 2's post-attention norm)
    heads = cache["blocks.0.attn.hook_result"].sum(2)
    if model.is_gemma2:  # hook_attn_out is after the post-attention norm; its input is the heads' sum
        raw = cache["blocks.0.ln1_post.hook_normalized"] * cache["blocks.0.ln1_post.hook_scale"]
        assert (heads - raw).abs().max() < 1e-5
    else:
        assert (heads - cache["blocks.0.hook_attn_out"]).abs().max() < 1e-5
    # hook_embed: text embeddings x sqrt(d_model), image features unscaled
    lay = model.layout(**inputs)
    img = lay.kind == IMAGE
    text = lay.kind == TEXT
    emb = cache["hook_embed"]
    assert torch.allclose(emb[text], model.embed.weight[inputs["input_ids"][text]] * c.d_model**0.5, atol=1e-6)
    assert torch.equal(emb[img], cache["vision.hook_out"][img.any(-1)].reshape(-1, c.d_model)[: int(img.sum())])
    # residual accounting: hook_embed + attn_out + mlp_out == last resid_post; decompose_resid is exact
    n = c.n_layers
    total = cache["hook_embed"] + sum(cache[f"blocks.{i}.hook_attn_out"] + cache[f"blocks.{i}.hook_mlp_out"] for i in range(n))
    assert (total - cache[f"blocks.{n - 1}.hook_resid_post"]).abs().max() < 1e-5
    assert (cache.decompose_resid(layer=n).sum(0) - cache[f"blocks.{n - 1}.hook_resid_post"]).abs().max() < 1e-5
    # the transformers vision tower's last_hidden_state
    with torch.no_grad():
        last = hf.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state
    assert (cache["vision.hook_last_hidden"] - last).abs().max() <= 1e-5


def test_final_softcap_hook_holds_the_raw_logits():
    from hooked_vlm.tiny import tiny_model

    model = tiny_model("tiny-paligemma2")
    inputs = CASES["image"]()
    logits, cache = model.run_with_cache(**inputs, names_filter="unembed.hook_pre_softcap")
    raw = cache["unembed.hook_pre_softcap"]
    assert torch.allclose(logits, 30.0 * torch.tanh(raw / 30.0), atol=1e-6)
    assert model.blocks[0].attn.softcap == 50.0 and model.blocks[0].attn.scale == pytest.approx(24**-0.5)


@pytest.mark.parametrize("name", ["vision.hook_out", "projector.hook_out", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"])
def test_edits_change_logits(pair, name):
    _, model = pair
    inputs = CASES["image"]()

    def edit(x, hook):
        if name.endswith("hook_pattern"):
            y = torch.zeros_like(x)
            y[..., 0] = 1.0
            return y
        return x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 0.5

    with torch.no_grad():
        base = model(**inputs)
        edited = model.run_with_hooks(**inputs, fwd_hooks=[(name, edit)])
    assert (edited - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- prefix-LM mask
def test_prefix_is_bidirectional_and_the_answer_causal(pair):
    _, model = pair
    inputs = CASES["image_with_answer"]()
    lay = model.layout(**inputs)
    tt = inputs["token_type_ids"][0]
    prefix, answer = (tt == 0).nonzero().flatten(), (tt == 1).nonzero().flatten()
    assert lay.meta["bidir_ids"][0].tolist() == [0] * len(prefix) + [-1] * len(answer)
    # the capability query reads the mask: a bidirectional prefix forbids reusing a prefix's keys and values
    assert "not purely causal" in model.prefix_reuse_problem(**inputs)
    assert model.can_reuse_prefix(**{k: v for k, v in inputs.items() if k != "token_type_ids"})
    _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("attn.hook_pattern") and n.startswith("blocks"))
    for layer in range(model.cfg.n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # H Lq Lk
        assert (pat[:, 0, prefix[-1]] > 0).all()  # the first image token sees the last prompt token
        assert (pat[:, prefix[-1], answer[0]] == 0).all()  # the prefix never sees the answer
        assert (pat[:, answer[0], answer[1]] == 0).all() and (pat[:, answer[1], answer[0]] > 0).all()  # causal answer
        assert (pat[:, answer[-1], 0] > 0).all()


def test_sliding_window_bounds_the_answer_only():
    """PaliGemma 2 layer 0: window 40. The prefix sees itself whole; a late answer token loses the early keys."""
    from hooked_vlm.tiny import tiny_model

    model = tiny_model("tiny-paligemma2")
    inputs = CASES["long_answer"]()
    _, cache = model.run_with_cache(**inputs, names_filter="blocks.0.attn.hook_pattern")
    pat = cache["blocks.0.attn.hook_pattern"][0]
    last = inputs["input_ids"].shape[1] - 1
    assert (pat[:, last, last - 39] > 0).all() and (pat[:, last, last - 40] == 0).all()
    long_prefix = make([prompt(3)], 3)  # 52 prefix positions > window 40: transformers' rule differs from a MaskSpec
    with pytest.raises(NotImplementedError, match="prefix spans 52 positions, more than Gemma 2's sliding window"):
        model(**long_prefix)


def test_attention_statistics_path_matches_the_pattern(pg1):
    """AttnStatsRequest (kernels' torch backend) under the prefix-LM MaskSpec: same logits, rows = hook_pattern."""
    _, model = pg1
    inputs = CASES["padded_left"]()
    lay = model.layout(**inputs)
    first_image = torch.stack([lay.positions(image=i)[0] for i in range(2)])
    in_prefix = (inputs["token_type_ids"] == 0) & inputs["attention_mask"].bool()
    last_prefix = torch.where(in_prefix, torch.arange(in_prefix.shape[1]), -1).amax(-1)
    rows = torch.stack([first_image, lay.last_token()], dim=1)  # [B, 2]: an image token, the last token
    stats = stats_rows_match_pattern(model, inputs, rows, lay.group_ids("kind"))
    for layer in range(model.cfg.n_layers):
        got = stats[f"blocks.{layer}.attn.hook_rows"]
        for b in range(2):  # an image token sees the end of its prefix, never the answer after it
            assert (got[b, :, 0, last_prefix[b]] > 0).all() and (got[b, :, 0, last_prefix[b] + 1 :] == 0).all()


def test_attention_statistics_refuse_soft_capped_layers():
    from hooked_vlm.components.attention import AttnStatsRequest, attn_stats_request
    from hooked_vlm.tiny import tiny_model

    model = tiny_model("tiny-paligemma2")
    with attn_stats_request(model, AttnStatsRequest(backend="torch")), pytest.raises(NotImplementedError, match="soft-caps its attention logits"):
        model(**CASES["image"]())


# ----------------------------------------------------------------------------------------------- layout
def test_layout(pg1):
    _, model = pg1
    inputs = CASES["padded_right"]()
    lay = model.layout(**inputs)
    ids = inputs["input_ids"]
    assert lay.kind[ids == BOS].eq(SPECIAL).all() and lay.kind[ids == IMG].eq(IMAGE).all()
    assert lay.kind[inputs["attention_mask"] == 0].eq(PAD).all()
    assert [(it.batch, it.start, it.pixel_offset, it.vision_offset) for it in lay.items] == [(0, 0, 0, 0), (1, 0, 1, 0), (1, 16, 2, 16)]
    it = lay.items[2]
    assert it.merged_grid == (1, 4, 4) and it.cell_pixels == 14 and it.pixel_size == (56, 56)
    assert lay.cell(2, 3, image=2) == 16 + 11 and lay.pixel_box(1, 16 + 11) == (28, 42, 42, 56)
    assert lay.group_ids("cell")[1, 16:32].tolist() == list(range(16))


def test_pixel_box_of_each_token_is_exact():
    """With no ViT blocks, changing the pixels of token k's 14 px box changes vision.hook_out at token k only."""
    from hooked_vlm.tiny import tiny_model

    model = tiny_model("tiny-paligemma", vision_layers=0)
    inputs = CASES["image"]()
    lay = model.layout(**inputs)
    with torch.no_grad():
        base = model.encode_vision(**inputs)[0]
        for k in (0, 6, 15):
            y0, x0, y1, x1 = lay.pixel_box(0, lay.cell(k // 4, k % 4, image=0))
            pv = inputs["pixel_values"].clone()
            pv[:, :, y0:y1, x0:x1] += 1.0
            changed = (model.encode_vision(**dict(inputs, pixel_values=pv))[0] - base).abs().amax(-1) > 1e-6
            assert changed.nonzero().flatten().tolist() == [k]


def test_layout_matches_the_processor():
    """PaliGemmaProcessor (tiny tokenizer with a `<image>` token, id 128 outside the text vocabulary, as the processor
    adds it) and build_paligemma_inputs agree on ids, token types and pixels; the layout puts the images where the
    processor did, and the model matches transformers on the processor's output."""
    import numpy as np
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from hooked_vlm.families.paligemma.preprocess import build_paligemma_inputs
    from hooked_vlm.loading import from_hf
    from hooked_vlm.tiny import tiny_hf_model
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.image_token = "<image>"
    assert tok.convert_tokens_to_ids("<image>") == 128
    image_proc = SiglipImageProcessorPil(size={"height": 56, "width": 56})
    image_proc.image_seq_length = PER_IMAGE
    proc = PaliGemmaProcessor(image_proc, tok)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (40, 70, 3), dtype=np.uint8), rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)]
    texts = ["what color is the circle ?", "what shape ?"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = proc(text=["<image>" + texts[0], "<image><image>" + texts[1]], images=[[imgs[0]], imgs], suffix=["red", "a big circle"],
                   return_tensors="pt", padding=True)
    ours = build_paligemma_inputs(tok, texts, [[imgs[0]], imgs], answers=["red", "a big circle"], image_size=56,
                                  tokens_per_image=PER_IMAGE, padding_side="right")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(ref[key], ours[key]), key
    assert torch.allclose(ref["pixel_values"], ours["pixel_values"])
    hf = tiny_hf_model("tiny-paligemma", seed=3, image_token_index=128)
    model = from_hf(hf)
    inputs = {k: ref[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}
    lay = model.layout(**inputs)
    assert torch.equal(lay.item >= 0, ref["input_ids"] == 128)
    assert [(it.batch, it.start) for it in lay.items] == [(0, 0), (1, 0), (1, 16)]
    assert max_diff(hf, model, inputs) <= TOL


# ----------------------------------------------------------------------------------------------- errors, loading, CLI
def test_bad_inputs_raise_clear_errors(pg1):
    _, model = pg1
    good = CASES["image"]()
    ids = good["input_ids"]
    with pytest.raises(InputError, match="found 16 image tokens .* 2 image"):
        model(**dict(good, pixel_values=torch.cat([good["pixel_values"]] * 2)))
    with pytest.raises(InputError, match="no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(InputError, match=r"pixel_values must be \[n_images, 3, 56, 56\]"):
        model(**dict(good, pixel_values=torch.randn(1, 3, 28, 28)))
    with pytest.raises(InputError, match="token_type_ids must hold 0"):
        model(**dict(good, token_type_ids=torch.full_like(ids, 2)))
    with pytest.raises(InputError, match="not consecutive"):
        split = torch.tensor([[IMG] * 8 + [5] + [IMG] * 8 + [BOS, 6]])
        model(input_ids=split, pixel_values=good["pixel_values"])
    with pytest.raises(TypeError, match="unexpected input"):
        model(**good, image_grid_thw=torch.tensor([[1, 4, 4]]))


def test_from_pretrained_and_released_layout(pair, tmp_path):
    from hooked_vlm.families.paligemma import HookedPaliGemma
    from hooked_vlm.loading import build

    hf, model = pair
    loaded = reload_saved(hf, tmp_path, HookedPaliGemma)
    assert loaded.unembed.weight.data_ptr() == loaded.embed.weight.data_ptr()
    inputs = CASES["image_with_answer"]()
    assert same_logits(loaded, model, inputs)
    legacy = {}  # the released checkpoints' names (transformers 4.x on-disk layout)
    for k, v in hf.state_dict().items():
        k = k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.vision_model.")
        legacy[k.replace("model.multi_modal_projector.", "multi_modal_projector.")] = v
    again = build("PaliGemmaForConditionalGeneration", hf.config, legacy, None, None)
    with torch.no_grad():
        assert torch.equal(again(**inputs), model(**inputs))


def test_cli_inspect_runs_on_tiny_paligemma(tmp_path):
    code, text, saved = cli_inspect(tmp_path, "tiny-paligemma", "vision.hook_out", "--image", "synthetic")
    assert code == 0 and "[    0,    16) image   image 0: 1 slice(s) x 4x4 cells of 14px" in text
    assert "[   16,    17) special" in text  # <bos> after the image
    assert tuple(saved.shape) == (1, PER_IMAGE, 64)


def test_strong_attention_soft_capping_matches_transformers():
    """With a cap small enough to bend the scores (c = 0.02), the capped logits still match transformers, and the cap
    moves them far more than the tolerance (so a decoder that forgot to cap would fail here)."""
    hf, model = tiny_pair("tiny-paligemma2", seed=0, attn_logit_softcapping=0.02)
    inputs = CASES["image_with_answer"]()
    assert max_diff(hf, model, inputs) <= TOL
    for block in model.blocks:  # the same model without the cap
        block.attn.softcap = None
    uncapped = max_diff(hf, model, inputs)
    assert uncapped > 100 * TOL, uncapped
