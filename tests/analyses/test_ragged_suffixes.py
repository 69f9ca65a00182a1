"""Ragged per-row suffixes (issue 17): ``forward(start_at_layer=, resid=)`` in the model core, the packed-rows
mask, and VariantRunner's packed chunks, each against an independent reference (a full forward, the mask's
definition written out, a one-forward-per-variant loop)."""

from __future__ import annotations

import pytest
import torch

from analyses.metrics import logit_diff
from analyses.ragged_suffixes import PackedRows, row_starts
from analyses.variants import Edit, VariantRunner, VisionReusePlan
from hooked_vlm.errors import InputError
from kernels.mask import MaskSpec

METRIC = logit_diff(5, 6)
TOL = 1e-5


@pytest.fixture(scope="module")
def qwen_video():
    """Tiny Qwen2-VL (M-RoPE, 3-D position ids) and one short video prompt."""
    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.samples import synthetic_video
    from hooked_vlm.tiny import tiny_model
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    model = tiny_model("tiny-qwen2-vl").eval()
    frames, _ = synthetic_video(num_frames=8, size=(56, 84))
    kw = dict(video_min_pixels=56 * 84, video_max_pixels=56 * 84)
    return model, build_qwen_inputs(build_tiny_tokenizer(), "<video> where does it go", videos=[frames], **kw)


@torch.no_grad()
def test_start_at_layer_continues_the_forward_exactly(qwen_video):
    model, inputs = qwen_video
    full = model(**inputs)
    fired = []
    for layer in range(model.cfg.n_layers + 1):
        resid = model(**inputs, stop_at_layer=layer)
        out = model.run_with_hooks(**inputs, start_at_layer=layer, resid=resid,
                                   fwd_hooks=[("hook_embed", lambda a, hook: fired.append(hook.name))])
        assert (out - full).abs().max() <= TOL
    assert fired == []  # nothing before the starting block runs
    # from the middle of a cached prefix: the same numbers as the full forward's last positions
    from hooked_vlm.components.attention import KVCache

    start, layer = 9, 1
    lay_pos = model.layout(**inputs).position_ids
    cache = KVCache()
    model(**{k: v for k, v in inputs.items()}, position_ids=lay_pos, past_key_values=cache)
    cut = KVCache(keys={l: k[:, :start] for l, k in cache.keys.items()},
                  values={l: v[:, :start] for l, v in cache.values.items()})
    resid = model(**inputs, stop_at_layer=layer)[:, start:]
    out = model(input_ids=inputs["input_ids"][:, start:], position_ids=lay_pos[..., start:], past_key_values=cut,
                start_at_layer=layer, resid=resid)
    assert (out - full[:, start:]).abs().max() <= TOL


def test_bad_start_at_layer_is_refused(qwen_video):
    model, inputs = qwen_video
    d, length = model.cfg.d_model, inputs["input_ids"].shape[1]
    with pytest.raises(InputError, match="start_at_layer and resid go together"):
        model(**inputs, start_at_layer=1)
    with pytest.raises(InputError, match=r"resid must be the residual \[batch, seq, d_model\]"):
        model(**inputs, start_at_layer=1, resid=torch.zeros(1, length - 1, d))
    with pytest.raises(InputError, match="stop_at_layer=0 is below start_at_layer=1"):
        model(**inputs, start_at_layer=1, stop_at_layer=0, resid=torch.zeros(1, length, d))
    with pytest.raises(InputError, match="is not a block index"):
        model(**inputs, start_at_layer=99, resid=torch.zeros(1, length, d))


