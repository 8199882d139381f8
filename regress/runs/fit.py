"""Fit a head on cached features with grouped CV and write a run folder (:mod:`regress.runs.folder`)."""
from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core import __version__
from core.errors import UsageError
from core.log import say
from featurize.tables.table import read_sidecar, slide_images_of, tile_um_of
from regress.cv import (
    accepts_groups,
    cross_val_predict_groups,
    fold_labels,
    make_splits,
)
from regress.heads.registry import is_plugin, make_head
from regress.metrics import evaluate, evaluate_by_fold
from regress.runs.folder import (
    RUN_FORMAT,
    RunData,
    digest_array,
    identity_of,
    jsonable,
    refuse_other_identity,
    run_identity_fields,
    write_run,
)
from regress.training import TrainingData, cache_info, load_training_data


@dataclass
class RunResult:
    path: Path
    metrics: dict[str, Any]
    fit_seconds: float
    oof: np.ndarray
    reused: bool = False


def run_name(td: TrainingData, head: str, context: int) -> str:
    bb = "+".join(c["backbone"] for c in td.caches)
    ctx = f"-ctx{context}" if context else ""
    return f"{td.table.name}-{bb}-{head}{ctx}".replace(":", "_").replace("/", "_")


#: The heads ``fit --stream`` fits (from disk in row chunks).
STREAMABLE = ("ridge", "ridge-pcc", "pls")


def check_fit_settings(folds, context: int, smooth: int) -> None:
    """Refuse fold counts and neighbour counts that cannot mean anything (before any table is read)."""
    if isinstance(folds, (int, np.integer)) and not isinstance(folds, bool) and folds < 2:
        raise UsageError(f"--folds {folds}: cross-validation needs at least 2 folds.")
    if not isinstance(context, (int, np.integer)) or context < 0:
        raise UsageError(f"--context {context}: the number of neighbours must be 0 (none) or more.")
    if not isinstance(smooth, (int, np.integer)) or smooth < 0:
        raise UsageError(f"--smooth {smooth}: the number of neighbours must be 0 (none) or more.")


@dataclass(frozen=True)
class FitConfig:
    """Everything one fit needs, refused when made if it cannot mean anything (the CLI builds one from its
    flags; a runner can build one from a recipe): the same rules for every caller.

    ``data``: the tile table (path or :class:`TileTable`); ``backbones`` or ``cache_files``: the features;
    ``stream``: fit from disk in row chunks (:mod:`regress.runs.stream`; ridge and PLS heads), ``None`` chooses it when
    the table file alone is larger than half the machine's memory; ``cross_gene`` and ``smooth`` post-process the
    head's predictions (in that order), their settings chosen by nested CV (:mod:`regress.post.steps`); ``nested`` keeps
    each outer fold's inner out-of-fold predictions (what ``stack --method cross-gene`` learns from); an existing
    run of the same name with another identity is replaced only with ``overwrite``; ``reuse`` returns a finished
    run of the same name and identity as it is instead of fitting it again (what ``run`` does on a rerun)."""

    data: Any
    backbones: tuple[str, ...] = ()
    head: str = "ridge"
    cache_dir: str | os.PathLike = "cache"
    runs_dir: str | os.PathLike = "runs"
    cache_files: tuple[str, ...] | None = None
    folds: int = 5
    group_col: str | None = None
    use_groups: bool = True
    seed: int = 0
    device: str = "cpu"
    name: str | None = None
    context: int = 0
    head_params: dict[str, Any] | None = None
    overwrite: bool = False
    stream: bool | None = None
    smooth: int = 0
    center_slides: bool = False
    cross_gene: bool = False
    nested: bool = False
    reuse: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbones", tuple(self.backbones or ()))
        if self.cache_files is not None:
            object.__setattr__(self, "cache_files", tuple(str(c) for c in self.cache_files) or None)
        if self.backbones and self.cache_files:
            raise UsageError("--backbone and --cache contradict each other; name the features one way.")
        check_fit_settings(self.folds, self.context, self.smooth)
        if self.smooth and self.stream:
            raise UsageError("--smooth needs the predictions in memory; drop --stream.")
        if self.center_slides and self.stream:
            raise UsageError("--center-slides needs the features in memory; drop --stream.")
        if (self.cross_gene or self.nested) and self.stream:
            raise UsageError(f"{'--cross-gene' if self.cross_gene else '--nested'} refits the head inside every fold "
                             "in memory; drop --stream.")
        if self.nested and (self.cross_gene or self.smooth):
            raise UsageError("--nested keeps the head's own inner predictions for stacking; fit it without "
                             "--cross-gene and --smooth (stack --method cross-gene applies the cross-gene map itself).")


