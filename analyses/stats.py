"""Statistics that make interpretability findings trustworthy, on scipy and statsmodels.

* Two-group tests per unit (layer x head x feature): Mann-Whitney U, Welch t, permutation
  (:func:`compare_groups`); paired tests: Wilcoxon signed-rank, paired t (:func:`compare_paired`).
* Effect sizes with bootstrap CIs: rank-biserial / Cliff's delta, Cohen's d, Hedges' g.
* Multiple testing over every row of a table: Benjamini-Hochberg and Benjamini-Yekutieli q-values,
  Holm-adjusted p-values (:func:`add_qvalues`, statsmodels ``multipletests``).
* Bootstrap CIs, percentile and BCa, i.i.d. or **clustered** (whole clusters resampled: study, image,
  paraphrase group, video) (:func:`bootstrap_ci`, scipy ``stats.bootstrap``).
* Paraphrase robustness: flip rate, agreement with the majority answer, Fleiss' kappa
  (:func:`paraphrase_robustness`); cross-prompt consistency of attention maps by Jensen-Shannon
  divergence (:func:`map_consistency`).

Sign convention (one for every effect size here): **positive means group ``a`` (or, paired, the
first condition) tends to be larger**. Rank-biserial = ``2 U_a / (n_a n_b) - 1`` = P(a > b) - P(a < b),
which equals Cliff's delta for two independent samples (the seed repositories' ``1 - 2U/mn`` is the
same number with the opposite sign when U is ``U_a``). Paired rank-biserial (matched pairs) =
(sum of ranks of positive differences - sum of ranks of negative differences) / total rank sum of
``first - second``.

Every table is tidy: one row per unit and test, ready for Parquet / CSV.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Any, Literal

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy import stats as sps
import torch

from analyses.map_metrics import js_divergence

__all__ = [
    "rank_biserial", "cliffs_delta", "cohens_d", "hedges_g", "paired_rank_biserial",
    "effect_size_ci", "two_group_test", "paired_test", "compare_groups", "compare_paired",
    "add_qvalues", "bootstrap_ci", "paraphrase_robustness", "fleiss_kappa_of", "map_consistency",
]

TwoGroupTest = Literal["mannwhitney", "welch", "permutation"]
PairedTest = Literal["wilcoxon", "paired_t"]
Effect = Literal["rank_biserial", "cliffs_delta", "cohens_d", "hedges_g"]


def _clean(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty: each group needs at least one observation")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf; drop or impute those values first")
    return a


# ----------------------------------------------------------------------------- effect sizes
def rank_biserial(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank-biserial correlation ``2 U_a / (n_a n_b) - 1`` (positive when ``a`` tends to be larger)."""
    a, b = _clean(a, "a"), _clean(b, "b")
    u_a = sps.mannwhitneyu(a, b, alternative="two-sided").statistic
    return float(2.0 * u_a / (a.size * b.size) - 1.0)


