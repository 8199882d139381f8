"""Embed throughput against its limits, all measured in one run on one machine.

For each backbone and tile format, in one process:

* forward only: the backbone on one normalised, channels_last batch already
  on the device, in embed's precision; warmed up (>= 5 batches and >= 1 s,
  which includes cuDNN autotuning), then the median of three windows of full
  batches, >= 2 s each; measured before a backbone's embeds and again after
  each, and averaged, so that drift of a shared machine hits both sides;
* decode limits: Pillow decoding (and resizing) the same tiles in P processes
  (PNG and JPEG), and on CUDA nvJPEG decoding them in batches
  (``featurize.engine.decode.decode_jpegs``);
* end to end: ``featurize.engine.extract.embed`` on the table from disk into a fresh
  cache; the process's first embed runs twice (the first, "cold", pays CUDA
  and library loading); the steady rate (after the first batch) is the
  figure, with the first-batch latency (model build, kernel selection)
  reported apart;
* ratios: JPEG embed / forward; PNG embed / min(forward, Pillow PNG decode);
  a multi-backbone pass against the combined forward rate 1/sum(1/f_i).

Tiles: crops of a real her2st image when ../shared is present, else
generated tissue-like tiles (labelled).  ``--rows-per-tile`` lists each file
several times under new IDs: a long run without writing more files.

    python bench/embed.py --backbone efficientnet_lite0 --backbone resnet50 --n 1000
    python bench/embed.py --device cuda --backbone efficientnet_lite0 --backbone resnet50 --backbone vit_base \\
        --multi --n 2000 --rows-per-tile 10 --batch-size 256
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurize.models.backbones import get_spec  # noqa: E402
from featurize.engine.decode import decode_jpegs  # noqa: E402
from featurize.engine.extract import autocast, embed  # noqa: E402
from featurize.models.build import create_backbone, extract  # noqa: E402
from featurize.models.transforms import normalize, resize_uint8  # noqa: E402
from featurize.models.weights import resolve_weights  # noqa: E402

HER2ST = ROOT.parent / "shared" / "data" / "her2st"
SIZE = 224


def _crops(n: int) -> tuple[list[np.ndarray], str]:
    src = HER2ST / "images" / "C2.jpg"
    rng = np.random.default_rng(0)
    if src.is_file():
        Image.MAX_IMAGE_PIXELS = None
        img = np.asarray(Image.open(src).convert("RGB"))
        H, W = img.shape[:2]
        out = []
        for _ in range(n):
            y, x = rng.integers(0, H - SIZE), rng.integers(0, W - SIZE)
            out.append(img[y:y + SIZE, x:x + SIZE])
        return out, "real her2st C2 crops"
    out = []
    for _ in range(n):  # smooth, H&E-coloured: compresses like tissue, not like noise
        low = Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        arr = np.asarray(low).astype(float) * [0.6, 0.35, 0.6] + [90, 40, 90] + rng.normal(0, 6, (SIZE, SIZE, 3))
        out.append(np.clip(arr, 0, 255).astype(np.uint8))
    return out, "generated tissue-like tiles (no ../shared)"


def _save(args) -> None:
    arr, path, fmt = args
    Image.fromarray(arr).save(path, **({"quality": 90} if fmt == "JPEG" else {}))


def make_tables(folder: Path, n: int, rows_per_tile: int, procs: int) -> tuple[dict[str, Path], str]:
    """One table per format (png, jpeg) over the same crops."""
    crops, kind = _crops(n)
    tables = {}
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        d = folder / ext
        d.mkdir(parents=True)
        with Pool(procs) as pool:
            pool.map(_save, [(c, d / f"{i:05d}.{ext}", fmt) for i, c in enumerate(crops)], chunksize=32)
        rows = [(f"T{i:05d}_r{r}", f"{ext}/{i:05d}.{ext}") for r in range(rows_per_tile) for i in range(n)]
        tables[ext] = folder / f"tiles_{ext}.csv"
        pd.DataFrame(rows, columns=["ID", "path"]).to_csv(tables[ext], index=False)
    if rows_per_tile > 1:
        kind += f", each file listed {rows_per_tile} times"
    return tables, kind


def _pil_decode(path: str) -> int:
    with Image.open(path) as im:
        img = im.convert("RGB")
    return int(resize_uint8(img, (SIZE, "bicubic", 0)).shape[-1])


def pillow_rate(files: list[str], procs: int) -> float:
    with Pool(procs) as pool:
        pool.map(_pil_decode, files[: procs * 4], chunksize=4)  # workers started, files in the page cache
        t0 = time.perf_counter()
        pool.map(_pil_decode, files, chunksize=16)
        return len(files) / (time.perf_counter() - t0)


def device_jpeg_rate(files: list[str], batch: int, device: torch.device) -> float:
    chunks = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f in files]
    for s in range(0, min(len(chunks), 2 * batch), batch):  # warm-up: library load, nvJPEG handles
        decode_jpegs(chunks[s:s + batch], device)
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, len(chunks), batch):
        decode_jpegs(chunks[s:s + batch], device)
    _sync(device)
    return len(chunks) / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_only(name: str, files: list[str], batch: int, device: torch.device, random_init: bool,
                 windows: int = 3, seconds: float = 2.0) -> float:
    """Tiles/s of the forward pass alone: full batches of tiles already on the device, after a real warm-up.

    The median of ``windows`` timed windows of >= ``seconds`` each (a shared machine's noise)."""
    spec = get_spec(name)
    model = create_backbone(spec, resolve_weights(spec, random_init=random_init)).to(device)
    tiles = [resize_uint8(Image.open(f).convert("RGB"), spec.preprocess_key) for f in files[:batch]]
    while len(tiles) < batch:
        tiles += tiles[: batch - len(tiles)]
    x = normalize(torch.stack(tiles).to(device), spec)
    rates = []
    with torch.inference_mode(), autocast(device, spec):
        def step():
            return extract(model, spec, x).float()

        t0, k = time.perf_counter(), 0
        while k < 5 or time.perf_counter() - t0 < 1.0:
            step()
            _sync(device)
            k += 1
        for _ in range(windows):
            t0, k = time.perf_counter(), 0
            while k < 3 or time.perf_counter() - t0 < seconds:
                step()
                k += 1
                if device.type == "cuda" and k % 8:
                    continue
                _sync(device)
            _sync(device)
            rates.append(k * batch / (time.perf_counter() - t0))
    return float(np.median(rates))


def embed_rate(table: Path, names: list[str], work: Path, args, rand: bool, cold: bool) -> dict:
    """``embed`` into fresh caches: once more before ("cold") when ``cold``, to pay the process's one-time costs."""
    out = {}
    for run in (("cold", "warm") if cold else ("warm",)):
        stats: dict = {}
        folder = work / f"cache-{run}-{'+'.join(names)}-{table.stem}"
        t0 = time.perf_counter()
        embed(table, names, random_init=rand, cache_dir=folder, batch_size=args.batch_size, device=args.device,
              progress=False, num_workers=args.workers, decode=args.decode, stats=stats)
        wall = time.perf_counter() - t0
        out[run] = {"wall_tiles_s": stats["rows"] / wall, "steady_tiles_s": stats["steady_tiles_s"],
                    "first_batch_s": stats["first_batch_s"], "decoded": stats["decoded"], "decoder": stats["decoder"]}
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", default=None, help="repeatable (default: efficientnet_lite0, resnet50)")
    ap.add_argument("--multi", action="store_true", help="also one pass of all --backbone together")
    ap.add_argument("--formats", default="png,jpg", help="tile formats to embed (default: %(default)s)")
    ap.add_argument("--n", type=int, default=1000, help="tile files per format")
    ap.add_argument("--rows-per-tile", type=int, default=1, help="list each file this many times (under new IDs)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode", default="auto", help="embed --decode (default: auto: nvJPEG on CUDA, Pillow on CPU)")
    ap.add_argument("--workers", type=int, default=None, help="embed's decode workers (default: embed's)")
    ap.add_argument("--procs", type=int, default=None, help="Pillow processes of the decode limit (default: CPUs - 1)")
    ap.add_argument("--fwd-seconds", type=float, default=2.0, help="length of each forward-only window (default: %(default)s)")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    names = args.backbone or ["efficientnet_lite0", "resnet50"]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    dev = torch.device(args.device)
    procs = args.procs or max(1, (os.cpu_count() or 2) - 1)
    work = Path(tempfile.mkdtemp(prefix="hexpress-bench-"))
    try:
        tables, kind = make_tables(work, args.n, args.rows_per_tile, procs)
        files = {ext: sorted(str(p) for p in (work / ext).iterdir()) for ext in ("png", "jpg")}
        limits = {"pillow_png_tiles_s": pillow_rate(files["png"], procs),
                  "pillow_jpeg_tiles_s": pillow_rate(files["jpg"], procs),
                  "pillow_procs": procs}
        if dev.type == "cuda":
            limits["nvjpeg_tiles_s"] = device_jpeg_rate(files["jpg"], args.batch_size, dev)
        print(json.dumps({"decode_limits": {k: round(v, 1) for k, v in limits.items()}}), flush=True)
        results, forward = [], {}
        groups = [[n] for n in names] + ([names] if args.multi and len(names) > 1 else [])
        for group in groups:
            rand = any(get_spec(n).weights.startswith("hf:") for n in group)  # no hub here: same speed, random weights
            for n in group:
                if n not in forward:
                    forward[n] = forward_only(n, files["png"], args.batch_size, dev, rand, seconds=args.fwd_seconds)
            for ext in formats:
                e = embed_rate(tables[ext], group, work, args, rand, cold=not results)
                for n in group:  # measured again after each embed, averaged: drift hits both sides alike
                    again = forward_only(n, files["png"], args.batch_size, dev, rand, seconds=args.fwd_seconds)
                    forward[n] = 0.5 * (forward[n] + again)
                fwd = 1.0 / sum(1.0 / forward[n] for n in group)
                limit = min(fwd, limits["pillow_png_tiles_s"]) if ext == "png" else fwd
                w = e["warm"]
                row = {"backbones": "+".join(group), "format": ext, "random_init": rand,
                       "rows": args.n * args.rows_per_tile, "batch_size": args.batch_size,
                       "forward_only_tiles_s": round(fwd, 1), "limit_tiles_s": round(limit, 1),
                       "embed_tiles_s": round(w["steady_tiles_s"] or 0.0, 1),
                       "embed_wall_tiles_s": round(w["wall_tiles_s"], 1), "first_batch_s": round(w["first_batch_s"], 2),
                       **({"cold_first_batch_s": round(e["cold"]["first_batch_s"], 2)} if "cold" in e else {}),
                       "decoder": w["decoder"], "decoded": w["decoded"],
                       "ratio": round((w["steady_tiles_s"] or 0.0) / limit, 3)}
                results.append(row)
                print(json.dumps(row), flush=True)
        meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                           f"{'cuda ' + torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}",
                "tiles": kind, "torch": torch.__version__}
        print(json.dumps(meta))
        print("\n| backbones | tiles | forward only | limit | embed (steady) | ratio | embed wall | first batch |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['backbones']} | {r['format']} | {r['forward_only_tiles_s']:,} | {r['limit_tiles_s']:,} | "
                  f"{r['embed_tiles_s']:,} | **{r['ratio']}** | {r['embed_wall_tiles_s']:,} | {r['first_batch_s']} s |")
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "decode_limits": limits, "results": results}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
