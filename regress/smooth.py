"""Spatial smoothing of predictions, its strength chosen per gene by inner cross-validation.

Expression is spatially smooth, so a tile's prediction can borrow from its
neighbours' predictions: ``p' = (1 - lam) * p + lam * mean(p over the k nearest
tiles of the same slide)``, ``lam`` per gene from :data:`LAMBDAS`.  Unlike
``--context`` (which averages *features* before the head), this averages the
head's *outputs*.

No leakage: for each outer fold, ``lam`` is chosen on that fold's training
rows only, from *inner* out-of-fold predictions (the head refitted per inner
fold); the held-out rows are smoothed with the held-out slide's own
neighbours.  The run's final ``lam`` (applied by ``predict``) is chosen on the
run's cross-validated predictions of the training table.
"""
from __future__ import annotations

import numpy as np

from regress.context import neighbour_mean
from regress.metrics import pcc_per_gene

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def smooth(P: np.ndarray, P_nbr: np.ndarray, lam: np.ndarray) -> np.ndarray:
    lam = np.asarray(lam, dtype=np.float64)[None, :]
    return (1.0 - lam) * P + lam * P_nbr


def choose_lambdas(Y: np.ndarray, P: np.ndarray, P_nbr: np.ndarray, fold: np.ndarray | None = None) -> np.ndarray:
    """Per gene, the lambda whose smoothed predictions correlate best with Y (mean over folds when given;
    the first, i.e. the least smoothing, wins ties)."""
    best, best_r = np.zeros(Y.shape[1]), np.full(Y.shape[1], -np.inf)
    parts = [np.ones(len(Y), bool)] if fold is None else [fold == f for f in np.unique(fold)]
    for lam in LAMBDAS:
        S = (1.0 - lam) * P + lam * P_nbr
        r = np.nanmean([np.nan_to_num(pcc_per_gene(Y[m], S[m]), nan=0.0) for m in parts if m.sum() > 2], axis=0)
        better = r > best_r + 1e-12
        best[better], best_r[better] = lam, r[better]
    return best


def smoothed_cv(estimator, X, Y, splits, groups, xy, slides, k: int, inner_folds: int, seed: int,
                source: str = "table", on_fold=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw OOF, smoothed OOF, per-fold lambdas): each outer fold's lambdas from inner CV on its training rows."""
    import time

    from sklearn.base import clone

    from regress.cv import accepts_groups, cross_val_predict_groups, inner_groups, make_splits

    raw = np.zeros(Y.shape, dtype=np.float64)
    out = np.zeros(Y.shape, dtype=np.float64)
    lams = []
    for i, (tr, va) in enumerate(splits):
        t0 = time.perf_counter()
        g_tr = None if groups is None else np.asarray(groups)[tr]
        g_in = inner_groups(g_tr)  # one training group left (two slides in all): plain K-fold inside it
        n_inner = inner_folds if g_in is None else min(inner_folds, len(np.unique(g_in)))
        inner = make_splits(len(tr), n_inner, g_in, seed)
        p_in = cross_val_predict_groups(estimator, X[tr], Y[tr], inner, g_in).astype(np.float64)
        f_in = np.zeros(len(tr), int)
        for j, (_, v) in enumerate(inner):
            f_in[v] = j
        lam = choose_lambdas(Y[tr], p_in, neighbour_mean(p_in, xy[tr], None if slides is None else slides[tr], k,
                                                          source, "--smooth"), f_in)
        est = clone(estimator)
        est.fit(X[tr], Y[tr], **({"groups": g_tr} if g_tr is not None and accepts_groups(est) else {}))
        p = np.asarray(est.predict(X[va]), dtype=np.float64).reshape(len(va), -1)
        raw[va] = p
        out[va] = smooth(p, neighbour_mean(p, xy[va], None if slides is None else slides[va], k, source, "--smooth"),
                         lam)
        lams.append(lam)
        if on_fold is not None:
            on_fold(i, time.perf_counter() - t0)
    return raw, out, np.asarray(lams)
