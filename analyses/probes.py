"""Linear and small-MLP probes per layer and position group (scikit-learn), with grouped splits.

* :func:`grouped_splits`: ``GroupKFold`` by image / video / study, checked so no group is on both sides.
* :func:`probe_layers`: one row per feature set (layer, or layer x position group): out-of-fold accuracy
  and AUROC with CIs from a clustered bootstrap over groups, the same probe on a **control task**
  (labels shuffled within groups by default) and the **selectivity** = task - control (Hewitt & Liang 2019).
* Video-study semantics: :func:`have1_labels` (Have-1: did the counterfactual flip the answer?) and
  :func:`have2_labels` (Have-2: a label column of the annotations, aligned by example id).
* :func:`probe_direction` turns a fitted logistic probe into a unit direction in activation space;
  :func:`direction_hook` (project it out, or steer along it) and :func:`direction_edit` (an
  :class:`~analyses.variants.Edit` for the patching engine) use it as an ablation / steering direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "make_probe", "grouped_splits", "check_no_leak", "cross_val_proba", "probe_layers", "control_labels",
    "have1_labels", "have2_labels", "fit_probe", "probe_direction", "direction_hook", "direction_edit",
    "features_from_dataset",
]

ProbeKind = Literal["logistic", "mlp"]


def make_probe(kind: ProbeKind = "logistic", seed: int = 0, C: float = 1.0, hidden: Sequence[int] = (64,), max_iter: int = 500,
               solver: str = "lbfgs") -> Any:
    """A scikit-learn pipeline: standardise, then logistic regression (L2, ``C``) or a small MLP (``hidden``
    units, L-BFGS by default: deterministic and quick at probe sizes; ``solver="adam"`` for large sets)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        clf = LogisticRegression(C=C, max_iter=max_iter)
    elif kind == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=max_iter, solver=solver, alpha=1e-2, random_state=seed)
    else:
        raise ValueError(f"unknown probe kind {kind!r}; choose 'logistic' or 'mlp'")
    return make_pipeline(StandardScaler(), clf)


def check_no_leak(groups: Sequence[Any], splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Raise if any group has samples in both the train and the test part of a split."""
    g = np.asarray(groups)
    for k, (tr, te) in enumerate(splits):
        both = set(g[tr].tolist()) & set(g[te].tolist())
        if both:
            raise ValueError(f"split {k} leaks group(s) {sorted(both)[:5]} into both train and test")


def grouped_splits(groups: Sequence[Any], n_splits: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """``GroupKFold`` splits: every group lies wholly in one test fold (checked)."""
    from sklearn.model_selection import GroupKFold

    g = np.asarray(groups)
    n_groups = np.unique(g).size
    if n_groups < n_splits:
        raise ValueError(f"{n_groups} groups cannot fill {n_splits} folds; lower n_splits or add groups")
    splits = list(GroupKFold(n_splits=n_splits).split(np.zeros(len(g)), groups=g))
    check_no_leak(g, splits)
    return splits


def control_labels(y: Sequence[Any], groups: Sequence[Any], mode: Literal["within_groups", "global"] = "within_groups", seed: int = 0) -> np.ndarray:
    """Labels of the control task: permuted within each group (keeps each group's label mix, breaks the
    link to the individual sample), or globally."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y).copy()
    if mode == "global":
        return rng.permutation(y)
    if mode != "within_groups":
        raise ValueError(f"control mode must be 'within_groups' or 'global', got {mode!r}")
    g = np.asarray(groups)
    out = y.copy()
    for key in np.unique(g):
        idx = np.flatnonzero(g == key)
        out[idx] = y[rng.permutation(idx)]
    varying = sum(np.unique(y[g == key]).size > 1 for key in np.unique(g))
    if varying == 0:
        raise ValueError("labels are constant within every group, so shuffling within groups changes nothing; "
                         "use control='global'")
    return out


def cross_val_proba(X: np.ndarray, y: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]], kind: ProbeKind = "logistic",
                    seed: int = 0, **probe_kw: Any) -> np.ndarray:
    """Out-of-fold class probabilities ``[n, n_classes]`` (classes = ``np.unique(y)``)."""
    classes = np.unique(y)
    proba = np.zeros((len(y), classes.size))
    for k, (tr, te) in enumerate(splits):
        if np.unique(y[tr]).size < 2:
            raise ValueError(f"fold {k}'s training part holds one label only ({y[tr][0]!r}); use fewer splits or "
                             "groups whose labels are better mixed")
        model = make_probe(kind, seed, **probe_kw).fit(X[tr], y[tr])
        cols = np.searchsorted(classes, model.classes_)
        proba[np.ix_(te, cols)] = model.predict_proba(X[te])
    return proba


