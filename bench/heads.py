"""Head speed and memory on features shaped like the reference task.

6,992 training rows x 1,536 features -> 3,467 genes (plus 1,748 held-out
rows), synthetic with a rank-32 signal, seed 0.  Each method runs in its own
subprocess (so peak RSS is its own), side by side in one invocation:

* hexpress ``RidgeHead`` (13 alphas, alpha per gene, 5-fold CV) vs
  scikit-learn ``RidgeCV(alphas, alpha_per_target=True)`` (its efficient LOO);
  ``hexpress_ridge_loo`` is hexpress with exact leave-one-out (``cv="gcv"``), RidgeCV's own criterion;
* hexpress ``PLSHead(n_components=16)`` vs scikit-learn ``PLSRegression(16)``;
* hexpress ``MLPHead`` (defaults) on its own, for CPU vs GPU timings.

A method may name its device after ``@`` (``hexpress_ridge@cuda``); without
one it runs on ``--device``.  On CUDA the context and the cuBLAS/cuSOLVER
libraries are loaded before the clock starts (their seconds are reported
apart as ``cuda_init_s``), and peak GPU memory is reported.

Reported: fit seconds (the median over ``--repeat`` runs, each a fresh
process, interleaved so that machine noise hits both sides alike), held-out
mean PCC per gene, peak RSS, and for PLS the largest relative difference
between the two predictions.  Usage:

    python bench/heads.py [--json bench/out/heads.json] [--device cpu|cuda] [--repeat 3]
    python bench/heads.py --methods hexpress_ridge@cuda,hexpress_ridge@cpu,sklearn_ridgecv,hexpress_mlp@cuda,hexpress_mlp@cpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N, N_TEST, D, G, RANK = 6992, 1748, 1536, 3467, 32
ALPHAS = np.logspace(-1, 5, 13)


def data():
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((N + N_TEST, RANK))
    X = (Z @ rng.standard_normal((RANK, D)) + rng.standard_normal((N + N_TEST, D))).astype(np.float32)
    Y = (0.3 * Z @ rng.standard_normal((RANK, G)) + rng.standard_normal((N + N_TEST, G))).astype(np.float32)
    return X[:N], Y[:N], X[N:], Y[N:]


def estimator(method: str, device: str):
    from sklearn.cross_decomposition import PLSRegression
    from sklearn.linear_model import RidgeCV

    from regress.heads.mlp import MLPHead
    from regress.heads.pls import PLSHead
    from regress.heads.ridge import RidgeHead

    make = {
        "hexpress_ridge": lambda: RidgeHead(alphas=ALPHAS, cv=5, device=device),
        # exact leave-one-out, the criterion RidgeCV itself uses
        "hexpress_ridge_loo": lambda: RidgeHead(alphas=ALPHAS, cv="gcv", device=device),
        "sklearn_ridgecv": lambda: RidgeCV(alphas=ALPHAS, alpha_per_target=True),
        "hexpress_pls": lambda: PLSHead(n_components=16),
        "sklearn_pls": lambda: PLSRegression(16),
        "hexpress_mlp": lambda: MLPHead(device=device),
    }
    if method not in make:
        raise SystemExit(f"unknown method {method}; choose from {', '.join(make)}")
    return make[method]()


def cuda_warmup() -> float:
    """Create the CUDA context and load cuBLAS/cuSOLVER; seconds taken."""
    import torch

    t0 = time.perf_counter()
    a = torch.randn(64, 64, device="cuda", dtype=torch.float64)
    torch.linalg.eigh(a @ a.T)
    (a.float() @ a.float()).sum().item()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def one(method: str, device: str, pred_file: str) -> None:
    from regress.metrics import pcc_per_gene

    X, Y, Xt, Yt = data()
    name, _, dev = method.partition("@")
    dev = dev or device
    est = estimator(name, dev)
    extra = {}
    if dev.startswith("cuda"):
        import torch

        extra["cuda_init_s"] = round(cuda_warmup(), 2)
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    est.fit(X, Y)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        extra["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    fit_s = time.perf_counter() - t0
    P = est.predict(Xt)
    np.save(pred_file, P.astype(np.float32))
    if hasattr(est, "n_epochs_"):
        extra["epochs"] = est.n_epochs_
    print(json.dumps({"method": method, "fit_s": round(fit_s, 2), "heldout_pcc": round(float(np.nanmean(pcc_per_gene(Yt, P))), 4),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **extra}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--pred", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--methods", default="hexpress_ridge,sklearn_ridgecv,hexpress_pls,sklearn_pls")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method; fit seconds is their median")
    args = ap.parse_args()
    if args.one:
        return one(args.one, args.device, args.pred)
    tmp = Path(tempfile.mkdtemp(prefix="hexpress-heads-"))
    rows = []
    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeat):
        for m in methods:
            out = subprocess.run([sys.executable, __file__, "--one", m, "--pred", str(tmp / f"{m}.npy"), "--device", args.device],
                                 capture_output=True, text=True, env=os.environ.copy(), check=False)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[m][-1]), flush=True)
    for m in methods:
        row = dict(runs[m][-1])
        row["fit_s_runs"] = [r["fit_s"] for r in runs[m]]
        row["fit_s"] = round(float(np.median(row["fit_s_runs"])), 2)
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs[m])
        rows.append(row)
    by = {r["method"]: r for r in rows}

    def rel_diff(a: str, b: str) -> float:  # largest prediction difference, relative to b's range
        pa, pb = np.load(tmp / f"{a}.npy"), np.load(tmp / f"{b}.npy")
        return float(np.abs(pa - pb).max() / np.abs(pb).max())

    summary = {}
    for m in by:
        name = m.partition("@")[0]
        if name in ("hexpress_ridge", "hexpress_ridge_loo") and "sklearn_ridgecv" in by:
            summary[m.replace("hexpress_", "").replace("@", "_") + "_speedup"] = round(by["sklearn_ridgecv"]["fit_s"] / by[m]["fit_s"], 2)
        if m.endswith("@cuda") and f"{name}@cpu" in by:
            summary[f"{name}_gpu_speedup"] = round(by[f"{name}@cpu"]["fit_s"] / by[m]["fit_s"], 2)
            summary[f"{name}_gpu_vs_cpu_max_rel_diff"] = rel_diff(m, f"{name}@cpu")
    if "hexpress_pls" in by and "sklearn_pls" in by:
        summary["pls_speedup"] = round(by["sklearn_pls"]["fit_s"] / by["hexpress_pls"]["fit_s"], 2)
        summary["pls_max_rel_diff"] = rel_diff("hexpress_pls", "sklearn_pls")
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and any("cuda" in m or args.device == "cuda" for m in methods) else None
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores" + (f", {gpu}" if gpu else ""), "torch": torch.__version__,
            "shape": f"{N} x {D} -> {G} genes, rank-{RANK} signal, seed 0; {N_TEST} held-out rows"}
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"summary": summary, "meta": meta}))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "meta": meta}, indent=2))


if __name__ == "__main__":
    main()
