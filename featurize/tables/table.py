"""The tile table: the one input contract shared by every stage.

A tile table is a CSV or Parquet file with one row per tile:

* ``ID`` (unique, required) and ``path`` (required; relative to the table's
  folder, or absolute);
* optional metadata: a grouping column (``slide``, ``patient``, ``group``,
  ``section`` or any column named with ``group_col``), ``x``/``y``, ``barcode``;
* every other column is a gene and must be numeric and finite.

The reference layout (``train.csv`` with ``ID,path,<genes...>``, ``test.csv``
with ``ID,path``) is read as is.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from core.atomic import atomic_path
from core.errors import TableError

#: Columns never treated as genes.
META_COLUMNS = ("ID", "path", "slide", "patient", "group", "section", "x", "y", "barcode", "grid_row", "grid_col",
                "pack_offset", "pack_size")
#: Spatial and QC columns that other tools write (Space Ranger, scanpy, HEST, Xenium): never genes, even when numeric.
NOT_GENES = ("in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres", "pxl_row", "pxl_col",
             "imagerow", "imagecol", "x_um", "y_um", "total_counts", "n_counts", "n_genes", "n_genes_by_counts",
             "log1p_total_counts", "log1p_n_genes_by_counts", "total_counts_mt", "pct_counts_mt",
             "pct_counts_in_top_50_genes", "cell_id", "cell_area", "nucleus_area", "transcript_counts", "tile_um")
#: Grouping columns looked for, in this order, when none is named.
GROUP_CANDIDATES = ("patient", "slide", "section", "group")


def cache_folder_name(table_path: str | os.PathLike) -> str:
    """``<stem>-<8 hex of the sha256 of the resolved path>``: a table's own cache folder (:attr:`TileTable.cache_folder`)."""
    src = Path(table_path).expanduser().resolve()
    return f"{src.stem}-{hashlib.sha256(str(src).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class TileTable:
    """A validated tile table; ``Y`` is ``None`` for tables without genes."""

    source: Path
    ids: np.ndarray  # (n,) str
    paths: list[Path]  # resolved absolute paths
    raw_paths: list[str]  # as written in the table
    genes: list[str]
    Y: np.ndarray | None  # (n, g) float32
    groups: np.ndarray | None  # (n,) str
    group_col: str | None
    xy: np.ndarray | None  # (n, 2) float64
    slides: np.ndarray | None = None  # (n,) str: the slide/section column, for spatial neighbours
    packed: np.ndarray | None = None  # (n, 2) int64 byte offset and size inside the pack file at ``paths[i]``
    ignored: tuple[str, ...] = ()  # columns that are neither metadata nor genes (known QC/spatial, or not in the sidecar)
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def sources(self) -> list[str]:
        """Where each tile's bytes are: a path, or ``<pack>@<offset>+<size>`` (:mod:`featurize.tables.digests`)."""
        if self.packed is None:
            return [str(p) for p in self.paths]
        from featurize.tables.digests import packed_source

        return [packed_source(p, o, z) if o >= 0 else str(p) for p, (o, z) in zip(self.paths, self.packed)]

    @property
    def name(self) -> str:
        """Short name of the table: the file stem (run names, slide names)."""
        return self.source.stem

    @property
    def cache_folder(self) -> str:
        """The table's own cache folder name: the stem and 8 hex of the table's resolved path, so two tables named
        alike in different folders never share (and evict) one cache file."""
        return cache_folder_name(self.source)

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """sha256 of the rows (IDs and paths as written, in order), computed once per table object.

        What the tiles *contain* is checked per row against the caches'
        content digests (:mod:`featurize.tables.digests`), so this never stats a file.
        """
        if "fingerprint" not in self._memo:
            h = hashlib.sha256()
            for i, raw in zip(self.ids, self.raw_paths):
                h.update(f"{i}\0{raw}\n".encode())
            self._memo["fingerprint"] = h.hexdigest()
        return self._memo["fingerprint"]

    def targets_digest(self) -> str:
        """sha256 of the gene names and values (what a run is fitted to)."""
        if "targets" not in self._memo:
            h = hashlib.sha256("\0".join(self.genes).encode())
            if self.Y is not None:
                h.update(np.ascontiguousarray(self.Y, dtype=np.float32).tobytes())
            self._memo["targets"] = h.hexdigest()
        return self._memo["targets"]

    def rows(self, start: int, stop: int) -> "TileTable":
        """The table's rows ``start:stop`` (a shard), same source and name."""
        sl = slice(start, stop)
        opt = lambda a: None if a is None else a[sl]  # noqa: E731
        return TileTable(self.source, self.ids[sl], self.paths[sl], self.raw_paths[sl], self.genes, opt(self.Y),
                         opt(self.groups), self.group_col, opt(self.xy), opt(self.slides), opt(self.packed),
                         self.ignored)

    def memo(self, key, compute):
        """A value computed once per table object (e.g. the freshness check of one cache)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


def _read_frame(path: Path, meta_only: bool = False) -> pd.DataFrame:
    if not path.exists():
        raise TableError(f"{path}: tile table not found; check the --data path.")
    if path.is_dir():
        raise TableError(f"{path}: is a directory; pass the CSV or Parquet tile table inside it.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            usecols = (lambda c: c in META_COLUMNS or c in GROUP_CANDIDATES) if meta_only else None
            df = pd.read_csv(path, dtype={"ID": str, "path": str}, low_memory=False, usecols=usecols)
        if suffix not in (".parquet", ".pq"):
            _refuse_duplicate_header(path)
    except pd.errors.EmptyDataError as exc:
        raise TableError(f"{path}: the table is empty; it needs a header with ID and path columns.") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise TableError(f"{path}: cannot be parsed as {'Parquet' if suffix in ('.parquet', '.pq') else 'CSV'} ({exc}).") from exc
    dup = pd.Index(df.columns).duplicated()
    if dup.any():
        raise TableError(f"{path}: column '{df.columns[int(np.flatnonzero(dup)[0])]}' appears twice in the header; "
                         "every column (gene) needs a unique name.")
    return df


def _refuse_duplicate_header(path: Path) -> None:
    """pandas renames a repeated CSV header ('A', 'A.1'): refuse it instead, naming the column."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = next(csv.reader(fh), [])
    seen: set[str] = set()
    for col in header:
        if col in seen:
            raise TableError(f"{path}: column '{col}' appears twice in the header; every column (gene) needs a "
                             "unique name (pandas would silently rename the second one).")
        seen.add(col)


