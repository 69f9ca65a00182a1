"""Logit lens: the last lens layer is the model's output on every family; views come from the token layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses.logit_lens import clip_patch_lens, clip_text_lens, lens_hook_names, logit_lens, plot_cell_view, plot_frame_view
from vlm_cases import CASES, make_inputs

ANSWERS = [5, 6, 40]


@pytest.mark.parametrize("case", list(CASES))
def test_lens_at_last_layer_equals_model_logits(case):
    model, inputs, _ = make_inputs(case)
    with torch.no_grad():
        logits = model(**inputs)[0]
    res = logit_lens(model, inputs, answer_ids=ANSWERS, top_k=3)
    n = model.cfg.n_layers
    assert res.layers == list(range(n + 1))
    ref = torch.softmax(logits.float(), -1)
    last = res.layers.index(n)
    torch.testing.assert_close(res.answer_probs[last], ref[res.positions][:, ANSWERS], atol=1e-5, rtol=1e-4)
    top_p, top_i = ref[res.positions].topk(3, dim=-1)
    torch.testing.assert_close(res.top_probs[last], top_p, atol=1e-5, rtol=1e-4)
    assert torch.equal(res.top_ids[last, :, 0], top_i[:, 0])


def test_lens_layer_l_is_final_norm_of_resid_pre_and_norm_none_skips_it():
    model, inputs, _ = make_inputs("qwen2.5-vl-image")
    _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n == "blocks.1.hook_resid_pre")
    resid = cache["blocks.1.hook_resid_pre"][0]
    w = model.ln_final.w if hasattr(model.ln_final, "w") else model.ln_final.weight
    # hand RMSNorm of the Qwen final norm, then the unembedding
    normed = resid / torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + model.ln_final.eps) * w
    ref = torch.softmax(normed @ model.unembed.weight.T, -1)
    res = logit_lens(model, inputs, answer_ids=ANSWERS, layers=[1])
    torch.testing.assert_close(res.answer_probs[0], ref[res.positions][:, ANSWERS], atol=1e-5, rtol=1e-4)
    raw = logit_lens(model, inputs, answer_ids=ANSWERS, layers=[1], norm="none")
    ref_raw = torch.softmax(resid @ model.unembed.weight.T, -1)
    torch.testing.assert_close(raw.answer_probs[0], ref_raw[raw.positions][:, ANSWERS], atol=1e-5, rtol=1e-4)
    assert raw.norm == "none" and res.norm == "final"
    with pytest.raises(ValueError, match="norm must be 'final'"):
        logit_lens(model, inputs, norm="ln")


@pytest.mark.parametrize("case", ["qwen2.5-vl-image", "llava-image", "llava-next-image", "gemma3-image"])
def test_cell_view_places_each_visual_token_at_its_layout_cell(case):
    model, inputs, _ = make_inputs(case)
    res = logit_lens(model, inputs, answer_ids=ANSWERS)
    lay = res.layout
    _, it = lay.find_item(image=0)
    base = getattr(it, "base_tokens", 0)
    parts = ["base", "crops"] if 0 < base < getattr(it, "total_tokens", 0) else ["auto"]
    pos_index = {p: i for i, p in enumerate(res.positions)}
    for part in parts:
        view = res.cell_view(image=0, answer=1, part=part)
        image_pos = lay.positions(image=0).tolist()
        if part == "base":
            image_pos = image_pos[:base]
        elif part == "crops":
            image_pos = image_pos[base:]
        image_pos = [p for p in image_pos if int(lay.col[0, p]) >= 0]  # LLaVA-NeXT newline tokens have no cell
        # brute force: every image token, looked up by its (row, col) from the layout
        seen = set()
        for p in image_pos:
            r, c = int(lay.row[0, p]), int(lay.col[0, p])
            seen.add((r, c))
            same = [q for q in image_pos if (int(lay.row[0, q]), int(lay.col[0, q])) == (r, c)]
            expect = np.mean([res.answer_probs[:, pos_index[q], 1].numpy() for q in same], axis=0)
            np.testing.assert_allclose(view[:, r, c], expect, rtol=1e-6)
        assert view.shape[1] * view.shape[2] == len(seen)
        assert view.shape[0] == model.cfg.n_layers + 1
        grid = res.top_token_grid(image=0, part=part)
        assert grid.shape == view.shape and (grid >= 0).all()


def test_frame_view_averages_each_temporal_slice(tmp_path):
    model, inputs, frames = make_inputs("qwen2.5-vl-video")
    res = logit_lens(model, inputs, answer_ids=ANSWERS)
    lay = res.layout
    fv = res.frame_view(video=0, answer=0)
    _, it = lay.find_item(video=0)
    assert fv.shape == (model.cfg.n_layers + 1, it.merged_grid[0])
    pos_index = {p: i for i, p in enumerate(res.positions)}
    for f in range(it.merged_grid[0]):
        idx = [pos_index[p] for p in lay.positions(video=0, frame=f).tolist()]
        np.testing.assert_allclose(fv[:, f], res.answer_probs[:, idx, 0].mean(1).numpy(), rtol=1e-5)
    assert plot_frame_view(fv, tmp_path / "frames.png", layers=res.layers).read_bytes()[:4] == b"\x89PNG"
    # the HTML page of one video frame lays out that frame's cells
    import json
    import re

    from analyses.lens_html import lens_html

    page = lens_html(res, frames[2], tmp_path / "v.html", video=0, frame=1).read_text()
    data = json.loads(re.search(r"const D = (.*?);\n", page).group(1))
    frame1 = lay.positions(video=0, frame=1).tolist()
    assert sorted(res.positions[i] for i, _, _ in data["cells"]) == frame1


def test_tidy_frames_and_png(tmp_path):
    from vlm_cases import tokenizer

    model, inputs, img = make_inputs("qwen2-vl-image")
    res = logit_lens(model, inputs, answer_ids=ANSWERS, top_k=2)
    f = res.frame(tokenizer())
    L, P = len(res.layers), len(res.positions)
    assert len(f) == L * P * 2
    row = f[(f.layer == 1) & (f.position == res.positions[3]) & (f["rank"] == 0)].iloc[0]
    assert row.token_id == int(res.top_ids[1, 3, 0]) and row.token == tokenizer().decode([row.token_id])
    a = res.answer_frame()
    assert a[(a.layer == 2) & (a.answer_id == 6)].prob.tolist() == pytest.approx(res.answer_probs[2, :, 1].tolist())
    out = plot_cell_view(res.cell_view(image=0), tmp_path / "lens.png", layers=res.layers, image=img)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(IndexError, match="there is no video 0"):
        res.cell_view(video=0)
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(model, inputs, layers=[model.cfg.n_layers + 1])


@pytest.fixture(scope="module", params=["tiny-clip", "tiny-siglip"])
def two_tower(request):
    from hooked_vlm.tiny import tiny_model

    model = tiny_model(request.param).eval()
    size = 64 if request.param == "tiny-clip" else 56
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 10, 11, 12, 1] + [2] * 11, [0, 13, 14, 1] + [2] * 12]) if request.param == "tiny-siglip" else torch.tensor([[0, 10, 11, 12, 1], [0, 13, 14, 1, 2]])
    return request.param, model, pixels, ids


def test_clip_patch_lens_last_layer_cls_equals_model_logits(two_tower):
    name, model, pixels, ids = two_tower
    res = clip_patch_lens(model, pixels, ids)
    depth = model.vision.depth
    assert res.layers == list(range(depth + 1))
    with torch.no_grad():
        per_image = model(input_ids=ids, pixel_values=pixels).logits_per_image  # [images, texts]
    ps = model.vision.spec.patch_size
    assert res.grid == (pixels.shape[-2] // ps, pixels.shape[-1] // ps)
    if name == "tiny-clip":
        torch.testing.assert_close(res.logits[-1, :, 0], per_image, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res.probs[-1, :, 0], torch.softmax(per_image, -1), atol=1e-5, rtol=1e-4)
    else:
        # SigLIP pools with attention over all patches; with one key it is the token itself: check a token
        # by running the model's own head on that single post-norm state
        _, cache = model.run_with_cache(pixel_values=pixels, names_filter=lambda n: n == lens_hook_names(depth, "vision.")[-1])
        x = model.vision.ln_post(cache[lens_hook_names(depth, "vision.")[-1]])[1:2, 5:6]
        emb = model.vision.head(x)
        ref = model.similarity(emb, model.encode_text(ids)).T
        torch.testing.assert_close(res.logits[-1, 1, 5], ref[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res.probs[-1, 1, 5], torch.sigmoid(ref[0]), atol=1e-5, rtol=1e-4)
    assert res.patch_view(item=1, target=0).shape == (depth + 1, *res.grid)


def test_clip_text_lens_pooled_token_equals_model_logits(two_tower):
    name, model, pixels, ids = two_tower
    res = clip_text_lens(model, ids, pixels)
    with torch.no_grad():
        per_text = model(input_ids=ids, pixel_values=pixels).logits_per_text  # [texts, images]
    pool = model.text.pool_positions(ids)
    got = res.logits[-1, torch.arange(ids.shape[0]), pool]
    torch.testing.assert_close(got, per_text, atol=1e-5, rtol=1e-4)
    assert len(res.frame()) == res.logits.numel()


def test_html_page_is_self_contained_and_embeds_the_lens(tmp_path):
    import base64
    import io
    import json
    import re

    from PIL import Image

    from analyses.lens_html import lens_html
    from vlm_cases import tokenizer

    model, inputs, img = make_inputs("qwen2.5-vl-image")
    res = logit_lens(model, inputs, answer_ids=ANSWERS, top_k=3)
    page = lens_html(res, img, tmp_path / "lens.html", tokenizer=tokenizer()).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    png = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")), img)
    data = json.loads(re.search(r"const D = (.*?);\n", page).group(1))
    lay = res.layout
    image_pos = lay.positions(image=0).tolist()
    assert len(data["cells"]) == len(image_pos)
    i, r, c = data["cells"][5]
    p = res.positions[i]
    assert p == image_pos[5] and (int(lay.row[0, p]), int(lay.col[0, p])) == (r, c)
    layer = 1
    shown = lambda s: s if s.strip() else repr(s)  # noqa: E731 -- blank tokens are shown quoted
    assert [t for t, _ in data["top"][layer][i]] == [shown(tokenizer().decode([t])) for t in res.top_ids[layer, i].tolist()]
    assert data["answer_probs"][layer][i] == pytest.approx(res.answer_probs[layer, i].tolist(), abs=1e-4)
