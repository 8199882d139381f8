"""``cli.py tiles``: spatial data (ST, Visium, HEST, AnnData) into a tile table."""
from __future__ import annotations

from pathlib import Path

from core.errors import HexpressError


def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("tiles", help="import spatial data (ST / Visium / HEST) into a tile table with cut tiles",
                        description="Cut a tile around every spot, normalise expression and write <out>/<name>.csv, "
                                    "tiles/ and a JSON sidecar reporting dropped spots, padding and genes.")
    sp.add_argument("format", choices=("st", "visium", "hest", "h5ad", "spatialdata"), help="st: her2st-style folder (counts/, spots/, "
                    "images/) or a sample sheet CSV (sample, counts, spots, image[, patient]); visium: Space Ranger outs "
                    "folder; hest: HEST-1k folder (patches/, st/); h5ad: a scanpy/squidpy AnnData file with obsm['spatial']; spatialdata: a SpatialData .zarr store (Visium, "
                    "Visium HD, Xenium as spatialdata-io writes them; needs pip install 'hexpress[spatialdata]')")
    sp.add_argument("source", help="the data folder (st: or a sample sheet CSV; h5ad: the .h5ad file; spatialdata: the "
                    ".zarr store)")
    sp.add_argument("--library", help="h5ad: the uns['spatial'] library to read (needed when it holds several)")
    sp.add_argument("--out", required=True,
                    help="FOLDER to write the table (<name>.csv), its sidecar (<name>.json) and the tiles (tiles/) into")
    sp.add_argument("--name", default="tiles", help="table name (default: %(default)s)")
    sp.add_argument("--section", action="append", help="section/sample to import (repeatable; default all for st)")
    sp.add_argument("--image", action="append", help="visium / h5ad: the full-resolution image (default: cut from the "
                    "stored hires/lowres image at its scale factor); spatialdata: the image element to cut (needed when "
                    "the store holds several)")
    sp.add_argument("--table", help="spatialdata: the table to read (needed when the store holds several)")
    sp.add_argument("--shapes", help="spatialdata: the shapes element the table annotates to use (spots, bins or cells; "
                    "needed when the table annotates several)")
    sp.add_argument("--image-level", type=int, default=None, metavar="N",
                    help="spatialdata: the pyramid level to cut (default 0, full resolution; only that level is read)")
    sp.add_argument("--um-frame", metavar="NAME", help="spatialdata: the coordinate system in micrometres (default "
                    "'global' where the image has one and the table has no array_row/array_col to fit the pitch from)")
    sp.add_argument("--pseudo-spot", type=float, default=None, metavar="UM",
                    help="spatialdata (Xenium): bin cells into squares of UM micrometres, counts summed, a tile per "
                         "square (HEST uses 55 or 100)")
    sp.add_argument("--cells", action="store_true",
                    help="spatialdata (Xenium): one row per cell, a tile of --tile-um centred on it (recorded in the sidecar)")
    sp.add_argument("--image-res", choices=("lowres", "hires"), help="visium without a full-resolution image")
    sp.add_argument("--tile-um", type=float, default=None,
                    help="tile side in micrometres (default: the spot: 100 st, 55 visium, the bin for visium HD)")
    sp.add_argument("--tile-px", type=int, default=None, help="tile side in source pixels (instead of --tile-um)")
    sp.add_argument("--out-px", type=int, default=224, help="saved tile size (default: %(default)s)")
    sp.add_argument("--normalize", choices=("lognorm", "cpm", "log1p", "raw"), default="lognorm",
                    help="lognorm: library size 1e4 then log1p (default); cpm: 1e6 then log1p")
    sp.add_argument("--genes", default="250", help="N (> 0) most variable genes, or 'all' (default: %(default)s)")
    sp.add_argument("--gene-list", help="file with gene symbols to keep (overrides --genes)")
    sp.add_argument("--min-spots", type=float, default=0.1, help="drop genes detected in fewer than this fraction of spots")
    sp.add_argument("--patient", action="append", metavar="SECTION=PATIENT",
                    help="st: which patient a section belongs to (repeatable; the CV groups); default: the sample "
                         "sheet's patient column, the letter of her2st-style names (B4 -> B), else the section itself")
    sp.add_argument("--gene-names", metavar="FILE",
                    help="gene ID -> symbol map (10x features.tsv[.gz] or a two-column CSV/TSV): symbols in reports "
                         "and outputs, IDs kept as the table's columns")
    sp.add_argument("--bin-size", type=float, default=None, metavar="UM",
                    help="visium HD: the bin to read (binned_outputs/square_NNNum, e.g. 8); pixel size from microns_per_pixel")
    sp.add_argument("--feature-types", action="append", default=None, metavar="TYPE",
                    help="visium: feature types to keep (repeatable; default 'Gene Expression'; 'all' keeps every row, "
                         "e.g. Antibody Capture)")
    sp.set_defaults(func=cmd_tiles)


def cmd_tiles(args) -> int:
    gene_list = None
    if args.gene_list:
        try:
            gene_list = [g.strip() for g in Path(args.gene_list).read_text().split() if g.strip()]
        except OSError as exc:
            raise HexpressError(f"--gene-list {args.gene_list}: cannot be read ({exc.strerror}).") from exc
    n_genes = _genes_arg(args.genes)
    gene_names = None
    if args.gene_names:
        from featurize.importers.common import read_gene_names

        gene_names = read_gene_names(args.gene_names)
    from featurize.importers.dispatch import import_tiles

    out = import_tiles(args.format, args.source, args.out, name=args.name, sections=args.section,
                       library=args.library, images=args.image, image_res=args.image_res, tile_um=args.tile_um,
                       tile_px=args.tile_px, out_px=args.out_px, normalize=args.normalize, n_genes=n_genes,
                       gene_list=gene_list, min_spots=args.min_spots,
                       patients=_pairs_arg(args.patient, "--patient", "SECTION=PATIENT"), gene_names=gene_names,
                       bin_size=args.bin_size, feature_types=args.feature_types, table=args.table,
                       shapes=args.shapes, image_level=args.image_level, um_frame=args.um_frame,
                       pseudo_spot=args.pseudo_spot, cells=args.cells)
    print(out)
    print(f"sidecar: {out.with_suffix('.json')}")
    return 0


def _pairs_arg(values: list[str] | None, flag: str, form: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        k, sep, val = v.partition("=")
        if not sep or not k or not val:
            raise HexpressError(f"{flag} {v!r}: write {form}.")
        out[k] = val
    return out


def _genes_arg(value: str) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise HexpressError(f"--genes {value}: give a positive number of genes, or 'all'.")
    return n
