"""Spatial-relation reports from a run folder: accuracy (per relation, pair, set), attention per layer, mirror
patching per layer and group, relation probes per layer, accuracy per AdaptVis factor, figures, ``index.html``.

A function of the stored per-case results and caches only, so a resumed run reports what an uninterrupted one does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.pipelines.html_index import Section, write_index_html
from analyses.pipelines.provenance import atomic_output, atomic_write_json
from analyses.pipelines.runner import load_failures, load_results
from analyses.pipelines.spatial.case import PATCH_GROUPS
from analyses.pipelines.vlm_cases import cache_path

__all__ = ["write_reports", "accuracy_table", "attention_by_layer", "patching_table", "probe_table", "adaptvis_table"]

#: below this |original - mirrored| metric gap (logits / nats) the recovery ratio is noise and is left empty
MIN_GAP = 1e-4
ATTENTION_FIELDS = ("relation_image_share", "relation_mass_a", "relation_mass_b", "answer_image_share", "answer_mass_a", "answer_mass_b")


def _wilson(k: int, n: int) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    return float(low), float(high)


def _acc_row(scope: str, kind: str, correct: pd.Series) -> dict[str, Any]:
    k, n = int(correct.sum()), int(len(correct))
    low, high = _wilson(k, n)
    return {"scope": scope, "kind": kind, "accuracy": k / n, "low": low, "high": high, "k": k, "n": n}


def accuracy_table(results: pd.DataFrame) -> pd.DataFrame:
    """Case accuracy overall and per relation; pair / set accuracy (every case of the group correct) where given."""
    rows = [_acc_row("all", "case", results["correct"])]
    rows += [_acc_row(rel, "case", sub["correct"]) for rel, sub in results.groupby("relation", sort=True)]
    for column, kind in (("pair_id", "pair"), ("set_id", "set")):
        sub = results.dropna(subset=[column])
        if len(sub):
            rows.append(_acc_row("all", kind, sub.groupby(column)["correct"].all()))
    return pd.DataFrame(rows)


def _stack(values: pd.Series) -> np.ndarray | None:
    got = [np.asarray(v, float) for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return np.stack(got) if got else None


def attention_by_layer(results: pd.DataFrame) -> pd.DataFrame:
    """Per relation (and ``all``) and layer: mean attention share on the image and on each named object's cell."""
    rows = []
    for scope, sub in [("all", results), *results.groupby("relation", sort=True)]:
        cols = {f: _stack(sub[f]) for f in ATTENTION_FIELDS}
        n_layers = max((v.shape[1] for v in cols.values() if v is not None), default=0)
        for layer in range(n_layers):
            row: dict[str, Any] = {"relation": scope, "layer": layer}
            for f, v in cols.items():
                row[f] = float(v[:, layer].mean()) if v is not None else np.nan
                row[f"n_{f}"] = 0 if v is None else int(v.shape[0])
            rows.append(row)
    return pd.DataFrame(rows)


def patching_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per layer and group: mean patched metric and recovery ``(patched - corrupt) / (clean - corrupt)`` of the means
    (NaN when the original and mirrored runs differ by less than :data:`MIN_GAP`: the model ignores the mirroring)."""
    rows = []
    done = results[results["patch_clean"].notna()]
    if done.empty:
        return pd.DataFrame(columns=["layer", "group", "n", "patched", "clean", "corrupt", "recovery"])
    clean, corrupt = float(done["patch_clean"].mean()), float(done["patch_corrupt"].mean())
    for group in PATCH_GROUPS:
        v = _stack(done[f"patch_{group}"])
        if v is None:
            continue
        for layer in range(v.shape[1]):
            patched = float(v[:, layer].mean())
            gap = clean - corrupt
            rows.append({"layer": layer, "group": group, "n": int(v.shape[0]), "patched": patched, "clean": clean,
                         "corrupt": corrupt, "recovery": (patched - corrupt) / gap if abs(gap) > MIN_GAP else np.nan})
    return pd.DataFrame(rows)


def probe_table(results: pd.DataFrame, output_dir: Path, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Logistic probes per layer on the last token's residual stream, grouped by image pair: relation and answer."""
    from analyses.probes import probe_layers

    resid = np.stack([np.load(output_dir / rel)["resid"] for rel in results["act_cache"]])  # cases layers d
    groups = results["group"].to_numpy()
    frames, notes = [], []
    for label in ("relation", "gold"):
        y = results[label].to_numpy()
        n_groups = len(set(groups))
        if len(set(y)) < 2 or n_groups < 2:
            notes.append(f"probe for {label}: needs two labels and two groups (has {len(set(y))} and {n_groups})")
            continue
        features = {layer: resid[:, layer] for layer in range(resid.shape[1])}
        constant = pd.Series(y).groupby(groups).nunique().max() == 1  # e.g. a mirrored pair asks the same relation
        try:
            with warnings.catch_warnings():  # degenerate bootstrap resamples of small runs warn; their CIs are NaN
                warnings.simplefilter("ignore")
                table = probe_layers(features, y, groups, n_splits=min(5, n_groups), n_resamples=199, seed=seed,
                                     control="global" if constant else "within_groups")
        except ValueError as err:
            notes.append(f"probe for {label}: {err}")
            continue
        frames.append(table.assign(label=label))
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


