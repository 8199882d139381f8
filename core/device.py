"""Device selection shared by both stages: never a silent CPU fallback."""
from __future__ import annotations

from core.errors import DeviceError


def resolve_device(device: str):
    """``auto`` -> cuda when present else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu or auto.")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"--device {device}: expected auto, cpu or cuda.")
