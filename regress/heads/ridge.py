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
nothing of size n x genes x alphas is ever held.  None of them forms
:math:`\hat Y_\alpha`: with :math:`A = X^{val}_s V`, the first two are
:math:`w_\alpha^\top` times :math:`(A^\top 1) \circ B` and
:math:`(A^\top Y^{val}) \circ B`, and :math:`\sum \hat y^2` follows from a
partial-fraction identity (:class:`_SumSq`), so a fold costs a fixed number
of products whatever the grid.  The per-gene alpha is the masked best-score
update ``better = score_a > best; best[better] = ...``.

Rows are laid out fold by fold, so each validation part is a slice; the full
Gram and :math:`X^\top Y` are sums of the parts', and fold Gram matrices are
downdates (:math:`G_{train} = G - X_{val}^\top X_{val}`): each fold costs one
``eigh`` and products of validation size.  ``cv="gcv"`` instead scores exact
leave-one-out residuals :math:`(y_i - \hat y_i)/(1 - h_{ii})` from the
full-data decomposition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numbers import Integral, Real

from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from core.errors import UsageError
from regress.heads.backend import get_backend
from regress.heads.base import MultiOutputHead, column_moments, scale_or_one
from regress.cv import inner_groups, make_splits
from regress.heads.selection import best_index, pooled_scores

