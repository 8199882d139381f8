"""The accuracy issue's heads against brute-force versions: reduced-rank ridge, kNN and kernel ridge."""
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from regress.heads.knn import KNNHead
from regress.heads.krr import KernelRidgeHead
from regress.heads.ridge import RidgeHead
from regress.heads.rrr import ReducedRankRidgeHead


def _low_rank(n=200, d=30, g=40, rank=3, noise=2.0, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    B = rng.standard_normal((d, rank)) @ rng.standard_normal((rank, g))
    return X, 0.3 * X @ B + noise * rng.standard_normal((n, g))


def test_reduced_rank_ridge_equals_ridge_on_principal_components_brute_force():
    """At a fixed rank: standardise Y, rotate onto its top-r axes, one sklearn Ridge per component at the alpha the
    head chose for it, rotate back and unscale."""
    X, Y = _low_rank()
    h = ReducedRankRidgeHead(ranks=(5,)).fit(X, Y)
    mean, std = Y.mean(0), Y.std(0)
    _, _, Vt = np.linalg.svd((Y - mean) / std, full_matrices=False)
    Z = ((Y - mean) / std) @ Vt.T
    sc = StandardScaler().fit(X)
    Zhat = np.column_stack([Ridge(alpha=a).fit(sc.transform(X), Z[:, j]).predict(sc.transform(X))
                            for j, a in enumerate(h.component_alpha_[:5])])
    ref = (Zhat @ Vt[:5]) * std + mean
    np.testing.assert_allclose(h.predict(X), ref, rtol=1e-4, atol=1e-5)  # ridge solves in float32
    assert (h.rank_ == 5).all()


def test_reduced_rank_ridge_with_every_component_is_ridge_on_rotated_genes():
    X, Y = _low_rank(g=12)
    full = ReducedRankRidgeHead(ranks=(1000,), alphas=(3.0,)).fit(X, Y)
    ridge = RidgeHead(alphas=(3.0,)).fit(X, Y)  # one alpha for all: rotation commutes with ridge
    np.testing.assert_allclose(full.predict(X), ridge.predict(X), rtol=1e-4, atol=1e-5)


def test_reduced_rank_ridge_finds_a_low_rank_signal_and_beats_ridge_on_new_rows():
    X, Y = _low_rank(n=300, seed=1)
    tr, te = slice(0, 220), slice(220, None)
    h = ReducedRankRidgeHead(ranks=(1, 2, 3, 5, 10, 40)).fit(X[tr], Y[tr])
    r = RidgeHead().fit(X[tr], Y[tr])
    assert np.median(h.rank_) <= 5  # the truth has rank 3
    mse_h = ((h.predict(X[te]) - Y[te]) ** 2).mean()
    mse_r = ((r.predict(X[te]) - Y[te]) ** 2).mean()
    assert mse_h < 0.95 * mse_r
    assert h.cv_scores_.shape == (6, Y.shape[1])


def test_reduced_rank_ridge_rank_choice_never_sees_the_validation_rows_axes(monkeypatch):
    """In each CV fold the principal axes come from the fold's training rows only."""
    import regress.heads.rrr as rrr

    seen = []
    real = rrr._axes

    def spy(Y):
        seen.append(len(Y))
        return real(Y)

    monkeypatch.setattr(rrr, "_axes", spy)
    X, Y = _low_rank(n=100)
    ReducedRankRidgeHead(ranks=(1, 3), cv=4).fit(X, Y, groups=np.repeat(np.arange(4), 25))
    assert seen == [75, 75, 75, 75, 100]


@pytest.mark.parametrize("scoring", ["pcc", "mse"])
def test_reduced_rank_ridge_rank_choice_equals_brute_force_grouped_cv(scoring):
    """Each gene's rank is the best of the grid under brute force: per grouped fold, a fresh head at each fixed
    rank (same component alphas grid), scored by the fold's Pearson r averaged over folds, or by MSE."""
    from regress.cv import make_splits

    X, Y = _low_rank(n=160, d=25, g=15, noise=1.5, seed=3)
    groups = np.repeat(np.arange(4), 40)
    ranks = (1, 3, 6, 100)
    h = ReducedRankRidgeHead(ranks=ranks, cv=4, scoring=scoring).fit(X, Y, groups=groups)
    score = np.zeros((len(ranks), Y.shape[1]))
    splits = make_splits(len(X), 4, groups, 0)
    for train, val in splits:
        for i, r in enumerate(ranks):
            P = ReducedRankRidgeHead(ranks=(r,), cv=4).fit(X[train], Y[train], groups=groups[train]).predict(X[val])
            if scoring == "mse":
                score[i] -= ((P - Y[val]) ** 2).sum(0)
            else:
                score[i] += np.array([np.corrcoef(P[:, j], Y[val, j])[0, 1] for j in range(Y.shape[1])])
    np.testing.assert_allclose(h.cv_scores_ * (len(X) if scoring == "mse" else len(splits)), score, rtol=1e-3,
                               atol=1e-4)
    np.testing.assert_array_equal(h.rank_, np.asarray(ranks)[np.argmax(score, axis=0)])


def test_reduced_rank_ridge_one_setting_for_all_genes_is_brute_force_grouped_cv():
    """per_target=False: one rank for all genes (the best mean fold score under brute force, each fixed-rank head
    also with one alpha) and one alpha shared by every component (ridge's own one-alpha choice on the scores)."""
    from regress.cv import make_splits

    X, Y = _low_rank(n=160, d=25, g=15, noise=1.5, seed=5)
    groups = np.repeat(np.arange(4), 40)
    ranks = (1, 3, 6, 100)
    h = ReducedRankRidgeHead(ranks=ranks, cv=4, per_target=False).fit(X, Y, groups=groups)
    score = np.zeros(len(ranks))
    for train, val in make_splits(len(X), 4, groups, 0):
        for i, r in enumerate(ranks):
            P = ReducedRankRidgeHead(ranks=(r,), cv=4, per_target=False).fit(X[train], Y[train],
                                                                             groups=groups[train]).predict(X[val])
            score[i] += np.mean([np.corrcoef(P[:, j], Y[val, j])[0, 1] for j in range(Y.shape[1])])
    assert len(set(h.rank_)) == 1 and h.rank_[0] == ranks[int(np.argmax(score))]
    assert len(set(h.component_alpha_)) == 1
    per_gene = ReducedRankRidgeHead(ranks=ranks, cv=4).fit(X, Y, groups=groups)
    assert len(set(per_gene.component_alpha_)) > 1  # the grid is wide enough that the choice is a real one
    mean, std = Y.mean(0), Y.std(0)
    _, _, Vt = np.linalg.svd((Y - mean) / std, full_matrices=False)
    r = h.rank_[0]
    sc = StandardScaler().fit(X)
    Zhat = Ridge(alpha=h.component_alpha_[0]).fit(sc.transform(X), ((Y - mean) / std) @ Vt[:r].T)
    np.testing.assert_allclose(h.predict(X), (Zhat.predict(sc.transform(X)) @ Vt[:r]) * std + mean, rtol=1e-4,
                               atol=1e-5)


def test_reduced_rank_ridge_refuses_an_unknown_scoring():
    from sklearn.utils._param_validation import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="scoring"):
        ReducedRankRidgeHead(scoring="r2").fit(*_low_rank(n=40))


