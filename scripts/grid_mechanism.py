"""What the grid organism computes, read off its activations: the binding heads, the object roles, the answer position.

    python scripts/grid_mechanism.py [--model DIR] [--n 200] [--out mechanism.json]

Three measurements on freshly generated held-out examples of ``grid-qwen2.5-vl`` (docs/organisms.md, session i11u):

1. **Binding heads** (presence prompts): every LM head's attention from each object's cell token to the
   question's colour word and to its shape word, split by whether the object has that colour / shape. A head
   that binds a feature puts its mass on the word exactly when the feature matches.
2. **Object roles** (relation prompts): a logistic probe on the residual stream at the two named objects' cells,
   "first-named (A) or second-named (B)?", per layer, out of fold, grouped by image.
3. **The answer position** (relation prompts, the last prompt token): per layer, probes for what a relation
   answer needs (the relation word, both objects' rows and columns, the sign of their difference) and for the
   answer itself. A relation model that works must carry these where the answer is read.
4. **Relation accuracy by case**: the model's yes / no against the truth, split by the two objects' distance along
   the asked axis, the relation word, the answer and the number of objects (where a coarse comparison fails).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analyses.organism_validation import load_organism
from analyses.probes import cross_val_proba, grouped_splits
from hooked_vlm.organisms.grid_qwen import GRID, relation_distance, relation_word


def _first_image_token(input_ids: torch.Tensor, image_token_id: int) -> int:
    return int((input_ids == image_token_id).nonzero()[0])


def _oof_accuracy(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Out-of-fold accuracy of a standardised logistic probe, folds grouped by image."""
    proba = cross_val_proba(X, y, grouped_splits(groups, 5), kind="logistic", max_iter=2000)
    return float((np.unique(y)[proba.argmax(1)] == y).mean())


@torch.no_grad()
def binding_heads(organism: Any, model: Any, tokenizer: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """Per (layer, head): mean attention from object cells to the colour / shape word, matching vs not."""
    layers = model.cfg.n_layers
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(layers)]
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sums: dict[tuple[int, int, str, bool], list[float]] = {}
    for ex in organism.generate_task("presence", n, seed):
        colour_word, shape_word = ex.prompt.split()[3:5]
        inputs = organism.prompt_inputs([ex], tokenizer)
        _, cache = model.run_with_cache(**inputs, names_filter=lambda name: name in names)
        tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
        pos = {"colour": tokens.index(colour_word), "shape": tokens.index(shape_word)}
        first = _first_image_token(inputs["input_ids"][0], image_id)
        for obj in ex.truth["objects"]:
            q = first + GRID * obj["row"] + obj["col"]
            match = {"colour": obj["color"] == colour_word, "shape": obj["shape"] == shape_word}
            for layer, name in enumerate(names):
                pattern = cache[name][0, :, q]
                for head in range(pattern.shape[0]):
                    for feature in ("colour", "shape"):
                        sums.setdefault((layer, head, feature, match[feature]), []).append(float(pattern[head, pos[feature]]))
    rows = []
    for layer in range(layers):
        for head in range(model.cfg.n_heads):
            row: dict[str, Any] = {"layer": layer, "head": head}
            for feature in ("colour", "shape"):
                row[f"{feature}_match"] = float(np.mean(sums[(layer, head, feature, True)]))
                row[f"{feature}_other"] = float(np.mean(sums[(layer, head, feature, False)]))
            rows.append(row)
    return rows


@torch.no_grad()
def _relation_states(organism: Any, model: Any, tokenizer: Any, n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[Any]]:
    """Residual stream per layer at the named cells (A then B of each example) and at the answer position."""
    layers = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(layers)] + [f"blocks.{layers - 1}.hook_resid_post"]
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    examples = organism.generate_task("relation", n, seed)
    cells: dict[str, list[np.ndarray]] = {name: [] for name in names}
    answer: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for i in range(0, n, 25):
        batch = examples[i:i + 25]
        inputs = organism.prompt_inputs(batch, tokenizer)  # left-padded: position -1 predicts the answer
        _, cache = model.run_with_cache(**inputs, names_filter=lambda name: name in names)
        for b, ex in enumerate(batch):
            first = _first_image_token(inputs["input_ids"][b], image_id)
            for name in names:
                for r, c in ex.truth["target_cells"]:
                    cells[name].append(cache[name][b, first + GRID * r + c].float().numpy())
                answer[name].append(cache[name][b, -1].float().numpy())
    return ({k: np.stack(v) for k, v in cells.items()}, {k: np.stack(v) for k, v in answer.items()}, examples)


