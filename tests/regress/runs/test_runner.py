"""``cli.py run``: recipes validated before any work, the plan, the budget, resume after SIGKILL, and a model
folder that equals the same steps typed by hand and that ``predict`` takes alone (cutting its extra tile
sizes from the test table itself)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import fake_st, run

ROOT = Path(__file__).resolve().parents[3]

TINY = """
name = "tiny"
[stack]
method = "cross-gene"
[[member]]
name = "ridge-1x"
backbones = ["timm:test_vit"]
head = "ridge"
params = { alpha_per_target = false }
context = 2
center_slides = true
[[member]]
name = "pls-2x"
backbones = ["timm:test_vit"]
head = "pls"
scale = 2
"""


def _st(root: Path, sections, seed0=0) -> Path:
    for i, name in enumerate(sections):
        fake_st(root, seed=seed0 + i, name=name, genes=12)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4-section, 2-patient ST folder imported at 60 px tiles; a 1-section test folder; the tiny recipe."""
    root = tmp_path_factory.mktemp("runner")
    _st(root / "st", ["A1", "A2", "B1", "B2"])
    _st(root / "st_test", ["C1"], seed0=9)
    assert run(["tiles", "st", root / "st", "--out", root / "tab", "--name", "train", "--tile-px", 60,
                "--out-px", 32, "--genes", 8, "--min-spots", 0, "--quiet"]) == 0
    assert run(["tiles", "st", root / "st_test", "--out", root / "ttab", "--name", "test", "--tile-px", 60,
                "--out-px", 32, "--genes", 8, "--min-spots", 0, "--quiet"]) == 0
    (root / "tiny.toml").write_text(TINY)
    return root


def _run_cli(world, out, *extra, env=None):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "run", "--data", str(world / "tab" / "train.csv"),
                           "--recipe", str(world / "tiny.toml"), "--random-init", "--device", "cpu", "--out",
                           str(out), "--cache-dir", str(world / "cache"), "--no-lopo", *extra],
                          cwd=world, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_shipped_recipes_are_valid_and_ordered_by_value():
    from regress.runs.recipe import BUILTIN, load_recipe

    for name in BUILTIN:
        r = load_recipe(name)
        assert r.members and r.stack_method == "cross-gene" and r.nested
    best = load_recipe("best")
    assert len(best.members) == 7 and best.scales == [1.0, 2.0, 4.0]
    assert best.members[0].scale == 1.0  # the most valuable first: --budget keeps from the top


