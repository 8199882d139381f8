"""Embedding past one machine: a table's rows in N shards, each its own cache, merged into the standard cache.

**Rule.**  The table's rows are cut into batches of ``batch_size`` from row 0;
shard ``I`` of ``N`` takes batches ``floor(I*B/N)`` to ``floor((I+1)*B/N)``
(``B`` = number of batches), i.e. a contiguous block of rows starting on a
batch boundary.  Every batch is therefore the very batch a single process
would form, and the merged cache holds the same bytes.

**Files.**  Shard ``I`` of backbone cache ``<name>.h5`` is
``<name>.shard-IIII-of-NNNN.h5`` beside it, written like any cache (partial
file renamed when complete, resumable, its own lock) with attributes
``shard_index``, ``shard_count``, ``shard_start``, ``shard_stop``,
``table_rows``, ``table_row_fingerprint`` and ``batch_size``.

**Merge** (``cache merge``, or automatically when the last shard finishes):
every shard present once, complete, of the same key, table and batch size,
covering the rows in order, with finite features; anything else is refused
naming the shard.  The merged file is written through :class:`CacheWriter`,
so it is the file a single process writes (ids, paths, digests, stats,
features, valid, attributes other than timing); the shard files are then
deleted (``keep_shards`` keeps them).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from featurize.cache import CacheWriter, lock_path, partial_path
from core.errors import CacheError, UsageError
from core.faults import point as fault
from core.integrity import CHECKSUMS, H5_ERRORS, Sealed, open_h5
from core.lock import file_lock

_SHARD = re.compile(r"^(?P<stem>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.h5$")
SHARD_ATTRS = ("shard_index", "shard_count", "shard_start", "shard_stop", "table_rows", "table_row_fingerprint",
               "batch_size")
_TIMING = ("created", "completed")


def parse_shard(value: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UsageError(f"--shard {value}: write I/N with 0 <= I < N, e.g. --shard 0/4 (SLURM: "
                         "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).")
    return int(m.group(1)), int(m.group(2))


def shard_rows(n_rows: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``index`` of ``count`` (see the module docstring)."""
    batches = -(-n_rows // batch_size)
    b0, b1 = (index * batches) // count, ((index + 1) * batches) // count
    return min(b0 * batch_size, n_rows), min(b1 * batch_size, n_rows)


def shard_path(final: Path, index: int, count: int) -> Path:
    return final.with_name(f"{final.stem}.shard-{index:04d}-of-{count:04d}.h5")


def final_of(path: str | Path) -> Path:
    """The standard cache a shard file belongs to (a standard cache path is returned as it is)."""
    path = Path(path)
    m = _SHARD.match(path.name)
    return path.with_name(f"{m.group('stem')}.h5") if m else path


def shard_files(final: Path) -> dict[tuple[int, int], Path]:
    """(index, count) -> path of every complete-looking shard file of ``final``."""
    out = {}
    for p in Path(final).parent.glob(f"{Path(final).stem}.shard-*-of-*.h5"):
        m = _SHARD.match(p.name)
        if m:
            out[(int(m.group("i")), int(m.group("n")))] = p
    return out


def ready_to_merge(final: Path) -> bool:
    """True when every shard of one count is present and complete (no partial file left)."""
    files = shard_files(final)
    counts = {n for _, n in files}
    if len(counts) != 1:
        return False
    n = counts.pop()
    return all((i, n) in files and not partial_path(files[(i, n)]).exists() for i in range(n))


def merge_shards(final: Path, table=None, keep_shards: bool = False, wait_s: float = 0.0,
                 unless_done: bool = False) -> Path:
    """Check the shards of ``final`` and write ``final`` from them (see the module docstring), under the
    cache's lock, so a merge never races ``embed`` or another merge on the same partial file.

    The shard files are deleted once the merged file is complete (they would double the storage),
    unless ``keep_shards``.  ``unless_done``: return an existing ``final`` as it is (the last shard's embed).
    """
    final = Path(final)
    with file_lock(lock_path(final), wait_s):
        if unless_done and final.exists():
            return final
        return _merge(final, table, keep_shards)


def _merge(final: Path, table, keep_shards: bool) -> Path:
    files = shard_files(final)
    if not files:
        raise CacheError(f"{final}: no shard files ({final.stem}.shard-*-of-*.h5) to merge; run embed --shard I/N first.")
    counts = sorted({n for _, n in files})
    if len(counts) > 1:
        raise CacheError(f"{final.parent}: shards of different counts ({', '.join(map(str, counts))}) for {final.name}; "
                         "delete the stray ones and merge one set.")
    n = counts[0]
    missing = [i for i in range(n) if (i, n) not in files]
    if missing:
        part = [i for i in missing if partial_path(shard_path(final, i, n)).exists()]
        what = f"shard {missing[0]} of {n} is " + ("incomplete (only its .partial file exists)" if missing[0] in part else "missing")
        raise CacheError(f"{final}: {what}; run `embed --shard {missing[0]}/{n}` (it resumes) and merge again.")
    metas = []
    ids, paths, digests, stats = [], [], [], []
    dim = None
    for i in range(n):
        p = files[(i, n)]
        hint = f"delete it and rerun `embed --shard {i}/{n}`"
        try:
            with open_h5(p, CacheError, "shard", hint) as fh:
                r = Sealed(fh, p, CacheError, hint)
                r.check_attrs()
                a = {k: (v.item() if hasattr(v, "item") else v) for k, v in fh.attrs.items() if k != CHECKSUMS}
                bad = sum(int((~np.isfinite(r.rows("features", s, s + 4096))).any(axis=1).sum())
                          for s in range(0, fh["features"].shape[0], 4096))
                ids.extend(r.read("ids"))
                paths.extend(r.read("paths"))
                digests.extend(d.decode() for d in r.read("digests"))
                stats.append(r.read("stats"))
                dim = fh["features"].shape[1]
        except H5_ERRORS as exc:
            raise CacheError(f"{p}: damaged shard ({exc}); {hint}.") from exc
        if not a.get("complete"):
            raise CacheError(f"{p}: shard is incomplete; rerun `embed --shard {i}/{n}` to finish it.")
        if bad:
            raise CacheError(f"{p}: {bad} rows hold NaN or inf; rerun that shard with --dtype float32.")
        metas.append((p, a))
    p0, a0 = metas[0]
    for p, a in metas:
        for k in ("fingerprint", "table_rows", "table_row_fingerprint", "batch_size", "shard_count"):
            if a.get(k) != a0.get(k):
                raise CacheError(f"{p}: its {k} differs from {p0.name}'s; it belongs to another table, backbone "
                                 "setting or sharding: delete it and rerun that shard.")
    if table is not None and a0["table_row_fingerprint"] != table.fingerprint():
        raise CacheError(f"{p0}: the shards were cut from another version of {table.source}; re-embed the shards.")
    edges = [(a["shard_index"], a["shard_start"], a["shard_stop"]) for _, a in metas]
    if [e[0] for e in edges] != list(range(n)) or edges[0][1] != 0 or edges[-1][2] != a0["table_rows"] or \
            any(edges[k][2] != edges[k + 1][1] for k in range(n - 1)):
        raise CacheError(f"{final}: the shards do not cover the table's {a0['table_rows']} rows in order; re-embed them.")
    attrs = {k: v for k, v in a0.items() if k not in SHARD_ATTRS + _TIMING + ("rows_done", "complete", "table_fingerprint")}
    stats_all = np.concatenate(stats)
    writer = CacheWriter(final, None, np.asarray(ids), dim, paths=paths, attrs=attrs)
    writer.open()
    try:
        start = 0
        for p, _ in metas:
            with open_h5(p, CacheError, "shard", "rerun its embed --shard") as fh:
                r = Sealed(fh, p, CacheError, "rerun its embed --shard")
                rows = fh["features"].shape[0]
                for s in range(0, rows, 4096):
                    e = min(s + 4096, rows)
                    writer.write(np.arange(start + s, start + e), r.rows("features", s, e), r.rows("valid", s, e),
                                 digests[start + s:start + e], stats_all[start + s:start + e])
                    fault("merge-mid")
            start += rows
        out = writer.finalize()
    finally:
        writer.close()
    if not keep_shards:
        for p, _ in metas:
            for extra in (p, p.with_name(p.name + ".lock"), p.with_name(p.name + ".skipped.txt")):
                if extra.exists():
                    extra.unlink()
    return out
