import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import rel_err, ridge_data
from regress.cv import make_splits
from regress.heads.ridge import RidgeHead
from regress.heads.selection import best_index


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("alpha", [0.01, 3.0, 300.0])
@pytest.mark.parametrize("d", [24, 300])
def test_fixed_alpha_equals_sklearn_ridge(standardize, alpha, d):
    X, Y = ridge_data(d=d)
    ref = make_pipeline(StandardScaler(), Ridge(alpha=alpha)) if standardize else Ridge(alpha=alpha)
    ours = RidgeHead(alphas=[alpha], standardize=standardize).fit(X, Y)
    assert rel_err(ours.predict(X), ref.fit(X, Y).predict(X)) < 1e-4


def test_pca_preset_equals_sklearn_pipeline():
    X, Y = ridge_data(d=30)
    ref = make_pipeline(StandardScaler(), PCA(10), Ridge(alpha=5.0, fit_intercept=False)).fit(X, Y)
    ours = RidgeHead(alphas=[5.0], n_components=10, fit_intercept=False).fit(X, Y)
    assert rel_err(ours.predict(X), ref.predict(X)) < 1e-4


def test_hest_alpha_is_computed_not_overwritten():
    X, Y = ridge_data(d=30)
    h = RidgeHead(alphas="hest", n_components=10, fit_intercept=False).fit(X, Y)
    assert h.alpha_[0] == pytest.approx(100 / (10 * Y.shape[1]))
    assert h.n_components_ == 10 and h.alphas == "hest"  # the argument itself is untouched


@pytest.mark.parametrize("scoring", ["mse", "pcc"])
@pytest.mark.parametrize("n_components", [None, 8])
@pytest.mark.parametrize("d", [24, 300])  # 300 > rows: the dual (n x n) decomposition path
def test_kfold_scores_equal_brute_force(scoring, n_components, d):
    """The one-decomposition-per-fold fast path equals refitting sklearn per fold and alpha."""
    X, Y = ridge_data(d=d)
    alphas = [0.1, 10.0, 1000.0]
    groups = np.repeat(np.arange(4), 40)
    h = RidgeHead(alphas=alphas, cv=4, scoring=scoring, n_components=n_components).fit(X, Y, groups=groups)
    splits = make_splits(len(X), 4, groups)
    Ys = (Y - Y.mean(0)) / Y.std(0)
    for a, alpha in enumerate(alphas):
        oof = np.zeros_like(Ys)
        for tr, va in splits:
            steps = [StandardScaler()] + ([PCA(n_components)] if n_components else []) + [Ridge(alpha=alpha)]
            oof[va] = make_pipeline(*steps).fit(X[tr], Ys[tr]).predict(X[va])
        if scoring == "mse":
            expect = -((oof - Ys) ** 2).mean(0)
        else:
            expect = np.array([np.corrcoef(oof[:, j], Ys[:, j])[0, 1] for j in range(Y.shape[1])])
        np.testing.assert_allclose(h.cv_scores_[a], expect, rtol=1e-4, atol=1e-6)
    assert np.all(h.alpha_ == np.asarray(alphas)[np.argmax(h.cv_scores_, axis=0)])


def _loo_neg_mse(X, Ys, alpha):
    loo = np.array([Ridge(alpha=alpha).fit(np.delete(X, i, 0), np.delete(Ys, i, 0)).predict(X[i:i + 1])[0]
                    for i in range(len(X))])
    return -((loo - Ys) ** 2).mean(0)


def test_gcv_equals_brute_force_leave_one_out():
    """GCV standardises with full-data statistics; brute force does the same, then refits n times."""
    X, Y = ridge_data(n=60, d=10, g=4)
    alphas = [0.1, 10.0, 1000.0]
    h = RidgeHead(alphas=alphas, cv="gcv").fit(X, Y)
    Xs = StandardScaler().fit_transform(X)
    Ys = (Y - Y.mean(0)) / Y.std(0)
    for a, alpha in enumerate(alphas):
        np.testing.assert_allclose(h.cv_scores_[a], _loo_neg_mse(Xs, Ys, alpha), rtol=1e-4)