#: 13 log-spaced values (10**-1 ... 10**5); features are standardised, so alphas are on the scale of n.
#: Written out because they are part of every run's identity and np.logspace's last digit differs between
#: numpy releases (2.4 gives 316.22776601683796 for 10**2.5, earlier releases 316.2277660168379).
DEFAULT_ALPHAS = (0.1, 0.31622776601683794, 1.0, 3.1622776601683795, 10.0, 31.622776601683793, 100.0,
                  316.2277660168379, 1000.0, 3162.2776601683795, 10000.0, 31622.776601683792, 100000.0)


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
    _parameter_constraints = {
        "alphas": ["array-like", StrOptions({"hest"}), Interval(Real, 0, None, closed="left")],
        "alpha_per_target": ["boolean"],
        "cv": ["cv_object", StrOptions({"gcv"})],
        "scoring": [StrOptions({"mse", "pcc"})],
        "standardize": ["boolean"],
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "fit_intercept": ["boolean"],
        "device": [str],
        "random_state": ["random_state"],
    }

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
        X, Y = self._validate_fit(X, y, dtype=None)
        n, d = X.shape
        be = get_backend(self.device)
        xp = be.xp
        # PCA cannot have more components than min(n, d); the effective k is recorded
        k = d if self.n_components is None else min(int(self.n_components), d, n)
        self.n_components_ = k
        alphas = self._alpha_grid(k, Y.shape[1])

        kfold = len(alphas) > 1 and self.cv != "gcv"
        order = None
        if kfold:
            groups = inner_groups(groups)
            self.inner_cv_grouped_ = groups is not None
            splits, order = _contiguous_folds(make_splits(n, self.cv, groups, self.random_state), n)

        # global centring (for numerical safety of the downdates) and gene scaling; with
        # K-fold the rows are laid out fold by fold, so every validation part is a view
        center = self.fit_intercept or self.standardize or self.n_components is not None
        x_mean = X.mean(axis=0, dtype=np.float64) if center else np.zeros(d)
        y_mean, y_std = column_moments(Y)
        y_std, constant = scale_or_one(y_mean, y_std)
        self.constant_targets_ = np.flatnonzero(constant)
        Xc = np.empty((n, d))
        np.subtract(X if order is None else X[order], x_mean, out=Xc)
        Xc = be.asarray(Xc, "float64")
        Ys32 = be.asarray(_standardized(Y, y_mean if self.fit_intercept else np.zeros_like(y_mean), y_std, order))
        sx = xp.sum(Xc, axis=0)
        sy = xp.sum(Ys32, axis=0, dtype=xp.float64)

        if kfold:
            pieces = [_fold_piece(be, Xc, Ys32, val, gram=n >= d) for _, val in splits]
        if kfold and order is not None:  # the parts tile the rows: X'X and X'Y are sums of the parts'
            G = _sum([p.G for p in pieces]) if n >= d else None
            C = _sum([p.C for p in pieces])
        else:  # one alpha, GCV, or overlapping validation parts
            G = Xc.T @ Xc if n >= d else None  # with n < d every decomposition is the n x n dual
            C = be.astype(Xc, "float32").T @ Ys32

        decomposition = None
        if len(alphas) == 1:
            best = np.zeros(Y.shape[1], dtype=int)
            self.cv_scores_ = None
        else:
            if kfold:
                fold_sums = [self._fold_sums(be, Xc, sx, sy, C, piece,
                                             self._fold_decomposition(be, Xc, sx, G, train, piece, k), alphas)
                             for (train, _), piece in zip(splits, pieces)]
                scores = pooled_scores(*(sum(parts) for parts in zip(*fold_sums)), self.scoring)
            else:
                scores, decomposition = self._gcv_scores(be, Xc, Ys32, G, sx, alphas, k)
            self.cv_scores_ = scores  # (n_alphas, n_genes), higher is better
            best = best_index(scores, self.alpha_per_target)

        if decomposition is not None:  # GCV decomposed the same data: no second decomposition
            lam, V, scale = decomposition
        elif n < d:
            lam, V, scale = _decompose_dual(be, Xc, self.standardize, k)
        else:
            lam, V, scale = _decompose(be, G, sx, n, self.standardize, k)

        self.alpha_ = np.asarray(alphas)[best]
        B = V.T @ (C / be.astype(scale, "float32")[:, None])
        alpha_t = be.asarray(self.alpha_, "float32")
        coef_s = V @ (B / (be.astype(lam, "float32")[:, None] + alpha_t[None, :]))
        coef = be.to_numpy(coef_s).astype(np.float64)
        coef /= be.to_numpy(scale)[:, None]
        coef *= y_std[None, :]
        self.coef_ = coef.T if not self._y_1d else coef[:, 0]
        intercept = (y_mean if self.fit_intercept else np.zeros_like(y_mean)) - x_mean @ coef
        self.intercept_ = intercept if not self._y_1d else float(intercept[0])
        self.alphas_ = np.asarray(alphas)
        if self._y_1d:
            self.alpha_ = float(self.alpha_[0])
        return self

    # ------------------------------------------------------------------ streaming fit
    def fit_chunks(self, chunks, n: int, groups=None, folds=None):
        """The same fit from row chunks, never holding all of X or Y (primal case, K-fold CV).

        ``chunks()`` returns a fresh iterator of ``(start, X_chunk, Y_chunk)`` (rows
        ``start:start+len``, in order); it is called twice.  Pass 1 takes the global
        means and gene scales; pass 2 accumulates, per CV fold, the sufficient
        statistics of the globally centred data (X'X, X'Y, column sums of X, Y
        and Y^2).  Every fold's validation scores follow from them exactly, since
        with :math:`A = X^{val}_s V` the scores need only :math:`A^\top A`,
        :math:`A^\top Y^{val}` and :math:`A^\top 1`, each a product of the fold's
        sums with :math:`V` (see :meth:`_fold_sums`).  Memory: per fold a d x d and
        a d x genes matrix, whatever the number of rows.  Float64 throughout; the
        predictions equal :meth:`fit`'s to rounding (tested).

        ``folds`` (a fold index per row) replaces the head's own K-fold split.
        ``fold_models_`` then holds, per fold, the model fitted without it whose
        alphas were chosen by CV over the *other* folds only (nested: the held-out
        fold never picks its own alpha); they make the out-of-fold predictions.
        """
        self._check_params()
        if self.cv == "gcv" or self.n_components is not None or not self.fit_intercept:
            raise UsageError("the streaming ridge fit supports K-fold CV with an intercept and no PCA "
                             "(cv=int, n_components=None, fit_intercept=True).")
        G, C, fsx, fsy, fsyy, fn, folds, x_mean, y_mean, y_std, constant = _chunk_fold_stats(
            chunks, n, self.cv, groups, self.random_state, folds)
        n_folds, d, g = G.shape[0], G.shape[1], C.shape[2]
        if n < d:
            raise UsageError(f"the streaming ridge fit needs more rows than features ({n} <= {d}); fit in memory.")
        self.constant_targets_ = np.flatnonzero(constant)
        alphas = self._alpha_grid(d, g)
        be = get_backend("cpu")
        Gt, Ct, sxt = G.sum(0), C.sum(0), fsx.sum(0)
        self._fold_parts = []
        def stats(without):
            keep = [f for f in range(n_folds) if f not in without]
            return (G[keep].sum(0), C[keep].sum(0), fsx[keep].sum(0), fsy[keep].sum(0), int(fn[keep].sum()))

        def val(f):
            return G[f], C[f], fsx[f], fsy[f], int(fn[f])

        parts = [self._fold_sums_from_stats(be, stats({f}), val(f), alphas) + (fsy[f], fsyy[f], int(fn[f]))
                 for f in range(n_folds)]
        if len(alphas) == 1:
            best = np.zeros(g, dtype=int)
            self.cv_scores_ = None
        else:
            scores = pooled_scores(*(sum(col) for col in zip(*parts)), self.scoring)
            self.cv_scores_ = scores
            best = best_index(scores, self.alpha_per_target)
        # nested choice for each fold's own model: its alphas from CV over the other folds
        fold_best = []
        for f in range(n_folds):
            if len(alphas) == 1 or n_folds < 3:
                fold_best.append(best)
                continue
            inner = [self._fold_sums_from_stats(be, stats({f, h}), val(h), alphas, keep=False) + (fsy[h], fsyy[h], int(fn[h]))
                     for h in range(n_folds) if h != f]
            fold_best.append(best_index(pooled_scores(*(sum(col) for col in zip(*inner)), self.scoring),
                                        self.alpha_per_target))
        self.inner_cv_grouped_ = inner_groups(groups) is not None
        lam, V, scale = _decompose(be, Gt, sxt, n, self.standardize, d, v_dtype="float64")
        self.alpha_ = np.asarray(alphas)[best]
        B = V.T @ (Ct / scale[:, None])
        coef = V @ (B / (lam[:, None] + self.alpha_[None, :]))
        coef /= scale[:, None]
        coef *= y_std[None, :]
        self._y_1d = False
        self.n_features_in_ = d
        self.n_components_ = d
        self.coef_ = coef.T
        self.intercept_ = y_mean - x_mean @ coef
        self.alphas_ = np.asarray(alphas)
        # each CV fold's model at the chosen alphas: what the out-of-fold predictions are made with
        self.fold_models_ = []
        for (lam_f, V_f, scale_f, B_f, mu_f, muy_f), b_f in zip(self._fold_parts, fold_best):
            a_f = np.asarray(alphas)[b_f]
            coef_f = (V_f @ (B_f / (lam_f[:, None] + a_f[None, :]))) / scale_f[:, None] * y_std[None, :]
            self.fold_models_.append((coef_f, y_mean + y_std * muy_f - (x_mean + mu_f) @ coef_f))
        self.folds_ = folds
        del self._fold_parts
        return self

    def _fold_sums_from_stats(self, be, train, val, alphas, keep: bool = True):
        """One fold's (sum p, sum p^2, sum p*y) per alpha and gene, from its sufficient statistics.

        The same quantities as :meth:`_fold_sums`, with :math:`A^\top A`,
        :math:`A^\top 1` and :math:`A^\top Y^{val}` formed from the validation
        part's sums (centred by the training mean, scaled by the training scale)
        instead of its rows; float64 throughout.
        """
        G_tr, C_tr, sx_tr, sy_tr, n_tr = train
        Gv, Cv, sxv, syv, n_v = val
        lam, V, scale = _decompose(be, G_tr, sx_tr, n_tr, self.standardize, G_tr.shape[0], v_dtype="float64")
        mu, muy = sx_tr / n_tr, sy_tr / n_tr
        B = V.T @ ((C_tr - mu[:, None] * sy_tr[None, :]) / scale[:, None])
        Gvc = Gv - np.outer(mu, sxv) - np.outer(sxv, mu) + n_v * np.outer(mu, mu)
        M = V.T @ (Gvc / np.outer(scale, scale)) @ V
        a1 = V.T @ ((sxv - n_v * mu) / scale)
        AtY = V.T @ ((Cv - mu[:, None] * syv[None, :]) / scale[:, None])
        W = 1.0 / (lam[None, :] + np.asarray(alphas, np.float64)[:, None])
        p1 = W @ (a1[:, None] * B)
        py = W @ (AtY * B)
        pp = np.empty_like(p1)
        for a in range(W.shape[0]):
            WB = W[a][:, None] * B
            pp[a] = np.einsum("kj,kj->j", WB, M @ WB)
        m = muy[None, :]
        py = py + m * syv[None, :]
        pp = pp + 2.0 * m * p1 + n_v * m * m
        p1 = p1 + n_v * m
        if keep:
            self._fold_parts.append((lam, V, scale, B, mu, muy))
        return p1, pp, py

    def _alpha_grid(self, n_feat: int, n_targets: int) -> list[float]:
        if isinstance(self.alphas, str):
            if self.alphas != "hest":
                raise UsageError(f"alphas must be numbers or 'hest', got {self.alphas!r}.")
            return [hest_alpha(n_feat, n_targets)]
        alphas = [float(a) for a in np.atleast_1d(self.alphas)]
        if not alphas or min(alphas) < 0:
            raise UsageError("alphas must be a non-empty list of non-negative numbers.")
        return alphas

    def _fold_decomposition(self, be, Xc, sx, G, train, piece, k):
        """The training part's decomposition: a downdate of the full Gram, or the dual when n < d."""
        n, d = Xc.shape
        n_tr = n - piece.Y.shape[0]
        if n_tr < d:  # fewer rows than features: decompose the n x n Gram instead
            return _decompose_dual(be, be.xp.take(Xc, be.asarray(train, "int64"), axis=0), self.standardize, k)
        return _decompose(be, G - piece.G, sx - piece.sx, n_tr, self.standardize, k)

    def _fold_sums(self, be, Xc, sx, sy, C, piece, decomposition, alphas):
        """One fold's running sums (sum p, sum p^2, sum p*y per alpha and gene; sum y, sum y^2).

        Genes go in blocks of ``_GENE_BLOCK``: the temporaries stay a few MB
        (fresh large arrays cost page faults) and memory does not grow with genes.
        """
        xp = be.xp
        n = Xc.shape[0]
        n_v = piece.Y.shape[0]
        n_tr = n - n_v
        sx_tr = sx - piece.sx
        sy_tr = sy - piece.sy
        mu = sx_tr / n_tr
        muy = be.astype(sy_tr / n_tr, "float32")
        lam, V, scale = decomposition
        scale32 = be.astype(scale, "float32")
        mu32, sy_tr32, sy_v32 = (be.astype(v, "float32") for v in (mu, sy_tr, piece.sy))
        Xv = Xc[piece.val] if isinstance(piece.val, slice) else xp.take(Xc, piece.val, axis=0)
        A = (be.astype(Xv - mu[None, :], "float32") / scale32[None, :]) @ V
        a1 = xp.sum(A, axis=0)
        W = 1.0 / (lam[None, :] + be.asarray(alphas, "float64")[:, None])  # (n_alphas, k)
        W32 = be.astype(W, "float32")
        sum_sq = _SumSq(be, A, lam, W, max(alphas))
        parts = []
        for j in range(0, C.shape[1], _GENE_BLOCK):
            J = slice(j, j + _GENE_BLOCK)
            B = V.T @ (((C[:, J] - piece.C[:, J]) - mu32[:, None] * sy_tr32[None, J]) / scale32[:, None])
            # sum(P) and sum(P*Y) need no P: weighted sums of (1'A) * B and (A'Y_val) * B;
            # sum(P^2) neither (see _SumSq)
            p1 = W32 @ (a1[:, None] * B)
            py = W32 @ ((A.T @ piece.Y[:, J]) * B)
            pp = sum_sq(B)
            if self.fit_intercept:  # P + muy, expanded
                m = muy[None, J]
                py = py + m * sy_v32[None, J]
                pp = pp + 2.0 * m * p1 + n_v * m * m
                p1 = p1 + n_v * m
            parts.append([be.to_numpy(t).astype(np.float64) for t in (p1, pp, py)])
        p1, pp, py = (np.concatenate(cols, axis=1) for cols in zip(*parts))
        return p1, pp, py, be.to_numpy(piece.sy).astype(np.float64), be.to_numpy(piece.syy).astype(np.float64), n_v

    def _gcv_scores(self, be, Xc, Ys32, G, sx, alphas, k):
        """Exact leave-one-out scores from one decomposition of the full data, and that
        decomposition (``(lam, V, scale)``), which the refit reuses."""
        xp = be.xp
        n = Xc.shape[0]
        primal = n > Xc.shape[1]
        if primal:  # top k of the d x d Gram, descending: the nonzero ones are a prefix
            lam, V, scale = _decompose(be, G, sx, n, self.standardize, k, v_dtype="float64")
            lam_np = be.to_numpy(lam)
            m = int(np.count_nonzero(lam_np > 1e-10 * max(lam_np.max(initial=0.0), 1e-300)))
            lam_k = lam[:m]
            U = (((Xc - sx[None, :] / n) / be.astype(scale, "float64")[None, :]) @ V[:, :m]) / xp.sqrt(lam_k)[None, :]
            decomposition = (lam, be.astype(V, "float32"), scale)
        else:  # U straight from the n x n Gram, orthonormal to float64 rounding (its h is exact near 1)
            lam_k, U, Xr, scale = _dual_eigh(be, Xc, self.standardize, k)
            decomposition = (lam_k, _dual_v(be, lam_k, U, Xr), scale)
        sy, syy = xp.sum(Ys32, axis=0, dtype=xp.float64), xp.sum(Ys32 * Ys32, axis=0, dtype=xp.float64)
        # With g = alpha / (lam + alpha): residual = R0 + U (g * U'Y) and 1 - h = h0 + U^2 g, where
        # R0 = Y - U U'Y and h0 = 1 - 1/n - rowsum(U^2) do not depend on alpha.  Near interpolation
        # (n <= d, small alpha) both are tiny, and this form computes them without cancellation; there
        # (n small) the products run in float64 too, elsewhere in float32.
        work = "float32" if primal else "float64"
        Uw = be.astype(U, work)
        U2 = U * U
        h0 = 1.0 - (1.0 / n if self.fit_intercept else 0.0) - xp.sum(U2, axis=1)
        g = [alpha / (lam_k + alpha) for alpha in alphas]
        inv_d = [be.astype(1.0 / (h0 + U2 @ g_a), work)[:, None] for g_a in g]
        g_w = [be.astype(g_a, work)[:, None] for g_a in g]
        S_p, S_pp, S_py = (np.zeros((len(alphas), Ys32.shape[1])) for _ in range(3))
        for j in range(0, Ys32.shape[1], _GENE_BLOCK):  # blocks: the n x block temporaries get reused
            J = slice(j, j + _GENE_BLOCK)
            Ysw = be.astype(Ys32[:, J], work)
            Yc = Ysw - be.astype(sy[J] / n, work)[None, :] if self.fit_intercept else Ysw
            UtY = Uw.T @ Yc
            R0 = Yc - Uw @ UtY
            for a in range(len(alphas)):
                # leave-one-out prediction = y - (y - fit) / (1 - h)
                loo = Ysw - (R0 + Uw @ (g_w[a] * UtY)) * inv_d[a]
                S_p[a, J] = be.to_numpy(xp.sum(loo, axis=0, dtype=xp.float64))
                S_pp[a, J] = be.to_numpy(xp.sum(loo * loo, axis=0, dtype=xp.float64))
                S_py[a, J] = be.to_numpy(xp.sum(loo * Ysw, axis=0, dtype=xp.float64))
        return pooled_scores(S_p, S_pp, S_py, be.to_numpy(sy), be.to_numpy(syy), n, self.scoring), decomposition

    # -------------------------------------------------------------- predict
    def predict(self, X):
        check_is_fitted(self, "coef_")
        return self._linear_predict(self._validate_predict(X))


