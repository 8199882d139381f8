"""``cli.py run``: one command from a tile table to a model folder, planned, budgeted and resumable.

A :class:`~regress.runs.recipe.Recipe` expands into a plan of steps: cut each extra tile size from the table's
source images (:mod:`featurize.tables.rescale`), embed each table with each backbone once, fit each member
(``--nested`` when the stack learns from inner predictions), stack them, and then, as evaluation only, the
stack without each lever and, when the table holds two or more patients, the whole recipe again with
leave-one-patient-out folds.  The plan is printed first with an estimate per step from the rates measured on
this machine (:mod:`regress.runs.rates`).

Every step is idempotent by identity: a cut table is reused when its sidecar records the same source; a cache
when it serves every row; a run or stack when its folder holds the same identity (the keys ``fit`` and
``stack`` use).  So a rerun after a kill, or with a larger recipe, does only what is missing.  ``budget_s``
keeps the members from the top of the recipe (its order is their value) while the estimate fits, drops the
rest (said by name), and stops adding members once the time is spent: it overruns by at most one step.

The model folder (``out``) holds ``hexpress-model.json`` (:mod:`regress.runs.model`), the member runs (``runs/``), the
stack (``stack/``), the evaluation (``ablation/``, ``lopo/``) and ``report.md``.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.errors import UsageError
from core.log import say

#: Inner folds of a nested fit (regress.post.steps.nested_cv), for the cost model.
INNER_FOLDS = 5


def parse_budget(text: str | float | None) -> float | None:
    """``"30m"``, ``"1h30m"``, ``"90s"``, ``"2h"`` or seconds -> seconds (None: no budget)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        v = float(text)
    else:
        s = str(text).strip().lower()
        m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or not m or not any(m.groups()):
            raise UsageError(f"--budget {text}: write a duration such as 30m, 1h30m, 90s or 2h.")
        h, mi, se = (float(g) if g else 0.0 for g in m.groups())
        v = h * 3600 + mi * 60 + se
    if not (math.isfinite(v) and v > 0):
        raise UsageError(f"--budget {text}: must be a positive duration.")
    return v


def fmt_s(s: float) -> str:
    s = max(0.0, float(s))
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.1f}h"


@dataclass(frozen=True)
class RunConfig:
    """Everything ``run`` needs; refused when made if it cannot mean anything."""

    data: str | os.PathLike
    recipe: str | os.PathLike = "default"
    budget_s: float | None = None
    device: str = "auto"
    out: str | os.PathLike | None = None
    cache_dir: str | os.PathLike = "cache"
    seed: int = 0
    plan_only: bool = False
    lopo: bool | None = None  # None: when the table holds two or more patients
    ablation: bool = True
    progress: bool = True
    weights: dict[str, str] | None = None
    random_init: bool = False

    def __post_init__(self) -> None:
        if self.budget_s is not None and not (math.isfinite(self.budget_s) and self.budget_s > 0):
            raise UsageError(f"--budget {self.budget_s}: must be a positive duration.")
        if not Path(self.data).is_file():
            raise UsageError(f"--data {self.data}: no such tile table.")


@dataclass
class Step:
    """One unit of work in the plan."""

    kind: str  # cut, embed, fit, stack, ablate, lopo-fit, lopo-stack
    label: str
    estimate_s: float
    measured: bool
    reuse: bool
    unit: str  # the budget unit it belongs to (a member's name, "stack", "ablation", "lopo")
    run: Callable[[], Any] | None = field(default=None, repr=False)
    rate: tuple[str, str, float] | None = None  # (kind, sub, units) of rates.json it was estimated from
    seconds: float | None = None
    status: str = "planned"  # planned, done, reused, dropped


@dataclass
class Plan:
    steps: list[Step]
    dropped: list[str]
    notes: list[str]
    budget_s: float | None

    @property
    def todo(self) -> list[Step]:
        return [s for s in self.steps if s.status == "planned"]

    def estimate(self) -> float:
        return sum(0.0 if s.reuse else s.estimate_s for s in self.steps)

    def lines(self) -> list[str]:
        out = []
        for i, s in enumerate(self.steps, 1):
            what = "reuse" if s.reuse else f"~{fmt_s(s.estimate_s)}{'' if s.measured else ' (prior)'}"
            out.append(f"  {i:2d}. {s.kind:10s} {s.label}  [{what}]")
        return out


