"""Visual-search reports from a finished (or resumed) run folder: evaluation, prompt sensitivity, per-head
features, TP-vs-FN head rankings, figures and ``index.html``.

Everything here is a function of the stored per-case results and attention caches, so a resumed run writes
the same reports as an uninterrupted one. Files (under the run folder): ``per_case.csv``, ``summary.json``,
``prompt_sensitivity.csv``, ``stats/per_head_features.parquet``, ``stats/head_rankings.csv``,
``figs/*.png`` (TP and FN cases first), ``index.html``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses import map_metrics
from analyses.pipelines.html_index import Section, write_index_html
from analyses.pipelines.provenance import atomic_output, atomic_write_json
from analyses.pipelines.runner import load_failures, load_results
from analyses.pipelines.vlm_cases import cache_path
from analyses.stats import compare_groups, paraphrase_robustness

__all__ = ["write_reports", "evaluation", "prompt_sensitivity", "head_features", "head_rankings", "FEATURES", "OUTCOME_ORDER"]

OUTCOME_ORDER = ("TP", "FN", "FP", "TN")
#: per-head map features; target_mass and contrast need a target in the image (TP / FN cases)
FEATURES = ("entropy", "gini", "gini_simpson", "target_mass", "contrast", "image_share")
MEAN_HEAD = -1  # the ``head`` value of rows computed on the mean-over-heads map (a layer's ranking)


def _rate(k: int, n: int) -> dict[str, float | int | None]:
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return {"value": None, "low": None, "high": None, "k": k, "n": n}
    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    return {"value": k / n, "low": float(low), "high": float(high), "k": k, "n": n}


def evaluation(results: pd.DataFrame) -> dict[str, Any]:
    """Confusion counts, precision, recall, accuracy and yes-rate with 95% Wilson intervals."""
    counts = {o: int((results["outcome"] == o).sum()) for o in OUTCOME_ORDER}
    tp, fp, fn = counts["TP"], counts["FP"], counts["FN"]
    n = int(len(results))
    return {"confusion": counts, "precision": _rate(tp, tp + fp), "recall": _rate(tp, tp + fn),
            "accuracy": _rate(int(results["correct"].sum()), n), "yes_rate": _rate(tp + fp, n), "n": n}


def prompt_sensitivity(results: pd.DataFrame, templates: list[str]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per template: accuracy, yes-rate and flip rate against the first template; summary incl. Fleiss' kappa."""
    long = pd.DataFrame([{"case_id": cid, "template": t, "answer": ans, "present": present}
                         for cid, answers, present in zip(results["case_id"], results["template_answers"], results["present"])
                         for t, ans in enumerate(answers)])
    rows = []
    first = long[long["template"] == 0].set_index("case_id")["answer"]
    for t, text in enumerate(templates):
        sub = long[long["template"] == t].set_index("case_id")
        said_yes = sub["answer"] == "yes"
        rows.append({"template": t, "prompt": text, "n": len(sub), "accuracy": float((said_yes == sub["present"]).mean()),
                     "yes_rate": float(said_yes.mean()), "flip_rate_vs_first": float((sub["answer"] != first[sub.index]).mean())})
    summary: dict[str, float] = {}
    if len(templates) > 1:
        with warnings.catch_warnings():  # Fleiss' kappa is 0/0 (NaN -> null) when every answer is the same
            warnings.simplefilter("ignore", RuntimeWarning)
            _, summary = paraphrase_robustness(long, "case_id", "answer", variant="template", original=0)
    return pd.DataFrame(rows), summary


