"""``cli.py demo``: the whole pipeline on real her2st tissue."""
from __future__ import annotations



def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("demo", help="end-to-end demo on real her2st tissue (or a labelled synthetic set offline)",
                        description="Import the her2st sections (../shared/data/her2st when present, else the user "
                                    "cache, else a clearly labelled synthetic set), embed them with real ImageNet "
                                    "efficientnet_lite0 weights, fit ridge with leave-one-section-out CV and print "
                                    "the result next to a predict-the-mean baseline.")
    sp.add_argument("--work-dir", "--workdir", dest="workdir", default="demo_data",
                    help="where tiles, caches and runs go (default: %(default)s; --workdir is the old spelling)")
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sp.add_argument("--quick", action="store_true", help="two sections only (for tests)")
    sp.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from regress.demo import run_demo

    return run_demo(args.workdir, device=args.device, quick=args.quick)
