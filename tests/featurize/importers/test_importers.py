import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import HER2ST, VISIUM, fake_st as _fake_st, needs_her2st, needs_visium
from core.errors import ImportDataError
from featurize.importers.common import normalize
from featurize.importers.embeddings import import_embeddings
from featurize.importers.hest import import_hest
from featurize.importers.st import import_st
from featurize.importers.visium import import_visium
from featurize.tables.table import read_table


def test_st_import_reports_dropped_spots_and_pads(tmp_path):
    keys = _fake_st(tmp_path / "st")
    out = import_st(tmp_path / "st", tmp_path / "out", name="t", tile_px=150, out_px=32, n_genes=10, min_spots=0.0)
    t = read_table(out)
    side = json.loads((tmp_path / "out" / "t.json").read_text())
    rep = side["slides"]["A1"]
    assert rep["dropped_only_in_spot_file"] == 1 and rep["first_dropped_keys"] == [keys[0]]
    assert len(t) == 35 and len(t.genes) == 10 and t.group_col == "patient"
    assert rep["tiles_padded_at_border"] > 0  # corner spots are 60-70 px from the edge, tile half-side 75
    assert Image.open(t.paths[0]).size == (32, 32)
    assert rep["pixels_per_um"] == pytest.approx(80 / 200)


def test_st_tile_um_uses_the_spot_pitch(tmp_path):
    _fake_st(tmp_path / "st")
    import_st(tmp_path / "st", tmp_path / "o", name="t", tile_um=100, out_px=16, n_genes=5, min_spots=0.0)
    assert json.loads((tmp_path / "o" / "t.json").read_text())["slides"]["A1"]["tile_px"] == pytest.approx(40)


def test_st_mismatch_and_outside_image_fail_without_a_table(tmp_path):
    _fake_st(tmp_path / "a", drop_counts=30)
    with pytest.raises(ImportDataError, match="share a key"):
        import_st(tmp_path / "a", tmp_path / "oa", name="t", tile_px=50, n_genes=5, min_spots=0.0)
    assert not (tmp_path / "oa" / "t.csv").exists()
    _fake_st(tmp_path / "b", image_size=(300, 300))
    with pytest.raises(ImportDataError, match="outside"):
        import_st(tmp_path / "b", tmp_path / "ob", name="t", tile_px=50, n_genes=5, min_spots=0.0)
    assert not (tmp_path / "ob" / "t.csv").exists()
    _fake_st(tmp_path / "c")
    (tmp_path / "c" / "images" / "A1.jpg").unlink()
    with pytest.raises(ImportDataError, match="not found"):
        import_st(tmp_path / "c", tmp_path / "oc", name="t", tile_px=50, n_genes=5, min_spots=0.0)


def test_normalisations():
    c = np.array([[1.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(normalize(c, "lognorm")[0], np.log1p([2500.0, 7500.0]))
    np.testing.assert_allclose(normalize(c, "cpm")[0], np.log1p([250000.0, 750000.0]))
    assert (normalize(c, "lognorm")[1] == 0).all()


@needs_visium
def test_visium_fixture_imports(tmp_path):
    out = import_visium([VISIUM], tmp_path, image_res="lowres", n_genes=20, min_spots=0.0, out_px=16)
    t = read_table(out)
    assert len(t) == 100 and len(t.genes) == 20
    side = json.loads((tmp_path / "visium.json").read_text())
    assert side["slides"]["visium-format"]["matched"] == 100


@needs_visium
def test_visium_new_headed_positions(tmp_path):
    shutil.copytree(VISIUM, tmp_path / "v")
    old = tmp_path / "v" / "spatial" / "tissue_positions_list.csv"
    df = pd.read_csv(old, header=None, names=["barcode", "in_tissue", "array_row", "array_col",
                                              "pxl_row_in_fullres", "pxl_col_in_fullres"])
    df.to_csv(tmp_path / "v" / "spatial" / "tissue_positions.csv", index=False)
    old.unlink()
    out = import_visium([tmp_path / "v"], tmp_path / "o", image_res="lowres", n_genes=5, min_spots=0.0, out_px=16)
    assert len(read_table(out)) == 100


def _fake_hest(root, sample="S1", n=12, genes=15):
    import anndata

    rng = np.random.default_rng(0)
    (root / "patches").mkdir(parents=True)
    (root / "st").mkdir()
    bcs = [f"BC{i:03d}-1" for i in range(n)]
    with h5py.File(root / "patches" / f"{sample}.h5", "w") as fh:
        img = fh.create_dataset("img", data=(rng.random((n, 32, 32, 3)) * 255).astype(np.uint8))
        img.attrs.update({"patch_size_src": 64, "patch_size_target": 32, "downsample": 2.0, "pixel_size": 0.5})
        fh["barcode"] = np.array(bcs, dtype="S").reshape(-1, 1)
        fh["coords"] = rng.integers(0, 1000, (n, 2))
    anndata.AnnData(X=rng.poisson(2, (n, genes)).astype(np.float32),
                    obs=pd.DataFrame(index=bcs), var=pd.DataFrame(index=[f"G{j}" for j in range(genes)])
                    ).write_h5ad(root / "st" / f"{sample}.h5ad")
    return bcs


def test_hest_patches_and_embeddings(tmp_path):
    bcs = _fake_hest(tmp_path / "hest")
    out = import_hest(tmp_path / "hest", ["S1"], tmp_path / "o", n_genes=5, min_spots=0.0)
    t = read_table(out)
    assert len(t) == 12 and t.ids[0] == "S1_BC000-1"
    with h5py.File(tmp_path / "hest" / "patches" / "S1.h5") as fh:
        np.testing.assert_array_equal(t.xy, fh["coords"][()] + 32)  # centres = top-left + patch_size_src / 2
    feats = np.random.default_rng(1).standard_normal((12, 7)).astype(np.float32)
    with h5py.File(tmp_path / "emb.h5", "w") as fh:
        fh["features"] = feats[::-1]
        fh["barcodes"] = np.array(bcs[::-1], dtype="S")
    from featurize.cache import load_features

    p, rep = import_embeddings(tmp_path / "emb.h5", t, "ext", tmp_path / "cache", id_prefix="S1_")
    assert rep["matched"] == 12
    cache = load_features(t, "ext", tmp_path / "cache")
    np.testing.assert_array_equal(cache.features, feats)
    assert cache.path == p and len(cache.attrs["weights_sha256"]) == 64
    (tmp_path / "bad.h5ad").write_bytes(b"nope")
    shutil.copy(tmp_path / "bad.h5ad", tmp_path / "hest" / "st" / "S1.h5ad")
    with pytest.raises(ImportDataError, match="unreadable .h5ad"):
        import_hest(tmp_path / "hest", ["S1"], tmp_path / "o2", n_genes=5, min_spots=0.0)
    assert not (tmp_path / "o2" / "hest.csv").exists()


@needs_her2st
def test_her2st_real_import_two_sections(tmp_path):
    out = import_st(HER2ST, tmp_path, sections=["C2", "C3"], name="h", n_genes=50, out_px=64)
    t = read_table(out)
    side = json.loads((tmp_path / "h.json").read_text())
    assert side["slides"]["C3"]["dropped_only_in_spot_file"] == 2  # README: C3 has 2 spots without counts
    assert side["slides"]["C2"]["dropped_only_in_spot_file"] == 0
    assert len(t) == 187 + 180 and len(t.genes) == 50
    assert 1.2 < side["slides"]["C2"]["pixels_per_um"] < 1.7
