"""Integrated gradients, saliency, Grad-CAM and Grad-ECLIP against plain-autograd computations written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from map_cases import case
from scipy.ndimage import gaussian_filter

from analyses.attention_maps import MethodNotApplicableError
from analyses.attribution import (
    attribution_grid,
    clip_match,
    grad_cam,
    grad_eclip,
    gradient_saliency,
    high_pass,
    integrated_gradients,
    pack_qwen_pixels,
    pixel_baseline,
    unpack_qwen_pixels,
)


def answer_logprob(logits):
    return torch.log_softmax(logits[:, -1].float(), -1)[:, 7]


def _riemann_pixels(model, inputs, key, baseline, steps, metric):
    """Plain autograd midpoint Riemann sum, one forward per step."""
    x = inputs[key]
    total = torch.zeros_like(x, dtype=torch.float64)
    for i in range(steps):
        a = (i + 0.5) / steps
        p = (baseline + a * (x - baseline)).detach().requires_grad_(True)
        run = dict(inputs)
        run[key] = p
        metric(model(**run)).sum().backward()
        total += p.grad.double() / steps
    return total * (x - baseline).double()


@pytest.mark.slow
def test_ig_pixels_completeness_and_equals_riemann_sum():
    """IG on Qwen's packed pixel rows: sum(attr) = f(x) - f(black) within 1% at 64 steps; equal to the loop."""
    model, inputs = case("qwen2-vl-image")
    ig = integrated_gradients(model, inputs, answer_logprob, target="pixels", baseline="black", steps=64, batch_size=32)
    comp = ig.completeness
    assert comp["relative_gap"] < 0.01, comp
    with torch.no_grad():
        fx = float(answer_logprob(model(**inputs)))
    assert comp["delta"] == pytest.approx(fx - ig.f_baseline, abs=1e-6) and ig.f_input == pytest.approx(fx, abs=1e-5)
    b = pixel_baseline(model, inputs, "black")
    want = _riemann_pixels(model, inputs, "pixel_values", b, 8, answer_logprob)
    small = integrated_gradients(model, inputs, answer_logprob, steps=8, batch_size=3)  # chunks of 3, 3, 2
    np.testing.assert_allclose(small.values.double().numpy(), want.numpy(), atol=1e-6, rtol=1e-4)


def test_black_baseline_is_the_processed_black_image():
    """The packed 'black' baseline equals what the input builder makes of an all-black image; pack/unpack invert."""
    from hooked_vlm.inputs import build_qwen_inputs

    from map_cases import tokenizer

    model, inputs = case("qwen2-vl-image")
    black = build_qwen_inputs(tokenizer(), "what is <image> the red circle", images=[np.zeros((112, 112, 3), np.uint8)])
    np.testing.assert_allclose(pixel_baseline(model, inputs, "black").numpy(), black["pixel_values"].numpy(), atol=1e-5)
    it = model.layout(**inputs).items[0]
    x = inputs["pixel_values"]
    frames = unpack_qwen_pixels(x, it)
    assert frames.shape == (2, 3, 112, 112)
    assert torch.equal(frames[0], frames[1])  # an image is its frame repeated over the temporal patch
    assert torch.equal(pack_qwen_pixels(frames, it), x)
    blur = unpack_qwen_pixels(pixel_baseline(model, inputs, "blur", sigma=3.0), it)
    want = gaussian_filter(frames.double().numpy(), sigma=[0, 0, 3.0, 3.0], mode="nearest")
    np.testing.assert_allclose(blur.numpy(), want, atol=1e-5)