class Runner:
    """Builds the plan of a recipe on a table and carries it out (see the module docstring)."""

    def __init__(self, config: RunConfig, log=say):
        from featurize.tables.table import read_table
        from regress.runs.rates import Rates
        from regress.runs.recipe import BUILTIN, load_recipe
        from featurize.tables.rescale import can_rescale
        from core.device import resolve_device

        self.c = config
        self.log = log
        self.recipe = load_recipe(config.recipe)
        self.table_path = Path(config.data)
        self.table = read_table(self.table_path, check_files=False)
        self.dev = str(resolve_device(config.device))
        self.notes: list[str] = []
        extra = [s for s in self.recipe.scales if s != 1.0]
        if extra:
            why = can_rescale(self.table_path)
            if why:
                if str(config.recipe) not in BUILTIN:
                    raise UsageError(f"recipe {config.recipe}: members at {', '.join(f'{s:g}x' for s in extra)} "
                                     f"tiles need the source images, but {why}; remove those members (scale = 1).")
                kept = {m.name for m in self.recipe.members if m.scale == 1.0}
                self.notes.append(f"{why}: the recipe runs without its extra tile sizes "
                                  f"({', '.join(f'{s:g}x' for s in extra)}).")
                self.recipe = self.recipe.keep(kept)
        self.out = Path(config.out) if config.out else Path("runs") / f"{self.table_path.stem}-{self.recipe.name}"
        self.rates = Rates(config.cache_dir, self.dev)
        # the folds: the recipe's column, else held-out sections (slides) when there are several, else the
        # table's own grouping; held-out patients are scored as well (lopo) when there are two or more
        slides = self.table.slides
        groups_col = self.recipe.groups or ("slide" if slides is not None and len(set(slides)) > 1
                                            else self.table.group_col)
        self.group_col = groups_col
        self.table = read_table(self.table_path, group_col=groups_col, check_files=False) if groups_col else self.table
        n_groups = len(set(self.table.groups)) if self.table.groups is not None else 0
        if self.recipe.folds == "groups":
            if n_groups < 2:
                raise UsageError(f"{self.table_path}: leave-one-group-out needs a grouping column with at least two "
                                 "values (patient, slide, ...); set [cv] folds = 5 in a recipe for plain K-fold.")
            self.folds = n_groups
        else:
            self.folds = int(self.recipe.folds)
        self.patients = self._patients()

    # ------------------------------------------------------------------ pieces
    def _patients(self) -> int:
        import pandas as pd

        try:
            col = pd.read_csv(self.table_path, usecols=["patient"], dtype=str)["patient"]
        except (ValueError, OSError):
            return 0
        return int(col.nunique())

    def table_for(self, scale: float) -> Path:
        from featurize.tables.rescale import scaled_name

        return self.table_path if scale == 1.0 else scaled_name(self.table_path, scale)

    def run_dir(self, member, lopo: bool = False) -> Path:
        return self.out / ("lopo/runs" if lopo else "runs") / member.name

    def _dim(self, member) -> int:
        from featurize.models.backbones import get_spec

        d = sum(get_spec(b).embed_dim for b in member.backbones)
        return d * (1 + int(member.center_slides) + int(member.context > 0))

    def _fit_units(self, member, folds: int) -> float:
        n, g, d = len(self.table), len(self.table.genes), self._dim(member)
        fits = folds * ((min(folds - 1, INNER_FOLDS) + 1) if self.recipe.nested else 1) + 1
        return fits * n * d * (min(n, d) + g) / 1e12

    def _stack_units(self, k: int, folds: int) -> float:
        n, g = len(self.table), len(self.table.genes)
        return k * folds * n * g * (k * g if self.recipe.stack_method == "cross-gene" else 1) / 1e12

    # ------------------------------------------------------------------ plan
    def plan(self) -> Plan:
        """The steps of the recipe, and, with a budget, only the units whose estimate fits (in value order)."""
        steps = self._steps()
        dropped: list[str] = []
        if self.c.budget_s is not None:
            keep, dropped = self._choose(steps)
            members = [m.name for m in self.recipe.members]
            if any(u in members for u in dropped):  # fewer members: the stacks and the shared embeds re-planned
                self.recipe = self.recipe.keep({u for u in members if u in keep})
                steps = self._steps()
                keep, more = self._choose(steps)
                dropped += [u for u in more if u not in dropped]
            steps = [s for s in steps if s.unit in keep]
        return Plan(steps, dropped, list(self.notes), self.c.budget_s)

    def _choose(self, steps: list[Step]) -> tuple[set[str], list[str]]:
        """Whole units in value order while their estimate fits the budget; the first member and the stack are
        always kept (a model needs them)."""
        order = [m.name for m in self.recipe.members]
        units = order[:1] + ["stack"] + order[1:] + ["ablation", "lopo"]
        used, keep, dropped = 0.0, set(), []
        for u in units:
            mine = [s for s in steps if s.unit == u]
            if not mine:
                continue
            cost = sum(0.0 if s.reuse else s.estimate_s for s in mine)
            if u in (order[0], "stack") or used + cost <= self.c.budget_s:
                keep.add(u)
                used += cost
            else:
                dropped.append(u)
        return keep, dropped

    def _steps(self) -> list[Step]:
        from featurize.cache import plan_if_complete
        from featurize.engine.extract import final_cache_paths
        from featurize.tables.rescale import derived_info, scaled_name
        from featurize.models.backbones import get_spec
        from featurize.tables.table import read_table

        r, c = self.recipe, self.c
        steps: list[Step] = []
        cut_done: set[float] = set()
        embed_done: set[tuple[float, str]] = set()
        n = len(self.table)
        for m in r.members:
            if m.scale != 1.0 and m.scale not in cut_done:
                cut_done.add(m.scale)
                dest = scaled_name(self.table_path, m.scale)
                reuse = dest.is_file() and bool(derived_info(dest))
                rate = ("cut", "tiles", n * m.scale ** 2)
                est, meas = self.rates.estimate(*rate)
                steps.append(Step("cut", f"{dest.name} ({n} tiles at {m.scale:g}x)", est, meas, reuse, m.name,
                                  run=lambda s=m.scale: self._cut(s), rate=rate))
            for b in m.backbones:
                if (m.scale, b) in embed_done:
                    continue
                embed_done.add((m.scale, b))
                table_file = self.table_for(m.scale)
                reuse = False
                if table_file.is_file():
                    t = read_table(table_file, check_files=False)
                    path = final_cache_paths(t, [b], tta=r.tta, device=self.dev, cache_dir=c.cache_dir,
                                             random_init=c.random_init, weights=self._weights(b))[0]
                    p = plan_if_complete(t, path)
                    reuse = p is not None and len(p.todo) == 0
                spec = get_spec(b)
                rate = ("embed", f"{b}|tta{r.tta}", n * r.tta)
                est, meas = self.rates.estimate(*rate, prior_scale=(spec.input_size / 224) ** 2
                                                * (8.0 if "vit" in spec.architecture else 1.0))
                steps.append(Step("embed", f"{b} on {table_file.name}", est, meas, reuse, m.name,
                                  run=lambda s=m.scale, b=b: self._embed(s, b), rate=rate))
            reuse = (self.run_dir(m) / "run.json").is_file()
            rate = ("fit", self._fit_kind(m, self.folds), self._fit_units(m, self.folds))
            est, meas = self.rates.estimate(*rate)
            bbs = "+".join(m.backbones) if len(m.backbones) <= 2 else f"{len(m.backbones)} backbones ({m.backbones[0]}, ...)"
            steps.append(Step("fit", f"{m.name}: {m.head} on {bbs} at {m.scale:g}x"
                              + (" (nested)" if r.nested else ""), est, meas, reuse, m.name,
                              run=lambda m=m: self._fit(m), rate=rate))
        k = len(r.members)
        if k >= 2:
            rate = ("stack", r.stack_method, self._stack_units(k, self.folds))
            est, meas = self.rates.estimate(*rate)
            steps.append(Step("stack", f"{r.stack_method} over {k} runs", est, meas,
                              (self.out / "stack" / "stack.json").is_file(), "stack",
                              run=lambda: self._stack([m.name for m in r.members], self.out / "stack"), rate=rate))
        for label, without in self.levers():
            if len(without) >= 2 and c.ablation:
                rate = ("stack", r.stack_method, self._stack_units(len(without), self.folds))
                est, meas = self.rates.estimate(*rate)
                steps.append(Step("ablate", f"the stack without {label} ({len(without)} runs)", est, meas,
                                  (self._ablation_dir(label) / "stack.json").is_file(), "ablation",
                                  run=lambda w=without, lab=label: self._stack(w, self._ablation_dir(lab)), rate=rate))
        lopo = c.lopo if c.lopo is not None else (self.patients >= 2 and self.group_col != "patient")
        if lopo and self.patients < 2:
            raise UsageError(f"--lopo: {self.table_path} holds fewer than two patients (its 'patient' column).")
        if lopo:
            for m in r.members:
                rate = ("fit", self._fit_kind(m, self.patients), self._fit_units(m, self.patients))
                est, meas = self.rates.estimate(*rate)
                steps.append(Step("lopo-fit", f"{m.name}, leave-one-patient-out ({self.patients} patients)", est,
                                  meas, (self.run_dir(m, True) / "run.json").is_file(), "lopo",
                                  run=lambda m=m: self._fit(m, lopo=True), rate=rate))
            if k >= 2:
                rate = ("stack", r.stack_method, self._stack_units(k, self.patients))
                est, meas = self.rates.estimate(*rate)
                steps.append(Step("lopo-stack", f"{r.stack_method} over {k} runs, leave-one-patient-out", est, meas,
                                  (self.out / "lopo" / "stack" / "stack.json").is_file(), "lopo",
                                  run=lambda: self._stack([m.name for m in r.members], self.out / "lopo" / "stack",
                                                          lopo=True), rate=rate))
        return steps

    def levers(self) -> list[tuple[str, list[str]]]:
        """What the ablation takes out, one lever at a time: each extra tile size, and each head when the recipe
        has several (the members left without it)."""
        ms = self.recipe.members
        out = []
        for s in sorted({m.scale for m in ms} - {1.0}):
            out.append((f"the {s:g}x tiles", [m.name for m in ms if m.scale != s]))
        heads = sorted({m.head for m in ms})
        if len(heads) > 1:
            for h in heads:
                out.append((f"head {h}", [m.name for m in ms if m.head != h]))
        return [(label, w) for label, w in out if w]

    def _ablation_dir(self, label: str) -> Path:
        return self.out / "ablation" / ("without-" + re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-"))

    def _fit_kind(self, m, folds: int) -> str:
        """The rate key of a fit: head, nested or not, and the number of folds (the cost model's constant differs
        between 6 folds with inner CV and 2)."""
        return f"{m.head}|{'nested' if self.recipe.nested else 'plain'}|{folds}folds"

    def _weights(self, backbone: str) -> dict[str, str]:
        w = self.c.weights or {}
        return {backbone: w[backbone]} if backbone in w else {}

    # ------------------------------------------------------------------ steps
    def _cut(self, scale: float):
        from featurize.tables.rescale import scaled_table

        return scaled_table(self.table_path, scale, log=self.log)

    def _embed(self, scale: float, backbone: str):
        from featurize.engine.extract import EmbedConfig, run_embed

        stats: dict = {}
        cfg = EmbedConfig(str(self.table_for(scale)), (backbone,), weights=self._weights(backbone),
                          random_init=self.c.random_init, tta=self.recipe.tta, device=self.c.device,
                          cache_dir=self.c.cache_dir, progress=self.c.progress)
        out = run_embed(cfg, stats=stats)
        return out, int(stats.get("rows", 0) or 0)

    def _fit(self, m, lopo: bool = False):
        from regress.runs.fit import FitConfig, fit

        cfg = FitConfig(str(self.table_for(m.scale)), m.backbones, m.head, cache_dir=self.c.cache_dir,
                        runs_dir=self.run_dir(m, lopo).parent, name=m.name,
                        folds=self.patients if lopo else self.folds,
                        group_col="patient" if lopo else self.group_col, seed=self.c.seed,
                        device="cpu" if self.dev == "cpu" else self.c.device, context=m.context,
                        head_params=m.params, center_slides=m.center_slides, cross_gene=m.cross_gene,
                        nested=self.recipe.nested, reuse=True, overwrite=True)  # the model folder is run's own:
        # a member of the same name fitted with other settings (an edited recipe) is refitted and replaced
        return fit(cfg, log=self.log)

    def _stack(self, names: list[str], out: Path, lopo: bool = False):
        from regress.runs.stack import stack_runs

        by = {m.name: m for m in self.recipe.members}
        runs = [str(self.run_dir(by[n], lopo)) for n in names if n in by]
        if len(runs) < 2:
            return None
        method = self.recipe.stack_method
        return stack_runs(runs, out_dir=out, method=method, alpha=self.recipe.stack_alpha if method == "ridge" else None,
                          center_folds=self.recipe.center_folds, log=lambda *_: None, reuse=True, overwrite=True)

    # ------------------------------------------------------------------ execute
    def execute(self, plan: Plan) -> Path:
        from regress.runs.model import write_model

        t_start = time.perf_counter()
        todo = plan.steps
        remaining = plan.estimate()
        n = len(todo)
        dropped_now: set[str] = set()
        first = self.recipe.members[0].name
        for i, s in enumerate(todo, 1):
            if s.unit in dropped_now:
                s.status = "dropped"
                continue
            elapsed = time.perf_counter() - t_start
            if (plan.budget_s is not None and s.unit not in (first, "stack") and not s.reuse
                    and elapsed + s.estimate_s > plan.budget_s):
                dropped_now.add(s.unit)
                s.status = "dropped"
                plan.dropped.append(s.unit)
                self.log(f"[run] the budget is spent ({fmt_s(elapsed)} of {fmt_s(plan.budget_s)}): dropped {s.unit}")
                if s.unit in {m.name for m in self.recipe.members}:
                    self._drop_member_late(plan, s.unit, dropped_now)
                continue
            eta = fmt_s(remaining)
            self.log(f"[run] step {i}/{n}: {s.kind} {s.label} (~{fmt_s(s.estimate_s)}; about {eta} left in all)")
            t0 = time.perf_counter()
            result = s.run()
            s.seconds = time.perf_counter() - t0
            s.status = "done"
            remaining = max(0.0, remaining - (0.0 if s.reuse else s.estimate_s))
            self._record(s, result)
        return write_model(self, plan, time.perf_counter() - t_start)

    def _drop_member_late(self, plan: Plan, name: str, dropped_now: set[str]) -> None:
        """A member dropped while running: the stacks then blend the members that were fitted."""
        kept = {m.name for m in self.recipe.members if m.name != name and m.name not in dropped_now}
        self.recipe = self.recipe.keep(kept)
        for s in plan.steps:
            if s.status == "planned" and s.kind in ("stack", "lopo-stack", "ablate"):
                if s.kind == "stack":
                    s.run = lambda: self._stack([m.name for m in self.recipe.members], self.out / "stack")
                elif s.kind == "lopo-stack":
                    s.run = lambda: self._stack([m.name for m in self.recipe.members], self.out / "lopo" / "stack",
                                                lopo=True)
                else:
                    s.status = "dropped"

    def _record(self, s: Step, result) -> None:
        """Measured rates for the next plan: the step's own (kind, sub, units), only for work actually done (an
        embed counts the rows it embedded, not the table's)."""
        if s.reuse or result is None or s.rate is None or not s.seconds or getattr(result, "reused", False):
            return
        kind, sub, units = s.rate
        if s.kind == "embed":
            _, rows = result
            if rows <= 0:
                return
            units = rows * self.recipe.tta
        self.rates.record(kind, sub, units, s.seconds)


def run(config: RunConfig, log=say) -> Path:
    """Plan the recipe on the table, print the plan, carry it out; returns the model folder."""
    runner = Runner(config, log=log)
    plan = runner.plan()
    for note in plan.notes:
        log(f"[run] {note}")
    head = (f"[run] recipe {runner.recipe.name} on {runner.table_path} ({len(runner.table)} tiles, "
            f"{len(runner.table.genes)} genes, {runner.folds} folds by {runner.group_col}): {len(plan.steps)} steps, "
            f"about {fmt_s(plan.estimate())} on this machine ({runner.dev})")
    print(head)
    for line in plan.lines():
        print(line)
    if plan.dropped:
        print(f"[run] --budget {fmt_s(plan.budget_s)}: dropped {', '.join(plan.dropped)} (their estimate does not fit)")
    if config.plan_only:
        return runner.out
    return runner.execute(plan)
