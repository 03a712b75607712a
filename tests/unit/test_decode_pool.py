"""inputs/pool and prepare_async: decoding in child processes, the CPU-time budget, cancellation.

The children are real processes (``python -m worker.inputs.pool``; Pillow and numpy, no torch).
``tests/support/spin_decoder`` is the same child loop with a decoder that spins on a file
starting ``SPIN`` (only the budget or a kill stops it) and crashes on ``CRASH``. Nothing asserts
wall time: the tests assert outcomes and which job finished while which was still running; every
wait is bounded (``WAIT_S``) so a broken pool fails the test rather than hanging it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from schemas import parse_request
from tests.support import image_bombs as bombs
from tests.support.spin_decoder import CRASH, SPIN
from worker.errors import InputError, JobError
from worker.inputs import pool as pool_module
from worker.inputs.images import DEFAULT_LIMITS, InputLimits, decode_flat, load_mask
from worker.inputs.pool import DecodePool
from worker.inputs.prepare import prepare, prepare_async

WAIT_S = 30.0
SPINNER = [sys.executable, "-m", "tests.support.spin_decoder"]
GIF_TOO = InputLimits(formats={"PNG", "JPEG", "WEBP", "GIF"})


def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def count_words(text: str) -> int:
    return len(text.split()) + 2


def request(image: bytes, **fields: Any) -> Any:
    return parse_request({"prompt": "a fox", "seed": 1, "strength": 0.5,
                          "image": base64.b64encode(image).decode(), **fields})


def rgba(width: int = 16, height: int = 12) -> Image.Image:
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA")


PNG = bombs.encode(bombs.noise(16, 12), "PNG")
FILES = {
    "png": PNG,
    "png rgba": bombs.encode(rgba(), "PNG"),
    "png 16-bit": bombs.encode(Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)), "PNG"),
    "jpeg": bombs.encode(bombs.noise(64, 48), "JPEG", quality=90),
    "jpeg progressive": bombs.encode(bombs.noise(64, 48), "JPEG", progressive=True),
    "jpeg cmyk": bombs.encode(bombs.noise(64, 48).convert("CMYK"), "JPEG"),
    "webp": bombs.encode(rgba(), "WEBP", lossless=True),
    "webp animated": bombs.webp_frames(3),
    "gif": bombs.encode(bombs.noise(16, 12), "GIF"),
}

# The init image the PNG gives when prepared in this thread (scaled up to the smallest output).
IN_THREAD = np.asarray(prepare(request(PNG), (4,), "off", count_words)[0].init_image)


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    with DecodePool() as shared:
        yield shared


@pytest.fixture
def spinner() -> Iterator[DecodePool]:
    with DecodePool(60.0, command=SPINNER) as spinning:
        yield spinning


class TestMaskAlpha:
    def test_an_alpha_mask_crosses_the_process_boundary(self, pool: DecodePool) -> None:
        rgba = np.zeros((6, 8, 4), np.uint8)
        rgba[:, :3, 3] = 0
        rgba[:, 3:, 3] = 255
        buffer = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
        mask = load_mask(buffer.getvalue(), "mask", (8, 6), decoder=pool.job(),
                         repaint="transparent")
        assert [mask.getpixel((x, 2)) for x in (0, 2, 3, 7)] == [255, 255, 0, 0]


class TestSamePixels:
    @pytest.mark.parametrize("name", sorted(FILES))
    @pytest.mark.parametrize(("mode", "background"), [("RGB", 255), ("L", 0)])
    def test_as_decoded_in_the_thread(self, pool: DecodePool, name: str, mode: str,
                                      background: int) -> None:
        here = decode_flat(FILES[name], "image", GIF_TOO, mode, background)
        there = pool.job()(FILES[name], "image", GIF_TOO, mode, background)
        assert (there.mode, there.size) == (here.mode, here.size) == (mode, here.size)
        np.testing.assert_array_equal(np.asarray(there), np.asarray(here))

    @pytest.mark.parametrize("data", [PNG[:33], PNG[:-60], bombs.repeated_scans(64, 48, 100),
                                      bombs.encode(bombs.noise(8, 8), "GIF")],
                             ids=["broken", "truncated", "scan-bomb", "not-accepted"])
    def test_the_same_refusals(self, pool: DecodePool, data: bytes) -> None:
        with pytest.raises(InputError) as here:
            decode_flat(data, "mask", DEFAULT_LIMITS, "L", 0)
        with pytest.raises(InputError) as there:
            pool.job()(data, "mask", DEFAULT_LIMITS, "L", 0)
        assert str(there.value) == str(here.value) and str(here.value).startswith("mask: ")

    def test_prepare_attaches_the_same_images(self, pool: DecodePool) -> None:
        mask = bombs.encode(Image.new("L", (16, 12), 255), "PNG")
        job = request(FILES["jpeg"], mask=base64.b64encode(mask).decode())
        here, _ = prepare(job, (4,), "off", count_words)
        there, _ = prepare(job, (4,), "off", count_words, pool.job())
        for image in ("init_image", "mask_image"):
            np.testing.assert_array_equal(np.asarray(getattr(there, image)),
                                          np.asarray(getattr(here, image)))

    def test_children_are_kept_warm_and_reused(self) -> None:
        with DecodePool(keep_idle=1) as single:
            single.job()(PNG, "image", DEFAULT_LIMITS, "RGB", 255)
            first = single._idle[0].process.pid
            single.job()(PNG, "image", DEFAULT_LIMITS, "RGB", 255)
            assert [child.process.pid for child in single._idle] == [first]
            assert single.busy == []


class TestCpuBudget:
    def test_a_decode_past_the_budget_is_stopped_and_its_process_replaced(self) -> None:
        with DecodePool(0.2, command=SPINNER) as spinning:
            job = spinning.job()
            with pytest.raises(InputError) as caught:
                job(SPIN, "image", DEFAULT_LIMITS, "RGB", 255)
            assert str(caught.value) == (
                "image: decoding was stopped at the CPU-time limit (0.2 s for a job's images): "
                "the file costs far more work than its size")
            assert job.cpu_left == 0 and spinning.busy == [] and spinning._idle == []
            with pytest.raises(InputError, match="CPU-time limit"):  # the job's budget is spent
                job(PNG, "mask", DEFAULT_LIMITS, "L", 0)
            image = spinning.job()(PNG, "image", DEFAULT_LIMITS, "RGB", 255)  # a new child
            np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(
                io.BytesIO(PNG))))

    def test_a_real_decode_past_a_tiny_budget(self, pool: DecodePool) -> None:
        # 60 scans over 4096²: under the structure limits, so only the budget can stop it
        # (about 0.3 s of CPU here, 30x the budget).
        data = bombs.repeated_scans(4096, 4096, 50)
        assert len(bombs.jpeg_scans(data)) == 60
        with DecodePool(0.01) as tiny, pytest.raises(InputError, match="CPU-time limit"):
            tiny.job()(data, "image", DEFAULT_LIMITS, "RGB", 255)

    def test_another_jobs_preparation_completes_meanwhile(self) -> None:
        # The spinning job has 1 s of CPU; the other needs a child started and a 16x12 PNG
        # decoded (~0.15 s of CPU). It must complete while the spinning one still runs.
        with DecodePool(1.0, command=SPINNER) as spinning:
            stuck = spinning.threads.submit(prepare, request(SPIN), (4,), "off", count_words,
                                            spinning.job())
            wait_until(lambda: spinning.busy, "the spinning decode to start")
            other = spinning.threads.submit(prepare, request(PNG), (4,), "off", count_words,
                                            spinning.job())
            plan, _ = other.result(timeout=WAIT_S)
            assert not stuck.done()
            np.testing.assert_array_equal(np.asarray(plan.init_image), IN_THREAD)
            with pytest.raises(InputError, match=r"^image: decoding was stopped at the CPU-time "
                                                 r"limit \(1 s for a job's images\)"):
                stuck.result(timeout=WAIT_S)

    def test_the_budget_is_the_jobs(self, pool: DecodePool) -> None:
        job = pool.job()
        job(PNG, "image", DEFAULT_LIMITS, "RGB", 255)
        assert 0 < job.cpu_left < job.cpu_s == pool_module.CPU_S_PER_JOB
        assert pool.job().cpu_left == pool.cpu_s  # a fresh budget for the next job


class TestCancellation:
    def test_cancel_kills_the_decode_in_progress(self, spinner: DecodePool) -> None:
        job = spinner.job()
        stuck = spinner.threads.submit(job, SPIN, "image", DEFAULT_LIMITS, "RGB", 255)
        wait_until(lambda: spinner.busy, "the spinning decode to start")
        [pid] = spinner.busy
        job.cancel()
        with pytest.raises(JobError, match="^image: the job was cancelled$"):
            stuck.result(timeout=WAIT_S)
        assert gone(pid) and spinner.busy == []
        with pytest.raises(JobError, match="cancelled"):  # and the job decodes nothing more
            job(PNG, "mask", DEFAULT_LIMITS, "L", 0)

    def test_a_cancelled_task_kills_its_decode(self, spinner: DecodePool) -> None:
        async def scenario() -> Any:
            task = asyncio.create_task(prepare_async(request(SPIN), (4,), "off", count_words,
                                                     pool=spinner))
            while not spinner.busy:
                await asyncio.sleep(0.01)
            [pid] = spinner.busy
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            wait_until(lambda: gone(pid) and not spinner.busy, "the decode to be killed")
            return await prepare_async(request(PNG), (4,), "off", count_words, pool=spinner)

        plan, _ = asyncio.run(asyncio.wait_for(scenario(), WAIT_S))
        np.testing.assert_array_equal(np.asarray(plan.init_image), IN_THREAD)


class TestFailures:
    def test_a_crashed_decoder_is_a_job_error(self, spinner: DecodePool,
                                               caplog: pytest.LogCaptureFixture) -> None:
        with pytest.raises(JobError) as caught:
            spinner.job()(CRASH, "mask", DEFAULT_LIMITS, "L", 0)
        assert str(caught.value) == \
            "mask: the image decoder stopped (signal SIGSEGV); the image was not decoded"
        assert "ended (signal SIGSEGV) while decoding mask" in caplog.text
        assert spinner.job()(PNG, "mask", DEFAULT_LIMITS, "L", 0).size == (16, 12)

    @pytest.mark.parametrize(("header", "payload", "expected"), [
        ({"error": "image: spoofed"}, b"", "malformed error"),
        ({"error": "mask: " + "x" * 3000}, b"", "malformed error"),
        ({"bug": "KeyError"}, b"", "failed: KeyError"),
        ({"mode": "L", "width": 2, "height": 2}, b"\0" * 12, "malformed image"),
        ({"mode": "RGB", "width": 2, "height": 2}, b"\0" * 11, "malformed image"),
        ({"mode": "RGB", "width": -2, "height": -2}, b"\0" * 12, "malformed image"),
        ({"mode": "RGB", "width": 2.0, "height": 2}, b"\0" * 12, "malformed image"),
        ({"mode": "RGB", "width": 5000, "height": 5000}, b"", "malformed image"),
    ])
    def test_what_a_child_sends_back_is_checked(self, header: dict[str, Any], payload: bytes,
                                                expected: str) -> None:
        with pytest.raises(RuntimeError, match=expected):
            pool_module._image(header, bytearray(payload), "mask", "RGB", DEFAULT_LIMITS)

    def test_a_good_reply(self) -> None:
        image = pool_module._image({"mode": "RGB", "width": 2, "height": 1},
                                   bytearray(b"\1\2\3\4\5\6"), "mask", "RGB", DEFAULT_LIMITS)
        assert np.asarray(image).tolist() == [[[1, 2, 3], [4, 5, 6]]]
        with pytest.raises(InputError, match="^mask: no$"):
            pool_module._image({"error": "mask: no"}, bytearray(), "mask", "RGB",
                               DEFAULT_LIMITS)

    def test_a_child_ends_at_the_end_of_its_input(self) -> None:
        pool = DecodePool()
        pool.job()(PNG, "image", DEFAULT_LIMITS, "RGB", 255)
        [child] = pool._idle
        pool.close()
        assert child.process.returncode == 0

    @pytest.mark.parametrize("kwargs", [{"cpu_s": 0}, {"keep_idle": -1}, {"max_threads": 0}])
    def test_a_bad_pool_is_a_programming_error(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(ValueError, match="invalid pool"):
            DecodePool(**kwargs)

    def test_the_budget_holds_when_the_worker_ignores_its_signal(self) -> None:
        # An ignored signal stays ignored across exec: the child restores SIGPROF's default.
        previous = signal.signal(signal.SIGPROF, signal.SIG_IGN)
        try:
            with DecodePool(0.2, command=SPINNER) as spinning:
                job = spinning.job()
                decode = spinning.threads.submit(job, SPIN, "image", DEFAULT_LIMITS, "RGB", 255)
                try:
                    with pytest.raises(InputError, match="CPU-time limit"):
                        decode.result(timeout=WAIT_S)
                finally:
                    job.cancel()  # if the budget failed to stop it
        finally:
            signal.signal(signal.SIGPROF, previous)
