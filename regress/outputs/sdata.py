"""Predicted expression out as a SpatialData store (``.zarr``), beside the H&E it was predicted from.

Store contract (written by :func:`write_spatialdata` into a temporary folder renamed when complete):

* ``images/<slide>_he``: the slide's H&E at a few pyramid levels (the image the tiles were cut from, at most
  ``MAX_SIDE`` pixels on its long side), with a ``Scale`` to the ``global`` frame;
* ``shapes/<slide>_tiles``: one square per tile (its side, centred on the tile), in ``global``;
* ``tables/predictions``: tiles x genes (float32) annotating the shapes (``region`` / ``instance_id``), ``obs``
  ``slide`` and ``tile_id``, ``var`` ``gene_symbols``, ``uns["hexpress"]`` the provenance (as in the AnnData
  output) with ``provenance_json``.

``global`` is the level-0 pixel frame of each slide (the tile table's x, y); its micrometres per pixel is in
the provenance where known.  :func:`add_to_store` puts the same table into a copy of a source store instead,
annotating the source's own spots, bins or cells.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.errors import UsageError

MAX_SIDE = 4096
TABLE = "predictions"


def _require():
    from featurize.importers.spatialdata import require_spatialdata

    return require_spatialdata()


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_]+", "_", str(name)).strip("_") or "slide"


def _squares(xy: np.ndarray, side: np.ndarray):
    from shapely.geometry import box

    h = np.asarray(side, dtype=np.float64) / 2.0
    return [box(x - s, y - s, x + s, y + s) for (x, y), s in zip(np.asarray(xy, dtype=np.float64), h)]


def _image_element(image: np.ndarray, scale: float):
    """(Image2DModel element, its scale) from an RGB array whose pixels are ``scale`` level-0 pixels' worth."""
    from PIL import Image
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3].astype(np.uint8)
    long = max(arr.shape[:2])
    if long > MAX_SIDE:
        f = MAX_SIDE / long
        arr = np.asarray(Image.fromarray(arr).resize((max(1, round(arr.shape[1] * f)), max(1, round(arr.shape[0] * f))),
                                                     Image.Resampling.LANCZOS))
        scale = scale * arr.shape[1] / np.asarray(image).shape[1]
    levels, side = [], max(arr.shape[:2])
    while side >= 256 and len(levels) < 3:
        levels.append(2)
        side //= 2
    el = Image2DModel.parse(np.moveaxis(arr, 2, 0), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                            scale_factors=levels or None,
                            transformations={"global": Scale([1.0 / scale, 1.0 / scale], axes=("y", "x"))})
    return el


def _write_store(sdata, out: Path) -> Path:
    """Write ``sdata`` to ``out`` through a temporary folder renamed when complete (an old store goes last)."""
    if out.suffix != ".zarr":
        raise UsageError(f"--out {out}: a SpatialData store must end in .zarr.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        sdata.write(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def prediction_table(ids: Sequence[str], genes: Sequence[str], X: np.ndarray, *, regions: Sequence[str],
                     instances: Sequence, slides: Sequence[str], symbols: Sequence[str] | None,
                     provenance: dict[str, Any] | None):
    """The ``predictions`` table annotating ``regions`` (one per row) by ``instances``."""
    import anndata
    import pandas as pd
    from spatialdata.models import TableModel

    genes = [str(g) for g in genes]
    var = pd.DataFrame({"gene_symbols": [str(s) for s in (symbols or genes)]}, index=genes)
    obs = pd.DataFrame({"tile_id": [str(i) for i in ids], "slide": pd.Categorical([str(s) for s in slides]),
                        "region": pd.Categorical([str(r) for r in regions]), "instance_id": list(instances)},
                       index=pd.Index([str(i) for i in ids]))
    ad = anndata.AnnData(X=np.asarray(X, dtype=np.float32), obs=obs, var=var)
    from regress.outputs.spatial import flat_provenance

    ad.uns["hexpress"] = flat_provenance(provenance)
    return TableModel.parse(ad, region=sorted(set(map(str, regions))), region_key="region", instance_key="instance_id")


