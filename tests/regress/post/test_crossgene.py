"""--cross-gene: the cross-gene ridge map, its cross-fitted choice (brute force), nesting without leakage,
and fit -> run folder -> predict."""

import dataclasses

import numpy as np
import pytest
from sklearn.linear_model import Ridge

import cli
from conftest import embedded_train_test
from regress.post.crossgene import ALPHAS, BLENDS, CrossGeneMap, CrossGeneStep, choose_map, cv_scores
from regress.cv import make_splits
from regress.post.steps import nested_cv
from regress.heads.ridge import RidgeHead


def _programmes(n_folds=4, per_fold=40, genes=12, noise=1.5, seed=0):
    """Genes driven by 3 shared programmes; P = Y plus independent noise per gene (so genes inform each other)."""
    rng = np.random.default_rng(seed)
    n = n_folds * per_fold
    L = rng.standard_normal((n, 3))
    Y = L @ rng.standard_normal((3, genes)) + 0.3 * rng.standard_normal((n, genes))
    fold = np.repeat(np.arange(n_folds), per_fold)
    Y += fold[:, None] * 0.7  # per-fold offsets, which the map must ignore
    P = Y + noise * rng.standard_normal((n, genes)) + rng.standard_normal(genes)
    return P, Y, fold


def _brute_scores(P, Y, fold):
    """cv_scores written out with sklearn Ridge and np.corrcoef, fold by fold and gene by gene."""
    out = np.zeros((len(ALPHAS), len(BLENDS)))
    folds = np.unique(fold)
    for f in folds:
        tr, va = fold != f, fold == f
        Pt, Yt = P[tr].copy(), Y[tr].copy()
        for g in np.unique(fold[tr]):
            m = fold[tr] == g
            Pt[m] -= Pt[m].mean(0)
            Yt[m] -= Yt[m].mean(0)
        sd = Pt.std(0)
        for i, a in enumerate(ALPHAS):
            r = Ridge(alpha=a * len(Pt), fit_intercept=False).fit(Pt / sd, Yt)
            A = r.coef_.T / sd[:, None]
            A *= Pt.std() / (Pt @ A).std()
            Q = (P[va] - P[tr].mean(0)) @ A + Y[tr].mean(0)
            for j, b in enumerate(BLENDS):
                M = (1 - b) * P[va] + b * Q
                out[i, j] += np.mean([np.corrcoef(Y[va][:, k], M[:, k])[0, 1] for k in range(Y.shape[1])])
    return out / len(folds)


def test_cv_scores_equal_brute_force_ridge_and_pearson():
    P, Y, fold = _programmes(seed=1)
    np.testing.assert_allclose(cv_scores(P, Y, fold), _brute_scores(P, Y, fold), rtol=1e-7, atol=1e-9)


def test_choice_blends_when_genes_share_programmes_and_not_when_they_do_not():
    P, Y, fold = _programmes(seed=2)
    m = choose_map(P, Y, fold)
    scores = m.cv_scores_
    assert m.blend > 0 and scores.max() > scores[0, 0] + 0.05  # pooling co-expressed genes removes noise
    assert scores[ALPHAS.index(m.alpha), BLENDS.index(m.blend)] == scores.max()
    # independent genes predicted well: nothing to borrow, the head's predictions stay as they are
    rng = np.random.default_rng(3)
    Y2 = rng.standard_normal(P.shape)
    P2 = Y2 + 0.2 * rng.standard_normal(P.shape)
    m2 = choose_map(P2, Y2, fold)
    assert m2.blend == 0.0
    np.testing.assert_array_equal(m2.predict(P2), P2)


def test_map_keeps_the_spread_and_ignores_fold_offsets():
    P, Y, fold = _programmes(seed=4)
    m = CrossGeneMap(alpha=1.0, blend=1.0).fit(P, Y, fold)
    Pc = P.copy()
    for f in np.unique(fold):
        Pc[fold == f] -= Pc[fold == f].mean(0)
    assert np.isclose((Pc @ m.coef_).std(), Pc.std())
    shifted = P.copy()
    shifted[fold == 0] += 5.0  # a slide-wide shift of every gene's prediction in one fold
    np.testing.assert_allclose(CrossGeneMap(alpha=1.0, blend=1.0).fit(shifted, Y, fold).coef_, m.coef_, atol=1e-10)


