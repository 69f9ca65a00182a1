"""Issue 17 part 2: cache reductions at hook time, checked against the full cache reduced by hand afterwards."""

import pytest
import torch

from hooked_vlm.cache_reduction import CacheReduction, CacheReductionError


@pytest.fixture(scope="module")
def video_run():
    """A tiny Qwen2-VL on a 3-slice video prompt (batch of 2, different pixels per row) and its full cache."""
    from qwen_cases import case

    from hooked_vlm.tiny import tiny_model

    model = tiny_model("tiny-qwen2-vl")
    one = case("video", "tiny-qwen2-vl")
    ids = one["input_ids"].repeat(2, 1)
    inputs = dict(one, input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values_videos=torch.cat([one["pixel_values_videos"], one["pixel_values_videos"].flip(0)]),
                  video_grid_thw=one["video_grid_thw"].repeat(2, 1))  # the rows differ in their pixels
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern", "vision.hook_out",
             "ln_final.hook_scale", "hook_embed", "blocks.0.hook_attn_out", "blocks.1.hook_attn_out",
             "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    with torch.no_grad():
        logits, full = model.run_with_cache(**inputs, names_filter=names)
    frames = model.layout(**inputs).group_ids("frame")
    return model, inputs, names, logits, full, frames


def _group_mean_by_loop(act, ids, dim=1):
    """Per row, the plain mean of the positions of each of its groups in increasing id order (a python loop)."""
    out = []
    for b in range(act.shape[0]):
        a = act[b].movedim(dim - 1, 0)
        groups = sorted(set(ids[b].tolist()) - {-1})
        out.append(torch.stack([a[ids[b] == g].mean(0) for g in groups]).movedim(0, dim - 1))
    return torch.stack(out)


def test_per_frame_mean_matches_hand_reduction(video_run):
    model, inputs, names, logits, full, frames = video_run
    assert frames[0].max().item() == 2 and frames[1].max().item() == 5  # three temporal slices per row, global ids
    with torch.no_grad():
        out, red = model.run_with_cache(**inputs, names_filter=names, reduction=CacheReduction(group_ids=frames))
    assert torch.equal(out, logits)
    assert red.group_labels.tolist() == [[0, 1, 2], [3, 4, 5]]
    for name in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        assert red[name].shape == (2, 3, model.cfg.d_model)
        assert (red[name] - _group_mean_by_loop(full[name], frames)).abs().max().item() <= 1e-6
    # the pattern reduces over its query axis (dim 2), keys stay whole
    pat = red["blocks.1.attn.hook_pattern"]
    assert (pat - _group_mean_by_loop(full["blocks.1.attn.hook_pattern"], frames, dim=2)).abs().max().item() <= 1e-6
    # vision activations are not on the LM position axis: stored whole
    assert torch.equal(red["vision.hook_out"], full["vision.hook_out"])
    # linear ActivationCache methods work: the decomposition of the per-frame means sums to the reduced resid_post
    stack = red.decompose_resid(layer=1, mode="all", apply_ln=False, return_labels=False)
    assert (stack.sum(0) - red["blocks.1.hook_resid_pre"]).abs().max().item() <= 1e-5
    # layer norm is not linear: a clear error, not a silently wrong answer
    with pytest.raises(CacheReductionError, match="layer norm is not linear"):
        red.accumulated_resid(layer=1, apply_ln=True)


def test_sum_positions_downcast_and_offload(video_run, tmp_path):
    model, inputs, names, _, full, frames = video_run
    with torch.no_grad():
        _, sums = model.run_with_cache(**inputs, names_filter="blocks.0.hook_resid_post",
                                       reduction=CacheReduction(group_ids=frames, reduce="sum", dtype=torch.bfloat16))
        last = model.layout(**inputs).last_token()
        per_row = torch.stack([last, last - 1], 1)  # [B, 2]
        _, kept = model.run_with_cache(**inputs, names_filter=["blocks.*.hook_resid_pre", "blocks.*.hook_resid_post", "ln_final.hook_scale", "hook_embed"],
                                       reduction=CacheReduction(positions=per_row, disk_dir=tmp_path, device="cpu"))
    act = full["blocks.0.hook_resid_post"]
    by_loop = torch.stack([torch.stack([act[b, frames[b] == g + 3 * b].sum(0) for g in range(3)]) for b in range(2)])
    assert sums["blocks.0.hook_resid_post"].dtype == torch.bfloat16
    assert torch.allclose(sums["blocks.0.hook_resid_post"].float(), by_loop, rtol=1e-2, atol=1e-2)
    for name in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "ln_final.hook_scale"):
        expect = torch.stack([full[name][b, [int(last[b]), int(last[b]) - 1]] for b in range(2)])
        assert torch.equal(kept[name], expect)
        assert (tmp_path / f"{name}.pt").is_file()
    # position selection keeps layer norm valid: the LN-applied accumulated residual is the full cache's at those positions
    got = kept.accumulated_resid(layer=2, apply_ln=True)
    ref = full.accumulated_resid(layer=2, apply_ln=True)
    ref = torch.stack([ref[:, b, [int(last[b]), int(last[b]) - 1]] for b in range(2)], 1)
    assert (got - ref).abs().max().item() <= 1e-5


def test_bad_reductions_name_the_problem(video_run):
    model, inputs, names, _, _, frames = video_run
    with pytest.raises(CacheReductionError, match="positions or group_ids, not both"):
        CacheReduction(positions=[0], group_ids=frames)
    with pytest.raises(CacheReductionError, match="must be one of"):
        CacheReduction(group_ids=frames, reduce="median")
    with pytest.raises(CacheReductionError, match="integer tensor"):
        CacheReduction(group_ids=frames.float())
    with torch.no_grad(), pytest.raises(CacheReductionError, match="build the ids from this run's layout"):
        model.run_with_cache(**inputs, names_filter="blocks.0.hook_resid_post",
                             reduction=CacheReduction(group_ids=frames[:, :-1]))
    with torch.no_grad(), pytest.raises(CacheReductionError, match="has .* positions"):
        model.run_with_cache(**inputs, names_filter="blocks.0.hook_resid_post", reduction=CacheReduction(positions=[10_000]))
