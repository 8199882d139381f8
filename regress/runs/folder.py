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
  pickle (:mod:`regress.heads.persist`); ``model.joblib`` only for plug-in heads;
* ``cross_gene.json`` + ``cross_gene.npz`` - with ``--cross-gene``: the fitted
  :class:`regress.post.crossgene.CrossGeneMap` that ``predict`` applies after the model.

Stack folder (``kind: stack``): the same with ``stack.json`` in place of
``run.json`` (runs, method, per-run summary) and the blend as the model.

A folder is written under a temporary name and renamed when complete, so a
folder with the final name is always finished.  Writing over a folder whose
identity differs (other folds, seed, head parameters, table, caches) is
refused unless ``overwrite``: the message says what differs.  The identity
check and the swap happen under one lock on the run name (``.<name>.lock``
beside it), so two fits of one name never silently replace each other; the
leftovers of a killed writer (``.<name>.tmp-PID``, ``.<name>.old-PID``) are
recovered or removed by the next writer or reader.

Integrity: ``run.json`` / ``stack.json`` holds ``files`` (size and sha256 of
every other file of the folder) and ``info_sha256`` (of itself without that
field), and is validated against :data:`SCHEMA` on read; each file is
checked against the manifest when it is read.  Folders written before the
manifest existed are read with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from core.errors import CacheError, RunError
from core.faults import point as fault
from core.integrity import H5_ERRORS, file_sha256, open_h5
from core.lock import file_lock
from core.log import warn
from regress.heads.persist import load_model, save_model

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


def run_identity_fields(*, table_rows: str, targets: str, group_col: str | None, caches: list[dict[str, Any]],
                        head: str, params: dict[str, Any], folds: int, seed: int, grouped: bool, context: int,
                        used_rows: str | None = None, **post: Any) -> dict[str, Any]:
    """Everything that changes a fitted run's numbers (the one builder: in-memory and streamed fits).

    ``caches``: each cache's info (``backbone``, ``fingerprint`` = key, ``table_fingerprint`` = content);
    ``post``: the post-processing settings (``smooth``, ``center_slides``, ``cross_gene``, ``nested``), recorded
    only when set so that runs without them keep the identity they had before these existed."""
    return {
        "format": RUN_FORMAT,
        "table": {"rows": table_rows, **({"used_rows": used_rows} if used_rows is not None else {}),
                  "targets": targets, "group_col": group_col},
        "caches": [{"backbone": c["backbone"], "key": c["fingerprint"], "content": c["table_fingerprint"]} for c in caches],
        "head": {"name": head, "params": {k: repr(v) for k, v in params.items()}},
        "folds": {"n": folds, "seed": seed, "grouped": grouped},
        "context": context,
        **{k: v for k, v in post.items() if v},
    }


def stack_identity_fields(runs: list, method: str, alpha: float, center_folds: bool) -> dict[str, Any]:
    """Everything that changes a stack's numbers: its runs' identities, the method, ridge's alpha, centring."""
    return {"format": RUN_FORMAT, "runs": [r.info.get("identity") for r in runs], "method": method,
            "alpha": alpha if method == "ridge" else None, **({"center_folds": True} if center_folds else {})}


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
        with open_h5(path, RunError, "run's oof.h5", "refit") as fh:
            opt = lambda k, s=False: (fh[k].asstr()[()] if s else fh[k][()]) if k in fh else None  # noqa: E731
            d = RunData(fh["ids"].asstr()[()], list(fh["genes"].asstr()[()]), fh["oof"][()], fh["fold"][()],
                        fh["y"][()], opt("groups", True), opt("xy"), opt("slides", True))
    except H5_ERRORS as exc:
        raise RunError(f"{path}: unreadable or incomplete ({exc}); refit.") from exc
    n, g = len(d.ids), len(d.genes)
    shapes = {"oof": (d.oof, (n, g)), "y": (d.y, (n, g)), "fold": (d.fold, (n,)), "xy": (d.xy, (n, 2)),
              "groups": (d.groups, (n,)), "slides": (d.slides, (n,))}
    for k, (a, want) in shapes.items():
        if a is not None and tuple(np.shape(a)) != want:
            raise RunError(f"{path}: '{k}' has shape {tuple(np.shape(a))}, not {want} (damaged); refit.")
    for k in ("oof", "y"):
        a = getattr(d, k)
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
            bad = np.argwhere(~np.isfinite(a))[0] if np.issubdtype(a.dtype, np.floating) else (0, 0)
            raise RunError(f"{path}: '{k}' holds NaN or inf (row {int(bad[0])}, gene {d.genes[int(bad[1])]}) or is not "
                           "numeric: the file is damaged; refit.")
    return d


