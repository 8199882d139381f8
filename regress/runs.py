"""Fit a head on cached features with grouped CV and write a run folder.

Run folder contract (``RUN_FORMAT`` 1), ``<runs_dir>/<name>/``:

* ``run.json``     - format, tool version, command, table path + fingerprint,
  backbones with their cache paths and fingerprints (random-init flagged),
  head name and parameters, folds, genes, timings;
* ``metrics.json`` - CV metrics (PCC per gene mean/median, per tile, MSE,
  constant genes, per-gene table);
* ``per_gene.csv`` - gene, pcc, mse;
* ``oof.h5``       - ``ids`` (n,), ``genes`` (g,), ``oof`` (n, g) float32,
  ``fold`` (n,) int: the out-of-fold predictions stacking learns from;
* ``model.joblib`` - the head refit on all rows.

The folder is written under a temporary name and renamed when complete, so a
folder with the final name is always a finished run.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import joblib
import numpy as np

from featurize import __version__
from featurize.cache import load_features
from featurize.errors import RunError, TableError
from featurize.table import TileTable, index_of, read_table
from regress.context import neighbour_features
from regress.cv import accepts_groups, cross_val_predict_groups, make_splits
from regress.heads import make_head
from regress.metrics import evaluate, evaluate_by_fold

RUN_FORMAT = 1
_STR = h5py.string_dtype(encoding="utf-8")


@dataclass
class TrainingData:
    """Features of one or more backbones aligned to a table's targets."""

    table: TileTable
    ids: np.ndarray
    X: np.ndarray
    Y: np.ndarray
    groups: np.ndarray | None
    caches: list[dict[str, Any]]


def load_training_data(data: str | os.PathLike | TileTable, backbones: Sequence[str], cache_dir="cache",
                       cache_files: Sequence[str] | None = None, group_col: str | None = None,
                       context: int = 0) -> TrainingData:
    """Read the table and the caches, align rows by ID, concatenate backbones,
    append ``context`` nearest-neighbour mean features (0 = none)."""
    table = data if isinstance(data, TileTable) else read_table(data, group_col=group_col, require_genes=True,
                                                                check_files=False)
    if table.Y is None:
        raise TableError(f"{table.source}: no gene columns; fit needs a training table with one column per gene.")
    feats, infos = [], []
    sources = list(cache_files) if cache_files else list(backbones)
    for src in sources:
        cache = load_features(table, None if cache_files else src, cache_dir, cache_file=src if cache_files else None)
        feats.append(cache)
        a = cache.attrs
        infos.append({"backbone": cache.backbone, "cache": str(cache.path), "fingerprint": a["fingerprint"],
                      "random_init": bool(a["random_init"]), "weights_sha256": a["weights_sha256"],
                      "weights_source": a["weights_source"], "weights_path": a.get("weights_path", ""),
                      "tta": int(a["tta"]), "dtype": a["dtype"], "key": json.loads(a["key_json"])})
    # rows present in every cache (tiles skipped with --skip-bad drop out), in table order
    present = set.intersection(*(set(c.ids) for c in feats))
    rows = np.array([i for i, k in enumerate(table.ids) if k in present], dtype=int)
    ids = table.ids[rows]
    X = np.concatenate([c.features[index_of(c.ids, ids)] for c in feats], axis=1)
    X = neighbour_features(X, table.xy[rows] if table.xy is not None else None,
                           table.slides[rows] if table.slides is not None else None, context, str(table.source))
    groups = table.groups[rows] if table.groups is not None else None
    return TrainingData(table, ids, X, table.Y[rows], groups, infos)


@dataclass
class RunResult:
    path: Path
    metrics: dict[str, Any]
    fit_seconds: float
    oof: np.ndarray


