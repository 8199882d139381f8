"""Runs and caches you can trust: run identity, self-contained run folders, no pickle, heads from anywhere,
and every command's bad arguments ending in one error line."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import rewrite_info, run, small_world

import cli
from core.errors import RunError, UsageError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("trust"))


def fit(world, runs, *extra):
    root, train, _, cache = world
    return run(["fit", "--data", train, "--backbone", "timm:test_vit", "--cache-dir", cache, "--runs-dir", runs,
                "--folds", "4", "--device", "cpu", *extra])


# ------------------------------------------------------------------ run identity
def test_refit_with_other_settings_is_refused_without_overwrite(world, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0
    folder = runs / "train-timm_test_vit-ridge"
    before = json.loads((folder / "run.json").read_text())["identity"]
    assert fit(world, runs) == 0  # same settings: same identity, replaced quietly
    capsys.readouterr()
    assert fit(world, runs, "--seed", "3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "folds.seed: 0 -> 3" in err and "--overwrite" in err
    assert json.loads((folder / "run.json").read_text())["identity"] == before  # untouched
    assert fit(world, runs, "--head-param", "cv=3") == 2
    assert "head.params.cv" in capsys.readouterr().err
    assert fit(world, runs, "--seed", "3", "--overwrite") == 0
    assert json.loads((folder / "run.json").read_text())["identity"] != before


# ------------------------------------------------------------------ self-contained run folders
def test_a_run_folder_copied_elsewhere_stacks_reports_and_predicts_without_the_training_table(world, tmp_path):
    root, train, test, cache = world
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0
    assert fit(world, runs, "--head", "pls") == 0
    moved = tmp_path / "elsewhere"
    shutil.copytree(runs, moved)
    # the training table and its tiles are gone; only the copied runs and the test side remain
    work = tmp_path / "w"
    shutil.copytree(root / "data", work)
    (work / "train.csv").unlink()
    shutil.rmtree(work / "train")
    ra, rb = moved / "train-timm_test_vit-ridge", moved / "train-timm_test_vit-pls"
    assert run(["report", ra]) == 0 and list((ra / "report").glob("spatial_*.png"))
    assert run(["stack", ra, rb, "--out", moved / "stack"]) == 0
    out = tmp_path / "pred.csv"
    assert run(["predict", moved / "stack", "--data", work / "test.csv", "--cache-dir", tmp_path / "tc",
                "--out", out, "--device", "cpu"]) == 0
    assert len(pd.read_csv(out)) == 8


def test_stack_and_predict_refuse_runs_that_disagree(world, tmp_path):
    root, train, test, cache = world
    a, b = tmp_path / "a", tmp_path / "b"
    assert fit(world, a) == 0
    assert fit(world, b, "--head", "pls", "--folds", "3") == 0
    from regress.runs.stack import stack_runs

    with pytest.raises(RunError, match="CV folds differ"):
        stack_runs([a / "train-timm_test_vit-ridge", b / "train-timm_test_vit-pls"], out_dir=tmp_path / "s")
    # other genes: a table with one gene less
    df = pd.read_csv(train)
    df.drop(columns=[c for c in df.columns if c.startswith("GENE")][-1]).to_csv(root / "data" / "train4.csv", index=False)
    assert run(["embed", "--data", root / "data" / "train4.csv", "--backbone", "timm:test_vit", "--random-init",
                "--quiet", "--cache-dir", cache, "--workers", "0"]) == 0
    assert run(["fit", "--data", root / "data" / "train4.csv", "--backbone", "timm:test_vit", "--cache-dir", cache,
                "--runs-dir", tmp_path / "c", "--folds", "4", "--device", "cpu"]) == 0
    with pytest.raises(RunError, match="genes differ"):
        stack_runs([a / "train-timm_test_vit-ridge", tmp_path / "c" / "train4-timm_test_vit-ridge"], out_dir=tmp_path / "s")
    # a stack whose runs no longer agree (one refitted with other folds) is refused by predict
    assert fit(world, tmp_path / "d") == 0
    assert fit(world, tmp_path / "d", "--head", "pls") == 0
    d = tmp_path / "d"
    stack_runs([d / "train-timm_test_vit-ridge", d / "train-timm_test_vit-pls"], out_dir=d / "stack", log=lambda *x: None)
    assert fit(world, d, "--head", "pls", "--folds", "3", "--overwrite") == 0
    from regress.runs.predict import predict_table

    with pytest.raises(RunError, match="member run was refitted with other settings since stack"):
        predict_table(d / "stack", test, cache_dir=cache, device="cpu")


# ------------------------------------------------------------------ no pickle for the built-in heads
@pytest.mark.parametrize("head", ["ridge", "ridge-pcc", "hest", "ridge-rr", "knn", "krr", "pls", "mlp",
                                  "mean"])
def test_built_in_heads_round_trip_without_pickle(head, tmp_path):
    from regress.heads.registry import make_head
    from regress.heads.persist import load_model, save_model

    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((60, 8)), rng.standard_normal((60, 3))
    est = make_head(head, "cpu", 0, {"max_epochs": 5} if head == "mlp" else None).fit(X, Y)
    files = save_model(est, tmp_path)
    assert files == ["model.json", "model.npz"]
    back = load_model(tmp_path)
    assert type(back) is type(est)
    np.testing.assert_array_equal(back.predict(X), est.predict(X))


def test_plugin_head_is_pickled_and_a_tampered_pickle_is_refused_without_trust(world, tmp_path, capsys):
    root, train, test, cache = world
    runs = tmp_path / "runs"
    assert fit(world, runs, "--head", "sklearn:sklearn.linear_model.Ridge", "--head-param", "alpha=3") == 0
    folder = runs / "train-timm_test_vit-sklearn_sklearn.linear_model.Ridge"
    info = json.loads((folder / "run.json").read_text())
    assert info["head"]["params"]["alpha"] == 3 and info["head"]["plugin"] and (folder / "model.joblib").is_file()
    out = tmp_path / "p.csv"
    argv = ["predict", folder, "--data", test, "--cache-dir", tmp_path / "tc", "--out", out, "--device", "cpu"]
    capsys.readouterr()
    assert run(argv) == 2 and "--trust-pickle" in capsys.readouterr().err and not out.exists()
    assert run([*argv, "--trust-pickle"]) == 0 and out.is_file()
    # a pickle that runs code when loaded: refused (and not run) without the flag
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "model.joblib").write_bytes(pickle.dumps(Evil()))
    out.unlink()
    assert run(argv) == 2 and not marker.exists() and not out.exists()


# ------------------------------------------------------------------ heads from anywhere
def test_head_params_are_checked_and_never_silently_overridden(world, tmp_path, capsys):
    runs = tmp_path / "runs"
    for extra, msg in ((["--head-param", "nope=1"], "has no such parameter"),
                       (["--head-param", "device=cuda"], "contradicts --device"),
                       (["--head-param", "random_state=5"], "contradicts --seed"),
                       (["--head-param", "scoring=x"], "scoring"),
                       (["--head-param", "oops"], "NAME=VALUE"),
                       (["--head", "sklearn:no.such.Thing"], "cannot import"),
                       (["--head", "sklearn:sklearn.linear_model.Lasso", "--head-param", "alpha=-1"], "alpha"),
                       (["--head", "nonsense"], "unknown head")):
        capsys.readouterr()
        assert fit(world, runs, *extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, (extra, err)
    assert not runs.exists() or not any(runs.iterdir())


def test_builtin_heads_declare_parameter_constraints():
    from regress.heads.mlp import MLPHead
    from regress.heads.pls import PLSHead
    from regress.heads.ridge import RidgeHead

    for cls in (RidgeHead, PLSHead, MLPHead):
        assert set(cls._parameter_constraints) == set(cls().get_params())
    with pytest.raises(UsageError, match="scoring"):
        RidgeHead(scoring="r2").fit(np.zeros((4, 2)), np.zeros(4))


# ------------------------------------------------------------------ every command, bad arguments
BAD = [
    (["fit", "--data", "{train}", "--cache-dir", "{cache}"], "--backbone NAME"),
    (["fit", "--data", "{train}", "--backbone", "timm:test_vit", "--cache", "x.h5"], "contradict"),
    (["fit", "--data", "{train}", "--backbone", "timm:test_vit", "--folds", "abc"], "invalid int"),
    (["fit", "--data", "{missing}", "--backbone", "timm:test_vit"], "not found"),
    (["fit", "--data", "{train}", "--backbone", "timm:test_vit", "--cache-dir", "{cache}", "--groups", "nope"], "nope"),
    (["compare", "--data", "{train}", "--backbone", "timm:test_vit"], "--head"),
    (["tiles", "st", "{root}", "--out", "{out}", "--genes", "abc"], "--genes abc"),
    (["tiles", "st", "{root}", "--out", "{out}", "--genes", "0"], "--genes 0"),
    (["tiles", "hest", "{root}", "--out", "{out}", "--section", "S", "--tile-um", "50"], "does not apply"),
    (["tiles", "visium", "{root}", "--out", "{out}", "--section", "S"], "does not apply"),
    (["tiles", "nope", "{root}", "--out", "{out}"], "invalid choice"),
    (["embed", "--data", "{train}"], "--backbone"),
    (["embed", "--data", "{train}", "--backbone", "no_such", "--cache-dir", "{out}"], "unknown backbone"),
    (["embed", "--data", "{train}", "--backbone", "timm:test_vit", "--tta", "3"], "invalid choice"),
    (["embed", "--data", "{train}", "--backbone", "timm:test_vit", "--batch-size", "0", "--cache-dir", "{out}",
      "--random-init"], "--batch-size"),
    (["cache", "verify", "{missing}"], "not found"),
    (["cache", "info"], "file"),
    (["stack", "{out}"], "at least two runs"),
    (["stack", "--all", "{train}", "--runs-dir", "{out}"], "no finished run"),
    (["stack", "{out}", "{out}", "--alpha", "2"], "--alpha"),
    (["predict", "{out}", "--data", "{train}", "--out", "{out}/s.csv"], "not a finished"),
    (["predict", "{out}", "--data", "{train}", "--out", "{out}/s.txt"], "*.csv"),
    (["report", "{out}"], "not a finished"),
    (["import-embeddings", "--data", "{train}", "{missing}", "--backbone", "x", "--cache-dir", "{out}"], "no such"),
    (["import-embeddings", "--data", "{train}", "{missing}"], "--backbone"),
    (["backbones", "--nope"], "unrecognized"),
    (["demo", "--device", "cuda", "--workdir", "{out}"], "CUDA"),
    (["nope"], "invalid choice"),
]


@pytest.mark.parametrize("argv,msg", BAD, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(BAD)])
def test_bad_arguments_give_one_error_line_exit_2_and_write_nothing(world, tmp_path, capsys, argv, msg):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    root, train, test, cache = world
    out = tmp_path / "out"
    subs = {"{train}": str(train), "{cache}": str(cache), "{missing}": str(tmp_path / "missing.csv"),
            "{root}": str(tmp_path / "nodata"), "{out}": str(out)}
    argv = [subs.get(a, a.replace("{out}", str(out))) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert msg in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


# ------------------------------------------------------------------ smaller promises of the issue
def test_damaged_cache_is_named_as_damaged_and_embed_replaces_it(world, tmp_path):
    root, train, test, cache = world
    c = tmp_path / "cache"
    shutil.copytree(cache, c)
    f = next(c.glob("train-*/timm_test_vit-*.h5"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])
    from featurize.cache import load_features
    from core.errors import CacheError
    from featurize.tables.table import read_table

    with pytest.raises(CacheError, match="damaged"):
        load_features(read_table(train), "timm:test_vit", c)
    assert run(["embed", "--data", train, "--backbone", "timm:test_vit", "--random-init", "--quiet", "--cache-dir", c,
                "--workers", "0"]) == 0
    assert load_features(read_table(train), "timm:test_vit", c).features.shape[0] == 40


def test_stale_imported_cache_suggests_import_embeddings(tmp_path):
    import h5py

    from featurize.cache import load_features
    from core.errors import CacheError
    from featurize.importers.embeddings import import_embeddings
    from featurize.tables.table import read_table

    pd.DataFrame({"ID": ["a", "b"], "path": ["x.png", "y.png"], "g": [1.0, 2.0]}).to_csv(tmp_path / "t.csv", index=False)
    with h5py.File(tmp_path / "e.h5", "w") as fh:
        fh["features"] = np.ones((2, 3), np.float32)
        fh["barcodes"] = np.array([b"a", b"b"])
    import_embeddings(tmp_path / "e.h5", read_table(tmp_path / "t.csv", check_files=False), "ext", tmp_path / "c")
    pd.DataFrame({"ID": ["a", "b", "z"], "path": ["x.png", "y.png", "z.png"], "g": [1.0, 2.0, 3.0]}).to_csv(
        tmp_path / "t.csv", index=False)
    with pytest.raises(CacheError, match="import-embeddings"):
        load_features(read_table(tmp_path / "t.csv", check_files=False), "ext", tmp_path / "c")


def test_predict_refuses_a_precision_mismatch_before_embedding(world, tmp_path, monkeypatch):
    root, train, test, cache = world
    runs = tmp_path / "runs"
    assert fit(world, runs) == 0
    folder = runs / "train-timm_test_vit-ridge"
    info = json.loads((folder / "run.json").read_text())
    info["backbones"][0]["key"]["compute"] = "bfloat16"  # as if the training caches came from a GPU
    rewrite_info(folder, info)
    import featurize.engine.extract

    monkeypatch.setattr(featurize.engine.extract, "embed", lambda *a, **k: pytest.fail("embedded before refusing"))
    from core.errors import CacheError
    from regress.runs.predict import predict_table

    with pytest.raises(CacheError, match="bfloat16.*float32"):
        predict_table(folder, test, cache_dir=tmp_path / "tc", device="cpu")


def test_every_flag_of_every_command_has_help():
    parser = cli.build_parser()

    def walk(p, path):
        for a in p._actions:
            if a.dest == "help":
                continue
            if isinstance(a.choices, dict) and hasattr(next(iter(a.choices.values()), None), "_actions"):
                for name, sub in a.choices.items():
                    yield from walk(sub, f"{path} {name}")
            else:
                yield path, a

    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in walk(parser, "cli") if not a.help]
    assert missing == []
