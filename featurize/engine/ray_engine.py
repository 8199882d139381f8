"""``embed --engine ray``: the sharded embed scheduled on a Ray cluster, merged by the driver.

The table is cut into shards (:mod:`featurize.engine.shards`; by default one per
actor, ``--shards`` for more, finer-grained resumption); one actor per GPU
(or per CPU slot without GPUs) embeds shard after shard, keeping each
backbone loaded between shards and decoding with its own worker processes on
its node's CPUs.  A shard whose actor dies is scheduled again (on a restarted
actor) and *resumes* from its partial shard file.  The driver shows one
progress bar for the whole job, holds a lock so a second driver on the same
cache is refused, and merges the standard cache at the end: the same bytes as
a single-process ``embed``.  Ray is optional: ``pip install -e ".[ray]"``.
"""
from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

from core.errors import UsageError
from core.lock import file_lock
from core.log import say

MAX_ATTEMPTS = 3


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise UsageError('--engine ray needs Ray: pip install -e ".[ray]" (or pip install ray), then rerun.') from exc
    return ray


def embed_ray(data: str | os.PathLike, backbones: Sequence[str], *, address: str | None = None,
              shards: int | None = None, progress: bool = True, wait_s: float = 0.0, _fail_once: int | None = None,
              **embed_kwargs: Any) -> list[Path]:
    """Embed ``data`` with ``backbones`` on Ray; returns the merged cache paths.

    ``embed_kwargs`` are :func:`featurize.engine.extract.embed`'s (weights, random_init,
    tta, dtype, batch_size, num_workers, cache_dir, device, skip_bad).
    ``_fail_once`` (tests only) makes the actor running that shard die after
    its first batch, once.
    """
    from tqdm import tqdm

    from featurize.engine.extract import final_cache_paths
    from featurize.engine.shards import final_of, merge_shards, shard_rows
    from featurize.tables.table import read_table

    ray = _ray()
    table = read_table(data)
    data = str(Path(table.source))
    finals = final_cache_paths(table, backbones, weights=embed_kwargs.get("weights"),
                               random_init=embed_kwargs.get("random_init", False), tta=embed_kwargs.get("tta", 1),
                               dtype=embed_kwargs.get("dtype", "float16"), device=embed_kwargs.get("device", "auto"),
                               decode=embed_kwargs.get("decode", "auto"), cache_dir=embed_kwargs.get("cache_dir", "cache"))
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        with ExitStack() as stack:
            for f in finals:  # one driver per cache: the second is refused (or waits with --wait)
                f.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(file_lock(f.with_name(f.name + ".driver.lock"), wait_s))
            if all(_fresh(f, table) for f in finals):  # every cache already holds these rows, unchanged
                return finals
            res = ray.cluster_resources()
            gpus = int(res.get("GPU", 0))
            slots = gpus or max(1, int(res.get("CPU", 1)))
            count = int(shards or slots)
            if count < 1:
                raise UsageError(f"--shards {count}: must be at least 1.")
            batch = int(embed_kwargs.get("batch_size", 64))
            sizes = [b - a for a, b in (shard_rows(len(table), batch, i, count) for i in range(count))]
            kw = dict(embed_kwargs, progress=False, keep_models=True)
            if gpus:
                kw.setdefault("device", "cuda")
            Actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                               max_restarts=MAX_ATTEMPTS, max_task_retries=0)(_ShardActor)
            actors = [Actor.remote(data, list(backbones), kw) for _ in range(min(slots, count))]
            pending = list(range(count))
            attempts = {i: 0 for i in range(count)}
            running: dict[Any, tuple[int, Any]] = {}
            bar = tqdm(total=len(table), unit="tile", disable=not progress, desc="embed (ray)", dynamic_ncols=True)
            free = list(actors)
            written: list[Path] = []
            try:
                while pending or running:
                    while pending and free:
                        i = pending.pop(0)
                        actor = free.pop(0)
                        attempts[i] += 1
                        crash = _fail_once == i and attempts[i] == 1
                        running[actor.run.remote(i, count, crash)] = (i, actor)
                    done, _ = ray.wait(list(running), num_returns=1)
                    ref = done[0]
                    i, actor = running.pop(ref)
                    try:
                        written += [Path(p) for p in ray.get(ref)]
                        bar.update(sizes[i])
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                        if attempts[i] >= MAX_ATTEMPTS:
                            raise UsageError(f"shard {i}/{count} failed {attempts[i]} times ({type(exc).__name__}); "
                                             "see the Ray logs, then rerun: finished shards are kept.") from exc
                        say(f"[embed] shard {i}/{count}: actor died ({type(exc).__name__}); resuming it")
                        pending.insert(0, i)
                    free.append(actor)  # Ray restarts a dead actor (max_restarts)
            finally:
                bar.close()
            # the caches the actors wrote: their keys come from the actors' own device (a driver without a GPU
            # would compute another precision and decoder than GPU actors)
            out = list(dict.fromkeys(final_of(p) for p in written)) or finals
            for f in out:
                if not f.exists():
                    merge_shards(f, table)
            return out
    finally:
        if started:
            ray.shutdown()


def _fresh(final: Path, table) -> bool:
    """True when ``final`` is a complete cache serving ``table`` row for row (IDs and tile content)."""
    from featurize.cache import plan_if_complete

    plan = plan_if_complete(table, final)
    return plan is not None and plan.identical()


class _ShardActor:
    """A Ray actor embedding shard after shard; models stay loaded between shards (``keep_models``)."""

    def __init__(self, data: str, backbones: list[str], kwargs: dict[str, Any]):
        self.data, self.backbones, self.kwargs = data, backbones, kwargs

    def run(self, index: int, count: int, crash: bool = False) -> list[str]:
        from featurize.engine.extract import embed

        if crash:  # tests: die mid-shard (after one written batch), as a node loss would
            embed(self.data, self.backbones, shard=(index, count), max_batches=1, **self.kwargs)
            os._exit(1)
        return [str(p) for p in embed(self.data, self.backbones, shard=(index, count), **self.kwargs)]
