"""The visual-search dataset: ``annotations.jsonl`` (one image per line, objects on a grid) and its generator.

One line: ``{"image": "images/img_00001.png", "grid": 10, "patch": 28, "objects": [{"shape": "circle",
"color": "green", "r": 3, "c": 7, "bbox": [x0, y0, x1, y1]}]}``, optionally with ``"id"`` and ``"query"``
(the target asked about in this image, e.g. ``"green circle"``; otherwise the command's ``--query``).
A target is present when some object has every word of the query among its attribute values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from analyses.pipelines.datasets import Field, Schema

__all__ = ["SCHEMA", "check_annotation", "matches", "target_objects", "make_dataset"]


def _positive(v: int) -> str | None:
    return None if v > 0 else "a positive integer"


def check_annotation(data: dict[str, Any]) -> None:
    """Cross-field checks of one line: every object a dict with r / c inside the grid and a bbox inside the image."""
    grid, patch = data["grid"], data["patch"]
    size = grid * patch
    for i, obj in enumerate(data["objects"]):
        if not isinstance(obj, dict):
            raise ValueError(f"field 'objects' item {i} is {obj!r}; expected an object with shape, color, r, c")
        what = " ".join(str(obj.get(k, "?")) for k in ("color", "shape"))
        for key in ("r", "c"):
            v = obj.get(key)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"object {i} ({what}) has {key}={v!r}; expected an integer cell index 0..{grid - 1}")
            if not 0 <= v < grid:
                raise ValueError(f"object {i} ({what}) at r={obj.get('r')}, c={obj.get('c')} lies outside the {grid}x{grid} "
                                 f"grid; fix r / c (0..{grid - 1}) or the line's 'grid'")
        box = obj.get("bbox")
        if box is not None:
            ok = isinstance(box, list) and len(box) == 4 and all(isinstance(b, (int, float)) for b in box)
            if not ok or not (0 <= box[0] < box[2] <= size and 0 <= box[1] < box[3] <= size):
                raise ValueError(f"object {i} ({what}) has bbox {box!r}; expected [x0, y0, x1, y1] with "
                                 f"0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size} (grid x patch pixels)")


SCHEMA = Schema(
    fields=(
        Field("id", str, required=False, help="case id (default: case-<line>)"),
        Field("image", str, path=True, help="image file, relative to the annotations file's folder"),
        Field("grid", int, check=_positive, help="cells per side"),
        Field("patch", int, check=_positive, help="pixels per cell side"),
        Field("objects", list, help="objects: shape, color, r, c, bbox"),
        Field("query", str, required=False, help="the target asked about (default: --query)"),
    ),
    id_field="id",
    validate=check_annotation,
)


def matches(obj: dict[str, Any], query: str) -> bool:
    """Whether ``obj`` has every word of ``query`` among its string attribute values (e.g. color, shape)."""
    values = {str(v).lower() for v in obj.values() if isinstance(v, str)}
    return all(word in values for word in query.lower().split())


def target_objects(objects: Sequence[dict[str, Any]], query: str) -> list[dict[str, Any]]:
    """The objects ``query`` names."""
    return [o for o in objects if matches(o, query)]


def make_dataset(folder: str | Path, n: int, seed: int = 0, grid: int = 10, patch: int = 28) -> Path:
    """Write ``n`` images and ``annotations.jsonl`` under ``folder``; return the annotations file.

    On the organism's own geometry (10 x 28 px) the images and queries are the ``grid-qwen2.5-vl`` organism's
    presence task (its generator, half the targets present, distractors often sharing colour or shape);
    other geometries draw the same kind of scene with :func:`hooked_vlm.organisms.drawing.draw_shape`.
    """
    if n < 1:
        raise ValueError(f"--make-data needs a positive number of images, got {n}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    scenes = _organism_scenes(n, seed) if (grid, patch) == (10, 28) else _drawn_scenes(n, seed, grid, patch)
    lines = []
    for i, (image, objects, query) in enumerate(scenes):
        name = f"images/img_{i:05d}.png"
        image.save(folder / name)
        objs = [{"shape": o["shape"], "color": o["color"], "r": o["row"], "c": o["col"],
                 "bbox": [o["col"] * patch, o["row"] * patch, (o["col"] + 1) * patch, (o["row"] + 1) * patch]} for o in objects]
        lines.append(json.dumps({"id": f"img_{i:05d}", "image": name, "grid": grid, "patch": patch, "objects": objs, "query": query}))
    path = folder / "annotations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _organism_scenes(n: int, seed: int) -> list[tuple[Image.Image, list[dict[str, Any]], str]]:
    from hooked_vlm.organisms import get_organism

    out = []
    for ex in get_organism("grid-qwen2.5-vl").generate_task("presence", n, seed):
        query = ex.prompt.removeprefix("is there a ").split(" ?")[0]  # "is there a green circle ? <image>"
        out.append((Image.fromarray(ex.image), ex.truth["objects"], query))
    return out


def _drawn_scenes(n: int, seed: int, grid: int, patch: int) -> list[tuple[Image.Image, list[dict[str, Any]], str]]:
    from PIL import ImageDraw

    from hooked_vlm.organisms.drawing import SHAPES, draw_shape
    from hooked_vlm.organisms.grid_qwen import COLORS

    rng = np.random.default_rng(seed)
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    margin = max(1, patch // 7)
    out = []
    for _ in range(n):
        target = kinds[int(rng.integers(len(kinds)))]
        present = bool(rng.integers(2))
        others = [k for k in kinds if k != target]
        chosen = ([target] if present else []) + [others[int(i)] for i in rng.integers(0, len(others), int(rng.integers(0 if present else 1, 4)))]
        cells = rng.choice(grid * grid, size=min(len(chosen), grid * grid), replace=False)
        image = Image.new("RGB", (grid * patch, grid * patch), (200, 200, 220))
        draw = ImageDraw.Draw(image)
        objects = []
        for (color, shape), cell in zip(chosen, cells):
            r, c = int(cell) // grid, int(cell) % grid
            draw_shape(draw, shape, COLORS[color], (c * patch + margin, r * patch + margin, (c + 1) * patch - margin - 1, (r + 1) * patch - margin - 1))
            objects.append({"color": color, "shape": shape, "row": r, "col": c})
        out.append((image, objects, f"{target[0]} {target[1]}"))
    return out
