"""Probes: find a planted direction, chance on shuffled labels, grouped splits never leak, directions steer / ablate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analyses import probes as pr


def _planted(seed=0, n_groups=40, per_group=8, d=24, strength=2.0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    w /= np.linalg.norm(w)
    groups = np.repeat(np.arange(n_groups), per_group)
    y = rng.integers(0, 2, groups.size)
    group_offset = rng.normal(0, 1.0, (n_groups, d))[groups]  # shared per image: correlated rows
    X = rng.normal(size=(groups.size, d)) + group_offset + strength * (2 * y[:, None] - 1) * w
    return X, y, groups, w


def test_grouped_splits_never_leak_and_cover_every_sample_once():
    groups = np.repeat(np.arange(13), np.arange(1, 14))  # unequal group sizes
    splits = pr.grouped_splits(groups, n_splits=4)
    tested = np.concatenate([te for _, te in splits])
    assert sorted(tested.tolist()) == list(range(groups.size))
    for tr, te in splits:
        assert not set(groups[tr]) & set(groups[te])
    leaky = [(np.array([0, 1]), np.array([2, 3]))]
    with pytest.raises(ValueError, match="leaks group"):
        pr.check_no_leak(np.array([0, 1, 1, 2]), leaky)
    with pytest.raises(ValueError, match="cannot fill"):
        pr.grouped_splits(np.array([0, 0, 1]), n_splits=3)


def test_probe_finds_planted_direction_and_is_at_chance_on_shuffled_labels():
    X, y, groups, w = _planted()
    feats = {0: np.random.default_rng(1).normal(size=X.shape), 1: X}  # layer 0: no signal; layer 1: planted
    out = pr.probe_layers(feats, y, groups, n_splits=5, control="global", n_resamples=99).set_index("layer")
    assert out.loc[1, "auroc"] > 0.9 and out.loc[1, "accuracy"] > 0.8
    assert out.loc[1, "auroc_low"] < out.loc[1, "auroc"] < out.loc[1, "auroc_high"]
    assert abs(out.loc[1, "control_auroc"] - 0.5) < 0.12 and out.loc[1, "selectivity"] > 0.25
    assert abs(out.loc[0, "auroc"] - 0.5) < 0.12
    # the fitted probe's direction recovers the planted one
    u = pr.probe_direction(pr.fit_probe(X, y)).numpy()
    assert float(u @ w) > 0.8  # random unit vectors in 24 dimensions: |cos| ~ 0.2


def test_mlp_probe_and_within_group_control():
    X, y, groups, _ = _planted(seed=2)
    out = pr.probe_layers({(3, "last"): X}, y, groups, kind="mlp", hidden=(16,), ci=False, key_names=("layer", "group"))
    row = out.iloc[0]
    assert (row.layer, row.group) == (3, "last") and row.auroc > 0.85 and row.selectivity > 0.2
    yc = pr.control_labels(y, groups, "within_groups", seed=0)
    for g in np.unique(groups):  # each group keeps its label counts
        assert sorted(yc[groups == g]) == sorted(y[groups == g])
    with pytest.raises(ValueError, match="constant within every group"):
        pr.control_labels(groups % 2, groups)


def test_multiclass_auroc_matches_sklearn_ovr():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    proba = rng.dirichlet(np.ones(3), 300) + np.eye(3)[y] * 0.5
    proba /= proba.sum(1, keepdims=True)
    assert pr._auroc(y, proba) == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))


def test_have1_and_have2_labels():
    tr = pd.DataFrame({"example_id": ["a", "b", "c"], "clean_answer": [3, 4, 5], "counterfactual_answer": [3, 7, 5]})
    assert pr.have1_labels(tr).tolist() == [0, 1, 0]
    ann = pd.DataFrame({"example_id": ["c", "a", "b"], "question_type": ["count", "color", "motion"]})
    assert pr.have2_labels(["a", "b", "c"], ann, "question_type").tolist() == ["color", "motion", "count"]
    with pytest.raises(KeyError, match="have no annotation"):
        pr.have2_labels(["a", "z"], ann, "question_type")
    with pytest.raises(KeyError, match="Have-1 needs column"):
        pr.have1_labels(tr.drop(columns="clean_answer"))


def test_direction_hook_ablates_and_steers_by_hand():
    u = torch.tensor([3.0, 4.0, 0.0])  # unit: (0.6, 0.8, 0)
    act = torch.arange(18, dtype=torch.float32).reshape(1, 6, 3)
    out = pr.direction_hook(u, positions=[1, 4])(act)
    unit = u / 5
    for p in range(6):
        if p in (1, 4):
            expect = act[0, p] - (act[0, p] @ unit) * unit
            torch.testing.assert_close(out[0, p], expect)
            assert abs(float(out[0, p] @ unit)) < 1e-5
        else:
            torch.testing.assert_close(out[0, p], act[0, p])
    steered = pr.direction_hook(u, mode="steer", alpha=2.0)(act)
    torch.testing.assert_close(steered, act + 2.0 * unit)


def test_direction_edit_through_the_patching_engine_equals_run_with_hooks():
    from analyses.metrics import logit_diff
    from analyses.variants import VariantRunner
    from vlm_cases import make_inputs

    model, inputs, _ = make_inputs("qwen2-vl-image")
    name = "blocks.1.hook_resid_pre"
    _, cache = model.run_with_cache(**inputs, names_filter=[name])
    u = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    metric = logit_diff(5, 6)
    runner = VariantRunner(model, inputs, batch_size=4)
    vals, _ = runner.run([[pr.direction_edit(name, u, cache[name], positions=[-1], alpha=3.0)]], metric)
    last = cache[name].shape[1] - 1
    with torch.no_grad():
        ref = metric(model.run_with_hooks(**inputs, fwd_hooks=[(name, pr.direction_hook(u, [last], "steer", 3.0))]))
    assert float(vals[0, 0]) == pytest.approx(float(ref[0]), abs=1e-5)
    with torch.no_grad():
        base = metric(model(**inputs))
    assert abs(float(vals[0, 0]) - float(base[0])) > 1e-4  # the steer changed the output
    # ablation as a replace edit equals the projection hook
    vals, _ = runner.run([[pr.direction_edit(name, u, cache[name], positions=[2, last], mode="ablate")]], metric)
    with torch.no_grad():
        ref = metric(model.run_with_hooks(**inputs, fwd_hooks=[(name, pr.direction_hook(u, [2, last], "ablate"))]))
    assert float(vals[0, 0]) == pytest.approx(float(ref[0]), abs=1e-5)


def test_features_from_activation_dataset_feed_probes(tmp_path):
    from analyses.activations import collect_activations
    from vlm_cases import make_inputs

    model, _, _ = make_inputs("qwen2-vl-image")
    data = [(f"img{i}", make_inputs("qwen2-vl-image", seed=i)[1]) for i in range(4)]
    ds = collect_activations(model, data, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], tmp_path, by=("last",), progress=False)
    feats, ids = pr.features_from_dataset(ds, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], "last")
    assert ids == [f"img{i}" for i in range(4)]
    _, inputs = data[2]
    _, cache = model.run_with_cache(**inputs, names_filter=["blocks.1.hook_resid_post"])
    torch.testing.assert_close(feats["blocks.1.hook_resid_post"][2], cache["blocks.1.hook_resid_post"][0, -1])


def test_a_fold_with_one_label_raises_a_clear_error():
    X = np.random.default_rng(0).normal(size=(12, 3))
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    groups = np.arange(12) // 4  # the last group holds every positive
    with pytest.raises(ValueError, match="holds one label only"):
        pr.probe_layers({0: X}, y, groups, n_splits=3, control=None, ci=False)
