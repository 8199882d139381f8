"""The embed engine: decode each tile once, feed every backbone, write caches.

One pass over the table serves several backbones: workers read a tile's
bytes once, hash them (the row's content digest) and decode them, resizing
once per distinct preprocessing; each backbone takes its uint8 batch,
normalises it on the device, runs (optionally 8-fold TTA) and writes its rows.
Only rows a cache does not already hold with the same content are embedded
(a table that gained rows, or tiles re-cut since, cost only those tiles).
Batches are formed in row order over the rows to embed, so an interrupted run
resumes at the last flushed batch and ends with exactly the features of an
uninterrupted one.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featurize.models.backbones import BackboneSpec, get_spec
from featurize.cache import (
    CacheKey,
    CacheWriter,
    cache_path,
    checked_cache_dir,
    lock_path,
    plan_if_complete,
    read_attrs,
    sibling_caches,
    update_stats,
    verify_cache,
)
from featurize.engine.decode import plain_jpeg_size, resolve_decoder
from core.device import resolve_device
from featurize.tables.digests import NO_STAT, read_with_digest, split_source
from core.faults import point
from core.errors import CacheError, ImageError, UsageError
from featurize.tables.images import load_rgb
from core.lock import file_lock
from core.log import say, warn
from featurize.models.build import create_backbone, extract
from featurize.engine.pipeline import Stager, WriteBehind, to_host
from featurize.tables.table import TileTable, read_table
from featurize.models.transforms import DIHEDRAL, dihedral, normalize, resize_uint8
from featurize.models.weights import ResolvedWeights, resolve_weights

#: Digest recorded for a tile that could not be read: never equal to a real one, so it is retried once it exists.
UNREADABLE = "unreadable"


class TileDataset:
    """Map-style dataset of one table's tiles, for the decode workers.

    ``i -> (i, {key: uint8 CHW} or None, error or None, sha256 of the bytes, stat, JPEG bytes or None)``.
    With ``device_jpeg`` a plain JPEG (:func:`featurize.engine.decode.plain_jpeg_size`) is not decoded here:
    its bytes go to the main process, which decodes them in batches on the compute device.
    """

    def __init__(self, paths: Sequence[Path], keys: Sequence[tuple], device_jpeg: bool = False):
        self.paths = list(paths)
        self.keys = list(keys)
        self.device_jpeg = device_jpeg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            data, digest, st = read_with_digest(path)
        except ImageError as exc:  # not a regular file, or over the size cap
            return i, None, str(exc), UNREADABLE, NO_STAT, None
        except OSError:
            try:
                load_rgb(split_source(path)[0])  # raises the precise error: missing file, directory, ...
            except ImageError as exc:
                return i, None, str(exc), UNREADABLE, NO_STAT, None
            return i, None, f"{path}: cannot be read; check that the file exists.", UNREADABLE, NO_STAT, None
        if self.device_jpeg and plain_jpeg_size(data) is not None:
            return i, None, None, digest, st, np.frombuffer(data, dtype=np.uint8)
        try:
            img = load_rgb(path, data)
        except ImageError as exc:
            return i, None, str(exc), digest, st, None
        return i, {k: resize_uint8(img, k) for k in self.keys}, None, digest, st, None


def _worker_init(_: int) -> None:
    """Decoding workers use one thread each (the cores belong to the forward pass) and die with embed."""
    import torch

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:  # PR_SET_PDEATHSIG: the kernel kills this worker when embed dies, even by SIGKILL
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
        except (OSError, AttributeError):
            pass


def collate(items):
    """One batch, built in the worker so it crosses to the main process as a few shared-memory tensors.

    ``(rows, index, tensors, bad, digests, stats, jpeg_rows, jpeg_bytes, jpeg_offsets)``: the table rows
    and their digests and stats; the rows decoded here (``index``) with their uint8 NCHW tensors per
    preprocessing key; the rows that failed, with their errors; the rows left to the device decoder, their
    JPEG bytes concatenated into one tensor, and each one's start offset (plus the end).
    """
    import torch

    rows = np.array([it[0] for it in items], dtype=np.int64)
    digests = [it[3] for it in items]
    stats = np.array([it[4] for it in items], dtype=np.int64).reshape(len(items), 2)
    good = [(it[0], it[1]) for it in items if it[1] is not None]
    bad = [(it[0], it[2]) for it in items if it[2] is not None]
    raw = [(it[0], it[5]) for it in items if it[5] is not None]
    index = torch.tensor([i for i, _ in good], dtype=torch.long)
    tensors = {k: torch.stack([t[k] for _, t in good]) for k in (good[0][1] if good else {})}
    jpeg_rows = np.array([i for i, _ in raw], dtype=np.int64)
    offsets = np.cumsum([0] + [len(b) for _, b in raw]).astype(np.int64)
    jpeg_bytes = torch.from_numpy(np.concatenate([b for _, b in raw])) if raw else torch.empty(0, dtype=torch.uint8)
    return rows, index, tensors, bad, digests, stats, jpeg_rows, jpeg_bytes, offsets


#: Models kept between embed calls of one process (``keep_models``), by (spec, weights, device).
_MODELS: dict = {}


def final_cache_paths(table: TileTable, backbones: Sequence[str], *, weights: dict[str, str] | None = None,
                      random_init: bool = False, tta: int = 1, dtype: str = "float16", device: str = "auto",
                      decode: str = "auto", cache_dir: str | os.PathLike = "cache") -> list[Path]:
    """The standard cache file each backbone's embedding of ``table`` goes to (nothing is embedded)."""
    dev = resolve_device(device)
    decoder = resolve_decoder(decode, dev)
    return [cache_path(cache_dir, _cache_key(table.cache_folder, name, weights or {}, random_init, tta, dtype, dev, decoder))
            for name in dict.fromkeys(backbones)]


