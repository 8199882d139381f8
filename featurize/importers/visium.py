"""10x Visium Space Ranger output folders.

Reads ``filtered_feature_bc_matrix.h5`` (10x HDF5, CSC with features as
rows), ``spatial/tissue_positions.csv`` (headed, Space Ranger >= 2) or
``spatial/tissue_positions_list.csv`` (headerless, older), and
``spatial/scalefactors_json.json``.  Visium spots are 55 um wide, so the pixel
size is ``spot_diameter_fullres / 55``.  The full-resolution image is given
by path; without one, ``image_res="lowres"``/``"hires"`` cuts from the
bundled down-scaled image (coordinates scaled by its scale factor).
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from scipy import sparse

from featurize.errors import ImportDataError
from featurize.importers.common import Slide, build_table, match_spots

VISIUM_SPOT_UM = 55.0
_POS_COLS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def read_10x_h5(path: str | Path, min_spots: float = 0.0) -> pd.DataFrame:
    """Barcodes x genes counts (float32) from a 10x HDF5 matrix; genes seen in < min_spots dropped."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as fh:
            g = fh["matrix"]
            shape = tuple(g["shape"][()])
            mat = sparse.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=shape)
            barcodes = g["barcodes"].asstr()[()]
            feats = g["features"]
            names = feats["name"].asstr()[()] if "name" in feats else feats["id"].asstr()[()]
    except (OSError, KeyError) as exc:
        raise ImportDataError(f"{path}: not a readable 10x feature-barcode HDF5 matrix ({exc}).") from exc
    spots_by_genes = mat.T.tocsr()
    frac = np.asarray((spots_by_genes > 0).mean(0)).ravel()
    keep = np.flatnonzero(frac >= min_spots) if min_spots > 0 else np.arange(shape[0])
    dense = spots_by_genes[:, keep].toarray().astype(np.float32)
    return pd.DataFrame(dense, index=pd.Index(barcodes, dtype=str), columns=pd.Index(names[keep], dtype=str))


def read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    """Tissue positions in either Space Ranger form, in-tissue spots only."""
    new, old = spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv"
    if new.is_file():
        df, src = pd.read_csv(new), new
        if "barcode" not in df.columns:
            df = pd.read_csv(new, header=None, names=_POS_COLS)
    elif old.is_file():
        df, src = pd.read_csv(old, header=None, names=_POS_COLS), old
    else:
        raise ImportDataError(f"{spatial}: neither tissue_positions.csv nor tissue_positions_list.csv found.")
    if not set(_POS_COLS) <= set(df.columns):
        raise ImportDataError(f"{src}: expected columns {_POS_COLS}.")
    df = df[df["in_tissue"].astype(int) == 1].copy()
    df["barcode"] = df["barcode"].astype(str)
    return df.set_index("barcode"), src


def read_visium_slide(folder: str | Path, name: str | None = None, image: str | Path | None = None,
                      image_res: str | None = None, tile_um: float | None = VISIUM_SPOT_UM,
                      tile_px: float | None = None, patient: str | None = None, min_spots: float = 0.0) -> Slide:
    folder = Path(folder)
    name = name or folder.name
    matrix = folder / "filtered_feature_bc_matrix.h5"
    if not matrix.is_file():
        raise ImportDataError(f"{matrix}: not found; point --visium at a Space Ranger 'outs' folder.")
    counts = read_10x_h5(matrix, min_spots)
    pos, pos_file = read_positions(folder / "spatial")
    sf_path = folder / "spatial" / "scalefactors_json.json"
    try:
        sf = json.loads(sf_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ImportDataError(f"{sf_path}: missing or not JSON ({exc}).") from exc
    keys, report = match_spots(name, pos.index, counts.index, pos_file, matrix, spot_side_must_match=False)
    scale = 1.0
    if image is None:
        if image_res not in ("lowres", "hires"):
            raise ImportDataError(f"{folder}: no full-resolution image; pass --image PATH or --image-res lowres|hires.")
        image = folder / "spatial" / f"tissue_{image_res}_image.png"
        scale = float(sf[f"tissue_{image_res}_scalef"])
    ppu = float(sf["spot_diameter_fullres"]) / VISIUM_SPOT_UM * scale
    report.update({"pixels_per_um": ppu, "image_scale": scale})
    if (tile_um is None) == (tile_px is None):
        raise ImportDataError("give exactly one of --tile-um and --tile-px.")
    centers = pos.loc[keys, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float) * scale
    return Slide(name=name, patient=patient, keys=list(keys), centers=centers, counts=counts.loc[keys],
                 image=Path(image), tile_px=float(tile_px) if tile_px else tile_um * ppu, report=report)


def import_visium(folders, out_dir, *, images=None, image_res: str | None = None, name: str = "visium",
                  tile_um: float | None = VISIUM_SPOT_UM, tile_px: float | None = None, out_px: int = 224,
                  normalize_mode: str = "lognorm", n_genes: int | None = None, gene_list=None,
                  min_spots: float = 0.1) -> Path:
    """Import one or more Space Ranger folders into one tile table (genes intersected)."""
    folders = [Path(f) for f in folders]
    images = list(images) if images else [None] * len(folders)
    if len(images) != len(folders):
        raise ImportDataError("give one --image per --visium folder (or none, with --image-res).")
    slides = [read_visium_slide(f, image=i, image_res=image_res, tile_um=None if tile_px else tile_um,
                                tile_px=tile_px) for f, i in zip(folders, images)]
    return build_table(slides, out_dir, name, out_px=out_px, normalize_mode=normalize_mode, n_genes=n_genes,
                       gene_list=gene_list, min_spots=min_spots,
                       extra={"format": "visium", "sources": [str(f) for f in folders]})
