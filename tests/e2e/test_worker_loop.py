"""The real production worker loop: ``python handler.py`` against a fake RunPod job API.

The worker runs as RunPod runs it: a subprocess with the platform's environment variables
(``fake_runpod.FakeRunPod.worker_env``), so the runpod SDK takes jobs from the job-take
endpoints, runs up to ``MAX_CONCURRENCY`` handlers at once, posts results, progress and
heartbeats, and obeys stop signals, all over HTTP on 127.0.0.1. The model is the tiny one
(the ``tiny_model_dir`` fixture).

- ``TestLoad``: a few hundred jobs; none lost or duplicated, each result is its own job's (seeds,
  parameters, and for a few jobs the very pixels of an in-process run), and jobs were batched.
- ``TestFaults``: faults in that loop each fail only their job, with the right error, and the
  worker serves the next job. Faults that cannot be caused from outside (out of memory, a NaN
  decode, an internal error, a long generation to cancel) come from a TEST-ONLY wrapper,
  ``tests/e2e/fault_worker.py``: it imports ``handler``, wraps the engine's ``run_batch`` and the
  VAE's decode to misbehave when a prompt carries a ``FAULT_*`` marker, then runs
  ``handler.main()``, so the start-up config is exactly the worker's. Cancels and timeouts arrive
  as RunPod sends them: on the SDK's job-stop channel (``policy.executionTimeout`` is enforced by
  the platform, not by the SDK).

Every wait is bounded and every worker is killed (its whole process group) in a finally.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support.fake_runpod import FakeRunPod, JobRecord
from tests.support.loopback import free_port
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MAX_CONCURRENCY = 4
STARTUP_S = 300  # model load and warm-up, on a busy 2-core machine
LOAD_JOBS = 200
LOAD_DEADLINE_S = 1200  # ~0.7 s an image here: 200 jobs take ~3-5 minutes
DATA_URI = re.compile(r"data:image/(png|jpeg|webp);base64,([A-Za-z0-9+/=]+)")
# The worker's own settings: none leaks in from the test's environment.
WORKER_SETTINGS = frozenset(Settings.ENV)
# handler.py's line for every served job.
SERVED = re.compile(r"job (\S+): \w+ \d+x\d+, \d+ step\(s\), \d+ image\(s\), seed \d+: .*"
                    r"\(batch of (\d+)\)")



# --- the worker process ----------------------------------------------------------------------

class Worker:
    """A worker subprocess in its own process group, its output in a log file."""

    def __init__(self, fake: FakeRunPod, workdir: Path, command: list[str]) -> None:
        self.fake, self.log_path = fake, workdir / "worker.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RUNPOD_", "BUCKET_")) and k not in WORKER_SETTINGS}
        env.update(fake.worker_env())
        env.update({
            "MODEL_DIR": os.environ["MODEL_DIR"], "DOWNLOAD_MISSING_WEIGHTS": "false",
            "MAX_CONCURRENCY": str(MAX_CONCURRENCY), "RUNPOD_LOG_LEVEL": "INFO",
            "RUNPOD_SKIP_GPU_CHECK": "true", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "HOME": str(workdir),  # no ~/.runpod/config.toml: the key comes from the env
            "PYTHONUNBUFFERED": "1"})
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"the worker exited ({self.process.returncode}):\n{self.tail()}")

    def wait_ready(self, timeout: float = STARTUP_S) -> None:
        """Ready = the SDK's loop asked for a job (after model load, warm-up, fitness checks)."""
        deadline = time.monotonic() + timeout
        while not any(r in self.fake.requests for r in ("job-take", "job-take-batch")):
            self.check_alive()
            if time.monotonic() > deadline:
                pytest.fail(f"the worker took no job within {timeout} s:\n{self.tail()}")
            time.sleep(0.2)

    def wait_settled(self, job_ids: list[str], timeout: float) -> None:
        """Every job answered (or stopped) within ``timeout``, the worker alive throughout."""
        deadline = time.monotonic() + timeout
        while missing := self.fake.wait_settled(job_ids, 0):
            self.check_alive()
            if time.monotonic() > deadline:
                pytest.fail(f"{len(missing)} of {len(job_ids)} jobs got no result within "
                            f"{timeout:.0f} s (first: {missing[:5]}):\n{self.tail()}")
            self.fake.wait_settled(missing, min(5.0, max(deadline - time.monotonic(), 0)))

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            self.check_alive()
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} in the worker's log within {timeout} s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (the SDK shuts down gracefully), then SIGKILL; the whole process group."""
        try:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            # The heartbeat process is the worker's child: end whatever is left of the group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        finally:
            self._log.close()


