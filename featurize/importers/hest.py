"""HEST-1k samples (patches already cut by hestcore).

``patches/<id>.h5`` as hestcore's ``WSIPatcher.to_h5`` writes it: ``img``
(N, H, W, 3) uint8 with attributes ``patch_size_src`` (level-0 pixels),
``patch_size_target``, ``downsample`` and ``pixel_size`` (level-0 um per
pixel); ``barcode`` (N, 1) variable-length strings (read back as bytes);
``coords`` (N, 2) the patch's **top-left corner** in level-0 pixels.
Expression: ``st/<id>.h5ad`` (AnnData, spots x genes, raw counts).  The
patches are written as PNG tiles, and the table's x, y are patch centres
(corner + ``patch_size_src`` / 2), the convention of every importer.

Embeddings extracted by HEST's benchmark, TRIDENT or CLAM are read by
:mod:`featurize.importers.embeddings`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from core.errors import ImportDataError
from featurize.importers.common import Slide, build_table, match_spots


def h5_strings(ds) -> np.ndarray:
    """(N,) or (N, 1) strings from HDF5, fixed-length bytes or variable-length (as hestcore writes them)."""
    arr = ds[()]
    arr = arr.reshape(-1) if arr.ndim > 1 else arr
    return np.array([a.decode() if isinstance(a, bytes) else str(a) for a in arr])


def read_h5ad_counts(path: Path, min_spots: float = 0.0) -> pd.DataFrame:
    """Spots x genes raw counts of a HEST ``st/<id>.h5ad`` (genes seen in < ``min_spots`` of spots dropped)."""
    from featurize.importers.h5ad import read_anndata

    ad = read_anndata(Path(path))
    X = ad.X
    from scipy import sparse

    nz = np.asarray((X > 0).mean(0)).ravel()
    keep = np.flatnonzero(nz >= min_spots) if min_spots > 0 else np.arange(X.shape[1])
    X = X[:, keep]
    X = X.toarray() if sparse.issparse(X) else np.asarray(X)
    return pd.DataFrame(X.astype(np.float32), index=pd.Index(ad.obs_names.astype(str)),
                        columns=pd.Index(ad.var_names[keep].astype(str)))


def read_hest_sample(root: str | Path, sample: str, out_dir: Path, min_spots: float = 0.0,
                     patches: str | Path | None = None, expression: str | Path | None = None) -> Slide:
    """One HEST sample: patches written as PNGs now, then treated like a pre-cut slide.  ``patches`` /
    ``expression``: the sample's files where they are not ``root/patches/<id>.h5`` / ``root/st/<id>.h5ad``
    (a HEST-Benchmark task folder keeps them in ``patches/`` and ``adata/``)."""
    root = Path(root)
    pfile = Path(patches) if patches else root / "patches" / f"{sample}.h5"
    stfile = Path(expression) if expression else root / "st" / f"{sample}.h5ad"
    if not pfile.is_file():
        raise ImportDataError(f"{pfile}: patches file not found.")
    try:
        with h5py.File(pfile, "r") as fh:
            imgs = fh["img"]
            barcodes = h5_strings(fh["barcode"])
            coords = np.asarray(fh["coords"][()], dtype=float).reshape(len(barcodes), -1)[:, :2]
            geometry = {k: (v.item() if hasattr(v, "item") else v) for k, v in imgs.attrs.items()}
            counts = read_h5ad_counts(stfile, min_spots)
            keys, report = match_spots(sample, barcodes, counts.index, pfile, stfile)
            pos = {b: i for i, b in enumerate(barcodes)}
            rel_dir = Path("tiles") / sample
            (out_dir / rel_dir).mkdir(parents=True, exist_ok=True)
            for k in keys:
                Image.fromarray(np.asarray(imgs[pos[k]], dtype=np.uint8)[..., :3]).save(out_dir / rel_dir / f"{sample}_{k}.png")
    except (OSError, KeyError) as exc:
        raise ImportDataError(f"{pfile}: not a HEST patches file with img/barcode/coords ({exc}).") from exc
    idx = [pos[k] for k in keys]
    src = geometry.get("patch_size_src")
    if src is None:
        raise ImportDataError(f"{pfile}: 'img' has no patch_size_src attribute, so the patch centres are unknown "
                              "(coords are top-left corners); re-patch the sample with hestcore.")
    ppu = 1.0 / float(geometry["pixel_size"]) if geometry.get("pixel_size") else None
    report.update({"pixel_size_method": "hestcore patch attributes (pixel_size)" if ppu else "unknown",
                   "pixels_per_um": ppu, "patch_geometry": geometry, "coords_in_file": "top-left, level 0"})
    slide = Slide(name=sample, patient=None, keys=list(keys), centers=coords[idx] + float(src) / 2.0,
                  counts=counts.loc[keys], image=None, tile_px=float(src), pixels_per_um=ppu, report=report)
    slide.report["pre_cut"] = True
    return slide


def import_hest(root: str | Path, samples: Sequence[str], out_dir: str | Path, *, name: str = "hest",
                out_px: int = 224, normalize_mode: str = "lognorm", n_genes: int | None = None, gene_list=None,
                min_spots: float = 0.1, gene_names: dict[str, str] | None = None) -> Path:
    """Import HEST samples (patches already cut by HEST) into one tile table."""
    out_dir = Path(out_dir)
    slides = [read_hest_sample(root, s, out_dir) for s in samples]
    return build_table(slides, out_dir, name, out_px=out_px, normalize_mode=normalize_mode, n_genes=n_genes,
                       gene_list=gene_list, min_spots=min_spots, gene_names=gene_names,
                       extra={"format": "hest", "source": str(root)})
