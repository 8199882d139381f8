"""Post-processing of a head's predictions, each step's setting chosen by nested cross-validation.

A step (:class:`Step`) maps predictions to predictions (``--cross-gene``: :mod:`regress.post.crossgene`;
``--smooth``: :mod:`regress.post.smooth`).  Its setting is chosen from out-of-fold predictions, so it must
never see the rows it will be scored on: for each outer fold, :func:`nested_cv` refits the head on
inner folds of that fold's training rows only, chooses every step on those inner out-of-fold
predictions (steps in order, each on the previous one's output), and applies the chosen settings to
the held-out rows' predictions from the head fitted on all the training rows.  The run's final
settings (used by ``predict``) are chosen the same way on the run's own out-of-fold predictions
(:func:`choose_steps`).  Cost: one extra head fit per inner fold and outer fold.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np


class Step(Protocol):
    """One post-processing step: ``choose`` its setting on (targets, predictions, folds), ``apply`` it.

    ``rows`` index the table the step was built for (where its tiles lie); ``fold`` labels rows whose
    predictions come from the same model (a CV fold)."""

    def choose(self, Y: np.ndarray, P: np.ndarray, fold: np.ndarray, rows: np.ndarray) -> Any: ...

    def apply(self, P: np.ndarray, setting: Any, rows: np.ndarray) -> np.ndarray: ...


def choose_steps(steps: Sequence[Step], Y: np.ndarray, P: np.ndarray, fold: np.ndarray,
                 rows: np.ndarray | None = None) -> tuple[list[Any], np.ndarray]:
    """(settings, processed P): each step chosen on the previous step's output."""
    rows = np.arange(len(P)) if rows is None else rows
    settings = []
    for step in steps:
        s = step.choose(Y, P, fold, rows)
        P = step.apply(P, s, rows)
        settings.append(s)
    return settings, P


def apply_steps(steps: Sequence[Step], settings: Sequence[Any], P: np.ndarray,
                rows: np.ndarray | None = None) -> np.ndarray:
    rows = np.arange(len(P)) if rows is None else rows
    for step, s in zip(steps, settings):
        P = step.apply(P, s, rows)
    return P


def nested_cv(estimator, X, Y, splits, groups, steps: Sequence[Step], inner_folds: int, seed: int,
              on_fold: Callable[[int, float], None] | None = None, inner_out: list | None = None
              ) -> tuple[np.ndarray, np.ndarray, list[list[Any]]]:
    """(raw OOF, post-processed OOF, each outer fold's step settings), every setting from inner CV only.

    ``inner_out``: a list that receives, per outer fold, (inner OOF predictions of its training rows,
    their inner fold) - what ``fit --nested`` keeps for ``stack --method cross-gene``."""
    from sklearn.base import clone

    from regress.cv import accepts_groups, cross_val_predict_groups, fold_labels, inner_groups, make_splits

    raw = np.zeros(Y.shape, dtype=np.float64)
    out = np.zeros(Y.shape, dtype=np.float64)
    per_fold = []
    for i, (tr, va) in enumerate(splits):
        t0 = time.perf_counter()
        g_tr = None if groups is None else np.asarray(groups)[tr]
        g_in = inner_groups(g_tr)  # one training group left (two slides in all): plain K-fold inside it
        n_inner = inner_folds if g_in is None else min(inner_folds, len(np.unique(g_in)))
        inner = make_splits(len(tr), n_inner, g_in, seed)
        p_in = cross_val_predict_groups(estimator, X[tr], Y[tr], inner, g_in).astype(np.float64)
        f_in = fold_labels(inner, len(tr))
        if inner_out is not None:
            inner_out.append((p_in, f_in))
        settings, _ = choose_steps(steps, Y[tr], p_in, f_in, np.asarray(tr))
        est = clone(estimator)
        est.fit(X[tr], Y[tr], **({"groups": g_tr} if g_tr is not None and accepts_groups(est) else {}))
        p = np.asarray(est.predict(X[va]), dtype=np.float64).reshape(len(va), -1)
        raw[va] = p
        out[va] = apply_steps(steps, settings, p, np.asarray(va))
        per_fold.append(settings)
        if on_fold is not None:
            on_fold(i, time.perf_counter() - t0)
    return raw, out, per_fold
