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

from regress.heads.base import MultiOutputHead, column_moments, scale_or_one
from regress.cv import inner_groups, make_splits
from regress.heads.selection import best_index, pooled_scores
from core.errors import UsageError

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
    cv, scoring, random_state : as in :class:`regress.heads.ridge.RidgeHead`.
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

    # ------------------------------------------------------------------ streaming fit
    def fit_chunks(self, chunks, n: int, groups=None, folds=None):
        """The same fit from row chunks (see :meth:`regress.heads.ridge.RidgeHead.fit_chunks`; primal case).

        Kernel PLS needs only the standardised cross-products of the training
        rows, and the validation scores only products of the validation part's
        sums with the rotations (:math:`T = X^{val}_s R`: :math:`1^\top T`,
        :math:`T^\top T`, :math:`T^\top Y^{val}`), so per-fold sufficient
        statistics of the globally centred data suffice.  ``fold_models_``: per
        fold, the model without it, its component counts chosen over the other
        folds (nested).
        """
        from regress.heads.ridge import _chunk_fold_stats

        self._check_params()
        st = _chunk_fold_stats(chunks, n, self.cv, groups, self.random_state, folds, scale_y=False)
        G, C, fsx, fsy, fsyy, fn, folds, x_mean, y_mean = st
        n_folds, d, g = G.shape[0], G.shape[1], C.shape[2]
        if n <= d:
            raise UsageError(f"the streaming PLS fit needs more rows than features ({n} <= {d}); fit in memory.")
        grid = sorted({min(int(k), d, n - 1) for k in np.atleast_1d(self.n_components)})
        self._y_1d = False

        def stats(without):
            keep = [f for f in range(n_folds) if f not in without]
            return G[keep].sum(0), C[keep].sum(0), fsx[keep].sum(0), fsy[keep].sum(0), fsyy[keep].sum(0), int(fn[keep].sum())

        def model(train, k):
            Gt, Ct, sx, sy, syy, nt = train
            mx, my = sx / nt, sy / nt
            xs = scale_or_one(x_mean + mx, np.sqrt(np.maximum(np.diag(Gt) / nt - mx * mx, 0.0)))[0]
            ys = scale_or_one(y_mean + my, np.sqrt(np.maximum(syy / nt - my * my, 0.0)))[0]
            if not self.scale:
                xs, ys = np.ones_like(xs), np.ones_like(ys)
            Cs = (Gt - nt * np.outer(mx, mx)) / np.outer(xs, xs)
            Ss = (Ct - nt * np.outer(mx, my)) / np.outer(xs, ys)
            R, Q, k_fit = kernel_pls(Cs, Ss.astype(np.float32).astype(np.float64), k)
            return R, Q, k_fit, mx, my, xs, ys

        def sums(train, h):
            R, Q, k_fit, mx, my, xs, ys = model(train, grid[-1])
            Gv, Cv, sxv, syv, n_v = G[h], C[h], fsx[h], fsy[h], int(fn[h])
            t1 = ((sxv - n_v * mx) / xs) @ R
            TT = R.T @ ((Gv - np.outer(mx, sxv) - np.outer(sxv, mx) + n_v * np.outer(mx, mx)) / np.outer(xs, xs)) @ R
            TY = R.T @ ((Cv - np.outer(mx, syv)) / xs[:, None])
            S_p, S_pp, S_py = (np.zeros((len(grid), g)) for _ in range(3))
            for a, k in enumerate(grid):
                k = min(k, k_fit)
                Qk = Q[:, :k]
                lin1 = (t1[:k] @ Qk.T) * ys  # sum over rows of ys * T Q'
                quad = np.einsum("jk,kl,jl->j", Qk, TT[:k, :k], Qk) * ys * ys
                S_p[a] = n_v * my + lin1
                S_pp[a] = n_v * my * my + 2 * my * lin1 + quad
                S_py[a] = my * syv + ys * np.einsum("kj,jk->j", TY[:k], Qk)
            return S_p, S_pp, S_py, syv, fsyy[h], n_v

        def choose(without):
            parts = [sums(stats(set(without) | {h}), h) for h in range(n_folds) if h not in without]
            return best_index(pooled_scores(*(sum(c) for c in zip(*parts)), self.scoring), self.per_target)

        if len(grid) > 1:
            parts = [sums(stats({f}), f) for f in range(n_folds)]
            self.cv_scores_ = pooled_scores(*(sum(c) for c in zip(*parts)), self.scoring)
            idx = best_index(self.cv_scores_, self.per_target)
        else:
            self.cv_scores_ = None
            idx = np.zeros(g, dtype=int)
        self.inner_cv_grouped_ = inner_groups(groups) is not None

        def coef_of(train, idx_):
            k_gene = np.asarray(grid)[idx_]
            R, Q, k_fit, mx, my, xs, ys = model(train, int(max(k_gene)))
            k_gene = np.minimum(k_gene, k_fit)
            coef = np.zeros((d, g))
            for k in np.unique(k_gene):
                cols = np.flatnonzero(k_gene == k)
                coef[:, cols] = R[:, :k] @ Q[cols, :k].T
            coef = coef * ys[None, :] / xs[:, None]
            return coef, (y_mean + my) - (x_mean + mx) @ coef, k_gene

        coef, intercept, k_gene = coef_of(stats(set()), idx)
        self.n_components_ = k_gene
        self.coef_, self.intercept_ = coef.T, intercept
        self.n_features_in_ = d
        self.fold_models_ = []
        for f in range(n_folds):
            idx_f = choose({f}) if len(grid) > 1 and n_folds >= 3 else idx
            c_f, b_f, _ = coef_of(stats({f}), idx_f)
            self.fold_models_.append((c_f, b_f))
        self.folds_ = folds
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