@pytest.mark.parametrize("body, says", [
    ('name = "x"\ncolour = 1\n[[member]]\nbackbones = ["timm:test_vit"]\n', "unknown key 'colour'"),
    ('[[member]]\nbackbones = ["no_such_net"]\n', "backbone 'no_such_net'"),
    ('[[member]]\nbackbones = ["timm:test_vit"]\nhead = "lasso"\n', "head = 'lasso'; choose"),
    ('[[member]]\nbackbones = ["timm:test_vit"]\nparams = { alpah = 3 }\n', "alpah"),
    ('[[member]]\nbackbones = ["timm:test_vit"]\nscale = 40\n', "scale = 40"),
    ('[[member]]\nbackbones = ["timm:test_vit"]\nwidth = 3\n', "unknown key 'width' in [[member]] 1"),
    ('[stack]\nmethod = "vote"\n[[member]]\nbackbones = ["timm:test_vit"]\n', "method = 'vote'"),
    ('[[member]\n', "not valid TOML"),
])
def test_a_bad_recipe_is_one_error_line_and_writes_nothing(world, tmp_path, capsys, body, says):
    bad = tmp_path / "bad.toml"
    bad.write_text(body)
    out, cache = tmp_path / "model", tmp_path / "cache"
    assert run(["run", "--data", world / "tab" / "train.csv", "--recipe", bad, "--out", out, "--cache-dir", cache,
                "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not out.exists() and not cache.exists()


def test_a_size_multiple_on_a_table_without_images_is_refused(tmp_path, capsys):
    from featurize.synthetic import make_synthetic_table

    table = make_synthetic_table(tmp_path / "d", n=12, n_genes=3, size=32, name="t", seed=0)
    (tmp_path / "r.toml").write_text(TINY)
    assert run(["run", "--data", table, "--recipe", tmp_path / "r.toml", "--out", tmp_path / "m",
                "--cache-dir", tmp_path / "c", "--device", "cpu", "--random-init"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2x" in err[0] and "source images" in err[0], err
    assert not (tmp_path / "m").exists()


def test_a_shipped_recipe_on_pre_cut_tiles_runs_without_its_extra_sizes(tmp_path, capsys):
    from featurize.synthetic import make_synthetic_table

    table = make_synthetic_table(tmp_path / "d", n=12, n_genes=3, size=32, name="t", seed=0)
    assert run(["run", "--data", table, "--recipe", "quick", "--out", tmp_path / "m", "--cache-dir",
                tmp_path / "c", "--plan"]) == 0
    out = capsys.readouterr()
    assert "without its extra tile sizes (2x)" in out.err
    assert "2x" not in out.out and "ridge-lite0:" in out.out


def test_budget_parsing():
    from core.errors import UsageError
    from regress.runs.runner import parse_budget

    assert parse_budget("30m") == 1800 and parse_budget("1h30m") == 5400 and parse_budget("90s") == 90
    assert parse_budget("2h") == 7200 and parse_budget(45) == 45 and parse_budget(None) is None
    for bad in ("soon", "0m", "-3m", ""):
        with pytest.raises(UsageError):
            parse_budget(bad)


def test_run_equals_the_same_steps_typed_by_hand(world, tmp_path):
    """Two sizes, two heads, the cross-gene stack, predict on a fresh test table that predict cuts itself:
    the model folder's numbers equal the existing commands run one by one."""
    model = world / "model"
    p = _run_cli(world, model)
    assert p.returncode == 0, p.stderr
    assert "step 1/" in p.stderr and "fold 1/4" in p.stderr  # one progress line per step, folds as they finish
    doc = json.loads((model / "hexpress-model.json").read_text())
    assert doc["scales"] == [1.0, 2.0] and doc["result"] == "stack" and doc["group_col"] == "slide"
    assert run(["predict", model, "--data", world / "ttab" / "test.csv", "--out", tmp_path / "run.csv",
                "--cache-dir", world / "cache", "--device", "cpu"]) == 0
    assert (world / "ttab" / "test@2x.csv").is_file()  # cut by predict from the test table's source images

    # by hand: the 2x tables cut by the importer, embed, fit --nested, stack, predict with one table per size
    h = tmp_path / "hand"
    for src, name, out in ((world / "st", "train", h / "tab2"), (world / "st_test", "test", h / "ttab2")):
        assert run(["tiles", "st", src, "--out", out, "--name", name, "--tile-px", 120, "--out-px", 32, "--genes", 8,
                    "--min-spots", 0, "--quiet"]) == 0
    cache, runs = h / "cache", h / "runs"
    common = ["--groups", "slide", "--folds", 4, "--device", "cpu", "--cache-dir", cache, "--runs-dir", runs,
              "--nested", "--quiet"]
    for table in (world / "tab" / "train.csv", h / "tab2" / "train.csv"):
        assert run(["embed", "--data", table, "--backbone", "timm:test_vit", "--random-init", "--cache-dir", cache,
                    "--quiet", "--device", "cpu"]) == 0
    assert run(["fit", "--data", world / "tab" / "train.csv", "--backbone", "timm:test_vit", "--head", "ridge",
                "--head-param", "alpha_per_target=false", "--context", 2, "--center-slides", "--name", "a",
                *common]) == 0
    assert run(["fit", "--data", h / "tab2" / "train.csv", "--backbone", "timm:test_vit", "--head", "pls",
                "--name", "b", *common]) == 0
    assert run(["stack", runs / "a", runs / "b", "--method", "cross-gene", "--out", h / "stack", "--quiet"]) == 0
    assert run(["predict", h / "stack", "--data", world / "ttab" / "test.csv", "--data", h / "ttab2" / "test.csv",
                "--out", tmp_path / "hand.csv", "--cache-dir", cache, "--device", "cpu"]) == 0

    from regress.runs.folder import open_result

    mine, theirs = open_result(model / "stack"), open_result(h / "stack")
    np.testing.assert_allclose(mine.data().oof, theirs.data().oof, rtol=1e-6, atol=1e-6)
    assert mine.metrics["pcc_gene_mean_by_fold"] == pytest.approx(theirs.metrics["pcc_gene_mean_by_fold"], abs=1e-9)
    a, b = pd.read_csv(tmp_path / "run.csv"), pd.read_csv(tmp_path / "hand.csv")
    assert list(a.columns) == list(b.columns) and (a["ID"] == b["ID"]).all()
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(), b.iloc[:, 1:].to_numpy(), rtol=1e-5, atol=1e-5)


def test_a_rerun_reuses_every_step(world):
    model = world / "model"
    if not (model / "hexpress-model.json").is_file():
        assert _run_cli(world, model).returncode == 0
    stamp = {p: p.stat().st_mtime_ns for p in model.rglob("run.json")}
    p = _run_cli(world, model, "--plan")
    assert p.returncode == 0 and p.stdout.count("[reuse]") == 6, p.stdout  # 2 embeds, 2 fits, the cut and the stack
    p = _run_cli(world, model)
    assert p.returncode == 0, p.stderr
    assert {p: p.stat().st_mtime_ns for p in model.rglob("run.json")} == stamp


@pytest.mark.parametrize("fault", ["embed-after-batch", "fit-after-fold@6"])
def test_sigkill_mid_embed_or_mid_fit_then_rerun_finishes_with_the_same_numbers(world, tmp_path, fault):
    """Killed in an embed (its own cache folder) or in the second member's fit: the rerun finishes, redoes no
    finished step, and its stack equals an uninterrupted run's."""
    reference = world / "model"
    if not (reference / "hexpress-model.json").is_file():
        assert _run_cli(world, reference).returncode == 0
    cache = tmp_path / "cache"
    args = ["run", "--data", str(world / "tab" / "train.csv"), "--recipe", str(world / "tiny.toml"), "--random-init",
            "--device", "cpu", "--out", str(tmp_path / "m"), "--cache-dir", str(cache), "--quiet", "--no-lopo",
            "--no-ablation"]
    killed = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=world, capture_output=True, text=True,
                            env={**os.environ, "HEXPRESS_FAULT": fault}, timeout=600)
    assert killed.returncode == -9, killed.stderr
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "m").rglob("run.json")}
    if fault.startswith("fit"):
        assert list(finished_before) == ["ridge-1x"]  # the first member finished, the second was killed
    again = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=world, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    for name, stamp in finished_before.items():
        assert (tmp_path / "m" / "runs" / name / "run.json").stat().st_mtime_ns == stamp  # not fitted again
    from regress.runs.folder import open_result

    np.testing.assert_allclose(open_result(tmp_path / "m").data().oof, open_result(reference / "stack").data().oof,
                               rtol=1e-6, atol=1e-6)


