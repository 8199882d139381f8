"""Predict a test table with a finished run or stack and write the submission CSV.

Test tiles are embedded with exactly the training caches' settings (backbone
spec, weights by sha256, TTA, dtype; checked by comparing cache keys) when
their cache is missing.  The CSV has ``ID`` plus the genes in the training
order, or in the column order of ``--template``; rows follow the test table.
Nothing is written when genes, IDs or shapes disagree, or when a prediction
is not finite; the file appears only once complete (temporary name, rename).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from featurize.cache import find_cache, read_cache
from core.errors import CacheError, RunError, TableError
from featurize.engine.extract import embed
from core.log import say
from featurize.tables.table import TileTable, index_of, read_table, write_csv_atomic
from regress.post.context import neighbour_features, slide_split
from regress.runs.folder import Run, open_result
from regress.runs.scales import assign_tables
from regress.runs.stack import check_runs


def _check_imported(train: dict, test: dict, path, b: dict, log) -> None:
    """Imported embeddings come from other files for the test tiles, so their keys differ by design; what must
    agree is what makes the numbers comparable: the backbone name, width, dtype, TTA and the patch size."""
    ps = lambda k: (k.get("params") or {}).get("patch_size_level0")  # noqa: E731
    checks = [("backbone", train["spec"].get("name"), test["spec"].get("name")),
              ("embedding width", train["spec"].get("embed_dim"), test["spec"].get("embed_dim")),
              ("dtype", train.get("dtype"), test.get("dtype")), ("TTA", train.get("tta"), test.get("tta"))]
    if ps(train) is not None and ps(test) is not None:
        checks.append(("patch size (level-0 px)", ps(train), ps(test)))
    for what, a, t in checks:
        if a != t:
            raise CacheError(f"{path}: imported test features differ from the training cache {b['cache']} in their "
                             f"{what} ({t!r}, trained on {a!r}); import the test embeddings from the same encoder.")
    log(f"[predict] {b['backbone']}: test features imported from {test['spec'].get('architecture', '?')} "
        f"(training: {train['spec'].get('architecture', '?')}); hexpress checks their width, dtype and patch size, "
        "not that the same encoder made them.")


def _features_for(run: Run, test: TileTable, cache_dir, device: str, batch_size: int, log) -> np.ndarray:
    """The run's feature matrix for the test table, embedding what is missing."""
    blocks = []
    for b in run.info["backbones"]:
        name = b["backbone"]
        key_train = b.get("key")
        if b["weights_source"] == "external-file":
            path = find_cache(test, name, cache_dir)
        else:
            weights = {name: b["weights_path"]} if b["weights_source"] == "file" else None
            decode = "pil" if (key_train or {}).get("decoder", "pil") == "pil" else "device"  # the training decoder
            path = embed(test, [name], weights=weights, random_init=b["random_init"], tta=b["tta"], dtype=b["dtype"],
                         cache_dir=cache_dir, device=device, batch_size=batch_size, progress=True, decode=decode)[0]
        cache = read_cache(path, expect_ids=None)
        key_test = json.loads(cache.attrs["key_json"])
        if key_train is not None:
            a, t = dict(key_train), dict(key_test)
            for k in (a, t):
                k.get("spec", {}).pop("notes", None)
            if b["weights_source"] != "external-file" and a != t:
                raise CacheError(f"{path}: test features were made with other settings than the training cache "
                                 f"{b['cache']} (backbone, weights, TTA, dtype or decoder differ); re-embed with the run's settings.")
            if b["weights_source"] == "external-file":
                _check_imported(a, t, path, b, log)
        missing = sorted(set(test.ids) - set(cache.ids))
        if missing:
            raise CacheError(f"{path}: no features for {len(missing)} test tiles (first: {missing[:3]}); "
                             "embed without --skip-bad or fix those images.")
        blocks.append(cache.features[index_of(cache.ids, test.ids)])
        log(f"[predict] {name}: {path}")
    X = np.concatenate(blocks, axis=1)
    X = neighbour_features(X, test.xy, test.slides, int(run.info.get("context", 0)), str(test.source))
    if run.info.get("center_slides"):
        if test.slides is None:
            log(f"[predict] {test.source} has no slide column: its tiles are centred as one slide (--center-slides).")
        X = slide_split(X, test.slides)
    return X


def model_tables(doc: dict, model_path, data, log=say) -> list:
    """The test tables a model folder needs: the one given, and each extra tile size the model was trained on,
    cut from it around the same centres (:func:`featurize.tables.rescale.scaled_table`); several tables
    given are taken as they are."""
    from featurize.tables.rescale import can_rescale, scaled_table

    given = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    extra = [float(s) for s in doc["scales"] if float(s) != 1.0]
    if len(given) != 1 or not extra:
        return given
    why = can_rescale(given[0])
    if why:
        raise TableError(f"{model_path} was trained on tiles at {', '.join(f'{s:g}x' for s in [1.0, *extra])} "
                         f"the spot's tile, but {why}; import the test table with `tiles` from its images (then "
                         "predict cuts the other sizes itself), or pass one --data per size.")
    return [given[0], *(scaled_table(given[0], s, log=log) for s in extra)]