#: genes per block in the fold and GCV loops (a 1,536 x 512 float64 block is 6 MB)
_GENE_BLOCK = 512


def _standardized(Y: np.ndarray, mean: np.ndarray, std: np.ndarray, order=None, rows: int = 256) -> np.ndarray:
    """``((Y[order] - mean) / std)`` as float32, computed in float64 a block of rows at a time."""
    out = np.empty(Y.shape, dtype=np.float32)
    for i in range(0, Y.shape[0], rows):
        blk = Y[i:i + rows] if order is None else Y[order[i:i + rows]]
        out[i:i + rows] = (blk - mean) / std
    return out


def _chunk_fold_stats(chunks, n, cv, groups, random_state, folds=None, scale_y=True):
    """Two passes over row chunks: global means (and gene scales), then per-fold sums of the centred data.

    Returns ``(G, C, sx, sy, syy, counts, folds, x_mean, y_mean[, y_std])`` with per-fold
    X'X, X'Y, column sums of X, Y and Y^2 (fold first), where Y is centred (``scale_y``:
    and standardised by its global scale).  Shared by the streaming ridge and PLS fits.
    """
    if folds is None:
        folds = np.empty(n, dtype=np.int64)
        for f, (_, val) in enumerate(make_splits(n, cv, inner_groups(groups), random_state)):
            folds[val] = f
    folds = np.asarray(folds, dtype=np.int64)
    n_folds = int(folds.max()) + 1
    sx = sy = syy = None
    rows = 0
    for _, Xb, Yb in chunks():
        Xb, Yb = np.asarray(Xb, np.float64), np.asarray(Yb, np.float64).reshape(len(Xb), -1)
        sx = Xb.sum(0) if sx is None else sx + Xb.sum(0)
        sy = Yb.sum(0) if sy is None else sy + Yb.sum(0)
        syy = (Yb * Yb).sum(0) if syy is None else syy + (Yb * Yb).sum(0)
        rows += len(Xb)
    if rows != n:
        raise UsageError(f"the chunks hold {rows} rows, not {n}.")
    d, g = sx.shape[0], sy.shape[0]
    x_mean, y_mean = sx / n, sy / n
    y_std, constant = scale_or_one(y_mean, np.sqrt(np.maximum(syy / n - y_mean ** 2, 0.0)))
    div = y_std if scale_y else np.ones(g)
    G, C = np.zeros((n_folds, d, d)), np.zeros((n_folds, d, g))
    fsx, fsy, fsyy = np.zeros((n_folds, d)), np.zeros((n_folds, g)), np.zeros((n_folds, g))
    for start, Xb, Yb in chunks():
        Xc = np.asarray(Xb, np.float64) - x_mean
        Ys = (np.asarray(Yb, np.float64).reshape(len(Xc), -1) - y_mean) / div
        fb = folds[start:start + len(Xc)]
        for f in np.unique(fb):
            m = fb == f
            Xf, Yf = Xc[m], Ys[m]
            G[f] += Xf.T @ Xf
            C[f] += Xf.T @ Yf
            fsx[f] += Xf.sum(0)
            fsy[f] += Yf.sum(0)
            fsyy[f] += (Yf * Yf).sum(0)
    fn = np.bincount(folds, minlength=n_folds)
    out = (G, C, fsx, fsy, fsyy, fn, folds, x_mean, y_mean)
    return out + ((y_std, constant) if scale_y else ())


