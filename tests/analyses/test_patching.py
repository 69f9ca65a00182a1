"""Patching, tracing and knockout on the hooked tiny Qwen2-VL / Qwen2.5-VL (image and video inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses import video_counterfactuals as vc
from analyses.causal_tracing import causal_trace
from analyses.knockout import knockout_edits, knockout_sweep
from analyses.metrics import answer_prob, kl_divergence, logit_diff
from analyses.patching import LayoutMismatchError, activation_patching
from analyses.path_patching import Node, path_patching
from analyses.positions import layout_groups, pixel_rows
from analyses.sites import get_site
from analyses.variants import VariantRunner

METRIC = logit_diff(5, 6)
PROMPT = "<image> what is the red circle"


@pytest.fixture(scope="module")
def qwen():
    from hooked_vlm.tiny import tiny_model

    return tiny_model("tiny-qwen2.5-vl").eval()


@pytest.fixture(scope="module")
def tok():
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def image_pair(tok):
    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.samples import synthetic_grid_image

    a, _ = synthetic_grid_image(seed=0, grid=4, num_shapes=3)
    b, _ = synthetic_grid_image(seed=1, grid=4, num_shapes=3)
    clean = build_qwen_inputs(tok, PROMPT, images=[a])
    corrupt = build_qwen_inputs(tok, PROMPT, images=[b])
    return clean, corrupt


@pytest.fixture(scope="module")
def video_pair(tok):
    """A moving shape and the same clip with its temporal slices reversed (same layout)."""
    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.samples import synthetic_video

    frames, _ = synthetic_video(num_frames=8, size=(56, 84))
    kw = dict(video_min_pixels=56 * 84, video_max_pixels=56 * 84)
    clean = build_qwen_inputs(tok, "<video> where does it go", videos=[frames], **kw)
    rev = vc.reverse(frames, unit="slice")
    corrupt = build_qwen_inputs(tok, "<video> where does it go", videos=[rev.frames], **kw)
    return clean, corrupt


def _naive(model, base, source, site, layer, head, positions, metric=METRIC):
    """One full forward per cell, vision tower included, with a hand-written hook."""
    s = get_site(site)
    name = s.hook_name(layer)
    _, cache = model.run_with_cache(**source, names_filter=[name])
    src = cache[name]
    pos = torch.tensor(positions)

    def hook(act, hook):
        act = act.clone()
        if head is None:
            idx = [slice(None)] * act.ndim
            idx[s.pos_axis] = pos
            act[tuple(idx)] = src[tuple(idx)]
        elif s.head_axis == 2:
            act[:, pos, head] = src[:, pos, head]
        else:  # pattern: [B, H, Lq, Lk]
            act[:, head, pos] = src[:, head, pos]
        return act

    with torch.no_grad():
        return float(metric(model.run_with_hooks(**base, fwd_hooks=[(name, hook)])).mean())


def test_clean_into_clean_is_identity(qwen, image_pair):
    clean, _ = image_pair
    r = activation_patching(qwen, clean, clean, METRIC, sites=["resid_pre", "attn_out", "z", "vision.resid_post"],
                            positions=[0, 3, 10, -1], progress=False)
    np.testing.assert_allclose(r.frame["value"], r.clean_value, atol=1e-5, rtol=0)


def test_patching_every_position_recovers_clean(qwen, image_pair):
    clean, corrupt = image_pair
    r = activation_patching(qwen, clean, corrupt, METRIC, sites=["resid_pre", "resid_mid", "resid_post", "embed"],
                            positions="all", progress=False)
    assert abs(r.clean_value - r.corrupt_value) > 1e-3
    np.testing.assert_allclose(r.frame["value"], r.clean_value, atol=1e-5, rtol=0)
    # the corrupted image is really used: the unpatched corrupted metric differs from a text-only run
    with torch.no_grad():
        assert float(METRIC(qwen(**corrupt))) == pytest.approx(r.corrupt_value, abs=1e-6)


@pytest.mark.slow
def test_sweep_equals_naive_loop_with_layout_groups(qwen, image_pair):
    clean, corrupt = image_pair
    lay = qwen.layout(**clean)
    groups = layout_groups(lay, by=["item", "text"])
    groups["cell(1,2)"] = [lay.cell(1, 2, image=0)]
    sites = ["resid_pre", "attn_out", "mlp_out", "z", "k", "v", "pattern"]
    r = activation_patching(qwen, clean, corrupt, METRIC, sites=sites, positions=groups, batch_size=9,
                            progress=False)
    assert len(r.frame) == 2 * len(groups) * (3 + 4 + 2 + 2 + 4)  # GQA: k and v have 2 heads
    # every site's edits take effect (a discarded edit would leave every cell at the corrupted value)
    for site, f in r.frame.groupby("site"):
        assert (f["value"] - r.corrupt_value).abs().max() > 1e-6, site
    for row in r.frame.sample(40, random_state=0).itertuples():
        head = None if pd_na(row.head) else int(row.head)
        want = _naive(qwen, corrupt, clean, row.site, int(row.layer), head, groups[row.group])
        assert row.value == pytest.approx(want, abs=1e-5), (row.site, row.layer, head, row.group)


def pd_na(x) -> bool:
    return x is None or str(x) == "<NA>"


@pytest.mark.slow
def test_vision_tower_sites_and_reuse_paths_agree(qwen, image_pair):
    clean, corrupt = image_pair
    lay = qwen.layout(**clean)
    b, rows = lay.vision_rows(image=0)
    vis_groups = {"top_half": rows[: len(rows) // 2].tolist(), "patch5": [int(rows[5])]}
    r = activation_patching(qwen, clean, corrupt, METRIC, sites=["vision.resid_post"], layers=[0, 3],
                            positions=vis_groups, progress=False)
    for row in r.frame.itertuples():
        want = _naive(qwen, corrupt, clean, "vision.resid_post", int(row.layer), None, vis_groups[row.group])
        assert row.value == pytest.approx(want, abs=1e-5)
    # language sites: vision reuse + prefix reuse give the same numbers as recomputing everything
    fast = activation_patching(qwen, clean, corrupt, METRIC, sites=["resid_pre", "z"], progress=False)
    slow = activation_patching(qwen, clean, corrupt, METRIC, sites=["resid_pre", "z"], plan=None,
                               prefix_reuse=False, progress=False)
    np.testing.assert_allclose(fast.frame["value"], slow.frame["value"], atol=1e-5, rtol=0)


def test_prefix_reuse_computes_fewer_positions_exactly(qwen, image_pair):
    clean, corrupt = image_pair
    from analyses.patching import resolve_groups
    from analyses.variants import Edit

    _, cache = qwen.run_with_cache(**clean, names_filter=["blocks.1.hook_resid_pre"])
    act = cache["blocks.1.hook_resid_pre"]
    L = act.shape[1]
    variants = [[Edit("blocks.1.hook_resid_pre", act, positions=torch.tensor([p]))] for p in range(L - 4, L)]
    fast = VariantRunner(qwen, corrupt, batch_size=4, prefix_reuse=True)
    slow = VariantRunner(qwen, corrupt, batch_size=4, prefix_reuse=False, plan=None)
    vf, _ = fast.run(variants, METRIC)
    vs, _ = slow.run(variants, METRIC)
    torch.testing.assert_close(vf, vs, atol=1e-5, rtol=0)
    # the rows run packed, each from its own position, from block 1's input kept by the base run (a short input)
    assert fast.positions_computed == 4 + 3 + 2 + 1 and slow.positions_computed == 4 * L
    assert resolve_groups("each", 3) == {"0": [0], "1": [1], "2": [2]}


def test_video_frame_groups_equal_naive(qwen, video_pair):
    clean, corrupt = video_pair
    lay = qwen.layout(**clean)
    groups = layout_groups(lay, by="frame")
    assert [g for g in groups if g.startswith("video0/frame")] == [f"video0/frame{f}" for f in range(4)]
    r = activation_patching(qwen, clean, corrupt, METRIC, sites=["resid_pre"], positions=groups, progress=False)
    for row in r.frame.itertuples():
        want = _naive(qwen, corrupt, clean, "resid_pre", int(row.layer), None, groups[row.group])
        assert row.value == pytest.approx(want, abs=1e-5)
    allv = activation_patching(qwen, clean, corrupt, METRIC, sites=["resid_pre"], layers=[0],
                               positions={"video": lay.positions(video=0).tolist()}, progress=False)
    assert allv.frame["value"].iloc[0] == pytest.approx(allv.clean_value, abs=1e-5)  # text is identical


def test_incompatible_layouts_raise(qwen, tok, image_pair):
    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.samples import synthetic_grid_image

    clean, _ = image_pair
    big, _ = synthetic_grid_image(seed=2, grid=5, num_shapes=3)  # 140 px: another grid
    other = build_qwen_inputs(tok, PROMPT, images=[big])
    with pytest.raises(LayoutMismatchError):
        activation_patching(qwen, clean, other, METRIC, progress=False)
    shifted = build_qwen_inputs(tok, "red <image> what is the circle", images=[big.resize((112, 112))])
    with pytest.raises(LayoutMismatchError, match="mm_token_type_ids|layout"):
        activation_patching(qwen, clean, shifted, METRIC, progress=False)


def test_knockout_zero_attention_on_real_model(qwen, image_pair):
    clean, _ = image_pair
    lay = qwen.layout(**clean)
    img = lay.positions(image=0)
    last = int(lay.last_token(0))
    L = clean["input_ids"].shape[1]
    runner = VariantRunner(qwen, clean, batch_size=2)
    names = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    vals, pats = runner.run([[], knockout_edits([last], img, [1], L)], METRIC, capture=names)
    ko = pats["blocks.1.attn.hook_pattern"][1, 0][:, last, img]
    assert torch.count_nonzero(ko) == 0
    assert torch.count_nonzero(pats["blocks.1.attn.hook_pattern"][0, 0][:, last, img]) > 0
    torch.testing.assert_close(pats["blocks.0.attn.hook_pattern"][1], pats["blocks.0.attn.hook_pattern"][0])
    assert abs(float(vals[1, 0] - vals[0, 0])) > 1e-6
    df = knockout_sweep(qwen, clean, METRIC, {"image->last": ([last], img)}, window=1, progress=False)
    assert df["value"].iloc[1] == pytest.approx(float(vals[1, 0]), abs=1e-5)


@pytest.mark.slow
def test_mask_knockout_equals_score_knockout_and_blocks_exactly(qwen, image_pair):
    """The MaskSpec path (no L x L) and the score-hook path agree; per-row edge sets in one forward."""
    from hooked_vlm.components.attention import AttnStatsRequest, attn_stats_request
    from kernels.mask import Knockout

    clean, _ = image_pair
    lay = qwen.layout(**clean)
    L = clean["input_ids"].shape[1]
    edges = {
        "image->last": ([-1], lay.positions(image=0)),
        "text->last": ([-1], [0] + list(range(19, L - 1))),
        "cell->rest": (list(range(10, L)), [lay.cell(0, 0, image=0)]),
    }
    kw = dict(windows=[(0, 0), (1, 1), (0, 1)], progress=False, batch_size=4)
    by_mask = knockout_sweep(qwen, clean, METRIC, edges, method="mask", **kw)
    by_scores = knockout_sweep(qwen, clean, METRIC, edges, method="scores", **kw)
    np.testing.assert_allclose(by_mask["value"], by_scores["value"], atol=1e-5, rtol=0)
    assert (by_mask["effect"].abs() > 1e-7).any()
    # the mask path's pattern has exactly zero weight on blocked edges
    q = torch.full((1, L), -1)
    q[0, L - 1] = 0
    k = torch.full((1, L), -1)
    k[0, lay.positions(image=0)] = 0
    req = AttnStatsRequest(layers=[], knockout=Knockout(q, k, torch.tensor([[True]])), knockout_layers=[0, 1])
    with attn_stats_request(qwen, req):
        _, cache = qwen.run_with_cache(**clean, names_filter=["blocks.0.attn.hook_pattern"])
    assert torch.count_nonzero(cache["blocks.0.attn.hook_pattern"][0, :, L - 1, lay.positions(image=0)]) == 0


def test_tracing_full_restoration_and_pixel_noise(qwen, image_pair):
    clean, _ = image_pair
    lay = qwen.layout(**clean)
    obj = lay.box(28, 28, 84, 84, image=0)
    metric = answer_prob(5)
    res = causal_trace(qwen, clean, metric, noise_positions=obj, restore_positions={"obj": obj.tolist(), "last": [-1]},
                       n_samples=3, window=2, progress=False)
    assert np.all(res.corrupt_samples != res.clean_value)
    l0 = res.frame[(res.frame.kind == "resid") & (res.frame.layer == 0) & (res.frame.group == "obj")]
    assert l0["value"].iloc[0] == pytest.approx(res.clean_value, abs=1e-6)  # restoring the noised tokens
    key, rows = pixel_rows(lay, obj)
    pres = causal_trace(qwen, clean, metric, pixel_rows=rows, pixel_key=key, restore_positions="all",
                        kinds=["resid"], n_samples=2, progress=False)
    assert np.all(np.abs(pres.corrupt_samples - pres.clean_value) > 0)
    np.testing.assert_allclose(pres.frame["value"], pres.clean_value, atol=1e-6)


def test_path_patching_visual_tokens_through_a_head(qwen, image_pair):
    clean, corrupt = image_pair
    lay = qwen.layout(**clean)
    img = tuple(lay.positions(image=0).tolist())
    last = int(lay.last_token(0))
    senders = [Node("embed", positions=img, name="visual")]
    receivers = [Node("z", 1, h, positions=(last,), name=f"head{h}") for h in range(4)] + [Node("resid_post", 1, name="final")]
    df = path_patching(qwen, clean, corrupt, METRIC, senders, receivers, freeze=(), progress=False)
    ap = activation_patching(qwen, clean, corrupt, METRIC, sites=["embed"], positions={"img": list(img)},
                             progress=False)
    final = df[df.receiver == "final"]["value"].iloc[0]
    assert final == pytest.approx(float(ap.frame["value"].iloc[0]), abs=1e-5)
    # each head's path, by hand: a corrupted run with the clean visual embeddings gives z[1, last, h], which is
    # put into an otherwise corrupted run (nothing frozen: freeze=())
    _, clean_cache = qwen.run_with_cache(**clean, names_filter="hook_embed")
    idx = list(img)

    def sender(act, hook):
        act = act.clone()
        act[:, idx] = clean_cache["hook_embed"][:, idx]
        return act

    for h in range(4):
        got = {}
        with torch.no_grad():
            qwen.run_with_hooks(**corrupt, fwd_hooks=[("hook_embed", sender),
                                                      ("blocks.1.attn.hook_z", lambda a, hook: got.update(z=a.clone()))])

            def put(act, hook, h=h):
                act = act.clone()
                act[:, last, h] = got["z"][:, last, h]
                return act

            want = float(METRIC(qwen.run_with_hooks(**corrupt, fwd_hooks=[("blocks.1.attn.hook_z", put)])))
        assert float(df[df.receiver == f"head{h}"]["value"].iloc[0]) == pytest.approx(want, abs=1e-5), h


def test_kl_metric_and_qwen2_vl_family(tok):
    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.samples import synthetic_grid_image
    from hooked_vlm.tiny import tiny_model

    model = tiny_model("tiny-qwen2-vl").eval()
    a, _ = synthetic_grid_image(seed=0, grid=4, num_shapes=3)
    b, _ = synthetic_grid_image(seed=3, grid=4, num_shapes=3)
    clean, corrupt = build_qwen_inputs(tok, PROMPT, images=[a]), build_qwen_inputs(tok, PROMPT, images=[b])
    with torch.no_grad():
        kl = kl_divergence(model(**clean))
    r = activation_patching(model, clean, corrupt, kl, sites=["resid_pre"], positions="all", progress=False)
    # the sweep unembeds the last position alone: its logits differ from the full forward's by fp32 rounding (~3e-7),
    # which an fp32 KL turns into ~1e-7 (the exact KL of the two is ~5e-15)
    assert r.corrupt_value > 1e-5 and r.clean_value == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(r.frame["value"], 0.0, atol=1e-6)


def test_last_position_unembedding_is_exact(qwen, image_pair):
    from analyses.metrics import as_metric

    clean, corrupt = image_pair
    full = as_metric(METRIC.fn, name="reads_everything")  # reads="all": full [N, L, V] logits
    assert METRIC.reads == "last" and full.reads == "all"
    a = activation_patching(qwen, clean, corrupt, METRIC, sites=["resid_pre", "z"], progress=False)
    b = activation_patching(qwen, clean, corrupt, full, sites=["resid_pre", "z"], progress=False)
    np.testing.assert_allclose(a.frame["value"], b.frame["value"], atol=1e-5, rtol=0)


def test_layout_cell_groups_and_pixel_rows(qwen, image_pair):
    clean, _ = image_pair
    lay = qwen.layout(**clean)
    cells = layout_groups(lay, by="cell", include_last=False)
    assert len(cells) == 16 and cells["image0/r1c2"] == [lay.cell(1, 2, image=0)]
    key, rows = pixel_rows(lay, cells["image0/r1c2"])
    assert key == "pixel_values" and rows.tolist() == [24, 25, 26, 27]
    # those pixel rows feed exactly the 2x2 patches of cell (1, 2) in the raster-order patch embedding
    pv = clean["pixel_values"].clone()
    pv[rows] += 1.0
    _, c0 = qwen.run_with_cache(**clean, names_filter=["vision.hook_patch_embed"])
    _, c1 = qwen.run_with_cache(**dict(clean, pixel_values=pv), names_filter=["vision.hook_patch_embed"])
    changed = (c0["vision.hook_patch_embed"] - c1["vision.hook_patch_embed"]).abs().sum(-1)[0].nonzero().flatten()
    w = int(clean["image_grid_thw"][0, 2])
    assert changed.tolist() == [2 * w + 4, 2 * w + 5, 3 * w + 4, 3 * w + 5]


def test_video_counterfactual_slices_follow_the_token_frames(qwen, tok):
    """Swapping temporal slices moves whole token frames: the vision tower encodes each slice alone."""
    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.samples import synthetic_video

    frames, _ = synthetic_video(num_frames=8, size=(56, 84))
    kw = dict(video_min_pixels=56 * 84, video_max_pixels=56 * 84)
    cf = vc.swap_spans(frames, (0, 1), (2, 3))
    assert cf.changed_slices() == [0, 2]
    a = build_qwen_inputs(tok, "<video> go", videos=[frames], **kw)
    b = build_qwen_inputs(tok, "<video> go", videos=[cf.frames], **kw)
    lay = qwen.layout(**a)
    _, ca = qwen.run_with_cache(**a, names_filter=["hook_embed"])
    _, cb = qwen.run_with_cache(**b, names_filter=["hook_embed"])
    src_slice = cf.source_index.reshape(-1, 2)[:, 0] // 2
    for f in range(4):
        pa = lay.positions(video=0, frame=int(src_slice[f]))
        pb = lay.positions(video=0, frame=f)
        torch.testing.assert_close(cb["hook_embed"][0, pb], ca["hook_embed"][0, pa], atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_two_reuse_paths_agree(qwen, tok, side):
    """Per-example metrics on a padded batch: vision/prefix reuse == recomputing everything."""
    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.samples import synthetic_grid_image

    imgs = [synthetic_grid_image(seed=s, grid=4, num_shapes=3)[0] for s in range(4)]
    prompts = ["<image> what is red", "<image> what is the red circle here"]
    clean = build_qwen_inputs(tok, prompts, images=imgs[:2], padding_side=side)
    corrupt = build_qwen_inputs(tok, prompts, images=imgs[2:], padding_side=side)
    assert (clean["attention_mask"] == 0).any()
    lay = qwen.layout(**clean)
    last = lay.last_token()
    metric = logit_diff(5, 6, pos=last)  # per-row read-out position
    kw = dict(sites=["resid_pre", "attn_out"], positions=list(range(10, clean["input_ids"].shape[1])), progress=False)
    fast = activation_patching(qwen, clean, corrupt, metric, **kw)
    slow = activation_patching(qwen, clean, corrupt, metric, plan=None, prefix_reuse=False, **kw)
    np.testing.assert_allclose(fast.frame["value"], slow.frame["value"], atol=1e-5, rtol=0)
    assert abs(fast.clean_value - fast.corrupt_value) > 1e-4


def test_store_resume_on_real_model_recomputes_only_missing(qwen, image_pair, tmp_path):
    clean, corrupt = image_pair
    kw = dict(sites=["resid_pre", "z"], positions=[0, 5, 10, 20, -1], batch_size=6, progress=False)
    ref = activation_patching(qwen, clean, corrupt, METRIC, **kw)
    first = activation_patching(qwen, clean, corrupt, METRIC, store=tmp_path / "s", **kw)
    parts = sorted((tmp_path / "s" / "cells").glob("part-*.parquet"))
    assert len(parts) == -(-len(ref.frame) // 6)
    for p in parts[::2]:  # lose every other batch, as if the run had died
        p.unlink()
    calls = []

    def counting(logits):
        calls.append(logits.shape[0])
        return METRIC(logits)

    from analyses.metrics import as_metric

    again = activation_patching(qwen, clean, corrupt, as_metric(counting, METRIC.name, reads="last"),
                                store=tmp_path / "s", **kw)
    keys = ["site", "layer", "head", "group"]
    np.testing.assert_allclose(again.frame["value"], ref.frame["value"], atol=1e-6)
    assert again.frame[keys].astype(str).equals(ref.frame[keys].astype(str))
    assert first.frame["value"].tolist() == pytest.approx(ref.frame["value"].tolist(), abs=1e-6)
    import pandas as pd

    n_kept = sum(len(pd.read_parquet(p)) for p in parts[1::2])
    assert len(calls) - 2 == len(ref.frame) - n_kept  # only the lost cells (+ clean/corrupt baselines)


def test_severed_attention_tracing_runs_and_differs(qwen, image_pair):
    clean, _ = image_pair
    lay = qwen.layout(**clean)
    obj = lay.positions(image=0)
    kw = dict(noise_positions=obj, restore_positions={"img": obj.tolist()}, kinds=["resid"], n_samples=2,
              progress=False)
    plain = causal_trace(qwen, clean, answer_prob(5), **kw)
    sev = causal_trace(qwen, clean, answer_prob(5), severed="attn", **kw)
    np.testing.assert_allclose(plain.corrupt_samples, sev.corrupt_samples, atol=1e-6, rtol=0)  # same noise draws
    # restoring layer 0's input and freezing every later attention output still restores layer 0 itself
    assert not np.allclose(plain.frame["value"], sev.frame["value"])


@pytest.mark.parametrize("prefix", [False, True])
def test_layer_skip_expansion_is_exact(qwen, image_pair, prefix):
    """Layers below the first edited block run once (batch 1) and are expanded to the variants."""
    from analyses.variants import Edit

    clean, corrupt = image_pair
    names = ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
    _, cache = qwen.run_with_cache(**clean, names_filter=names)
    L = clean["input_ids"].shape[1]
    variants = [[Edit(names[0], cache[names[0]], positions=torch.tensor([p]))] for p in range(L - 6, L)]
    variants += [[Edit(names[1], cache[names[1]], positions=torch.tensor([L - 1]), heads=torch.tensor([h]),
                       head_axis=2)] for h in range(4)]
    variants.append([Edit(names[2], cache[names[2]], positions=torch.tensor([L - 3, L - 1]))])
    calls = {"n": 0}

    def count(act, hook):
        calls["n"] += act.shape[0]

    fast = VariantRunner(qwen, corrupt, batch_size=11, prefix_reuse=prefix, layer_skip=True)
    slow = VariantRunner(qwen, corrupt, batch_size=11, prefix_reuse=False, layer_skip=False, plan=None)
    with qwen.hooks(fwd_hooks=[("blocks.0.hook_resid_post", count)]):
        vf, _ = fast.run(variants, METRIC)
        n_fast = calls["n"]
    vs, _ = slow.run(variants, METRIC)
    torch.testing.assert_close(vf, vs, atol=1e-5, rtol=0)
    # block 0 ran once for all 11 variants (+ the base run, outside the count); with prefix reuse the packed rows
    # start from the base run's kept input of block 1 (a short input), so block 0 does not run at all
    assert n_fast == (0 if prefix else 1)
