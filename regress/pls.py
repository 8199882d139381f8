r"""PLS regression for thousands of genes, on Gram matrices instead of data.

scikit-learn's ``PLSRegression`` runs NIPALS on the n x d data and n x g
targets, one power iteration per component.  The same components come from
cross-products only (the "kernel" form of Dayal & MacGregor):

.. math::  C = X^\top X,\quad S = X^\top Y,\quad M = S S^\top

component k: :math:`w_k` = top eigenvector of :math:`M_k`,
:math:`\tau = w^\top C_k w`, :math:`p = C_k w/\tau`, :math:`q = S_k^\top w/\tau`,
then deflate :math:`C_{k+1} = C_k - \tau p p^\top`,
:math:`S_{k+1} = S_k - \tau p q^\top` (the top eigenvector of :math:`M_k = S_k S_k^\\top` is the top left singular vector
of :math:`S_k`).  With :math:`R = W (P^\top W)^{-1}` the coefficients are
:math:`R Q^\top`, identical to NIPALS with regression-mode deflation.  Cost:
the two cross-products, then Lanczos on :math:`v \\mapsto S_k^\\top S_k v` (never forming
:math:`M`) and O(dg) per component.

Since :math:`P^\top W` is upper triangular, the first k columns of R do not
change when more components are added: predictions for every component count
in a grid come from one fit.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse.linalg import eigsh
from numbers import Integral

from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from regress.base import MultiOutputHead, column_moments, scale_or_one
from regress.cv import inner_groups, make_splits
from regress.selection import best_index, pooled_scores
from featurize.errors import UsageError

DEFAULT_COMPONENTS = (2, 4, 8, 16, 32)


def _top_left_singvec(S: np.ndarray) -> np.ndarray:
    """Dominant left singular vector of S (d x g), from the smaller side.

    Dense ``eigh`` of the small Gram matrix when min(d, g) <= 64, else
    Lanczos (``eigsh``) on ``v -> S'(S v)`` or ``v -> S(S' v)`` without
    forming either Gram matrix.
    """
    from scipy.sparse.linalg import LinearOperator

    d, g = S.shape
    if min(d, g) <= 64:
        if g <= d:
            v = np.linalg.eigh(S.T @ S)[1][:, -1]
            w = S @ v
            return w / np.linalg.norm(w)
        return np.linalg.eigh(S @ S.T)[1][:, -1]
    if g <= d:
        op = LinearOperator((g, g), matvec=lambda v: S.T @ (S @ v), dtype=np.float64)
        _, v = eigsh(op, k=1, which="LA", v0=np.ones(g), tol=1e-10)
        w = S @ v[:, 0]
        return w / np.linalg.norm(w)
    op = LinearOperator((d, d), matvec=lambda v: S @ (S.T @ v), dtype=np.float64)
    _, v = eigsh(op, k=1, which="LA", v0=np.ones(d), tol=1e-10)
    return v[:, 0]


def kernel_pls(C: np.ndarray, S: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Rotations R (d x k) and Y-loadings Q (g x k) from centred/scaled C and S.

    C is never deflated in place: ``C_k w = C w - P diag(tau) P' w``.  Stops
    early (fewer components) when the cross-covariance is exhausted.
    """
    S = S.astype(np.float64, copy=True)
    d, g = S.shape
    W, P, Q, taus = [], [], [], []
    scale0 = np.abs(S).max() or 1.0
    for _ in range(n_components):
        if np.abs(S).max() < 1e-10 * scale0:
            break
        w = _top_left_singvec(S)
        w /= np.linalg.norm(w)
        Cw = C @ w
        if P:
            Pm = np.stack(P, 1)
            Cw -= Pm @ (np.asarray(taus) * (Pm.T @ w))
        tau = float(w @ Cw)
        if tau <= 1e-12 * max(1.0, float(np.trace(C))):
            break
        p = Cw / tau
        q = (S.T @ w) / tau
        S -= tau * np.outer(p, q)
        W.append(w)
        P.append(p)
        Q.append(q)
        taus.append(tau)
    if not W:
        return np.zeros((d, 0)), np.zeros((g, 0)), 0
    W, P, Q = np.stack(W, 1), np.stack(P, 1), np.stack(Q, 1)
    R = W @ np.linalg.pinv(P.T @ W)
    return R, Q, W.shape[1]