def test_budget_drops_the_least_valuable_members_and_names_them(world, tmp_path):
    """With rates that make every fit cost an hour, a 90-minute budget keeps the first member and the stack."""
    from regress.runs.rates import machine_key

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "rates.json").write_text(json.dumps({"format": 1, "machines": {machine_key("cpu"): {
        "fit": {k: {"s_per_unit": 3600.0 / 1e-6} for k in ("ridge|nested|4folds", "pls|nested|4folds")}}}}))
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "run", "--data", str(world / "tab" / "train.csv"),
                        "--recipe", str(world / "tiny.toml"), "--random-init", "--device", "cpu", "--out",
                        str(tmp_path / "m"), "--cache-dir", str(cache), "--budget", "1m", "--plan", "--no-lopo"],
                       cwd=world, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "dropped pls-2x" in p.stdout and "(prior)" in p.stdout
    assert "fit        ridge-1x" in p.stdout and "pls-2x:" not in p.stdout


def test_predict_refuses_a_multi_scale_model_on_a_table_without_source_images(world, tmp_path, capsys):
    model = world / "model"
    if not (model / "hexpress-model.json").is_file():
        assert _run_cli(world, model).returncode == 0
    t = pd.read_csv(world / "ttab" / "test.csv")
    bare = tmp_path / "bare.csv"
    t[["ID", "path", "slide", "x", "y"]].assign(path=[str(world / "ttab" / p) for p in t["path"]]).to_csv(bare,
                                                                                                          index=False)
    assert run(["predict", model, "--data", bare, "--out", tmp_path / "p.csv", "--cache-dir", world / "cache",
                "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1x, 2x" in err[0] and "source images" in err[0], err
    assert not (tmp_path / "p.csv").exists()


def test_a_damaged_model_file_is_one_error(world, tmp_path, capsys):
    import shutil

    model = world / "model"
    if not (model / "hexpress-model.json").is_file():
        assert _run_cli(world, model).returncode == 0
    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    (copy / "hexpress-model.json").write_text('{"format": "hexpress-model/1", "recipe": {}')
    assert run(["predict", copy, "--data", world / "ttab" / "test.csv", "--out", tmp_path / "p.csv",
                "--cache-dir", world / "cache", "--device", "cpu"]) == 2
    assert "hexpress-model.json: is not valid JSON" in capsys.readouterr().err


def test_an_edited_member_is_refitted_and_the_rest_reused(world, tmp_path):
    """A larger or edited recipe on the same model folder: only what changed is fitted again, and the stack
    follows its members."""
    import shutil

    model = world / "model"
    if not (model / "hexpress-model.json").is_file():
        assert _run_cli(world, model).returncode == 0
    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    stamp = {p.parent.name: p.stat().st_mtime_ns for p in (copy / "runs").glob("*/run.json")}
    edited = tmp_path / "edited.toml"
    edited.write_text(TINY.replace("alpha_per_target = false", "alpha_per_target = true"))
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "run", "--data", str(world / "tab" / "train.csv"),
                        "--recipe", str(edited), "--random-init", "--device", "cpu", "--out", str(copy),
                        "--cache-dir", str(world / "cache"), "--no-lopo", "--no-ablation"], cwd=world,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    now = {p.parent.name: p.stat().st_mtime_ns for p in (copy / "runs").glob("*/run.json")}
    assert now["pls-2x"] == stamp["pls-2x"] and now["ridge-1x"] != stamp["ridge-1x"]
    from regress.runs.folder import open_result

    st = open_result(copy)
    assert st.kind == "stack" and not np.allclose(st.data().oof, open_result(model).data().oof)
