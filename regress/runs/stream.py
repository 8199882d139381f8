"""Fitting from disk in row chunks: targets in a columnar file, features from the caches, metrics from sums.

Used by ``fit --stream`` (and automatically when X and Y would take more than
:data:`STREAM_ABOVE_FRACTION` of the machine's memory).  The tile table is
converted once to ``<cache_dir>/<table>/targets-<sha16>.h5`` (``ids``,
``genes``, ``Y`` rows x genes float32 in row chunks, and ``groups``,
``slides``, ``xy`` when present), reading the CSV in chunks, and found again
by the table file's stat (its bytes are hashed only when the stat changed); the fit reads
features and targets a block of rows at a time (:meth:`RidgeHead.fit_chunks`),
then a third pass writes the out-of-fold predictions of each fold's model
into the run folder and accumulates the metrics from per-fold sums.  Nothing
of size rows x genes is ever held.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd

from core.atomic import atomic_path
from core.errors import CacheError, TableError, UsageError
from core.integrity import H5_ERRORS, Sealed, file_sha256, open_h5, seal
from core.log import say
from featurize.tables.table import GROUP_CANDIDATES, META_COLUMNS, NOT_GENES, _sidecar_genes

STREAM_ABOVE_FRACTION = 0.5
ROWS = 8192
_STR = h5py.string_dtype(encoding="utf-8")


def targets_store(table_path: str | os.PathLike, cache_dir: str | os.PathLike, group_col: str | None = None) -> Path:
    """The table's targets as an HDF5 columnar file, made once (keyed by the table file's sha256)."""
    from featurize.tables.digests import stat_of

    table_path = Path(table_path).resolve()
    if table_path.suffix.lower() not in (".csv",):
        raise TableError(f"{table_path}: streaming reads CSV tables in chunks; convert this table to CSV.")
    folder = Path(cache_dir) / table_path.stem
    st = list(stat_of(table_path))
    for done in sorted(folder.glob("targets-*.h5")):  # the table's stat unchanged: no need to hash it again
        try:
            with open_h5(done, TableError, "targets store", "delete it") as fh:
                if list(fh.attrs.get("table_stat", [])) == st and _sound(fh, done):
                    return done
        except (TableError, *H5_ERRORS):
            continue
    out = folder / f"targets-{file_sha256(table_path)[:16]}.h5"
    if out.is_file():  # same bytes, new stat (touched, copied): record the stat
        try:
            with open_h5(out, TableError, "targets store", "delete it", mode="r+") as fh:
                if _sound(fh, out):
                    fh.attrs["table_stat"] = st
                    return out
        except (TableError, *H5_ERRORS):
            pass
        out.unlink()  # damaged: made again below
    header = list(pd.read_csv(table_path, nrows=0).columns)
    gcol = group_col or next((c for c in GROUP_CANDIDATES if c in header), None)
    if group_col and group_col not in header:
        raise TableError(f"{table_path}: --groups column '{group_col}' is not in the table.")
    meta = set(META_COLUMNS) | ({gcol} if gcol else set())
    listed = _sidecar_genes(table_path)
    genes = [c for c in header if c in set(listed)] if listed is not None else \
        [c for c in header if c not in meta and c not in NOT_GENES]
    if not genes:
        raise TableError(f"{table_path}: no gene columns to fit.")
    slide_col = next((c for c in ("slide", "section") if c in header), None)
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as fh:
            n = 0
            Yd = fh.create_dataset("Y", shape=(0, len(genes)), maxshape=(None, len(genes)), dtype=np.float32,
                                   chunks=(min(ROWS, 1024), len(genes)))
            cols = {"ids": [], "groups": [], "slides": [], "xy": []}
            for part in pd.read_csv(table_path, chunksize=ROWS, dtype={"ID": str}):
                Y = part[genes].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
                if not np.isfinite(Y).all():
                    r = int(np.argwhere(~np.isfinite(Y))[0][0])
                    raise TableError(f"{table_path}: row {n + r + 2} holds a non-numeric or non-finite gene value.")
                Yd.resize(n + len(Y), axis=0)
                Yd[n:n + len(Y)] = Y
                cols["ids"].extend(part["ID"].astype(str))
                if gcol:
                    cols["groups"].extend(part[gcol].astype(str))
                if slide_col:
                    cols["slides"].extend(part[slide_col].astype(str))
                if "x" in part and "y" in part:
                    cols["xy"].append(part[["x", "y"]].to_numpy(np.float64))
                n += len(Y)
            fh.create_dataset("ids", data=np.asarray(cols["ids"], dtype=object), dtype=_STR)
            fh.create_dataset("genes", data=np.asarray(genes, dtype=object), dtype=_STR)
            if gcol:
                fh.create_dataset("groups", data=np.asarray(cols["groups"], dtype=object), dtype=_STR)
                fh.attrs["group_col"] = gcol
            if slide_col:
                fh.create_dataset("slides", data=np.asarray(cols["slides"], dtype=object), dtype=_STR)
            if cols["xy"]:
                fh.create_dataset("xy", data=np.concatenate(cols["xy"]))
            fh.attrs["table_stat"] = st
            seal(fh, skip_attrs=("table_stat",))
    return out


def _sound(fh, path: Path) -> bool:
    """True when a targets store's checksums all hold (a damaged one is made again from the table)."""
    try:
        r = Sealed(fh, path, TableError, "delete it")
        return r.sealed and not r.verify_all()
    except (TableError, *H5_ERRORS):
        return False


