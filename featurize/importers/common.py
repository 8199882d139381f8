"""Shared pieces of the spatial importers: tile cutting, normalisation, gene selection, atomic writes.

Every importer produces the same thing: ``<out>/<name>.csv`` (the tile table:
ID, path, slide, patient, x, y, one column per gene), the tiles under
``<out>/tiles/<slide>-<cut key>/``, and ``<out>/<name>.json`` saying what was done
(spots matched and dropped per slide, tiles padded, genes kept).  The table
and sidecar are written last and atomically, so a failed import never
leaves a table that looks complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from core.errors import ImportDataError
from featurize.tables.images import large_images_allowed, to_rgb
from featurize.tables.table import write_table

NORMALIZATIONS = ("lognorm", "cpm", "log1p", "raw")


@dataclass
class Slide:
    """One section after matching spots to counts: everything needed to cut and tabulate it."""

    name: str
    patient: str | None
    keys: list[str]  # spot keys, matched, in spot-file order
    centers: np.ndarray  # (n, 2) tile centre x, y in full-resolution (level-0) pixels
    counts: pd.DataFrame  # (n, genes) raw counts, index = keys
    image: Path | None = None
    tile_px: float | None = None  # tile side in pixels of ``image`` (the image that is cut)
    image_scale: float = 1.0  # pixels of ``image`` per full-resolution pixel (Visium lowres/hires < 1)
    pixels_per_um: float | None = None  # full-resolution pixels per micrometre
    report: dict[str, Any] = field(default_factory=dict)


#: The coordinate convention of every importer's table, stated once.
COORDINATES = "x, y = tile centre in full-resolution (level-0) pixels of the slide image"


def tile_size_px(tile_um: float | None, tile_px: float | None, pixels_per_um: float) -> float:
    """Tile side in full-resolution pixels from exactly one of ``tile_um`` / ``tile_px``."""
    if (tile_um is None) == (tile_px is None):
        raise ImportDataError("give exactly one of --tile-um and --tile-px.")
    if tile_px is not None:
        if tile_px <= 0:
            raise ImportDataError(f"--tile-px {tile_px}: must be positive.")
        return float(tile_px)
    if tile_um <= 0:
        raise ImportDataError(f"--tile-um {tile_um}: must be positive.")
    return float(tile_um) * float(pixels_per_um)


def match_spots(slide: str, spot_keys: Sequence[str], count_keys: Sequence[str], spot_file: Path,
                count_file: Path, require: str = "both") -> tuple[list[str], dict[str, Any]]:
    """Keys present in both files (spot-file order), with what was left out of each.

    ``require`` says whose keys must mostly match (refused under half):
    ``"spots"`` (ST: the spot file lists the spots under tissue, the count
    matrix may list the whole array), ``"counts"`` (Visium: the positions list
    every spot of the capture area, the matrix only those under tissue) or
    ``"both"``.  Keys present on one side only are counted in the report.
    """
    spots, counts = list(map(str, spot_keys)), list(map(str, count_keys))
    cset, sset = set(counts), set(spots)
    matched = [k for k in spots if k in cset]
    only_spots = [k for k in spots if k not in cset]
    only_counts = [k for k in counts if k not in sset]
    short_spots = require in ("spots", "both") and len(matched) < 0.5 * len(spots)
    short_counts = require in ("counts", "both") and len(matched) < 0.5 * len(counts)
    if short_spots or short_counts or not matched:
        raise ImportDataError(
            f"{spot_file} and {count_file}: only {len(matched)} of {len(spots)} spots and {len(counts)} count rows "
            f"share a key (e.g. spot '{spots[0] if spots else '-'}' vs count row '{counts[0] if counts else '-'}'); "
            "check that the files belong to the same section."
        )
    report = {"spots_in_spot_file": len(spots), "spots_in_counts": len(counts), "matched": len(matched),
              "dropped_only_in_spot_file": len(only_spots), "dropped_only_in_counts": len(only_counts),
              "first_dropped_keys": (only_spots + only_counts)[:5]}
    return matched, report


def normalize(counts: np.ndarray, mode: str) -> np.ndarray:
    """``lognorm``: library size to 1e4 then log1p; ``cpm``: to 1e6 then log1p; ``log1p``; ``raw``."""
    counts = np.asarray(counts, dtype=np.float64)
    if mode == "raw":
        return counts
    if mode == "log1p":
        return np.log1p(counts)
    if mode not in ("lognorm", "cpm"):
        raise ImportDataError(f"--normalize {mode}: choose one of {', '.join(NORMALIZATIONS)}.")
    lib = counts.sum(1, keepdims=True)
    lib[lib == 0] = 1.0
    return np.log1p(counts / lib * (1e4 if mode == "lognorm" else 1e6))


def select_genes(slides: list[Slide], normalized: list[np.ndarray], genes: list[str], n_top: int | None,
                 gene_list: Sequence[str] | None, min_spots: float) -> tuple[list[int], dict[str, Any]]:
    """Columns to keep: shared genes expressed in enough spots, then a list or the N most variable.

    "Most variable" = highest variance of the normalised values over all spots
    of all slides (the criterion of the HisToGene / Hist2ST her2st benchmarks).
    """
    allc = np.concatenate([s.counts.to_numpy() for s in slides], 0)
    frac = (allc > 0).mean(0)
    expressed = frac >= min_spots
    report: dict[str, Any] = {"shared_genes": len(genes), "dropped_rarely_expressed": int((~expressed).sum()),
                              "min_spot_fraction": min_spots}
    idx = np.flatnonzero(expressed)
    if gene_list is not None:
        pos = {g: i for i, g in enumerate(genes)}
        missing = [g for g in gene_list if g not in pos]
        report["gene_list_missing"] = missing[:20]
        idx = np.array([pos[g] for g in gene_list if g in pos], dtype=int)
        if len(idx) == 0:
            raise ImportDataError(f"--gene-list: none of its {len(gene_list)} genes is shared by every slide.")
    elif n_top is not None:
        var = np.concatenate(normalized, 0)[:, idx].var(0)
        order = np.argsort(-var, kind="stable")[:n_top]
        idx = idx[np.sort(order)]
    report["kept_genes"] = int(len(idx))
    return [int(i) for i in idx], report


def read_gene_names(path: str | Path) -> dict[str, str]:
    """Gene ID -> symbol from a 10x ``features.tsv[.gz]`` (id, name, type; no header) or any two-column
    CSV/TSV map (a header row is recognised by not looking like an ID)."""
    path = Path(path)
    try:
        sep = "," if path.suffix.lower() == ".csv" else "\t"
        df = pd.read_csv(path, sep=sep, header=None, dtype=str, comment="#")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ImportDataError(f"--gene-names {path}: cannot be read ({exc}).") from exc
    if df.shape[1] < 2:
        raise ImportDataError(f"--gene-names {path}: needs two columns, gene ID then symbol (found {df.shape[1]}).")
    first = str(df.iat[0, 0]).lower()
    if first in ("id", "gene_id", "gene_ids", "ensembl", "ensembl_id", "feature_id", "gene"):
        df = df.iloc[1:]
    return {str(i): str(n) for i, n in zip(df[0], df[1]) if isinstance(n, str) and n}


def symbols_for(genes: Sequence[str], names: dict[str, str] | None) -> dict[str, str]:
    """Symbol per gene column found in ``names`` (exact ID, or the ID without its ``.version``)."""
    if not names:
        return {}
    bare = {k.split(".")[0]: v for k, v in names.items()}
    out = {}
    for g in genes:
        hit = names.get(g) or bare.get(str(g).split(".")[0])
        if hit:
            out[g] = hit
    return out


def cut_key(slide: Slide, out_px: int) -> str:
    """16 hex of a hash of everything that changes a slide's tiles: image (path, size, mtime), centres, tile side,
    image scale, output size.  Tiles live under ``tiles/<slide>-<key>/``, so a re-cut with other settings never
    overwrites the tiles that an existing table points at."""
    import hashlib

    img = Path(slide.image)
    st = img.stat()
    h = hashlib.sha256(json.dumps({"image": str(img.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                                   "tile_px": float(slide.tile_px), "scale": float(slide.image_scale),
                                   "out_px": int(out_px)}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(slide.centers, dtype=np.float64).tobytes())
    h.update("\0".join(map(str, slide.keys)).encode())
    return h.hexdigest()[:16]


def cut_tiles(slide: Slide, out_dir: Path, out_px: int, owner: str = "") -> tuple[list[str], int]:
    """Cut a ``tile_px`` square around every centre, pad with white at borders, resize to ``out_px``.

    Returns the tiles' paths relative to ``out_dir`` and how many needed padding.  ``owner``: the table the
    tiles are cut for, recorded in the folder's ``.owner`` (only that table's later re-cuts remove it).
    """
    if slide.image is None or not Path(slide.image).is_file():
        raise ImportDataError(f"slide {slide.name}: image {slide.image} not found; pass the full-resolution image.")
    rel_dir = Path("tiles") / f"{slide.name}-{cut_key(slide, out_px)}"
    (out_dir / rel_dir).mkdir(parents=True, exist_ok=True)
    if owner:
        (out_dir / rel_dir / OWNER).write_text(owner)
    half = slide.tile_px / 2.0
    try:
        with large_images_allowed(), Image.open(slide.image) as im:
            im.load()
            img = to_rgb(im)
    except OSError as exc:
        raise ImportDataError(f"{slide.image}: cannot be read as an image ({exc}).") from exc
    W, H = img.size
    cx, cy = slide.centers[:, 0] * slide.image_scale, slide.centers[:, 1] * slide.image_scale
    outside = (cx < 0) | (cy < 0) | (cx >= W) | (cy >= H)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ImportDataError(
            f"slide {slide.name}: spot '{slide.keys[i]}' centre ({cx[i]:.0f}, {cy[i]:.0f}) lies outside the "
            f"{W}x{H} image {slide.image}; {int(outside.sum())} spots do (wrong image or coordinate scale?)."
        )
    paths, padded = [], 0
    side = int(round(slide.tile_px))
    for key, x, y in zip(slide.keys, cx, cy):
        left, top = int(round(x - half)), int(round(y - half))
        box = (left, top, left + side, top + side)
        if left < 0 or top < 0 or box[2] > W or box[3] > H:
            padded += 1
            tile = Image.new("RGB", (side, side), (255, 255, 255))
            src = img.crop((max(left, 0), max(top, 0), min(box[2], W), min(box[3], H)))
            tile.paste(src, (max(0, -left), max(0, -top)))
        else:
            tile = img.crop(box)
        if side != out_px:
            tile = tile.resize((out_px, out_px), Image.Resampling.LANCZOS)
        rel = rel_dir / f"{slide.name}_{key}.png"
        tile.save(out_dir / rel)
        paths.append(f"./{rel.as_posix()}")
    return paths, padded


def build_table(slides: list[Slide], out_dir: str | os.PathLike, name: str, *, out_px: int = 224,
                normalize_mode: str = "lognorm", n_genes: int | None = None, gene_list: Sequence[str] | None = None,
                min_spots: float = 0.1, extra: dict[str, Any] | None = None,
                gene_names: dict[str, str] | None = None) -> Path:
    """Normalise, select genes, cut tiles and write the table + sidecar atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = sorted(set.intersection(*(set(map(str, s.counts.columns)) for s in slides)))
    if not shared:
        raise ImportDataError("the slides share no gene; check that the count matrices use the same gene symbols.")
    for s in slides:
        s.counts.columns = s.counts.columns.astype(str)
        s.counts = s.counts.loc[:, ~s.counts.columns.duplicated()][shared]
    normalized = [normalize(s.counts.to_numpy(), normalize_mode) for s in slides]
    cols, gene_report = select_genes(slides, normalized, shared, n_genes, gene_list, min_spots)
    genes = [shared[i] for i in cols]
    frames = []
    for s, norm in zip(slides, normalized):
        if s.report.get("pre_cut"):  # HEST patches, already written by the importer
            paths, padded = [f"./tiles/{s.name}/{s.name}_{k}.png" for k in s.keys], 0
        else:
            paths, padded = cut_tiles(s, out_dir, out_px, owner=f"{name}.csv")
        s.report["tiles_padded_at_border"] = padded
        s.report["tile_px"] = s.tile_px
        if s.image is not None:
            s.report["image"] = str(Path(s.image).resolve())
            s.report["image_scale"] = s.image_scale
        if s.pixels_per_um:
            s.report["tile_um"] = s.tile_px / s.image_scale / s.pixels_per_um if s.tile_px else None
        meta = pd.DataFrame({"ID": [f"{s.name}_{k}" for k in s.keys], "path": paths, "slide": s.name,
                             "patient": s.patient if s.patient is not None else s.name,
                             "x": s.centers[:, 0], "y": s.centers[:, 1]})
        frames.append(pd.concat([meta, pd.DataFrame(norm[:, cols].astype(np.float32), columns=genes)], axis=1))
    table = pd.concat(frames, ignore_index=True)
    symbols = symbols_for(genes, gene_names)
    if gene_names is not None:
        gene_report["symbols_found"] = len(symbols)
    sidecar = {"table": f"{name}.csv", "coordinates": COORDINATES, "normalize": normalize_mode, "out_px": out_px,
               "genes": gene_report, "gene_columns": list(genes), "gene_names": symbols,
               "slides": {s.name: s.report for s in slides}, "n_tiles": len(table)}
    sidecar.update(extra or {})
    return switch_table(out_dir, name, table, sidecar)


