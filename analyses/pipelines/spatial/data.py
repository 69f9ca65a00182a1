"""Spatial-relation datasets: the what's-up caption form, the QA form, relation parsing, and a generator.

* What's-up form (a JSON list): ``{"image_path": ..., "caption_options": [correct, wrong, ...]}``: the caption
  the model finds most likely given the image is its answer.
* QA form (JSONL or JSON): ``{"image_path": ..., "question": ..., "answer": ...}`` (``"options"``, default
  ``["yes", "no"]``): the option whose token the model ranks highest is its answer.

Optional fields: ``id``, ``relation`` (else parsed from the question / correct caption), ``objects`` (the two
named objects first, each with ``r`` / ``c`` on a ``grid`` of ``patch``-pixel cells: per-object attention and
patching groups), ``pair_id`` / ``set_id`` (pair and set accuracy), ``mirror_image_path`` (the counterfactual
image; default: the image flipped along the relation's axis).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from analyses.pipelines.datasets import Field, Schema

__all__ = ["SCHEMA", "RELATIONS", "OPPOSITE", "MIRROR_AXIS", "parse_relation", "check_case", "make_dataset", "mirror_image"]

#: relation name -> phrases that express it (longest first when parsing)
RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "left"), "right": ("to the right of", "right of", "right"),
    "above": ("above", "over"), "below": ("below", "under", "beneath"),
    "front": ("in front of",), "behind": ("behind",), "on": ("on top of", "on"),
}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
#: how mirroring an image swaps a relation: left / right by a horizontal flip, above / below by a vertical one
MIRROR_AXIS = {"left": "horizontal", "right": "horizontal", "above": "vertical", "below": "vertical"}


def parse_relation(text: str) -> tuple[str, str] | None:
    """``(relation, phrase)`` of the first relation phrase in ``text`` (longest phrase wins), or None."""
    best = None
    for relation, phrases in RELATIONS.items():
        for phrase in phrases:
            m = re.search(rf"\b{re.escape(phrase)}\b", text.lower())
            if m and (best is None or (m.start(), -len(phrase)) < (best[2], -len(best[1]))):
                best = (relation, phrase, m.start())
    return None if best is None else (best[0], best[1])


def check_case(data: dict[str, Any]) -> None:
    """Cross-field checks: one of the two forms, the answer among the options, objects inside the grid."""
    captions, question, answer = data.get("caption_options"), data.get("question"), data.get("answer")
    if captions is None and (question is None or answer is None):
        raise ValueError("a case needs 'caption_options' (what's-up form) or 'question' and 'answer' (QA form)")
    if captions is not None:
        if len(captions) < 2 or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"field 'caption_options' is {captions!r}; expected at least two non-empty captions, the correct one first")
    else:
        options = data.get("options") or ["yes", "no"]
        if answer not in options:
            raise ValueError(f"answer {answer!r} is not one of the options {options}; fix the answer or add an 'options' list")
    text = question if captions is None else captions[0]
    relation = data.get("relation")
    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"relation {relation!r} is unknown; expected one of {sorted(RELATIONS)} (or omit it to parse the text)")
    if relation is None and parse_relation(text) is None:
        raise ValueError(f"no relation word in {text!r}; add a 'relation' field (one of {sorted(RELATIONS)})")
    objects = data.get("objects")
    if objects is not None:
        grid = data.get("grid")
        if grid is None or data.get("patch") is None:
            raise ValueError("'objects' need the line's 'grid' (cells per side) and 'patch' (pixels per cell)")
        for i, obj in enumerate(objects):
            r, c = (obj.get("r"), obj.get("c")) if isinstance(obj, dict) else (None, None)
            if not (isinstance(r, int) and isinstance(c, int) and 0 <= r < grid and 0 <= c < grid):
                raise ValueError(f"object {i} {obj!r} lies outside the {grid}x{grid} grid; fix r / c (0..{grid - 1})")


def _positive(v: int) -> str | None:
    return None if v > 0 else "a positive integer"


SCHEMA = Schema(
    fields=(
        Field("id", (str, int), required=False),
        Field("image_path", str, path=True, help="image file, relative to the dataset's folder"),
        Field("caption_options", list, required=False, help="what's-up form: captions, the correct one first"),
        Field("question", str, required=False, help="QA form: the question"),
        Field("answer", str, required=False, help="QA form: the correct option"),
        Field("options", list, required=False, help="QA form: answer options (single tokens; default yes / no)"),
        Field("relation", str, required=False),
        Field("objects", list, required=False, help="the two named objects first: r, c on the grid"),
        Field("grid", int, required=False, check=_positive),
        Field("patch", int, required=False, check=_positive),
        Field("pair_id", (str, int), required=False),
        Field("set_id", (str, int), required=False),
        Field("mirror_image_path", str, required=False, path=True, help="counterfactual (mirrored) image"),
    ),
    id_field="id",
    validate=check_case,
)


def mirror_image(image: Image.Image, relation: str) -> Image.Image:
    """The image flipped along ``relation``'s axis (left <-> right: horizontally; above <-> below: vertically)."""
    axis = MIRROR_AXIS.get(relation)
    if axis is None:
        raise ValueError(f"relation {relation!r} has no mirror counterfactual (only {sorted(MIRROR_AXIS)}); give the case a "
                         "'mirror_image_path' or leave it out of patching")
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT if axis == "horizontal" else Image.Transpose.FLIP_TOP_BOTTOM)


