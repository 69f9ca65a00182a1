"""nnsight front door: ``remote="local"`` (nnsight's local simulation of a remote run) on our envoy returns
what the hooked model computes, and ``scan`` reports exact shapes without loading weights (its documented
contract: real tensors, meaningless values, see ``HookedScanTracer``)."""

from __future__ import annotations

import torch

from hooked_vlm import HookedVLM
from hooked_vlm.inputs import build_qwen_inputs
from hooked_vlm.nnsight_ext import HookedVLMEnvoy
from hooked_vlm.samples import synthetic_grid_image

torch.set_num_threads(1)


def _inputs(model):
    image, _ = synthetic_grid_image(seed=0, grid=4, num_shapes=3)
    return build_qwen_inputs(model.tokenizer, "<image> what color is the circle", images=[image])


def test_remote_local_trace_matches_hooks_and_builtins_carry_a_remote_identity():
    model = HookedVLM.from_pretrained("tiny-qwen2-vl")
    inputs = _inputs(model)
    nn_model = model.to_nnsight()
    assert nn_model.spec == {"family": "tiny", "config": {"name": "tiny-qwen2-vl"}, "seed": 0}
    with nn_model.trace(**inputs, remote="local"):
        resid = nn_model.blocks[0].hook_resid_post.output.clone().save()
        nn_model.blocks[0].hook_resid_post.output[:, -1] = 0
        logits = nn_model.output.save()

    def zero_last(t, hook):
        t = t.clone()
        t[:, -1] = 0
        return t

    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter="blocks.0.hook_resid_post")
        patched = model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.hook_resid_post", zero_last)])
    assert torch.equal(resid, cache["blocks.0.hook_resid_post"])
    torch.testing.assert_close(logits, patched, atol=1e-6, rtol=0)


def test_scan_gives_exact_shapes_without_loading_weights():
    model = HookedVLM.from_pretrained("tiny-qwen2-vl")
    inputs = _inputs(model)
    envoy = HookedVLMEnvoy(model.to_nnsight().spec)  # built on the meta device from its key
    with envoy.scan(**inputs):
        vision = envoy.vision.hook_out.output.save()  # in execution order, as nnsight requires
        pattern = envoy.blocks[1].attn.hook_pattern.output.save()
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=["blocks.1.attn.hook_pattern", "vision.hook_out"])
    assert pattern.shape == cache["blocks.1.attn.hook_pattern"].shape and pattern.dtype == torch.float32
    assert vision.shape == cache["vision.hook_out"].shape
    assert all(p.device.type == "meta" for p in envoy._module.parameters())  # weights never loaded
