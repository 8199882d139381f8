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

from regress.post.context import neighbour_mean
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


class SmoothStep:
    """The smoothing as a :class:`regress.post.steps.Step`: per-gene lambdas, with each row's own slide's neighbours."""

    def __init__(self, k: int, xy: np.ndarray | None, slides: np.ndarray | None, source: str = "table",
                 flag: str = "--smooth"):
        self.k, self.xy, self.slides, self.source, self.flag = k, xy, slides, source, flag

    def _neighbours(self, P: np.ndarray, rows: np.ndarray) -> np.ndarray:
        xy = None if self.xy is None else self.xy[rows]
        return neighbour_mean(P, xy, None if self.slides is None else self.slides[rows], self.k, self.source, self.flag)

    def choose(self, Y, P, fold, rows) -> np.ndarray:
        return choose_lambdas(Y, P, self._neighbours(P, rows), fold)

    def apply(self, P, setting, rows) -> np.ndarray:
        return smooth(P, self._neighbours(P, rows), setting)


def smoothed_cv(estimator, X, Y, splits, groups, xy, slides, k: int, inner_folds: int, seed: int,
                source: str = "table", on_fold=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw OOF, smoothed OOF, per-fold lambdas): each outer fold's lambdas from inner CV on its training rows
    (:func:`regress.post.steps.nested_cv` with the smoothing alone)."""
    from regress.post.steps import nested_cv

    raw, out, per_fold = nested_cv(estimator, X, Y, splits, groups, [SmoothStep(k, xy, slides, source)], inner_folds,
                                   seed, on_fold)
    return raw, out, np.asarray([s[0] for s in per_fold])