def _reader(path: Path, what: str, error, hint: str):
    fh = open_h5(path, error, what, hint)
    return fh, Sealed(fh, path, error, hint)


class StreamingMetrics:
    """evaluate() and evaluate_by_fold() (regress.metrics) from per-fold running sums, a chunk at a time."""

    def __init__(self, n_genes: int, n_folds: int):
        z = lambda: np.zeros((n_folds, n_genes))  # noqa: E731
        self.n = np.zeros(n_folds)
        self.sy, self.syy, self.sp, self.spp, self.spy = z(), z(), z(), z(), z()
        self.max_y, self.max_p = z(), z()
        self.tile_sum, self.tile_count = 0.0, 0

    def add(self, Y: np.ndarray, P: np.ndarray, fold: np.ndarray) -> None:
        from regress.metrics import pcc_per_tile

        Y, P = np.asarray(Y, np.float64), np.asarray(P, np.float64)
        for f in np.unique(fold):
            m = fold == f
            y, p = Y[m], P[m]
            self.n[f] += len(y)
            self.sy[f] += y.sum(0)
            self.syy[f] += (y * y).sum(0)
            self.sp[f] += p.sum(0)
            self.spp[f] += (p * p).sum(0)
            self.spy[f] += (p * y).sum(0)
            self.max_y[f] = np.maximum(self.max_y[f], np.abs(y).max(0))
            self.max_p[f] = np.maximum(self.max_p[f], np.abs(p).max(0))
        r = pcc_per_tile(Y, P)
        self.tile_sum += float(np.nansum(r))
        self.tile_count += int(np.isfinite(r).sum())

    @staticmethod
    def _pcc(n, sy, syy, sp, spp, spy, max_y, max_p):
        vy = np.maximum(syy - sy * sy / n, 0.0)
        vp = np.maximum(spp - sp * sp / n, 0.0)
        const_y = np.sqrt(vy) <= 1e-12 * np.maximum(1.0, max_y)
        const_p = np.sqrt(vp) <= 1e-12 * np.maximum(1.0, max_p)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = (spy - sp * sy / n) / np.sqrt(vy * vp)
        r = np.where(const_p, 0.0, r)
        return np.clip(np.where(const_y, np.nan, r), -1.0, 1.0)

    def result(self, genes: Sequence[str]) -> dict[str, Any]:
        tot = [a.sum(0) for a in (self.sy, self.syy, self.sp, self.spp, self.spy)]
        n = self.n.sum()
        r_gene = self._pcc(n, *tot, self.max_y.max(0), self.max_p.max(0))
        ok = ~np.isnan(r_gene)
        mse = (tot[1] - 2 * tot[4] + tot[3]) / n
        per_fold = []
        for f in range(len(self.n)):
            if self.n[f] < 3:
                continue
            r = self._pcc(self.n[f], self.sy[f], self.syy[f], self.sp[f], self.spp[f], self.spy[f], self.max_y[f],
                          self.max_p[f])
            if np.isfinite(r).any():
                per_fold.append(float(np.nanmean(r)))
        genes = list(genes)
        return {"pcc_gene_mean": float(np.mean(r_gene[ok])) if ok.any() else float("nan"),
                "pcc_gene_median": float(np.median(r_gene[ok])) if ok.any() else float("nan"),
                "pcc_tile_mean": self.tile_sum / self.tile_count if self.tile_count else float("nan"),
                "mse": float(mse.mean()), "n_genes": len(genes), "n_tiles": int(n),
                "constant_genes": [genes[j] for j in np.flatnonzero(~ok)],
                "per_gene": {"gene": genes, "pcc": [None if np.isnan(v) else float(v) for v in r_gene],
                             "mse": [float(v) for v in mse]},
                "pcc_gene_mean_by_fold": float(np.mean(per_fold)) if per_fold else float("nan"),
                "pcc_gene_mean_folds": per_fold}


