"""Importers and import-embeddings against files written by the real tools' own writers.

The files under ../shared/data/formats were written by TRIDENT's, CLAM's,
hestcore's and the HEST benchmark's writer functions and in Space Ranger's
layouts; their README gives the answers asserted here.
"""
import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import FORMATS, VISIUM, needs_formats, needs_visium, write_10x_h5
from featurize.cache import load_features, read_attrs
from core.errors import ImportDataError
from featurize.importers.embeddings import import_embeddings, read_embedding_file
from featurize.importers.hest import import_hest
from featurize.importers.visium import fit_pixel_size, import_visium, make_unique, read_positions
from featurize.tables.table import read_table

README_PX_PER_UM = 1.38  # formats/README: neighbouring spots 138 px and 100 um apart
POS_COLS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _visium(folder, out, **kw):
    kw = {"image_res": "lowres", "n_genes": None, "min_spots": 0.0, "out_px": 16, **kw}
    path = import_visium([folder], out, **kw)
    return read_table(path), json.loads(path.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def visium_table(tmp_path_factory):
    if not VISIUM.is_dir():
        pytest.skip(f"Visium fixture not found at {VISIUM}")
    return _visium(VISIUM, tmp_path_factory.mktemp("vis"))


# ---------------------------------------------------------------- Visium
@needs_visium
def test_visium_pixel_size_is_fitted_not_read_from_the_65um_spot_diameter(visium_table):
    t, side = visium_table
    rep = side["slides"]["visium-format"]
    assert rep["pixels_per_um"] == pytest.approx(README_PX_PER_UM, rel=0.01)
    assert rep["spot_diameter_fullres_um"] == pytest.approx(65.0, rel=0.02)  # the theoretical 65 um spot
    assert "affine fit" in rep["pixel_size_method"]
    assert rep["pixel_size_fit"]["fit_rms_px"] < 2.0
    # a 55 um tile is 55 * 1.38 full-resolution pixels, cut from lowres at its scale factor
    assert rep["tile_um"] == pytest.approx(55.0)
    assert rep["tile_px"] == pytest.approx(55.0 * rep["pixels_per_um"] * 0.045004502)
    assert rep["effective_um_per_pixel"] > 10


@needs_visium
def test_visium_table_coordinates_are_full_resolution_centres(visium_table):
    t, side = visium_table
    pos = pd.read_csv(VISIUM / "spatial" / "tissue_positions_list.csv", header=None, names=POS_COLS).set_index("barcode")
    bcs = [i.split("_", 1)[1] for i in t.ids]
    np.testing.assert_allclose(t.xy, pos.loc[bcs, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float))
    assert side["coordinates"].startswith("x, y = tile centre in full-resolution")
    assert side["slides"]["visium-format"]["image_scale"] == pytest.approx(0.045004502)


def test_pixel_fit_recovers_known_geometry_and_rejects_degenerate_grids():
    rows, cols = np.meshgrid(np.arange(10), np.arange(0, 40, 2))
    cols = cols + (rows % 2)  # Visium's hexagonal offset
    ppu, theta = 2.2, 0.3  # rotated image
    x_um, y_um = cols.ravel() * 50.0, rows.ravel() * 50.0 * np.sqrt(3)
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    px = (np.c_[x_um, y_um] @ R.T) * ppu + 500
    pos = pd.DataFrame({"array_col": cols.ravel(), "array_row": rows.ravel(),
                        "pxl_col_in_fullres": px[:, 0], "pxl_row_in_fullres": px[:, 1]})
    assert fit_pixel_size(pos)["pixels_per_um"] == pytest.approx(ppu, rel=1e-9)
    with pytest.raises(ImportDataError, match="degenerate"):
        fit_pixel_size(pos[pos["array_row"] == 0])


@needs_formats
@pytest.mark.parametrize("layout", ["visium-sr2-headed", "visium-list-with-header"])
def test_visium_position_files_with_header(tmp_path, layout):
    t, side = _visium(FORMATS / layout, tmp_path)
    assert len(t) == 100
    assert side["slides"][layout]["pixels_per_um"] == pytest.approx(README_PX_PER_UM, rel=0.01)
    pos, src = read_positions(FORMATS / layout / "spatial")
    assert src.name in ("tissue_positions.csv", "tissue_positions_list.csv") and len(pos) == 4992


@needs_formats
def test_visium_antibody_capture_rows_are_not_genes(tmp_path):
    t, side = _visium(FORMATS / "visium-gene-protein", tmp_path / "a", normalize_mode="raw")
    feats = side["slides"]["visium-gene-protein"]["features"]
    assert feats["types_found"] == {"Antibody Capture": 3, "Gene Expression": 100}
    assert feats["dropped_other_types"] == 3
    assert not {"CD3E", "PTPRC", "KRT19"} & set(t.genes)
    assert len(t.genes) == 100
    # library sizes hold gene counts only: lognorm sums over genes match a gene-only computation
    t2, _ = _visium(FORMATS / "visium-gene-protein", tmp_path / "b", normalize_mode="lognorm")
    raw = t.Y.astype(np.float64)
    expect = np.log1p(raw / np.maximum(raw.sum(1, keepdims=True), 1) * 1e4)
    np.testing.assert_allclose(t2.Y, expect, rtol=1e-5, atol=1e-5)
    t3, side3 = _visium(FORMATS / "visium-gene-protein", tmp_path / "c", feature_types=None)
    assert {"CD3E", "PTPRC", "KRT19"} <= set(t3.genes) and len(t3.genes) == 103


@needs_visium
def test_visium_duplicate_symbols_are_made_unique_and_counted(tmp_path):
    shutil.copytree(VISIUM, tmp_path / "v")
    with h5py.File(VISIUM / "filtered_feature_bc_matrix.h5") as fh:
        names = fh["matrix/features/name"].asstr()[()].tolist()
    names[5] = names[7] = names[9] = "DUP"
    with h5py.File(tmp_path / "v" / "filtered_feature_bc_matrix.h5", "r+") as fh:
        del fh["matrix/features/name"]
        fh["matrix/features/name"] = np.array(names, dtype="S")
    t, side = _visium(tmp_path / "v", tmp_path / "o")
    assert {"DUP", "DUP-1", "DUP-2"} <= set(t.genes)
    assert side["slides"]["v"]["features"]["duplicate_symbols_made_unique"] == 2
    assert make_unique(["a", "a-1", "a"]) == (["a", "a-1", "a-2"], 1)


def _fake_visium_hd(root, n_side=6, mpp=0.2738, bin_um=8):
    """Space Ranger 3 Visium HD layout: binned_outputs/square_008um with parquet positions."""
    from PIL import Image

    sq = root / "binned_outputs" / f"square_{bin_um:03d}um"
    (sq / "spatial").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    bcs = [f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows.ravel(), cols.ravel())]
    step = bin_um / mpp
    pd.DataFrame({"barcode": bcs, "in_tissue": 1, "array_row": rows.ravel(), "array_col": cols.ravel(),
                  "pxl_row_in_fullres": 100 + rows.ravel() * step, "pxl_col_in_fullres": 120 + cols.ravel() * step}
                 ).to_parquet(sq / "spatial" / "tissue_positions.parquet")
    (sq / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": step, "bin_size_um": bin_um, "microns_per_pixel": mpp, "regist_target_img_scalef": 0.5,
         "tissue_lowres_scalef": 0.1, "tissue_hires_scalef": 0.5, "fiducial_diameter_fullres": 300}))
    Image.fromarray((rng.random((200, 200, 3)) * 255).astype(np.uint8)).save(sq / "spatial" / "tissue_hires_image.png")
    write_10x_h5(sq / "filtered_feature_bc_matrix.h5", rng.poisson(3, (len(bcs), 8)), bcs, [f"G{i}" for i in range(8)])
    return sq


