r"""Multi-output ridge with a per-gene alpha, from one eigendecomposition per fold.

Maths (organised like scikit-learn's ``_RidgeGCV``).  With training features
centred and (optionally) scaled, :math:`X_s`, and genes standardised,
:math:`Y_s`, decompose the Gram matrix once,

.. math::  X_s^\top X_s = V \Lambda V^\top, \qquad B = V^\top X_s^\top Y_s ,

then for every alpha the coefficients and validation predictions are

.. math::  W_\alpha = V (\Lambda + \alpha I)^{-1} B, \qquad
           \hat Y_\alpha = (X^{val}_s V)(\Lambda + \alpha I)^{-1} B ,

a diagonal rescaling and one product: the whole alpha grid costs little more
than one alpha.  PCA to ``k`` components is the same formula restricted to
the top ``k`` eigenpairs (the PCA scores are :math:`X_s V_k`).

Scores are pooled over the out-of-fold rows from running sums
(:math:`\sum \hat y, \sum \hat y^2, \sum \hat y y` per alpha and gene), so
nothing of size n x genes x alphas is ever held.  The per-gene alpha is the
masked best-score update ``better = score_a > best; best[better] = ...``.

Fold Gram matrices are downdates of the full one (:math:`G_{train} = G -
X_{val}^\top X_{val}`), so each fold costs one ``eigh`` and products of
validation size.  ``cv="gcv"`` instead scores exact leave-one-out residuals
:math:`(y_i - \hat y_i)/(1 - h_{ii})` from the full-data decomposition.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from regress.backend import get_backend
from regress.base import MultiOutputHead
from regress.cv import inner_groups, make_splits
from featurize.errors import UsageError

#: 13 log-spaced values; features are standardised, so alphas are on the scale of n.
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))


def hest_alpha(n_features: int, n_targets: int) -> float:
    """HEST-Benchmark's fixed alpha, ``100 / (n_features * n_targets)``."""
    return 100.0 / (n_features * n_targets)


