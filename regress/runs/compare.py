"""Backbones x heads comparison: the toolkit's main loop, on cached features only."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from core.atomic import atomic_path
from core.log import say
from featurize.tables.table import read_table
from regress.runs.fit import fit_run
from regress.training import load_training_data


def compare(data, backbones: Sequence[str], heads: Sequence[str], *, cache_dir="cache", runs_dir="runs",
            folds: int = 5, group_col: str | None = None, use_groups: bool = True, seed: int = 0,
            device: str = "cpu", out: str | None = None, log=say, context: int = 0,
            head_params: dict | None = None, overwrite: bool = False, smooth: int = 0,
            center_slides: bool = False, cross_gene: bool = False) -> tuple[list[dict], Path]:
    """Fit every head on every backbone; returns table rows and the PNG path."""
    table = read_table(data, group_col=group_col, require_genes=True, check_files=False)
    rows, dists = [], {}
    for bb in backbones:
        td = load_training_data(table, [bb], cache_dir, context=context, center_slides=center_slides)
        for head in heads:
            res = fit_run(table, [bb], head, cache_dir=cache_dir, runs_dir=runs_dir, folds=folds,
                          use_groups=use_groups, seed=seed, device=device, log=log, training=td, context=context,
                          head_params=head_params, overwrite=overwrite, smooth=smooth, center_slides=center_slides,
                          cross_gene=cross_gene)
            m = res.metrics
            flag = " RANDOM-INIT" if any(c["random_init"] for c in td.caches) else ""
            rows.append({"backbone": bb + flag, "head": head, "pcc_gene_by_fold": f"{m['pcc_gene_mean_by_fold']:.4f}",
                         "pcc_gene_pooled": f"{m['pcc_gene_mean']:.4f}",
                         "pcc_tile": f"{m['pcc_tile_mean']:.4f}", "fit_s": f"{res.fit_seconds:.1f}",
                         "best": "", "run": str(res.path)})
            r = np.array([v for v in m["per_gene"]["pcc"] if v is not None])
            dists[f"{bb}\n{head}"] = r
    best = int(np.argmax([float(r["pcc_gene_by_fold"]) for r in rows]))
    rows[best]["best"] = "*"
    png = Path(out) if out else Path(runs_dir) / f"compare-{table.name}.png"
    _plot(dists, png, title=f"CV PCC per gene, {table.name}")
    return rows, png


def _plot(dists: dict[str, np.ndarray], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(dists)), 3.5))
    ax.boxplot(list(dists.values()), showmeans=True)
    ax.set_xticks(range(1, len(dists) + 1), list(dists.keys()), fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel("Pearson r per gene")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(png, ".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