def _contiguous_folds(splits, n: int):
    """Renumber rows so that the validation parts are consecutive slices.

    Returns ``(splits, order)``: the splits with validation parts as slices of
    the reordered rows and ``order`` (new row i is old row ``order[i]``), or the
    splits as index arrays and ``order=None`` when the validation parts do not
    tile the rows (overlapping custom splits).  Every training part must be the
    rows outside its validation part: the fold Gram matrices are downdates.
    """
    for i, (train, val) in enumerate(splits):
        if len(train) + len(val) != n or len(np.union1d(train, val)) != n:
            raise UsageError(f"RidgeHead's CV split {i} is not 'train = all rows outside validation'; "
                             "use K-fold style splits (cv=int or a KFold/GroupKFold splitter).")
    order = np.concatenate([np.asarray(val) for _, val in splits])
    if len(order) != n or not np.array_equal(np.sort(order), np.arange(n)):
        return splits, None
    out, start = [], 0
    for _, val in splits:
        stop = start + len(val)
        out.append((np.r_[0:start, stop:n], slice(start, stop)))
        start = stop
    return out, order


@dataclass(frozen=True)
class _FoldPiece:
    """A validation part: its rows and targets, and its share of the full sums
    (X'X or None, X'Y, column sums of X and Y, sum of Y^2)."""

    val: Any
    Y: Any
    G: Any
    C: Any
    sx: Any
    sy: Any
    syy: Any


