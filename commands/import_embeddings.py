"""``cli.py import-embeddings``: TRIDENT / CLAM / HEST embeddings as a cache."""
from __future__ import annotations

from commands.common import common_data


def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("import-embeddings", help="use embeddings from TRIDENT / CLAM / HEST as a cache",
                        description="Align patch embeddings written by TRIDENT, CLAM or the HEST benchmark (one file, "
                                    "or a folder of <slide>.h5 / <slide>.pt files) to a tile table and store them as a "
                                    "hexpress cache under --backbone NAME. Rows match by barcode (<slide>_<barcode> = "
                                    "ID) or, without barcodes, by geometry: patch centre (top-left + patch size / 2) "
                                    "nearest the tile centre within --tolerance of the patch side.")
    common_data(sp)
    sp.add_argument("file", help="embedding file (.h5 with features/embeddings and barcodes or coords; .pt with its "
                                 "coords .h5 beside it or in ../h5_files) or a folder of per-slide files")
    sp.add_argument("--backbone", required=True, help="name to file the cache under (e.g. uni_trident)")
    sp.add_argument("--id-prefix", default=None, help="prefix that turns a barcode into the table ID "
                                                      "(default: '<slide>_' for per-slide files, else none)")
    sp.add_argument("--slide", default=None, help="the table slide a single file belongs to (needed when the table has several)")
    sp.add_argument("--patch-size-level0", type=float, default=None, metavar="PX",
                    help="patch side in level-0 pixels, for files that do not record it (CLAM h5_files)")
    sp.add_argument("--tolerance", type=float, default=0.25,
                    help="geometric match: largest centre distance as a fraction of the patch side (default: %(default)s)")
    sp.add_argument("--allow-unmatched", action="store_true",
                    help="keep going when table rows have no embedding (they are left out of every fit)")
    sp.set_defaults(func=cmd_import_embeddings)


def cmd_import_embeddings(args) -> int:
    from featurize.importers.embeddings import import_embeddings
    from featurize.tables.table import read_table

    out, rep = import_embeddings(args.file, read_table(args.data, check_files=False), args.backbone, args.cache_dir,
                                 id_prefix=args.id_prefix, slide=args.slide, patch_size_level0=args.patch_size_level0,
                                 tolerance=args.tolerance, allow_unmatched=args.allow_unmatched)
    for name, r in rep["files"].items():
        extra = f", {r['ambiguous']} ambiguous" if r.get("ambiguous") else ""
        print(f"{name}: {r['matched']} of {r['table_rows_considered']} table rows matched by {r['by']}{extra}, "
              f"{r['unused_file_rows']} file rows unused")
    print(f"{rep['matched']} of {rep['table_rows']} table rows have an embedding")
    print(out)
    return 0
