"""Real slides in and out: ST layouts, AnnData in, whole-slide prediction and AnnData out."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cli
from conftest import VISIUM, at_tile_size, needs_visium, record_tile_size
from core.errors import ImportDataError
from featurize.importers.st import import_st
from featurize.tables.table import read_table


def run(argv):
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def _st_section(root, name, n=6, genes=12, seed=0, whole_array=False, ids=False):
    """An ST section; ``whole_array``: the count matrix lists every spot of a larger array, the spot file
    marks the ones under tissue with ``selected`` (as several public ST releases do)."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(2, 2 + n), np.arange(3, 3 + n))
    xs, ys = xs.ravel(), ys.ravel()
    spots = pd.DataFrame({"x": xs, "y": ys, "pixel_x": 60.0 + 80 * (xs - 2), "pixel_y": 70.0 + 80 * (ys - 3),
                          "selected": 1})
    keys = [f"{x}x{y}" for x, y in zip(xs, ys)]
    if whole_array:  # 3 more spots in the spot file, not under tissue, and 40 count rows for the rest of the array
        extra = pd.DataFrame({"x": [30, 31, 32], "y": [30, 30, 30], "pixel_x": [1.0] * 3, "pixel_y": [1.0] * 3,
                              "selected": 0})
        spots = pd.concat([spots, extra], ignore_index=True)
        keys = keys + [f"{40 + i}x{40 + i}" for i in range(40)]
    cols = [f"ENSG{j:011d}.{j % 3 + 1}" for j in range(genes)] if ids else [f"G{j}" for j in range(genes)]
    counts = pd.DataFrame(rng.poisson(3, (len(keys), genes)), index=keys, columns=cols)
    for d in ("counts", "spots", "images"):
        (root / d).mkdir(parents=True, exist_ok=True)
    counts.to_csv(root / "counts" / f"{name}.tsv.gz", sep="\t")
    spots.to_csv(root / "spots" / f"{name}_selection.tsv", sep="\t", index=False)
    Image.fromarray((rng.random((600, 600, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{name}.jpg")
    return cols


# ------------------------------------------------------------------ ST layouts
def test_st_whole_array_counts_with_selected_spots_import_and_report_the_rest(tmp_path):
    _st_section(tmp_path / "st", "A1", whole_array=True)
    out = import_st(tmp_path / "st", tmp_path / "o", name="t", tile_px=50, out_px=16, n_genes=5, min_spots=0.0)
    rep = json.loads(out.with_suffix(".json").read_text())["slides"]["A1"]
    assert len(read_table(out)) == 36
    assert rep["matched"] == 36 and rep["dropped_only_in_counts"] == 40 and rep["spots_in_spot_file"] == 36


def test_section_names_without_a_patient_letter_are_their_own_patients(tmp_path, capsys):
    for i, n in enumerate(["sampleA1", "sampleA2", "mouse_1"]):
        _st_section(tmp_path / "st", n, seed=i)
    out = import_st(tmp_path / "st", tmp_path / "o", name="t", tile_px=50, out_px=16, n_genes=5, min_spots=0.0)
    t = read_table(out)
    assert sorted(set(t.groups)) == ["mouse_1", "sampleA1", "sampleA2"]
    out2 = import_st(tmp_path / "st", tmp_path / "o2", name="t", tile_px=50, out_px=16, n_genes=5, min_spots=0.0,
                     patients={"sampleA1": "A", "sampleA2": "A", "mouse_1": "A"})
    side = json.loads(out2.with_suffix(".json").read_text())
    assert set(read_table(out2).groups) == {"A"} and side["slides"]["mouse_1"]["patient_from"] == "--patient"
    with pytest.raises(ImportDataError, match="no such section"):
        import_st(tmp_path / "st", tmp_path / "o3", name="t", tile_px=50, n_genes=5, min_spots=0.0, patients={"x": "A"})
    # one patient: fit names the column and what to use instead
    from featurize.engine.extract import embed

    embed(out2, ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", batch_size=32, progress=False,
          num_workers=0)
    capsys.readouterr()
    assert run(["fit", "--data", out2, "--backbone", "timm:test_vit", "--cache-dir", tmp_path / "c", "--runs-dir",
                tmp_path / "r"]) == 2
    err = capsys.readouterr().err
    assert "column 'patient' has one value" in err and "--groups slide (3 slides)" in err and "--patient" in err


def test_sample_sheet_with_patients_and_gene_names(tmp_path):
    ids = _st_section(tmp_path / "raw", "s1", seed=1, ids=True)
    _st_section(tmp_path / "raw", "s2", seed=2, ids=True)
    (tmp_path / "sheet.csv").write_text("sample,counts,spots,image,patient\n"
                                        "first,raw/counts/s1.tsv.gz,raw/spots/s1_selection.tsv,raw/images/s1.jpg,P1\n"
                                        "second,raw/counts/s2.tsv.gz,raw/spots/s2_selection.tsv,raw/images/s2.jpg,P2\n")
    # a 10x features.tsv: ID without version, symbol, type
    pd.DataFrame({0: [i.split(".")[0] for i in ids], 1: [f"SYM{j}" for j in range(len(ids))],
                  2: "Gene Expression"}).to_csv(tmp_path / "features.tsv", sep="\t", header=False, index=False)
    assert run(["tiles", "st", tmp_path / "sheet.csv", "--out", tmp_path / "o", "--name", "t", "--tile-px", "50",
                "--out-px", "16", "--genes", "6", "--min-spots", "0", "--gene-names", tmp_path / "features.tsv"]) == 0
    t = read_table(tmp_path / "o" / "t.csv")
    side = json.loads((tmp_path / "o" / "t.json").read_text())
    assert set(t.groups) == {"P1", "P2"} and set(t.slides) == {"first", "second"}
    assert all(g.startswith("ENSG") for g in t.genes)  # IDs kept as the table's columns
    assert side["gene_names"][t.genes[0]] == f"SYM{ids.index(t.genes[0])}" and side["genes"]["symbols_found"] == 6
    # symbols carried into the run and its report
    from featurize.engine.extract import embed

    embed(tmp_path / "o" / "t.csv", ["timm:test_vit"], random_init=True, cache_dir=tmp_path / "c", batch_size=32,
          progress=False, num_workers=0)
    assert run(["fit", "--data", tmp_path / "o" / "t.csv", "--backbone", "timm:test_vit", "--cache-dir", tmp_path / "c",
                "--runs-dir", tmp_path / "r", "--device", "cpu"]) == 0
    folder = tmp_path / "r" / "t-timm_test_vit-ridge"
    info = json.loads((folder / "run.json").read_text())
    assert info["gene_names"][0].startswith("SYM") and info["tile_um"] is not None
    assert run(["report", folder]) == 0
    assert "SYM" in (folder / "report" / "report.md").read_text()


# ------------------------------------------------------------------ AnnData in
def _write_h5ad(path, n=40, genes=10, normalised=False, with_counts_layer=True, image=True, spatial=True):
    import anndata

    rng = np.random.default_rng(0)
    rows, cols = np.divmod(np.arange(n), 8)
    cols = cols * 2 + rows % 2  # Visium's hexagonal columns
    xy = np.c_[500 + cols * 69.0, 400 + rows * 119.5]  # 1.38 px/um, as the real fixture
    counts = rng.poisson(4, (n, genes)).astype(np.float32)
    X = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4) if normalised else counts
    ad = anndata.AnnData(X=X.astype(np.float32), obs=pd.DataFrame({"array_row": rows, "array_col": cols},
                                                                index=[f"bc{i}" for i in range(n)]),
                         var=pd.DataFrame(index=[f"G{j}" for j in range(genes)]))
    if with_counts_layer:
        ad.layers["counts"] = counts
    if spatial:
        ad.obsm["spatial"] = xy
    if image:
        hires = (rng.random((400, 400, 3)) * 255).astype(np.uint8)
        ad.uns["spatial"] = {"lib1": {"images": {"hires": hires},
                                      "scalefactors": {"tissue_hires_scalef": 0.2, "spot_diameter_fullres": 89.4}}}
    ad.write_h5ad(path)
    return counts


def test_h5ad_import_uses_counts_fits_pixel_size_and_warns_on_lowres(tmp_path, capsys):
    counts = _write_h5ad(tmp_path / "a.h5ad", normalised=True, with_counts_layer=True)
    assert run(["tiles", "h5ad", tmp_path / "a.h5ad", "--out", tmp_path / "o", "--name", "a", "--genes", "all",
                "--min-spots", "0", "--normalize", "raw", "--out-px", "16"]) == 0
    t = read_table(tmp_path / "o" / "a.csv")
    side = json.loads((tmp_path / "o" / "a.json").read_text())
    rep = side["slides"]["lib1"]
    assert rep["expression_from"] == "layers['counts']" and np.allclose(t.Y, counts)
    assert rep["pixels_per_um"] == pytest.approx(1.38, rel=0.01) and "affine fit" in rep["pixel_size_method"]
    assert rep["effective_um_per_pixel"] == pytest.approx(1 / (1.38 * 0.2), rel=0.01)
    assert "um per pixel" in capsys.readouterr().err  # coarse stored image: said
    np.testing.assert_allclose(t.xy[:2], [[500, 400], [638, 400]])


def test_h5ad_already_normalised_is_used_as_is_and_missing_spatial_is_an_error(tmp_path, capsys):
    _write_h5ad(tmp_path / "n.h5ad", normalised=True, with_counts_layer=False)
    assert run(["tiles", "h5ad", tmp_path / "n.h5ad", "--out", tmp_path / "o", "--name", "n", "--genes", "all",
                "--min-spots", "0", "--out-px", "16"]) == 0
    assert "already normalised" in capsys.readouterr().err
    side = json.loads((tmp_path / "o" / "n.json").read_text())
    assert side["expression"].startswith("as given") and side["normalize"] == "raw"
    _write_h5ad(tmp_path / "s.h5ad", spatial=False)
    capsys.readouterr()
    assert run(["tiles", "h5ad", tmp_path / "s.h5ad", "--out", tmp_path / "o2"]) == 2
    assert "no obsm['spatial']" in capsys.readouterr().err and not (tmp_path / "o2").exists()


@needs_visium
def test_h5ad_written_by_scanpy_from_real_visium_gives_the_visium_importer_answer(tmp_path):
    sc = pytest.importorskip("scanpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = sc.read_visium(VISIUM, count_file="filtered_feature_bc_matrix.h5")
    ad.var_names_make_unique()
    ad.write_h5ad(tmp_path / "v.h5ad")
    assert run(["tiles", "h5ad", tmp_path / "v.h5ad", "--out", tmp_path / "o", "--name", "v", "--genes", "20",
                "--min-spots", "0", "--out-px", "16"]) == 0
    side = json.loads((tmp_path / "o" / "v.json").read_text())
    rep = next(iter(side["slides"].values()))
    assert rep["pixels_per_um"] == pytest.approx(1.38, rel=0.01) and len(read_table(tmp_path / "o" / "v.csv")) == 100


# ------------------------------------------------------------------ whole slides out
def _blob_slide(size=1536, seed=0):
    """H&E-like pink/purple tissue blob on white glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    inside = ((xx - size * 0.45) ** 2 + (yy - size * 0.5) ** 2) < (size * 0.3) ** 2
    img = np.full((size, size, 3), 245, np.uint8)
    tissue = np.stack([200 + rng.integers(-30, 30, inside.sum()), 90 + rng.integers(-40, 40, inside.sum()),
                       170 + rng.integers(-30, 30, inside.sum())], 1)
    img[inside] = np.clip(tissue, 0, 255).astype(np.uint8)
    return img


def _pyramid_tiff(path, img, mpp):
    tifffile = pytest.importorskip("tifffile")
    res = 1e4 / mpp  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        tw.write(img, tile=(256, 256), subifds=1, resolution=(res, res), resolutionunit="CENTIMETER",
                 photometric="rgb", compression="zlib")
        tw.write(img[::4, ::4].copy(), tile=(256, 256), subfiletype=1, photometric="rgb", compression="zlib")


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    from featurize.synthetic import make_synthetic_table

    root = tmp_path_factory.mktemp("slide")
    train = make_synthetic_table(root / "data", n=32, n_genes=4, size=48, name="train", seed=0)
    # an importer sidecar beside the table: the run records the tiles' physical size (100 um)
    record_tile_size(root / "data" / "train.csv", 100.0)
    assert run(["embed", "--data", train, "--backbone", "timm:test_vit", "--random-init", "--quiet", "--cache-dir",
                root / "cache", "--workers", "0"]) == 0
    for head in ("ridge", "mean"):
        assert run(["fit", "--data", train, "--backbone", "timm:test_vit", "--head", head, "--cache-dir", root / "cache",
                    "--runs-dir", root / "runs", "--folds", "4", "--device", "cpu"]) == 0
    img = _blob_slide()
    _pyramid_tiff(root / "slide.tif", img, mpp=0.5)
    Image.fromarray(img).save(root / "slide.jpg", quality=92)
    return root


def test_predict_slide_on_a_pyramidal_tiff_writes_anndata_that_scanpy_plots(slide_run, tmp_path, monkeypatch):
    import anndata

    root = slide_run
    runs = root / "runs"
    out = tmp_path / "pred.h5ad"
    assert run(["predict-slide", runs / "train-timm_test_vit-ridge", root / "slide.tif", "--out", out, "--cache-dir",
                tmp_path / "c", "--device", "cpu", "--gene", "GENE000", "--quiet"]) == 0
    ad = anndata.read_h5ad(out)
    side = json.loads((tmp_path / "pred_tiles" / "slide.json").read_text())
    assert side["backend"] in ("tiffslide", "openslide") and side["mpp"] == pytest.approx(0.5)
    assert side["tile_px_level0"] == pytest.approx(200)  # 100 um at 0.5 um/px
    assert ad.n_obs == side["n_tiles"] > 5 and ad.n_vars == 4 and np.isfinite(ad.X).all()
    xy = ad.obsm["spatial"]
    assert (xy >= 0).all() and (xy <= 1536).all()
    # tissue only: every tile centre lies on the blob (within one tile of its edge)
    assert (np.hypot(xy[:, 0] - 1536 * 0.45, xy[:, 1] - 768) < 1536 * 0.3 + 200).all()
    lib = ad.uns["spatial"]["slide"]
    assert lib["images"]["hires"].shape[2] == 3 and lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(200)
    assert ad.uns["hexpress"]["tile_um"] == 100.0 and json.loads(ad.uns["hexpress"]["provenance_json"])["mpp"] == 0.5
    assert (tmp_path / "pred_GENE000.png").stat().st_size > 2000
    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pl.spatial(ad, color="GENE000", show=False)
    import matplotlib.pyplot as plt

    plt.savefig(tmp_path / "scanpy.png")
    assert (tmp_path / "scanpy.png").stat().st_size > 5000
    # a second head on the same slide: no network time (the tiles' caches are reused)
    import featurize.engine.extract

    monkeypatch.setattr(featurize.engine.extract, "create_backbone", lambda *a: pytest.fail("re-embedded"))
    assert run(["predict-slide", runs / "train-timm_test_vit-mean", root / "slide.tif", "--out", tmp_path / "m.h5ad",
                "--cache-dir", tmp_path / "c", "--device", "cpu", "--quiet", "--work-dir", tmp_path / "pred_tiles"]) == 0


def test_predict_slide_refuses_unknown_resolution_wrong_tile_size_and_blank_glass(slide_run, tmp_path, capsys):
    root = slide_run
    r = root / "runs" / "train-timm_test_vit-ridge"
    base = ["--cache-dir", tmp_path / "c", "--device", "cpu", "--quiet"]
    cases = [
        (["predict-slide", r, root / "slide.jpg", "--out", tmp_path / "a.h5ad", *base], "pass --mpp"),
        (["predict-slide", r, root / "slide.tif", "--out", tmp_path / "a.h5ad", "--tile-um", "50", *base],
         "trained on 100 um tiles"),
        (["predict-slide", r, root / "slide.tif", "--out", tmp_path / "a.csv", *base], "*.h5ad"),
        (["predict-slide", r, root / "missing.tif", "--out", tmp_path / "a.h5ad", *base], "not found"),
        (["predict-slide", r, root / "slide.tif", "--out", tmp_path / "a.h5ad", "--gene", "NOPE", *base], "--gene NOPE"),
    ]
    Image.new("RGB", (800, 800), (246, 246, 246)).save(tmp_path / "glass.png")
    cases.append((["predict-slide", r, tmp_path / "glass.png", "--out", tmp_path / "a.h5ad", "--mpp", "0.5", *base],
                  "no tissue"))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    cases.append((["predict-slide", r, tmp_path / "broken.jpg", "--out", tmp_path / "a.h5ad", "--mpp", "0.5", *base],
                  "cannot be read"))
    for argv, msg in cases:
        capsys.readouterr()
        assert run(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, (argv, err)
    assert not (tmp_path / "a.h5ad").exists()
    # JPEG with --mpp, and a forced other tile size, work
    assert run(["predict-slide", r, root / "slide.jpg", "--out", tmp_path / "j.h5ad", "--mpp", "0.5", *base]) == 0
    assert run(["predict-slide", r, root / "slide.tif", "--out", tmp_path / "f.h5ad", "--tile-um", "50", "--force",
                *base]) == 0


def test_predict_out_h5ad_for_a_tile_table(slide_run, tmp_path):
    import anndata

    from featurize.synthetic import make_synthetic_table

    root = slide_run
    test = make_synthetic_table(tmp_path, n=8, n_genes=4, size=48, name="test", seed=5)
    df = pd.read_csv(test)
    df["ID"] = "T" + df["ID"].astype(str)
    df[["ID", "path", "slide", "x", "y"]].to_csv(test, index=False)
    assert run(["predict", root / "runs" / "train-timm_test_vit-ridge", "--data", test, "--out", tmp_path / "p.h5ad",
                "--cache-dir", tmp_path / "c", "--device", "cpu"]) == 0
    ad = anndata.read_h5ad(tmp_path / "p.h5ad")
    assert ad.n_obs == 8 and list(ad.var_names) == [f"GENE{j:03d}" for j in range(4)]
    np.testing.assert_allclose(ad.obsm["spatial"], df[["x", "y"]].to_numpy())
    assert json.loads(ad.uns["hexpress"]["provenance_json"])["kind"] == "run"


def test_recutting_a_slide_at_another_tile_size_never_reuses_the_earlier_tiles(tmp_path):
    from featurize.tables.wsi import cut_slide, open_slide

    Image.fromarray(_blob_slide()).save(tmp_path / "s.png")
    slide = open_slide(tmp_path / "s.png", 0.5)
    cut_slide(slide, tmp_path / "w", tile_um=100, out_px=64, progress=False)
    table, cut = cut_slide(slide, tmp_path / "w", tile_um=150, out_px=64, progress=False)
    df = pd.read_csv(table)
    assert cut["tile_px_level0"] == pytest.approx(300) and len(df) > 3
    for _, r in df.iterrows():  # every tile is the 150 um square around its centre, not an older 100 um tile
        want = slide.read_region(int(round(r.x - 150)), int(round(r.y - 150)), 300, 300)
        want = np.asarray(want.resize((64, 64), Image.Resampling.LANCZOS), dtype=int)
        got = np.asarray(Image.open(tmp_path / "w" / r.path).convert("RGB"), dtype=int)
        assert np.abs(want - got).max() <= 2, r.ID
    assert len(list((tmp_path / "w" / "tiles").iterdir())) == 1  # the earlier cut's tiles are removed


def test_predict_slide_with_a_two_size_stack_cuts_each_size_around_the_same_centres(slide_run, tmp_path, capsys):
    import anndata

    from featurize.tables.wsi import open_slide
    from regress.runs.predict import predict_table

    root = slide_run
    train2 = at_tile_size(root / "data" / "train.csv", "train_x2", 200.0)  # the same spots with their surroundings
    common = ["--cache-dir", root / "cache", "--runs-dir", tmp_path / "runs", "--folds", "4", "--device", "cpu"]
    assert run(["embed", "--data", train2, "--backbone", "timm:test_vit", "--random-init", "--quiet", "--cache-dir",
                root / "cache", "--workers", "0"]) == 0
    assert run(["fit", "--data", train2, "--backbone", "timm:test_vit", "--head", "ridge", *common]) == 0
    assert run(["stack", root / "runs" / "train-timm_test_vit-ridge", tmp_path / "runs" / "train_x2-timm_test_vit-ridge",
                "--out", tmp_path / "stack"]) == 0
    base = ["--cache-dir", tmp_path / "c", "--device", "cpu", "--quiet"]
    capsys.readouterr()
    assert run(["predict-slide", tmp_path / "stack", root / "slide.tif", "--out", tmp_path / "s.h5ad", "--tile-um", "100",
                *base]) == 2
    assert "drop --tile-um" in capsys.readouterr().err
    assert run(["predict-slide", tmp_path / "stack", root / "slide.tif", "--out", tmp_path / "s.h5ad", *base]) == 0
    work = tmp_path / "s_tiles"
    t1, t2 = pd.read_csv(work / "slide.csv"), pd.read_csv(work / "slide@200um.csv")
    assert len(t1) > 5 and list(t1.ID) == list(t2.ID)
    np.testing.assert_allclose(t1[["x", "y"]], t2[["x", "y"]])
    slide = open_slide(root / "slide.tif")
    for _, r in t2.iloc[[0, len(t2) // 2, -1]].iterrows():  # 200 um = 400 px around the 100 um tile's centre
        want = slide.read_region(int(round(r.x - 200)), int(round(r.y - 200)), 400, 400)
        want = np.asarray(want.resize((224, 224), Image.Resampling.LANCZOS), dtype=int)
        got = np.asarray(Image.open(work / r.path).convert("RGB"), dtype=int)
        assert np.abs(want - got).max() <= 2, r.ID
    ad = anndata.read_h5ad(tmp_path / "s.h5ad")
    want = predict_table(tmp_path / "stack", [work / "slide.csv", work / "slide@200um.csv"], cache_dir=tmp_path / "c",
                         device="cpu", log=lambda *a: None)
    np.testing.assert_allclose(ad.X, want[list(ad.var_names)].to_numpy(), rtol=1e-5, atol=1e-6)
    assert json.loads(ad.uns["hexpress"]["provenance_json"])["trained_tile_sizes_um"] == [100.0, 200.0]
