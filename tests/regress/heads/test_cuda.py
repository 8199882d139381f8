"""The GPU paths against the CPU ones.  These need a CUDA device and skip without one (CI has none);
they are run on a lent GPU machine, and BENCHMARKS.md records where and when."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import rel_err, ridge_data

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


def _data(n=240, d=300, g=40, seed=0):
    X, Y = ridge_data(n, d, g, seed, signal=6)
    return X.astype(np.float32), Y.astype(np.float32)



@pytest.mark.parametrize("cv", [5, "gcv"])
@pytest.mark.parametrize("standardize", [True, False])
def test_ridge_cuda_equals_cpu(cv, standardize):
    from regress.heads.ridge import RidgeHead

    X, Y = _data()
    groups = np.repeat(np.arange(6), 40)
    a = RidgeHead(cv=cv, standardize=standardize).fit(X, Y, groups=groups)
    b = RidgeHead(cv=cv, standardize=standardize, device="cuda").fit(X, Y, groups=groups)
    np.testing.assert_allclose(b.cv_scores_, a.cv_scores_, rtol=1e-4, atol=1e-6)
    # a gene whose two best alphas score within rounding may pick either; all others must agree
    assert np.mean(b.alpha_ == a.alpha_) >= 0.95
    same = b.alpha_ == a.alpha_
    assert rel_err(b.predict(X)[:, same], a.predict(X)[:, same]) < 1e-4
    # the fitted model is plain numpy: it predicts on a machine without a GPU
    assert isinstance(b.coef_, np.ndarray)


def test_ridge_cuda_with_pca_preset():
    from regress.heads.registry import make_head

    X, Y = _data(n=400, d=300)
    a = make_head("hest", "cpu").fit(X, Y)
    b = make_head("hest", "cuda").fit(X, Y)
    assert rel_err(b.predict(X), a.predict(X)) < 1e-3


def test_mlp_cuda_matches_cpu_without_dropout():
    """Same seed, same initial weights and batch order: without dropout (whose masks come from the
    device's own generator) CPU and GPU training differ only by rounding."""
    from regress.heads.mlp import MLPHead

    X, Y = _data()
    kw = dict(hidden=64, dropout=0.0, max_epochs=5, patience=100, random_state=3)
    a = MLPHead(**kw).fit(X, Y)
    b = MLPHead(device="cuda", **kw).fit(X, Y)
    assert a.n_epochs_ == b.n_epochs_ == 5
    assert rel_err(b.predict(X), a.predict(X)) < 1e-3
    assert all(t.device.type == "cpu" for t in b.state_.values())


def test_mlp_cuda_with_dropout_learns():
    from regress.metrics import pcc_per_gene
    from regress.heads.mlp import MLPHead

    X, Y = _data(n=600)
    h = MLPHead(device="cuda", max_epochs=40).fit(X[:480], Y[:480])
    assert np.nanmean(pcc_per_gene(Y[480:], h.predict(X[480:]))) > 0.3


def test_embed_cuda_close_to_cpu_and_keyed_apart(syn_table, tmp_path):
    from featurize.cache import read_attrs, read_cache
    from featurize.engine.extract import embed

    kw = dict(random_init=True, batch_size=16, progress=False, num_workers=0, dtype="float32")
    cpu = embed(syn_table, ["timm:test_vit"], device="cpu", cache_dir=tmp_path, **kw)[0]
    gpu = embed(syn_table, ["timm:test_vit"], device="cuda", cache_dir=tmp_path, **kw)[0]
    assert cpu != gpu, "an autocast forward must not reuse the float32 cache"
    assert read_attrs(gpu)["compute"] in ("bfloat16", "float16")
    a, b = read_cache(cpu).features, read_cache(gpu).features
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 0.05  # bfloat16 keeps about 3 significant digits


def test_cli_fit_on_cuda(syn_cache, tmp_path):
    import cli

    table, cache_dir = syn_cache
    for head in ("ridge", "mlp"):
        rc = cli.main(["fit", "--data", str(table), "--backbone", "timm:test_vit", "--cache-dir", str(cache_dir),
                       "--runs-dir", str(tmp_path), "--head", head, "--folds", "4", "--device", "cuda"])
        assert rc == 0
        info = json.loads((tmp_path / f"train-timm_test_vit-{head}" / "run.json").read_text())
        assert info["head"]["params"]["device"] == "cuda"


# ---------------------------------------------------------------- nvJPEG (issue: GPU embed)
def _jpeg_table(folder, n=24, size=160):
    """Plain JPEG tiles at the test backbones' input size, plus one PNG and one progressive JPEG."""
    import io

    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "t").mkdir(parents=True)
    names = []
    for i in range(n):
        low = rng.random((12, 12, 3))
        img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        kind = "png" if i == 5 else "jpg"
        b = io.BytesIO()
        img.save(b, "PNG") if kind == "png" else img.save(b, "JPEG", quality=90, progressive=i == 7)
        names.append(f"t/{i:03d}.{kind}")
        (folder / names[-1]).write_bytes(b.getvalue())
    pd.DataFrame({"ID": [f"J{i:03d}" for i in range(n)], "path": names}).to_csv(folder / "tiles.csv", index=False)
    return folder / "tiles.csv"