def feature_chunks(caches: Sequence[Path], targets: Path, rows: int = ROWS):
    """(n, dim, callable -> iterator of (start, X, Y)) over the caches' features and the targets' rows."""
    ft, rt = _reader(targets, "targets store", TableError, "delete it and rerun fit, which makes it again")
    with ft:
        ids = rt.read("ids")
    dims = []
    readers = {}
    for c in caches:
        fh, r = _reader(c, "cache file", CacheError, "rerun embed, which replaces it")
        with fh:
            r.check_attrs()
            if not np.array_equal(r.read("ids"), ids):
                raise CacheError(f"{c}: its rows are not the table's rows in order; rerun embed for this table.")
            if not r.read("valid").all():
                raise CacheError(f"{c}: holds skipped tiles (--skip-bad); streaming needs every row: fix or drop them.")
            dims.append(fh["features"].shape[1])

    def chunks():
        opened = [_reader(c, "cache file", CacheError, "rerun embed, which replaces it") for c in caches]
        for (_, r), c in zip(opened, caches):  # verified blocks are remembered across passes
            r._ok = readers.setdefault(str(c), set())
        try:
            ft, rt = _reader(targets, "targets store", TableError, "delete it and rerun fit, which makes it again")
            rt._ok = readers.setdefault(str(targets), set())
            with ft:
                for s in range(0, len(ids), rows):
                    X = np.concatenate([r.rows("features", s, s + rows).astype(np.float32) for _, r in opened], axis=1)
                    yield s, X, rt.rows("Y", s, s + rows)
        finally:
            for fh, _ in opened:
                fh.close()

    return len(ids), int(sum(dims)), chunks


def fit_streaming(targets: Path, caches: Sequence[Path], head, *, groups_on: bool, n_folds: int, seed: int, log=say):
    """Fit ``head`` (a RidgeHead or PLSHead) from the files with ``n_folds`` outer CV folds (split as in-memory ``fit``
    splits them); returns (oof writer for the run folder, metrics accumulator, genes, n).  Each fold's
    out-of-fold model chose its alphas by CV over the other folds (nested)."""
    from regress.heads.pls import PLSHead
    from regress.heads.ridge import RidgeHead

    if not isinstance(head, (RidgeHead, PLSHead)):
        raise UsageError("--stream fits ridge and PLS heads (ridge, ridge-pcc, pls); fit the others in memory.")
    n, d, chunks = feature_chunks(caches, targets)
    ft, rt = _reader(targets, "targets store", TableError, "delete it and rerun fit, which makes it again")
    with ft:
        genes = list(rt.read("genes"))
        groups = rt.read("groups") if groups_on and "groups" in ft else None
    log(f"[fit] streaming {n} rows x {d} features -> {len(genes)} genes from disk")
    from regress.cv import make_splits

    outer = np.empty(n, dtype=np.int64)
    for f, (_, val) in enumerate(make_splits(n, n_folds, groups, seed)):
        outer[val] = f
    head.fit_chunks(chunks, n, groups=groups, folds=outer)
    folds = head.folds_
    metrics_acc = StreamingMetrics(len(genes), len(head.fold_models_))

    def write_oof(path: Path) -> None:
        ft, rt = _reader(targets, "targets store", TableError, "delete it and rerun fit, which makes it again")
        with h5py.File(path, "w") as fh, ft:
            fh.create_dataset("ids", data=rt.read("ids").astype(object), dtype=_STR)
            fh.create_dataset("genes", data=rt.read("genes").astype(object), dtype=_STR)
            oof = fh.create_dataset("oof", shape=(n, len(genes)), dtype=np.float32, chunks=(min(n, 1024), len(genes)))
            y = fh.create_dataset("y", shape=(n, len(genes)), dtype=np.float32, chunks=(min(n, 1024), len(genes)))
            fh.create_dataset("fold", data=folds.astype(np.int32))
            for k in ("groups", "slides"):
                if k in ft and (k != "groups" or groups is not None):
                    fh.create_dataset(k, data=rt.read(k).astype(object), dtype=_STR)
            if "xy" in ft:
                fh.create_dataset("xy", data=rt.read("xy"))
            for s, X, Y in chunks():
                fb = folds[s:s + len(X)]
                P = np.empty((len(X), len(genes)))
                for f in np.unique(fb):
                    coef, b = head.fold_models_[f]
                    P[fb == f] = X[fb == f] @ coef + b
                oof[s:s + len(X)] = P
                y[s:s + len(X)] = Y
                metrics_acc.add(Y, P, fb)

    return write_oof, metrics_acc, genes, n
