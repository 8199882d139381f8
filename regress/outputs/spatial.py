"""Predicted expression out: AnnData (``.h5ad``) as scanpy/squidpy read Visium, and gene maps over the H&E.

AnnData contract (written by :func:`write_h5ad`, temporary file renamed when complete):

* ``X`` (tiles x genes, float32): predicted expression; ``obs_names`` the tile IDs;
* ``obs``: ``slide``, ``in_tissue`` (1), ``array_row``/``array_col`` (grid position, whole slides);
* ``var``: index = the genes as the run names them, ``gene_ids``, ``gene_symbols``;
* ``obsm["spatial"]``: tile centres in full-resolution (level-0) pixels;
* ``uns["spatial"][library]``: ``images`` {``hires``: RGB uint8} and ``scalefactors``
  {``tissue_hires_scalef``, ``spot_diameter_fullres`` (the tile side in level-0 pixels)}, so
  ``scanpy.pl.spatial`` / ``squidpy.pl.spatial_scatter`` draw it as they draw Visium;
* ``uns["hexpress"]``: provenance (run, kind, backbones with weight sha256, tile um, mpp, slide,
  hexpress version) as flat strings and numbers, plus ``provenance_json`` with everything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.atomic import atomic_path
from core.errors import UsageError


def provenance(res, **extra: Any) -> dict[str, Any]:
    """The ``uns["hexpress"]`` provenance of predictions made by a run or stack ``res`` (one builder for
    ``predict`` and ``predict-slide``): the folder, its kind, each backbone's weights, random-init, the version."""
    import time

    from core import __version__

    return {"run": str(Path(res.path).resolve()), "kind": res.kind,
            "backbones": [{"backbone": b.get("backbone"), "weights_sha256": b.get("weights_sha256"),
                           "random_init": b.get("random_init")} for b in res.info.get("backbones", [])],
            "random_init": bool(res.info.get("random_init")), "hexpress_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


def flat_provenance(prov: dict[str, Any] | None) -> dict[str, Any]:
    """Provenance as ``uns["hexpress"]`` holds it (AnnData and SpatialData outputs): flat strings and numbers,
    anything else as JSON, plus ``provenance_json`` with everything."""
    prov = dict(prov or {})
    flat = {k: (v if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)) for k, v in prov.items()
            if v is not None}
    flat["provenance_json"] = json.dumps(prov, default=str)
    return flat


def write_h5ad(out: str | os.PathLike, ids: Sequence[str], genes: Sequence[str], X: np.ndarray, *,
               xy: np.ndarray | None = None, symbols: Sequence[str] | None = None,
               slide: str | Sequence[str] | np.ndarray | None = None,
               image: np.ndarray | None = None, image_scale: float | None = None, spot_px: float | None = None,
               grid: np.ndarray | None = None, provenance: dict[str, Any] | None = None) -> Path:
    """Write the AnnData contract above; returns the path.  ``slide``: one name for every tile (a whole slide),
    or each tile's slide (a test table of several slides: one ``uns["spatial"]`` library per slide)."""
    import anndata
    import pandas as pd

    out = Path(out)
    if out.suffix != ".h5ad":
        raise UsageError(f"--out {out}: AnnData output must end in .h5ad.")
    genes = [str(g) for g in genes]
    var = pd.DataFrame({"gene_ids": genes, "gene_symbols": [str(s) for s in (symbols or genes)]}, index=genes)
    obs = pd.DataFrame(index=pd.Index([str(i) for i in ids], name=None))
    per_tile = slide is not None and not isinstance(slide, str)
    slides = np.asarray(slide, dtype=str) if per_tile else np.full(len(obs), slide or "slide")
    if len(slides) != len(obs):
        raise UsageError(f"{out}: {len(slides)} slide names for {len(obs)} tiles.")
    if per_tile and image is not None and len(set(slides)) > 1:
        raise UsageError(f"{out}: one image cannot belong to {len(set(slides))} slides.")
    obs["slide"] = pd.Categorical(slides)
    obs["in_tissue"] = 1
    if grid is not None:
        obs["array_row"], obs["array_col"] = np.asarray(grid[:, 0], int), np.asarray(grid[:, 1], int)
    ad = anndata.AnnData(X=np.asarray(X, dtype=np.float32), obs=obs, var=var)
    if xy is not None:
        ad.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
        ad.uns["spatial"] = {}
        for library in dict.fromkeys(slides.tolist()):
            entry: dict[str, Any] = {"scalefactors": {"spot_diameter_fullres": float(spot_px or 1.0)}, "metadata": {}}
            if image is not None:
                entry["images"] = {"hires": np.asarray(image, dtype=np.uint8)}
                entry["scalefactors"]["tissue_hires_scalef"] = float(image_scale or 1.0)
            ad.uns["spatial"][library] = entry
    ad.uns["hexpress"] = flat_provenance(provenance)
    with atomic_path(out, ".h5ad") as tmp:
        ad.write_h5ad(tmp)
    return out


def draw_gene_maps(prefix: str | os.PathLike, genes: Sequence[str], values: np.ndarray, xy: np.ndarray, *,
                   all_genes: Sequence[str], symbols: Sequence[str] | None = None, image: np.ndarray | None = None,
                   image_scale: float = 1.0, tile_px: float | None = None, title: str = "") -> list[Path]:
    """One PNG per gene: each tile's predicted value as a coloured square over the H&E thumbnail."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    symbol = dict(zip(all_genes, symbols or all_genes))
    pos = {g: j for j, g in enumerate(all_genes)}
    by_symbol = {s: g for g, s in symbol.items()}
    paths = []
    for gene in genes:
        g = gene if gene in pos else by_symbol.get(gene)
        if g is None:
            raise UsageError(f"--gene {gene}: not among the run's {len(all_genes)} genes (IDs or symbols).")
        v = values[:, pos[g]]
        fig, ax = plt.subplots(figsize=(6, 6))
        if image is not None:
            ax.imshow(image)
        pts = np.asarray(xy) * image_scale
        size = ((tile_px or 1.0) * image_scale * 72.0 / fig.dpi) ** 2 if tile_px else 12
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=v, s=size, marker="s", cmap="magma", alpha=0.75, linewidths=0)
        if image is None:
            ax.invert_yaxis()
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        name = symbol.get(g, g)
        ax.set_title(f"{name}{'' if name == g else f' ({g})'}: predicted {title}".strip(), fontsize=9)
        fig.colorbar(sc, ax=ax, fraction=0.04)
        fig.tight_layout()
        png = Path(f"{prefix}_{str(name).replace('/', '_')}.png")
        with atomic_path(png, ".png") as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        paths.append(png)
    return paths
