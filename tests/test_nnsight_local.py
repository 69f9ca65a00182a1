"""nnsight over hooked_vlm models, locally: every hook point by its module path, reads and edits,
gradients, scan, sessions, several invokes with image and video inputs, and the remote model key.

References are TransformerLens hooks on the same model (``run_with_cache`` / ``run_with_hooks``):
nnsight must see and change exactly what a TransformerLens hook sees and changes.
"""

from __future__ import annotations

import importlib.metadata
import json

import nnsight
import pytest
import torch
from qwen_cases import IMG, PAD, case

from hooked_vlm.nnsight_ext import (
    HookedVLMEnvoy,
    batch_inputs,
    build_from_spec,
    tiny_nnsight,
    to_nnsight,
    toy_nnsight,
)
from hooked_vlm.tiny import tiny_model

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


@pytest.fixture(scope="module")
def pair():
    """name -> (nnsight model, plain hooked model with the same weights)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = (tiny_nnsight(name, seed=0), tiny_model(name, 0))
        return cache[name]

    return get


def envoy_at(nn_model, name: str):
    """The envoy of hook point ``name`` reached by plain attribute / index navigation."""
    node = nn_model
    for part in name.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


# ----- every hook point ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hook_point_is_an_envoy_of_that_hook(pair, family):
    nn_model, ref = pair(family)
    for name, hook in ref.hook_dict.items():
        envoy = envoy_at(nn_model, name)
        assert envoy.path == f"model.{name}"
        assert type(envoy._module) is type(hook)
    # The tree is the hooked model's own tree: same names, same order.
    assert [n for n, _ in nn_model._module.named_modules() if n in ref.hook_dict] == list(ref.hook_dict)


@pytest.mark.parametrize("family", FAMILIES)
def test_reading_every_hook_matches_run_with_cache(pair, family):
    """One trace reads every hook that fires (attention patterns included), in firing order."""
    nn_model, ref = pair(family)
    inputs = case("image_video", family)
    ref_logits, ref_cache = ref.run_with_cache(**inputs)
    order = list(ref_cache.keys())
    assert any(name.endswith("attn.hook_pattern") for name in order)
    with nn_model.trace(**inputs):
        saved = nnsight.save([envoy_at(nn_model, name).output for name in order])
        logits = nn_model.output.save()
    assert torch.equal(logits, ref_logits)
    for name, value in zip(order, saved):
        assert value.shape == ref_cache[name].shape, name
        assert torch.equal(value, ref_cache[name]), name
    # Asking for patterns switched them on for that trace only: the fast path is back.
    assert not any(getattr(m, "force_pattern", False) for m in nn_model._module.modules())


def test_patterns_are_computed_only_when_asked(pair):
    nn_model, ref = pair("tiny-qwen2-vl")
    inputs = case("image", "tiny-qwen2-vl")
    with nn_model.trace(**inputs):
        logits = nn_model.output.save()
    assert torch.allclose(logits, ref(**inputs), atol=1e-5)
    with nn_model.trace(**inputs):
        pattern = nn_model.blocks[1].attn.hook_pattern.output.save()
    n = inputs["input_ids"].shape[1]
    assert pattern.shape == (1, ref.cfg.n_heads, n, n)
    assert torch.allclose(pattern.sum(-1), torch.ones(1, ref.cfg.n_heads, n), atol=1e-5)


# ----- edits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_in_place_edit_equals_run_with_hooks(pair, family):
    nn_model, ref = pair(family)
    inputs = case("image", family)
    image = inputs["input_ids"][0] == IMG

    def ablate(act, hook):
        act[:, image] = 0
        return act

    expected = ref.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.hook_attn_out", ablate), ("vision.hook_out", lambda a, hook: a * 2)])
    with nn_model.trace(**inputs):
        nn_model.vision.hook_out.output[:] = nn_model.vision.hook_out.output * 2
        nn_model.blocks[0].hook_attn_out.output[:, image] = 0
        logits = nn_model.output.save()
    assert torch.equal(logits, expected)
    assert not torch.allclose(logits, ref(**inputs))


def test_assignment_edit_and_attention_pattern_edit(pair):
    nn_model, ref = pair("tiny-qwen2-vl")
    inputs = case("image", "tiny-qwen2-vl")
    n = inputs["input_ids"].shape[1]
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]

    expected = ref.run_with_hooks(
        **inputs,
        fwd_hooks=[
            ("blocks.1.attn.hook_pattern", lambda p, hook: uniform.expand_as(p).clone()),
            ("blocks.1.hook_resid_mid", lambda r, hook: r + 1.0),
        ],
    )
    with nn_model.trace(**inputs):
        pattern = nn_model.blocks[1].attn.hook_pattern.output
        nn_model.blocks[1].attn.hook_pattern.output = uniform.expand_as(pattern).clone()
        nn_model.blocks[1].hook_resid_mid.output = nn_model.blocks[1].hook_resid_mid.output + 1.0
        logits = nn_model.output.save()
    assert torch.equal(logits, expected)


# ----- gradients, scan, sessions -------------------------------------------------------------------------


def test_gradients_match_autograd(pair):
    nn_model, ref = pair("tiny-qwen2-vl")
    inputs = case("image", "tiny-qwen2-vl")
    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept[hook.name] = act
        return act

    logits = ref.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.hook_resid_post", keep), ("vision.hook_out", keep)])
    logits[0, -1].logsumexp(-1).backward()
    ref.zero_grad(set_to_none=True)

    with nn_model.trace(**inputs):
        vision = nn_model.vision.hook_out.output
        resid = nn_model.blocks[0].hook_resid_post.output
        loss = nn_model.output[0, -1].logsumexp(-1)
        with loss.backward():
            g_resid = resid.grad.save()
            g_vision = vision.grad.save()
    nn_model._module.zero_grad(set_to_none=True)
    assert torch.equal(g_resid, kept["blocks.0.hook_resid_post"].grad)
    assert torch.equal(g_vision, kept["vision.hook_out"].grad)
    assert g_vision.abs().sum() > 0


@pytest.mark.parametrize("name", ["image_video", "batch_left"])
def test_scan_gives_shapes_without_loading_weights(pair, name):
    family = "tiny-qwen2.5-vl"
    meta = tiny_nnsight(family, seed=0, dispatch=False)
    assert next(meta._module.parameters()).device.type == "meta"
    inputs = case(name, family)
    with meta.scan(**inputs):
        vision = nnsight.save(meta.vision.hook_out.output.shape)
        pattern = nnsight.save(meta.blocks[1].attn.hook_pattern.output.shape)
        logits = nnsight.save(meta.output.shape)
    assert not meta.dispatched
    assert next(meta._module.parameters()).device.type == "meta"
    _, ref = pair(family)
    _, cache = ref.run_with_cache(**inputs, names_filter=["vision.hook_out", "blocks.1.attn.hook_pattern"])
    assert vision == cache["vision.hook_out"].shape
    assert pattern == cache["blocks.1.attn.hook_pattern"].shape
    assert logits == (*inputs["input_ids"].shape, ref.cfg.d_vocab)


def test_session_shares_values_between_traces(pair):
    nn_model, ref = pair("tiny-qwen2-vl")
    a, b = case("image", "tiny-qwen2-vl"), case("batch_left", "tiny-qwen2-vl")
    with nn_model.session():
        with nn_model.trace(**a):
            last = nn_model.blocks[0].hook_resid_post.output[:, -1].clone()
        with nn_model.trace(**b):
            nn_model.blocks[0].hook_resid_post.output[:, -1] = last
            logits = nn_model.output.save()
    _, cache = ref.run_with_cache(**a, names_filter="blocks.0.hook_resid_post")

    def put(act, hook):
        act[:, -1] = cache["blocks.0.hook_resid_post"][:, -1]
        return act

    assert torch.equal(logits, ref.run_with_hooks(**b, fwd_hooks=[("blocks.0.hook_resid_post", put)]))


# ----- several invokes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_two_invokes_prompt_to_prompt_patching(pair, family):
    """Clean image prompt -> corrupted image prompt (same length, other image): patch one position."""
    nn_model, ref = pair(family)
    clean = case("image", family)
    corrupt = dict(clean, pixel_values=torch.randn(clean["pixel_values"].shape, generator=torch.Generator().manual_seed(9)))
    pos = int((clean["input_ids"][0] == IMG).nonzero()[0])

    with nn_model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(**clean):
            clean_vision = nn_model.vision.hook_out.output.save()
            clean_resid = nn_model.blocks[0].hook_resid_post.output[:, pos].clone()
            barrier()
        with tracer.invoke(**corrupt):
            barrier()
            nn_model.blocks[0].hook_resid_post.output[:, pos] = clean_resid
            patched = nn_model.output.save()

    _, cache = ref.run_with_cache(**clean, names_filter=["blocks.0.hook_resid_post", "vision.hook_out"])

    def put(act, hook):
        act[:, pos] = cache["blocks.0.hook_resid_post"][:, pos]
        return act

    expected = ref.run_with_hooks(**corrupt, fwd_hooks=[("blocks.0.hook_resid_post", put)])
    assert clean_vision.shape == cache["vision.hook_out"].shape  # narrowed to the invoke's own row
    assert torch.allclose(clean_vision, cache["vision.hook_out"], atol=1e-6)
    assert patched.shape == expected.shape
    assert torch.allclose(patched, expected, atol=1e-5)
    assert not torch.allclose(patched, ref(**corrupt), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_invokes_with_image_and_video_of_different_lengths(pair, family):
    """An image invoke and a video invoke in one batch: inputs padded and concatenated, rows narrowed."""
    nn_model, ref = pair(family)
    image, video = case("image", family), case("video", family)
    with nn_model.trace() as tracer:
        with tracer.invoke(**image):
            image_vision = nn_model.vision.hook_out.output.save()
            image_logits = nn_model.output.save()
        with tracer.invoke(**video):
            video_resid = nn_model.blocks[1].hook_resid_post.output.save()
            video_logits = nn_model.output.save()
    n_img, n_vid = image["input_ids"].shape[1], video["input_ids"].shape[1]
    longest = max(n_img, n_vid)
    assert image_logits.shape[:2] == (1, longest) and video_logits.shape[:2] == (1, longest)
    _, image_cache = ref.run_with_cache(**image, names_filter="vision.hook_out")
    _, video_cache = ref.run_with_cache(**video, names_filter="blocks.1.hook_resid_post")
    # Left padding: each invoke's own tokens are the last ones of its row.
    assert torch.allclose(image_logits[:, -n_img:], ref(**image), atol=1e-5)
    assert torch.allclose(video_logits[:, -n_vid:], ref(**video), atol=1e-5)
    assert torch.allclose(video_resid[:, -n_vid:], video_cache["blocks.1.hook_resid_post"], atol=1e-5)
    m = image_cache["vision.hook_out"].shape[1]
    assert torch.allclose(image_vision[:, :m], image_cache["vision.hook_out"], atol=1e-6)


OTHER_FAMILIES = {  # name -> (first invoke's case, second invoke's case), from those families' own tests
    "tiny-llava": ("image", "two_images"),
    "tiny-llava-next": ("image", "two_images"),  # different crop counts: pixel_values padded on dim 1
    "tiny-llava-onevision": ("image", "video"),
    "tiny-llava-next-video": ("video", "image_video"),
    "tiny-gemma3": ("image", "two_images"),  # token_type_ids padded with the ids
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_two_invokes_on_every_family(family):
    """Each invoke of a two-invoke batch sees what a run of its own input alone gives (left padding)."""
    from helpers import gemma_cases, llava_cases

    nn_model = tiny_nnsight(family, seed=0)
    first, second = OTHER_FAMILIES[family]
    if family == "tiny-gemma3":
        a, b = gemma_cases.CASES[first](), gemma_cases.CASES[second]()
    else:
        a, b = (llava_cases.case(family, name, nn_model._module) for name in (first, second))
    with nn_model.trace() as tracer:
        with tracer.invoke(**a):
            out_a = nn_model.output.save()
        with tracer.invoke(**b):
            resid_b = nn_model.blocks[0].hook_resid_post.output.save()
            out_b = nn_model.output.save()
    _, cache = nn_model._module.run_with_cache(**b, names_filter="blocks.0.hook_resid_post")
    for out, inputs in ((out_a, a), (out_b, b)):
        n = inputs["input_ids"].shape[1]
        assert out.shape[0] == 1
        assert torch.allclose(out[:, -n:], nn_model._module(**inputs), atol=1e-5)
    assert torch.allclose(resid_b[:, -b["input_ids"].shape[1]:], cache["blocks.0.hook_resid_post"], atol=1e-5)


def test_batch_inputs_pads_and_concatenates_consistently():
    image, video = case("image", "tiny-qwen2.5-vl"), case("video", "tiny-qwen2.5-vl")
    merged = batch_inputs([image, video], pad_token_id=PAD)
    n_img, n_vid = image["input_ids"].shape[1], video["input_ids"].shape[1]
    longest = max(n_img, n_vid)
    assert merged["input_ids"].shape == (2, longest)
    assert torch.equal(merged["input_ids"][0, -n_img:], image["input_ids"][0])
    assert torch.equal(merged["input_ids"][1, -n_vid:], video["input_ids"][0])
    assert (merged["input_ids"][1, : longest - n_vid] == PAD).all()
    assert merged["attention_mask"].sum(-1).tolist() == [n_img, n_vid]
    assert torch.equal(merged["pixel_values"], image["pixel_values"])
    assert torch.equal(merged["pixel_values_videos"], video["pixel_values_videos"])
    assert torch.equal(merged["video_grid_thw"], video["video_grid_thw"])
    two = batch_inputs([image, image])
    assert torch.equal(two["image_grid_thw"], torch.cat([image["image_grid_thw"]] * 2))
    assert two["pixel_values"].shape[0] == 2 * image["pixel_values"].shape[0]
    assert "attention_mask" not in two  # equal lengths: nothing padded, nothing invented
    right = batch_inputs([image, video], pad_token_id=PAD, padding_side="right")
    assert torch.equal(right["input_ids"][1, :n_vid], video["input_ids"][0])


# ----- the remote model key ----------------------------------------------------------------------------------


def test_model_key_rebuilds_the_same_model_without_a_hub(pair):
    nn_model, ref = pair("tiny-qwen2-vl")
    key = nn_model.to_model_key()
    cls_path, spec = key.split(":", 1)
    assert cls_path == "hooked_vlm.nnsight_ext.envoy.HookedVLMEnvoy"
    assert json.loads(spec) == {"family": "tiny", "config": {"name": "tiny-qwen2-vl", "overrides": {}}, "seed": 0}
    # What an NDIF server calls, with the keywords it passes.
    rebuilt = HookedVLMEnvoy.from_model_key(key, dispatch=True, dtype="float32", device="cpu", trust_remote_code=False)
    inputs = case("image", "tiny-qwen2-vl")
    with rebuilt.trace(**inputs):
        logits = rebuilt.output.save()
    assert torch.equal(logits, ref(**inputs))
    info = HookedVLMEnvoy.describe_checkpoint(key, "float32")
    n_params = sum(p.numel() for p in ref.parameters())
    assert info.n_params == n_params and info.size_bytes >= 4 * n_params


def test_checkpoint_key_for_weights_from_anywhere(tmp_path):
    ref = tiny_model("tiny-qwen2.5-vl", 3)
    with torch.no_grad():
        next(ref.parameters()).add_(0.5)  # weights that no seed produces
    nn_model = to_nnsight(ref, checkpoint=tmp_path / "w.safetensors")
    spec = nn_model.spec
    assert spec["family"] == "hf" and spec["checkpoint"].endswith("w.safetensors") and len(spec["sha256"]) == 64
    rebuilt = HookedVLMEnvoy.from_model_key(nn_model.to_model_key(), dispatch=True)
    inputs = case("video", "tiny-qwen2.5-vl")
    with rebuilt.trace(**inputs):
        logits = rebuilt.output.save()
    assert torch.equal(logits, ref(**inputs))
    (tmp_path / "w.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        build_from_spec(spec)


def test_hf_family_seed_key_rebuilds_transformers_initialisation():
    """A model of transformers' own seeded initialisation gets a config + seed key (no file, no hub)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from hooked_vlm.loading import from_hf
    from hooked_vlm.tiny import qwen2_5_vl_config

    torch.manual_seed(7)
    ref = from_hf(Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config()).eval())
    nn_model = to_nnsight(ref, seed=7)  # verified: rebuilding from the key gives these weights
    spec = json.loads(nn_model.to_model_key().split(":", 1)[1])
    assert spec["family"] == "hf" and spec["seed"] == 7
    assert spec["config"]["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    rebuilt = HookedVLMEnvoy.from_model_key(nn_model.to_model_key(), dispatch=True)
    inputs = case("two_images", "tiny-qwen2.5-vl")
    with rebuilt.trace(**inputs):
        logits = rebuilt.output.save()
    assert torch.equal(logits, ref(**inputs))


def test_seed_key_is_verified():
    ref = tiny_model("tiny-qwen2-vl", 0)  # randomised weights: not transformers' seed-0 init
    with pytest.raises(ValueError, match="checkpoint="):
        to_nnsight(ref, seed=0)
    local_only = to_nnsight(ref)
    with pytest.raises(ValueError, match="no remote identity"):
        local_only.to_model_key()


def test_remote_local_simulation_equals_local(pair, monkeypatch):
    """remote="local": serialise the request, rebuild it against the model, run: what a server does.

    nnsight's simulation hides every module outside a short whitelist (torch, transformers, ...) while
    deserialising, as if on a server without them, and re-imports what the payload names. A real
    NDIF server for hooked_vlm has hooked-vlm and its dependencies installed (scripts/ndif/install.sh),
    so installed distributions are whitelisted here; re-importing them under nnsight's process-wide
    ``.save`` mount breaks anyio's class checks, which no real server does.
    """
    import sys

    from nnsight.intervention.backends import local

    try:
        importlib.metadata.distribution("hooked-vlm")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("hooked-vlm must be installed (pip install -e .): the request names hooked_vlm classes")
    installed = {name.split(".")[0] for name, mod in list(sys.modules.items()) if "site-packages" in str(getattr(mod, "__file__", ""))}
    monkeypatch.setattr(local, "_SERVER_MODULES", local._SERVER_MODULES | installed | {"hooked_vlm", "kernels"})
    nn_model, ref = pair("tiny-qwen2-vl")
    inputs = case("image", "tiny-qwen2-vl")
    with nn_model.trace(**inputs, remote="local"):
        nn_model.blocks[0].hook_mlp_out.output[:] = 0
        pattern = nn_model.blocks[1].attn.hook_pattern.output.save()
        resid = nn_model.blocks[1].hook_resid_post.output.save()
    with ref.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda a, hook: torch.zeros_like(a))]):
        _, cache = ref.run_with_cache(**inputs, names_filter=["blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"])
    assert torch.equal(resid, cache["blocks.1.hook_resid_post"])
    assert torch.equal(pattern, cache["blocks.1.attn.hook_pattern"])


def test_toy_model_two_invokes_and_grad():
    toy = toy_nnsight(seed=0)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with toy.trace() as tracer:
        with tracer.invoke(input_ids=ids[:1]):
            a = toy.blocks[0].hook_resid_post.output.save()
        with tracer.invoke(input_ids=ids[1:]):
            b = toy.blocks[0].hook_resid_post.output.save()
    _, cache = toy._module.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    assert torch.allclose(torch.cat([a, b]), cache["blocks.0.hook_resid_post"], atol=1e-6)
