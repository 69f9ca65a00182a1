"""analyses.stats against scipy / statsmodels references, hand computations and seeded simulations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analyses import stats as st


def _brute_cliff(a, b):
    return sum(int(x > y) - int(x < y) for x in a for y in b) / (len(a) * len(b))


def test_rank_biserial_sign_and_value_by_hand():
    a, b = [3.0, 4.0, 5.0], [1.0, 2.0, 3.0]
    # pairs: a>b in 8 of 9, one tie (3, 3) -> P(a>b) - P(a<b) = 8/9
    assert st.rank_biserial(a, b) == pytest.approx(8 / 9)
    assert st.rank_biserial(b, a) == pytest.approx(-8 / 9)
    assert st.cliffs_delta(a, b) == pytest.approx(8 / 9)


def test_cliffs_delta_equals_rank_biserial_and_brute_force():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 23).astype(float)  # many ties
    b = rng.integers(1, 7, 17).astype(float)
    ref = _brute_cliff(a, b)
    assert st.cliffs_delta(a, b) == pytest.approx(ref)
    assert st.rank_biserial(a, b) == pytest.approx(ref)


def test_cohens_d_and_hedges_g_by_hand():
    a, b = np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0])
    pooled = np.sqrt((2 * 4.0 + 2 * 1.0) / 4)  # variances 4 and 1
    assert st.cohens_d(a, b) == pytest.approx(2.0 / pooled)
    df = 4
    j_approx = 1 - 3 / (4 * df - 1)  # the usual approximation of the exact J
    assert st.hedges_g(a, b) == pytest.approx(2.0 / pooled * j_approx, rel=2e-2)


def test_paired_rank_biserial_by_hand():
    first, second = [5, 6, 7, 1], [4, 4, 4, 3]  # diffs 1, 2, 3, -2 -> ranks 1, 2.5, 4, 2.5
    assert st.paired_rank_biserial(first, second) == pytest.approx((1 + 2.5 + 4 - 2.5) / 10)


def test_two_group_tests_match_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 1, 30), rng.normal(0, 2, 25)
    assert st.two_group_test(a, b, "mannwhitney")[1] == pytest.approx(sps.mannwhitneyu(a, b).pvalue)
    assert st.two_group_test(a, b, "welch")[1] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    # permutation p-value close to the Welch/t p-value for normal data
    p_perm = st.two_group_test(a, b, "permutation", n_permutations=4999)[1]
    assert abs(p_perm - sps.ttest_ind(a, b).pvalue) < 0.03
    x, y = rng.normal(0, 1, 20), rng.normal(0.3, 1, 20)
    assert st.paired_test(x, y, "wilcoxon")[1] == pytest.approx(sps.wilcoxon(x, y).pvalue)
    assert st.paired_test(x, y, "paired_t")[1] == pytest.approx(sps.ttest_rel(x, y).pvalue)


def test_bad_inputs_raise_named_errors():
    with pytest.raises(ValueError, match="NaN or inf"):
        st.rank_biserial([1.0, np.nan], [1.0])
    with pytest.raises(ValueError, match="differ in length"):
        st.paired_test([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="unknown test"):
        st.two_group_test([1, 2], [3, 4], "ttest")
    with pytest.raises(ValueError, match="one label per value"):
        st.bootstrap_ci([1.0, 2.0, 3.0], clusters=[0, 1])


def test_qvalues_equal_statsmodels_on_random_pvalues():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(2)
    p = np.concatenate([rng.uniform(size=300), rng.uniform(0, 1e-3, size=30)])
    frame = pd.DataFrame({"layer": np.repeat(np.arange(11), 30), "head": np.tile(np.arange(30), 11), "p_value": p,
                          "test": "mannwhitney"})
    out = st.add_qvalues(frame)
    for method, col in (("fdr_bh", "q_bh"), ("fdr_by", "q_by"), ("holm", "p_holm")):
        np.testing.assert_allclose(out[col].to_numpy(), multipletests(p, method=method)[1], rtol=0, atol=1e-12)
    # BH by hand on a tiny vector: sorted p * m / rank, then cumulative minimum from the top
    q = st.add_qvalues(pd.DataFrame({"p_value": [0.01, 0.04, 0.03, 0.5]}), by=None, methods=["fdr_bh"])["q_bh"]
    np.testing.assert_allclose(q, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])


def test_compare_groups_is_tidy_per_unit_and_test_and_finds_the_planted_head():
    rng = np.random.default_rng(3)
    rows = []
    for layer in range(2):
        for head in range(3):
            shift = 1.5 if (layer, head) == (1, 2) else 0.0
            for grp, n in (("correct", 20), ("missed", 15)):
                for v in rng.normal(shift if grp == "correct" else 0.0, 1, n):
                    rows.append({"layer": layer, "head": head, "case": grp, "entropy": v})
    frame = pd.DataFrame(rows)
    out = st.compare_groups(frame, "entropy", "case", "correct", "missed", units=["layer", "head"], n_resamples=199)
    assert len(out) == 2 * 3 * 2 and set(out["test"]) == {"mannwhitney", "welch"}
    sub = frame[(frame.layer == 1) & (frame["head"] == 2)]
    xa, xb = sub[sub.case == "correct"].entropy, sub[sub.case == "missed"].entropy
    row = out[(out.layer == 1) & (out["head"] == 2) & (out.test == "mannwhitney")].iloc[0]
    assert row.p_value == pytest.approx(sps.mannwhitneyu(xa, xb).pvalue)
    assert row.rank_biserial == pytest.approx(_brute_cliff(xa.to_numpy(), xb.to_numpy())) and row.rank_biserial > 0
    assert row.rank_biserial_low < row.rank_biserial < row.rank_biserial_high
    best = out[out.test == "mannwhitney"].sort_values("q_bh").iloc[0]
    assert (best.layer, best["head"]) == (1, 2) and best.q_bh < 0.05


def test_compare_paired_matches_scipy():
    rng = np.random.default_rng(4)
    img = np.arange(25)
    with_t, without = rng.normal(1, 1, 25), rng.normal(0, 1, 25)
    frame = pd.DataFrame({"image": np.concatenate([img, img]), "cond": ["with"] * 25 + ["without"] * 25,
                          "mass": np.concatenate([with_t, without])})
    out = st.compare_paired(frame, "mass", "cond", "with", "without", pair="image")
    w = out[out.test == "wilcoxon"].iloc[0]
    assert w.p_value == pytest.approx(sps.wilcoxon(with_t, without).pvalue)
    assert w.mean_diff == pytest.approx((with_t - without).mean()) and w.rank_biserial > 0
    assert w.rank_biserial == pytest.approx(st.paired_rank_biserial(with_t, without))
    assert w.rank_biserial == pytest.approx(st._paired_rb_axis(with_t - without))  # vectorised bootstrap statistic
    d = with_t - without
    assert w.cohens_dz == pytest.approx(d.mean() / d.std(ddof=1))
    assert w.rank_biserial_low < w.rank_biserial < w.rank_biserial_high
    assert w.cohens_dz_low < w.cohens_dz < w.cohens_dz_high


def test_bootstrap_iid_matches_scipy_and_covers_the_mean():
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 1.0, 60)
    est, lo, hi = st.bootstrap_ci(x, method="BCa", n_resamples=999, seed=1)
    ref = sps.bootstrap((x,), np.mean, method="BCa", n_resamples=999, rng=np.random.default_rng(1)).confidence_interval
    assert est == pytest.approx(x.mean()) and (lo, hi) == pytest.approx((ref.low, ref.high))
    # a callable statistic with clusters takes the generic path; median of pooled values
    # effect-size CIs: the vectorised bootstrap statistic equals the scalar effect on the data
    a, b = x[:25], x[25:] - 0.5
    for eff in ("rank_biserial", "cohens_d", "hedges_g"):
        est, lo, hi = st.effect_size_ci(a, b, eff, n_resamples=199)
        assert est == pytest.approx(st._EFFECTS_AXIS[eff](a, b)) and lo < est < hi
    est_m, lo_m, hi_m = st.bootstrap_ci(x, np.median, clusters=np.arange(60) // 3, n_resamples=299)
    assert est_m == pytest.approx(np.median(x)) and lo_m < est_m < hi_m


def _simulate_clustered(rng, n_clusters=15, per_cluster=8, sd_cluster=1.0, sd_noise=0.3):
    effects = rng.normal(0, sd_cluster, n_clusters)
    values = np.repeat(effects, per_cluster) + rng.normal(0, sd_noise, n_clusters * per_cluster)
    return values, np.repeat(np.arange(n_clusters), per_cluster)


def test_clustered_bootstrap_covers_where_iid_undercovers():
    """Seeded simulation, true mean 0, strong within-cluster correlation (ICC ~0.9, 15 clusters of 8)."""
    rng = np.random.default_rng(6)
    hits_cluster = hits_iid = 0
    reps = 120
    for r in range(reps):
        x, c = _simulate_clustered(rng)
        _, lo, hi = st.bootstrap_ci(x, clusters=c, n_resamples=400, seed=r)
        hits_cluster += lo <= 0.0 <= hi
        _, lo, hi = st.bootstrap_ci(x, n_resamples=400, seed=r)
        hits_iid += lo <= 0.0 <= hi
    cov_c, cov_i = hits_cluster / reps, hits_iid / reps
    assert 0.85 <= cov_c <= 1.0, cov_c  # percentile bootstrap with 15 clusters: ~0.9-0.95
    assert cov_i < 0.6, cov_i  # design effect ~8: the i.i.d. interval is ~2.8x too narrow


def test_clustered_bca_runs_and_contains_estimate():
    x, c = _simulate_clustered(np.random.default_rng(7))
    est, lo, hi = st.bootstrap_ci(x, clusters=c, method="BCa", n_resamples=499)
    assert lo < est < hi and est == pytest.approx(x.mean())


def test_paraphrase_robustness_by_hand_and_fleiss_kappa_matches_statsmodels():
    from statsmodels.stats.inter_rater import fleiss_kappa

    table = pd.DataFrame({
        "question": ["q1"] * 3 + ["q2"] * 3 + ["q3"] * 3,
        "variant": ["orig", "p1", "p2"] * 3,
        "answer": ["yes", "yes", "no", "no", "no", "no", "yes", "no", "no"],
    })
    per, summary = st.paraphrase_robustness(table, "question", "answer", variant="variant", original="orig")
    per = per.set_index("question")
    assert per.loc["q1", "flip_rate"] == pytest.approx(0.5) and per.loc["q1", "agreement"] == pytest.approx(2 / 3)
    assert per.loc["q2", "flip_rate"] == 0.0 and per.loc["q3", "majority"] == "no"
    assert per.loc["q3", "flip_rate"] == pytest.approx(1.0)
    # hand counts: rows = items, columns = (yes, no)
    counts = np.array([[2, 1], [0, 3], [1, 2]])
    assert summary["fleiss_kappa"] == pytest.approx(fleiss_kappa(counts))
    assert summary["any_flip"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="every item answered by every rater"):
        st.fleiss_kappa_of(table.iloc[:-1], "question", "variant", "answer")


def test_map_consistency_js_by_hand():
    p = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # disjoint maps have JS divergence 1 (base 2)
    out = st.map_consistency({"img": p}).iloc[0]
    assert out.mean_js == pytest.approx(2 / 3) and out.max_js == pytest.approx(1.0)
    # hand JS of (0.5, 0.5) vs (1, 0): m = (0.75, 0.25)
    m = np.array([0.75, 0.25])
    kl = lambda a, b: sum(x * np.log2(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    ref = 0.5 * kl([0.5, 0.5], m) + 0.5 * kl([1, 0], m)
    assert st.map_consistency(np.array([[2.0, 2.0], [3.0, 0.0]])).iloc[0].mean_js == pytest.approx(ref)
    with pytest.raises(ValueError, match="at least 2 per item"):
        st.map_consistency({"x": p[:1]})
