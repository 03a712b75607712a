"""The RunPod adapter end to end on the tiny model: responses, errors, and the runpod SDK paths.

The ``handler`` fixture imports ``handler.py``, which loads and warms the tiny model exactly as
the worker loads the real one at start.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from runpod.serverless.modules import rp_fastapi, rp_job

from tests.integration.conftest import Run
from worker.inputs import prepare
from worker.outputs import encoding

Call = Callable[[dict[str, Any]], dict[str, Any]]


@pytest.fixture(scope="module")
def call(handler: ModuleType) -> Call:
    return lambda job: asyncio.run(handler.handler(job))


@pytest.fixture(scope="module")
def run(job_runner: Callable[..., Run]) -> Run:
    return job_runner("test-job", prompt="a red fox")


def decode(uri: str) -> Image.Image:
    match = re.fullmatch(r"data:image/png;base64,([A-Za-z0-9+/=]+)", uri)
    assert match, uri[:64]
    data = base64.b64decode(match.group(1), validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data))


def pixels(response: dict[str, Any]) -> list[np.ndarray]:
    return [np.asarray(decode(item["image"]), dtype=np.int16) for item in response["images"]]


class TestResponse:
    def test_shape_of_a_successful_response(self, run: Run) -> None:
        response = run(width=512, height=512, seed=1337)
        assert set(response) == {"images", "generation_time", "timings", "parameters"}
        assert set(response["timings"]) == {"queue", "generate", "deliver", "total"}
        assert [item["seed"] for item in response["images"]] == [1337]
        assert isinstance(response["generation_time"], float)
        assert response["generation_time"] > 0
        assert response["parameters"] == {
            "prompt": "a red fox", "negative_prompt": None, "width": 512, "height": 512,
            "num_inference_steps": 4, "guidance_scale": 0.0, "seed": 1337, "num_images": 1,
            "mode": "txt2img", "strength": None, "scheduler": "K_EULER", "output_format": "png",
            "quality": None, "safety_checker": False, "model": "ByteDance/SDXL-Lightning",
            "checkpoint": "sdxl_lightning_4step_unet.safetensors"}

    @pytest.mark.parametrize(("width", "height"), [(512, 512), (768, 512), (512, 1000)])
    def test_png_data_uri_decodes_to_exactly_width_by_height(self, run: Run, width: int,
                                                             height: int) -> None:
        image = decode(run(width=width, height=height, seed=1)["images"][0]["image"])
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (width, height)

    def test_default_size_is_1024(self, run: Run) -> None:
        assert decode(run(seed=2)["images"][0]["image"]).size == (1024, 1024)

    def test_batch_reports_seed_plus_i_per_image(self, run: Run) -> None:
        response = run(width=512, height=512, seed=100, num_images=3)
        assert [item["seed"] for item in response["images"]] == [100, 101, 102]
        assert response["parameters"]["num_images"] == 3

    def test_warnings_say_what_changed(self, run: Run) -> None:
        response = run(width=1001, height=200, num_inference_steps=8, negative_prompt="x",
                       seed=1)
        assert response["warnings"] == [
            "width 1001 was snapped to 1000 (a multiple of 8)",
            "height 200 was clamped to 512 (allowed 512-1536)",
            "num_inference_steps 8 was resolved to 4: each Lightning checkpoint runs only its "
            "own step count (loaded: 4)",
            "negative_prompt was ignored: it only takes effect with guidance_scale > 1 "
            "(Lightning is distilled for 0)"]
        assert decode(response["images"][0]["image"]).size == (1000, 512)
        assert response["parameters"]["negative_prompt"] is None

    def test_long_prompt_is_reported_as_truncated(self, run: Run) -> None:
        response = run(prompt="a cat sitting on a mat " * 30, width=512, height=512, seed=1,
                       prompt_weighting=False)
        assert any(re.fullmatch(r"prompt is \d+ CLIP tokens; only the first 77 were used", w)
                   for w in response["warnings"])

    def test_long_prompt_is_chunked_with_prompt_weighting(self, run: Run) -> None:
        response = run(prompt="a cat sitting on a mat " * 30, width=512, height=512, seed=1)
        assert "images" in response and "warnings" not in response


class TestSeeds:
    def test_same_seed_same_image(self, run: Run) -> None:
        first = pixels(run(width=512, height=512, seed=9))
        second = pixels(run(width=512, height=512, seed=9))
        assert np.array_equal(first[0], second[0])

    def test_null_seed_is_reported_and_reproduces_the_image(self, run: Run) -> None:
        drawn = run(width=512, height=512)
        seed = drawn["images"][0]["seed"]
        assert drawn["parameters"]["seed"] == seed and 0 <= seed < 2**32
        again = run(width=512, height=512, seed=seed)
        assert np.array_equal(pixels(drawn)[0], pixels(again)[0])

    def test_batch_equals_single_runs_with_seed_plus_i(self, run: Run) -> None:
        batch = pixels(run(width=512, height=512, seed=500, num_images=4))
        for i, image in enumerate(batch):
            single = pixels(run(width=512, height=512, seed=500 + i))[0]
            assert np.abs(image - single).max() <= 1, f"image {i}"


class TestErrors:
    @pytest.mark.parametrize("job_input", [
        {"prompt": ""}, {"prompt": "p", "num_images": 9}, {"prompt": "p", "seed": -1},
        {"prompt": "p", "guidance_scale": 21}, {"prompt": "p", "num_step": 4}, {"width": 512},
        {"prompt": "p", "width": True}])
    def test_bad_input_is_one_error_string(self, call: Call, job_input: dict[str, Any]) -> None:
        response = call({"id": "bad", "input": job_input})
        assert set(response) == {"error"}
        assert isinstance(response["error"], str)
        assert response["error"].startswith("invalid input: ")
        assert "Traceback" not in response["error"]

    @pytest.mark.parametrize("job", [{}, {"id": "x"}, {"id": "x", "input": None},
                                     {"id": "x", "input": "a cat"}, {"id": "x", "input": [1]}])
    def test_malformed_jobs_do_not_raise(self, call: Call, job: dict[str, Any]) -> None:
        assert "expected a JSON object" in call(job)["error"]

    def test_internal_failure_is_a_short_error_and_the_worker_serves_on(
            self, run: Run, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(handler.ENGINE, "run_batch", broken)
        response = run(width=512, height=512)
        assert response == {"error": "internal error: RuntimeError", "refresh_worker": True}
        monkeypatch.undo()
        assert "images" in run(width=512, height=512)

    @pytest.mark.parametrize("bug", [ValueError("a numpy bug"), KeyError("bug key 7x"),
                                     OverflowError("a PIL bug")])
    def test_a_bug_while_preparing_the_input_is_internal_never_a_rejection(
            self, run: Run, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
            bug: Exception) -> None:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise bug

        monkeypatch.setattr(prepare, "resolve", broken)
        caplog.set_level(logging.INFO)
        response = run(width=512, height=512)
        # Not the caller's fault, and the GPU was never touched: no new worker either.
        assert response == {"error": f"internal error: {type(bug).__name__}"}
        assert "rejected" not in caplog.text
        # Where it broke (the frame), not what it said: a message may quote the input.
        assert "preparing the input failed" in caplog.text and "in broken" in caplog.text
        assert str(bug.args[0]) not in "".join(
            r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
        monkeypatch.undo()
        assert "images" in run(width=512, height=512)

    def test_a_bug_quoting_the_prompt_logs_no_caller_text_at_info(
            self, run: Run, monkeypatch: pytest.MonkeyPatch,
            caplog: pytest.LogCaptureFixture) -> None:
        def broken(request: Any, *args: Any, **kwargs: Any) -> None:
            raise ValueError(f"input_value={request.prompt!r}")  # as pydantic's errors do

        monkeypatch.setattr(prepare, "resolve", broken)
        caplog.set_level(logging.DEBUG)
        assert run(prompt="caller text 91f3") == {"error": "internal error: ValueError"}
        loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        quiet = [r.getMessage() for r in caplog.records if r.levelno < logging.INFO]
        assert any("generating" in m or "preparing the input failed" in m for m in loud)
        assert not any("caller text 91f3" in m for m in loud)
        assert any("caller text 91f3" in m for m in quiet)  # the operator can still see it

    @pytest.mark.parametrize("field", ["prompt", "seed", "image", "unknown_field"])
    def test_deep_json_is_a_validation_error_not_a_recursion_error(
            self, call: Call, field: str, caplog: pytest.LogCaptureFixture) -> None:
        deep: Any = "x"
        for _ in range(1_000):  # RecursionError in pydantic's error repr, before the fix
            deep = [deep]
        caplog.set_level(logging.INFO)
        response = call({"input": {"prompt": "p", field: deep}})
        assert response == {"error": f"invalid input: '{field}' nests lists or objects more "
                                     f"than 8 levels deep; no field takes more than one level "
                                     f"(see the API table)"}
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    def test_a_bug_while_delivering_is_internal_without_a_new_worker(
            self, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
        def broken(*args: Any, **kwargs: Any) -> bytes:
            raise RuntimeError("an encoder bug")

        monkeypatch.setattr(encoding, "encode", broken)
        # The GPU finished its work: nothing suggests it is in a bad state.
        assert run(width=512, height=512) == {"error": "internal error: RuntimeError"}
        monkeypatch.undo()
        assert "images" in run(width=512, height=512)

    def test_a_rejection_is_logged_without_its_message(
            self, run: Run, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        assert "error" in run(prompt="a secret prompt", num_images=9)
        infos = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert infos == ["job test-job rejected"]

    def test_worker_serves_after_a_bad_input(self, run: Run) -> None:
        assert "error" in run(num_images=0)
        assert len(run(width=512, height=512, seed=3)["images"]) == 1


class TestRunpodSdk:
    """What the platform receives, through runpod's own job runner and local API server."""

    def test_run_job_wraps_output(self, handler: ModuleType) -> None:
        result = asyncio.run(rp_job.run_job(handler.handler, {
            "id": "sdk", "input": {"prompt": "p", "width": 512, "height": 512, "seed": 4}}))
        assert set(result) == {"output"}
        assert result["output"]["images"][0]["seed"] == 4

    def test_run_job_reports_validation_error_as_string(self, handler: ModuleType) -> None:
        result = asyncio.run(rp_job.run_job(handler.handler, {"id": "sdk", "input": {"x": 1}}))
        assert isinstance(result["error"], str) and "unknown field 'x'" in result["error"]

    def test_internal_error_asks_runpod_to_refresh_the_worker(
            self, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(handler.ENGINE, "run_batch", lambda *a, **k: 1 / 0)
        result = asyncio.run(rp_job.run_job(handler.handler, {
            "id": "sdk", "input": {"prompt": "p", "width": 512, "height": 512}}))
        assert result["error"] == "internal error: ZeroDivisionError"
        assert result["stopPod"] is True

    def test_local_runsync_answers(self, handler: ModuleType) -> None:
        client = TestClient(rp_fastapi.WorkerAPI({"handler": handler.handler}).rp_app)
        body = client.post("/runsync", json={"input": {"prompt": "p", "width": 512,
                                                       "height": 512, "seed": 8}})
        assert body.status_code == 200
        payload = body.json()
        assert payload["status"] == "COMPLETED"
        assert decode(payload["output"]["images"][0]["image"]).size == (512, 512)

    def test_local_runsync_reports_bad_input(self, handler: ModuleType) -> None:
        client = TestClient(rp_fastapi.WorkerAPI({"handler": handler.handler}).rp_app)
        payload = client.post("/runsync", json={"input": {"prompt": "p", "seed": "x"}}).json()
        assert payload["status"] == "FAILED"
        assert payload["error"].startswith("invalid input: seed='x'")
