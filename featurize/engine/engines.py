"""Which engine embeds a table: this process (``local``) or shards on a Ray cluster (``ray``), and the rules
of the flags that go with each, for the CLI and the API alike."""
from __future__ import annotations

from pathlib import Path

from core.errors import UsageError

ENGINES = ("local", "ray")


def embed_with(config, engine: str = "local", *, address: str | None = None, shards: int | None = None) -> list[Path]:
    """Embed ``config`` (:class:`featurize.engine.extract.EmbedConfig`) with ``engine``; returns the cache paths."""
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine}: choose {', '.join(ENGINES)}.")
    if engine == "local":
        if address or shards:
            raise UsageError("--address and --shards go with --engine ray.")
        from featurize.engine.extract import run_embed

        return run_embed(config)
    if config.shard:
        raise UsageError("--shard is for one process of a job you schedule yourself; with --engine ray use --shards N.")
    from featurize.engine.ray_engine import embed_ray

    c = config
    return embed_ray(c.data, list(c.backbones), address=address, shards=shards, progress=c.progress, wait_s=c.wait_s,
                     weights=c.weights, random_init=c.random_init, tta=c.tta, device=c.device,
                     batch_size=c.batch_size, num_workers=c.num_workers, dtype=c.dtype, cache_dir=c.cache_dir,
                     skip_bad=c.skip_bad, decode=c.decode)