def read_table(
    path: str | os.PathLike,
    *,
    group_col: str | None = None,
    require_genes: bool = False,
    check_files: bool = True,
    meta_only: bool = False,
) -> TileTable:
    """Read and validate a tile table.

    Raises :class:`TableError` naming the column or row at fault for: a missing
    file, an empty table, missing ``ID``/``path`` columns, duplicate IDs, a
    missing image (when ``check_files``), non-numeric or non-finite gene values,
    or no gene columns when ``require_genes``.
    """
    path = Path(path).expanduser().resolve()
    df = _read_frame(path, meta_only)
    for col in ("ID", "path"):
        if col not in df.columns:
            raise TableError(f"{path}: missing required column '{col}'; a tile table needs ID and path columns.")
    if len(df) == 0:
        raise TableError(f"{path}: the table has a header but no rows.")
    ids = df["ID"].astype(str).to_numpy()
    if df["ID"].isna().any():
        row = int(np.flatnonzero(df["ID"].isna().to_numpy())[0])
        raise TableError(f"{path}: row {row + 2} has an empty ID; every tile needs a unique ID.")
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if dup.any():
        first = np.flatnonzero(dup)[:3]
        raise TableError(
            f"{path}: duplicate ID '{ids[first[0]]}' (rows {', '.join(str(r + 2) for r in first)}); IDs must be unique."
        )
    if df["path"].isna().any():
        row = int(np.flatnonzero(df["path"].isna().to_numpy())[0])
        raise TableError(f"{path}: row {row + 2} (ID {ids[row]}) has an empty path.")
    raw_paths = df["path"].astype(str).tolist()
    base = path.parent
    packed = None
    if "pack_offset" in df.columns and "pack_size" in df.columns:  # tiles inside pack files (cli.py pack)
        off = pd.to_numeric(df["pack_offset"], errors="coerce").fillna(-1).to_numpy(np.int64)
        size = pd.to_numeric(df["pack_size"], errors="coerce").fillna(-1).to_numpy(np.int64)
        packed = np.stack([off, size], axis=1)
        files = [p.split("#", 1)[0] if o >= 0 else p for p, o in zip(raw_paths, off)]
    else:
        files = raw_paths
    paths = [Path(p) if os.path.isabs(p) else (base / p) for p in files]
    paths = [Path(os.path.normpath(p)) for p in paths]
    if check_files:
        for row, p in enumerate(paths):
            if not p.exists():
                raise TableError(
                    f"{path}: row {row + 2} (ID {ids[row]}) points to {p}, which does not exist; "
                    "fix the path (relative paths are read from the table's folder)."
                )

    if group_col is not None and group_col not in df.columns:
        raise TableError(f"{path}: --groups column '{group_col}' is not in the table (columns: {', '.join(map(str, df.columns[:8]))}...).")
    if group_col is None:
        group_col = next((c for c in GROUP_CANDIDATES if c in df.columns), None)
    groups = df[group_col].astype(str).to_numpy() if group_col else None

    xy = None
    if "x" in df.columns and "y" in df.columns:
        xy = df[["x", "y"]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(xy) & df[["x", "y"]].notna().to_numpy()
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise TableError(f"{path}: column '{'xy'[c]}' row {r + 2} (ID {ids[r]}) holds text "
                             f"'{df[['x', 'y']].iat[r, c]}'; x and y are tile centres in pixels (numbers).")
    slide_col = next((c for c in ("slide", "section") if c in df.columns), None)
    slides = df[slide_col].astype(str).to_numpy() if slide_col else None

    meta = set(META_COLUMNS) | ({group_col} if group_col else set())
    listed = _sidecar_genes(path)
    if listed is not None:  # an importer's table: its genes are what the sidecar lists, nothing else
        absent = [g for g in listed if g not in df.columns]
        if absent:
            raise TableError(f"{path}: its sidecar lists gene '{absent[0]}' (and {len(absent) - 1} more) that the table "
                             "lacks; re-import the table, or delete the sidecar if the table was edited by hand.")
        gene_cols = [c for c in df.columns if c in set(listed)]
    else:
        gene_cols = [c for c in df.columns if c not in meta and c not in NOT_GENES]
    ignored = tuple(str(c) for c in df.columns if c not in meta and c not in set(gene_cols))
    Y = None
    if gene_cols:
        Y = _gene_matrix(path, df, gene_cols, ids)
    elif require_genes:
        raise TableError(f"{path}: no gene columns; a training table needs one numeric column per gene besides ID and path.")
    return TileTable(
        source=path,
        ids=ids,
        paths=paths,
        raw_paths=raw_paths,
        genes=[str(c) for c in gene_cols],
        Y=Y,
        groups=groups,
        group_col=group_col,
        xy=xy,
        slides=slides,
        packed=packed,
        ignored=ignored,
    )


# -- the sidecar: what an importer (or predict-slide's cut) recorded about the table, beside it ------------------
def sidecar_path(table_path: str | os.PathLike) -> Path:
    """``<name>.json`` beside the table ``<name>.csv``."""
    return Path(table_path).with_suffix(".json")


def read_sidecar(table_path: str | os.PathLike) -> dict[str, Any] | None:
    """The importer's sidecar beside a tile table (``<name>.json``), or None for tables made elsewhere."""
    side = sidecar_path(table_path)
    if not side.is_file():
        return None
    try:
        doc = json.loads(side.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise TableError(f"{side}: the importer's sidecar of {Path(table_path).name} is unreadable ({str(exc)[:80]}), "
                         "so the tiles' physical size cannot be checked; re-import the table (or delete the sidecar "
                         "if the table was not made by hexpress).") from exc
    return doc if isinstance(doc, dict) and doc.get("table") == Path(table_path).name else None


def slide_images_of(sidecar: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per slide, the image its tiles were cut from and its scale (image pixels per full-resolution pixel)."""
    out = {}
    for name, rep in ((sidecar or {}).get("slides") or {}).items():
        if rep.get("image"):
            out[name] = {"path": rep["image"], "scale": float(rep.get("image_scale", 1.0))}
    return out


def tile_um_of(sidecar: dict[str, Any] | None) -> float | None:
    """The tiles' physical side (um) an importer recorded: the median over slides, or None."""
    if not sidecar:
        return None
    vals = [s.get("tile_um") for s in sidecar.get("slides", {}).values() if s.get("tile_um")]
    return float(np.median(vals)) if vals else None


def write_table(df: pd.DataFrame, table_path: str | os.PathLike, sidecar: dict) -> Path:
    """The table contract's one writer: the old table goes first (a kill from here on leaves no table that looks
    complete beside a new sidecar), then the sidecar and the table, each written atomically."""
    from core.faults import point

    final = Path(table_path)
    if final.exists():
        final.unlink()
    with atomic_path(sidecar_path(final)) as tmp:
        tmp.write_text(json.dumps({**sidecar, "table": final.name}, indent=2, default=str))
    point("table-between-sidecar-and-table")
    return write_csv_atomic(df, final)


def _sidecar_genes(path: Path) -> list[str] | None:
    """The gene columns an importer's sidecar lists for the table at ``path`` (None: not listed, a hand-made table)."""
    if not sidecar_path(path).is_file():
        return None
    doc = read_sidecar(path)
    cols = doc.get("gene_columns") if doc else None
    return [str(c) for c in cols] if isinstance(cols, list) else None


def _gene_matrix(path: Path, df: pd.DataFrame, gene_cols: list, ids: np.ndarray) -> np.ndarray:
    """Gene columns as float32, refusing text, NaN and inf with the cell named."""
    block = df[gene_cols]
    for c in gene_cols:
        kind = block[c].dtype.kind
        if kind in "bMmcV" or isinstance(block[c].dtype, pd.CategoricalDtype):
            what = {"b": "true/false", "M": "dates", "m": "durations", "c": "complex numbers"}.get(kind, str(block[c].dtype))
            raise TableError(f"{path}: column '{c}' holds {what}, not gene values; drop it from the table or rename it "
                             f"to one of the metadata columns ({', '.join(META_COLUMNS)}).")
    numeric = block.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & block.notna()
    if bad.to_numpy().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        raise TableError(
            f"{path}: gene column '{gene_cols[c]}' row {r + 2} (ID {ids[r]}) holds non-numeric text "
            f"'{block.iat[r, c]}'; gene columns must be numbers (rename metadata columns to one of {', '.join(META_COLUMNS)})."
        )
    Y = numeric.to_numpy(dtype=np.float64)
    nonfinite = ~np.isfinite(Y)
    if nonfinite.any():
        r, c = np.argwhere(nonfinite)[0]
        raise TableError(
            f"{path}: gene column '{gene_cols[c]}' row {r + 2} (ID {ids[r]}) is {Y[r, c]}; "
            "targets must be finite numbers (fill or drop that row)."
        )
    big = np.abs(Y) > np.finfo(np.float32).max
    if big.any():
        r, c = np.argwhere(big)[0]
        raise TableError(f"{path}: gene column '{gene_cols[c]}' row {r + 2} (ID {ids[r]}) is {Y[r, c]:g}, beyond what "
                         "float32 holds (3.4e38); hexpress fits float32 targets: rescale or log-transform that gene.")
    return Y.astype(np.float32)


def index_of(haystack: Sequence[str], needles: Sequence[str]) -> np.ndarray:
    """Positions of ``needles`` in ``haystack`` (IDs; every needle must be present)."""
    pos = {k: i for i, k in enumerate(haystack)}
    return np.array([pos[k] for k in needles], dtype=int)


def write_csv_atomic(df: pd.DataFrame, out: str | os.PathLike, **to_csv) -> Path:
    """Write ``df`` to a temporary name beside ``out`` and rename it into place when
    complete: a half-written CSV never carries the final name."""
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False, **to_csv)
    return Path(out)