class PLSHead(MultiOutputHead, RegressorMixin, BaseEstimator):
    """Partial least squares to many genes; components chosen by (grouped) CV.

    Parameters
    ----------
    n_components : int or sequence of int
        One value fits exactly that many (same predictions as scikit-learn's
        ``PLSRegression(n_components, scale=True)``); a sequence is a grid
        searched by CV.
    per_target : bool
        With a grid, choose the component count per gene (default) or shared.
    cv, scoring, random_state : as in :class:`regress.ridge.RidgeHead`.
    scale : bool
        Standardise features and genes (scikit-learn's default).
    """

    _head_name = "PLS"
    _parameter_constraints = {
        "n_components": [Interval(Integral, 1, None, closed="left"), "array-like"],
        "per_target": ["boolean"],
        "cv": ["cv_object"],
        "scoring": [StrOptions({"mse", "pcc"})],
        "scale": ["boolean"],
        "random_state": ["random_state"],
    }

    def __init__(self, n_components: Any = DEFAULT_COMPONENTS, per_target: bool = True, cv: Any = 5,
                 scoring: str = "mse", scale: bool = True, random_state: int = 0):
        self.n_components = n_components
        self.per_target = per_target
        self.cv = cv
        self.scoring = scoring
        self.scale = scale
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        X, Y = self._validate_fit(X, y)
        n, d = X.shape
        grid = sorted({int(k) for k in np.atleast_1d(self.n_components)})
        if grid[0] < 1:
            raise UsageError(f"n_components must be >= 1, got {self.n_components}.")
        grid = [min(k, d, n - 1) for k in grid]
        grid = sorted(set(grid))
        if len(grid) > 1:
            groups = inner_groups(groups)
            self.inner_cv_grouped_ = groups is not None
            splits = make_splits(n, self.cv, groups, self.random_state)
            scores = self._cv_scores(X, Y, splits, grid)
            self.cv_scores_ = scores
            idx = best_index(scores, self.per_target)
        else:
            self.cv_scores_ = None
            idx = np.zeros(Y.shape[1], dtype=int)
        k_per_gene = np.asarray(grid)[idx]
        R, Q, xm, xs, ym, ys, k_fit = self._fit_stats(X, Y, max(k_per_gene))
        k_per_gene = np.minimum(k_per_gene, k_fit)
        coef = np.zeros((d, Y.shape[1]))
        for k in np.unique(k_per_gene):
            cols = np.flatnonzero(k_per_gene == k)
            coef[:, cols] = R[:, :k] @ Q[cols, :k].T
        coef = coef * ys[None, :] / xs[:, None]
        self.n_components_ = k_per_gene if not self._y_1d else int(k_per_gene[0])
        self.coef_ = coef.T if not self._y_1d else coef[:, 0]
        intercept = ym - xm @ coef
        self.intercept_ = intercept if not self._y_1d else float(intercept[0])
        return self

    def _fit_stats(self, X, Y, k):
        xm, xs = column_moments(X)
        ym, ys = column_moments(Y)
        xs, ys = scale_or_one(xm, xs)[0], scale_or_one(ym, ys)[0]
        if not self.scale:
            xs, ys = np.ones_like(xs), np.ones_like(ys)
        Xs = (X - xm) / xs
        Ys = (Y - ym) / ys
        basis = None
        if Xs.shape[0] < Xs.shape[1]:
            # fewer rows than features: every PLS weight lies in the row space of Xs,
            # so fit on its coordinates in an orthonormal basis (n x n instead of d x d)
            basis, _ = np.linalg.qr(Xs.T)
            Xs = Xs @ basis
        R, Q, k_fit = kernel_pls(Xs.T @ Xs, (Xs.astype(np.float32).T @ Ys.astype(np.float32)).astype(np.float64), k)
        if basis is not None:
            R = basis @ R
        return R, Q, xm, xs, ym, ys, k_fit

    def _cv_scores(self, X, Y, splits, grid) -> np.ndarray:
        g = Y.shape[1]
        na = len(grid)
        S_p, S_pp, S_py = (np.zeros((na, g)) for _ in range(3))
        S_y, S_yy = np.zeros(g), np.zeros(g)
        n_tot = 0
        for train, val in splits:
            R, Q, xm, xs, ym, ys, k_fit = self._fit_stats(X[train], Y[train], grid[-1])
            Yv = Y[val]
            T = ((X[val] - xm) / xs) @ R  # validation scores, n_val x k
            P = np.tile(ym, (len(val), 1))
            done = 0
            for a, k in enumerate(grid):
                k = min(k, k_fit)
                if k > done:
                    P += (T[:, done:k] @ Q[:, done:k].T) * ys[None, :]
                    done = k
                S_p[a] += P.sum(0)
                S_pp[a] += np.einsum("ij,ij->j", P, P)
                S_py[a] += np.einsum("ij,ij->j", P, Yv)
            S_y += Yv.sum(0)
            S_yy += np.einsum("ij,ij->j", Yv, Yv)
            n_tot += len(val)
        # per-gene MSE ranks are scale-free; PCC ignores scale
        return pooled_scores(S_p, S_pp, S_py, S_y, S_yy, n_tot, self.scoring)

    def predict(self, X):
        check_is_fitted(self, "coef_")
        return self._linear_predict(self._validate_predict(X))