def test_each_slide_keeps_the_heads_mean_and_a_lone_tile_is_unchanged():
    P, Y, fold = _programmes(seed=6)
    m = CrossGeneMap(alpha=1.0, blend=0.75).fit(P, Y, fold)
    out = m.predict(P, fold)
    for f in np.unique(fold):
        np.testing.assert_allclose(out[fold == f].mean(0), P[fold == f].mean(0), atol=1e-10)
    assert not np.allclose(out, P)
    D = P[fold == 1] - P[fold == 1].mean(0)
    np.testing.assert_allclose(out[fold == 1], P[fold == 1] + 0.75 * (D @ m.coef_ - D))  # the stated formula
    np.testing.assert_array_equal(m.predict(P[:1]), P[:1])


def test_nested_held_out_targets_never_reach_held_out_predictions():
    rng = np.random.default_rng(5)
    P, Y, fold = _programmes(seed=5)
    X = np.c_[Y + 2.0 * rng.standard_normal(Y.shape), rng.standard_normal((len(Y), 6))]
    splits = make_splits(len(X), 4, fold, 0)
    raw, a, settings_a = nested_cv(RidgeHead(), X, Y, splits, fold, [CrossGeneStep()], 3, 0)
    va = splits[0][1]
    Y2 = Y.copy()
    Y2[va] = rng.standard_normal(Y2[va].shape) * 7
    _, b, settings_b = nested_cv(RidgeHead(), X, Y2, splits, fold, [CrossGeneStep()], 3, 0)
    np.testing.assert_array_equal(a[va], b[va])
    np.testing.assert_array_equal(settings_a[0][0].coef_, settings_b[0][0].coef_)
    from regress.metrics import evaluate_by_fold

    by_fold = lambda P: evaluate_by_fold(Y, P, fold)["pcc_gene_mean_by_fold"]  # noqa: E731
    assert by_fold(a) > by_fold(raw) + 0.01  # the held-out folds gain from the other genes' predictions


@pytest.mark.parametrize("smooth", [0, 4])
def test_fit_cross_gene_writes_the_map_and_predict_applies_it(tmp_path, smooth, capsys):
    from featurize.cache import load_features
    from featurize.tables.table import read_table
    from regress.post.context import neighbour_mean
    from regress.runs.predict import predict_table
    from regress.runs.folder import load_run
    from regress.post.smooth import smooth as smooth_fn

    table, test, _ = embedded_train_test(tmp_path, 5)
    argv = ["fit", "--data", str(table), "--backbone", "timm:test_vit", "--cache-dir", str(tmp_path / "c"),
            "--runs-dir", str(tmp_path / "r"), "--folds", "4", "--device", "cpu", "--cross-gene"]
    argv += ["--smooth", str(smooth)] if smooth else []
    assert cli.main(argv) == 0
    assert "--cross-gene: blend" in capsys.readouterr().out
    run = load_run(tmp_path / "r" / ("train-timm_test_vit-ridge-crossgene" + (f"-smooth{smooth}" if smooth else "")))
    cg = run.info["cross_gene"]
    assert cg["alpha"] in ALPHAS and cg["blend"] in BLENDS and len(cg["fold_blends"]) == 4 and "before" in cg
    assert run.info["identity_fields"]["cross_gene"] is True
    assert {"cross_gene.json", "cross_gene.npz"} <= set(run.info["model_files"])
    m = run.cross_gene()
    assert isinstance(m, CrossGeneMap) and m.coef_.shape == (5, 5) and (m.alpha, m.blend) == (cg["alpha"], cg["blend"])
    got = predict_table(run.path, test, cache_dir=tmp_path / "c", device="cpu", log=lambda *a: None)
    t = read_table(test)
    want = m.predict(run.model().predict(load_features(t, "timm:test_vit", tmp_path / "c").features), t.slides)
    if smooth:
        want = smooth_fn(want, neighbour_mean(want, t.xy, t.slides, smooth), np.asarray(run.info["smooth"]["lambdas"]))
    np.testing.assert_allclose(got[run.genes].to_numpy(), want, rtol=1e-5, atol=1e-5)


def test_cross_gene_refuses_stream(tmp_path):
    from core.errors import UsageError
    from regress.runs.fit import fit_run

    with pytest.raises(UsageError, match="--cross-gene"):
        fit_run(tmp_path / "none.csv", ["timm:test_vit"], stream=True, cross_gene=True)


