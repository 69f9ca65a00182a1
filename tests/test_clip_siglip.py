"""HookedCLIP (CLIP / SigLIP two-tower models) against transformers' CLIPModel / SiglipModel and friends."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    SiglipTextModel,
    SiglipVisionModel,
)

from hooked_vlm import loading
from hooked_vlm.errors import InputError
from hooked_vlm.families.clip import HookedCLIP
from hooked_vlm.tiny import randomize_, tiny_hf_model

TOL = 1e-4  # the bar; measured differences are ~1e-7
OPT_IN = ("hook_result", "hook_lse", "hook_region", "hook_row_mass", "hook_colsum", "hook_rows")
FIELDS = ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def pairs():
    cache = {}

    def get(name: str, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            hf = tiny_hf_model(name, seed=0, **overrides)
            cache[key] = (hf, loading.from_hf(hf))
        return cache[key]

    return get


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _clip_texts():
    """A right-padded batch (ids 0 bos, 1 eos, 2 pad) with a text that holds a second EOS after its first."""
    ids = torch.tensor(
        [
            [0, 5, 6, 7, 8, 1, 2, 2],
            [0, 9, 1, 2, 2, 2, 2, 2],
            [0, 11, 12, 1, 40, 1, 2, 2],
        ]
    )
    lengths = torch.tensor([6, 3, 6])
    am = (torch.arange(8)[None] < lengths[:, None]).long()
    return ids, am


def _siglip_texts():
    """SigLIP's processor pads to max_length (16) with the pad id and returns no attention mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((3, 16), 2)
    for i, n in enumerate((5, 9, 16)):
        ids[i, :n] = torch.randint(3, 96, (n,), generator=g)
        ids[i, n - 1] = 1
    return ids


def _inputs(name: str, n_images: int):
    if name == "tiny-clip":
        ids, am = _clip_texts()
        return dict(input_ids=ids, attention_mask=am, pixel_values=_pixels(n_images, 64))
    return dict(input_ids=_siglip_texts(), pixel_values=_pixels(n_images, 56))


# ----- equivalence ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
@pytest.mark.parametrize("n_images", [1, 3])
def test_matches_transformers(pairs, name, n_images):
    hf, model = pairs(name)
    assert isinstance(model, HookedCLIP)
    inputs = _inputs(name, n_images)
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True)
        got = model(**inputs, output_hidden_states=True)
        ref_img = hf.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        ref_txt = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).pooler_output
        got_img = model.encode_image(inputs["pixel_values"])
        got_txt = model.encode_text(inputs["input_ids"], inputs.get("attention_mask"))
    assert type(got) is type(ref)
    assert got.logits_per_image.shape == (n_images, 3)
    for f in FIELDS:
        assert _max_diff(getattr(ref, f), getattr(got, f)) <= TOL, f
    assert _max_diff(ref_img, got_img) <= TOL and _max_diff(ref_txt, got_txt) <= TOL
    assert torch.allclose(model.encode_image(inputs["pixel_values"], normalize=True), got.image_embeds, atol=1e-6)
    # tower outputs, including every hidden state (the raw last layer, as transformers)
    for side in ("vision_model_output", "text_model_output"):
        r, g = getattr(ref, side), getattr(got, side)
        assert _max_diff(r.pooler_output, g.pooler_output) <= TOL
        assert len(r.hidden_states) == len(g.hidden_states) == 3
        valid = inputs["attention_mask"].bool() if side == "text_model_output" and "attention_mask" in inputs else None
        for a, b in zip((*r.hidden_states, r.last_hidden_state), (*g.hidden_states, g.last_hidden_state)):
            if valid is not None:  # padded positions are never read; compare the real tokens
                a, b = a[valid], b[valid]
            assert _max_diff(a, b) <= TOL


def test_left_padded_clip_texts_pool_the_same(pairs):
    hf, model = pairs("tiny-clip")
    ids = torch.tensor([[2, 2, 0, 5, 6, 1], [0, 7, 8, 9, 10, 1]])
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=ids, attention_mask=am).pooler_output
        got = model.encode_text(ids, am)
    assert _max_diff(ref, got) <= TOL


def test_loss_matches_transformers(pairs):
    for name in ("tiny-clip", "tiny-siglip"):
        hf, model = pairs(name)
        inputs = _inputs(name, 3)
        with torch.no_grad():
            ref = hf(**inputs, return_loss=True).loss
            got = model(**inputs, return_loss=True).loss
            direct = model(**inputs, return_type="loss")
        assert abs(float(ref - got)) <= TOL and torch.equal(got, direct)


