import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featurize.cache import find_cache, list_caches, load_features, read_attrs, read_cache, verify_cache
from featurize.errors import CacheError, DeviceError, ImageError
from featurize.extract import embed
from featurize.table import read_table

KW = dict(batch_size=16, progress=False, num_workers=0)


def test_cache_round_trip_and_attrs(syn_cache):
    table_path, cache_dir = syn_cache
    table = read_table(table_path)
    cache = load_features(table, "timm:test_vit", cache_dir)
    assert list(cache.ids) == list(table.ids)
    assert cache.features.shape == (48, 64) and np.isfinite(cache.features).all()
    a = cache.attrs
    assert a["complete"] and a["random_init"] and a["weights_source"] == "random-init"
    assert a["tta"] == 1 and a["table_fingerprint"] == table.fingerprint()
    with h5py.File(cache.path) as fh:
        assert fh["features"].dtype == np.float16 and fh["features"].chunks[0] >= min(48, 256)
    assert verify_cache(cache.path) == []


def test_resume_after_interruption_equals_uninterrupted(syn_table, tmp_path):
    full = embed(syn_table, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "a", **KW)[0]
    out = embed(syn_table, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "b", max_batches=2, **KW)
    assert out == []  # stopped early: nothing complete
    partial = list((tmp_path / "b").rglob("*.partial"))
    assert len(partial) == 1 and not list((tmp_path / "b").rglob("*.h5"))
    with h5py.File(partial[0]) as fh:
        assert fh.attrs["rows_done"] == 32 and not fh.attrs["complete"]
    resumed = embed(syn_table, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "b", **KW)[0]
    with h5py.File(full) as f1, h5py.File(resumed) as f2:
        assert f1["features"][()].tobytes() == f2["features"][()].tobytes()


def test_random_init_is_recorded_and_reproducible(syn_table, tmp_path):
    a = embed(syn_table, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "a", **KW)[0]
    b = embed(syn_table, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "b", **KW)[0]
    assert read_attrs(a)["random_init"] and read_attrs(a)["weights_source"] == "random-init"
    np.testing.assert_array_equal(read_cache(a).features, read_cache(b).features)


def test_multi_backbone_pass_equals_separate_passes(syn_table, tmp_path):
    joint = embed(syn_table, ["timm:test_vit", "timm:test_resnet"], random_init=True, cache_dir=tmp_path / "j", **KW)
    sep = [embed(syn_table, [n], random_init=True, cache_dir=tmp_path / n.replace(":", "_"), **KW)[0]
           for n in ["timm:test_vit", "timm:test_resnet"]]
    assert len(joint) == 2
    for j, s in zip(joint, sep):
        np.testing.assert_array_equal(read_cache(j).features, read_cache(s).features)


def test_tta8_is_invariant_to_rotating_the_tile(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "t").mkdir()
    img = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "t" / "a.png")
    Image.fromarray(np.rot90(img).copy()).save(tmp_path / "t" / "b.png")
    Image.fromarray(np.fliplr(img).copy()).save(tmp_path / "t" / "c.png")
    pd.DataFrame({"ID": ["a", "b", "c"], "path": ["t/a.png", "t/b.png", "t/c.png"]}).to_csv(tmp_path / "r.csv", index=False)
    p = embed(tmp_path / "r.csv", ["timm:test_resnet"], random_init=True, tta=8, dtype="float32",
              cache_dir=tmp_path / "c", **KW)[0]
    f = read_cache(p).features
    scale = np.abs(f[0]).max()
    tta_gap = max(np.abs(f[0] - f[1]).max(), np.abs(f[0] - f[2]).max())
    assert tta_gap < 1e-4 * scale  # float rounding only
    p1 = embed(tmp_path / "r.csv", ["timm:test_resnet"], random_init=True, tta=1, dtype="float32",
               cache_dir=tmp_path / "c", **KW)[0]
    g = read_cache(p1).features
    assert np.abs(g[0] - g[1]).max() > 100 * tta_gap  # without TTA, rotation changes the embedding


def test_stale_cache_is_refused(syn_table, tmp_path):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(syn_table.parent, work)
    table_path = work / syn_table.name
    embed(table_path, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", **KW)
    df = pd.read_csv(table_path)
    df.iloc[:-1].to_csv(table_path, index=False)  # one tile removed
    with pytest.raises(CacheError, match="older version"):
        load_features(read_table(table_path), "timm:test_vit", tmp_path / "c")


def test_foreign_and_truncated_files_are_refused(tmp_path, syn_cache):
    (tmp_path / "t").mkdir()
    junk = tmp_path / "t" / "x.h5"
    junk.write_bytes(b"\x89HDF not really")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        read_cache(junk)
    with h5py.File(tmp_path / "t" / "y.h5", "w") as fh:
        fh["data"] = np.zeros(3)
    with pytest.raises(CacheError, match="not a hexpress cache"):
        read_cache(tmp_path / "t" / "y.h5")
    good = list(syn_cache[1].rglob("*.h5"))[0]
    data = good.read_bytes()
    (tmp_path / "t" / "trunc.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(CacheError):
        read_cache(tmp_path / "t" / "trunc.h5")
    assert any(isinstance(a, str) for _, a in list_caches(tmp_path))


def test_bad_tile_stops_unless_skip_bad(syn_table, tmp_path):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(syn_table.parent, work)
    table_path = work / syn_table.name
    df = pd.read_csv(table_path)
    (work / df.path[5]).write_bytes(b"garbage")
    with pytest.raises(ImageError, match="cannot be decoded"):
        embed(table_path, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", **KW)
    assert not list((tmp_path / "c").rglob("*.h5"))
    p = embed(table_path, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", skip_bad=True, **KW)[0]
    cache = read_cache(p)
    assert len(cache.ids) == 47 and df.ID[5] not in set(cache.ids)
    assert df.ID[5] in (p.parent / (p.name + ".skipped.txt")).read_text()


def test_cuda_without_gpu_is_an_error(syn_table, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        embed(syn_table, ["timm:test_vit"], random_init=True, device="cuda", cache_dir=tmp_path, **KW)


def test_ambiguous_caches_ask_for_cache_flag(syn_table, tmp_path):
    embed(syn_table, ["timm:test_vit"], random_init=True, cache_dir=tmp_path, **KW)
    embed(syn_table, ["timm:test_vit"], random_init=True, tta=8, cache_dir=tmp_path, **KW)
    with pytest.raises(CacheError, match="--cache FILE"):
        find_cache(read_table(syn_table), "timm:test_vit", tmp_path)


def test_autocast_precision_is_part_of_the_cache_key():
    """A CUDA autocast (bfloat16) forward changes the numbers, so it changes the key; a float32 key is
    what it was before the field existed (no spurious re-embeds of CPU caches)."""
    import dataclasses

    import torch

    from featurize.backbones import get_spec
    from featurize.cache import CacheKey
    from featurize.extract import compute_dtype
    from featurize.weights import resolve_weights

    spec = get_spec("timm:test_vit")
    key = CacheKey("t", "fp", spec, resolve_weights(spec, None, True), 1, "float16")
    assert compute_dtype(torch.device("cpu"), spec) == "float32"
    assert "compute" not in key.key_dict()
    amp = dataclasses.replace(key, compute="bfloat16")
    assert amp.fingerprint() != key.fingerprint() and amp.key_dict()["compute"] == "bfloat16"