def test_nvjpeg_pixels_within_a_few_grey_levels_of_pillow(tmp_path):
    import torch

    from featurize.engine.decode import decode_jpegs
    from featurize.tables.images import load_rgb

    table = _jpeg_table(tmp_path)
    datas = [p.read_bytes() for p in sorted((tmp_path / "t").glob("*.jpg"))]
    got = decode_jpegs([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], torch.device("cuda"))
    for d, t in zip(datas, got):
        assert t is not None and t.device.type == "cuda"
        diff = np.abs(t.permute(1, 2, 0).cpu().numpy().astype(int) - np.asarray(load_rgb(table, d)).astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 16


def test_embed_with_nvjpeg_close_to_pillow_keyed_apart_and_counted(tmp_path):
    from featurize.cache import read_attrs, read_cache
    from featurize.engine.extract import embed

    table = _jpeg_table(tmp_path)
    kw = dict(random_init=True, batch_size=8, progress=False, num_workers=2, dtype="float32", device="cuda")
    s_pil, s_gpu = {}, {}
    a = embed(table, ["timm:test_vit"], decode="pil", cache_dir=tmp_path / "c", stats=s_pil, **kw)[0]
    b = embed(table, ["timm:test_vit"], decode="auto", cache_dir=tmp_path / "c", stats=s_gpu, **kw)[0]
    assert a != b and read_attrs(b)["decoder"] == "nvjpeg"
    assert s_gpu["decoded"] == {"pil": 2, "device": 22, "fallback": 0}  # the PNG and the progressive JPEG by Pillow
    fa, fb = read_cache(a).features, read_cache(b).features
    assert np.linalg.norm(fb - fa) / np.linalg.norm(fa) < 0.02  # a few grey levels of decoder difference


def test_a_corrupt_jpeg_in_an_nvjpeg_batch_is_a_bad_tile_as_with_pillow(tmp_path):
    import pandas as pd

    from featurize.cache import read_cache
    from core.errors import ImageError
    from featurize.engine.extract import embed

    table = _jpeg_table(tmp_path)
    victim = tmp_path / "t" / "003.jpg"
    good = victim.read_bytes()
    sos = good.index(b"\xff\xda")
    victim.write_bytes(good[: sos + 4] + b"\xff" * 8 + good[sos + 12 :])
    kw = dict(random_init=True, batch_size=8, progress=False, num_workers=0, device="cuda")
    with pytest.raises(ImageError, match="003.jpg"):
        embed(table, ["timm:test_vit"], decode="device", cache_dir=tmp_path / "c", **kw)
    p = embed(table, ["timm:test_vit"], decode="device", cache_dir=tmp_path / "c", skip_bad=True, **kw)[0]
    ids = set(read_cache(p).ids)
    assert "J003" not in ids and len(ids) == len(pd.read_csv(table)) - 1
