"""HDF5 embedding caches: one file per (table, backbone, weights, preprocessing, TTA).

On-disk contract (``FORMAT_VERSION`` 1), ``<cache_dir>/<table>/<backbone>-<fp16>.h5``:

* ``ids``      (N,)   UTF-8 strings, the table's IDs in table order;
* ``features`` (N, D) float16 (default) or float32, chunked by rows;
* ``valid``    (N,)   bool, False for tiles skipped with ``--skip-bad``;
* attributes: ``hexpress_format``, ``fingerprint`` (sha256 of ``key_json``),
  ``key_json`` (everything that changes the numbers: table fingerprint,
  backbone spec, weight sha256 / random-init flag, TTA, dtype), ``backbone``,
  ``table``, ``table_fingerprint``, ``random_init``, ``weights_sha256``,
  ``weights_source``, ``tta``, ``tool_version``, ``created``, ``rows_done``,
  ``complete``.

A file is written as ``<name>.h5.partial`` batch by batch (``rows_done``
after each flush) and renamed to ``<name>.h5`` only once every row is
written, so a finished-looking file is always complete.  An interrupted run
resumes from the partial file when its key still matches.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featurize import __version__
from featurize.backbones import BackboneSpec
from featurize.errors import CacheError
from featurize.weights import ResolvedWeights

FORMAT_VERSION = 1
MIN_CHUNK_ROWS = 256
_STR = h5py.string_dtype(encoding="utf-8")


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the cached numbers."""

    table_name: str
    table_fingerprint: str
    spec: BackboneSpec
    weights: ResolvedWeights
    tta: int
    dtype: str  # "float16" | "float32": how the embeddings are stored
    compute: str = "float32"  # the forward pass's precision: "float32", or "bfloat16"/"float16" under CUDA autocast
    params: str = ""  # JSON of source parameters that change the numbers (imported embeddings: how rows were matched)

    def key_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "table_fingerprint": self.table_fingerprint,
            "spec": self.spec.to_dict(),
            "weights_sha256": self.weights.sha256,
            "random_init": self.weights.random_init,
            "tta": self.tta,
            "dtype": self.dtype,
            # only when not float32, so the fingerprints of float32 caches stay what they were
            **({"compute": self.compute} if self.compute != "float32" else {}),
            **({"params": json.loads(self.params)} if self.params else {}),
        }

    def key_json(self) -> str:
        return json.dumps(self.key_dict(), sort_keys=True, default=str)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.key_json().encode()).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def cache_path(cache_dir: str | os.PathLike, key: CacheKey) -> Path:
    """Final path of the cache for ``key``."""
    return Path(cache_dir) / _safe(key.table_name) / f"{_safe(key.spec.name)}-{key.fingerprint()[:16]}.h5"


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def lock_path(final: Path) -> Path:
    return final.with_name(final.name + ".lock")