def test_gcv_exact_without_standardisation():
    X, Y = ridge_data(n=50, d=8, g=3)
    alphas = [0.5, 50.0]
    h = RidgeHead(alphas=alphas, cv="gcv", standardize=False).fit(X, Y)
    Ys = (Y - Y.mean(0)) / Y.std(0)
    for a, alpha in enumerate(alphas):
        np.testing.assert_allclose(h.cv_scores_[a], _loo_neg_mse(X, Ys, alpha), rtol=1e-4)


@pytest.mark.parametrize("standardize", [True, False])
def test_gcv_exact_near_interpolation(standardize):
    """More features than rows and a small alpha: 1 - h and the residual are tiny, and computing them
    as 1 - (something near 1) in float32 once cost 1e-4 of the score.  Now 1e-6 or better."""
    X, Y = ridge_data(n=80, d=120, g=5, seed=4)
    alphas = [0.01, 1.0, 100.0]
    h = RidgeHead(alphas=alphas, cv="gcv", standardize=standardize).fit(X, Y)
    Xs = StandardScaler(with_std=standardize).fit_transform(X)
    Ys = (Y - Y.mean(0)) / Y.std(0)
    for a, alpha in enumerate(alphas):
        np.testing.assert_allclose(h.cv_scores_[a], _loo_neg_mse(Xs, Ys, alpha), rtol=1e-6)


def test_masked_update_equals_argmax_and_shared_alpha():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((13, 50))
    np.testing.assert_array_equal(best_index(scores, True), np.argmax(scores, 0))
    assert set(best_index(scores, False)) == {int(np.argmax(scores.mean(1)))}


def test_per_gene_alphas_differ_when_genes_differ():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 20))
    y_signal = X @ rng.standard_normal(20)
    Y = np.stack([y_signal + 0.1 * rng.standard_normal(300), rng.standard_normal(300)], 1)
    h = RidgeHead(cv=5).fit(X, Y)
    assert h.alpha_[0] < h.alpha_[1]  # clean gene: little shrinkage; pure noise: the most
    shared = RidgeHead(cv=5, alpha_per_target=False).fit(X, Y)
    assert shared.alpha_[0] == shared.alpha_[1]


def test_constant_gene_is_handled():
    X, Y = ridge_data()
    Y[:, 2] = 7.0
    h = RidgeHead().fit(X, Y)
    P = h.predict(X)
    assert np.isfinite(P).all() and np.allclose(P[:, 2], 7.0)
    assert list(h.constant_targets_) == [2]


def test_one_dimensional_target():
    X, Y = ridge_data()
    h = RidgeHead(alphas=[1.0]).fit(X, Y[:, 0])
    assert h.predict(X).shape == (len(X),)


def test_cuda_without_gpu_raises():
    import torch

    if torch.cuda.is_available():
        pytest.skip("GPU present")
    from core.errors import DeviceError

    X, Y = ridge_data()
    with pytest.raises(DeviceError):
        RidgeHead(device="cuda").fit(X, Y)


@pytest.mark.parametrize("cv", [4, "gcv"])
@pytest.mark.parametrize("d", [24, 300])
def test_torch_path_equals_numpy_path(cv, d):
    """The torch code path (what --device cuda runs) gives the numpy path's results."""
    X, Y = ridge_data(d=d)
    groups = np.repeat(np.arange(4), 40)
    a = RidgeHead(cv=cv).fit(X, Y, groups=groups)
    b = RidgeHead(cv=cv, device="torch-cpu").fit(X, Y, groups=groups)
    np.testing.assert_allclose(a.cv_scores_, b.cv_scores_, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a.alpha_, b.alpha_)
    assert rel_err(b.predict(X), a.predict(X)) < 1e-4


