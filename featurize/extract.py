"""The embed engine: decode each tile once, feed every backbone, write caches.

One pass over the table serves several backbones: workers decode a tile and
resize it once per distinct ``(size, interpolation)``; each backbone takes
its uint8 batch, normalises it on the device, runs (optionally 8-fold TTA)
and writes its rows.  Batches are aligned to ``batch_size`` from row 0, so an
interrupted run resumes at the last flushed batch and ends with exactly the
features of an uninterrupted one.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featurize.backbones import BackboneSpec, get_spec
from featurize.cache import CacheKey, CacheWriter, cache_path, lock_path, read_attrs
from featurize.device import resolve_device
from featurize.errors import CacheError, ImageError, UsageError
from featurize.images import load_rgb
from featurize.lock import file_lock
from featurize.table import TileTable, read_table
from featurize.transforms import DIHEDRAL, dihedral, normalize, resize_uint8
from featurize.weights import ResolvedWeights, create_backbone, extract, resolve_weights


class TileDataset:
    """Map-style dataset: index -> (index, {key: uint8 CHW} or None, error or None)."""

    def __init__(self, paths: Sequence[Path], keys: Sequence[tuple[int, str]]):
        self.paths = list(paths)
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_rgb(self.paths[i])
        except ImageError as exc:
            return i, None, str(exc)
        return i, {k: resize_uint8(img, k) for k in self.keys}, None


def _worker_init(_: int) -> None:
    """Decoding workers use one thread each: the cores belong to the forward pass."""
    import torch

    torch.set_num_threads(1)


def collate(items):
    """Stack good tiles per key; keep the indices and errors of bad ones."""
    import torch

    good = [(i, t) for i, t, e in items if e is None]
    bad = [(i, e) for i, t, e in items if e is not None]
    index = torch.tensor([i for i, _ in good], dtype=torch.long)
    tensors = {k: torch.stack([t[k] for _, t in good]) for k in (good[0][1] if good else {})}
    return index, tensors, bad


@dataclass
class _Job:
    spec: BackboneSpec
    weights: ResolvedWeights
    key: CacheKey
    final: Path
    model: Any = None
    writer: CacheWriter | None = None
    start: int = 0


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
    """Forward one batch, halving the micro-batch on CUDA out-of-memory."""
    import torch

    while True:
        try:
            parts = []
            for s in range(0, len(batch_u8), micro[0]):
                x = normalize(batch_u8[s : s + micro[0]].to(device, non_blocking=True), job.spec)
                with autocast(device, job.spec):
                    parts.append(_forward(job.model, job.spec, x, tta))
            return torch.cat(parts).cpu().numpy()
        except torch.OutOfMemoryError:
            if micro[0] <= 1:
                raise
            micro[0] //= 2
            torch.cuda.empty_cache()
            print(f"[embed] CUDA out of memory: batch size halved to {micro[0]}", file=sys.stderr)


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
) -> list[Path]:
    """Embed every tile of ``data`` with each backbone; returns the cache paths.

    Caches already complete for the same fingerprint are reused untouched.
    ``max_batches`` stops early (testing interruption); the partial file is
    then left for the next run to resume.
    """
    import torch
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    if tta not in (1, DIHEDRAL):
        raise UsageError(f"--tta must be 1 or {DIHEDRAL}, got {tta}.")
    if dtype not in ("float16", "float32"):
        raise UsageError(f"--dtype must be float16 or float32, got {dtype}.")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1.")
    table = data if isinstance(data, TileTable) else read_table(data)
    dev = resolve_device(device)
    weights = weights or {}
    table_fp = table.fingerprint()

    jobs: list[_Job] = []
    for name in dict.fromkeys(backbones):
        spec = get_spec(name)
        w = resolve_weights(spec, weights.get(name), random_init)
        key = CacheKey(table.name, table_fp, spec, w, tta, dtype, compute_dtype(dev, spec))
        jobs.append(_Job(spec, w, key, cache_path(cache_dir, key)))

    with ExitStack() as stack:
        todo: list[_Job] = []
        for job in jobs:
            stack.enter_context(file_lock(lock_path(job.final), wait_s))
            if job.final.exists():
                try:
                    if read_attrs(job.final).get("complete"):
                        print(f"[embed] {job.spec.name}: up to date, {job.final}", file=sys.stderr)
                        continue
                except CacheError:
                    pass
                job.final.unlink()
            todo.append(job)
        if not todo:
            return [j.final for j in jobs]
        for job in todo:
            job.model = create_backbone(job.spec, job.weights).to(dev)
            job.writer = CacheWriter(job.final, job.key, table.ids, job.spec.embed_dim)
            stack.callback(job.writer.close)
            job.start = job.writer.open()
            if job.start:
                print(f"[embed] {job.spec.name}: resuming at row {job.start} of {len(table)}", file=sys.stderr)
            if job.weights.random_init:
                print(f"[embed] {job.spec.name}: RANDOM-INIT weights (asked for); recorded in the cache.", file=sys.stderr)
        n = len(table)
        start = min(j.start for j in todo)
        start -= start % batch_size
        keys = sorted({j.spec.preprocess_key for j in todo})
        dataset = TileDataset(table.paths, keys)
        if num_workers is None:  # on CPU the workers share cores with the forward pass; on a GPU decoding is the CPU's job
            num_workers = min(4 if dev.type == "cpu" else 12, max(1, (os.cpu_count() or 2) - 1))
        loader = DataLoader(
            Subset(dataset, range(start, n)), batch_size=batch_size, shuffle=False, num_workers=num_workers,
            collate_fn=collate, pin_memory=dev.type == "cuda", persistent_workers=False, worker_init_fn=_worker_init,
            prefetch_factor=4 if num_workers else None,
        )
        skipped: list[tuple[int, str]] = []
        micro = {j.spec.name: [batch_size] for j in todo}
        t0 = time.perf_counter()
        bar = tqdm(total=n, initial=start, unit="tile", disable=not progress, desc="embed", dynamic_ncols=True)
        row = start
        with torch.inference_mode():
            for b, (index, tensors, bad) in enumerate(loader):
                if max_batches is not None and b >= max_batches:
                    break
                if bad and not skip_bad:
                    raise ImageError(f"{bad[0][1]} (row {bad[0][0] + 2} of {table.source}; nothing was marked complete)")
                skipped.extend(bad)
                size = len(index) + len(bad)
                valid = np.ones(size, bool)
                if bad:
                    valid[[i - row for i, _ in bad]] = False
                for job in todo:
                    if row + size <= job.start:
                        continue
                    feats = np.zeros((size, job.spec.embed_dim), np.float32)
                    if len(index):
                        feats[(index - row).numpy()] = _embed_batch(job, tensors[job.spec.preprocess_key], dev, tta, micro[job.spec.name])
                    job.writer.write(row, feats, valid)
                row += size
                bar.update(size)
                bar.set_postfix(tiles_s=f"{(row - start) / max(time.perf_counter() - t0, 1e-9):.1f}")
        bar.close()
        if row < n:
            return []
        if skipped:
            for job in todo:
                report = job.final.with_name(job.final.name + ".skipped.txt")
                report.write_text("".join(f"{table.ids[i]}\t{table.paths[i]}\t{e}\n" for i, e in skipped))
            print(f"[embed] skipped {len(skipped)} unreadable tiles (--skip-bad); list next to each cache (*.skipped.txt).", file=sys.stderr)
        for job in todo:
            job.writer.finalize()
    return [j.final for j in jobs]
