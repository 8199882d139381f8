"""10x Visium and Visium HD Space Ranger output folders.

Reads, from a Space Ranger ``outs`` folder (or, for Visium HD, one of its
``binned_outputs/square_NNNum`` folders, chosen with ``bin_size_um``):

* ``filtered_feature_bc_matrix.h5`` (10x HDF5, CSC with features as rows).
  Only ``Gene Expression`` features are kept by default (as scanpy does):
  CytAssist Gene + Protein matrices also hold ``Antibody Capture`` rows, which
  are not genes and must not enter library sizes.  Duplicate gene symbols are
  made unique (``SYMBOL``, ``SYMBOL-1``, ...) and counted in the sidecar.
* tissue positions in any form Space Ranger (or the wild) writes:
  ``tissue_positions.csv`` (headed, Space Ranger >= 2),
  ``tissue_positions_list.csv`` (headerless, older; a headed copy is also
  accepted) or ``tissue_positions.parquet`` (Space Ranger 3, Visium HD).
* ``scalefactors_json.json``.

**Pixel size.**  ``spot_diameter_fullres`` is, per 10x, the pixels spanning a
*theoretical 65 um* spot, not the 55 um capture area, so it is only recorded
for comparison.  For Visium the pixel size is fitted from the array positions
(an affine fit of pixel position on ``array_col``/``array_row``) against the
known geometry: neighbouring spots in a row are 2 columns and 100 um apart,
rows are 100*sqrt(3)/2 um apart.  For Visium HD, ``microns_per_pixel`` from the
scale factors is used.  The method is written in the sidecar.

Table coordinates are always tile centres in full-resolution pixels; when
tiles are cut from the bundled ``hires``/``lowres`` image, the scale factor is
applied only for cutting and recorded in the sidecar.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd
from scipy import sparse

from core.errors import ImportDataError
from featurize.importers.common import Slide, build_table, match_spots, tile_size_px

VISIUM_SPOT_UM = 55.0  # the capture spot: the default tile side
VISIUM_PITCH_UM = 100.0  # centre-to-centre distance of neighbouring spots
GENE_EXPRESSION = "Gene Expression"
_POS_COLS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def make_unique(names: Sequence[str]) -> tuple[list[str], int]:
    """scanpy-style unique names: the first keeps its name, later ones get ``-1``, ``-2``...; returns (names, n renamed)."""
    seen: dict[str, int] = {}
    taken = set(names)
    out, renamed = [], 0
    for n in names:
        if n not in seen:
            seen[n] = 0
            out.append(n)
            continue
        k = seen[n]
        while True:
            k += 1
            cand = f"{n}-{k}"
            if cand not in taken:
                break
        seen[n] = k
        taken.add(cand)
        out.append(cand)
        renamed += 1
    return out, renamed


def read_10x_h5(path: str | Path, min_spots: float = 0.0, feature_types: Sequence[str] | None = (GENE_EXPRESSION,),
                report: dict[str, Any] | None = None) -> pd.DataFrame:
    """Barcodes x features counts (float32) from a 10x HDF5 matrix.

    ``feature_types`` keeps only those feature types (``None``: all);
    features seen in fewer than ``min_spots`` of the spots are dropped.  What
    was kept, dropped and renamed goes into ``report`` when given.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as fh:
            g = fh["matrix"]
            shape = tuple(int(s) for s in g["shape"][()])
            mat = sparse.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=shape)
            barcodes = g["barcodes"].asstr()[()]
            feats = g["features"] if "features" in g else None
            if feats is None:  # Cell Ranger 2 layout: genes/gene_names
                ids = g["genes"].asstr()[()]
                names = g["gene_names"].asstr()[()] if "gene_names" in g else ids
                types = np.full(len(ids), GENE_EXPRESSION, dtype=object)
            else:
                ids = feats["id"].asstr()[()]
                names = feats["name"].asstr()[()] if "name" in feats else ids
                types = feats["feature_type"].asstr()[()] if "feature_type" in feats else np.full(len(ids), GENE_EXPRESSION, dtype=object)
    except (OSError, KeyError) as exc:
        raise ImportDataError(f"{path}: not a readable 10x feature-barcode HDF5 matrix ({exc}).") from exc
    found = {str(t): int(c) for t, c in zip(*np.unique(types.astype(str), return_counts=True))}
    keep_type = np.ones(len(ids), bool) if feature_types is None else np.isin(types.astype(str), list(feature_types))
    if not keep_type.any():
        raise ImportDataError(f"{path}: no feature of type {list(feature_types or [])} (found {found}); "
                              "choose the types with --feature-types.")
    spots_by_feats = mat.T.tocsr()
    frac = np.asarray((spots_by_feats > 0).mean(0)).ravel()
    keep = np.flatnonzero(keep_type & (frac >= min_spots)) if min_spots > 0 else np.flatnonzero(keep_type)
    unique, renamed = make_unique([str(n) for n in names[keep]])
    if report is not None:
        report["features"] = {"types_found": found, "types_kept": list(feature_types) if feature_types else "all",
                              "dropped_other_types": int((~keep_type).sum()), "duplicate_symbols_made_unique": renamed,
                              "first_renamed": [u for u, n in zip(unique, names[keep]) if u != n][:5]}
    dense = spots_by_feats[:, keep].toarray().astype(np.float32)
    return pd.DataFrame(dense, index=pd.Index(barcodes, dtype=str), columns=pd.Index(unique, dtype=str))


