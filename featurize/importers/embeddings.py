"""Embeddings extracted by other tools (TRIDENT, CLAM, HEST benchmark) as a hexpress cache.

What the tools really write (checked against files made by their own writer
functions, ``../shared/data/formats``):

* **TRIDENT** ``save_h5``: ``features`` (N, D) float32 and ``coords`` (N, 2)
  int64, the patch's *top-left corner in level-0 pixels*, with attributes
  ``patch_size_level0``, ``patch_size``, magnifications; one file per slide.
* **CLAM** ``save_hdf5``: ``features`` (N, D) float32 and ``coords`` (N, 2)
  int32, top-left, level 0, *no attributes*: the patch size lives in CLAM's
  patch file, so it must be given (``patch_size_level0``).  CLAM also writes
  ``pt_files/<slide>.pt`` (a bare (N, D) tensor) beside ``h5_files/<slide>.h5``.
* **HEST benchmark** ``save_hdf5``: ``embeddings`` (N, D) float16,
  ``barcodes`` (N, 1) bytes, ``coords`` top-left; one file per sample.

Rows are matched to the tile table by barcode (``<prefix><barcode>`` = table
ID; the prefix defaults to ``<slide>_``, the importers' ID convention) or, for
files without barcodes, by geometry: the patch centre (corner + patch size /
2) nearest to the table's tile centre (x, y, full-resolution pixels, same
slide), within ``tolerance`` x the patch size.  A directory of per-slide files
maps ``<slide>.h5`` to the table's ``slide`` column.  Unmatched and ambiguous
rows are counted in the report stored in the cache (``import_report``); table
rows without an embedding are an error unless ``allow_unmatched`` (they are
then marked invalid in the cache, like skipped tiles).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featurize.models.backbones import BackboneSpec
from featurize.cache import CacheKey, CacheWriter, cache_path
from core.errors import ImportDataError
from featurize.importers.hest import h5_strings
from featurize.tables.table import TileTable
from featurize.models.weights import ResolvedWeights, sha256_file

H5_SUFFIXES = (".h5", ".hdf5")
PT_SUFFIXES = (".pt", ".pth")
DEFAULT_TOLERANCE = 0.25  # of the patch side: how far a patch centre may lie from the tile centre


@dataclass(frozen=True)
class EmbeddingFile:
    """One per-slide file of patch embeddings, read and validated."""

    path: Path
    features: np.ndarray  # (N, D) float32
    barcodes: np.ndarray | None  # (N,) str
    corners: np.ndarray | None  # (N, 2) top-left x, y in level-0 pixels
    patch_size_level0: float | None
    coords_file: Path | None

    @property
    def centres(self) -> np.ndarray:
        return self.corners + self.patch_size_level0 / 2.0


def _features_array(arr: np.ndarray, path: Path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:  # (1, N, D), as some writers batch a slide
        arr = arr[0]
    if arr.ndim == 1:
        raise ImportDataError(f"{path}: holds one slide-level vector of shape {arr.shape}, not one row per patch; "
                              "import the patch-level features (TRIDENT features_<encoder>/, CLAM h5_files/).")
    if arr.ndim != 2:
        raise ImportDataError(f"{path}: features have shape {arr.shape}; expected (patches, dim).")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImportDataError(f"{path}: holds no embeddings (shape {arr.shape}); re-run the extraction for this slide.")
    arr = arr.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(arr).all(1))
    if len(bad):
        raise ImportDataError(f"{path}: {len(bad)} rows hold NaN or inf (first row {bad[0]}); re-extract this slide.")
    return arr


def _patch_size_from_attrs(attrs) -> float | None:
    """Level-0 patch side from TRIDENT (``patch_size_level0``) or CLAM patch-file (``patch_size`` x ``downsample``) attributes."""
    if "patch_size_level0" in attrs:
        return float(np.asarray(attrs["patch_size_level0"]).reshape(-1)[0])
    if "patch_size" in attrs and "downsample" in attrs:
        return float(np.asarray(attrs["patch_size"]).reshape(-1)[0]) * float(np.asarray(attrs["downsample"]).reshape(-1)[0])
    return None


def _read_coords(fh: h5py.File, n: int, path: Path) -> tuple[np.ndarray | None, float | None]:
    if "coords" not in fh:
        return None, None
    c = np.asarray(fh["coords"][()], dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != n or c.shape[1] < 2:
        raise ImportDataError(f"{path}: coords have shape {c.shape}, expected ({n}, 2).")
    return c[:, :2], _patch_size_from_attrs(fh["coords"].attrs)


def _pt_coords_file(path: Path) -> Path | None:
    """The coords ``.h5`` beside a ``.pt`` features file: same folder, or CLAM's ``../h5_files/``."""
    for cand in (path.with_suffix(".h5"), path.parent.parent / "h5_files" / f"{path.stem}.h5"):
        if cand.is_file():
            return cand
    return None


