"""Spatial smoothing of predictions: strength chosen by inner CV, no leakage from the held-out slide."""

import numpy as np

import cli
from conftest import embedded_train_test
from regress.post.context import neighbour_mean
from regress.cv import make_splits
from regress.heads.ridge import RidgeHead
from regress.post.smooth import choose_lambdas, smooth, smoothed_cv


def _slides(n_slides=4, side=12, genes=5, seed=0):
    """Tiles on a grid per slide; genes are a smooth field plus noise, features a noisy view of the field."""
    rng = np.random.default_rng(seed)
    xy, slides, Y, X = [], [], [], []
    for s in range(n_slides):
        gx, gy = np.meshgrid(np.arange(side), np.arange(side))
        pts = np.c_[gx.ravel(), gy.ravel()].astype(float) * 100
        field = np.stack([np.sin(pts[:, 0] / (300 + 80 * j) + s) + np.cos(pts[:, 1] / 400 + j) for j in range(genes)], 1)
        Y.append(field + 0.6 * rng.standard_normal(field.shape))
        X.append(np.c_[field + 1.5 * rng.standard_normal(field.shape), rng.standard_normal((len(pts), 10))])
        xy.append(pts)
        slides += [f"S{s}"] * len(pts)
    return np.vstack(X), np.vstack(Y), np.vstack(xy), np.array(slides)


def test_smoothing_helps_on_smooth_tissue_and_chooses_lambda_per_gene():
    X, Y, xy, slides = _slides()
    splits = make_splits(len(X), 4, slides, 0)
    raw, sm, lams = smoothed_cv(RidgeHead(), X, Y, splits, slides, xy, slides, 6, 3, 0)
    from regress.metrics import pcc_per_gene

    assert np.nanmean(pcc_per_gene(Y, sm)) > np.nanmean(pcc_per_gene(Y, raw)) + 0.02
    assert lams.shape == (4, Y.shape[1]) and (lams > 0).mean() > 0.5
    # lambda 0 reproduces the raw predictions exactly
    nb = neighbour_mean(raw, xy, slides, 6)
    np.testing.assert_array_equal(smooth(raw, nb, np.zeros(Y.shape[1])), raw)
    assert choose_lambdas(Y, raw, raw).tolist() == [0.0] * Y.shape[1]  # no gain -> the least smoothing


def test_no_leakage_held_out_targets_do_not_change_held_out_predictions():
    X, Y, xy, slides = _slides(seed=1)
    splits = make_splits(len(X), 4, slides, 0)
    _, a, lam_a = smoothed_cv(RidgeHead(), X, Y, splits, slides, xy, slides, 6, 3, 0)
    va = splits[0][1]
    Y2 = Y.copy()
    Y2[va] = np.random.default_rng(9).standard_normal(Y2[va].shape) * 5  # the held-out slide's measurements
    _, b, lam_b = smoothed_cv(RidgeHead(), X, Y2, splits, slides, xy, slides, 6, 3, 0)
    np.testing.assert_array_equal(a[va], b[va])  # its smoothed predictions never saw its targets
    np.testing.assert_array_equal(lam_a[0], lam_b[0])
    # and they use only its own slide's neighbours: moving another slide changes nothing there
    xy2 = xy.copy()
    xy2[slides == slides[splits[1][1][0]]] += 5.0
    _, c, _ = smoothed_cv(RidgeHead(), X, Y, splits, slides, xy2, slides, 6, 3, 0)
    np.testing.assert_array_equal(a[va], c[va])


def test_fit_smooth_records_lambdas_and_predict_applies_them(tmp_path):
    from regress.runs.predict import predict_table
    from regress.runs.folder import load_run

    table, test, _ = embedded_train_test(tmp_path, 4)
    argv = ["fit", "--data", str(table), "--backbone", "timm:test_vit", "--cache-dir", str(tmp_path / "c"),
            "--runs-dir", str(tmp_path / "r"), "--folds", "4", "--device", "cpu", "--smooth", "4"]
    assert cli.main(argv) == 0
    run = load_run(tmp_path / "r" / "train-timm_test_vit-ridge-smooth4")
    sm = run.info["smooth"]
    assert sm["k"] == 4 and len(sm["lambdas"]) == 4 and "unsmoothed" in sm
    assert run.info["identity_fields"]["smooth"] == 4
    got = predict_table(run.path, test, cache_dir=tmp_path / "c", device="cpu", log=lambda *a: None)
    from featurize.cache import load_features
    from featurize.tables.table import read_table

    t = read_table(test)
    X = load_features(t, "timm:test_vit", tmp_path / "c").features
    P = run.model().predict(X)
    want = smooth(P, neighbour_mean(P, t.xy, t.slides, 4), np.asarray(sm["lambdas"]))
    np.testing.assert_allclose(got[run.genes].to_numpy(), want, rtol=1e-5, atol=1e-5)