def test_packed_rows_mask_is_each_rows_own_causal_view():
    """The packed mask, materialised, equals the definition: row r's packed query at absolute position a sees
    prefix keys before r's start and r's own packed keys at positions <= a, nothing else."""
    starts, length = [3, 0, 5, 3, 6], 8
    rows = PackedRows.build(starts, length)
    p, t = rows.prefix, rows.n_packed
    got = MaskSpec(causal=True, q_offset=p, knockout=rows.knockout()).dense(t, p + t)[0]
    want = torch.zeros(t, p + t, dtype=torch.bool)
    for j in range(t):
        r, a = int(rows.row_of[j]), int(rows.order[j])
        for k in range(p):
            want[j, k] = k < starts[r]
        for jj in range(t):
            want[j, p + jj] = int(rows.row_of[jj]) == r and int(rows.order[jj]) <= a
    assert torch.equal(got, want)
    # every row's positions start..L-1 are packed once, its last position among the final n (in row order)
    for r, s in enumerate(starts):
        assert sorted(rows.order[rows.row_of == r].tolist()) == list(range(s, length))
    assert rows.index_of(2, torch.tensor([7])).item() == t - len(starts) + 2
    assert row_starts([[Edit("blocks.0.hook_resid_pre", torch.zeros(1, 8, 4), positions=torch.tensor([6, 2]))], []], 8) == [2, 7]
    assert row_starts([[Edit("hook_embed", torch.zeros(1, 8, 4), positions=torch.tensor([6]))]], 8) is None


def _edit_hook(edits):
    def hook(act, hook):
        act = act.clone()
        for e in edits:
            act[e.index(act.ndim)] = e.value[e.source_index(act.ndim)].to(act.dtype)
        return act

    return hook


@torch.no_grad()
def _brute(model, inputs, variants):
    """One forward per variant, its edits written in by hand."""
    out = []
    for edits in variants:
        by_hook = {}
        for e in edits:
            by_hook.setdefault(e.hook, []).append(e)
        logits = model.run_with_hooks(**inputs, fwd_hooks=[(h, _edit_hook(es)) for h, es in by_hook.items()])
        out.append(float(METRIC(logits).reshape(-1)[0]))
    return torch.tensor(out)


def _variants(model, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    d, h, dh = model.cfg.d_model, model.cfg.n_heads, model.cfg.d_head
    variants = [[Edit(f"blocks.{layer}.hook_resid_pre", torch.randn(1, length, d, generator=g),
                      positions=torch.tensor([p, min(p + 2, length - 1)]))]
                for layer in range(model.cfg.n_layers) for p in range(1, length, 4)]
    variants.append([])  # the base input itself
    variants.append([Edit("blocks.1.attn.hook_z", torch.randn(1, length, h, dh, generator=g),
                          positions=torch.tensor([length - 1, 4]), heads=torch.tensor([1]), head_axis=2)])
    variants.append([Edit("blocks.0.hook_mlp_out", torch.randn(1, 2, d, generator=g), positions=torch.tensor([7, 9]),
                          compact=True),
                     Edit("blocks.1.hook_resid_post", torch.randn(1, length, d, generator=g), positions=torch.tensor([3]))])
    return variants


def test_packed_ragged_variants_match_one_forward_per_variant(qwen_video):
    model, inputs = qwen_video
    length = inputs["input_ids"].shape[1]
    variants = _variants(model, length)
    runner = VariantRunner(model, inputs, batch_size=5, plan=VisionReusePlan(model), prefix_reuse="auto")
    got, _ = runner.run(variants, METRIC)
    assert (got[:, 0] - _brute(model, inputs, variants)).abs().max() <= TOL
    assert sorted(runner.base_run().resid_pre) == list(range(model.cfg.n_layers))  # a short input: kept, not rerun
    # the first chunk ran packed: its largest forward held each row's own suffix, not 5 x the longest one
    starts = row_starts(variants[:5], length)
    assert runner.largest_forward == sum(length - s for s in starts) < 5 * (length - min(starts))


def test_packed_ragged_variants_on_a_one_dimensional_rope_model(monkeypatch):
    """LLaVA (1-D position ids), text only, with the blocks below a chunk's layer rerun (as for a long input, whose
    per-block residuals the base run does not keep): packed chunks equal the loop too."""
    import analyses.variants as variants_module
    from hooked_vlm.tiny import tiny_model

    monkeypatch.setattr(variants_module, "RESID_CACHE_BYTES", 0)

    torch.manual_seed(0)
    model = tiny_model("tiny-llava").eval()
    inputs = {"input_ids": torch.randint(3, 50, (1, 14), generator=torch.Generator().manual_seed(0))}
    variants = _variants(model, 14, seed=2)
    runner = VariantRunner(model, inputs, batch_size=4, prefix_reuse="auto")
    got, _ = runner.run(variants, METRIC)
    assert runner.largest_forward < 4 * 14 and runner.base_run().resid_pre == {}
    assert (got[:, 0] - _brute(model, inputs, variants)).abs().max() <= TOL