def test_visium_hd_bins_use_microns_per_pixel(tmp_path):
    _fake_visium_hd(tmp_path / "outs")
    with pytest.raises(ImportDataError, match="--bin-size"):
        import_visium([tmp_path / "outs"], tmp_path / "o0", image_res="hires", min_spots=0.0)
    with pytest.raises(ImportDataError, match="square_016um"):
        import_visium([tmp_path / "outs"], tmp_path / "o1", image_res="hires", min_spots=0.0, bin_size_um=16)
    t, side = _visium(tmp_path / "outs", tmp_path / "o", image_res="hires", bin_size_um=8)
    rep = side["slides"]["outs"]
    assert len(t) == 36 and side["format"] == "visium-hd"
    assert rep["pixels_per_um"] == pytest.approx(1 / 0.2738) and "microns_per_pixel" in rep["pixel_size_method"]
    assert rep["tile_um"] == pytest.approx(8.0) and rep["bin_size_um"] == 8
    assert t.xy[1, 0] - t.xy[0, 0] == pytest.approx(8 / 0.2738)


# ---------------------------------------------------------------- HEST
@pytest.fixture(scope="module")
def hest_table(tmp_path_factory):
    if not (FORMATS / "hest").is_dir():
        pytest.skip(f"formats fixture not found at {FORMATS}")
    out = tmp_path_factory.mktemp("hest")
    path = import_hest(FORMATS / "hest", ["SAMPLE_A", "SAMPLE_B"], out, n_genes=None, min_spots=0.0)
    return read_table(path), json.loads(path.with_suffix(".json").read_text())


