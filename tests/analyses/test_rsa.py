"""RDMs, RSA and CKA against hand / brute-force references; invariances; layer x layer maps on real hooks."""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.stats import ortho_group

from analyses import rsa


def test_rdm_metrics_by_hand():
    X = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 7.0], [0.0, 1.0, -1.0], [3.0, 1.0, 2.0]])
    np.testing.assert_allclose(rsa.rdm(X, "correlation"), 1 - np.corrcoef(X), atol=1e-12)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(rsa.rdm(X, "cosine"), 1 - unit @ unit.T, atol=1e-12)
    eu = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    np.testing.assert_allclose(rsa.rdm(X, "euclidean"), eu, atol=1e-12)
    with pytest.raises(ValueError, match="metric must be"):
        rsa.rdm(X, "manhattan")


def test_rsa_spearman_and_permutation_p():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5))
    a, b = rsa.rdm(X), rsa.rdm(X + 0.3 * rng.normal(size=X.shape))
    out = rsa.rsa(a, b, n_permutations=499)
    iu = np.triu_indices(12, 1)
    assert out["rho"] == pytest.approx(sps.spearmanr(a[iu], b[iu]).statistic)
    assert out["p_value"] == pytest.approx(1 / 500)  # no permutation reaches the true pairing
    unrelated = rsa.rsa(a, rsa.rdm(rng.normal(size=(12, 5))), n_permutations=499)
    assert unrelated["p_value"] > 0.05
    with pytest.raises(ValueError, match="square and of equal size"):
        rsa.rsa(a, b[:5, :5])


def test_cka_is_one_under_orthogonal_rotation_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 10))
    Q = ortho_group.rvs(10, random_state=2)
    assert rsa.linear_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-10)
    assert rsa.linear_cka(X, 3.5 * X @ Q + 2.0) == pytest.approx(1.0, abs=1e-10)
    assert rsa.debiased_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-10)
    # independent representations: linear CKA is biased upward, debiased CKA is near 0
    Y = rng.normal(size=(30, 200))
    assert rsa.linear_cka(X, Y) > 0.2 and abs(rsa.debiased_cka(X, Y)) < 0.1


def test_linear_cka_matches_the_hsic_formula_with_a_centering_matrix():
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(9, 4)), rng.normal(size=(9, 6))
    n = 9
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H)  # noqa: E731
    assert rsa.linear_cka(X, Y) == pytest.approx(hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L)))


def _hsic_u_brute(K, L):
    """Song et al. (2012) unbiased HSIC as its three U-statistic sums over distinct indices."""
    n = K.shape[0]
    t1 = sum(K[i, j] * L[i, j] for i, j in permutations(range(n), 2)) / (n * (n - 1))
    t2 = sum(K[i, j] * L[q, r] for i, j, q, r in permutations(range(n), 4)) / (n * (n - 1) * (n - 2) * (n - 3))
    t3 = sum(K[i, j] * L[i, q] for i, j, q in permutations(range(n), 3)) / (n * (n - 1) * (n - 2))
    return t1 + t2 - 2 * t3


def test_debiased_cka_matches_brute_force_u_statistics():
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(7, 3)), rng.normal(size=(7, 5))
    K, L = X @ X.T, Y @ Y.T
    ref = _hsic_u_brute(K, L) / np.sqrt(_hsic_u_brute(K, K) * _hsic_u_brute(L, L))
    assert rsa.debiased_cka(X, Y) == pytest.approx(ref, rel=1e-9)


def test_layer_by_layer_cka_on_a_tiny_vlm_and_heatmap(tmp_path):
    """Image-token means of several images, per layer: the diagonal is 1 and the matrix symmetric."""
    import torch

    from analyses.activations import collect_activations
    from analyses.probes import features_from_dataset
    from vlm_cases import make_inputs

    model, _, _ = make_inputs("qwen2-vl-image")
    data = [(f"img{i}", make_inputs("qwen2-vl-image", seed=i)[1]) for i in range(6)]
    hooks = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)] + [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    ds = collect_activations(model, data, hooks, tmp_path / "acts", by=("item",), progress=False)
    feats, _ = features_from_dataset(ds, hooks, "image0")
    reps = {i: feats[h] for i, h in enumerate(hooks)}
    frame = rsa.similarity_matrix(reps, measure="cka")
    m = frame.pivot(index="a", columns="b", values="value").to_numpy()
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-10)
    np.testing.assert_allclose(m, m.T, atol=1e-10)
    assert m[0, 2] == pytest.approx(rsa.linear_cka(feats[hooks[0]].numpy(), feats[hooks[2]].numpy()))
    r = rsa.similarity_matrix(reps, {"last": reps[len(hooks) - 1]}, measure="rsa", n_permutations=49)
    assert set(r.columns) >= {"a", "b", "value", "p_value"} and len(r) == len(hooks)
    png = rsa.plot_similarity(frame, tmp_path / "cka.png", title="CKA layer x layer")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert isinstance(feats[hooks[0]], torch.Tensor)