def _cache_key(table_name: str, name: str, weights: dict[str, str], random_init: bool, tta: int, dtype: str, dev,
               decoder: str) -> CacheKey:
    """The cache key of backbone ``name``'s embedding of a table: the one place it is built."""
    spec = get_spec(name)
    w = resolve_weights(spec, weights.get(name), random_init)
    return CacheKey(table_name, spec, w, tta, dtype, compute_dtype(dev, spec), decoder=decoder)


@dataclass
class _Job:
    spec: BackboneSpec
    weights: ResolvedWeights
    key: CacheKey
    final: Path
    model: Any = None
    writer: CacheWriter | None = None
    todo: np.ndarray | None = None  # table rows this cache still needs


def _forward(model, spec: BackboneSpec, x, tta: int):
    """Embeddings of a normalised batch, averaged over ``tta`` dihedral views."""
    out = None
    for k in range(tta):
        f = extract(model, spec, dihedral(x, k) if k else x).float()
        out = f if out is None else out + f
    return out / tta


def compute_dtype(device, spec: BackboneSpec) -> str:
    """The forward pass's precision: autocast (bfloat16, else float16) for ``amp`` specs on CUDA, else float32.

    Part of the cache key, since it changes the numbers."""
    import torch

    if device.type != "cuda" or spec.precision == "fp32":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def autocast(device, spec: BackboneSpec):
    """The context the forward pass runs in: CUDA autocast at :func:`compute_dtype`, or nothing."""
    import torch

    dtype = compute_dtype(device, spec)
    return nullcontext() if dtype == "float32" else torch.autocast("cuda", dtype=getattr(torch, dtype))


def _embed_batch(job: _Job, batch_u8, device, tta: int, micro: list[int]):
    """Forward one uint8 batch already on ``device``; float32 features on ``device``.

    Halves the micro-batch on CUDA out-of-memory (and says so).
    """
    import torch

    while True:
        try:
            parts = []
            for s in range(0, len(batch_u8), micro[0]):
                x = normalize(batch_u8[s : s + micro[0]], job.spec)
                with autocast(device, job.spec):
                    parts.append(_forward(job.model, job.spec, x, tta))
            return torch.cat(parts)
        except torch.OutOfMemoryError:
            if micro[0] <= 1:
                raise
            micro[0] //= 2
            torch.cuda.empty_cache()
            warn(f"[embed] CUDA out of memory: batch size halved to {micro[0]}")


def _write_rows(writer: CacheWriter, rows: np.ndarray, good: np.ndarray, out, dim: int, digests, stats) -> None:
    """The write-behind step of one batch for one cache: wait for its features, then write its rows."""
    feats = np.zeros((len(rows), dim), np.float32)
    if out is not None:
        host, event = out
        if event is not None:
            event.synchronize()
        feats[good] = host.numpy()
    writer.write(rows, feats, good, digests, stats)
    point("embed-after-batch")


