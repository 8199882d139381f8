"""Scale: a ridge head that streams (memory flat in the number of rows), and sharded embedding vs one process.

1. Ridge from row chunks (``RidgeHead.fit_chunks``): synthetic rows x 768 features -> 3,467 genes (a
   rank-32 signal plus noise, each chunk generated from its own seed, so both passes see the same
   rows and no file holds them), 13 alphas, alpha per gene, 5-fold CV; each size in a fresh process,
   reporting fit seconds and peak RSS next to what X and Y alone would take in memory (float32).
2. Embedding a generated tile table with efficientnet_lite0: one process with all threads vs N shard
   processes side by side (one thread each) plus the merge; wall time each, and the two caches'
   features compared byte for byte.

Usage (CPU-2: about 6 minutes for the defaults)::

    python bench/scale.py [--sizes 100000,500000] [--tiles 512 --shards 2] [--json bench/out/scale.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RANK = 32


def synthetic_chunks(n: int, d: int, g: int, chunk: int, rows_seed: int = 0):
    """A callable returning a fresh iterator of (start, X, Y) float32 chunks: the same rows every time.

    The signal (weights) is fixed; ``rows_seed`` draws other rows from it (held-out data)."""
    base = np.random.default_rng(0)
    Wx = base.standard_normal((RANK, d)).astype(np.float32)
    Wy = (base.standard_normal((RANK, g)) / np.sqrt(RANK)).astype(np.float32)

    def chunks():
        for k, s in enumerate(range(0, n, chunk)):
            rows = min(chunk, n - s)
            rng = np.random.default_rng((rows_seed, k))
            Z = rng.standard_normal((rows, RANK), dtype=np.float32)
            X = Z @ Wx + rng.standard_normal((rows, d), dtype=np.float32)
            Y = Z @ Wy + rng.standard_normal((rows, g), dtype=np.float32)
            yield s, X, Y

    return chunks


def ridge_child(n: int, d: int, g: int, chunk: int) -> dict:
    from regress.heads.ridge import RidgeHead

    chunks = synthetic_chunks(n, d, g, chunk)
    t0 = time.perf_counter()
    head = RidgeHead(random_state=0).fit_chunks(chunks, n)
    seconds = time.perf_counter() - t0
    # held-out rows from another seed: mean PCC per gene
    _, Xh, Yh = next(synthetic_chunks(2000, d, g, 2000, rows_seed=10**6)())
    P = head.predict(Xh)
    Pc, Yc = P - P.mean(0), Yh - Yh.mean(0)
    pcc = float(((Pc * Yc).sum(0) / np.sqrt((Pc ** 2).sum(0) * (Yc ** 2).sum(0))).mean())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": n, "features": d, "genes": g, "chunk_rows": chunk, "fit_s": round(seconds, 1),
            "peak_rss_mb": round(rss), "x_and_y_in_memory_mb": round(n * (d + g) * 4 / 2**20),
            "heldout_pcc": round(pcc, 4)}


def run_child(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def shard_bench(tiles: int, shards: int, work: Path) -> dict:
    from featurize.cache import read_cache
    from featurize.synthetic import make_synthetic_table

    table = make_synthetic_table(work / "data", n=tiles, n_genes=4, size=224, name="scale")
    cmd = [sys.executable, str(ROOT / "cli.py"), "embed", "--data", str(table), "--backbone", "efficientnet_lite0",
           "--quiet", "--batch-size", "32", "--workers", "0"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--cache-dir", str(work / "one")], check=True, capture_output=True)
    one_s = time.perf_counter() - t0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--cache-dir", str(work / "sharded"), "--shard", f"{i}/{shards}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(shards)]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(p.stderr.read().decode()[-2000:])
    sharded_s = time.perf_counter() - t0
    a = next(p for p in (work / "one").rglob("*.h5"))
    b = next(p for p in (work / "sharded").rglob("*.h5") if ".shard-" not in p.name)
    same = read_cache(a).features.tobytes() == read_cache(b).features.tobytes()
    return {"tiles": tiles, "shards": shards, "one_process_s": round(one_s, 1),
            "shards_parallel_plus_merge_s": round(sharded_s, 1), "same_features": same}


def merge_bench(rows: int, dim: int, shards: int, work: Path) -> dict:
    """Time merge_shards on shard files of ``rows`` random float16 features in total (I/O-bound)."""
    from featurize.models.backbones import get_spec
    from featurize.cache import CacheKey, CacheWriter, cache_path
    from featurize.engine.shards import merge_shards, shard_path
    from featurize.models.weights import ResolvedWeights

    spec = get_spec("efficientnet_lite0")
    key = CacheKey("merge", spec, ResolvedWeights("random-init", None, None, True), 1, "float16")
    final = cache_path(work, key)
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    for i in range(shards):
        a, b = int(bounds[i]), int(bounds[i + 1])
        ids = np.array([f"t{k}" for k in range(a, b)])
        w = CacheWriter(shard_path(final, i, shards), key, ids, dim, paths=[f"/t/{k}.png" for k in range(a, b)],
                        extra_attrs={"shard_index": i, "shard_count": shards, "shard_start": a, "shard_stop": b,
                                     "table_rows": rows, "table_row_fingerprint": "x", "batch_size": 64})
        w.open()
        for s in range(0, b - a, 50_000):
            e = min(s + 50_000, b - a)
            w.write(np.arange(s, e), rng.standard_normal((e - s, dim), dtype=np.float32), None,
                    ["0" * 64] * (e - s), np.zeros((e - s, 2), np.int64))
        w.finalize()
        w.close()
    t0 = time.perf_counter()
    merge_shards(final)
    seconds = time.perf_counter() - t0
    mb = rows * dim * 2 / 2**20
    return {"merge_rows": rows, "dim": dim, "shards": shards, "features_mb": round(mb), "merge_s": round(seconds, 1),
            "merge_mb_s": round(mb / seconds)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,500000")
    ap.add_argument("--features", type=int, default=768)
    ap.add_argument("--genes", type=int, default=3467)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--tiles", type=int, default=512)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--merge-rows", type=int, default=200_000, help="rows of the merge timing (0: skip)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(ridge_child(args.child, args.features, args.genes, args.chunk)))
        return 0
    rows = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        r = run_child(["--child", str(n), "--features", str(args.features), "--genes", str(args.genes),
                       "--chunk", str(args.chunk)])
        print(json.dumps(r), flush=True)
        rows.append(r)
    shard = None
    if args.tiles and args.shards:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            shard = shard_bench(args.tiles, args.shards, Path(tmp))
        print(json.dumps(shard), flush=True)
    merge = None
    if args.merge_rows:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            merge = merge_bench(args.merge_rows, 1280, 4, Path(tmp))
        print(json.dumps(merge), flush=True)
    meta = {"machine": f"{os.uname().machine}, {os.cpu_count()} cores", "python": sys.version.split()[0]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"ridge": rows, "shards": shard, "merge": merge, "meta": meta}, indent=1))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
