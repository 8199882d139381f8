"""Cross-validation splits and out-of-fold prediction, grouped by slide/patient."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import GroupKFold, KFold, LeaveOneGroupOut
from core.errors import UsageError


def make_splits(n: int, cv: Any, groups=None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, val) index pairs.

    With ``groups`` no group is ever on both sides: ``cv`` >= the number of
    groups means leave-one-group-out, else GroupKFold.  Without groups:
    shuffled KFold seeded by ``seed``.  ``cv`` may also be an iterable of
    splits, used as is.
    """
    if not isinstance(cv, (int, np.integer)):
        if hasattr(cv, "split"):
            return [(np.asarray(a), np.asarray(b)) for a, b in cv.split(np.zeros((n, 1)), groups=groups)]
        return [(np.asarray(a), np.asarray(b)) for a, b in cv]
    if n < 2:
        raise UsageError(f"cross-validation needs at least 2 samples, got n_samples = {n}.")
    if cv < 2:
        raise UsageError(f"--folds {cv}: cross-validation needs at least 2 folds.")
    if groups is not None:
        groups = np.asarray(groups)
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            raise UsageError("grouped cross-validation needs at least 2 groups; pass --groups none to use plain K-fold.")
        splitter = LeaveOneGroupOut() if cv >= n_groups else GroupKFold(n_splits=int(cv))
        return [(a, b) for a, b in splitter.split(np.zeros((n, 1)), groups=groups)]
    if cv > n:
        raise UsageError(f"--folds {cv}: the table has only {n} rows to split; use --folds {n} or fewer.")
    k = int(cv)
    return [(a, b) for a, b in KFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros((n, 1)))]


def fold_labels(splits, n: int) -> np.ndarray:
    """(n,) int32: each row's validation fold in ``splits`` (rows in no validation part: 0)."""
    fold = np.zeros(n, dtype=np.int32)
    for f, (_, val) in enumerate(splits):
        fold[val] = f
    return fold


def inner_groups(groups):
    """Groups for a head's inner CV: ``None`` (plain K-fold) when fewer than 2 remain.

    In leave-one-group-out over two slides, each training part holds one slide:
    the inner alpha search then splits tiles, as it must; heads record it in
    ``inner_cv_grouped_``.
    """
    if groups is None or len(np.unique(np.asarray(groups))) < 2:
        return None
    return groups


def cross_val_predict_groups(estimator, X: np.ndarray, Y: np.ndarray, splits: Iterable,
                             groups=None, on_fold: Callable[[int, float], None] | None = None) -> np.ndarray:
    """Out-of-fold predictions; each fold's model is a fresh clone fitted on its train rows.

    Heads that take ``groups`` in ``fit`` get the training rows' groups, so
    their inner CV is grouped too (nested, no leakage).
    """
    import time

    oof = np.zeros(Y.shape, dtype=np.float32)
    for i, (train, val) in enumerate(splits):
        t0 = time.perf_counter()
        est = clone(estimator)
        kwargs = {}
        if groups is not None and accepts_groups(est):
            kwargs["groups"] = np.asarray(groups)[train]
        est.fit(X[train], Y[train], **kwargs)
        oof[val] = est.predict(X[val])
        if on_fold is not None:
            on_fold(i, time.perf_counter() - t0)
    return oof


def accepts_groups(est) -> bool:
    import inspect

    return "groups" in inspect.signature(est.fit).parameters
