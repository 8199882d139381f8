"""``--cross-gene``: each gene's prediction blended with a regression of that gene on every gene's prediction.

A head predicts each gene on its own (or through a few shared components), so a gene's prediction
carries its own noise while the other genes' predictions carry information about it (co-expressed
programmes, cell types).  After the head, a second linear stage learns, from out-of-fold predictions
``P`` and the measured ``Y``, one ridge map ``A`` (genes x genes) on the variation within CV folds
(both centred per fold, ``P``'s columns standardised), in the spirit of Breiman and Friedman's
"curds and whey"; ``A`` is rescaled so that ``P A`` varies as much as ``P``.  The map acts on each
slide's variation only: with ``D`` the predictions minus their slide's mean (a new slide's from its own
tiles, no expression used), the output is ``P + blend * (D A - D)``, so every slide keeps the head's
mean prediction (slide-level offsets, which a pooled PCC scores, stay the head's) and within the slide
it is ``(1 - blend) * D + blend * D A``.  A tile predicted alone is left as the head predicts it.
``alpha`` (from :data:`ALPHAS`, times the rows) and ``blend`` (from :data:`BLENDS`) are chosen by
cross-fitting over the folds on the mean per-gene Pearson r by fold; ``blend`` 0 leaves the head's
predictions unchanged, and ties go to it.

The map must be learned from predictions of rows the head was not fitted on:
:func:`regress.post.steps.nested_cv` supplies them (inner CV inside every outer fold).
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from regress.heads.base import standardizer
from regress.post.context import slide_centered
from regress.metrics import pcc_per_gene

ALPHAS = (0.3, 1.0, 3.0, 10.0, 30.0)
BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)


class CrossGeneMap(BaseEstimator):
    """The fitted second stage: ``predict(P)`` blends ``P`` with its cross-gene regression."""

    def __init__(self, alpha: float = 3.0, blend: float = 0.5):
        self.alpha = alpha
        self.blend = blend

    def fit(self, P: np.ndarray, Y: np.ndarray, fold: np.ndarray | None = None) -> "CrossGeneMap":
        self.coef_ = ridge_maps(P, Y, fold, [self.alpha])[0]
        return self

    def predict(self, P: np.ndarray, slides: np.ndarray | None = None) -> np.ndarray:
        """``P + blend * (D A - D)``, ``D`` the deviations from each slide's mean (all rows one slide
        when ``slides`` is None)."""
        check_is_fitted(self, "coef_")
        P = np.asarray(P, dtype=np.float64)
        return mix(P, P, self.coef_, self.blend, slides)


def mix(base: np.ndarray, F: np.ndarray, coef: np.ndarray, blend: float, slides: np.ndarray | None) -> np.ndarray:
    """``base + blend * (D_F coef - D_base)``, ``D`` the deviations from each slide's mean: within a slide
    ``(1 - blend) * base + blend * F coef``, while every slide keeps ``base``'s mean."""
    if blend == 0:
        return base
    return base + blend * (slide_centered(F, slides) @ coef - slide_centered(base, slides))


def ridge_maps(F: np.ndarray, Y: np.ndarray, fold: np.ndarray | None, alphas,
               base: np.ndarray | None = None) -> list[np.ndarray]:
    """The rescaled ridge map (columns of ``F`` -> genes) for each alpha, from one SVD of the standardised
    fold-centred ``F`` (decompose once, solve per alpha, as scikit-learn's ``_RidgeGCV``); rescaled so that
    ``F A`` varies as much as ``base`` (default ``F``: one run's predictions)."""
    F, Y = np.asarray(F, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    Fc, Yc = slide_centered(F, fold), slide_centered(Y, fold)
    spread_to = (Fc if base is None else slide_centered(base, fold)).std()
    _, scale = standardizer(Fc)
    U, sv, Vt = np.linalg.svd(Fc / scale, full_matrices=False)
    UtY = U.T @ Yc
    out = []
    for alpha in alphas:
        A = Vt.T @ ((sv / (sv ** 2 + alpha * len(Fc)))[:, None] * UtY) / scale[:, None]
        spread = (Fc @ A).std()
        out.append(A * (spread_to / spread if spread > 0 else 0.0))
    return out


def cv_scores(F: np.ndarray, Y: np.ndarray, fold: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    """(len(ALPHAS), len(BLENDS)): mean over folds of the mean per-gene Pearson r of
    ``(1 - blend) * base + blend * F A`` (``base`` default ``F``), each fold's map fitted on the other folds' rows."""
    F, Y, fold = np.asarray(F, dtype=np.float64), np.asarray(Y, dtype=np.float64), np.asarray(fold)
    base = F if base is None else np.asarray(base, dtype=np.float64)
    folds = np.unique(fold)
    scores = np.zeros((len(ALPHAS), len(BLENDS)))
    for f in folds:
        tr, va = fold != f, fold == f
        D, DF = base[va] - base[va].mean(axis=0), F[va] - F[va].mean(axis=0)
        for i, A in enumerate(ridge_maps(F[tr], Y[tr], fold[tr], ALPHAS, base[tr])):
            DA = DF @ A
            for j, b in enumerate(BLENDS):
                r = pcc_per_gene(Y[va], (1.0 - b) * D + b * DA)
                scores[i, j] += np.nanmean(r) if np.isfinite(r).any() else 0.0
    return scores / len(folds)


def choose(F: np.ndarray, Y: np.ndarray, fold: np.ndarray,
           base: np.ndarray | None = None) -> tuple[float, float, np.ndarray | None]:
    """(alpha, blend, scores) with the best cross-fitted score (ties: no blend, then the smaller alpha)."""
    if len(np.unique(fold)) < 2:
        return ALPHAS[0], 0.0, None
    scores = cv_scores(F, Y, fold, base)
    best = (-np.inf, 0, 0)
    for j in range(len(BLENDS)):
        for i in range(len(ALPHAS)):
            if scores[i, j] > best[0] + 1e-12:
                best = (scores[i, j], i, j)
    _, i, j = best
    return ALPHAS[i], BLENDS[j], scores


def choose_map(P: np.ndarray, Y: np.ndarray, fold: np.ndarray) -> CrossGeneMap:
    """The map with the best cross-fitted score, refitted on all rows."""
    alpha, blend, scores = choose(P, Y, fold)
    est = CrossGeneMap(alpha, blend).fit(P, Y, fold)
    if scores is not None:
        est.cv_scores_ = scores
    return est


class CrossGeneStep:
    """``--cross-gene`` as a :class:`regress.post.steps.Step`; its setting is the fitted :class:`CrossGeneMap`."""

    def __init__(self, slides: np.ndarray | None = None):
        self.slides = slides

    def choose(self, Y, P, fold, rows) -> CrossGeneMap:
        return choose_map(P, Y, fold)

    def apply(self, P, setting: CrossGeneMap, rows) -> np.ndarray:
        return setting.predict(P, None if self.slides is None else self.slides[rows])
