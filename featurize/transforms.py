"""Preprocessing built only from a :class:`BackboneSpec`.

Workers resize each decoded tile once per distinct ``(size, interpolation)``
and ship uint8 tensors (4x less to copy than float); normalisation to the
spec's mean/std and test-time augmentation happen on the compute device.
The whole tile is resized to the square input (no crop): spot tiles are cut
to the region that was measured, and cropping would drop part of it.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from featurize.backbones import BackboneSpec

_PIL_INTERP = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

#: Number of dihedral transforms (4 rotations x optional flip).
DIHEDRAL = 8


def resize_uint8(img: Image.Image, key: tuple[int, str]) -> torch.Tensor:
    """RGB PIL image -> uint8 CHW tensor of ``key = (size, interpolation)``."""
    size, interp = key
    if img.size != (size, size):
        img = img.resize((size, size), _PIL_INTERP[interp])
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
