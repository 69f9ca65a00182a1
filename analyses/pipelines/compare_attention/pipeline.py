"""The per-row case of compare-attention on the shared runner (one run per model) and its metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from analyses.map_metrics import entropy, gini
from analyses.pipelines import Case, CaseContext, Pipeline, load_hooked_model
from analyses.pipelines.cir.images import read_image
from analyses.pipelines.compare_attention.data import SCHEMA, parse_box
from analyses.pipelines.compare_attention.maps import METHODS, answer_ids, row_maps
from analyses.rad_validation import box_ratio

__all__ = ["COMPARE", "ANALYSIS_GRID", "run_row", "map_metrics"]

#: maps are stored pooled to this many cells per side (mass kept) for the divergences and figures
ANALYSIS_GRID = 28


def map_metrics(pixels: torch.Tensor | None, finding: tuple | None, marker: tuple | None) -> dict[str, float]:
    """Normalised entropy, Gini, and mass / area-ratio in the finding and marker boxes (NaN when absent)."""
    nan = float("nan")
    if pixels is None:
        return {k: nan for k in ("entropy", "gini", "finding_mass", "finding_ratio", "marker_mass", "marker_ratio")}
    out = {"entropy": float(entropy(pixels, ndim=2, normalized=True)), "gini": float(gini(pixels, ndim=2))}
    for key, box in (("finding", finding), ("marker", marker)):
        if box is None:
            out[f"{key}_mass"] = out[f"{key}_ratio"] = nan
            continue
        x0, y0, x1, y1 = box
        out[f"{key}_mass"] = float(pixels[y0:y1, x0:x1].sum() / pixels.sum())
        out[f"{key}_ratio"] = box_ratio(pixels, box)
    return out


def run_row(loaded: Any, case: Case, ctx: CaseContext) -> dict[str, Any]:
    """Answer, probability, correctness, per-layer image attention, and three maps with their metrics."""
    from analyses.attention_maps import pool_grid

    opts = ctx.options
    key = "answer_ids"
    if key not in loaded.__dict__.setdefault("_compare_cache", {}):
        loaded._compare_cache[key] = answer_ids(loaded.tokenizer, tuple(opts["answer_words"]), loaded.name)
    yes_no = loaded._compare_cache[key]
    image = read_image(case.path("image_path"))
    prompt = opts["prompt_template"].format(question=case.data["question"])
    r = row_maps(loaded, image, prompt, yes_no, ctx.device, opts["head_fusion"], tuple(opts["methods"]))
    finding, marker = parse_box(case.data.get("finding_box")), parse_box(case.data.get("marker_box"))
    record: dict[str, Any] = {
        "study_id": case.data["study_id"], "variant_id": case.data["variant_id"], "finding": case.data["finding"],
        "answer_gt": case.data["answer_gt"], "answer": r.answer, "prob": r.prob, "p_yes": r.p_yes,
        "correct": r.answer == case.data["answer_gt"], "has_marker": marker is not None, "has_finding_box": finding is not None,
        "answer_image_mass": r.answer_image_mass, "question_image_mass": r.question_image_mass, "layers_used": r.layers_used,
        "height": image.shape[0], "width": image.shape[1], "image_file": str(case.path("image_path")),
        "finding_box": case.data.get("finding_box") or "", "marker_box": case.data.get("marker_box") or "",
    }
    for method in opts["methods"]:
        pixels = r.maps.get(method)
        for name, value in map_metrics(pixels, finding, marker).items():
            record[f"{method}_{name}"] = value
        record[f"{method}_empty"] = pixels is None
        grid = pool_grid(pixels, ANALYSIS_GRID, mode="mass") if pixels is not None else torch.zeros(ANALYSIS_GRID, ANALYSIS_GRID)
        record[f"{method}_map"] = grid.reshape(-1).double().numpy().astype(np.float64)
    return record


def load_compare_model(spec: Any) -> Any:
    """The hooked model, tokenizer and processor by organism / tiny name or checkpoint folder, in eval mode."""
    loaded = load_hooked_model(spec)
    loaded.model.eval()
    return loaded


COMPARE = Pipeline(name="compare-attention", schema=SCHEMA, run_case=run_row, load_model=load_compare_model, version="1")
