"""The device decoder path (issue: GPU embed), proven on the CPU: torchvision decodes JPEGs on the CPU with
the same code path that uses nvJPEG on CUDA (tests/test_cuda.py runs the CUDA side)."""
import io
import json

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import rewrite_info
from PIL import Image

from featurize.cache import read_attrs, read_cache
from featurize.engine.decode import decode_jpegs, plain_jpeg_size, resize_on_device, resolve_decoder
from core.errors import CacheError, ImageError, UsageError
from featurize.engine.extract import embed
from featurize.tables.images import load_rgb
from featurize.models.transforms import resize_uint8

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

KW = dict(batch_size=8, progress=False, num_workers=0, device="cpu")  # the CPU side, on a GPU machine too
CPU = torch.device("cpu")


def _tissue(size: int, seed: int) -> Image.Image:
    """A smooth, H&E-coloured image (JPEG artefacts stay small, like on real tiles)."""
    rng = np.random.default_rng(seed)
    low = rng.random((size // 16 + 2, size // 16 + 2, 3))
    img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(float) * np.array([0.6, 0.35, 0.6]) + np.array([90, 40, 90])
    return Image.fromarray(np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **{"quality": 90, **kw})
    return b.getvalue()


def _table(folder, files: dict[str, bytes]):
    (folder / "t").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / "t" / name).write_bytes(data)
    ids = [f"S{i:03d}" for i in range(len(files))]
    pd.DataFrame({"ID": ids, "path": [f"t/{n}" for n in files], "g": np.arange(len(files), dtype=float)}).to_csv(
        folder / "tiles.csv", index=False)
    return folder / "tiles.csv"


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


# ---------------------------------------------------------------- the worker's JPEG sniffing
def test_only_plain_baseline_rgb_jpegs_go_to_the_device():
    img = _tissue(64, 0)
    assert plain_jpeg_size(_jpeg(img)) == (64, 64)
    assert plain_jpeg_size(_jpeg(img.resize((80, 48)))) == (80, 48)
    assert plain_jpeg_size(_jpeg(img, progressive=True)) is None
    assert plain_jpeg_size(_jpeg(img.convert("L"))) is None
    assert plain_jpeg_size(_jpeg(img.convert("CMYK"))) is None
    assert plain_jpeg_size(_png(img)) is None
    data = _jpeg(img)
    assert plain_jpeg_size(data[: len(data) // 2]) is None  # truncated: no end marker
    assert plain_jpeg_size(_jpeg(img.resize((6, 6)))) is None  # below the minimum side: Pillow's error


def test_torchvision_cpu_decode_gives_pillows_pixels():
    datas = [_jpeg(_tissue(96, s), subsampling=ss) for s, ss in ((1, 0), (2, 2), (3, 1))]
    got = decode_jpegs([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], CPU)
    for d, t in zip(datas, got):
        ref = np.asarray(load_rgb("x.jpg", d))
        assert np.array_equal(t.permute(1, 2, 0).numpy(), ref)


def test_a_damaged_tile_in_a_batch_comes_back_as_none_and_the_others_decode():
    good = _jpeg(_tissue(64, 1))
    sos = good.index(b"\xff\xda")
    damaged = good[: sos + 4] + b"\xff" * 8 + good[sos + 12 :]
    assert plain_jpeg_size(damaged) == (64, 64)  # looks plain: only decoding finds out
    out = decode_jpegs([torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in (good, damaged, good)], CPU)
    assert out[1] is None and out[0].shape == out[2].shape == (3, 64, 64)


@pytest.mark.parametrize("key", [(64, "bilinear", 0), (64, "bicubic", 0), (48, "bicubic", 72)])
def test_device_resize_is_close_to_pillows(key):
    img = _tissue(150, 4)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    got = resize_on_device([x], key)[0].int()
    ref = resize_uint8(img, key).int()
    assert got.shape == ref.shape
    assert (got - ref).abs().float().mean() < 1.5 and (got - ref).abs().max() <= 40
    same = resize_on_device([resize_uint8(img, key[:2] + (0,))], key[:2] + (0,))[0]
    assert torch.equal(same, resize_uint8(img, key[:2] + (0,)))  # already at size: untouched


def test_decoder_choice_and_errors():
    assert resolve_decoder("auto", CPU) == "pil"
    assert resolve_decoder("device", CPU) == "torchvision-cpu"
    assert resolve_decoder("auto", torch.device("cuda")) == "nvjpeg"
    with pytest.raises(UsageError, match="--decode"):
        resolve_decoder("gpu", CPU)


# ---------------------------------------------------------------- end to end through embed
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A table of 20 tiles: plain JPEGs (two sizes), PNG, grayscale, progressive and CMYK JPEGs.

    160 px: the test backbones' input size, so only ``big.jpg`` is resized."""
    files = {}
    for i in range(12):
        files[f"p{i:02d}.jpg"] = _jpeg(_tissue(160, i))
    files["big.jpg"] = _jpeg(_tissue(224, 50))  # resized on the device
    files["a.png"], files["b.png"] = _png(_tissue(160, 60)), _png(_tissue(160, 61))
    files["gray.jpg"] = _jpeg(_tissue(160, 70).convert("L"))
    files["prog.jpg"] = _jpeg(_tissue(160, 71), progressive=True)
    files["cmyk.jpg"] = _jpeg(_tissue(160, 72).convert("CMYK"))
    files["p12.jpg"] = _jpeg(_tissue(160, 12))
    files["p13.jpg"] = _jpeg(_tissue(160, 13))
    return _table(tmp_path_factory.mktemp("mixed"), files)


def test_device_decoding_matches_pillow_and_the_decoder_is_in_the_key(mixed, tmp_path):
    stats_p, stats_d = {}, {}
    a = embed(mixed, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path, decode="pil", stats=stats_p, **KW)[0]
    b = embed(mixed, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path, decode="device", stats=stats_d, **KW)[0]
    assert a != b  # two caches: the decoder changes the key
    assert "decoder" not in json.loads(read_attrs(a)["key_json"])  # Pillow keys are those of earlier releases
    assert json.loads(read_attrs(b)["key_json"])["decoder"] == "torchvision-cpu"
    assert read_attrs(b)["decoder"] == "torchvision-cpu"
    assert stats_p["decoded"] == {"pil": 20, "device": 0, "fallback": 0}
    # 15 plain JPEGs on the device; PNG x2, grayscale, progressive and CMYK by Pillow in the workers
    assert stats_d["decoded"] == {"pil": 5, "device": 15, "fallback": 0}
    fa, fb = read_cache(a).features.astype(np.float32), read_cache(b).features.astype(np.float32)
    names = pd.read_csv(mixed).path.str.slice(2).tolist()
    resized = names.index("big.jpg")
    others = [i for i in range(len(names)) if i != resized]
    # same decoder library, tiles at input size: the same pixels, so the same features
    np.testing.assert_array_equal(fa[others], fb[others])
    # the one tile resized on the device (torch antialias instead of Pillow): features within 5% of Pillow's
    rel = np.linalg.norm(fa[resized] - fb[resized]) / np.linalg.norm(fa[resized])
    assert 0 < rel < 0.05


def test_multi_backbone_device_pass_equals_separate_passes(mixed, tmp_path):
    joint = embed(mixed, ["timm:test_resnet", "timm:test_vit"], random_init=True, cache_dir=tmp_path / "j",
                  decode="device", **KW)
    for j, name in zip(joint, ["timm:test_resnet", "timm:test_vit"]):
        alone = embed(mixed, [name], random_init=True, cache_dir=tmp_path / name[5:], decode="device", **KW)[0]
        np.testing.assert_array_equal(read_cache(j).features, read_cache(alone).features)


def test_a_corrupt_jpeg_in_a_device_batch_is_a_bad_tile_exactly_as_with_pillow(mixed, tmp_path):
    work = tmp_path / "w"
    import shutil

    shutil.copytree(mixed.parent, work)
    table = work / mixed.name
    df = pd.read_csv(table)
    victim = work / df.path[3]
    good = victim.read_bytes()
    sos = good.index(b"\xff\xda")
    victim.write_bytes(good[: sos + 4] + b"\xff" * 8 + good[sos + 12 :])  # a damaged scan header
    assert plain_jpeg_size(victim.read_bytes()) == (160, 160)  # the worker sends it to the device decoder
    for decode in ("pil", "device"):
        with pytest.raises(ImageError, match=rf"{victim.name}.*cannot be decoded.*row 5 of"):
            embed(table, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path / decode, decode=decode, **KW)
        assert not list((tmp_path / decode).rglob("*.h5"))
    stats = {}
    p = embed(table, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path / "device", decode="device",
              skip_bad=True, stats=stats, **KW)[0]
    q = embed(table, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path / "pil", decode="pil", skip_bad=True,
              **KW)[0]
    cp, cq = read_cache(p), read_cache(q)
    assert df.ID[3] not in set(cp.ids) and list(cp.ids) == list(cq.ids)
    assert df.ID[3] in (p.parent / (p.name + ".skipped.txt")).read_text()
    assert stats["decoded"]["device"] == 14  # the others of the batch were still decoded on the device


def test_interrupted_device_run_resumes_to_the_same_bytes(mixed, tmp_path):
    full = embed(mixed, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path / "a", decode="device", **KW)[0]
    assert embed(mixed, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path / "b", decode="device",
                 max_batches=1, **KW) == []
    with h5py.File(next((tmp_path / "b").rglob("*.partial")), "r") as fh:
        assert fh.attrs["rows_done"] == 8  # the batch computed was written before returning
    again = embed(mixed, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path / "b", decode="device", **KW)[0]
    with h5py.File(full) as f1, h5py.File(again) as f2:
        assert f1["features"][()].tobytes() == f2["features"][()].tobytes()


def test_a_write_error_in_the_writer_thread_stops_embed_and_keeps_the_rows_written(mixed, tmp_path, monkeypatch):
    from featurize import cache as cache_mod

    real = cache_mod.CacheWriter.write
    calls = []

    def failing(self, rows, *a, **k):
        calls.append(len(rows))
        if len(calls) == 2:
            raise CacheError(f"{self.partial}: write failed at row {int(rows[0])} (disk full); free disk space and rerun.")
        return real(self, rows, *a, **k)

    monkeypatch.setattr(cache_mod.CacheWriter, "write", failing)
    with pytest.raises(CacheError, match="disk full"):
        embed(mixed, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path, decode="device", **KW)
    part = next(tmp_path.rglob("*.partial"))
    with h5py.File(part, "r") as fh:
        assert fh.attrs["rows_done"] == 8 and not fh.attrs["complete"]
    assert not list(tmp_path.rglob("*.h5"))
    monkeypatch.setattr(cache_mod.CacheWriter, "write", real)
    out = embed(mixed, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path, decode="device", **KW)[0]
    assert read_cache(out).features.shape[0] == 20


def test_stats_report_first_batch_apart_from_the_steady_rate(mixed, tmp_path, capsys):
    stats = {}
    embed(mixed, ["timm:test_resnet"], random_init=True, cache_dir=tmp_path, decode="device", stats=stats,
          batch_size=4, progress=True, num_workers=0, device="cpu")
    assert stats["rows"] == 20 and stats["first_batch_s"] > 0 and stats["steady_tiles_s"] > 0
    # the steady rate counts the 16 rows after the first batch over the time after it, not all 20
    assert stats["steady_tiles_s"] * (stats["seconds"] - stats["first_batch_s"]) == pytest.approx(16, rel=1e-6)
    err = capsys.readouterr().err
    assert "first batch after" in err and "tiles/s" in err and "decoded on the device (torchvision-cpu): 15" in err


def test_cli_decode_flag_and_predict_reuses_the_training_decoder(mixed, tmp_path):
    import cli

    cache = tmp_path / "c"
    assert cli.main(["embed", "--data", str(mixed), "--backbone", "timm:test_resnet", "--random-init", "--device", "cpu",
                     "--decode", "device", "--cache-dir", str(cache), "--batch-size", "8", "--workers", "0",
                     "--quiet"]) == 0
    assert cli.main(["fit", "--data", str(mixed), "--backbone", "timm:test_resnet", "--cache-dir", str(cache),
                     "--head", "ridge", "--runs-dir", str(tmp_path), "--name", "run", "--folds", "2",
                     "--groups", "none", "--device", "cpu"]) == 0
    test = mixed.parent / "test.csv"
    pd.read_csv(mixed).assign(ID=lambda d: "T" + d.ID).drop(columns="g").to_csv(test, index=False)
    assert cli.main(["predict", str(tmp_path / "run"), "--data", str(test), "--cache-dir", str(cache),
                     "--out", str(tmp_path / "sub.csv"), "--device", "cpu"]) == 0
    made = [json.loads(read_attrs(c)["key_json"]).get("decoder", "pil") for c in cache.glob("test-*/*.h5")]
    assert made == ["torchvision-cpu"]  # the test tiles were decoded as the training tiles were


def test_predict_refuses_a_device_without_the_training_decoder(mixed, tmp_path):
    """A run whose caches were decoded by nvJPEG cannot be matched on a CPU: refused before any embedding."""
    from regress.runs.fit import fit_run
    from regress.runs.predict import predict_table

    cache = tmp_path / "c"
    embed(mixed, ["timm:test_resnet"], random_init=True, cache_dir=cache, decode="device", **KW)
    res = fit_run(mixed, ["timm:test_resnet"], "ridge", cache_dir=cache, runs_dir=tmp_path, folds=2,
                  use_groups=False, log=lambda *a: None)
    info_path = res.path / "run.json"
    info = json.loads(info_path.read_text())
    info["backbones"][0]["key"]["decoder"] = "nvjpeg"  # as if embedded on a GPU
    rewrite_info(res.path, info)
    test = mixed.parent / "test_nv.csv"
    pd.read_csv(mixed).assign(ID=lambda d: "N" + d.ID).drop(columns="g").to_csv(test, index=False)
    with pytest.raises(CacheError, match="decoded by nvjpeg"):
        predict_table(res.path, test, cache_dir=cache, device="cpu")
    assert not list(cache.rglob("test_nv/*.h5"))  # nothing was embedded
