"""What ``video trace`` writes after its cases: the JSON and Parquet results, the figures and ``index.html``.

Tables: ``conditions`` (entry x counterfactual: clean / counterfactual margins and answers) and ``cells``
(entry x counterfactual x layer x token slice: patched margin, recovery). Figures (mean recovery over
entries): layer x token slice and layer x frame heatmaps per counterfactual, and per-counterfactual bars
of the margin drop and of how often the answer changed. ``answer_frames``: mean recovery on the frames
that hold the answer object (``frames_with_answer_object``) against the other frames, per layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["trace_tables", "answer_frame_recovery", "write_trace_outputs"]

CELL_COLUMNS = ["question_id", "task_name", "counterfactual", "layer", "token_slice", "slice_kind", "n_positions",
                "clean_margin", "cf_margin", "patched_margin", "recovery"]


def trace_tables(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(conditions, cells) long tables from the per-entry records."""
    conds, cells = [], []
    for rec in results.to_dict("records"):
        for c in json.loads(rec["conditions"]):
            conds.append({"question_id": rec["question_id"], "video_name": rec["video_name"], "task_name": rec["task_name"],
                          "counterfactual": c["counterfactual"], "clean_margin": rec["clean_margin"], "cf_margin": c["cf_margin"],
                          "clean_answer": rec["clean_answer"], "cf_answer": c["cf_answer"],
                          "answer_changed": rec["clean_answer"] != c["cf_answer"], "changed_slices": c["changed_slices"]})
        margins = {c["counterfactual"]: c["cf_margin"] for c in json.loads(rec["conditions"])}
        for cell in json.loads(rec["cells"]):
            cells.append({"question_id": rec["question_id"], "task_name": rec["task_name"], "clean_margin": rec["clean_margin"],
                          "cf_margin": margins[cell["counterfactual"]], **cell})
    cond_frame = pd.DataFrame(conds)
    cell_frame = pd.DataFrame(cells, columns=CELL_COLUMNS)
    cell_frame["recovery"] = cell_frame["recovery"].astype(float)
    return cond_frame, cell_frame


