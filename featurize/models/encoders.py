"""Encoders that are not a bare timm model: built here, used through the same extraction path.

Each builder returns a module with ``forward_features`` and
``forward_head(x, pre_logits=True)`` and a ``num_features`` attribute, so
:func:`featurize.models.weights.extract` treats it like any timm model.  A builder
takes the spec's ``model_kwargs`` (tests shrink the architecture with them).
"""
from __future__ import annotations

from typing import Any, Callable


def _conch_v15_vision(**kwargs: Any):
    """CONCH v1.5's vision tower: a ViT-L/16 trunk at 448 px, a one-query attention pooler, a LayerNorm.

    Layout of the published ``pytorch_model_vision.bin``: ``trunk.*`` (timm
    ViT names, LayerScale, class token, no registers), ``attn_pool_contrast.*``
    (``query`` (1, 768), ``ln_k`` over the 1,024-d tokens, ``ln_q``, ``to_q``,
    ``to_kv``, ``to_out`` without biases, 8 heads) and ``ln_contrast`` (768).
    The embedding is ``ln_contrast(pool(tokens))``: 768-d, before any projection.
    """
    import timm
    import torch
    from torch import nn

    trunk_kw = {"img_size": 448, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16,
                "mlp_ratio": 4.0, "init_values": 1.0, "num_classes": 0}
    pool_dim = int(kwargs.pop("pool_dim", 768))
    heads = int(kwargs.pop("pool_heads", 8))
    trunk_kw.update(kwargs)

    class AttentionalPooler(nn.Module):
        def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int = 1):
            super().__init__()
            self.query = nn.Parameter(torch.randn(n_queries, d_model))
            self.heads = n_head
            self.scale = (d_model // n_head) ** -0.5
            self.ln_k = nn.LayerNorm(context_dim)
            self.ln_q = nn.LayerNorm(d_model)
            self.to_q = nn.Linear(d_model, d_model, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
            self.to_out = nn.Linear(d_model, d_model, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, Q, d_model)
            b, h = x.shape[0], self.heads
            q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
            k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)

            def split(t):
                return t.reshape(b, t.shape[1], h, -1).transpose(1, 2)

            attn = (split(q) * self.scale) @ split(k).transpose(-1, -2)
            out = attn.softmax(dim=-1) @ split(v)
            return self.to_out(out.transpose(1, 2).reshape(b, q.shape[1], -1))

    class ConchVisionTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = timm.create_model("vit_large_patch16_224", pretrained=False, **trunk_kw)
            self.attn_pool_contrast = AttentionalPooler(pool_dim, self.trunk.num_features, heads)
            self.ln_contrast = nn.LayerNorm(pool_dim)
            self.num_features = pool_dim

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.trunk.forward_features(x)

        def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
            return self.ln_contrast(self.attn_pool_contrast(x)[:, 0])

    return ConchVisionTower()


CUSTOM_ARCHITECTURES: dict[str, Callable[..., Any]] = {"conch_v15_vision": _conch_v15_vision}
