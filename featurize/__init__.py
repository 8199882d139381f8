"""Stage one of hexpress: tiles through frozen backbones into HDF5 caches.

Import the submodules you need (``featurize.models.backbones``, ``featurize.cache``,
``featurize.engine.extract``, ``featurize.tables.table``); importing this package does no
work and loads no model. Shared pieces (errors, atomic writes, logging, integrity) live
in :mod:`core`.
"""
from core import HexpressError, __version__

__all__ = ["HexpressError", "__version__"]
