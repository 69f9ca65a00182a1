"""Planted-truth check of the CIR explanations on the ``shapes-clip`` organism (the table in docs/cir.md).

Every one of the 100 colour x shape x place combinations is a reference, with one other colour as the caption
("is NEW"); the database is the organism's held-out one (one image per combination). Per method it reports the
*shape ratio* (a map's mass on the shape's pixels divided by their area share; 1 = no preference) of the
reference map (explanation 1) and of the top result's candidate map (explanation 3), overall and when the top
result is the right image, and how many maps are empty (ReLU left nothing positive), per explanation.

``python -m analyses.pipelines.cir.validate [--json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

__all__ = ["shape_ratio", "validate", "main"]


def shape_ratio(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of a non-negative map inside ``mask`` divided by the mask's area share (1 = no preference)."""
    return float(saliency[mask].sum() / saliency.sum()) / float(mask.mean())


def _summary(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)), "share_above_1": float((v > 1).mean()), "min": float(v.min())}


def validate(seed: int = 123) -> dict[str, Any]:
    """Shape ratios and empty-map counts of both methods over the 100 composed queries (see the module docstring)."""
    from analyses.pipelines import ModelSpec
    from analyses.pipelines.cir.explain import METHODS, composed_embedding, explain_query, upsample
    from analyses.pipelines.cir.model import load_cir_model
    from analyses.pipelines.cir.phi import compose_text, load_phi_checkpoint
    from hooked_vlm.organisms import checkpoint_dir, get_organism
    from hooked_vlm.organisms.shapes_clip import BACKGROUND, COLORS, render

    loaded = load_cir_model(ModelSpec("shapes-clip"))
    phi = load_phi_checkpoint(checkpoint_dir("shapes-clip"))
    combos, images = get_organism("shapes-clip").database()
    with torch.no_grad():
        db = torch.nn.functional.normalize(torch.cat([loaded.model.encode_image(loaded.prep(im)) for im in images]), dim=-1)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {m: {"reference": [], "top_candidate": [], "right_top_candidate": [],
                               "empty": {"reference": 0, "candidate": 0, "candidate_reference": 0}} for m in METHODS}
    hits = 0
    for i, (color, shape, place) in enumerate(combos):
        new = [c for c in COLORS if c != color][i % 4]
        ref = render(color, shape, place, rng)
        composed = compose_text(loaded.tokenizer, f"is {new}", "<$>", loaded.model.text.spec.max_positions)
        q = torch.nn.functional.normalize(composed_embedding(loaded.model, phi, loaded.prep(ref), composed), dim=-1)
        top = int((db @ q[0]).argmax())
        right = combos[top] == (new, shape, place)
        hits += right
        expl = explain_query(loaded.model, phi, loaded.prep(ref), composed, [loaded.prep(images[top])])
        for m in METHODS:
            maps = {"reference": expl.reference[m], "candidate": expl.candidates[0][m], "candidate_reference": expl.candidate_reference[0][m]}
            for name, grid in maps.items():
                out[m]["empty"][name] += int(float(grid.max()) == 0)
            if float(maps["reference"].max()) > 0:
                mask = np.any(np.abs(ref.astype(int) - np.array(BACKGROUND)) > 30, axis=-1)
                out[m]["reference"].append(shape_ratio(upsample(maps["reference"], ref.shape[:2]).numpy(), mask))
            if float(maps["candidate"].max()) > 0:
                cand = images[top]
                mask = np.any(np.abs(cand.astype(int) - np.array(BACKGROUND)) > 30, axis=-1)
                r = shape_ratio(upsample(maps["candidate"], cand.shape[:2]).numpy(), mask)
                out[m]["top_candidate"].append(r)
                if right:
                    out[m]["right_top_candidate"].append(r)
    result: dict[str, Any] = {"queries": len(combos), "top1_right": hits}
    for m in METHODS:
        result[m] = {k: _summary(v) for k, v in out[m].items() if k != "empty"}
        result[m]["empty_maps"] = out[m]["empty"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    r = validate()
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"queries {r['queries']}, top-1 right {r['top1_right']}")
    print("| method | map | n scored | mean ratio | median | share > 1 |")
    print("|---|---|---|---|---|---|")
    for m in ("eclip", "gradxact"):
        for k in ("reference", "top_candidate", "right_top_candidate"):
            s = r[m][k]
            if s["n"]:
                print(f"| {m} | {k} | {s['n']} | {s['mean']:.2f} | {s['median']:.2f} | {s['share_above_1']:.2f} |")
        print(f"| {m} | empty maps (of {r['queries']}) | {r[m]['empty_maps']} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
