"""Feature transforms that use where a tile lies: its neighbours' features, its slide's mean.

``--center-slides`` splits each tile's features into its deviation from its slide's mean feature vector and
that mean (appended).  Staining and scanner differences between slides shift whole slides in feature
space; per-gene Pearson r within a slide ignores slide-wide offsets, so the head should learn from the
variation inside slides, which the deviations carry without the shift.  The appended means keep what
slide-level differences can teach (offsets between slides, scored by a pooled PCC).  A new slide is
centred on its own tiles (no expression is used), at CV and prediction time alike.

Spatial context: append the mean features of each tile's nearest neighbours.

Expression varies smoothly over tissue, and a spot's neighbours show more of
its micro-environment than the spot alone.  Neighbours are found by (x, y)
within the same slide only; a tile's own features are not part of the mean.
The same transform applies at prediction time, so test tables need x, y and
the slide column too.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from core.errors import TableError


def neighbour_features(X: np.ndarray, xy: np.ndarray | None, slides: np.ndarray | None, k: int,
                       source: str = "table") -> np.ndarray:
    """``[X, mean of the k nearest other tiles' X]`` (n x 2d); ``k=0`` returns X unchanged."""
    if k <= 0:
        return X
    return np.concatenate([X, neighbour_mean(X, xy, slides, k, source, "--context")], axis=1)


def neighbour_mean(X: np.ndarray, xy: np.ndarray | None, slides: np.ndarray | None, k: int,
                   source: str = "table", flag: str = "--context") -> np.ndarray:
    """Per row, the mean of ``X`` over its ``k`` nearest other rows of the same slide (itself when alone)."""
    if xy is None:
        raise TableError(f"{source}: {flag} needs x and y columns (tile centres) in the tile table.")
    bad = ~np.isfinite(np.asarray(xy, dtype=np.float64)).all(axis=1)
    if bad.any():
        raise TableError(f"{source}: {flag} needs every tile's x and y, but row {int(np.flatnonzero(bad)[0]) + 2} "
                         f"(and {int(bad.sum()) - 1} more) has none (empty or NaN); fill them or drop those rows.")
    slides = np.zeros(len(X), dtype=int) if slides is None else np.asarray(slides)
    out = np.empty_like(X)
    for s in np.unique(slides):
        idx = np.flatnonzero(slides == s)
        if len(idx) == 1:
            out[idx] = X[idx]
            continue
        kk = min(k, len(idx) - 1)
        _, nn = cKDTree(xy[idx]).query(xy[idx], k=kk + 1)
        nn = np.asarray(nn).reshape(len(idx), kk + 1)[:, 1:]  # drop the tile itself
        out[idx] = X[idx][nn].mean(axis=1)
    return out


def slide_centered(X: np.ndarray, slides: np.ndarray | None) -> np.ndarray:
    """``X`` minus, for each row, the mean of ``X`` over the rows of its slide (all rows: one slide)."""
    slides = np.zeros(len(X), dtype=int) if slides is None else np.asarray(slides)
    out = np.asarray(X, dtype=np.float64).copy()
    for s in np.unique(slides):
        m = slides == s
        out[m] -= out[m].mean(axis=0)
    return out


def slide_split(X: np.ndarray, slides: np.ndarray | None) -> np.ndarray:
    """``[X - slide mean, slide mean]`` per row (n x 2d): the ``--center-slides`` features."""
    centred = slide_centered(X, slides)
    return np.concatenate([centred, np.asarray(X, dtype=np.float64) - centred], axis=1)
