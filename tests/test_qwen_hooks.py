"""Hook points of the hooked Qwen models: they fire, have their documented shapes, edits take effect
where causality allows, patterns are computed only on request, and the cache decomposes exactly."""

import re

import pytest
import torch

from qwen_cases import QWEN_FAMILIES, case

from hooked_vlm import InputError
from hooked_vlm.hook_table import describe_hook


def _dims(model, inputs, lay, name):
    """Expected sizes for the symbols of describe_hook(name)."""
    c = model.cfg
    spec = model.vision_spec
    b, length = inputs["input_ids"].shape
    n = max(sum(it.n_patches for it in lay.items if it.batch == bi) for bi in range(b))
    m = max(sum(it.n_tokens for it in lay.items if it.batch == bi) for bi in range(b))
    vision = name.startswith("vision.")
    return {
        "B": b, "L": length, "N": n, "M": m, "Lq": n if vision else length, "Lk": n if vision else length,
        "H": spec.n_heads if vision else c.n_heads, "Hkv": spec.n_heads if vision else c.n_key_value_heads,
        "dh": (spec.width // spec.n_heads) if vision else c.d_head, "d": spec.width if vision else c.d_model,
        "m": spec.d_mlp if vision else c.d_mlp, "1": 1, "d_model": c.d_model, "V": c.d_vocab,
        "(merge^2": None,
    }


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_every_hook_fires_with_documented_shape(qwen_pair, family):
    _, model = qwen_pair(family)
    inputs = case("image_video", family)
    lay = model.layout(**inputs)
    for blk in list(model.blocks) + list(model.vision.blocks):
        blk.attn.use_attn_result = True
    try:
        _, cache = model.run_with_cache(**inputs)
    finally:
        for blk in list(model.blocks) + list(model.vision.blocks):
            blk.attn.use_attn_result = False
    stats = {"hook_lse", "hook_region", "hook_colsum", "hook_rows", "hook_row_mass"}
    expected = [n for n in model.hook_dict if n.rsplit(".", 1)[-1] not in stats]
    missing = [n for n in expected if n not in cache.keys()]
    assert not missing, f"hooks that never fired: {missing}"
    for name in expected:
        shape = describe_hook(name)
        if shape == "see docstring" or "(" in shape:
            continue
        dims = _dims(model, inputs, lay, name)
        want = tuple(dims[s] for s in shape.split())
        assert tuple(cache[name].shape) == want, f"{name}: {tuple(cache[name].shape)} != {want} ({shape})"
    merge_in = cache["vision.merger.hook_in"]
    assert merge_in.shape[-1] == model.vision_spec.width * model.vision_spec.merge**2


def _logits_with(model, inputs, name, edit):
    with torch.no_grad():
        return model.run_with_hooks(**inputs, fwd_hooks=[(name, lambda x, hook: edit(x))])


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize(
    "name",
    [
        "vision.blocks.0.hook_resid_post",
        "vision.hook_out",
        "vision.merger.hook_in",
        "vision.blocks.1.attn.hook_pattern",
        "vision.blocks.0.attn.hook_v",
        "blocks.0.attn.hook_pattern",
        "blocks.0.attn.hook_attn_scores",
        "blocks.0.attn.hook_q",
        "blocks.0.attn.hook_k",
        "blocks.0.attn.hook_v",
        "blocks.1.mlp.hook_post",
        "blocks.0.hook_resid_pre",
    ],
)
def test_edits_change_logits(qwen_pair, family, name):
    _, model = qwen_pair(family)
    inputs = case("image", family)
    with torch.no_grad():
        base = model(**inputs)

    def edit(x):
        if name.endswith("hook_pattern"):  # move all attention to the first key of each row
            y = torch.zeros_like(x)
            y[..., 0] = 1.0
            return y
        if name.endswith("hook_attn_scores"):
            return x * 0.5
        return x + torch.randn_like(x) * 0.5

    torch.manual_seed(0)
    edited = _logits_with(model, inputs, name, edit)
    assert (edited - base).abs().max() > 1e-3, f"editing {name} did not change the logits"


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("name", ["hook_embed", "blocks.0.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_v", "blocks.1.attn.hook_z"])
def test_edits_respect_causality(qwen_pair, family, name):
    """Editing position p changes no logit before p and the logits from p on."""
    _, model = qwen_pair(family)
    inputs = case("image", family)
    p = 12
    with torch.no_grad():
        base = model(**inputs)

    def edit(x):
        x = x.clone()
        x[:, p] += 1.0
        return x

    edited = _logits_with(model, inputs, name, edit)
    assert torch.equal(edited[:, :p], base[:, :p])
    assert (edited[:, p:] - base[:, p:]).abs().max() > 1e-4


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_vision_edit_stays_inside_its_image(qwen_pair, family):
    """Vision attention is block-diagonal: editing image 1's patches leaves image 0's features alone."""
    _, model = qwen_pair(family)
    inputs = case("two_images", family)
    lay = model.layout(**inputs)
    _, rows1 = lay.vision_rows(image=1)
    _, base = model.run_with_cache(**inputs, names_filter="vision.hook_out")

    def edit(x, hook):
        x = x.clone()
        x[0, rows1] += torch.randn(x[0, rows1].shape, generator=torch.Generator().manual_seed(0))
        return x

    with model.hooks(fwd_hooks=[("vision.hook_patch_embed", edit)]):
        _, cache = model.run_with_cache(**inputs, names_filter="vision.hook_out")
    n0 = lay.items[0].n_tokens
    assert torch.equal(cache["vision.hook_out"][0, :n0], base["vision.hook_out"][0, :n0])
    assert (cache["vision.hook_out"][0, n0:] - base["vision.hook_out"][0, n0:]).abs().max() > 1e-4


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_patterns_only_when_asked(qwen_pair, family, monkeypatch):
    from hooked_vlm.components.attention import Attention

    _, model = qwen_pair(family)
    inputs = case("image", family)
    calls = []
    original = Attention._pattern_path
    monkeypatch.setattr(Attention, "_pattern_path", lambda self, *a: calls.append(1) or original(self, *a))
    logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert not calls, "caching residual hooks computed attention patterns"
    assert all(n.endswith("hook_resid_post") for n in cache.keys())
    logits2, _ = model.run_with_cache(**inputs, names_filter="blocks.1.attn.hook_pattern")
    assert len(calls) == 1
    assert (logits - logits2).abs().max() < 1e-5  # pattern path and SDPA agree
    assert not model.blocks[1].attn.wants_pattern()  # hooks removed afterwards


def test_hooks_removed_when_forward_raises(qwen_pair):
    _, model = qwen_pair("tiny-qwen2-vl")
    inputs = case("image", "tiny-qwen2-vl")

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", boom)]):
            model(**inputs)
    assert not model.blocks[0].hook_resid_pre._forward_hooks
    model.reset_hooks()
    model(**inputs)  # runs cleanly afterwards


def test_unknown_hook_name_lists_closest(qwen_pair):
    _, model = qwen_pair("tiny-qwen2-vl")
    inputs = case("text", "tiny-qwen2-vl")
    with pytest.raises(KeyError, match="blocks.0.hook_resid_post"):
        model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.hook_resid_pst", lambda x, hook: x)])
    with pytest.raises(KeyError, match="Closest valid names"):
        model.run_with_cache(**inputs, names_filter=["vision.blocks.0.attn.hook_patern"])


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_residual_decomposition_is_exact(qwen_pair, family):
    _, model = qwen_pair(family)
    inputs = case("image_video", family)
    _, cache = model.run_with_cache(**inputs)
    n = model.cfg.n_layers
    stack = cache.decompose_resid(layer=n)
    assert stack.shape[0] == 1 + 2 * n
    assert (stack.sum(0) - cache[f"blocks.{n - 1}.hook_resid_post"]).abs().max() < 1e-5
    # the embed term includes the injected visual features (unlike the TransformerLens bridge)
    lay = model.layout(**inputs)
    vis = lay.positions(image=0)
    assert torch.allclose(cache["hook_embed"][0, vis], cache["vision.hook_out"][0, : len(vis)])
    acc = cache.accumulated_resid(layer=n, apply_ln=True)
    assert acc.shape == (n + 1, 1, inputs["input_ids"].shape[1], model.cfg.d_model)
    logits, _ = model.run_with_cache(**inputs, names_filter=lambda x: False)
    final = model.unembed(model.ln_final(cache[f"blocks.{n - 1}.hook_resid_post"]))
    assert (final - logits).abs().max() < 1e-5
    attrs = cache.logit_attrs(stack, tokens=torch.tensor([5]), incorrect_tokens=torch.tensor([6]))
    assert attrs.shape == (1 + 2 * n, 1, inputs["input_ids"].shape[1])


def test_run_with_cache_device_and_remove_batch_dim(qwen_pair):
    _, model = qwen_pair("tiny-qwen2-vl")
    inputs = case("image", "tiny-qwen2-vl")
    logits, cache = model.run_with_cache(**inputs, names_filter=["blocks.0.hook_resid_post", "vision.hook_out"],
                                         remove_batch_dim=True, device="cpu")
    assert cache["blocks.0.hook_resid_post"].shape == (inputs["input_ids"].shape[1], model.cfg.d_model)
    assert cache["vision.hook_out"].dim() == 2 and not cache.has_batch_dim
    _, batched = model.run_with_cache(**inputs, names_filter="blocks.0.hook_resid_post")
    assert torch.equal(batched["blocks.0.hook_resid_post"][0], cache["blocks.0.hook_resid_post"])


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_final_positions_is_exact(qwen_pair, family):
    """final_positions=n computes only the last n positions of the final block: same logits there."""
    _, model = qwen_pair(family)
    for name in ("image", "batch_left"):
        inputs = case(name, family)
        with torch.no_grad():
            full = model(**inputs)
            last = model(**inputs, final_positions=3)
        assert last.shape[1] == 3
        assert (last - full[:, -3:]).abs().max() < 1e-5
    _, cache = model.run_with_cache(**case("image", family), final_positions=1, names_filter=lambda n: n.startswith("blocks.1.hook_resid"))
    assert cache["blocks.1.hook_resid_pre"].shape[1] > 1 and cache["blocks.1.hook_resid_post"].shape[1] == 1


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_attn_result_path_is_exact(qwen_pair, family):
    """use_attn_result: per-head results summed over heads plus the output bias equal hook_attn_out, and the
    logits equal the default path (the vision blocks have an output bias, so dropping it would show)."""
    _, model = qwen_pair(family)
    inputs = case("image", family)
    with torch.no_grad():
        ref = model(**inputs)
    blocks = list(model.blocks) + list(model.vision.blocks)
    for blk in blocks:
        blk.attn.use_attn_result = True
    try:
        logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith(("hook_result", "hook_attn_out", "hook_z")))
    finally:
        for blk in blocks:
            blk.attn.use_attn_result = False
    assert (logits - ref).abs().max() <= 1e-5
    for prefix, blk in [("blocks.1", model.blocks[1]), ("vision.blocks.0", model.vision.blocks[0])]:
        z = cache[f"{prefix}.attn.hook_z"]
        w = blk.attn.o_proj.weight  # d, (h dh)
        per_head = torch.stack([z[:, :, h] @ w[:, h * z.shape[-1]:(h + 1) * z.shape[-1]].T for h in range(z.shape[2])], dim=2)
        assert torch.allclose(cache[f"{prefix}.attn.hook_result"], per_head, atol=1e-6)
        bias = blk.attn.o_proj.bias if blk.attn.o_proj.bias is not None else 0.0
        assert torch.allclose(per_head.sum(2) + bias, cache[f"{prefix}.hook_attn_out"], atol=1e-5)


