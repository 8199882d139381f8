"""The embed loop's overlap: stage the next batch while this one computes, write behind.

* :class:`Stager` turns a loader batch into device pixels: the pinned uint8
  tensors the workers decoded are copied with non-blocking copies, JPEGs left
  to the device decoder are decoded and resized there, and everything is put
  in table-row order.  On CUDA it works on a side stream and records an event;
  the forward pass waits on that event only, so the copy and decode of batch
  b+1 overlap the forward pass of batch b.
* :func:`to_host` brings features back into pinned host memory with a
  non-blocking copy and an event.
* :class:`WriteBehind` runs the HDF5 writes in one thread, in submission
  order, each after its batch's event: the write of batch b overlaps the
  compute of batch b+1.  A bounded queue keeps memory flat; the first write
  error is raised in the embed loop; :meth:`WriteBehind.close` waits for every
  queued write, so an interrupted run keeps every batch it computed.

On CPU the same code runs without streams or events.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from featurize.engine.decode import decode_jpegs, resize_on_device
from core.errors import ImageError
from featurize.tables.images import load_rgb
from featurize.models.transforms import resize_uint8


@dataclass
class Staged:
    """One batch on the compute device: its rows, and the pixels of those that decoded."""

    rows: np.ndarray  # table rows of the batch, increasing
    digests: list
    stats: np.ndarray
    bad: list  # (row, error) of tiles that could not be decoded
    good: np.ndarray  # rows with pixels, increasing
    pixels: dict  # preprocessing key -> uint8 NCHW on the device, aligned with ``good``
    ready: Any = None  # CUDA event recorded after the staging work


@dataclass
class Stager:
    keys: Sequence[tuple]
    device: Any
    paths: Sequence[Path]
    counts: Counter = field(default_factory=Counter)  # tiles decoded: "pil" (workers), "device", "fallback"

    def __post_init__(self):
        import torch

        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def stage(self, item) -> Staged:
        import torch

        rows, index, tensors, bad, digests, stats, jrows, jbytes, offsets = item
        bad = list(bad)
        parts: list[tuple[np.ndarray, dict]] = []
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            if len(index):
                parts.append((index.numpy(), {k: t.to(self.device, non_blocking=True) for k, t in tensors.items()}))
                self.counts["pil"] += len(index)
            if len(jrows):
                chunks = [jbytes[int(a) : int(b)] for a, b in zip(offsets[:-1], offsets[1:])]
                images = decode_jpegs(chunks, self.device)
                ok = [j for j, im in enumerate(images) if im is not None]
                if ok:
                    parts.append((jrows[ok], {k: resize_on_device([images[j] for j in ok], k) for k in self.keys}))
                    self.counts["device"] += len(ok)
                fell = self._pillow([(int(jrows[j]), chunks[j]) for j, im in enumerate(images) if im is None], bad)
                if fell is not None:
                    parts.append(fell)
            good, pixels = _merge(parts, self.keys, self.device)
            ready = None
            if self._stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._stream)
        return Staged(rows, digests, stats, sorted(bad), good, pixels, ready)

    def _pillow(self, failed: list[tuple[int, Any]], bad: list):
        """JPEGs the device decoder rejected, decoded by Pillow; the ones Pillow rejects too join ``bad``."""
        done: list[tuple[int, dict]] = []
        for row, chunk in failed:
            try:
                img = load_rgb(self.paths[row], chunk.numpy().tobytes())
            except ImageError as exc:
                bad.append((row, str(exc)))
                continue
            done.append((row, {k: resize_uint8(img, k).to(self.device) for k in self.keys}))
        if not done:
            return None
        import torch

        self.counts["fallback"] += len(done)
        return (np.array([r for r, _ in done], dtype=np.int64),
                {k: torch.stack([t[k] for _, t in done]) for k in self.keys})

    def wait(self, staged: Staged) -> None:
        """Make the compute stream wait for ``staged``'s copies and decodes (nothing to do on CPU)."""
        if staged.ready is None:
            return
        import torch

        current = torch.cuda.current_stream(self.device)
        current.wait_event(staged.ready)
        for t in staged.pixels.values():
            t.record_stream(current)  # allocated on the side stream, used on this one


def _merge(parts: list[tuple[np.ndarray, dict]], keys: Sequence[tuple], device):
    """Concatenate the parts' pixels per key and sort them by table row."""
    import torch

    if not parts:
        return np.empty(0, dtype=np.int64), {}
    good = np.concatenate([r for r, _ in parts])
    if len(parts) == 1:
        return good, parts[0][1]
    order = np.argsort(good, kind="stable")
    perm = torch.as_tensor(order, device=device)
    return good[order], {k: torch.cat([p[k] for _, p in parts])[perm] for k in keys}


def to_host(feats):
    """Device features -> (host tensor, event to wait for, or None): a non-blocking copy into pinned memory on CUDA."""
    if feats.device.type != "cuda":
        return feats, None
    import torch

    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    host.copy_(feats, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class WriteBehind:
    """Cache writes in one background thread, in submission order, at most ``depth`` batches queued."""

    def __init__(self, depth: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.rows_written = 0
        self.first_done: float | None = None  # perf_counter when the first batch was written
        self.rows_first = 0
        self._thread = threading.Thread(target=self._run, name="hexpress-cache-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None], rows: int) -> None:
        self._raise()
        self._queue.put((fn, rows))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # after a failure nothing more is written; the loop raises it
            fn, rows = item
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the embed loop, which raises it
                self._error = exc
                continue
            self.rows_written += rows
            if self.first_done is None and rows:  # the end-of-batch marker carries the batch's rows
                self.first_done, self.rows_first = time.perf_counter(), rows

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """Wait for every queued write; raise the first write error, if any."""
        self.abort()
        self._raise()

    def abort(self) -> None:
        """On the error path: finish the queued writes (they are good rows), raise nothing."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
