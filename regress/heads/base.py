"""What every head shares: input validation, 1-D target handling, multi-output tags."""
from __future__ import annotations

import numpy as np
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.validation import validate_data

from core.errors import UsageError


#: A column whose standard deviation is at most this fraction of max(1, |mean|) is constant (rounding noise in
#: float32 as in float64): it is centred but never divided by its deviation, and a constant gene has no PCC.
CONSTANT_RTOL = 1e-6


def column_moments(A: np.ndarray, rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population, ddof 0) standard deviation in float64, a block of rows at a
    time (no float64 copy of a float32 matrix).  The one standardisation every head uses."""
    mean = A.sum(axis=0, dtype=np.float64) / A.shape[0]
    ss = np.zeros(A.shape[1])
    for i in range(0, A.shape[0], rows):
        dev = A[i:i + rows] - mean
        ss += np.einsum("ij,ij->j", dev, dev)
    return mean, np.sqrt(ss / A.shape[0])


def scale_or_one(mean, std, xp=np):
    """(scale, constant): ``std`` where the column varies, 1 where it is constant (see :data:`CONSTANT_RTOL`).

    Works on numpy and on array-API arrays (torch on the GPU) alike."""
    tol = CONSTANT_RTOL * xp.clip(xp.abs(mean), 1.0, None)
    constant = std <= tol
    return xp.where(constant, xp.ones_like(std), std), constant


def standardizer(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of each column: ``(A - mean) / scale`` standardises it, constant columns only centred."""
    mean, std = column_moments(A)
    return mean, scale_or_one(mean, std)[0]


class HeadParamError(UsageError, InvalidParameterError):
    """A head's constructor parameter is out of its declared range (``_parameter_constraints``)."""


class MultiOutputHead:
    """Mixin for the heads: parameter validation, ``_validate_fit`` / ``_validate_predict`` and sklearn tags."""

    _head_name = "this head"

    def _check_params(self) -> None:
        """scikit-learn's ``_parameter_constraints`` check, raised as a one-sentence hexpress error."""
        try:
            self._validate_params()
        except InvalidParameterError as exc:
            raise HeadParamError(f"{self._head_name}: {exc}") from exc

    def _validate_fit(self, X, y, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y as 2-D) in ``dtype`` (``None``: float32 or float64 as given); remembers whether y
        was 1-D; refuses fewer than 2 rows."""
        self._check_params()
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=[np.float64, np.float32])
        self._y_1d = y.ndim == 1
        Y = y.reshape(-1, 1) if y.ndim == 1 else y
        if X.shape[0] < 2:
            raise UsageError(f"{self._head_name} needs at least 2 samples, got n_samples = 1.")
        if dtype is None:
            return X, Y
        return X.astype(dtype, copy=False), Y.astype(dtype, copy=False)

    def _validate_predict(self, X, dtype=np.float64) -> np.ndarray:
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32]).astype(dtype, copy=False)

    def _linear_predict(self, X) -> np.ndarray:
        """Predictions of heads that store ``coef_`` (genes x features) and ``intercept_``."""
        coef = np.asarray(self.coef_, dtype=np.float64)
        return X @ coef.T + self.intercept_ if coef.ndim == 2 else X @ coef + self.intercept_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