@needs_formats
def test_hest_patches_give_centres_not_corners(hest_table):
    import anndata

    t, side = hest_table
    assert len(t) == 24
    ad = anndata.read_h5ad(FORMATS / "hest" / "st" / "SAMPLE_A.h5ad")
    centre = dict(zip(ad.obs_names, map(tuple, ad.obsm["spatial"])))
    for i, (x, y) in zip(t.ids, t.xy):
        if i.startswith("SAMPLE_A_"):
            assert (x, y) == centre[i[len("SAMPLE_A_"):]]
    rep = side["slides"]["SAMPLE_A"]
    assert rep["pixels_per_um"] == pytest.approx(4.0) and rep["tile_um"] == pytest.approx(112.0)


@needs_formats
def test_hest_benchmark_embeddings_folder_matches_every_row(hest_table, tmp_path):
    t, _ = hest_table
    path, rep = import_embeddings(FORMATS / "hest_bench_embeddings", t, "hest_bench", tmp_path)
    assert rep["matched"] == 24 and rep["unmatched_table_rows"] == 0
    assert {f["by"] for f in rep["files"].values()} == {"barcode"}
    cache = load_features(t, "hest_bench", tmp_path)
    with h5py.File(FORMATS / "hest_bench_embeddings" / "SAMPLE_B.h5") as fh:
        bcs = [b[0].decode() for b in fh["barcodes"][()]]
        emb = fh["embeddings"][()]
    row = {i: k for k, i in enumerate(cache.ids)}
    for b, e in zip(bcs, emb):
        np.testing.assert_array_equal(cache.features[row[f"SAMPLE_B_{b}"]], e.astype(np.float32))
    assert json.loads(read_attrs(path)["import_report"])["matched"] == 24


@needs_formats
def test_single_hest_file_in_a_two_sample_table_needs_the_slide(hest_table, tmp_path):
    t, _ = hest_table
    with pytest.raises(ImportDataError, match="24 rows|12 of 24"):
        import_embeddings(FORMATS / "hest_bench_embeddings" / "SAMPLE_A.h5", t, "a", tmp_path, slide="SAMPLE_A")
    _, rep = import_embeddings(FORMATS / "hest_bench_embeddings" / "SAMPLE_A.h5", t, "a", tmp_path,
                               slide="SAMPLE_A", allow_unmatched=True)
    assert rep["matched"] == 12
    assert len(load_features(t, "a", tmp_path).ids) == 12  # unmatched rows are left out, never zero-filled


# ---------------------------------------------------------------- TRIDENT / CLAM
def _expected():
    return pd.read_csv(FORMATS / "trident" / "expected_rows.csv")


def _assert_rows(t, cache_dir, backbone, feats_file):
    cache = load_features(t, backbone, cache_dir)
    exp = _expected().set_index("barcode")
    with h5py.File(feats_file) as fh:
        feats = fh["features"][()]
    assert len(cache.ids) == 100
    for i, f in zip(cache.ids, cache.features):
        np.testing.assert_array_equal(f, feats[exp.loc[i.split("_", 1)[1], "feature_row"]])


@needs_formats
@needs_visium
def test_trident_features_match_by_geometry(visium_table, tmp_path):
    t, _ = visium_table
    ef = read_embedding_file(FORMATS / "trident" / "features_uni_v1" / "visium.h5")
    assert ef.patch_size_level0 == 512
    exp = _expected()
    np.testing.assert_allclose(ef.centres[exp.feature_row], exp[["x_centre_fullres", "y_centre_fullres"]], atol=1)
    _, rep = import_embeddings(FORMATS / "trident" / "features_uni_v1" / "visium.h5", t, "uni_trident", tmp_path)
    f = rep["files"]["visium.h5"]
    assert (f["matched"], f["by"], f["ambiguous"], rep["unmatched_table_rows"]) == (100, "geometry", 0, 0)
    assert f["max_centre_distance_px"] <= 1.0
    _assert_rows(t, tmp_path, "uni_trident", FORMATS / "trident" / "features_uni_v1" / "visium.h5")
    # the CLI prints the match and writes the same cache
    from cli import main

    assert main(["import-embeddings", "--data", str(t.source), "--cache-dir", str(tmp_path / "c2"),
                 str(FORMATS / "trident" / "features_uni_v1" / "visium.h5"), "--backbone", "uni_trident"]) == 0


