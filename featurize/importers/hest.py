"""HEST-1k samples, and embeddings already extracted by TRIDENT / CLAM / HEST.

* Patches: ``patches/<id>.h5`` with ``img`` (N, H, W, 3) uint8, ``barcode``
  (N,) or (N, 1) and ``coords`` (N, 2); expression in ``st/<id>.h5ad``
  (AnnData, spots x genes, raw counts).  The patches are written as PNG tiles.
* Embeddings: an HDF5 file with ``features`` or ``embeddings`` (N, D) and
  ``barcodes``/``barcode`` or ``coords`` to align them to a tile table; they
  become a regular hexpress cache (keyed by the file's sha256), so ``fit``
  uses them without re-embedding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from featurize.backbones import BackboneSpec
from featurize.cache import CacheKey, CacheWriter, cache_path
from featurize.errors import ImportDataError
from featurize.importers.common import Slide, build_table, match_spots
from featurize.table import TileTable
from featurize.weights import ResolvedWeights, sha256_file


def _strings(ds) -> np.ndarray:
    arr = ds[()]
    arr = arr.reshape(-1) if arr.ndim > 1 else arr
    return np.array([a.decode() if isinstance(a, bytes) else str(a) for a in arr])


def read_h5ad_counts(path: Path, min_spots: float = 0.0) -> pd.DataFrame:
    try:
        import anndata
    except ImportError as exc:
        raise ImportDataError("reading .h5ad needs the anndata package: pip install anndata.") from exc
    try:
        ad = anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - anndata/h5py raise many types for a bad file
        raise ImportDataError(f"{path}: unreadable .h5ad ({type(exc).__name__}: {exc}).") from exc
    X = ad.X
    from scipy import sparse

    nz = np.asarray((X > 0).mean(0)).ravel()
    keep = np.flatnonzero(nz >= min_spots) if min_spots > 0 else np.arange(X.shape[1])
    X = X[:, keep]
    X = X.toarray() if sparse.issparse(X) else np.asarray(X)
    return pd.DataFrame(X.astype(np.float32), index=pd.Index(ad.obs_names.astype(str)),
                        columns=pd.Index(ad.var_names[keep].astype(str)))


def read_hest_sample(root: str | Path, sample: str, out_dir: Path, min_spots: float = 0.0) -> Slide:
    """One HEST sample: patches written as PNGs now, then treated like a pre-cut slide."""
    root = Path(root)
    pfile, stfile = root / "patches" / f"{sample}.h5", root / "st" / f"{sample}.h5ad"
    if not pfile.is_file():
        raise ImportDataError(f"{pfile}: patches file not found.")
    try:
        with h5py.File(pfile, "r") as fh:
            imgs = fh["img"]
            barcodes = _strings(fh["barcode"])
            coords = np.asarray(fh["coords"][()], dtype=float).reshape(len(barcodes), -1)[:, :2]
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
    slide = Slide(name=sample, patient=None, keys=list(keys), centers=coords[idx], counts=counts.loc[keys],
                  image=None, tile_px=None, report=report)
    slide.report["pre_cut"] = True
    return slide


def import_hest(root: str | Path, samples: Sequence[str], out_dir: str | Path, *, name: str = "hest",
                out_px: int = 224, normalize_mode: str = "lognorm", n_genes: int | None = None, gene_list=None,
                min_spots: float = 0.1) -> Path:
    """Import HEST samples (patches already cut by HEST) into one tile table."""
    out_dir = Path(out_dir)
    slides = [read_hest_sample(root, s, out_dir) for s in samples]
    return build_table(slides, out_dir, name, out_px=out_px, normalize_mode=normalize_mode, n_genes=n_genes,
                       gene_list=gene_list, min_spots=min_spots, extra={"format": "hest", "source": str(root)})


def import_embeddings(h5: str | Path, table: TileTable, backbone: str, cache_dir: str | Path = "cache",
                      id_prefix: str = "") -> Path:
    """Turn an external embedding file into a hexpress cache aligned to ``table``.

    Rows are matched by barcode (``<id_prefix><barcode>`` == table ID) or, when
    the file has only coordinates, by (x, y) == the table's x, y.
    """
    h5 = Path(h5)
    try:
        with h5py.File(h5, "r") as fh:
            key = "features" if "features" in fh else "embeddings" if "embeddings" in fh else None
            if key is None:
                raise ImportDataError(f"{h5}: no 'features' or 'embeddings' dataset.")
            feats = np.asarray(fh[key][()], dtype=np.float32)
            feats = feats.reshape(feats.shape[-2], feats.shape[-1]) if feats.ndim == 3 else feats
            bkey = "barcodes" if "barcodes" in fh else "barcode" if "barcode" in fh else None
            names = _strings(fh[bkey]) if bkey else None
            coords = np.asarray(fh["coords"][()], dtype=float).reshape(len(feats), -1)[:, :2] if "coords" in fh else None
    except OSError as exc:
        raise ImportDataError(f"{h5}: not a readable HDF5 file ({exc}).") from exc
    if names is not None:
        pos = {f"{id_prefix}{b}": i for i, b in enumerate(names)}
        how = "barcode"
        rows = [pos.get(i) for i in table.ids]
    elif coords is not None and table.xy is not None:
        pos = {(round(x, 3), round(y, 3)): i for i, (x, y) in enumerate(coords)}
        how = "coords"
        rows = [pos.get((round(x, 3), round(y, 3))) for x, y in table.xy]
    else:
        raise ImportDataError(f"{h5}: has neither barcodes nor coords matching the table's x/y to align rows.")
    missing = [table.ids[i] for i, r in enumerate(rows) if r is None]
    if missing:
        raise ImportDataError(f"{h5}: {len(missing)} table rows have no embedding by {how} (first: {missing[:3]}); "
                              "embed those tiles or drop them from the table.")
    spec = BackboneSpec(name=backbone, architecture=f"external:{h5.name}", weights="none", input_size=0,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear",
                        embed_dim=int(feats.shape[1]), notes="imported from an external embedding file")
    weights = ResolvedWeights("external-file", str(h5.resolve()), sha256_file(h5), False)
    ckey = CacheKey(table.name, table.fingerprint(), spec, weights, 1, "float32")
    final = cache_path(cache_dir, ckey)
    writer = CacheWriter(final, ckey, table.ids, spec.embed_dim)
    writer.open()
    try:
        writer.write(0, feats[np.asarray(rows)])
        return writer.finalize()
    finally:
        writer.close()