# --- checking results ------------------------------------------------------------------------

def decode_image(uri: str, fmt: str = "png") -> np.ndarray:
    match = DATA_URI.fullmatch(uri)
    assert match and match.group(1) == fmt, uri[:80]
    image = Image.open(io.BytesIO(base64.b64decode(match.group(2), validate=True)))
    assert image.format == fmt.upper()
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def served_in_process(handler: ModuleType, job_input: dict[str, Any]) -> dict[str, Any]:
    """The same job through the handler imported here (no SDK, no batching)."""
    response = asyncio.run(handler.handler({"id": "reference", "input": job_input}))
    assert "images" in response, response
    return response


def assert_same_pixels(handler: ModuleType, result: dict[str, Any],
                       job_input: dict[str, Any]) -> None:
    """Within one 8-bit level of an in-process run: batching changes fp rounding only."""
    reference = served_in_process(handler, job_input)
    for ours, theirs in zip(result["output"]["images"], reference["images"], strict=True):
        assert ours["seed"] == theirs["seed"]
        difference = np.abs(decode_image(ours["image"]) - decode_image(theirs["image"])).max()
        assert difference <= 1, f"seed {ours['seed']}: pixels differ by {difference}"


def assert_serves(record: JobRecord) -> dict[str, Any]:
    """A successful result for the job's own input (seed, parameters, image format and size)."""
    job_input = record.job["input"]
    assert len(record.results) == 1, record.results
    result = record.result
    assert set(result) == {"output"}, {k: str(v)[:200] for k, v in result.items()}
    output = result["output"]
    params, images = output["parameters"], output["images"]
    count = job_input.get("num_images", 1)
    fmt = job_input.get("output_format", "png")
    assert params["prompt"] == job_input["prompt"]
    assert params["seed"] == job_input["seed"]
    assert (params["width"], params["height"]) == (job_input["width"], job_input["height"])
    assert params["num_inference_steps"] == 4 and params["num_images"] == count
    assert params["output_format"] == fmt and params["mode"] == "txt2img"
    assert params["quality"] == (job_input.get("quality", 90) if fmt != "png" else None)
    assert [item["seed"] for item in images] == [job_input["seed"] + i for i in range(count)]
    for item in images:
        pixels = decode_image(item["image"], fmt)
        assert pixels.shape == (job_input["height"], job_input["width"], 3)
    return output


def served_batches(log: str) -> dict[str, int]:
    """Job id -> how many jobs shared its GPU batch, from the handler's own log lines."""
    return {match[1]: int(match[2]) for match in SERVED.finditer(log)}


# --- TestLoad --------------------------------------------------------------------------------

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk, oil painting", "富士山と桜 🦊",
           "a cat", "a very detailed photograph of a busy harbour " * 6]


def load_jobs(count: int) -> dict[str, dict[str, Any]]:
    """512x512 at 4 steps; mostly one image, png; a mix of seeds, prompts and formats."""
    rng = random.Random(20260421)
    jobs = {}
    for i in range(count):
        job_input: dict[str, Any] = {"prompt": PROMPTS[i % len(PROMPTS)], "width": 512,
                                     "height": 512, "num_inference_steps": 4,
                                     "seed": rng.randrange(2**32 - 4)}
        if i % 20 == 7:
            job_input["num_images"] = 2
        if i % 10 == 3:
            job_input.update(output_format="jpeg", quality=80)
        elif i % 10 == 6:
            job_input["output_format"] = "webp"
        jobs[f"load-{i:04d}"] = job_input
    return jobs