@needs_formats
@needs_visium
def test_clam_features_need_the_patch_size_then_match(visium_table, tmp_path):
    t, _ = visium_table
    clam = FORMATS / "clam" / "h5_files" / "visium.h5"
    with pytest.raises(ImportDataError, match="--patch-size-level0"):
        import_embeddings(clam, t, "uni_clam", tmp_path)
    _, rep = import_embeddings(clam, t, "uni_clam", tmp_path, patch_size_level0=512)
    assert rep["matched"] == 100
    _assert_rows(t, tmp_path, "uni_clam", clam)
    with pytest.raises(ImportDataError, match="say patch_size_level0 = 512 but --patch-size-level0 says 256"):
        import_embeddings(FORMATS / "trident" / "features_uni_v1" / "visium.h5", t, "x", tmp_path, patch_size_level0=256)


@needs_formats
@needs_visium
def test_clam_pt_features_read_their_coords_h5(visium_table, tmp_path):
    import torch

    t, _ = visium_table
    (tmp_path / "pt_files").mkdir()
    shutil.copytree(FORMATS / "clam" / "h5_files", tmp_path / "h5_files")
    with h5py.File(FORMATS / "clam" / "h5_files" / "visium.h5") as fh:
        torch.save(torch.from_numpy(fh["features"][()]), tmp_path / "pt_files" / "visium.pt")
    ef = read_embedding_file(tmp_path / "pt_files" / "visium.pt", patch_size_level0=512)
    assert ef.coords_file == tmp_path / "h5_files" / "visium.h5"
    _, rep = import_embeddings(tmp_path / "pt_files" / "visium.pt", t, "uni_pt", tmp_path / "c",
                               patch_size_level0=512)
    assert rep["matched"] == 100
    _assert_rows(t, tmp_path / "c", "uni_pt", FORMATS / "clam" / "h5_files" / "visium.h5")


@needs_visium
def test_slide_level_empty_and_coordless_files_are_clear_errors(visium_table, tmp_path):
    t, _ = visium_table
    with h5py.File(tmp_path / "slide.h5", "w") as fh:
        fh["features"] = np.zeros(768, np.float32)
    with pytest.raises(ImportDataError, match="slide-level"):
        import_embeddings(tmp_path / "slide.h5", t, "x", tmp_path)
    with h5py.File(tmp_path / "empty.h5", "w") as fh:
        fh["features"] = np.zeros((0, 768), np.float32)
        fh["coords"] = np.zeros((0, 2), np.int64)
    with pytest.raises(ImportDataError, match="no embeddings"):
        import_embeddings(tmp_path / "empty.h5", t, "x", tmp_path)
    with h5py.File(tmp_path / "bare.h5", "w") as fh:
        fh["features"] = np.zeros((100, 4), np.float32)
    with pytest.raises(ImportDataError, match="neither barcodes nor coords"):
        import_embeddings(tmp_path / "bare.h5", t, "x", tmp_path)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ImportDataError, match="not a readable"):
        import_embeddings(tmp_path / "junk.h5", t, "x", tmp_path)


def _coords_file(path, centres, size, feats):
    with h5py.File(path, "w") as fh:
        fh["features"] = feats
        c = fh.create_dataset("coords", data=np.round(np.asarray(centres) - size / 2).astype(np.int64))
        c.attrs["patch_size_level0"] = int(size)


