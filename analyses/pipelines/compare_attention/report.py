"""The comparison of two models' runs: per-row table, paraphrase robustness, clustered statistics, figures, index.html.

Statistics (``stats.csv``): per model, accuracy, flip rate and every map metric with a 95% bootstrap CI that
resamples whole studies (:func:`analyses.stats.bootstrap_ci` with ``clusters=study_id``); per metric, the paired
difference A - B over the rows both models answered, with the same clustered CI, a Wilcoxon signed-rank test and
a sign-flip permutation test (scipy) on the per-study mean differences (studies are the independent units).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from analyses.map_metrics import js_divergence
from analyses.pipelines import Section, atomic_output, atomic_write_json, write_index_html
from analyses.pipelines.compare_attention.pipeline import ANALYSIS_GRID
from analyses.stats import bootstrap_ci, map_consistency, paired_test, paraphrase_robustness

__all__ = ["METRICS", "combine", "robustness_table", "stats_table", "cross_model_js", "write_report"]

METRICS = ("entropy", "gini", "finding_ratio", "marker_ratio", "finding_mass", "marker_mass")


def _maps(frame: pd.DataFrame, method: str) -> np.ndarray:
    return np.stack([np.asarray(m, dtype=float) for m in frame[f"{method}_map"]])


def cross_model_js(a: pd.DataFrame, b: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """Per row both models answered: JS divergence (base 2) between the two models' maps of each method."""
    import torch

    both = a.merge(b, on="case_id", suffixes=("_a", "_b"))
    out = pd.DataFrame({"case_id": both["case_id"]})
    for m in methods:
        vals = []
        for x, y, ex, ey in zip(both[f"{m}_map_a"], both[f"{m}_map_b"], both[f"{m}_empty_a"], both[f"{m}_empty_b"]):
            vals.append(float("nan") if ex or ey else float(js_divergence(torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y)))))
        out[f"{m}_js_between_models"] = vals
    return out