def test_stop_at_layer_returns_the_residual_and_checks_its_range(qwen_pair):
    _, model = qwen_pair("tiny-qwen2-vl")
    inputs = case("image", "tiny-qwen2-vl")
    n = model.cfg.n_layers
    _, cache = model.run_with_cache(**inputs, names_filter=lambda x: x.endswith(("hook_resid_pre", "hook_resid_post")))
    with torch.no_grad():
        assert torch.equal(model(**inputs, stop_at_layer=1), cache["blocks.1.hook_resid_pre"])
        assert torch.equal(model(**inputs, stop_at_layer=n), cache[f"blocks.{n - 1}.hook_resid_post"])
        for bad in (99, -1, n + 1, 1.5, True):
            with pytest.raises(InputError, match=rf"stop_at_layer={bad!r} is not a block index: this model has {n} blocks, so pass 0..{n}"):
                model(**inputs, stop_at_layer=bad)


def test_final_positions_range_is_checked(qwen_pair):
    _, model = qwen_pair("tiny-qwen2-vl")
    inputs = case("image", "tiny-qwen2-vl")
    length = inputs["input_ids"].shape[1]
    for bad in (0, -2, length + 1):
        with pytest.raises(InputError, match=rf"final_positions={bad} must be an integer from 1 to the sequence length \({length}\)"):
            model(**inputs, final_positions=bad)
    with torch.no_grad():
        assert torch.equal(model(**inputs, final_positions=length), model(**inputs))


def test_vision_features_of_the_wrong_shape_are_clear_errors(qwen_pair):
    _, model = qwen_pair("tiny-qwen2-vl")
    inputs = case("image", "tiny-qwen2-vl")
    with torch.no_grad():
        feats = model.encode_vision(**inputs)
        ref = model(**inputs)
        assert torch.equal(model(**inputs, vision_features=feats), ref)
    m, d = feats.shape[1], model.cfg.d_model
    for bad in (feats[..., :-1], feats[:, : m - 1], torch.cat([feats, feats]), feats[0]):
        with pytest.raises(InputError, match=rf"vision_features must be \[1, >= {m}, {d}\] .* but got {re.escape(str(tuple(bad.shape)))}"):
            model(**inputs, vision_features=bad)