@pytest.mark.parametrize(
    "hf_cls, which",
    [
        (CLIPVisionModel, "vision"),
        (CLIPVisionModelWithProjection, "vision"),
        (CLIPTextModel, "text"),
        (CLIPTextModelWithProjection, "text"),
        (SiglipVisionModel, "vision"),
        (SiglipTextModel, "text"),
    ],
)
def test_single_tower_classes(hf_cls, which, tmp_path):
    family = "tiny-siglip" if hf_cls.__name__.startswith("Siglip") else "tiny-clip"
    full_cfg = tiny_hf_model(family).config
    sub = getattr(full_cfg, f"{which}_config")
    if hf_cls.__name__.endswith("WithProjection"):
        sub.projection_dim = 16
    sub._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = randomize_(hf_cls(sub), seed=2).eval()
    model = loading.from_hf(hf)
    assert isinstance(model, HookedCLIP) and model.cfg.architecture == hf_cls.__name__
    assert (model.vision is None) == (which == "text") and (model.text is None) == (which == "vision")
    if which == "vision":
        inputs = dict(pixel_values=_pixels(2, 64 if family == "tiny-clip" else 56))
    else:
        inputs = dict(input_ids=_siglip_texts()) if family == "tiny-siglip" else dict(zip(("input_ids", "attention_mask"), _clip_texts()))
    with torch.no_grad():
        ref, got = hf(**inputs), model(**inputs)
    assert type(got) is type(ref)
    for f in ("pooler_output", "image_embeds", "text_embeds", "last_hidden_state"):
        if getattr(ref, f, None) is not None:
            a, b = getattr(ref, f), getattr(got, f)
            if f == "last_hidden_state" and "attention_mask" in inputs:
                a, b = a[inputs["attention_mask"].bool()], b[inputs["attention_mask"].bool()]
            assert _max_diff(a, b) <= TOL, f
    hf.save_pretrained(tmp_path)
    again = HookedCLIP.from_pretrained(str(tmp_path))
    with torch.no_grad():
        out = again(**inputs)
    assert again.cfg.architecture == hf_cls.__name__
    assert torch.equal(out.last_hidden_state, got.last_hidden_state)


# ----- loading ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_from_pretrained_round_trip(pairs, name, tmp_path):
    hf, model = pairs(name)
    hf.save_pretrained(tmp_path)
    assert loading.model_class_for(type(hf).__name__) is HookedCLIP
    for loaded in (HookedCLIP.from_pretrained(str(tmp_path)), loading.from_pretrained(tmp_path)):
        assert isinstance(loaded, HookedCLIP)
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
        inputs = _inputs(name, 2)
        with torch.no_grad():
            a, b = loaded(**inputs), model(**inputs)
        assert torch.equal(a.logits_per_image, b.logits_per_image)


# ----- hooks --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_every_hook_fires_with_documented_shape(pairs, name):
    _, model = pairs(name)
    inputs = _inputs(name, 2)
    with torch.no_grad():
        out, cache = model.run_with_cache(**inputs)
    n_img, n_txt = 2, 3
    n_patch = 4 if name == "tiny-clip" else 16
    sizes = {
        "N": n_patch + int(name == "tiny-clip"),
        "Np": n_patch,
        "L": inputs["input_ids"].shape[1],
        "d": 32,
        "H": 2,
        "dh": 16,
        "m": 64,
        "d_out": 32,
        "P": 16 if name == "tiny-clip" else 32,
        "1": 1,
    }
    table = dict(model.hook_table())
    assert set(table) == set(model.hook_dict)
    missing = [n for n in table if n not in cache.cache_dict]
    # only the opt-in per-head results and the statistics hooks (which need an AttnStatsRequest) stay silent
    assert missing and all(n.endswith(OPT_IN) for n in missing), missing
    for hook_name, act in cache.cache_dict.items():
        b = n_txt if hook_name.startswith("text.") or hook_name == "hook_text_embeds" else n_img
        expected = tuple(b if s == "B" else sizes[s] for s in table[hook_name].split())
        assert tuple(act.shape) == expected, (hook_name, table[hook_name], tuple(act.shape))
    # caching everything (patterns included) changes nothing
    with torch.no_grad():
        plain = model(**inputs)
    assert _max_diff(out.logits_per_image, plain.logits_per_image) <= 1e-6
    expected_names = {"vision.hook_pooled", "text.hook_pooled", "hook_image_embeds", "hook_text_embeds", "vision.hook_patch_embed", "text.blocks.1.attn.hook_pattern"}
    assert expected_names <= set(cache.cache_dict)
    assert torch.allclose(cache["hook_image_embeds"], model.encode_image(inputs["pixel_values"]), atol=1e-6)  # pattern vs SDPA path


