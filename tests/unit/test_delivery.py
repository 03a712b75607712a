"""outputs/delivery: data URIs or bucket URLs, the response dict, the result size limit, and the
job's s3Config checked before the GPU; uploads apart from encoding, under a per-job deadline."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image

from tests.support.endpoints import LOOPBACK_ALLOWED, PUBLIC_IP, Dns
from tests.support.silent_server import SilentServer
from worker.errors import InputError, JobError, StartupError
from worker.outputs import delivery, upload
from worker.outputs.upload import EndpointGuard
from worker.plan import Plan
from worker.settings import Settings

PLAN = Plan(prompt="p", negative_prompt=None, width=512, height=512, steps=4,
            guidance_scale=0.0, seeds=(7, 8))
TIMINGS = {"queue": 0.012345, "generate": 0.5, "deliver": 0.02, "total": 0.6}
BUCKET = upload.Bucket("http://127.0.0.1:9", "id", "secret", "images")


def image(value: int = 90) -> Image.Image:
    return Image.new("RGB", (PLAN.width, PLAN.height), (value, 20, 200))


S3_CONFIG = {"accessId": "AKIAJOBKEY", "accessSecret": "job-s3cr3t", "bucketName": "renders",
             "endpointUrl": "https://store.example/renders"}


class RecordingUploader(upload.Uploader):
    def __init__(self) -> None:
        super().__init__(guard=EndpointGuard(resolver=Dns({"store.example": [PUBLIC_IP]})))
        self.calls: list[tuple[str, str, int, str]] = []

    def upload(self, bucket: upload.Bucket, key: str, data: bytes, content_type: str,
               budget: upload.Budget | None = None) -> str:
        assert budget is not None and budget.remaining() > 0
        self.calls.append((threading.current_thread().name, key, len(data), content_type))
        return f"https://stub.invalid/{bucket.bucket_name}/{key}"


def deliver(outbox: delivery.Delivery, images: list[Any], plan: Plan = PLAN,
            bucket: upload.Bucket | None = None) -> list[str | None]:
    return asyncio.run(outbox.deliver(images, plan, "job-1", bucket))


class TestInline:
    def test_every_image_becomes_a_data_uri_of_its_format(self) -> None:
        outbox = delivery.Delivery(None, 10.0)
        for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
            uris = deliver(outbox, [image(), image(30)], replace(PLAN, output_format=fmt))
            assert len(uris) == 2 and uris[0] != uris[1]
            for uri in uris:
                head, data = uri.split(",", 1)
                assert head == f"data:image/{fmt};base64"
                assert base64.b64decode(data).startswith(magic)

    def test_a_withheld_image_stays_none(self) -> None:
        uris = deliver(delivery.Delivery(None, 10.0), [None, image()])
        assert uris[0] is None and uris[1].startswith("data:image/png")

    def test_a_result_over_the_limit_is_refused_with_advice(self) -> None:
        with pytest.raises(InputError) as info:
            deliver(delivery.Delivery(None, 0.001), [image()])
        assert str(info.value).startswith("the response would be 0.")
        assert "over the 0.001 MB result limit" in str(info.value)
        assert "use output_format jpeg or webp" in str(info.value)


class TestBucket:
    def test_images_are_uploaded_off_the_event_loop_and_returned_as_urls(self) -> None:
        uploader = RecordingUploader()
        outbox = delivery.Delivery(BUCKET, 0.001, uploader=uploader)  # no size limit applies
        uris = deliver(outbox, [image(), None, image(30)], replace(PLAN, seeds=(1, 2, 3),
                                                                    output_format="jpeg"),
                       bucket=BUCKET)
        assert uris[1] is None
        assert [u.rsplit("/", 1)[0] for u in (uris[0], uris[2])] == [
            "https://stub.invalid/images/job-1"] * 2
        assert sorted((c[1].rsplit("-", 1)[0], c[3]) for c in uploader.calls) == [
            ("job-1/0", "image/jpeg"), ("job-1/2", "image/jpeg")]
        # uploads have threads of their own: a stalled bucket never holds up encoding
        assert all(c[0].startswith("upload") for c in uploader.calls)

    def test_the_jobs_s3_config_wins_over_the_workers_bucket(self) -> None:
        outbox = delivery.Delivery(BUCKET, 10.0, uploader=RecordingUploader())
        assert outbox.bucket_for(None) is BUCKET
        own = outbox.bucket_for({**S3_CONFIG, "bucketName": "mine"})
        assert own.bucket_name == "mine"
        with pytest.raises(InputError, match="s3Config is invalid"):
            outbox.bucket_for({"accessId": "a"})

    def test_the_s3_config_is_checked_and_its_client_made_before_the_gpu(self) -> None:
        # Before, the client was made at the first upload, after the GPU had run; a host S3
        # clients refuse then failed the job there, as an internal error.
        dns = Dns({"store.example": [PUBLIC_IP]})
        outbox = delivery.Delivery(None, 10.0, uploader=upload.Uploader(
            guard=EndpointGuard(resolver=dns)))
        bucket = outbox.bucket_for(S3_CONFIG)
        assert bucket.client is not None and not bucket.trusted
        assert bucket.client.meta.endpoint_url == "https://store.example"
        assert dns.lookups == [("store.example", 443)]  # the address policy, up front

    def test_a_jobs_endpoint_on_the_workers_network_is_refused_before_the_gpu(self) -> None:
        outbox = delivery.Delivery(None, 10.0)  # the worker's own policy
        for host in ("127.0.0.1:9000", "169.254.169.254", "10.0.0.7:9000", "[::1]"):
            with pytest.raises(InputError, match="^s3Config.endpointUrl is refused: its host "):
                outbox.bucket_for({**S3_CONFIG, "endpointUrl": f"http://{host}/renders"})


def stalled_config(server: SilentServer) -> dict[str, str]:
    return {**S3_CONFIG, "bucketName": "stalled", "endpointUrl": f"{server.endpoint}/stalled"}


class TestUploadDeadline:
    """A bucket that accepts connections and never answers, as uploads saw it before: each of
    3 attempts x 3 botocore tries x a 30 s read timeout, on the threads that also encode."""

    def test_a_stalled_bucket_fails_at_its_deadline_and_inline_jobs_flow_meanwhile(
            self) -> None:
        uploader = upload.Uploader(guard=LOOPBACK_ALLOWED, backoff_s=0, read_timeout_s=600)
        outbox = delivery.Delivery(None, 10.0, 2.0, uploader=uploader)
        four = replace(PLAN, seeds=(1, 2, 3, 4))  # as many uploads as there are encoders

        async def scenario(server: SilentServer) -> tuple[bool, list[str | None], Exception]:
            bucket = await asyncio.to_thread(outbox.bucket_for, stalled_config(server))
            stalled = asyncio.create_task(outbox.deliver(
                [image(i) for i in range(4)], four, "stalled-job", bucket))
            assert await asyncio.to_thread(server.wait_connections, 4)  # all four in flight
            inline = await outbox.deliver([image()], replace(PLAN, seeds=(9,)), "inline", None)
            stalled_done_first = stalled.done()
            with pytest.raises(JobError) as info:
                await stalled
            return stalled_done_first, inline, info.value

        with SilentServer() as server:
            stalled_done_first, inline, error = asyncio.run(scenario(server))
            # Cut at the deadline, not left to the 600 s read timeout.
            assert server.wait_closed_by_peer()
        assert not stalled_done_first and inline[0].startswith("data:image/png;base64,")
        assert isinstance(error, upload.UploadError) and error.code == "deadline"
        assert str(error) == ("bucket upload to 'stalled' did not finish within the 2 s upload "
                              "deadline (UPLOAD_DEADLINE_S)")

    def test_the_deadline_is_the_jobs_and_a_stalled_config_is_not_kept(self) -> None:
        uploader = upload.Uploader(guard=LOOPBACK_ALLOWED, backoff_s=0)
        outbox = delivery.Delivery(None, 10.0, 0.5, uploader=uploader)
        with SilentServer() as server:
            for _ in range(2):  # a failure, twice: still nothing cached
                bucket = outbox.bucket_for(stalled_config(server))
                with pytest.raises(upload.UploadError, match="0.5 s upload deadline"):
                    deliver(outbox, [image()], replace(PLAN, seeds=(1,)), bucket=bucket)
        assert uploader.cached_job_clients == 0

    def test_bad_deadline(self) -> None:
        with pytest.raises(ValueError, match="deadline_s"):
            delivery.Delivery(None, 10.0, 0)

    def test_the_setting(self) -> None:
        assert Settings().upload_deadline_s == delivery.UPLOAD_DEADLINE_S == 60
        assert Settings.from_env({"UPLOAD_DEADLINE_S": "5"}).upload_deadline_s == 5.0
        for bad in ("0", "3601", "1.5", "soon"):
            with pytest.raises(StartupError, match="UPLOAD_DEADLINE_S=.* an integer from 1 to "
                                                   "3600"):
                Settings.from_env({"UPLOAD_DEADLINE_S": bad})


class TestEstimate:
    def test_a_hopeless_inline_png_batch_is_refused_before_the_gpu(self) -> None:
        plan = replace(PLAN, width=1536, height=1536, seeds=(1, 2, 3, 4))
        with pytest.raises(InputError) as info:
            delivery.Delivery(None, 10.0).check_estimate(plan, None)
        assert str(info.value).startswith("the response would be at least 18.9 MB, over the "
                                          "10 MB result limit")
        assert "4 image(s) of 1536x1536 png" in str(info.value)

    def test_jpeg_or_a_bucket_fits(self) -> None:
        plan = replace(PLAN, width=1536, height=1536, seeds=(1, 2, 3, 4))
        outbox = delivery.Delivery(None, 10.0)
        outbox.check_estimate(replace(plan, output_format="jpeg"), None)
        outbox.check_estimate(plan, BUCKET)

    def test_megabytes_are_decimal(self) -> None:
        assert delivery.response_mb(["x" * 1_000_000]) == pytest.approx(1.004096)


class TestResponse:
    def test_shape_seeds_timings_and_parameters(self) -> None:
        output = delivery.response(PLAN, ["a", "b"], TIMINGS, [])
        assert output == {
            "images": [{"image": "a", "seed": 7}, {"image": "b", "seed": 8}],
            "generation_time": 0.5,
            "timings": {"queue": 0.0123, "generate": 0.5, "deliver": 0.02, "total": 0.6},
            "parameters": PLAN.parameters()}

    def test_warnings_only_when_there_are_some(self) -> None:
        assert delivery.response(PLAN, ["a", "b"], TIMINGS, ["w"])["warnings"] == ["w"]

    def test_with_the_safety_checker_each_image_says_whether_it_was_withheld(self) -> None:
        output = delivery.response(replace(PLAN, safety_check=True), [None, "b"], TIMINGS, [])
        assert output["images"] == [{"image": None, "seed": 7, "nsfw": True},
                                    {"image": "b", "seed": 8, "nsfw": False}]


def test_pixels_survive_png_delivery() -> None:
    original = Image.effect_noise((64, 48), 40).convert("RGB")
    [uri] = deliver(delivery.Delivery(None, 10.0), [original], replace(PLAN, width=64,
                                                                        height=48, seeds=(1,)))
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.tobytes() == original.tobytes()
