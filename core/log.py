"""The library's one logger: messages go through ``logging`` (logger ``hexpress``), and the CLI sets the level.

``--quiet`` keeps warnings and errors, ``--verbose`` adds the debug lines, the default shows what each step did;
progress bars stay on stderr, results (tables, paths written) on stdout.  Library code says things with
:func:`say` (info, the default ``log=`` of the stage-2 functions) or :func:`warn`; used as an API without
:func:`configure`, the step lines go to stderr at the default level.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator

LOG = logging.getLogger("hexpress")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the moment (a test's capture, a redirected stream)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return f"warning: {msg}" if record.levelno == logging.WARNING else msg


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Send the library's messages to stderr at the level the flags ask for."""
    handler = _Stderr()
    handler.setFormatter(_Format())
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    LOG.propagate = False


@contextmanager
def scope(verbose: bool = False, quiet: bool = False) -> Iterator[None]:
    """:func:`configure` for one command, then the logger as it was (``cli.main`` called twice in one process,
    as tests and notebooks do, never leaves the first call's ``--quiet`` behind)."""
    saved = (list(LOG.handlers), LOG.level, LOG.propagate)
    configure(verbose, quiet)
    try:
        yield
    finally:
        LOG.handlers[:], LOG.level, LOG.propagate = saved[0], saved[1], saved[2]


def _ensure() -> None:
    """Used as a library without the CLI: the step lines still reach stderr (as they always did)."""
    if not LOG.handlers:
        configure()


def say(msg: str) -> None:
    """An info line (what a step did): shown by default, hidden by ``--quiet``."""
    _ensure()
    LOG.info(msg)


def warn(msg: str) -> None:
    """A warning (printed as ``warning: ...``): shown unless the CLI's level is above it."""
    _ensure()
    LOG.warning(msg)


def debug(msg: str) -> None:
    """A debug line: shown with ``--verbose``."""
    _ensure()
    LOG.debug(msg)