def test_text_pattern_is_causal_for_clip_and_bidirectional_for_siglip(pairs):
    for name, causal in (("tiny-clip", True), ("tiny-siglip", False)):
        _, model = pairs(name)
        inputs = _inputs(name, 1)
        with torch.no_grad():
            _, cache = model.run_with_cache(**inputs, names_filter=["text.blocks.0.attn.hook_pattern"])
        pat = cache["text.blocks.0.attn.hook_pattern"][0, 0]  # first text, head 0: [L, L]
        upper = torch.triu(pat, diagonal=1)
        assert bool((upper == 0).all()) == causal
        assert torch.allclose(pat.sum(-1), torch.ones(pat.shape[0]))
        if name == "tiny-clip":  # padding keys are invisible (text 1 has 3 real tokens)
            pat1 = cache["text.blocks.0.attn.hook_pattern"][1, 0]
            assert bool((pat1[:3, 3:] == 0).all())


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_patching_vision_leaves_text_fixed(pairs, name):
    """Edit a vision block: image embeddings and similarities change, text embeddings are bit-identical."""
    _, model = pairs(name)
    inputs = _inputs(name, 2)
    with torch.no_grad():
        clean = model(**inputs)
        noisy = model.run_with_hooks(**inputs, fwd_hooks=[("vision.blocks.0.hook_resid_post", lambda t, hook: t + 0.5 * torch.randn_like(t))])
    assert torch.equal(noisy.text_embeds, clean.text_embeds)
    assert not torch.allclose(noisy.image_embeds, clean.image_embeds)
    assert (noisy.logits_per_image - clean.logits_per_image).abs().max() > 1e-4
    # Activation patching: image 1's last residual pasted into image 0 makes image 0's embedding image 1's.
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=["vision.blocks.1.hook_resid_post"])
        donor = cache["vision.blocks.1.hook_resid_post"]

        def paste(t, hook):
            t = t.clone()
            t[0] = donor[1]
            return t

        patched = model.run_with_hooks(**inputs, fwd_hooks=[("vision.blocks.1.hook_resid_post", paste)])
    assert torch.allclose(patched.image_embeds[0], clean.image_embeds[1], atol=1e-6)
    assert torch.allclose(patched.logits_per_image[0], clean.logits_per_image[1], atol=1e-5)
    assert torch.equal(patched.text_embeds, clean.text_embeds)


def test_patching_text_leaves_vision_fixed(pairs):
    _, model = pairs("tiny-clip")
    inputs = _inputs("tiny-clip", 2)
    with torch.no_grad():
        clean = model(**inputs)
        edited = model.run_with_hooks(**inputs, fwd_hooks=[("text.hook_embed", lambda t, hook: t * 1.5)])
    assert torch.equal(edited.image_embeds, clean.image_embeds)
    assert not torch.allclose(edited.text_embeds, clean.text_embeds)


def test_hidden_state_edits_reach_outputs(pairs):
    """hidden_states read back the edited residual (the guarantee LLaVA relies on)."""
    _, model = pairs("tiny-clip")
    px = _pixels(1, 64)
    name = model.hidden_state_hook_name("vision", -2)
    assert name == "vision.blocks.1.hook_resid_pre"
    with torch.no_grad():
        clean = model(pixel_values=px, output_hidden_states=True).vision_model_output.hidden_states
        for site in (name, "vision.blocks.0.hook_resid_post"):
            edited = model.run_with_hooks(pixel_values=px, output_hidden_states=True, fwd_hooks=[(site, lambda t, hook: t + 2.0)])
            hs = edited.vision_model_output.hidden_states
            assert torch.allclose(hs[1], clean[1] + 2.0, atol=1e-6), site
            assert torch.equal(hs[0], clean[0])