def fit(config: FitConfig, *, log=say, training: TrainingData | None = None, command: str | None = None) -> RunResult:
    """Cross-validate ``config.head`` on the cached features, refit on all rows, write the run folder."""
    c = config
    return _fit(c.data, list(c.backbones), c.head, cache_dir=c.cache_dir, runs_dir=c.runs_dir,
                cache_files=list(c.cache_files) if c.cache_files else None, folds=c.folds, group_col=c.group_col,
                use_groups=c.use_groups, seed=c.seed, device=c.device, name=c.name, command=command, log=log,
                training=training, context=c.context, head_params=c.head_params, overwrite=c.overwrite,
                stream=c.stream, smooth=c.smooth, center_slides=c.center_slides, cross_gene=c.cross_gene,
                nested=c.nested, reuse=c.reuse)


def fit_run(data, backbones: Sequence[str], head: str = "ridge", *, log=say, training: TrainingData | None = None,
            command: str | None = None, **settings: Any) -> RunResult:
    """The keyword form of :func:`fit`: ``fit(FitConfig(data, backbones, head, **settings))``."""
    return fit(FitConfig(data, tuple(backbones), head, **settings), log=log, training=training, command=command)


def _fit(data, backbones: Sequence[str], head: str, *, cache_dir, runs_dir, cache_files, folds, group_col,
         use_groups, seed, device, name, command, log, training: TrainingData | None, context, head_params, overwrite,
         stream, smooth, center_slides, cross_gene, nested, reuse=False) -> RunResult:
    auto = (training is None and stream is None and not smooth and not center_slides and not cross_gene
            and not nested and _too_big(data))
    if auto:
        if head in STREAMABLE:
            log(f"[fit] {data}: the table file is larger than half this machine's memory, so the fit streams from "
                "disk (--no-stream fits in memory).")
        else:
            log(f"[fit] {data}: the table file is larger than half this machine's memory, but head '{head}' fits in "
                f"memory only (streaming serves {', '.join(STREAMABLE)}).")
            auto = False
    if training is None and (stream or auto):
        return _fit_run_streaming(data, backbones, head, cache_dir=cache_dir, runs_dir=runs_dir,
                                  cache_files=cache_files, folds=folds, group_col=group_col, use_groups=use_groups,
                                  seed=seed, device=device, name=name, command=command, log=log, context=context,
                                  head_params=head_params, overwrite=overwrite)
    td = training or load_training_data(data, backbones, cache_dir, cache_files, group_col, context, center_slides)
    groups = td.groups if use_groups else None
    if groups is not None and len(np.unique(groups)) < 2:
        alt = [f"--groups slide ({len(np.unique(td.slides))} slides)"] if td.slides is not None and \
            len(np.unique(td.slides)) > 1 and td.table.group_col != "slide" else []
        raise UsageError(f"{td.table.source}: column '{td.table.group_col}' has one value ({groups[0]!r}), but "
                         f"grouped CV needs at least 2; use {', '.join(alt + ['--groups none (plain K-fold)'])}, "
                         "or re-import with --patient SECTION=PATIENT.")
    est = make_head(head, device, seed, head_params)  # parameters checked before any work
    splits = make_splits(len(td.ids), folds, groups, seed)
    fold_of = fold_labels(splits, len(td.ids))
    params = {k: jsonable(v) for k, v in est.get_params(deep=False).items()}
    identity_fields = run_identity_fields(
        table_rows=td.table.fingerprint(), used_rows=digest_array(td.ids.astype("U")), targets=td.table.targets_digest(),
        group_col=td.table.group_col if use_groups else None, caches=td.caches, head=head, params=params, folds=folds,
        seed=seed, grouped=groups is not None, context=context, smooth=smooth, center_slides=center_slides,
        cross_gene=cross_gene, nested=nested)
    if smooth and td.xy is None:
        raise UsageError(f"{td.table.source}: --smooth needs x and y columns (tile centres) in the tile table.")
    name = name or run_name(td, head, context) + ("-centered" if center_slides else "") + \
        ("-crossgene" if cross_gene else "") + (f"-smooth{smooth}" if smooth else "") + ("-nested" if nested else "")
    refuse_other_identity(Path(runs_dir) / name, identity_fields, overwrite)
    if reuse:
        done = finished_same(Path(runs_dir) / name, identity_fields)
        if done is not None:
            log(f"[fit] {name}: a finished run with the same identity is there; reused ({done.path}).")
            return done
    tg = td.table.genes  # said once every refusal has had its turn (an error stays the only line on stderr)
    log(f"[fit] {len(tg)} gene columns ({tg[0]}{f' ... {tg[-1]}' if len(tg) > 1 else ''})"
        + (f"; not genes: {', '.join(td.table.ignored[:8])}{' ...' if len(td.table.ignored) > 8 else ''}"
           if td.table.ignored else ""))
    t0 = time.perf_counter()
    post_info: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    inner: list = []
    try:
        from core.faults import point

        def on_fold(i, s):
            log(f"[fit] {head}: fold {i + 1}/{len(splits)} in {s:.1f}s")
            point("fit-after-fold")
        if smooth or cross_gene:
            post_info, extras, oof = _post_processed_cv(est, td, splits, groups, fold_of, seed, smooth, cross_gene,
                                                       on_fold)
        elif nested:
            from regress.post.steps import nested_cv

            oof = nested_cv(est, td.X, td.Y, splits, groups, [], 5, seed, on_fold, inner_out=inner)[0]
        else:
            oof = cross_val_predict_groups(est, td.X, td.Y, splits, groups, on_fold=on_fold)
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
    info = _run_info(td.table, len(td.ids), td.table.group_col if use_groups else None, td.caches, head, params,
                     is_plugin(head), context, len(splits), seed, groups is not None, td.table.genes, identity_fields,
                     metrics, cv_seconds, refit_seconds, command, **post_info,
                     **({"center_slides": True} if center_slides else {}))
    data = RunData(td.ids, td.table.genes, oof, fold_of, td.Y, groups, td.xy, td.slides,
                   *(_inner_arrays(inner, splits, td.Y.shape) if nested else ()))
    path = write_run(Path(runs_dir) / name, info, metrics, data, model, overwrite=overwrite, extras=extras)
    return RunResult(path, metrics, cv_seconds, oof)