class RidgeHead(MultiOutputHead, RegressorMixin, BaseEstimator):
    """Ridge regression to many genes with alpha chosen by CV, per gene or shared.

    Parameters
    ----------
    alphas : sequence of float or "hest"
        Alpha grid; one value means no search.  ``"hest"`` is HEST's fixed
        ``100 / (n_features * n_genes)`` (after PCA when ``n_components``).
    alpha_per_target : bool
        Choose the alpha per gene (default) or one alpha for all genes.
    cv : int or "gcv"
        K-fold CV (grouped when ``groups`` are given to ``fit``) or exact
        leave-one-out via the GCV formula.
    scoring : "mse" or "pcc"
        What the alpha search maximises: negative MSE or pooled
        out-of-fold Pearson correlation (genes standardised).
    standardize : bool
        Scale features to unit variance inside the head.
    n_components : int or None
        Ridge on the top-k principal components (the HEST protocol uses 256).
    fit_intercept : bool
        Fit per-gene intercepts (always true in practice; HEST used False).
    device : "cpu" or "cuda"
        numpy on CPU, torch on CUDA; "cuda" without a GPU raises.
    random_state : int
        Seed of the (ungrouped) K-fold shuffle.
    """

    _head_name = "ridge"

    def __init__(self, alphas=DEFAULT_ALPHAS, alpha_per_target: bool = True, cv: Any = 5, scoring: str = "mse",
                 standardize: bool = True, n_components: int | None = None, fit_intercept: bool = True,
                 device: str = "cpu", random_state: int = 0):
        self.alphas = alphas
        self.alpha_per_target = alpha_per_target
        self.cv = cv
        self.scoring = scoring
        self.standardize = standardize
        self.n_components = n_components
        self.fit_intercept = fit_intercept
        self.device = device
        self.random_state = random_state

    # ------------------------------------------------------------------ fit
    def fit(self, X, y, groups=None):
        if self.scoring not in ("mse", "pcc"):
            raise UsageError(f"scoring must be 'mse' or 'pcc', got {self.scoring!r}.")
        X, Y = self._validate_fit(X, y)
        n, d = X.shape
        be = get_backend(self.device)
        xp = be.xp
        if self.n_components is not None and int(self.n_components) < 1:
            raise UsageError(f"n_components must be >= 1, got {self.n_components}.")
        # PCA cannot have more components than min(n, d); the effective k is recorded
        k = d if self.n_components is None else min(int(self.n_components), d, n)
        self.n_components_ = k
        alphas = self._alpha_grid(k, Y.shape[1])

        # global centring (for numerical safety of the downdates) and gene scaling
        center = self.fit_intercept or self.standardize or self.n_components is not None
        x_mean = X.mean(axis=0) if center else np.zeros(d)
        y_mean = Y.mean(axis=0)
        y_std = Y.std(axis=0)
        self.constant_targets_ = np.flatnonzero(y_std <= 1e-12 * np.maximum(1.0, np.abs(y_mean)))
        y_std = np.where(y_std > 1e-12 * np.maximum(1.0, np.abs(y_mean)), y_std, 1.0)
        Xc = be.asarray(X - x_mean, "float64")
        Ys = be.asarray((Y - (y_mean if self.fit_intercept else 0.0)) / y_std, "float64")
        Xc32, Ys32 = be.astype(Xc, "float32"), be.astype(Ys, "float32")
        G = Xc.T @ Xc if n >= d else None  # with n < d every decomposition is the n x n dual
        C = Xc32.T @ Ys32
        sx = xp.sum(Xc, axis=0)
        sy = xp.sum(Ys, axis=0)

        if len(alphas) == 1:
            best = np.zeros(Y.shape[1], dtype=int)
            self.cv_scores_ = None
        else:
            if self.cv == "gcv":
                scores = self._gcv_scores(be, Xc, Ys, alphas, k)
            else:
                groups = inner_groups(groups)
                self.inner_cv_grouped_ = groups is not None
                splits = make_splits(n, self.cv, groups, self.random_state)
                scores = self._kfold_scores(be, Xc, Ys, Xc32, Ys32, G, C, sx, sy, splits, alphas, k)
            self.cv_scores_ = scores  # (n_alphas, n_genes), higher is better
            best = _best_alpha_index(scores, self.alpha_per_target)

        self.alpha_ = np.asarray(alphas)[best]
        if n < d:
            lam, V, scale = _decompose_dual(be, Xc, self.standardize, k)
        else:
            lam, V, scale = _decompose(be, G, sx, n, self.standardize, k)
        B = V.T @ (C / be.astype(scale, "float32")[:, None])
        alpha_t = be.asarray(self.alpha_, "float32")
        coef_s = V @ (B / (be.astype(lam, "float32")[:, None] + alpha_t[None, :]))
        coef = be.to_numpy(coef_s).astype(np.float64) / be.to_numpy(scale)[:, None] * y_std[None, :]
        self.coef_ = coef.T if not self._y_1d else coef[:, 0]
        intercept = (y_mean if self.fit_intercept else np.zeros_like(y_mean)) - x_mean @ coef
        self.intercept_ = intercept if not self._y_1d else float(intercept[0])
        self.alphas_ = np.asarray(alphas)
        if self._y_1d:
            self.alpha_ = float(self.alpha_[0])
        return self

    def _alpha_grid(self, n_feat: int, n_targets: int) -> list[float]:
        if isinstance(self.alphas, str):
            if self.alphas != "hest":
                raise UsageError(f"alphas must be numbers or 'hest', got {self.alphas!r}.")
            return [hest_alpha(n_feat, n_targets)]
        alphas = [float(a) for a in np.atleast_1d(self.alphas)]
        if not alphas or min(alphas) < 0:
            raise UsageError("alphas must be a non-empty list of non-negative numbers.")
        return alphas

    def _kfold_scores(self, be, Xc, Ys, Xc32, Ys32, G, C, sx, sy, splits, alphas, k) -> np.ndarray:
        xp = be.xp
        g = Ys.shape[1]
        na = len(alphas)
        S_p = np.zeros((na, g))
        S_pp = np.zeros((na, g))
        S_py = np.zeros((na, g))
        S_y = np.zeros(g)
        S_yy = np.zeros(g)
        n_tot = 0
        for train, val in splits:
            vi = be.asarray(val, "int64")
            Xv = xp.take(Xc, vi, axis=0)
            Yv32 = xp.take(Ys32, vi, axis=0)
            n_tr = len(train)
            sx_tr = sx - xp.sum(Xv, axis=0)
            sy_tr = sy - xp.sum(xp.take(Ys, vi, axis=0), axis=0)
            mu = sx_tr / n_tr
            muy = be.astype(sy_tr / n_tr, "float32")
            if n_tr < Xc.shape[1]:  # fewer rows than features: decompose the n x n Gram instead
                lam, V, scale = _decompose_dual(be, xp.take(Xc, be.asarray(train, "int64"), axis=0), self.standardize, k)
            else:
                lam, V, scale = _decompose(be, G - Xv.T @ Xv, sx_tr, n_tr, self.standardize, k)
            C_tr = C - be.astype(Xv, "float32").T @ Yv32
            C_c = C_tr - be.astype(mu, "float32")[:, None] * be.astype(sy_tr, "float32")[None, :]
            scale32 = be.astype(scale, "float32")
            B = V.T @ (C_c / scale32[:, None])
            A = (be.astype(Xv - mu[None, :], "float32") / scale32[None, :]) @ V
            lam32 = be.astype(lam, "float32")
            # sum(P*Y) and sum(P) need no P: they are diagonal-weighted sums of
            # (A'Y_val) * B and (1'A) * B; only sum(P^2) needs P itself.
            AtY_B = (A.T @ Yv32) * B
            A1_B = xp.sum(A, axis=0)[:, None] * B
            sy_v = xp.sum(Yv32, axis=0)
            for a, alpha in enumerate(alphas):
                w = 1.0 / (lam32 + alpha)
                P = (A * w[None, :]) @ B
                p1 = w @ A1_B
                S_py[a] += be.to_numpy(w @ AtY_B + (muy * sy_v if self.fit_intercept else 0.0))
                pp = xp.sum(P * P, axis=0)
                if self.fit_intercept:  # P + muy, expanded
                    pp = pp + 2.0 * muy * p1 + len(val) * muy * muy
                    p1 = p1 + len(val) * muy
                S_p[a] += be.to_numpy(p1)
                S_pp[a] += be.to_numpy(pp)
            S_y += be.to_numpy(sy_v)
            S_yy += be.to_numpy(xp.sum(Yv32 * Yv32, axis=0))
            n_tot += len(val)
        return _pooled_scores(S_p, S_pp, S_py, S_y, S_yy, n_tot, self.scoring)

    def _gcv_scores(self, be, Xc, Ys, alphas, k) -> np.ndarray:
        """Exact leave-one-out scores from one decomposition of the full data."""
        xp = be.xp
        n = Xc.shape[0]
        sx = xp.sum(Xc, axis=0)
        lam, V, scale = _decompose(be, Xc.T @ Xc, sx, n, self.standardize, k)
        keep = lam > 1e-10 * float(be.to_numpy(xp.max(lam)))
        keep_np = be.to_numpy(keep)
        idx = be.asarray(np.flatnonzero(keep_np), "int64")
        lam_k = xp.take(lam, idx, axis=0)
        V_k = xp.take(V, idx, axis=1)
        Xs = (Xc - sx[None, :] / n) / be.astype(scale, "float64")[None, :]
        U = (Xs @ be.astype(V_k, "float64")) / xp.sqrt(lam_k)[None, :]
        Yc = Ys - xp.sum(Ys, axis=0)[None, :] / n if self.fit_intercept else Ys
        U32, Yc32 = be.astype(U, "float32"), be.astype(Yc, "float32")
        UtY = U32.T @ Yc32
        U2 = U * U
        g = Ys.shape[1]
        S_p, S_pp, S_py = (np.zeros((len(alphas), g)) for _ in range(3))
        Y32 = be.astype(Ys, "float32")
        sy, syy = xp.sum(Y32, axis=0), xp.sum(Y32 * Y32, axis=0)
        for a, alpha in enumerate(alphas):
            f = lam_k / (lam_k + alpha)
            h = U2 @ f + (1.0 / n if self.fit_intercept else 0.0)
            # leave-one-out prediction = y - (y - fit) / (1 - h)
            loo = Y32 - (Yc32 - U32 @ (be.astype(f, "float32")[:, None] * UtY)) / be.astype(1.0 - h, "float32")[:, None]
            S_p[a] = be.to_numpy(xp.sum(loo, axis=0))
            S_pp[a] = be.to_numpy(xp.sum(loo * loo, axis=0))
            S_py[a] = be.to_numpy(xp.sum(loo * Y32, axis=0))
        return _pooled_scores(S_p, S_pp, S_py, be.to_numpy(sy), be.to_numpy(syy), n, self.scoring)

    # -------------------------------------------------------------- predict
    def predict(self, X):
        check_is_fitted(self, "coef_")
        return self._linear_predict(self._validate_predict(X))


