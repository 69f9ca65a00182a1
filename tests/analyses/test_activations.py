"""Activation datasets and mean vectors: exact against a torch mean over the full stack; resumable without duplicates."""

from __future__ import annotations

import pytest
import torch

from analyses.activations import ActivationDataset, collect_activations, example_groups, mean_ablation_sweep, mean_vectors
from analyses.metrics import logit_diff
from analyses.results_store import ConfigMismatchError
from vlm_cases import make_inputs

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out"]


def _dataset(case, n):
    return [(f"ex{i}", make_inputs(case, seed=i)[1]) for i in range(n)]


def _reference_stack(model, data, hook, select):
    """Every activation vector at the positions ``select(layout)`` of every example, stacked, by a plain loop."""
    rows = []
    for _, inputs in data:
        _, cache = model.run_with_cache(**inputs, names_filter=[hook])
        pos = select(model.layout(**inputs))
        rows.append(cache[hook][0, pos])
    return torch.cat(rows).double()


@pytest.mark.parametrize("case,visual", [("qwen2.5-vl-image", "image"), ("qwen2.5-vl-video", "video"),
                                         ("llava-image", "image"), ("gemma3-image", "image")])
def test_mean_vectors_equal_torch_mean_over_the_full_stack(case, visual):
    model, _, _ = make_inputs(case)
    data = _dataset(case, 3)
    mv = mean_vectors(model, data, HOOKS, by=("item", "text", "last"), progress=False)
    kw = {visual: 0}
    for hook in HOOKS:
        ref_item = _reference_stack(model, data, hook, lambda lay: lay.positions(**kw)).mean(0)
        torch.testing.assert_close(mv.mean(hook, f"{visual}0"), ref_item, atol=1e-12, rtol=1e-12)
        ref_last = _reference_stack(model, data, hook, lambda lay: lay.last_token(0)[None]).mean(0)
        torch.testing.assert_close(mv.mean(hook, "last"), ref_last, atol=1e-12, rtol=1e-12)
        ref_text = _reference_stack(model, data, hook, _first_text_run).mean(0)
        torch.testing.assert_close(mv.mean(hook, "text0"), ref_text, atol=1e-12, rtol=1e-12)
    assert mv.mean(HOOKS[0], "last").dtype == torch.float64


def test_cell_groups_follow_the_layout():
    model, inputs, _ = make_inputs("qwen2-vl-image")
    lay = model.layout(**inputs)
    groups = example_groups(lay, ["cell"])
    assert groups[f"image0/r1c2"] == [lay.cell(1, 2, image=0)]
    with pytest.raises(ValueError, match="unknown grouping"):
        example_groups(lay, ["cells"])


def test_dataset_rows_equal_direct_reductions_and_means_match(tmp_path):
    case = "qwen2.5-vl-image"
    model, _, _ = make_inputs(case)
    data = _dataset(case, 5)
    ds = collect_activations(model, data, HOOKS + ["vision.blocks.0.hook_resid_post"], tmp_path / "acts", shard_size=2, progress=False)
    assert len(ds.manifest["shards"]) == 3 and ds.example_ids == [f"ex{i}" for i in range(5)]
    x, idx = ds.load("blocks.1.hook_attn_out", groups=["image0"])
    assert list(idx["example_id"]) == [f"ex{i}" for i in range(5)]
    _, inputs = data[3]
    _, cache = model.run_with_cache(**inputs, names_filter=["blocks.1.hook_attn_out", "vision.blocks.0.hook_resid_post"])
    lay = model.layout(**inputs)
    torch.testing.assert_close(x[3], cache["blocks.1.hook_attn_out"][0, lay.positions(image=0)].mean(0))
    xv, _ = ds.load("vision.blocks.0.hook_resid_post")
    b, rows = lay.vision_rows(image=0)
    torch.testing.assert_close(xv[3], cache["vision.blocks.0.hook_resid_post"][b, rows].mean(0))
    streamed = mean_vectors(model, data, HOOKS, progress=False)
    stored = ds.mean_vectors()
    for key in streamed.sums:
        torch.testing.assert_close(stored.mean(*key), streamed.mean(*key), atol=1e-12, rtol=1e-12)
    path = stored.save(tmp_path / "means.safetensors")
    again = type(stored).load(path)
    assert torch.equal(again.mean(HOOKS[0], "last"), stored.mean(HOOKS[0], "last"))


def _first_text_run(lay):
    """Positions of the first maximal run of text tokens (kind 0), by a plain scan."""
    kinds = lay.kind[0].tolist()
    start = kinds.index(0)
    stop = start
    while stop < len(kinds) and kinds[stop] == 0:
        stop += 1
    return torch.arange(start, stop)


class _Killed(Exception):
    pass


