"""Knockout, causal tracing and path patching on the tiny hooked LM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analyses.causal_tracing import causal_trace
from analyses.knockout import knockout_edits, knockout_sweep, layer_windows
from analyses.metrics import answer_prob, logit_diff
from analyses.patching import activation_patching
from analyses.path_patching import Node, path_patching
from analyses.variants import VariantRunner

METRIC = logit_diff(4, 8)
IMG = [2, 3, 4, 5]


# ----------------------------------------------------------------------------- knockout
def test_knockout_gives_exactly_zero_attention_on_blocked_edges(tiny, tiny_pair):
    clean, _ = tiny_pair
    runner = VariantRunner(tiny, clean, batch_size=4)
    edits = knockout_edits([-1, 8], IMG, layers=[0, 2], length=10)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(3)]
    vals, pats = runner.run([[], edits], METRIC, capture=names)
    for l in range(3):
        p_clean, p_ko = pats[names[l]][0, 0], pats[names[l]][1, 0]  # [H, L, L]
        blocked = p_ko[:, [9, 8]][:, :, IMG]
        if l in (0, 2):
            assert torch.count_nonzero(blocked) == 0  # exactly zero, every head
            assert torch.count_nonzero(p_clean[:, [9, 8]][:, :, IMG]) > 0
            assert torch.allclose(p_ko.sum(-1), torch.ones_like(p_ko.sum(-1)))  # rows renormalised
        else:
            assert torch.count_nonzero(blocked) > 0
    assert abs(float(vals[0, 0] - vals[1, 0])) > 1e-4  # the output changes


def test_knockout_sweep_windows_and_heads(tiny, tiny_pair):
    clean, _ = tiny_pair
    edges = {"img->last": ([-1], IMG), "text->last": ([-1], [0, 1, 6, 7])}
    df = knockout_sweep(tiny, clean, METRIC, edges, window=2, progress=False)
    assert len(df) == 2 * 2 and set(df["first_layer"]) == {0, 1}
    runner = VariantRunner(tiny, clean)
    for row in df.itertuples():
        q, k = edges[row.edges]
        want, _ = runner.run([knockout_edits(q, k, range(row.first_layer, row.last_layer + 1), 10)], METRIC)
        assert row.value == pytest.approx(float(want[0, 0]), abs=1e-6)
        assert row.effect == pytest.approx(row.value - row.base_value)
    one_head = knockout_sweep(tiny, clean, METRIC, {"img->last": ([-1], IMG)}, windows=[(0, 2)], heads=[1],
                              progress=False)
    all_heads = knockout_sweep(tiny, clean, METRIC, {"img->last": ([-1], IMG)}, windows=[(0, 2)], progress=False)
    # by hand: -inf scores from the last query to the image keys in layers 0..2, head 1 only (or every head)
    def blocked(head):
        def fn(scores, hook):
            scores = scores.clone()
            scores[:, slice(None) if head is None else slice(head, head + 1), 9, IMG] = float("-inf")
            return scores
        return fn

    with torch.no_grad():
        for df_, head in ((one_head, 1), (all_heads, None)):
            hooks = [(f"blocks.{l}.attn.hook_attn_scores", blocked(head)) for l in range(3)]
            want = float(METRIC(tiny.run_with_hooks(**clean, fwd_hooks=hooks)))
            assert df_["value"].iloc[0] == pytest.approx(want, abs=1e-6)
    assert abs(one_head["value"].iloc[0] - all_heads["value"].iloc[0]) > 1e-4  # the head choice matters here
    assert layer_windows(5, 3, 2) == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="every visible key"):
        knockout_edits([0], [0], [0], 10)


# ----------------------------------------------------------------------------- tracing
def test_full_restoration_after_noise_recovers_clean(tiny, tiny_pair):
    clean, _ = tiny_pair
    metric = answer_prob(4)
    res = causal_trace(tiny, clean, metric, noise_positions=IMG, restore_positions="all", kinds=["resid"],
                       n_samples=4, progress=False)
    assert res.total_effect != 0.0 and not np.allclose(res.corrupt_samples, res.clean_value)
    layer0 = res.frame[(res.frame.kind == "resid") & (res.frame.layer == 0)]
    assert layer0["value"].iloc[0] == pytest.approx(res.clean_value, abs=1e-6)
    # full restoration: indirect effect = clean - corrupted per sample = the total effect, with its sign
    assert layer0["indirect_effect"].iloc[0] == pytest.approx(res.clean_value - res.corrupt_samples.mean(), abs=1e-6)
    assert res.total_effect == pytest.approx(res.clean_value - res.corrupt_samples.mean(), abs=1e-9)
    assert layer0["ie_low"].iloc[0] <= layer0["indirect_effect"].iloc[0] <= layer0["ie_high"].iloc[0]
    samples = json.loads(layer0["samples"].iloc[0])
    np.testing.assert_allclose(samples, res.clean_value, atol=1e-6)
    # restoring every layer's input at all positions recovers the clean output too
    np.testing.assert_allclose(res.frame["value"], res.clean_value, atol=1e-6)


def test_tracing_is_seeded_and_has_intervals(tiny, tiny_pair):
    clean, _ = tiny_pair
    kw = dict(noise_positions=IMG, restore_positions={"img": IMG, "last": [-1]}, n_samples=5, window=2,
              progress=False)
    a = causal_trace(tiny, clean, answer_prob(4), seed=3, **kw)
    b = causal_trace(tiny, clean, answer_prob(4), seed=3, **kw)
    c = causal_trace(tiny, clean, answer_prob(4), seed=4, **kw)
    np.testing.assert_array_equal(a.frame["value"], b.frame["value"])
    assert not np.allclose(a.corrupt_samples, c.corrupt_samples)
    assert len(a.frame) == 3 * 3 * 2
    assert (a.frame["ie_low"] <= a.frame["indirect_effect"] + 1e-12).all()
    assert (a.frame["ie_high"] >= a.frame["indirect_effect"] - 1e-12).all()
    assert a.te_low <= a.total_effect <= a.te_high
    # noise std is 3x the std of the noised embeddings
    _, cache = tiny.run_with_cache(**clean)
    assert a.noise_std == pytest.approx(3.0 * float(cache["hook_embed"][:, IMG].std()), rel=1e-6)
    assert a.array("mlp").shape == (3, 2)


def test_severed_tracing_differs_and_matches_manual(tiny, tiny_pair):
    clean, _ = tiny_pair
    kw = dict(noise_positions=IMG, restore_positions={"img": IMG}, kinds=["resid"], n_samples=3,
              progress=False, seed=1)
    plain = causal_trace(tiny, clean, answer_prob(4), **kw)
    sev = causal_trace(tiny, clean, answer_prob(4), severed="mlp", **kw)
    assert not np.allclose(plain.frame["value"], sev.frame["value"])
    # the corrupted runs are the same noise draws
    np.testing.assert_allclose(plain.corrupt_samples, sev.corrupt_samples, atol=1e-6, rtol=0)


def test_pixel_noise_restoring_embeddings_recovers_clean(tiny, tiny_pair):
    clean, _ = tiny_pair
    res = causal_trace(tiny, clean, answer_prob(4), pixel_rows=[0, 1], restore_positions="all",
                       kinds=["resid"], layers=[0, 2], n_samples=3, progress=False)
    assert not np.allclose(res.corrupt_samples, res.clean_value)
    np.testing.assert_allclose(res.frame["value"], res.clean_value, atol=1e-6)


# ----------------------------------------------------------------------------- path patching
def test_path_to_final_residual_equals_activation_patching(tiny, tiny_pair):
    clean, corrupt = tiny_pair
    senders = [Node("resid_pre", 1, positions=(7,)), Node("z", 0, 2, positions=(7,))]
    receiver = Node("resid_post", 2)
    df = path_patching(tiny, clean, corrupt, METRIC, senders, [receiver], freeze=(), progress=False)
    ap = activation_patching(tiny, clean, corrupt, METRIC, sites=["resid_pre"], layers=[1], positions=[7],
                             progress=False)
    assert df["value"].iloc[0] == pytest.approx(float(ap.frame["value"].iloc[0]), abs=1e-6)
    apz = activation_patching(tiny, clean, corrupt, METRIC, sites=["z"], layers=[0], heads=[2], positions=[7],
                              progress=False)
    assert df["value"].iloc[1] == pytest.approx(float(apz.frame["value"].iloc[0]), abs=1e-6)


def test_no_path_from_a_later_sender_to_an_earlier_receiver(tiny, tiny_pair):
    clean, corrupt = tiny_pair
    df = path_patching(tiny, clean, corrupt, METRIC, [Node("z", 2, 1)], [Node("z", 0, 3)], progress=False)
    assert df["value"].iloc[0] == pytest.approx(df.attrs["corrupt_value"], abs=1e-6)


def test_path_patching_matches_manual_two_pass(tiny, tiny_pair):
    clean, corrupt = tiny_pair
    snd, rcv = Node("embed", positions=tuple(IMG)), Node("z", 2, 1, positions=(9,))
    df = path_patching(tiny, clean, corrupt, METRIC, [snd], [rcv], progress=False)
    _, cc = tiny.run_with_cache(**clean)
    _, kc = tiny.run_with_cache(**corrupt)
    store = {}

    def patch_sender(act, hook):
        act = act.clone()
        act[:, IMG] = cc["hook_embed"][:, IMG]
        return act

    def freeze(layer):
        def fn(act, hook):
            act = act.clone()
            keep = [h for h in range(4) if not (layer == 2 and h == 1)]
            act[:, :, keep] = kc[f"blocks.{layer}.attn.hook_z"][:, :, keep]
            return act
        return fn

    def grab(act, hook):
        store["z"] = act.clone()

    hooks = [("hook_embed", patch_sender)] + [(f"blocks.{l}.attn.hook_z", freeze(l)) for l in range(3)]
    hooks.append(("blocks.2.attn.hook_z", grab))
    with torch.no_grad():
        tiny.run_with_hooks(**corrupt, fwd_hooks=hooks)

        def put(act, hook):
            act = act.clone()
            act[:, 9, 1] = store["z"][:, 9, 1]
            return act

        want = float(METRIC(tiny.run_with_hooks(**corrupt, fwd_hooks=[("blocks.2.attn.hook_z", put)])))
    assert df["value"].iloc[0] == pytest.approx(want, abs=1e-6)
    assert df["value"].iloc[0] != pytest.approx(df.attrs["corrupt_value"], abs=1e-6)


def test_bad_arguments_name_the_problem(tiny, tiny_pair):
    clean, corrupt = tiny_pair
    with pytest.raises(ValueError, match=r"n_samples=0: causal tracing needs at least 1 noise draw"):
        causal_trace(tiny, clean, answer_prob(4), noise_positions=IMG, n_samples=0, progress=False)
    with pytest.raises(ValueError, match=r"heads \[99\] do not exist: .* have at most 4 heads \(0..3\)"):
        activation_patching(tiny, clean, corrupt, METRIC, sites=["z"], heads=[99], progress=False)
    with pytest.raises(ValueError, match=r"heads \[-1\] do not exist"):
        activation_patching(tiny, clean, corrupt, METRIC, sites=["z"], heads=[-1, 0], progress=False)
