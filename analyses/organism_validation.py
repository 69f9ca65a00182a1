"""Method validation on the Qwen model organisms: do patching sweeps find the planted ground truth?

Each check runs an existing analysis (``analyses.patching.activation_patching``,
``analyses.video_counterfactuals.reverse``) on a shipped organism (``hooked_vlm.organisms``) and compares
what it finds with the truth the generator planted:

* :func:`grid_cell_sweep` (``grid-qwen2.5-vl``, presence questions): the clean image holds the target, the
  corrupted one is the same image with the target removed. Patching the clean visual token of the
  target's cell into the corrupted run (``resid_pre`` of LM block 0) should restore "yes", and a sweep
  over all 100 cells should put its top recovery at the target cell.
* :func:`video_reversal` (``video-qwen2-vl``): playing a direction clip backwards should flip the answer.
* :func:`video_span_patching`: the corrupted clip is the clean one with the frames of the moving span
  reversed (same frames, opposite motion; frames outside the span identical); per-slice patching should
  put the recovery on the slices of the span.

``python -m analyses.organism_validation [--n N] [--out FILE.json]`` prints the table of docs/organisms.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from analyses.metrics import logit_diff
from analyses.patching import activation_patching
from analyses.positions import layout_groups
from analyses.video_counterfactuals import reverse

__all__ = ["CellSweepCase", "grid_cell_sweep", "video_reversal", "SpanCase", "video_span_patching", "load_organism"]


def load_organism(name: str) -> tuple[Any, Any, Any]:
    """(organism, hooked model with ``.tokenizer``, tokenizer) of a shipped organism."""
    from hooked_vlm import HookedVLM
    from hooked_vlm.organisms import get_organism

    model = HookedVLM.from_pretrained(name)
    return get_organism(name), model, model.tokenizer


def _token_id(tokenizer: Any, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"{word!r} is not one word of the organism's vocabulary")
    return ids[0]


# ----------------------------------------------------------------------------- grid: cell sweep
@dataclass
class CellSweepCase:
    """One held-out presence image: where the sweep's top recovery landed and how much the target cell restores."""

    target_cell: tuple[int, int]
    top_cell: tuple[int, int]
    target_recovery: float
    top_recovery: float
    second_recovery: float
    restored: bool  # patching the target cell alone makes the corrupted run answer "yes" again
    clean_diff: float
    corrupt_diff: float


def grid_cell_sweep(organism: Any, model: Any, tokenizer: Any, n: int = 20, seed: int = 0, layer: int = 0) -> list[CellSweepCase]:
    """Cell sweep on ``n`` held-out presence images that contain the target (see module docstring)."""
    from hooked_vlm.organisms.base import Example
    from hooked_vlm.organisms.grid_qwen import render

    yes, no = _token_id(tokenizer, "yes"), _token_id(tokenizer, "no")
    metric = logit_diff(yes, no, pos=-1)
    cases: list[CellSweepCase] = []
    rng_seed = seed
    while len(cases) < n:
        ex = organism.generate_task("presence", 1, rng_seed)[0]
        rng_seed += 1
        if ex.answer != "yes":
            continue
        (tr, tc), = ex.truth["target_cells"]
        rest = [o for o in ex.truth["objects"] if (o["row"], o["col"]) != (tr, tc)]
        corrupt_ex = Example(ex.task, ex.prompt, "no", image=render(rest), truth={})
        clean = organism.prompt_inputs([ex], tokenizer)
        corrupt = organism.prompt_inputs([corrupt_ex], tokenizer)
        groups = layout_groups(model.layout(**clean), by="cell", include_last=False)
        res = activation_patching(model, clean, corrupt, metric, sites=("resid_pre",), layers=[layer], positions=groups,
                                  batch_size=50, progress=False)
        rec = res.frame.set_index("group")["recovery"]
        val = res.frame.set_index("group")["value"]
        order = rec.sort_values(ascending=False)
        top = order.index[0]
        r, c = (int(x) for x in top.split("/r")[1].split("c"))
        key = f"image0/r{tr}c{tc}"
        cases.append(CellSweepCase((tr, tc), (r, c), float(rec[key]), float(order.iloc[0]), float(order.iloc[1]),
                                   bool(val[key] > 0), res.clean_value, res.corrupt_value))
    return cases


# ----------------------------------------------------------------------------- video: reversal
@torch.no_grad()
def video_reversal(organism: Any, model: Any, tokenizer: Any, n: int = 40, seed: int = 0) -> dict[str, float]:
    """Accuracy on direction clips and how often their time reversal gets the opposite answer."""
    from hooked_vlm.organisms.base import Example
    from hooked_vlm.organisms.video_qwen import DIRECTIONS, OPPOSITE

    ids = {d: _token_id(tokenizer, d) for d in DIRECTIONS}
    examples = organism.generate_task("direction", n, seed)
    reversed_ex = [Example(e.task, e.prompt, OPPOSITE[e.answer], video=reverse(e.video).frames, truth={}) for e in examples]

    def predict(exs: list[Example]) -> list[str]:
        logits = model(**organism.prompt_inputs(exs, tokenizer))[:, -1]
        words = list(ids)
        return [words[int(i)] for i in logits[:, [ids[w] for w in words]].argmax(-1)]

    pred, pred_rev = [], []
    for i in range(0, n, 20):
        pred += predict(examples[i:i + 20])
        pred_rev += predict(reversed_ex[i:i + 20])
    correct = [p == e.answer for p, e in zip(pred, examples)]
    flipped = [p == OPPOSITE[e.answer] for p, e in zip(pred_rev, examples)]
    return {"n": n, "accuracy": float(np.mean(correct)), "reversed_flips": float(np.mean(flipped)),
            "flip_given_correct": float(np.mean([f for f, c in zip(flipped, correct) if c])) if any(correct) else float("nan")}


