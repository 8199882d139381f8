"""HDF5 embedding caches: one file per (table, backbone, weights, preprocessing, TTA), rows keyed by content.

On-disk contract (``FORMAT_VERSION`` 2), ``<cache_dir>/<table stem>-<path8>/<backbone>-<fp16>.h5`` (``path8``: 8 hex
of the table's resolved path, :attr:`featurize.tables.table.TileTable.cache_folder`), where
``fp16`` is the start of the key fingerprint (everything that changes the numbers *except* the
table: backbone spec, weight sha256 / random-init flag, TTA, stored dtype, compute precision,
decoder (when not Pillow), import parameters):

* ``ids``      (N,)    UTF-8 strings, the table's IDs in table order;
* ``paths``    (N,)    UTF-8 strings, each tile's absolute path when it was embedded;
* ``digests``  (N,)    S64, sha256 (hex) of each tile's bytes ("" for imported embeddings);
* ``stats``    (N, 2)  int64, the tile file's (size, mtime_ns) when it was hashed;
* ``features`` (N, D)  float16 (default) or float32, chunked by rows, all finite;
* ``valid``    (N,)    bool, False for tiles skipped with ``--skip-bad`` or unmatched imports;
* ``done``     (N,)    bool, rows written (all True in a complete file);
* attributes: ``hexpress_format``, ``fingerprint`` (sha256 of ``key_json``), ``key_json``,
  ``backbone``, ``architecture``, ``table``, ``table_fingerprint`` (sha256 over (ID, digest) rows:
  what the tiles are, set when complete), ``random_init``, ``weights_sha256``, ``weights_source``,
  ``weights_path``, ``tta``, ``dtype``, ``compute``, ``decoder``, ``tool_version``, ``versions`` (JSON: torch,
  timm, ... that wrote it; not part of the key), ``created``, ``rows_done``, ``complete``.

A file is written as ``<name>.h5.partial`` batch by batch (``done`` after each flush) and renamed
to ``<name>.h5`` only once every row is written, so a finished-looking file is always complete.
Re-embedding a table reuses every row whose ID and tile content are unchanged
(:mod:`featurize.tables.digests`): only new or changed tiles go through the network again.  An
interrupted run resumes from the partial file when its key still matches.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from core import __version__
from featurize.models.backbones import BackboneSpec
from featurize.tables.digests import (
    DIGEST_DTYPE,
    NO_STAT,
    RowPlan,
    content_fingerprint,
    file_digest,
    plan_rows,
)
from core.errors import CacheError
from core.integrity import (
    CHECKSUMS,
    H5_ERRORS,
    Sealed,
    open_h5,
    reseal_dataset,
    seal,
)
from core.log import warn
from featurize.models.weights import ResolvedWeights

FORMAT_VERSION = 2
MIN_CHUNK_ROWS = 256
_STR = h5py.string_dtype(encoding="utf-8")
_VERSIONED = ("torch", "torchvision", "timm", "numpy", "h5py", "hexpress")


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the cached numbers, and the table the file belongs to."""

    table_name: str
    spec: BackboneSpec
    weights: ResolvedWeights
    tta: int
    dtype: str  # "float16" | "float32": how the embeddings are stored
    compute: str = "float32"  # the forward pass's precision: "float32", or "bfloat16"/"float16" under CUDA autocast
    params: str = ""  # JSON of source parameters that change the numbers (imported embeddings: how rows were matched)
    decoder: str = "pil"  # who decoded the tiles: "pil", or "nvjpeg"/"torchvision-cpu" (featurize.engine.decode)

    def key_dict(self) -> dict[str, Any]:
        spec = self.spec.to_dict()
        spec.pop("notes", None)  # cosmetic
        return {
            "format": FORMAT_VERSION,
            "spec": spec,
            "weights_sha256": self.weights.sha256,
            "random_init": self.weights.random_init,
            "tta": self.tta,
            "dtype": self.dtype,
            **({"compute": self.compute} if self.compute != "float32" else {}),
            **({"params": json.loads(self.params)} if self.params else {}),
            **({"decoder": self.decoder} if self.decoder != "pil" else {}),
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


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in _VERSIONED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return json.dumps(out, sort_keys=True)


REBUILD = "rerun embed, which replaces it"


def _rows_of(fh: h5py.File, path: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, digests, stats) of an open cache file, each verified against its checksums."""
    r = Sealed(fh, Path(path or fh.filename), CacheError, REBUILD)
    return r.read("ids"), r.read("digests"), r.read("stats")


class CacheWriter:
    """Writes one cache batch by batch, resumable, renamed into place when complete.

    ``open`` returns the table rows still to embed: none of a resumed file's
    rows that are done and fresh, none of a previous complete cache's rows
    whose ID and content are unchanged (they are copied), every other row.
    """

    def __init__(self, final: Path, key: CacheKey | None, ids: np.ndarray, dim: int, paths: Sequence[str] | None = None,
                 extra_attrs: dict[str, Any] | None = None, attrs: dict[str, Any] | None = None):
        """``key`` builds the attributes; or ``attrs`` gives them whole (merging shards of one key)."""
        if (key is None) == (attrs is None):
            raise CacheError("CacheWriter needs exactly one of a key and attributes.")
        self.final = Path(final)
        self.partial = partial_path(self.final)
        self.key = key
        self._attrs = dict(attrs) if attrs is not None else None
        self.fingerprint = key.fingerprint() if key is not None else str(attrs["fingerprint"])
        self.dtype = key.dtype if key is not None else str(attrs["dtype"])
        self.ids = np.asarray(ids).astype(str)
        self.paths = [str(p) for p in paths] if paths is not None else [""] * len(self.ids)
        self.dim = int(dim)
        self.extra_attrs = dict(extra_attrs or {})
        self._fh: h5py.File | None = None
        self.reused = 0

    # -- opening -----------------------------------------------------------
    def open(self, previous: Path | None = None, plan: RowPlan | None = None) -> np.ndarray:
        """Open (resuming when the partial file matches, reusing ``previous``, whose row plan the caller
        may already hold); returns the rows to embed."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            try:
                fh = h5py.File(self.partial, "r+", locking=False)
            except BlockingIOError as exc:  # never throw away progress because another process still has the file open
                raise CacheError(f"{self.partial}: still open in another process ({exc}); wait a few seconds and rerun.") from exc
            except OSError:
                fh = None
            try:
                ok = fh is not None and (fh.attrs.get("fingerprint") == self.fingerprint
                                         and fh["features"].shape == (len(self.ids), self.dim)
                                         and "done" in fh
                                         and np.array_equal(fh["ids"].asstr()[()], self.ids))
                if ok:
                    done = fh["done"][()]
                    ids, digests, stats = fh["ids"].asstr()[()], fh["digests"][()], fh["stats"][()]
            except H5_ERRORS:
                ok = False
            if ok:
                self._fh = fh
                plan = plan_rows(self.ids, self.paths, ids, digests, stats, reusable=done)
                stale = np.flatnonzero(done & (plan.source != np.arange(len(self.ids))))
                if len(stale):  # done before the interruption, changed since: embed again
                    done[stale] = False
                    fh["done"][...] = done
                self._apply_stats(plan.new_stats)
                return np.flatnonzero(~done)
            if fh is not None:
                fh.close()
            self.partial.unlink()
        self._fh = self._create()
        if previous is not None:
            self._reuse(previous, plan)
        return np.flatnonzero(~self._fh["done"][()])

    def _reuse(self, previous: Path, plan: RowPlan | None = None) -> None:
        """Copy the rows of a complete cache (same key) whose ID and tile content still match."""
        try:
            with open_h5(previous, CacheError, "cache file", REBUILD) as old:
                rd = Sealed(old, previous, CacheError, REBUILD)
                ids, digests, stats = rd.read("ids"), rd.read("digests"), rd.read("stats")
                if plan is None:
                    plan = plan_rows(self.ids, self.paths, ids, digests, stats)
                rows = np.flatnonzero(plan.source >= 0)
                fh = self._fh
                for s in range(0, len(rows), 4096):
                    r = rows[s : s + 4096]
                    src = plan.source[r]
                    order = np.argsort(src)
                    uniq = src[order]
                    back = np.empty_like(order)
                    back[order] = np.arange(len(order))
                    fh["features"][r] = rd.take("features", uniq)[back]
                    fh["valid"][r] = rd.take("valid", uniq)[back]
                    fh["digests"][r] = digests[src]
                    fh["stats"][r] = np.array([plan.new_stats.get(int(j), tuple(stats[j])) for j in src], dtype=np.int64)
                    fh["done"][r] = True
        except (CacheError, *H5_ERRORS):  # a damaged previous cache offers nothing to reuse: start over
            for name in ("features", "valid", "digests", "stats", "done"):
                self._fh[name][...] = {"valid": True, "stats": NO_STAT[0], "done": False}.get(name, 0)
            self._fh.attrs["rows_done"] = 0
            self._fh.flush()
            return
        self.reused = int(len(rows))
        fh.attrs["rows_done"] = self.reused
        fh.flush()

    def _apply_stats(self, new_stats: dict[int, tuple[int, int]]) -> None:
        if new_stats:
            rows = np.array(sorted(new_stats))
            self._fh["stats"][rows] = np.array([new_stats[int(r)] for r in rows], dtype=np.int64)

    def _create(self) -> h5py.File:
        n = len(self.ids)
        dtype = np.float16 if self.dtype == "float16" else np.float32
        try:
            # HDF5's own file lock is off: hexpress's lock (core.lock) already allows one writer, and an
            # HDF5 flock would be inherited by forked decode workers and outlive a killed embed
            fh = h5py.File(self.partial, "w", locking=False)
            fh.create_dataset("ids", data=self.ids.astype(object), dtype=_STR)
            fh.create_dataset("paths", data=np.asarray(self.paths, dtype=object), dtype=_STR)
            fh.create_dataset("digests", shape=(n,), dtype=DIGEST_DTYPE)
            fh.create_dataset("stats", shape=(n, 2), dtype=np.int64, fillvalue=NO_STAT[0])
            fh.create_dataset("features", shape=(n, self.dim), dtype=dtype,
                              chunks=(min(n, max(MIN_CHUNK_ROWS, 1)), self.dim))
            fh.create_dataset("valid", shape=(n,), dtype=bool, fillvalue=True)
            fh.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False)
            for k, v in self._base_attrs().items():
                fh.attrs[k] = v
            fh.flush()
        except (OSError, RuntimeError) as exc:
            raise CacheError(f"{self.partial}: cannot create the cache file ({_why(exc)}); {self._space_hint()}.") from exc
        return fh

    def _space_hint(self) -> str:
        import shutil

        need = len(self.ids) * self.dim * (2 if self.dtype == "float16" else 4) + len(self.ids) * 200
        try:
            free = shutil.disk_usage(self.partial.parent).free
        except OSError:
            free = 0
        return (f"the finished cache needs about {need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free there: "
                "free disk space (or pass another --cache-dir) and rerun - rows already written are kept")

    def _base_attrs(self) -> dict[str, Any]:
        if self._attrs is not None:
            return {**self._attrs, "rows_done": 0, "complete": False, "table_fingerprint": "",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.extra_attrs}
        spec, w = self.key.spec, self.key.weights
        return {
            "hexpress_format": FORMAT_VERSION,
            "fingerprint": self.key.fingerprint(),
            "key_json": self.key.key_json(),
            "backbone": spec.name,
            "architecture": spec.architecture,
            "table": self.key.table_name,
            "table_fingerprint": "",
            "random_init": bool(w.random_init),
            "weights_sha256": w.sha256 or "",
            "weights_source": w.source,
            "weights_path": w.path or "",
            "tta": int(self.key.tta),
            "dtype": self.key.dtype,
            "compute": self.key.compute,
            "decoder": self.key.decoder,
            "tool_version": __version__,
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rows_done": 0,
            "complete": False,
            **self.extra_attrs,
        }

    # -- writing -----------------------------------------------------------
    def write(self, rows: np.ndarray, feats: np.ndarray, valid: np.ndarray | None = None,
              digests: Sequence[str] | None = None, stats: np.ndarray | None = None) -> None:
        """Write table rows ``rows`` (increasing) and record them as done, durably.

        Refuses non-finite features (e.g. activations beyond float16's range)
        before anything is written, naming the rows.
        """
        if self._fh is None:
            raise CacheError(f"{self.partial}: the cache writer is not open.")
        rows = np.asarray(rows, dtype=np.int64)
        with np.errstate(over="ignore"):  # overflow to inf is what the check below reports
            stored = np.asarray(feats).astype(self._fh["features"].dtype)
        ok = np.ones(len(rows), bool) if valid is None else np.asarray(valid, bool)
        bad = np.flatnonzero(ok & ~np.isfinite(stored).all(axis=1))
        if len(bad):
            first = ", ".join(self.ids[rows[bad[:3]]])
            hint = (" (beyond float16's range: rerun embed with --dtype float32)" if self.dtype == "float16"
                    else "; the backbone produced NaN or inf for these tiles: check them, or --skip-bad them")
            raise CacheError(f"{self.partial}: {len(bad)} rows give non-finite features (first: {first}){hint}.")
        try:
            fh = self._fh
            fh["features"][rows] = stored
            fh["valid"][rows] = ok
            if digests is not None:
                fh["digests"][rows] = np.asarray([d.encode() if isinstance(d, str) else d for d in digests], dtype=DIGEST_DTYPE)
            if stats is not None:
                fh["stats"][rows] = np.asarray(stats, dtype=np.int64)
            fh["done"][rows] = True
            fh.attrs["rows_done"] = int(fh.attrs["rows_done"]) + len(rows)
            fh.flush()
        except (OSError, RuntimeError) as exc:
            raise _hard(CacheError(f"{self.partial}: write failed at row {int(rows[0])} ({_why(exc)}); {self._space_hint()}.")) from exc

    def finalize(self) -> Path:
        """Mark complete (content fingerprint set) and rename into place; returns the final path."""
        if self._fh is None:
            raise CacheError(f"{self.partial}: the cache writer is not open.")
        fh = self._fh
        done = fh["done"][()]
        if not done.all():
            raise CacheError(f"{self.partial}: only {int(done.sum())} of {len(self.ids)} rows written; rerun embed to finish.")
        try:
            digests = [d.decode() for d in fh["digests"][()]]
            fh.attrs["table_fingerprint"] = content_fingerprint(self.ids, digests)
            fh.attrs["rows_done"] = len(self.ids)
            fh.attrs["complete"] = True
            fh.attrs["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            seal(fh)
            fh.flush()
            fh.close()
            self._fh = None
            os.replace(self.partial, self.final)
        except (OSError, RuntimeError) as exc:
            raise _hard(CacheError(f"{self.partial}: cannot finish the cache ({_why(exc)}); {self._space_hint()}.")) from exc
        return self.final

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except (OSError, RuntimeError):
                pass  # the write error that brought us here is what the user sees


def _hard(exc: CacheError) -> CacheError:
    """Mark an error after which HDF5 holds a file it cannot flush: the CLI exits without HDF5's teardown."""
    exc.hard_exit = True
    return exc


def _why(exc: BaseException) -> str:
    """The useful part of an HDF5 write error ("No space left on device"), not its C-level dump."""
    text = str(exc)
    for key in ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied"):
        if key in text:
            return key
    return text.splitlines()[0][:160] if text else type(exc).__name__


def update_stats(path: Path, new_stats: dict[int, tuple[int, int]]) -> None:
    """Record refreshed stats of unchanged tiles in a complete cache (so they are not hashed again)."""
    if not new_stats:
        return
    rows = np.array(sorted(new_stats))
    try:
        with h5py.File(path, "r+", locking=False) as fh:
            fh["stats"][rows] = np.array([new_stats[int(r)] for r in rows], dtype=np.int64)
            reseal_dataset(fh, "stats")
    except H5_ERRORS:
        return  # read-only cache: the tiles are simply hashed again next time


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
    return open_h5(path, CacheError, "cache file", REBUILD)



class OldCacheFormat(CacheError):
    """A cache written by an earlier hexpress (another FORMAT_VERSION)."""


def _checked_attrs(fh: h5py.File, path: Path) -> dict[str, Any]:
    try:
        return _attrs_of(fh, path)
    except CacheError:
        raise
    except H5_ERRORS as exc:
        raise CacheError(f"{path}: the cache file is damaged (unreadable metadata: {str(exc)[:120]}); {REBUILD}.") from exc


def _attrs_of(fh: h5py.File, path: Path) -> dict[str, Any]:
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in fh.attrs.items()}
    fmt = attrs.get("hexpress_format")
    if isinstance(fmt, int) and fmt != FORMAT_VERSION and "features" in fh:
        raise OldCacheFormat(f"{path}: cache format {fmt} was written by an earlier hexpress (this one reads "
                             f"{FORMAT_VERSION}); rerun embed to rebuild it.")
    if fmt != FORMAT_VERSION or "features" not in fh or "ids" not in fh:
        raise CacheError(f"{path}: not a hexpress cache (format {fmt!r}); delete it or rerun embed.")
    sealed = Sealed(fh, path, CacheError, REBUILD)
    sealed.check_attrs()
    attrs["n_rows"], attrs["dim"] = fh["features"].shape
    attrs["n_valid"] = int(fh["valid"][()].sum()) if "valid" in fh else attrs["n_rows"]
    attrs["sealed"] = sealed.sealed
    attrs.pop(CHECKSUMS, None)
    if not isinstance(attrs.get("complete"), (bool, np.bool_)):
        raise CacheError(f"{path}: its 'complete' attribute is damaged ({attrs.get('complete')!r}); {REBUILD}.")
    if not path.name.endswith(".partial") and ".shard-" not in path.name and not attrs["complete"]:
        raise CacheError(f"{path}: a finished cache file marked incomplete (damaged or edited); {REBUILD}.")
    return attrs


