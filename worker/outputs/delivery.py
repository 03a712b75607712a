"""How generated images reach the caller, and the response dict that carries them.

Images are encoded inline as data URIs, or uploaded to a bucket (the job's ``s3Config``, else
the worker's ``BUCKET_*``) and returned as URLs; encoding and uploads run in thread pools of
their own, never on the GPU thread, so the GPU runs the next batch meanwhile. Uploads have a
pool apart from encoding, so a bucket that stalls holds upload threads only, never another
job's encoding, and each job's uploads share one deadline (``UPLOAD_DEADLINE_S``): at it the
job fails with an ``UploadError`` and its uploads still running are cut (``upload.Budget``).

RunPod drops results over 10 MB on ``/run`` (20 MB on ``/runsync``) without telling the caller,
so an inline result over ``MAX_RESPONSE_MB`` is refused with advice instead (an ``InputError``:
the caller's choice of size, count and format decides it): before any GPU work when even a low
estimate is over, after encoding when the real size is. MB here is 10^6 bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from worker.errors import InputError
from worker.outputs import encoding, upload
from worker.plan import Plan

log = logging.getLogger(__name__)

# Encoding (fpng and libjpeg take a few ms a 1024² image) keeps up with the GPU from a few
# threads; uploads (sockets, GIL released) wait on the network: two jobs of MAX_IMAGES (4) at once.
DELIVERY_THREADS = 4
UPLOAD_THREADS = 8
# Four 1536² PNGs (~20 MB) reach a bucket in seconds; a minute bounds a stalled one at a tenth
# of RunPod's default 600 s execution timeout. Settings.upload_deadline_s (UPLOAD_DEADLINE_S).
UPLOAD_DEADLINE_S = 60.0
# Lower-end bytes per pixel of encoded generated images (bench/RESULTS.md: fpng PNG 1.7-2.3,
# JPEG/WebP q90 0.25-0.3): low, so that only requests that cannot fit are refused up front.
BYTES_PER_PIXEL_LOW = {"png": 1.5, "jpeg": 0.1, "webp": 0.1}
BASE64 = 4 / 3
JSON_OVERHEAD = 4096  # parameters, warnings, timings


def estimate_mb(plan: Plan) -> float:
    """A low estimate of the inline response's size, before anything is generated."""
    pixels = plan.width * plan.height * len(plan.seeds)
    return (pixels * BYTES_PER_PIXEL_LOW[plan.output_format] * BASE64 + JSON_OVERHEAD) / 1e6


def response_mb(uris: Sequence[str | None]) -> float:
    """The inline response's size once its images are encoded."""
    return (sum(len(uri or "") for uri in uris) + JSON_OVERHEAD) / 1e6


def too_large(megabytes: float, limit_mb: float, plan: Plan, estimated: bool) -> InputError:
    """The caller-facing error: the size, the limit, and what to do instead."""
    return InputError(
        f"the response {'would be at least' if estimated else 'would be'} {megabytes:.1f} MB, "
        f"over the {limit_mb:g} MB result limit (MAX_RESPONSE_MB; RunPod drops larger /run "
        f"results): use output_format jpeg or webp, fewer images, a smaller size, or a bucket "
        f"(BUCKET_* settings or the job's s3Config) for {len(plan.seeds)} image(s) of "
        f"{plan.width}x{plan.height} {plan.output_format}")


def response(plan: Plan, uris: Sequence[str | None], timings: dict[str, float],
             warnings: list[str]) -> dict[str, Any]:
    """The job's output: images with their seeds, timings, the parameters used, warnings.

    ``timings`` in seconds: ``queue``, ``generate`` (the GPU batch), ``deliver``, ``total``.
    """
    items: list[dict[str, Any]] = [{"image": uri, "seed": seed}
                                   for uri, seed in zip(uris, plan.seeds, strict=True)]
    if plan.safety_check:  # a flagged image is withheld, never replaced by a black picture
        for item in items:
            item["nsfw"] = item["image"] is None
    output: dict[str, Any] = {
        "images": items,
        "generation_time": round(timings["generate"], 4),
        "timings": {name: round(seconds, 4) for name, seconds in timings.items()},
        "parameters": plan.parameters(),
    }
    if warnings:
        output["warnings"] = warnings
    return output


