"""Pearson correlation per gene and per tile, and MSE.

A gene that is constant in the measured values has no PCC: it is reported
and excluded from means (never a NaN mean).  A constant *prediction* of a
varying gene (e.g. the predict-the-mean baseline) scores 0.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _pcc_columns(Y: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCC of each column pair; returns (r with NaN where Y is constant, Y-constant mask)."""
    Y = np.asarray(Y, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    yc = Y - Y.mean(0)
    pc = P - P.mean(0)
    sy = np.sqrt((yc * yc).sum(0))
    sp = np.sqrt((pc * pc).sum(0))
    const_y = sy <= 1e-12 * np.maximum(1.0, np.abs(Y).max(0))
    const_p = sp <= 1e-12 * np.maximum(1.0, np.abs(P).max(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (yc * pc).sum(0) / (sy * sp)
    r = np.where(const_p, 0.0, r)
    r = np.where(const_y, np.nan, r)
    return np.clip(r, -1.0, 1.0), const_y


def pcc_per_gene(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """(g,) Pearson r per gene across tiles; NaN for genes constant in Y."""
    return _pcc_columns(Y, P)[0]


def pcc_per_tile(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """(n,) Pearson r per tile across genes; NaN for tiles constant in Y."""
    return _pcc_columns(np.asarray(Y).T, np.asarray(P).T)[0]


def evaluate(Y: np.ndarray, P: np.ndarray, genes: list[str] | None = None) -> dict[str, Any]:
    """Summary metrics plus the per-gene table (as a dict of lists)."""
    Y = np.asarray(Y, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    if Y.shape != P.shape:
        raise ValueError(f"targets {Y.shape} and predictions {P.shape} differ in shape.")
    if not np.isfinite(P).all():
        raise ValueError("predictions hold NaN or inf.")
    genes = list(genes) if genes is not None else [f"g{j}" for j in range(Y.shape[1])]
    r_gene = pcc_per_gene(Y, P)
    r_tile = pcc_per_tile(Y, P)
    ok = ~np.isnan(r_gene)
    mse_gene = ((Y - P) ** 2).mean(0)
    return {
        "pcc_gene_mean": float(np.mean(r_gene[ok])) if ok.any() else float("nan"),
        "pcc_gene_median": float(np.median(r_gene[ok])) if ok.any() else float("nan"),
        "pcc_tile_mean": float(np.nanmean(r_tile)) if np.isfinite(r_tile).any() else float("nan"),
        "mse": float(mse_gene.mean()),
        "n_genes": int(Y.shape[1]),
        "n_tiles": int(Y.shape[0]),
        "constant_genes": [genes[j] for j in np.flatnonzero(~ok)],
        "per_gene": {"gene": genes, "pcc": [None if np.isnan(v) else float(v) for v in r_gene],
                     "mse": [float(v) for v in mse_gene]},
    }


def evaluate_by_fold(Y: np.ndarray, P: np.ndarray, fold: np.ndarray) -> dict[str, Any]:
    """Per-held-out-fold PCC per gene, averaged over folds (the HEST / spatial
    papers' convention: each held-out slide scored on its own).  A constant
    prediction within a fold (e.g. the training mean) scores 0 there."""
    per_fold = []
    for f in np.unique(fold):
        m = fold == f
        if m.sum() < 3:
            continue
        r = pcc_per_gene(Y[m], P[m])
        if np.isfinite(r).any():
            per_fold.append(float(np.nanmean(r)))
    return {"pcc_gene_mean_by_fold": float(np.mean(per_fold)) if per_fold else float("nan"),
            "pcc_gene_mean_folds": per_fold}
