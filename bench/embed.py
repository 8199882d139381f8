"""Embed throughput: end-to-end ``embed`` vs the backbone's forward pass alone.

Both sides use the same backbone, batch size and thread settings, in one
process run: (1) ``featurize.extract.embed`` on N PNG tiles from disk
(decode, resize, normalise, forward, HDF5 write), run twice into fresh caches:
the first ("cold") pays one-time costs (CUDA and cuDNN loading, kernel
autotuning), the second is the steady rate; (2) the forward pass alone on the
same tiles pre-decoded into a normalised tensor, after a warm-up.
Ratio = (1, second run)/(2).

Tiles: real her2st tiles when ../shared is present (cut at 224 px), else
generated ones (labelled in the output).  Usage:

    python bench/embed.py --backbone efficientnet_lite0 --backbone resnet50 --n 1000
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurize.backbones import get_spec  # noqa: E402
from featurize.extract import autocast, embed  # noqa: E402
from featurize.transforms import normalize, resize_uint8  # noqa: E402
from featurize.models import create_backbone, extract  # noqa: E402
from featurize.weights import resolve_weights  # noqa: E402

HER2ST = ROOT.parent / "shared" / "data" / "her2st"


def make_tiles(folder: Path, n: int, size: int = 224) -> tuple[Path, str]:
    """n PNG tiles: cut from a real her2st image when available, else generated."""
    (folder / "t").mkdir(parents=True, exist_ok=True)
    src = HER2ST / "images" / "C2.jpg"
    if src.is_file():
        Image.MAX_IMAGE_PIXELS = None
        img = np.asarray(Image.open(src).convert("RGB"))
        H, W = img.shape[:2]
        rng = np.random.default_rng(0)
        for i in range(n):
            y, x = rng.integers(0, H - size), rng.integers(0, W - size)
            Image.fromarray(img[y:y + size, x:x + size]).save(folder / "t" / f"{i:05d}.png")
        kind = "real her2st C2 crops"
    else:
        from featurize.synthetic import make_synthetic_table

        return make_synthetic_table(folder, n=n, n_genes=2, size=size), "generated (no ../shared)"
    pd.DataFrame({"ID": [f"T{i:05d}" for i in range(n)], "path": [f"t/{i:05d}.png" for i in range(n)]}).to_csv(
        folder / "tiles.csv", index=False)
    return folder / "tiles.csv", kind


def forward_only(name: str, paths: list[Path], batch_size: int, device: str, random_init: bool) -> float:
    spec = get_spec(name)
    dev = torch.device(device)
    model = create_backbone(spec, resolve_weights(spec, random_init=random_init)).to(dev)
    x = torch.stack([resize_uint8(Image.open(p).convert("RGB"), spec.preprocess_key) for p in paths])
    with torch.inference_mode(), autocast(dev, spec):  # the precision embed uses
        extract(model, spec, normalize(x[:batch_size].to(dev), spec))  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(0, len(x), batch_size):
            extract(model, spec, normalize(x[s:s + batch_size].to(dev), spec)).float().cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", default=None)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rows-per-tile", type=int, default=1,
                    help="list each generated tile file this many times (under new IDs): a long run, fewer PNGs to write")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    names = args.backbone or ["efficientnet_lite0", "resnet50"]
    work = Path(tempfile.mkdtemp(prefix="hexpress-bench-"))
    try:
        table, kind = make_tiles(work, args.n)
        if args.rows_per_tile > 1:  # more rows than files: a longer run without writing more PNGs
            df = pd.read_csv(table)
            df = pd.concat([df.assign(ID=df.ID.astype(str) + f"_r{r}") for r in range(args.rows_per_tile)], ignore_index=True)
            df.to_csv(table, index=False)
            kind += f", each file listed {args.rows_per_tile} times"
        n_rows = args.n * args.rows_per_tile
        paths = sorted(work.rglob("*.png"))
        results = []
        for name in names:
            spec = get_spec(name)
            rand = spec.weights.startswith("hf:")  # no hub here: same speed with random weights
            rates = []
            for run in ("cold", "warm"):  # cold: this process's first embed of it (library loads, kernel autotuning)
                t0 = time.perf_counter()
                embed(table, [name], random_init=rand, cache_dir=work / f"cache-{name}-{run}", batch_size=args.batch_size,
                      device=args.device, progress=False, num_workers=args.workers)
                rates.append(n_rows / (time.perf_counter() - t0))
            fwd = forward_only(name, paths, args.batch_size, args.device, rand)
            row = {"backbone": name, "random_init": rand, "tiles": n_rows, "batch_size": args.batch_size,
                   "embed_cold_tiles_s": round(rates[0], 2), "embed_tiles_s": round(rates[1], 2),
                   "forward_only_tiles_s": round(fwd, 2), "ratio": round(rates[1] / fwd, 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
        meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                           f"{'cuda ' + torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}",
                "tiles": kind, "torch": torch.__version__}
        print(json.dumps(meta))
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