def read_embedding_file(path: str | Path, patch_size_level0: float | None = None) -> EmbeddingFile:
    """Read one TRIDENT / CLAM / HEST embedding file (``.h5``, or ``.pt`` with its coords ``.h5``)."""
    path = Path(path)
    if not path.is_file():
        raise ImportDataError(f"{path}: embedding file not found.")
    barcodes = corners = None
    size = coords_file = None
    try:
        if path.suffix.lower() in PT_SUFFIXES:
            import torch

            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = obj.get("features", obj.get("embeddings"))
            if not isinstance(obj, torch.Tensor):
                raise ImportDataError(f"{path}: holds no feature tensor (expected a (patches, dim) tensor).")
            feats = _features_array(obj.float().numpy(), path)
            coords_file = _pt_coords_file(path)
            if coords_file is not None:
                with h5py.File(coords_file, "r") as fh:
                    corners, size = _read_coords(fh, len(feats), coords_file)
                    if "barcodes" in fh or "barcode" in fh:
                        barcodes = h5_strings(fh["barcodes" if "barcodes" in fh else "barcode"])
        else:
            with h5py.File(path, "r") as fh:
                key = next((k for k in ("features", "embeddings") if k in fh), None)
                if key is None:
                    raise ImportDataError(f"{path}: no 'features' or 'embeddings' dataset (has {sorted(fh)}).")
                feats = _features_array(fh[key][()], path)
                corners, size = _read_coords(fh, len(feats), path)
                bkey = next((k for k in ("barcodes", "barcode") if k in fh), None)
                if bkey is not None:
                    barcodes = h5_strings(fh[bkey])
                coords_file = path if corners is not None else None
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        if isinstance(exc, ImportDataError):
            raise
        raise ImportDataError(f"{path}: not a readable embedding file ({type(exc).__name__}: {exc}).") from exc
    if barcodes is not None and len(barcodes) != len(feats):
        raise ImportDataError(f"{path}: {len(barcodes)} barcodes for {len(feats)} feature rows.")
    if patch_size_level0 is not None and size is not None and abs(size - patch_size_level0) > 1e-6:
        raise ImportDataError(f"{path}: its coords say patch_size_level0 = {size:g} but --patch-size-level0 says "
                              f"{patch_size_level0:g}; drop the flag or fix it.")
    return EmbeddingFile(path, feats, barcodes, corners, patch_size_level0 if size is None else size, coords_file)


def list_embedding_files(source: Path) -> list[Path]:
    """The per-slide files of a directory (``.h5`` preferred over a ``.pt`` of the same slide)."""
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in H5_SUFFIXES + PT_SUFFIXES)
    stems_h5 = {p.stem for p in files if p.suffix.lower() in H5_SUFFIXES}
    files = [p for p in files if p.suffix.lower() in H5_SUFFIXES or p.stem not in stems_h5]
    if not files:
        raise ImportDataError(f"{source}: no .h5 or .pt embedding files in this folder.")
    return files


