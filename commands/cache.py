"""``cli.py cache``: list, inspect, verify and merge caches."""
from __future__ import annotations

from commands.common import DEFAULT_CACHE, OneLineErrorParser


def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("cache", help="list, inspect and verify embedding caches", description="Inspect caches.")
    csub = sp.add_subparsers(dest="cache_cmd", required=True, metavar="ACTION", parser_class=OneLineErrorParser)
    c = csub.add_parser("ls", help="list caches")
    c.add_argument("--cache-dir", default=DEFAULT_CACHE, help="embedding cache folder (default: %(default)s)")
    c = csub.add_parser("info", help="print a cache's attributes")
    c.add_argument("file", help="a cache file (.h5)")
    c = csub.add_parser("verify", help="check a cache for completeness, fingerprint and finite values (exit 1 if not)")
    c.add_argument("file", help="a cache file (.h5)")
    c.add_argument("--deep", action="store_true", help="also re-hash every tile and report those changed or gone")
    c = csub.add_parser("merge", help="merge the shard caches of embed --shard into the standard cache")
    c.add_argument("file", help="any shard file (<name>.shard-I-of-N.h5) or the cache file to produce (<name>.h5)")
    c.add_argument("--data", default=None, help="the tile table, to check that the shards were cut from it")
    c.add_argument("--keep-shards", action="store_true", help="keep the shard files after merging (default: delete them)")
    sp.set_defaults(func=cmd_cache)




def cmd_cache(args) -> int:
    from featurize.cache import list_caches, read_attrs, verify_cache

    if args.cache_cmd == "merge":
        from featurize.engine.shards import final_of, merge_shards

        final = final_of(args.file)
        table = None
        if args.data:
            from featurize.tables.table import read_table

            table = read_table(args.data, check_files=False)
        print(merge_shards(final, table, keep_shards=args.keep_shards))
        return 0
    if args.cache_cmd == "ls":
        rows = list_caches(args.cache_dir)
        if not rows:
            print(f"no caches under {args.cache_dir}")
        for p, a in rows:
            if isinstance(a, str):
                print(f"{p}  UNREADABLE: {a}")
                continue
            state = "complete" if a.get("complete") else f"PARTIAL {a.get('rows_done')}/{a['n_rows']}"
            flag = "  RANDOM-INIT" if a.get("random_init") else ""
            prec = f"  compute={a['compute']}" if a.get("compute", "float32") != "float32" else ""
            print(f"{p}  {a['backbone']}  {a['n_rows']}x{a['dim']}  tta={a['tta']}{prec}  {state}{flag}")
        return 0
    if args.cache_cmd == "info":
        a = read_attrs(args.file)
        for k in sorted(a):
            if k != "key_json":
                print(f"{k:18s} {a[k]}")
        return 0
    problems = verify_cache(args.file, deep=args.deep)
    if problems:
        for p in problems:
            print(f"{args.file}: {p}")
        return 1
    print(f"{args.file}: OK")
    return 0
