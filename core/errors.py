"""Typed, user-facing errors.

Every error the toolkit raises on bad input is a :class:`HexpressError`
subclass whose message is one sentence naming the file, row or flag at
fault and what to do about it.  ``cli.py`` prints the message and exits
with status 2; anything else escaping is a bug.
"""
from __future__ import annotations


class HexpressError(Exception):
    """Base class for errors caused by input or environment, not by a bug."""


class TableError(HexpressError):
    """A tile table (CSV/Parquet) is missing, malformed or inconsistent."""


class ImageError(HexpressError):
    """A tile image cannot be read or decoded."""


class BackboneError(HexpressError):
    """Unknown backbone name or an inconsistent backbone specification."""


class WeightsError(HexpressError):
    """Backbone weights cannot be found or do not fit the architecture."""


class DeviceError(HexpressError):
    """The requested compute device is not available."""


class CacheError(HexpressError):
    """An embedding cache is missing, incomplete, stale, foreign or locked."""


class ImportDataError(HexpressError):
    """Spatial data (ST, Visium, HEST) cannot be turned into a tile table."""


class RunError(HexpressError):
    """A run folder is missing, incomplete or from an incompatible version."""


class UsageError(HexpressError, ValueError):
    """A flag or parameter value is invalid (also a ValueError, as scikit-learn expects)."""


class OutputError(HexpressError):
    """An output file cannot be written (a full disk, a read-only folder)."""
