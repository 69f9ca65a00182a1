"""One entry's clip and prompt, from the entry and the run options (shared by infer and trace)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from analyses.pipelines.datasets import Case

from .decoding import DecodedVideo, read_video

__all__ = ["DEFAULT_TEMPLATE", "case_clip", "case_prompt", "clip_options"]

#: ``<video>`` marks where the clip goes; ``{question}`` and ``{candidates}`` (comma-separated) are filled in
DEFAULT_TEMPLATE = "<video> {question}"


def clip_options(args: Any) -> dict[str, Any]:
    """The run options that decide which frames and which prompt an entry gets (stored with the results)."""
    return {"video_root": str(Path(args.video_root).resolve()), "num_frames": args.num_frames, "fps": args.fps,
            "folder_fps": args.folder_fps, "prompt_template": args.prompt_template}


def case_clip(case: Case, options: Mapping[str, Any]) -> DecodedVideo:
    """Decode the entry's video (relative to ``video_root``), clipped to start / end and sampled."""
    path = Path(options["video_root"]) / case.data["video_name"]
    return read_video(path, num_frames=options.get("num_frames"), fps=options.get("fps"), start=case.data.get("start"),
                      end=case.data.get("end"), folder_fps=options.get("folder_fps") or 2.0)


def case_prompt(case: Case, options: Mapping[str, Any]) -> str:
    """The prompt of the entry: the template with its question (and candidates) filled in."""
    template = options.get("prompt_template") or DEFAULT_TEMPLATE
    candidates = ", ".join(case.data.get("candidates") or [])
    return template.format(question=case.data["question"], candidates=candidates)
