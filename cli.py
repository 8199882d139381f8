"""hexpress command line: one module per command under ``commands/`` turns flags into a library call.

Every command exits 0 on success, 2 on a user error (one sentence naming the file, row or flag at fault),
130 when interrupted.  ``python cli.py --help`` imports no torch, h5py or scikit-learn.
"""
from __future__ import annotations

import os
import sys

from core.errors import HexpressError

#: The commands in the order ``--help`` lists them (each a module of ``commands/`` with ``register(sub)``).
COMMANDS = ("demo", "run", "tiles", "import_embeddings", "pack", "backbones", "embed", "cache", "fit", "stack",
            "predict", "report", "hest_bench")


def build_parser():
    import importlib

    from commands.common import OneLineErrorParser, add_verbosity

    p = OneLineErrorParser(
        prog="python cli.py",
        description="hexpress: predict spatial gene expression from H&E tiles. `run` goes from a tile table to the "
                    "best model in one command; underneath, stage 1 (embed) runs each tile once through frozen "
                    "backbones into HDF5 caches and stage 2 (fit/compare/stack/predict) fits fast heads on those "
                    "caches without re-running a CNN.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineErrorParser)
    for name in COMMANDS:
        importlib.import_module(f"commands.{name}").register(sub)
    add_verbosity(p)
    return p


def _quiet_h5py_teardown(unraisable) -> None:
    """After a write error (a full disk) h5py's object finalisers fail again and print tracebacks as
    "Exception ignored"; the one error line already said what went wrong, so those are dropped."""
    text = f"{getattr(unraisable, 'object', '')!r} {unraisable.exc_value}"
    if "h5py" in text or "file write failed" in text or "ref count" in text:
        return
    sys.__unraisablehook__(unraisable)


def _quiet_h5py_excepthook(kind, value, tb) -> None:
    """Cython prints an h5py finaliser's failure through ``sys.excepthook``: dropped like the above."""
    if kind is RuntimeError and ("file write failed" in str(value) or "ref count" in str(value)):
        return
    sys.__excepthook__(kind, value, tb)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from core.log import scope

    sys.unraisablehook = _quiet_h5py_teardown
    sys.excepthook = _quiet_h5py_excepthook
    with scope(verbose=getattr(args, "verbose", False), quiet=getattr(args, "quiet", False)):
        return _run(args)


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except HexpressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(exc, "hard_exit", False):  # an HDF5 file could not be flushed (full disk): HDF5's own
            sys.stdout.flush()  # teardown would try again and crash; what is on disk is already final
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
