"""``cli.py fit`` and ``compare``: cross-validated heads on cached features."""
from __future__ import annotations

import argparse

from commands.common import fit_args, bb_help, _groups_arg, _print_table, _head_params


def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    from regress.heads.registry import head_choices_help

    sp = sub.add_parser("fit", help="cross-validate one head on cached features and save the run",
                        description="Fit --head on the caches of --backbone (several are concatenated) with grouped "
                                    "K-fold CV; print the CV table; write runs/<name>/.")
    fit_args(sp)
    sp.add_argument("--backbone", action="append", help=bb_help())
    sp.add_argument("--cache", action="append", help="explicit cache file(s) instead of --backbone lookup")
    sp.add_argument("--head", default="ridge", help=head_choices_help() + " (default: %(default)s)")
    sp.add_argument("--name", default=None, help="run name (default: <table>-<backbone>-<head>)")
    sp.add_argument("--nested", action="store_true",
                    help="also keep each fold's inner out-of-fold predictions (the head refitted on every inner "
                         "fold: about folds+1 times the fit time), so that `stack --method cross-gene` can learn "
                         "and be scored without the held-out fold")
    sp.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                    help="fit from disk in row chunks, never holding all features or targets (ridge and PLS heads; "
                         "chosen automatically, and said so, when the table file is larger than half the machine's "
                         "memory; --no-stream always fits in memory)")
    sp.set_defaults(func=cmd_fit)
    sp = sub.add_parser("compare", help="backbones x heads table of CV PCC and fit time",
                        description="Fit every --head on every --backbone cache, print one table (best marked) and "
                                    "save a PNG of per-gene PCC distributions. Each pair is also saved as a run.")
    fit_args(sp)
    sp.add_argument("--backbone", action="append", required=True, help=bb_help())
    sp.add_argument("--head", action="append", required=True, help="head (repeatable): " + head_choices_help())
    sp.add_argument("--plot", default=None, help="PNG of per-gene PCC distributions (default: <runs-dir>/compare-<table>.png)")
    sp.set_defaults(func=cmd_compare)


def cmd_fit(args) -> int:
    from regress.runs.fit import FitConfig, fit

    group_col, use_groups = _groups_arg(args.groups)
    config = FitConfig(args.data, tuple(args.backbone or ()), args.head, cache_dir=args.cache_dir,
                       runs_dir=args.runs_dir, cache_files=args.cache, folds=args.folds, group_col=group_col,
                       use_groups=use_groups, seed=args.seed, device=args.device, name=args.name, context=args.context,
                       head_params=_head_params(args), overwrite=args.overwrite, stream=args.stream,
                       smooth=args.smooth, center_slides=args.center_slides, cross_gene=args.cross_gene,
                       nested=args.nested)
    res = fit(config)
    m = res.metrics
    _print_table([{"head": args.head, "PCC/gene by fold": f"{m['pcc_gene_mean_by_fold']:.4f}",
                   "PCC/gene pooled": f"{m['pcc_gene_mean']:.4f}", "median pooled": f"{m['pcc_gene_median']:.4f}",
                   "PCC/tile": f"{m['pcc_tile_mean']:.4f}", "MSE": f"{m['mse']:.4f}", "CV s": f"{res.fit_seconds:.1f}"}],
                 ["head", "PCC/gene by fold", "PCC/gene pooled", "median pooled", "PCC/tile", "MSE", "CV s"])
    print("PCC/gene by fold: mean over genes, each held-out fold scored on its own, averaged over folds "
          "(HEST convention); pooled: all out-of-fold rows at once.")
    if m["constant_genes"]:
        print(f"{len(m['constant_genes'])} constant genes have no PCC and are excluded from the means.")
    if args.cross_gene:
        from regress.runs.folder import load_run

        cg = load_run(res.path).info["cross_gene"]
        print(f"--cross-gene: blend {cg['blend']:g}, alpha {cg['alpha']:g} (chosen by nested CV); PCC/gene by fold "
              f"without it {cg['before']['pcc_gene_mean_by_fold']:.4f}.")
    print(f"run written to {res.path}")
    return 0

def cmd_compare(args) -> int:
    from regress.runs.compare import compare

    group_col, use_groups = _groups_arg(args.groups)
    rows, png = compare(args.data, args.backbone, args.head, cache_dir=args.cache_dir, runs_dir=args.runs_dir,
                        folds=args.folds, group_col=group_col, use_groups=use_groups, seed=args.seed,
                        device=args.device, out=args.plot, context=args.context, head_params=_head_params(args),
                        overwrite=args.overwrite, smooth=args.smooth, center_slides=args.center_slides,
                        cross_gene=args.cross_gene)
    _print_table(rows, ["backbone", "head", "pcc_gene_by_fold", "pcc_gene_pooled", "pcc_tile", "fit_s", "best"])
    print(f"per-gene PCC distributions: {png}")
    return 0
