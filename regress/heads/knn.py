"""k-nearest-neighbour head: a diverse stack member on whitened embeddings.

Features are standardised and projected on their leading principal components,
whitened (each component to unit variance), so every direction of the
embedding counts alike; a tile's prediction is the mean expression of its k
nearest training tiles there.  k is chosen per gene from ``n_neighbors`` by
(grouped) K-fold CV on MSE: the neighbour lists are computed once per fold at
the largest k, and every smaller k is a prefix of them.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils._param_validation import Interval

from regress.heads.base import MultiOutputHead, standardizer
from regress.cv import inner_groups, make_splits


def _whitener(X: np.ndarray, n_components: int):
    """(mean, projection) so that ``(X - mean) @ projection`` is standardised, PCA-rotated and whitened."""
    mean, std = standardizer(X)
    Z = (X - mean) / std
    _, s, Vt = np.linalg.svd(Z, full_matrices=False)
    k = min(n_components, int(np.sum(s > s[0] * 1e-7)) if len(s) and s[0] > 0 else 1)
    scale = s[:k] / np.sqrt(max(X.shape[0] - 1, 1))
    return mean, (Vt[:k].T / std[:, None]) / scale[None, :]


def _neighbours(A: np.ndarray, B: np.ndarray, k: int, rows: int = 1024) -> np.ndarray:
    """Indices (into B) of the ``k`` nearest rows of B for each row of A, nearest first (ties: lower index)."""
    bb = np.einsum("ij,ij->i", B, B)
    out = np.empty((A.shape[0], k), dtype=np.int64)
    for s in range(0, A.shape[0], rows):
        a = A[s : s + rows]
        d = bb[None, :] - 2.0 * a @ B.T  # + |a|^2, the same for the whole row
        part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < B.shape[0] else np.tile(np.arange(B.shape[0]), (len(a), 1))
        dd = np.take_along_axis(d, part, axis=1)
        order = np.lexsort((part, dd), axis=1)
        out[s : s + rows] = np.take_along_axis(part, order, axis=1)
    return out


def _prefix_means(Y: np.ndarray, idx: np.ndarray, ks, rows: int = 128):
    """Yield (row slice, (len(ks), rows, n_genes)): the mean of Y over the first k neighbours, for each k.

    A block of rows at a time: memory stays rows x max(k) x genes."""
    for s in range(0, idx.shape[0], rows):
        csum = np.cumsum(Y[idx[s : s + rows]], axis=1)  # (rows, kmax, genes)
        yield slice(s, s + rows), np.stack([csum[:, k - 1] / k for k in ks])


class KNNHead(MultiOutputHead, RegressorMixin, BaseEstimator):
    """Mean expression of the k nearest training tiles on whitened principal components.

    Parameters
    ----------
    n_neighbors : int or sequence of int
        Candidate k; one value means no search, several are chosen per gene by CV.
    n_components : int
        Principal components kept (whitened) before the neighbour search.
    cv : int
        K-fold CV for the choice of k (grouped when ``groups`` are given to ``fit``).
    random_state : int
        Seed of the (ungrouped) K-fold shuffle.
    """

    _head_name = "knn"
    _parameter_constraints = {
        "n_neighbors": ["array-like", Interval(Integral, 1, None, closed="left")],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "cv": ["cv_object"],
        "random_state": ["random_state"],
    }

    def __init__(self, n_neighbors: Any = (5, 10, 20, 40), n_components: int = 64, cv: Any = 5, random_state: int = 0):
        self.n_neighbors = n_neighbors
        self.n_components = n_components
        self.cv = cv
        self.random_state = random_state

    def _grid(self, n_train: int) -> list[int]:
        ks = np.atleast_1d(np.asarray(self.n_neighbors, dtype=int))
        if ks.size == 0 or (ks < 1).any():
            from regress.heads.base import HeadParamError

            raise HeadParamError(f"knn: n_neighbors must be positive integers, got {self.n_neighbors!r}.")
        return sorted({int(min(k, n_train)) for k in ks})

    def fit(self, X, y, groups=None):
        X, Y = self._validate_fit(X, y)
        n = X.shape[0]
        ks = self._grid(n - 1 if n > 1 else 1)
        if len(ks) == 1:
            self.k_ = np.full(Y.shape[1], ks[0])
            self.cv_scores_ = None
        else:
            groups = inner_groups(groups)
            sse = np.zeros((len(ks), Y.shape[1]))
            for train, val in make_splits(n, self.cv, groups, self.random_state):
                mean, P = _whitener(X[train], self.n_components)
                kk = [min(k, len(train)) for k in ks]
                idx = _neighbours((X[val] - mean) @ P, (X[train] - mean) @ P, max(kk))
                for rows, pred in _prefix_means(Y[train], idx, kk):
                    sse += ((pred - Y[val[rows]][None]) ** 2).sum(axis=1)
            self.cv_scores_ = -sse / n  # (n_k, n_genes), higher is better
            self.k_ = np.asarray(ks)[np.argmax(self.cv_scores_, axis=0)]
        self.neighbors_grid_ = np.asarray(ks)
        self.x_mean_, self.projection_ = _whitener(X, self.n_components)
        self.train_embedding_ = (X - self.x_mean_) @ self.projection_
        self.train_targets_ = Y.copy()
        return self

    def predict(self, X):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "train_targets_")
        X = self._validate_predict(X)
        ks = [int(k) for k in self.neighbors_grid_]
        idx = _neighbours((X - self.x_mean_) @ self.projection_, self.train_embedding_, max(ks))
        pick = np.searchsorted(ks, self.k_)  # each gene's k, as a position in the grid
        genes = np.arange(self.train_targets_.shape[1])
        P = np.empty((X.shape[0], len(genes)))
        for rows, means in _prefix_means(self.train_targets_, idx, ks):  # (n_k, rows, genes)
            P[rows] = means[pick, :, genes].T
        return P[:, 0] if self._y_1d else P
