"""Write-then-rename: a half-written output never carries its final name."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(out: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``out``; when the block completes it is renamed to
    ``out``, and if the block raises it is deleted.  ``suffix`` keeps an extension that a writer
    reads the format from (``.png`` for matplotlib, ``.h5ad`` for anndata)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
