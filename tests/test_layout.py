"""Token layout: agrees with transformers' M-RoPE ids, maps grid cells to tokens, and its helpers select
the right positions and vision-tower rows."""

import numpy as np
import pytest
import torch

from qwen_cases import QWEN_FAMILIES, IMG, VE, VID, VS, case, mm_types

from hooked_vlm.layout import IMAGE, PAD, SPECIAL, TEXT, VIDEO


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("name", ["image", "two_images", "video", "image_video", "batch_left", "batch_right"])
def test_position_ids_agree_with_hf(qwen_pair, family, name):
    hf, model = qwen_pair(family)
    inputs = case(name, family)
    ids = inputs["input_ids"]
    mm = mm_types(ids)
    kw = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw", "attention_mask")}
    if family == "tiny-qwen2.5-vl":
        kw["second_per_grid_ts"] = inputs.get("second_per_grid_ts")
    ref_pos, ref_delta = hf.model.get_rope_index(ids, mm_token_type_ids=mm, **kw)
    lay = model.layout(**inputs)
    assert torch.equal(lay.position_ids, ref_pos)
    assert torch.equal(lay.rope_deltas, ref_delta.flatten())


def test_official_rope_rule_differs_only_for_scaled_video(qwen_pair):
    """The 4.x / reference rule restarts text at max(vision ids)+1: it differs when scaled time is long."""
    _, model = qwen_pair("tiny-qwen2.5-vl")
    inputs = case("video", "tiny-qwen2.5-vl")
    inputs["second_per_grid_ts"] = torch.tensor([4.0])  # 3 slices x 8 ids apart > 3x3 spatial extent
    new = model.layout(**inputs)
    model.rope_rule = "official"
    try:
        old = model.layout(**inputs)
    finally:
        model.rope_rule = "transformers-5.23"
    # by hand: text 0..2; the video (3 slices x 2 x 3 cells, interval tokens_per_second 2 x 4 s = 8) starts at 3:
    # T = 3 + {0, 8, 16}, H = 3 + {0, 1}, W = 3 + {0, 1, 2}; then 3 text tokens restart at
    # 3 + max(2, 3) = 6 (transformers 5.23) or at max(video ids) + 1 = 20 (official)
    tt, hh, ww = torch.meshgrid(torch.tensor([0, 8, 16]), torch.arange(2), torch.arange(3), indexing="ij")
    video = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + 3
    head = torch.arange(3).expand(3, -1)
    for lay, restart in ((new, 6), (old, 20)):
        want = torch.cat([head, video, torch.arange(restart, restart + 3).expand(3, -1)], dim=1)
        assert lay.position_ids[:, 0].tolist() == want.tolist()


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_kinds_items_frames_cells(qwen_pair, family):
    _, model = qwen_pair(family)
    inputs = case("image_video", family)
    lay = model.layout(**inputs)
    ids = inputs["input_ids"][0]
    assert (lay.kind[0][ids == IMG] == IMAGE).all() and (lay.kind[0][ids == VID] == VIDEO).all()
    assert (lay.kind[0][(ids == VS) | (ids == VE)] == SPECIAL).all()
    assert (lay.kind[0][(ids < 100)] == TEXT).all()
    img, vid = lay.images()[0], lay.videos()[0]
    assert img.merged_grid == (1, 4, 6) and vid.merged_grid == (3, 2, 3)
    assert img.pixel_size == (112, 168) and img.cell_pixels == 28
    # frames: 5 input frames padded to 6 -> 3 slices of 6 tokens each
    for t in range(3):
        pos = lay.positions(video=0, frame=t)
        assert len(pos) == 6 and (lay.frame[0, pos] == t).all()
    # cell (r, c) of the image sits at start + r * W + c
    assert lay.cell(2, 5, image=0) == img.start + 2 * 6 + 5
    assert (lay.row[0, lay.cell(2, 5, image=0)], lay.col[0, lay.cell(2, 5, image=0)]) == (2, 5)
    assert lay.pixel_box(0, lay.cell(2, 5, image=0)) == (56, 140, 84, 168)
    box = lay.box(30, 30, 60, 60, image=0)  # overlaps cells rows 1-2, cols 1-2
    assert sorted((int(lay.row[0, p]), int(lay.col[0, p])) for p in box) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # exactly cell (1, 1) = pixels [28, 56): its neighbours only touch the box edges and are not counted
    assert lay.box(28, 28, 56, 56, image=0).tolist() == [img.start + 1 * 6 + 1]
    assert lay.box(28, 28, 57, 56, image=0).tolist() == [img.start + 6 + 1, img.start + 12 + 1]
    groups = lay.group_ids("frame")
    assert groups[0, lay.positions(image=0)].unique().tolist() == [0]
    assert groups[0, lay.positions(video=0)].unique().tolist() == [1, 2, 3]
    assert (lay.group_ids("visual")[0] == 0).sum() == img.n_tokens + vid.n_tokens
    assert "video 0: 3 slice(s) x 2x3 cells" in lay.summary()
    with pytest.raises(IndexError, match="there is no image 3"):
        lay.positions(image=3)