@pytest.mark.slow
class TestLoad:
    def test_hundreds_of_jobs_none_lost_none_mixed_up_and_batched(
            self, handler: ModuleType, tmp_path: Path) -> None:
        jobs = load_jobs(LOAD_JOBS)
        with FakeRunPod() as fake:
            for job_id, job_input in jobs.items():
                fake.add(job_id, job_input)
            process = Worker(fake, tmp_path, [sys.executable, "handler.py"])
            try:
                process.wait_ready()
                started = time.monotonic()
                process.wait_settled(list(jobs), LOAD_DEADLINE_S)
                elapsed = time.monotonic() - started
                log = process.log()
            finally:
                process.stop()
        records = fake.jobs
        print(f"{len(jobs)} jobs in {elapsed:.0f} s ({len(jobs) / elapsed:.2f} jobs/s)")

        # None lost, none duplicated, nothing the SDK should not have done.
        assert fake.violations == []
        assert all(r.takes == 1 and len(r.results) == 1 for r in records.values())
        # Each result is its own job's: seed, parameters, format and size...
        outputs = {job_id: assert_serves(records[job_id]) for job_id in jobs}
        # ...distinct seeds gave distinct images (no job got another's picture)...
        uris = [item["image"] for o in outputs.values() for item in o["images"]]
        assert len(set(uris)) == len(uris)
        # ...and the very pixels of an in-process run with the same input.
        for job_id in ("load-0000", "load-0001", "load-0027", "load-0104"):
            assert_same_pixels(handler, records[job_id].result, jobs[job_id])

        # Batching happened: the SDK held MAX_CONCURRENCY jobs and the GPU ran them together.
        batches = served_batches(log)
        assert set(batches) == set(jobs)
        sizes = Counter(batches.values())
        print(f"jobs by batch size: {dict(sorted(sizes.items()))}")
        assert max(sizes) <= MAX_CONCURRENCY
        assert sum(n for size, n in sizes.items() if size > 1) >= len(jobs) // 2, sizes
        assert fake.max_outstanding == MAX_CONCURRENCY
        assert any(int(q.get("batch_size", 1)) > 1 for q in fake.take_params)
        assert all(int(q.get("batch_size", 1)) <= MAX_CONCURRENCY for q in fake.take_params)

        # Progress reached RunPod for every job; heartbeats kept coming during the load, and a
        # job a heartbeat names is one of this worker's. (Whether a ping names any job is the
        # SDK's timing: its ping process reads a snapshot of the jobs in progress, and in runs
        # of the unchanged worker from before the package refactor 0 of 50 pings named one.)
        late = sum(r.progress_after_result for r in records.values())
        named = [ping["job_id"] for ping in fake.pings if ping.get("job_id")]
        print(f"progress updates: {sum(len(r.progress) for r in records.values())}, "
              f"{late} arrived after their job's result; {len(fake.pings)} heartbeats, "
              f"{len(named)} naming jobs")
        for record in records.values():
            assert record.progress, record.job["id"]
            assert all(set(p) == {"step", "steps", "progress"} for p in record.progress)
        assert len(fake.pings) >= max(1.0, elapsed / 4)  # every 1 s (RUNPOD_PING_INTERVAL)
        assert {job for ids in named for job in ids.split(",")} <= set(jobs)


# --- TestFaults ------------------------------------------------------------------------------

