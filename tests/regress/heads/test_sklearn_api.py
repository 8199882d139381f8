"""scikit-learn's own estimator checks on every head."""
from sklearn.utils.estimator_checks import parametrize_with_checks

from regress.heads.knn import KNNHead
from regress.heads.krr import KernelRidgeHead
from regress.heads.mlp import MLPHead
from regress.heads.pls import PLSHead
from regress.heads.ridge import RidgeHead
from regress.heads.rrr import ReducedRankRidgeHead


@parametrize_with_checks([RidgeHead(), RidgeHead(cv="gcv"), PLSHead(n_components=2), PLSHead(),
                          MLPHead(hidden=32, max_epochs=100, lr=1e-2), ReducedRankRidgeHead(ranks=(1, 2, 8)),
                          KNNHead(n_neighbors=(1, 3), n_components=4, cv=3),
                          KernelRidgeHead(widths=(0.3, 1.0), alphas=(0.1, 1.0), cv=3)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_heads_work_in_pipeline_and_cross_val_predict():
    import numpy as np
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 8))
    Y = X[:, :3] @ rng.standard_normal((3, 4)) + 0.1 * rng.standard_normal((60, 4))
    for head in (RidgeHead(), PLSHead(n_components=(1, 3)), MLPHead(hidden=16, max_epochs=20)):
        P = cross_val_predict(make_pipeline(StandardScaler(), head), X, Y, cv=3)
        assert P.shape == Y.shape and np.isfinite(P).all()
