import json
import os
import shutil
import time

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featurize.cache import find_cache, list_caches, load_features, read_attrs, read_cache, verify_cache
from core.errors import CacheError, DeviceError, ImageError
from featurize.engine.extract import embed
from featurize.tables.table import read_table

KW = dict(batch_size=16, progress=False, num_workers=0)


def test_cache_round_trip_and_attrs(syn_cache):
    table_path, cache_dir = syn_cache
    table = read_table(table_path)
    cache = load_features(table, "timm:test_vit", cache_dir)
    assert list(cache.ids) == list(table.ids)
    assert cache.features.shape == (48, 64) and np.isfinite(cache.features).all()
    a = cache.attrs
    assert a["complete"] and a["random_init"] and a["weights_source"] == "random-init"
    from featurize.tables.digests import content_fingerprint, file_digest

    assert a["tta"] == 1 and a["table_fingerprint"] == content_fingerprint(table.ids, [file_digest(p) for p in table.paths])
    assert {"torch", "timm"} <= set(json.loads(a["versions"])) and "notes" not in json.loads(a["key_json"])["spec"]
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


def _bmp_table(root, n=12, seed=0):
    """Uncompressed BMP tiles: a re-cut tile has exactly the old byte size, which a size-based fingerprint misses."""
    rng = np.random.default_rng(seed)
    (root / "t").mkdir(parents=True)
    for i in range(n):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / "t" / f"{i}.bmp")
    pd.DataFrame({"ID": [f"r{i}" for i in range(n)], "path": [f"t/{i}.bmp" for i in range(n)],
                  "g": rng.random(n)}).to_csv(root / "tab.csv", index=False)
    return root / "tab.csv"


def _recut(path, seed):
    before = path.stat().st_size
    Image.fromarray((np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)).save(path)
    assert path.stat().st_size == before


def test_recut_tile_of_same_size_is_stale_and_only_it_is_re_embedded(tmp_path, capsys):
    tab = _bmp_table(tmp_path / "w")
    old = embed(tab, ["timm:test_vit"], random_init=True, dtype="float32", cache_dir=tmp_path / "c", **KW)[0]
    before = read_cache(old).features
    time.sleep(0.01)
    _recut(tmp_path / "w" / "t" / "3.bmp", seed=99)
    with pytest.raises(CacheError, match=r"1 tiles changed content \(first: r3\).*only new and changed"):
        load_features(read_table(tab), "timm:test_vit", tmp_path / "c")
    capsys.readouterr()
    new = embed(tab, ["timm:test_vit"], random_init=True, dtype="float32", cache_dir=tmp_path / "c", **KW)[0]
    assert "11 rows reused" in capsys.readouterr().err and new == old
    after = read_cache(new).features
    fresh = read_cache(embed(tab, ["timm:test_vit"], random_init=True, dtype="float32", cache_dir=tmp_path / "f",
                             **KW)[0]).features
    keep = np.arange(12) != 3
    assert after[keep].tobytes() == before[keep].tobytes()  # reused rows: the very same bytes
    np.testing.assert_allclose(after, fresh, rtol=1e-5, atol=1e-6)  # and the re-embedded row is the new tile's
    assert np.abs(after[3] - before[3]).max() > 1e-3
    assert load_features(read_table(tab), "timm:test_vit", tmp_path / "c").features.shape == (12, 64)


