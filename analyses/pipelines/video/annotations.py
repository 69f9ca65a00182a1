"""The video-QA annotation format, and ``--make-data``: the video organism's clips as mp4 files plus annotations.

An annotation file is a JSON list (or JSONL / CSV) of entries::

    {"video_name": "videos/clip_0000.mp4", "question": "which way does the red circle move ?",
     "candidates": ["left", "right", "up", "down"], "answer": "left", "answer_number": 0,
     "question_id": "0000", "task_name": "direction", "start": 0.0, "end": 6.0,
     "frames_with_answer_object": [4, 5, 6, 7]}

Only ``video_name`` (relative to ``--video_root``: a video file, a GIF or a folder of frames) and
``question`` are required; ``question_id`` names the entry (default ``case-<index>``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from analyses.pipelines.datasets import Field, Schema

__all__ = ["ANNOTATION_SCHEMA", "AnnotationError", "correct_index", "require", "make_data"]


class AnnotationError(ValueError):
    """An entry lacks a field the command needs, or its fields contradict each other."""


def _strings(value: list) -> str | None:
    return None if value and all(isinstance(v, str) and v.strip() for v in value) else "a non-empty list of non-empty strings"


def _frame_list(value: list) -> str | None:
    return None if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value) else "a list of frame indices (integers >= 0)"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "a time in seconds >= 0"


def _validate(entry: dict[str, Any]) -> None:
    cands, answer, number = entry.get("candidates"), entry.get("answer"), entry.get("answer_number")
    if entry.get("start") is not None and entry.get("end") is not None and entry["end"] <= entry["start"]:
        raise ValueError(f"end ({entry['end']}) must be after start ({entry['start']}) (seconds)")
    if cands is None:
        return
    if len(set(cands)) != len(cands):
        raise ValueError(f"candidates {cands} repeat an entry; list each answer once")
    if answer is not None and answer not in cands:
        raise ValueError(f"answer {answer!r} is not one of the candidates {cands}; fix the answer or add it to the candidates")
    if number is not None:
        if not 0 <= number < len(cands):
            raise ValueError(f"answer_number {number} is outside the {len(cands)} candidates (0..{len(cands) - 1})")
        if answer is not None and cands[number] != answer:
            raise ValueError(f"answer_number {number} points to {cands[number]!r} but answer is {answer!r}; make them agree")


ANNOTATION_SCHEMA = Schema(
    fields=(
        Field("video_name", str, help="video file, GIF or frame folder, relative to --video_root"),
        Field("question", str),
        Field("candidates", list, required=False, check=_strings),
        Field("answer", str, required=False),
        Field("answer_number", int, required=False, check=lambda v: None if v >= 0 else "an index >= 0"),
        Field("question_id", (str, int), required=False),
        Field("task_name", str, required=False),
        Field("start", float, required=False, check=_non_negative),
        Field("end", float, required=False, check=_non_negative),
        Field("frames_with_answer_object", list, required=False, check=_frame_list),
    ),
    id_field="question_id",
    validate=_validate,
)


def require(entry: Mapping[str, Any], command: str, *names: str) -> None:
    """Raise :class:`AnnotationError` naming the fields of ``names`` that the entry lacks."""
    missing = [n for n in names if entry.get(n) in (None, "", [])]
    if missing:
        raise AnnotationError(f"`hooked-vlm video {command}` needs field(s) {missing} in every entry; this entry has "
                              f"{sorted(k for k, v in entry.items() if v is not None)}. Add them (or drop the entry).")


def correct_index(entry: Mapping[str, Any], command: str) -> int:
    """Index of the right answer among the candidates (from ``answer_number`` or ``answer``)."""
    require(entry, command, "candidates")
    if entry.get("answer_number") is not None:
        return int(entry["answer_number"])
    require(entry, command, "answer")
    return list(entry["candidates"]).index(entry["answer"])


def _candidates(example: Any) -> list[str]:
    """The answer options of an organism example: every direction, the two colours shown, or yes / no."""
    from hooked_vlm.organisms.video_qwen import DIRECTIONS

    if example.task == "direction":
        return list(DIRECTIONS)
    if example.task == "order":
        return [t["color"] for t in example.truth["tracks"]]
    return ["yes", "no"]


def make_data(n: int, folder: str | Path, seed: int = 0, tasks: Sequence[str] | None = None, fps: float = 2.0,
              name: str = "video-qwen2-vl") -> Path:
    """Write ``n`` clips of the video organism as ``folder/videos/clip_XXXX.mp4`` and ``folder/annotations.json``
    (``video_name`` relative to ``folder``).

    ``tasks`` restricts the organism's tasks (default: all, in turn); the planted truth goes into each entry
    (``frames_with_answer_object`` = the frames that carry the answer) and ``folder/truth.json``.
    """
    from hooked_vlm.atomic_files import atomic_output, atomic_write_text
    from hooked_vlm.organisms import get_organism

    from .decoding import write_mp4

    if n < 1:
        raise ValueError(f"--make-data needs a positive number of clips, got {n}")
    organism = get_organism(name)
    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    chosen = list(tasks) if tasks else list(organism.tasks)
    examples = []
    for k, task in enumerate(chosen):
        count = n // len(chosen) + (1 if k < n % len(chosen) else 0)
        examples += organism.generate_task(task, count, seed + 1000 * k) if count else []
    entries, truth = [], []
    for i, ex in enumerate(examples):
        video = f"videos/clip_{i:04d}.mp4"
        with atomic_output(folder / video) as tmp:
            write_mp4(ex.video, tmp, fps=fps)
        cands = _candidates(ex)
        first, stop = ex.truth["answer_frames"]
        entries.append({
            "video_name": video, "question": ex.prompt.replace("<video>", "").strip(), "candidates": cands,
            "answer": ex.answer, "answer_number": cands.index(ex.answer), "question_id": f"{i:04d}",
            "task_name": ex.task, "start": 0.0, "end": len(ex.video) / fps, "frames_with_answer_object": list(range(first, stop)),
        })
        truth.append({"question_id": f"{i:04d}", "task_name": ex.task, **ex.truth})
    atomic_write_text(folder / "annotations.json", json.dumps(entries, indent=1))
    atomic_write_text(folder / "truth.json", json.dumps(truth))
    return folder / "annotations.json"