def robustness_table(rows: pd.DataFrame, methods: Sequence[str]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per study: variants, majority answer, agreement, flip rate (vs the majority), and map consistency (mean JS)."""
    wide = rows.pivot_table(index="study_id", columns="variant_id", values="answer", aggfunc="first")
    complete = rows["study_id"].nunique() > 1 and not wide.isna().any().any()
    if complete:  # Fleiss' kappa needs every study answered under every paraphrase
        per_study, summary = paraphrase_robustness(rows, item="study_id", answer="answer", variant="variant_id")
    else:
        per_study, summary = paraphrase_robustness(rows, item="study_id", answer="answer")
        summary["fleiss_kappa"] = None
        summary["fleiss_kappa_note"] = "not computed: some studies lack some paraphrases (or only one study)"
    for m in methods:
        usable = rows[~rows[f"{m}_empty"].astype(bool)]
        groups = {s: _maps(sub, m) for s, sub in usable.groupby("study_id") if len(sub) >= 2}
        cons = map_consistency(groups) if groups else pd.DataFrame(columns=["item", "mean_js", "max_js"])
        cons = cons.rename(columns={"item": "study_id", "mean_js": f"{m}_mean_js", "max_js": f"{m}_max_js"})
        per_study = per_study.merge(cons[["study_id", f"{m}_mean_js", f"{m}_max_js"]], on="study_id", how="left")
    return per_study, summary


def _ci(values: pd.Series, clusters: pd.Series, seed: int, n_resamples: int = 1999) -> dict[str, Any]:
    ok = values.notna().to_numpy()
    x, c = values.to_numpy(float)[ok], clusters.to_numpy()[ok]
    row: dict[str, Any] = {"n_rows": int(ok.sum()), "n_studies": int(len(set(c))), "estimate": float(np.mean(x)) if x.size else float("nan")}
    if len(set(c)) >= 2:
        _, lo, hi = bootstrap_ci(x, clusters=c, n_resamples=n_resamples, seed=seed)
        row.update(low=lo, high=hi)
    else:
        row.update(low=float("nan"), high=float("nan"), note="fewer than 2 studies: no CI")
    return row


def stats_table(per_model: dict[str, pd.DataFrame], robust: dict[str, pd.DataFrame], methods: Sequence[str], seed: int = 0,
                n_resamples: int = 1999) -> pd.DataFrame:
    """Per-model estimates with clustered CIs, and the paired A - B differences with clustered CI and tests."""
    rows = []

    def _ci_row(values: pd.Series, clusters: pd.Series, seed: int) -> dict[str, Any]:
        return _ci(values, clusters, seed, n_resamples)

    names = list(per_model)
    for model, frame in per_model.items():
        rows.append({"model": model, "metric": "accuracy", **_ci_row(frame["correct"].astype(float), frame["study_id"], seed)})
        r = robust[model]
        rows.append({"model": model, "metric": "flip_rate", **_ci_row(r["flip_rate"], r["study_id"], seed)})
        for m in methods:
            for metric in METRICS:
                rows.append({"model": model, "metric": f"{m}_{metric}", **_ci_row(frame[f"{m}_{metric}"], frame["study_id"], seed)})
    if len(names) == 2:
        a, b = per_model[names[0]], per_model[names[1]]
        both = a.merge(b, on="case_id", suffixes=("_a", "_b"))
        cols = ["correct"] + [f"{m}_{metric}" for m in methods for metric in METRICS]
        for col in cols:
            d = both[f"{col}_a"].astype(float) - both[f"{col}_b"].astype(float)
            row = {"model": f"{names[0]} - {names[1]}", "metric": "accuracy" if col == "correct" else col,
                   **_ci_row(d, both["study_id_a"], seed)}
            row.update(_paired_tests(both, col, seed))
            rows.append(row)
        fa, fb = robust[names[0]].set_index("study_id")["flip_rate"], robust[names[1]].set_index("study_id")["flip_rate"]
        common = fa.index.intersection(fb.index)
        d = (fa[common] - fb[common]).reset_index()
        row = {"model": f"{names[0]} - {names[1]}", "metric": "flip_rate", **_ci_row(d["flip_rate"], d["study_id"], seed)}
        row.update(_tests(fa[common].to_numpy(float), fb[common].to_numpy(float), seed))
        rows.append(row)
    return pd.DataFrame(rows)


def _paired_tests(both: pd.DataFrame, col: str, seed: int) -> dict[str, Any]:
    sub = both[[f"{col}_a", f"{col}_b", "study_id_a"]].dropna()
    means = sub.astype({f"{col}_a": float, f"{col}_b": float}).groupby("study_id_a")[[f"{col}_a", f"{col}_b"]].mean()
    return _tests(means[f"{col}_a"].to_numpy(float), means[f"{col}_b"].to_numpy(float), seed)


def _tests(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    """Wilcoxon signed-rank and a sign-flip permutation test of the mean difference, over studies."""
    out: dict[str, Any] = {"n_pairs_tested": int(x.size)}
    if x.size < 2:
        return out
    out["wilcoxon_stat"], out["wilcoxon_p"] = paired_test(x, y, "wilcoxon")
    if np.all(x == y):
        out["permutation_p"] = 1.0
    else:
        res = sps.permutation_test((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), permutation_type="samples",
                                   vectorized=True, n_resamples=9999, rng=np.random.default_rng(seed))
        out["permutation_p"] = float(res.pvalue)
    return out


def combine(per_model: dict[str, pd.DataFrame], methods: Sequence[str]) -> pd.DataFrame:
    """The long per-row table: one row per (model, CSV row), with the between-model JS of each method."""
    names = list(per_model)
    frames = []
    js = cross_model_js(per_model[names[0]], per_model[names[1]], methods) if len(names) == 2 else None
    for model, frame in per_model.items():
        f = frame.drop(columns=[c for c in frame.columns if c.endswith("_map")]).copy()
        f.insert(0, "model", model)
        if js is not None:
            f = f.merge(js, on="case_id", how="left")
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def _save_fig(path: Path, fig: Any) -> str:
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _figures(out: Path, per_model: dict[str, pd.DataFrame], methods: Sequence[str], root: Path, max_studies: int) -> list[str]:
    if max_studies < 1:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analyses.figures import overlay
    from analyses.pipelines.cir.images import read_image
    from analyses.pipelines.compare_attention.data import parse_box

    figs: list[str] = []
    if max_studies < 1:
        return figs
    first = next(iter(per_model.values()))
    studies = sorted(first["study_id"].unique())[:max_studies]
    for study in studies:
        fig, axes = plt.subplots(len(per_model), len(methods) + 1, figsize=(2.6 * (len(methods) + 1), 2.7 * len(per_model)), squeeze=False)
        for i, (model, frame) in enumerate(per_model.items()):
            sub = frame[frame["study_id"] == study].sort_values("variant_id")
            if sub.empty:
                continue
            row = sub.iloc[0]
            image = read_image(row["image_file"])
            marker = parse_box(row["marker_box"])
            axes[i, 0].imshow(image)
            axes[i, 0].set_title(f"{model}\n{row['answer']} ({row['prob']:.2f}), gt {row['answer_gt']}", fontsize=8)
            axes[i, 0].axis("off")
            for j, m in enumerate(methods, start=1):
                grid = np.asarray(row[f"{m}_map"], dtype=float).reshape(ANALYSIS_GRID, ANALYSIS_GRID)
                box = (marker[1], marker[0], marker[3], marker[2]) if marker else None
                overlay(axes[i, j], image, grid, draw_grid=False, box=box)
                axes[i, j].set_title(m, fontsize=8)
        fig.suptitle(f"{study}: variant 0 (green box: marker)", fontsize=9)
        figs.append(_save_fig(out / "figures" / f"{study}_models.png", fig))
        for model, frame in per_model.items():
            sub = frame[frame["study_id"] == study].sort_values("variant_id")
            if sub.empty:
                continue
            fig, axes = plt.subplots(len(methods), len(sub), figsize=(1.9 * len(sub), 2.0 * len(methods)), squeeze=False)
            image = read_image(sub.iloc[0]["image_file"])
            for c, (_, row) in enumerate(sub.iterrows()):
                for r, m in enumerate(methods):
                    overlay(axes[r, c], image, np.asarray(row[f"{m}_map"], dtype=float).reshape(ANALYSIS_GRID, ANALYSIS_GRID), draw_grid=False)
                    axes[r, c].set_title(f"v{row['variant_id']} {m}: {row['answer']}", fontsize=7)
            fig.suptitle(f"{model} / {study}: the six paraphrases", fontsize=9)
            slug = model.replace("/", "_")
            figs.append(_save_fig(out / "figures" / f"{study}_{slug}_paraphrases.png", fig))
    return figs


def write_report(out: Path, per_model: dict[str, pd.DataFrame], methods: Sequence[str], failures: pd.DataFrame,
                 study_problems: list[dict[str, Any]], manifests: dict[str, Any], max_figures: int, seed: int = 0,
                 n_resamples: int = 1999) -> dict[str, Any]:
    """Write per_row.csv, robustness.csv, stats.csv, summary.json, figures and index.html; return the summary."""
    per_row = combine(per_model, methods)
    with atomic_output(out / "per_row.csv") as tmp:
        per_row.to_csv(tmp, index=False)
    robust: dict[str, pd.DataFrame] = {}
    robust_summary: dict[str, Any] = {}
    for model, frame in per_model.items():
        robust[model], robust_summary[model] = robustness_table(frame, methods)
    rob = pd.concat([r.assign(model=m) for m, r in robust.items()], ignore_index=True)
    with atomic_output(out / "robustness.csv") as tmp:
        rob.to_csv(tmp, index=False)
    st = stats_table(per_model, robust, methods, seed, n_resamples)
    with atomic_output(out / "stats.csv") as tmp:
        st.to_csv(tmp, index=False)
    figures = _figures(out, per_model, methods, out, max_figures)

    def est(model: str, metric: str) -> dict[str, Any]:
        hit = st[(st["model"] == model) & (st["metric"] == metric)]
        return {} if hit.empty else {k: (None if pd.isna(v) else v) for k, v in hit.iloc[0].to_dict().items() if k != "model"}

    names = list(per_model)
    summary = {
        "models": {m: {"fingerprint": manifests[m]["model"].get("fingerprint"), "rows": int(len(per_model[m])),
                       "elapsed_s": manifests[m].get("elapsed_s"), "accuracy": est(m, "accuracy"), "flip_rate": est(m, "flip_rate"),
                       "robustness": robust_summary[m],
                       "marker_ratio": {meth: est(m, f"{meth}_marker_ratio") for meth in methods},
                       "finding_ratio": {meth: est(m, f"{meth}_finding_ratio") for meth in methods}} for m in names},
        "methods": list(methods), "failures": failures.to_dict("records"), "study_problems": study_problems,
        "files": {"per_row": "per_row.csv", "robustness": "robustness.csv", "stats": "stats.csv", "figures": [str(Path(f).relative_to(out)) for f in figures]},
    }
    if len(names) == 2:
        summary["difference"] = {meth: est(f"{names[0]} - {names[1]}", f"{meth}_marker_ratio") for meth in methods}
    atomic_write_json(out / "summary.json", summary)
    keep = ["model", "metric", "estimate", "low", "high", "n_rows", "n_studies", "wilcoxon_p", "permutation_p"]
    sections = [
        Section("Statistics (95% CIs from a bootstrap over studies)", tables=[st[[c for c in keep if c in st.columns]]]),
        Section("Paraphrase robustness per study", tables=[rob]),
        Section("Figures", figures=figures),
        Section("Failures and problems", text=f"{len(failures)} failed row(s); {len(study_problems)} study problem(s).",
                tables=[failures[["case_id", "source", "error_type", "message"]]] if len(failures) else []),
        Section("Files", links=[out / "per_row.csv", out / "robustness.csv", out / "stats.csv", out / "summary.json"]),
    ]
    write_index_html(out / "index.html", f"compare-attention: {' vs '.join(names)}", sections, {"models": summary["models"]})
    return summary
