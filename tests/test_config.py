"""The config objects the CLI (and a runner) build: the same refusals for every caller, before any work."""
from __future__ import annotations

import dataclasses

import pytest

from core.errors import UsageError
from featurize.engine.extract import EmbedConfig
from regress.runs.fit import FitConfig


@pytest.mark.parametrize("kw, words", [
    ({"backbones": ("a",), "cache_files": ("x.h5",)}, "contradict"),
    ({"folds": 1}, "--folds 1"),
    ({"context": -2}, "--context -2"),
    ({"smooth": 4, "stream": True}, "--smooth needs"),
    ({"center_slides": True, "stream": True}, "--center-slides needs"),
    ({"nested": True, "stream": True}, "--nested refits"),
    ({"nested": True, "cross_gene": True}, "--nested keeps"),
])
def test_fit_config_refuses_what_cannot_mean_anything(kw, words):
    with pytest.raises(UsageError, match=words):
        FitConfig("t.csv", **kw)


@pytest.mark.parametrize("kw, words", [
    ({"backbones": ()}, "at least one backbone"),
    ({"tta": 3}, "--tta must be 1 or 8"),
    ({"dtype": "int8"}, "--dtype"),
    ({"batch_size": 0}, "--batch-size"),
    ({"num_workers": -1}, "--workers -1"),
    ({"shard": (2, 2)}, "--shard 2/2"),
])
def test_embed_config_refuses_what_cannot_mean_anything(kw, words):
    with pytest.raises(UsageError, match=words):
        EmbedConfig("t.csv", **{"backbones": ("efficientnet_lite0",), **kw})


def test_configs_are_frozen_and_normalised():
    c = FitConfig("t.csv", ["a", "b"], cache_files=None)
    assert c.backbones == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.folds = 3  # type: ignore[misc]
    e = EmbedConfig("t.csv", ["x", "x", "y"])
    assert e.backbones == ("x", "y")  # each backbone once


def test_the_cli_and_the_api_refuse_alike(tmp_path, capsys):
    import cli

    assert cli.main(["fit", "--data", str(tmp_path / "t.csv"), "--backbone", "a", "--cache", "x.h5"]) == 2
    err = capsys.readouterr().err
    with pytest.raises(UsageError) as exc:
        FitConfig(tmp_path / "t.csv", ("a",), cache_files=("x.h5",))
    assert str(exc.value) in err
