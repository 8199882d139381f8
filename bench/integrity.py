"""What the integrity checks cost: reading a cache with and without its checksums, and a run's manifest.

    python bench/integrity.py [--rows 100000] [--dim 1280] [--genes 250]

Writes a cache of ``rows`` x ``dim`` float16 random features through hexpress's own writer (sealed as
``embed`` seals it), then times, in one process, on the same file (warm page cache, best of 3):
* the reference: ``read_cache`` on a copy without checksums (what hexpress did before: no verification);
* ``read_cache`` as ``fit`` calls it (every row block verified against its sha256, the storage checked);
and the same for a run folder's ``Run.data()`` (``oof.h5``, rows x genes float32) with and without the file
manifest (sha256 of the file against ``run.json``).  Nothing here is real tissue.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurize.models.backbones import get_spec  # noqa: E402
from featurize.cache import CacheKey, CacheWriter, read_cache  # noqa: E402
from featurize.models.weights import resolve_weights  # noqa: E402


def best(fn, n=3) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--genes", type=int, default=250)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        spec = get_spec("timm:test_vit")
        key = CacheKey("bench", spec, resolve_weights(spec, None, True), 1, "float16")
        ids = np.array([f"T{i:07d}" for i in range(a.rows)])
        w = CacheWriter(d / "bench" / "c.h5", key, ids, a.dim)
        w.open()
        for s in range(0, a.rows, 8192):
            e = min(s + 8192, a.rows)
            w.write(np.arange(s, e), rng.standard_normal((e - s, a.dim)).astype(np.float16),
                    digests=["0" * 64] * (e - s), stats=np.zeros((e - s, 2), np.int64))
        t = time.perf_counter()
        path = w.finalize()
        seal_s = time.perf_counter() - t
        size = path.stat().st_size / 2**20

        import contextlib
        import io
        import shutil

        from core.integrity import CHECKSUMS

        legacy = d / "bench" / "legacy.h5"
        shutil.copy(path, legacy)
        with h5py.File(legacy, "r+") as fh:
            del fh.attrs[CHECKSUMS]
        with contextlib.redirect_stderr(io.StringIO()):  # the one-time "written before checksums" warning
            raw_s = best(lambda: read_cache(legacy))
        checked_s = best(lambda: read_cache(path))
        print(f"cache {a.rows:,} x {a.dim} float16 ({size:.0f} MiB): finalize+seal {seal_s:.2f} s; read_cache "
              f"unverified {raw_s:.2f} s, verified {checked_s:.2f} s (+{checked_s - raw_s:.2f} s)")

        from regress.runs.folder import RunData, load_run, write_run

        oof = rng.standard_normal((a.rows, a.genes)).astype(np.float32)
        data = RunData(ids, [f"G{j}" for j in range(a.genes)], oof, np.arange(a.rows) % 5, oof.copy())
        folder = d / "runs" / "r"
        from sklearn.dummy import DummyRegressor

        est = DummyRegressor().fit(np.zeros((2, 1)), np.zeros((2, a.genes)))
        info = {"format": 2, "identity": "x", "identity_fields": {}, "genes": data.genes, "table": {"path": "t"},
                "backbones": [], "head": {"name": "mean"}, "folds": {"n": 5}}
        write_run(folder, info, {"per_gene": {"gene": data.genes}}, data, est)
        osize = (folder / "oof.h5").stat().st_size / 2**20

        def bare():  # as a folder from before the manifest; each call opens the folder afresh (no memo)
            r = load_run(folder)
            r.info = {k: v for k, v in r.info.items() if k != "files"}
            return r.data()

        r_s, c_s = best(bare), best(lambda: load_run(folder).data())
        print(f"run oof.h5 {a.rows:,} x {a.genes} ({osize:.0f} MiB): Run.data() unverified {r_s:.2f} s, verified "
              f"{c_s:.2f} s (+{c_s - r_s:.2f} s)")


if __name__ == "__main__":
    main()
