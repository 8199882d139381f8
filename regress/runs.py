"""The run and stack folder contract: one self-contained folder per fitted result.

Run folder (``RUN_FORMAT`` 2), ``<runs_dir>/<name>/``:

* ``run.json``     - format, tool version, command, ``identity`` (sha256 of
  ``identity_fields``: table rows, targets and tile content, each cache's key,
  head and its parameters, folds, seed, grouping, context, and smooth,
  center_slides and cross_gene when set), table path, center_slides,
  ``cross_gene`` / ``smooth`` (the post-processing settings, per fold and
  final, and the scores before it),
  backbones with their caches, genes, timings, summary;
* ``metrics.json`` - CV metrics (PCC per gene mean/median, per tile, MSE,
  constant genes, per-gene table);
* ``per_gene.csv`` - gene, pcc, mse;
* ``oof.h5``       - everything later commands need, so a copied folder still
  stacks, reports and predicts without the training table or its tiles:
  ``ids`` (n,), ``genes`` (g,), ``oof`` (n, g) float32 out-of-fold
  predictions, ``fold`` (n,) int32, ``y`` (n, g) float32 targets, and when
  known ``groups`` (n,), ``xy`` (n, 2), ``slides`` (n,); with ``fit --nested``
  ``inner_oof`` (folds, n, g) float32, each outer fold's inner out-of-fold
  predictions of its training rows (NaN on its own rows), and ``inner_fold``
  (folds, n) int32, their inner fold (-1 on the outer fold's rows);
* ``model.json`` + ``model.npz`` - the head refit on all rows, stored without
  pickle (:mod:`regress.persist`); ``model.joblib`` only for plug-in heads;
* ``cross_gene.json`` + ``cross_gene.npz`` - with ``--cross-gene``: the fitted
  :class:`regress.crossgene.CrossGeneMap` that ``predict`` applies after the model.

Stack folder (``kind: stack``): the same with ``stack.json`` in place of
``run.json`` (runs, method, per-run summary) and the blend as the model.

A folder is written under a temporary name and renamed when complete, so a
folder with the final name is always finished.  Writing over a folder whose
identity differs (other folds, seed, head parameters, table, caches) is
refused unless ``overwrite``: the message says what differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featurize.errors import RunError
from regress.persist import load_model, save_model

RUN_FORMAT = 2
_STR = h5py.string_dtype(encoding="utf-8")
INFO_FILES = {"run": "run.json", "stack": "stack.json"}


def jsonable(v):
    if isinstance(v, (np.ndarray, tuple)):
        return [float(x) for x in np.asarray(v).ravel()]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return v


def identity_of(fields: dict[str, Any]) -> str:
    """sha256 of everything that changes a result's numbers."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=jsonable).encode()).hexdigest()


