"""``predict-slide``: expression maps for whole H&E slides that were never sequenced.

Tissue is found on a thumbnail and cut into a grid of tiles at the physical
size the run was trained on (:mod:`featurize.tables.wsi`); the tiles go through the
normal cache path (a second head on the same slide costs no network time)
and the run or stack predicts them; the result is an AnnData file that
scanpy and squidpy plot as they plot Visium (:mod:`regress.outputs.spatial`), plus
optional PNG maps of chosen genes over the H&E.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from core.errors import UsageError
from core.log import say
from regress.runs.folder import Run, open_result
from regress.runs.scales import distinct_sizes, run_tile_um, same_size


def trained_tile_sizes(res: Run) -> list[float]:
    """The different tile sides (um) the run, or a stack's runs, were trained on (smallest first; [] if unrecorded)."""
    if res.kind != "stack":
        return distinct_sizes([run_tile_um(res)])
    from regress.runs.stack import stack_members

    return distinct_sizes([None if run is None else run_tile_um(run) for _, run, _ in stack_members(res)])


def predict_slide(run: str | os.PathLike, slide: str | os.PathLike, out: str | os.PathLike, *, mpp: float | None = None,
                  tile_um: float | None = None, force: bool = False, work_dir: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike = "cache", device: str = "auto", batch_size: int = 64,
                  min_tissue: float = 0.5, genes: Sequence[str] = (), trust_pickle: bool = False,
                  progress: bool = True, log=say) -> Path:
    """Predict every tissue tile of ``slide`` with ``run`` and write ``out`` (.h5ad); returns its path."""
    import math

    from featurize.tables.table import read_table
    from featurize.tables.wsi import cut_slide, open_slide
    from regress.runs.predict import predict_table
    from regress.outputs.spatial import draw_gene_maps, provenance, write_h5ad

    for flag, v in (("--mpp", mpp), ("--tile-um", tile_um)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UsageError(f"{flag} {v}: must be a positive number.")
    if not (math.isfinite(min_tissue) and 0 <= min_tissue <= 1):
        raise UsageError(f"--min-tissue {min_tissue}: must be a fraction between 0 and 1.")
    out = Path(out)
    if out.suffix not in (".h5ad", ".zarr"):
        raise UsageError(f"--out {out}: predict-slide writes AnnData (*.h5ad) or a SpatialData store (*.zarr).")
    if out.suffix == ".zarr":
        from featurize.importers.spatialdata import require_spatialdata

        require_spatialdata()  # before any tile is cut
    res = open_result(run)
    known = set(res.genes) | set(res.info.get("gene_names") or [])
    unknown = [g for g in genes if g not in known]
    if unknown:
        raise UsageError(f"--gene {unknown[0]}: not among the run's {len(res.genes)} genes (IDs or symbols).")
    sizes = trained_tile_sizes(res)
    trained = sizes[0] if sizes else None
    if len(sizes) > 1 and tile_um is not None:
        raise UsageError(f"--tile-um {tile_um:g}: the stack's runs were trained on tiles of "
                         f"{' and '.join(f'{s:g}' for s in sizes)} um, and each gets its own size around the same "
                         "centres; drop --tile-um.")
    if tile_um is None:
        if trained is None:
            raise UsageError(f"{run}: the run does not record its tiles' physical size (its table was not made by "
                             "`tiles`); pass --tile-um.")
        tile_um = trained
    elif trained is not None and not same_size(tile_um, trained) and not force:
        raise UsageError(f"--tile-um {tile_um:g}: the run was trained on {trained:g} um tiles; predictions on tiles of "
                         "another physical size are not what it learned (pass --force to do it anyway).")
    if tile_um <= 0:
        raise UsageError(f"--tile-um {tile_um}: must be positive.")
    img = open_slide(slide, mpp)
    try:
        name = Path(slide).stem
        work = Path(work_dir) if work_dir else out.with_name(f"{out.stem}_tiles")
        t0 = time.perf_counter()
        table, cut = cut_slide(img, work, tile_um=tile_um, min_tissue=min_tissue, name=name, progress=progress)
        log(f"[predict-slide] {cut['n_tiles']} tiles of {tile_um:g} um ({cut['tile_px_level0']:.0f} px at "
            f"{img.mpp:g} um/px from {img.mpp_source}) in {time.perf_counter() - t0:.1f}s: {table}")
        tables = [table]
        for size in sizes[1:]:  # a multi-scale stack: the same tiles with their surroundings, one table per size
            tables.append(cut_slide(img, work, tile_um=size, grid_um=tile_um, min_tissue=min_tissue, name=name,
                                    progress=progress)[0])
            log(f"[predict-slide] the same tiles at {size:g} um: {tables[-1]}")
        df = predict_table(run, tables, cache_dir=cache_dir, device=device, batch_size=batch_size,
                           trust_pickle=trust_pickle, force_size=force, log=log)
        thumb, scale = img.thumbnail(2000)
    finally:
        img.close()
    t = read_table(table, check_files=False)
    gene_cols = [c for c in df.columns if c != "ID"]
    symbols = res.info.get("gene_names") or gene_cols
    import pandas as pd

    grid = pd.read_csv(table, usecols=["grid_row", "grid_col"]).to_numpy()
    prov = provenance(res, slide_path=str(Path(slide).resolve()), tile_um=tile_um, trained_tile_um=trained,
                      trained_tile_sizes_um=sizes, mpp=img.mpp, mpp_source=img.mpp_source, n_tiles=len(t))
    X = df[gene_cols].to_numpy()
    if out.suffix == ".zarr":
        from regress.outputs.sdata import write_spatialdata

        path = write_spatialdata(out, df["ID"].tolist(), gene_cols, X, xy=t.xy, slides=[name] * len(X),
                                 tile_px={name: float(cut["tile_px_level0"])}, images={name: (thumb, scale)},
                                 symbols=symbols, provenance=prov)
    else:
        path = write_h5ad(out, df["ID"].tolist(), gene_cols, X, xy=t.xy, symbols=symbols, slide=name, image=thumb,
                          image_scale=scale, spot_px=cut["tile_px_level0"], grid=grid, provenance=prov)
    if genes:
        draw_gene_maps(out.with_suffix(""), list(genes), X, t.xy, all_genes=gene_cols, symbols=symbols, image=thumb,
                       image_scale=scale, tile_px=cut["tile_px_level0"], title=f"on {name}")
    return path