def _has_header(path: Path) -> bool:
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        first = fh.readline().split(",")
    return bool(first) and first[0].strip().strip('"').lower() == "barcode"


def read_positions(spatial: Path, in_tissue_only: bool = False) -> tuple[pd.DataFrame, Path]:
    """Tissue positions in any Space Ranger form, indexed by barcode (every spot unless ``in_tissue_only``)."""
    candidates = [spatial / "tissue_positions.parquet", spatial / "tissue_positions.csv",
                  spatial / "tissue_positions_list.csv"]
    src = next((p for p in candidates if p.is_file()), None)
    if src is None:
        raise ImportDataError(f"{spatial}: no tissue_positions.parquet, tissue_positions.csv or "
                              "tissue_positions_list.csv; point SOURCE at a Space Ranger 'outs' folder.")
    try:
        if src.suffix == ".parquet":
            df = pd.read_parquet(src)
        elif _has_header(src):
            df = pd.read_csv(src)
        else:
            df = pd.read_csv(src, header=None, names=_POS_COLS)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ImportDataError(f"{src}: cannot be read as a tissue positions table ({exc}).") from exc
    missing = [c for c in _POS_COLS if c not in df.columns]
    if missing:
        raise ImportDataError(f"{src}: missing column(s) {missing}; expected {_POS_COLS}.")
    try:
        df = df.astype({c: float for c in _POS_COLS[1:]})
    except ValueError as exc:
        raise ImportDataError(f"{src}: non-numeric value in a position column ({exc}).") from exc
    if in_tissue_only:
        df = df[df["in_tissue"] == 1]
    df = df.copy()
    df["barcode"] = df["barcode"].astype(str)
    return df.set_index("barcode"), src


def fit_pixel_size(pos: pd.DataFrame, pitch_um: float = VISIUM_PITCH_UM, hexagonal: bool = True) -> dict[str, Any]:
    """Full-resolution pixels per um from an affine fit of pixel position on array position.

    Visium (``hexagonal``): one column step is ``pitch/2`` um, one row step
    ``pitch*sqrt(3)/2`` um.  A square grid (Visium HD bins): both are ``pitch``.
    Returns the fit's pixels per um (geometric mean of the two axes), each
    axis's value and the residual, in pixels.
    """
    if len(pos) < 3:
        raise ImportDataError("too few spots to fit the pixel size from array positions (need 3).")
    A = np.c_[pos["array_col"].to_numpy(float), pos["array_row"].to_numpy(float), np.ones(len(pos))]
    P = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    M, *_ = np.linalg.lstsq(A, P, rcond=None)
    col_um, row_um = (pitch_um / 2, pitch_um * math.sqrt(3) / 2) if hexagonal else (pitch_um, pitch_um)
    per_col, per_row = np.linalg.norm(M[0]) / col_um, np.linalg.norm(M[1]) / row_um
    det = abs(float(np.linalg.det(M[:2])))
    if not np.isfinite(det) or det == 0:
        raise ImportDataError("array positions are degenerate (one row or column); cannot fit the pixel size.")
    ppu = math.sqrt(det / (col_um * row_um))
    rms = float(np.sqrt(((P - A @ M) ** 2).sum(1).mean()))
    return {"pixels_per_um": ppu, "pixels_per_um_columns": float(per_col), "pixels_per_um_rows": float(per_row),
            "fit_rms_px": rms, "spots_in_fit": int(len(pos))}


def resolve_visium_folder(folder: Path, bin_size_um: float | None) -> Path:
    """The folder holding the matrix: ``outs`` itself, or ``outs/binned_outputs/square_NNNum`` for Visium HD."""
    binned = folder / "binned_outputs"
    if bin_size_um is not None:
        sub = binned / f"square_{int(round(bin_size_um)):03d}um"
        if folder.name.startswith("square_") and (folder / "filtered_feature_bc_matrix.h5").is_file():
            return folder
        if not sub.is_dir():
            have = sorted(p.name for p in binned.glob("square_*um")) if binned.is_dir() else []
            raise ImportDataError(f"{folder}: no {sub.relative_to(folder)} folder for --bin-size {bin_size_um:g} "
                                  f"(found: {have or 'no binned_outputs'}).")
        return sub
    if not (folder / "filtered_feature_bc_matrix.h5").is_file() and binned.is_dir():
        have = sorted(p.name for p in binned.glob("square_*um"))
        raise ImportDataError(f"{folder}: a Visium HD output; choose a bin with --bin-size (bins here: {have}).")
    return folder