def _decompose(be, G, sx, n, standardize: bool, k: int):
    """Eigen-decomposition of the centred (scaled) Gram; top ``k`` pairs, descending."""
    xp = be.xp
    mu = sx / n
    Gc = G - n * (mu[:, None] * mu[None, :])
    var = xp.linalg.diagonal(Gc) / n if hasattr(xp.linalg, "diagonal") else xp.diagonal(Gc) / n
    if standardize:
        ok = var > 1e-12
        scale = xp.where(ok, xp.sqrt(xp.where(ok, var, 1.0)), xp.ones_like(var))
        Gc = Gc / (scale[:, None] * scale[None, :])
    else:
        scale = xp.ones_like(var)
    lam, V = xp.linalg.eigh(Gc)
    d = lam.shape[0]
    order = be.asarray(np.arange(d - 1, d - 1 - k, -1), "int64")
    lam = xp.clip(xp.take(lam, order, axis=0), 0.0, None)
    V = be.astype(xp.take(V, order, axis=1), "float32")
    return lam, V, scale


def _decompose_dual(be, Xrows, standardize: bool, k: int):
    """Same output as :func:`_decompose` from the n x n Gram of the rows (for n < d).

    With :math:`X_s = U S V^\\top`: eigenpairs of :math:`X_s X_s^\\top` give
    :math:`\\lambda = S^2` and :math:`V = X_s^\\top U / S`; directions with
    :math:`\\lambda = 0` carry no signal and are dropped (their coefficients are 0
    for any alpha > 0).
    """
    xp = be.xp
    n = Xrows.shape[0]
    mu = xp.sum(Xrows, axis=0) / n
    Xr = Xrows - mu[None, :]
    var = xp.sum(Xr * Xr, axis=0) / n
    if standardize:
        ok = var > 1e-12
        scale = xp.where(ok, xp.sqrt(xp.where(ok, var, 1.0)), xp.ones_like(var))
        Xr = Xr / scale[None, :]
    else:
        scale = xp.ones_like(var)
    lam, U = xp.linalg.eigh(Xr @ Xr.T)
    lam_np = be.to_numpy(lam)
    keep = np.flatnonzero(lam_np > 1e-10 * max(lam_np.max(), 1e-300))[::-1][:k]
    idx = be.asarray(keep.copy(), "int64")
    lam = xp.take(lam, idx, axis=0)
    U = xp.take(U, idx, axis=1)
    V = (Xr.T @ U) / xp.sqrt(lam)[None, :]
    return lam, be.astype(V, "float32"), scale


