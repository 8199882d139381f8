"""The same spots cut again at a multiple of their tile's side: one table per size, for multi-scale models.

A table made by an importer records, in its sidecar, the image each slide's tiles were cut from, its scale
and the tile side in that image's pixels; the table's ``x, y`` are the tile centres in full-resolution pixels.
:func:`scaled_table` cuts a square ``multiple`` times that side around every centre (white outside the image),
resized to the same output size, and writes ``<stem>@<multiple>x.csv`` beside the source: the same rows, IDs,
metadata and targets (byte for byte), new ``path`` values, and a sidecar whose tile sizes are scaled and which
records what it was derived from.  ``run`` uses it for its extra tile sizes, on the training table and on a
test table given to ``predict``, so both are cut by one rule.  A derived table already cut from the same source
table (same rows, same file) at the same multiple is reused as it is.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import TableError

#: Multiples must lie in this range (a tile 16 times its spot is a slide, not a neighbourhood).
MULTIPLE_RANGE = (1.0, 16.0)


def scaled_name(table_path: str | os.PathLike, multiple: float) -> Path:
    """Where the table of ``table_path``'s spots cut at ``multiple`` times their side is written."""
    p = Path(table_path)
    return p.with_name(f"{p.stem}@{multiple:g}x.csv")


def can_rescale(table_path: str | os.PathLike) -> str | None:
    """None when the table's sidecar records the source image of every slide; else why it cannot be cut again."""
    from featurize.tables.table import read_sidecar

    side = read_sidecar(table_path)
    if side is None:
        return (f"{table_path} has no importer sidecar ({Path(table_path).with_suffix('.json').name}) recording "
                "its source images (a table of pre-cut tiles)")
    for name, rep in (side.get("slides") or {}).items():
        if rep.get("pre_cut") or not rep.get("image") or not rep.get("tile_px"):
            return f"{table_path}: slide {name}'s tiles were not cut by hexpress from a recorded image"
        if not Path(rep["image"]).is_file():
            return f"{table_path}: slide {name}'s source image {rep['image']} is not there any more"
    if not side.get("slides"):
        return f"{table_path}: its sidecar records no slide images"
    return None


def _source_key(table_path: Path, multiple: float, out_px: int) -> str:
    from core.integrity import file_sha256

    return hashlib.sha256(json.dumps({"table": file_sha256(table_path), "multiple": float(multiple),
                                      "out_px": int(out_px), "rule": 1}, sort_keys=True).encode()).hexdigest()[:16]


def scaled_table(table_path: str | os.PathLike, multiple: float, *, log=None) -> Path:
    """Cut the spots of ``table_path`` at ``multiple`` times their tile side; returns the new table's path."""
    import pandas as pd

    from featurize.importers.common import Slide, cut_tiles
    from featurize.tables.table import read_sidecar, write_table

    src = Path(table_path)
    if not (isinstance(multiple, (int, float)) and math.isfinite(multiple)
            and MULTIPLE_RANGE[0] <= multiple <= MULTIPLE_RANGE[1]):
        raise TableError(f"tile multiple {multiple}: give a number from {MULTIPLE_RANGE[0]:g} to "
                         f"{MULTIPLE_RANGE[1]:g} (2 = twice the spot's tile side).")
    if multiple == 1.0:
        raise TableError(f"tile multiple 1: that is {src} itself.")
    why = can_rescale(src)
    if why:
        raise TableError(f"{why}, so its spots cannot be cut at {multiple:g}x; re-import it with `tiles` from the "
                         "source images, or use a recipe without extra tile sizes.")
    side = read_sidecar(src)
    out_px = int(side.get("out_px") or 224)
    dest = scaled_name(src, multiple)
    key = _source_key(src, multiple, out_px)
    old = read_sidecar(dest) if dest.is_file() else None
    if old and (old.get("derived") or {}).get("key") == key:
        frame = pd.read_csv(dest, usecols=["path"], dtype=str)
        if all((dest.parent / p).is_file() for p in frame["path"]):
            return dest
    reader = pd.read_parquet if src.suffix.lower() == ".parquet" else \
        (lambda p: pd.read_csv(p, dtype={"ID": str, "path": str, "slide": str, "patient": str},
                               float_precision="round_trip"))
    df = reader(src)
    for col in ("ID", "slide", "x", "y"):
        if col not in df.columns:
            raise TableError(f"{src}: has no '{col}' column, so its tiles cannot be cut again around their centres.")
    new_side = copy.deepcopy(side)
    paths = np.empty(len(df), dtype=object)
    for name, rep in side["slides"].items():
        rows = np.flatnonzero(df["slide"].astype(str).to_numpy() == name)
        if not len(rows):
            continue
        ids = df["ID"].astype(str).to_numpy()[rows]
        keys = [i[len(name) + 1:] if i.startswith(f"{name}_") else i for i in ids]
        centers = df[["x", "y"]].to_numpy(dtype=np.float64)[rows]
        slide = Slide(name=name, patient=None, keys=keys, centers=centers, counts=None, image=Path(rep["image"]),
                      tile_px=float(rep["tile_px"]) * multiple, image_scale=float(rep.get("image_scale", 1.0)))
        if log:
            log(f"[tiles] {name}: {len(rows)} tiles at {multiple:g}x ({slide.tile_px:.0f} px)")
        cut, padded = cut_tiles(slide, src.parent, out_px, owner=dest.name)
        paths[rows] = cut
        r = new_side["slides"][name]
        r["tile_px"] = slide.tile_px
        r["tiles_padded_at_border"] = padded
        if r.get("tile_um"):
            r["tile_um"] = float(r["tile_um"]) * multiple
    if any(p is None for p in paths):
        raise TableError(f"{src}: some rows belong to no slide its sidecar records; re-import the table.")
    df["path"] = paths
    new_side["derived"] = {"from": str(src.resolve()), "multiple": float(multiple), "key": key}
    new_side["n_tiles"] = len(df)
    out = write_table(df, dest, new_side)
    return out


def derived_info(table_path: str | os.PathLike) -> dict[str, Any] | None:
    """What a derived table was cut from (``from``, ``multiple``), or None for a table cut by an importer."""
    from featurize.tables.table import read_sidecar

    side = read_sidecar(table_path)
    return (side or {}).get("derived")
