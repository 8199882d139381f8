"""Spatial Transcriptomics (ST) layout, as in the her2st data set.

Per section: a count matrix (spots x genes, tsv/tsv.gz, first column the spot
key ``<x>x<y>``), a spot file with ``x y ... pixel_x pixel_y [selected]``,
and the full-resolution H&E image.  ST spots are 100 um wide on a 200 um
grid, so the pixel size comes from the spacing of neighbouring spots.

Sections come from a her2st-layout folder (``counts/``, ``spots/``,
``images/``) or from a sample sheet: a CSV with ``sample, counts, spots,
image[, patient]`` (paths relative to the sheet), the form other ST tools
use.  The spot file's (selected) spots are what is imported: count rows of
spots outside the selection (releases that list every spot of the array)
are reported, never a reason to refuse.  Patients: the sheet's column,
``patients={section: patient}``, or for her2st-style names (one letter and
digits, ``B4``) the letter; any other section is its own patient.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from core.errors import ImportDataError
from featurize.importers.common import Slide, build_table, match_spots, tile_size_px

ST_PITCH_UM = 200.0  # centre-to-centre distance of neighbouring ST spots


def _read_counts(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ImportDataError(f"{path}: count matrix not found.")
    try:
        df = pd.read_csv(path, sep="\t", index_col=0)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise ImportDataError(f"{path}: cannot be read as a tab-separated count matrix ({exc}).") from exc
    if df.shape[1] == 0 or not all(np.issubdtype(t, np.number) for t in df.dtypes):
        raise ImportDataError(f"{path}: expected spots x genes of numbers with the spot key in the first column.")
    df.index = df.index.astype(str)
    return df


def _read_spots(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ImportDataError(f"{path}: spot file not found.")
    try:
        df = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise ImportDataError(f"{path}: cannot be read as a tab-separated spot file ({exc}).") from exc
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need <= set(df.columns):
        raise ImportDataError(f"{path}: spot file needs columns {sorted(need)}, has {list(df.columns)}.")
    if "selected" in df.columns:
        df = df[df["selected"].astype(int) == 1]
    return df.reset_index(drop=True)


def pixels_per_um(spots: pd.DataFrame) -> float:
    """Pixel size from the array-to-pixel fit: pixels per array step / 200 um."""
    ax = np.polyfit(spots["x"].to_numpy(float), spots["pixel_x"].to_numpy(float), 1)[0]
    ay = np.polyfit(spots["y"].to_numpy(float), spots["pixel_y"].to_numpy(float), 1)[0]
    return float((abs(ax) + abs(ay)) / 2.0 / ST_PITCH_UM)


def read_st_slide(name: str, counts: Path, spots: Path, image: Path, patient: str | None = None,
                  tile_um: float | None = None, tile_px: int | None = None) -> Slide:
    """One ST section, spots matched to count rows, tile size in pixels resolved."""
    cdf = _read_counts(Path(counts))
    sdf = _read_spots(Path(spots))
    sdf["key"] = sdf["x"].astype(int).astype(str) + "x" + sdf["y"].astype(int).astype(str)
    keys, report = match_spots(name, sdf["key"], cdf.index, Path(spots), Path(counts), require="spots")
    sdf = sdf.set_index("key").loc[keys]
    ppu = pixels_per_um(sdf)
    report["pixels_per_um"] = ppu
    report["pixel_size_method"] = f"linear fit of pixel on array position, {ST_PITCH_UM:g} um pitch"
    size = tile_size_px(tile_um, tile_px, ppu)
    return Slide(name=name, patient=patient, keys=list(keys), centers=sdf[["pixel_x", "pixel_y"]].to_numpy(float),
                 counts=cdf.loc[keys], image=Path(image), tile_px=size, pixels_per_um=ppu, report=report)


HER2ST_NAME = re.compile(r"^([A-Za-z])\d+$")  # her2st: the letter is the patient, the digits the section


@dataclass(frozen=True)
class Section:
    name: str
    counts: Path
    spots: Path
    image: Path
    patient: str | None = None


def default_patient(section: str) -> str:
    """her2st-style ``B4`` -> ``B``; any other name is its own patient (never several sections merged by guess)."""
    m = HER2ST_NAME.match(section)
    return m.group(1) if m else section


def her2st_sections(root: str | Path) -> list[str]:
    """Section names available under a her2st-layout folder (counts/, spots/, images/)."""
    root = Path(root)
    return sorted(p.name.split(".")[0] for p in (root / "counts").glob("*.tsv*")
                  if (root / "spots" / f"{p.name.split('.')[0]}_selection.tsv").is_file())


def _folder_sections(root: Path) -> list[Section]:
    avail = her2st_sections(root)
    if not avail:
        raise ImportDataError(f"{root}: no sections found (expected counts/<s>.tsv.gz and spots/<s>_selection.tsv, "
                              "or pass a sample sheet CSV).")
    return [Section(s, next((root / "counts").glob(f"{s}.tsv*")), root / "spots" / f"{s}_selection.tsv",
                    next((p for p in (root / "images").glob(f"{s}.*")), root / "images" / f"{s}.jpg")) for s in avail]


def read_sample_sheet(path: Path) -> list[Section]:
    """Sections from a CSV sample sheet: ``sample, counts, spots, image[, patient]``, paths relative to the sheet."""
    try:
        df = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise ImportDataError(f"{path}: cannot be read as a sample sheet CSV ({exc}).") from exc
    need = ["sample", "counts", "spots", "image"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ImportDataError(f"{path}: sample sheet lacks column(s) {missing}; it needs {need} (+ optional patient).")
    if df["sample"].isna().any() or df["sample"].duplicated().any():
        raise ImportDataError(f"{path}: every row needs a unique sample name.")
    base = path.parent
    out = []
    for r in df.itertuples(index=False):
        rel = lambda v: Path(v) if Path(v).is_absolute() else base / v  # noqa: E731
        patient = getattr(r, "patient", None)
        out.append(Section(str(r.sample), rel(r.counts), rel(r.spots), rel(r.image),
                           None if patient is None or pd.isna(patient) else str(patient)))
    return out


def import_st(source: str | Path, out_dir: str | Path, *, sections: Sequence[str] | None = None, name: str = "st",
              tile_um: float | None = 100.0, tile_px: int | None = None, out_px: int = 224,
              normalize_mode: str = "lognorm", n_genes: int | None = 250, gene_list=None,
              min_spots: float = 0.1, patients: dict[str, str] | None = None,
              gene_names: dict[str, str] | None = None) -> Path:
    """Import ST sections from a her2st-layout folder or a sample sheet (see module docstring)."""
    source = Path(source)
    if source.is_file():
        found, kind = read_sample_sheet(source), "sample sheet"
    elif source.is_dir():
        found, kind = _folder_sections(source), "her2st folder"
    else:
        raise ImportDataError(f"{source}: not found; pass a her2st-layout folder or a sample sheet CSV.")
    avail = [f.name for f in found]
    chosen = list(sections) if sections else avail
    unknown = [s for s in chosen if s not in avail]
    if unknown:
        raise ImportDataError(f"{source}: unknown section(s) {unknown}; available: {avail}.")
    patients = dict(patients or {})
    stray = sorted(set(patients) - set(chosen))
    if stray:
        raise ImportDataError(f"--patient {stray[0]}=...: no such section among {chosen}.")
    slides = []
    rules = {}
    for sec in (f for f in found if f.name in chosen):
        patient = patients.get(sec.name) or sec.patient or default_patient(sec.name)
        rules[sec.name] = ("--patient" if sec.name in patients else "sample sheet" if sec.patient
                           else "her2st name (letter)" if HER2ST_NAME.match(sec.name) else "section name")
        slides.append(read_st_slide(sec.name, sec.counts, sec.spots, sec.image, patient=patient,
                                    tile_um=None if tile_px else tile_um, tile_px=tile_px))
        slides[-1].report["patient_from"] = rules[sec.name]
    return build_table(slides, out_dir, name, out_px=out_px, normalize_mode=normalize_mode, n_genes=n_genes,
                       gene_list=gene_list, min_spots=min_spots, gene_names=gene_names,
                       extra={"source": str(source), "source_kind": kind, "format": "st",
                              "tile_um": None if tile_px else tile_um})
