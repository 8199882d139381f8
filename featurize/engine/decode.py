"""Where a tile's pixels come from: Pillow in the workers, or JPEGs decoded in batches on the device.

Two decoders, chosen by ``embed --decode`` and recorded in the cache key
(:class:`featurize.cache.CacheKey` ``decoder``), because they differ by a few
grey levels:

* ``pil``: every decode worker opens its tile with Pillow and resizes it with
  Pillow (:func:`featurize.models.transforms.resize_uint8`); the default on CPU.
* ``device``: workers only read and hash the bytes of plain JPEGs; the main
  process decodes them in batches with ``torchvision.io.decode_jpeg`` on the
  compute device (nvJPEG on CUDA, libjpeg-turbo on CPU) and resizes them there
  (antialiased torch interpolation, only when a tile is not already at the
  input size).  Recorded as ``nvjpeg`` or ``torchvision-cpu``.  Tiles that are
  not a plain JPEG (PNG, TIFF, grayscale, CMYK or Adobe-RGB, progressive,
  12-bit, truncated, smaller than the minimum side) take the Pillow path in the
  worker, and a JPEG the device decoder rejects is decoded by Pillow on the
  spot; both are counted and reported.  A tile Pillow cannot read is a bad
  tile exactly as with ``pil`` (error, or skipped with ``--skip-bad``).
"""
from __future__ import annotations

import warnings
from typing import Sequence

from core.errors import UsageError
from featurize.tables.images import MIN_SIDE

DECODE_CHOICES = ("auto", "pil", "device")
#: The decoders a cache key can record; "pil" is left out of the key (older caches stay valid).
DEVICE_DECODERS = ("nvjpeg", "torchvision-cpu")

#: SOF markers of the sequential Huffman JPEGs every decoder agrees on (baseline, extended).
_SOF_SEQUENTIAL = (0xC0, 0xC1)
#: Other frame types: progressive, lossless, hierarchical, arithmetic-coded.
_SOF_OTHER = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_APP14_ADOBE = 0xEE  # colour transform flag: RGB or CMYK JPEGs, left to Pillow


def resolve_decoder(decode: str, device) -> str:
    """The decoder recorded in the key: ``pil``, ``nvjpeg`` or ``torchvision-cpu``.

    ``auto`` is ``device`` on CUDA and ``pil`` on CPU (where the workers decode
    in parallel and the main process's cores belong to the forward pass).
    """
    if decode not in DECODE_CHOICES:
        raise UsageError(f"--decode {decode}: expected one of {', '.join(DECODE_CHOICES)}.")
    if decode == "auto":
        decode = "device" if device.type == "cuda" else "pil"
    if decode == "pil":
        return "pil"
    try:
        import torchvision  # noqa: F401
    except ImportError as exc:
        raise UsageError("--decode device needs torchvision (pip install torchvision); or use --decode pil.") from exc
    return "nvjpeg" if device.type == "cuda" else "torchvision-cpu"


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a baseline or extended 8-bit, 3-component JPEG with an end marker; else None.

    Reads only the marker segments before the first frame header: cheap
    enough for every tile in the workers.
    """
    if len(data) < 12 or data[:2] != b"\xff\xd8" or not data.rstrip(b"\x00")[-2:] == b"\xff\xd9":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_SEQUENTIAL:
            if i + 10 > n:
                return None
            precision, components = data[i + 4], data[i + 9]
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            if precision != 8 or components != 3 or min(width, height) < MIN_SIDE:
                return None
            return width, height
        if marker in _SOF_OTHER or marker == _APP14_ADOBE or marker == 0xDA:
            return None
        i += 2 + length
    return None


def decode_jpegs(chunks: Sequence, device) -> list:
    """Decode a batch of JPEG byte tensors (1-D uint8, CPU) to RGB uint8 CHW tensors on ``device``.

    One batched call; when it fails (a damaged tile), each tile is decoded
    alone and the ones that still fail come back as None.
    """
    import torch
    from torchvision.io import ImageReadMode

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg

        if not chunks:
            return []
        try:
            return list(decode_jpeg(list(chunks), mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            out = []
            for c in chunks:
                try:
                    out.append(decode_jpeg(c, mode=ImageReadMode.RGB, device=device))
                except (RuntimeError, ValueError):
                    out.append(None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # a failed nvJPEG call must not poison the next batch
            return out


def resize_on_device(images: Sequence, key: tuple):
    """RGB uint8 CHW tensors (any sizes, one device) -> uint8 NCHW at ``key = (size, interpolation[, resize_size])``.

    The geometry of :func:`featurize.models.transforms.resize_uint8` (resize, then the
    central crop when ``resize_size`` is set), with antialiased torch
    interpolation; tiles already at the target size are passed through as they are.
    """
    import torch
    import torch.nn.functional as F

    size, interp = key[0], key[1]
    resize = key[2] if len(key) > 2 else 0
    target = resize or size
    mode = {"lanczos": "bicubic"}.get(interp, interp)  # torch has no Lanczos; bicubic with antialias is closest
    kw = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    by_shape: dict[tuple, list[int]] = {}  # one interpolation per distinct tile size, not per tile
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape[-2:]), []).append(i)
    out = [None] * len(images)
    for shape, idx in by_shape.items():
        x = torch.stack([images[i] for i in idx])
        if shape != (target, target):
            x = F.interpolate(x.float(), size=(target, target), mode=mode, **kw).round_().clamp_(0, 255).to(torch.uint8)
        if resize and resize != size:
            off = int(round((resize - size) / 2.0))
            x = x[..., off : off + size, off : off + size]
        for j, i in enumerate(idx):
            out[i] = x[j]
    return torch.stack(out) if out else None
