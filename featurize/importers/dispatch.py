"""One entry to every importer, with the rules of which options go with which source format.

``tiles`` (the CLI) and the Python API call :func:`import_tiles`, so both refuse the same combinations (an
option of another format is an error naming it, never silently ignored).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from core.errors import UsageError

FORMATS = ("st", "visium", "hest", "h5ad", "spatialdata")

#: Options that mean something for some formats only (flag name, formats).
ONLY = {"bin_size": ("--bin-size", ("visium", "spatialdata")), "feature_types": ("--feature-types", ("visium",)),
        "image_res": ("--image-res", ("visium",)), "images": ("--image", ("visium", "h5ad", "spatialdata")),
        "library": ("--library", ("h5ad",)), "patients": ("--patient", ("st",)),
        "table": ("--table", ("spatialdata",)), "shapes": ("--shapes", ("spatialdata",)),
        "image_level": ("--image-level", ("spatialdata",)), "um_frame": ("--um-frame", ("spatialdata",)),
        "pseudo_spot": ("--pseudo-spot", ("spatialdata",)), "cells": ("--cells", ("spatialdata",))}


def import_tiles(fmt: str, source: str | os.PathLike, out: str | os.PathLike, *, name: str = "tiles",
                 sections: Sequence[str] | None = None, library: str | None = None,
                 images: Sequence[str] | None = None, image_res: str | None = None, tile_um: float | None = None,
                 tile_px: float | None = None, out_px: int = 224, normalize: str = "lognorm",
                 n_genes: int | None = 250, gene_list: Sequence[str] | None = None, min_spots: float = 0.1,
                 patients: dict[str, str] | None = None, gene_names: dict[str, str] | None = None,
                 bin_size: float | None = None, feature_types: Sequence[str] | None = None,
                 table: str | None = None, shapes: str | None = None, image_level: int | None = None,
                 um_frame: str | None = None, pseudo_spot: float | None = None, cells: bool = False) -> Path:
    """Import ``source`` (format ``fmt``) into ``out/<name>.csv`` with its tiles and sidecar; returns the table."""
    if fmt not in FORMATS:
        raise UsageError(f"tiles {fmt}: choose one of {', '.join(FORMATS)}.")
    given = {"bin_size": bin_size, "feature_types": feature_types, "image_res": image_res, "images": images,
             "library": library, "patients": patients, "table": table, "shapes": shapes,
             "image_level": image_level, "um_frame": um_frame, "pseudo_spot": pseudo_spot, "cells": cells}
    for key, (flag, formats) in ONLY.items():
        if given[key] and fmt not in formats:
            raise UsageError(f"tiles {fmt}: {flag} applies to {' and '.join(formats)} only; drop it.")
    common = dict(out_px=out_px, normalize_mode=normalize, n_genes=n_genes, gene_list=gene_list,
                  min_spots=min_spots, name=name, gene_names=gene_names)
    tile_um = None if tile_px else tile_um
    if fmt == "st":
        from featurize.importers.st import import_st

        return import_st(source, out, sections=sections, tile_um=tile_um or 100.0, tile_px=tile_px,
                         patients=patients or {}, **common)
    if fmt == "visium":
        from featurize.importers.visium import GENE_EXPRESSION, import_visium

        if sections:
            raise UsageError("tiles visium: --section does not apply (one Space Ranger folder is one section); drop it.")
        types = list(feature_types or [GENE_EXPRESSION])
        return import_visium([source], out, images=images, image_res=image_res, tile_um=tile_um, tile_px=tile_px,
                             bin_size_um=bin_size, feature_types=None if types == ["all"] else types, **common)
    if fmt == "spatialdata":
        from featurize.importers.spatialdata import import_spatialdata

        if sections:
            raise UsageError("tiles spatialdata: --section does not apply (one store is one section); drop it.")
        if images and len(images) > 1:
            raise UsageError("tiles spatialdata: give one --image NAME (the store's image element to cut).")
        return import_spatialdata([source], out, table=table, image=images[0] if images else None, shapes=shapes,
                                  image_level=image_level or 0, um_frame=um_frame, tile_um=tile_um, tile_px=tile_px,
                                  pseudo_spot_um=pseudo_spot, cells=cells, bin_size_um=bin_size, **common)
    if fmt == "h5ad":
        from featurize.importers.h5ad import import_h5ad

        if sections:
            raise UsageError("tiles h5ad: --section does not apply (choose a library with --library); drop it.")
        return import_h5ad([source], out, images=images, library=library, tile_um=tile_um, tile_px=tile_px, **common)
    from featurize.importers.hest import import_hest

    if not sections:
        raise UsageError("tiles hest: name the samples with --section ID (repeatable).")
    for flag, value in (("--tile-um", tile_um), ("--tile-px", tile_px)):
        if value:
            raise UsageError(f"tiles hest: {flag} does not apply (HEST patches are already cut); drop it.")
    return import_hest(source, sections, out, **common)