def predict_table(model_path: str | os.PathLike, data: str | os.PathLike | Sequence[str | os.PathLike], *,
                  cache_dir="cache", template: str | os.PathLike | None = None, device: str = "auto",
                  batch_size: int = 64, trust_pickle: bool = False, force_size: bool = False,
                  log=say) -> pd.DataFrame:
    """Predictions for every tile of ``data`` as a DataFrame (ID + genes).

    Everything about training comes from the run (or stack) folder itself;
    the training table and its tiles are not needed.  ``data`` may be several
    tables of the same tiles cut at different physical sizes, for a stack of
    runs trained on several (:mod:`regress.runs.scales` gives each run its own);
    rows follow the first.  ``force_size``: one table is used whatever its tiles' recorded size.
    """
    from regress.runs.model import is_model, read_model

    if is_model(model_path):  # a model folder of `run`: its result, and the extra tile sizes cut from the test table
        doc = read_model(model_path)
        data = model_tables(doc, model_path, data, log)
        model_path = doc["_result_path"]
    res = open_result(model_path)
    if res.kind == "stack":
        from regress.runs.stack import load_stack

        info, stack, runs = load_stack(model_path)
        genes = list(info["genes"])
        check_runs(runs)
    else:
        runs, stack, genes = [res], None, res.genes
    tables = [read_table(p) for p in ([data] if isinstance(data, (str, os.PathLike)) else list(data))]
    test = tables[0]
    for t in tables[1:]:
        if not np.array_equal(t.ids, test.ids):
            raise TableError(f"{t.source}: its IDs differ from {test.source}'s; tables of several tile sizes must list "
                             "the same tiles in the same order (cut from the same spots).")
    per_run = assign_tables(runs, tables, force=force_size)
    train_ids = res.data().ids
    overlap = np.intersect1d(train_ids, test.ids)
    if len(overlap):
        raise TableError(f"{test.source}: {len(overlap)} IDs were training rows of {model_path} "
                         f"(first: {overlap[:3].tolist()}); test IDs must be new tiles.")
    models = [run.model(trust_pickle=trust_pickle) for run in runs]  # before any embedding: refusals come first
    _check_precision(runs, device)
    preds = []
    for run, model, table in zip(runs, models, per_run):
        X = _features_for(run, table, cache_dir, device, batch_size, log)
        P_run = np.asarray(model.predict(X), dtype=np.float64).reshape(len(test), -1)
        cross = run.cross_gene()
        if cross is not None:  # the run's cross-gene stage, before any smoothing (the order it was fitted in)
            if test.slides is None:
                log(f"[predict] {test.source} has no slide column: --cross-gene acts on its tiles as one slide.")
            P_run = cross.predict(P_run, test.slides)
        sm = run.info.get("smooth")
        if sm:  # the run's spatial smoothing, with the test tiles' own neighbours
            from regress.post.smooth import SmoothStep

            step = SmoothStep(int(sm["k"]), test.xy, test.slides, str(test.source), "a run fitted with --smooth")
            P_run = step.apply(P_run, np.asarray(sm["lambdas"]), np.arange(len(test)))
        preds.append(P_run)
    P = stack.predict(preds, test.slides) if stack is not None else preds[0]
    if P.shape != (len(test), len(genes)):
        raise RunError(f"{model_path}: predictions have shape {P.shape}, expected {(len(test), len(genes))}.")
    if not np.isfinite(P).all():
        raise RunError(f"{model_path}: the model produced NaN or inf; refusing to write a submission.")
    df = pd.concat([pd.DataFrame({"ID": test.ids}), pd.DataFrame(P.astype(np.float32), columns=genes)], axis=1)
    if template is not None:
        df = _apply_template(df, Path(template), genes, test)
    return df


def _check_precision(runs: list[Run], device: str) -> None:
    """Refuse, before embedding anything, a device whose forward precision differs from the training caches'."""
    from featurize.models.backbones import get_spec
    from featurize.engine.decode import resolve_decoder
    from core.device import resolve_device
    from featurize.engine.extract import compute_dtype

    dev = None
    for run in runs:
        for b in run.info["backbones"]:
            if b["weights_source"] == "external-file":
                continue
            want = b.get("key", {}).get("compute", "float32")
            dev = dev or resolve_device(device)
            got = compute_dtype(dev, get_spec(b["backbone"]))
            if got != want:
                raise CacheError(f"{b['cache']}: training features were computed in {want} but --device {device} "
                                 f"computes {got}; predict with the device the training caches were made on.")
            decoder = b.get("key", {}).get("decoder", "pil")
            if decoder != "pil" and decoder != resolve_decoder("device", dev):
                raise CacheError(f"{b['cache']}: training tiles were decoded by {decoder}, which --device {device} "
                                 f"does not have; predict with the device the training caches were made on.")


def _apply_template(df: pd.DataFrame, template: Path, genes: Sequence[str], test: TileTable) -> pd.DataFrame:
    if not template.is_file():
        raise TableError(f"--template {template}: file not found.")
    cols = list(pd.read_csv(template, nrows=0).columns)
    if not cols or cols[0] != "ID":
        raise TableError(f"--template {template}: first column must be ID.")
    tgenes = cols[1:]
    if set(tgenes) != set(genes):
        extra = sorted(set(tgenes) - set(genes))[:3]
        miss = sorted(set(genes) - set(tgenes))[:3]
        raise TableError(f"--template {template}: gene columns differ from training (template only: {extra}, "
                         f"training only: {miss}); use the template made for this gene set.")
    tids = pd.read_csv(template, usecols=["ID"], dtype={"ID": str})["ID"].to_numpy()
    if len(tids) and set(tids) != set(test.ids):
        raise TableError(f"--template {template}: its {len(tids)} IDs are not the {len(test.ids)} IDs of {test.source}.")
    return df[["ID", *tgenes]]


def write_submission(df: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write atomically: a temporary file renamed into place when complete."""
    return write_csv_atomic(df, out, float_format="%.6g")