def _auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """AUROC of codes ``y`` (binary, or one-vs-rest macro for several classes); NaN when undefined."""
    from sklearn.metrics import roc_auc_score

    if np.unique(y).size < 2:
        return float("nan")
    try:
        if proba.shape[1] == 2:
            return float(roc_auc_score(y, proba[:, 1]))
        return float(roc_auc_score(y, proba / proba.sum(1, keepdims=True), multi_class="ovr", labels=np.arange(proba.shape[1])))
    except ValueError:  # a resample lacking a class
        return float("nan")


def _scores(y_codes: np.ndarray, proba: np.ndarray, groups: np.ndarray, ci: bool, n_resamples: int, seed: int) -> dict[str, float]:
    from analyses.stats import bootstrap_ci

    pred = proba.argmax(1)
    correct = (pred == y_codes).astype(float)
    out: dict[str, float] = {}
    if ci:
        out["accuracy"], out["accuracy_low"], out["accuracy_high"] = bootstrap_ci(correct, clusters=groups, n_resamples=n_resamples, seed=seed)
        idx = np.arange(len(y_codes), dtype=float)
        auc = lambda i: _auroc(y_codes[i.astype(int)], proba[i.astype(int)])  # noqa: E731
        with np.errstate(invalid="ignore"):
            out["auroc"], out["auroc_low"], out["auroc_high"] = bootstrap_ci(idx, auc, clusters=groups, n_resamples=n_resamples, seed=seed)
    else:
        out["accuracy"], out["auroc"] = float(correct.mean()), _auroc(y_codes, proba)
    return out


def probe_layers(
    features: Mapping[Any, np.ndarray | Tensor], y: Sequence[Any], groups: Sequence[Any], kind: ProbeKind = "logistic",
    n_splits: int = 5, control: Literal["within_groups", "global"] | None = "within_groups", ci: bool = True,
    n_resamples: int = 499, seed: int = 0, key_names: Sequence[str] = ("layer",), **probe_kw: Any,
) -> pd.DataFrame:
    """Cross-validated probes, one row per feature set.

    Args:
        features: ``{key: X [n, d]}``; a key is a layer, or a tuple such as ``(layer, group)`` (name its
            parts with ``key_names``).
        y: one label per sample (binary or multi-class); ``groups``: one group per sample (image / video /
            study id): splits are ``GroupKFold`` by it and CIs resample whole groups.
        control: the control task's labels (:func:`control_labels`), None to skip it.
    Columns: key columns, ``probe``, ``n``, ``n_groups``, ``n_classes``, ``accuracy`` (+ ``_low``/``_high``),
    ``auroc`` (+ CI), ``chance`` (majority-class rate), ``control_accuracy``, ``control_auroc``,
    ``selectivity`` (accuracy - control accuracy), ``selectivity_auroc``.
    """
    y_arr, g = np.asarray(y), np.asarray(groups)
    classes, y_codes = np.unique(y_arr, return_inverse=True)
    if classes.size < 2:
        raise ValueError("probing needs at least two label values")
    splits = grouped_splits(g, n_splits)
    y_ctrl = np.unique(control_labels(y_arr, g, control, seed), return_inverse=True)[1] if control else None
    rows = []
    for key, X in features.items():
        X = X.detach().float().cpu().numpy() if isinstance(X, Tensor) else np.asarray(X, dtype=float)
        X = X.reshape(X.shape[0], -1)
        if X.shape[0] != y_arr.size:
            raise ValueError(f"features {key!r} have {X.shape[0]} rows for {y_arr.size} labels")
        kt = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = {**dict(zip(key_names, kt)), "probe": kind, "n": y_arr.size, "n_groups": np.unique(g).size,
                               "n_classes": classes.size, "chance": float(np.bincount(y_codes).max() / y_codes.size)}
        row.update(_scores(y_codes, cross_val_proba(X, y_codes, splits, kind, seed, **probe_kw), g, ci, n_resamples, seed))
        if y_ctrl is not None:
            c = _scores(y_ctrl, cross_val_proba(X, y_ctrl, splits, kind, seed, **probe_kw), g, False, 0, seed)
            row.update(control_accuracy=c["accuracy"], control_auroc=c["auroc"],
                       selectivity=row["accuracy"] - c["accuracy"], selectivity_auroc=row["auroc"] - c["auroc"])
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- Have-1 / Have-2
def have1_labels(results: pd.DataFrame, clean: str = "clean_answer", counterfactual: str = "counterfactual_answer") -> np.ndarray:
    """Have-1: 1 where the counterfactual input changed the model's answer, else 0 (one per row)."""
    for c in (clean, counterfactual):
        if c not in results.columns:
            raise KeyError(f"Have-1 needs column {c!r} (the answers on the clean and counterfactual input); columns: {list(results.columns)}")
    return (results[clean].to_numpy() != results[counterfactual].to_numpy()).astype(int)


