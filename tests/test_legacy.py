"""Caches and run folders written by the release before the integrity checks still load (tests/fixtures)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import run

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_v0"




@pytest.fixture()
def old(tmp_path):
    dst = tmp_path / "v0"
    shutil.copytree(FIXTURE, dst)
    return dst


@pytest.mark.parametrize("model", ["stack", "train-timm_test_vit-ridge"])
def test_old_runs_and_stacks_predict_the_same_numbers_with_a_warning(old, tmp_path, model, capsys):
    out = tmp_path / "p.csv"
    assert run(["predict", old / "runs" / model, "--data", old / "data" / "test.csv", "--cache-dir", old / "cache",
                "--out", out, "--device", "cpu"]) == 0
    assert "written before hexpress stored checksums" in capsys.readouterr().err
    got, want = pd.read_csv(out), pd.read_csv(old / f"expected_{'stack' if model == 'stack' else 'ridge'}.csv")
    assert list(got.columns) == list(want.columns) and (got["ID"] == want["ID"]).all()
    assert (got.drop(columns="ID") - want.drop(columns="ID")).abs().to_numpy().max() < 1e-6
    assert run(["report", old / "runs" / model]) == 0


def test_an_old_cache_fits_with_a_warning_and_embed_seals_it(old, tmp_path, capsys):
    table = old / "data" / "train.csv"
    assert run(["fit", "--data", table, "--backbone", "timm:test_vit", "--cache-dir", old / "cache", "--runs-dir",
                tmp_path / "r", "--folds", "3", "--device", "cpu"]) == 0
    assert "cannot be verified" in capsys.readouterr().err
    f = next((old / "cache" / "train").glob("*.h5"))  # the old release's stem-only folder
    assert run(["cache", "verify", f]) == 1
    assert "no checksums" in capsys.readouterr().out
    assert run(["embed", "--data", table, "--backbone", "timm:test_vit", "--random-init", "--cache-dir", old / "cache",
                "--workers", "0"]) == 0
    assert "reused" in capsys.readouterr().err  # copied into the table's own folder, not embedded again
    new = next((old / "cache").glob("train-*/*.h5"))
    assert new.name == f.name and run(["cache", "verify", new]) == 0


def test_a_same_settings_refit_of_an_old_run_keeps_its_identity(old, capsys):
    """The identity builder reproduces the identities the old release wrote: no "other settings" refusal."""
    import json

    folder = old / "runs" / "train-timm_test_vit-ridge"
    before = json.loads((folder / "run.json").read_text())["identity"]
    assert run(["fit", "--data", old / "data" / "train.csv", "--backbone", "timm:test_vit", "--cache-dir", old / "cache",
                "--runs-dir", old / "runs", "--folds", "3", "--device", "cpu"]) == 0
    after = json.loads((folder / "run.json").read_text())
    assert after["identity"] == before and "files" in after  # refitted in place, now with its manifest