def relation_probes(organism: Any, model: Any, tokenizer: Any, n: int, seed: int) -> dict[str, Any]:
    """Probe accuracies per layer: A-vs-B at the named cells; relation word, coordinates, answer at the answer position."""
    cells, answer, examples = _relation_states(organism, model, tokenizer, n, seed)
    ab = np.tile([0, 1], n)
    ab_groups = np.repeat(np.arange(n), 2)
    groups = np.arange(n)
    a_cells, b_cells = (np.array(cells_of) for cells_of in zip(*[ex.truth["target_cells"] for ex in examples]))
    labels = {
        "relation word": np.array([relation_word(ex) for ex in examples]),
        "A row": a_cells[:, 0], "A column": a_cells[:, 1], "B row": b_cells[:, 0], "B column": b_cells[:, 1],
        "sign(A column - B column)": np.sign(a_cells[:, 1] - b_cells[:, 1]),
        "sign(A row - B row)": np.sign(a_cells[:, 0] - b_cells[:, 0]),
        "answer": np.array([ex.answer for ex in examples]),
    }
    out: dict[str, Any] = {"named cells: A or B": {}, "answer position": {k: {} for k in labels}}
    for name in cells:
        out["named cells: A or B"][name] = _oof_accuracy(cells[name], ab, ab_groups)
        for key, y in labels.items():
            out["answer position"][key][name] = _oof_accuracy(answer[name], y, groups)
    out["chance"] = {key: float(max(np.mean(y == v) for v in np.unique(y))) for key, y in labels.items()}
    return out


def relation_accuracy_by_case(organism: Any, model: Any, tokenizer: Any, n: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy of the yes / no answer on ``n`` relation prompts, per distance along the asked axis (5 = 5 or more),
    relation word, answer and object count: ``{split: {value: {"n", "accuracy"}}}``."""
    yes, no = (tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    examples = organism.generate_task("relation", n, seed)
    splits: dict[str, dict[str, list[bool]]] = {"distance": {}, "relation": {}, "answer": {}, "objects": {}}
    for i in range(0, n, 25):
        batch = examples[i:i + 25]
        with torch.no_grad():
            last = model(**organism.prompt_inputs(batch, tokenizer))[:, -1]  # left-padded: -1 predicts the answer
        said = np.where((last[:, yes] > last[:, no]).numpy(), "yes", "no")
        for ex, answer in zip(batch, said):
            keys = {"distance": str(min(relation_distance(ex), 5)), "relation": relation_word(ex), "answer": ex.answer,
                    "objects": str(len(ex.truth["objects"]))}
            for split, key in keys.items():
                splits[split].setdefault(key, []).append(answer == ex.answer)
    return {split: {key: {"n": len(hits), "accuracy": float(np.mean(hits))} for key, hits in sorted(per.items())}
            for split, per in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="grid-qwen2.5-vl", help="organism name or checkpoint folder")
    parser.add_argument("--n", type=int, default=200, help="held-out examples per measurement")
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if Path(args.model).is_dir():  # a checkpoint folder of the grid organism (e.g. from `organisms train --out`)
        from hooked_vlm import HookedVLM
        from hooked_vlm.organisms import get_organism

        model = HookedVLM.from_pretrained(args.model)
        organism, tokenizer = get_organism("grid-qwen2.5-vl"), model.tokenizer
    else:
        organism, model, tokenizer = load_organism(args.model)
    heads = binding_heads(organism, model, tokenizer, args.n // 4, args.seed)
    print("binding heads: mean attention from an object's cell to the question's word (match / no match)")
    print("| layer | head | colour word: match | other | shape word: match | other |")
    print("|---|---|---|---|---|---|")
    for h in heads:
        print(f"| {h['layer']} | {h['head']} | {h['colour_match']:.3f} | {h['colour_other']:.3f} | "
              f"{h['shape_match']:.3f} | {h['shape_other']:.3f} |")
    probes = relation_probes(organism, model, tokenizer, args.n, args.seed + 1)
    names = list(probes["named cells: A or B"])
    print("\nrelation prompts: out-of-fold logistic-probe accuracy per residual stream (grouped by image)")
    print("| what | where | chance | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    ab = probes["named cells: A or B"]
    print("| A or B | named cells | 0.50 | " + " | ".join(f"{ab[k]:.2f}" for k in names) + " |")
    for key, per_layer in probes["answer position"].items():
        print(f"| {key} | answer position | {probes['chance'][key]:.2f} | " + " | ".join(f"{per_layer[k]:.2f}" for k in names) + " |")
    cases = relation_accuracy_by_case(organism, model, tokenizer, args.n, args.seed + 2)
    print("\nrelation answers: accuracy by case (distance = cells apart along the asked axis, 5 = 5 or more)")
    for split, per in cases.items():
        print(f"{split}: " + ", ".join(f"{key} {v['accuracy']:.2f} (n={v['n']})" for key, v in per.items()))
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "n": args.n, "seed": args.seed, "binding_heads": heads,
                                        "relation_probes": probes, "relation_accuracy_by_case": cases}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
