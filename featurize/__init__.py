"""Stage one of hexpress: tiles through frozen backbones into HDF5 caches.

Import the submodules you need (``featurize.models.backbones``, ``featurize.cache``,
``featurize.engine.extract``, ``featurize.tables.table``); importing this package does no
work and loads no model.
"""
from featurize.errors import HexpressError

__version__ = "0.1.0"
__all__ = ["HexpressError", "__version__"]