@pytest.mark.parametrize("family,target", [("llava", "visual_embeds"), ("gemma3", "text_embeds")])
def test_ig_embeddings_completeness_and_riemann(family, target):
    """Visual / text embedding IG at hook_embed. The mean baseline is checked for completeness; the Riemann-sum
    comparison uses the zero baseline (a scale-invariant RMSNorm makes f jump at exactly 0, which the completeness
    check exposes: the reason every result reports it)."""
    model, inputs = case(family)
    ig = integrated_gradients(model, inputs, answer_logprob, target=target, baseline="mean", steps=64, batch_size=32)
    assert ig.completeness["relative_gap"] < 0.01, ig.completeness
    lay = model.layout(**inputs)
    pos = ((lay.item[0] >= 0) if target == "visual_embeds" else (lay.kind[0] == 0)).nonzero().flatten()
    _, cache = model.run_with_cache(**inputs, names_filter="hook_embed")
    x = cache["hook_embed"][0, pos]
    total = torch.zeros_like(x, dtype=torch.float64)
    for i in range(16):
        a = (i + 0.5) / 16
        leaf = (a * x).detach().requires_grad_(True)

        def put(v, hook, leaf=leaf):
            v = v.clone()
            v[0, pos] = leaf
            return v

        answer_logprob(model.run_with_hooks(**inputs, fwd_hooks=[("hook_embed", put)])).sum().backward()
        total += leaf.grad.double() / 16
    ig16 = integrated_gradients(model, inputs, answer_logprob, target=target, baseline="zero", steps=16, batch_size=16)
    np.testing.assert_allclose(ig16.values[pos].double().numpy(), (total * x.double()).numpy(), atol=1e-6, rtol=1e-4)
    assert float(ig16.values[~torch.isin(torch.arange(lay.seq_len), pos)].abs().max()) == 0
    grid = attribution_grid(model, inputs, ig16, image=0) if target == "visual_embeds" else None
    if grid is not None:
        cell = lay.cell(0, 1, image=0)
        assert float(grid[0, 0, 1]) == pytest.approx(float(ig16.values[cell].abs().sum()), rel=1e-5)


def test_ig_clip_pixels_completeness():
    model, inputs = case("clip")
    ig = integrated_gradients(model, inputs, clip_match, target="pixels", baseline="blur", steps=64, batch_size=32, sigma=5.0)
    assert ig.completeness["relative_gap"] < 0.01, ig.completeness
    gl = integrated_gradients(model, inputs, clip_match, target="pixels", baseline="blur", steps=16, method="gausslegendre", sigma=5.0)
    assert gl.completeness["relative_gap"] < 0.01


def test_saliency_is_deterministic_in_eval_and_restores_train_mode():
    """InfoCIR pitfall: gradients in train() mode (dropout on). A dropout hook would randomise a train-mode run."""
    model, inputs = case("qwen2-vl-image")
    drop = torch.nn.Dropout(0.5)
    model.add_module("test_dropout", drop)
    model.blocks[0].hook_resid_post.add_hook(lambda x, hook: drop(x))
    try:
        model.train()
        a = gradient_saliency(model, inputs, answer_logprob)
        b = gradient_saliency(model, inputs, answer_logprob, times_input=True)
        assert model.training and drop.training  # the caller's mode is restored
        model.eval()
        ref = gradient_saliency(model, inputs, answer_logprob)
        model.train()
        ig1 = integrated_gradients(model, inputs, answer_logprob, steps=4)
        ig2 = integrated_gradients(model, inputs, answer_logprob, steps=4)
    finally:
        model.reset_hooks()
        del model.test_dropout
        model.eval()
    assert torch.equal(a.values, ref.values)
    assert torch.allclose(b.values, ref.values * inputs["pixel_values"])
    assert torch.equal(ig1.values, ig2.values)


