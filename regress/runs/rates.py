"""The rates ``run`` estimates its plan with, measured on this machine and kept in the cache folder.

``<cache_dir>/rates.json`` holds, per machine (architecture, CPU count, device), the seconds per unit of each
step kind: ``cut`` per tile x multiple^2, ``embed`` per tile (per backbone and TTA), ``fit`` per unit of the
cost model in :mod:`regress.runs.runner` (per head, nested or not), ``stack`` per unit.  Every step that did
work records its rate (the latest measurement replaces the one before: a machine's speed is what it is
now); a kind not yet measured is estimated from a prior for a 2-core CPU and the plan says ``(prior)``.
The file is written atomically; a damaged one is ignored with a warning and rewritten.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from core.log import warn

#: Seconds per unit on a 2-core x86_64 CPU (CPU-2), used until this machine has measured the kind.
PRIORS = {"cut": 0.004, "embed": 0.06, "fit": 400.0, "stack": 1000.0}
#: A GPU embeds and fits much faster than the CPU prior says (H200 figures in BENCHMARKS.md).
GPU_FACTOR = {"embed": 0.01, "fit": 0.1}


def machine_key(device: str) -> str:
    return f"{platform.machine()}-{os.cpu_count()}cpu-{'cuda' if str(device).startswith('cuda') else 'cpu'}"


class Rates:
    def __init__(self, cache_dir: str | os.PathLike, device: str):
        self.path = Path(cache_dir) / "rates.json"
        self.device = str(device)
        self.key = machine_key(device)

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            doc = json.loads(self.path.read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("machines", {}), dict):
                raise ValueError("not a rates file")
            return doc
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            warn(f"{self.path}: unreadable ({str(exc)[:60]}); estimates use priors and the file is rewritten.")
            return {}

    def rate(self, kind: str, sub: str) -> float | None:
        v = ((self._read().get("machines") or {}).get(self.key) or {}).get(kind, {}).get(sub)
        return float(v["s_per_unit"]) if isinstance(v, dict) and isinstance(v.get("s_per_unit"), (int, float)) \
            and v["s_per_unit"] >= 0 else None

    def estimate(self, kind: str, sub: str, units: float, prior_scale: float = 1.0) -> tuple[float, bool]:
        """(seconds, measured) for ``units`` of work of this kind."""
        r = self.rate(kind, sub)
        if r is not None:
            return r * units, True
        gpu = GPU_FACTOR.get(kind, 1.0) if self.device.startswith("cuda") else 1.0
        return PRIORS[kind] * prior_scale * gpu * units, False

    def record(self, kind: str, sub: str, units: float, seconds: float) -> None:
        if not units or units <= 0 or seconds is None or seconds < 0:
            return
        from core.atomic import atomic_path
        from core.lock import file_lock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(".rates.json.lock"), wait_s=30.0):
            doc = self._read()
            doc["format"] = 1
            mine = doc.setdefault("machines", {}).setdefault(self.key, {})
            mine.setdefault(kind, {})[sub] = {"s_per_unit": seconds / units, "units": units, "seconds": seconds}
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