# ----- pooling rules --------------------------------------------------------------------------------------------
def test_clip_pools_first_eos(pairs):
    hf, model = pairs("tiny-clip")
    ids, am = _clip_texts()
    assert model.text.pool_positions(ids).tolist() == [5, 2, 3]  # text 2 has EOS at 3 and 5: the first wins
    with torch.no_grad():
        _, cache = model.run_with_cache(input_ids=ids, attention_mask=am, names_filter=["text.hook_last_hidden", "text.hook_pooled"])
        assert torch.equal(cache["text.hook_pooled"], cache["text.hook_last_hidden"][torch.arange(3), torch.tensor([5, 2, 3])])
        # causal: an edit after the pooled EOS cannot change the embedding, one at the EOS does
        def bump(pos):
            def hook(t, hook):
                t = t.clone()
                t[2, pos] += 3.0 * torch.randn(t.shape[-1], generator=torch.Generator().manual_seed(0))
                return t

            return hook

        clean = model.encode_text(ids, am)
        after = model.run_with_hooks(input_ids=ids, attention_mask=am, return_type="output", fwd_hooks=[("text.blocks.0.hook_resid_post", bump(4))])
        at = model.run_with_hooks(input_ids=ids, attention_mask=am, return_type="output", fwd_hooks=[("text.blocks.0.hook_resid_post", bump(3))])
    assert torch.equal(after.text_model_output.pooler_output[2], clean[2])
    assert not torch.allclose(at.text_model_output.pooler_output[2], clean[2])


def test_clip_legacy_eos_2_pools_argmax(pairs):
    hf, model = pairs("tiny-clip", eos_token_id=2)
    assert model.cfg.text.eos_token_id == 2
    ids = torch.tensor([[0, 50, 7, 2, 1, 1], [0, 3, 90, 4, 2, 1]])  # argmax at 1 and 2, not at the "EOS" (2)
    assert model.text.pool_positions(ids).tolist() == [1, 2]
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=ids).pooler_output
        got = model.encode_text(ids)
    assert _max_diff(ref, got) <= TOL
    # the same ids pooled by the first-EOS rule would read other positions (so the test discriminates)
    assert (ids == 2).int().argmax(-1).tolist() == [3, 4]


def test_siglip_pools_last_token(pairs):
    hf, model = pairs("tiny-siglip")
    ids = _siglip_texts()
    assert model.text.pool_positions(ids).tolist() == [15, 15, 15]
    with torch.no_grad():
        _, cache = model.run_with_cache(input_ids=ids, names_filter=["text.hook_last_hidden", "text.hook_pooled"])
    expected = model.text.head(cache["text.hook_last_hidden"][:, -1])
    assert torch.allclose(cache["text.hook_pooled"], expected, atol=1e-6)
    # shorter padding moves the pooled token: the embedding depends on how the text was padded (as transformers)
    with torch.no_grad():
        short = model.encode_text(ids[:, :12])
        ref_short = hf.get_text_features(input_ids=ids[:, :12]).pooler_output
    assert _max_diff(short, ref_short) <= TOL
    assert not torch.allclose(short[0], model.encode_text(ids)[0])


# ----- errors ---------------------------------------------------------------------------------------------------
def test_helpful_errors(pairs):
    _, model = pairs("tiny-clip")
    ids, am = _clip_texts()
    with pytest.raises(KeyError, match="vision.blocks.0.hook_resid_post"):
        model.run_with_cache(input_ids=ids, names_filter=["vision.blocks.0.hook_resid_pots"])
    with pytest.raises(TypeError, match="unexpected input"):
        model(input_ids=ids, pixel_values_videos=torch.zeros(1))
    with pytest.raises(InputError, match="max_position_embeddings"):
        model(input_ids=torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(InputError, match="input_ids"):
        model()
    with pytest.raises(InputError, match="both"):
        model(input_ids=ids, return_type="logits_per_image")
    only_text = model(input_ids=ids, attention_mask=am)
    assert only_text.logits_per_image is None and only_text.text_embeds.shape == (3, 16)


def test_vision_attention_statistics_match_pattern(pairs):
    """The shared Attention's statistics path runs on the non-causal vision tower (tower="vision")."""
    from hooked_vlm.components import attention
    _, model = pairs("tiny-clip")
    px = _pixels(2, 64)
    groups = torch.tensor([[0, 1, 1, 2, 2]]).expand(2, -1)  # [CLS], top row, bottom row
    req = attention.AttnStatsRequest(key_group_ids=groups, backend="torch")
    with torch.no_grad():
        with attention.attn_stats_request(model, req, tower="vision"):
            out, stats = model.run_with_cache(pixel_values=px, names_filter=["vision.blocks.1.attn.hook_region"])
        plain, cache = model.run_with_cache(pixel_values=px, names_filter=["vision.blocks.1.attn.hook_pattern"])
    pat = cache["vision.blocks.1.attn.hook_pattern"]  # B H N N
    ref = torch.stack([pat[..., groups[0] == g].sum(-1) for g in range(3)], dim=-1).sum(-2)  # B H KG
    assert _max_diff(stats["vision.blocks.1.attn.hook_region"][:, :, 0], ref) <= 1e-5
    assert _max_diff(out.image_embeds, plain.image_embeds) <= 1e-5
