"""--center-slides: each slide's mean feature vector removed, at CV and prediction time, from its own tiles only."""
import json

import numpy as np
import pandas as pd
import pytest

from featurize.cache import read_cache
from featurize.errors import TableError, UsageError
from regress.context import slide_centered
from regress.fit import fit_run
from regress.training import load_training_data


def test_slide_centered_removes_each_slides_mean_and_nothing_else():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 5))
    slides = np.repeat(["a", "b", "c"], 10)
    C = slide_centered(X, slides)
    for s in "abc":
        assert np.allclose(C[slides == s].mean(0), 0)
        assert np.allclose(C[slides == s] - X[slides == s], -X[slides == s].mean(0))
    assert np.allclose(slide_centered(X, None), X - X.mean(0))  # no slide column: one slide


def test_a_stain_offset_on_one_slide_changes_no_prediction(syn_cache, tmp_path):
    """Shift every feature of slide S1 by a constant vector (a scanner or stain offset): the centred features, so the
    whole CV, are unchanged, and S1's tiles are centred with S1's own mean only."""
    table, cache_dir = syn_cache
    td = load_training_data(table, ["timm:test_vit"], cache_dir, center_slides=True)
    raw = load_training_data(table, ["timm:test_vit"], cache_dir)
    shifted = raw.X.copy()
    shifted[raw.slides == "S1"] += np.linspace(-3, 3, raw.X.shape[1])
    np.testing.assert_allclose(slide_centered(shifted, raw.slides), td.X, atol=1e-5)  # float32 features
    a = fit_run(table, ["timm:test_vit"], "ridge", cache_dir=cache_dir, runs_dir=tmp_path, folds=4, log=lambda *x: None,
                training=td, center_slides=True)
    info = json.loads((a.path / "run.json").read_text())
    assert info["center_slides"] is True and info["identity_fields"]["center_slides"] is True
    assert a.path.name.endswith("-centered")


def test_predict_centres_the_test_slides_on_their_own_tiles(syn_cache, tmp_path):
    from regress.predict import predict_table
    from regress.runs import load_run

    table, cache_dir = syn_cache
    res = fit_run(table, ["timm:test_vit"], "ridge", cache_dir=cache_dir, runs_dir=tmp_path, folds=4,
                  log=lambda *x: None, center_slides=True)
    test = table.parent / "test_center.csv"
    df = pd.read_csv(table).drop(columns=[c for c in pd.read_csv(table).columns if c.startswith("GENE")])
    df.assign(ID="T" + df.ID).to_csv(test, index=False)
    got = predict_table(res.path, test, cache_dir=cache_dir, device="cpu")
    X = read_cache(next((cache_dir / "test_center").glob("*.h5"))).features.astype(np.float64)
    expect = load_run(res.path).model().predict(slide_centered(X, df.slide.to_numpy()))
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expect, rtol=1e-5, atol=1e-5)


def test_center_slides_needs_a_slide_column_and_no_stream(syn_cache, tmp_path):
    table, cache_dir = syn_cache
    bare = table.parent / "no_slide.csv"
    pd.read_csv(table).drop(columns=["slide"]).to_csv(bare, index=False)
    with pytest.raises(TableError, match="--center-slides needs a slide column"):
        load_training_data(bare, [], cache_files=[str(next(cache_dir.rglob("*.h5")))], center_slides=True)
    with pytest.raises(UsageError, match="drop --stream"):
        fit_run(table, ["timm:test_vit"], "ridge", cache_dir=cache_dir, runs_dir=tmp_path, stream=True,
                center_slides=True)
