"""``analyses.pipelines.video.patch_cells`` against a brute-force loop of hand-patched full forwards (tiny Qwen2-VL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses.metrics import mc_margin
from analyses.pipelines.runner import ModelSpec
from analyses.pipelines.video.model_io import build_inputs, load_video_model
from analyses.pipelines.video.patch_cells import clean_run, patch_counterfactual, patched_positions
from analyses.pipelines.video.spans import frame_groups, parse_token_slice, token_slice_positions


@pytest.fixture(scope="module")
def setup():
    vm = load_video_model(ModelSpec("tiny-qwen2-vl"))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)  # 4 temporal slices of 2x2 merged tokens
    build = lambda f: build_inputs(vm, "<video> what moves ?", f, 2.0, "cpu", torch.float32)  # noqa: E731
    clean, cf = build(frames), build(frames[::-1].copy())
    layout = vm.model.layout(**clean)
    groups = {name: token_slice_positions(layout, parse_token_slice(name), 8) for name in ("visual", "text")}
    groups.update(frame_groups(layout, 8))
    return vm, clean, cf, groups


@pytest.mark.slow
def test_every_cell_equals_a_hand_patched_forward(setup):
    vm, clean, cf, groups = setup
    model = vm.model
    metric = mc_margin([5, 9, 17], 1)
    patched = patched_positions(groups, min(groups["visual"]))
    assert min(groups["text"]) == 0 and min(patched["text"]) > max(groups["visual"])  # the prefix is trimmed, the question kept
    layers = list(range(model.cfg.n_layers))
    state = clean_run(model, clean, patched, layers)
    cf_logits, rows = patch_counterfactual(model, state, cf, patched, metric, batch_size=3, clean_inputs=clean)
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(**clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        cf_full = model(**cf)
        clean_value, cf_value = float(metric(clean_logits)), float(metric(cf_full))
        assert abs(clean_value - cf_value) > 1e-3  # the clip matters to this model, so the cells can disagree
        torch.testing.assert_close(state.logits, clean_logits[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cf_logits, cf_full[0, -1], atol=1e-5, rtol=1e-5)
        assert len(rows) == len(layers) * len(groups) and {r["group"] for r in rows} == set(groups)
        for row in rows:
            name, pos = f"blocks.{row['layer']}.hook_resid_pre", groups[row["group"]]  # the untrimmed group

            def patch(act, hook, name=name, pos=pos):
                act = act.clone()
                act[:, pos] = cache[name][:, pos]
                return act

            expected = float(metric(model.run_with_hooks(**cf, fwd_hooks=[(name, patch)])))
            assert row["patched"] == pytest.approx(expected, abs=1e-5), (row["layer"], row["group"])
            assert row["recovery"] == pytest.approx((expected - cf_value) / (clean_value - cf_value), abs=1e-4)


def test_a_group_the_clean_run_did_not_cache_is_refused(setup):
    vm, clean, cf, groups = setup
    state = clean_run(vm.model, clean, {"visual": groups["visual"]}, [0])
    with pytest.raises(ValueError, match="group 'text' patches positions the clean run did not cache"):
        patch_counterfactual(vm.model, state, cf, {"text": groups["text"]}, mc_margin([5, 9], 0), batch_size=2)
