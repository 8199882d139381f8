"""Reduced-rank ridge: ridge on the leading principal components of the genes.

Thousands of genes share a few programmes.  The standardised expression
matrix is rotated onto its principal axes (``Ys = Z V'``); one ridge
(:class:`regress.heads.ridge.RidgeHead`, alpha per component by CV) predicts the
component scores ``Z``; a gene is predicted from the first ``r`` components
only, ``r`` chosen per gene from ``ranks`` by (grouped) K-fold CV: by default on
each validation fold's Pearson r averaged over the folds (the by-section score;
``scoring="mse"`` for mean squared error).  In each CV fold the axes come from
that fold's training rows alone.  All ranks are
scored from one ridge per fold, because ridge fits each component on its own:
the rank-r model is the first r component models.

The fitted model is linear (``coef_``, ``intercept_``), like ridge's.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils._param_validation import StrOptions

from regress.heads.base import MultiOutputHead, standardizer
from regress.cv import inner_groups, make_splits
from regress.heads.ridge import DEFAULT_ALPHAS, RidgeHead
from regress.heads.selection import best_index, fold_score


def _axes(Y: np.ndarray):
    """(mean, scale, V): standardisation of Y and its principal axes (genes x components), largest first."""
    mean, std = standardizer(Y)
    _, s, Vt = np.linalg.svd((Y - mean) / std, full_matrices=False)
    keep = s > (s[0] * 1e-7 if len(s) and s[0] > 0 else np.inf)
    return mean, std, Vt[keep].T


def _rank_predictions(Zhat: np.ndarray, V: np.ndarray, ranks, mean, std) -> np.ndarray:
    """(len(ranks), rows, genes): predictions from the first r component scores, for each r."""
    out = np.empty((len(ranks), Zhat.shape[0], V.shape[0]))
    acc = np.zeros((Zhat.shape[0], V.shape[0]))
    done = 0
    for i, r in enumerate(ranks):
        r = min(r, V.shape[1])
        acc += Zhat[:, done:r] @ V[:, done:r].T
        done = max(done, r)
        out[i] = acc * std + mean
    return out


class ReducedRankRidgeHead(MultiOutputHead, RegressorMixin, BaseEstimator):
    """Ridge on the principal components of the (standardised) genes, rank per gene by CV.

    Parameters
    ----------
    ranks : sequence of int
        Candidate ranks; ranks beyond the number of components mean all of them (plain ridge on the rotated genes).
    alphas : sequence of float
        Ridge alpha grid, chosen per component by CV.
    cv : int
        K-fold CV, grouped when ``groups`` are given (for the alphas and the ranks).
    scoring : "pcc" or "mse"
        What the rank choice maximises: each validation fold's Pearson r averaged over the folds, or -MSE.
        (The component alphas are chosen on MSE of the component scores.)
    per_target : bool
        True: a rank per gene and an alpha per component; False: one rank for all genes and one alpha for
        all components (each the best on the mean CV score), a smoother model that transfers better to a
        patient the training sections do not include.
    device : "cpu" or "cuda"
        Where the ridge runs.
    random_state : int
        Seed of the (ungrouped) K-fold shuffle.
    """

    _head_name = "ridge-rr"
    _parameter_constraints = {
        "ranks": ["array-like"],
        "alphas": ["array-like"],
        "cv": ["cv_object"],
        "scoring": [StrOptions({"mse", "pcc"})],
        "per_target": ["boolean"],
        "device": [str],
        "random_state": ["random_state"],
    }

    def __init__(self, ranks: Any = (4, 8, 16, 32, 64, 128, 100_000), alphas: Any = DEFAULT_ALPHAS, cv: Any = 5,
                 scoring: str = "pcc", per_target: bool = True, device: str = "cpu", random_state: int = 0):
        self.ranks = ranks
        self.alphas = alphas
        self.cv = cv
        self.scoring = scoring
        self.per_target = per_target
        self.device = device
        self.random_state = random_state

    def _ridge(self) -> RidgeHead:
        return RidgeHead(alphas=self.alphas, alpha_per_target=self.per_target, cv=self.cv, device=self.device,
                         random_state=self.random_state)

    def _grid(self) -> list[int]:
        ranks = np.atleast_1d(np.asarray(self.ranks))
        if ranks.size == 0 or not np.issubdtype(ranks.dtype, np.integer) or (ranks < 1).any():
            from regress.heads.base import HeadParamError

            raise HeadParamError(f"ridge-rr: ranks must be positive integers, got {self.ranks!r}.")
        return sorted({int(r) for r in ranks})

    def fit(self, X, y, groups=None):
        X, Y = self._validate_fit(X, y)
        ranks = self._grid()
        n, g = Y.shape
        if len(ranks) == 1:
            self.rank_ = np.full(g, ranks[0])
            self.cv_scores_ = None
        else:
            groups = inner_groups(groups)
            score = np.zeros((len(ranks), g))
            splits = make_splits(n, self.cv, groups, self.random_state)
            for train, val in splits:
                mean, std, V = _axes(Y[train])
                Z = ((Y[train] - mean) / std) @ V
                zhat = self._ridge().fit(X[train], Z, groups=None if groups is None else groups[train]).predict(X[val])
                pred = _rank_predictions(zhat.reshape(len(val), -1), V, ranks, mean, std)
                score += fold_score(Y[val], pred, self.scoring, n, len(splits))
            self.cv_scores_ = score  # (n_ranks, n_genes), higher is better
            self.rank_ = np.asarray(ranks)[best_index(score, per_target=self.per_target)]
        self.ranks_ = np.asarray(ranks)
        mean, std, V = _axes(Y)
        self.n_components_ = V.shape[1]
        Z = ((Y - mean) / std) @ V
        ridge = self._ridge().fit(X, Z, groups=groups)
        self.component_alpha_ = np.atleast_1d(ridge.alpha_)
        cz = np.asarray(ridge.coef_, dtype=np.float64).reshape(V.shape[1], -1)  # components x features
        iz = np.atleast_1d(ridge.intercept_).astype(np.float64)
        mask = np.arange(V.shape[1])[None, :] < np.minimum(self.rank_, V.shape[1])[:, None]  # genes x components
        W = V * mask * std[:, None]  # gene <- component scores
        coef = W @ cz
        intercept = mean + W @ iz
        self.coef_ = coef[0] if self._y_1d else coef
        self.intercept_ = float(intercept[0]) if self._y_1d else intercept
        return self

    def predict(self, X):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "coef_")
        return self._linear_predict(self._validate_predict(X))
