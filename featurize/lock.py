"""A cross-process file lock that dies with its holder (``fcntl.flock``)."""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from featurize.errors import CacheError


@contextmanager
def file_lock(path: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed).

    The kernel drops a flock when its process dies, so a crashed holder never
    leaves a stale lock.  Waits up to ``wait_s`` seconds, then raises
    :class:`CacheError` naming the lock file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
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
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
