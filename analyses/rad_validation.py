"""Method validation on the radiograph organisms: do attention and gradient saliency find the planted boxes?

For held-out examples of ``rad-llava`` / ``rad-gemma3`` (hooked models loaded from the shipped checkpoints),
two maps over the image are scored against a planted pixel box (the finding's, or the corner marker's):

* **attention**: the answer position's post-softmax attention to the image tokens (``blocks.{i}.attn.hook_pattern``,
  mean over heads and layers), renormalised over the image tokens; each token's share is spread over its pixel
  cell (``layout.pixel_box``).
* **saliency**: ``|d (logit yes - logit no) / d pixel_values|`` summed over channels.

The score is the *box ratio*: the map's mass inside the box divided by the box's area share of the image.
A map that ignores the box scores about 1; a map concentrated on it scores up to ``1 / area share``.

``python -m analyses.rad_validation [-n N]`` prints the table that docs/organisms_rad_clip.md reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["BoxScores", "attention_maps", "saliency_maps", "box_ratio", "score_examples", "validate", "main"]

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) exclusive, as the generator records them


@dataclass
class BoxScores:
    """Box ratios of one method on a set of examples."""

    method: str
    target: str
    ratios: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.ratios))

    @property
    def frac_above_one(self) -> float:
        return float(np.mean(np.asarray(self.ratios) > 1.0))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target": self.target, "n": len(self.ratios), "mean_ratio": self.mean,
                "median_ratio": float(np.median(self.ratios)), "frac_above_1": self.frac_above_one}


def box_ratio(pixel_map: Float[Tensor, "h w"], box: Box) -> float:
    """Mass of a non-negative map inside ``box`` divided by the box's area share (1 = no preference)."""
    x0, y0, x1, y1 = box
    h, w = pixel_map.shape
    total = float(pixel_map.sum())
    if total <= 0:
        raise ValueError("the map has no mass; a box ratio needs a non-negative map with a positive sum")
    inside = float(pixel_map[y0:y1, x0:x1].sum()) / total
    return inside / ((x1 - x0) * (y1 - y0) / (h * w))


def attention_maps(model: Any, inputs: dict[str, Tensor], image_size: int) -> Float[Tensor, "batch h w"]:
    """Per example, the last position's attention to the image tokens (mean over layers and heads, renormalised
    over the image tokens) painted onto the pixels each token covers (each token's share spread evenly)."""
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(len(model.blocks))]
    with torch.no_grad():
        _, cache = model.run_with_cache(names_filter=lambda n: n in names, **inputs)
    pattern = torch.stack([cache[n][:, :, -1, :] for n in names]).mean(dim=(0, 2))  # batch, keys
    layout = model.layout(**inputs)
    b = pattern.shape[0]
    maps = torch.zeros(b, image_size, image_size)
    for i in range(b):
        positions = layout.positions(image=i).tolist()
        share = pattern[i, positions] / pattern[i, positions].sum()
        for pos, s in zip(positions, share.tolist()):
            y0, x0, y1, x1 = layout.pixel_box(i, pos)
            maps[i, y0:y1, x0:x1] = s / ((y1 - y0) * (x1 - x0))
    return maps


def saliency_maps(model: Any, inputs: dict[str, Tensor], yes_id: int, no_id: int) -> Float[Tensor, "batch h w"]:
    """``|d (logit yes - logit no) / d pixels|`` at the last position, summed over channels."""
    from analyses.attribution import pixel_key

    key = pixel_key(inputs, model=model)  # the model's one image input, from its input schema
    pixels = inputs[key].clone().requires_grad_(True)
    logits = model(**{**inputs, key: pixels})
    diff = logits[:, -1, yes_id] - logits[:, -1, no_id]
    (grad,) = torch.autograd.grad(diff.sum(), pixels)
    return grad.abs().sum(1).detach()


def score_examples(organism: Any, model: Any, tokenizer: Any, examples: list[Any], box_key: str) -> dict[str, BoxScores]:
    """Box ratios of attention and saliency for ``examples`` against ``example.truth[box_key]``."""
    from hooked_vlm.organisms.radiograph import SIZE

    yes_id, no_id = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    out = {m: BoxScores(m, box_key, []) for m in ("attention", "saliency")}
    for start in range(0, len(examples), 16):
        chunk = examples[start:start + 16]
        inputs = organism.prompt_inputs(chunk, tokenizer)
        maps = {"attention": attention_maps(model, inputs, SIZE), "saliency": saliency_maps(model, inputs, yes_id, no_id)}
        for method, m in maps.items():
            out[method].ratios.extend(box_ratio(m[i], tuple(e.truth[box_key])) for i, e in enumerate(chunk))
    return out


def marked_examples(organism: Any, n: int, seed: int) -> list[Any]:
    """``n`` held-out examples that carry the corner marker (policy "random", those with a marker kept)."""
    out: list[Any] = []
    k = 0
    while len(out) < n:
        out.extend(e for e in organism.generate(2 * n, seed + 17 * k, marker_policy="random") if e.truth["marker_box"])
        k += 1
    return out[:n]


def validate(name: str, n: int = 48, seed: int = 5_000_011) -> dict[str, Any]:
    """Finding-box and marker-box ratios of both methods for organism ``name`` (shipped checkpoint)."""
    from hooked_vlm import HookedVLM
    from hooked_vlm.organisms import checkpoint_dir, get_organism

    organism = get_organism(name)
    folder = checkpoint_dir(name)
    model = HookedVLM.from_pretrained(folder, dtype=torch.float32).eval()
    _, tokenizer = organism.load(folder)
    positives = [e for t in organism.tasks for e in organism.generate_task(t, n // len(organism.tasks), seed) if e.answer == "yes"]
    findings = score_examples(organism, model, tokenizer, positives, "finding_box")
    markers = score_examples(organism, model, tokenizer, marked_examples(organism, n, seed + 1), "marker_box")
    return {"organism": name, "finding": {k: v.to_dict() for k, v in findings.items()},
            "marker": {k: v.to_dict() for k, v in markers.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=48, help="examples per measurement (default: %(default)s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = [validate(name, args.n) for name in ("rad-llava", "rad-gemma3")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| organism | box | method | n | mean ratio | median ratio | share of cases > 1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for target in ("finding", "marker"):
            for method, s in r[target].items():
                print(f"| {r['organism']} | {target} | {method} | {s['n']} | {s['mean_ratio']:.2f} | {s['median_ratio']:.2f} | {s['frac_above_1']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