def read_inner_predictions(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """(inner_oof, inner_fold) of a run fitted with ``--nested``, else None; reads only those two datasets, checked
    against the shape of ``oof`` and for NaN or inf on the rows they cover."""
    path = Path(folder) / "oof.h5"
    try:
        with open_h5(path, RunError, "run's oof.h5", "refit") as fh:
            if "inner_oof" not in fh:
                return None
            inner, fold, shape = fh["inner_oof"][()], fh["inner_fold"][()], fh["oof"].shape
    except H5_ERRORS as exc:
        raise RunError(f"{path}: unreadable or incomplete ({exc}); refit.") from exc
    if inner.shape[1:] != shape or fold.shape != inner.shape[:2]:
        raise RunError(f"{path}: inner_oof / inner_fold have the wrong shape (damaged); refit it.")
    if np.isinf(inner).any() or np.isnan(inner[fold >= 0]).any():
        raise RunError(f"{path}: inner_oof holds NaN or inf on training rows (damaged); refit it.")
    return inner, fold


def refuse_other_identity(final: Path, identity_fields: dict[str, Any], overwrite: bool = False) -> None:
    """Raise when ``final`` holds a result whose identity differs (unless ``overwrite``); call before fitting
    (to fail fast) - :func:`write_run` checks again under the name's lock before it swaps."""
    if overwrite or not Path(final).exists():
        return
    old = _read_info(Path(final), quiet=True)
    if old is not None and old.get("identity") != identity_of(identity_fields):
        raise RunError(f"{final}: already holds a {old.get('kind', 'run')} with other settings "
                       f"({identity_diff(old.get('identity_fields', {}), identity_fields)}); "
                       "pass --overwrite to replace it, or --name/--out to keep both.")


def write_run(final: Path, info: dict[str, Any], metrics: dict[str, Any], data, model, *, kind: str = "run",
              overwrite: bool = False, extras: dict[str, Any] | None = None) -> Path:
    """Write every file under a temporary folder, then rename it into place (refusing another identity).

    ``extras``: further fitted estimators by file stem (``cross_gene``), stored like the model."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise RunError(f"{final.parent}: is a file, not a folder for runs; pass another --runs-dir/--out.") from exc
    refuse_other_identity(final, info.get("identity_fields", {}), overwrite)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        try:
            files = save_model(model, tmp, "model")
            for stem, est in (extras or {}).items():
                files += save_model(est, tmp, stem)
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=jsonable))
            import pandas as pd

            pd.DataFrame(metrics["per_gene"]).to_csv(tmp / "per_gene.csv", index=False)
            if callable(data):  # a streamed fit writes oof.h5 chunk by chunk, same layout
                data(tmp / "oof.h5")
            else:
                _write_data(tmp / "oof.h5", data)
            info = {**info, "kind": kind, "model_files": files, "files": manifest(tmp)}
            info["info_sha256"] = _info_digest(info)
            (tmp / INFO_FILES[kind]).write_text(json.dumps(info, indent=2, default=jsonable))
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "write failed" not in str(exc):
                raise
            err = RunError(f"{final}: cannot write the {kind} ({getattr(exc, 'strerror', None) or str(exc)[:120]}; "
                           f"its files took {_folder_bytes(tmp) / 2**20:.1f} MiB before the write failed); free disk "
                           "space and rerun - nothing was replaced.")
            err.hard_exit = isinstance(exc, RuntimeError)  # HDF5 holds a file it cannot flush
            raise err from exc
        fault("run-before-swap")
        with file_lock(name_lock(final), wait_s=120):
            recover(final, locked=True)
            refuse_other_identity(final, info.get("identity_fields", {}), overwrite)  # again: another writer may have won
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
            fault("run-between-renames")
            os.replace(tmp, final)
            fault("run-after-swap")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except CacheError as exc:  # the name's lock: another writer held it too long
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"{final}: another hexpress process is writing this {kind} name; wait for it, or use another "
                       f"--name/--out ({exc}).") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def name_lock(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


def _folder_bytes(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    except OSError:
        return 0


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file directly in ``folder`` (the run's info file excepted)."""
    return {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name not in INFO_FILES.values()}


def _info_digest(info: dict[str, Any]) -> str:
    body = {k: v for k, v in info.items() if k not in ("info_sha256", "kind")}
    body = json.loads(json.dumps(body, default=jsonable))  # as it reads back (tuples, numpy scalars, int keys)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(final: Path, kind: str) -> list[tuple[Path, int]]:
    out = []
    for p in final.parent.glob(f".{final.name}.{kind}-*"):
        try:
            out.append((p, int(p.name.rsplit("-", 1)[1])))
        except ValueError:
            continue
    return out


def recover(final: Path, locked: bool = False) -> None:
    """Clean up after killed writers of ``final``: remove their temporary folders, and when a kill fell between
    the two renames (no ``final``, a finished ``.tmp-PID`` and/or the previous ``.old-PID``), put the newest
    finished folder back under the final name."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    dead_tmp = [(p, pid) for p, pid in _leftovers(final, "tmp") if not _pid_alive(pid)]
    dead_old = [(p, pid) for p, pid in _leftovers(final, "old") if not _pid_alive(pid)]
    if not dead_tmp and not dead_old:
        return
    if not locked:
        try:
            with file_lock(name_lock(final), wait_s=30):
                return recover(final, locked=True)
        except CacheError:
            return  # a writer holds the name: it recovers
    if not final.exists():
        for p, _ in dead_tmp + dead_old:  # a finished tmp is newer than the old folder it was replacing
            if _finished(p):
                os.replace(p, final)
                break
    for p, _ in dead_tmp + dead_old:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


def _finished(folder: Path) -> bool:
    info = _read_info(folder, quiet=True)
    return bool(info) and info.get("info_sha256") == _info_digest(info) and all(
        (folder / f).is_file() and (folder / f).stat().st_size == m.get("size")
        for f, m in (info.get("files") or {}).items())


def _read_info(path: Path, quiet: bool = False) -> dict[str, Any] | None:
    """The folder's run.json / stack.json; None when it has neither.  A damaged one raises :class:`RunError`
    (``quiet``: returns ``{"kind": ...}`` instead, for the identity pre-check)."""
    for kind, name in INFO_FILES.items():
        f = path / name
        if f.is_file():
            try:
                doc = json.loads(f.read_text())
                if not isinstance(doc, dict):
                    raise ValueError(f"a JSON {type(doc).__name__}, not an object")
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                if quiet:
                    return {"kind": kind}
                raise RunError(f"{f}: is not valid JSON ({str(exc)[:100]}): the file is damaged; refit "
                               "(or restore the folder).") from exc
            return {**doc, "kind": kind}
    return None


#: Required keys of run.json / stack.json and their types (the run folder contract, checked on every read).
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "common": {"format": int, "identity": str, "identity_fields": dict, "genes": list, "table": dict,
               "backbones": list, "model_files": list},
    "run": {"head": dict, "folds": dict},
    "stack": {"runs": list, "method": str},
}


def validate_info(path: Path, info: dict[str, Any]) -> None:
    """Refuse an info file with missing keys or wrong types, naming the key (one schema for every reader)."""
    f = path / INFO_FILES[info["kind"]]
    want = {**SCHEMA["common"], **SCHEMA[info["kind"]]}
    for key, typ in want.items():
        if key not in info:
            raise RunError(f"{f}: has no '{key}' (damaged, or not written by hexpress); refit.")
        if not isinstance(info[key], typ) or (typ is int and isinstance(info[key], bool)):
            raise RunError(f"{f}: '{key}' is {type(info[key]).__name__} {str(info[key])[:40]!r}, not "
                           f"{getattr(typ, '__name__', typ)} (damaged or edited); refit.")
    if not all(isinstance(g, str) for g in info["genes"]) or not info["genes"]:
        raise RunError(f"{f}: 'genes' must be a non-empty list of gene names (damaged or edited); refit.")
    if not isinstance(info["table"].get("path"), str):
        raise RunError(f"{f}: 'table.path' is missing or not text (damaged or edited); refit.")
    if not all(isinstance(b, dict) for b in info["backbones"]) or not all(isinstance(m, str) for m in info["model_files"]):
        raise RunError(f"{f}: 'backbones' or 'model_files' has entries of the wrong type (damaged or edited); refit.")
    if info["kind"] == "run" and not isinstance(info["head"].get("name"), str):
        raise RunError(f"{f}: 'head.name' is missing or not text (damaged or edited); refit.")
    if info["kind"] == "stack" and not all(isinstance(r, str) for r in info["runs"]):
        raise RunError(f"{f}: 'runs' must list run folders (damaged or edited); refit the stack.")
    files = info.get("files")
    if files is not None and (not isinstance(files, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("sha256"), str) and isinstance(m.get("size"), int)
            for m in files.values())):
        raise RunError(f"{f}: 'files' is not a manifest of sizes and sha256 (damaged or edited); refit.")


_UNSEALED: set[str] = set()


@dataclass
class Run:
    """A finished run or stack read back from disk."""

    path: Path
    info: dict[str, Any]
    metrics: dict[str, Any]
    _checked: dict = field(default_factory=dict, repr=False, compare=False)  # file -> stat it was verified at

    @property
    def kind(self) -> str:
        return self.info.get("kind", "run")

    @property
    def genes(self) -> list[str]:
        return list(self.info["genes"])

    @property
    def content(self) -> str | None:
        """sha256 of the folder's file manifest: what a stack records of each member (None before manifests)."""
        files = self.info.get("files")
        return None if files is None else hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

    def check_file(self, name: str) -> None:
        """Refuse a file of the folder whose size or sha256 differs from the manifest (damaged or replaced)."""
        files = self.info.get("files")
        if files is None:
            return
        f = self.path / name
        m = files.get(name)
        if m is None:
            if f.exists():
                raise RunError(f"{f}: is not in {INFO_FILES[self.kind]}'s manifest (added after the {self.kind} was "
                               "written); remove it or refit.")
            return
        if not f.is_file():
            raise RunError(f"{f}: is missing from the {self.kind} folder; refit (or restore the folder).")
        st = f.stat()
        if self._checked.get(name) == (st.st_size, st.st_mtime_ns):
            return  # hashed already, unchanged since (a stack reads a run's oof.h5 more than once)
        if st.st_size != m["size"] or file_sha256(f) != m["sha256"]:
            raise RunError(f"{f}: does not match the checksum in {INFO_FILES[self.kind]} (damaged or replaced since "
                           "it was written); refit (or restore the folder).")
        self._checked[name] = (st.st_size, st.st_mtime_ns)

    def data(self) -> RunData:
        self.check_file("oof.h5")
        return read_run_data(self.path)

    def inner_predictions(self):
        self.check_file("oof.h5")
        return read_inner_predictions(self.path)

    def model(self, trust_pickle: bool = False):
        for name in self.info["model_files"]:
            if name.startswith("model."):
                self.check_file(name)
        return load_model(self.path, "model", trust_pickle=trust_pickle)

    def cross_gene(self):
        """The fitted ``--cross-gene`` map (:class:`regress.post.crossgene.CrossGeneMap`), or None."""
        if not self.info.get("cross_gene"):
            return None
        for name in ("cross_gene.json", "cross_gene.npz"):
            self.check_file(name)
        return load_model(self.path, "cross_gene")


def open_result(path: str | os.PathLike, kind: str | None = None) -> Run:
    """Open a finished run or stack folder (the one place that tells them apart), refusing partial or old ones.

    A model folder of ``run`` (:mod:`regress.runs.model`) opens as the run or stack that predicts for it."""
    from regress.runs.model import is_model, model_result

    path = Path(path)
    if is_model(path) and not (path / "run.json").exists() and not (path / "stack.json").exists():
        path = model_result(path)
    recover(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"{path}: is a file, not a run or stack folder; pass the folder `fit` or `stack` wrote.")
    info = _read_info(path)
    if info is None:
        hint = " (an interrupted fit leaves only a hidden .tmp folder)" if path.name.startswith(".") else ""
        raise RunError(f"{path}: not a finished hexpress run or stack folder (no run.json or stack.json){hint}; "
                       "rerun `python cli.py fit` or `stack`.")
    if kind is not None and info["kind"] != kind:
        raise RunError(f"{path}: is a {info['kind']} folder, not a {kind}.")
    if "format" in info and isinstance(info["format"], int) and info["format"] != RUN_FORMAT:
        raise RunError(f"{path}: format {info.get('format')!r} is not {RUN_FORMAT} (made by hexpress "
                       f"{info.get('tool_version', '?')}); refit it with this version.")
    validate_info(path, info)
    if "info_sha256" in info:
        if info["info_sha256"] != _info_digest(info):
            raise RunError(f"{path / INFO_FILES[info['kind']]}: does not match its own checksum (edited or damaged); "
                           "refit (or restore the folder).")
    elif str(path) not in _UNSEALED:
        _UNSEALED.add(str(path))

        warn(f"{path}: written before hexpress stored checksums in run folders, so its files cannot be "
              "verified; refit it to add them.")
    run = Run(path, info, {})
    run.check_file("metrics.json")
    try:
        metrics = json.loads((path / "metrics.json").read_text())
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise RunError(f"{path / 'metrics.json'}: unreadable ({exc}); refit.") from exc
    if not (path / "oof.h5").is_file():
        raise RunError(f"{path}: oof.h5 is missing; refit.")
    run.metrics = metrics
    return run


def load_run(path: str | os.PathLike) -> Run:
    """Open a finished run folder (not a stack)."""
    return open_result(path, kind="run")


def runs_for_table(runs_dir: str | os.PathLike, table: str | os.PathLike) -> list[Path]:
    """The finished run folders under ``runs_dir`` fitted on the tile table at ``table``."""
    return runs_for_table_checked(runs_dir, table)[0]


def runs_for_table_checked(runs_dir: str | os.PathLike, table: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """(the sound run folders fitted on ``table``, one line per damaged run folder skipped)."""
    base, want = Path(runs_dir), str(Path(table).resolve())
    found = sorted(p for p in base.iterdir() if not p.name.startswith(".") and (p / "run.json").is_file()) \
        if base.is_dir() else []
    good, skipped = [], []
    for p in found:
        try:
            if load_run(p).info["table"]["path"] == want:
                good.append(p)
        except RunError as exc:
            skipped.append(str(exc))
    return good, skipped
