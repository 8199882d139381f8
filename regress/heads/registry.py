"""Heads by name: the built-in presets (a :class:`Registry`) and any scikit-learn regressor by import path.

``--head ridge`` picks a preset; ``--head sklearn:sklearn.linear_model.Lasso``
(or ``sklearn:cuml.linear_model.Ridge`` where cuML is installed) imports any
scikit-learn-compatible regressor and runs it through the same CV, run
folder, compare, stack and predict.  ``--head-param NAME=VALUE`` sets
constructor parameters of either kind; a parameter the head does not have, or
one that contradicts ``--device``/``--seed``, is an error, never silently
dropped or overwritten.  Plug-in heads are stored with pickle
(:mod:`regress.heads.persist`).
"""
from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from core.errors import UsageError
from core.registry import Registry

PLUGIN_PREFIX = "sklearn:"


@dataclass(frozen=True)
class HeadPreset:
    """A built-in head: a factory ``(device, seed) -> estimator``, its one-line help, and ``stored``: the
    ``module:Class`` of its estimator, which :mod:`regress.heads.persist` restores without pickle (declared here, with
    the head, so a new head can never fall back to pickle unnoticed)."""

    name: str
    factory: Callable[[str, int], Any]
    help: str
    stored: str


HEADS: Registry[HeadPreset] = Registry("head", UsageError)


def _preset(name: str, help: str, stored: str):
    def deco(factory):
        HEADS.register(name, HeadPreset(name, factory, help, stored))
        return factory
    return deco


@_preset("ridge", "ridge, standardised features, alpha per gene from 13 values by (grouped) 5-fold CV on MSE", stored="regress.heads.ridge:RidgeHead")
def _ridge(device, seed):
    from regress.heads.ridge import RidgeHead

    return RidgeHead(device=device, random_state=seed)


@_preset("ridge-pcc", "as ridge, alpha per gene chosen by out-of-fold Pearson r", stored="regress.heads.ridge:RidgeHead")
def _ridge_pcc(device, seed):
    from regress.heads.ridge import RidgeHead

    return RidgeHead(scoring="pcc", device=device, random_state=seed)


@_preset("hest", "HEST-Benchmark protocol: StandardScaler -> PCA(256) -> Ridge(alpha=100/(256*genes), no intercept)", stored="regress.heads.ridge:RidgeHead")
def _hest(device, seed):
    from regress.heads.ridge import RidgeHead

    return RidgeHead(alphas="hest", n_components=256, fit_intercept=False, device=device, random_state=seed)


@_preset("ridge-rr", "reduced-rank ridge: ridge on the genes' principal components, rank per gene from "
                     "(4..128, all) by (grouped) 5-fold CV on Pearson r", stored="regress.heads.rrr:ReducedRankRidgeHead")
def _ridge_rr(device, seed):
    from regress.heads.rrr import ReducedRankRidgeHead

    return ReducedRankRidgeHead(device=device, random_state=seed)


@_preset("knn", "k nearest tiles on 64 whitened principal components, k per gene from (5,10,20,40) by (grouped) "
                "5-fold CV (a diverse stack member)", stored="regress.heads.knn:KNNHead")
def _knn(device, seed):
    from regress.heads.knn import KNNHead

    return KNNHead(random_state=seed)


@_preset("krr", "RBF kernel ridge on standardised features, width and alpha per gene by (grouped) 5-fold CV on "
                "Pearson r (non-linear; up to 20,000 training tiles)", stored="regress.heads.krr:KernelRidgeHead")
def _krr(device, seed):
    from regress.heads.krr import KernelRidgeHead

    return KernelRidgeHead(random_state=seed)


@_preset("pls", "PLS, components per gene from (2,4,8,16,32) by (grouped) 5-fold CV", stored="regress.heads.pls:PLSHead")
def _pls(device, seed):
    from regress.heads.pls import PLSHead

    return PLSHead(random_state=seed)


@_preset("mlp", "MLP 512 hidden, SiLU, dropout 0.2, AdamW, early stopping", stored="regress.heads.mlp:MLPHead")
def _mlp(device, seed):
    from regress.heads.mlp import MLPHead

    return MLPHead(device=device, random_state=seed)


