"""The RunPod adapter: starts the worker at import, then serves ``handler(job)``.

At import (before ``runpod.serverless.start``, so no job is taken by a worker that cannot serve
it): settings, model load and warm-up (``startup``), the GPU executor (``batching``), and the
bucket, if one is configured. A start-up failure logs one clear message and exits non-zero.

``handler(job)`` is async, so one worker holds up to ``MAX_CONCURRENCY`` jobs: it validates the
input (``schemas``), decodes init images off the event loop (``image_inputs``), resolves the
exact parameters (``resolve``), queues the plan on the GPU executor, and encodes or uploads the
images in a thread pool while the GPU runs the next batch. Every failure becomes
``{"error": "<one string>"}`` for that job; the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

# runpod's default level (DEBUG) logs every job's whole output, base64 images included.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

import prefetch

prefetch.start_from_env()  # reads the weights into the page cache while torch imports

import runpod
import torch
from PIL import Image

import decoding
import delivery
import image_inputs
import pipeline
import safety
import upload
from batching import GpuWorker, StepCallback
from resolve import Plan, resolve
from schemas import CLIP_MAX_TOKENS, GenerateRequest, Settings, parse_request
from startup import StartupError, start

log = logging.getLogger("worker")

# Encoding (fpng ~5 ms, libjpeg ~3 ms a 1024² image) and uploads (sockets, GIL released) keep
# up with the GPU from a few threads, never from the GPU executor.
ENCODE_THREADS = 4


def progress_reporter(job: dict[str, Any]) -> StepCallback | None:
    """Per-step progress through RunPod (shown by /status while the job runs).

    Only on the platform: locally the SDK would POST to a placeholder URL and log an error.
    """
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return None

    def report(done: int, total: int) -> None:
        runpod.serverless.progress_update(job, {"step": done, "steps": total,
                                                "progress": round(done / total, 3)})

    return report


def truncation_warnings(plan: Plan) -> list[str]:
    """CLIP reads 77 tokens; say so when a prompt that is used runs past them."""
    warnings = []
    for name, text in (("prompt", plan.prompt), ("negative_prompt", plan.negative_prompt)):
        if text and (count := pipeline.prompt_tokens(MODEL, text)) > CLIP_MAX_TOKENS:
            warnings.append(f"{name} is {count} CLIP tokens; only the first {CLIP_MAX_TOKENS} "
                            f"were used")
    return warnings


def prepare(request: GenerateRequest, job: dict[str, Any]) -> tuple[Plan, list[str]]:
    """Decode init images and resolve the plan (blocking: runs in a thread)."""
    init = mask = None
    if request.image is not None:
        init = image_inputs.load_image(request.image, "image")
    safety_check, safety_warnings = SETTINGS.safety_for(request)
    plan, warnings = resolve(request, MODEL.steps, image_size=init.size if init else None,
                             safety_check=safety_check)
    if init is not None:
        size = (plan.width, plan.height)
        init = init if init.size == size else init.resize(size, Image.Resampling.LANCZOS)
        if request.mask is not None:
            mask = image_inputs.load_mask(request.mask, "mask", size)
        plan = plan.with_images(init, mask)
    return plan, warnings + safety_warnings + truncation_warnings(plan)


def check_estimate(plan: Plan, bucket: upload.Bucket | None) -> None:
    """Refuse, before the GPU runs, a response that cannot fit the result limit."""
    if bucket is None and (mb := delivery.estimate_mb(plan)) > SETTINGS.max_response_mb:
        raise ValueError(delivery.too_large(mb, SETTINGS.max_response_mb, plan, estimated=True))


def bucket_for(job: dict[str, Any]) -> upload.Bucket | None:
    """The job's own ``s3Config`` wins over the worker's bucket settings."""
    if job.get("s3Config") is not None:
        return upload.bucket_from_s3_config(job["s3Config"])
    return BUCKET


def run_batch(plans: Sequence[Plan], on_step: StepCallback | None) -> list[list[Any]]:
    """Generate on the GPU thread; images the safety checker flags become None (withheld).

    Out of GPU memory with several images: free the cache and run them one at a time (each
    image has its own generator, so the results are the same), once; then give up.
    """
    try:
        results = pipeline.generate_batch(MODEL, plans, on_step)
    except torch.cuda.OutOfMemoryError:
        images = sum(len(plan.seeds) for plan in plans)
        if images == 1:
            raise
        log.warning("out of GPU memory for %d image(s): retrying one image at a time", images)
        torch.cuda.empty_cache()
        results = [[pipeline.generate(MODEL, replace(plan, seeds=(seed,)))[0]
                    for seed in plan.seeds] for plan in plans]
    for plan, images in zip(plans, results, strict=True):
        if plan.safety_check:
            flags = safety.nsfw_flags(MODEL, images)
            images[:] = [None if flagged else image for image, flagged in zip(images, flags,
                                                                                strict=True)]
    return results


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Serve one RunPod job; never raises."""
    job_id = str(job.get("id", "?"))
    received = time.perf_counter()
    try:
        request = parse_request(job.get("input"))
        bucket = bucket_for(job)
        plan, warnings = await asyncio.to_thread(prepare, request, job)
        check_estimate(plan, bucket)
    except ValueError as exc:  # the caller's input: schemas, image_inputs, resolve, s3Config
        log.info("job %s rejected", job_id)  # the message may quote the prompt: DEBUG only
        log.debug("job %s: %s", job_id, exc)
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a bug in input handling must not crash the job
        log.exception("job %s: preparing the input failed", job_id)
        return {"error": f"internal error: {type(exc).__name__}"}
    loop = asyncio.get_running_loop()
    try:
        queued = time.perf_counter()
        result = await asyncio.wrap_future(GPU.submit(plan, progress_reporter(job)))
        generated = time.perf_counter()
        uris = await asyncio.gather(*(
            loop.run_in_executor(ENCODE_POOL, delivery.deliver, image, i, plan, job_id, bucket,
                                 UPLOADER)
            for i, image in enumerate(result.images)))
        delivered = time.perf_counter()
    except upload.UploadError as exc:
        log.warning("job %s: %s", job_id, exc)
        return {"error": str(exc)}
    except decoding.BadOutputError:
        log.error("job %s: NaN or black output even in fp32", job_id)
        return {"error": "the model produced an invalid (NaN or all-black) image even after "
                         "a full-precision decode: try another seed or prompt"}
    except torch.cuda.OutOfMemoryError:
        log.exception("job %s: out of GPU memory", job_id)
        torch.cuda.empty_cache()
        return {"error": f"out of GPU memory generating {len(plan.seeds)} image(s) at "
                         f"{plan.width}x{plan.height}: try fewer images or a smaller size"}
    except Exception as exc:  # noqa: BLE001 - one job's failure must not end the worker
        log.exception("job %s failed", job_id)
        # A failure inside torch may leave the GPU in a bad state: let RunPod replace the worker.
        return {"error": f"internal error: {type(exc).__name__}", "refresh_worker": True}
    size_mb = delivery.response_mb(uris)
    if bucket is None and size_mb > SETTINGS.max_response_mb:
        log.warning("job %s: response of %.1f MB refused", job_id, size_mb)
        return {"error": delivery.too_large(size_mb, SETTINGS.max_response_mb, plan,
                                            estimated=False)}
    log.info("job %s: %s %dx%d, %d step(s), %d image(s), seed %d: queue %.3f s, generate "
             "%.3f s (batch of %d), deliver %.3f s", job_id, plan.mode, plan.width, plan.height,
             plan.steps, len(plan.seeds), plan.seeds[0], result.started - queued,
             result.seconds, result.batch_jobs, delivered - generated)
    items = [{"image": uri, "seed": seed} for uri, seed in zip(uris, plan.seeds, strict=True)]
    if plan.safety_check:  # a flagged image is withheld, never replaced by a black picture
        for item in items:
            item["nsfw"] = item["image"] is None
    response: dict[str, Any] = {
        "images": items,
        "generation_time": round(result.seconds, 4),
        "timings": {"queue": round(result.started - queued, 4),
                    "generate": round(result.seconds, 4),
                    "deliver": round(delivered - generated, 4),
                    "total": round(delivered - received, 4)},
        "parameters": plan.parameters(),
    }
    if warnings:
        response["warnings"] = warnings
    return response


def _start_or_exit() -> tuple[Settings, pipeline.Model, upload.Bucket | None]:
    # force: runpod's rp_upload configures the root logger at import with a format of its own.
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
        bucket = upload.bucket_from_env(settings.bucket)
        return settings, start(settings), bucket
    except (StartupError, ValueError) as exc:
        log.error("worker cannot start: %s", exc)
        sys.exit(1)


SETTINGS, MODEL, BUCKET = _start_or_exit()
UPLOADER = upload.Uploader()
ENCODE_POOL = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="deliver")
GPU = GpuWorker(run_batch, max_batch_images=SETTINGS.max_batch_images)

if __name__ == "__main__":
    runpod.serverless.start({"handler": handler,
                             "concurrency_modifier": lambda current: SETTINGS.max_concurrency})