def test_stack_cross_gene_of_one_run_is_the_run_level_map():
    from regress.runs.stack import Stack

    P, Y, fold = _programmes(seed=7)
    st = Stack("cross-gene").fit([P], Y, fold=fold)
    m = choose_map(P, Y, fold)
    assert (st.alpha_, st.blend_) == (m.alpha, m.blend) and m.blend > 0
    np.testing.assert_allclose(st.coef_, m.coef_, atol=1e-12)
    np.testing.assert_allclose(st.predict([P], fold), m.predict(P, fold), atol=1e-10)


def test_fit_nested_keeps_inner_predictions_and_stack_cross_gene_learns_only_from_them(tmp_path):
    from sklearn.base import clone

    from featurize.cache import load_features
    from core.errors import RunError
    from featurize.tables.table import read_table
    from regress.cv import cross_val_predict_groups, make_splits
    from regress.heads.registry import make_head
    from regress.runs.predict import predict_table
    from regress.runs.folder import load_run, read_inner_predictions
    from regress.runs.stack import Stack, load_stack, stack_runs

    table, test, cache = embedded_train_test(tmp_path, 5)
    base = ["fit", "--data", str(table), "--backbone", "timm:test_vit", "--cache-dir", str(cache),
            "--runs-dir", str(tmp_path / "r"), "--folds", "4", "--device", "cpu"]
    assert cli.main(base + ["--nested"]) == 0
    assert cli.main(base + ["--nested", "--head", "pls"]) == 0
    assert cli.main(base) == 0  # no inner predictions
    a, b = (load_run(tmp_path / "r" / f"train-timm_test_vit-{h}-nested") for h in ("ridge", "pls"))
    plain = load_run(tmp_path / "r" / "train-timm_test_vit-ridge")
    da = dataclasses.replace(a.data(), **dict(zip(("inner_oof", "inner_fold"), read_inner_predictions(a.path))))
    assert da.inner_oof.shape == (4,) + da.y.shape and a.info["identity_fields"]["nested"] is True
    np.testing.assert_allclose(da.oof, plain.data().oof, atol=1e-6)  # --nested changes nothing the run predicts
    # fold 0's inner predictions: the head refitted on the inner folds of fold 0's training rows only
    t = read_table(table)
    X = load_features(t, "timm:test_vit", cache).features
    tr = np.flatnonzero(da.fold != 0)
    assert np.isnan(da.inner_oof[0][da.fold == 0]).all() and (da.inner_fold[0][da.fold == 0] == -1).all()
    inner = make_splits(len(tr), 5, np.asarray(da.groups)[tr], 0)
    want = cross_val_predict_groups(clone(make_head("ridge", "cpu", 0)), X[tr], da.y[tr].astype(np.float64), inner,
                                    np.asarray(da.groups)[tr])
    np.testing.assert_allclose(da.inner_oof[0][tr], want, rtol=1e-4, atol=1e-5)

    with pytest.raises(RunError, match="fit --nested"):
        stack_runs([a.path, plain.path], out_dir=tmp_path / "bad", method="cross-gene", log=lambda *x: None)
    res = stack_runs([a.path, b.path], out_dir=tmp_path / "st", method="cross-gene", log=lambda *x: None)
    db = dataclasses.replace(b.data(), inner_oof=read_inner_predictions(b.path)[0])
    for f in range(4):  # each held-out fold from a map learned on inner predictions of the other folds only
        trf, va = da.fold != f, da.fold == f
        st = Stack("cross-gene").fit([da.inner_oof[f][trf], db.inner_oof[f][trf]], da.y[trf], fold=da.inner_fold[f][trf])
        np.testing.assert_allclose(res.oof[va], st.predict([da.oof[va], db.oof[va]], np.asarray(da.slides)[va]),
                                   rtol=1e-5, atol=1e-5)
    info, final, runs = load_stack(res.path)
    assert info["cross_gene"]["blend"] in BLENDS and final.coef_.shape == (10, 5)
    got = predict_table(res.path, test, cache_dir=cache, device="cpu", log=lambda *x: None)
    tt = read_table(test)
    Xt = load_features(tt, "timm:test_vit", cache).features
    want = final.predict([r.model().predict(Xt) for r in runs], tt.slides)
    np.testing.assert_allclose(got[a.genes].to_numpy(), want, rtol=1e-4, atol=1e-4)


def test_nested_refuses_post_processing(tmp_path):
    from core.errors import UsageError
    from regress.runs.fit import fit_run

    with pytest.raises(UsageError, match="--nested"):
        fit_run(tmp_path / "none.csv", ["timm:test_vit"], nested=True, cross_gene=True)
