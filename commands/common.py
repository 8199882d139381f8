"""What every command module shares: the one-line error parser, the flag groups that keep names and meanings
the same across commands (``--data``/``--cache-dir``, the fit flags, the predict flags, ``--quiet``/``--verbose``)
and the small flag parsers.  Nothing here imports torch, h5py or scikit-learn (``--help`` stays fast)."""
from __future__ import annotations

import argparse

from core.errors import HexpressError

DEFAULT_CACHE = "cache"
DEFAULT_RUNS = "runs"


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes end in one ``error:`` line (naming the command) and exit 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _weights_arg(values: list[str] | None, backbones: list[str]) -> dict[str, str]:
    """``--weights PATH`` (one backbone) or ``--weights NAME=PATH`` (several)."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if sep and name in backbones:
            out[name] = path
        elif len(backbones) == 1:
            out[backbones[0]] = v
        else:
            raise HexpressError(f"--weights {v}: with several backbones write --weights NAME=PATH.")
    return out


def _groups_arg(value: str | None) -> tuple[str | None, bool]:
    if value is None:
        return None, True
    if value.lower() == "none":
        return None, False
    return value, True


def _print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def _head_params(args) -> dict:
    from regress.heads.registry import parse_head_params

    return parse_head_params(args.head_param)


def common_data(sp, required=True, data_help="tile table (CSV or Parquet): ID, path, [slide/patient], [x, y], "
                                             "gene columns", repeatable=False):
    sp.add_argument("--data", required=required, help=data_help, **({"action": "append"} if repeatable else {}))
    sp.add_argument("--cache-dir", default=DEFAULT_CACHE, help="embedding cache folder (default: %(default)s)")


def bb_help() -> str:
    from featurize.models.backbones import list_backbones

    return (f"backbone name (repeatable): {', '.join(list_backbones())}, or timm:<model>; variants NAME+stages, "
            "NAME@SIZE (see `cli.py backbones`)")


def stack_methods() -> tuple[str, ...]:
    from regress.runs.stack_methods import METHODS

    return tuple(METHODS)


def predict_args(sp):
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda, for embedding tiles not yet cached (default: %(default)s)")
    sp.add_argument("--batch-size", type=int, default=64, help="tiles per batch when embedding (default: %(default)s)")
    sp.add_argument("--trust-pickle", action="store_true", help="allow loading a plug-in head stored with pickle "
                    "(runs code from the run folder: only for folders you trust)")


def fit_args(sp):
    common_data(sp)
    sp.add_argument("--runs-dir", default=DEFAULT_RUNS, help="where run folders go (default: %(default)s)")
    sp.add_argument("--folds", type=int, default=5, help="CV folds; >= number of groups means leave-one-group-out")
    sp.add_argument("--groups", default=None, help="grouping column (default: patient/slide/section/group if present); 'none' for plain K-fold")
    sp.add_argument("--seed", type=int, default=0, help="seed of the K-fold shuffle and of the heads (default: %(default)s)")
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda (ridge and mlp have GPU paths; default: %(default)s)")
    sp.add_argument("--head-param", action="append", metavar="NAME=VALUE",
                    help="set a head's constructor parameter (repeatable), e.g. --head-param alpha=3")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace an existing run of the same name fitted with other settings")
    sp.add_argument("--smooth", type=int, default=0, metavar="K",
                    help="blend each prediction with the mean prediction of its K nearest tiles (same slide), "
                         "strength per gene chosen by inner CV on the training folds (needs x, y; default 0 = off)")
    sp.add_argument("--cross-gene", action="store_true",
                    help="blend each gene's prediction with a ridge regression of that gene on every gene's "
                         "prediction (co-expressed genes inform each other); ridge strength and blend weight "
                         "chosen by nested CV on the training folds, which refits the head once per inner "
                         "fold (about folds+1 times the fit time)")
    sp.add_argument("--context", type=int, default=0, metavar="K",
                    help="append the mean features of the K nearest tiles of the same slide (needs x, y; default 0 = off)")
    sp.add_argument("--center-slides", action="store_true",
                    help="features as each tile's deviation from its slide's mean feature vector, plus that "
                         "mean (stain and scanner offsets between slides out of the tile-level part; a new "
                         "slide is centred on its own tiles; needs a slide column)")


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--verbose`` on every command (the leaves of the subcommand tree), one meaning everywhere."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                add_verbosity(sp)
            return
    opts = {o for a in parser._actions for o in a.option_strings}
    if "--quiet" not in opts:
        parser.add_argument("--quiet", action="store_true", help="warnings and errors only (no step-by-step lines)")
    if "--verbose" not in opts:
        parser.add_argument("--verbose", action="store_true", help="also show the debug lines")
