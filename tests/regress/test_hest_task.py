"""``hest-bench`` on a task folder in HEST-Benchmark's layout, patches written by hestcore's own writer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run

hc = pytest.importorskip("hestcore.vst_save_utils", reason="hestcore (pip install --no-deps hestcore==1.0.4)")

GENES = [f"GENE{j}" for j in range(6)]


def make_task(root: Path, samples=("S1", "S2", "S3"), n=24, seed=0) -> Path:
    """bench_data/<TASK>: patches/<s>.h5 (hestcore initsave_hdf5, one patch per call as WSIPatcher.to_h5 does),
    adata/<s>.h5ad (raw counts, extra genes and barcodes the patches lack), var_50genes.json, leave-one-out splits."""
    import anndata

    rng = np.random.default_rng(seed)
    (root / "patches").mkdir(parents=True)
    (root / "adata").mkdir()
    (root / "splits").mkdir()
    for s in samples:
        bars = [f"{s}-bc{i}" for i in range(n)]
        colour = rng.random((n, 3))
        for i, b in enumerate(bars):
            img = (np.ones((32, 32, 3)) * colour[i] * 255 + rng.normal(0, 8, (32, 32, 3))).clip(0, 255).astype(np.uint8)
            hc.initsave_hdf5(str(root / "patches" / f"{s}.h5"),
                             {"img": img[None], "coords": np.array([[i * 64, 0]]), "barcode": np.array([[b]])},
                             {"img": {"patch_size_src": 64, "patch_size_target": 32, "downsample": 2.0,
                                      "pixel_size": 0.5}}, mode="w" if i == 0 else "a")
        counts = rng.poisson((colour @ rng.random((3, len(GENES) + 2)) * 20) + 1)
        extra = rng.poisson(3, (2, len(GENES) + 2))  # barcodes without a patch
        ad = anndata.AnnData(X=np.r_[counts, extra].astype(np.float32),
                             obs=pd.DataFrame(index=bars + [f"{s}-nopatch{k}" for k in range(2)]),
                             var=pd.DataFrame(index=GENES + ["OTHER1", "OTHER2"]))
        ad.write_h5ad(root / "adata" / f"{s}.h5ad")
    (root / "var_50genes.json").write_text(json.dumps({"genes": GENES}))
    for i, test in enumerate(samples):
        for kind, ids in (("train", [s for s in samples if s != test]), ("test", [test])):
            pd.DataFrame({"sample_id": ids, "patches_path": [f"patches/{s}.h5" for s in ids],
                          "expr_path": [f"adata/{s}.h5ad" for s in ids]}).to_csv(root / "splits" / f"{kind}_{i}.csv",
                                                                                 index=False)
    return root


def direct_hest(X, Y, slides, splits):
    """HEST's protocol written out with scikit-learn and numpy (independent of hexpress's runner)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    scores = []
    for train, test in splits:
        tr, te = np.isin(slides, train), np.isin(slides, test)
        # as HEST's train_test_reg: scaler + PCA fit_transform on train (lsqr stops at a tolerance, so the
        # path matters at 1e-4: PCA's fit_transform (U * S) is not bit-equal to fit then transform)
        sc = StandardScaler()
        pca = PCA(n_components=min(256, int(tr.sum()), X.shape[1]))
        Xtr = pca.fit_transform(sc.fit_transform(X[tr]))
        ridge = Ridge(solver="lsqr", alpha=100 / (256 * Y.shape[1]), fit_intercept=False, max_iter=1000,
                      random_state=0).fit(Xtr, Y[tr])
        P = ridge.predict(pca.transform(sc.transform(X[te])))
        scores.append(np.mean([np.corrcoef(Y[te][:, j], P[:, j])[0, 1] for j in range(Y.shape[1])]))
    return float(np.mean(scores)), float(np.std(scores)), scores


def test_hest_bench_reproduces_direct_protocol(tmp_path, capsys):
    import anndata

    from regress.training import load_training_data

    task = make_task(tmp_path / "bench_data" / "TOY")
    out = tmp_path / "out"
    assert run(["hest-bench", task, "--backbone", "timm:test_vit", "--random-init", "--out", out, "--quiet",
                "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "HEST protocol" in printed and "RANDOM weights" in printed
    doc = json.loads((out / "hest-TOY.json").read_text())
    assert doc["genes"] == GENES and doc["n_patches"] == 72
    table = out / "tiles" / "TOY.csv"
    t = pd.read_csv(table)
    # expression is log1p of the raw counts at the patches' barcodes, the task's genes only
    ad = anndata.read_h5ad(task / "adata" / "S2.h5ad")
    row = t[t["ID"] == "S2_S2-bc5"].iloc[0]
    np.testing.assert_allclose(row[GENES].to_numpy(float), np.log1p(ad[["S2-bc5"], GENES].X[0]), rtol=1e-6)
    assert [c for c in t.columns if c.startswith(("GENE", "OTHER"))] == GENES
    td = load_training_data(table, [], cache_files=[doc["cache"]], group_col="slide")
    splits = [(["S2", "S3"], ["S1"]), (["S1", "S3"], ["S2"]), (["S1", "S2"], ["S3"])]
    mean, std, per = direct_hest(td.X.astype(np.float64), td.Y.astype(np.float64), np.asarray(td.slides).astype(str), splits)
    got = doc["results"]["HEST protocol (PCA 256 + ridge)"]
    assert got["mean"] == pytest.approx(mean, abs=1e-6) and got["std"] == pytest.approx(std, abs=1e-6)
    np.testing.assert_allclose([s["pcc"] for s in got["splits"]], per, atol=1e-6)
    assert [s["test"] for s in got["splits"]] == [["S1"], ["S2"], ["S3"]]
    assert "hexpress ridge" in doc["results"] and len(doc["results"]["hexpress ridge"]["splits"]) == 3


def test_hest_bench_bad_task_is_one_line(tmp_path, capsys):
    (tmp_path / "T").mkdir()
    assert run(["hest-bench", tmp_path / "T", "--backbone", "timm:test_vit", "--random-init", "--out",
                tmp_path / "o"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "splits/train_<i>.csv" in err[0]
