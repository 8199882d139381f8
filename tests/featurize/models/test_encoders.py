"""Pathology encoders: each spec against its official construction, each weight format through the real loader.

The real checkpoints are gated on the Hugging Face hub and cannot be fetched
here, so every spec is proven in two ways that need no download:

1. its model, built from the spec (on the meta device: no memory), has the same
   state-dict keys and shapes as the model the official instructions build
   (the ``OFFICIAL`` table: the timm call written in each model card / the
   TRIDENT and HEST loaders), and the published parameter count;
2. a tiny checkpoint *in the official file format* (transformers
   ``save_pretrained`` for Phikon-v2, torchvision's ``state_dict`` for the HEST
   ResNet50, CONCH v1.5's ``trunk.``/``attn_pool_contrast.`` layout, a Hugging
   Face cache folder for UNI) goes through ``resolve_weights`` and
   ``create_backbone`` and gives the same embedding as an independent reference.

What still needs a real checkpoint: that the real files load (strict: any
mismatch is an error naming the keys) and the embeddings' values.
"""
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from featurize.models.backbones import get_spec
from featurize.models.build import build_model, create_backbone, embedding_dim, extract
from featurize.models.weights import resolve_weights

SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
OFFICIAL = {  # name: (timm architecture, kwargs as the official instructions pass them, published params in millions)
    "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                          dynamic_img_size=True), 303),
    "uni2_h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                                             embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                                             reg_tokens=8, dynamic_img_size=True, **SWIGLU), 681),
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                          init_values=1e-5, dynamic_img_size=False), 1134),
    "h_optimus_1": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                          init_values=1e-5, dynamic_img_size=False), 1134),
    "virchow": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                             global_pool="", dynamic_img_size=True, **SWIGLU), 632),
    "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                                              mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, **SWIGLU), 632),
    "prov_gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
                                                       depth=40, num_heads=24, mlp_ratio=5.33334, num_classes=0), 1135),
    "h0_mini": ("vit_base_patch14_reg4_dinov2", dict(img_size=224, num_classes=0, dynamic_img_size=True, **SWIGLU), 86),
    "phikon_v2": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0), 303),
    "resnet50_trunc": ("resnet50", dict(), 25.6),
}
HEST_LEADERBOARD = {"uni", "uni2_h", "h_optimus_0", "h_optimus_1", "virchow", "virchow2", "prov_gigapath", "h0_mini",
                    "phikon_v2", "conch_v15", "resnet50_trunc"}