@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_sum_of_squares_without_predictions_equals_forming_them(device):
    """The partial-fraction sum of P_alpha^2 equals forming every P_alpha, with tied and
    near-tied eigenvalues (runs) and a zero one in the spectrum."""
    from regress.heads.backend import get_backend
    from regress.heads.ridge import _SumSq

    be = get_backend(device)
    rng = np.random.default_rng(3)
    lam = np.sort(rng.uniform(0, 500, 40))[::-1].copy()
    lam[5:8] = lam[5]              # an exact triple
    lam[12] = lam[11] * (1 + 1e-13)  # a near tie
    lam[20:22] = lam[20]
    lam[-3:] = 0.0                  # null directions
    alphas = np.array([0.1, 3.0, 100.0, 1e4])
    W = 1.0 / (lam[None, :] + alphas[:, None])
    A = rng.standard_normal((30, 40)).astype(np.float32)
    B = rng.standard_normal((40, 7)).astype(np.float32)
    args = [be.asarray(A), be.asarray(lam, "float64"), be.asarray(W, "float64"), float(alphas.max())]
    spectral = _SumSq(be, args[0], *args[1:], method="spectral")
    assert not spectral.direct and [tuple(r[0].shape) for r in spectral.runs] == [(2, 2), (2, 3)]
    got = be.to_numpy(spectral(be.asarray(B)))
    direct = be.to_numpy(_SumSq(be, args[0], *args[1:], method="direct")(be.asarray(B)))
    exact = np.stack([(((A.astype(float) * w) @ B.astype(float)) ** 2).sum(0) for w in W])
    np.testing.assert_allclose(got, exact, rtol=1e-5)
    np.testing.assert_allclose(direct, exact, rtol=1e-5)


def test_ridge_cv_needs_complementary_splits():
    from core.errors import UsageError

    X, Y = ridge_data()
    bad = [(np.arange(0, 60), np.arange(100, 160)), (np.arange(60, 160), np.arange(0, 60))]
    with pytest.raises(UsageError, match="split 0"):
        RidgeHead(cv=bad).fit(X, Y)


def test_overlapping_validation_parts_still_exact():
    """Splits whose validation parts overlap (no row layout by fold) score like sklearn refits."""
    X, Y = ridge_data(n=90)
    rng = np.random.default_rng(0)
    splits = []
    for _ in range(3):
        val = np.sort(rng.choice(90, 30, replace=False))
        splits.append((np.setdiff1d(np.arange(90), val), val))
    alphas = [1.0, 100.0]
    h = RidgeHead(alphas=alphas, cv=splits).fit(X, Y)
    Ys = (Y - Y.mean(0)) / Y.std(0)
    for a, alpha in enumerate(alphas):
        se, cnt = 0.0, 0
        for tr, va in splits:
            p = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X[tr], Ys[tr]).predict(X[va])
            se = se + ((p - Ys[va]) ** 2).sum(0)
            cnt += len(va)
        np.testing.assert_allclose(h.cv_scores_[a], -se / cnt, rtol=1e-4)


def test_kfold_scores_exact_with_constant_and_duplicated_features():
    """Constant and repeated columns give many zero (tied) eigenvalues; the fold scores stay exact."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 60))
    X[:, 5] = 3.0
    X[:, 9] = X[:, 8]
    X[:, 10:20] = X[:, 20:30]
    Y = X[:, :3] @ rng.standard_normal((3, 5)) + rng.standard_normal((300, 5))
    alphas = [0.1, 10.0, 1000.0]
    h = RidgeHead(alphas=alphas, cv=5).fit(X, Y)
    Ys = (Y - Y.mean(0)) / Y.std(0)
    for a, alpha in enumerate(alphas):
        oof = np.zeros_like(Ys)
        for tr, va in make_splits(len(X), 5, None, 0):
            oof[va] = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X[tr], Ys[tr]).predict(X[va])
        np.testing.assert_allclose(h.cv_scores_[a], -((oof - Ys) ** 2).mean(0), rtol=1e-5)


def test_default_alphas_do_not_depend_on_the_numpy_release():
    """The defaults are part of every run's identity: written out, equal to 10**(k/2) to the last few ulps."""
    import numpy as np

    from regress.heads.krr import DEFAULT_KRR_ALPHAS
    from regress.heads.ridge import DEFAULT_ALPHAS

    assert DEFAULT_ALPHAS[7] == 316.2277660168379  # what runs made before numpy 2.4 recorded
    np.testing.assert_allclose(DEFAULT_ALPHAS, 10.0 ** (np.arange(-2, 11) / 2), rtol=1e-15)
    np.testing.assert_allclose(DEFAULT_KRR_ALPHAS, 10.0 ** (np.arange(-3, 4) / 2), rtol=1e-15)