class FaultRig:
    """One fault-hook worker and its fake API, shared by TestFaults (start-up is the cost)."""

    def __init__(self, fake: FakeRunPod, worker: Worker, gates: Path) -> None:
        self.fake, self.worker, self.gates = fake, worker, gates
        self._next = 0

    def add(self, job_input: dict[str, Any], **extra: Any) -> str:
        self._next += 1
        return self.fake.add(f"fault-{self._next:03d}", job_input, **extra)

    def batch_behind_gate(self, *inputs: dict[str, Any]) -> list[str]:
        """Jobs that reach the GPU as one batch: a gate job (another shape) takes the GPU first
        and holds it until all of them are queued behind it (MAX_CONCURRENCY - 1 at most: the
        gate holds a slot). Their prompts get a #tag# the gate counts (not [tag]: brackets are
        prompt weighting, and weighted prompts batch only with identical ones)."""
        assert len(inputs) <= MAX_CONCURRENCY - 1
        tag = f"batch{self._next}"
        gate = self.add({"prompt": f"gate FAULT_WAIT_FOR:{tag}:{len(inputs)}", "width": 576,
                         "height": 512, "seed": 1})
        self.wait_started(tag)
        ids = [self.add({**job_input, "prompt": f"{job_input['prompt']} #{tag}#"})
               for job_input in inputs]
        self.settle([gate, *ids])
        assert f"FAULT_HOOK batch of {len(inputs)} image(s)" in self.worker.log()
        assert_serves(self.fake.jobs[gate])
        return ids

    def settle(self, job_ids: list[str], timeout: float = 180) -> None:
        self.worker.wait_settled(job_ids, timeout)

    def result(self, job_id: str) -> dict[str, Any]:
        record = self.fake.jobs[job_id]
        assert len(record.results) == 1, record.results
        return record.result

    def serves_next(self) -> None:
        job_id = self.add(ok(1000 + self._next, "served next"))
        self.settle([job_id])
        assert_serves(self.fake.jobs[job_id])
        assert self.fake.violations == []

    def release(self, name: str) -> None:
        (self.gates / f"{name}.release").touch()

    def wait_started(self, name: str, timeout: float = 120) -> None:
        ok = self.fake.wait_until((self.gates / f"{name}.started").exists, timeout)
        assert ok, f"{name} never reached the GPU:\n{self.worker.tail()}"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[FaultRig]:
    workdir = tmp_path_factory.mktemp("fault-worker")
    gates = workdir / "gates"
    gates.mkdir()
    with FakeRunPod() as fake:
        worker = Worker(fake, workdir,
                        [sys.executable, "-m", "tests.e2e.fault_worker", str(gates)])
        try:
            worker.wait_ready()
            yield FaultRig(fake, worker, gates)
        finally:
            worker.stop()


def ok(seed: int, marker: str = "") -> dict[str, Any]:
    return {"prompt": f"a fox {marker}".strip(), "width": 512, "height": 512, "seed": seed}


