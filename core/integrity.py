"""Every file hexpress reads back is checked, never trusted: HDF5 storage, checksums, file digests, byte caps.

One module owns the checks that every reader shares:

* :func:`open_h5` opens an HDF5 file read-only and refuses one whose metadata is damaged, or whose objects
  are not plain datasets stored inside the file (external links, soft links, virtual datasets and external
  raw storage would let a file silently read ``/etc/passwd`` or another file's numbers);
* :func:`seal` stores, in the file's ``hexpress_checksums`` attribute, a sha256 per block of rows of every
  dataset and one over the other attributes; :class:`Sealed` verifies each block the first time it is read
  (a whole dataset, or rows ``start:stop`` of a streamed one), so one flipped byte is refused by every
  command that reads it, and by ``cache verify``;
* :func:`file_sha256` (the run folder's manifest) and :func:`read_regular` (tile bytes: regular files only,
  at most :func:`max_tile_bytes`, so ``/dev/zero`` or a FIFO never exhausts memory or hangs ``embed``).

The errors are the caller's type (``CacheError`` for caches, ``RunError`` for run files), one sentence
naming the file and what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

#: The attribute holding a file's checksums.
CHECKSUMS = "hexpress_checksums"
#: Bytes of one checksummed row block (rows of a dataset are hashed in blocks of about this size).
BLOCK_BYTES = 8 << 20
#: Default cap on one tile's bytes (``HEXPRESS_MAX_TILE_MB`` overrides it).
DEFAULT_MAX_TILE_MB = 512
#: Errors HDF5 / h5py raise on damaged metadata (object headers, heaps, B-trees).
H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, AttributeError, UnicodeDecodeError)


def max_tile_bytes() -> int:
    """The most bytes one tile may have (``HEXPRESS_MAX_TILE_MB``, default 512 MiB)."""
    raw = os.environ.get("HEXPRESS_MAX_TILE_MB", "")
    try:
        mb = float(raw) if raw else DEFAULT_MAX_TILE_MB
    except ValueError:
        mb = DEFAULT_MAX_TILE_MB
    return int(max(mb, 0.001) * (1 << 20))


def regular_size(path: str | os.PathLike, error: Callable[[str], Exception], what: str = "tile") -> int:
    """Size of ``path``, refusing anything but a regular file (a FIFO, a device, a folder) before it is opened."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise error(f"{p}: cannot be read ({exc.strerror}); check that the file exists.") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a device" if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) else "not a regular file"
        raise error(f"{p}: is {kind}, not a regular {what} file; fix the path in the tile table.")
    return int(st.st_size)


def check_size(path: str | os.PathLike, size: int, error: Callable[[str], Exception], what: str = "tile") -> None:
    cap = max_tile_bytes()
    if size < 0 or size > cap:
        raise error(f"{path}: the {what} is {size:,} bytes, over the {cap:,}-byte limit; fix the table, or raise the "
                    "limit with HEXPRESS_MAX_TILE_MB if tiles really are that large.")


