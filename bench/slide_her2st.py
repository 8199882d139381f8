"""Whole-slide prediction on a section never seen, scored where it was measured (her2st).

1. Import all six her2st sections at 100 um (the ST spot) and keep the 250 most variable genes; the
   same genes for a second table of five sections (the held-out one, ``--holdout``, left out).
2. Embed both with efficientnet_lite0 (ImageNet, PyPI) and fit ridge:
   (a) on all six, leave-one-section-out: the held-out section's fold score (the LOSO figure);
   (b) on the five: the model that never saw the held-out section.
3. ``predict-slide`` (b) on the held-out section's full H&E image (no counts used; ``--mpp`` from the
   spot-pitch fit, since a JPEG does not record it), then score the predicted map at the measured
   spots: each spot takes the grid tile that covers its centre.  Also (c): (b) on the held-out
   section's spot-centred tiles, which separates the grid's offset from everything else.

Score: per-gene Pearson r over the section's spots, averaged over genes (constant genes skipped).
Usage (about 10 minutes on 2 CPU cores)::

    python bench/slide_her2st.py [--holdout C6] [--out bench/out/slide_her2st]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurize.engine.extract import embed  # noqa: E402
from featurize.importers.st import import_st  # noqa: E402
from featurize.tables.table import read_table  # noqa: E402
from regress.runs.fit import fit_run  # noqa: E402
from regress.runs.predict import predict_table  # noqa: E402
from regress.runs.folder import load_run  # noqa: E402
from regress.outputs.slides import predict_slide  # noqa: E402

HER2ST = ROOT.parent / "shared" / "data" / "her2st"
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")


def pcc_by_gene(Y: np.ndarray, P: np.ndarray) -> float:
    """Mean over genes of Pearson r across rows (genes constant in Y or P skipped)."""
    Yc, Pc = Y - Y.mean(0), P - P.mean(0)
    den = np.sqrt((Yc ** 2).sum(0) * (Pc ** 2).sum(0))
    ok = den > 0
    return float(((Yc * Pc).sum(0)[ok] / den[ok]).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--holdout", default="C6", choices=SECTIONS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "slide_her2st"))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--gene", default="ERBB2", help="gene whose predicted map is drawn (symbol)")
    args = ap.parse_args()
    if not (HER2ST / "images").is_dir():
        print(f"her2st not found at {HER2ST}", file=sys.stderr)
        return 2
    out = Path(args.out)
    t0 = time.perf_counter()
    all6 = out / "all6" / "her2st.csv"
    if not all6.exists():
        import_st(HER2ST, out / "all6", name="her2st", tile_um=100.0, n_genes=250)
    genes = read_table(all6, check_files=False).genes
    five = [s for s in SECTIONS if s != args.holdout]
    train5 = out / "train5" / "train5.csv"
    if not train5.exists():
        import_st(HER2ST, out / "train5", sections=five, name="train5", tile_um=100.0, gene_list=genes)
    side = json.loads(all6.with_suffix(".json").read_text())
    mpp = 1.0 / side["slides"][args.holdout]["pixels_per_um"]
    cache = out / "cache"
    embed(all6, [args.backbone], cache_dir=cache, progress=False)
    embed(train5, [args.backbone], cache_dir=cache, progress=False)
    t_prep = time.perf_counter() - t0
    quiet = dict(log=lambda *a: None, device="cpu", overwrite=True)
    loso = fit_run(all6, [args.backbone], "ridge", cache_dir=cache, runs_dir=out / "runs", folds=6, group_col="slide",
                   **quiet)
    d = load_run(loso.path).data()
    held = d.slides == args.holdout if d.slides is not None else None
    a = pcc_by_gene(d.y[held].astype(np.float64), d.oof[held].astype(np.float64))
    r5 = fit_run(train5, [args.backbone], "ridge", cache_dir=cache, runs_dir=out / "runs", folds=5, group_col="slide",
                 **quiet)
    # (c) the five-section model on the held-out section's spot-centred tiles
    t_all = read_table(all6)
    rows = np.flatnonzero(t_all.slides == args.holdout)
    import pandas as pd

    spot_table = out / "heldout_spots.csv"
    pd.DataFrame({"ID": t_all.ids[rows], "path": [str(t_all.paths[i]) for i in rows], "slide": args.holdout,
                  "x": t_all.xy[rows, 0], "y": t_all.xy[rows, 1]}).to_csv(spot_table, index=False)
    pc = predict_table(r5.path, spot_table, cache_dir=cache, device="cpu", log=lambda *a: None)
    Y = t_all.Y[rows].astype(np.float64)
    c = pcc_by_gene(Y, pc[genes].to_numpy(np.float64))
    # (b) whole-slide prediction, scored at the measured spots
    t1 = time.perf_counter()
    image = next((HER2ST / "images").glob(f"{args.holdout}.*"))
    h5 = predict_slide(r5.path, image, out / f"{args.holdout}_slide.h5ad", mpp=mpp, cache_dir=cache, device="cpu",
                       genes=[args.gene] if args.gene else (), progress=False, log=lambda *a: None)
    t_slide = time.perf_counter() - t1
    import anndata

    ad = anndata.read_h5ad(h5)
    tile_px = float(ad.uns["spatial"][args.holdout]["scalefactors"]["spot_diameter_fullres"])
    cell = {(int(r), int(q)): k for k, (r, q) in enumerate(zip(ad.obs["array_row"], ad.obs["array_col"]))}
    spots = t_all.xy[rows]
    hit = [cell.get((int(y // tile_px), int(x // tile_px))) for x, y in spots]
    have = np.array([h is not None for h in hit])
    P = np.asarray(ad.X)[[h for h in hit if h is not None]].astype(np.float64)
    b = pcc_by_gene(Y[have], P)
    a_sub = pcc_by_gene(d.y[held][have].astype(np.float64), d.oof[held][have].astype(np.float64))
    res = {"holdout": args.holdout, "backbone": args.backbone, "genes": len(genes), "tile_um": 100.0,
           "mpp": round(mpp, 4), "slide_tiles": int(ad.n_obs), "spots": int(len(rows)),
           "spots_on_predicted_tiles": int(have.sum()),
           "a_loso_fold_pcc": round(a, 4), "a_loso_fold_pcc_same_spots": round(a_sub, 4),
           "b_whole_slide_at_spots_pcc": round(b, 4), "c_five_section_model_spot_tiles_pcc": round(c, 4),
           "seconds": {"import_and_embed": round(t_prep, 1), "predict_slide": round(t_slide, 1)},
           "h5ad": str(h5)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
