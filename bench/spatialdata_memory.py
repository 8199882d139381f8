"""Peak memory of ``tiles spatialdata`` on a generated Visium HD-like store (issue 28).

    python bench/spatialdata_memory.py [--bins 6400] [--genes 2000] [--side 4000] [--work /tmp/sdmem]

Writes a store with spatialdata's own models (square bins in micrometres, a sparse table annotating them, an
RGB H&E with a 3-level pyramid, and a points element of transcripts that the importer must not read), then
runs ``python cli.py tiles spatialdata`` in a child process and reports its peak resident memory (ru_maxrss),
beside the in-memory sizes of the table (dense), the level-0 image and the points.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build(path: Path, bins: int, genes: int, side: int, seed: int = 0) -> dict:
    import anndata
    import dask.dataframe as dd
    import geopandas as gpd
    import pandas as pd
    import spatialdata as sd
    from scipy import sparse
    from shapely.geometry import box
    from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    rng = np.random.default_rng(seed)
    um_per_px, bin_um = 0.5, 8.0
    n = int(np.sqrt(bins))
    cx, cy = np.meshgrid(np.arange(n) * bin_um + 20, np.arange(n) * bin_um + 20)
    c = np.c_[cx.ravel(), cy.ravel()]
    h = bin_um / 2
    shapes = gpd.GeoDataFrame(geometry=[box(x - h, y - h, x + h, y + h) for x, y in c], index=np.arange(len(c)))
    X = sparse.random(len(c), genes, density=0.05, format="csr", random_state=seed, dtype=np.float32)
    X.data = rng.poisson(3, X.nnz).astype(np.float32) + 1
    obs = pd.DataFrame({"region": pd.Categorical(["square_008um"] * len(c)), "bin": np.arange(len(c))},
                       index=[f"b{i}" for i in range(len(c))])
    table = TableModel.parse(anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(genes)])),
                             region="square_008um", region_key="region", instance_key="bin")
    img = rng.integers(0, 255, (3, side, side), dtype=np.uint8)
    n_tx = 5_000_000
    pts = dd.from_pandas(pd.DataFrame({"x": rng.uniform(0, side * um_per_px, n_tx),
                                       "y": rng.uniform(0, side * um_per_px, n_tx),
                                       "gene": rng.integers(0, genes, n_tx)}), npartitions=8)
    s = sd.SpatialData(
        images={"he": Image2DModel.parse(img, dims=("c", "y", "x"), scale_factors=[2, 2], chunks=(3, 1024, 1024),
                                         transformations={"global": Scale([um_per_px, um_per_px], axes=("y", "x"))})},
        shapes={"square_008um": ShapesModel.parse(shapes, transformations={"global": Identity()})},
        points={"transcripts": PointsModel.parse(pts, transformations={"global": Identity()})},
        tables={"table": table})
    s.write(path, overwrite=True)
    return {"bins": len(c), "genes": genes, "dense_table_mb": len(c) * genes * 8 / 2**20,
            "image_mb": img.nbytes / 2**20, "points_mb": n_tx * 24 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bins", type=int, default=6400)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--side", type=int, default=4000)
    ap.add_argument("--work", default="/tmp/sdmem")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "hd.zarr"
    sizes = build(store, a.bins, a.genes, a.side)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "cli.py", "tiles", "spatialdata", str(store), "--out", str(work / "out"),
                    "--genes", "250", "--out-px", "64"], check=True)
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"store: {sizes['bins']} bins x {sizes['genes']} genes (dense {sizes['dense_table_mb']:.0f} MB), image "
          f"{a.side}x{a.side} RGB ({sizes['image_mb']:.0f} MB at level 0), transcripts {sizes['points_mb']:.0f} MB")
    print(f"tiles spatialdata: {took:.1f} s, peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
