"""``cli.py pack``: a table's tiles in a few large tar files (WebDataset layout), read without unpacking.

A cluster reads a handful of large files sequentially far faster than millions
of small ones (why peers tell users to copy tiles to local SSD first).  Each
pack ``<table>-NNNNNN.tar`` holds up to ``tiles_per_pack`` tiles as members
``<key>.<ext>`` (``key`` = the ID with dots replaced, as WebDataset groups by
the name before the first dot), stored uncompressed.  The packed table
``<out>/<table>.csv`` keeps every column and rewrites ``path`` to
``<pack>#<member>`` plus ``pack_offset``/``pack_size`` (the member's byte
range), so ``embed`` reads a tile with one seek and one read.  Its rows hash
to the same content digests as the loose tiles, and its name is the
original's, so it uses (and fills) the same cache.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pandas as pd

from core.atomic import atomic_path
from core.errors import ImageError, TableError, UsageError
from core.integrity import read_regular
from featurize.tables.table import read_table, write_csv_atomic


def _member_keys(ids) -> list[str]:
    keys, seen = [], set()
    for i in ids:
        k = str(i).replace(".", "_").replace("/", "_")
        base, n = k, 1
        while k in seen:
            k, n = f"{base}_{n}", n + 1
        seen.add(k)
        keys.append(k)
    return keys


def pack_table(data: str | os.PathLike, out_dir: str | os.PathLike, tiles_per_pack: int = 10_000) -> Path:
    """Write the packs and the packed table; returns the packed table's path."""
    if tiles_per_pack < 1:
        raise UsageError(f"--tiles-per-pack {tiles_per_pack}: must be at least 1.")
    table = read_table(data)
    if table.packed is not None:
        raise TableError(f"{table.source}: is already packed.")
    src = Path(table.source)
    out = Path(out_dir)
    if out.resolve() == src.parent.resolve():
        raise UsageError(f"--out {out}: the packed table keeps the name {src.name}; write it to another folder.")
    out.mkdir(parents=True, exist_ok=True)
    df = pd.read_parquet(src) if src.suffix.lower() in (".parquet", ".pq") else pd.read_csv(src, dtype={"ID": str, "path": str}, low_memory=False)
    keys = _member_keys(table.ids)
    paths, offsets, sizes = [], [], []
    for start in range(0, len(table), tiles_per_pack):
        name = f"{table.name}-{start // tiles_per_pack:06d}.tar"
        members = []
        with atomic_path(out / name) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for i in range(start, min(start + tiles_per_pack, len(table))):
                    data_bytes = read_regular(table.paths[i], ImageError)[0]
                    member = f"{keys[i]}{Path(table.paths[i]).suffix.lower() or '.img'}"
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(data_bytes), 0, 0o644
                    tar.addfile(info, io.BytesIO(data_bytes))
                    members.append(member)
            with tarfile.open(tmp, "r") as tar:  # byte ranges as a reader sees them (headers vary in length)
                where = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
            for member in members:
                paths.append(f"{name}#{member}")
                offsets.append(where[member][0])
                sizes.append(where[member][1])
    df["path"], df["pack_offset"], df["pack_size"] = paths, offsets, sizes
    return write_csv_atomic(df, out / f"{table.name}.csv")
