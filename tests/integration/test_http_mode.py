"""HTTP mode through a real uvicorn server on loopback, driven by the real clients of each API:
the official ``openai`` SDK, the ``webuiapi`` A1111 client, plain HTTP for our API and its
server-sent events. The server serves the same ``Service`` the queue handler uses (the
``handler`` fixture's), so every answer is compared with the queue handler's for the same job.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from tests.support.loopback import serving_asgi
from tests.support.s3_server import ALLOW, MotoS3
from worker.frontdoor.app import Backend, create_app
from worker.outputs import upload

Serve = Callable[..., AbstractContextManager[str]]
JOB = {"prompt": "a lighthouse on a cliff", "width": 512, "height": 512, "seed": 7}


@pytest.fixture(scope="module")
def serve(handler: ModuleType) -> Serve:
    """``serve(**backend_fields)``: a context manager serving the app; yields its base URL."""
    @contextmanager
    def start(**fields: Any) -> Iterator[str]:
        backend = Backend(**{"service": handler.SERVICE, "max_running": 4, "max_waiting": 8,
                             **fields})
        with serving_asgi(create_app(backend)) as url:
            yield url
    return start


@pytest.fixture(scope="module")
def url(serve: Serve) -> Iterator[str]:
    with serve() as base:
        yield base


def queue_pixels(handler: ModuleType, **fields: Any) -> list[np.ndarray]:
    """The images the queue handler makes for the same job."""
    output = asyncio.run(handler.handler({"id": "q", "input": {**JOB, **fields}}))
    return [pixels(item["image"].split(",", 1)[1]) for item in output["images"]]


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def gradient(size: int = 512) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(ramp, (size, 1))] * 3, axis=2))


class TestHealth:
    def test_ping_is_204_while_loading_200_when_ready_500_when_failed(
            self, handler: ModuleType) -> None:
        backend = Backend()
        with serving_asgi(create_app(backend)) as base:
            loading = httpx.get(f"{base}/ping")
            assert (loading.status_code, loading.content) == (204, b"")
            busy = httpx.post(f"{base}/v1/generate", json=JOB)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "10"
            backend.service = handler.SERVICE
            assert httpx.get(f"{base}/ping").status_code == 200
            backend.failure = "cannot load the model folder /m: out of GPU memory"
            failed = httpx.get(f"{base}/ping")
            assert failed.status_code == 500 and "out of GPU memory" in failed.json()["error"]


class TestOurApi:
    def test_generate_answers_what_the_queue_handler_answers(
            self, url: str, handler: ModuleType) -> None:
        response = httpx.post(f"{url}/v1/generate", json=JOB, timeout=60)
        assert response.status_code == 200
        output = response.json()
        assert output["parameters"]["seed"] == 7 and len(output["images"]) == 1
        got = pixels(output["images"][0]["image"].split(",", 1)[1])
        np.testing.assert_array_equal(got, queue_pixels(handler)[0])

    def test_a_bad_request_is_400_with_the_queue_handlers_message(
            self, url: str, handler: ModuleType) -> None:
        bad = {**JOB, "num_images": 9}
        response = httpx.post(f"{url}/v1/generate", json=bad, timeout=60)
        queue = asyncio.run(handler.handler({"id": "q", "input": bad}))
        assert response.status_code == 400
        assert response.json() == queue == {"error": queue["error"]}
        assert "num_images=9" in queue["error"]

    def test_a_body_that_is_not_json_is_400(self, url: str) -> None:
        response = httpx.post(f"{url}/v1/generate", content=b"{not json", timeout=60)
        assert response.status_code == 400
        assert response.json() == {"error": "invalid input: the body is not valid JSON"}

    def test_stream_sends_each_step_then_the_result(self, url: str, handler: ModuleType) -> None:
        events = []
        with httpx.stream("POST", f"{url}/v1/generate", json={**JOB, "stream": True},
                          timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((event, json.loads(line.removeprefix("data: "))))
        steps = [data for kind, data in events if kind == "step"]
        assert [(s["step"], s["steps"]) for s in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
        assert all("preview" not in s for s in steps)
        kind, result = events[-1]
        assert kind == "result"
        np.testing.assert_array_equal(pixels(result["images"][0]["image"].split(",", 1)[1]),
                                      queue_pixels(handler)[0])

    def test_stream_with_preview_sends_small_jpegs_of_the_estimate(self, url: str) -> None:
        previews = []
        with httpx.stream("POST", f"{url}/v1/generate",
                          json={**JOB, "stream": True, "preview": True}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and "preview" in line:
                    previews.append(json.loads(line.removeprefix("data: "))["preview"])
        assert len(previews) == 4
        images = [Image.open(io.BytesIO(base64.b64decode(p.split(",", 1)[1]))) for p in previews]
        assert all(p.startswith("data:image/jpeg;base64,") for p in previews)
        assert all(im.format == "JPEG" and max(im.size) <= 256 for im in images)
        assert not np.array_equal(np.asarray(images[0]), np.asarray(images[-1]))

    def test_a_bad_streamed_request_ends_in_an_error_event(self, url: str) -> None:
        with httpx.stream("POST", f"{url}/v1/generate",
                          json={"prompt": "", "stream": True}, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines[0] == "event: error" and "prompt is required" not in lines[1]
        assert json.loads(lines[1].removeprefix("data: "))["error"].startswith("invalid input")


class TestOpenAI:
    @pytest.fixture
    def client(self, url: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def test_images_generate_gives_the_queue_handlers_image(
            self, client: openai.OpenAI, handler: ModuleType) -> None:
        result = client.images.generate(prompt=JOB["prompt"], n=2, size="512x512",
                                        response_format="b64_json", extra_body={"seed": 7})
        assert len(result.data) == 2 and result.size == "512x512"
        expected = queue_pixels(handler, num_images=2)
        for item, want in zip(result.data, expected, strict=True):
            np.testing.assert_array_equal(pixels(item.b64_json), want)

    def test_output_format_and_compression_map_to_ours(self, client: openai.OpenAI) -> None:
        result = client.images.generate(prompt="a fox", size="512x512", output_format="jpeg",
                                        output_compression=60, extra_body={"seed": 1})
        image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        assert image.format == "JPEG" and result.output_format == "jpeg"

    def test_a_bad_value_is_a_bad_request_naming_the_param(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a fox", n=9)
        assert caught.value.param == "n" and "from 1 to 4" in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a fox", size="huge")
        assert caught.value.param == "size"
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a fox", response_format="url")
        assert "needs a bucket" in caught.value.message

    def test_our_own_fields_are_validated_as_ours(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a fox", size="512x512", extra_body={"sede": 3})
        assert "unknown field 'sede'" in caught.value.message

    def test_images_edit_repaints_where_the_mask_is_transparent(
            self, client: openai.OpenAI, handler: ModuleType) -> None:
        image = gradient()
        mask = Image.new("RGBA", (512, 512), (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), (0, 0, 256, 512))  # left half transparent: repaint it
        result = client.images.edit(image=("in.png", png(image), "image/png"),
                                    mask=("mask.png", png(mask), "image/png"), prompt="a fox",
                                    size="512x512", extra_body={"seed": 3})
        got = pixels(result.data[0].b64_json)
        white_left = Image.new("L", (512, 512), 0)
        white_left.paste(255, (0, 0, 256, 512))  # the same mask in our convention
        want = queue_pixels(handler, prompt="a fox", seed=3,
                            image=base64.b64encode(png(image)).decode(),
                            mask=base64.b64encode(png(white_left)).decode())[0]
        np.testing.assert_array_equal(got, want)

    def test_response_format_url_with_the_workers_bucket(
            self, serve: Serve, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        server = MotoS3()
        try:
            server.client("s3").create_bucket(Bucket="http-images")
            # moto's IAM is one per process: a user name of its own (test_api_features: worker)
            key_id, secret = server.create_user("http-mode-worker", ALLOW)
            server.enforce_auth()
            bucket = upload.bucket_from_env({
                "BUCKET_ENDPOINT_URL": f"{server.endpoint}/http-images",
                "BUCKET_ACCESS_KEY_ID": key_id, "BUCKET_SECRET_ACCESS_KEY": secret})
            monkeypatch.setattr(handler.DELIVERY, "bucket", bucket)
            with serve() as base:
                client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
                result = client.images.generate(prompt="a fox", size="512x512",
                                                response_format="url", extra_body={"seed": 2})
                # b64_json (the default) stays base64 with a bucket configured: no upload.
                inline = client.images.generate(prompt="a fox", size="512x512",
                                                extra_body={"seed": 2})
                assert pixels(inline.data[0].b64_json).shape == (512, 512, 3)
                a1111_image = webuiapi.WebUIApi(baseurl=f"{base}/sdapi/v1").txt2img(
                    prompt="a fox", seed=2, width=512, height=512, steps=4, cfg_scale=0,
                    sampler_name="Euler").image
                assert a1111_image.size == (512, 512)
            url = result.data[0].url
            assert url.startswith(f"{server.endpoint}/http-images/")
            assert result.data[0].b64_json is None
            with server.auth_off(), urllib.request.urlopen(url, timeout=10) as reply:
                assert Image.open(io.BytesIO(reply.read())).size == (512, 512)
        finally:
            server.close()

    def test_models_lists_the_model(self, client: openai.OpenAI) -> None:
        assert [m.id for m in client.models.list()] == ["ByteDance/SDXL-Lightning"]


class TestA1111:
    @pytest.fixture
    def api(self, url: str) -> webuiapi.WebUIApi:
        return webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")

    def test_txt2img_gives_the_queue_handlers_image(
            self, api: webuiapi.WebUIApi, handler: ModuleType) -> None:
        result = api.txt2img(prompt=JOB["prompt"], seed=7, width=512, height=512, steps=4,
                             cfg_scale=0, sampler_name="Euler", batch_size=2)
        assert len(result.images) == 2
        for image, want in zip(result.images, queue_pixels(handler, num_images=2), strict=True):
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), want)
        assert result.info["seed"] == 7 and result.info["all_seeds"] == [7, 8]
        assert result.info["sampler_name"] == "Euler"
        assert "Seed: 8" in result.info["infotexts"][1]

    def test_client_defaults_run_with_warnings_in_info(self, api: webuiapi.WebUIApi) -> None:
        # webuiapi sends 20 steps, CFG 7 and Euler a unless told otherwise.
        result = api.txt2img(prompt="a fox", seed=1, width=512, height=512)
        assert result.info["steps"] == 4 and result.info["sampler_name"] == "Euler a"
        warnings = " ".join(result.info["warnings"])
        assert "num_inference_steps 20 was resolved to 4" in warnings
        assert "guidance_scale 7 is far above" in warnings

    def test_img2img_with_a_mask_and_inversion(self, api: webuiapi.WebUIApi,
                                               handler: ModuleType) -> None:
        image = gradient()
        mask = Image.new("L", (512, 512), 255)
        mask.paste(0, (0, 0, 256, 512))  # black left: with inversion, repaint the left
        result = api.img2img(images=[image], mask_image=mask, inpainting_mask_invert=1,
                             prompt="a fox", seed=3, steps=4, cfg_scale=0, sampler_name="Euler",
                             denoising_strength=1.0)
        white_left = Image.new("L", (512, 512), 0)
        white_left.paste(255, (0, 0, 256, 512))
        want = queue_pixels(handler, prompt="a fox", seed=3, strength=1.0,
                            image=base64.b64encode(png(image)).decode(),
                            mask=base64.b64encode(png(white_left)).decode())[0]
        np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), want)

    def test_the_probe_routes_answer(self, api: webuiapi.WebUIApi) -> None:
        models = api.get_sd_models()
        assert models[0]["title"] == "sdxl_lightning_4step_unet"
        assert api.get_options()["sd_model_checkpoint"] == models[0]["title"]
        assert {"Euler", "Euler a", "DPM++ 2M Karras", "DDIM"} <= {
            s["name"] for s in api.get_samplers()}
        api.util_wait_for_ready(check_interval=0.05)  # polls /progress until idle

    def test_an_unknown_sampler_or_field_is_an_error_not_a_silent_fallback(
            self, url: str) -> None:
        response = httpx.post(f"{url}/sdapi/v1/txt2img",
                              json={"prompt": "a fox", "sampler_name": "UniPC"}, timeout=60)
        assert response.status_code == 400
        assert "sampler_name='UniPC' is not available" in response.json()["detail"]
        response = httpx.post(f"{url}/sdapi/v1/txt2img",
                              json={"prompt": "a fox", "not_a1111": 1}, timeout=60)
        assert response.status_code == 400 and "'not_a1111'" in response.json()["detail"]


class TestTheSameImageThroughEveryDoor:
    def test_queue_ours_openai_and_a1111_agree(self, url: str, handler: ModuleType) -> None:
        queue = queue_pixels(handler, seed=42)[0]
        ours = httpx.post(f"{url}/v1/generate", json={**JOB, "seed": 42}, timeout=60).json()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        oai = client.images.generate(prompt=JOB["prompt"], size="512x512",
                                     extra_body={"seed": 42})
        a1111 = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1").txt2img(
            prompt=JOB["prompt"], seed=42, width=512, height=512, steps=4, cfg_scale=0,
            sampler_name="Euler")
        for got in (pixels(ours["images"][0]["image"].split(",", 1)[1]),
                    pixels(oai.data[0].b64_json), np.asarray(a1111.image.convert("RGB"))):
            np.testing.assert_array_equal(got, queue)


class TestAdmission:
    @pytest.fixture
    def held_gpu(self, handler: ModuleType, monkeypatch: pytest.MonkeyPatch
                 ) -> Iterator[tuple[threading.Event, list[int]]]:
        """The GPU blocks until released; records how many plans reached it."""
        release, reached = threading.Event(), []
        real = handler.ENGINE.run_batch

        def held(plans: Any, on_step: Any = None) -> Any:
            reached.append(len(plans))
            release.wait(30)
            return real(plans, on_step)

        monkeypatch.setattr(handler.ENGINE, "run_batch", held)
        yield release, reached
        release.set()

    def test_over_the_limit_is_429_at_once_with_retry_after(
            self, serve: Serve, held_gpu: tuple[threading.Event, list[int]]) -> None:
        release, reached = held_gpu
        with serve(max_running=1, max_waiting=1) as base:
            with httpx.Client(timeout=60) as http:
                results: list[httpx.Response] = []
                first = threading.Thread(target=lambda: results.append(
                    http.post(f"{base}/v1/generate", json=JOB)))
                second = threading.Thread(target=lambda: results.append(
                    http.post(f"{base}/v1/generate", json={**JOB, "seed": 8})))
                first.start()
                wait_for(lambda: reached == [1])
                second.start()  # waits for the one slot
                time.sleep(0.3)
                refused = http.post(f"{base}/v1/images/generations",
                                    json={"prompt": "a fox", "size": "512x512"})
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["type"] == "rate_limit_error"
                release.set()
                first.join(60)
                second.join(60)
        assert sorted(r.status_code for r in results) == [200, 200]

    def test_a_client_that_disconnects_before_the_gpu_cancels_its_job(
            self, serve: Serve, held_gpu: tuple[threading.Event, list[int]]) -> None:
        release, reached = held_gpu
        with serve(max_running=4, max_waiting=0) as base:
            holder = threading.Thread(target=lambda: httpx.post(
                f"{base}/v1/generate", json=JOB, timeout=60))
            holder.start()
            wait_for(lambda: reached == [1])
            with pytest.raises(httpx.ReadTimeout):  # gives up while its job is queued
                httpx.post(f"{base}/v1/generate", json={**JOB, "width": 640}, timeout=1.0)
            time.sleep(0.5)  # the server notices the disconnect and cancels the queued job
            release.set()
            holder.join(60)
            time.sleep(0.5)
        assert reached == [1], "the abandoned job reached the GPU"


    def test_a_stream_closed_before_the_gpu_cancels_its_job_and_frees_its_place(
            self, handler: ModuleType, held_gpu: tuple[threading.Event, list[int]]) -> None:
        release, reached = held_gpu
        backend = Backend(service=handler.SERVICE, max_running=4, max_waiting=0)
        with serving_asgi(create_app(backend)) as base:
            holder = threading.Thread(target=lambda: httpx.post(
                f"{base}/v1/generate", json=JOB, timeout=60))
            holder.start()
            wait_for(lambda: reached == [1])
            with httpx.stream("POST", f"{base}/v1/generate",
                              json={**JOB, "width": 640, "stream": True}, timeout=60) as stream:
                assert stream.status_code == 200
                wait_for(lambda: backend.held == 2)
            wait_for(lambda: backend.held == 1)  # the closed stream's place is free again
            release.set()
            holder.join(60)
            wait_for(lambda: backend.held == 0)
        assert reached == [1], "the closed stream's job reached the GPU"


class TestApiKey:
    def test_every_route_but_ping_needs_the_key(self, serve: Serve) -> None:
        with serve(api_key="s3cret-key") as base:
            assert httpx.get(f"{base}/ping").status_code == 200
            assert httpx.post(f"{base}/v1/generate", json=JOB).status_code == 401
            assert httpx.get(f"{base}/sdapi/v1/sd-models").status_code == 401
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{base}/v1", api_key="wrong",
                              max_retries=0).models.list()
            models = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret-key",
                                   max_retries=0).models.list()
            assert [m.id for m in models] == ["ByteDance/SDXL-Lightning"]


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
