"""AnnData (``.h5ad``) as scanpy and squidpy write it: spots with positions, counts and the slide image.

Read: ``obsm["spatial"]`` (spot centres, full-resolution pixels), counts from
``layers["counts"]`` when present, else ``X``; ``uns["spatial"][library]``
with ``scalefactors`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``,
``spot_diameter_fullres``) and ``images`` (``hires``/``lowres``).

Pixel size, first that applies: an affine fit of pixel on array position
(``obs`` ``array_row``/``array_col``, Visium's 100 um hexagonal pitch, as
:mod:`featurize.importers.visium`); ``microns_per_pixel`` in the scale
factors (Visium HD); ``spot_diameter_fullres`` as a 65 um spot (10x's
definition).  Tiles are cut from ``--image`` (full resolution) when given,
else from the stored hires (then lowres) image at its scale factor, with the
effective micrometres per pixel recorded and a warning when it is coarse.

``X`` that is not counts (negative or non-integer values: already
normalised) is used as it is, and the sidecar says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from core.errors import ImportDataError
from featurize.importers.common import Slide, build_table, tile_size_px
from featurize.importers.visium import VISIUM_PITCH_UM, VISIUM_SPOT_UM, fit_pixel_size
from core.log import say

THEORETICAL_SPOT_UM = 65.0  # what 10x's spot_diameter_fullres spans
COARSE_UM_PER_PX = 2.0  # above this, tiles carry little cellular detail: warn


def read_anndata(path: Path):
    """An .h5ad file read with anndata; every failure is one ImportDataError naming the file."""
    try:
        import anndata
    except ImportError as exc:
        raise ImportDataError("reading .h5ad needs the anndata package: pip install anndata.") from exc
    if not path.is_file():
        raise ImportDataError(f"{path}: file not found.")
    try:
        return anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - anndata/h5py raise many types for a bad file
        raise ImportDataError(f"{path}: unreadable .h5ad ({type(exc).__name__}: {exc}).") from exc


def _counts(ad, path: Path) -> tuple[np.ndarray, str]:
    from scipy import sparse

    if "counts" in ad.layers:
        X, src = ad.layers["counts"], "layers['counts']"
    else:
        X, src = ad.X, "X"
    X = X.toarray() if sparse.issparse(X) else np.asarray(X)
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        raise ImportDataError(f"{path}: {src} holds NaN or inf.")
    return X, src


def _library(ad, path: Path, library: str | None) -> tuple[str | None, dict[str, Any]]:
    spatial = ad.uns.get("spatial", {}) if hasattr(ad, "uns") else {}
    libs = [k for k in spatial if isinstance(spatial.get(k), dict)]
    if library is not None:
        if library not in libs:
            raise ImportDataError(f"{path}: no library '{library}' in uns['spatial'] (libraries: {libs or 'none'}).")
        return library, spatial[library]
    if len(libs) > 1:
        raise ImportDataError(f"{path}: uns['spatial'] holds {len(libs)} libraries ({', '.join(libs)}); choose one "
                              "with --library ID.")
    return (libs[0], spatial[libs[0]]) if libs else (None, {})


def read_h5ad_slide(path: str | Path, out_dir: Path, *, image: str | Path | None = None, library: str | None = None,
                    tile_um: float | None = None, tile_px: float | None = None,
                    patient: str | None = None) -> tuple[Slide, dict[str, Any]]:
    """One AnnData slide as a :class:`Slide` (+ what the import decided, for the sidecar)."""
    path = Path(path)
    ad = read_anndata(path)
    if "spatial" not in getattr(ad, "obsm", {}):
        raise ImportDataError(f"{path}: no obsm['spatial'] (spot positions); this AnnData has no spatial coordinates.")
    xy = np.asarray(ad.obsm["spatial"], dtype=np.float64)[:, :2]
    lib, meta = _library(ad, path, library)
    sf = dict(meta.get("scalefactors", {}))
    name = lib or path.stem
    counts, src = _counts(ad, path)
    is_counts = bool((counts >= 0).all() and np.allclose(counts, np.round(counts)))
    report: dict[str, Any] = {"library": lib, "expression_from": src, "is_counts": is_counts}
    obs = ad.obs
    if {"array_row", "array_col"} <= set(obs.columns):
        pos = pd.DataFrame({"array_row": obs["array_row"].to_numpy(float), "array_col": obs["array_col"].to_numpy(float),
                            "pxl_col_in_fullres": xy[:, 0], "pxl_row_in_fullres": xy[:, 1]})
        fit = fit_pixel_size(pos, VISIUM_PITCH_UM)
        ppu = fit.pop("pixels_per_um")
        report.update({"pixel_size_method": f"affine fit of pixel on array position, {VISIUM_PITCH_UM:g} um pitch",
                       "pixel_size_fit": fit})
    elif sf.get("microns_per_pixel"):
        ppu = 1.0 / float(sf["microns_per_pixel"])
        report["pixel_size_method"] = "scalefactors microns_per_pixel"
    elif sf.get("spot_diameter_fullres"):
        ppu = float(sf["spot_diameter_fullres"]) / THEORETICAL_SPOT_UM
        report["pixel_size_method"] = f"spot_diameter_fullres as a {THEORETICAL_SPOT_UM:g} um spot (10x's definition)"
    elif tile_px is None:
        raise ImportDataError(f"{path}: cannot tell the pixel size (no obs array_row/array_col, no scale factors); "
                              "pass --tile-px.")
    else:
        ppu = None
    scale = 1.0
    if image is None:
        images = meta.get("images", {})
        res = next((r for r in ("hires", "lowres") if r in images), None)
        if res is None:
            raise ImportDataError(f"{path}: no image in uns['spatial'] and no --image; pass the full-resolution image.")
        scale = float(sf.get(f"tissue_{res}_scalef", 0) or 0)
        if scale <= 0:
            raise ImportDataError(f"{path}: image '{res}' has no tissue_{res}_scalef scale factor; pass --image.")
        arr = np.asarray(images[res])
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        out_dir.mkdir(parents=True, exist_ok=True)
        image = out_dir / f".{name}_{res}.png"
        Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).save(image)
        report["image"] = f"uns['spatial']['{lib}']['images']['{res}'] at scale {scale:g}"
        if ppu:
            eff = 1.0 / (ppu * scale)
            report["effective_um_per_pixel"] = eff
            if eff > COARSE_UM_PER_PX:
                say(f"[tiles] {path.name}: cutting from the stored {res} image at {eff:.1f} um per pixel (the "
                      f"full-resolution slide is much finer); pass --image FULLRES for real tiles.")
    else:
        report["image"] = str(image)
    if tile_um is None and tile_px is None:
        tile_um = VISIUM_SPOT_UM
    size = tile_size_px(tile_um, tile_px, ppu or 1.0) * (scale if tile_px is None else 1.0)
    report.update({"pixels_per_um": ppu, "um_per_pixel": 1.0 / ppu if ppu else None, "image_scale": scale})
    keys = [str(k) for k in ad.obs_names]
    df = pd.DataFrame(counts, index=keys, columns=[str(v) for v in ad.var_names])
    slide = Slide(name=name, patient=patient, keys=keys, centers=xy, counts=df, image=Path(image), tile_px=size,
                  image_scale=scale, pixels_per_um=ppu, report=report)
    return slide, {"is_counts": is_counts, "expression_from": src}


def import_h5ad(paths: Sequence[str | Path], out_dir: str | Path, *, name: str = "h5ad", images=None,
                library: str | None = None, tile_um: float | None = None, tile_px: float | None = None,
                out_px: int = 224, normalize_mode: str = "lognorm", n_genes: int | None = None, gene_list=None,
                min_spots: float = 0.1, gene_names: dict[str, str] | None = None) -> Path:
    """Import one or more ``.h5ad`` slides into one tile table (genes intersected)."""
    out_dir = Path(out_dir)
    paths = [Path(p) for p in paths]
    images = list(images) if images else [None] * len(paths)
    if len(images) != len(paths):
        raise ImportDataError("give one --image per .h5ad file (or none, to cut from the stored hires image).")
    slides, kinds = [], []
    for p, img in zip(paths, images):
        s, k = read_h5ad_slide(p, out_dir, image=img, library=library, tile_um=tile_um, tile_px=tile_px)
        slides.append(s)
        kinds.append(k)
    mode = normalize_mode
    if not all(k["is_counts"] for k in kinds):
        mode = "raw"
        say(f"[tiles] {', '.join(str(p) for p, k in zip(paths, kinds) if not k['is_counts'])}: expression is not "
              "counts (negative or non-integer values: already normalised); used as it is, not normalised again.")
    return build_table(slides, out_dir, name, out_px=out_px, normalize_mode=mode, n_genes=n_genes,
                       gene_list=gene_list, min_spots=min_spots, gene_names=gene_names,
                       extra={"format": "h5ad", "sources": [str(p) for p in paths],
                              "expression": "as given (already normalised)" if mode != normalize_mode else mode})
