"""Named fault points inside the writers, for the fault-injection tests (``tests/test_integrity.py``).

``HEXPRESS_FAULT=<point>`` kills the process with SIGKILL when it reaches ``<point>`` (``<point>@N``: the
N-th time it gets there);
``HEXPRESS_PAUSE=<point>:<seconds>`` sleeps there (to line up a race).  Unset, a point costs one
environment lookup.  Points: ``run-before-swap``, ``run-between-renames``, ``run-after-swap`` (run and
stack folders, :mod:`regress.runs.folder`), ``table-after-tiles`` (importers), ``table-between-sidecar-and-table``
(:func:`featurize.tables.table.write_table`), ``merge-mid`` (``cache merge``, after its first block of rows),
``embed-after-batch`` (a batch of rows written to a cache), ``fit-after-fold`` (a CV fold finished).
"""
from __future__ import annotations

import os

_hits: dict[str, int] = {}


def point(name: str) -> None:
    fault = os.environ.get("HEXPRESS_FAULT")
    if fault and fault.partition("@")[0] == name:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= int(fault.partition("@")[2] or 1):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get("HEXPRESS_PAUSE", "")
    if pause.startswith(name + ":"):
        import time

        time.sleep(float(pause.split(":", 1)[1]))