def read_regular(path: str | os.PathLike, error: Callable[[str], Exception], offset: int | None = None,
                 size: int | None = None) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file (or ``size`` bytes at ``offset`` of one), capped; the stat they were read at."""
    p = Path(path)
    whole = regular_size(p, error)
    if offset is None:
        check_size(p, whole, error)
    else:
        check_size(f"{p} (member at byte {offset})", int(size if size is not None else -1), error)
        if offset < 0 or offset + size > whole:
            raise error(f"{p}: the packed tile at bytes {offset}..{offset + size} lies beyond the pack's {whole:,} "
                        "bytes; re-pack the tiles (`python cli.py pack`).")
    try:
        with open(p, "rb") as fh:
            st = os.fstat(fh.fileno())
            if offset is not None:
                fh.seek(offset)
                data = fh.read(size)
            else:
                data = fh.read(max_tile_bytes() + 1)
    except OSError as exc:
        raise error(f"{p}: cannot be read ({exc.strerror}).") from exc
    if offset is None and len(data) > max_tile_bytes():
        check_size(p, len(data), error)
    return data, st


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- HDF5 ------------------------------------------------------------------------------------------------
def _plain(fh, path: Path, error) -> None:
    """Refuse links and storage that point outside the file (checked on every open)."""
    import h5py
    from h5py import h5d

    def walk(group, prefix: str) -> None:
        for name in group:
            link = group.get(name, getlink=True)
            full = f"{prefix}{name}"
            if not isinstance(link, h5py.HardLink):
                kind = {"SoftLink": "a soft", "ExternalLink": "an external"}.get(type(link).__name__, "a non-hard")
                raise error(f"{path}: '{full}' is {kind} link, not data stored in the file; hexpress reads only plain "
                            "datasets inside the file: rebuild it with hexpress.")
            obj = group[name]
            if isinstance(obj, h5py.Group):
                walk(obj, full + "/")
            elif isinstance(obj, h5py.Dataset):
                dcpl = obj.id.get_create_plist()
                if dcpl.get_layout() not in (h5d.CONTIGUOUS, h5d.CHUNKED, h5d.COMPACT) or dcpl.get_external_count():
                    raise error(f"{path}: dataset '{full}' is virtual or stored in external files, not inside the file; "
                                "hexpress reads only plain datasets: rebuild it with hexpress.")

    walk(fh, "")


def open_h5(path: str | os.PathLike, error, what: str, hint: str, mode: str = "r"):
    """Open an HDF5 file, refusing damaged metadata and any storage outside the file (``error`` names ``hint``)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {what} not found; {hint}.")
    if not path.is_file():
        raise error(f"{path}: is a directory, not a {what} file; pass the file itself.")
    try:
        fh = h5py.File(path, mode, locking=False)
    except BlockingIOError:
        raise
    except H5_ERRORS as exc:
        raise error(f"{path}: the {what} is damaged (truncated or not HDF5: {_short(exc)}); {hint}.") from exc
    try:
        _plain(fh, path, error)
    except H5_ERRORS as exc:
        fh.close()
        raise error(f"{path}: the {what} is damaged (unreadable metadata: {_short(exc)}); {hint}.") from exc
    except BaseException:
        fh.close()
        raise
    return fh


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_attr_value(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def attrs_digest(attrs: dict[str, Any], skip: Iterable[str] = ()) -> str:
    skip = set(skip) | {CHECKSUMS}
    doc = {k: _attr_value(v) for k, v in sorted(attrs.items()) if k not in skip}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _block_rows(ds) -> int:
    row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * max(int(ds.dtype.itemsize), 1) if ds.ndim else 1
    return max(1, BLOCK_BYTES // max(row_bytes, 1))


def _is_str(ds) -> bool:
    import h5py

    return h5py.check_string_dtype(ds.dtype) is not None and ds.dtype.kind == "O"


def block_digest(values: np.ndarray, strings: bool) -> str:
    if strings:
        data = json.dumps([v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)
                           for v in np.asarray(values, dtype=object).ravel()]).encode()
    else:
        data = np.ascontiguousarray(values).tobytes()
    return hashlib.sha256(data).hexdigest()


def _read(ds, sl=()):
    return ds.asstr()[sl] if _is_str(ds) else ds[sl]


def dataset_checksums(ds) -> dict[str, Any]:
    if ds.ndim == 0:
        return {"rows": 0, "sha256": [block_digest(np.asarray(_read(ds)), _is_str(ds))]}
    b = _block_rows(ds)
    return {"rows": b, "sha256": [block_digest(_read(ds, slice(s, s + b)), _is_str(ds)) for s in range(0, ds.shape[0], b)]}


def seal(fh, names: Iterable[str] | None = None, skip_attrs: Iterable[str] = ()) -> None:
    """Store checksums of every dataset (or ``names``) and of the attributes; call last, before closing."""
    import h5py

    out: dict[str, Any] = {}
    for name in (names if names is not None else [k for k in fh if isinstance(fh[k], h5py.Dataset)]):
        out[name] = dataset_checksums(fh[name])
    out["__attrs__"] = {"skip": sorted(skip_attrs), "sha256": attrs_digest(dict(fh.attrs), skip_attrs)}
    fh.attrs[CHECKSUMS] = json.dumps(out, sort_keys=True)


def reseal_dataset(fh, name: str) -> None:
    """Refresh one dataset's checksums after an in-place update (e.g. a cache's refreshed tile stats)."""
    doc = json.loads(fh.attrs[CHECKSUMS]) if CHECKSUMS in fh.attrs else None
    if doc is None:
        return
    doc[name] = dataset_checksums(fh[name])
    fh.attrs[CHECKSUMS] = json.dumps(doc, sort_keys=True)


class Sealed:
    """Reads of an open HDF5 file, each row block verified against its checksums the first time it is read.

    ``sealed`` is False for a file written before checksums existed (reads are then unverified; the caller
    says so).  A mismatch raises ``error`` naming the dataset and the rows."""

    def __init__(self, fh, path: Path, error, hint: str):
        self.fh, self.path, self.error, self.hint = fh, Path(path), error, hint
        self._ok: set[tuple[str, int]] = set()
        raw = fh.attrs.get(CHECKSUMS)
        self.sealed = raw is not None
        self.doc: dict[str, Any] = {}
        if raw is not None:
            try:
                self.doc = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
                if not isinstance(self.doc, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                raise error(f"{path}: its checksums attribute is damaged ({exc}); {hint}.") from None

    def check_attrs(self) -> None:
        if not self.sealed:
            return
        a = self.doc.get("__attrs__") or {}
        if attrs_digest(dict(self.fh.attrs), a.get("skip", ())) != a.get("sha256"):
            raise self.error(f"{self.path}: its attributes do not match their checksum (the file was edited or is "
                             f"damaged); {self.hint}.")

    def _sums(self, name: str) -> dict[str, Any] | None:
        if not self.sealed:
            return None
        sums = self.doc.get(name)
        if not isinstance(sums, dict) or not isinstance(sums.get("sha256"), list):
            raise self.error(f"{self.path}: dataset '{name}' has no checksum (the file was edited or is damaged); {self.hint}.")
        return sums

    def _ds(self, name: str):
        try:
            return self.fh[name]
        except H5_ERRORS as exc:
            raise self.error(f"{self.path}: dataset '{name}' is missing or damaged ({_short(exc)}); {self.hint}.") from exc

    def __contains__(self, name: str) -> bool:
        try:
            return name in self.fh
        except H5_ERRORS:
            return False

    def read(self, name: str) -> np.ndarray:
        """The whole dataset (strings as ``str``), verified."""
        ds = self._ds(name)
        if ds.ndim == 0:
            try:
                v = np.asarray(_read(ds))
            except H5_ERRORS as exc:
                raise self.error(f"{self.path}: dataset '{name}' is damaged ({_short(exc)}); {self.hint}.") from exc
            sums = self._sums(name)
            if sums is not None and block_digest(v, _is_str(ds)) != sums["sha256"][0]:
                raise self.error(f"{self.path}: dataset '{name}' does not match its checksum (damaged); {self.hint}.")
            return v
        return self.rows(name, 0, ds.shape[0])

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a dataset, reading (and verifying once) the row blocks that cover them."""
        ds = self._ds(name)
        n = ds.shape[0]
        start, stop = max(0, int(start)), min(n, int(stop))
        sums = self._sums(name)
        strings = _is_str(ds)
        try:
            if sums is None:
                return np.asarray(_read(ds, slice(start, stop)))
            b = int(sums.get("rows") or 0)
            if b <= 0 or len(sums["sha256"]) != -(-n // b):
                raise self.error(f"{self.path}: dataset '{name}' has {n} rows, not what its checksums cover "
                                 f"(damaged or edited); {self.hint}.")
            lo, hi = (start // b) * b, min(n, -(-stop // b) * b) if stop > start else start
            block = np.asarray(_read(ds, slice(lo, hi)))
        except self.error:
            raise
        except H5_ERRORS as exc:
            raise self.error(f"{self.path}: dataset '{name}' is damaged ({_short(exc)}); {self.hint}.") from exc
        for s in range(lo, hi, b):
            k = s // b
            if (name, k) in self._ok:
                continue
            if block_digest(block[s - lo : s - lo + b], strings) != sums["sha256"][k]:
                raise self.error(f"{self.path}: dataset '{name}' rows {s}..{min(s + b, n) - 1} do not match their "
                                 f"checksum (the file is damaged); {self.hint}.")
            self._ok.add((name, k))
        return block[start - lo : stop - lo]

    def take(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (increasing) of a dataset, each covering row block verified once."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            return np.asarray(self.rows(name, 0, 0))
        sums = self._sums(name)
        if sums is None:
            try:
                return np.asarray(_read(self._ds(name), idx))
            except H5_ERRORS as exc:
                raise self.error(f"{self.path}: dataset '{name}' is damaged ({_short(exc)}); {self.hint}.") from exc
        b = max(int(sums.get("rows") or 1), 1)
        parts = []
        for k in np.unique(idx // b):
            sel = idx[(idx // b) == k]
            block = self.rows(name, int(k * b), int(k * b + b))
            parts.append(block[sel - k * b])
        return np.concatenate(parts)

    def verify_all(self, skip: Iterable[str] = ()) -> list[str]:
        """Every dataset (but ``skip``, which the caller reads itself through :meth:`rows`) and the attributes
        checked; the problems found (``cache verify``)."""
        import h5py

        problems = []
        try:
            self.check_attrs()
        except self.error as exc:
            problems.append(str(exc))
        for name in list(self.fh):
            if name in skip or not isinstance(self.fh[name], h5py.Dataset):
                continue
            if self.sealed and name not in self.doc:
                problems.append(f"{self.path}: dataset '{name}' has no checksum")
                continue
            try:
                ds = self.fh[name]
                if ds.ndim == 0:
                    self.read(name)
                else:
                    b = max(int((self.doc.get(name) or {}).get("rows") or _block_rows(ds)), 1)
                    for s in range(0, ds.shape[0], b):
                        self.rows(name, s, s + b)
            except self.error as exc:
                problems.append(str(exc))
        return problems