def test_table_that_gains_rows_embeds_only_the_new_ones(tmp_path, capsys, monkeypatch):
    tab = _bmp_table(tmp_path / "w", n=14)
    df = pd.read_csv(tab)
    df.iloc[:10].to_csv(tab, index=False)
    embed(tab, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", **KW)
    df.to_csv(tab, index=False)  # 4 more rows
    import featurize.engine.extract as ex

    seen = []
    real = ex._embed_batch
    monkeypatch.setattr(ex, "_embed_batch", lambda job, b, *a: seen.append(len(b)) or real(job, b, *a))
    capsys.readouterr()
    p = embed(tab, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", **KW)[0]
    assert sum(seen) == 4 and "10 rows reused" in capsys.readouterr().err
    assert list(read_cache(p).ids) == [f"r{i}" for i in range(14)]
    seen.clear()
    embed(tab, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", **KW)
    assert seen == []  # up to date: nothing embedded
    # fewer rows than the cache: served by ID, nothing to embed
    df.iloc[:5].to_csv(tab, index=False)
    assert load_features(read_table(tab), "timm:test_vit", tmp_path / "c").features.shape == (14, 64)


def test_touched_tiles_are_rehashed_not_reembedded_and_deep_verify_checks_content(tmp_path, monkeypatch):
    tab = _bmp_table(tmp_path / "w")
    p = embed(tab, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", **KW)[0]
    tile = tmp_path / "w" / "t" / "5.bmp"
    st = tile.stat()
    os.utime(tile, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: new stat, same bytes
    import featurize.engine.extract as ex

    monkeypatch.setattr(ex, "create_backbone", lambda *a: pytest.fail("nothing should be embedded"))
    assert embed(tab, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", **KW)[0] == p
    with h5py.File(p) as fh:
        assert fh["stats"][5][1] == st.st_mtime_ns + 10**9  # refreshed: not hashed again next time
    assert verify_cache(p, deep=True) == []
    _recut(tile, seed=7)
    os.utime(tile, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size and mtime: only a deep check sees it
    load_features(read_table(tab), "timm:test_vit", tmp_path / "c")
    assert any("1 tiles changed content" in q for q in verify_cache(p, deep=True))
    tile.unlink()
    assert any("1 tiles are gone" in q for q in verify_cache(p, deep=True))


def test_non_finite_features_are_refused_at_write_and_at_read(tmp_path, syn_cache):
    from featurize.models.backbones import get_spec
    from featurize.cache import CacheKey, CacheWriter
    from featurize.models.weights import resolve_weights

    spec = get_spec("timm:test_vit")
    key = CacheKey("t", spec, resolve_weights(spec, None, True), 1, "float16")
    w = CacheWriter(tmp_path / "t" / "x.h5", key, np.array(["a", "b", "c"]), 4)
    w.open()
    feats = np.ones((3, 4), np.float32)
    feats[1, 2] = 1e6  # beyond float16
    with pytest.raises(CacheError, match=r"1 rows give non-finite features \(first: b\).*--dtype float32"):
        w.write(np.arange(3), feats)
    w.close()
    good = next(syn_cache[1].glob("train-*/*.h5"))
    shutil.copy(good, tmp_path / "nan.h5")
    with h5py.File(tmp_path / "nan.h5", "r+") as fh:
        fh["features"][7, 3] = np.nan
    with pytest.raises(CacheError, match=r"rows 0\.\.\d+ do not match their checksum"):  # an edit is caught first
        read_cache(tmp_path / "nan.h5")
    from core.integrity import seal

    with h5py.File(tmp_path / "nan.h5", "r+") as fh:  # a file sealed with a NaN (another writer): still refused
        seal(fh)
    with pytest.raises(CacheError, match=r"1 rows hold NaN or inf.*--dtype float32"):
        read_cache(tmp_path / "nan.h5")


def test_foreign_and_truncated_files_are_refused(tmp_path, syn_cache):
    (tmp_path / "t").mkdir()
    junk = tmp_path / "t" / "x.h5"
    junk.write_bytes(b"\x89HDF not really")
    with pytest.raises(CacheError, match="damaged"):
        read_cache(junk)
    with h5py.File(tmp_path / "t" / "y.h5", "w") as fh:
        fh["data"] = np.zeros(3)
    with pytest.raises(CacheError, match="not a hexpress cache"):
        read_cache(tmp_path / "t" / "y.h5")
    good = next(syn_cache[1].glob("train-*/*.h5"))
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

    from featurize.models.backbones import get_spec
    from featurize.cache import CacheKey
    from featurize.engine.extract import compute_dtype
    from featurize.models.weights import resolve_weights

    spec = get_spec("timm:test_vit")
    key = CacheKey("t", spec, resolve_weights(spec, None, True), 1, "float16")
    assert compute_dtype(torch.device("cpu"), spec) == "float32"
    assert "compute" not in key.key_dict()
    amp = dataclasses.replace(key, compute="bfloat16")
    assert amp.fingerprint() != key.fingerprint() and amp.key_dict()["compute"] == "bfloat16"
