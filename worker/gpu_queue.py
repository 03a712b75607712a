"""The GPU queue: one executor thread that batches compatible pending plans.

Jobs are submitted from any thread or event loop and get a ``concurrent.futures.Future``. A
single thread owns the GPU: it takes the oldest pending job, adds every other pending job with
the same ``Plan.shape_key`` (same mode, size, checkpoint, scheduler, guidance, strength) up to
``max_batch_images``, and runs them as one batch. Jobs arrive while the GPU is busy, so batches
form by themselves under load, with no waiting window added to a lone job's latency.

If a batch fails, each of its jobs is re-run alone, so one bad job fails by itself and the
others complete. Pure threading, no torch: the generation function is injected
(``pipeline.Engine.generate`` in the worker, fakes in tests).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from worker.plan import BatchStep, Plan, StepCallback

log = logging.getLogger(__name__)

BatchFn = Callable[[Sequence[Plan], BatchStep | None], list[list[Any]]]


@dataclass(frozen=True)
class BatchResult:
    """What a job's future resolves to: its images and how its batch ran."""

    images: list[Any]
    started: float  # perf_counter() when its batch reached the GPU
    seconds: float  # the batch's generation time
    batch_jobs: int  # jobs in that batch


@dataclass(eq=False)  # identity: comparing plans would compare their init images' pixels
class Pending:
    """A submitted job waiting for the GPU."""

    plan: Plan
    on_step: StepCallback | None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


def _fan_out(batch: list[Pending]) -> BatchStep | None:
    """One step callback that reports progress to every job of a batch, each with the preview
    of its own first image; one failing is ignored."""
    jobs, offset = [], 0
    for pending in batch:
        if pending.on_step is not None:
            jobs.append((pending.on_step, offset))
        offset += len(pending.plan.seeds)
    if not jobs:
        return None

    def report(done: int, total: int, preview: Callable[[int], bytes] | None = None) -> None:
        for callback, first in jobs:
            own = None if preview is None else functools.partial(preview, first)
            try:
                callback(done, total, own)
            except Exception:  # noqa: BLE001 - progress is best effort, never a job failure
                log.warning("progress callback failed", exc_info=True)

    return report


class GpuWorker:
    """The GPU executor thread and its queue of pending jobs."""

    def __init__(self, run_batch: BatchFn, max_batch_images: int = 8) -> None:
        self._run_batch = run_batch
        self._max_images = max_batch_images
        self._inbox: queue.Queue[Pending | None] = queue.Queue()
        self._waiting: list[Pending] = []  # taken from the inbox, not yet run (oldest first)
        self.batches_run = 0
        self._thread = threading.Thread(target=self._loop, name="gpu", daemon=True)
        self._thread.start()

    def submit(self, plan: Plan, on_step: StepCallback | None = None) -> Future:
        """Queue ``plan``; the future resolves to a ``BatchResult`` (or the job's exception)."""
        pending = Pending(plan, on_step)
        self._inbox.put(pending)
        return pending.future

    def close(self, timeout: float | None = None) -> None:
        self._inbox.put(None)
        self._thread.join(timeout)

    def _next_batch(self) -> list[Pending] | None:
        """Block for work; then the oldest job plus every compatible one that fits."""
        if not self._waiting:
            item = self._inbox.get()
            if item is None:
                return None
            self._waiting.append(item)
        while True:  # drain everything that arrived meanwhile
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._inbox.put(None)  # stop after this batch
                break
            self._waiting.append(item)
        first = self._waiting[0]
        batch, images = [], 0
        for pending in self._waiting:
            size = len(pending.plan.seeds)
            if pending.plan.shape_key == first.plan.shape_key and (
                    not batch or images + size <= self._max_images):
                batch.append(pending)
                images += size
        self._waiting = [p for p in self._waiting if p not in batch]
        return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Pending]) -> None:
        started = time.perf_counter()
        try:
            results = self._run_batch([p.plan for p in batch], _fan_out(batch))
        except BaseException as exc:  # noqa: BLE001 - a dead GPU thread would hang every job
            if not isinstance(exc, Exception) or len(batch) == 1:
                for pending in batch:
                    pending.future.set_exception(exc)
                return
            log.warning("batch of %d jobs failed (%s): re-running each alone", len(batch),
                        type(exc).__name__)
            for pending in batch:
                self._run([pending])
            return
        seconds = time.perf_counter() - started
        self.batches_run += 1
        for pending, images in zip(batch, results, strict=True):
            pending.future.set_result(BatchResult(images, started, seconds, len(batch)))
