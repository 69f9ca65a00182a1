"""``hooked-vlm video probe``: Have-1 / Have-2 probes on the representations ``video trace`` dumped.

* **Have-1**: one sample per (entry, counterfactual): the counterfactual run's representation, labelled 1
  when the counterfactual changed the model's answer (:func:`analyses.probes.have1_labels`).
* **Have-2**: one sample per entry: the clean run's representation, labelled by the annotation field
  ``--label_key`` (:func:`analyses.probes.have2_labels`).

Splits are grouped by video (no clip in both train and test), scores are accuracy and AUROC with
cluster-bootstrap CIs and a control task (:func:`analyses.probes.probe_layers`). Entries without the label
are listed as skipped, with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.probes import have1_labels, have2_labels, probe_layers

from .representations import KINDS, load_representations

__all__ = ["ProbeInputError", "load_tracing_results", "probe_samples", "read_annotations", "run_probe"]


class ProbeInputError(ValueError):
    """The tracing results, representations or annotations cannot make a probe dataset."""


def load_tracing_results(path: str | Path) -> list[dict[str, Any]]:
    """The per-entry records of a ``video trace`` ``--output`` JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tracing results {path} do not exist; pass the --output file of `hooked-vlm video trace`")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "entries" not in data:
        raise ProbeInputError(f"{path} is not a `hooked-vlm video trace` results file (no 'entries'); pass its --output JSON")
    return data["entries"]


def probe_samples(
    probe_type: str, entries: list[dict[str, Any]], index: pd.DataFrame, annotations: pd.DataFrame | None = None,
    label_key: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, str]]]:
    """(row indices into the representations, labels, groups, skipped entries) for one probe type."""
    skipped: list[dict[str, str]] = []
    rows = index.reset_index().rename(columns={"index": "row"})
    rows["question_id"] = rows["question_id"].astype(str)
    if probe_type == "have1":
        answers = []
        for e in entries:
            for c in e.get("conditions", []):
                answers.append({"question_id": str(e["question_id"]), "condition": c["counterfactual"],
                                "clean_answer": e["clean_answer"], "counterfactual_answer": c["cf_answer"]})
        table = pd.DataFrame(answers, columns=["question_id", "condition", "clean_answer", "counterfactual_answer"])
        merged = rows.merge(table, on=["question_id", "condition"], how="inner")
        if merged.empty:
            raise ProbeInputError("no representation row matches a counterfactual of the tracing results; pass the files of one trace run")
        return merged["row"].to_numpy(), have1_labels(merged), merged["video_name"].to_numpy(), skipped
    if probe_type != "have2":
        raise ProbeInputError(f"--probe_type {probe_type!r}: choose have1 or have2")
    if annotations is None or not label_key:
        raise ProbeInputError("--probe_type have2 needs --annotations FILE and --label_key FIELD (the label of each entry)")
    if label_key not in annotations.columns:
        raise ProbeInputError(f"--label_key {label_key!r} is in no annotation entry; fields present: {sorted(annotations.columns)}")
    ann = annotations.assign(question_id=annotations["question_id"].astype(str))
    have = ann[ann[label_key].notna()]
    for qid in ann.loc[ann[label_key].isna(), "question_id"]:
        skipped.append({"question_id": qid, "reason": f"annotation has no {label_key!r}"})
    clean = rows[(rows["condition"] == "clean") & rows["question_id"].isin(set(have["question_id"]))]
    if clean.empty:
        raise ProbeInputError(f"no clean representation has an annotation with {label_key!r}; check that the annotations are the traced ones")
    labels = have2_labels(clean["question_id"].tolist(), have, label_key, id_column="question_id")
    return clean["row"].to_numpy(), np.asarray(labels), clean["video_name"].to_numpy(), skipped


def read_annotations(path: str | Path) -> pd.DataFrame:
    """Annotation entries as a table with a ``question_id`` column (``case-<index>`` where absent, as the runner names them)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ProbeInputError(f"{path}: expected a JSON list of annotation entries")
    frame = pd.DataFrame(data)
    ids = frame["question_id"] if "question_id" in frame else pd.Series([None] * len(frame))
    frame["question_id"] = [str(q) if q not in (None, "") and q == q else f"case-{i}" for i, q in enumerate(ids)]
    return frame


def run_probe(
    tracing_results: str | Path, representations: str | Path, probe_type: str, representation: str = "layers_mean",
    layer_idx: int | None = None, annotations: str | Path | None = None, label_key: str | None = None, n_splits: int = 5,
    n_resamples: int = 499, seed: int = 0,
) -> dict[str, Any]:
    """Probe metrics per layer (or the one ``layer_idx``) as a JSON-friendly dict with the per-layer table."""
    if representation not in KINDS:
        raise ProbeInputError(f"--representation {representation!r}: choose one of {', '.join(KINDS)}")
    entries = load_tracing_results(tracing_results)
    index, arrays = load_representations(representations)
    X_all = arrays[representation]
    n_layers = X_all.shape[1]
    if layer_idx is not None and not -n_layers <= layer_idx < n_layers:
        raise ProbeInputError(f"--layer_idx {layer_idx}: the representations have {n_layers} layers (0..{n_layers - 1})")
    ann = read_annotations(annotations) if annotations else None
    rows, y, groups, skipped = probe_samples(probe_type, entries, index, ann, label_key)
    if np.unique(y).size < 2:
        raise ProbeInputError(f"all {len(y)} samples have the label {y[0]!r}; a probe needs two classes (more entries or "
                              "other counterfactuals)")
    n_groups = np.unique(groups).size
    if n_groups < 2:
        raise ProbeInputError("every sample comes from one video; grouped splits need at least two videos")
    layers = [layer_idx % n_layers] if layer_idx is not None else list(range(n_layers))
    varies = pd.Series(y).groupby(groups).nunique().gt(1).any()  # the control shuffles within videos only where labels vary there
    table = probe_layers({layer: X_all[rows, layer] for layer in layers}, y, groups, n_splits=min(n_splits, n_groups),
                         control="within_groups" if varies else "global", n_resamples=n_resamples, seed=seed)
    return {"probe_type": probe_type, "representation": representation, "label_key": label_key, "n_samples": int(len(y)),
            "n_videos": int(n_groups), "classes": [str(c) for c in np.unique(y)], "layers": table.to_dict("records"),
            "skipped": skipped}