def answer_frame_recovery(results: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Mean recovery per counterfactual and layer on per-frame groups that hold an answer frame, and on the others."""
    rows = []
    for rec in results.to_dict("records"):
        answer = rec.get("frames_with_answer_object")
        if answer is None or (isinstance(answer, float) and np.isnan(answer)) or len(answer) == 0:
            continue
        answer = {int(a) for a in answer}
        groups = json.loads(rec["frame_groups"])
        mine = cells[(cells["question_id"] == rec["question_id"]) & (cells["slice_kind"] == "frame")]
        for row in mine.itertuples(index=False):
            rows.append({"counterfactual": row.counterfactual, "layer": row.layer,
                         "on_answer": bool(answer & set(groups.get(row.token_slice, []))), "recovery": row.recovery})
    if not rows:
        return pd.DataFrame(columns=["counterfactual", "layer", "answer_frames", "other_frames"])
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index=["counterfactual", "layer"], columns="on_answer", values="recovery", aggfunc="mean")
    table = table.rename(columns={True: "answer_frames", False: "other_frames"}).reset_index()
    table.columns.name = None
    return table


def _heatmap(table: pd.DataFrame, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hooked_vlm.atomic_files import atomic_output

    values = table.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(0.7 * values.shape[1] + 2.5, 0.35 * values.shape[0] + 1.8))
    im = ax.imshow(values, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(values.shape[1]))
    ax.set_xticklabels([str(c) for c in table.columns], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(values.shape[0]))
    ax.set_yticklabels([str(i) for i in table.index], fontsize=7)
    ax.set_ylabel("layer (resid_pre)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="mean recovery")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _bars(conditions: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hooked_vlm.atomic_files import atomic_output

    summary = conditions.assign(drop=conditions["clean_margin"] - conditions["cf_margin"]).groupby("counterfactual", sort=False)
    drop, changed = summary["drop"].mean(), summary["answer_changed"].mean()
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.9 * len(drop) * 2, 3))
    axes[0].bar(range(len(drop)), drop.to_numpy(), color="tab:blue")
    axes[0].set_title("margin drop (clean - cf)", fontsize=9)
    axes[1].bar(range(len(changed)), changed.to_numpy(), color="tab:orange")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("answer changed (rate)", fontsize=9)
    for ax in axes:
        ax.set_xticks(range(len(drop)))
        ax.set_xticklabels(list(drop.index), rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _json_entries(results: pd.DataFrame, cells: pd.DataFrame) -> list[dict[str, Any]]:
    entries = []
    for rec in results.to_dict("records"):
        conds = json.loads(rec["conditions"])
        mine = cells[cells["question_id"] == rec["question_id"]]
        for c in conds:
            sub = mine[mine["counterfactual"] == c["counterfactual"]]
            c["answer_changed"] = rec["clean_answer"] != c["cf_answer"]
            c["cells"] = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
                          for r in sub[["layer", "token_slice", "slice_kind", "n_positions", "patched_margin", "recovery"]].to_dict("records")]
        answer = rec.get("frames_with_answer_object")
        entries.append({
            "question_id": rec["question_id"], "video_name": rec["video_name"], "task_name": rec["task_name"], "n_frames": int(rec["n_frames"]),
            "temporal_patch_size": int(rec["temporal_patch_size"]), "n_visual_tokens": int(rec["n_visual_tokens"]),
            "candidates": list(rec["candidates"]), "answer_number": int(rec["answer_number"]), "clean_margin": rec["clean_margin"],
            "clean_answer": rec["clean_answer"], "frame_groups": json.loads(rec["frame_groups"]),
            "frames_with_answer_object": None if answer is None or isinstance(answer, float) else [int(a) for a in answer],
            "conditions": conds,
        })
    return entries


def write_trace_outputs(results: pd.DataFrame, failures: pd.DataFrame, output: Path, run_dir: Path, manifest: dict) -> dict[str, Any]:
    """Write ``output`` (.json), ``output``'s ``.parquet`` twin (the cells), ``conditions.parquet``, figures, ``index.html``."""
    from analyses.pipelines.html_index import Section, write_index_html
    from analyses.pipelines.provenance import atomic_output
    from hooked_vlm.atomic_files import atomic_write_json

    fails = failures[["case_id", "stage", "error_type", "message"]].to_dict("records") if len(failures) else []
    if len(results):
        conditions, cells = trace_tables(results)
    else:
        conditions, cells = pd.DataFrame(columns=["counterfactual", "clean_margin", "cf_margin", "answer_changed"]), pd.DataFrame(columns=CELL_COLUMNS)
    answer_frames = answer_frame_recovery(results, cells) if len(results) else answer_frame_recovery(results, cells.iloc[0:0])
    summary = {"entries": _json_entries(results, cells) if len(results) else [], "failures": fails,
               "answer_frame_recovery": answer_frames.to_dict("records")}
    atomic_write_json(output, summary, sort_keys=False)
    with atomic_output(output.with_suffix(".parquet")) as tmp:
        cells.to_parquet(tmp, index=False)
    with atomic_output(run_dir / "conditions.parquet") as tmp:
        conditions.drop(columns=["changed_slices"], errors="ignore").to_parquet(tmp, index=False)
    figures = []
    fig_dir = run_dir / "figures"
    for cf, sub in cells.groupby("counterfactual", sort=False):
        for kind, label in (("slice", "token slice"), ("frame", "frame")):
            part = sub[sub["slice_kind"] == kind]
            if len(part):
                order = list(dict.fromkeys(part["token_slice"]))
                table = (part.groupby(["layer", "token_slice"])["recovery"].mean().unstack("token_slice")
                         .reindex(index=sorted(part["layer"].unique()), columns=order))  # all-NaN rows stay (undefined recovery)
                safe = "".join(ch if ch.isalnum() else "_" for ch in cf)
                figures.append(_heatmap(table, f"{cf}: recovery, layer x {label}", fig_dir / f"recovery_{safe}_{kind}.png"))
    if len(conditions):
        figures.append(_bars(conditions, fig_dir / "counterfactuals.png"))
    per_cf = (conditions.assign(margin_drop=conditions["clean_margin"] - conditions["cf_margin"])
              .groupby("counterfactual", sort=False)[["margin_drop", "answer_changed"]].mean().reset_index()) if len(conditions) else conditions
    sections = [
        Section("Counterfactuals", "Mean over entries: clean margin minus counterfactual margin, and how often the answer changed.",
                tables=[per_cf], figures=[f for f in figures if f.name == "counterfactuals.png"]),
        Section("Recovery maps", "Clean resid_pre patched into the counterfactual run per layer and token slice / frame; "
                "recovery = (patched - cf) / (clean - cf), mean over entries.", figures=[f for f in figures if f.name != "counterfactuals.png"]),
        Section("Recovery on the answer frames", "Per-frame groups that hold a frame of frames_with_answer_object vs the others.",
                tables=[answer_frames]),
        Section("Files", links=[output, output.with_suffix(".parquet"), run_dir / "conditions.parquet"]),
    ]
    if fails:
        sections.append(Section("Failed entries", tables=[pd.DataFrame(fails)]))
    write_index_html(run_dir / "index.html", "hooked-vlm video trace", sections, manifest)
    return summary
