"""A HEST-Benchmark task folder, run natively: the published protocol and hexpress heads on the same splits.

Task folder contract (HEST-Benchmark's ``bench_data/<TASK>/``, as its download writes it):

* ``splits/train_<i>.csv`` and ``splits/test_<i>.csv``: columns ``sample_id``, ``patches_path``,
  ``expr_path`` (paths relative to the task folder);
* ``patches/<id>.h5`` (hestcore's patch files: ``img``, ``barcode``, ``coords``), ``adata/<id>.h5ad`` (raw
  counts, ``obs_names`` = barcodes);
* ``var_50genes.json``: ``{"genes": [...]}`` (the task's genes).

The protocol, as HEST-Benchmark publishes it: expression = log1p of the raw counts of the task's genes at the
patches' barcodes; features from a frozen encoder; per split, ``StandardScaler -> PCA(256) -> Ridge(alpha =
100 / (256 * genes), fit_intercept=False, solver="lsqr", max_iter=1000, random_state=0)`` fitted on the train
samples; the split's score is the Pearson r per gene over all its test patches (scipy's ``pearsonr``), averaged
over genes; the task's score is the mean (and standard deviation) of the split scores.  hexpress heads are
scored the same way on the same features and splits, every setting chosen by inner CV on the train samples.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from core.errors import ImportDataError, UsageError

#: HEST-Benchmark's published averages over its tasks (for context; not measured here, not this task).
PUBLISHED = {"ResNet50 (ImageNet)": 0.325, "H-optimus-1": 0.423}
PCA_DIM = 256


@dataclass(frozen=True)
class Task:
    root: Path
    genes: list[str]
    splits: list[tuple[list[str], list[str]]]  # (train sample ids, test sample ids) per split
    files: dict[str, tuple[Path, Path]]  # sample -> (patches, expression)


def _split_index(path: Path) -> tuple[int, str]:
    """``train_10.csv`` after ``train_2.csv``."""
    tail = path.stem.rsplit("_", 1)[-1]
    return (int(tail) if tail.isdigit() else -1, path.name)


def read_task(root: str | os.PathLike) -> Task:
    """The splits, genes and files of a task folder; one error line naming what is missing."""
    root = Path(root)
    sdir = root / "splits"
    trains = sorted(sdir.glob("train_*.csv"), key=_split_index)
    if not trains:
        raise ImportDataError(f"{root}: no splits/train_<i>.csv; point TASK at a HEST-Benchmark task folder "
                              "(bench_data/<TASK>).")
    gfile = root / "var_50genes.json"
    try:
        genes = [str(g) for g in json.loads(gfile.read_text())["genes"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImportDataError(f"{gfile}: missing or not {{\"genes\": [...]}} ({exc}).") from exc
    splits, files = [], {}
    for tr in trains:
        te = tr.with_name(tr.name.replace("train_", "test_"))
        if not te.is_file():
            raise ImportDataError(f"{te}: missing; every splits/train_<i>.csv needs its test_<i>.csv.")
        ids = []
        for f in (tr, te):
            try:
                df = pd.read_csv(f, dtype=str)
            except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
                raise ImportDataError(f"{f}: cannot be read ({exc}).") from exc
            need = {"sample_id", "patches_path", "expr_path"}
            if not need <= set(df.columns):
                raise ImportDataError(f"{f}: needs columns {sorted(need)} (found {list(df.columns)}).")
            for s, p, e in zip(df["sample_id"], df["patches_path"], df["expr_path"]):
                files[s] = (root / p, root / e)
            ids.append(df["sample_id"].tolist())
        if set(ids[0]) & set(ids[1]):
            raise ImportDataError(f"{tr} and {te}: samples {sorted(set(ids[0]) & set(ids[1]))} are in both.")
        splits.append((ids[0], ids[1]))
    return Task(root, genes, splits, files)


def task_table(task: Task, out: str | os.PathLike) -> Path:
    """The task's patches as a tile table (``<out>/<task>.csv``, tiles cut by hestcore, not again), expression
    log1p of the raw counts of the task's genes (HEST's normalisation); written once, then reused."""
    from featurize.importers.common import build_table
    from featurize.importers.hest import read_hest_sample

    out = Path(out)
    name = task.root.name
    table = out / f"{name}.csv"
    if table.is_file():
        from featurize.tables.table import read_sidecar

        side = read_sidecar(table) or {}
        if side.get("source") == str(task.root.resolve()) and side.get("gene_columns") == task.genes:
            return table
    slides = [read_hest_sample(task.root, s, out, patches=p, expression=e) for s, (p, e) in task.files.items()]
    missing = sorted(set(task.genes) - set.intersection(*(set(s.counts.columns) for s in slides)))
    if missing:
        raise ImportDataError(f"{task.root}: genes {missing[:5]} of var_50genes.json are not in every sample's "
                              "expression file.")
    return build_table(slides, out, name, normalize_mode="log1p", gene_list=task.genes, min_spots=0.0,
                       extra={"format": "hest-benchmark", "source": str(task.root.resolve())})


def hest_protocol(n_genes: int, n_components: int = PCA_DIM):
    """HEST-Benchmark's regression, as published (``n_components`` is lowered only when the data has fewer)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from regress.heads.ridge import hest_alpha

    return Pipeline([("scaler", StandardScaler()), ("pca", PCA(n_components=n_components)),
                     ("ridge", Ridge(solver="lsqr", alpha=hest_alpha(PCA_DIM, n_genes), fit_intercept=False,
                                     max_iter=1000, random_state=0))])