def _layout(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_every_hest_leaderboard_encoder_is_registered_with_its_transform():
    from featurize.models.backbones import list_backbones

    assert HEST_LEADERBOARD <= set(list_backbones())
    assert get_spec("prov_gigapath").transform.startswith("resize 256 + centre crop 224 bicubic")
    assert get_spec("conch_v15").input_size == 448 and get_spec("resnet50_trunc").embed_dim == 1024


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_spec_builds_the_official_architecture(name):
    arch, kwargs, published_m = OFFICIAL[name]
    spec = get_spec(name)
    with torch.device("meta"):
        ours = build_model(spec)
        ref = timm.create_model(arch, pretrained=False, **kwargs)
    if name == "h0_mini":  # the card passes only the SwiGLU layers; its config sets the width: compare on size
        assert set(_layout(ours)) == set(_layout(ref))
    else:
        assert _layout(ours) == _layout(ref)
    n = sum(p.numel() for p in ours.parameters()) / 1e6
    assert n == pytest.approx(published_m, rel=0.01)
    assert embedding_dim(ours, spec) == spec.embed_dim


def test_conch_v15_tower_has_the_published_layout():
    with torch.device("meta"):
        tower = build_model(get_spec("conch_v15"))
    lay = _layout(tower)
    assert lay["attn_pool_contrast.query"] == (1, 768)
    assert lay["attn_pool_contrast.to_kv.weight"] == (1536, 1024)
    assert lay["attn_pool_contrast.to_q.weight"] == lay["attn_pool_contrast.to_out.weight"] == (768, 768)
    assert lay["attn_pool_contrast.ln_k.weight"] == (1024,) and lay["ln_contrast.weight"] == (768,)
    assert lay["trunk.pos_embed"] == (1, 1 + 28 * 28, 1024) and lay["trunk.blocks.23.ls2.gamma"] == (1024,)
    assert not any(k.startswith("trunk.head") for k in lay) and not any(k.endswith(".bias") for k in lay
                                                                          if k.startswith("attn_pool_contrast.to_"))


# ------------------------------------------------------------------ real loading path, tiny official checkpoints
def test_phikon_v2_dinov2_checkpoint_translates_tensor_by_tensor(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers writes the official Dinov2 checkpoint")
    cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
                                    image_size=64, layerscale_value=0.3)
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(cfg).eval()
    with torch.no_grad():  # layer scales and norms away from their init, so a wrong mapping shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "phikon")
    spec = replace(get_spec("phikon_v2"), input_size=64, embed_dim=64,
                   model_kwargs=(("img_size", 64), ("patch_size", 16), ("embed_dim", 64), ("depth", 2),
                                 ("num_heads", 4), ("init_values", 1e-5), ("num_classes", 0)))
    w = resolve_weights(spec, weights_path=str(tmp_path / "phikon" / "model.safetensors"))
    model = create_backbone(spec, w).float()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ours = extract(model, spec, x.contiguous(memory_format=torch.channels_last))
        ref = hf(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # the transformers 5 names of the same tensors give the same model
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "phikon" / "model.safetensors")
    v5 = {}
    for k, v in sd.items():
        k = (k.replace("attention.attention.query", "attention.q_proj").replace("attention.attention.key", "attention.k_proj")
             .replace("attention.attention.value", "attention.v_proj").replace("attention.output.dense", "attention.o_proj"))
        v5[k] = v
    save_file(v5, tmp_path / "v5.safetensors")
    model5 = create_backbone(spec, resolve_weights(spec, weights_path=str(tmp_path / "v5.safetensors"))).float()
    with torch.inference_mode():
        torch.testing.assert_close(extract(model5, spec, x), ours)


def test_dinov2_position_embeddings_are_resampled_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
                                    image_size=96, layerscale_value=1.0)  # trained grid 6x6, used at 64 px (4x4)
    torch.manual_seed(1)
    hf = transformers.Dinov2Model(cfg).eval()
    hf.save_pretrained(tmp_path / "d")
    spec = replace(get_spec("phikon_v2"), input_size=64, embed_dim=32,
                   model_kwargs=(("img_size", 64), ("patch_size", 16), ("embed_dim", 32), ("depth", 1),
                                 ("num_heads", 2), ("init_values", 1e-5), ("num_classes", 0)))
    model = create_backbone(spec, resolve_weights(spec, weights_path=str(tmp_path / "d" / "model.safetensors"))).float()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(extract(model, spec, x), hf(pixel_values=x).last_hidden_state[:, 0],
                                   rtol=1e-4, atol=1e-4)