_WARNED: set[str] = set()


def warn_unsealed(path: Path, attrs: dict[str, Any]) -> None:
    """Say once per file that a cache from before checksums is read unverified."""
    if not attrs.get("sealed") and str(path) not in _WARNED:
        _WARNED.add(str(path))

        warn(f"{path}: written before hexpress stored checksums, so its contents cannot be verified; "
              "rerun embed (no tile is embedded again) to add them.")


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Attributes of a cache file, validated as a hexpress cache."""
    path = Path(path)
    with _open(path) as fh:
        return _checked_attrs(fh, path)


def read_cache(path: str | os.PathLike, expect_ids: np.ndarray | None = None) -> EmbeddingCache:
    """Load a complete cache (one open of the file); refuses incomplete files, non-finite rows and other IDs."""
    path = Path(path)
    with _open(path) as fh:
        attrs = _checked_attrs(fh, path)
        if not attrs.get("complete") or path.name.endswith(".partial"):
            raise CacheError(f"{path}: cache is incomplete ({attrs.get('rows_done')} of {attrs['n_rows']} rows); rerun embed to finish it.")
        r = Sealed(fh, path, CacheError, REBUILD)
        ids = r.read("ids")
        feats = r.read("features").astype(np.float32)
        valid = r.read("valid").astype(bool)
        r.read("paths")  # not used by a fit, but a damaged file is refused whole
        if not r.read("done").all():
            raise CacheError(f"{path}: marked complete but not every row is done (damaged); {REBUILD}.")
        if len(ids) != feats.shape[0] or len(valid) != len(ids):
            raise CacheError(f"{path}: its datasets disagree on the number of rows (damaged); {REBUILD}.")
    warn_unsealed(path, attrs)
    bad = np.flatnonzero(valid & ~np.isfinite(feats).all(axis=1))
    if len(bad):
        raise CacheError(f"{path}: {len(bad)} rows hold NaN or inf (first: {', '.join(ids[bad[:3]])}); rebuild it "
                         f"with `python cli.py embed ... --dtype float32` (float16 overflows on large activations).")
    if expect_ids is not None and not np.array_equal(ids, np.asarray(expect_ids).astype(str)):
        raise CacheError(f"{path}: cache IDs no longer match the tile table; rerun embed to rebuild it.")
    return EmbeddingCache(path, ids[valid], feats[valid], attrs)


def plan_for(table, path: Path) -> RowPlan:
    """How the cache at ``path`` serves ``table`` row by row (computed once per table object)."""
    def compute() -> RowPlan:
        with _open(path) as fh:
            ids, digests, stats = _rows_of(fh, path)
        return plan_rows(table.ids, table.sources, ids, digests, stats)

    return table.memo(("plan", str(Path(path).resolve()), Path(path).stat().st_mtime_ns), compute)


def plan_if_complete(table, path: Path) -> RowPlan | None:
    """The row plan of ``path`` for ``table`` when it is a complete, readable cache; else None."""
    try:
        if not Path(path).exists() or not read_attrs(path).get("complete"):
            return None
        return plan_for(table, path)
    except (CacheError, *H5_ERRORS):
        return None


def _rebuild_hint(table, attrs: dict[str, Any]) -> str:
    if attrs.get("weights_source") == "external-file":
        return (f"rerun `python cli.py import-embeddings --data {table.source} ... --backbone {attrs['backbone']}` "
                "(imported embeddings cannot be re-embedded)")
    return (f"rerun `python cli.py embed --data {table.source} --backbone {attrs['backbone']}` "
            "(only new and changed tiles are embedded)")


def check_fresh(table, path: Path, attrs: dict[str, Any]) -> RowPlan:
    """Refuse a cache that does not hold every table row with unchanged tile content."""
    plan = plan_for(table, path)
    if plan.changed or plan.new:
        what = []
        if plan.changed:
            what.append(f"{len(plan.changed)} tiles changed content (first: {table.ids[plan.changed[0]]})")
        if plan.new:
            what.append(f"{len(plan.new)} rows are not in it (first: {table.ids[plan.new[0]]})")
        raise CacheError(f"{path}: stale for {table.source}: {' and '.join(what)}; {_rebuild_hint(table, attrs)}.")
    update_stats(path, plan.new_stats)
    return plan


def list_caches(cache_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any] | str]]:
    """Every ``*.h5`` / ``*.h5.partial`` under ``cache_dir`` with its attrs (or the error)."""
    out: list[tuple[Path, dict[str, Any] | str]] = []
    for p in sorted(Path(cache_dir).glob("*/*.h5*")):
        if p.name.endswith((".lock", ".txt")):
            continue
        try:
            out.append((p, read_attrs(p)))
        except CacheError as exc:
            if p.name.endswith(".partial"):  # HDF5 locks a file while embed writes it
                out.append((p, "partial cache: being written now, or interrupted (rerun embed to resume)"))
            else:
                out.append((p, str(exc)))
    return out


def verify_cache(path: str | os.PathLike, deep: bool = False) -> list[str]:
    """Problems found in a cache (empty list = sound): every check ``fit`` makes, and with ``deep`` the tiles.

    ``deep`` also re-hashes every tile the cache was built from and reports
    those whose bytes changed or that are gone.
    """
    path = Path(path)
    if not path.is_file():
        _open(path)  # raises: not found, or a directory
    try:
        return _verify(path, deep)
    except H5_ERRORS as exc:
        return [f"the cache file is damaged ({str(exc)[:120]}); {REBUILD}"]


def _verify(path: Path, deep: bool) -> list[str]:
    problems: list[str] = []
    try:
        attrs = read_attrs(path)
    except OldCacheFormat:
        raise
    except CacheError as exc:
        return [str(exc)]
    if hashlib.sha256(str(attrs.get("key_json", "")).encode()).hexdigest() != attrs.get("fingerprint"):
        problems.append("fingerprint does not match key_json (file edited or corrupt)")
    if not attrs.get("complete"):
        problems.append(f"incomplete: {attrs.get('rows_done')} of {attrs['n_rows']} rows written")
    with _open(path) as fh:
        r = Sealed(fh, path, CacheError, REBUILD)
        if not r.sealed:
            problems.append("no checksums (written before hexpress stored them): its contents cannot be verified; "
                            "rerun embed (no tile is embedded again) to add them")
        else:  # every dataset but the features, which the non-finite check below reads (and verifies) once
            problems.extend(p.replace(f"{path}: ", "").replace(f"; {REBUILD}", "")
                            for p in r.verify_all(skip=("features",)))
        if problems and r.sealed:
            return problems
        try:
            ids, digests = r.read("ids"), r.read("digests")
            if len(set(ids)) != len(ids):
                problems.append("duplicate IDs")
            if attrs.get("complete") and not r.read("done").all():
                problems.append("marked complete but not every row is done")
            bad, step = 0, int((r.doc.get("features") or {}).get("rows") or 4096)  # whole checksum blocks: one read each
            for s in range(0, len(ids), step):
                bad += int((~np.isfinite(r.rows("features", s, s + step))).any(axis=1).sum())
        except CacheError as exc:
            return problems + [str(exc).replace(f"{path}: ", "").replace(f"; {REBUILD}", "")]
        if bad:
            problems.append(f"{bad} rows hold NaN or inf")
        if attrs.get("complete") and content_fingerprint(ids, [d.decode() for d in digests]) != attrs.get("table_fingerprint"):
            problems.append("table_fingerprint does not match the stored tile digests")
        if deep:
            paths = fh["paths"].asstr()[()]
            changed, missing = [], []
            for i, (p, d) in enumerate(zip(paths, digests)):
                d = d.decode()
                if not d:
                    continue  # imported embeddings: no tile behind the row
                now = file_digest(p)
                if not now:
                    missing.append(ids[i])
                elif now != d:
                    changed.append(ids[i])
            if changed:
                problems.append(f"{len(changed)} tiles changed content since they were embedded (first: {changed[0]}); "
                                "rerun embed to refresh those rows")
            if missing:
                problems.append(f"{len(missing)} tiles are gone (first: {missing[0]}); their features cannot be re-checked")
    return problems


def checked_cache_dir(cache_dir: str | os.PathLike) -> Path:
    """``--cache-dir`` as a folder, refusing a path that is a file."""
    d = Path(cache_dir)
    if d.exists() and not d.is_dir():
        raise CacheError(f"--cache-dir {d}: is a file, not a folder; pass the folder that holds the caches.")
    for parent in d.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CacheError(f"--cache-dir {d}: {parent} is a file, not a folder; pass another --cache-dir.")
            break
    return d


def _table_dirs(cache_dir: str | os.PathLike, stem: str, own: str) -> list[Path]:
    """The table's own cache folder first, then those of tables of the same name (other paths, and the
    stem-only folder of releases before per-path folders)."""
    base = checked_cache_dir(cache_dir)
    others = sorted(p for p in base.glob(f"{_safe(stem)}-????????") if p.is_dir() and p.name != _safe(own))
    legacy = base / _safe(stem)
    return [base / _safe(own)] + others + ([legacy] if legacy.is_dir() else [])


def sibling_caches(cache_dir: str | os.PathLike, table, filename: str) -> list[Path]:
    """Complete caches named ``filename`` (same backbone and key) in the folders of other tables of the same name."""
    return [d / filename for d in _table_dirs(cache_dir, table.name, table.cache_folder)[1:] if (d / filename).is_file()]


def require_cache_files(table_path: str | os.PathLike, backbones, cache_dir: str | os.PathLike) -> None:
    """Refuse at once (before the table is read) when no cache file of a backbone exists for the table."""
    path = Path(table_path).expanduser()
    if not path.is_file():
        return  # reading the table says what is wrong with it
    from featurize.tables.table import cache_folder_name

    src = path.resolve()
    dirs = _table_dirs(cache_dir, src.stem, cache_folder_name(src))
    for b in backbones or ():
        if not any(any(d.glob(f"{_safe(b)}-*.h5")) for d in dirs):
            raise CacheError(f"no cache for backbone '{b}' and table {src} under {dirs[0]}; "
                             f"run `python cli.py embed --data {src} --backbone {b}` first.")


def find_cache(table, backbone: str, cache_dir: str | os.PathLike) -> Path:
    """The one complete cache for ``table`` x ``backbone``, checked fresh row by row.

    Refuses with :class:`CacheError` when none exists, when it is stale (tiles
    changed or rows added since: it says which and how to refresh it), damaged
    or of an older format, or when several differ (e.g. TTA 1 and 8), naming
    them so the user can pass ``--cache FILE``.
    """
    dirs = _table_dirs(cache_dir, table.name, table.cache_folder)
    folder, pattern = dirs[0], f"{_safe(backbone)}-*.h5"
    if not any(folder.glob(pattern)):  # no cache of this table's own: one of a table of the same name serves when fresh
        for other in dirs[1:]:
            if any(other.glob(pattern)):
                try:
                    return _find_in(other, table, backbone)
                except CacheError:
                    continue
    return _find_in(folder, table, backbone)


def _find_in(folder: Path, table, backbone: str) -> Path:
    current, damaged, old = [], [], []
    for p in sorted(folder.glob(f"{_safe(backbone)}-*.h5")):
        if ".shard-" in p.name:  # shards of embed --shard: merged into the standard cache, never read as one
            continue
        try:
            attrs = read_attrs(p)
        except OldCacheFormat:
            old.append(p)
            continue
        except CacheError as exc:
            damaged.append((p, exc))
            continue
        if attrs.get("backbone") == backbone and attrs.get("complete"):
            current.append((p, attrs))
    if len(current) > 1:
        desc = "; ".join(f"{p} (tta {a['tta']}, dtype {a['dtype']}, weights {a['weights_source']}"
                         f"{', RANDOM-INIT' if a['random_init'] else ''})" for p, a in current)
        raise CacheError(f"several caches for backbone '{backbone}' and table {table.source}: {desc}; choose one with --cache FILE.")
    if current:
        check_fresh(table, *current[0])
        return current[0][0]
    if damaged:
        raise damaged[0][1]
    if old:
        raise CacheError(f"{old[0]}: written by an earlier hexpress in another cache format; rerun "
                         f"`python cli.py embed --data {table.source} --backbone {backbone}` to rebuild it.")
    raise CacheError(
        f"no cache for backbone '{backbone}' and table {table.source} under {folder}; "
        f"run `python cli.py embed --data {table.source} --backbone {backbone}` first."
    )


def load_features(table, backbone: str | None = None, cache_dir: str | os.PathLike = "cache",
                  cache_file: str | os.PathLike | None = None) -> EmbeddingCache:
    """The API later stages use: features for ``table`` aligned to its IDs.

    The cache must hold every table row with unchanged tile content (checked
    by stat, re-hashing only tiles whose stat changed, once per table
    object).  Rows skipped at embed time (``--skip-bad``) are absent; use
    ``.ids`` to align targets.
    """
    path = Path(cache_file) if cache_file else find_cache(table, backbone, cache_dir)
    cache = read_cache(path)
    if cache_file:
        check_fresh(table, path, cache.attrs)
    if backbone and cache.backbone != backbone:
        raise CacheError(f"{path}: holds backbone '{cache.backbone}', not '{backbone}'.")
    return cache