def _fold_piece(be, Xc, Ys32, val, gram: bool) -> _FoldPiece:
    """``val`` is a slice (a view, no copy) or an index array."""
    xp = be.xp
    if isinstance(val, slice):
        vi, Xv, Yv = val, Xc[val], Ys32[val]
    else:
        vi = be.asarray(val, "int64")
        Xv, Yv = xp.take(Xc, vi, axis=0), xp.take(Ys32, vi, axis=0)
    return _FoldPiece(vi, Yv, Xv.T @ Xv if gram else None, be.astype(Xv, "float32").T @ Yv, xp.sum(Xv, axis=0),
                      xp.sum(Yv, axis=0, dtype=xp.float64), xp.sum(Yv * Yv, axis=0, dtype=xp.float64))


def _sum(arrays):
    total = arrays[0] + arrays[1] if len(arrays) > 1 else arrays[0]
    for a in arrays[2:]:
        total += a  # in place: no fresh array per addition
    return total


def _eig_clusters(lam: np.ndarray, alpha_max: float, rtol: float = 1e-9) -> np.ndarray:
    """Labels of runs of (sorted) eigenvalues whose neighbours are closer than
    ``rtol * (lam_max + alpha_max)``; across labels every gap is wider."""
    if lam.size == 0:
        return np.zeros(0, dtype=int)
    tau = rtol * (float(np.max(lam)) + alpha_max)
    return np.concatenate([[0], np.cumsum(np.abs(np.diff(lam)) > tau)])