def split_score(y: np.ndarray, pred: np.ndarray) -> tuple[float, list[float]]:
    """HEST's split score: scipy's Pearson r per gene over the split's test patches, averaged over genes."""
    from scipy.stats import pearsonr

    r = [float(pearsonr(y[:, j], pred[:, j])[0]) for j in range(y.shape[1])]
    return float(np.mean(r)), r


def run_task(task_dir: str | os.PathLike, backbone: str, out: str | os.PathLike, *, heads: Sequence[str] = ("ridge",),
             cache_dir: str | os.PathLike | None = None, device: str = "auto", random_init: bool = False,
             weights: dict[str, str] | None = None, progress: bool = True) -> dict:
    """Run HEST's protocol and hexpress ``heads`` on every split of the task; writes ``<out>/hest-<task>.json``."""
    from core.atomic import atomic_path
    from featurize.engine.extract import embed
    from regress.heads.registry import make_head
    from regress.training import load_training_data

    task = read_task(task_dir)
    out = Path(out)
    table = task_table(task, out / "tiles")
    cache_dir = Path(cache_dir) if cache_dir else out / "cache"
    cache = embed(table, [backbone], cache_dir=cache_dir, device=device, random_init=random_init, weights=weights,
                  progress=progress)[0]
    td = load_training_data(table, [], cache_files=[str(cache)], group_col="slide")
    slides = np.asarray(td.slides if td.slides is not None else td.groups).astype(str)
    methods = {"HEST protocol (PCA 256 + ridge)": None, **{f"hexpress {h}": h for h in heads}}
    rows = {m: [] for m in methods}
    X, Y = td.X.astype(np.float64), td.Y.astype(np.float64)  # lsqr stops at a tolerance: fix the precision
    for i, (train, test) in enumerate(task.splits):
        tr, te = np.isin(slides, train), np.isin(slides, test)
        if not tr.any() or not te.any():
            raise UsageError(f"{task.root}: split {i} has no patches on its train or test side.")
        for label, head in methods.items():
            if head is None:
                est = hest_protocol(len(task.genes), min(PCA_DIM, int(tr.sum()), X.shape[1]))
            else:
                est = make_head(head, device, 0)
            est.fit(X[tr], Y[tr])
            score, per_gene = split_score(Y[te], np.asarray(est.predict(X[te]), dtype=np.float64))
            rows[label].append({"split": i, "pcc": score, "pcc_genes": per_gene, "test": list(test)})
    summary = {m: {"mean": float(np.mean([r["pcc"] for r in v])), "std": float(np.std([r["pcc"] for r in v])),
                   "splits": v} for m, v in rows.items()}
    doc = {"task": task.root.name, "backbone": backbone, "random_init": random_init, "genes": task.genes,
           "n_patches": int(len(td.Y)), "cache": str(cache), "results": summary,
           "published_averages_not_this_task": PUBLISHED}
    path = out / f"hest-{task.root.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".json") as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1))
    return doc
