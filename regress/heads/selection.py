"""Choosing a value per gene from a CV grid (ridge alphas, PLS component counts): shared by the heads."""
from __future__ import annotations

import numpy as np

from regress.metrics import pcc_per_gene


def fold_score(y_val: np.ndarray, pred: np.ndarray, scoring: str, n_rows: int, n_folds: int) -> np.ndarray:
    """One validation fold's share of a per-gene CV score (``pred`` may carry leading grid axes before
    rows x genes): ``-SSE / n_rows`` (summed over the folds: -MSE), or Pearson r / ``n_folds`` (summed: the
    folds' mean r; a gene constant in the fold scores 0 there)."""
    if scoring == "mse":
        return -((pred - y_val) ** 2).sum(axis=-2) / n_rows
    flat = pred.reshape(-1, *pred.shape[-2:])
    r = np.stack([np.nan_to_num(pcc_per_gene(y_val, p)) for p in flat])
    return r.reshape(*pred.shape[:-2], -1) / n_folds


def pooled_scores(S_p, S_pp, S_py, S_y, S_yy, n, scoring: str) -> np.ndarray:
    """Scores from pooled running sums: -MSE, or Pearson r (constant -> -inf)."""
    if scoring == "mse":
        return -(S_yy[None, :] - 2 * S_py + S_pp) / n
    cov = n * S_py - S_p * S_y[None, :]
    vp = n * S_pp - S_p**2
    vy = n * S_yy - S_y**2
    with np.errstate(divide="ignore", invalid="ignore"):
        r = cov / np.sqrt(np.maximum(vp, 0) * np.maximum(vy, 0)[None, :])
    return np.where(np.isfinite(r), r, -np.inf)


def best_index(scores: np.ndarray, per_target: bool) -> np.ndarray:
    """Masked best-score update over a grid (alphas, component counts; the first value wins ties)."""
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
