import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.cross_decomposition import PLSRegression

from regress.cv import make_splits
from regress.metrics import evaluate, evaluate_by_fold, pcc_per_gene, pcc_per_tile
from regress.heads.mlp import MLPHead
from regress.heads.pls import PLSHead


def _data(n=200, d=30, g=12, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, 4))
    X = Z @ rng.standard_normal((4, d)) + 0.5 * rng.standard_normal((n, d)) + 2
    Y = Z @ rng.standard_normal((4, g)) + rng.standard_normal((n, g))
    return X, Y


@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("shape", [(200, 30, 12), (40, 120, 90)])
def test_pls_equals_sklearn(k, shape):
    X, Y = _data(*shape)
    # sklearn's power iteration stops at tol=1e-6 by default; converge it fully for an exact reference
    ref = PLSRegression(k, max_iter=100000, tol=1e-14).fit(X, Y).predict(X)
    ours = PLSHead(n_components=k).fit(X, Y).predict(X)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_pls_component_grid_by_grouped_cv():
    X, Y = _data()
    h = PLSHead(n_components=(1, 2, 4, 8), cv=4).fit(X, Y, groups=np.repeat(np.arange(5), 40))
    assert h.cv_scores_.shape == (4, Y.shape[1])
    assert set(np.unique(h.n_components_)) <= {1, 2, 4, 8}
    # data are rank 4: one component is never best on average
    assert h.cv_scores_.mean(1).argmax() > 0


def test_grouped_splits_never_split_a_group():
    groups = np.repeat(list("abcdefg"), 9)
    for folds in (3, 7, 10):
        for tr, va in make_splits(len(groups), folds, groups):
            assert not set(groups[tr]) & set(groups[va])
    assert len(make_splits(len(groups), 10, groups)) == 7  # >= n_groups -> leave one group out


def test_pcc_matches_scipy_and_handles_constants():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((30, 5))
    P = Y + rng.standard_normal((30, 5))
    r = pcc_per_gene(Y, P)
    np.testing.assert_allclose(r, [pearsonr(Y[:, j], P[:, j])[0] for j in range(5)], rtol=1e-10)
    t = pcc_per_tile(Y, P)
    np.testing.assert_allclose(t, [pearsonr(Y[i], P[i])[0] for i in range(30)], rtol=1e-10)
    Y[:, 1] = 3.0  # constant gene: no PCC, excluded from the mean
    P[:, 2] = 1.0  # constant prediction: PCC 0
    m = evaluate(Y, P, [f"g{j}" for j in range(5)])
    assert m["constant_genes"] == ["g1"] and m["per_gene"]["pcc"][1] is None and m["per_gene"]["pcc"][2] == 0.0
    assert np.isfinite(m["pcc_gene_mean"])
    expect = np.mean([pearsonr(Y[:, j], P[:, j])[0] for j in (0, 3, 4)] + [0.0])
    assert m["pcc_gene_mean"] == pytest.approx(expect)


def test_mean_baseline_scores_zero_by_fold():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((40, 3))
    fold = np.repeat([0, 1], 20)
    P = np.where(fold[:, None] == 0, Y[20:].mean(0), Y[:20].mean(0))
    assert evaluate_by_fold(Y, P, fold)["pcc_gene_mean_by_fold"] == 0.0


def test_mlp_is_reproducible_and_learns():
    X, Y = _data()
    a = MLPHead(hidden=32, max_epochs=30, random_state=3).fit(X[:150], Y[:150]).predict(X[150:])
    b = MLPHead(hidden=32, max_epochs=30, random_state=3).fit(X[:150], Y[:150]).predict(X[150:])
    np.testing.assert_array_equal(a, b)
    assert np.nanmean(pcc_per_gene(Y[150:], a)) > 0.5
