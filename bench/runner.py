"""How good `run`'s estimates are: each step's printed estimate against its measured time, by step kind.

    python bench/runner.py MODEL_FOLDER [MODEL_FOLDER ...]

Reads ``hexpress-model.json`` (the plan as run: estimate, whether it came from a rate measured on this machine
or from a prior, seconds taken) and prints, per step kind, the steps that did work, the estimate, the time
taken and their ratio; the budget, the total time and the dropped members when the run had a budget.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def summarize(model: Path) -> list[dict]:
    doc = json.loads((model / "hexpress-model.json").read_text())
    by = defaultdict(lambda: {"steps": 0, "estimate_s": 0.0, "seconds": 0.0, "measured": 0})
    for s in doc["plan"]:
        if s["reused"] or s["seconds"] is None or s["status"] != "done":
            continue
        kind = s["kind"].replace("ablate", "stack").replace("lopo-", "")
        row = by[kind]
        row["steps"] += 1
        row["estimate_s"] += s["estimate_s"]
        row["seconds"] += s["seconds"]
        row["measured"] += bool(s["measured"])
    rows = [{"kind": k, **v, "ratio": v["estimate_s"] / v["seconds"] if v["seconds"] else None} for k, v in by.items()]
    print(f"{model}: recipe {doc['recipe']['name']}, {doc['seconds']:.0f} s in all, dropped: "
          f"{', '.join(doc['dropped']) or 'none'}")
    print(f"{'kind':8s} {'steps':>5s} {'from rates':>10s} {'estimate':>9s} {'took':>8s} {'est/took':>8s}")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['kind']:8s} {r['steps']:5d} {r['measured']:10d} {r['estimate_s']:8.0f}s {r['seconds']:7.0f}s "
              f"{ratio:>8s}")
    return rows


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["runs"]:
        summarize(Path(arg))
