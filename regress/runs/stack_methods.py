"""The stack methods' names (see :mod:`regress.runs.stack`): light, so the CLI lists them without importing
scikit-learn or SciPy."""

METHODS = ("nnls", "select", "shrink", "ridge", "cross-gene")
