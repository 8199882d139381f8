"""Kernel ridge with an RBF kernel: a non-linear head on the same frozen features.

Features are standardised on the training rows; the kernel is
``exp(-gamma * |x - x'|^2)`` with ``gamma = g / n_features`` (standardised
features lie about ``2 * n_features`` apart, so ``g`` is a width free of the
embedding's size).  Targets are centred on their training mean.  ``g`` and the
ridge ``alpha`` are chosen per gene from ``widths`` x ``alphas`` by (grouped)
K-fold CV, by default on each validation fold's Pearson r averaged over the
folds: with folds by slide that is the by-section score, which MSE is not
(MSE is dominated by offsets between slides and, on her2st, picks the
narrowest kernel with the least shrinkage).  Organised like sklearn's
``_RidgeGCV``: each fold's kernel
is eigendecomposed once per width, and every alpha is then a diagonal solve
(``U diag(1 / (lambda + alpha)) U' y``).

Memory and time grow with the square (kernel) and cube (eigendecomposition) of
the training rows, so the head refuses more than ``max_samples`` of them.
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils._param_validation import Interval, StrOptions

from core.errors import UsageError
from regress.heads.base import MultiOutputHead, standardizer
from regress.cv import inner_groups, make_splits
from regress.heads.selection import best_index, fold_score

DEFAULT_WIDTHS = (0.03, 0.1, 0.3, 1.0)
#: 10**-1.5 ... 10**1.5, written out (part of the run's identity; np.logspace's last digit varies by release).
DEFAULT_KRR_ALPHAS = (0.03162277660168379, 0.1, 0.31622776601683794, 1.0, 3.1622776601683795, 10.0,
                      31.622776601683793)


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of A and of B (float64, clipped at 0)."""
    d = np.einsum("ij,ij->i", A, A)[:, None] + np.einsum("ij,ij->i", B, B)[None, :] - 2.0 * (A @ B.T)
    return np.maximum(d, 0.0)


def _spectrum(K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0: a kernel matrix is positive semi-definite) and eigenvectors of K."""
    lam, U = np.linalg.eigh(K)
    return np.maximum(lam, 0.0), U


class KernelRidgeHead(MultiOutputHead, RegressorMixin, BaseEstimator):
    """RBF kernel ridge; width and alpha per gene by CV.

    Parameters
    ----------
    widths : float or sequence of float
        Candidate ``g``; the kernel's ``gamma`` is ``g / n_features`` on standardised features.
    alphas : float or sequence of float
        Candidate ridge penalties (the kernel's diagonal is 1).
    cv : int
        K-fold CV for the choice (grouped when ``groups`` are given to ``fit``).
    scoring : "pcc" or "mse"
        What the choice maximises: each validation fold's Pearson r averaged over the folds, or -MSE.
    per_target : bool
        One (width, alpha) per gene (default) or one for all genes.
    max_samples : int
        Most training rows accepted (the kernel is rows x rows).
    random_state : int
        Seed of the (ungrouped) K-fold shuffle.
    """

    _head_name = "krr"
    _parameter_constraints = {
        "widths": ["array-like", Interval(Real, 0, None, closed="neither")],
        "alphas": ["array-like", Interval(Real, 0, None, closed="neither")],
        "cv": ["cv_object"],
        "scoring": [StrOptions({"mse", "pcc"})],
        "per_target": ["boolean"],
        "max_samples": [Interval(Integral, 2, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, widths: Any = DEFAULT_WIDTHS, alphas: Any = DEFAULT_KRR_ALPHAS, cv: Any = 5,
                 scoring: str = "pcc", per_target: bool = True, max_samples: int = 20_000, random_state: int = 0):
        self.widths = widths
        self.alphas = alphas
        self.cv = cv
        self.scoring = scoring
        self.per_target = per_target
        self.max_samples = max_samples
        self.random_state = random_state

    def _grid(self, name: str) -> np.ndarray:
        v = np.atleast_1d(np.asarray(getattr(self, name), dtype=np.float64))
        if v.size == 0 or not np.all(np.isfinite(v)) or (v <= 0).any():
            from regress.heads.base import HeadParamError

            raise HeadParamError(f"krr: {name} must be positive numbers, got {getattr(self, name)!r}.")
        return np.unique(v)

    def fit(self, X, y, groups=None):
        X, Y = self._validate_fit(X, y)
        n, d = X.shape
        if n > self.max_samples:
            raise UsageError(f"krr: {n:,} training rows need a {n:,} x {n:,} kernel (more than max_samples = "
                             f"{self.max_samples:,}); use --head ridge, or fit on fewer tiles.")
        widths, alphas = self._grid("widths"), self._grid("alphas")
        if widths.size * alphas.size == 1:
            self.cv_scores_ = None
            pick = np.zeros(Y.shape[1], dtype=int)
        else:
            groups = inner_groups(groups)
            score = np.zeros((widths.size, alphas.size, Y.shape[1]))
            splits = make_splits(n, self.cv, groups, self.random_state)
            for train, val in splits:
                mean, std = standardizer(X[train])
                A, B = (X[train] - mean) / std, (X[val] - mean) / std
                D_tr, D_val = _sq_dists(A, A), _sq_dists(B, A)
                y_mean = Y[train].mean(axis=0)
                for i, g in enumerate(widths):
                    lam, U = _spectrum(np.exp(-(g / d) * D_tr))
                    Q = U.T @ (Y[train] - y_mean)  # (n_train, genes)
                    KU = np.exp(-(g / d) * D_val) @ U  # (n_val, n_train)
                    for j, a in enumerate(alphas):
                        pred = KU @ (Q / (lam + a)[:, None]) + y_mean
                        score[i, j] += fold_score(Y[val], pred, self.scoring, n, len(splits))
            self.cv_scores_ = score.reshape(widths.size * alphas.size, -1)  # (widths x alphas, genes), higher is better
            pick = best_index(self.cv_scores_, self.per_target)
        self.width_grid_, self.alpha_grid_ = widths, alphas
        self.width_ = widths[pick // alphas.size]
        self.alpha_ = alphas[pick % alphas.size]
        self.x_mean_, self.x_scale_ = standardizer(X)
        A = (X - self.x_mean_) / self.x_scale_
        self.y_mean_ = Y.mean(axis=0)
        D = _sq_dists(A, A)
        self.dual_coef_ = np.zeros((n, Y.shape[1]))
        for g in np.unique(self.width_):
            genes = np.flatnonzero(self.width_ == g)
            lam, U = _spectrum(np.exp(-(g / d) * D))
            Q = U.T @ (Y[:, genes] - self.y_mean_[genes])
            self.dual_coef_[:, genes] = U @ (Q / (lam[:, None] + self.alpha_[genes][None, :]))
        self.train_features_ = A
        return self

    def predict(self, X):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "dual_coef_")
        X = self._validate_predict(X)
        B = (X - self.x_mean_) / self.x_scale_
        D = _sq_dists(B, self.train_features_)
        d = self.train_features_.shape[1]
        P = np.empty((X.shape[0], self.dual_coef_.shape[1]))
        for g in np.unique(self.width_):
            genes = np.flatnonzero(self.width_ == g)
            P[:, genes] = np.exp(-(g / d) * D) @ self.dual_coef_[:, genes] + self.y_mean_[genes]
        return P[:, 0] if self._y_1d else P
