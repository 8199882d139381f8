"""Spatial Transcriptomics (ST) layout, as in the her2st data set.

Per section: a count matrix (spots x genes, tsv/tsv.gz, first column the spot
key ``<x>x<y>``), a spot file with ``x y ... pixel_x pixel_y [selected]``,
and the full-resolution H&E image.  ST spots are 100 um wide on a 200 um
grid, so the pixel size comes from the spacing of neighbouring spots.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from featurize.errors import ImportDataError
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
    keys, report = match_spots(name, sdf["key"], cdf.index, Path(spots), Path(counts))
    sdf = sdf.set_index("key").loc[keys]
    ppu = pixels_per_um(sdf)
    report["pixels_per_um"] = ppu
    report["pixel_size_method"] = f"linear fit of pixel on array position, {ST_PITCH_UM:g} um pitch"
    size = tile_size_px(tile_um, tile_px, ppu)
    return Slide(name=name, patient=patient, keys=list(keys), centers=sdf[["pixel_x", "pixel_y"]].to_numpy(float),
                 counts=cdf.loc[keys], image=Path(image), tile_px=size, pixels_per_um=ppu, report=report)


def her2st_sections(root: str | Path) -> list[str]:
    """Section names available under a her2st-layout folder (counts/, spots/, images/)."""
    root = Path(root)
    return sorted(p.name.split(".")[0] for p in (root / "counts").glob("*.tsv*")
                  if (root / "spots" / f"{p.name.split('.')[0]}_selection.tsv").is_file())


def import_st(root: str | Path, out_dir: str | Path, *, sections: Sequence[str] | None = None, name: str = "st",
              tile_um: float | None = 100.0, tile_px: int | None = None, out_px: int = 224,
              normalize_mode: str = "lognorm", n_genes: int | None = 250, gene_list=None,
              min_spots: float = 0.1) -> Path:
    """Import a her2st-layout folder; the patient is the section name's letter (B4 -> B)."""
    root = Path(root)
    avail = her2st_sections(root)
    if not avail:
        raise ImportDataError(f"{root}: no sections found (expected counts/<s>.tsv.gz and spots/<s>_selection.tsv).")
    chosen = list(sections) if sections else avail
    unknown = [s for s in chosen if s not in avail]
    if unknown:
        raise ImportDataError(f"{root}: unknown section(s) {unknown}; available: {avail}.")
    slides = []
    for s in chosen:
        image = next((p for p in (root / "images").glob(f"{s}.*")), root / "images" / f"{s}.jpg")
        counts = next((root / "counts").glob(f"{s}.tsv*"))
        slides.append(read_st_slide(s, counts, root / "spots" / f"{s}_selection.tsv", image,
                                    patient=s.rstrip("0123456789") or s, tile_um=None if tile_px else tile_um,
                                    tile_px=tile_px))
    return build_table(slides, out_dir, name, out_px=out_px, normalize_mode=normalize_mode, n_genes=n_genes,
                       gene_list=gene_list, min_spots=min_spots,
                       extra={"source": str(root), "format": "st", "tile_um": None if tile_px else tile_um})
