"""Array backend for the heads: numpy on CPU, torch on CUDA, one code path.

The linear algebra in ``regress.heads.ridge`` and ``regress.heads.pls`` is written
against the array API (``array_api_compat``), so the CPU and GPU paths are
the same code and tested for the same results.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from core.device import resolve_device


@dataclass(frozen=True)
class Backend:
    xp: Any
    device: Any  # None for numpy

    def asarray(self, a, dtype: str = "float32"):
        if self.device is None:
            return np.asarray(a, dtype=dtype)
        import torch

        return torch.as_tensor(np.asarray(a), dtype=getattr(torch, dtype), device=self.device)

    def to_numpy(self, a) -> np.ndarray:
        if self.device is None:
            return np.asarray(a)
        return a.detach().cpu().numpy()

    def astype(self, a, dtype: str):
        return self.xp.astype(a, getattr(self.xp, dtype))


def get_backend(device: str = "cpu") -> Backend:
    """``cpu`` -> numpy (fastest BLAS here); ``cuda``/``auto`` -> torch on the GPU when present;
    ``torch-cpu`` -> the torch code path on the CPU (how tests check the GPU path without a GPU)."""
    if device == "cpu":
        return Backend(array_namespace(np.zeros(1)), None)
    if device == "torch-cpu":
        import torch

        return Backend(array_namespace(torch.zeros(1)), torch.device("cpu"))
    dev = resolve_device(device)
    if dev.type == "cpu":
        return Backend(array_namespace(np.zeros(1)), None)
    import torch

    return Backend(array_namespace(torch.zeros(1, device=dev)), dev)