class _SumSq:
    r"""Column sums of squares of :math:`P_\alpha = A\,\mathrm{diag}(w_\alpha)\,B` for every alpha,
    without forming :math:`P_\alpha` (``W`` holds :math:`w_{\alpha k} = 1/(\lambda_k + \alpha)`).

    With :math:`M = A^\top A`,
    :math:`\sum_i P_{ij}^2 = \sum_{k,l} w_k w_l M_{kl} B_{kj} B_{lj}`, and for
    :math:`\lambda_k \ne \lambda_l` the partial fraction
    :math:`w_k w_l = (w_k - w_l)/(\lambda_l - \lambda_k)` turns the double
    sum into :math:`2 \sum_k w_k B_{kj} D_{kj}` with
    :math:`D = N B,\ N_{kl} = M_{kl}/(\lambda_l - \lambda_k)` (0 on the
    diagonal): one product per fold instead of one per alpha.  Pairs of
    (near-)equal eigenvalues would divide by ~0, so runs of them
    (:func:`_eig_clusters`) keep the plain double sum, which is exact and
    costs (run length)^2 per gene.  The partial fractions are evaluated in
    float64: their rounding grows like :math:`(\lambda+\alpha)/\text{gap}
    \le 10^9`.  ``method="direct"`` forms every :math:`P_\alpha` (the
    reference; "auto" takes it when it costs fewer flops).
    """

    def __init__(self, be, A, lam, W, alpha_max: float, method: str = "auto"):
        xp = be.xp
        self.be, self.A, self.W = be, A, W
        n_v, k = A.shape
        na = W.shape[0]
        labels = _eig_clusters(be.to_numpy(lam), alpha_max)
        runs = [np.flatnonzero(labels == c) for c in np.flatnonzero(np.bincount(labels) > 1)] if k else []
        spectral_cost = k * k + na * sum(len(r) ** 2 for r in runs)
        self.direct = method == "direct" or (method == "auto" and spectral_cost >= na * n_v * k)
        if self.direct:
            self.W32 = be.astype(W, "float32")
            return
        M = be.astype(A.T @ A, "float64")
        M = (M + M.T) / 2.0  # exactly symmetric: the pairing (k, l) <-> (l, k) relies on it
        lam_np = be.to_numpy(lam).astype(np.float64)
        diff = lam_np[None, :] - lam_np[:, None]  # [k, l] = lam_l - lam_k
        np.fill_diagonal(diff, np.inf)  # N is 0 on the diagonal and inside runs
        for r in runs:
            diff[np.ix_(r, r)] = np.inf
        self.N = M / be.asarray(diff, "float64")
        self.diagM = _diagonal(xp, M)
        self.W2 = W * W
        # runs of equal length are stacked: (n_runs, length) index, M blocks without diagonal, weights
        self.runs = []
        M_np, W_np = (be.to_numpy(M), be.to_numpy(W)) if runs else (None, None)
        for length in sorted({len(r) for r in runs}):
            idx_np = np.stack([r for r in runs if len(r) == length])
            Mr = M_np[idx_np[:, :, None], idx_np[:, None, :]] * (1.0 - np.eye(length))
            Wr = W_np[:, idx_np]  # (n_alphas, n_runs, length)
            self.runs.append((be.asarray(idx_np, "int64"), be.asarray(Mr, "float64"), be.asarray(Wr, "float64")))

    def __call__(self, B):
        be, xp = self.be, self.be.xp
        if self.direct:
            rows = []
            for a in range(self.W32.shape[0]):
                P = (self.A * self.W32[a][None, :]) @ B
                rows.append(xp.sum(be.astype(P * P, "float64"), axis=0))
            return xp.stack(rows)
        B64 = be.astype(B, "float64")
        pp = self.W2 @ (self.diagM[:, None] * B64 * B64) + 2.0 * (self.W @ (B64 * (self.N @ B64)))
        for idx, Mr, Wr in self.runs:
            Br = xp.take(B64, xp.reshape(idx, (-1,)), axis=0)
            Br = xp.reshape(Br, (idx.shape[0], idx.shape[1], Br.shape[-1]))  # (n_runs, length, genes)
            extra = []
            for a in range(Wr.shape[0]):
                Z = Wr[a][:, :, None] * Br
                extra.append(xp.sum(Z * (Mr @ Z), axis=(0, 1)))
            pp = pp + xp.stack(extra)
        return pp


