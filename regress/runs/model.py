"""The model folder ``run`` writes, and the one reader ``predict``, ``predict-slide`` and ``report`` use.

Layout::

    <model>/hexpress-model.json  this module's contract (below), written last and atomically
    <model>/runs/<member>/    each member's run folder (regress.runs.folder)
    <model>/stack/            the stack of the members (absent when one member was kept)
    <model>/ablation/         the stack without each lever (evaluation only)
    <model>/lopo/             the same recipe with leave-one-patient-out folds (evaluation only)
    <model>/report.md         what was run, the scores, which levers earned weight

``hexpress-model.json`` (not a run's ``model.json``, its fitted head): ``format``, ``tool_version``, ``recipe``
(the validated recipe), ``table`` (the training table: path, fingerprint), ``group_col``, ``folds``, ``scales`` (tile multiples), ``members`` (name, run
folder relative to the model, tile multiple, tile side in um, nested scores, stack weight), ``result`` (the
folder that predicts: ``stack`` or ``runs/<member>``), ``scores`` (by held-out group, pooled, by held-out
patient), ``levers``, ``plan`` (each step: estimate, measured seconds, reused or dropped), ``dropped``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from core.errors import RunError

FORMAT = "hexpress-model/1"
MODEL_FILE = "hexpress-model.json"
_REQUIRED = {"format": str, "recipe": dict, "table": dict, "members": list, "result": str, "scales": list,
             "scores": dict}


def is_model(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_FILE).is_file()


def read_model(path: str | os.PathLike) -> dict[str, Any]:
    """``hexpress-model.json`` of a model folder, checked for form (its runs and stack are checked when opened)."""
    f = Path(path) / MODEL_FILE
    try:
        doc = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{f}: cannot be read ({exc}); rerun `python cli.py run` to remake the model.") from exc
    except ValueError as exc:
        raise RunError(f"{f}: is not valid JSON ({str(exc)[:60]}); rerun `python cli.py run` (finished steps "
                       "are reused).") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RunError(f"{f}: not a hexpress model file (format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                       f"expected {FORMAT}); rerun `python cli.py run`.")
    for k, kind in _REQUIRED.items():
        if not isinstance(doc.get(k), kind):
            raise RunError(f"{f}: field '{k}' is missing or not a {kind.__name__}; rerun `python cli.py run`.")
    res = Path(path) / doc["result"]
    if Path(doc["result"]).is_absolute() or ".." in Path(doc["result"]).parts:
        raise RunError(f"{f}: 'result' must name a folder inside the model; rerun `python cli.py run`.")
    doc["_result_path"] = str(res)
    return doc


def model_result(path: str | os.PathLike) -> Path:
    """The run or stack folder that predicts for a model folder (or ``path`` itself for a run/stack)."""
    return Path(read_model(path)["_result_path"]) if is_model(path) else Path(path)


def _score(m: dict | None) -> dict[str, float | None]:
    m = m or {}
    return {"by_group": m.get("pcc_gene_mean_by_fold"), "pooled": m.get("pcc_gene_mean")}


def write_model(runner, plan, seconds: float) -> Path:
    """Gather what the runner made into ``hexpress-model.json`` and ``report.md``; print the result table."""
    from core import __version__
    from core.atomic import atomic_path
    from regress.runs.folder import open_result
    from regress.runs.scales import run_tile_um

    out = runner.out
    members = [m for m in runner.recipe.members if (runner.run_dir(m) / "run.json").is_file()]
    if not members:
        raise RunError(f"{out}: no member run was finished; rerun `python cli.py run` to resume.")
    stack = open_result(out / "stack") if len(members) >= 2 and (out / "stack" / "stack.json").is_file() else None
    weights = dict(zip([Path(r).name for r in stack.info["runs"]], stack.info.get("mean_weights") or [])) if stack \
        else {}
    rows = []
    for m in members:
        r = open_result(runner.run_dir(m))
        rows.append({"name": m.name, "run": f"runs/{m.name}", "scale": m.scale, "tile_um": run_tile_um(r),
                     "head": m.head, "backbones": list(m.backbones), **_score(r.metrics),
                     "weight": weights.get(m.name)})
    main = stack or open_result(runner.run_dir(members[0]))
    scores = _score(main.metrics)
    lopo_dir = out / "lopo" / ("stack" if stack else f"runs/{members[0].name}")
    lopo_file = lopo_dir / ("stack.json" if stack else "run.json")
    scores["by_patient"] = open_result(lopo_dir).metrics.get("pcc_gene_mean_by_fold") if lopo_file.is_file() else None
    levers = []
    for label, without in runner.levers():
        d = runner._ablation_dir(label)
        kept = [m for m in without if (runner.run_dir(next(x for x in runner.recipe.members if x.name == m)) /
                                       "run.json").is_file()] if without else []
        if len(kept) >= 2 and (d / "stack.json").is_file():
            v = open_result(d).metrics.get("pcc_gene_mean_by_fold")
        elif len(kept) == 1:
            v = next(r["by_group"] for r in rows if r["name"] == kept[0])
        else:
            continue
        levers.append({"lever": label, "without": v, "gain": None if v is None or scores["by_group"] is None
                       else scores["by_group"] - v})
    doc = {"format": FORMAT, "tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "recipe": runner.recipe.to_dict(), "recipe_digest": runner.recipe.digest(),
           "table": {"path": str(runner.table_path.resolve()), "fingerprint": runner.table.fingerprint()},
           "group_col": runner.group_col, "folds": runner.folds, "patients": runner.patients,
           "scales": sorted({m.scale for m in members}), "members": rows,
           "result": "stack" if stack else f"runs/{members[0].name}", "scores": scores, "levers": levers,
           "plan": [{"kind": s.kind, "label": s.label, "estimate_s": round(s.estimate_s, 2), "measured": s.measured,
                     "reused": s.reuse, "seconds": None if s.seconds is None else round(s.seconds, 2),
                     "status": s.status} for s in plan.steps],
           "dropped": plan.dropped, "seconds": round(seconds, 1), "notes": plan.notes}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report_text(doc))
    with atomic_path(out / MODEL_FILE) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
    print(summary_text(doc))
    print(f"model written to {out} (predict with: python cli.py predict {out} --data TEST.csv --out pred.csv)")
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def summary_text(doc: dict[str, Any]) -> str:
    s = doc["scores"]
    lines = [f"{'member':24s} {'tiles':>5s} {'PCC/gene by ' + doc['group_col']:>20s} {'pooled':>8s} {'weight':>7s}"]
    for r in doc["members"]:
        lines.append(f"{r['name']:24s} {r['scale']:4g}x {_f(r['by_group']):>20s} {_f(r['pooled']):>8s} "
                     f"{_f(r['weight']) if r['weight'] is not None else '-':>7s}")
    lines.append(f"{'=> ' + doc['result']:24s} {'':5s} {_f(s['by_group']):>20s} {_f(s['pooled']):>8s}")
    if s.get("by_patient") is not None:
        lines.append(f"leave-one-patient-out ({doc['patients']} patients): {_f(s['by_patient'])}")
    for lv in doc["levers"]:
        lines.append(f"without {lv['lever']}: {_f(lv['without'])} (the lever adds {lv['gain']:+.4f})"
                     if lv["gain"] is not None else f"without {lv['lever']}: {_f(lv['without'])}")
    if doc["dropped"]:
        lines.append(f"dropped by --budget: {', '.join(doc['dropped'])}")
    return "\n".join(lines)


def _took(p: dict[str, Any]) -> str:
    if p["reused"]:
        return "reused"
    return "-" if p["seconds"] is None else f"{p['seconds']:.0f} s"


def report_text(doc: dict[str, Any]) -> str:
    r = doc["recipe"]
    plan = "\n".join(f"| {p['kind']} | {p['label']} | {p['estimate_s']:.0f} s{'' if p['measured'] else ' (prior)'} | "
                     f"{_took(p)} | {p['status']} |" for p in doc["plan"])
    return (f"# hexpress model: recipe {r['name']}\n\n{r.get('description', '')}\n\n"
            f"Table `{doc['table']['path']}`, {doc['folds']} folds by `{doc['group_col']}` "
            f"(every setting chosen by inner CV on the training folds; the scores are out-of-fold).\n\n"
            f"```\n{summary_text(doc)}\n```\n\n| step | what | estimate | took | status |\n|---|---|---|---|---|\n"
            f"{plan}\n\nTotal {doc['seconds']:.0f} s.\n")