class CacheWriter:
    """Writes one cache batch by batch, resumable, renamed into place when complete."""

    def __init__(self, final: Path, key: CacheKey, ids: np.ndarray, dim: int, extra_attrs: dict[str, Any] | None = None):
        self.final = Path(final)
        self.extra_attrs = dict(extra_attrs or {})
        self.partial = partial_path(self.final)
        self.key = key
        self.ids = np.asarray(ids).astype(str)
        self.dim = int(dim)
        self._fh: h5py.File | None = None

    # -- opening -----------------------------------------------------------
    def open(self) -> int:
        """Open (resuming when the partial file matches); returns rows already done."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            try:
                fh = h5py.File(self.partial, "r+")
                ok = (
                    fh.attrs.get("fingerprint") == self.key.fingerprint()
                    and fh["features"].shape == (len(self.ids), self.dim)
                    and np.array_equal(fh["ids"].asstr()[()], self.ids)
                )
            except (OSError, KeyError):
                ok, fh = False, None
            if ok:
                self._fh = fh
                return int(fh.attrs["rows_done"])
            if fh is not None:
                fh.close()
            self.partial.unlink()
        self._fh = self._create()
        return 0

    def _create(self) -> h5py.File:
        n = len(self.ids)
        dtype = np.float16 if self.key.dtype == "float16" else np.float32
        try:
            fh = h5py.File(self.partial, "w")
            fh.create_dataset("ids", data=self.ids.astype(object), dtype=_STR)
            fh.create_dataset("features", shape=(n, self.dim), dtype=dtype,
                              chunks=(min(n, max(MIN_CHUNK_ROWS, 1)), self.dim))
            fh.create_dataset("valid", shape=(n,), dtype=bool, fillvalue=True)
            spec, w = self.key.spec, self.key.weights
            attrs = {
                "hexpress_format": FORMAT_VERSION,
                "fingerprint": self.key.fingerprint(),
                "key_json": self.key.key_json(),
                "backbone": spec.name,
                "architecture": spec.architecture,
                "table": self.key.table_name,
                "table_fingerprint": self.key.table_fingerprint,
                "random_init": bool(w.random_init),
                "weights_sha256": w.sha256 or "",
                "weights_source": w.source,
                "weights_path": w.path or "",
                "tta": int(self.key.tta),
                "dtype": self.key.dtype,
                "compute": self.key.compute,
                "tool_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "rows_done": 0,
                "complete": False,
                **self.extra_attrs,
            }
            for k, v in attrs.items():
                fh.attrs[k] = v
            fh.flush()
        except OSError as exc:
            raise CacheError(f"{self.partial}: cannot create the cache file ({exc}); check free space and permissions.") from exc
        return fh

    # -- writing -----------------------------------------------------------
    def write(self, start: int, feats: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Write rows ``start:start+len(feats)`` and record progress durably."""
        assert self._fh is not None, "open() first"
        end = start + len(feats)
        try:
            self._fh["features"][start:end] = feats
            if valid is not None and not valid.all():
                self._fh["valid"][start:end] = valid
            self._fh.attrs["rows_done"] = end
            self._fh.flush()
        except OSError as exc:
            raise CacheError(
                f"{self.partial}: write failed at row {start} ({exc}); free disk space and rerun - "
                f"the {start} rows already written are kept and the run resumes there."
            ) from exc

    def finalize(self) -> Path:
        """Mark complete and rename into place; returns the final path."""
        assert self._fh is not None
        fh = self._fh
        if int(fh.attrs["rows_done"]) != len(self.ids):
            raise CacheError(f"{self.partial}: only {fh.attrs['rows_done']} of {len(self.ids)} rows written; rerun embed to finish.")
        try:
            fh.attrs["complete"] = True
            fh.attrs["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            fh.flush()
            fh.close()
            self._fh = None
            os.replace(self.partial, self.final)
        except OSError as exc:
            raise CacheError(f"{self.partial}: cannot finish the cache ({exc}); free disk space and rerun.") from exc
        return self.final

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            finally:
                self._fh = None


# -- reading ---------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingCache:
    """A complete cache in memory: valid rows only, features as float32."""

    path: Path
    ids: np.ndarray
    features: np.ndarray
    attrs: dict[str, Any]

    @property
    def backbone(self) -> str:
        return str(self.attrs["backbone"])


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise CacheError(f"{path}: cache file not found; run `python cli.py embed` first.")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"{path}: not a readable HDF5 file (truncated or foreign: {exc}); delete it and rerun embed.") from exc


