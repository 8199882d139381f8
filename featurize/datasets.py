"""Where the demo's real data comes from: her2st on disk, or downloaded once from its public record.

In this order: ``$HEXPRESS_HER2ST``; ``../shared/data/her2st`` beside the
repository; ``~/.cache/hexpress/her2st``; a download of the six her2st
sections from their public Zenodo record (3957257) into that cache folder
when online (files land in a temporary folder renamed into place only when
every file arrived).  ``None`` when none of these works: the caller then
uses a clearly labelled synthetic set.
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZENODO_RECORD = "https://zenodo.org/api/records/3957257"
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")


def _has_her2st(p: Path) -> bool:
    return (p / "images").is_dir() and (p / "counts").is_dir() and (p / "spots").is_dir()


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hexpress" / "her2st"


def find_her2st() -> Path | None:
    """The first her2st folder that exists (see module docstring), or None."""
    for cand in (os.environ.get("HEXPRESS_HER2ST"), ROOT.parent / "shared" / "data" / "her2st", user_cache()):
        if cand and _has_her2st(Path(cand)):
            return Path(cand)
    return None


def download_her2st(dest: Path, timeout: float = 10.0) -> Path | None:
    """Try to fetch the six sections from Zenodo; None when offline or the record's layout differs.

    Files land in a temporary folder renamed into place only when every
    needed file arrived, so a half download is never taken as data.
    """
    try:
        with urllib.request.urlopen(ZENODO_RECORD, timeout=timeout) as r:
            record = json.load(r)
    except (urllib.error.URLError, OSError, ValueError, TimeoutError):
        return None
    files = {f.get("key", ""): f.get("links", {}).get("self") for f in record.get("files", [])}
    wanted = {}
    for s in SECTIONS:
        for sub, pat in (("images", f"{s}.jpg"), ("counts", f"{s}.tsv.gz"), ("spots", f"{s}_selection.tsv")):
            hit = next((k for k in files if k.endswith(pat)), None)
            if hit is None:
                return None
            wanted[f"{sub}/{pat}"] = files[hit]
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, url in wanted.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp / rel, "wb") as fh:
                shutil.copyfileobj(r, fh)
    except (urllib.error.URLError, OSError, TimeoutError):
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest
