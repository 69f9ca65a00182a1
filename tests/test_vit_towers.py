"""HookedViT (CLIP / SigLIP vision towers) against transformers' CLIPVisionModel / SiglipVisionModel."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from hooked_vlm.families.vit import HookedViT, ViTSpec, convert_vit_state_dict, select_image_features, vit_from_hf
from hooked_vlm.tiny import randomize_

TOL = 1e-5
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14)


def _hf_tower(kind: str, use_head: bool = True):
    if kind == "clip":
        cfg = CLIPVisionConfig(**VISION, hidden_act="quick_gelu")
        cls = CLIPVisionModel
    else:
        cfg = SiglipVisionConfig(**VISION, vision_use_head=use_head)
        cls = SiglipVisionModel
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return randomize_(cls(cfg), seed=1).eval()


@pytest.fixture(scope="module")
def towers():
    out = {}
    for name, kind, head in (("clip", "clip", False), ("siglip", "siglip", True), ("siglip-nohead", "siglip", False)):
        hf = _hf_tower(kind, head)
        out[name] = (hf, vit_from_hf(hf))
    return out


def _pixels(n: int = 3, size: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["clip", "siglip", "siglip-nohead"])
def test_matches_transformers(towers, name):
    hf, ours = towers[name]
    px = _pixels()
    with torch.no_grad():
        ref = hf(px, output_hidden_states=True)
        got = ours(px, output_hidden_states=True)
    assert (ref.last_hidden_state - got.last_hidden_state).abs().max() <= TOL
    if ref.pooler_output is None:
        assert got.pooler_output is None and ours.head is None
    else:
        assert (ref.pooler_output - got.pooler_output).abs().max() <= TOL
    assert sorted(got.hidden_states) == list(range(ours.depth + 1)) == list(range(len(ref.hidden_states)))
    for i, h in enumerate(ref.hidden_states):
        assert (h - got.hidden_states[i]).abs().max() <= TOL, i
    # The last hidden state is the raw last block, without post_layernorm (as transformers).
    last_raw = got.hidden_states[ours.depth]
    if name == "clip":
        assert torch.equal(last_raw, got.last_hidden_state)
    else:
        assert not torch.allclose(last_raw, got.last_hidden_state)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_interpolate_pos_encoding(towers, name):
    hf, ours = towers[name]
    px = torch.randn(2, 3, 84, 70, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(px, interpolate_pos_encoding=True)
        got = ours(px, interpolate_pos_encoding=True)
    assert got.last_hidden_state.shape == ref.last_hidden_state.shape == (2, 30 + int(name == "clip"), 32)
    assert (ref.last_hidden_state - got.last_hidden_state).abs().max() <= TOL
    if name == "clip":
        with pytest.raises(ValueError, match="interpolate_pos_encoding"):
            ours(px)


def test_feature_selection_matches_llava_rule(towers):
    hf, ours = towers["clip"]
    px = _pixels(2)
    with torch.no_grad():
        ref = hf(px, output_hidden_states=True).hidden_states
        out = ours(px, feature_layers=[-2, 0, 3])
    assert sorted(out.hidden_states) == [0, 2, 3]
    assert torch.allclose(out.select(-2, ours.depth), ref[-2], atol=TOL)
    assert torch.allclose(select_image_features(out, -2, "default", ours.depth), ref[-2][:, 1:], atol=TOL)
    cat = select_image_features(out, [-2, 0], "default", ours.depth)
    assert torch.allclose(cat, torch.cat([ref[-2][:, 1:], ref[0][:, 1:]], dim=-1), atol=TOL)
    full = select_image_features(out, [3, -2], "full", ours.depth)
    assert full.shape == (2, 17, 64)
    with pytest.raises(IndexError):
        ours(px, feature_layers=4)


def test_truncate_skips_later_blocks_with_same_features(towers):
    _, ours = towers["clip"]
    px = _pixels(2)
    fired = []
    hooks = [ours.blocks[2].hook_resid_pre, ours.hook_pooled]
    for hp in hooks:
        hp.add_hook(lambda t, hook: fired.append(hook.name) or None)
    try:
        with torch.no_grad():
            full = ours(px, feature_layers=-2)
            n_full = len(fired)
            short = ours(px, feature_layers=-2, truncate=True)
    finally:
        for hp in hooks:
            hp.remove_hooks()
    assert n_full == 2 and len(fired) == 2  # the truncated run fired neither hook
    assert short.last_hidden_state is None and short.pooler_output is None
    assert torch.equal(short.hidden_states[2], full.hidden_states[2])


@pytest.mark.parametrize("edit_site", ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_pre", "hook_embed"])
def test_edits_propagate_to_selected_features(towers, edit_site):
    """Editing the residual at or before hidden_states[-2] must change what a LLaVA projector reads."""
    _, ours = towers["clip"]
    px = _pixels(2)
    with torch.no_grad():
        clean = ours(px, feature_layers=[-2, -1]).hidden_states
    hp = ours.get_submodule(edit_site)
    hp.add_hook(lambda t, hook: t + 1.0)
    try:
        with torch.no_grad():
            edited = ours(px, feature_layers=[-2, -1]).hidden_states
    finally:
        hp.remove_hooks()
    assert not torch.allclose(edited[2], clean[2])
    assert not torch.allclose(edited[3], clean[3])
    if edit_site in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"):
        assert torch.allclose(edited[2], clean[2] + 1.0, atol=1e-6)  # the edit is exactly what is read


def test_hook_shapes(towers):
    for name, n_tok in (("clip", 17), ("siglip", 16)):
        _, ours = towers[name]
        seen: dict[str, tuple[int, ...]] = {}
        hps = {n: m for n, m in ours.named_modules() if type(m).__name__ == "HookPoint"}
        for n, hp in hps.items():
            hp.add_hook(lambda t, hook, n=n: seen.__setitem__(n, tuple(t.shape)))
        try:
            with torch.no_grad():
                ours(_pixels(2))
        finally:
            for hp in hps.values():
                hp.remove_hooks()
        d, h, dh = 32, 2, 16
        assert seen["hook_patch_embed"] == (2, 16, d)
        assert seen["hook_pos_embed"] == seen["hook_embed"] == (2, n_tok, d)
        assert seen["blocks.0.attn.hook_q"] == (2, n_tok, h, dh)
        assert seen["blocks.2.hook_resid_post"] == (2, n_tok, d)
        assert seen["blocks.1.mlp.hook_post"] == (2, n_tok, 64)
        assert seen["hook_pooled"] == (2, d)
        assert seen["hook_last_hidden"] == (2, n_tok, d)
        assert seen["blocks.0.attn.hook_pattern"] == (2, h, n_tok, n_tok)  # hooked, so materialised
        if name == "clip":
            assert seen["ln_pre.hook_normalized"] == (2, 17, d)
            assert seen["ln_post.hook_normalized"] == (2, 1, d)
        else:
            assert "ln_pre.hook_scale" not in seen
            assert seen["ln_post.hook_scale"] == (2, 16, 1)
            assert seen["head.attn.hook_q"] == (2, 1, h, dh)
            assert seen["head.attn.hook_k"] == (2, 16, h, dh)
            assert seen["head.hook_resid_post"] == (2, 1, d)
            assert seen["head.attn.hook_pattern"] == (2, h, 1, 16)
        # every hook point fired except the opt-in per-head result and the statistics hooks (AttnStatsRequest)
        silent = {n for n in hps if n not in seen}
        opt_in = ("hook_result", "hook_lse", "hook_region", "hook_row_mass", "hook_colsum", "hook_rows")
        assert silent and all(n.endswith(opt_in) for n in silent), silent


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_pattern_path_matches_and_is_normalised(towers, name):
    hf, ours = towers[name]
    px = _pixels(2)
    pats = {}
    names = ["blocks.0.attn.hook_pattern"] + (["head.attn.hook_pattern"] if name == "siglip" else [])
    for n in names:
        ours.get_submodule(n).add_hook(lambda t, hook, n=n: pats.__setitem__(n, t))
    try:
        with torch.no_grad():
            got = ours(px)
            ref = hf(px, output_attentions=True)
    finally:
        for n in names:
            ours.get_submodule(n).remove_hooks()
    assert (ref.last_hidden_state - got.last_hidden_state).abs().max() <= TOL
    assert torch.allclose(pats["blocks.0.attn.hook_pattern"], ref.attentions[0], atol=TOL)
    if name == "siglip":
        p = pats["head.attn.hook_pattern"]
        assert p.shape == (2, 2, 1, 16)
        assert torch.allclose(p.sum(-1), torch.ones(2, 2, 1))
        assert (ref.pooler_output - got.pooler_output).abs().max() <= TOL


def test_converter_layouts_and_errors():
    hf = _hf_tower("clip")
    sd = hf.state_dict()
    ours = convert_vit_state_dict(sd)
    on_disk = convert_vit_state_dict({f"vision_tower.vision_model.{k}": v for k, v in sd.items()} | {"lm_head.weight": torch.zeros(1)}, prefix="vision_tower.")
    assert ours.keys() == on_disk.keys() == HookedViT(ViTSpec.from_hf_config(hf.config)).state_dict().keys()
    with pytest.raises(KeyError, match="unexpected"):
        convert_vit_state_dict({"embeddings.mystery": torch.zeros(1)})
    with pytest.raises(ValueError, match="kind"):
        ViTSpec.from_hf_config(dict(VISION, hidden_act="gelu", layer_norm_eps=1e-5, model_type="dinov2"))
