"""``cli.py pack``: a table's tiles into tar files for clusters."""
from __future__ import annotations



def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("pack", help="write a table's tiles into a few tar files (WebDataset layout) for clusters",
                        description="Store the tiles of --data in tar files of --tiles-per-pack tiles each, and write "
                                    "a packed table of the same name under --out whose rows point into them; embed "
                                    "reads it without unpacking and uses the same cache (same rows, same content).")
    sp.add_argument("--data", required=True, help="tile table to pack")
    sp.add_argument("--out", required=True, help="FOLDER for the packs and the packed table (not the table's own folder)")
    sp.add_argument("--tiles-per-pack", type=int, default=10_000, help="tiles per tar file (default: %(default)s)")
    sp.set_defaults(func=cmd_pack)


def cmd_pack(args) -> int:
    from featurize.tables.pack import pack_table

    print(pack_table(args.data, args.out, tiles_per_pack=args.tiles_per_pack))
    return 0