def fit_run(data, backbones: Sequence[str], head: str = "ridge", *, cache_dir="cache", runs_dir="runs",
            cache_files: Sequence[str] | None = None, folds: int = 5, group_col: str | None = None,
            use_groups: bool = True, seed: int = 0, device: str = "cpu", name: str | None = None,
            command: str | None = None, log=print, training: TrainingData | None = None,
            context: int = 0) -> RunResult:
    """Cross-validate ``head`` on the cached features, refit on all rows, write the run folder."""
    td = training or load_training_data(data, backbones, cache_dir, cache_files, group_col, context)
    groups = td.groups if use_groups else None
    splits = make_splits(len(td.ids), folds, groups, seed)
    fold_of = np.zeros(len(td.ids), dtype=np.int32)
    for f, (_, val) in enumerate(splits):
        fold_of[val] = f
    est = make_head(head, device, seed)
    if device.startswith("cuda") and head in ("pls", "mean"):
        log(f"[fit] note: head '{head}' has no GPU path and runs on the CPU.")
    t0 = time.perf_counter()
    oof = cross_val_predict_groups(est, td.X, td.Y, splits, groups,
                                   on_fold=lambda i, s: log(f"[fit] {head}: fold {i + 1}/{len(splits)} in {s:.1f}s"))
    cv_seconds = time.perf_counter() - t0
    metrics = evaluate(td.Y, oof, td.table.genes)
    metrics.update(evaluate_by_fold(td.Y, oof, fold_of))
    t1 = time.perf_counter()
    model = make_head(head, device, seed)
    model.fit(td.X, td.Y, **({"groups": groups} if groups is not None and accepts_groups(model) else {}))
    refit_seconds = time.perf_counter() - t1
    bb_names = [c["backbone"] for c in td.caches]
    ctx = f"-ctx{context}" if context else ""
    name = name or f"{td.table.name}-{'+'.join(bb_names)}-{head}{ctx}".replace(":", "_").replace("/", "_")
    info = {
        "format": RUN_FORMAT,
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "table": {"path": str(td.table.source), "fingerprint": td.table.fingerprint(), "n_rows": len(td.table),
                  "n_used": len(td.ids), "group_col": td.table.group_col if use_groups else None},
        "backbones": td.caches,
        "random_init": any(c["random_init"] for c in td.caches),
        "head": {"name": head, "params": {k: _jsonable(v) for k, v in est.get_params().items()}},
        "context": context,
        "folds": {"n": len(splits), "seed": seed, "grouped": groups is not None},
        "genes": td.table.genes,
        "cv_seconds": cv_seconds,
        "refit_seconds": refit_seconds,
        "summary": {k: metrics[k] for k in ("pcc_gene_mean", "pcc_gene_mean_by_fold", "pcc_gene_median",
                                            "pcc_tile_mean", "mse")},
    }
    path = write_run(Path(runs_dir) / name, info, metrics, td.ids, td.table.genes, oof, fold_of, model)
    return RunResult(path, metrics, cv_seconds, oof)


def _jsonable(v):
    if isinstance(v, (np.ndarray, tuple)):
        return [float(x) for x in np.asarray(v).ravel()]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def write_run(final: Path, info, metrics, ids, genes, oof, fold_of, model, info_name: str = "run.json",
              model_name: str = "model.joblib") -> Path:
    """Write every file under a temporary folder, then rename it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / info_name).write_text(json.dumps(info, indent=2, default=_jsonable))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_jsonable))
        import pandas as pd

        pd.DataFrame(metrics["per_gene"]).to_csv(tmp / "per_gene.csv", index=False)
        with h5py.File(tmp / "oof.h5", "w") as fh:
            fh.create_dataset("ids", data=np.asarray(ids).astype(object), dtype=_STR)
            fh.create_dataset("genes", data=np.asarray(genes).astype(object), dtype=_STR)
            fh.create_dataset("oof", data=np.asarray(oof, dtype=np.float32))
            fh.create_dataset("fold", data=fold_of)
        joblib.dump(model, tmp / model_name)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_oof(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, oof predictions, fold index) from a run's or a stack's ``oof.h5``."""
    with h5py.File(Path(folder) / "oof.h5", "r") as fh:
        return fh["ids"].asstr()[()], fh["oof"][()], fh["fold"][()]


@dataclass
class Run:
    """A finished run read back from disk."""

    path: Path
    info: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def genes(self) -> list[str]:
        return list(self.info["genes"])

    def oof(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, oof predictions, fold index)."""
        return read_oof(self.path)

    def model(self):
        return joblib.load(self.path / "model.joblib")


def load_run(path: str | os.PathLike) -> Run:
    """Open a finished run folder, refusing partial or incompatible ones."""
    path = Path(path)
    if not (path / "run.json").is_file():
        hint = " (an interrupted fit leaves only a hidden .tmp folder)" if path.name.startswith(".") else ""
        raise RunError(f"{path}: not a finished hexpress run folder (no run.json){hint}; rerun `python cli.py fit`.")
    try:
        info = json.loads((path / "run.json").read_text())
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: run files are unreadable ({exc}); rerun `python cli.py fit`.") from exc
    if info.get("format") != RUN_FORMAT:
        raise RunError(f"{path}: run format {info.get('format')!r} is not {RUN_FORMAT} (made by hexpress "
                       f"{info.get('tool_version', '?')}); refit it with this version.")
    for f in ("oof.h5", "model.joblib"):
        if not (path / f).is_file():
            raise RunError(f"{path}: {f} is missing; rerun `python cli.py fit`.")
    return Run(path, info, metrics)


def runs_for_table(runs_dir: str | os.PathLike, table: str | os.PathLike) -> list[Path]:
    """The finished run folders under ``runs_dir`` fitted on the tile table at ``table``."""
    base, want = Path(runs_dir), str(Path(table).resolve())
    found = sorted(p for p in base.iterdir() if (p / "run.json").is_file()) if base.is_dir() else []
    return [p for p in found if load_run(p).info["table"]["path"] == want]
