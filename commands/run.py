"""``cli.py run``: one command from a tile table to a model folder (regress.runs.runner)."""
from __future__ import annotations

import argparse

from commands.common import DEFAULT_CACHE, _weights_arg


def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("run", help="one command from a tile table to the best model: plan, embed, fit, stack, report",
                        description="Expand a recipe (quick, default, best, or your TOML file) into a plan: cut the "
                                    "extra tile sizes from the table's source images, embed each table with each "
                                    "backbone once, fit each member with nested CV, stack them; print the plan with "
                                    "estimates from rates measured on this machine, then carry it out. A rerun (after "
                                    "a kill, or with a larger recipe) does only what is missing. Every setting is "
                                    "chosen by inner CV on the table; the report says which levers earned weight.")
    sp.add_argument("--data", required=True, help="training tile table (CSV or Parquet) with gene columns")
    sp.add_argument("--recipe", default="default", help="quick, default, best (shipped; see regress/runs/recipes/) "
                    "or a recipe file *.toml (default: %(default)s)")
    sp.add_argument("--budget", default=None, metavar="DURATION",
                    help="keep the most valuable members whose estimated time fits, e.g. 30m, 1h30m (default: all)")
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    sp.add_argument("--out", default=None, help="FOLDER of the model (default: runs/<table>-<recipe>)")
    sp.add_argument("--cache-dir", default=DEFAULT_CACHE, help="embedding cache folder, also where measured rates are "
                    "kept (default: %(default)s)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the heads and K-fold shuffles (default: %(default)s)")
    sp.add_argument("--plan", action="store_true", help="print the plan and its estimate; do nothing")
    sp.add_argument("--lopo", action=argparse.BooleanOptionalAction, default=None,
                    help="also score the recipe leave-one-patient-out (default: when the table holds two or more "
                         "patients and the folds are not already by patient)")
    sp.add_argument("--no-ablation", action="store_true", help="skip the stacks without each lever (evaluation only)")
    sp.add_argument("--weights", action="append", metavar="NAME=PATH", help="weights file for a backbone (repeatable)")
    sp.add_argument("--random-init", action="store_true",
                    help="allow random weights for backbones without any (recorded in every cache and run)")
    sp.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from regress.runs.runner import RunConfig, parse_budget, run

    bbs = sorted({v.partition("=")[0] for v in args.weights or [] if "=" in v})
    config = RunConfig(args.data, args.recipe, budget_s=parse_budget(args.budget), device=args.device, out=args.out,
                       cache_dir=args.cache_dir, seed=args.seed, plan_only=args.plan, lopo=args.lopo,
                       ablation=not args.no_ablation, progress=not args.quiet,
                       weights=_weights_arg(args.weights, bbs) if args.weights else None,
                       random_init=args.random_init)
    run(config)
    return 0
