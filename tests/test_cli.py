import json
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_help_lists_commands_and_each_has_help():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("demo", "embed", "cache", "fit", "compare", "backbones"):
        assert cmd in out.stdout
        assert run_cli(cmd, "--help").returncode == 0


def test_fit_and_compare_end_to_end(syn_cache, tmp_path):
    table, cache_dir = syn_cache
    rc = cli.main(["fit", "--data", str(table), "--backbone", "timm:test_vit", "--cache-dir", str(cache_dir),
                   "--runs-dir", str(tmp_path / "runs"), "--head", "ridge", "--folds", "4"])
    assert rc == 0
    run = tmp_path / "runs" / "train-timm_test_vit-ridge"
    info = json.loads((run / "run.json").read_text())
    assert info["random_init"] and info["folds"] == {"n": 4, "seed": 0, "grouped": True}
    assert info["backbones"][0]["fingerprint"] and info["table"]["group_col"] == "slide"
    for f in ("metrics.json", "per_gene.csv", "oof.h5", "model.json", "model.npz"):
        assert (run / f).is_file()
    assert not (run / "model.joblib").exists()  # built-in heads are stored without pickle
    rc = cli.main(["compare", "--data", str(table), "--backbone", "timm:test_vit", "--cache-dir", str(cache_dir),
                   "--runs-dir", str(tmp_path / "runs"), "--head", "ridge", "--head", "pls", "--head", "mean",
                   "--folds", "4"])
    assert rc == 0
    assert (tmp_path / "runs" / "compare-train.png").stat().st_size > 1000
    # same numbers from the API and the CLI
    from regress.runs.fit import fit_run

    res = fit_run(table, ["timm:test_vit"], "ridge", cache_dir=cache_dir, runs_dir=tmp_path / "api", folds=4,
                  log=lambda *a: None)
    assert res.metrics["pcc_gene_mean"] == pytest.approx(json.loads((run / "metrics.json").read_text())["pcc_gene_mean"])


def test_user_errors_exit_2_with_one_line(tmp_path):
    out = run_cli("fit", "--data", tmp_path / "missing.csv", "--backbone", "efficientnet_lite0")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "missing.csv" in out.stderr
    assert out.stderr.count("\n") == 1


def test_cache_commands(syn_cache):
    _, cache_dir = syn_cache
    out = run_cli("cache", "ls", "--cache-dir", cache_dir)
    assert "RANDOM-INIT" in out.stdout and "complete" in out.stdout
    f = next(Path(cache_dir).glob("train-*/*.h5"))
    assert run_cli("cache", "verify", f).returncode == 0
    assert "fingerprint" in run_cli("cache", "info", f).stdout