@dataclass(frozen=True)
class EmbedConfig:
    """One embedding pass, refused when made if a setting cannot mean anything (the CLI builds one from its flags;
    a runner from a recipe).  ``shard=(I, N)`` embeds only shard I of N (:mod:`featurize.engine.shards`); ``decode``
    chooses the decoder (:mod:`featurize.engine.decode`; part of the key); ``max_batches`` stops early (testing
    interruption); ``wait_s``: how long to wait for another process's lock on a cache."""

    data: Any
    backbones: tuple[str, ...]
    weights: dict[str, str] | None = None
    random_init: bool = False
    tta: int = 1
    device: str = "auto"
    batch_size: int = 64
    num_workers: int | None = None
    dtype: str = "float16"
    cache_dir: str | os.PathLike = "cache"
    skip_bad: bool = False
    progress: bool = True
    wait_s: float = 0.0
    max_batches: int | None = None
    shard: tuple[int, int] | None = None
    keep_models: bool = False
    decode: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbones", tuple(dict.fromkeys(self.backbones or ())))
        if not self.backbones:
            raise UsageError("name at least one backbone: --backbone NAME (repeatable; `python cli.py backbones`).")
        if self.tta not in (1, DIHEDRAL):
            raise UsageError(f"--tta must be 1 or {DIHEDRAL}, got {self.tta}.")
        if self.dtype not in ("float16", "float32"):
            raise UsageError(f"--dtype must be float16 or float32, got {self.dtype}.")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1.")
        if self.num_workers is not None and self.num_workers < 0:
            raise UsageError(f"--workers {self.num_workers}: the number of decoding processes must be 0 (decode in "
                             "this process) or more.")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise UsageError(f"--shard {self.shard[0]}/{self.shard[1]}: need 0 <= I < N.")
        checked_cache_dir(self.cache_dir)


def embed(
    data: str | os.PathLike | TileTable,
    backbones: Sequence[str],
    *,
    weights: dict[str, str] | None = None,
    random_init: bool = False,
    tta: int = 1,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    dtype: str = "float16",
    cache_dir: str | os.PathLike = "cache",
    skip_bad: bool = False,
    progress: bool = True,
    wait_s: float = 0.0,
    max_batches: int | None = None,
    shard: tuple[int, int] | None = None,
    keep_models: bool = False,
    decode: str = "auto",
    stats: dict | None = None,
) -> list[Path]:
    """Embed every tile of ``data`` with each backbone; returns the cache paths.

    A complete cache with the same key serves every row whose ID and tile
    content are unchanged; only the other rows are embedded.  ``shard=(I, N)``
    embeds only shard I of N (:mod:`featurize.engine.shards`) into its own cache
    file, and merges the standard cache when it finishes the last one.
    ``max_batches`` stops early (testing interruption); the partial file is
    then left for the next run to resume.  ``decode`` chooses the decoder
    (:mod:`featurize.engine.decode`; part of the key).  ``stats``, when given, is
    filled with the run's timings (first-batch latency, steady rate) and how
    many tiles each decoder produced.  The keyword form of :func:`run_embed`.
    """
    return run_embed(EmbedConfig(data, tuple(backbones), weights=weights, random_init=random_init, tta=tta,
                                 device=device, batch_size=batch_size, num_workers=num_workers, dtype=dtype,
                                 cache_dir=cache_dir, skip_bad=skip_bad, progress=progress, wait_s=wait_s,
                                 max_batches=max_batches, shard=shard, keep_models=keep_models, decode=decode),
                     stats=stats)


