"""Decode any tile image (PNG/JPEG/TIFF, any mode) to 8-bit RGB."""
from __future__ import annotations

import io
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import ImageError

#: Tiles smaller than this on either side are refused: a resize from them is noise.
MIN_SIDE = 8


@contextmanager
def large_images_allowed() -> Iterator[None]:
    """Lift PIL's decompression-bomb limit for trusted whole-slide images."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; 16-bit and float are rescaled to 0..255,
    transparency is composited onto white (the slide background)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and arr.max() > 255:
            arr = arr * (255.0 / arr.max())
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """Open, fully decode and convert one tile; :class:`ImageError` names the file.

    ``data``: the file's bytes when the caller has read them already (the
    embed workers hash what they decode), so the file is read once.
    """
    p = Path(path)
    if data is None:
        from core.integrity import check_size, regular_size

        size = regular_size(p, ImageError)  # a folder, FIFO or device is refused, never opened
        check_size(p, size, ImageError)
    else:
        size = len(data)
    if size == 0:
        raise ImageError(f"{p}: is an empty (0-byte) file; re-export the tile or drop it with --skip-bad.")
    try:
        with Image.open(io.BytesIO(data) if data is not None else p) as img:
            img.load()
            if min(img.size) < MIN_SIDE:
                raise ImageError(f"{p}: tile is {img.size[0]}x{img.size[1]} px, below the {MIN_SIDE} px minimum; drop it or re-cut it larger.")
            return to_rgb(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "its bytes", str(exc))  # name the file, not a buffer
        raise ImageError(f"{p}: cannot be decoded as an image ({why}); re-export it or use --skip-bad.") from exc
