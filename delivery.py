"""How generated images reach the caller: encoded inline as data URIs, or uploaded to a bucket,
and never in a result larger than RunPod will deliver.

RunPod drops results over 10 MB on ``/run`` (20 MB on ``/runsync``) without telling the caller,
so an inline result over ``MAX_RESPONSE_MB`` is refused with advice instead: before any GPU work
when even a low estimate is over, after encoding when the real size is. Runs in the handler's
thread pool, never on the GPU executor.
"""

from __future__ import annotations

from typing import Any

import encoding
import upload
from resolve import Plan

# Lower-end bytes per pixel of encoded generated images (bench/RESULTS.md: fpng PNG 1.7-2.3,
# JPEG/WebP q90 0.25-0.3): low, so that only requests that cannot fit are refused up front.
BYTES_PER_PIXEL_LOW = {"png": 1.5, "jpeg": 0.1, "webp": 0.1}
BASE64 = 4 / 3
JSON_OVERHEAD = 4096  # parameters, warnings, timings


def estimate_mb(plan: Plan) -> float:
    """A low estimate of the inline response's size, before anything is generated."""
    pixels = plan.width * plan.height * len(plan.seeds)
    return (pixels * BYTES_PER_PIXEL_LOW[plan.output_format] * BASE64 + JSON_OVERHEAD) / 1e6


def response_mb(uris: list[str | None]) -> float:
    """The inline response's size once its images are encoded."""
    return (sum(len(uri or "") for uri in uris) + JSON_OVERHEAD) / 1e6


def too_large(megabytes: float, limit_mb: float, plan: Plan, estimated: bool) -> str:
    """The caller-facing error: the size, the limit, and what to do instead."""
    return (f"the response {'would be at least' if estimated else 'would be'} "
            f"{megabytes:.1f} MB, over the {limit_mb:g} MB result limit (MAX_RESPONSE_MB; "
            f"RunPod drops larger /run results): use output_format jpeg or webp, fewer images, "
            f"a smaller size, or a bucket (BUCKET_* settings or the job's s3Config) for "
            f"{len(plan.seeds)} image(s) of {plan.width}x{plan.height} {plan.output_format}")


def deliver(image: Any, index: int, plan: Plan, job_id: str, bucket: upload.Bucket | None,
            uploader: upload.Uploader) -> str | None:
    """One image as a data URI, or as the URL of its uploaded copy; None stays withheld."""
    if image is None:
        return None
    data = encoding.encode(image, plan.output_format, plan.quality)
    if bucket is None:
        return encoding.data_uri(data, plan.output_format)
    key = upload.object_key(job_id, index, encoding.EXTENSIONS[plan.output_format])
    return uploader.upload(bucket, key, data, encoding.MIME_TYPES[plan.output_format])
