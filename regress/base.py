"""What every head shares: input validation, 1-D target handling, multi-output tags."""
from __future__ import annotations

import numpy as np
from sklearn.utils.validation import validate_data

from featurize.errors import UsageError


class MultiOutputHead:
    """Mixin for the heads: ``_validate_fit`` / ``_validate_predict`` and sklearn tags."""

    _head_name = "this head"

    def _validate_fit(self, X, y, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y as 2-D) in ``dtype`` (``None``: float32 or float64 as given); remembers whether y
        was 1-D; refuses fewer than 2 rows."""
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
