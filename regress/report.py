"""A short Markdown report of a run or stack: CV table, per-gene PCC histogram,
best and worst genes, and a spatial map of measured vs predicted expression."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featurize.errors import RunError
from regress.runs import RunData, open_result


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(path: str | os.PathLike, gene: str | None = None, slide: str | None = None) -> Path:
    """Write ``<run>/report/report.md`` (+ PNGs); returns the Markdown path."""
    res = open_result(path)
    path, info, metrics = res.path, res.info, res.metrics
    data = res.data()
    if gene is not None and gene not in res.genes:
        raise RunError(f"--gene {gene}: not among the {len(res.genes)} genes of {path}.")
    if slide is not None and (data.slides is None or slide not in set(data.slides)):
        have = sorted(set(data.slides))[:6] if data.slides is not None else []
        raise RunError(f"--slide {slide}: not a slide of {path} (slides: {', '.join(have) or 'none recorded'}).")
    out = path / "report"
    out.mkdir(exist_ok=True)
    plt = _plt()
    genes = metrics["per_gene"]["gene"]
    r = np.array([np.nan if v is None else v for v in metrics["per_gene"]["pcc"]], dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(r[np.isfinite(r)], bins=40, color="#4a6fa5")
    ax.axvline(np.nanmean(r), color="k", ls="--", lw=1, label=f"mean {np.nanmean(r):.3f}")
    ax.set_xlabel("out-of-fold Pearson r per gene (pooled)")
    ax.set_ylabel("genes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pcc_hist.png", dpi=110)
    plt.close(fig)
    order = np.argsort(-np.nan_to_num(r, nan=-2))
    best = [(genes[i], r[i]) for i in order[:10]]
    worst = [(genes[i], r[i]) for i in order[::-1] if np.isfinite(r[i])][:10]
    random_init = info.get("random_init") or any(b.get("random_init") for b in info.get("backbones", []))
    lines = [f"# hexpress report: {path.name}", ""]
    if random_init:
        lines += ["> **RANDOM-INIT weights were used for at least one backbone: these numbers are not a model of "
                  "tissue.**", ""]
    lines += ["| metric | value |", "|---|---|"]
    for k in ("pcc_gene_mean_by_fold", "pcc_gene_mean", "pcc_gene_median", "pcc_tile_mean", "mse"):
        if k in metrics:
            lines.append(f"| {k} | {metrics[k]:.4f} |")
    lines += ["", f"Table: `{info['table']['path']}`; head: `{info.get('head', {}).get('name', info.get('method'))}`; "
              f"backbones: {', '.join(b['backbone'] for b in info.get('backbones', [])) or 'see runs'}", "",
              "![per-gene PCC](pcc_hist.png)", "", "| best genes | r | worst genes | r |", "|---|---|---|---|"]
    for (bg, br), (wg, wr) in zip(best, worst):
        lines.append(f"| {bg} | {br:.3f} | {wg} | {wr:.3f} |")
    if metrics.get("constant_genes"):
        lines += ["", f"{len(metrics['constant_genes'])} constant genes have no PCC: {', '.join(metrics['constant_genes'][:10])}"]
    spatial = _spatial_map(data, gene or best[0][0], slide, out, plt)
    if spatial:
        lines += ["", f"![measured vs predicted]({spatial.name})"]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _spatial_map(data: RunData, gene: str, slide: str | None, out: Path, plt) -> Path | None:
    """Measured vs out-of-fold predicted expression of ``gene`` at the tiles' positions, from the run's own data."""
    if data.xy is None:
        return None
    slides = data.slides if data.slides is not None else np.zeros(len(data.ids), dtype=str)
    pick = slide or max(set(slides), key=list(slides).count)
    m = slides == pick
    j = data.genes.index(gene)
    xy = data.xy[m]
    meas, pred = data.y[m, j], data.oof[m, j]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, v, title in zip(axes, (meas, pred), ("measured", "predicted (out-of-fold)")):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=18, cmap="viridis")
        ax.set_title(f"{gene}, {title}", fontsize=9)
        ax.invert_yaxis()
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(sc, ax=ax, fraction=0.04)
    fig.suptitle(f"slide {pick}: r = {np.corrcoef(meas, pred)[0, 1]:.3f}", fontsize=9)
    fig.tight_layout()
    png = out / f"spatial_{gene}_{pick}.png".replace("/", "_")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
