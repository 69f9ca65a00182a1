"""Sweeps at length (issue 17 part 3): reduced source caches, compact edits, memory-aware batches and the
knockout's prefix from its first query, checked against brute-force one-forward-per-cell loops, and the
memory they promise (no ``[Lq, Lk]`` tensor, no all-layer full-length cache, no forward beyond one plain
forward's positions)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import analyses.causal_tracing as ct
import analyses.patching as patching
from analyses.knockout import knockout_sweep
from analyses.metrics import logit_diff
from analyses.sweep import SweepOptions
from analyses.variants import Edit, VariantRunner
from hooked_vlm.components import masked_attention as ma

METRIC = logit_diff(5, 6)
TOL = 1e-5


@pytest.fixture(scope="module")
def qwen():
    from hooked_vlm.tiny import tiny_model

    torch.manual_seed(0)
    return tiny_model("tiny-qwen2-vl").eval()


@pytest.fixture(scope="module")
def video_pair():
    """A clip and the same clip with its temporal slices reversed (same layout), on tiny Qwen2-VL."""
    from analyses import video_counterfactuals as vc
    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.samples import synthetic_video
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    frames, _ = synthetic_video(num_frames=8, size=(56, 84))
    kw = dict(video_min_pixels=56 * 84, video_max_pixels=56 * 84)
    clean = build_qwen_inputs(tok, "<video> where does it go", videos=[frames], **kw)
    rev = vc.reverse(frames, unit="slice")
    return clean, build_qwen_inputs(tok, "<video> where does it go", videos=[rev.frames], **kw)


def frame_spans(model, inputs, n=3):
    pos = model.layout(**inputs).positions(video=0)
    return {f"f{i}": c.tolist() for i, c in enumerate(torch.tensor_split(pos, n))}


def replace_hook(values, pos):
    def hook(act, hook=None):
        act = act.clone()
        act[:, pos] = values[:, pos].to(act.dtype)
        return act

    return hook


@torch.no_grad()
def brute_patch(model, clean, corrupt, name, pos):
    """One forward per cell with the clean run's full activation written into ``pos``."""
    _, cache = model.run_with_cache(**clean, names_filter=[name])
    logits = model.run_with_hooks(**corrupt, fwd_hooks=[(name, replace_hook(cache[name], pos))])
    return float(METRIC(logits).mean())


class Runners:
    """Records every VariantRunner a sweep builds (to read what its forwards computed)."""

    def __init__(self, monkeypatch):
        self.made = []
        init = VariantRunner.__init__

        def recording(runner, *a, **kw):
            init(runner, *a, **kw)
            self.made.append(runner)

        monkeypatch.setattr(VariantRunner, "__init__", recording)


class CachedShapes:
    """Wraps the sweeps' reference run and records every cached activation's shape."""

    def __init__(self, monkeypatch):
        self.shapes = {}
        for module in (patching, ct):
            real = module.reduced_cache_run

            def wrapped(*a, real=real, **kw):
                logits, cache = real(*a, **kw)
                self.shapes.update({k: tuple(v.shape) for k, v in cache.items()})
                return logits, cache

            monkeypatch.setattr(module, "reduced_cache_run", wrapped)


def test_span_patching_with_reduced_cache_and_position_budget_matches_brute_force(qwen, video_pair, monkeypatch):
    clean, corrupt = video_pair
    length = clean["input_ids"].shape[1]
    spans = frame_spans(qwen, clean)
    runners, shapes = Runners(monkeypatch), CachedShapes(monkeypatch)
    # a budget of 1.2 full-length forwards: early spans run alone, the last span's short suffixes pair up
    opts = SweepOptions(batch_size=4, max_positions=int(1.2 * length), progress=False)
    res = patching.activation_patching(qwen, clean, corrupt, METRIC, sites=("resid_pre",), positions=spans, options=opts)
    for row in res.frame.itertuples():
        want = brute_patch(qwen, clean, corrupt, f"blocks.{row.layer}.hook_resid_pre", spans[row.group])
        assert abs(row.value - want) <= TOL, (row.layer, row.group, row.value, want)
    # the source cache held the spans' positions only, never every position of every layer
    n_kept = len({p for s in spans.values() for p in s})
    assert n_kept < length and shapes.shapes and all(s[1] == n_kept for s in shapes.shapes.values()), shapes.shapes
    runner = runners.made[-1]
    assert 0 < runner.largest_forward <= int(1.2 * length)
    # and the base run kept only the last position's logits (the metric reads nothing else)
    assert runner.base_logits().shape[1] == 1