def run_embed(config: EmbedConfig, stats: dict | None = None) -> list[Path]:
    """Embed every tile of ``config.data`` with each backbone (see :func:`embed`); returns the cache paths."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    c = config
    data, backbones, weights, random_init, tta, device = c.data, c.backbones, c.weights, c.random_init, c.tta, c.device
    batch_size, num_workers, dtype, cache_dir, skip_bad = c.batch_size, c.num_workers, c.dtype, c.cache_dir, c.skip_bad
    progress, wait_s, max_batches, shard, keep_models, decode = (c.progress, c.wait_s, c.max_batches, c.shard,
                                                                 c.keep_models, c.decode)
    t_call = time.perf_counter()
    full = data if isinstance(data, TileTable) else read_table(data)
    dev = resolve_device(device)
    decoder = resolve_decoder(decode, dev)
    weights = weights or {}
    shard_attrs = {}
    table = full
    if shard is not None:
        from featurize.engine.shards import shard_path, shard_rows

        index, count = shard
        if not 0 <= index < count:
            raise UsageError(f"--shard {index}/{count}: need 0 <= I < N.")
        start, stop = shard_rows(len(full), batch_size, index, count)
        table = full.rows(start, stop)
        shard_attrs = {"shard_index": index, "shard_count": count, "shard_start": start, "shard_stop": stop,
                       "table_rows": len(full), "table_row_fingerprint": full.fingerprint(), "batch_size": batch_size}
    paths = table.sources

    jobs: list[_Job] = []
    for name in dict.fromkeys(backbones):
        key = _cache_key(full.cache_folder, name, weights, random_init, tta, dtype, dev, decoder)
        final = cache_path(cache_dir, key)
        jobs.append(_Job(key.spec, key.weights, key, shard_path(final, *shard) if shard is not None else final))

    with ExitStack() as stack:
        todo: list[_Job] = []
        previous: dict[str, tuple[Path, Any] | None] = {}
        for job in jobs:
            stack.enter_context(file_lock(lock_path(job.final), wait_s))
            previous[job.spec.name] = None
            if job.final.exists():
                plan = plan_if_complete(table, job.final)
                sealed = plan is not None and read_attrs(job.final).get("sealed")
                problems = verify_cache(job.final) if plan is not None and sealed else []
                if problems:  # every checksum is read before "up to date": a damaged file is rebuilt
                    plan = None
                if plan is not None and plan.identical() and sealed:
                    update_stats(job.final, plan.new_stats)
                    say(f"[embed] {job.spec.name}: up to date, {job.final}")
                    continue
                if plan is not None:  # its rows are reused, from this plan (tiles are not hashed twice)
                    previous[job.spec.name] = (job.final, plan)
                    if not sealed:
                        warn(f"[embed] {job.spec.name}: {job.final.name} has no checksums (an older hexpress): "
                              "copying its rows into a checksummed file")
                else:
                    problem = (problems or verify_cache(job.final) or ["unreadable"])[0]
                    warn(f"[embed] {job.spec.name}: {job.final.name} is damaged ({problem}); rebuilding it")
                    job.final.unlink()
            elif shard is not None:  # a shard reuses the rows of an existing standard cache
                whole = cache_path(cache_dir, job.key)
                plan = plan_if_complete(table, whole)
                if plan is not None:
                    previous[job.spec.name] = (whole, plan)
            if previous[job.spec.name] is None and not job.final.exists():
                # the same embedding of a table of the same name elsewhere (moved, copied, or from before
                # per-path folders): its rows with the same ID and tile content are copied, not embedded again
                for other in sibling_caches(cache_dir, table, job.final.name):
                    plan = plan_if_complete(table, other)
                    if plan is not None and len(plan.todo) < len(table):
                        previous[job.spec.name] = (other, plan)
                        break
            todo.append(job)
        if not todo:
            return [j.final for j in jobs]
        for job in todo:
            job.writer = CacheWriter(job.final, job.key, table.ids, job.spec.embed_dim, paths=paths,
                                     extra_attrs=shard_attrs)
            stack.callback(job.writer.close)
            resumed = job.writer.partial.exists()
            job.todo = job.writer.open(*(previous[job.spec.name] or (None, None)))
            if len(job.todo):  # a job whose rows were all reused never builds its network
                mkey = (job.spec, job.weights, str(dev))
                job.model = _MODELS.get(mkey) if keep_models else None
                if job.model is None:
                    job.model = create_backbone(job.spec, job.weights).to(dev)
                    if keep_models:
                        _MODELS[mkey] = job.model
            n_done = len(table) - len(job.todo)
            if resumed and n_done and len(job.todo):
                say(f"[embed] {job.spec.name}: resuming at row {int(job.todo[0])} ({n_done} of {len(table)} rows done)")
            elif job.writer.reused:
                say(f"[embed] {job.spec.name}: {job.writer.reused} rows reused from {job.final.name} (same ID and tile "
                      f"content), {len(job.todo)} to embed")
            if job.weights.random_init:
                warn(f"[embed] {job.spec.name}: RANDOM-INIT weights (asked for); recorded in the cache.")
        n = len(table)
        need = np.zeros((len(todo), n), dtype=bool)
        for k, job in enumerate(todo):
            need[k, job.todo] = True
        rows_todo = np.flatnonzero(need.any(axis=0))
        keys = sorted({j.spec.preprocess_key for j in todo})
        dataset = TileDataset(paths, keys, device_jpeg=decoder != "pil")
        if num_workers is None:  # on CPU the workers share cores with the forward pass; on a GPU decoding is the CPU's job
            num_workers = min(4 if dev.type == "cpu" else 12, max(1, (os.cpu_count() or 2) - 1))
        loader = DataLoader(
            Subset(dataset, rows_todo.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers,
            collate_fn=collate, pin_memory=dev.type == "cuda", persistent_workers=False, worker_init_fn=_worker_init,
            prefetch_factor=4 if num_workers else None,
        )
        skipped: list[tuple[int, str]] = []
        micro = {j.spec.name: [batch_size] for j in todo}
        batches = iter(loader)  # the decode workers fork here, before the writer thread exists
        stager = Stager(keys, dev, paths)
        writes = WriteBehind()
        stack.callback(writes.abort)  # runs before the writers close: queued batches are written first

        def compute(st) -> None:
            if st.bad and not skip_bad:
                row, err = st.bad[0]
                raise ImageError(f"{err} (row {row + 2} of {table.source}; nothing was marked complete)")
            skipped.extend(st.bad)
            stager.wait(st)
            for k, job in enumerate(todo):
                sel = need[k, st.rows]
                if not sel.any():
                    continue
                jrows = st.rows[sel]
                good = np.isin(jrows, st.good)
                out = None
                if good.any():
                    take = np.searchsorted(st.good, jrows[good])  # st.good is sorted
                    batch = st.pixels[job.spec.preprocess_key]
                    if len(take) != len(batch):
                        batch = batch[torch.as_tensor(take, device=batch.device)]
                    out = to_host(_embed_batch(job, batch, dev, tta, micro[job.spec.name]))
                digests = [d for d, s_ in zip(st.digests, sel) if s_]
                writes.submit(partial(_write_rows, job.writer, jrows, good, out, job.spec.embed_dim, digests,
                                      st.stats[sel]), 0)
            writes.submit(lambda: None, len(st.rows))  # the batch is written once every cache's rows are

        bar = tqdm(total=len(rows_todo), unit="tile", disable=not progress, desc="embed", dynamic_ncols=True)
        finished = 0
        with torch.inference_mode():
            item = next(batches, None)
            cur = stager.stage(item) if item is not None else None
            b = 0
            while cur is not None and (max_batches is None or b < max_batches):
                item = next(batches, None) if max_batches is None or b + 1 < max_batches else None
                nxt = stager.stage(item) if item is not None else None  # overlaps this batch's forward pass
                compute(cur)
                finished += len(cur.rows)
                bar.update(len(cur.rows))
                bar.set_postfix(tiles_s=f"{finished / max(time.perf_counter() - t_call, 1e-9):.1f}")
                cur, b = nxt, b + 1
        writes.close()
        bar.close()
        _report(stats, t_call, writes, stager, decoder, finished, quiet=not progress)
        if finished < len(rows_todo):
            return []
        if skipped:
            for job in todo:
                report = job.final.with_name(job.final.name + ".skipped.txt")
                report.write_text("".join(f"{table.ids[i]}\t{table.paths[i]}\t{e}\n" for i, e in skipped))
            warn(f"[embed] skipped {len(skipped)} unreadable tiles (--skip-bad); list next to each cache (*.skipped.txt).")
        for job in todo:
            job.writer.finalize()
    if shard is not None:
        return [_merge_if_last(cache_path(cache_dir, j.key), full, wait_s) or j.final for j in jobs]
    return [j.final for j in jobs]


def _report(stats: dict | None, t_call: float, writes: WriteBehind, stager: Stager, decoder: str, rows: int,
            quiet: bool) -> None:
    """The run's timings apart (first batch: model build, device init, first decode; then the steady rate)."""
    now = time.perf_counter()
    first = (writes.first_done - t_call) if writes.first_done is not None else now - t_call
    rest = rows - writes.rows_first
    steady = rest / max(now - writes.first_done, 1e-9) if writes.first_done is not None and rest > 0 else None
    counts = {k: int(stager.counts.get(k, 0)) for k in ("pil", "device", "fallback")}
    info = {"rows": rows, "seconds": now - t_call, "first_batch_s": first, "steady_tiles_s": steady,
            "decoder": decoder, "decoded": counts}
    if stats is not None:
        stats.update(info)
    if quiet or not rows:
        return
    rate = f", then {steady:,.1f} tiles/s" if steady is not None else ""
    how = f"; decoded on the device ({decoder}): {counts['device']:,}, by Pillow: {counts['pil'] + counts['fallback']:,}" \
        + (f" ({counts['fallback']:,} after the device decoder refused them)" if counts["fallback"] else "") \
        if decoder != "pil" else ""
    say(f"[embed] {rows:,} tiles in {now - t_call:.1f} s: first batch after {first:.1f} s (model build, device "
          f"init){rate}{how}")


def _merge_if_last(final: Path, table: TileTable, wait_s: float) -> Path | None:
    """Merge the standard cache when every shard is complete (under its lock); None when not yet."""
    from featurize.engine.shards import merge_shards, ready_to_merge

    if not ready_to_merge(final):
        return None
    try:
        path = merge_shards(final, table, wait_s=wait_s, unless_done=True)
    except CacheError as exc:
        if "another hexpress process" in str(exc):
            return None  # another shard's process is merging right now
        raise
    say(f"[embed] all shards done: merged {path}")
    return path
