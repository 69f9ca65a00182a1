"""Representational similarity: RDMs, RSA with a permutation test, linear and debiased CKA, layer x layer maps.

Representations are ``[items, features]`` matrices whose rows are the same items (images, prompts,
videos) in every representation compared: layers of one model, two models on the same images (e.g.
two medical VLMs), or two modalities (image vs text tower on paired images and captions).

* :func:`rdm`: representational dissimilarity matrix, ``correlation`` / ``cosine`` / ``euclidean``
  (``scipy.spatial.distance.pdist``).
* :func:`rsa`: Spearman correlation of two RDMs' upper triangles, p-value from permuting the items of
  one RDM (rows and columns together, Mantel-style).
* :func:`linear_cka` (Kornblith et al. 2019) and :func:`debiased_cka` (the unbiased HSIC estimator of
  Song et al. 2012, which removes the positive bias of CKA when features outnumber items).
* :func:`similarity_matrix`: every pair of (layer) representations, as a tidy frame or a matrix;
  :func:`plot_similarity`: the layer x layer heatmap (matplotlib Agg).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy import stats as sps
from scipy.spatial.distance import pdist, squareform

__all__ = ["rdm", "rsa", "linear_cka", "debiased_cka", "similarity_matrix", "plot_similarity"]

RdmMetric = Literal["correlation", "cosine", "euclidean"]
Measure = Literal["cka", "debiased_cka", "rsa"]


def _as_2d(X: Any, name: str = "X") -> np.ndarray:
    if hasattr(X, "detach"):
        X = X.detach().float().cpu().numpy()
    a = np.asarray(X, dtype=np.float64)
    if a.ndim == 1:
        raise ValueError(f"{name} must be [items, features]; got a 1-D array (reshape(-1, 1) for one feature)")
    a = a.reshape(a.shape[0], -1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def rdm(X: Float[np.ndarray, "items features"], metric: RdmMetric = "correlation") -> Float[np.ndarray, "items items"]:
    """Pairwise dissimilarities between items (``1 - Pearson r``, ``1 - cosine`` or Euclidean distance)."""
    if metric not in ("correlation", "cosine", "euclidean"):
        raise ValueError(f"metric must be 'correlation', 'cosine' or 'euclidean', got {metric!r}")
    return squareform(pdist(_as_2d(X), metric=metric))


def rsa(
    rdm_a: Float[np.ndarray, "items items"], rdm_b: Float[np.ndarray, "items items"], n_permutations: int = 1000,
    seed: int = 0, alternative: Literal["greater", "two-sided"] = "greater",
) -> dict[str, float]:
    """Spearman rho between the upper triangles of two RDMs and its permutation p-value.

    The null permutes the item labels of ``rdm_b`` (rows and columns together), which keeps each RDM's
    internal structure; p = (1 + #{null >= rho}) / (1 + n_permutations) (two-sided: on |rho|).
    """
    a, b = np.asarray(rdm_a, float), np.asarray(rdm_b, float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"RDMs must be square and of equal size; got {a.shape} and {b.shape}")
    n = a.shape[0]
    if n < 4:
        raise ValueError("RSA needs at least 4 items")
    iu = np.triu_indices(n, k=1)
    rho = float(sps.spearmanr(a[iu], b[iu]).statistic)
    rng = np.random.default_rng(seed)
    ra = sps.rankdata(a[iu])
    null = np.empty(n_permutations)
    for k in range(n_permutations):
        p = rng.permutation(n)
        null[k] = np.corrcoef(ra, sps.rankdata(b[np.ix_(p, p)][iu]))[0, 1]
    stat = np.abs(null) >= abs(rho) - 1e-12 if alternative == "two-sided" else null >= rho - 1e-12
    return {"rho": rho, "p_value": float((1 + stat.sum()) / (1 + n_permutations)), "n_items": n}


def _center_gram(K: np.ndarray) -> np.ndarray:
    mean_rows = K.mean(0, keepdims=True)
    return K - mean_rows - mean_rows.T + K.mean()


def linear_cka(X: Float[np.ndarray, "items d1"], Y: Float[np.ndarray, "items d2"]) -> float:
    """Linear CKA: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred X, Y."""
    X, Y = _as_2d(X, "X"), _as_2d(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same items (rows); got {X.shape[0]} and {Y.shape[0]}")
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    num = np.linalg.norm(Y.T @ X) ** 2
    den = np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
    return float(num / den) if den > 0 else float("nan")


def _hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC of Gram matrices (diagonals ignored)."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    ones_k, ones_l = K.sum(), L.sum()
    term = np.sum(K * L) + ones_k * ones_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (K.sum(0) @ L.sum(0))
    return float(term / (n * (n - 3)))


def debiased_cka(X: Float[np.ndarray, "items d1"], Y: Float[np.ndarray, "items d2"]) -> float:
    """CKA from the unbiased HSIC estimator (linear kernels); needs at least 4 items."""
    X, Y = _as_2d(X, "X"), _as_2d(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same items (rows); got {X.shape[0]} and {Y.shape[0]}")
    if X.shape[0] < 4:
        raise ValueError("debiased CKA needs at least 4 items")
    K, L = X @ X.T, Y @ Y.T
    den = np.sqrt(_hsic_unbiased(K, K) * _hsic_unbiased(L, L))
    return float(_hsic_unbiased(K, L) / den) if den > 0 else float("nan")


def similarity_matrix(
    reps_a: Mapping[Any, Any], reps_b: Mapping[Any, Any] | None = None, measure: Measure = "cka",
    rdm_metric: RdmMetric = "correlation", n_permutations: int = 0, seed: int = 0,
) -> pd.DataFrame:
    """Similarity of every representation of ``reps_a`` with every one of ``reps_b`` (default: ``reps_a``).

    ``reps_*``: ``{key: [items, features]}`` (keys: layers, ``(model, layer)``, tower names...). Tidy frame,
    one row per pair: ``a``, ``b``, ``measure``, ``value`` (and ``p_value`` for RSA when
    ``n_permutations > 0``). Pivot with ``.pivot(index="a", columns="b", values="value")`` for a heatmap.
    """
    reps_b = reps_a if reps_b is None else reps_b
    if measure not in ("cka", "debiased_cka", "rsa"):
        raise ValueError(f"measure must be 'cka', 'debiased_cka' or 'rsa', got {measure!r}")
    rdms: dict[tuple[str, Any], np.ndarray] = {}

    def get_rdm(side: str, key: Any, X: Any) -> np.ndarray:
        if (side, key) not in rdms:
            rdms[(side, key)] = rdm(X, rdm_metric)
        return rdms[(side, key)]

    rows = []
    for ka, Xa in reps_a.items():
        for kb, Xb in reps_b.items():
            row: dict[str, Any] = {"a": ka, "b": kb, "measure": measure}
            if measure == "cka":
                row["value"] = linear_cka(Xa, Xb)
            elif measure == "debiased_cka":
                row["value"] = debiased_cka(Xa, Xb)
            else:
                r = rsa(get_rdm("a", ka, Xa), get_rdm("b", kb, Xb), n_permutations=max(n_permutations, 0), seed=seed)
                row["value"] = r["rho"]
                if n_permutations > 0:
                    row["p_value"] = r["p_value"]
            rows.append(row)
    return pd.DataFrame(rows)


def plot_similarity(
    frame: pd.DataFrame, path: str | Path, title: str = "", xlabel: str = "b", ylabel: str = "a",
) -> Path:
    """Heatmap PNG of a :func:`similarity_matrix` frame (rows ``a``, columns ``b``), values annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = frame.pivot(index="a", columns="b", values="value")
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * m.shape[1], 0.8 + 0.45 * m.shape[0]))
    im = ax.imshow(m.to_numpy(float), cmap="viridis", vmin=min(0.0, float(np.nanmin(m.to_numpy(float)))), vmax=1.0)
    ax.set_xticks(range(m.shape[1]), [str(c) for c in m.columns], fontsize=7, rotation=90)
    ax.set_yticks(range(m.shape[0]), [str(i) for i in m.index], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m.to_numpy(float)):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, shrink=0.8, label=str(frame["measure"].iloc[0]) if len(frame) else "")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
