"""Silent defects found in the structure review (issue 26): each test failed on the code before the fix."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run, small_world

import cli
from core.errors import TableError, UsageError
from featurize.synthetic import make_synthetic_table


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("defects"))


def fit(world, runs, *extra, data=None):
    root, train, _, cache = world
    return run(["fit", "--data", data or train, "--backbone", "timm:test_vit", "--cache-dir", cache, "--runs-dir", runs,
                "--folds", "4", "--device", "cpu", *extra])


def test_predict_h5ad_keeps_each_tile_under_its_own_slide(world, tmp_path):
    import anndata

    root, train, test, cache = world
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0
    df = pd.read_csv(test)
    df["slide"] = [f"S{i % 4}" for i in range(len(df))]
    multi = test.parent / "test4.csv"
    df.to_csv(multi, index=False)
    out = tmp_path / "p.h5ad"
    assert run(["predict", runs / "train-timm_test_vit-ridge", "--data", multi, "--cache-dir", tmp_path / "tc",
                "--out", out, "--device", "cpu"]) == 0
    ad = anndata.read_h5ad(out)
    assert list(ad.obs["slide"].astype(str)) == df["slide"].tolist()
    assert sorted(ad.uns["spatial"]) == ["S0", "S1", "S2", "S3"]
    assert ad.uns["hexpress"]["hexpress_version"] and ad.uns["hexpress"]["kind"] == "run"


def test_spatial_and_qc_columns_are_never_genes_and_fit_says_what_it_took(world, tmp_path, capsys):
    root, train, test, cache = world
    df = pd.read_csv(train)
    t = train.parent / "train_qc.csv"
    df.assign(in_tissue=1, array_row=np.arange(len(df)), pxl_row_in_fullres=np.arange(len(df)) * 10.0,
              total_counts=np.arange(len(df)) + 100).to_csv(t, index=False)
    from featurize.tables.table import read_table

    table = read_table(t)
    assert table.genes == [c for c in df.columns if c.startswith("GENE")]
    assert set(table.ignored) == {"in_tissue", "array_row", "pxl_row_in_fullres", "total_counts"}
    import shutil

    shutil.copytree(next(cache.glob("train-*")), cache / "train_qc", dirs_exist_ok=True)  # same rows: the cache serves
    capsys.readouterr()
    assert fit(world, tmp_path / "r", data=t) == 0
    err = capsys.readouterr().err  # what a step did goes to stderr (logging); results to stdout
    assert "5 gene columns (GENE000 ... GENE004); not genes: in_tissue, array_row" in err


def test_an_importers_sidecar_decides_the_genes(tmp_path):
    from conftest import fake_st as _fake_st

    from featurize.importers.st import import_st
    from featurize.tables.table import read_table

    _fake_st(tmp_path / "st")
    out = import_st(tmp_path / "st", tmp_path / "out", name="t", tile_px=100, out_px=16, n_genes=5, min_spots=0.0)
    genes = read_table(out).genes
    df = pd.read_csv(out)
    df["my_score"] = 1.5  # a numeric column added by hand: not a gene of this table
    df.to_csv(out, index=False)
    t = read_table(out)
    assert t.genes == genes and t.ignored == ("my_score",)
    (tmp_path / "out" / "t.json").write_text("{ broken")
    with pytest.raises(TableError, match="sidecar of t.csv is unreadable"):
        read_table(out)


def test_cuda_with_a_head_without_a_gpu_path_is_an_error():
    from regress.heads.registry import gpu_heads, make_head

    assert "ridge" in gpu_heads() and "pls" not in gpu_heads()
    for head in ("pls", "knn", "krr"):
        with pytest.raises(UsageError, match=f"--head {head} has no GPU path.*ridge"):
            make_head(head, "cuda", 0)
    with pytest.raises(UsageError, match="not on CUDA"):
        make_head("sklearn:sklearn.linear_model.Ridge", "cuda:0", 0)


def test_automatic_streaming_says_so_and_no_stream_turns_it_off(world, tmp_path, monkeypatch, capsys):
    import regress.runs.fit

    monkeypatch.setattr(regress.runs.fit, "_too_big", lambda data: True)

    def streamed(*a, **k):
        raise UsageError("took the streaming path")

    monkeypatch.setattr(regress.runs.fit, "_fit_run_streaming", streamed)
    capsys.readouterr()
    assert fit(world, tmp_path / "a") == 2
    got = capsys.readouterr()
    assert "streams from disk (--no-stream fits in memory)" in got.err and "took the streaming path" in got.err
    assert fit(world, tmp_path / "b", "--head", "mlp", "--head-param", "max_epochs=2") == 0  # was "--stream fits..."
    assert "fits in memory only" in capsys.readouterr().err
    assert fit(world, tmp_path / "c", "--no-stream") == 0
    assert "stream" not in capsys.readouterr().err


def test_more_folds_than_rows_is_an_error_not_a_silent_clamp():
    from regress.cv import make_splits

    with pytest.raises(UsageError, match="--folds 10: the table has only 8 rows"):
        make_splits(8, 10)
    assert len(make_splits(8, 8)) == 8


def test_a_timm_model_without_a_pretrained_config_is_warned_and_recorded(monkeypatch, capsys):
    import timm

    from featurize.models.backbones import _timm_spec

    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: None)
    spec = _timm_spec("timm:test_vit")
    assert "no pretrained config" in spec.notes and "ImageNet mean/std, 224 px" in spec.notes
    assert "warning: backbone 'timm:test_vit'" in capsys.readouterr().err


def test_imported_test_embeddings_must_match_the_training_ones():
    from core.errors import CacheError
    from regress.runs.predict import _check_imported

    train = {"spec": {"name": "uni", "embed_dim": 1024, "architecture": "external:a.h5"}, "dtype": "float32", "tta": 1,
             "params": {"patch_size_level0": 224}}
    same = json.loads(json.dumps(train))
    same["spec"]["architecture"] = "external:b.h5"
    notes = []
    _check_imported(train, same, "t.h5", {"cache": "c.h5", "backbone": "uni"}, notes.append)
    assert "not that the same encoder made them" in notes[0]
    for field, value in (("embed_dim", 768), ("name", "conch")):
        other = json.loads(json.dumps(train))
        other["spec"][field] = value
        with pytest.raises(CacheError, match="imported test features differ"):
            _check_imported(train, other, "t.h5", {"cache": "c.h5", "backbone": "uni"}, notes.append)
    other = json.loads(json.dumps(train))
    other["params"]["patch_size_level0"] = 448
    with pytest.raises(CacheError, match="patch size"):
        _check_imported(train, other, "t.h5", {"cache": "c.h5", "backbone": "uni"}, notes.append)


def test_stack_names_the_flags_that_exist(capsys):
    assert run(["stack", "only-one"]) == 2
    err = capsys.readouterr().err
    assert "--run" not in err and "stack RUN RUN" in err


def test_synthetic_tables_are_unaffected(tmp_path):
    from featurize.tables.table import read_table

    t = read_table(make_synthetic_table(tmp_path, n=4, n_genes=3, size=16))
    assert t.genes == ["GENE000", "GENE001", "GENE002"] and t.ignored == ()


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["embed", "--help"], ["backbones"]])
def test_help_and_backbones_import_no_heavy_library(argv):
    """``--help`` and ``backbones`` start in a fraction of a second: no torch, scikit-learn, SciPy or h5py."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, cli\n"
            f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'sklearn', 'scipy', 'h5py') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-300:]