class Delivery:
    """Delivers images as data URIs or bucket URLs, within the response size limit."""

    def __init__(self, bucket: upload.Bucket | None, max_response_mb: float,
                 deadline_s: float = UPLOAD_DEADLINE_S, uploader: upload.Uploader | None = None,
                 threads: int = DELIVERY_THREADS, upload_threads: int = UPLOAD_THREADS) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s={deadline_s} must be > 0")
        self.bucket = bucket  # the worker's own (BUCKET_*), or None
        self.max_response_mb = max_response_mb
        self.deadline_s = deadline_s
        self.uploader = uploader or upload.Uploader()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="deliver")
        self._uploads = ThreadPoolExecutor(upload_threads, thread_name_prefix="upload")

    def bucket_for(self, s3_config: object) -> upload.Bucket | None:
        """The job's own ``s3Config`` wins over the worker's bucket; ``InputError`` if bad.

        Call it before the GPU runs: the whole ``s3Config`` is checked, its host resolved
        against the address policy and its client made here (blocking: call it in a thread).
        """
        if s3_config is not None:
            return self.uploader.prepare(upload.bucket_from_s3_config(s3_config))
        return self.bucket

    def check_estimate(self, plan: Plan, bucket: upload.Bucket | None) -> None:
        """Refuse, before the GPU runs, an inline response that cannot fit the limit."""
        if bucket is None and (mb := estimate_mb(plan)) > self.max_response_mb:
            raise too_large(mb, self.max_response_mb, plan, estimated=True)

    async def deliver(self, images: Sequence[Any], plan: Plan, job_id: str,
                      bucket: upload.Bucket | None) -> list[str | None]:
        """Every image as a data URI or URL (None stays withheld), encoded in parallel.

        Raises ``UploadError`` when an upload fails or the job's upload deadline passes, and
        ``InputError`` when the inline result is over the limit after all.
        """
        loop = asyncio.get_running_loop()
        if bucket is None:
            uris = await asyncio.gather(*(
                loop.run_in_executor(self._pool, self._inline, image, plan) for image in images))
            if (mb := response_mb(uris)) > self.max_response_mb:
                raise too_large(mb, self.max_response_mb, plan, estimated=False)
            return uris
        budget = upload.Budget(self.deadline_s)
        ok = False
        try:
            uris = await asyncio.wait_for(asyncio.gather(*(
                self._upload(loop, image, i, plan, job_id, bucket, budget)
                for i, image in enumerate(images))), budget.remaining())
            ok = True
            return uris
        except TimeoutError:
            log.warning("job %s: uploads to bucket %s still running at the %g s deadline",
                        job_id, upload.logged_name(bucket), self.deadline_s)
            raise upload.UploadError(upload.MESSAGES["deadline"].format(
                bucket=bucket.bucket_name, deadline=self.deadline_s), "deadline") from None
        finally:
            budget.abort()  # this job's uploads still running (one failed, or time is up) stop
            self.uploader.release(bucket, ok)

    def _inline(self, image: Any, plan: Plan) -> str | None:
        if image is None:
            return None
        return encoding.data_uri(encoding.encode(image, plan.output_format, plan.quality),
                                 plan.output_format)

    async def _upload(self, loop: asyncio.AbstractEventLoop, image: Any, index: int, plan: Plan,
                      job_id: str, bucket: upload.Bucket, budget: upload.Budget) -> str | None:
        if image is None:
            return None
        data = await loop.run_in_executor(self._pool, encoding.encode, image,
                                          plan.output_format, plan.quality)
        key = upload.object_key(job_id, index, encoding.EXTENSIONS[plan.output_format])
        return await loop.run_in_executor(self._uploads, self.uploader.upload, bucket, key, data,
                                          encoding.MIME_TYPES[plan.output_format], budget)
