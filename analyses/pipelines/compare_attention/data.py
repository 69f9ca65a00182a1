"""The compare-attention CSV: its schema, the checks the runner cannot make per row, and a generated dataset."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.pipelines import Field, Schema, atomic_output

__all__ = ["SCHEMA", "VARIANTS", "parse_box", "make_data", "study_problems"]

VARIANTS = 6  # paraphrases per study, variant_id 0..5


def _box_check(value: str) -> str | None:
    if value == "":
        return None
    try:
        parse_box(value)
    except ValueError:
        return "a box 'x0 y0 x1 y1' (four integers, x1 > x0, y1 > y0) or empty"
    return None


def parse_box(value: Any) -> tuple[int, int, int, int] | None:
    """``"x0 y0 x1 y1"`` (pixels of the image as stored, end exclusive) -> a tuple; empty / None -> None."""
    if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
        return None
    parts = [int(p) for p in str(value).replace(",", " ").split()]
    if len(parts) != 4 or parts[2] <= parts[0] or parts[3] <= parts[1]:
        raise ValueError(f"bad box {value!r}")
    return tuple(parts)  # type: ignore[return-value]


SCHEMA = Schema(
    fields=(
        Field("study_id", str, help="one study (image); its paraphrases share it"),
        Field("image_path", str, path=True, help="the image, relative to the CSV's folder"),
        Field("finding", str, help="the finding the question asks about"),
        Field("variant_id", int, check=lambda v: None if 0 <= v < VARIANTS else f"a paraphrase number 0-{VARIANTS - 1}"),
        Field("question", str, check=lambda v: None if v.strip() else "a non-empty question"),
        Field("answer_gt", str, choices=("yes", "no")),
        Field("finding_box", str, required=False, default="", check=_box_check, help="x0 y0 x1 y1 of the finding, if any"),
        Field("marker_box", str, required=False, default="", check=_box_check, help="x0 y0 x1 y1 of a corner marker, if any"),
    ),
    id_field=None,  # case ids are the CSV rows (case-1, case-2, ...)
)


def study_problems(csv_path: str | Path) -> list[dict[str, Any]]:
    """Studies the per-row checks cannot see: no valid variant at all, or one variant_id given twice."""
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if "study_id" not in frame.columns:
        return []
    problems = []
    for study, sub in frame.groupby("study_id", sort=True):
        variants = pd.to_numeric(sub.get("variant_id", pd.Series(dtype=str)), errors="coerce")
        valid = variants[(variants >= 0) & (variants < VARIANTS)]
        if valid.empty:
            problems.append({"study_id": study, "problem": f"study {study!r} has no variant with variant_id 0-{VARIANTS - 1}; "
                             "give each study its paraphrase rows (variant_id 0-5)"})
        elif valid.duplicated().any():
            dup = sorted(set(valid[valid.duplicated()].astype(int)))
            problems.append({"study_id": study, "problem": f"study {study!r} repeats variant_id {dup}; each paraphrase once"})
    return problems


def make_data(folder: str | Path, studies: int = 8, seed: int = 0, marker_policy: str = "random") -> Path:
    """``studies`` radiographs of the organisms' generator, six paraphrases each, as ``data.csv`` + PNGs in ``folder``.

    The marker is drawn by ``marker_policy`` (``random``: on half the studies, independent of the answer), and its
    box and the finding's box are written to the CSV, so the shortcut can be measured.
    """
    from hooked_vlm.organisms.radiograph import PARAPHRASES, make_sample

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(studies):
        sample = make_sample((seed, i), marker_policy)
        name = f"images/study_{i:03d}.png"
        with atomic_output(folder / name) as tmp:
            sample.image.save(tmp, format="PNG")
        box = " ".join(map(str, sample.finding_box)) if sample.finding_box and sample.finding == sample.asked else ""
        marker = " ".join(map(str, sample.marker_box)) if sample.marker_box else ""
        for v, question in enumerate(PARAPHRASES[sample.asked]):
            rows.append({"study_id": f"study_{i:03d}", "image_path": name, "finding": sample.asked, "variant_id": v,
                         "question": question, "answer_gt": sample.answer, "finding_box": box, "marker_box": marker})
    path = folder / "data.csv"
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