def digest_array(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def identity_diff(old: dict[str, Any], new: dict[str, Any], most: int = 4) -> str:
    """'folds.n: 5 -> 6; head.params.alpha: 1 -> 3' for the fields that differ."""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    short = lambda v: (v[:12] + "...") if isinstance(v, str) and len(v) > 16 else v  # noqa: E731
    return "; ".join(f"{k}: {short(a.get(k))!r} -> {short(b.get(k))!r}" for k in keys[:most]) + \
        (f"; and {len(keys) - most} more" if len(keys) > most else "")


@dataclass
class RunData:
    """The arrays of ``oof.h5``."""

    ids: np.ndarray
    genes: list[str]
    oof: np.ndarray
    fold: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None
    xy: np.ndarray | None = None
    slides: np.ndarray | None = None
    # written with ``fit --nested``, read only by :func:`read_inner_predictions` (the stack that needs them):
    inner_oof: np.ndarray | None = None  # (folds, n, g): each outer fold's inner OOF of its training rows, NaN elsewhere
    inner_fold: np.ndarray | None = None  # (folds, n): their inner fold, -1 on the outer fold's own rows


def _write_data(path: Path, d: RunData) -> None:
    with h5py.File(path, "w") as fh:
        fh.create_dataset("ids", data=np.asarray(d.ids).astype(object), dtype=_STR)
        fh.create_dataset("genes", data=np.asarray(d.genes).astype(object), dtype=_STR)
        fh.create_dataset("oof", data=np.asarray(d.oof, dtype=np.float32))
        fh.create_dataset("fold", data=np.asarray(d.fold, dtype=np.int32))
        fh.create_dataset("y", data=np.asarray(d.y, dtype=np.float32))
        if d.groups is not None:
            fh.create_dataset("groups", data=np.asarray(d.groups).astype(str).astype(object), dtype=_STR)
        if d.xy is not None:
            fh.create_dataset("xy", data=np.asarray(d.xy, dtype=np.float64))
        if d.slides is not None:
            fh.create_dataset("slides", data=np.asarray(d.slides).astype(str).astype(object), dtype=_STR)
        if d.inner_oof is not None:
            fh.create_dataset("inner_oof", data=np.asarray(d.inner_oof, dtype=np.float32))
            fh.create_dataset("inner_fold", data=np.asarray(d.inner_fold, dtype=np.int32))


def read_run_data(folder: str | os.PathLike) -> RunData:
    """The arrays of a run's or a stack's ``oof.h5``."""
    path = Path(folder) / "oof.h5"
    try:
        with h5py.File(path, "r") as fh:
            opt = lambda k, s=False: (fh[k].asstr()[()] if s else fh[k][()]) if k in fh else None  # noqa: E731
            return RunData(fh["ids"].asstr()[()], list(fh["genes"].asstr()[()]), fh["oof"][()], fh["fold"][()],
                           fh["y"][()], opt("groups", True), opt("xy"), opt("slides", True))
    except (OSError, KeyError) as exc:
        raise RunError(f"{path}: unreadable or incomplete ({exc}); refit.") from exc


def read_inner_predictions(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """(inner_oof, inner_fold) of a run fitted with ``--nested``, else None; reads only those two datasets."""
    path = Path(folder) / "oof.h5"
    try:
        with h5py.File(path, "r") as fh:
            return (fh["inner_oof"][()], fh["inner_fold"][()]) if "inner_oof" in fh else None
    except (OSError, KeyError) as exc:
        raise RunError(f"{path}: unreadable or incomplete ({exc}); refit.") from exc


def refuse_other_identity(final: Path, identity_fields: dict[str, Any], overwrite: bool = False) -> None:
    """Raise when ``final`` holds a result whose identity differs (unless ``overwrite``); call before fitting."""
    if overwrite or not Path(final).exists():
        return
    old = _read_info(Path(final))
    if old is not None and old.get("identity") != identity_of(identity_fields):
        raise RunError(f"{final}: already holds a {old.get('kind', 'run')} with other settings "
                       f"({identity_diff(old.get('identity_fields', {}), identity_fields)}); "
                       "pass --overwrite to replace it, or --name/--out to keep both.")


def write_run(final: Path, info: dict[str, Any], metrics: dict[str, Any], data, model, *, kind: str = "run",
              overwrite: bool = False, extras: dict[str, Any] | None = None) -> Path:
    """Write every file under a temporary folder, then rename it into place (refusing another identity).

    ``extras``: further fitted estimators by file stem (``cross_gene``), stored like the model."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    refuse_other_identity(final, info.get("identity_fields", {}), overwrite)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = save_model(model, tmp, "model")
        for stem, est in (extras or {}).items():
            files += save_model(est, tmp, stem)
        info = {**info, "kind": kind, "model_files": files}
        (tmp / INFO_FILES[kind]).write_text(json.dumps(info, indent=2, default=jsonable))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=jsonable))
        import pandas as pd

        pd.DataFrame(metrics["per_gene"]).to_csv(tmp / "per_gene.csv", index=False)
        if callable(data):  # a streamed fit writes oof.h5 chunk by chunk, same layout
            data(tmp / "oof.h5")
        else:
            _write_data(tmp / "oof.h5", data)
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


def _read_info(path: Path) -> dict[str, Any] | None:
    for kind, name in INFO_FILES.items():
        f = path / name
        if f.is_file():
            try:
                return {"kind": kind, **json.loads(f.read_text())}
            except (OSError, json.JSONDecodeError):
                return {"kind": kind}
    return None


@dataclass
class Run:
    """A finished run or stack read back from disk."""

    path: Path
    info: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.info.get("kind", "run")

    @property
    def genes(self) -> list[str]:
        return list(self.info["genes"])

    def data(self) -> RunData:
        return read_run_data(self.path)

    def model(self, trust_pickle: bool = False):
        return load_model(self.path, "model", trust_pickle=trust_pickle)

    def cross_gene(self):
        """The fitted ``--cross-gene`` map (:class:`regress.crossgene.CrossGeneMap`), or None."""
        return load_model(self.path, "cross_gene") if self.info.get("cross_gene") else None


def open_result(path: str | os.PathLike, kind: str | None = None) -> Run:
    """Open a finished run or stack folder (the one place that tells them apart), refusing partial or old ones."""
    path = Path(path)
    info = _read_info(path)
    if info is None:
        hint = " (an interrupted fit leaves only a hidden .tmp folder)" if path.name.startswith(".") else ""
        raise RunError(f"{path}: not a finished hexpress run or stack folder (no run.json or stack.json){hint}; "
                       "rerun `python cli.py fit` or `stack`.")
    if kind is not None and info["kind"] != kind:
        raise RunError(f"{path}: is a {info['kind']} folder, not a {kind}.")
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: run files are unreadable ({exc}); refit.") from exc
    if info.get("format") != RUN_FORMAT:
        raise RunError(f"{path}: format {info.get('format')!r} is not {RUN_FORMAT} (made by hexpress "
                       f"{info.get('tool_version', '?')}); refit it with this version.")
    if not (path / "oof.h5").is_file():
        raise RunError(f"{path}: oof.h5 is missing; refit.")
    return Run(path, info, metrics)


def load_run(path: str | os.PathLike) -> Run:
    """Open a finished run folder (not a stack)."""
    return open_result(path, kind="run")


def runs_for_table(runs_dir: str | os.PathLike, table: str | os.PathLike) -> list[Path]:
    """The finished run folders under ``runs_dir`` fitted on the tile table at ``table``."""
    base, want = Path(runs_dir), str(Path(table).resolve())
    found = sorted(p for p in base.iterdir() if (p / "run.json").is_file()) if base.is_dir() else []
    return [p for p in found if load_run(p).info["table"]["path"] == want]