def test_high_pass_is_map_minus_gaussian_blur():
    m = torch.rand(12, 12, generator=torch.Generator().manual_seed(0))
    want = np.clip(m.double().numpy() - gaussian_filter(m.double().numpy(), 2.0, mode="nearest"), 0, None)
    np.testing.assert_allclose(high_pass(m, 2.0).numpy(), want, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2-vl-image", "llava", "gemma3"])
def test_grad_cam_per_token_matches_formula(family):
    """Per answer token: ReLU(A @ mean(G)) on the image's patch tokens, with A, G from a separate plain backward."""
    model, inputs = case(family)
    ids = inputs["input_ids"]
    positions = [ids.shape[1] - 2, ids.shape[1] - 1]
    cams = grad_cam(model, inputs, positions)
    assert cams.maps.shape[0] == 2
    for n, p in enumerate(positions):
        keep = {}

        def grab(x, hook):
            x.retain_grad()
            keep["a"] = x
            return x

        logits = model.run_with_hooks(**inputs, fwd_hooks=[(cams.hook, grab)])
        torch.log_softmax(logits[0, p - 1], -1)[int(ids[0, p])].backward()
        a, g = keep["a"].detach(), keep["a"].grad
        if family.startswith("qwen"):
            lay = model.layout(**inputs)
            a, g = lay.vision_grid(a, image=0), lay.vision_grid(g, image=0)
        else:
            start = 1 if family == "llava" else 0  # CLIP tower: drop [CLS]
            a, g = a[0, start:], g[0, start:]
        af, gf = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        want = torch.relu(af @ gf.mean(0))
        np.testing.assert_allclose(cams.maps[n].reshape(-1).numpy(), want.numpy(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_grad_eclip_matches_formula(family):
    model, inputs = case(family)
    res = grad_eclip(model, inputs["pixel_values"], inputs["input_ids"])
    siglip = family == "siglip"
    vp = "vision.head.attn" if siglip else f"vision.blocks.{model.vision.depth - 1}.attn"
    tp = f"text.blocks.{model.text.depth - 1}.attn"
    keep = {}

    def grab(x, hook):
        if hook.name.endswith("hook_z"):
            x.retain_grad()
        keep[hook.name] = x
        return x

    names = [f"{p}.{h}" for p in (vp, tp) for h in ("hook_q", "hook_k", "hook_v", "hook_z")]
    out = model.run_with_hooks(**inputs, fwd_hooks=[(n, grab) for n in names])
    cos = torch.nn.functional.cosine_similarity(out.image_embeds[0], out.text_embeds[0], dim=0)
    cos.backward()
    assert res.score == pytest.approx(float(cos.detach()), abs=1e-6)

    def formula(prefix, pool, keys):
        q = keep[f"{prefix}.hook_q"][0, pool].detach().flatten()
        k = keep[f"{prefix}.hook_k"][0, keys].detach().flatten(1)
        v = keep[f"{prefix}.hook_v"][0, keys].detach().flatten(1)
        w = keep[f"{prefix}.hook_z"].grad[0, pool].flatten()
        c = (k @ q) / (k.norm(dim=1) * q.norm())
        lam = (c - c.min()) / (c.max() - c.min())
        return torch.relu((v * w).sum(1) * lam)

    n_patches = res.image.numel()
    first = 0 if siglip else 1
    want_img = formula(vp, 0, list(range(first, first + n_patches)))
    np.testing.assert_allclose(res.image.flatten().numpy(), want_img.numpy(), atol=1e-7, rtol=1e-4)
    p = res.meta["pool_position"]
    keys = list(range(p + 1)) if not siglip else list(range(inputs["input_ids"].shape[1]))
    np.testing.assert_allclose(res.text.numpy(), formula(tp, p, keys).numpy(), atol=1e-7, rtol=1e-4)
    assert float(res.text.sum()) > 0  # a real map (ReLU may zero the 2x2 tiny CLIP image map: reported, not replaced)


def test_methods_that_do_not_apply_raise():
    _, cin = case("clip")
    with pytest.raises(MethodNotApplicableError, match="no vision tower with blocks: Grad-CAM does not apply"):
        grad_cam(_NoVision(), cin, [3])
    model, inputs = case("qwen2-vl-image")
    with pytest.raises(MethodNotApplicableError, match="two-tower CLIP / SigLIP"):
        grad_eclip(model, inputs["pixel_values"], inputs["input_ids"])
    text_only = {"input_ids": inputs["input_ids"][:, :3]}
    with pytest.raises(MethodNotApplicableError, match="exactly one pixel tensor"):
        integrated_gradients(model, text_only, answer_logprob, target="pixels", steps=2)
    with pytest.raises(ValueError, match="target must be"):
        integrated_gradients(model, inputs, answer_logprob, target="logits", steps=2)


class _NoVision(torch.nn.Module):
    vision = None


def test_ig_equals_captum_on_the_transformers_model():
    """Our IG on the hooked twin == Captum's IntegratedGradients on the transformers model (same inputs, rule)."""
    from captum.attr import IntegratedGradients

    from hooked_vlm.tiny import tiny_hf_model

    model, inputs = case("qwen2-vl-image")
    hf = tiny_hf_model("tiny-qwen2-vl")  # the same weights as case(): seed 0
    base = pixel_baseline(model, inputs, "black")

    def forward(pv, ids, am, thw, mm):
        return answer_logprob(hf(input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm).logits)

    extra = tuple(inputs[k] for k in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids"))
    # Captum counts dim 0 (Qwen's packed patch rows) as examples, so it steps one whole path point per batch
    n_rows = inputs["pixel_values"].shape[0]
    ref = IntegratedGradients(forward).attribute(inputs["pixel_values"], baselines=base, additional_forward_args=extra,
                                                 n_steps=16, method="riemann_middle", internal_batch_size=n_rows)
    ours = integrated_gradients(model, inputs, answer_logprob, baseline=base, steps=16, batch_size=8)
    np.testing.assert_allclose(ours.values.numpy(), ref.detach().numpy(), atol=2e-6, rtol=1e-3)


def test_pixel_attribution_grid_sums_each_cells_pixels():
    """LLaVA-NeXT (5-D any-res crops): |gradient| summed over each grid token's pixels: the any-res grid (a token's
    canvas pixel box, layout.pixel_box, read from the crop that holds it) and, with part=BASE, the base crop."""
    from hooked_vlm.families.llava_inputs import BASE, GRID

    model, inputs = case("llava-next")
    sal = gradient_saliency(model, inputs, answer_logprob)
    grid = attribution_grid(model, inputs, sal, image=0, part=BASE)[0]
    crop = sal.values[0, 0].abs().sum(0)  # [H, W] of the base crop
    rows, cols = grid.shape
    ch, cw = crop.shape[0] // rows, crop.shape[1] // cols
    for r in range(rows):
        for c in range(cols):
            assert float(grid[r, c]) == pytest.approx(float(crop[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw].sum()), rel=1e-5)
    lay = model.layout(**inputs)
    it = lay.items[0]
    stitched = attribution_grid(model, inputs, sal, image=0)[0]
    assert tuple(stitched.shape) == tuple(it.grid_size)
    s = sal.values.shape[-1]
    px = sal.values[0].abs().sum(1)  # [crops, S, S]
    for r in range(stitched.shape[0]):
        for c in range(stitched.shape[1]):
            pos = lay.cell(r, c, image=0, part=GRID)
            y0, x0, y1, x1 = lay.pixel_box(0, pos)
            want = sum(float(px[1 + (y // s) * it.crop_grid[1] + x // s, y % s, x % s]) for y in range(y0, y1) for x in range(x0, x1))
            assert float(stitched[r, c]) == pytest.approx(want, rel=1e-5)


def _plain_grad(model, inputs, hook, p):
    """Activation and gradient of ``hook`` under log p(token_p | prefix), one plain forward + backward."""
    keep = {}

    def grab(x, hook):
        x.retain_grad()
        keep["a"] = x
        return x

    ids = inputs["input_ids"]
    logits = model.run_with_hooks(**inputs, fwd_hooks=[(hook, grab)])
    torch.log_softmax(logits[0, p - 1].float(), -1)[int(ids[0, p])].backward()
    return keep["a"].detach(), keep["a"].grad.detach()


def _cam(view_a, view_g):
    """Grad-CAM on a [..., d] view: ReLU(A @ mean over every cell of G)."""
    a, g = view_a.reshape(-1, view_a.shape[-1]), view_g.reshape(-1, view_g.shape[-1])
    return torch.relu(a @ g.mean(0)).reshape(view_a.shape[:-1])


def _llava_canvas(x, side, crop_grid, unpad, cls):
    """Any-res crops (tower rows 1..n, raster order of the crop grid) pasted patch by patch into the image."""
    cr, cc = crop_grid
    canvas = torch.zeros(cr * side, cc * side, x.shape[-1])
    for i in range(cr):
        for j in range(cc):
            patches = x[1 + i * cc + j, cls:]
            for n in range(side * side):
                canvas[i * side + n // side, j * side + n % side] = patches[n]
    top, left, rows, cols = unpad
    return canvas[top : top + rows, left : left + cols]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2.5-vl-video", "llava-next-video"])
def test_grad_cam_video_per_frame_matches_formula(family):
    """Video: one CAM per frame / temporal slice, channel weights pooled over the whole video's patches."""
    model, inputs = case(family)
    ids = inputs["input_ids"]
    positions = [ids.shape[1] - 2, ids.shape[1] - 1]
    cams = grad_cam(model, inputs, positions, video=0)
    lay = model.layout(**inputs)
    _, it = lay.find_item(video=0)
    for n, p in enumerate(positions):
        a, g = _plain_grad(model, inputs, cams.hook, p)
        if family.startswith("qwen"):
            t, h, w = it.grid_thw
            rows = [lay.vision_rows(video=0, frame=f)[1] for f in range(t)]  # raster patch rows of each slice
            va = torch.stack([a[0, r].reshape(h, w, -1) for r in rows])
            vg = torch.stack([g[0, r].reshape(h, w, -1) for r in rows])
        else:  # one tower row per frame, [CLS] first
            side = lay.geometry.side
            va, vg = (x[:, 1:].reshape(x.shape[0], side, side, -1) for x in (a, g))
        want = _cam(va, vg)
        assert cams.maps[n].shape == want.shape and want.shape[0] == (it.grid_thw[0] if family.startswith("qwen") else 2)
        np.testing.assert_allclose(cams.maps[n].numpy(), want.numpy(), atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava-next", "llava-onevision"])
def test_grad_cam_anyres_stitches_every_crop(family):
    """Any-res: the high-resolution crops' patches stitched into the image (padding cut); part=BASE: the base crop."""
    from hooked_vlm.families.llava_inputs import BASE

    model, inputs = case(family)
    p = inputs["input_ids"].shape[1] - 1
    cams = grad_cam(model, inputs, [p])
    base = grad_cam(model, inputs, [p], part=BASE)
    lay = model.layout(**inputs)
    _, it = lay.find_item(image=0)
    side, cls = lay.geometry.side, int(lay.geometry.has_cls)
    assert it.crop_grid != (0, 0)
    a, g = _plain_grad(model, inputs, cams.hook, p)
    va = _llava_canvas(a, side, it.crop_grid, it.unpad, cls)
    vg = _llava_canvas(g, side, it.crop_grid, it.unpad, cls)
    want = _cam(va, vg)
    assert tuple(cams.maps.shape) == (1, 1, it.unpad[2], it.unpad[3])
    np.testing.assert_allclose(cams.maps[0, 0].numpy(), want.numpy(), atol=1e-6, rtol=1e-4)
    wb = _cam(a[0, cls:].reshape(side, side, -1), g[0, cls:].reshape(side, side, -1))
    np.testing.assert_allclose(base.maps[0, 0].numpy(), wb.numpy(), atol=1e-6, rtol=1e-4)
