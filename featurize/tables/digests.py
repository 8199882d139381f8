"""Tile content identity: sha256 of each tile's bytes, checked cheaply by its stat.

A cache stores, per row, the sha256 of the tile bytes that were embedded and
the file's ``(size, mtime_ns)`` at that moment.  A row is *fresh* for a table
row with the same ID when the file's stat is unchanged, or when its stat
changed but its bytes still hash to the stored digest (touched, copied,
re-saved identically).  A tile re-cut to the same byte size is therefore never
taken for the old one, and only rows whose content changed are embedded
again.  Hashing happens in the decode workers from the bytes they read
anyway, so it costs one pass of sha256, not a second read.

Rows imported from other tools' embedding files have no tile bytes (empty
digest): they are fresh whenever the ID is the same.

A tile's *source* is a path, or ``<pack file>@<offset>+<size>`` for a tile
stored inside a pack (:mod:`featurize.tables.pack`): its bytes are read straight from
that range, its stat is the pack file's, and its digest is that of its own
bytes, so a packed table shares the unpacked table's cache rows.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

#: Stored when the tile could not be read (missing file): never equal to a real stat.
NO_STAT = (-1, -1)
DIGEST_DTYPE = "S64"  # hex sha256


_PACKED = re.compile(r"^(?P<path>.+)@(?P<offset>\d+)\+(?P<size>\d+)$")


def packed_source(path: str | os.PathLike, offset: int, size: int) -> str:
    return f"{path}@{int(offset)}+{int(size)}"


def split_source(source: str | os.PathLike) -> tuple[str, int | None, int | None]:
    """(file, offset, size) of a tile source; offset and size are None for a plain file."""
    m = _PACKED.match(str(source))
    if m:
        return m.group("path"), int(m.group("offset")), int(m.group("size"))
    return str(source), None, None


def stat_of(source: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime_ns) of the file holding the tile, or :data:`NO_STAT` when it cannot be statted."""
    try:
        st = os.stat(split_source(source)[0])
    except OSError:
        return NO_STAT
    return int(st.st_size), int(st.st_mtime_ns)


def read_with_digest(source: str | os.PathLike) -> tuple[bytes, str, tuple[int, int]]:
    """The tile's bytes, their sha256 (hex) and the stat of the file they were read from."""
    from core.errors import ImageError
    from core.integrity import read_regular

    path, offset, size = split_source(source)
    data, st = read_regular(path, ImageError, offset, size)  # regular files only, size-capped: never /dev/zero or a FIFO
    if offset is not None and len(data) != size:
        raise OSError(f"{path}: pack is shorter than its table says (tile at {offset}+{size})")
    return data, hashlib.sha256(data).hexdigest(), (int(st.st_size), int(st.st_mtime_ns))


def file_digest(source: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a tile's bytes, streamed for plain files; empty string when it cannot be read."""
    import stat

    from core.errors import ImageError

    path, offset, _ = split_source(source)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return ""  # a FIFO, device or folder is never a tile (and /dev/zero never ends)
    except OSError:
        return ""
    if offset is not None:
        try:
            return read_with_digest(source)[1]
        except (OSError, ImageError):
            return ""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def content_fingerprint(ids: Sequence[str], digests: Sequence[str]) -> str:
    """sha256 over (ID, tile digest) in row order: what a table's tiles are, not where they lie."""
    h = hashlib.sha256()
    for i, d in zip(ids, digests):
        h.update(f"{i}\0{d}\n".encode())
    return h.hexdigest()


@dataclass
class RowPlan:
    """How a cache's rows serve a table: ``source[i]`` is the cache row for table row ``i`` (-1: embed it)."""

    source: np.ndarray  # (n,) int64
    new_stats: dict[int, tuple[int, int]]  # cache row -> refreshed stat (same bytes, new stat)
    changed: list[int]  # table rows whose tile content differs from the cached digest
    new: list[int]  # table rows whose ID is not in the cache
    unverified: int  # rows reused although their tile is missing now (the digest cannot be checked)
    n_cached: int  # rows in the cache

    @property
    def todo(self) -> np.ndarray:
        return np.flatnonzero(self.source < 0)

    def identical(self) -> bool:
        """True when the cache serves the table row for row, in order, with nothing to embed."""
        return len(self.source) == self.n_cached and bool((self.source == np.arange(self.n_cached)).all())


def plan_rows(ids: Sequence[str], paths: Sequence[Path], cached_ids: np.ndarray, cached_digests: np.ndarray,
              cached_stats: np.ndarray, reusable: np.ndarray | None = None) -> RowPlan:
    """Match a table's rows to a cache's rows by ID and content (see module docstring).

    ``reusable`` (bool per cache row, default all) excludes cache rows that
    were never written (a partial file's undone rows).
    """
    pos = {str(k): j for j, k in enumerate(np.asarray(cached_ids).astype(str))}
    digests = [d.decode() if isinstance(d, bytes) else str(d) for d in cached_digests]
    n = len(ids)
    source = np.full(n, -1, dtype=np.int64)
    new_stats: dict[int, tuple[int, int]] = {}
    changed, new = [], []
    unverified = 0
    for i, (key, path) in enumerate(zip(ids, paths)):
        j = pos.get(str(key))
        if j is None or (reusable is not None and not reusable[j]):
            new.append(i)
            continue
        stored = (int(cached_stats[j][0]), int(cached_stats[j][1]))
        if not digests[j]:  # imported rows: no tile bytes behind them
            source[i] = j
            continue
        st = stat_of(path)
        if st == stored:
            source[i] = j
        elif st == NO_STAT:
            source[i] = j
            unverified += 1
        elif file_digest(path) == digests[j]:
            source[i] = j
            new_stats[j] = st
        else:
            changed.append(i)
    return RowPlan(source, new_stats, changed, new, unverified, len(pos))