def test_hest_resnet50_trunc_loads_torchvision_weights_and_stops_after_layer3(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = tv.models.resnet50().eval()
    torch.save(ref.state_dict(), tmp_path / "resnet50-tv.pth")  # torchvision's own key layout
    spec = get_spec("resnet50_trunc")
    model = create_backbone(spec, resolve_weights(spec, weights_path=str(tmp_path / "resnet50-tv.pth")))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        want = ref.layer3(ref.layer2(ref.layer1(h))).mean(dim=(2, 3))
        got = extract(model, spec, x.contiguous(memory_format=torch.channels_last))
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _conch_reference(sd, x, heads):
    """CONCH v1.5's pooled embedding computed straight from the checkpoint tensors (independent of featurize.models.encoders)."""
    import torch.nn.functional as F

    trunk = timm.create_model("vit_large_patch16_224", pretrained=False, img_size=x.shape[-1], patch_size=16,
                              embed_dim=32, depth=2, num_heads=4, init_values=1.0, num_classes=0)
    tsd = {k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")}
    trunk.load_state_dict(tsd)
    tokens = trunk.eval().forward_features(x)
    p = {k[len("attn_pool_contrast."):]: v for k, v in sd.items() if k.startswith("attn_pool_contrast.")}
    q = F.layer_norm(p["query"], p["query"].shape[-1:], p["ln_q.weight"], p["ln_q.bias"]) @ p["to_q.weight"].T
    ctx = F.layer_norm(tokens, tokens.shape[-1:], p["ln_k.weight"], p["ln_k.bias"])
    k, v = (ctx @ p["to_kv.weight"].T).chunk(2, dim=-1)
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        a = torch.softmax(torch.einsum("qd,bnd->bqn", q[:, sl], k[..., sl]) / d ** 0.5, dim=-1)
        outs.append(torch.einsum("bqn,bnd->bqd", a, v[..., sl]))
    pooled = (torch.cat(outs, -1) @ p["to_out.weight"].T)[:, 0]
    return F.layer_norm(pooled, pooled.shape[-1:], sd["ln_contrast.weight"], sd["ln_contrast.bias"])


def test_conch_v15_checkpoint_loads_and_pools_like_the_reference(tmp_path):
    tiny = (("img_size", 64), ("embed_dim", 32), ("depth", 2), ("num_heads", 4), ("pool_dim", 16), ("pool_heads", 4))
    spec = replace(get_spec("conch_v15"), input_size=64, embed_dim=16, model_kwargs=tiny)
    torch.manual_seed(0)
    # the published checkpoint's trunk grid differs from the input grid: written here at 32 px (2x2), used at 64 px
    src = build_model(replace(spec, model_kwargs=(("img_size", 32),) + tiny[1:]))
    sd = {k: v + 0.05 * torch.randn_like(v) for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model_vision.bin")
    model = create_backbone(spec, resolve_weights(spec, weights_path=str(tmp_path / "pytorch_model_vision.bin"))).float()
    assert model.state_dict()["trunk.pos_embed"].shape == (1, 1 + 16, 32)
    # DINO-style bicubic resampling of the 2x2 grid to 4x4: (new + 0.1) / old scale factor, as the reference loader does
    pe = sd["trunk.pos_embed"]
    grid = pe[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(grid, scale_factor=(4.1 / 2, 4.1 / 2), mode="bicubic", align_corners=False)
    ref_sd = dict(sd)
    ref_sd["trunk.pos_embed"] = torch.cat([pe[:, :1], up.permute(0, 2, 3, 1).reshape(1, 16, 32)], dim=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        got = extract(model, spec, x)
        want = _conch_reference(ref_sd, x, heads=4)
    assert got.shape == (2, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_uni_weights_found_in_the_hf_cache_whatever_the_case(tmp_path, monkeypatch):
    """UNI's instructions download 'MahmoodLab/UNI'; timm examples say 'MahmoodLab/uni': both must be found."""
    snap = tmp_path / "models--MahmoodLab--UNI" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--MahmoodLab--UNI" / "refs").mkdir()
    (tmp_path / "models--MahmoodLab--UNI" / "refs" / "main").write_text("abc123")
    torch.save({"x": torch.zeros(1)}, snap / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for spelling in ("hf:MahmoodLab/UNI", "hf:MahmoodLab/uni"):
        w = resolve_weights(replace(get_spec("uni"), weights=spelling))
        assert w.source == "hf-cache" and w.path.endswith("pytorch_model.bin") and len(w.sha256) == 64


def test_prov_gigapath_transform_is_resize_256_then_centre_crop_224():
    tvt = pytest.importorskip("torchvision.transforms")
    from featurize.models.transforms import resize_uint8

    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((300, 300, 3)) * 255).astype(np.uint8))
    spec = get_spec("prov_gigapath")
    ours = resize_uint8(img, spec.preprocess_key)
    ref = tvt.Compose([tvt.Resize((256, 256), interpolation=tvt.InterpolationMode.BICUBIC, antialias=True),
                       tvt.CenterCrop(224), tvt.PILToTensor()])(img)
    assert ours.shape == (3, 224, 224)
    assert torch.equal(ours, ref)


def test_added_spec_fields_leave_existing_cache_keys_unchanged():
    assert "resize_size" not in get_spec("vit_base").to_dict()
    assert get_spec("prov_gigapath").to_dict()["resize_size"] == 256
