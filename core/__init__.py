"""What both stages of hexpress share: typed errors, the registry type, atomic writes,
devices, locks, logging, fault points and the integrity checks of every file read back.

Nothing here imports torch, h5py or scikit-learn at import time; ``featurize`` and
``regress`` both build on it, it builds on neither.
"""
from core.errors import HexpressError

__version__ = "0.1.0"
__all__ = ["HexpressError", "__version__"]
