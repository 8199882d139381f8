"""Preprocessing built only from a :class:`BackboneSpec`.

Workers resize each decoded tile once per distinct ``(size, interpolation)``
and ship uint8 tensors (4x less to copy than float); normalisation to the
spec's mean/std and test-time augmentation happen on the compute device.
By default the whole tile is resized to the square input (no crop): spot
tiles are cut to the region that was measured, and cropping would drop part
of it.  A spec whose official transform crops (``resize_size``, e.g.
Prov-GigaPath's resize 256 + centre crop 224) gets exactly that.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from featurize.models.backbones import BackboneSpec

_PIL_INTERP = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

#: Number of dihedral transforms (4 rotations x optional flip).
DIHEDRAL = 8


def resize_uint8(img: Image.Image, key: tuple) -> torch.Tensor:
    """RGB PIL image -> uint8 CHW tensor for ``key = (size, interpolation[, resize_size])``.

    With ``resize_size`` > 0 the tile is resized to ``resize_size`` square and
    the central ``size`` x ``size`` kept (torchvision's ``CenterCrop`` offsets).
    """
    size, interp = key[0], key[1]
    resize = key[2] if len(key) > 2 else 0
    target = resize or size
    if img.size != (target, target):
        img = img.resize((target, target), _PIL_INTERP[interp])
    if resize and resize != size:
        off = int(round((resize - size) / 2.0))
        img = img.crop((off, off, off + size, off + size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def normalize(batch: torch.Tensor, spec: BackboneSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW on any device -> normalised float NCHW (channels_last)."""
    mean = torch.tensor(spec.mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    x = (batch.float() - mean) / std
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 flips/rotations of NCHW images (k=0 is identity)."""
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1))
