"""A short Markdown report of a run or stack: CV table, per-gene PCC histogram,
best and worst genes, and a spatial map of measured vs predicted expression."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from core.errors import RunError
from regress.runs.folder import RunData, open_result


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _member_rows(res) -> list[str]:
    """A stack's runs as a Markdown table: folder, tile table, tile size, head, PCC/gene by fold."""
    from regress.runs.stack import stack_members

    info = res.info
    score = {str(Path(row["run"]).resolve()): row.get("pcc_gene_by_fold") for row in info.get("summary", [])}
    rows = ["| run | table | tile um | head | PCC/gene by fold |", "|---|---|---|---|---|"]
    for p, run, problem in stack_members(res):
        if run is None:  # moved since: the stack still holds its predictions, only the details are gone
            rows.append(f"| `{Path(p).name}` | (moved) | | | |")
            continue
        r = run.info
        if problem is not None:  # refitted since: the stack's predictions no longer match this run
            rows.append(f"| `{Path(p).name}` | **refitted since the stack was made: rerun stack** | | | |")
            continue
        size = f"{r['tile_um']:.0f}" if r.get("tile_um") else ""
        got = score.get(str(Path(p).resolve()))
        pcc = f"{got:.4f}" if got is not None else ""
        rows.append(f"| `{Path(p).name}` | `{Path(r['table']['path']).name}` | {size} | {r['head']['name']} | {pcc} |")
    return rows


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
    symbol = dict(zip(info.get("genes", genes), info.get("gene_names", info.get("genes", genes))))
    label = lambda g: g if symbol.get(g, g) == g else f"{symbol[g]} ({g})"  # noqa: E731
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
    if res.kind == "stack":
        lines += ["", f"Stack (`{info.get('method')}`) of {len(info.get('runs', []))} runs:", ""] + _member_rows(res)
    else:
        lines += ["", f"Table: `{info['table']['path']}`; head: `{info.get('head', {}).get('name')}`; backbones: "
                      f"{', '.join(b['backbone'] for b in info.get('backbones', []))}"]
    lines += ["", "![per-gene PCC](pcc_hist.png)", "", "| best genes | r | worst genes | r |", "|---|---|---|---|"]
    for (bg, br), (wg, wr) in zip(best, worst):
        lines.append(f"| {label(bg)} | {br:.3f} | {label(wg)} | {wr:.3f} |")
    if metrics.get("constant_genes"):
        lines += ["", f"{len(metrics['constant_genes'])} constant genes have no PCC: {', '.join(metrics['constant_genes'][:10])}"]
    spatial = _spatial_map(data, gene or best[0][0], slide, out, plt, info.get("slide_images") or {},
                           label(gene or best[0][0]))
    if spatial:
        lines += ["", f"![measured vs predicted]({spatial.name})"]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _background(images: dict, slide: str, max_side: int = 1600):
    """(thumbnail RGB array, thumbnail pixels per full-resolution pixel) of the slide's H&E, or (None, 1)."""
    from PIL import Image

    from featurize.tables.images import large_images_allowed, to_rgb

    meta = images.get(slide)
    if not meta or not Path(meta["path"]).is_file():
        return None, 1.0
    try:
        with large_images_allowed(), Image.open(meta["path"]) as im:
            full_w = im.size[0]
            im.draft("RGB", (max_side, max_side))  # JPEG: decode at a fraction of the size
            im = to_rgb(im)
            im.thumbnail((max_side, max_side))
            return np.asarray(im), im.size[0] / full_w * float(meta.get("scale", 1.0))
    except OSError:
        return None, 1.0


def _spatial_map(data: RunData, gene: str, slide: str | None, out: Path, plt, images: dict | None = None,
                 title: str | None = None) -> Path | None:
    """Measured vs out-of-fold predicted expression of ``gene`` at the tiles' positions, from the run's own data,
    drawn over the slide's H&E when the run knows its image."""
    if data.xy is None:
        return None
    slides = data.slides if data.slides is not None else np.zeros(len(data.ids), dtype=str)
    pick = slide or max(set(slides), key=list(slides).count)
    m = slides == pick
    j = data.genes.index(gene)
    xy = data.xy[m]
    meas, pred = data.y[m, j], data.oof[m, j]
    bg, f = _background(images or {}, str(pick))
    pts = xy * f
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, v, what in zip(axes, (meas, pred), ("measured", "predicted (out-of-fold)")):
        if bg is not None:
            ax.imshow(bg)
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=v, s=18, cmap="viridis", alpha=0.85 if bg is not None else 1.0)
        ax.set_title(f"{title or gene}, {what}", fontsize=9)
        if bg is None:
            ax.invert_yaxis()
        else:  # the spots' region of the slide, not the whole glass
            pad = 0.06 * float(np.ptp(pts, axis=0).max() or 1.0)
            ax.set_xlim(pts[:, 0].min() - pad, pts[:, 0].max() + pad)
            ax.set_ylim(pts[:, 1].max() + pad, pts[:, 1].min() - pad)
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