#: The file in a keyed tile folder naming the table it was cut for.
OWNER = ".owner"


def _tile_dirs(out_dir: Path, paths) -> set[Path]:
    """The tile folders (under ``out_dir/tiles``) that a table's paths point into."""
    root = (out_dir / "tiles").resolve()
    out = set()
    for p in paths:
        d = (out_dir / str(p)).resolve().parent
        if d.parent == root:
            out.add(d)
    return out


def _table_paths(table_file: Path) -> list[str]:
    try:
        return pd.read_csv(table_file, usecols=["path"], dtype=str)["path"].dropna().tolist()
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return []


def switch_table(out_dir: Path, name: str, table: pd.DataFrame, sidecar: dict[str, Any]) -> Path:
    """Put a finished import in place: the old table goes first (a kill from here on leaves no table that looks
    complete), then the sidecar and the table, each atomically; the old table's tile folders that no table in
    ``out_dir`` points at any more are removed last."""
    from core.faults import point

    point("table-after-tiles")
    final = out_dir / f"{name}.csv"
    old_dirs = _tile_dirs(out_dir, _table_paths(final)) if final.exists() else set()
    for d in (out_dir / "tiles").glob("*/" + OWNER):  # earlier cuts for this table, interrupted or replaced
        try:
            if d.read_text() == final.name:
                old_dirs.add(d.parent.resolve())
        except OSError:
            continue
    out = write_table(table, final, sidecar)
    stale = old_dirs - _tile_dirs(out_dir, table["path"])
    if stale:
        for other in out_dir.glob("*.csv"):
            if other != final:
                stale -= _tile_dirs(out_dir, _table_paths(other))
        import shutil

        for d in stale:
            shutil.rmtree(d, ignore_errors=True)
    return out