@pytest.mark.parametrize("ks", [(3,), (2, 5, 9)])
def test_knn_equals_sklearn_pipeline_at_each_genes_k(ks):
    X, Y = _low_rank(n=140, d=12, g=6, noise=0.5)
    h = KNNHead(n_neighbors=ks, n_components=5).fit(X[:110], Y[:110])
    P = h.predict(X[110:])
    for g in range(Y.shape[1]):
        ref = make_pipeline(StandardScaler(), PCA(5, whiten=True),
                            KNeighborsRegressor(int(h.k_[g]), algorithm="brute")).fit(X[:110], Y[:110, g])
        np.testing.assert_allclose(P[:, g], ref.predict(X[110:]), rtol=1e-9, atol=1e-9)
    assert set(np.unique(h.k_)) <= set(ks)


def test_knn_choice_of_k_by_cv_is_brute_force_cross_validation():
    from regress.cv import make_splits

    X, Y = _low_rank(n=90, d=8, g=4, noise=1.0)
    groups = np.repeat(np.arange(3), 30)
    h = KNNHead(n_neighbors=(2, 6, 15), n_components=4, cv=3).fit(X, Y, groups=groups)
    sse = np.zeros((3, 4))
    for train, val in make_splits(90, 3, groups, 0):
        for i, k in enumerate((2, 6, 15)):
            m = make_pipeline(StandardScaler(), PCA(4, whiten=True), KNeighborsRegressor(k, algorithm="brute"))
            sse[i] += ((m.fit(X[train], Y[train]).predict(X[val]) - Y[val]) ** 2).sum(0)
    np.testing.assert_allclose(h.cv_scores_, -sse / 90, rtol=1e-9)
    np.testing.assert_array_equal(h.k_, np.array((2, 6, 15))[np.argmax(-sse, axis=0)])


