"""SpatialData stores (``.zarr``, as spatialdata-io writes Visium, Visium HD and Xenium) into a tile table.

What is read, and only that (a whole Visium HD store read eagerly costs gigabytes): the store's tables,
shapes and images (never its points or labels), and of the chosen image only the chosen pyramid level.

* **Rows.**  The chosen table's rows that annotate the chosen shapes (``uns['spatialdata_attrs']``:
  ``region``, ``region_key``, ``instance_key``), keyed by the table's ``obs_names`` (Visium: the barcodes,
  so tile IDs equal the Space Ranger importer's).  ``pseudo_spot_um``: cells binned into squares of that
  side in the micrometre frame, counts summed, one row per square that holds a cell (HEST's pseudo-spots).
* **Coordinates.**  Shape centroids go through the store's own transformations: shapes -> a coordinate
  system both elements share -> the image's pixels (``inverse(image -> cs) @ (shapes -> cs)``).  The table's
  x, y are tile centres in level-0 pixels of the chosen image (the convention of every importer); a coarser
  ``image_level`` is cut at its scale, recorded as ``image_scale``.
* **Pixel size**, first that applies: an affine fit of pixel on array position when the table's ``obs`` has
  ``array_row``/``array_col`` (Visium's 100 um hexagonal pitch, or square bins of ``bin_size_um``, as
  :mod:`featurize.importers.visium`; spatialdata-io's Visium frames are pixels, not micrometres); else the
  image's transformation to the micrometre frame ``um_frame`` (default ``global``, the frame in which
  spatialdata-io writes Xenium and in which stores built with the models carry micrometres).  The method is
  written in the sidecar, with the table, shapes, image, level and frame chosen.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from core.errors import ImportDataError
from featurize.importers.common import Slide, build_table, tile_size_px
from featurize.importers.visium import VISIUM_PITCH_UM, VISIUM_SPOT_UM, fit_pixel_size

INSTALL = "pip install 'hexpress[spatialdata]' (spatialdata, spatialdata-io)"


def require_spatialdata():
    """The ``spatialdata`` module, or one error line saying how to install the optional extra."""
    try:
        import spatialdata
    except ImportError as exc:
        raise ImportDataError(f"SpatialData stores need the optional extra: {INSTALL}.") from exc
    return spatialdata


def read_store(path: str | Path):
    """The store's tables, shapes and images (lazy), never its points or labels; one error line naming it."""
    sd = require_spatialdata()
    path = Path(path)
    if not path.is_dir():
        raise ImportDataError(f"{path}: not found; point SOURCE at a SpatialData .zarr store (a folder).")
    try:
        return sd.read_zarr(path, selection=("images", "shapes", "tables"))
    except Exception as exc:  # noqa: BLE001 - zarr/ome-zarr/anndata raise many types for a bad store
        raise ImportDataError(f"{path}: not a readable SpatialData store ({type(exc).__name__}: {exc}).") from exc


def _choose(path: Path, kind: str, flag: str, have: Sequence[str], given: str | None) -> str:
    have = list(have)
    if given is not None:
        if given not in have:
            raise ImportDataError(f"{path}: no {kind} '{given}' ({flag}); the store's {kind}s: {', '.join(have) or 'none'}.")
        return given
    if not have:
        raise ImportDataError(f"{path}: the store holds no {kind}.")
    if len(have) > 1:
        raise ImportDataError(f"{path}: the store holds {len(have)} {kind}s ({', '.join(have)}); choose one with {flag} NAME.")
    return have[0]


def _affine(element, cs: str) -> np.ndarray:
    """3x3 matrix taking the element's (x, y, 1) to ``cs``'s."""
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def _frames(element) -> dict:
    from spatialdata.transformations import get_transformation

    return get_transformation(element, get_all=True)