def cliffs_delta(a: Sequence[float], b: Sequence[float]) -> float:
    """Cliff's delta P(a > b) - P(a < b), by counting all pairs (equals :func:`rank_biserial`)."""
    a, b = _clean(a, "a"), _clean(b, "b")
    b_sorted = np.sort(b)
    greater = np.searchsorted(b_sorted, a, side="left").sum()  # b values strictly below each a
    less = (b.size - np.searchsorted(b_sorted, a, side="right")).sum()  # b values strictly above
    return float((greater - less) / (a.size * b.size))


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float:
    """(mean a - mean b) / pooled standard deviation (ddof 1)."""
    a, b = _clean(a, "a"), _clean(b, "b")
    na, nb = a.size, b.size
    if na + nb < 3:
        raise ValueError("Cohen's d needs at least 3 observations in total")
    pooled = np.sqrt(((na - 1) * a.var(ddof=1 if na > 1 else 0) + (nb - 1) * b.var(ddof=1 if nb > 1 else 0)) / (na + nb - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Cohen's d times the small-sample correction ``J = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2))``."""
    from scipy.special import gammaln

    df = np.asarray(a).size + np.asarray(b).size - 2
    j = np.exp(gammaln(df / 2) - gammaln((df - 1) / 2)) / np.sqrt(df / 2)
    return float(cohens_d(a, b) * j)


def paired_rank_biserial(first: Sequence[float], second: Sequence[float]) -> float:
    """Matched-pairs rank-biserial of ``first - second`` (zero differences dropped, as Wilcoxon's default)."""
    d = _clean(first, "first") - _clean(second, "second")
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    r = sps.rankdata(np.abs(d))
    return float((r[d > 0].sum() - r[d < 0].sum()) / r.sum())


_EFFECTS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "rank_biserial": rank_biserial, "cliffs_delta": cliffs_delta, "cohens_d": cohens_d, "hedges_g": hedges_g,
}


def _dominance_axis(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Vectorised P(x > y) - P(x < y) over resamples (rank-biserial = Cliff's delta), for the bootstrap."""
    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    return np.sign(x[..., :, None] - y[..., None, :]).mean(axis=(-1, -2))


def _d_axis(x: np.ndarray, y: np.ndarray, axis: int = -1, hedges: bool = False) -> np.ndarray:
    na, nb = x.shape[axis], y.shape[axis]
    pooled = np.sqrt(((na - 1) * x.var(axis=axis, ddof=1) + (nb - 1) * y.var(axis=axis, ddof=1)) / (na + nb - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (x.mean(axis=axis) - y.mean(axis=axis)) / pooled
    if hedges:
        from scipy.special import gammaln

        df = na + nb - 2
        d = d * np.exp(gammaln(df / 2) - gammaln((df - 1) / 2)) / np.sqrt(df / 2)
    return d


_EFFECTS_AXIS: dict[str, Callable[..., np.ndarray]] = {
    "rank_biserial": _dominance_axis, "cliffs_delta": _dominance_axis,
    "cohens_d": _d_axis, "hedges_g": lambda x, y, axis=-1: _d_axis(x, y, axis, hedges=True),
}


def effect_size_ci(
    a: Sequence[float], b: Sequence[float], effect: Effect = "rank_biserial", confidence: float = 0.95,
    n_resamples: int = 999, method: Literal["percentile", "BCa"] = "BCa", seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): a two-sample bootstrap CI (each group resampled on its own, scipy ``bootstrap``)."""
    if effect not in _EFFECTS:
        raise ValueError(f"unknown effect {effect!r}; choose one of {sorted(_EFFECTS)}")
    a, b = _clean(a, "a"), _clean(b, "b")
    est = _EFFECTS[effect](a, b)
    if a.size < 2 or b.size < 2:
        return est, float("nan"), float("nan")
    batch = max(1, int(2e7 // (a.size * b.size)))  # bounds the pairwise-sign array of the dominance statistic
    with np.errstate(invalid="ignore", divide="ignore"):
        res = sps.bootstrap((a, b), _EFFECTS_AXIS[effect], vectorized=True, paired=False, confidence_level=confidence,
                            n_resamples=n_resamples, method=method, batch=batch, rng=np.random.default_rng(seed))
    return est, float(res.confidence_interval.low), float(res.confidence_interval.high)


# ----------------------------------------------------------------------------- tests
def two_group_test(
    a: Sequence[float], b: Sequence[float], test: TwoGroupTest = "mannwhitney",
    n_permutations: int = 9999, seed: int = 0, alternative: str = "two-sided",
) -> tuple[float, float]:
    """(statistic, p-value) of one two-group test: Mann-Whitney U (U of ``a``), Welch t, or a
    permutation test of the difference in means."""
    a, b = _clean(a, "a"), _clean(b, "b")
    if test == "mannwhitney":
        r = sps.mannwhitneyu(a, b, alternative=alternative)
    elif test == "welch":
        r = sps.ttest_ind(a, b, equal_var=False, alternative=alternative)
    elif test == "permutation":
        r = sps.permutation_test((a, b), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                                 vectorized=True, n_resamples=n_permutations, alternative=alternative,
                                 permutation_type="independent", rng=np.random.default_rng(seed))
    else:
        raise ValueError(f"unknown test {test!r}; choose mannwhitney, welch or permutation")
    return float(r.statistic), float(r.pvalue)


def paired_test(first: Sequence[float], second: Sequence[float], test: PairedTest = "wilcoxon",
                alternative: str = "two-sided") -> tuple[float, float]:
    """(statistic, p-value) of a paired test on ``first - second``: Wilcoxon signed-rank or paired t."""
    x, y = _clean(first, "first"), _clean(second, "second")
    if x.size != y.size:
        raise ValueError(f"paired samples differ in length ({x.size} vs {y.size}); pair them by id first")
    if test == "wilcoxon":
        if np.all(x == y):
            return 0.0, 1.0
        r = sps.wilcoxon(x, y, alternative=alternative)
    elif test == "paired_t":
        r = sps.ttest_rel(x, y, alternative=alternative)
    else:
        raise ValueError(f"unknown paired test {test!r}; choose wilcoxon or paired_t")
    return float(r.statistic), float(r.pvalue)


def _units(frame: pd.DataFrame, units: Sequence[str]) -> Any:
    missing = [u for u in units if u not in frame.columns]
    if missing:
        raise KeyError(f"unit column(s) {missing} not in the table; columns are {list(frame.columns)}")
    return frame.groupby(list(units), sort=True, dropna=False) if units else [((), frame)]


def compare_groups(
    frame: pd.DataFrame, value: str, group: str, a: Any, b: Any, units: Sequence[str] = (),
    tests: Sequence[TwoGroupTest] = ("mannwhitney", "welch"), effects: Sequence[Effect] = ("rank_biserial", "hedges_g"),
    ci: bool = True, n_resamples: int = 999, n_permutations: int = 9999, seed: int = 0,
    correction: Sequence[str] = ("fdr_bh", "fdr_by", "holm"),
) -> pd.DataFrame:
    """Two-group tests per unit (e.g. per layer x head x feature), one row per unit and test.

    ``frame`` is long: one row per observation with the unit columns, a ``group`` column holding
    ``a`` or ``b`` (e.g. "correct" / "missed") and the ``value``. Columns out: the units, ``test``,
    ``statistic``, ``p_value``, ``n_a``, ``n_b``, ``mean_a``, ``mean_b``, one ``<effect>`` column per effect
    (with ``<effect>_low`` / ``_high`` when ``ci``), then q-values over all rows of the same test
    (:func:`add_qvalues`). Effect signs: positive = ``a`` larger.
    """
    rows = []
    for key, sub in _units(frame, units):
        key = key if isinstance(key, tuple) else (key,)
        xa = sub.loc[sub[group] == a, value].to_numpy(float)
        xb = sub.loc[sub[group] == b, value].to_numpy(float)
        if xa.size == 0 or xb.size == 0:
            raise ValueError(f"unit {dict(zip(units, key))} has no rows with {group} == {a if xa.size == 0 else b!r}")
        eff: dict[str, float] = {}
        for e in effects:
            if ci:
                eff[e], eff[f"{e}_low"], eff[f"{e}_high"] = effect_size_ci(xa, xb, e, n_resamples=n_resamples, seed=seed)
            else:
                eff[e] = _EFFECTS[e](xa, xb)
        for t in tests:
            stat, p = two_group_test(xa, xb, t, n_permutations=n_permutations, seed=seed)
            rows.append({**dict(zip(units, key)), "test": t, "statistic": stat, "p_value": p, "n_a": xa.size,
                         "n_b": xb.size, "mean_a": xa.mean(), "mean_b": xb.mean(), **eff})
    return add_qvalues(pd.DataFrame(rows), methods=correction)


def _paired_rb_axis(d: np.ndarray, axis: int = -1) -> np.ndarray:
    """Vectorised matched-pairs rank-biserial of differences ``d`` (zeros dropped), for the bootstrap."""
    d = np.moveaxis(d, axis, -1)
    r = sps.rankdata(np.where(d == 0, np.nan, np.abs(d)), axis=-1, nan_policy="omit")
    pos = np.nansum(np.where(d > 0, r, 0.0), axis=-1)
    neg = np.nansum(np.where(d < 0, r, 0.0), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pos + neg > 0, (pos - neg) / (pos + neg), 0.0)


def _dz_axis(d: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return d.mean(axis=axis) / d.std(axis=axis, ddof=1)


def compare_paired(
    frame: pd.DataFrame, value: str, condition: str, first: Any, second: Any, pair: str, units: Sequence[str] = (),
    tests: Sequence[PairedTest] = ("wilcoxon", "paired_t"), correction: Sequence[str] = ("fdr_bh", "fdr_by", "holm"),
    ci: bool = True, n_resamples: int = 999, seed: int = 0,
) -> pd.DataFrame:
    """Paired tests per unit (e.g. with vs without the target, matched by ``pair`` = image id).

    One row per unit and test: ``statistic``, ``p_value``, ``n_pairs``, ``mean_diff`` (first - second),
    ``rank_biserial`` (matched pairs, positive = first larger), ``cohens_dz`` (mean diff / sd of diffs),
    each with a BCa bootstrap CI over pairs when ``ci`` (``_low`` / ``_high``), then q-values.
    """
    rows = []
    for key, sub in _units(frame, units):
        key = key if isinstance(key, tuple) else (key,)
        wide = sub.pivot_table(index=pair, columns=condition, values=value, aggfunc="mean")
        if first not in wide.columns or second not in wide.columns:
            raise ValueError(f"unit {dict(zip(units, key))} lacks condition {first!r} or {second!r}")
        wide = wide[[first, second]].dropna()
        x, y = wide[first].to_numpy(float), wide[second].to_numpy(float)
        d = x - y
        eff = {"rank_biserial": paired_rank_biserial(x, y), "cohens_dz": float(_dz_axis(d)) if d.size > 1 else float("nan")}
        if ci:
            for name, fn in (("rank_biserial", _paired_rb_axis), ("cohens_dz", _dz_axis)):
                lo = hi = float("nan")
                if d.size > 2 and np.ptp(d) > 0:
                    with np.errstate(invalid="ignore", divide="ignore"):
                        r = sps.bootstrap((d,), fn, vectorized=True, method="BCa", n_resamples=n_resamples,
                                          rng=np.random.default_rng(seed)).confidence_interval
                    lo, hi = float(r.low), float(r.high)
                eff[f"{name}_low"], eff[f"{name}_high"] = lo, hi
        for t in tests:
            stat, p = paired_test(x, y, t)
            rows.append({**dict(zip(units, key)), "test": t, "statistic": stat, "p_value": p, "n_pairs": d.size,
                         "mean_diff": d.mean(), **eff})
    return add_qvalues(pd.DataFrame(rows), methods=correction)


# ----------------------------------------------------------------------------- multiple testing
_Q_NAMES = {"fdr_bh": "q_bh", "fdr_by": "q_by", "holm": "p_holm", "bonferroni": "p_bonferroni"}


def add_qvalues(
    frame: pd.DataFrame, p: str = "p_value", by: Sequence[str] | None = ("test",),
    methods: Sequence[str] = ("fdr_bh", "fdr_by", "holm"),
) -> pd.DataFrame:
    """Add adjusted p-values over all rows (per value of ``by``, e.g. per test): ``q_bh``, ``q_by``,
    ``p_holm`` (statsmodels ``multipletests``). The family is every row: all layers x heads x features."""
    from statsmodels.stats.multitest import multipletests

    out = frame.copy()
    unknown = [m for m in methods if m not in _Q_NAMES]
    if unknown:
        raise ValueError(f"unknown correction(s) {unknown}; choose from {sorted(_Q_NAMES)}")
    if out.empty:
        for m in methods:
            out[_Q_NAMES[m]] = []
        return out
    by = [c for c in (by or ()) if c in out.columns]
    groups = list(out.groupby(by[0] if len(by) == 1 else by, sort=False).groups.values()) if by else [out.index]
    for m in methods:
        col = np.full(len(out), np.nan)
        for idx in groups:
            pv = out.loc[idx, p].to_numpy(float)
            ok = np.isfinite(pv)
            if ok.any():
                adj = multipletests(pv[ok], method=m)[1]
                pos = out.index.get_indexer(idx)
                col[pos[ok]] = adj
        out[_Q_NAMES[m]] = col
    return out


# ----------------------------------------------------------------------------- bootstrap
def bootstrap_ci(
    values: Sequence[float], statistic: Literal["mean"] | Callable[[np.ndarray], float] = "mean",
    clusters: Sequence[Any] | None = None, method: Literal["percentile", "BCa"] = "percentile",
    confidence: float = 0.95, n_resamples: int = 1999, seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high) by bootstrap (scipy ``stats.bootstrap``), i.i.d. or clustered.

    With ``clusters`` (one label per value: study, image, paraphrase group, video) whole clusters are
    resampled with replacement, so the CI reflects between-cluster variation; BCa's acceleration then
    comes from a leave-one-cluster-out jackknife. Observations within a cluster are usually correlated,
    and an i.i.d. bootstrap then gives intervals that are too narrow. ``statistic="mean"`` is the
    observation-weighted mean (fast, vectorised); a callable gets the pooled values of a resample.
    """
    x = _clean(values, "values")
    rng = np.random.default_rng(seed)
    is_mean = isinstance(statistic, str)
    if is_mean and statistic != "mean":
        raise ValueError(f"statistic must be 'mean' or a callable, got {statistic!r}")
    fn: Callable[[np.ndarray], float] = np.mean if is_mean else statistic  # type: ignore[assignment]
    est = float(fn(x))
    if clusters is None:
        if is_mean:
            res = sps.bootstrap((x,), np.mean, vectorized=True, method=method, confidence_level=confidence,
                                n_resamples=n_resamples, rng=rng)
        else:
            res = sps.bootstrap((x,), fn, vectorized=False, method=method, confidence_level=confidence,
                                n_resamples=n_resamples, rng=rng)
        return est, float(res.confidence_interval.low), float(res.confidence_interval.high)
    labels = np.asarray(clusters)
    if labels.shape[0] != x.size:
        raise ValueError(f"clusters has {labels.shape[0]} labels for {x.size} values; give one label per value")
    uniq, inv = np.unique(labels, return_inverse=True)
    if uniq.size < 2:
        raise ValueError("a clustered bootstrap needs at least 2 clusters")
    ids = np.arange(uniq.size)
    if is_mean:
        sums = np.bincount(inv, weights=x)
        counts = np.bincount(inv).astype(float)

        def stat(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            idx = idx.astype(int)
            return sums[idx].sum(axis=axis) / counts[idx].sum(axis=axis)

        res = sps.bootstrap((ids,), stat, vectorized=True, method=method, confidence_level=confidence,
                            n_resamples=n_resamples, rng=rng)
    else:
        members = [x[inv == k] for k in ids]
        res = sps.bootstrap((ids,), lambda idx: fn(np.concatenate([members[int(i)] for i in idx])), vectorized=False,
                            method=method, confidence_level=confidence, n_resamples=n_resamples, rng=rng)
    return est, float(res.confidence_interval.low), float(res.confidence_interval.high)


# ----------------------------------------------------------------------------- paraphrase robustness
def fleiss_kappa_of(table: pd.DataFrame, item: str, rater: str, answer: str) -> float:
    """Fleiss' kappa of answers (categories) given by raters (paraphrases) to items (questions), statsmodels."""
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    wide = table.pivot_table(index=item, columns=rater, values=answer, aggfunc="first")
    if wide.isna().any().any():
        bad = wide.index[wide.isna().any(axis=1)].tolist()[:5]
        raise ValueError(f"Fleiss' kappa needs every item answered by every rater (paraphrase); items {bad} are not")
    codes = pd.factorize(pd.Series(wide.to_numpy().ravel()))[0].reshape(wide.shape)
    counts, _ = aggregate_raters(codes)
    return float(fleiss_kappa(counts, method="fleiss"))


def paraphrase_robustness(
    table: pd.DataFrame, item: str, answer: str, variant: str | None = None, original: Any = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per item (question / image): how stable is the answer across its paraphrases?

    Rows of ``table``: one answer per (item, paraphrase). Per item: ``n``, ``majority`` answer (ties broken
    by first occurrence), ``agreement`` (share of paraphrases giving the majority answer), ``flip_rate``
    (share of paraphrases whose answer differs from the answer to the ``original`` variant, or from the
    majority when no original is named), ``n_answers`` (distinct answers). Summary: mean agreement, mean
    flip rate, share of items with any flip, and Fleiss' kappa (paraphrases as raters; needs ``variant``).
    """
    for c in [item, answer] + ([variant] if variant else []):
        if c not in table.columns:
            raise KeyError(f"column {c!r} not in the table; columns are {list(table.columns)}")
    if original is not None and variant is None:
        raise ValueError("naming an original variant needs the variant column (variant=...)")
    rows = []
    for key, sub in table.groupby(item, sort=True):
        ans = sub[answer].tolist()
        counts = pd.Series(ans).value_counts(sort=False)
        majority = counts.index[int(np.argmax(counts.to_numpy()))]
        ref = majority
        if original is not None:
            orig = sub.loc[sub[variant] == original, answer]
            if orig.empty:
                raise ValueError(f"item {key!r} has no row with {variant} == {original!r}")
            ref = orig.iloc[0]
            others = sub.loc[sub[variant] != original, answer].tolist()
        else:
            others = ans
        flip = float(np.mean([a != ref for a in others])) if others else 0.0
        rows.append({item: key, "n": len(ans), "majority": majority, "agreement": float(counts[majority] / len(ans)),
                     "flip_rate": flip, "n_answers": int(counts.size)})
    per_item = pd.DataFrame(rows)
    summary = {"mean_agreement": float(per_item["agreement"].mean()), "mean_flip_rate": float(per_item["flip_rate"].mean()),
               "any_flip": float((per_item["flip_rate"] > 0).mean())}
    if variant is not None:
        summary["fleiss_kappa"] = fleiss_kappa_of(table, item, variant, answer)
    return per_item, summary


# ----------------------------------------------------------------------------- map consistency
def map_consistency(
    maps: Mapping[Any, Float[np.ndarray, "n_maps cells"]] | Float[np.ndarray, "n_maps cells"], base: float = 2.0,
) -> pd.DataFrame:
    """Cross-prompt consistency of attention maps: pairwise Jensen-Shannon divergence.

    ``maps``: per item (image), the maps of its prompts (paraphrases) as rows; each is flattened and
    normalised to a distribution (non-negative, not all zero). JS divergence (base 2, in [0, 1]) =
    :func:`analyses.map_metrics.js_divergence` (equal to scipy's ``jensenshannon(p, q, base)**2``).
    One row per item: ``n_maps``, ``mean_js``, ``max_js`` over all pairs.
    """
    items = maps if isinstance(maps, Mapping) else {0: maps}
    rows = []
    for key, m in items.items():
        arr = np.asarray(m, dtype=float)
        arr = arr.reshape(arr.shape[0], -1)
        if arr.shape[0] < 2:
            raise ValueError(f"item {key!r} has {arr.shape[0]} map(s); consistency needs at least 2 per item")
        if (arr < 0).any() or (arr.sum(axis=1) <= 0).any():
            raise ValueError(f"item {key!r}: maps must be non-negative with positive mass to be distributions")
        p = arr / arr.sum(axis=1, keepdims=True)
        rows_t = torch.from_numpy(p)
        js = [float(js_divergence(rows_t[i], rows_t[j], base=base)) for i, j in combinations(range(p.shape[0]), 2)]
        rows.append({"item": key, "n_maps": p.shape[0], "mean_js": float(np.mean(js)), "max_js": float(np.max(js))})
    return pd.DataFrame(rows)
