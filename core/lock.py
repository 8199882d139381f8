"""A cross-process file lock that dies with its holder (POSIX record lock, ``fcntl.lockf``).

A POSIX record lock belongs to the process that took it: forked children
(the embed's decode workers) do not inherit it, and the kernel drops it the
moment its holder dies.  ``flock`` would not do: its lock lives on the open
file description, which forked workers share, so after ``kill -9`` of
``embed`` the lock stayed held until every worker had noticed and exited.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import CacheError


@contextmanager
def file_lock(path: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed).

    The kernel drops the lock when its process dies (children never hold it),
    so a crashed holder never leaves a stale lock.  Waits up to ``wait_s`` seconds, then raises
    :class:`CacheError` naming the lock file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (BlockingIOError, PermissionError):
                if time.monotonic() >= deadline:
                    raise CacheError(
                        f"{path}: another hexpress process is writing this cache; wait for it to finish "
                        "(or pass --wait SECONDS)."
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
