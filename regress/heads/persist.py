"""Fitted heads on disk without pickle: arrays in ``.npz``, everything else in JSON.

Run and stack folders travel between people and machines, and unpickling a
file runs whatever code it holds.  So the built-in estimators (:func:`safe_classes`: each head declares its class in
:mod:`regress.heads.registry`; :data:`NOT_HEADS` the others) are
stored as ``<stem>.json`` (class, constructor parameters, scalar fitted
attributes) plus ``<stem>.npz`` (array attributes; loaded with
``allow_pickle=False``), and rebuilt from an allow-list of classes.  Only
plug-in heads (``--head sklearn:<module.Class>``), whose state hexpress cannot
know, are pickled (``<stem>.joblib``), and loading one needs an explicit
``trust_pickle=True`` (``--trust-pickle``).
"""
from __future__ import annotations

import importlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import RunError

#: The estimators stored without pickle that are not heads (the heads declare theirs in :mod:`regress.heads.registry`).
NOT_HEADS = {"CrossGeneMap": "regress.post.crossgene", "Stack": "regress.runs.stack"}


def safe_classes() -> dict[str, str]:
    """Class name -> module of every estimator restored without pickle: each head's declared ``stored`` class
    (:data:`regress.heads.registry.HEADS`) and :data:`NOT_HEADS`."""
    from regress.heads.registry import HEADS

    out = dict(NOT_HEADS)
    for _, preset in HEADS.items():
        module, cls = preset.stored.split(":")
        out[cls] = module
    return out
_SCALARS = (bool, int, float, str, type(None))


def _json_value(v: Any):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, _SCALARS):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, _SCALARS + (np.generic,)) for x in v):
        return {"__tuple__" if isinstance(v, tuple) else "__list__": [_json_value(x) for x in v]}
    raise TypeError(type(v).__name__)


def _from_json(v: Any):
    if isinstance(v, dict) and len(v) == 1:
        (k, items), = v.items()
        if k == "__tuple__":
            return tuple(items)
        if k == "__list__":
            return list(items)
    return v


def is_safe(est) -> bool:
    """True when ``est`` is one of the built-in classes stored without pickle."""
    name, safe = type(est).__name__, safe_classes()
    return name in safe and type(est).__module__ == safe[name]