def _diagonal(xp, M):
    return xp.linalg.diagonal(M) if hasattr(xp.linalg, "diagonal") else xp.diagonal(M)


def _feature_scale(xp, var, mean, standardize: bool):
    """Per-feature standard deviation (1 for constant features: :func:`regress.heads.base.scale_or_one`), or ones."""
    if not standardize:
        return xp.ones_like(var)
    return scale_or_one(mean, xp.sqrt(xp.clip(var, 0.0, None)), xp)[0]


def _eigh(be, S):
    """Symmetric eigendecomposition, ascending; LAPACK's divide and conquer in place on numpy."""
    if be.device is None:
        import scipy.linalg

        # S is symmetric: its transpose is the Fortran-ordered matrix LAPACK wants, without a copy
        return scipy.linalg.eigh(S.T, driver="evd", overwrite_a=True, check_finite=False)
    return be.xp.linalg.eigh(S)


def _decompose(be, G, sx, n, standardize: bool, k: int, v_dtype: str = "float32"):
    """Eigen-decomposition of the centred (scaled) Gram; top ``k`` pairs, descending."""
    xp = be.xp
    mu = sx / n
    Gc = G - n * (mu[:, None] * mu[None, :])
    scale = _feature_scale(xp, _diagonal(xp, Gc) / n, mu, standardize)
    if standardize:
        Gc /= scale[:, None]  # in place: a fresh d x d array costs page faults
        Gc /= scale[None, :]
    lam, V = _eigh(be, Gc)
    d = lam.shape[0]
    order = be.asarray(np.arange(d - 1, d - 1 - k, -1), "int64")
    lam = xp.clip(xp.take(lam, order, axis=0), 0.0, None)
    V = be.astype(xp.take(V, order, axis=1), v_dtype)
    return lam, V, scale