def finished_same(final: Path, identity_fields: dict[str, Any]) -> "RunResult | None":
    """The finished, sound run at ``final`` when it has exactly this identity; else None (fit it)."""
    from core.errors import HexpressError
    from regress.runs.folder import load_run

    if not (final / "run.json").is_file():
        return None
    try:
        old = load_run(final)
        if old.info.get("identity") != identity_of(identity_fields):
            return None
        oof = old.data().oof
    except HexpressError:
        return None
    return RunResult(old.path, old.metrics, float(old.info.get("cv_seconds") or 0.0), oof, reused=True)


def _inner_arrays(inner, splits, shape) -> tuple[np.ndarray, np.ndarray]:
    """(inner_oof, inner_fold) of ``oof.h5`` from :func:`regress.post.steps.nested_cv`'s per-fold inner predictions."""
    inner_oof = np.full((len(splits),) + shape, np.nan, dtype=np.float32)
    inner_fold = np.full((len(splits), shape[0]), -1, dtype=np.int32)
    for k, ((tr, _), (p_in, f_in)) in enumerate(zip(splits, inner)):
        inner_oof[k, tr] = p_in
        inner_fold[k, tr] = f_in
    return inner_oof, inner_fold


def _post_processed_cv(est, td: TrainingData, splits, groups, fold_of, seed: int, smooth: int, cross_gene: bool,
                       on_fold) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """(run.json fields, extra fitted models, post-processed OOF) of ``--cross-gene`` and ``--smooth``:
    settings per outer fold from nested CV, the final ones from the run's own out-of-fold predictions."""
    from regress.post.crossgene import CrossGeneStep
    from regress.post.steps import choose_steps, nested_cv
    from regress.post.smooth import SmoothStep

    steps = ([CrossGeneStep(td.slides)] if cross_gene else []) + \
        ([SmoothStep(smooth, td.xy, td.slides, str(td.table.source))] if smooth else [])
    raw, oof, per_fold = nested_cv(est, td.X, td.Y, splits, groups, steps, 5, seed, on_fold)
    final, _ = choose_steps(steps, td.Y, raw, fold_of)
    raw_m = evaluate(td.Y, raw, td.table.genes)
    raw_m.update(evaluate_by_fold(td.Y, raw, fold_of))
    before = {k: raw_m[k] for k in ("pcc_gene_mean", "pcc_gene_mean_by_fold")}
    info: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    if cross_gene:
        m = final[0]
        info["cross_gene"] = {"alpha": m.alpha, "blend": m.blend, "fold_alphas": [f[0].alpha for f in per_fold],
                              "fold_blends": [f[0].blend for f in per_fold], "before": before}
        extras["cross_gene"] = m
    if smooth:
        lam, fold_lams = final[-1], np.asarray([f[-1] for f in per_fold])
        info["smooth"] = {"k": smooth, "lambdas": lam.tolist(), "lambda_mean": float(lam.mean()),
                          "fold_lambda_means": fold_lams.mean(1).tolist(), "unsmoothed": before}
    return info, extras, oof