def test_every_head_declares_how_it_is_stored_and_none_falls_back_to_pickle(tmp_path):
    from regress.heads.registry import HEADS, make_head
    from regress.heads.persist import is_safe, safe_classes, save_model

    for name, preset in HEADS.items():
        est = make_head(name, "cpu", 0)
        module, cls = preset.stored.split(":")
        assert (type(est).__module__, type(est).__name__) == (module, cls), name
        assert is_safe(est) and safe_classes()[cls] == module

    class Undeclared:  # a hexpress estimator nobody declared: an error, never a silent pickle
        __module__ = "regress.new_head"

    from core.errors import RunError

    with pytest.raises(RunError, match="without a declared way to store it"):
        save_model(Undeclared(), tmp_path)
    assert not list(tmp_path.iterdir())


def test_two_tables_of_one_name_never_share_or_evict_a_cache(tmp_path, monkeypatch):
    from featurize.cache import load_features
    from featurize.engine.extract import embed
    from featurize.tables.table import read_table

    a = make_synthetic_table(tmp_path / "a", n=12, n_genes=2, size=24, seed=1)  # both are train.csv
    b = make_synthetic_table(tmp_path / "b", n=12, n_genes=2, size=24, seed=2)
    kw = dict(random_init=True, cache_dir=tmp_path / "c", progress=False, num_workers=0)
    pa = embed(a, ["timm:test_vit"], **kw)[0]
    pb = embed(b, ["timm:test_vit"], **kw)[0]
    assert pa.parent != pb.parent and pa.parent.name.startswith("train-") and pa.exists() and pb.exists()
    import featurize.engine.extract as ex

    monkeypatch.setattr(ex, "create_backbone", lambda *x: pytest.fail("embedded again: the cache was evicted"))
    assert embed(a, ["timm:test_vit"], **kw)[0] == pa  # up to date, not re-embedded
    fa, fb = (load_features(read_table(t), "timm:test_vit", tmp_path / "c") for t in (a, b))
    assert fa.path == pa and fb.path == pb and not np.array_equal(fa.features, fb.features)


def test_quiet_and_verbose_on_every_command(world, tmp_path, capsys):
    """``--quiet`` keeps warnings and errors, the default shows each step, on stderr; results stay on stdout."""
    from conftest import parser_leaves

    found = list(parser_leaves(cli.build_parser()))
    assert len(found) >= 14 and all({"--quiet", "--verbose"} <= set(opts) for _, opts in found), found
    assert fit(world, tmp_path / "a") == 0
    got = capsys.readouterr()
    assert "[fit] ridge: fold 1/4" in got.err and "run written to" in got.out
    assert fit(world, tmp_path / "b", "--quiet") == 0
    got = capsys.readouterr()
    assert "[fit]" not in got.err and "run written to" in got.out


def test_a_quiet_command_leaves_no_quiet_logger_behind(capsys):
    """``cli.main`` sets the level for its own command only: the library's lines come back after ``--quiet``."""
    from core.log import say

    assert run(["backbones", "--quiet"]) == 0
    capsys.readouterr()
    say("[test] a step line")
    assert "[test] a step line" in capsys.readouterr().err
