"""The GPU queue: which jobs share a batch, failures, cancellation and progress (fake batches;
that batched images equal lone ones on the real pipeline is tested in tests/integration)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from worker.gpu_queue import BatchResult, GpuWorker
from worker.plan import Plan

WAIT = 60  # seconds; a bound on every wait, never an assertion on speed


def plan(seed: int, prompt: str = "a cat", side: int = 512, images: int = 1,
         guidance: float = 0.0) -> Plan:
    return Plan(prompt=prompt, negative_prompt=None, width=side, height=side, steps=4,
                guidance_scale=guidance, seeds=tuple(range(seed, seed + images)))


class GatedFake:
    """A batch function that records each batch and holds the first one until released."""

    def __init__(self, fail_prompt: str | None = None) -> None:
        self.batches: list[list[Plan]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_prompt = fail_prompt

    def __call__(self, plans: Sequence[Plan], on_step) -> list[list[str]]:
        self.entered.set()
        self.release.wait(WAIT)
        self.batches.append(list(plans))
        if self.fail_prompt and any(p.prompt == self.fail_prompt for p in plans):
            raise RuntimeError("this job breaks its batch")
        return [[f"{p.prompt}:{s}" for s in p.seeds] for p in plans]


def submit_while_busy(worker: GpuWorker, fake: GatedFake, plans: list[Plan]) -> list:
    """Occupy the GPU with one job, queue ``plans`` behind it, then let everything run."""
    blocker = worker.submit(plan(999, prompt="blocker"))
    assert fake.entered.wait(WAIT)  # the GPU thread holds the blocker: the rest must queue
    futures = [worker.submit(p) for p in plans]
    fake.release.set()
    blocker.result(WAIT)
    return [f.result(WAIT) if f.exception(WAIT) is None else f.exception() for f in futures]


class TestBatchFormation:
    def test_compatible_jobs_queued_together_share_one_batch(self) -> None:
        fake = GatedFake()
        worker = GpuWorker(fake)
        results = submit_while_busy(worker, fake, [plan(1), plan(2), plan(3, images=2)])
        assert [len(b) for b in fake.batches] == [1, 3]
        assert [r.images for r in results] == [["a cat:1"], ["a cat:2"], ["a cat:3", "a cat:4"]]
        assert all(isinstance(r, BatchResult) and r.batch_jobs == 3 for r in results)
        worker.close(WAIT)

    def test_jobs_of_different_shapes_are_never_batched_together(self) -> None:
        fake = GatedFake()
        worker = GpuWorker(fake)
        plans = [plan(1), plan(2, side=768), plan(3), plan(4, guidance=2.0), plan(5, side=768)]
        submit_while_busy(worker, fake, plans)
        for batch in fake.batches:
            assert len({p.shape_key for p in batch}) == 1
        assert sorted(len(b) for b in fake.batches[1:]) == [1, 2, 2]
        worker.close(WAIT)

    def test_oldest_job_runs_first(self) -> None:
        fake = GatedFake()
        worker = GpuWorker(fake)
        submit_while_busy(worker, fake, [plan(1, side=768), plan(2), plan(3, side=768)])
        assert [p.seeds[0] for p in fake.batches[1]] == [1, 3]
        worker.close(WAIT)

    def test_batch_size_is_capped_in_images(self) -> None:
        fake = GatedFake()
        worker = GpuWorker(fake, max_batch_images=4)
        submit_while_busy(worker, fake, [plan(i * 10, images=3) for i in range(3)])
        assert [sum(len(p.seeds) for p in b) for b in fake.batches[1:]] == [3, 3, 3]
        worker.close(WAIT)


class TestFailures:
    def test_a_failing_job_fails_alone_and_the_others_complete(self) -> None:
        fake = GatedFake(fail_prompt="boom")
        worker = GpuWorker(fake)
        results = submit_while_busy(worker, fake, [plan(1), plan(2, prompt="boom"), plan(3)])
        assert results[0].images == ["a cat:1"] and results[2].images == ["a cat:3"]
        assert isinstance(results[1], RuntimeError)
        worker.close(WAIT)

    def test_worker_keeps_serving_after_a_failure(self) -> None:
        fake = GatedFake(fail_prompt="boom")
        fake.release.set()
        worker = GpuWorker(fake)
        assert isinstance(worker.submit(plan(1, prompt="boom")).exception(WAIT), RuntimeError)
        assert worker.submit(plan(2)).result(WAIT).images == ["a cat:2"]
        worker.close(WAIT)

    def test_progress_reaches_every_job_of_a_batch(self) -> None:
        seen: dict[str, list[int]] = {"a": [], "b": []}

        def run(plans: Sequence[Plan], on_step) -> list[list[str]]:
            for step in (1, 2, 3, 4):
                on_step(step, 4, None)
            return [["x"] * len(p.seeds) for p in plans]

        worker = GpuWorker(run)
        fa = worker.submit(plan(1), lambda d, t, preview: seen["a"].append(d))
        fb = worker.submit(plan(2), lambda d, t, preview: seen["b"].append(d))
        fa.result(WAIT), fb.result(WAIT)
        assert seen == {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4]}
        worker.close(WAIT)

    def test_each_job_previews_its_own_first_image(self) -> None:
        gate, previews = threading.Event(), {}

        def run(plans: Sequence[Plan], on_step) -> list[list[str]]:
            gate.wait(WAIT)
            if on_step is not None:
                on_step(1, 1, lambda index: f"image {index} of the batch".encode())
            return [["x"] * len(p.seeds) for p in plans]

        worker = GpuWorker(run)
        blocker = worker.submit(replace(plan(1), width=768))  # holds the GPU: the rest batch
        jobs = {name: replace(plan(1), seeds=seeds) for name, seeds in
                (("a", (1, 2, 3)), ("b", (7,)), ("c", (9, 10)))}
        futures = [worker.submit(p, lambda d, t, preview, name=name: previews.update(
            {name: preview()})) for name, p in jobs.items()]
        gate.set()
        blocker.result(WAIT)
        assert all(f.result(WAIT).batch_jobs == 3 for f in futures)
        assert previews == {"a": b"image 0 of the batch", "b": b"image 3 of the batch",
                            "c": b"image 4 of the batch"}
        worker.close(WAIT)


class TestCancellation:
    def test_cancelled_job_that_has_not_started_never_runs(self) -> None:
        ran: list[tuple[int, ...]] = []
        gate = threading.Event()
        entered = threading.Event()

        def run_batch(plans: Any, on_step: Any) -> list[list[str]]:
            entered.set()
            gate.wait(WAIT)
            ran.extend(p.seeds for p in plans)
            return [["x"] * len(p.seeds) for p in plans]

        worker = GpuWorker(run_batch)
        first = worker.submit(plan(1))
        assert entered.wait(WAIT)
        second = worker.submit(plan(2))
        assert second.cancel()  # what asyncio does when RunPod cancels or times out the job
        gate.set()
        first.result(WAIT)
        worker.submit(plan(3)).result(WAIT)
        assert ran == [(1,), (3,)]
        worker.close(WAIT)

    def test_a_base_exception_fails_its_jobs_and_the_gpu_thread_lives_on(self) -> None:
        calls: list[int] = []

        def run_batch(plans: Any, on_step: Any) -> list[list[str]]:
            calls.append(len(plans))
            if any(p.prompt == "exit" for p in plans):
                raise SystemExit("a BaseException must not end the GPU thread")
            return [["x"] * len(p.seeds) for p in plans]

        worker = GpuWorker(run_batch)
        assert isinstance(worker.submit(plan(1, prompt="exit")).exception(WAIT), SystemExit)
        assert worker.submit(plan(2)).result(WAIT).images == ["x"]
        worker.close(WAIT)