def _level(image, level: int, path: Path, name: str):
    """(DataArray of the level, level-0 (height, width), the level's pixels per level-0 pixel)."""
    if getattr(image, "children", None):  # a multiscale DataTree (scale0, scale1, ...)
        levels = sorted(image.children, key=lambda k: int(re.sub(r"\D", "", k) or 0))
        if not 0 <= level < len(levels):
            raise ImportDataError(f"{path}: image '{name}' has {len(levels)} levels; --image-level {level} is not one "
                                  f"(0 to {len(levels) - 1}).")
        arr0 = next(iter(image[levels[0]].data_vars.values()))
        arr = next(iter(image[levels[level]].data_vars.values()))
    else:
        if level != 0:
            raise ImportDataError(f"{path}: image '{name}' has one level; --image-level {level} is not 0.")
        arr0 = arr = image
    h0, w0 = int(arr0.sizes["y"]), int(arr0.sizes["x"])
    return arr, (h0, w0), float(arr.sizes["x"]) / w0


def _annotated(table, shapes_name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(row positions of the table annotating ``shapes_name``, their instance ids)."""
    attrs = table.uns.get("spatialdata_attrs", {})
    rkey, ikey = attrs.get("region_key"), attrs.get("instance_key")
    if rkey is None or ikey is None or rkey not in table.obs or ikey not in table.obs:
        raise ImportDataError(f"{path}: the table has no region/instance keys in uns['spatialdata_attrs'], so its rows "
                              "cannot be placed on shapes; write it with spatialdata's TableModel.parse(region=...).")
    rows = np.flatnonzero(table.obs[rkey].astype(str).to_numpy() == shapes_name)
    if not len(rows):
        raise ImportDataError(f"{path}: no table row annotates shapes '{shapes_name}'.")
    return rows, table.obs[ikey].to_numpy()[rows]


def _counts(table, rows: np.ndarray):
    from scipy import sparse

    X = table.layers["counts"] if "counts" in table.layers else table.X
    X = X[rows]
    return (sparse.csr_matrix(X) if sparse.issparse(X) else sparse.csr_matrix(np.asarray(X))).astype(np.float64)


def pseudo_spots(xy_um: np.ndarray, counts, side_um: float) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
    """Cells binned into squares of ``side_um`` (origin 0, 0 of the micrometre frame), counts summed.

    Returns (square grid index (k, 2) as ix, iy, square centres in um (k, 2), summed counts (k, genes) sparse,
    cells per square (k,)); squares are ordered by (iy, ix).  A cell on a boundary goes to the square above it
    (floor).
    """
    from scipy import sparse

    if side_um <= 0:
        raise ImportDataError(f"--pseudo-spot {side_um}: the square side must be positive (um).")
    grid = np.floor(np.asarray(xy_um, dtype=np.float64) / side_um).astype(np.int64)
    cells = np.ascontiguousarray(grid[:, ::-1])  # sort by row, then column
    uniq, inverse = np.unique(cells, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    assign = sparse.csr_matrix((np.ones(len(grid)), (inverse, np.arange(len(grid)))), shape=(len(uniq), len(grid)))
    summed = assign @ counts
    squares = uniq[:, ::-1]
    return squares, (squares + 0.5) * side_um, summed, np.asarray(assign.sum(1)).ravel().astype(int)


def read_spatialdata_slide(path: str | Path, out_dir: Path, *, table: str | None = None, image: str | None = None,
                           shapes: str | None = None, image_level: int = 0, um_frame: str | None = None,
                           tile_um: float | None = None, tile_px: float | None = None, pseudo_spot_um: float | None = None,
                           cells: bool = False, bin_size_um: float | None = None, name: str | None = None,
                           patient: str | None = None) -> Slide:
    """One SpatialData store as a :class:`Slide` (tiles cut later from the chosen image level, written as PNG)."""
    from PIL import Image

    path = Path(path)
    if pseudo_spot_um is not None and cells:
        raise ImportDataError("give at most one of --pseudo-spot and --cells.")
    sdata = read_store(path)
    tname = _choose(path, "table", "--table", list(sdata.tables.keys()), table)
    tab = sdata.tables[tname]
    attrs = tab.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else list(region or [])
    shape_names = [r for r in regions if r in sdata.shapes] if shapes is None else list(sdata.shapes.keys())
    sname = _choose(path, "shapes element annotated by the table", "--shapes", shape_names, shapes)
    iname = _choose(path, "image", "--image", list(sdata.images.keys()), image)
    shp, img = sdata.shapes[sname], sdata.images[iname]
    rows, ids = _annotated(tab, sname, path)
    if not pd.Index(ids).isin(shp.index).all():
        raise ImportDataError(f"{path}: {int((~pd.Index(ids).isin(shp.index)).sum())} table rows name instances that "
                              f"shapes '{sname}' lacks; the table and shapes do not belong together.")
    frames = set(_frames(img))
    shared = sorted(set(_frames(shp)) & frames, key=lambda c: (c != "global", c))
    if not shared:
        raise ImportDataError(f"{path}: shapes '{sname}' and image '{iname}' share no coordinate system, so the tiles "
                              "cannot be placed on the image; add a transformation to a common one.")
    cs = shared[0]
    img_to_cs = _affine(img, cs)
    to_img = np.linalg.inv(img_to_cs) @ _affine(shp, cs)  # shapes' coordinates -> level-0 image pixels
    geom = shp.geometry.loc[ids]
    cen = np.c_[geom.centroid.x.to_numpy(float), geom.centroid.y.to_numpy(float)]
    xy = cen @ to_img[:2, :2].T + to_img[:2, 2]
    arr, (h0, w0), scale = _level(img, image_level, path, iname)
    report: dict[str, Any] = {"store": str(path.resolve()), "table": tname, "shapes": sname, "image_element": iname,
                              "image_level": image_level, "coordinate_system": cs, "instance_ids_kept": True}
    obs = tab.obs.iloc[rows]
    square = not bool((geom.geom_type == "Point").all())
    frame = um_frame if um_frame is not None else ("global" if "global" in frames else None)
    if um_frame is not None and um_frame not in frames:
        raise ImportDataError(f"{path}: image '{iname}' has no transformation to --um-frame {um_frame} (its frames: "
                              f"{', '.join(sorted(frames))}).")
    to_um = _affine(img, frame) if frame is not None else None  # level-0 image pixels -> micrometres
    if {"array_row", "array_col"} <= set(obs.columns) and pseudo_spot_um is None and um_frame is None:
        pitch = bin_size_um or _bin_from_name(sname) if square else VISIUM_PITCH_UM
        if not pitch:
            raise ImportDataError(f"{path}: shapes '{sname}' are square bins of unknown size; pass --bin-size UM.")
        pos = pd.DataFrame({"array_row": obs["array_row"].to_numpy(float), "array_col": obs["array_col"].to_numpy(float),
                            "pxl_col_in_fullres": xy[:, 0], "pxl_row_in_fullres": xy[:, 1]})
        fit = fit_pixel_size(pos, pitch_um=float(pitch), hexagonal=not square)
        ppu = fit.pop("pixels_per_um")
        report.update({"pixel_size_method": f"affine fit of pixel on array position, {pitch:g} um "
                                            f"{'bin' if square else 'centre-to-centre'} pitch", "pixel_size_fit": fit})
        default_um = float(pitch) if square else VISIUM_SPOT_UM
    elif frame is not None:
        ppu = 1.0 / math.sqrt(abs(float(np.linalg.det(to_um[:2, :2]))))
        report["pixel_size_method"] = f"the image's transformation to the micrometre frame '{frame}'"
        report["um_frame"] = frame
        default_um = float(bin_size_um or (_bin_from_name(sname) if square else 0) or VISIUM_SPOT_UM)
    elif tile_px is None:
        raise ImportDataError(f"{path}: cannot tell the pixel size (no array_row/array_col in the table, no 'global' "
                              "frame on the image); name the micrometre frame with --um-frame NAME or pass --tile-px.")
    else:
        ppu, default_um = None, VISIUM_SPOT_UM
    counts = _counts(tab, rows)
    keys = [str(k) for k in tab.obs_names[rows]]
    if pseudo_spot_um is not None:
        if frame is None:
            raise ImportDataError(f"{path}: --pseudo-spot needs a micrometre frame; name it with --um-frame NAME.")
        um = xy @ to_um[:2, :2].T + to_um[:2, 2]
        squares, centres_um, counts, n_cells = pseudo_spots(um, counts, pseudo_spot_um)
        from_um = np.linalg.inv(to_um)
        xy = centres_um @ from_um[:2, :2].T + from_um[:2, 2]
        keys = [f"sq{ix}_{iy}" for ix, iy in squares]
        default_um = float(pseudo_spot_um)
        report["rows"] = (f"pseudo-spots: cells binned into {pseudo_spot_um:g} um squares from the origin of '{frame}' "
                          "(floor), counts summed, one row per square holding a cell")
        report["pseudo_spot"] = {"side_um": float(pseudo_spot_um), "cells": int(len(um)), "squares": int(len(keys)),
                                 "cells_per_square_median": float(np.median(n_cells)), "origin_um": [0.0, 0.0]}
        report["instance_ids_kept"] = False
    else:
        report["rows"] = ("one per cell (--cells)" if cells else "one per table row") + f" annotating '{sname}'"
    if tile_um is None and tile_px is None:
        tile_um = default_um
    side = tile_size_px(tile_um, tile_px, ppu or 1.0) if tile_px is None else float(tile_px)
    report.update({"pixels_per_um": ppu, "um_per_pixel": 1.0 / ppu if ppu else None, "tile_um": tile_um})
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)
    data = np.asarray(arr.transpose("y", "x", "c").data if "c" in arr.dims else arr.data)
    if data.dtype != np.uint8:
        top = float(data.max()) if data.size else 1.0
        data = np.clip(data * (255.0 / top if top > 0 else 1.0), 0, 255).astype(np.uint8)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[..., 0]
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f".{name}_{iname}_level{image_level}.png"
    Image.fromarray(data[..., :3] if data.ndim == 3 else data).save(png)
    report["image_level_shape"] = [int(d) for d in data.shape[:2]]
    report["level0_shape"] = [h0, w0]
    df = pd.DataFrame(counts.astype(np.float32).toarray(), index=keys, columns=[str(v) for v in tab.var_names])
    del data
    return Slide(name=name, patient=patient, keys=keys, centers=xy, counts=df, image=png,
                 tile_px=side * scale, image_scale=scale, pixels_per_um=ppu, report=report)


def _bin_from_name(shapes_name: str) -> float | None:
    m = re.search(r"(\d+)\s*um", shapes_name)
    return float(m.group(1)) if m else None


def import_spatialdata(stores: Sequence[str | Path], out_dir: str | Path, *, name: str = "spatialdata",
                       table: str | None = None, image: str | None = None, shapes: str | None = None,
                       image_level: int = 0, um_frame: str | None = None, tile_um: float | None = None,
                       tile_px: float | None = None, pseudo_spot_um: float | None = None, cells: bool = False,
                       bin_size_um: float | None = None, out_px: int = 224, normalize_mode: str = "lognorm",
                       n_genes: int | None = None, gene_list=None, min_spots: float = 0.1,
                       gene_names: dict[str, str] | None = None) -> Path:
    """Import one or more SpatialData stores into one tile table (genes intersected)."""
    out_dir = Path(out_dir)
    slides = [read_spatialdata_slide(s, out_dir, table=table, image=image, shapes=shapes, image_level=image_level,
                                     um_frame=um_frame, tile_um=tile_um, tile_px=tile_px, pseudo_spot_um=pseudo_spot_um,
                                     cells=cells, bin_size_um=bin_size_um) for s in stores]
    return build_table(slides, out_dir, name, out_px=out_px, normalize_mode=normalize_mode, n_genes=n_genes,
                       gene_list=gene_list, min_spots=min_spots, gene_names=gene_names,
                       extra={"format": "spatialdata", "sources": [str(Path(s).resolve()) for s in stores],
                              "rows": "pseudo-spots" if pseudo_spot_um else ("cells" if cells else "shapes"),
                              "tile_um": tile_um if tile_px is None else None})
