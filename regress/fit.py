"""Fit a head on cached features with grouped CV and write a run folder (:mod:`regress.runs`)."""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featurize import __version__
from featurize.errors import UsageError
from featurize.importers.common import read_sidecar, slide_images_of, tile_um_of
from regress.cv import accepts_groups, cross_val_predict_groups, make_splits
from regress.heads import is_plugin, make_head
from regress.metrics import evaluate, evaluate_by_fold
from regress.runs import RUN_FORMAT, RunData, digest_array, identity_of, jsonable, refuse_other_identity, write_run
from regress.training import TrainingData, load_training_data


@dataclass
class RunResult:
    path: Path
    metrics: dict[str, Any]
    fit_seconds: float
    oof: np.ndarray


def run_name(td: TrainingData, head: str, context: int) -> str:
    bb = "+".join(c["backbone"] for c in td.caches)
    ctx = f"-ctx{context}" if context else ""
    return f"{td.table.name}-{bb}-{head}{ctx}".replace(":", "_").replace("/", "_")


def fit_run(data, backbones: Sequence[str], head: str = "ridge", *, cache_dir="cache", runs_dir="runs",
            cache_files: Sequence[str] | None = None, folds: int = 5, group_col: str | None = None,
            use_groups: bool = True, seed: int = 0, device: str = "cpu", name: str | None = None,
            command: str | None = None, log=print, training: TrainingData | None = None,
            context: int = 0, head_params: dict[str, Any] | None = None, overwrite: bool = False) -> RunResult:
    """Cross-validate ``head`` on the cached features, refit on all rows, write the run folder.

    An existing folder of the same name with another identity (different
    folds, seed, grouping, head parameters, table or caches) is refused
    unless ``overwrite``.
    """
    td = training or load_training_data(data, backbones, cache_dir, cache_files, group_col, context)
    groups = td.groups if use_groups else None
    if groups is not None and len(np.unique(groups)) < 2:
        alt = [f"--groups slide ({len(np.unique(td.slides))} slides)"] if td.slides is not None and \
            len(np.unique(td.slides)) > 1 and td.table.group_col != "slide" else []
        raise UsageError(f"{td.table.source}: column '{td.table.group_col}' has one value ({groups[0]!r}), but "
                         f"grouped CV needs at least 2; use {', '.join(alt + ['--groups none (plain K-fold)'])}, "
                         "or re-import with --patient SECTION=PATIENT.")
    est = make_head(head, device, seed, head_params)  # parameters checked before any work
    splits = make_splits(len(td.ids), folds, groups, seed)
    fold_of = np.zeros(len(td.ids), dtype=np.int32)
    for f, (_, val) in enumerate(splits):
        fold_of[val] = f
    if device.startswith("cuda") and head in ("pls", "mean"):
        log(f"[fit] note: head '{head}' has no GPU path and runs on the CPU.")
    params = {k: jsonable(v) for k, v in est.get_params(deep=False).items()}
    identity_fields = {
        "format": RUN_FORMAT,
        "table": {"rows": td.table.fingerprint(), "used_rows": digest_array(td.ids.astype("U")),
                  "targets": td.table.targets_digest(), "group_col": td.table.group_col if use_groups else None},
        "caches": [{"backbone": c["backbone"], "key": c["fingerprint"], "content": c["table_fingerprint"]}
                   for c in td.caches],
        "head": {"name": head, "params": {k: repr(v) for k, v in params.items()}},
        "folds": {"n": folds, "seed": seed, "grouped": groups is not None},
        "context": context,
    }
    name = name or run_name(td, head, context)
    refuse_other_identity(Path(runs_dir) / name, identity_fields, overwrite)
    t0 = time.perf_counter()
    try:
        oof = cross_val_predict_groups(est, td.X, td.Y, splits, groups,
                                       on_fold=lambda i, s: log(f"[fit] {head}: fold {i + 1}/{len(splits)} in {s:.1f}s"))
        cv_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = make_head(head, device, seed, head_params)
        model.fit(td.X, td.Y, **({"groups": groups} if groups is not None and accepts_groups(model) else {}))
        refit_seconds = time.perf_counter() - t1
    except (ValueError, TypeError) as exc:
        if not is_plugin(head) or isinstance(exc, UsageError):
            raise
        raise UsageError(f"--head {head}: the estimator refused the data or its parameters ({exc}).") from exc
    oof = np.asarray(oof, dtype=np.float64).reshape(td.Y.shape)
    metrics = evaluate(td.Y, oof, td.table.genes)
    metrics.update(evaluate_by_fold(td.Y, oof, fold_of))
    sidecar = read_sidecar(td.table.source)
    symbols = (sidecar or {}).get("gene_names", {})
    info = {
        "format": RUN_FORMAT,
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "identity": identity_of(identity_fields),
        "identity_fields": identity_fields,
        "table": {"path": str(td.table.source), "fingerprint": td.table.fingerprint(), "n_rows": len(td.table),
                  "n_used": len(td.ids), "group_col": td.table.group_col if use_groups else None},
        "backbones": td.caches,
        "random_init": any(c["random_init"] for c in td.caches),
        "head": {"name": head, "params": params, "plugin": is_plugin(head)},
        "context": context,
        "folds": {"n": len(splits), "seed": seed, "grouped": groups is not None},
        "genes": td.table.genes,
        "gene_names": [symbols.get(g, g) for g in td.table.genes],
        "tile_um": tile_um_of(sidecar),
        "slide_images": slide_images_of(sidecar),
        "cv_seconds": cv_seconds,
        "refit_seconds": refit_seconds,
        "summary": {k: metrics[k] for k in ("pcc_gene_mean", "pcc_gene_mean_by_fold", "pcc_gene_median",
                                            "pcc_tile_mean", "mse")},
    }
    data = RunData(td.ids, td.table.genes, oof, fold_of, td.Y, groups, td.xy, td.slides)
    path = write_run(Path(runs_dir) / name, info, metrics, data, model, overwrite=overwrite)
    return RunResult(path, metrics, cv_seconds, oof)