def _run_info(table, n_used, group_col, caches, head, params, plugin, context, n_folds, seed, grouped, genes,
              identity_fields, metrics, cv_seconds, refit_seconds, command, **extra) -> dict[str, Any]:
    """run.json (the contract in :mod:`regress.runs.folder`), for in-memory and streamed fits alike."""
    sidecar = read_sidecar(table.source)
    symbols = (sidecar or {}).get("gene_names", {})
    return {
        "format": RUN_FORMAT,
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "identity": identity_of(identity_fields),
        "identity_fields": identity_fields,
        "table": {"path": str(table.source), "fingerprint": table.fingerprint(), "n_rows": len(table),
                  "n_used": n_used, "group_col": group_col},
        "backbones": caches,
        "random_init": any(c["random_init"] for c in caches),
        "head": {"name": head, "params": params, "plugin": plugin},
        "context": context,
        "folds": {"n": n_folds, "seed": seed, "grouped": grouped},
        "genes": list(genes),
        "gene_names": [symbols.get(g, g) for g in genes],
        "tile_um": tile_um_of(sidecar),
        "slide_images": slide_images_of(sidecar),
        "cv_seconds": cv_seconds,
        "refit_seconds": refit_seconds,
        "summary": {k: metrics[k] for k in ("pcc_gene_mean", "pcc_gene_mean_by_fold", "pcc_gene_median",
                                            "pcc_tile_mean", "mse")},
        **extra,
    }


def _too_big(data) -> bool:
    from regress.runs.stream import STREAM_ABOVE_FRACTION

    try:
        size = Path(data).stat().st_size
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (TypeError, OSError, ValueError, AttributeError):
        return False
    return size > STREAM_ABOVE_FRACTION * total


def _fit_run_streaming(data, backbones, head, *, cache_dir, runs_dir, cache_files, folds, group_col, use_groups,
                       seed, device, name, command, log, context, head_params, overwrite) -> RunResult:
    """fit_run from disk: the targets' columnar file and the caches, a block of rows at a time."""
    from featurize.cache import find_cache, read_attrs, require_cache_files
    from featurize.tables.table import read_table
    from regress.runs.stream import fit_streaming, targets_store

    if context:
        raise UsageError("--stream does not compute --context features; fit with --context in memory.")
    if not backbones and not cache_files:
        raise UsageError("name the features to fit on: --backbone NAME (repeatable) or --cache FILE.")
    if not cache_files:
        require_cache_files(data, backbones, cache_dir)
    table = read_table(data, group_col=group_col, check_files=False, meta_only=True)
    caches = [Path(c) for c in cache_files] if cache_files else [find_cache(table, b, cache_dir) for b in backbones]
    infos = [cache_info(c, read_attrs(c)) for c in caches]
    targets = targets_store(table.source, cache_dir, table.group_col)
    est = make_head(head, device, seed, head_params)
    grouped = use_groups and table.group_col is not None
    params = {k: jsonable(v) for k, v in est.get_params(deep=False).items()}
    identity_fields = run_identity_fields(
        table_rows=table.fingerprint(), targets=targets.stem, group_col=table.group_col if grouped else None,
        caches=infos, head=head, params=params, folds=folds, seed=seed, grouped=grouped, context=0)
    name = name or f"{table.name}-{'+'.join(c['backbone'] for c in infos)}-{head}".replace(":", "_").replace("/", "_")
    final = Path(runs_dir) / name
    refuse_other_identity(final, identity_fields, overwrite)
    t0 = time.perf_counter()
    write_oof, acc, genes, n = fit_streaming(targets, caches, est, groups_on=grouped, n_folds=folds, seed=seed, log=log)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_oof = final.with_name(f".{final.name}.oof-{os.getpid()}.h5")
    try:
        write_oof(tmp_oof)
        metrics = acc.result(genes)
        del est.fold_models_, est.folds_  # CV artefacts: the saved model is the refit on all rows
        seconds = time.perf_counter() - t0
        info = _run_info(table, n, table.group_col if grouped else None, infos, head, params, False, 0, len(acc.n),
                         seed, grouped, genes, identity_fields, metrics, seconds, 0.0, command, streamed=True)
        path = write_run(final, info, metrics, lambda p: os.replace(tmp_oof, p), est, overwrite=overwrite)
    finally:
        if tmp_oof.exists():
            tmp_oof.unlink()
    return RunResult(path, metrics, seconds, None)