def _grid_table(tmp_path, n_side=4, pitch=300.0):
    """Two slides of tiles on a square grid, ``pitch`` full-resolution pixels apart."""
    rows = []
    for sl in ("S1", "S2"):
        for i in range(n_side * n_side):
            rows.append({"ID": f"{sl}_t{i}", "path": f"tiles/{sl}_{i}.png", "slide": sl,
                         "x": 1000 + pitch * (i % n_side), "y": 2000 + pitch * (i // n_side), "G": float(i)})
    pd.DataFrame(rows).to_csv(tmp_path / "grid.csv", index=False)
    return read_table(tmp_path / "grid.csv", check_files=False)


def test_geometric_matching_reports_ambiguous_and_unmatched(tmp_path):
    t = _grid_table(tmp_path)
    rows = np.flatnonzero(np.asarray(t.slides) == "S1")
    xy = np.asarray(t.xy, float)[rows]
    size = 200.0
    rng = np.random.default_rng(0)
    # a patch centred on every tile but the first two; tile 0 lies exactly between two patches 20 px either side,
    # tile 1's nearest patch is 80 px (0.4 patch) away, beyond the 0.25 tolerance
    centres = np.r_[xy[2:], xy[:1] + [20, 0], xy[:1] - [20, 0], xy[1:2] + [80, 0]]
    feats = rng.standard_normal((len(centres), 5)).astype(np.float32)
    _coords_file(tmp_path / "f.h5", centres, size, feats)
    with pytest.raises(ImportDataError, match="table holds 2 slides"):
        import_embeddings(tmp_path / "f.h5", t, "g", tmp_path / "c")
    with pytest.raises(ImportDataError, match="18 of 32 rows"):
        import_embeddings(tmp_path / "f.h5", t, "g", tmp_path / "c", slide="S1")
    _, rep = import_embeddings(tmp_path / "f.h5", t, "g", tmp_path / "c", slide="S1", allow_unmatched=True)
    f = rep["files"]["f.h5"]
    assert (f["matched"], f["ambiguous"], f["unmatched_table_rows"], f["table_rows_considered"]) == (14, 1, 2, 16)
    cache = load_features(t, "g", tmp_path / "c")
    assert list(cache.ids) == list(np.asarray(t.ids)[rows[2:]])  # only S1's matched tiles; S2 never borrows S1's
    np.testing.assert_array_equal(cache.features[0], feats[0])
    # a looser tolerance reaches tile 1's patch
    _, rep = import_embeddings(tmp_path / "f.h5", t, "g", tmp_path / "c", slide="S1", allow_unmatched=True,
                               tolerance=0.5)
    assert rep["files"]["f.h5"]["matched"] == 15
    # two tiles nearest one patch: the nearer keeps it, the other is reported as ambiguous
    _coords_file(tmp_path / "h.h5", np.r_[xy[:1] + [140, 0]], size, feats[:1])
    _, rep = import_embeddings(tmp_path / "h.h5", t, "h", tmp_path / "c", slide="S1", allow_unmatched=True,
                               tolerance=1.0)
    assert (rep["files"]["h.h5"]["matched"], rep["files"]["h.h5"]["ambiguous"]) == (1, 1)
    assert load_features(t, "h", tmp_path / "c").ids.tolist() == [t.ids[rows[0]]]  # 140 px vs 160 px away


def test_per_slide_folder_maps_file_stems_to_slides(tmp_path):
    t = _grid_table(tmp_path)
    (tmp_path / "feats").mkdir()
    rng = np.random.default_rng(1)
    for sl in ("S1", "S2"):
        rows = np.flatnonzero(np.asarray(t.slides) == sl)
        _coords_file(tmp_path / "feats" / f"{sl}.h5", np.asarray(t.xy, float)[rows][::-1], 200.0,
                     rng.standard_normal((len(rows), 3)).astype(np.float32))
    _, rep = import_embeddings(tmp_path / "feats", t, "dir", tmp_path / "c")
    assert rep["matched"] == 32 and set(rep["files"]) == {"S1.h5", "S2.h5"}
    (tmp_path / "other").mkdir()
    shutil.copy(tmp_path / "feats" / "S1.h5", tmp_path / "other" / "slideX.h5")
    with pytest.raises(ImportDataError, match="name no slide of the table"):
        import_embeddings(tmp_path / "other", t, "dir2", tmp_path / "c")


@needs_formats
@needs_visium
def test_cli_visium_then_trident_embeddings_then_fit(tmp_path, capsys):
    """The whole path a TRIDENT user takes, through the CLI: import the slide, import its features, fit a head."""
    from cli import main

    assert main(["tiles", "visium", str(VISIUM), "--out", str(tmp_path / "t"), "--name", "vis", "--image-res",
                 "lowres", "--genes", "20", "--min-spots", "0", "--out-px", "16"]) == 0
    table = tmp_path / "t" / "vis.csv"
    assert main(["import-embeddings", "--data", str(table), "--cache-dir", str(tmp_path / "cache"),
                 str(FORMATS / "trident" / "features_uni_v1" / "visium.h5"), "--backbone", "uni_trident"]) == 0
    out = capsys.readouterr().out
    assert "100 of 100 table rows matched by geometry" in out
    assert main(["fit", "--data", str(table), "--cache-dir", str(tmp_path / "cache"), "--runs-dir",
                 str(tmp_path / "runs"), "--backbone", "uni_trident", "--head", "ridge", "--groups", "none",
                 "--folds", "3", "--device", "cpu"]) == 0
    assert "run written to" in capsys.readouterr().out
    # flags a source type does not use are errors, not silently ignored
    assert main(["tiles", "st", str(VISIUM), "--out", str(tmp_path / "x"), "--bin-size", "8"]) == 2
    assert "applies to visium and spatialdata only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
