"""``cli.py embed``: tiles through frozen backbones into HDF5 caches."""
from __future__ import annotations

from commands.common import common_data, bb_help, _weights_arg


def register(sub) -> None:
    """Add this module's command(s) to the subcommand parser ``sub``."""
    sp = sub.add_parser("embed", help="embed every tile with one or more frozen backbones into HDF5 caches",
                        description="Decode each tile once, feed every --backbone, and write one cache per backbone "
                                    "under --cache-dir. Interrupted runs resume; finished caches are reused.")
    common_data(sp)
    sp.add_argument("--backbone", action="append", required=True, help=bb_help())
    sp.add_argument("--weights", action="append", help="checkpoint file (.pth/.pt/.bin/.safetensors); NAME=PATH with several backbones")
    sp.add_argument("--random-init", action="store_true", help="random weights, for testing only; recorded in the cache and every report")
    sp.add_argument("--tta", type=int, choices=(1, 8), default=1, help="8 = average the 8 flips/rotations (default: %(default)s)")
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda (cuda without a GPU is an error)")
    sp.add_argument("--batch-size", type=int, default=64, help="tiles per batch; halved automatically on CUDA out-of-memory")
    sp.add_argument("--workers", type=int, default=None, help="decoding worker processes (default: CPUs - 1, at most 4 on CPU and 12 on a GPU)")
    sp.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored feature type")
    sp.add_argument("--decode", choices=("auto", "pil", "device"), default="auto",
                    help="pil: workers decode every tile with Pillow; device: JPEG tiles are decoded in batches on the "
                         "compute device (nvJPEG on CUDA), other formats by Pillow (counted); auto: device on CUDA, pil "
                         "on CPU (default). Part of the cache key: the decoders differ by a few grey levels")
    sp.add_argument("--skip-bad", action="store_true", help="skip unreadable tiles and list them next to the cache")
    sp.add_argument("--wait", type=float, default=0.0, help="seconds to wait for another process holding the cache lock")
    sp.add_argument("--quiet", action="store_true", help="no progress bar; warnings and errors only")
    sp.add_argument("--shard", metavar="I/N", default=None,
                    help="embed only shard I of N (contiguous rows on batch boundaries) into its own cache file; the "
                         "process that completes the last shard merges them (or: cache merge)")
    sp.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="local: this process (default); ray: shards scheduled on a Ray cluster, one actor per GPU "
                         "(or CPU slot), merged at the end (pip install -e \".[ray]\")")
    sp.add_argument("--address", default=None, help="ray: the cluster to join (e.g. auto); default: a local Ray")
    sp.add_argument("--shards", type=int, default=None, help="ray: how many shards (default: one per actor)")
    sp.set_defaults(func=cmd_embed)


def cmd_embed(args) -> int:
    from featurize.engine.engines import embed_with
    from featurize.engine.extract import EmbedConfig

    config = EmbedConfig(
        args.data, tuple(args.backbone), weights=_weights_arg(args.weights, args.backbone),
        random_init=args.random_init, tta=args.tta, device=args.device, batch_size=args.batch_size,
        num_workers=args.workers, dtype=args.dtype, cache_dir=args.cache_dir, skip_bad=args.skip_bad,
        progress=not args.quiet, wait_s=args.wait, shard=_shard_arg(args.shard), decode=args.decode,
    )
    for p in embed_with(config, args.engine, address=args.address, shards=args.shards):
        print(p)
    return 0


def _shard_arg(value: str | None):
    if value is None:
        return None
    from featurize.engine.shards import parse_shard

    return parse_shard(value)