def _checked_attrs(fh: h5py.File, path: Path) -> dict[str, Any]:
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in fh.attrs.items()}
    if attrs.get("hexpress_format") != FORMAT_VERSION or "features" not in fh or "ids" not in fh:
        raise CacheError(f"{path}: not a hexpress cache (format {attrs.get('hexpress_format')!r}); delete it or rerun embed.")
    attrs["n_rows"], attrs["dim"] = fh["features"].shape
    attrs["n_valid"] = int(fh["valid"][()].sum()) if "valid" in fh else attrs["n_rows"]
    return attrs


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Attributes of a cache file, validated as a hexpress cache."""
    path = Path(path)
    with _open(path) as fh:
        return _checked_attrs(fh, path)


def read_cache(path: str | os.PathLike, expect_ids: np.ndarray | None = None) -> EmbeddingCache:
    """Load a complete cache (one open of the file); refuses incomplete files and (optionally) other IDs."""
    path = Path(path)
    with _open(path) as fh:
        attrs = _checked_attrs(fh, path)
        if not attrs.get("complete") or path.name.endswith(".partial"):
            raise CacheError(f"{path}: cache is incomplete ({attrs.get('rows_done')} of {attrs['n_rows']} rows); rerun embed to finish it.")
        ids = fh["ids"].asstr()[()]
        feats = fh["features"][()].astype(np.float32)
        valid = fh["valid"][()] if "valid" in fh else np.ones(len(ids), bool)
    if expect_ids is not None and not np.array_equal(ids, np.asarray(expect_ids).astype(str)):
        raise CacheError(f"{path}: cache IDs no longer match the tile table; rerun embed to rebuild it.")
    return EmbeddingCache(path, ids[valid], feats[valid], attrs)


def list_caches(cache_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any] | str]]:
    """Every ``*.h5`` / ``*.h5.partial`` under ``cache_dir`` with its attrs (or the error)."""
    out: list[tuple[Path, dict[str, Any] | str]] = []
    for p in sorted(Path(cache_dir).glob("*/*.h5*")):
        if p.name.endswith(".lock"):
            continue
        try:
            out.append((p, read_attrs(p)))
        except CacheError as exc:
            if p.name.endswith(".partial"):  # HDF5 locks a file while embed writes it
                out.append((p, "partial cache: being written now, or interrupted (rerun embed to resume)"))
            else:
                out.append((p, str(exc)))
    return out


def verify_cache(path: str | os.PathLike) -> list[str]:
    """Problems found in a cache (empty list = sound)."""
    path = Path(path)
    problems: list[str] = []
    attrs = read_attrs(path)
    if hashlib.sha256(str(attrs.get("key_json", "")).encode()).hexdigest() != attrs.get("fingerprint"):
        problems.append("fingerprint does not match key_json (file edited or corrupt)")
    if not attrs.get("complete"):
        problems.append(f"incomplete: {attrs.get('rows_done')} of {attrs['n_rows']} rows written")
    if int(attrs.get("rows_done", -1)) != attrs["n_rows"]:
        problems.append(f"rows_done {attrs.get('rows_done')} != rows {attrs['n_rows']}")
    with _open(path) as fh:
        ids = fh["ids"].asstr()[()]
        if len(set(ids)) != len(ids):
            problems.append("duplicate IDs")
        bad = 0
        for s in range(0, len(ids), 4096):
            block = fh["features"][s : s + 4096]
            bad += int((~np.isfinite(block)).any(axis=1).sum())
        if bad:
            problems.append(f"{bad} rows hold NaN or inf")
    return problems


def find_cache(table, backbone: str, cache_dir: str | os.PathLike) -> Path:
    """The one complete, current cache for ``table`` x ``backbone``.

    Refuses with :class:`CacheError` when none exists, when only stale ones
    exist (table changed since), or when several differ (e.g. TTA 1 and 8),
    naming them so the user can pass ``--cache FILE``.
    """
    folder = Path(cache_dir) / _safe(table.name)
    fp = table.fingerprint()
    current, stale = [], []
    for p in sorted(folder.glob(f"{_safe(backbone)}-*.h5")):
        try:
            attrs = read_attrs(p)
        except CacheError:
            continue
        if attrs.get("backbone") != backbone or not attrs.get("complete"):
            continue
        (current if attrs.get("table_fingerprint") == fp else stale).append((p, attrs))
    if len(current) == 1:
        return current[0][0]
    if len(current) > 1:
        desc = "; ".join(f"{p} (tta {a['tta']}, weights {a['weights_source']}{', RANDOM-INIT' if a['random_init'] else ''})" for p, a in current)
        raise CacheError(f"several caches for backbone '{backbone}' and table {table.source}: {desc}; choose one with --cache FILE.")
    if stale:
        raise CacheError(
            f"{stale[0][0]}: cache was built for an older version of {table.source} (IDs, paths or files changed); "
            f"rerun `python cli.py embed --data {table.source} --backbone {backbone}`."
        )
    raise CacheError(
        f"no cache for backbone '{backbone}' and table {table.source} under {folder}; "
        f"run `python cli.py embed --data {table.source} --backbone {backbone}` first."
    )


def load_features(table, backbone: str | None = None, cache_dir: str | os.PathLike = "cache",
                  cache_file: str | os.PathLike | None = None) -> EmbeddingCache:
    """The API later stages use: features for ``table`` aligned to its IDs.

    Rows skipped at embed time (``--skip-bad``) are absent; use ``.ids`` to
    align targets.
    """
    path = Path(cache_file) if cache_file else find_cache(table, backbone, cache_dir)
    cache = read_cache(path)
    if cache_file and cache.attrs.get("table_fingerprint") != table.fingerprint():
        raise CacheError(f"{path}: cache was built for another version of {table.source}; rerun embed.")
    if backbone and cache.backbone != backbone:
        raise CacheError(f"{path}: holds backbone '{cache.backbone}', not '{backbone}'.")
    return cache
