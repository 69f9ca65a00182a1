"""One visual-search case: the presence answer under every prompt template (stage 2) and the answer token's
attention to the image per layer and head on the dataset's grid (stage 3, cached as ``attn_cache/<case>.npz``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from analyses.pipelines.datasets import Case
from analyses.pipelines.runner import CaseContext
from analyses.pipelines.visual_search.data import target_objects
from analyses.pipelines.vlm_cases import answer_ids, cache_path, image_attention_grid, load_image, prompt_inputs, save_npz

__all__ = ["run_case", "outcome_of", "ATTN_CACHE"]

ATTN_CACHE = "attn_cache"


def outcome_of(present: bool, said_yes: bool) -> str:
    """TP / FP / FN / TN of one presence answer."""
    return ("TP" if said_yes else "FN") if present else ("FP" if said_yes else "TN")


def _query(case: Case, options: dict[str, Any]) -> str:
    query = case.data.get("query") or options.get("query")
    if not query:
        raise ValueError("this case names no target: add a 'query' field to its line (e.g. \"green circle\") or pass --query")
    return str(query)


def run_case(loaded: Any, case: Case, ctx: CaseContext) -> dict[str, Any]:
    """Answers for every template, the outcome of the first, and the first template's attention grid cache."""
    opts = dict(ctx.options)
    grid, patch = int(case.data["grid"]), int(case.data["patch"])
    image = load_image(case.path("image"))
    if image.size != (grid * patch, grid * patch):
        raise ValueError(f"image {case.data['image']} is {image.size[0]}x{image.size[1]} px but grid {grid} x patch {patch} "
                         f"= {grid * patch}x{grid * patch}; fix the line's grid / patch or the image size")
    query = _query(case, opts)
    targets = target_objects(case.data["objects"], query)
    present = bool(targets)
    yes_id, no_id = answer_ids(loaded.tokenizer, opts["answers"])
    model = loaded.model
    answers, p_yes, diffs = [], [], []
    first_inputs = None
    for template in opts["templates"]:
        inputs = prompt_inputs(loaded, template.format(query=query), [image], ctx.device)
        with torch.no_grad():
            last = model(**inputs)[0, -1].float()
        diff = float(last[yes_id] - last[no_id])
        answers.append("yes" if diff > 0 else "no")
        p_yes.append(float(torch.sigmoid(torch.tensor(diff))))  # P(yes) among {yes, no}
        diffs.append(diff)
        first_inputs = first_inputs or inputs
    values, _, pooling = image_attention_grid(model, first_inputs, "last", (grid, grid))
    attn = values[:, :, 0].numpy().astype(np.float32)  # layers heads rows cols
    target = np.zeros((grid, grid), bool)
    for o in targets:
        target[o["r"], o["c"]] = True
    path = save_npz(cache_path(ctx.output_dir, ATTN_CACHE, case.id), attention=attn, target=target)
    said_yes = answers[0] == "yes"
    return {
        "query": query, "present": present, "answer": answers[0], "p_yes": p_yes[0], "logit_diff": diffs[0],
        "outcome": outcome_of(present, said_yes), "correct": said_yes == present,
        "template_answers": answers, "template_p_yes": p_yes, "n_objects": len(case.data["objects"]),
        "target_cells": [[o["r"], o["c"]] for o in targets], "grid": grid, "pooling": pooling,
        "image_share": attn.sum((-2, -1)).mean(-1).tolist(),  # per layer, mean over heads
        "image_path": str(case.path("image")), "attn_cache": str(path.relative_to(ctx.output_dir)),
    }