def adaptvis_table(results: pd.DataFrame, factors: list[float]) -> pd.DataFrame:
    """Accuracy per attention-scaling factor (1.0 = unscaled), and of the confidence-gated variant."""
    rows = [dict(_acc_row("1.0 (unscaled)", "fixed", results["correct"]), factor=1.0)]
    table = np.asarray(results["adapt_correct"].tolist(), bool).reshape(len(results), len(factors))
    for i, f in enumerate(factors):
        rows.append(dict(_acc_row(f"{f:g}", "fixed", pd.Series(table[:, i])), factor=f))
    rows.append(dict(_acc_row("gated", "gated", results["gated_correct"]), factor=np.nan))
    return pd.DataFrame(rows)[["scope", "kind", "factor", "accuracy", "low", "high", "k", "n"]].rename(columns={"scope": "setting"})


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _figures(results: pd.DataFrame, attention: pd.DataFrame, patching: pd.DataFrame, adapt: pd.DataFrame, out: Path, max_figures: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analyses.figures import map_panel
    from analyses.pipelines.vlm_cases import load_image

    paths = []
    overall = attention[attention["relation"] == "all"]
    if len(overall):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for f in ATTENTION_FIELDS:
            if overall[f].notna().any():
                ax.plot(overall["layer"], overall[f], marker="o", label=f)
        ax.set_xlabel("layer"), ax.set_ylabel("attention share"), ax.legend(fontsize=6), ax.set_title("attention to the image per layer")
        paths.append(_save(fig, out / "figs" / "attention_by_layer.png"))
    if len(patching):
        wide = patching.assign(effect=patching["patched"] - patching["corrupt"]).pivot_table(index="layer", columns="group", values="effect")
        lim = float(np.nanmax(np.abs(wide.to_numpy(float)))) or 1e-12
        fig, ax = plt.subplots(figsize=(4, 3))
        im = ax.imshow(wide.to_numpy(float), aspect="auto", cmap="coolwarm", origin="lower", vmin=-lim, vmax=lim)
        ax.set_xticks(range(wide.shape[1]), wide.columns), ax.set_ylabel("layer")
        ax.set_title("mirror patching (resid_pre): patched - mirrored", fontsize=9)
        fig.colorbar(im, ax=ax)
        paths.append(_save(fig, out / "figs" / "patching_effect.png"))
    fixed = adapt[adapt["kind"] == "fixed"].sort_values("factor")
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.errorbar(fixed["factor"], fixed["accuracy"], yerr=[fixed["accuracy"] - fixed["low"], fixed["high"] - fixed["accuracy"]], marker="o")
    gated = adapt[adapt["kind"] == "gated"]
    ax.axhline(float(gated["accuracy"].iloc[0]), color="gray", ls="--", label="confidence-gated")
    ax.set_xscale("log"), ax.set_xlabel("factor on image-key logits"), ax.set_ylabel("accuracy"), ax.legend(fontsize=7)
    paths.append(_save(fig, out / "figs" / "adaptvis_accuracy.png"))
    for _, row in results.head(max_figures).iterrows():
        with np.load(out / row["attn_cache"]) as z:
            attn, queries = z["attention"], [str(q) for q in z["queries"]]
        maps = {f"{q} L{layer}": attn[layer, :, qi].mean(0) for qi, q in enumerate(queries) for layer in range(attn.shape[0])}
        title = f"{row['case_id']} ({row['relation']}): said {row['prediction']!r}, gold {row['gold']!r}"
        fig = map_panel(load_image(row["image_path"]), maps, title=title)
        paths.append(_save(fig, cache_path(out, "figs", f"case_{row['case_id']}", ".png")))
    return paths


def write_reports(output_dir: str | Path, options: dict[str, Any], manifest: dict[str, Any] | None = None, max_figures: int = 6) -> dict[str, Any]:
    """Write every report file of a spatial run folder; return the summary (also ``summary.json``)."""
    out = Path(output_dir)
    results, failures = load_results(out), load_failures(out)
    if results.empty:
        first = f" (first: {failures['source'].iloc[0]}: {failures['message'].iloc[0]})" if len(failures) else ""
        raise ValueError(f"no case of this run finished; {len(failures)} failed{first}. Their errors are in "
                         f"{out / 'failures'} (load_failures); fix the dataset or the options and rerun.")
    columns = ["case_id", "form", "relation", "prediction", "gold", "correct", "confidence", "p_gold", "pair_id", "set_id",
               "pooling", "gated_factor", "gated_correct", "patch_note"]
    _write_csv(results[columns], out / "per_case.csv")
    tables = {"accuracy": accuracy_table(results), "attention": attention_by_layer(results), "patching": patching_table(results),
              "adaptvis": adaptvis_table(results, list(options["adapt_factors"]))}
    probes, probe_notes = probe_table(results, out, seed=int(options.get("seed", 0)))
    tables["probes"] = probes
    files = {"accuracy": out / "accuracy.csv", "attention": out / "attention_by_layer.csv", "patching": out / "patching.csv",
             "probes": out / "probes.csv", "adaptvis": out / "adaptvis.csv"}
    for name, path in files.items():
        _write_csv(tables[name], path)
    summary = {"accuracy": tables["accuracy"].to_dict("records"), "adaptvis": tables["adaptvis"].to_dict("records"),
               "best_probe_layer": (tables["probes"].sort_values("accuracy", ascending=False).head(2)[["label", "layer", "accuracy", "selectivity"]]
                                    .to_dict("records") if len(probes) else []),
               "probe_notes": probe_notes, "failed_cases": int(len(failures)),
               "pooling": sorted(results["pooling"].unique().tolist()), "options": options}
    atomic_write_json(out / "summary.json", json.loads(json.dumps(summary, default=lambda v: None if v != v else float(v))))
    figures = _figures(results, tables["attention"], tables["patching"], tables["adaptvis"], out, max_figures)
    by_name = {p.name: p for p in figures}
    sections = [
        Section("Accuracy", "Per case, per relation, and per pair / set (all of its cases correct); 95% Wilson intervals.", tables=[tables["accuracy"]]),
        Section("Attention to the image per layer", "From the relation phrase and the answer token (mean over heads and cases): "
                "share on the whole image and on each named object's cell.", tables=[tables["attention"]],
                figures=[by_name[n] for n in ("attention_by_layer.png",) if n in by_name]),
        Section("Mirror activation patching", "Clean (original image) resid_pre patched into the mirrored run, per layer and "
                "position group; recovery = (patched - mirrored) / (original - mirrored).", tables=[tables["patching"]],
                figures=[by_name[n] for n in ("patching_effect.png",) if n in by_name]),
        Section("Relation probes", "Logistic probes on the last token's residual stream, GroupKFold by image pair. " + " ".join(probe_notes),
                tables=[probes] if len(probes) else []),
        Section("AdaptVis attention scaling", f"Image-key logits scaled in layers {options.get('adapt_layers') or 'all'}; gated: factor "
                f"{options['gate_low']} below confidence {options['gate_threshold']}, else {options['gate_high']}.",
                tables=[tables["adaptvis"]], figures=[by_name["adaptvis_accuracy.png"]]),
        Section("Cases", "Attention from the relation phrase and the answer token, mean over heads, per layer.",
                figures=[p for p in figures if p.name.startswith("case_")]),
        Section("Failed cases", tables=[failures[["case_id", "source", "stage", "error_type", "message"]]] if len(failures) else []),
        Section("Files", links=[out / "per_case.csv", out / "summary.json", *files.values(), out / "manifest.json"]),
    ]
    write_index_html(out / "index.html", "hooked-vlm spatial", sections, manifest)
    return summary