def save_model(est, folder: str | os.PathLike, stem: str = "model") -> list[str]:
    """Write a fitted estimator into ``folder``; returns the file names written."""
    folder = Path(folder)
    if not is_safe(est):
        if type(est).__module__.startswith("regress."):  # a built-in estimator must never fall back to pickle
            raise RunError(f"{type(est).__module__}.{type(est).__name__} is a hexpress estimator without a declared "
                           "way to store it; declare it (regress.heads.registry `stored=`, or persist.NOT_HEADS).")
        import joblib

        joblib.dump(est, folder / f"{stem}.joblib")
        return [f"{stem}.joblib"]
    params = est.get_params(deep=False)
    scalars: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for k, v in vars(est).items():
        if k in params:
            continue
        if isinstance(v, np.ndarray):
            if v.dtype == object:
                raise RunError(f"{type(est).__name__}.{k}: an object array cannot be stored safely.")
            arrays[f"a:{k}"] = v
        elif isinstance(v, dict) and v and all(hasattr(t, "detach") for t in v.values()):  # torch state dict
            for name, t in v.items():
                arrays[f"t:{k}:{name}"] = t.detach().cpu().numpy()
            scalars[k] = {"__torch_state__": list(v)}
        else:
            try:
                scalars[k] = _json_value(v)
            except TypeError as exc:
                raise RunError(f"{type(est).__name__}.{k} ({exc}) cannot be stored safely.") from exc
    doc = {"class": type(est).__name__, "params": {k: _json_value(v) for k, v in params.items()}, "state": scalars,
           "arrays": sorted(arrays)}
    np.savez(folder / f"{stem}.npz", **arrays)
    (folder / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    return [f"{stem}.json", f"{stem}.npz"]


def _check_attr(doc_path: Path, cls, name: str) -> None:
    """A restored attribute is a fitted one (scikit-learn's trailing ``_``, or private), never a method or property."""
    if not isinstance(name, str) or not name or not (name.endswith("_") or name.startswith("_")) or \
            name.startswith("__") or callable(getattr(cls, name, None)) or isinstance(getattr(cls, name, None), property):
        raise RunError(f"{doc_path}: state '{name}' is not a fitted attribute of {cls.__name__} (it would shadow a "
                       "method or setting: damaged or crafted file); refit.")


def _checked_doc(doc_path: Path, doc) -> tuple[type, dict[str, Any]]:
    """The class and the validated description of a stored estimator (one schema for every reader)."""
    if not isinstance(doc, dict):
        raise RunError(f"{doc_path}: is not a model description (a JSON object); refit.")
    for key, typ in (("class", str), ("params", dict), ("state", dict), ("arrays", list)):
        if not isinstance(doc.get(key), typ):
            raise RunError(f"{doc_path}: '{key}' is missing or not a {typ.__name__} (damaged or edited); refit.")
    cls_name, safe = doc["class"], safe_classes()
    if cls_name not in safe:
        raise RunError(f"{doc_path}: class {cls_name!r} is not one hexpress restores; refit with this version.")
    cls = getattr(importlib.import_module(safe[cls_name]), cls_name)
    known = set(cls().get_params(deep=False))
    unknown = [k for k in doc["params"] if k not in known]
    if unknown:
        raise RunError(f"{doc_path}: parameter '{unknown[0]}' is not one of {cls_name}'s ({', '.join(sorted(known))}); "
                       "refit.")
    for k in doc["state"]:
        _check_attr(doc_path, cls, k)
    return cls, doc


def load_model(folder: str | os.PathLike, stem: str = "model", trust_pickle: bool = False):
    """Rebuild the estimator saved by :func:`save_model` (pickles only with ``trust_pickle``)."""
    folder = Path(folder)
    doc_path, pkl = folder / f"{stem}.json", folder / f"{stem}.joblib"
    if doc_path.is_file():
        try:
            doc = json.loads(doc_path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise RunError(f"{doc_path}: unreadable model description ({exc}); refit.") from exc
        cls, doc = _checked_doc(doc_path, doc)
        try:
            est = cls(**{k: _from_json(v) for k, v in doc["params"].items()})
        except (TypeError, ValueError) as exc:
            raise RunError(f"{doc_path}: its parameters do not fit {cls.__name__} ({exc}); refit.") from exc
        npz = folder / f"{stem}.npz"
        try:
            with np.load(npz, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise RunError(f"{npz}: unreadable model arrays ({exc}); refit.") from exc
        if sorted(arrays) != sorted(doc["arrays"]):
            raise RunError(f"{npz}: holds other arrays than {doc_path.name} lists (damaged or mixed files); refit.")
        for k, v in doc["state"].items():
            if isinstance(v, dict) and "__torch_state__" in v:
                import torch

                names = v["__torch_state__"]
                missing = [n for n in names if f"t:{k}:{n}" not in arrays] if isinstance(names, list) else [k]
                if missing:
                    raise RunError(f"{npz}: lacks the weights '{missing[0]}' that {doc_path.name} lists; refit.")
                setattr(est, k, {name: torch.from_numpy(arrays[f"t:{k}:{name}"]) for name in names})
            else:
                setattr(est, k, _from_json(v))
        for key, arr in arrays.items():
            if key.startswith("a:"):
                _check_attr(doc_path, cls, key[2:])
                setattr(est, key[2:], arr)
        return est
    if pkl.is_file():
        if not trust_pickle:
            raise RunError(f"{pkl}: a plug-in head stored with pickle, and opening it runs whatever code the file holds; "
                           "pass --trust-pickle only if you trust whoever wrote this folder.")
        import joblib

        return joblib.load(pkl)
    raise RunError(f"{folder}: no fitted model ({stem}.json or {stem}.joblib); refit.")
