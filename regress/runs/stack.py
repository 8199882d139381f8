"""Blend several (backbone, head) runs per gene from their out-of-fold predictions only.

Default: per-gene non-negative weights summing to one, the least-squares fit
of the measured values on the runs' OOF predictions.  ``select``: the same
weights over members chosen by forward selection on the cross-fitted score,
then shrunk toward one global blend by the factor (from ``SHRINK_GRID``) with
the best cross-fitted score; ``shrink``: every run kept, only the shrinkage chosen (steadier than
``select`` when many runs are alike); every choice is made on the training folds only.  With R runs and
:math:`G_j = P_j^\\top P_j`, :math:`c_j = P_j^\\top y_j` (R x R and R per gene),
minimising :math:`\\|P_j w - y_j\\|^2` is ``nnls`` on the Cholesky factor
:math:`L_j^\\top w \\approx L_j^{-1} c_j`, with one heavily weighted row forcing
:math:`\\sum w = 1`.  Option ``ridge``: per-gene ridge on the R predictions
with an intercept.

``cross-gene``: every run kept at equal weight, and each gene's blend mixed with one ridge map from all
runs' predictions of all genes (:mod:`regress.post.crossgene`, ridge strength and mix chosen by cross-fitting
over the folds, learned on the within-fold variation).  Its score is nested: each held-out fold's map is
learned on the runs' inner out-of-fold predictions of the other folds (``fit --nested``), which never
saw the held-out fold; the other methods are scored on the runs' outer out-of-fold predictions, whose
models did see it (BENCHMARKS.md measures the difference at about 0.001).

``center_folds``: the weights are learned on each CV fold's deviations from
its own mean (predictions and targets centred within the fold), i.e. on the
variation that the by-fold Pearson r scores; with folds grouped by slide, a
run's slide offsets no longer cost it weight.  Prediction applies the same
weights to the raw predictions (they sum to one per gene, so the scale stays).

The stack's own score is cross-fitted: its weights for a fold are learned on
the other folds' rows only.

The stack folder follows the run folder contract (:mod:`regress.runs.folder`):
``stack.json`` (runs, method, per-run summary, genes), ``metrics.json``,
``oof.h5`` (cross-fitted predictions and the targets), ``model.json`` /
``model.npz`` (the :class:`Stack` refit on all rows).  Stacking reads only
the runs' folders, never the training table.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.optimize import nnls
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from core import __version__
from core.errors import RunError, UsageError
from core.log import say
from regress.metrics import evaluate, evaluate_by_fold
from regress.runs.folder import (
    RUN_FORMAT,
    Run,
    RunData,
    identity_of,
    load_run,
    open_result,
    stack_identity_fields,
    write_run,
)
from regress.runs.stack_methods import METHODS


class Stack(BaseEstimator):
    """Per-gene blend of R prediction matrices (each n x g)."""

    def __init__(self, method: str = "nnls", alpha: float = 1.0, center_folds: bool = False):
        self.method = method
        self.alpha = alpha
        self.center_folds = center_folds

    def fit(self, preds: Sequence[np.ndarray], Y: np.ndarray, fold: np.ndarray | None = None) -> "Stack":
        """``fold``: the rows' CV fold, needed by ``select`` and ``shrink`` (their choices are cross-fitted over those folds)
        and by ``center_folds``."""
        P = np.stack([np.asarray(p, dtype=np.float64) for p in preds])  # R x n x g
        Y = np.asarray(Y, dtype=np.float64)
        R, n, g = P.shape
        P_raw, Y_raw = P, Y
        fold = None if fold is None else np.asarray(fold)
        if self.center_folds:
            if fold is None:
                raise UsageError("stack option center_folds needs the runs' CV folds.")
            P, Y = _centered_within(P, fold), _centered_within(Y[None], fold)[0]
        if self.method == "nnls":
            self.weights_ = _nnls_weights(P, Y)
            self.intercept_ = np.zeros(g)
        elif self.method in ("select", "shrink"):
            if fold is None or len(np.unique(fold)) < 2:
                raise UsageError(f"stack method '{self.method}' needs the runs' CV folds (at least 2).")
            if self.method == "select":
                members, shrink = _forward_select(P, Y, fold)
            else:
                members, shrink = list(range(R)), _best_shrink(P, Y, fold)
            W = np.zeros((R, g))
            W[members] = _shrunk_weights(P[members], Y, shrink)
            self.weights_, self.intercept_ = W, np.zeros(g)
            self.members_, self.shrink_ = np.asarray(members), float(shrink)
        elif self.method == "cross-gene":
            from regress.post.crossgene import choose, ridge_maps

            if fold is None or len(np.unique(fold)) < 2:
                raise UsageError("stack method 'cross-gene' needs the runs' CV folds (at least 2).")
            F, base = np.concatenate(list(P_raw), axis=1), P_raw.mean(0)
            self.alpha_, self.blend_, _ = choose(F, Y_raw, fold, base)
            self.coef_ = ridge_maps(F, Y_raw, fold, [self.alpha_], base)[0]
            self.weights_, self.intercept_ = np.full((R, g), 1.0 / R), np.zeros(g)
        elif self.method == "ridge":
            pm, ym = P.mean(1), Y.mean(0)
            Pc = P - pm[:, None, :]
            G = np.einsum("rnj,snj->jrs", Pc, Pc) + self.alpha * np.eye(R)[None]
            c = np.einsum("rnj,nj->jr", Pc, Y - ym)
            W = np.linalg.solve(G, c[..., None])[..., 0].T  # R x g
            self.weights_ = W
            self.intercept_ = Y_raw.mean(0) - (W * P_raw.mean(1)).sum(0)  # for raw predictions
        else:
            raise UsageError(f"stack method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        self.n_runs_ = R
        return self

    def predict(self, preds: Sequence[np.ndarray], slides: np.ndarray | None = None) -> np.ndarray:
        """The blend; ``slides`` (the rows' slides) for ``cross-gene``, whose map acts within each slide
        (all rows one slide when None)."""
        check_is_fitted(self, "weights_")
        P = np.stack([np.asarray(p, dtype=np.float64) for p in preds])
        if P.shape[0] != self.n_runs_:
            raise UsageError(f"stack was fitted on {self.n_runs_} runs, got {P.shape[0]} predictions.")
        out = np.einsum("rnj,rj->nj", P, self.weights_) + self.intercept_
        if self.method == "cross-gene":
            from regress.post.crossgene import mix

            out = mix(out, np.concatenate(list(P), axis=1), self.coef_, self.blend_, slides)
        return out


def _centered_within(A: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """``A`` (R x n x g) with each fold's own mean (per run and gene) removed from its rows."""
    out = A.copy()
    for f in np.unique(fold):
        rows = fold == f
        out[:, rows] -= A[:, rows].mean(axis=1, keepdims=True)
    return out



#: Shrinkage of per-gene weights toward the global blend that ``select`` and ``shrink`` choose from (1 = per-gene
#: weights only).
SHRINK_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def _nnls_weights(P: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """(R, g): per gene, non-negative weights summing to one minimising ``|P_j w - y_j|^2``."""
    R, _, g = P.shape
    G = np.einsum("rnj,snj->jrs", P, P)
    c = np.einsum("rnj,nj->jr", P, Y)
    W = np.zeros((R, g))
    for j in range(g):
        Gj = G[j] + 1e-9 * (np.trace(G[j]) / R + 1e-12) * np.eye(R)
        L = np.linalg.cholesky(Gj)
        big = np.sqrt(1e3 * np.trace(Gj) / R + 1e-12)
        A = np.vstack([L.T, np.full((1, R), big)])
        b = np.concatenate([np.linalg.solve(L, c[j]), [big]])
        w, _ = nnls(A, b)
        W[:, j] = w / w.sum() if w.sum() > 0 else np.full(R, 1.0 / R)
    return W


def _global_weights(P: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """(R,): one non-negative blend summing to one for all genes (each gene scaled to unit variance)."""
    scale = Y.std(0)
    scale[scale == 0] = 1.0
    R, n, g = P.shape
    return _nnls_weights((P / scale).reshape(R, n * g, 1), (Y / scale).reshape(n * g, 1))[:, 0]


def _shrunk_weights(P: np.ndarray, Y: np.ndarray, shrink: float) -> np.ndarray:
    """Per-gene weights pulled toward the global blend: ``shrink * W_gene + (1 - shrink) * w_global``."""
    out = np.zeros((P.shape[0], Y.shape[1]))
    if shrink > 0:
        out += shrink * _nnls_weights(P, Y)
    if shrink < 1:
        out += (1.0 - shrink) * _global_weights(P, Y)[:, None]
    return out


def _cross_fitted_score(P: np.ndarray, Y: np.ndarray, fold: np.ndarray, shrink: float) -> float:
    """Mean per-gene Pearson r by fold of the blend, each fold's weights learned on the other folds."""
    blend = np.empty(Y.shape)
    for f in np.unique(fold):
        tr, va = fold != f, fold == f
        blend[va] = np.einsum("rnj,rj->nj", P[:, va], _shrunk_weights(P[:, tr], Y[tr], shrink))
    return evaluate_by_fold(Y, blend, fold)["pcc_gene_mean_by_fold"]


def _forward_select(P: np.ndarray, Y: np.ndarray, fold: np.ndarray, tol: float = 1e-4) -> tuple[list[int], float]:
    """Members by forward selection on the cross-fitted score (per-gene weights), then the shrinkage, both over ``fold``."""
    R = P.shape[0]
    members: list[int] = []
    best = -np.inf
    while len(members) < R:
        trials = [(_cross_fitted_score(P[members + [r]], Y, fold, 1.0), -r) for r in range(R) if r not in members]
        score, r = max(trials)  # ties go to the earlier run
        r = -r
        if score <= best + tol:
            break
        members, best = members + [r], score
    return sorted(members), _best_shrink(P[members], Y, fold)


def _best_shrink(P: np.ndarray, Y: np.ndarray, fold: np.ndarray) -> float:
    """The factor of ``SHRINK_GRID`` with the best cross-fitted score over ``fold`` (the first wins ties)."""
    scores = [_cross_fitted_score(P, Y, fold, s) for s in SHRINK_GRID]
    return SHRINK_GRID[int(np.argmax(scores))]


@dataclass
class StackResult:
    path: Path
    metrics: dict
    oof: np.ndarray
    summary: list[dict]
    reused: bool = False


def check_runs(runs: list[Run]) -> tuple[RunData, list[np.ndarray]]:
    """The runs' shared data and their OOF predictions; refuses runs that disagree (naming the first that does)."""
    d0 = runs[0].data()
    oofs = [d0.oof]
    for r in runs[1:]:
        d = r.data()
        if r.genes != runs[0].genes:
            raise RunError(f"{r.path}: genes differ from {runs[0].path}; stack runs of one gene set.")
        if not np.array_equal(d.ids, d0.ids):
            raise RunError(f"{r.path}: its rows (IDs) differ from {runs[0].path}; stack runs fitted on the same "
                           "table with the same caches.")
        if not np.array_equal(d.fold, d0.fold):
            raise RunError(f"{r.path}: its CV folds differ from {runs[0].path}; refit with the same --folds, "
                           "--groups and --seed so the stack can be cross-fitted.")
        if not np.array_equal(d.y, d0.y):
            raise RunError(f"{r.path}: fitted to other target values than {runs[0].path}; stack runs of one table.")
        oofs.append(d.oof)
    return d0, oofs


def _inner_predictions(runs: list[Run]) -> tuple[list[np.ndarray], np.ndarray]:
    """Each run's ``inner_oof`` and the shared ``inner_fold`` (``fit --nested``); refuses runs without them."""
    inner_oof, inner_fold = [], None
    for r in runs:
        got = r.inner_predictions()
        if got is None:
            raise RunError(f"{r.path}: has no inner out-of-fold predictions; refit it with `fit --nested` "
                           "(without --cross-gene and --smooth) for stack --method cross-gene.")
        if inner_fold is not None and not np.array_equal(got[1], inner_fold):
            raise RunError(f"{r.path}: its inner CV folds differ from {runs[0].path}; refit both with the same "
                           "--folds, --groups and --seed.")
        inner_oof.append(got[0])
        inner_fold = got[1]
    return inner_oof, inner_fold


def stack_runs(run_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None,
               method: str = "nnls", alpha: float | None = None, log=say, overwrite: bool = False,
               center_folds: bool = False, reuse: bool = False) -> StackResult:
    """Cross-fit a stack over finished runs, compare with the best run and the plain average, save it.

    ``center_folds``: blend weights learned on the within-fold variation (see the module docstring);
    ``alpha``: the penalty of ``method="ridge"`` (default 1.0; refused with other methods);
    ``reuse``: a finished stack at ``out_dir`` with the same identity (same member runs, same settings) is
    returned as it is."""
    if len(run_paths) < 2:
        raise UsageError("stack needs at least two runs (`stack RUN RUN ...`, or --all TABLE).")
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose {', '.join(METHODS)}.")
    if alpha is not None and method != "ridge":
        raise UsageError(f"--alpha is the ridge stacker's penalty; it does nothing with --method {method}.")
    alpha = 1.0 if alpha is None else float(alpha)
    if not (np.isfinite(alpha) and alpha > 0):
        raise UsageError(f"--alpha {alpha}: the ridge stacker's penalty must be a positive finite number.")
    runs = [load_run(p) for p in run_paths]
    if reuse and out_dir is not None and (Path(out_dir) / "stack.json").is_file():
        done = _same_stack(Path(out_dir), stack_identity_fields(runs, method, alpha, center_folds))
        if done is not None:
            return done
    d, oofs = check_runs(runs)
    genes, fold, Y = runs[0].genes, d.fold, d.y.astype(np.float64)
    stacked = np.zeros_like(oofs[0], dtype=np.float64)
    inner = _inner_predictions(runs) if method == "cross-gene" else None
    slides = None if d.slides is None else np.asarray(d.slides)
    for f in np.unique(fold):
        tr, va = fold != f, fold == f
        if inner is None:
            st = Stack(method, alpha, center_folds).fit([o[tr] for o in oofs], Y[tr], fold=fold[tr])
        else:  # nested: learned on predictions of models that never saw fold f
            inner_oof, inner_fold = inner
            st = Stack(method, alpha, center_folds).fit([p[f][tr] for p in inner_oof], Y[tr], fold=inner_fold[f][tr])
        stacked[va] = st.predict([o[va] for o in oofs], None if slides is None else slides[va])
    final = Stack(method, alpha, center_folds).fit(oofs, Y, fold=fold)

    def score(P):
        m = evaluate(Y, P, genes)
        m.update(evaluate_by_fold(Y, P, fold))
        return m

    metrics = score(stacked)
    summary = []
    for r, o in zip(runs, oofs):
        m = score(o)
        summary.append({"run": str(r.path), "pcc_gene_by_fold": m["pcc_gene_mean_by_fold"], "pcc_gene_pooled": m["pcc_gene_mean"]})
    avg = score(np.mean(oofs, 0))
    summary.append({"run": "plain average", "pcc_gene_by_fold": avg["pcc_gene_mean_by_fold"], "pcc_gene_pooled": avg["pcc_gene_mean"]})
    summary.append({"run": f"stack ({method}, {'nested' if method == 'cross-gene' else 'cross-fitted'})", "pcc_gene_by_fold": metrics["pcc_gene_mean_by_fold"],
                    "pcc_gene_pooled": metrics["pcc_gene_mean"]})
    table_name = Path(runs[0].info["table"]["path"]).stem
    out = Path(out_dir) if out_dir else Path(runs[0].path).parent / f"stack-{table_name}"
    fields = stack_identity_fields(runs, method, alpha, center_folds)
    info = {"format": RUN_FORMAT, "tool_version": __version__, "identity": identity_of(fields), "identity_fields": fields,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": [str(Path(r.path).resolve()) for r in runs],
            "members": [{"run": str(Path(r.path).resolve()), "identity": r.info.get("identity"), "content": r.content}
                        for r in runs],
            "method": method, "alpha": alpha, "center_folds": bool(center_folds), "table": runs[0].info["table"],
            "genes": genes, "summary": summary,
            "random_init": any(r.info.get("random_init") for r in runs),
            "backbones": [b for r in runs for b in r.info["backbones"]],
            "mean_weights": final.weights_.mean(1).tolist(),
            **({"selected": [str(runs[i].path) for i in final.members_], "shrink": final.shrink_}
               if method in ("select", "shrink") else {}),
            **({"cross_gene": {"alpha": final.alpha_, "blend": final.blend_}} if method == "cross-gene" else {})}
    data = RunData(d.ids, genes, stacked.astype(np.float32), fold, d.y, d.groups, d.xy, d.slides)
    path = write_run(out, info, metrics, data, final, kind="stack", overwrite=overwrite)
    for row in summary:
        log(f"{row['run']}: PCC/gene by fold {row['pcc_gene_by_fold']:.4f}, pooled {row['pcc_gene_pooled']:.4f}")
    return StackResult(path, metrics, stacked, summary)


def _same_stack(out: Path, fields: dict) -> StackResult | None:
    from core.errors import HexpressError

    try:
        old = open_result(out, kind="stack")
        if old.info.get("identity") != identity_of(fields) or any(why for _, _, why in stack_members(old)):
            return None
        return StackResult(old.path, old.metrics, old.data().oof, old.info.get("summary", []), reused=True)
    except HexpressError:
        return None


def runs_of_tables(runs_dir: str | os.PathLike, tables: Sequence[str | os.PathLike], log=say) -> list[str]:
    """Every sound finished run under ``runs_dir`` fitted on each of ``tables`` (``stack --all``); a damaged run
    is skipped and named, a table without runs is an error."""
    from regress.runs.folder import runs_for_table_checked

    found: list[str] = []
    for table in tables:
        good, skipped = runs_for_table_checked(runs_dir, table)
        for why in skipped:
            log(f"[stack] skipped a damaged run: {why}")
        if not good:
            raise UsageError(f"--all {table}: no finished run under {runs_dir} was fitted on that table.")
        found += [str(p) for p in good]
    return found


def member_path(stack_path: Path, recorded: str | os.PathLike) -> Path:
    """Where a stack's member run is now: as recorded, or beside the stack (a stack copied with its runs)."""
    p = Path(recorded)
    moved = Path(stack_path).parent / p.name
    return p if p.is_dir() or not moved.is_dir() else moved


def stack_members(res: Run) -> list[tuple[Path, Run | None, str | None]]:
    """Each member of a stack: (where it is, the run or None, why it cannot serve the stack or None).

    A member serves only while it is the run the stack was made from: same identity and, when the stack
    recorded it, the same files (a refit with ``--overwrite`` changes them, and the stack's weights were
    learned on the old predictions)."""
    recorded = {m.get("run"): m for m in res.info.get("members") or [] if isinstance(m, dict)}
    ids = (res.info.get("identity_fields") or {}).get("runs") or []
    out = []
    for i, p in enumerate(res.info["runs"]):
        where = member_path(res.path, p)
        try:
            run = load_run(where)
        except RunError as exc:
            out.append((where, None, str(exc)))
            continue
        want = recorded.get(p, {})
        want_id = want.get("identity", ids[i] if i < len(ids) else None)
        if want_id is not None and run.info.get("identity") != want_id:
            out.append((where, run, f"{where}: member run was refitted with other settings since stack {res.path} was "
                                    "made; rerun `python cli.py stack` over the current runs."))
        elif want.get("content") is not None and run.content != want["content"]:
            out.append((where, run, f"{where}: member run was refitted since stack {res.path} was made (its files "
                                    "differ); rerun `python cli.py stack` over the current runs."))
        else:
            out.append((where, run, None))
    return out


def load_stack(path: str | os.PathLike) -> tuple[dict, Stack, list[Run]]:
    """(stack.json, fitted Stack, its runs) of a stack folder; refuses a member that is gone or refitted since."""
    res = open_result(path, kind="stack")
    runs = []
    for _, run, problem in stack_members(res):
        if problem is not None:
            raise RunError(problem)
        runs.append(run)
    return res.info, res.model(), runs
