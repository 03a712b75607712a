"""The complete image API through the handler: img2img, inpainting, output formats, aliases,
progress, bucket upload. Runs on the tiny model (the ``handler`` fixture)."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import Run
from tests.support.endpoints import LOOPBACK_ALLOWED
from tests.support.s3_server import ALLOW, MotoS3
from worker.errors import StartupError
from worker.outputs import encoding, upload

MAGIC = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


@pytest.fixture(scope="module")
def run(job_runner: Callable[..., Run]) -> Run:
    return job_runner("feature-job", prompt="a red fox", seed=1)


def png_bytes(width: int, height: int, mode: str = "RGB", color: Any = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode(uri: str) -> tuple[str, Image.Image]:
    match = re.fullmatch(r"data:image/(png|jpeg|webp);base64,(.+)", uri)
    assert match, uri[:60]
    data = base64.b64decode(match.group(2))
    fmt = match.group(1)
    assert data.startswith(MAGIC[fmt])
    return fmt, Image.open(io.BytesIO(data))


def size_of(response: dict[str, Any]) -> tuple[int, int]:
    return decode(response["images"][0]["image"])[1].size


class TestImageToImage:
    @pytest.mark.parametrize("encode_as", ["raw", "data_uri", "bytes", "alias"])
    def test_every_encoding_of_the_init_image_is_accepted(self, run: Run, encode_as: str) -> None:
        data = png_bytes(512, 640)
        value: Any = {"raw": b64(data), "data_uri": f"data:image/png;base64,{b64(data)}",
                      "bytes": list(data), "alias": b64(data)}[encode_as]
        key = "image_b64" if encode_as == "alias" else "image"
        response = run(**{key: value, "strength": 0.5})
        assert response["parameters"]["mode"] == "img2img"
        assert size_of(response) == (512, 640)

    def test_output_size_follows_the_init_image_snapped(self, run: Run) -> None:
        response = run(image=b64(png_bytes(601, 700)), strength=0.5)
        assert size_of(response) == (600, 704)
        assert any("follows the init image (601x700)" in w for w in response["warnings"])

    def test_large_init_image_keeps_its_aspect_ratio(self, run: Run) -> None:
        response = run(image=b64(png_bytes(2000, 1000)), strength=0.5)
        assert size_of(response) == (1536, 768)

    def test_one_given_side_sets_the_other_from_the_aspect_ratio(self, run: Run) -> None:
        response = run(image=b64(png_bytes(512, 1024)), width=600, strength=0.5)
        assert size_of(response) == (600, 1200)

    def test_explicit_size_wins(self, run: Run) -> None:
        response = run(image=b64(png_bytes(512, 512)), width=768, height=512, strength=0.5)
        assert size_of(response) == (768, 512)
        assert "warnings" not in response

    def test_default_strength_is_reported_as_the_effective_one(self, run: Run) -> None:
        response = run(image=b64(png_bytes(512, 512)))
        assert response["parameters"]["strength"] == 0.75
        assert "strength 0.8 runs 3 of 4 steps: effective strength 0.75" in response["warnings"]

    def test_strength_too_small_for_one_step_names_the_minimum(self, run: Run) -> None:
        response = run(image=b64(png_bytes(512, 512)), strength=0.2)
        assert response == {"error": "invalid input: strength=0.2 runs no denoising step with "
                                     "the 4-step checkpoint; the smallest allowed is 0.25"}

    def test_strength_without_an_image_is_reported_unused(self, run: Run) -> None:
        response = run(strength=0.5, width=512, height=512)
        assert response["parameters"]["strength"] is None
        assert "strength was ignored: it applies only with an init image" in response["warnings"]

    @pytest.mark.parametrize("value", ["not base64 at all!", [300, 1], 12, b64(b"not an image")])
    def test_bad_init_image_is_a_clear_error(self, run: Run, value: Any) -> None:
        error = run(image=value)["error"]
        assert error.startswith("invalid input: image") or error.startswith("image")
        assert "Traceback" not in error


class TestInpainting:
    def test_mask_is_resized_to_the_image_and_every_step_runs(self, run: Run) -> None:
        mask = png_bytes(64, 64, mode="L", color=255)
        response = run(image=b64(png_bytes(512, 768)), mask=b64(mask))
        assert response["parameters"]["mode"] == "inpaint"
        assert response["parameters"]["strength"] == 1.0
        assert size_of(response) == (512, 768)
        assert "warnings" not in response

    def test_mask_without_image_is_an_error(self, run: Run) -> None:
        assert "mask needs an init image" in run(mask=b64(png_bytes(8, 8, "L", 255)))["error"]


class TestOutputFormats:
    @pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "JPG"])
    def test_format_round_trips_at_the_right_size(self, run: Run, fmt: str) -> None:
        response = run(output_format=fmt, width=768, height=512)
        got, image = decode(response["images"][0]["image"])
        assert got == ("jpeg" if fmt == "JPG" else fmt)
        assert image.size == (768, 512)
        assert image.format == got.upper()

    def test_quality_changes_lossy_size(self, run: Run) -> None:
        sizes = [len(run(output_format="jpeg", quality=q, width=512, height=512)
                     ["images"][0]["image"]) for q in (10, 95)]
        assert sizes[0] < sizes[1]

    def test_quality_with_png_is_reported_unused(self, run: Run) -> None:
        response = run(quality=50, width=512, height=512)
        assert "quality was ignored: png is lossless" in response["warnings"]
        assert response["parameters"]["quality"] is None


class TestAliases:
    def test_cloudflare_field_names_work(self, run: Run) -> None:
        response = run(num_steps=20, guidance=0, width=512, height=512)
        assert response["parameters"]["num_inference_steps"] == 4

    def test_replicate_field_names_work(self, run: Run) -> None:
        response = run(num_outputs="2", disable_safety_checker="true", width=512, height=512,
                       scheduler="k_euler")
        assert response["parameters"]["num_images"] == 2
        assert response["parameters"]["scheduler"] == "K_EULER"

    def test_two_names_with_different_values_are_an_error(self, run: Run) -> None:
        error = run(num_outputs=2, num_images=3)["error"]
        assert "num_outputs and num_images name the same field (num_images)" in error

    def test_two_names_with_the_same_value_are_fine(self, run: Run) -> None:
        assert run(num_outputs=2, num_images=2, width=512, height=512)["parameters"][
            "num_images"] == 2


class TestProgressAndThreads:
    @pytest.fixture
    def sent(self, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
        """The progress updates RunPod's SDK would post, as on the platform."""
        updates: list[dict[str, Any]] = []
        monkeypatch.setenv("RUNPOD_WEBHOOK_POST_OUTPUT", "http://127.0.0.1:9/unused")
        monkeypatch.setattr(handler.runpod.serverless, "progress_update",
                            lambda job, progress: updates.append(progress))
        return updates

    def test_progress_update_once_per_step_on_the_platform(
            self, run: Run, sent: list[dict[str, Any]]) -> None:
        run(width=512, height=512)
        assert [p["step"] for p in sent] == [1, 2, 3, 4]
        assert sent[-1] == {"step": 4, "steps": 4, "progress": 1.0}

    def test_preview_adds_a_small_jpeg_of_the_estimate_to_each_update(
            self, run: Run, sent: list[dict[str, Any]]) -> None:
        plain = run(width=512, height=512, seed=3)
        previewed = run(width=512, height=512, seed=3, preview=True)
        assert [set(p) for p in sent[:4]] == [{"step", "steps", "progress"}] * 4
        previews = [p["preview"] for p in sent[4:]]
        assert len(previews) == 4 and all(p.startswith("data:image/jpeg;base64,") for p in previews)
        image = Image.open(io.BytesIO(base64.b64decode(previews[-1].split(",", 1)[1])))
        assert image.format == "JPEG" and image.size == (256, 256)
        # Watching costs nothing in the result: the same image as without previews.
        assert previewed["images"] == plain["images"]

    def test_no_progress_calls_in_local_runs(
            self, run: Run, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("RUNPOD_WEBHOOK_POST_OUTPUT", raising=False)
        monkeypatch.setattr(handler.runpod.serverless, "progress_update",
                            lambda job, progress: pytest.fail("progress_update called"))
        assert "images" in run(width=512, height=512)

    def test_encoding_runs_off_the_gpu_thread(
            self, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
        threads: list[str] = []
        original = encoding.encode

        def spy(*args: Any, **kwargs: Any) -> bytes:
            threads.append(threading.current_thread().name)
            return original(*args, **kwargs)

        monkeypatch.setattr(encoding, "encode", spy)
        run(width=512, height=512, num_images=2)
        assert len(threads) == 2 and not any(name == "gpu" for name in threads)


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[MotoS3, str, str]]:
    server = MotoS3()
    try:
        server.client("s3").create_bucket(Bucket="images")
        key_id, secret = server.create_user("worker", ALLOW)
        server.enforce_auth()
        yield server, key_id, secret
    finally:
        server.close()


class TestBucketUpload:
    def s3_config(self, s3: tuple[MotoS3, str, str], **override: str) -> dict[str, str]:
        server, key_id, secret = s3
        return {"accessId": key_id, "accessSecret": secret, "bucketName": "images",
                "endpointUrl": server.endpoint, **override}

    @pytest.fixture
    def run_with(self, handler: ModuleType,
                 monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, Any]]:
        # moto listens on loopback, which the worker refuses for a job's bucket: test-only guard.
        monkeypatch.setattr(handler.DELIVERY, "uploader", upload.Uploader(guard=LOOPBACK_ALLOWED))

        def run_with(config: Any, **fields: Any) -> dict[str, Any]:
            job = {"id": "upload-job", "s3Config": config,
                   "input": {"prompt": "p", "width": 512, "height": 512, "seed": 3, **fields}}
            return asyncio.run(handler.handler(job))

        return run_with

    def test_images_are_uploaded_and_fetchable(
            self, run_with: Callable[..., dict[str, Any]], s3: tuple[MotoS3, str, str]) -> None:
        response = run_with(self.s3_config(s3), num_images=2, output_format="jpeg")
        urls = [item["image"] for item in response["images"]]
        assert all(url.startswith(s3[0].endpoint + "/images/upload-job/") for url in urls)
        for url in urls:
            with s3[0].auth_off(), urllib.request.urlopen(url, timeout=10) as reply:
                assert reply.headers["Content-Type"] == "image/jpeg"
                image = Image.open(io.BytesIO(reply.read()))
            assert image.format == "JPEG" and image.size == (512, 512)

    def test_uploaded_png_is_bit_exact(
            self, run: Run, run_with: Callable[..., dict[str, Any]],
            s3: tuple[MotoS3, str, str]) -> None:
        inline = run(prompt="p", width=512, height=512, seed=3)["images"][0]["image"]
        url = run_with(self.s3_config(s3))["images"][0]["image"]
        with s3[0].auth_off(), urllib.request.urlopen(url, timeout=10) as reply:
            uploaded = np.asarray(Image.open(io.BytesIO(reply.read())))
        assert np.array_equal(uploaded, np.asarray(decode(inline)[1]))

    def test_bad_credentials_are_a_clear_error_without_secrets(
            self, run_with: Callable[..., dict[str, Any]], s3: tuple[MotoS3, str, str]) -> None:
        response = run_with(self.s3_config(s3, accessSecret="wrong-secret-value"))
        assert response["error"].startswith("bucket upload failed")
        assert "wrong-secret-value" not in response["error"] and s3[1] not in response["error"]

    def test_incomplete_s3_config_names_the_missing_key(
            self, run_with: Callable[..., dict[str, Any]], s3: tuple[MotoS3, str, str]) -> None:
        config = self.s3_config(s3)
        del config["accessSecret"]
        error = run_with(config)["error"]
        assert "accessSecret" in error and s3[1] not in error

    def test_bucket_settings_must_be_complete(self) -> None:
        with pytest.raises(StartupError, match="BUCKET_SECRET_ACCESS_KEY"):
            upload.bucket_from_env({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:1/b",
                                    "BUCKET_ACCESS_KEY_ID": "id"})
