"""Activation patching on the tiny hooked LM: identities, exactness against naive loops and TL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses.metrics import logit_diff
from analyses.patching import LayoutMismatchError, activation_patching
from analyses.sites import get_site

METRIC = logit_diff(4, 8)


def _naive(model, base, source_cache, site, layer, head, positions, metric=METRIC):
    """One forward per cell with a hand-written hook."""
    s = get_site(site)
    name = s.hook_name(layer)
    pos = torch.tensor(positions)

    def hook(act, hook):
        act = act.clone()
        idx = [slice(None)] * act.ndim
        idx[s.pos_axis] = pos
        if head is not None:
            idx[s.head_axis] = torch.tensor([head])
            if s.head_axis < s.pos_axis:
                idx[s.head_axis] = torch.tensor([[head]]).reshape(1, 1)
                idx[s.pos_axis] = pos[None, :]
            else:
                idx[s.pos_axis] = pos[:, None]
                idx[s.head_axis] = torch.tensor([head])[None, :]
        act[tuple(idx)] = source_cache[name][tuple(idx)]
        return act

    with torch.no_grad():
        return float(metric(model.run_with_hooks(**base, fwd_hooks=[(name, hook)])).mean())


def test_clean_into_clean_is_identity(tiny, tiny_pair):
    clean, _ = tiny_pair
    r = activation_patching(tiny, clean, clean, METRIC, sites=["resid_pre", "z", "mlp_out", "vision.resid_post"],
                            batch_size=7, progress=False)
    assert r.clean_value == r.corrupt_value
    np.testing.assert_allclose(r.frame["value"].to_numpy(), r.clean_value, atol=1e-6, rtol=0)


def test_patching_every_position_recovers_clean(tiny, tiny_pair):
    clean, corrupt = tiny_pair
    r = activation_patching(tiny, clean, corrupt, METRIC, sites=["resid_pre", "resid_post", "embed"],
                            positions="all", progress=False)
    assert abs(r.clean_value - r.corrupt_value) > 1e-3
    np.testing.assert_allclose(r.frame["value"].to_numpy(), r.clean_value, atol=1e-6, rtol=0)
    np.testing.assert_allclose(r.frame["recovery"].to_numpy(), 1.0, atol=1e-4)
    # patching the vision output everywhere and the text tokens that differ also recovers it
    groups = {"img+diff": [1, 2, 3, 4, 5, 7]}
    r2 = activation_patching(tiny, clean, corrupt, METRIC, sites=["embed"], positions=groups, progress=False)
    assert r2.frame["value"].iloc[0] == pytest.approx(r.clean_value, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_batched_sweep_equals_naive_loop(tiny, tiny_pair, direction):
    clean, corrupt = tiny_pair
    groups = {"text0": [0, 1], "img": [2, 3, 4, 5], "last": [-1], "p7": [7]}
    sites = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]
    r = activation_patching(tiny, clean, corrupt, METRIC, sites=sites, positions=groups, direction=direction,
                            batch_size=11, progress=False)
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    _, cache = tiny.run_with_cache(**source)
    n = 0
    for row in r.frame.itertuples():
        head = None if str(row.head) == "<NA>" else int(row.head)
        layer = None if str(row.layer) == "<NA>" else int(row.layer)
        s = get_site(row.site)
        length = cache[s.hook_name(layer)].shape[s.pos_axis]
        pos = [p % length for p in groups[row.group]]
        want = _naive(tiny, base, cache, row.site, layer, head, pos)
        assert row.value == pytest.approx(want, abs=2e-6), (row.site, layer, head, row.group)
        n += 1
    assert n > 100
    with pytest.raises(ValueError, match="separate calls"):
        activation_patching(tiny, clean, corrupt, METRIC, sites=["resid_pre", "vision.out"], positions=groups,
                            progress=False)


def test_vision_sites_equal_naive_loop_and_rerun_the_tower(tiny, tiny_pair):
    clean, corrupt = tiny_pair
    groups = {"p0": [0], "p13": [1, 3], "all": [0, 1, 2, 3]}
    before = tiny.vision.calls
    r = activation_patching(tiny, clean, corrupt, METRIC, sites=["vision.resid_pre", "vision.out"], positions=groups,
                            batch_size=4, progress=False)
    _, cache = tiny.run_with_cache(**clean)
    for row in r.frame.itertuples():
        layer = None if str(row.layer) == "<NA>" else int(row.layer)
        want = _naive(tiny, corrupt, cache, row.site, layer, None, groups[row.group])
        assert row.value == pytest.approx(want, abs=2e-6)
    # the whole image patched = corrupted text with the clean image
    with torch.no_grad():
        mixed = float(METRIC(tiny(corrupt["input_ids"], pixel_values=clean["pixel_values"])))
    assert r.frame.loc[r.frame.group == "all", "value"].to_numpy() == pytest.approx(mixed, abs=1e-6)
    assert tiny.vision.calls - before > len(r.frame)  # vision edits need the tower per variant


def test_language_sites_run_the_vision_tower_once(tiny, tiny_pair):
    clean, corrupt = tiny_pair
    before = tiny.vision.calls
    r = activation_patching(tiny, clean, corrupt, METRIC, sites=["resid_pre"], batch_size=8, progress=False)
    # the source run and the base run; every batch of variants reuses the base run's vision output
    assert tiny.vision.calls - before == 2
    r_noreuse = activation_patching(tiny, clean, corrupt, METRIC, sites=["resid_pre"], batch_size=8,
                                    progress=False, plan=None)
    np.testing.assert_allclose(r.frame["value"], r_noreuse.frame["value"], atol=1e-6)


def test_matches_transformerlens_get_act_patch_resid_pre(tiny, tiny_pair):
    from transformer_lens import patching as tlp

    clean, corrupt = tiny_pair

    class ReinjectImages:  # TL passes only tokens; give it the corrupted image back
        cfg = tiny.cfg

        def run_with_hooks(self, tokens, fwd_hooks=()):
            return tiny.run_with_hooks(tokens, pixel_values=corrupt["pixel_values"], fwd_hooks=fwd_hooks)

    _, cache = tiny.run_with_cache(**clean)
    tl = tlp.get_act_patch_resid_pre(ReinjectImages(), corrupt["input_ids"], cache, lambda lg: METRIC(lg).mean())
    ours = activation_patching(tiny, clean, corrupt, METRIC, progress=False).array("resid_pre")
    np.testing.assert_allclose(ours, tl.numpy(), atol=1e-5, rtol=0)


def test_grouped_query_heads_are_honest(tiny, tiny_pair):
    clean, corrupt = tiny_pair
    r = activation_patching(tiny, clean, corrupt, METRIC, sites=["q", "k", "v", "z"], positions=[-1],
                            progress=False)
    per_site = r.frame.groupby("site")["head"].max()
    assert per_site["q"] == 3 and per_site["z"] == 3
    assert per_site["k"] == 1 and per_site["v"] == 1  # 2 key/value heads: no cells for heads 2, 3
    assert len(r.frame[r.frame.site == "k"]) == 3 * 2
    assert r.array("k").shape == (3, 2, 1) and not np.isnan(r.array("k")).any()


def test_per_example_metric_with_batch_of_two(tiny):
    from tiny_lm import make_inputs

    clean = make_inputs(tiny.cfg, batch=2, seed=1)
    corrupt = {k: v.clone() for k, v in clean.items()}
    corrupt["input_ids"][:, 8] = torch.tensor([5, 6])
    metric = logit_diff(torch.tensor([4, 5]), torch.tensor([8, 9]))
    r = activation_patching(tiny, clean, corrupt, metric, sites=["resid_post"], positions=[8, 9], progress=False)
    _, cache = tiny.run_with_cache(**clean)
    for row in r.frame.itertuples():
        want = _naive(tiny, corrupt, cache, "resid_post", int(row.layer), None, [int(row.group)], metric)
        assert row.value == pytest.approx(want, abs=2e-6)


def test_incompatible_layouts_raise(tiny, tiny_pair):
    from tiny_lm import make_inputs

    clean, _ = tiny_pair
    longer = make_inputs(tiny.cfg, length=11)
    with pytest.raises(LayoutMismatchError, match="same text length"):
        activation_patching(tiny, clean, longer, METRIC, progress=False)
    bad_mask = dict(clean, attention_mask=torch.ones(1, 10, dtype=torch.long))
    bad_mask2 = dict(clean, attention_mask=torch.tensor([[0] + [1] * 9]))
    with pytest.raises(LayoutMismatchError, match="attention_mask"):
        activation_patching(tiny, bad_mask, bad_mask2, METRIC, progress=False)
    with pytest.raises(LayoutMismatchError, match="different keys"):
        activation_patching(tiny, clean, {"input_ids": clean["input_ids"]}, METRIC, progress=False)
    with pytest.raises(KeyError, match="Did you mean"):
        activation_patching(tiny, clean, clean, METRIC, sites=["resid_preee"], progress=False)


def test_resolve_groups_rejects_out_of_range_positions():
    from analyses.patching import resolve_groups

    assert resolve_groups({"a": [0, -1], "b": torch.tensor([3])}, 5) == {"a": [0, 4], "b": [3]}
    assert resolve_groups([-2, 1], 5) == {"3": [3], "1": [1]}
    with pytest.raises(ValueError, match="outside"):
        resolve_groups({"a": [5]}, 5)
    with pytest.raises(ValueError, match="empty"):
        resolve_groups({"a": []}, 5)