@_preset("mean", "baseline: predict the training mean of each gene", stored="sklearn.dummy:DummyRegressor")
def _mean(device, seed):
    from sklearn.dummy import DummyRegressor

    return DummyRegressor(strategy="mean")


def list_heads() -> list[str]:
    return HEADS.names()


def head_choices_help() -> str:
    return "; ".join(f"{n}: {p.help}" for n, p in HEADS.items()) + \
        f"; or {PLUGIN_PREFIX}<module.Class>: any scikit-learn regressor"


_SHELL_WORDS = {"true": True, "false": False, "none": None}


def parse_head_params(values: Sequence[str] | None) -> dict[str, Any]:
    """``["alpha=3", "fit_intercept=False", "solver=lsqr"]`` -> typed values (Python literals, else strings;
    ``true``/``false``/``none`` in any case are the booleans and None, as a shell user writes them)."""
    out: dict[str, Any] = {}
    for v in values or []:
        name, sep, raw = v.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise UsageError(f"--head-param {v!r}: write NAME=VALUE, e.g. --head-param alpha=3.")
        if name in out:
            raise UsageError(f"--head-param {name} is given twice; give it once.")
        word = raw.strip().lower()
        if word in _SHELL_WORDS:
            out[name] = _SHELL_WORDS[word]
            continue
        try:
            out[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[name] = raw
    return out


def _plugin(name: str):
    path = name[len(PLUGIN_PREFIX):]
    module, _, cls_name = path.rpartition(".")
    if not module:
        raise UsageError(f"--head {name}: write {PLUGIN_PREFIX}<module>.<Class>, e.g. sklearn:sklearn.linear_model.Lasso.")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except ImportError as exc:
        raise UsageError(f"--head {name}: cannot import {module} ({exc}); install it or fix the path.") from exc
    except AttributeError as exc:
        raise UsageError(f"--head {name}: {module} has no {cls_name}.") from exc
    if not (isinstance(cls, type) and all(hasattr(cls, a) for a in ("fit", "predict", "get_params", "set_params"))):
        raise UsageError(f"--head {name}: {path} is not a scikit-learn estimator (needs fit, predict, get_params).")
    return cls


def is_plugin(name: str) -> bool:
    return name.startswith(PLUGIN_PREFIX)


def gpu_heads() -> list[str]:
    """The built-in heads that run on CUDA (those whose estimator takes a ``device``)."""
    return [n for n, p in HEADS.items() if "device" in p.factory("cpu", 0).get_params(deep=False)]


def make_head(name: str, device: str = "cpu", seed: int = 0, params: dict[str, Any] | None = None):
    """A fresh, unfitted estimator: preset ``name`` or ``sklearn:<module.Class>``, with ``params`` set."""
    params = dict(params or {})
    if is_plugin(name):
        cls = _plugin(name)
        if str(device).startswith("cuda") and not cls.__module__.startswith("cuml"):
            raise UsageError(f"--head {name} runs where its library runs it, not on CUDA; drop --device cuda "
                             "(or use cuML's estimator).")
        est = cls()
        if "random_state" in est.get_params() and "random_state" not in params:
            est.set_params(random_state=seed)
    else:
        est = HEADS.get(name).factory(device, seed)
        if str(device).startswith("cuda") and "device" not in est.get_params(deep=False):
            raise UsageError(f"--head {name} has no GPU path, and --device {device} never runs silently on the CPU; "
                             f"use --device cpu (or auto), or a head with a GPU path: {', '.join(gpu_heads())}.")
    if params:
        valid = est.get_params(deep=False)
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise UsageError(f"--head-param {unknown[0]}: head '{name}' has no such parameter "
                             f"(it has: {', '.join(sorted(valid))}).")
        for k, flag, mine in (("device", "--device", device), ("random_state", "--seed", seed)):
            if k in params and not is_plugin(name) and params[k] != mine:
                raise UsageError(f"--head-param {k}={params[k]!r} contradicts {flag} {mine!r}; set it with {flag} only.")
        try:
            est.set_params(**params)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--head-param for head '{name}': {exc}") from exc
    validate = getattr(est, "_validate_params", None)  # scikit-learn's constraints, checked now, not after the data
    if params and callable(validate):
        try:
            validate()
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--head-param for head '{name}': {exc}") from exc
    return est
