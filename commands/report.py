"""``cli.py report``: a Markdown report of a run or stack."""
from __future__ import annotations



def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("report", help="Markdown report with histogram, best/worst genes and a spatial map",
                        description="Write <run>/report/report.md with PNGs.")
    sp.add_argument("run", metavar="RUN", help="run or stack folder")
    sp.add_argument("--gene", help="gene for the spatial map (default: the best-predicted)")
    sp.add_argument("--slide", help="slide for the spatial map (default: the largest)")
    sp.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from regress.outputs.report import write_report

    print(write_report(args.run, gene=args.gene, slide=args.slide))
    return 0