# ---------------------------------------------------------------- kernel ridge
def _krr_ref(X, Y, g, a, Xnew):
    """sklearn: standardise on the training rows, KernelRidge(rbf, gamma = g / d) on the centred targets."""
    from sklearn.kernel_ridge import KernelRidge

    sc = StandardScaler().fit(X)
    mu = Y.mean(0)
    return KernelRidge(alpha=a, kernel="rbf", gamma=g / X.shape[1]).fit(sc.transform(X), Y - mu).predict(
        sc.transform(Xnew)) + mu


def test_kernel_ridge_equals_sklearn_kernel_ridge_at_each_genes_width_and_alpha():
    X, Y = _low_rank(n=150, d=10, g=6, noise=0.5)
    h = KernelRidgeHead(widths=(0.1, 1.0), alphas=(0.1, 1.0, 10.0), cv=3).fit(X[:120], Y[:120])
    P = h.predict(X[120:])
    for g in range(Y.shape[1]):
        ref = _krr_ref(X[:120], Y[:120, g:g + 1], h.width_[g], h.alpha_[g], X[120:])[:, 0]
        np.testing.assert_allclose(P[:, g], ref, rtol=1e-7, atol=1e-8)
    assert len({(w, a) for w, a in zip(h.width_, h.alpha_)}) >= 1