def _match_barcodes(ef: EmbeddingFile, ids: np.ndarray, rows: np.ndarray, prefix: str) -> tuple[dict[int, int], dict]:
    pos = {f"{prefix}{b}": i for i, b in enumerate(ef.barcodes)}
    got = {int(r): pos[ids[r]] for r in rows if ids[r] in pos}
    return got, {"by": "barcode", "id_prefix": prefix}


def _match_geometry(ef: EmbeddingFile, xy: np.ndarray, rows: np.ndarray, tolerance: float) -> tuple[dict[int, int], dict]:
    from scipy.spatial import cKDTree

    size = ef.patch_size_level0
    radius = tolerance * size
    tree = cKDTree(ef.centres)
    k = min(2, len(ef.features))
    dist, idx = tree.query(xy[rows], k=k)
    dist, idx = dist.reshape(len(rows), k), idx.reshape(len(rows), k)
    claims: dict[int, list[tuple[float, int]]] = {}
    ambiguous = 0
    for r, d, i in zip(rows, dist, idx):
        if d[0] > radius:
            continue
        if k == 2 and d[1] <= radius and d[1] - d[0] < 0.05 * size:
            ambiguous += 1  # two patches equally close: no basis to pick one
            continue
        claims.setdefault(int(i[0]), []).append((float(d[0]), int(r)))
    got: dict[int, int] = {}
    for feat_row, cl in claims.items():
        cl.sort()
        got[cl[0][1]] = feat_row
        ambiguous += len(cl) - 1  # several tiles on one patch: the nearest keeps it
    matched_d = [dd[0] for r, dd in zip(rows, dist) if int(r) in got]
    return got, {"by": "geometry", "patch_size_level0": size, "tolerance": tolerance,
                 "centre": "top-left + patch_size_level0 / 2", "ambiguous": ambiguous,
                 "max_centre_distance_px": float(max(matched_d)) if matched_d else None}