def _dual_eigh(be, Xrows, standardize: bool, k: int):
    """Top-k eigenpairs with nonzero eigenvalue of the n x n Gram of the centred (scaled) rows,
    descending: ``(lam, U, Xr, scale)`` with ``Xr`` those rows."""
    xp = be.xp
    n = Xrows.shape[0]
    mu = xp.sum(Xrows, axis=0) / n
    Xr = Xrows - mu[None, :]
    scale = _feature_scale(xp, xp.sum(Xr * Xr, axis=0) / n, mu, standardize)
    if standardize:
        Xr = Xr / scale[None, :]
    lam, U = xp.linalg.eigh(Xr @ Xr.T)
    lam_np = be.to_numpy(lam)
    keep = np.flatnonzero(lam_np > 1e-10 * max(lam_np.max(), 1e-300))[::-1][:k]
    idx = be.asarray(keep.copy(), "int64")
    return xp.take(lam, idx, axis=0), xp.take(U, idx, axis=1), Xr, scale


def _dual_v(be, lam, U, Xr):
    r"""Feature-space eigenvectors from the dual ones: :math:`V = X_s^\top U / \sqrt{\lambda}`."""
    return be.astype((Xr.T @ U) / be.xp.sqrt(lam)[None, :], "float32")


def _decompose_dual(be, Xrows, standardize: bool, k: int):
    r"""Same output as :func:`_decompose` from the n x n Gram of the rows (for n < d).

    With :math:`X_s = U S V^\top`: eigenpairs of :math:`X_s X_s^\top` give
    :math:`\lambda = S^2` and :math:`V = X_s^\top U / S`; directions with
    :math:`\lambda = 0` carry no signal and are dropped (their coefficients are 0
    for any alpha > 0).
    """
    lam, U, Xr, scale = _dual_eigh(be, Xrows, standardize, k)
    return lam, _dual_v(be, lam, U, Xr), scale
