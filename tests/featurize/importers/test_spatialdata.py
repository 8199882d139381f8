"""SpatialData stores in (``tiles spatialdata``) and out (``predict --out X.zarr``).

Stores are built by spatialdata's and spatialdata-io's own code: ``spatialdata_io.visium`` on the real Space
Ranger fixture, and Visium HD / Xenium stores from spatialdata's model constructors with a global micrometre
transformation.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import VISIUM, run

sd = pytest.importorskip("spatialdata", reason="the optional extra: pip install 'hexpress[spatialdata]'")

UM_PER_PX = 0.5  # the generated stores' H&E pixel size


def _image(h=400, w=400, seed=0):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // w), (yy * 255 // h), (rng.random((h, w)) * 255)], 0).astype(np.uint8)
    return arr, Image2DModel.parse(arr, dims=("c", "y", "x"), scale_factors=[2],
                                   transformations={"global": Scale([UM_PER_PX, UM_PER_PX], axes=("y", "x"))})


def _table(counts, region, ids, obs=None):
    import anndata
    from spatialdata.models import TableModel

    o = pd.DataFrame({"region": pd.Categorical([region] * len(ids)), "cell_id": ids}, index=[f"c{i}" for i in ids])
    for k, v in (obs or {}).items():
        o[k] = v
    ad = anndata.AnnData(X=counts.astype(np.float32), obs=o,
                         var=pd.DataFrame(index=[f"G{j}" for j in range(counts.shape[1])]))
    return TableModel.parse(ad, region=region, region_key="region", instance_key="cell_id")


def xenium_store(path: Path, xy_um: np.ndarray, counts: np.ndarray, extra_image: bool = False) -> Path:
    """A Xenium-like store: cells as circles in micrometres, a table annotating them, an RGB H&E."""
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    ids = np.arange(len(xy_um))
    cells = gpd.GeoDataFrame({"radius": np.full(len(ids), 4.0)}, geometry=[Point(x, y) for x, y in xy_um], index=ids)
    images = {"he": _image()[1]}
    if extra_image:
        images["morphology_focus"] = _image(seed=1)[1]
    s = sd.SpatialData(images=images,
                       shapes={"cell_circles": ShapesModel.parse(cells, transformations={"global": Identity()})},
                       tables={"table": _table(counts, "cell_circles", ids)})
    s.write(path)
    return path


def hd_store(path: Path, bin_um=16.0, n=8, seed=0) -> tuple[Path, np.ndarray]:
    """A Visium HD-like store: square bins (polygons) in micrometres, a table annotating them."""
    import geopandas as gpd
    from shapely.geometry import box
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(seed)
    cx, cy = np.meshgrid(np.arange(n) * bin_um + 40, np.arange(n) * bin_um + 40)
    centres = np.c_[cx.ravel(), cy.ravel()]
    h = bin_um / 2
    bins = gpd.GeoDataFrame(geometry=[box(x - h, y - h, x + h, y + h) for x, y in centres], index=np.arange(len(centres)))
    counts = rng.poisson(3, (len(centres), 12))
    s = sd.SpatialData(images={"he": _image(seed=seed)[1]},
                       shapes={"square_016um": ShapesModel.parse(bins, transformations={"global": Identity()})},
                       tables={"table": _table(counts, "square_016um", np.arange(len(centres)))})
    s.write(path)
    return path, centres


def _cells(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(20, 180, (n, 2)), rng.poisson(2, (n, 10))


def test_visium_store_matches_space_ranger_import(tmp_path):
    """spatialdata_io.visium on the real fixture: same pixel size (0.5%), same tiles, same expression."""
    from PIL import Image

    sdio = pytest.importorskip("spatialdata_io")
    if not VISIUM.is_dir():
        pytest.skip(f"{VISIUM} not present (../shared data)")
    store = tmp_path / "visium-format.zarr"
    sdio.visium(VISIUM, dataset_id="vf").write(store)
    common = ["--genes", "20", "--min-spots", "0"]
    assert run(["tiles", "spatialdata", store, "--image", "vf_lowres_image", "--out", tmp_path / "a", *common]) == 0
    assert run(["tiles", "visium", VISIUM, "--image-res", "lowres", "--out", tmp_path / "b", *common]) == 0
    ta, tb = pd.read_csv(tmp_path / "a" / "tiles.csv"), pd.read_csv(tmp_path / "b" / "tiles.csv")
    sa = json.loads((tmp_path / "a" / "tiles.json").read_text())["slides"]["visium-format"]
    sb = json.loads((tmp_path / "b" / "tiles.json").read_text())["slides"]["visium-format"]
    assert sa["um_per_pixel"] == pytest.approx(sb["effective_um_per_pixel"], rel=0.005)
    assert "array position" in sa["pixel_size_method"] and sa["table"] == "table" and sa["shapes"] == "vf"
    ta, tb = ta.set_index("ID"), tb.set_index("ID").loc[ta["ID"]]
    assert len(ta) == len(tb) == 100
    genes = [c for c in ta.columns if c not in ("path", "slide", "patient", "x", "y")]
    assert genes == [c for c in tb.columns if c not in ("path", "slide", "patient", "x", "y")]
    np.testing.assert_array_equal(ta[genes].to_numpy(), tb[genes].to_numpy())
    for pa, pb in zip(ta["path"], tb["path"]):
        a, b = np.asarray(Image.open(tmp_path / "a" / pa)), np.asarray(Image.open(tmp_path / "b" / pb))
        np.testing.assert_array_equal(a, b)
    assert np.asarray(Image.open(tmp_path / "a" / ta["path"].iloc[0])).std() > 0  # real pixels, not blank


def test_pseudo_spots_assign_and_sum_by_hand():
    from featurize.importers.spatialdata import pseudo_spots

    xy = np.array([[10.0, 10.0], [54.9, 1.0], [55.0, 1.0], [60.0, 120.0], [109.0, 54.0], [0.0, 0.0]])
    counts = np.array([[1, 0], [2, 1], [0, 5], [3, 3], [4, 0], [1, 1]], dtype=float)
    from scipy import sparse

    squares, centres, summed, n = pseudo_spots(xy, sparse.csr_matrix(counts), 55.0)
    # by hand: floor(x/55), floor(y/55): cells 0,1,5 -> (0,0); 2,4 -> (1,0); 3 -> (1,2); ordered by (iy, ix)
    assert squares.tolist() == [[0, 0], [1, 0], [1, 2]]
    assert summed.toarray().tolist() == [[4, 2], [4, 5], [3, 3]]
    assert n.tolist() == [3, 2, 1]
    assert centres.tolist() == [[27.5, 27.5], [82.5, 27.5], [82.5, 137.5]]


def test_xenium_pseudo_spots_and_cells(tmp_path):
    xy, counts = _cells()
    store = xenium_store(tmp_path / "xen.zarr", xy, counts)
    assert run(["tiles", "spatialdata", store, "--pseudo-spot", "55", "--out", tmp_path / "p", "--genes", "all",
                "--min-spots", "0", "--normalize", "raw", "--out-px", "32"]) == 0
    t = pd.read_csv(tmp_path / "p" / "tiles.csv")
    side = json.loads((tmp_path / "p" / "tiles.json").read_text())
    rep = side["slides"]["xen"]
    assert side["rows"] == "pseudo-spots" and rep["pseudo_spot"]["side_um"] == 55 and rep["pseudo_spot"]["cells"] == 60
    assert rep["pixels_per_um"] == pytest.approx(1 / UM_PER_PX) and rep["tile_um"] == pytest.approx(55)
    grid = np.floor(xy / 55).astype(int)
    for _, row in t.iterrows():  # each square's counts are the sum of its cells, its centre the square's centre
        ix, iy = map(int, row["ID"].split("_sq")[1].split("_"))
        members = (grid[:, 0] == ix) & (grid[:, 1] == iy)
        np.testing.assert_allclose(row[[f"G{j}" for j in range(10)]].to_numpy(float), counts[members].sum(0))
        assert (row["x"], row["y"]) == pytest.approx(((ix + 0.5) * 55 / UM_PER_PX, (iy + 0.5) * 55 / UM_PER_PX))
    assert t[[f"G{j}" for j in range(10)]].to_numpy().sum() == counts.sum()
    assert run(["tiles", "spatialdata", store, "--cells", "--tile-um", "20", "--out", tmp_path / "c", "--genes", "all",
                "--min-spots", "0", "--out-px", "32"]) == 0
    c = pd.read_csv(tmp_path / "c" / "tiles.csv")
    assert len(c) == 60 and json.loads((tmp_path / "c" / "tiles.json").read_text())["rows"] == "cells"
    np.testing.assert_allclose(c[["x", "y"]].to_numpy(), xy / UM_PER_PX)


def test_choices_are_one_error_line(tmp_path, capsys):
    xy, counts = _cells(20)
    store = xenium_store(tmp_path / "two.zarr", xy, counts, extra_image=True)
    assert run(["tiles", "spatialdata", store, "--out", tmp_path / "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 images (he, morphology_focus)" in err[0] and "--image NAME" in err[0]
    assert run(["tiles", "spatialdata", store, "--image", "nope", "--out", tmp_path / "o"]) == 2
    assert "no image 'nope'" in capsys.readouterr().err
    assert run(["tiles", "spatialdata", store, "--image", "he", "--image-level", "5", "--out", tmp_path / "o"]) == 2
    assert "has 2 levels" in capsys.readouterr().err
    assert run(["tiles", "spatialdata", store, "--image", "he", "--pseudo-spot", "55", "--cells",
                "--out", tmp_path / "o"]) == 2
    assert run(["tiles", "visium", store, "--pseudo-spot", "55", "--out", tmp_path / "o"]) == 2
    assert "--pseudo-spot applies to spatialdata only" in capsys.readouterr().err
    assert not (tmp_path / "o" / "tiles.csv").exists()


def test_image_level_cuts_the_same_places(tmp_path):
    """Level 1 (half resolution) cuts the same centres, recorded at its scale, in level-0 coordinates."""
    store, centres = hd_store(tmp_path / "hd.zarr")
    for lvl in (0, 1):
        assert run(["tiles", "spatialdata", store, "--image-level", str(lvl), "--out", tmp_path / f"l{lvl}",
                    "--genes", "all", "--min-spots", "0", "--out-px", "32"]) == 0
    a, b = pd.read_csv(tmp_path / "l0" / "tiles.csv"), pd.read_csv(tmp_path / "l1" / "tiles.csv")
    np.testing.assert_allclose(a[["x", "y"]].to_numpy(), centres / UM_PER_PX)
    np.testing.assert_allclose(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy())
    r0 = json.loads((tmp_path / "l0" / "tiles.json").read_text())["slides"]["hd"]
    r1 = json.loads((tmp_path / "l1" / "tiles.json").read_text())["slides"]["hd"]
    assert r0["tile_um"] == pytest.approx(16) and r1["tile_um"] == pytest.approx(16)  # the bin, from the name
    assert r1["image_scale"] == 0.5 and r1["tile_px"] == pytest.approx(r0["tile_px"] / 2)


@pytest.mark.parametrize("kind", ["hd", "xenium"])
def test_store_to_predictions_store(tmp_path, kind):
    """tiles spatialdata -> embed -> fit -> predict --out X.zarr, read back with read_zarr and plotted."""
    if kind == "hd":
        store, new = hd_store(tmp_path / "hd.zarr")[0], hd_store(tmp_path / "hd2.zarr", seed=1)[0]
        extra = []
    else:
        xy, counts = _cells(80)
        store = xenium_store(tmp_path / "xen.zarr", xy, counts)
        new = xenium_store(tmp_path / "xen2.zarr", *_cells(40, seed=1))
        extra = ["--cells", "--tile-um", "16"]
    common = ["--genes", "all", "--min-spots", "0", "--out-px", "32", *extra]
    assert run(["tiles", "spatialdata", store, "--out", tmp_path / "t", *common]) == 0
    assert run(["tiles", "spatialdata", new, "--out", tmp_path / "n", *common]) == 0
    train, table, cache = tmp_path / "t" / "tiles.csv", tmp_path / "n" / "tiles.csv", tmp_path / "cache"
    assert run(["embed", "--data", train, "--backbone", "timm:test_vit", "--random-init", "--quiet", "--cache-dir",
                cache, "--workers", "0"]) == 0
    assert run(["fit", "--data", train, "--backbone", "timm:test_vit", "--head", "ridge", "--cache-dir", cache,
                "--runs-dir", tmp_path / "runs", "--folds", "2", "--groups", "none", "--quiet"]) == 0
    runf = next((tmp_path / "runs").iterdir())
    out = tmp_path / "pred.zarr"
    assert run(["predict", runf, "--data", table, "--out", out, "--cache-dir", cache]) == 0
    back = sd.read_zarr(out)
    pred = back.tables["predictions"]
    t = pd.read_csv(table)
    assert pred.n_obs == len(t) and list(pred.obs["tile_id"]) == t["ID"].tolist()
    assert json.loads(pred.uns["hexpress"]["provenance_json"])["run"] == str(runf.resolve())
    (shapes_name,) = back.shapes.keys()
    assert set(pred.obs["region"]) == {shapes_name} and len(back.shapes[shapes_name]) == len(t)
    (img_name,) = back.images.keys()
    assert len(back.images[img_name].children) >= 2  # a pyramid
    cen = back.shapes[shapes_name].geometry.centroid
    np.testing.assert_allclose(np.c_[cen.x, cen.y], t[["x", "y"]].to_numpy(), atol=1e-6)
    if kind == "hd":  # into a copy of the source store, annotating its own bins
        out2 = tmp_path / "into.zarr"
        assert run(["predict", runf, "--data", table, "--out", out2, "--cache-dir", cache, "--into-source"]) == 0
        both = sd.read_zarr(out2)
        assert {"table", "predictions"} <= set(both.tables) and set(both.shapes) == {"square_016um"}
        p2 = both.tables["predictions"]
        assert set(p2.obs["region"]) == {"square_016um"}
        np.testing.assert_allclose(p2.X, pred.X)
    _plot(back, img_name, shapes_name, pred.var_names[0], tmp_path / "plot.png")


def _plot(sdata, image, shapes, gene, png):
    pytest.importorskip("spatialdata_plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401 - registers .pl

    from PIL import Image

    ax = plt.figure(figsize=(4, 4)).add_subplot()
    sdata.pl.render_images(image).pl.render_shapes(shapes, color=gene, table_name="predictions").pl.show(
        ax=ax, coordinate_systems="global")
    ax.figure.savefig(png)
    plt.close("all")
    arr = np.asarray(Image.open(png).convert("RGB"))
    assert png.stat().st_size > 1000 and arr.std() > 5  # something drawn, not a blank canvas


def test_missing_extra_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    store = xenium_store(tmp_path / "x.zarr", *_cells(10))
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # as if the extra were not installed
    assert run(["tiles", "spatialdata", store, "--out", tmp_path / "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'hexpress[spatialdata]'" in err[0]
    assert not (tmp_path / "o").exists()
