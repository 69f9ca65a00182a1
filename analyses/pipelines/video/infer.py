"""``hooked-vlm video infer``: the model's answer per entry, the candidate it prefers, and accuracy per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.pipelines.datasets import Case
from analyses.pipelines.runner import CaseContext, Pipeline

from .annotations import ANNOTATION_SCHEMA
from .clips import case_clip, case_prompt
from .model_io import VideoModel, build_inputs, candidate_logprobs, greedy_answer, load_video_model

__all__ = ["INFER", "infer_case", "accuracy_by_task", "inference_entries", "write_outputs"]


def _normalise(text: str) -> str:
    return " ".join(str(text).lower().replace(".", " ").split())


def infer_case(vm: VideoModel, case: Case, ctx: CaseContext) -> dict[str, Any]:
    """Greedy answer; with candidates, the likeliest candidate; correctness when the entry has an answer."""
    clip = case_clip(case, ctx.options)
    prompt = case_prompt(case, ctx.options)
    inputs = build_inputs(vm, prompt, clip.frames, clip.effective_fps, ctx.device, ctx.dtype)
    generated = greedy_answer(vm, inputs, int(ctx.options.get("max_new_tokens", 8)))
    record: dict[str, Any] = {"question_id": case.id, "video_name": case.data["video_name"], "task_name": case.data.get("task_name") or "all",
                              "n_frames": int(clip.frames.shape[0]), "prediction": generated, "chosen": None, "chosen_number": None,
                              "candidate_logprobs": None, "correct": None}
    cands = case.data.get("candidates")
    if cands:
        scores = candidate_logprobs(vm, prompt, clip.frames, clip.effective_fps, cands, ctx.device, ctx.dtype, inputs)
        best = int(np.argmax(scores))
        record.update(chosen=cands[best], chosen_number=best, candidate_logprobs=scores)
    answer = case.data.get("answer")
    if answer is None and cands and case.data.get("answer_number") is not None:
        answer = cands[case.data["answer_number"]]
    if answer is not None:
        said = record["chosen"] if cands else generated
        record["correct"] = _normalise(said) == _normalise(answer)
    record["answer"] = answer
    return record


INFER = Pipeline(name="video-infer", schema=ANNOTATION_SCHEMA, run_case=infer_case, load_model=load_video_model, version="1")


def accuracy_by_task(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per task (and ``all``) with a 95% Wilson interval, over entries that have an answer."""
    from hooked_vlm.organisms.base import wilson_interval

    scored = results[results["correct"].notna()] if "correct" in results else results.iloc[0:0]
    rows = []
    for task, group in [*scored.groupby("task_name", sort=True), ("all", scored)]:
        if len(group) == 0:
            continue
        k, n = int(group["correct"].astype(bool).sum()), len(group)
        low, high = wilson_interval(k, n)
        rows.append({"task_name": task, "correct": k, "n": n, "accuracy": k / n, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["task_name", "correct", "n", "accuracy", "ci_low", "ci_high"])


def inference_entries(results: pd.DataFrame) -> list[dict[str, Any]]:
    """The per-entry records of the run as plain JSON objects (the ``--output`` file)."""
    keep = ["question_id", "video_name", "task_name", "n_frames", "prediction", "chosen", "chosen_number",
            "candidate_logprobs", "answer", "correct"]
    out = []
    for row in results[[c for c in keep if c in results]].to_dict("records"):
        out.append({k: (v.tolist() if isinstance(v, np.ndarray) else (None if _isnan(v) else v)) for k, v in row.items()})
    return out


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and v != v


def write_outputs(results: pd.DataFrame, failures: pd.DataFrame, output: Path, run_dir: Path, manifest: dict) -> dict[str, Any]:
    """``--output`` JSON (entries, accuracy, failures), ``accuracy.csv`` and ``index.html`` in the run folder."""
    from analyses.pipelines.html_index import Section, write_index_html
    from analyses.pipelines.provenance import atomic_output
    from hooked_vlm.atomic_files import atomic_write_json

    acc = accuracy_by_task(results) if len(results) else accuracy_by_task(pd.DataFrame(columns=["correct", "task_name"]))
    fails = failures[["case_id", "stage", "error_type", "message"]].to_dict("records") if len(failures) else []
    summary = {"entries": inference_entries(results) if len(results) else [], "accuracy": acc.to_dict("records"), "failures": fails}
    atomic_write_json(output, summary, sort_keys=False)
    with atomic_output(run_dir / "accuracy.csv") as tmp:
        acc.to_csv(tmp, index=False)
    table = results[[c for c in ("question_id", "task_name", "prediction", "chosen", "answer", "correct") if c in results]]
    sections = [Section("Accuracy per task", "Chosen candidate (by likelihood) against the annotated answer; 95% Wilson intervals.", tables=[acc]),
                Section("Answers", tables=[table], links=[str(output)])]
    if fails:
        sections.append(Section("Failed entries", tables=[pd.DataFrame(fails)]))
    write_index_html(run_dir / "index.html", "hooked-vlm video infer", sections, manifest)
    return summary