def read_visium_slide(folder: str | Path, name: str | None = None, image: str | Path | None = None,
                      image_res: str | None = None, tile_um: float | None = None, tile_px: float | None = None,
                      patient: str | None = None, min_spots: float = 0.0, bin_size_um: float | None = None,
                      feature_types: Sequence[str] | None = (GENE_EXPRESSION,)) -> Slide:
    """One Space Ranger output as a :class:`Slide` (centres in full-resolution pixels)."""
    folder = Path(folder)
    name = name or folder.name
    data = resolve_visium_folder(folder, bin_size_um)
    matrix = data / "filtered_feature_bc_matrix.h5"
    if not matrix.is_file():
        raise ImportDataError(f"{matrix}: not found; point SOURCE at a Space Ranger 'outs' folder.")
    report: dict[str, Any] = {}
    counts = read_10x_h5(matrix, min_spots, feature_types, report=report)
    pos_all, pos_file = read_positions(data / "spatial")
    sf_path = data / "spatial" / "scalefactors_json.json"
    try:
        sf = json.loads(sf_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ImportDataError(f"{sf_path}: missing or not JSON ({exc}).") from exc
    pos = pos_all[pos_all["in_tissue"] == 1]
    keys, match = match_spots(name, pos.index, counts.index, pos_file, matrix, require="counts")
    report.update(match)
    hd = bin_size_um is not None or "bin_size_um" in sf
    if hd and sf.get("microns_per_pixel"):
        ppu = 1.0 / float(sf["microns_per_pixel"])
        report["pixel_size_method"] = f"scalefactors microns_per_pixel ({sf_path.name})"
    else:
        pitch = float(sf.get("bin_size_um", bin_size_um)) if hd else VISIUM_PITCH_UM
        fit = fit_pixel_size(pos_all, pitch_um=pitch, hexagonal=not hd)
        ppu = fit.pop("pixels_per_um")
        report["pixel_size_fit"] = fit
        report["pixel_size_method"] = (f"affine fit of pixel on array position, {pitch:g} um "
                                       f"{'bin' if hd else 'centre-to-centre'} pitch")
    if "spot_diameter_fullres" in sf:
        report["spot_diameter_fullres_um"] = float(sf["spot_diameter_fullres"]) / ppu
    scale = 1.0
    if image is None:
        if image_res not in ("lowres", "hires"):
            raise ImportDataError(f"{folder}: no full-resolution image; pass --image PATH or --image-res lowres|hires.")
        image = data / "spatial" / f"tissue_{image_res}_image.png"
        scale = float(sf[f"tissue_{image_res}_scalef"])
        report["effective_um_per_pixel"] = 1.0 / (ppu * scale)
    if tile_um is None and tile_px is None:
        tile_um = float(sf.get("bin_size_um", bin_size_um)) if hd else VISIUM_SPOT_UM
    report.update({"pixels_per_um": ppu, "um_per_pixel": 1.0 / ppu, "image_scale": scale})
    if hd:
        report["bin_size_um"] = float(sf.get("bin_size_um", bin_size_um))
    centers = pos.loc[keys, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    return Slide(name=name, patient=patient, keys=list(keys), centers=centers, counts=counts.loc[keys],
                 image=Path(image), tile_px=tile_size_px(tile_um, tile_px, ppu) * scale if tile_px is None
                 else float(tile_px), image_scale=scale, pixels_per_um=ppu, report=report)


def import_visium(folders, out_dir, *, images=None, image_res: str | None = None, name: str = "visium",
                  tile_um: float | None = None, tile_px: float | None = None, out_px: int = 224,
                  normalize_mode: str = "lognorm", n_genes: int | None = None, gene_list=None,
                  min_spots: float = 0.1, bin_size_um: float | None = None,
                  feature_types: Sequence[str] | None = (GENE_EXPRESSION,),
                  gene_names: dict[str, str] | None = None) -> Path:
    """Import one or more Space Ranger folders into one tile table (genes intersected).

    Tile side: ``tile_um`` (default: the 55 um capture spot, or the bin size
    for Visium HD) at the fitted pixel size, or ``tile_px`` pixels of the image
    that is cut.
    """
    folders = [Path(f) for f in folders]
    images = list(images) if images else [None] * len(folders)
    if len(images) != len(folders):
        raise ImportDataError("give one --image per Space Ranger folder (or none, with --image-res).")
    if tile_um is not None and tile_px is not None:
        raise ImportDataError("give at most one of --tile-um and --tile-px.")
    slides = [read_visium_slide(f, image=i, image_res=image_res, tile_um=tile_um, tile_px=tile_px,
                                bin_size_um=bin_size_um, feature_types=feature_types) for f, i in zip(folders, images)]
    return build_table(slides, out_dir, name, out_px=out_px, normalize_mode=normalize_mode, n_genes=n_genes,
                       gene_list=gene_list, min_spots=min_spots, gene_names=gene_names,
                       extra={"format": "visium-hd" if bin_size_um else "visium", "sources": [str(f) for f in folders],
                              "tile_um": tile_um if tile_px is None else None})
