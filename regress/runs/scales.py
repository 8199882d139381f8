"""Which test tile table each run reads, when a stack's runs learned from tiles of different physical sizes.

A multi-scale stack blends runs fitted on the same spots cut at several sizes (the spot alone, and 2x or 4x
with its surroundings: ``tiles --tile-px``/``--tile-um``, one table per size).  Each run must be fed test
tiles of the size it learned from, or its predictions are silently wrong.  This module owns that rule for
``predict`` and ``predict-slide``: the size a run records (``run.json`` ``tile_um``, from its training
table's importer sidecar) is matched to each test table's (its sidecar, written by ``tiles`` and by
``predict-slide``'s cutter) within :data:`TILE_SIZE_TOLERANCE`.  A single test table that records no size
is taken as it is, as long as the runs do not disagree among themselves.
"""
from __future__ import annotations

import os
from typing import Sequence

from core.errors import RunError, TableError
from featurize.tables.table import read_sidecar, tile_um_of
from featurize.tables.table import TileTable

#: Tiles more than this far (relative) from a run's training tiles' physical size are not its tiles.
TILE_SIZE_TOLERANCE = 0.10


def run_tile_um(run) -> float | None:
    """The tiles' physical side (um) a run was trained on, or None when its table did not record it."""
    v = run.info.get("tile_um")
    return float(v) if v else None


def table_tile_um(path: str | os.PathLike) -> float | None:
    """The physical side (um) of a tile table's tiles, from its sidecar; None for tables made elsewhere."""
    return tile_um_of(read_sidecar(path))


def same_size(a: float, b: float) -> bool:
    """Whether two tile sides agree within :data:`TILE_SIZE_TOLERANCE`."""
    return abs(a / b - 1.0) <= TILE_SIZE_TOLERANCE


def distinct_sizes(sizes: Sequence[float | None]) -> list[float]:
    """The different known sizes among ``sizes`` (within the tolerance), smallest first."""
    out: list[float] = []
    for s in sorted(s for s in sizes if s):
        if not out or not same_size(s, out[-1]):
            out.append(s)
    return out


def assign_tables(runs: Sequence, tables: Sequence[TileTable], force: bool = False) -> list[TileTable]:
    """For each run, the test table of its tile size; refuses (naming run and table) when none fits.

    ``force`` (``predict-slide --force``): a single table is taken whatever the size its tiles record."""
    wanted = [run_tile_um(r) for r in runs]
    if len(tables) == 1:
        t = tables[0]
        size = table_tile_um(t.source)
        for r, want in zip(runs, wanted):
            if want and size and not same_size(want, size) and not force:
                raise TableError(f"{t.source}: its tiles are {size:g} um but {r.path} was trained on {want:g} um tiles; "
                                 f"cut the test spots at that size too (`tiles --tile-um {want:g}`) and pass one "
                                 "--data table per tile size.")
        sizes = distinct_sizes(wanted)
        if len(sizes) > 1:
            raise TableError(f"{t.source}: the runs were trained on tiles of {' and '.join(f'{s:g}' for s in sizes)} "
                             "um; pass one --data table per tile size, each cut by `tiles` (which records its size).")
        return [t] * len(runs)
    sizes = []
    for t in tables:
        s = table_tile_um(t.source)
        if s is None:
            raise TableError(f"{t.source}: records no tile size (no sidecar from `tiles` beside it); with several "
                             "--data tables each must be cut by `tiles`, so that each run gets its own tile size.")
        for other, o in zip(tables, sizes):
            if same_size(s, o):
                raise TableError(f"{t.source}: holds {s:g} um tiles like {other.source}; pass one --data table per "
                                 "tile size.")
        sizes.append(s)
    out = []
    for r, want in zip(runs, wanted):
        if want is None:
            raise RunError(f"{r.path}: records no tile size (its training table was not cut by `tiles`), so it cannot "
                           "be matched to one of several --data tables; pass the one table it needs.")
        best = min(range(len(tables)), key=lambda i: abs(sizes[i] / want - 1.0))
        if not same_size(sizes[best], want):
            raise TableError(f"{r.path}: trained on {want:g} um tiles, but the --data tables hold "
                             f"{', '.join(f'{s:g}' for s in sizes)} um tiles; cut the test spots at {want:g} um too "
                             f"(`tiles --tile-um {want:g}`).")
        out.append(tables[best])
    return out