def head_features(results: pd.DataFrame, output_dir: Path) -> pd.DataFrame:
    """Long table: one row per case x layer x head (``-1`` = mean over heads) x feature, from the attention caches."""
    frames = []
    for cid, outcome, rel in zip(results["case_id"], results["outcome"], results["attn_cache"]):
        with np.load(output_dir / rel) as z:
            attn, target = torch.from_numpy(z["attention"]).double(), torch.from_numpy(z["target"])
        maps = torch.cat([attn, attn.mean(1, keepdim=True)], dim=1)  # layers (heads + 1) rows cols
        values = {"entropy": map_metrics.entropy(maps, 2), "gini": map_metrics.gini(maps, 2),
                  "gini_simpson": map_metrics.gini_simpson(maps, 2), "image_share": maps.sum((-2, -1))}
        nan = torch.full(maps.shape[:2], float("nan"), dtype=torch.float64)
        has_target = bool(target.any())
        values["target_mass"] = map_metrics.box_mass(maps, target) if has_target else nan
        values["contrast"] = map_metrics.contrast(maps, target) if has_target and not bool(target.all()) else nan
        n_layers, n_heads = maps.shape[:2]
        heads = list(range(n_heads - 1)) + [MEAN_HEAD]
        for feature in FEATURES:
            v = values[feature].numpy()
            frames.append(pd.DataFrame({"case_id": cid, "outcome": outcome, "layer": np.repeat(np.arange(n_layers), n_heads),
                                        "head": np.tile(heads, n_layers), "feature": feature, "value": v.reshape(-1)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["case_id", "outcome", "layer", "head", "feature", "value"])


RANKING_COLUMNS = ["rank", "comparison", "layer", "head", "feature", "rank_biserial", "p_value", "q_bh", "n_a", "n_b", "mean_a", "mean_b"]


def head_rankings(features: pd.DataFrame) -> pd.DataFrame:
    """Heads and layers (head -1) ranked by how a feature separates hits from misses.

    Two comparisons: ``TP vs FN`` (target present: found or missed; the study's question) and ``correct vs wrong``
    (every case; defined even for a model that always answers the same). Mann-Whitney U per (comparison, layer,
    head, feature), rank-biserial effect (positive: larger in the first group, ``mean_a``), BH q-values over
    every row of a comparison; sorted by comparison, q, then |effect|. A comparison lacking one of its groups
    is left out (``summary.json`` says so).
    """
    frames = []
    correct = features["outcome"].isin(["TP", "TN"])
    splits = {"TP vs FN": (features[features["outcome"].isin(["TP", "FN"])], "outcome", "TP", "FN"),
              "correct vs wrong": (features.assign(group=np.where(correct, "correct", "wrong")), "group", "correct", "wrong")}
    for name, (sub, column, a, b) in splits.items():
        sub = sub.dropna(subset=["value"])
        both = sub.groupby(["layer", "head", "feature"])[column].transform("nunique") == 2
        sub = sub[both]  # e.g. target_mass exists only where the target is present
        if sub.empty:
            continue
        table = compare_groups(sub, "value", column, a, b, units=("layer", "head", "feature"), tests=("mannwhitney",),
                               effects=("rank_biserial",), ci=False, correction=("fdr_bh",))
        table["abs_effect"] = table["rank_biserial"].abs()
        table = table.sort_values(["q_bh", "abs_effect", "layer", "head", "feature"], ascending=[True, False, True, True, True], kind="stable")
        table.insert(0, "rank", np.arange(1, len(table) + 1))
        frames.append(table.assign(comparison=name))
    if not frames:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    return pd.concat(frames, ignore_index=True)[RANKING_COLUMNS]


def _plain_lists(frame: pd.DataFrame) -> pd.DataFrame:
    """List / array cells as JSON text, so a CSV reads back unambiguously."""
    out = frame.copy()
    for col in out.columns:
        if out[col].map(lambda v: isinstance(v, (list, np.ndarray))).any():
            out[col] = out[col].map(lambda v: json.dumps(_json_safe(v)) if isinstance(v, (list, np.ndarray)) else v)
    return out


def _json_safe(value: Any) -> Any:
    """NaN / inf -> None and numpy scalars -> Python, so summary.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def _case_figures(results: pd.DataFrame, output_dir: Path, max_figures: int) -> list[Path]:
    import matplotlib.pyplot as plt

    from analyses.figures import map_panel
    from analyses.pipelines.vlm_cases import load_image

    order = results.assign(_o=results["outcome"].map({o: i for i, o in enumerate(OUTCOME_ORDER)})).sort_values(["_o", "case_index"], kind="stable")
    paths = []
    for _, row in order.head(max_figures).iterrows():
        with np.load(output_dir / row["attn_cache"]) as z:
            attn = z["attention"]
        maps = {f"layer {layer}": attn[layer].mean(0) for layer in range(attn.shape[0])}
        path = cache_path(output_dir, "figs", f"{row['outcome']}_{row['case_id']}", ".png")
        title = f"{row['case_id']}: {row['outcome']} ('{row['query']}', P(yes)={row['p_yes']:.2f}); mean over heads"
        with atomic_output(path) as tmp:
            fig = map_panel(load_image(row["image_path"]), maps, title=title, save=tmp)
            plt.close(fig)
        paths.append(path)
    return paths


def _ranking_figure(rankings: pd.DataFrame, output_dir: Path, feature: str = "target_mass") -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    from analyses.figures import layer_head_grid

    heads = rankings[rankings["head"] >= 0]
    comparison = next((c for c in ("TP vs FN", "correct vs wrong") if (heads["comparison"] == c).any()), None)
    if comparison is None:
        return None
    heads = heads[heads["comparison"] == comparison]
    if not (heads["feature"] == feature).any():  # e.g. correct vs wrong has no target feature: its top-ranked one
        feature = str(heads["feature"].iloc[0])
    sub = heads[heads["feature"] == feature]
    if sub.empty:
        return None
    grid = np.full((int(sub["layer"].max()) + 1, int(sub["head"].max()) + 1), np.nan)
    grid[sub["layer"].astype(int), sub["head"].astype(int)] = sub["rank_biserial"]
    path = output_dir / "figs" / f"heads_{comparison.replace(' ', '_')}_{feature}.png"
    first = comparison.split(" vs ")[0]
    with atomic_output(path) as tmp:
        fig = layer_head_grid(grid, title=f"{comparison}: rank-biserial of {feature}", label=f"rank-biserial (+: larger in {first})",
                              cmap="coolwarm", norm=Normalize(-1, 1), save=tmp)
        plt.close(fig)
    return path


def write_reports(output_dir: str | Path, templates: list[str], manifest: dict[str, Any] | None = None, max_figures: int = 12) -> dict[str, Any]:
    """Write every report file of a visual-search run folder; return the summary (also ``summary.json``)."""
    out = Path(output_dir)
    results = load_results(out)
    failures = load_failures(out)
    if results.empty:
        first = f" (first: {failures['source'].iloc[0]}: {failures['message'].iloc[0]})" if len(failures) else ""
        raise ValueError(f"no case of this run finished; {len(failures)} failed{first}. Their errors are in "
                         f"{out / 'failures'} (load_failures); fix the dataset or the options and rerun.")
    columns = ["case_id", "query", "present", "answer", "p_yes", "logit_diff", "outcome", "correct", "n_objects",
               "target_cells", "pooling", "image_share", "attn_cache"]
    _write_csv(_plain_lists(results[columns]), out / "per_case.csv")
    sensitivity, sens_summary = prompt_sensitivity(results, templates)
    _write_csv(sensitivity, out / "prompt_sensitivity.csv")
    features = head_features(results, out)
    with atomic_output(out / "stats" / "per_head_features.parquet") as tmp:
        features.to_parquet(tmp, index=False)
    rankings = head_rankings(features)
    _write_csv(rankings, out / "stats" / "head_rankings.csv")
    summary = {"evaluation": evaluation(results), "prompt_sensitivity": sens_summary, "templates": templates,
               "pooling": sorted(results["pooling"].unique().tolist()), "failed_cases": int(len(failures)),
               "top_heads": {c: t.head(5).to_dict("records") for c, t in rankings.groupby("comparison", sort=False)},
               "ranking_notes": [f"no {c} ranking: the run has no case in one of its groups" for c in ("TP vs FN", "correct vs wrong")
                                 if c not in set(rankings["comparison"])]}
    summary = _json_safe(summary)
    atomic_write_json(out / "summary.json", summary)
    figures = _case_figures(results, out, max_figures)
    ranking_fig = _ranking_figure(rankings, out)
    ev = summary["evaluation"]
    metrics = [(name, ev[name]["value"], ev[name]["low"], ev[name]["high"], ev[name]["k"], ev[name]["n"])
               for name in ("accuracy", "precision", "recall", "yes_rate")]
    sections = [
        Section("Evaluation", "Presence answers for the first prompt template; 95% Wilson intervals.",
                tables=[(["metric", "value", "low", "high", "k", "n"], metrics), pd.DataFrame([ev["confusion"]])]),
        Section("Prompt sensitivity", f"Flip rate: share of cases whose answer differs from the first template's. {sens_summary}",
                tables=[sensitivity]),
        Section("Heads and layers separating hits from misses", "Mann-Whitney U per layer x head x feature (head -1: mean over "
                "heads), rank-biserial (+: larger in the first group), BH q-values over each comparison's rows. "
                + " ".join(summary["ranking_notes"]),
                tables=[t.head(15) for _, t in rankings.groupby("comparison", sort=False)], figures=[ranking_fig] if ranking_fig else []),
        Section("Cases (TP and FN first)", "Answer-token attention to the image, mean over heads, per layer.", figures=figures),
        Section("Failed cases", tables=[failures[["case_id", "source", "stage", "error_type", "message"]]] if len(failures) else []),
        Section("Files", links=[out / "per_case.csv", out / "summary.json", out / "prompt_sensitivity.csv",
                                out / "stats" / "per_head_features.parquet", out / "stats" / "head_rankings.csv", out / "manifest.json"]),
    ]
    write_index_html(out / "index.html", "hooked-vlm visual-search", sections, manifest)
    return summary