def write_spatialdata(out: str | os.PathLike, ids: Sequence[str], genes: Sequence[str], X: np.ndarray, *,
                      xy: np.ndarray, slides: Sequence[str], tile_px: dict[str, float],
                      images: dict[str, tuple[np.ndarray, float]] | None = None,
                      symbols: Sequence[str] | None = None, provenance: dict[str, Any] | None = None) -> Path:
    """Write the store contract above; ``tile_px``: each slide's tile side in level-0 pixels; ``images``: per slide
    (RGB array, its pixels per level-0 pixel).  Returns the path."""
    sd = _require()
    import geopandas as gpd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    out = Path(out)
    slides = np.asarray([str(s) for s in slides])
    xy = np.asarray(xy, dtype=np.float64)
    if xy.shape != (len(ids), 2) or len(slides) != len(ids):
        raise UsageError(f"{out}: {len(ids)} tiles but {len(xy)} centres and {len(slides)} slide names.")
    shapes, imgs, regions, instances = {}, {}, np.empty(len(ids), dtype=object), np.zeros(len(ids), dtype=np.int64)
    for s in dict.fromkeys(slides.tolist()):
        rows = np.flatnonzero(slides == s)
        key = f"{_safe(s)}_tiles"
        geo = gpd.GeoDataFrame({"tile_id": [str(ids[i]) for i in rows]},
                               geometry=_squares(xy[rows], np.full(len(rows), float(tile_px[s]))),
                               index=np.arange(len(rows)))
        shapes[key] = ShapesModel.parse(geo, transformations={"global": Identity()})
        regions[rows], instances[rows] = key, np.arange(len(rows))
        if images and s in images:
            imgs[f"{_safe(s)}_he"] = _image_element(*images[s])
    table = prediction_table(ids, genes, X, regions=regions.tolist(), instances=instances.tolist(), slides=slides,
                             symbols=symbols, provenance=provenance)
    return _write_store(sd.SpatialData(images=imgs, shapes=shapes, tables={TABLE: table}), out)


def add_to_store(source: str | os.PathLike, out: str | os.PathLike, ids: Sequence[str], keys: Sequence[str],
                 genes: Sequence[str], X: np.ndarray, *, table: str, shapes: str, symbols: Sequence[str] | None = None,
                 provenance: dict[str, Any] | None = None) -> Path:
    """A copy of the SpatialData store ``source`` with a ``predictions`` table annotating its own ``shapes``:
    ``keys`` are the source table's ``obs_names`` (the importer's row keys), mapped to their instance ids."""
    sd = _require()
    from featurize.importers.spatialdata import read_store

    src = read_store(source)
    if table not in src.tables or shapes not in src.shapes:
        raise UsageError(f"{source}: no table '{table}' or shapes '{shapes}' any more; the store changed since import.")
    t = src.tables[table]
    ikey = t.uns["spatialdata_attrs"]["instance_key"]
    pos = {str(k): i for i, k in enumerate(t.obs_names)}
    missing = [k for k in keys if str(k) not in pos]
    if missing:
        raise UsageError(f"{source}: {len(missing)} predicted rows (e.g. '{missing[0]}') are not rows of table "
                         f"'{table}' any more; the store changed since import.")
    inst = t.obs[ikey].to_numpy()[[pos[str(k)] for k in keys]]
    full = sd.read_zarr(Path(source))
    full.tables[TABLE] = prediction_table(ids, genes, X, regions=[shapes] * len(ids), instances=list(inst),
                                          slides=[Path(source).stem] * len(ids), symbols=symbols,
                                          provenance=provenance)
    return _write_store(full, Path(out))


def table_geometry(test, sidecar: dict[str, Any] | None, out: Path) -> tuple[dict[str, float], dict[str, tuple]]:
    """Per slide of the tile table ``test``: the tile side in level-0 pixels and (H&E array, its scale), from the
    importer's sidecar; without one, the side is the median distance to the nearest tile and no image is written."""
    from PIL import Image

    from featurize.tables.images import large_images_allowed

    if test.xy is None:
        raise UsageError(f"--out {out}: {test.source} has no x, y columns, so the tiles cannot be placed; write a "
                         "CSV or AnnData instead, or import the data with `tiles`.")
    slides = test.slides if test.slides is not None else np.full(len(test.ids), test.name)
    reps = (sidecar or {}).get("slides") or {}
    sides, images = {}, {}
    for s in dict.fromkeys(np.asarray(slides, dtype=str).tolist()):
        rep = reps.get(s, {})
        if rep.get("tile_px"):
            sides[s] = float(rep["tile_px"]) / float(rep.get("image_scale", 1.0))
        else:  # no importer's record: the median distance to the nearest other tile
            from scipy.spatial import cKDTree

            pts = test.xy[np.asarray(slides, dtype=str) == s]
            sides[s] = float(np.median(cKDTree(pts).query(pts, k=2)[0][:, 1])) if len(pts) > 1 else 1.0
        if rep.get("image") and Path(rep["image"]).is_file():
            with large_images_allowed(), Image.open(rep["image"]) as im:
                im.draft("RGB", (MAX_SIDE, MAX_SIDE))
                f = min(1.0, MAX_SIDE / max(im.size))
                full_w = im.size[0]
                im = im.convert("RGB")
                if f < 1.0:
                    im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
                images[s] = (np.asarray(im), float(rep.get("image_scale", 1.0)) * im.size[0] / full_w)
    return sides, images