def _pooled_scores(S_p, S_pp, S_py, S_y, S_yy, n, scoring: str) -> np.ndarray:
    """Scores from pooled running sums: -MSE, or Pearson r (constant -> -inf)."""
    if scoring == "mse":
        return -(S_yy[None, :] - 2 * S_py + S_pp) / n
    cov = n * S_py - S_p * S_y[None, :]
    vp = n * S_pp - S_p**2
    vy = n * S_yy - S_y**2
    with np.errstate(divide="ignore", invalid="ignore"):
        r = cov / np.sqrt(np.maximum(vp, 0) * np.maximum(vy, 0)[None, :])
    return np.where(np.isfinite(r), r, -np.inf)


def _best_alpha_index(scores: np.ndarray, per_target: bool) -> np.ndarray:
    """Masked best-score update over the alpha grid (first alpha wins ties)."""
    n_alphas, g = scores.shape
    if not per_target:
        finite = np.where(np.isfinite(scores), scores, np.nan)
        mean = np.nanmean(finite, axis=1) if np.isfinite(finite).any() else np.zeros(n_alphas)
        return np.full(g, int(np.nanargmax(np.where(np.isnan(mean), -np.inf, mean))))
    best = np.full(g, -np.inf)
    idx = np.zeros(g, dtype=int)
    for a in range(n_alphas):
        better = scores[a] > best
        best[better] = scores[a][better]
        idx[better] = a
    return idx
