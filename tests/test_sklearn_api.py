"""scikit-learn's own estimator checks on every head."""
from sklearn.utils.estimator_checks import parametrize_with_checks

from regress.mlp import MLPHead
from regress.pls import PLSHead
from regress.ridge import RidgeHead


@parametrize_with_checks([RidgeHead(), RidgeHead(cv="gcv"), PLSHead(n_components=2), PLSHead(),
                          MLPHead(hidden=32, max_epochs=100, lr=1e-2)])
def test_sklearn_compatible(estimator, check):
    check(estimator)
