"""``cli.py hest-bench``: a HEST-Benchmark task folder, HEST's published protocol and hexpress heads side by side."""
from __future__ import annotations


def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    from commands.common import bb_help

    sp = sub.add_parser("hest-bench", help="run a HEST-Benchmark task (its splits, genes and patches) with HEST's "
                        "protocol and hexpress heads",
                        description="Read TASK (HEST-Benchmark's bench_data/<TASK>: splits/train_i.csv, test_i.csv, "
                                    "patches/, adata/, var_50genes.json), embed its patches once with --backbone, and "
                                    "score, per split, HEST's protocol (StandardScaler, PCA 256, ridge alpha = "
                                    "100/(256*genes), no intercept) and each hexpress head: Pearson r per gene over "
                                    "the split's test patches, averaged; then mean and std over splits. Writes "
                                    "<out>/hest-<TASK>.json.")
    sp.add_argument("task", metavar="TASK", help="the task folder (bench_data/<TASK>)")
    sp.add_argument("--backbone", required=True, help=bb_help().replace(" (repeatable)", ""))
    sp.add_argument("--head", action="append", default=None,
                    help="hexpress head to score beside HEST's protocol (repeatable; default: ridge)")
    sp.add_argument("--out", required=True, help="FOLDER for the tile table, the cache and hest-<TASK>.json")
    sp.add_argument("--cache-dir", default=None, help="embedding cache folder (default: <out>/cache)")
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sp.add_argument("--weights", action="append", help="checkpoint file for the backbone (.pth/.pt/.bin/.safetensors)")
    sp.add_argument("--random-init", action="store_true", help="random weights, for testing only; recorded in the result")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_hest_bench)


def cmd_hest_bench(args) -> int:
    from commands.common import _weights_arg
    from regress.hest_task import PUBLISHED, run_task

    doc = run_task(args.task, args.backbone, args.out, heads=tuple(args.head or ["ridge"]), cache_dir=args.cache_dir,
                   device=args.device, random_init=args.random_init,
                   weights=_weights_arg(args.weights, [args.backbone]) or None, progress=not args.quiet)
    print(f"{doc['task']}: {len(doc['genes'])} genes, {doc['n_patches']} patches, backbone {doc['backbone']}"
          + (" (RANDOM weights)" if doc["random_init"] else ""))
    for name, r in doc["results"].items():
        print(f"  {name:34s} PCC {r['mean']:.4f} +/- {r['std']:.4f} over {len(r['splits'])} splits")
    print("  published HEST-Benchmark averages over its tasks (not this task): "
          + ", ".join(f"{k} {v}" for k, v in PUBLISHED.items()))
    print(f"{args.out}/hest-{doc['task']}.json")
    return 0
