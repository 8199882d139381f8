"""``python cli.py demo``: ``run --recipe quick`` on real tissue with real ImageNet weights.

Data from :mod:`featurize.datasets` (her2st on disk or downloaded), else a clearly labelled SYNTHETIC tile
set.  The her2st spots are imported as 224 px tiles (log1p CPM, the 250 most variable genes) and the quick
recipe runs on them (:mod:`regress.runs.runner`): efficientnet_lite0+stages on the spot's tile and on the
same spots at 2x, ridge fitted with nested leave-one-section-out CV on each, the cross-gene stack of both,
and the whole recipe again leave-one-patient-out.  ``--quick`` uses two sections and its own table, so it
never reuses (or is reused by) the full demo's.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def run_demo(workdir: str | os.PathLike = "demo_data", device: str = "auto", quick: bool = False) -> int:
    from core.device import resolve_device
    from featurize.datasets import download_her2st, find_her2st, user_cache
    from featurize.importers.st import import_st
    from featurize.synthetic import make_synthetic_table
    from regress.runs.runner import RunConfig, run

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
            import_st(src, work, sections=sections, name=name, tile_px=224, out_px=224, normalize_mode="cpm",
                      n_genes=250, min_spots=0.0)
    else:
        print("[demo] her2st not found and no internet: using a SYNTHETIC tile set (generated colour fields, "
              "not tissue); the numbers below say nothing about real data.")
        table = make_synthetic_table(work, n=48 if quick else 96, n_genes=20, size=96,
                                     name="synthetic-quick" if quick else "synthetic")
    model = run(RunConfig(table, "quick", device=device, out=work / "model", cache_dir=work / "cache"))
    unit = "synthetic group" if synthetic else "section"
    print(f"\nPCC/gene: each held-out {unit} scored on its own, averaged over genes and {unit}s"
          + (" (SYNTHETIC, not tissue)" if synthetic else "") + "; every alpha and the stack's cross-gene map "
          "chosen by inner CV on the training sections.\nNext: python cli.py run --data "
          f"{table} --recipe default --budget 30m --cache-dir {work / 'cache'}   (or --recipe best)\n"
          f"      python cli.py predict {model} --data TEST.csv --out predictions.csv --cache-dir {work / 'cache'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