@torch.no_grad()
def test_span_trace_with_reduced_cache_matches_brute_force(qwen, video_pair, monkeypatch):
    clean, _ = video_pair
    spans = frame_spans(qwen, clean)
    noise = spans["f0"]
    shapes = CachedShapes(monkeypatch)
    opts = SweepOptions(batch_size=4, progress=False)
    res = ct.causal_trace(qwen, clean, METRIC, noise_positions=noise, restore_positions=spans, kinds=("resid", "mlp"),
                          window=2, n_samples=2, seed=3, options=opts)
    # brute force: the same draws (one [1, |noise|, d] per sample from the seeded generator), one forward each
    clean_logits, cache = qwen.run_with_cache(**clean)
    assert abs(res.clean_value - float(METRIC(clean_logits).mean())) <= TOL
    emb = cache["hook_embed"]
    std = float(emb[:, noise].std()) * 3.0
    gen = torch.Generator().manual_seed(3)
    draws = [torch.randn(emb[:, noise].shape, generator=gen) * std for _ in range(2)]

    def noised(draw):
        def hook(act, hook=None):
            act = act.clone()
            act[:, noise] += draw
            return act

        return hook

    corrupt = [float(METRIC(qwen.run_with_hooks(**clean, fwd_hooks=[("hook_embed", noised(d))])).mean()) for d in draws]
    assert abs(res.corrupt_value - sum(corrupt) / 2) <= TOL
    n_layers = qwen.cfg.n_layers
    for row in res.frame.itertuples():
        pos = spans[row.group]
        if row.kind == "resid":
            names = [f"blocks.{row.layer}.hook_resid_pre"]
        else:
            names = [f"blocks.{l}.hook_mlp_out" for l in ct._window(row.layer, 2, n_layers)]
        restored = [
            float(METRIC(qwen.run_with_hooks(**clean, fwd_hooks=[("hook_embed", noised(d))]
                                             + [(n, replace_hook(cache[n], pos)) for n in names])).mean())
            for d in draws
        ]
        assert abs(row.indirect_effect - (sum(restored) - sum(corrupt)) / 2) <= TOL, row
    # the clean cache: spans (and the noised span) only, and only the kinds traced (no attn_out)
    n_kept = len({p for s in spans.values() for p in s})
    assert shapes.shapes and all(s[1] == n_kept for s in shapes.shapes.values())
    assert not any("attn_out" in k for k in shapes.shapes)


def test_knockout_from_first_query_matches_score_edits(qwen, video_pair, monkeypatch):
    clean, _ = video_pair
    lay = qwen.layout(**clean)
    length = clean["input_ids"].shape[1]
    edges = {"video->last": (lay.last_token(), lay.positions(video=0)), "video->last3": ([-3, -2, -1], lay.positions(video=0))}
    runners = Runners(monkeypatch)
    fast = knockout_sweep(qwen, clean, METRIC, edges, options=SweepOptions(batch_size=4, progress=False))
    runner = runners.made[-1]
    slow = knockout_sweep(qwen, clean, METRIC, edges, method="scores",
                          options=SweepOptions(batch_size=4, prefix_reuse=False, plan=None, progress=False))
    assert (fast["value"] - slow["value"]).abs().max() <= TOL
    assert fast["effect"].abs().max() > 0  # the knockout changed something
    # each layer's forward computed from its earliest knocked-out query on (2 rows x 3 positions), not the sequence
    n_layers = qwen.cfg.n_layers
    assert runner.positions_computed == n_layers * 2 * 3 < length