@pytest.mark.slow
class TestFaults:
    def test_bad_and_corrupt_inputs_fail_alone(self, rig: FaultRig) -> None:
        corrupt = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20).decode()
        first = rig.add(ok(10))
        bad = rig.add({"prompt": "a fox", "num_images": 9})
        broken = rig.add({**ok(11), "image": corrupt})
        no_image = rig.add({**ok(12), "mask": corrupt})
        last = rig.add(ok(13))
        rig.settle([first, bad, broken, no_image, last])
        assert rig.result(bad)["error"].startswith(
            "invalid input: num_images=9 is invalid (Input should be less than or equal to 4)")
        assert rig.result(broken) == {"error": "image: not a decodable image (Truncated File "
                                               "Read)"}
        assert rig.result(no_image) == {"error": "invalid input: mask needs an init image: set "
                                                 "`image` too"}
        assert_serves(rig.fake.jobs[first])
        assert_serves(rig.fake.jobs[last])
        rig.serves_next()

    def test_out_of_memory_mid_batch_fails_only_its_job(self, rig: FaultRig) -> None:
        before, oom, after = rig.batch_behind_gate(ok(20), ok(21, "FAULT_OOM"), ok(22))
        assert rig.result(oom) == {"error": "out of GPU memory generating 1 image(s) at "
                                            "512x512: try fewer images or a smaller size"}
        assert_serves(rig.fake.jobs[before])
        assert_serves(rig.fake.jobs[after])
        log = rig.worker.log()
        assert "out of GPU memory for 3 image(s): retrying one image at a time" in log
        assert "batch of 3 jobs failed (GpuMemoryError): re-running each alone" in log
        rig.serves_next()

    def test_out_of_memory_only_when_batched_is_recovered_with_the_same_images(
            self, rig: FaultRig, handler: ModuleType) -> None:
        jobs = rig.batch_behind_gate(ok(30), ok(31, "FAULT_OOM_IN_BATCH"), ok(32))
        for job_id in jobs:
            assert_serves(rig.fake.jobs[job_id])
        job = rig.fake.jobs[jobs[1]]
        assert_same_pixels(handler, job.result, job.job["input"])
        rig.serves_next()

    def test_nan_decode_fails_only_its_job(self, rig: FaultRig) -> None:
        before, nan, after = rig.batch_behind_gate(ok(40), ok(41, "FAULT_NAN"), ok(42))
        assert rig.result(nan) == {
            "error": "the model produced an invalid (NaN or all-black) image even after a "
                     "full-precision decode: try another seed or prompt"}
        assert_serves(rig.fake.jobs[before])
        assert_serves(rig.fake.jobs[after])
        assert "batch of 3 jobs failed (BadOutputError): re-running each alone" in (
            rig.worker.log())
        rig.serves_next()

    def test_internal_error_fails_only_its_job_and_asks_for_a_new_worker(
            self, rig: FaultRig) -> None:
        before, boom, after = rig.batch_behind_gate(ok(50), ok(51, "FAULT_BOOM"), ok(52))
        assert rig.result(boom) == {"error": "internal error: RuntimeError", "stopPod": True}
        assert_serves(rig.fake.jobs[before])
        assert_serves(rig.fake.jobs[after])
        rig.serves_next()  # the SDK leaves stopping to RunPod: until then, it serves

    def test_failing_bucket_fails_only_its_job(self, rig: FaultRig) -> None:
        s3 = {"accessId": "key-id", "accessSecret": "secret", "bucketName": "fault-bucket",
              "endpointUrl": f"http://127.0.0.1:{free_port()}/fault-bucket"}
        first = rig.add(ok(60))
        failing = rig.add(ok(61), s3Config=s3)
        last = rig.add(ok(62))
        rig.settle([first, failing, last])
        assert rig.result(failing) == {"error": "bucket upload to 'fault-bucket' failed after 3 "
                                                "attempt(s) (EndpointConnectionError)"}
        assert "secret" not in str(rig.result(failing))
        assert_serves(rig.fake.jobs[first])
        assert_serves(rig.fake.jobs[last])
        rig.serves_next()

    def test_cancelled_jobs_stop_running_or_queued_and_the_worker_serves_on(
            self, rig: FaultRig) -> None:
        running = rig.add(ok(70, "FAULT_HOLD:cancel_running"))
        rig.wait_started("cancel_running")
        queued = rig.add({**ok(71, "queued behind it"), "width": 576})  # not batched with it
        for job_id in (queued, running):
            # The SDK drops a stop for a job it has taken but not yet started (rp_scale.stop_job
            # finds no task): cancel once the job's task runs, as a user's cancel would.
            rig.worker.wait_for_log(f"{job_id} | Started.")
            rig.fake.cancel(job_id)
            rig.worker.wait_for_log(f"{job_id} | Job stopped.")
        rig.release("cancel_running")  # the GPU finishes the running job; nobody gets it
        rig.serves_next()
        time.sleep(1)
        for job_id in (running, queued):
            assert rig.fake.jobs[job_id].results == [], job_id
        hook_lines = [line for line in rig.worker.log().splitlines() if "FAULT_HOOK" in line]
        assert any("cancel_running" in line for line in hook_lines)
        assert not any("queued behind it" in line for line in hook_lines), (
            "a cancelled job that had not started still ran on the GPU")

    def test_execution_timeout_stops_the_job_and_the_worker_serves_on(
            self, rig: FaultRig) -> None:
        slow = rig.add(ok(80, "FAULT_HOLD:timeout"), policy={"executionTimeout": 3000})
        rig.wait_started("timeout")
        rig.worker.wait_for_log(f"{slow} | Job stopped.", timeout=60)
        assert rig.fake.jobs[slow].stop_requested == "timeout"
        rig.release("timeout")
        rig.serves_next()
        assert rig.fake.jobs[slow].results == []