def _source_digest(files: list[Path]) -> str:
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def import_embeddings(source: str | Path, table: TileTable, backbone: str, cache_dir: str | Path = "cache", *,
                      id_prefix: str | None = None, slide: str | None = None, patch_size_level0: float | None = None,
                      tolerance: float = DEFAULT_TOLERANCE, allow_unmatched: bool = False) -> tuple[Path, dict[str, Any]]:
    """Turn one embedding file, or a folder of per-slide files, into a hexpress cache aligned to ``table``.

    Returns the cache path and the matching report (also stored in the cache
    as the ``import_report`` attribute).
    """
    source = Path(source)
    if not 0 < tolerance <= 1:
        raise ImportDataError(f"--tolerance {tolerance}: must be in (0, 1] (a fraction of the patch side).")
    if source.is_dir():
        files = list_embedding_files(source)
        per_slide = True
        known = set(np.asarray(table.slides).astype(str)) if table.slides is not None else None
        if known is not None and not any(f.stem in known for f in files):
            raise ImportDataError(f"{source}: its files ({', '.join(f.name for f in files[:4])}) name no slide of the "
                                  f"table (slides: {', '.join(sorted(known)[:6])}); name them <slide>.h5, or pass one "
                                  "file with --slide NAME.")
    elif source.is_file():
        files, per_slide = [source], False
    else:
        raise ImportDataError(f"{source}: no such embedding file or folder.")
    ids = np.asarray(table.ids).astype(str)
    slides = np.asarray(table.slides).astype(str) if table.slides is not None else None
    n = len(ids)
    out_rows = np.full(n, -1, dtype=np.int64)
    which_file = np.full(n, -1, dtype=np.int64)
    loaded: list[EmbeddingFile] = []
    report: dict[str, Any] = {"source": str(source), "files": {}}
    dim = None
    for f in files:
        ef = read_embedding_file(f, patch_size_level0)
        if dim is not None and ef.features.shape[1] != dim:
            raise ImportDataError(f"{f}: {ef.features.shape[1]}-dim features, but {files[0]} has {dim}; "
                                  "import one encoder's files at a time.")
        dim = ef.features.shape[1]
        name = f.stem if per_slide else slide
        if name is not None and slides is not None:
            rows = np.flatnonzero(slides == name)
        elif name is not None:
            rows = np.flatnonzero(np.char.startswith(ids, f"{name}_"))
        else:
            if slides is not None and len(set(slides)) > 1:
                raise ImportDataError(f"{f}: the table holds {len(set(slides))} slides; say which one this file "
                                      "belongs to with --slide NAME, or pass a folder of <slide>.h5 files.")
            rows = np.arange(n)
        if ef.barcodes is not None:
            prefix = id_prefix if id_prefix is not None else (f"{name}_" if name is not None else "")
            got, how = _match_barcodes(ef, ids, rows, prefix)
        elif ef.corners is not None:
            if table.xy is None:
                raise ImportDataError(f"{f}: has coords but no barcodes, and table {table.source} has no x, y columns "
                                      "to match them against.")
            if ef.patch_size_level0 is None:
                raise ImportDataError(f"{f}: coords are patch top-left corners but the file does not say the patch size "
                                      "(CLAM keeps it in its patch file); pass --patch-size-level0 PIXELS.")
            got, how = _match_geometry(ef, np.asarray(table.xy, float), rows, tolerance)
        else:
            raise ImportDataError(f"{f}: has neither barcodes nor coords (nor a coords .h5 beside it) to align rows.")
        k = len(loaded)
        loaded.append(ef)
        for r, fr in got.items():
            out_rows[r], which_file[r] = fr, k
        report["files"][f.name] = {"slide": name, "rows_in_file": len(ef.features), "table_rows_considered": len(rows),
                                   "matched": len(got), "unmatched_table_rows": int(len(rows) - len(got)),
                                   "unused_file_rows": int(len(ef.features) - len(set(got.values()))), **how}
    missing = np.flatnonzero(out_rows < 0)
    report.update({"table": str(table.source), "table_rows": n, "matched": int(n - len(missing)),
                   "unmatched_table_rows": int(len(missing)), "first_unmatched": ids[missing[:5]].tolist()})
    if len(missing) == n:
        raise ImportDataError(f"{source}: none of the {n} rows of {table.source} matched an embedding "
                              f"(first ID {ids[0]}; per file: "
                              + "; ".join(f"{k}: {v['matched']}/{v['table_rows_considered']} by {v['by']}" for k, v in report["files"].items())
                              + "); check --slide, --id-prefix or the coordinate scale.")
    if len(missing) and not allow_unmatched:
        raise ImportDataError(f"{source}: {len(missing)} of {n} rows of {table.source} have no embedding "
                              f"(first: {ids[missing[:3]].tolist()}); embed those tiles, drop them from the table, "
                              "or pass --allow-unmatched to leave them out of every fit.")
    feats = np.zeros((n, dim), dtype=np.float32)
    for k, ef in enumerate(loaded):
        sel = np.flatnonzero(which_file == k)
        feats[sel] = ef.features[out_rows[sel]]
    valid = out_rows >= 0
    spec = BackboneSpec(name=backbone, architecture=f"external:{source.name}", weights="none", input_size=0,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear", embed_dim=int(dim),
                        notes="imported from external embedding file(s)")
    weights = ResolvedWeights("external-file", str(source.resolve()), _source_digest(files), False)
    params = {"files": [f.name for f in files], "match": sorted({v["by"] for v in report["files"].values()}),
              "id_prefix": id_prefix, "slide": slide, "patch_size_level0": patch_size_level0, "tolerance": tolerance,
              "allow_unmatched": allow_unmatched}
    ckey = CacheKey(table.cache_folder, spec, weights, 1, "float32", params=json.dumps(params, sort_keys=True))
    writer = CacheWriter(cache_path(cache_dir, ckey), ckey, table.ids, spec.embed_dim,
                         extra_attrs={"import_report": json.dumps(report, default=str)})
    writer.open()
    try:
        writer.write(np.arange(n), feats, valid)  # no tile bytes behind imported rows: empty digests
        return writer.finalize(), report
    finally:
        writer.close()
