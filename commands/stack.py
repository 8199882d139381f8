"""``cli.py stack``: blend runs per gene from their out-of-fold predictions."""
from __future__ import annotations


from commands.common import DEFAULT_RUNS, stack_methods


def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("stack", help="blend several runs per gene from their out-of-fold predictions",
                        description="Learn per-gene blend weights (non-negative, summing to one) from the runs' OOF "
                                    "predictions; its score is cross-fitted and printed beside the best single run "
                                    "and the plain average.")
    sp.add_argument("runs", nargs="*", metavar="RUN", help="run folders to blend")
    sp.add_argument("--all", metavar="TABLE", action="append",
                    help="also every run under --runs-dir fitted on this tile table (repeatable: the tables of the "
                         "same spots cut at several tile sizes, for a multi-scale stack)")
    sp.add_argument("--runs-dir", default=DEFAULT_RUNS, help="where --all looks for runs (default: %(default)s)")
    sp.add_argument("--method", choices=stack_methods(), default="nnls",
                    help="nnls: non-negative per-gene weights summing to one (default); select: the same over runs "
                         "chosen by forward selection on the cross-fitted score, shrunk toward one global blend by "
                         "inner CV; shrink: every run, only the shrinkage chosen by inner CV (steadier than select "
                         "over many similar runs); ridge: per-gene ridge on the runs' predictions; cross-gene: the runs' "
                         "average mixed with one ridge map from every run's predictions of every gene, learned and "
                         "scored on inner predictions that never saw the held-out fold (runs fitted with --nested)")
    sp.add_argument("--alpha", type=float, default=None, help="penalty of --method ridge (default 1.0)")
    sp.add_argument("--center-folds", action="store_true",
                    help="learn the weights on each CV fold's deviations from its own mean (what the by-fold "
                         "PCC scores): with folds grouped by slide, runs' slide offsets cost them no weight")
    sp.add_argument("--out", default=None, help="FOLDER the stack is written to (default: <runs' folder>/stack-<table>)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing stack folder made from other runs")
    sp.set_defaults(func=cmd_stack)


def cmd_stack(args) -> int:
    from core.log import debug, warn
    from regress.runs.stack import runs_of_tables, stack_runs

    runs = list(args.runs or []) + (runs_of_tables(args.runs_dir, args.all, log=warn) if args.all else [])
    res = stack_runs(runs, out_dir=args.out, method=args.method, alpha=args.alpha, overwrite=args.overwrite,
                     center_folds=args.center_folds, log=debug)
    for row in res.summary:  # the result: to stdout
        print(f"{row['run']}: PCC/gene by fold {row['pcc_gene_by_fold']:.4f}, pooled {row['pcc_gene_pooled']:.4f}")
    print(f"stack written to {res.path}")
    return 0
