"""A clearly labelled synthetic tile set for tests and the offline demo.

Tiles are smooth random H&E-like colour fields; each gene is a noisy linear
function of a few image statistics, so a working pipeline finds signal and a
broken one does not.  Nothing here is real tissue.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def make_synthetic_table(folder: str | Path, n: int = 64, n_genes: int = 20, size: int = 64,
                         n_groups: int = 4, seed: int = 0, name: str = "train") -> Path:
    """Write ``n`` PNG tiles and ``<folder>/<name>.csv``; returns the table path."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / name).mkdir(parents=True, exist_ok=True)
    stats = np.zeros((n, 4))
    rows = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        hema, eosin, freq, phase = rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0), rng.uniform(1, 6), rng.uniform(0, 6.3)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx + yy) + phase)
        r = 255 * (1 - 0.3 * hema * wave) * (0.7 + 0.3 * eosin)
        g = 255 * (1 - 0.6 * hema * wave) * (0.5 + 0.3 * (1 - eosin))
        b = 255 * (1 - 0.2 * hema * wave)
        img = np.stack([r, g, b], -1) + rng.normal(0, 6, (size, size, 3))
        img = np.clip(img, 0, 255).astype(np.uint8)
        rel = f"./{name}/{name.upper()}_{i:04d}.png"
        Image.fromarray(img).save(folder / rel, compress_level=1)  # fast to write; the pixels are the same
        stats[i] = [hema, eosin, freq / 6, np.cos(phase)]
        rows.append({"ID": f"{name.upper()}_{i:04d}", "path": rel, "slide": f"S{i % n_groups}",
                     "x": float(i % 8), "y": float(i // 8)})
    W = rng.normal(0, 1, (4, n_genes))
    Y = stats @ W + rng.normal(0, 0.3, (n, n_genes))
    df = pd.DataFrame(rows)
    genes = pd.DataFrame(Y.astype(np.float32), columns=[f"GENE{j:03d}" for j in range(n_genes)])
    out = folder / f"{name}.csv"
    pd.concat([df, genes], axis=1).to_csv(out, index=False)
    return out