def test_padding_and_last_token(qwen_pair):
    _, model = qwen_pair("tiny-qwen2-vl")
    inputs = case("batch_left", "tiny-qwen2-vl")
    lay = model.layout(**inputs)
    n_pad = int((inputs["attention_mask"][1] == 0).sum())
    assert (lay.kind[1, :n_pad] == PAD).all()
    assert lay.last_token().tolist() == [inputs["input_ids"].shape[1] - 1] * 2
    right = model.layout(**case("batch_right", "tiny-qwen2-vl"))
    assert right.last_token(1) == inputs["input_ids"].shape[1] - 1 - n_pad
    assert lay.items[1].batch == 1 and lay.items[1].vision_offset == 0


def test_text_span(qwen_pair):
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    _, model = qwen_pair("tiny-qwen2-vl")
    tok = build_tiny_tokenizer()
    ids = tok("what color is the circle", return_tensors="pt")["input_ids"]
    lay = model.layout(input_ids=ids)
    span = lay.text_span("the circle", tok)
    assert tok.decode(ids[0, span]).replace(" ", "") == "thecircle"


def test_280px_image_is_a_10x10_grid_of_tokens():
    """Cell (r, c) of a 280x280 image is visual token 10r + c: perturbing that cell's pixels changes only
    that token's embedding (vision blocks removed so attention cannot spread the change)."""
    from hooked_vlm.inputs import qwen_image_inputs
    from hooked_vlm.samples import synthetic_grid_image
    from hooked_vlm.tiny import tiny_model

    image, _ = synthetic_grid_image(seed=0)
    pixels = np.asarray(image).copy()
    base = qwen_image_inputs(pixels)
    assert base["image_grid_thw"].tolist() == [[1, 20, 20]]
    r, c = 3, 7
    pixels[28 * r : 28 * (r + 1), 28 * c : 28 * (c + 1)] = 255 - pixels[28 * r : 28 * (r + 1), 28 * c : 28 * (c + 1)]
    pert = qwen_image_inputs(pixels)
    ids = torch.tensor([[0, 5, VS] + [IMG] * 100 + [VE, 9]])
    for family in ("tiny-qwen2-vl", "tiny-qwen2.5-vl"):
        model = tiny_model(family, vision_depth=0)
        lay = model.layout(input_ids=ids, **base)
        assert lay.cell(r, c, image=0) == 3 + 10 * r + c
        _, a = model.run_with_cache(input_ids=ids, **base, names_filter="hook_embed")
        _, b = model.run_with_cache(input_ids=ids, **pert, names_filter="hook_embed")
        changed = ((a["hook_embed"] - b["hook_embed"]).abs().amax(-1) > 0)[0].nonzero().flatten().tolist()
        assert changed == [3 + 10 * r + c], family


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_vision_rows_are_raster_order(qwen_pair, family):
    """vision.hook_patch_embed row (t, r, c) is the patch embedding of that patch, never window order."""
    _, model = qwen_pair(family)
    inputs = case("two_images", family)
    lay = model.layout(**inputs)
    _, cache = model.run_with_cache(**inputs, names_filter="vision.hook_patch_embed")
    act = cache["vision.hook_patch_embed"]
    pv = inputs["pixel_values"]
    for i, it in enumerate(lay.images()):
        grid = lay.vision_grid(act, image=i)  # t h w d
        t, h, w = it.grid_thw
        for rr, cc in [(0, 0), (1, 0), (0, 3), (h - 1, w - 1), (3, 2)]:
            block = (rr // 2) * (w // 2) + cc // 2
            hf_row = it.pixel_offset + block * 4 + (rr % 2) * 2 + cc % 2
            want = model.vision.patch_embed(pv[hf_row])
            assert torch.allclose(grid[0, rr, cc], want, atol=1e-5)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_vision_rows_of_a_frame_hold_that_slice_patches(qwen_pair, family):
    """vision_rows(video=, frame=t) are the t-th temporal slice's h*w patch rows (the unmerged patch grid), and
    the patch embedding there is that of the pixel row the processor put at (t, r, c)."""
    _, model = qwen_pair(family)
    inputs = case("video", family)
    lay = model.layout(**inputs)
    it = lay.videos()[0]
    t, h, w = it.grid_thw
    assert (t, h, w) == (3, 4, 6)
    _, cache = model.run_with_cache(**inputs, names_filter="vision.hook_patch_embed")
    act = cache["vision.hook_patch_embed"]
    pv = inputs["pixel_values_videos"]
    for frame in range(t):
        b, rows = lay.vision_rows(video=0, frame=frame)
        assert b == 0 and rows.tolist() == list(range(it.vision_offset + frame * h * w, it.vision_offset + (frame + 1) * h * w))
        for rr, cc in [(0, 0), (h - 1, w - 1), (1, 4)]:
            hf_row = frame * h * w + ((rr // 2) * (w // 2) + cc // 2) * 4 + (rr % 2) * 2 + cc % 2
            want = model.vision.patch_embed(pv[hf_row])
            assert torch.allclose(act[0, rows[rr * w + cc]], want, atol=1e-5)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_frame_groups_count_earlier_slices(qwen_pair, family):
    """group_ids("frame") numbers (item, slice) pairs consecutively: a second 3-slice video gets groups 3..5."""
    _, model = qwen_pair(family)
    vid = case("video", family)
    ids = vid["input_ids"][0].tolist() + vid["input_ids"][0].tolist()[1:]
    inputs = {k: torch.cat([v, v]) for k, v in vid.items() if k != "input_ids"}
    inputs["input_ids"] = torch.tensor([ids])
    lay = model.layout(**inputs)
    groups = lay.group_ids("frame")[0]
    assert groups[lay.positions(video=0)].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert groups[lay.positions(video=1)].tolist() == [3] * 6 + [4] * 6 + [5] * 6
    assert (groups[inputs["input_ids"][0] < 100] == -1).all()


def test_frame_and_cell_out_of_range_are_clear_errors(qwen_pair):
    _, model = qwen_pair("tiny-qwen2-vl")
    lay = model.layout(**case("image_video", "tiny-qwen2-vl"))
    for frame in (99, -1, 3):
        with pytest.raises(IndexError, match=rf"frame {frame} out of range: video 0 has 3 temporal slice\(s\), numbered 0..2"):
            lay.cell(0, 0, video=0, frame=frame)
        with pytest.raises(IndexError, match=rf"frame {frame} out of range: video 0 has 3"):
            lay.vision_rows(video=0, frame=frame)
        with pytest.raises(IndexError, match=rf"frame {frame} out of range"):
            lay.positions(video=0, frame=frame)
    with pytest.raises(IndexError, match=r"frame 1 out of range: image 0 has 1 temporal slice"):
        lay.cell(0, 0, image=0, frame=1)
    assert lay.cell(1, 2, video=0, frame=2) == lay.videos()[0].start + 2 * 6 + 1 * 3 + 2
