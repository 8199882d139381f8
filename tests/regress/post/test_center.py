"""--center-slides: each tile's deviation from its slide's mean feature vector, plus that mean; at CV and
prediction time, each slide centred on its own tiles only."""
import json

import numpy as np
import pandas as pd
import pytest

from featurize.cache import read_cache
from core.errors import TableError, UsageError
from regress.post.context import slide_centered, slide_split
from regress.runs.fit import fit_run
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


def test_slide_split_is_deviation_plus_mean():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((12, 3))
    slides = np.repeat(["a", "b"], 6)
    F = slide_split(X, slides)
    assert F.shape == (12, 6)
    np.testing.assert_allclose(F[:, :3] + F[:, 3:], X)
    np.testing.assert_allclose(F[:6, 3:], np.tile(X[:6].mean(0), (6, 1)))


def test_a_stain_offset_on_one_slide_leaves_its_within_slide_features_and_pcc_unchanged(syn_cache, tmp_path):
    """Shift every feature of slide S1 by a constant vector (a scanner or stain offset): the within-slide part
    of the features is unchanged, so a fitted model's predictions for S1 move by one constant per gene, and
    their Pearson r within S1 does not change."""
    table, cache_dir = syn_cache
    td = load_training_data(table, ["timm:test_vit"], cache_dir, center_slides=True)
    raw = load_training_data(table, ["timm:test_vit"], cache_dir)
    d = raw.X.shape[1]
    shifted = raw.X.copy()
    s1 = raw.slides == "S1"
    shifted[s1] += np.linspace(-3, 3, d)
    F = slide_split(shifted, raw.slides)
    np.testing.assert_allclose(F[:, :d], td.X[:, :d], atol=1e-5)  # float32 features
    a = fit_run(table, ["timm:test_vit"], "ridge", cache_dir=cache_dir, runs_dir=tmp_path, folds=4, log=lambda *x: None,
                training=td, center_slides=True)
    from regress.runs.folder import load_run

    model = load_run(a.path).model()
    moved = model.predict(F[s1]) - model.predict(td.X[s1])
    np.testing.assert_allclose(moved, np.tile(moved[0], (int(s1.sum()), 1)), atol=1e-6)  # one constant per gene
    info = json.loads((a.path / "run.json").read_text())
    assert info["center_slides"] is True and info["identity_fields"]["center_slides"] is True
    assert a.path.name.endswith("-centered")


def test_predict_centres_the_test_slides_on_their_own_tiles(syn_cache, tmp_path):
    from regress.runs.predict import predict_table
    from regress.runs.folder import load_run

    table, cache_dir = syn_cache
    res = fit_run(table, ["timm:test_vit"], "ridge", cache_dir=cache_dir, runs_dir=tmp_path, folds=4,
                  log=lambda *x: None, center_slides=True)
    test = table.parent / "test_center.csv"
    df = pd.read_csv(table).drop(columns=[c for c in pd.read_csv(table).columns if c.startswith("GENE")])
    df.assign(ID="T" + df.ID).to_csv(test, index=False)
    got = predict_table(res.path, test, cache_dir=cache_dir, device="cpu")
    X = read_cache(next(cache_dir.glob("test_center-*/*.h5"))).features.astype(np.float64)
    expect = load_run(res.path).model().predict(slide_split(X, df.slide.to_numpy()))
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), expect, rtol=1e-5, atol=1e-5)


def test_center_slides_needs_a_slide_column_and_no_stream(syn_cache, tmp_path):
    table, cache_dir = syn_cache
    bare = table.parent / "no_slide.csv"
    pd.read_csv(table).drop(columns=["slide"]).to_csv(bare, index=False)
    with pytest.raises(TableError, match="--center-slides needs a slide column"):
        load_training_data(bare, [], cache_files=[str(next(cache_dir.glob("train-*/*.h5")))], center_slides=True)
    with pytest.raises(UsageError, match="drop --stream"):
        fit_run(table, ["timm:test_vit"], "ridge", cache_dir=cache_dir, runs_dir=tmp_path, stream=True,
                center_slides=True)
