"""Assemble what a head is fitted on: a table's targets and its caches' features, aligned by ID."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from featurize.cache import load_features, require_cache_files
from core.errors import TableError, UsageError
from featurize.tables.table import TileTable, index_of, read_table
from regress.post.context import neighbour_features, slide_split


@dataclass
class TrainingData:
    """Features of one or more backbones aligned to a table's targets (rows present in every cache)."""

    table: TileTable
    ids: np.ndarray
    X: np.ndarray
    Y: np.ndarray
    groups: np.ndarray | None
    caches: list[dict[str, Any]]
    xy: np.ndarray | None = None
    slides: np.ndarray | None = None


def cache_info(path, a: dict[str, Any]) -> dict[str, Any]:
    """What a run records of each cache it was fitted on (run.json ``backbones``)."""
    return {"backbone": a["backbone"], "cache": str(path), "fingerprint": a["fingerprint"],
            "table_fingerprint": a.get("table_fingerprint", ""), "random_init": bool(a["random_init"]),
            "weights_sha256": a["weights_sha256"], "weights_source": a["weights_source"],
            "weights_path": a.get("weights_path", ""), "tta": int(a["tta"]), "dtype": a["dtype"],
            "key": json.loads(a["key_json"])}


def load_training_data(data: str | os.PathLike | TileTable, backbones: Sequence[str], cache_dir="cache",
                       cache_files: Sequence[str] | None = None, group_col: str | None = None,
                       context: int = 0, center_slides: bool = False) -> TrainingData:
    """Read the table and the caches, align rows by ID, concatenate backbones,
    append ``context`` nearest-neighbour mean features (0 = none), centre each slide (``center_slides``)."""
    if not backbones and not cache_files:
        raise UsageError("name the features to fit on: --backbone NAME (repeatable) or --cache FILE.")
    if not isinstance(data, TileTable) and not cache_files:
        require_cache_files(data, backbones, cache_dir)  # before reading a large table: say "no cache" at once
    table = data if isinstance(data, TileTable) else read_table(data, group_col=group_col, require_genes=True,
                                                                check_files=False)
    if table.Y is None:
        raise TableError(f"{table.source}: no gene columns; fit needs a training table with one column per gene.")
    feats, infos = [], []
    sources = list(cache_files) if cache_files else list(backbones)
    for src in sources:
        cache = load_features(table, None if cache_files else src, cache_dir, cache_file=src if cache_files else None)
        feats.append(cache)
        infos.append(cache_info(cache.path, cache.attrs))
    # rows present in every cache (tiles skipped with --skip-bad drop out), in table order
    present = set.intersection(*(set(c.ids) for c in feats))
    rows = np.array([i for i, k in enumerate(table.ids) if k in present], dtype=int)
    if len(rows) == 0:
        raise TableError(f"{table.source}: no row of the table has features in every cache; check --backbone/--cache.")
    ids = table.ids[rows]
    X = np.concatenate([c.features[index_of(c.ids, ids)] for c in feats], axis=1)
    xy = table.xy[rows] if table.xy is not None else None
    slides = table.slides[rows] if table.slides is not None else None
    X = neighbour_features(X, xy, slides, context, str(table.source))
    if center_slides:
        if slides is None:
            raise TableError(f"{table.source}: --center-slides needs a slide column (which tiles share a slide).")
        X = slide_split(X, slides)
    groups = table.groups[rows] if table.groups is not None else None
    return TrainingData(table, ids, X, table.Y[rows], groups, infos, xy, slides)