# ----------------------------------------------------------------------------- video: span patching
@dataclass
class SpanCase:
    """One direction clip: per-layer slice recoveries and whether the top slice lies in the answer span."""

    answer_slices: list[int]
    recovery: dict[int, list[float]]  # layer -> recovery per temporal slice
    top_in_span: dict[int, bool]
    span_recovery: dict[int, float]  # patching all span slices together
    clean_minus_corrupt: float = float("nan")  # metric gap; ~0 means the model cannot tell the clips apart


def video_span_patching(organism: Any, model: Any, tokenizer: Any, n: int = 20, seed: int = 0,
                        layers: tuple[int, ...] = (0, 1, 2)) -> list[SpanCase]:
    """Per-slice patching from a direction clip into its span-reversed counterfactual (see module docstring)."""
    from hooked_vlm.organisms.base import Example
    from hooked_vlm.organisms.video_qwen import OPPOSITE

    cases: list[SpanCase] = []
    for ex in organism.generate_task("direction", n, seed):
        start, stop = ex.truth["answer_frames"]
        frames = ex.video.copy()
        frames[start:stop] = ex.video[start:stop][::-1]
        corrupt_ex = Example(ex.task, ex.prompt, OPPOSITE[ex.answer], video=frames, truth={})
        clean = organism.prompt_inputs([ex], tokenizer)
        corrupt = organism.prompt_inputs([corrupt_ex], tokenizer)
        metric = logit_diff(_token_id(tokenizer, ex.answer), _token_id(tokenizer, OPPOSITE[ex.answer]), pos=-1)
        groups = layout_groups(model.layout(**clean), by="frame", include_last=False)
        slices = {k: v for k, v in groups.items() if k.startswith("video0/frame")}
        span = ex.truth["answer_slices"]
        slices["span"] = [p for s in span for p in slices[f"video0/frame{s}"]]
        res = activation_patching(model, clean, corrupt, metric, sites=("resid_pre",), layers=list(layers), positions=slices,
                                  batch_size=32, progress=False)
        f = res.frame
        rec, top, span_rec = {}, {}, {}
        n_slices = len(slices) - 1
        for layer in layers:
            fl = f[f["layer"] == layer].set_index("group")["recovery"]
            per = [float(fl[f"video0/frame{s}"]) for s in range(n_slices)]
            rec[layer] = per
            # all-NaN: clean and corrupted logits are identical, so no slice can be ranked (counts as a miss)
            top[layer] = bool(not np.isnan(per).all() and int(np.nanargmax(per)) in span)
            span_rec[layer] = float(fl["span"])
        cases.append(SpanCase(span, rec, top, span_rec, res.clean_value - res.corrupt_value))
    return cases


# ----------------------------------------------------------------------------- report
def summarize(cells: list[CellSweepCase], reversal: dict[str, float], spans: list[SpanCase]) -> dict[str, Any]:
    """The numbers of the docs/organisms.md validation table."""
    out: dict[str, Any] = {}
    if cells:
        out["grid_cell_sweep"] = {
            "n": len(cells),
            "top_is_target": float(np.mean([c.top_cell == c.target_cell for c in cells])),
            "restored": float(np.mean([c.restored for c in cells])),
            "mean_target_recovery": float(np.mean([c.target_recovery for c in cells])),
            "mean_second_best_recovery": float(np.mean([c.second_recovery if c.top_cell == c.target_cell else c.top_recovery for c in cells])),
            "median_abs_clean_minus_corrupt": float(np.median([abs(c.clean_diff - c.corrupt_diff) for c in cells])),
            "clean_yes_corrupt_no": float(np.mean([c.clean_diff > 0 > c.corrupt_diff for c in cells])),
        }
    if reversal:
        out["video_reversal"] = reversal
    if spans:
        layers = sorted(spans[0].recovery)
        summary = {}
        for layer in layers:
            inside = [r for c in spans for s, r in enumerate(c.recovery[layer]) if s in c.answer_slices]
            outside = [r for c in spans for s, r in enumerate(c.recovery[layer]) if s not in c.answer_slices]
            summary[layer] = {
                "top_slice_in_span": float(np.mean([c.top_in_span[layer] for c in spans])),
                "mean_recovery_in_span_slice": float(np.nanmean(inside)),
                "mean_recovery_outside_slice": float(np.nanmean(outside)) if outside else float("nan"),
                "span_recovery": float(np.nanmean([c.span_recovery[layer] for c in spans])),
            }
        out["video_span_patching"] = {"n": len(spans), "by_layer": summary,
                                      "median_abs_clean_minus_corrupt": float(np.median([abs(c.clean_minus_corrupt) for c in spans]))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="held-out cases per check")
    parser.add_argument("--seed", type=int, default=20_261_130)
    parser.add_argument("--out", default=None, help="write the summary and the raw cases as JSON")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    grid = load_organism("grid-qwen2.5-vl")
    cells = grid_cell_sweep(*grid, n=args.n, seed=args.seed)
    video = load_organism("video-qwen2-vl")
    reversal = video_reversal(*video, n=2 * args.n, seed=args.seed)
    spans = video_span_patching(*video, n=args.n, seed=args.seed)
    summary = summarize(cells, reversal, spans)
    print(json.dumps(summary, indent=2))
    if args.out:
        raw = {"summary": summary, "cells": [asdict(c) for c in cells], "spans": [asdict(s) for s in spans]}
        with open(args.out, "w") as fh:
            json.dump(raw, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
