"""Write-then-rename: a half-written output never carries its final name."""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import OutputError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def space_message(out: Path, written: int = 0) -> str:
    """'needs more than X MiB, Y MiB free': what a user needs to know to free space."""
    try:
        free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    except OSError:
        free = 0
    return f"{written / 2**20:.1f} MiB were written before the disk filled and {free / 2**20:.1f} MiB are free"


def output_error(out: Path, exc: BaseException, written: int = 0) -> OutputError:
    """The one-sentence error for an output that could not be written (full disk, permissions)."""
    text = str(exc)
    full = getattr(exc, "errno", None) in _FULL or "No space left" in text or "quota" in text.lower()
    if full:
        return OutputError(f"{out}: cannot be written, the disk is full ({space_message(out, written)}); free disk "
                           "space or write elsewhere, and rerun - nothing was replaced.")
    why = getattr(exc, "strerror", None) or (text.splitlines()[0][:160] if text else type(exc).__name__)
    return OutputError(f"{out}: cannot be written ({why}); check the folder's permissions or write elsewhere.")


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


@contextmanager
def atomic_path(out: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``out``; when the block completes it is renamed to
    ``out``, and if the block raises it is deleted.  ``suffix`` keeps an extension that a writer
    reads the format from (``.png`` for matplotlib, ``.h5ad`` for anndata).  A full disk or a
    folder that cannot be written becomes one :class:`OutputError` naming ``out``."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from exc
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{suffix}")
    try:
        try:
            yield tmp
            os.replace(tmp, out)
        except OSError as exc:
            raise output_error(out, exc, _size(tmp)) from exc
        except RuntimeError as exc:  # h5py reports a failed flush as RuntimeError
            if "write failed" not in str(exc) and "No space" not in str(exc):
                raise
            raise output_error(out, exc, _size(tmp)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