def test_resume_after_a_kill_stores_each_example_once(tmp_path):
    case = "qwen2-vl-image"
    model, _, _ = make_inputs(case)
    data = _dataset(case, 5)

    def dying():
        for i, entry in enumerate(data):
            if i == 3:
                raise _Killed
            yield entry

    out = tmp_path / "acts"
    with pytest.raises(_Killed):
        collect_activations(model, dying(), HOOKS, out, shard_size=2, progress=False)
    assert ActivationDataset(out).example_ids == ["ex0", "ex1"]  # ex2 was only in memory
    (out / "shard-00001.safetensors").write_bytes(b"half-written shard the manifest never listed")
    ds = collect_activations(model, data, HOOKS, out, shard_size=2, progress=False)
    assert ds.example_ids == [f"ex{i}" for i in range(5)]
    x, idx = ds.load(HOOKS[0], groups=["last"])
    assert idx["example_id"].tolist() == [f"ex{i}" for i in range(5)]
    fresh = collect_activations(model, data, HOOKS, tmp_path / "fresh", shard_size=2, progress=False)
    x_fresh, _ = fresh.load(HOOKS[0], groups=["last"])
    torch.testing.assert_close(x, x_fresh)
    for key in fresh.mean_vectors().sums:
        torch.testing.assert_close(ds.mean_vectors().mean(*key), fresh.mean_vectors().mean(*key), atol=1e-12, rtol=0)
    with pytest.raises(ConfigMismatchError, match="holds an activation dataset"):
        collect_activations(model, data, HOOKS[:1], out, progress=False)
    with pytest.raises(ValueError, match="occurs twice"):
        collect_activations(model, [data[0], data[0]], HOOKS, tmp_path / "dup", progress=False)


def test_mean_ablation_sweep_equals_a_hand_written_hook():
    case = "qwen2.5-vl-image"
    model, inputs, _ = make_inputs(case)
    data = _dataset(case, 3)
    mv = mean_vectors(model, data, ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre"], progress=False)
    lay = model.layout(**inputs)
    groups = example_groups(lay, ["item", "last"])
    metric = logit_diff(5, 6)
    res = mean_ablation_sweep(model, inputs, metric, mv, groups, sites=["resid_pre"], progress=False)
    assert len(res) == 2 * len(groups)
    for layer in (0, 1):
        name = f"blocks.{layer}.hook_resid_pre"
        mean = mv.mean(name, "image0").float()
        pos = groups["image0"]

        def hook(act, hook):
            act = act.clone()
            act[:, pos] = mean
            return act

        with torch.no_grad():
            ref = float(metric(model.run_with_hooks(**inputs, fwd_hooks=[(name, hook)])).mean())
        got = res[(res.layer == layer) & (res.group == "image0")].value.item()
        assert got == pytest.approx(ref, abs=1e-5)
    with torch.no_grad():
        clean = float(metric(model(**inputs)).mean())
    assert res.clean_value.iloc[0] == pytest.approx(clean, abs=1e-5)


def test_means_are_token_weighted_when_group_sizes_differ():
    """Prompts of different lengths: text1 has 1 to 6 tokens; the mean is over all tokens, not of per-example means."""
    prompts = ["red", "what is it", "what is the red circle here"]
    data = [(f"p{i}", make_inputs("qwen2-vl-image", seed=i, prompt=p)[1]) for i, p in enumerate(prompts)]
    model, _, _ = make_inputs("qwen2-vl-image")
    hook = "blocks.1.hook_resid_post"
    mv = mean_vectors(model, data, [hook], by=("text",), progress=False)

    def last_text_run(lay):
        kinds = lay.kind[0].tolist()
        stop = len(kinds)
        start = stop - 1
        while start > 0 and kinds[start - 1] == 0:
            start -= 1
        return torch.arange(start, stop)

    ref = _reference_stack(model, data, hook, last_text_run)
    assert mv.counts[(hook, "text1")] == ref.shape[0]
    torch.testing.assert_close(mv.mean(hook, "text1"), ref.mean(0), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case,kind", [("llava-next-image", "image"), ("llava-next-video", "video"), ("qwen2.5-vl-video", "video")])
def test_vision_hook_groups_cover_every_tower_row_of_the_item(case, kind):
    """LLaVA-NeXT: every crop's tower row; videos: one group per frame / temporal patch slice."""
    model, inputs, _ = make_inputs(case)
    hook = "vision.blocks.0.hook_resid_post"
    _, cache = model.run_with_cache(**inputs, names_filter=[hook])
    act = cache[hook]
    lay = model.layout(**inputs)
    _, it = lay.find_item(**{kind: 0})
    n_rows = getattr(it, "n_rows", 1)
    if kind == "image":
        parts = [lay.vision_rows(image=0, crop=k) for k in range(n_rows)]
    else:
        n = n_rows if n_rows > 1 else it.grid_thw[0]
        parts = [lay.vision_rows(video=0, frame=f) for f in range(n)]
    assert len(parts) > 1
    stacked = torch.cat([act[row, idx] for row, idx in parts]).double()
    mv = mean_vectors(model, [("x", inputs)], [hook], by=("item",), progress=False)
    torch.testing.assert_close(mv.mean(hook, f"{kind}0"), stacked.mean(0), atol=1e-12, rtol=1e-12)
    if kind == "video":
        per_frame = mean_vectors(model, [("x", inputs)], [hook], by=("frame",), progress=False)
        row, idx = parts[1]
        torch.testing.assert_close(per_frame.mean(hook, "video0/patchframe1"), act[row, idx].double().mean(0), atol=1e-12, rtol=1e-12)