def have2_labels(example_ids: Sequence[Any], annotations: pd.DataFrame, label: str, id_column: str = "example_id") -> np.ndarray:
    """Have-2: the annotation column ``label`` of each example, aligned to ``example_ids`` (e.g. the
    activation dataset's order). Raises if an example has no annotation."""
    if label not in annotations.columns or id_column not in annotations.columns:
        raise KeyError(f"annotations need columns {id_column!r} and {label!r}; they have {list(annotations.columns)}")
    ann = annotations.assign(**{id_column: annotations[id_column].astype(str)}).drop_duplicates(id_column).set_index(id_column)
    ids = [str(i) for i in example_ids]
    missing = [i for i in ids if i not in ann.index]
    if missing:
        raise KeyError(f"{len(missing)} example(s) have no annotation, e.g. {missing[:3]}")
    return ann.loc[ids, label].to_numpy()


def features_from_dataset(dataset: Any, hooks: Sequence[str], group: str) -> tuple[dict[str, Tensor], list[str]]:
    """``({hook: X [examples, ...]}, example_ids)`` from an :class:`~analyses.activations.ActivationDataset`,
    one group (e.g. ``"last"`` or ``"video0"``), rows aligned by example id across hooks."""
    out, ids = {}, None
    for h in hooks:
        x, idx = dataset.load(h, groups=[group])
        order = idx["example_id"].tolist()
        if ids is None:
            ids = order
        elif order != ids:
            pos = {e: i for i, e in enumerate(order)}
            x = x[[pos[e] for e in ids]]
        out[h] = x
    return out, list(ids or [])


# ----------------------------------------------------------------------------- directions
def fit_probe(X: np.ndarray | Tensor, y: Sequence[Any], kind: ProbeKind = "logistic", seed: int = 0, **probe_kw: Any) -> Any:
    """Fit one probe on all the data (after choosing the layer by :func:`probe_layers`)."""
    X = X.detach().float().cpu().numpy() if isinstance(X, Tensor) else np.asarray(X, dtype=float)
    return make_probe(kind, seed, **probe_kw).fit(X.reshape(X.shape[0], -1), np.asarray(y))


def probe_direction(probe: Any) -> Float[Tensor, "d"] | Float[Tensor, "classes d"]:
    """Unit direction(s) in activation space of a fitted logistic probe: the weight divided by the
    standardiser's scale (the gradient of the logit with respect to the raw activation)."""
    scaler, clf = probe[0], probe[-1]
    if not hasattr(clf, "coef_"):
        raise TypeError("only linear (logistic) probes have a direction; fit with kind='logistic'")
    w = clf.coef_ / scaler.scale_[None, :]
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    t = torch.as_tensor(w, dtype=torch.float32)
    return t[0] if t.shape[0] == 1 else t


def direction_hook(
    direction: Float[Tensor, "d"], positions: Sequence[int] | None = None, mode: Literal["ablate", "steer"] = "ablate",
    alpha: float = 1.0, center: Float[Tensor, "d"] | None = None,
) -> Callable[[Tensor, Any], Tensor]:
    """A ``run_with_hooks`` hook on a ``[B, L, d]`` activation: ``"ablate"`` removes the component along
    the direction (``x - ((x - center) . u) u``; ``center`` e.g. a mean vector, default 0); ``"steer"`` adds
    ``alpha * u``. Only ``positions`` (default all) change."""
    if mode not in ("ablate", "steer"):
        raise ValueError(f"mode must be 'ablate' or 'steer', got {mode!r}")
    u = direction / direction.norm()

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        uu = u.to(act.dtype).to(act.device)
        sel = act if positions is None else act[:, torch.as_tensor(list(positions), dtype=torch.long, device=act.device)]
        if mode == "ablate":
            ref = sel if center is None else sel - center.to(act.dtype).to(act.device)
            new = sel - (ref @ uu)[..., None] * uu
        else:
            new = sel + alpha * uu
        act = act.clone()
        if positions is None:
            return new
        act[:, torch.as_tensor(list(positions), dtype=torch.long, device=act.device)] = new
        return act

    return hook


def direction_edit(
    hook: str, direction: Float[Tensor, "d"], like: Tensor, positions: Sequence[int] | None = None, alpha: float = 1.0,
    mode: Literal["steer", "ablate"] = "steer", center: Float[Tensor, "d"] | None = None,
) -> Any:
    """An :class:`~analyses.variants.Edit` for the patching engine's batched variants (``like``: the base run's
    activation ``[B, L, d]`` at ``hook``). ``"steer"``: mode ``"add"`` of ``alpha * u`` at ``positions``.
    ``"ablate"``: mode ``"replace"`` by ``like`` with its component along ``u`` removed, exact when no earlier
    edit of the same variant changes ``hook``'s input (the usual single-site sweep)."""
    from analyses.variants import Edit

    u = (direction / direction.norm()).to(like.dtype).to(like.device)
    pos = None if positions is None else torch.as_tensor(list(positions), dtype=torch.long)
    if mode == "steer":
        return Edit(hook, (alpha * u).expand_as(like), positions=pos, mode="add")
    if mode == "ablate":
        return Edit(hook, direction_hook(direction, None, "ablate", center=center)(like), positions=pos, mode="replace")
    raise ValueError(f"mode must be 'steer' or 'ablate', got {mode!r}")