def make_dataset(folder: str | Path, n: int, seed: int = 0, form: str = "qa") -> Path:
    """``n`` images (``ceil(n / 2)`` mirrored pairs) from the grid organism's relation task, in the QA form
    (``annotations.jsonl``) or the what's-up caption form (``captions.json``); return the dataset file.

    A pair is an image and its mirror drawn again with the objects at mirrored cells (the organism's cell
    tints stay in place); the mirror's answer is flipped. Each case names its partner as ``mirror_image_path``.
    """
    from hooked_vlm.organisms import get_organism
    from hooked_vlm.organisms.grid_qwen import GRID, render

    if n < 1:
        raise ValueError(f"--make-data needs a positive number of images, got {n}")
    if form not in ("qa", "captions"):
        raise ValueError(f"form must be 'qa' or 'captions', got {form!r}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, ex in enumerate(get_organism("grid-qwen2.5-vl").generate_task("relation", (n + 1) // 2, seed)):
        question = ex.prompt.replace(" <image>", "")
        relation, _ = parse_relation(question)
        axis = "col" if MIRROR_AXIS[relation] == "horizontal" else "row"
        mirrored = [dict(o, **{axis: GRID - 1 - o[axis]}) for o in ex.truth["objects"]]
        named = [tuple(c) for c in ex.truth["target_cells"]]
        names = [f"images/rel_{i:05d}_a.png", f"images/rel_{i:05d}_b.png"]
        Image.fromarray(ex.image).save(folder / names[0])
        Image.fromarray(render(mirrored)).save(folder / names[1])
        for k, (objs, answer) in enumerate(((ex.truth["objects"], ex.answer), (mirrored, "no" if ex.answer == "yes" else "yes"))):
            by_cell = {(o["row"], o["col"]): o for o in ex.truth["objects"]}
            first = [by_cell[c] for c in named]
            if k == 1:
                first = [dict(o, **{axis: GRID - 1 - o[axis]}) for o in first]
            obj_list = [{"color": o["color"], "shape": o["shape"], "r": o["row"], "c": o["col"]} for o in first]
            rec: dict[str, Any] = {"id": f"rel_{i:05d}_{'ab'[k]}", "image_path": names[k], "relation": relation,
                                   "objects": obj_list, "grid": GRID, "patch": 28, "pair_id": f"rel_{i:05d}",
                                   "mirror_image_path": names[1 - k]}
            if form == "qa":
                rec.update(question=question, answer=answer)
            else:
                holds = answer == "yes"
                phrase = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
                a, b = (f"the {o['color']} {o['shape']}" for o in first)
                said, other = (relation, OPPOSITE[relation]) if holds else (OPPOSITE[relation], relation)
                rec.update(caption_options=[f"{a} is {phrase[said]} {b}", f"{a} is {phrase[other]} {b}"], relation=said)
            records.append(rec)
    records = records[:n]
    if form == "qa":
        path = folder / "annotations.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path = folder / "captions.json"
        path.write_text(json.dumps(records, indent=1))
    return path


def object_cells(data: dict[str, Any]) -> list[tuple[int, int]]:
    """(row, col) of the case's named objects (the first two of ``objects``), if any."""
    return [(int(o["r"]), int(o["c"])) for o in (data.get("objects") or [])[:2]]


def grid_mask(cells: list[tuple[int, int]], grid: int) -> np.ndarray:
    """``[grid, grid]`` bool mask of ``cells``."""
    mask = np.zeros((grid, grid), bool)
    for r, c in cells:
        mask[r, c] = True
    return mask
