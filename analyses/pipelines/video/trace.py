"""``hooked-vlm video trace``: counterfactual causal tracing per entry, layer and token slice.

Per entry: the clean clip and each counterfactual (:mod:`.counterfactual_set`); the metric is the
multiple-choice margin of the right candidate (its first-token logit minus the best other candidate's);
for every layer and token slice the clean residual stream entering that layer (``resid_pre``) is patched
into the counterfactual run (:mod:`.patch_cells`: the clean clip runs once per entry and caches only the patched
positions; each counterfactual runs its vision tower once and its key/value prefix is reused across cells), and the normalised
recovery ``(patched - cf) / (clean - cf)`` is recorded. Token slices: ``visual``, ``text``, each
``--token_slice``, and one group per temporal slice (named by its input frames) for the layer x frame map.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analyses.metrics import mc_margin
from analyses.pipelines.datasets import Case
from analyses.pipelines.runner import CaseContext, Pipeline

from .annotations import ANNOTATION_SCHEMA, correct_index
from .clips import case_clip, case_prompt
from .counterfactual_set import build_counterfactuals, check_swap_spans
from .model_io import VideoModel, build_inputs, first_token_ids, load_video_model
from .patch_cells import clean_run, patch_counterfactual, patched_positions
from .representations import LayerSummaries, write_case_file
from .spans import SpanError, frame_groups, parse_token_slice, token_slice_positions

__all__ = ["TRACE", "trace_case", "REPRESENTATIONS_DIR", "representation_file"]

REPRESENTATIONS_DIR = "representations"


def _answer(logits: torch.Tensor, ids: list[int], candidates: list[str]) -> str:
    return candidates[int(torch.as_tensor([logits[i] for i in ids]).argmax())]


def _groups(layout: Any, ctx: CaseContext, n_frames: int) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Named position groups (token slices, then one per temporal slice) and each group's kind."""
    groups: dict[str, list[int]] = {}
    kinds: dict[str, str] = {}
    for text in ["visual", "text", *ctx.options.get("token_slices", [])]:
        ts = parse_token_slice(text)
        pos = token_slice_positions(layout, ts, n_frames)
        if not pos:
            raise SpanError(f"token slice {ts.name!r} holds no tokens in this prompt")
        groups[ts.name], kinds[ts.name] = pos, "slice"
    if layout.videos():
        for name, pos in frame_groups(layout, n_frames).items():
            groups[name], kinds[name] = pos, "frame"
    return groups, kinds


def trace_case(vm: VideoModel, case: Case, ctx: CaseContext) -> dict[str, Any]:
    """Clean / counterfactual / patched margins per counterfactual, layer and token slice for one entry."""
    opts = ctx.options
    target = correct_index(case.data, "trace")
    candidates = list(case.data["candidates"])
    ids = first_token_ids(vm.tokenizer, candidates)
    clip = case_clip(case, opts)
    prompt = case_prompt(case, opts)
    n_frames = int(clip.frames.shape[0])
    clean = build_inputs(vm, prompt, clip.frames, clip.effective_fps, ctx.device, ctx.dtype)
    layout = vm.model.layout(**clean)
    if not layout.videos():
        raise SpanError(f"model {vm.loaded.name!r} put no video tokens in the prompt; `video trace` needs a video model "
                        "(Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video)")
    tps = int(layout.videos()[0].temporal_patch_size)
    groups, kinds = _groups(layout, ctx, n_frames)
    cfs = build_counterfactuals(clip.frames, tps, opts["counterfactuals"], check_swap_spans([tuple(s) for s in opts.get("swap_spans", [])]),
                                ctx.seed, n_frames)
    metric = mc_margin(ids, target)
    dump = bool(opts.get("dump_representations"))
    layers = list(range(int(vm.model.cfg.n_layers)))
    patched = patched_positions(groups, min(groups["visual"]))
    summaries: dict[str, LayerSummaries] = {}

    def hooks(name: str) -> list:
        if not dump:
            return []
        summaries[name] = LayerSummaries(len(layers), groups["visual"])
        return summaries[name].hooks

    clean_state = clean_run(vm.model, clean, patched, layers, extra_hooks=hooks("clean"))
    clean_margin = float(metric(clean_state.logits[None, None]))
    conditions, cells = [], []
    for name, cf in cfs.items():
        cf_inputs = build_inputs(vm, prompt, cf.frames, clip.effective_fps, ctx.device, ctx.dtype)
        cf_logits, rows = patch_counterfactual(vm.model, clean_state, cf_inputs, patched, metric, int(opts.get("batch_size", 8)),
                                               clean_inputs=clean, extra_hooks=hooks(name))
        conditions.append({"counterfactual": name, "params": cf.params, "changed_slices": cf.changed_slices(),
                           "cf_margin": float(metric(cf_logits[None, None])), "cf_answer": _answer(cf_logits, ids, candidates)})
        for row in rows:
            recovery = row["recovery"]
            cells.append({"counterfactual": name, "layer": int(row["layer"]), "token_slice": row["group"], "slice_kind": kinds[row["group"]],
                          "n_positions": len(groups[row["group"]]), "patched_margin": float(row["patched"]),
                          "recovery": None if np.isnan(recovery) else float(recovery)})
    if summaries:
        write_case_file(representation_file(ctx.output_dir, case.id), {k: v.arrays() for k, v in summaries.items()})
    return {
        "question_id": case.id, "video_name": case.data["video_name"], "task_name": case.data.get("task_name") or "all",
        "n_frames": n_frames, "temporal_patch_size": tps, "n_visual_tokens": len(groups["visual"]), "seq_len": layout.seq_len,
        "candidates": candidates, "answer_number": target, "clean_margin": clean_margin,
        "clean_answer": _answer(clean_state.logits, ids, candidates),
        "frame_groups": json.dumps(_group_frames(kinds, tps, n_frames)),
        "frames_with_answer_object": case.data.get("frames_with_answer_object"),
        "conditions": json.dumps(conditions), "cells": json.dumps(cells),
    }


def _group_frames(kinds: dict[str, str], tps: int, n_frames: int) -> dict[str, list[int]]:
    """The input frames of each per-slice group (groups are in slice order; padding frames left out)."""
    names = [g for g, kind in kinds.items() if kind == "frame"]
    return {g: [f for f in range(s * tps, (s + 1) * tps) if f < n_frames] for s, g in enumerate(names)}


def _safe(case_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(case_id))


def representation_file(output_dir: Path, case_id: str) -> Path:
    """Where the entry's representation summaries are written during the run."""
    return Path(output_dir) / REPRESENTATIONS_DIR / f"{_safe(case_id)}.npz"


TRACE = Pipeline(name="video-trace", schema=ANNOTATION_SCHEMA, run_case=trace_case, load_model=load_video_model, version="1")