@pytest.mark.parametrize("scoring", ["pcc", "mse"])
def test_kernel_ridge_choice_is_brute_force_grouped_cross_validation(scoring):
    from regress.cv import make_splits

    X, Y = _low_rank(n=90, d=6, g=5, noise=1.0)
    groups = np.repeat(np.arange(3), 30)
    widths, alphas = (0.3, 3.0), (0.05, 1.0, 20.0)
    h = KernelRidgeHead(widths=widths, alphas=alphas, cv=3, scoring=scoring).fit(X, Y, groups=groups)
    score = np.zeros((len(widths) * len(alphas), Y.shape[1]))
    splits = make_splits(90, 3, groups, 0)
    for train, val in splits:
        for i, (w, a) in enumerate((w, a) for w in widths for a in alphas):
            P = _krr_ref(X[train], Y[train], w, a, X[val])
            if scoring == "mse":
                score[i] -= ((P - Y[val]) ** 2).sum(0) / 90
            else:
                score[i] += np.array([np.corrcoef(P[:, j], Y[val, j])[0, 1] for j in range(Y.shape[1])]) / len(splits)
    np.testing.assert_allclose(h.cv_scores_, score, rtol=1e-6, atol=1e-9)
    best = np.argmax(score, axis=0)
    np.testing.assert_array_equal(h.width_, np.array(widths)[best // len(alphas)])
    np.testing.assert_array_equal(h.alpha_, np.array(alphas)[best % len(alphas)])
    glob = KernelRidgeHead(widths=widths, alphas=alphas, cv=3, scoring=scoring, per_target=False).fit(X, Y, groups=groups)
    one = np.argmax(score.sum(axis=1))
    assert (glob.width_ == widths[one // len(alphas)]).all() and (glob.alpha_ == alphas[one % len(alphas)]).all()


def test_kernel_ridge_learns_what_a_linear_head_cannot():
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (400, 3))
    Y = np.column_stack([np.sin(2 * X[:, 0]), X[:, 1] ** 2]) + 0.1 * rng.standard_normal((400, 2))
    k = KernelRidgeHead().fit(X[:300], Y[:300])
    r = RidgeHead().fit(X[:300], Y[:300])
    err_k = ((k.predict(X[300:]) - Y[300:]) ** 2).mean()
    err_r = ((r.predict(X[300:]) - Y[300:]) ** 2).mean()
    assert err_k < 0.3 * err_r


def test_kernel_ridge_refuses_more_rows_than_its_kernel_may_hold():
    from core.errors import UsageError

    X, Y = _low_rank(n=50, d=4, g=2)
    with pytest.raises(UsageError, match="50 training rows.*use --head ridge"):
        KernelRidgeHead(max_samples=40).fit(X, Y)


# ---------------------------------------------------------------- the selecting stack
def _members(n=240, g=20, seed=0):
    """Targets, folds and 4 candidate prediction matrices: two informative, one noise, one copy of the first."""
    rng = np.random.default_rng(seed)
    Y = rng.standard_normal((n, g))
    a = Y + 0.8 * rng.standard_normal((n, g))
    b = Y + 1.0 * rng.standard_normal((n, g))
    noise = rng.standard_normal((n, g))
    return Y, np.repeat(np.arange(4), n // 4), [a, noise, b, a.copy()]


def test_select_stack_leaves_out_a_useless_run_and_a_duplicate():
    from regress.runs.stack import Stack

    Y, fold, preds = _members()
    st = Stack("select").fit(preds, Y, fold=fold)
    assert list(st.members_) == [0, 2]  # noise never helps; the copy of run 0 adds nothing
    assert np.allclose(st.weights_[[1, 3]], 0) and np.allclose(st.weights_.sum(0), 1)
    assert 0.0 <= st.shrink_ <= 1.0


def test_select_stack_scores_are_brute_force_cross_fitting():
    from regress.metrics import pcc_per_gene
    from regress.runs.stack import _cross_fitted_score, _nnls_weights

    Y, fold, preds = _members(seed=1)
    P = np.stack(preds[:3])
    manual = []
    for f in range(4):
        tr, va = fold != f, fold == f
        W = _nnls_weights(P[:, tr], Y[tr])
        manual.append(np.nanmean(pcc_per_gene(Y[va], np.einsum("rnj,rj->nj", P[:, va], W))))
    assert _cross_fitted_score(P, Y, fold, 1.0) == pytest.approx(np.mean(manual), rel=1e-12)


@pytest.mark.parametrize("method", ["select", "shrink"])
def test_select_and_shrink_stacks_need_the_runs_folds(method):
    from core.errors import UsageError
    from regress.runs.stack import Stack

    Y, fold, preds = _members()
    with pytest.raises(UsageError, match="folds"):
        Stack(method).fit(preds, Y)


def test_shrink_stack_keeps_every_run_and_chooses_the_shrinkage_by_brute_force_cross_fitting():
    """shrink: the factor whose blend scores best when each fold's weights come from the other folds (computed here
    by hand), and the weights are that mix of per-gene and global non-negative blends over all runs."""
    from regress.metrics import pcc_per_gene
    from regress.runs.stack import SHRINK_GRID, Stack, _global_weights, _nnls_weights

    Y, fold, preds = _members(seed=2)
    P = np.stack(preds)
    scores = []
    for s in SHRINK_GRID:
        r = []
        for f in range(4):
            tr, va = fold != f, fold == f
            W = s * _nnls_weights(P[:, tr], Y[tr]) + (1 - s) * _global_weights(P[:, tr], Y[tr])[:, None]
            r.append(np.nanmean(pcc_per_gene(Y[va], np.einsum("rnj,rj->nj", P[:, va], W))))
        scores.append(np.mean(r))
    st = Stack("shrink").fit(preds, Y, fold=fold)
    assert st.shrink_ == SHRINK_GRID[int(np.argmax(scores))]
    assert list(st.members_) == [0, 1, 2, 3]
    want = st.shrink_ * _nnls_weights(P, Y) + (1 - st.shrink_) * _global_weights(P, Y)[:, None]
    np.testing.assert_allclose(st.weights_, want, atol=1e-12)
    assert np.allclose(st.weights_.sum(0), 1) and (st.weights_ >= 0).all()


@pytest.mark.parametrize("method", ["nnls", "select", "shrink", "ridge"])
def test_center_folds_stack_learns_from_within_fold_variation_only(method):
    """With center_folds the weights are those of the stacker fitted on the fold-centred predictions and targets
    (brute force), so per-fold offsets added to a run change nothing; predictions keep the raw scale."""
    from regress.runs.stack import Stack, _nnls_weights

    Y, fold, preds = _members(seed=2)
    preds = preds[:3]
    rng = np.random.default_rng(5)
    shifted = [p.copy() for p in preds]
    shifted[0] += rng.normal(0, 3.0, (4, Y.shape[1]))[fold]  # large per-fold offsets on run 0
    Ys = Y + rng.normal(0, 2.0, (4, Y.shape[1]))[fold]
    a = Stack(method, center_folds=True).fit(preds, Y, fold=fold)
    b = Stack(method, center_folds=True).fit(shifted, Ys, fold=fold)
    np.testing.assert_allclose(a.weights_, b.weights_, rtol=1e-9, atol=1e-12)
    plain = Stack(method).fit(shifted, Ys, fold=fold)
    assert not np.allclose(plain.weights_, b.weights_, atol=1e-3)  # without centring the offsets move the blend
    if method == "nnls":
        def centred(A):
            A = A.copy()
            for f in range(4):
                A[fold == f] -= A[fold == f].mean(0)
            return A
        np.testing.assert_allclose(a.weights_, _nnls_weights(np.stack([centred(p) for p in preds]), centred(Y)),
                                   rtol=1e-9, atol=1e-12)
    # prediction applies the weights to the raw runs: a blend summing to one, or ridge with the raw intercept
    P = b.predict(shifted)
    blend = np.einsum("rnj,rj->nj", np.stack(shifted), b.weights_)
    if method == "ridge":
        np.testing.assert_allclose(P.mean(0), Ys.mean(0), atol=1e-9)
        np.testing.assert_allclose(P - b.intercept_, blend, atol=1e-9)
    else:
        np.testing.assert_allclose(b.weights_.sum(0), 1.0, atol=1e-9)
        np.testing.assert_allclose(P, blend, atol=1e-12)


def test_center_folds_stack_needs_the_folds():
    from core.errors import UsageError
    from regress.runs.stack import Stack

    Y, _, preds = _members()
    with pytest.raises(UsageError, match="folds"):
        Stack("nnls", center_folds=True).fit(preds, Y)


def test_head_params_read_shell_booleans_and_reach_the_head():
    """``--head-param per_target=false`` (as typed in a shell) is the boolean False, not the string 'false'."""
    from regress.heads.registry import make_head, parse_head_params

    p = parse_head_params(["per_target=false", "scoring=mse", "max_samples=500"])
    assert p == {"per_target": False, "scoring": "mse", "max_samples": 500}
    assert make_head("krr", params=p).per_target is False
    assert parse_head_params(["alpha_per_target=TRUE", "n_components=None", "alphas=(1, 10)"]) == \
        {"alpha_per_target": True, "n_components": None, "alphas": (1, 10)}
    assert make_head("ridge-rr", params={"scoring": "mse"}).scoring == "mse"