class LargestTensor(TorchDispatchMode):
    """The element count of the largest tensor any aten op produces (intermediates included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.slow
def test_long_sweeps_stay_within_one_forward(qwen, monkeypatch):
    """At 600 tokens: patching / tracing over early spans of every layer form no tensor larger than a plain
    forward's largest (memory-aware batches: full-length variants run alone), no ``[Lq, Lk]`` tensor, and
    cache the spans only."""
    n = 600
    monkeypatch.setattr(ma, "TILE_ELEMS", 64 * n)
    ids = torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(0))
    clean, corrupt = dict(input_ids=ids), dict(input_ids=ids.flip(1))
    spans = {f"s{i}": list(range(20 + 100 * i, 60 + 100 * i)) for i in range(3)}
    shapes = CachedShapes(monkeypatch)
    with torch.no_grad(), LargestTensor() as plain:
        qwen(**clean)
    opts = SweepOptions(batch_size=4, progress=False, max_positions=n)  # "auto" at >= 4096 tokens
    with torch.no_grad(), LargestTensor() as sweep:
        pat = patching.activation_patching(qwen, clean, corrupt, METRIC, positions=spans, options=opts)
        tr = ct.causal_trace(qwen, clean, METRIC, noise_positions=spans["s0"], restore_positions=spans, kinds=("resid",),
                             n_samples=1, options=opts)
    assert sweep.largest <= plain.largest < n * n // 2, (sweep.largest, plain.largest)
    assert shapes.shapes and all(s[1] == 120 for s in shapes.shapes.values()), shapes.shapes
    assert len(pat.frame) == len(tr.frame) == qwen.cfg.n_layers * 3
    # positive control: without the position budget, four full-length variants share a forward
    with torch.no_grad(), LargestTensor() as unbounded:
        patching.activation_patching(qwen, clean, corrupt, METRIC, positions=spans,
                                     options=SweepOptions(batch_size=4, progress=False, max_positions=None))
    assert unbounded.largest > 2 * plain.largest


def test_bad_compact_edit_and_budget_are_refused(qwen, video_pair):
    with pytest.raises(ValueError, match="compact value holds exactly the edited positions"):
        Edit("blocks.0.hook_resid_pre", torch.zeros(1, 3, 4), positions=torch.tensor([1, 2]), compact=True)
    with pytest.raises(ValueError, match="needs positions"):
        Edit("blocks.0.hook_resid_pre", torch.zeros(1, 3, 4), compact=True)
    with pytest.raises(ValueError, match="max_positions must be a positive int"):
        VariantRunner(qwen, video_pair[0], max_positions=0)


@torch.no_grad()
def test_pixel_noise_trace_keeps_only_visual_features_and_matches_brute_force(qwen, video_pair):
    """Noise on pixel rows: each draw's corrupted value and a restored cell equal a full forward on that draw's
    noisy pixels (same seeded draws), while the noise edits hold the visual positions' features only."""
    clean, _ = video_pair
    key, rows, std, seed = "pixel_values_videos", torch.arange(0, 40, 3), 0.7, 4
    spans = frame_spans(qwen, clean)
    res = ct.causal_trace(qwen, clean, METRIC, pixel_rows=rows, restore_positions=spans, kinds=("resid",),
                          layers=[1], n_samples=2, noise_std=std, seed=seed, progress=False)
    gen = torch.Generator().manual_seed(seed)
    name, pos = "blocks.1.hook_resid_pre", spans["f1"]
    _, cache = qwen.run_with_cache(**clean, names_filter=[name])
    corrupt, restored = [], []
    for _ in range(2):
        pix = clean[key].clone()
        pix[rows] = pix[rows] + torch.randn(pix[rows].shape, generator=gen, dtype=torch.float32) * std
        noisy = dict(clean, **{key: pix})
        corrupt.append(float(METRIC(qwen(**noisy)).mean()))
        restored.append(float(METRIC(qwen.run_with_hooks(**noisy, fwd_hooks=[(name, replace_hook(cache[name], pos))])).mean()))
    assert abs(res.corrupt_samples - torch.tensor(corrupt).numpy()).max() <= TOL
    cell = res.frame[(res.frame["layer"] == 1) & (res.frame["group"] == "f1")]
    assert float(cell["value"].iloc[0]) == pytest.approx(sum(restored) / 2, abs=TOL)
    n_visual = int((qwen.layout(**clean).item[0] >= 0).sum())
    edits = ct._pixel_noise_edits(qwen, clean, key, rows, std, 2, torch.Generator().manual_seed(seed), "hook_embed")
    assert all(e.compact and e.value.shape[1] == n_visual < clean["input_ids"].shape[1] for e in edits)
