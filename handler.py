"""The RunPod adapter: starts the worker at import, then serves ``handler(job)``.

At import (before ``runpod.serverless.start``, so no job is taken by a worker that cannot serve
it): library defaults (``worker/runtime``), the weights prefetch, settings, start-up
(``worker/startup``: load and warm-up), the GPU queue and delivery. A start-up failure logs one
clear message and exits non-zero.

``handler(job)`` is async, so one worker holds up to ``MAX_CONCURRENCY`` jobs: parse the input
(``schemas``) -> prepare the plan in a thread (``worker/inputs``) -> queue it on the GPU
(``worker/gpu_queue`` -> ``pipeline.Engine``) -> deliver (``worker/outputs``) -> respond. Error
types map to replies here and nowhere else: ``InputError`` is the caller's mistake and
``JobError`` a job that could not complete (each ``{"error": "<its message>"}``); any other
exception is a bug, ``internal error: <type>``, with ``refresh_worker`` only when it happened on
the GPU (a failure inside torch may leave the GPU in a bad state).
"""

from __future__ import annotations

from worker import prefetch, runtime

runtime.configure_libraries()  # before runpod, torch and diffusers read their environment
prefetch.start_from_env()  # reads the weights into the page cache while torch imports

import asyncio
import logging
import os
import sys
import time
from typing import Any

import runpod

import pipeline
from schemas import parse_request
from worker.errors import InputError, JobError, StartupError, bug_report
from worker.gpu_queue import GpuWorker
from worker.inputs.prepare import prepare_async
from worker.outputs import delivery, upload
from worker.plan import StepCallback
from worker.settings import Settings
from worker.startup import start

log = logging.getLogger(__name__)


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


def rejected(job_id: str, exc: InputError) -> dict[str, Any]:
    log.info("job %s rejected", job_id)  # the message may quote the prompt: DEBUG only
    log.debug("job %s: %s", job_id, exc)
    return {"error": str(exc)}


def failed(job_id: str, exc: JobError) -> dict[str, Any]:
    log.warning("job %s failed: %s", job_id, exc)  # out of GPU memory, invalid image, upload
    return {"error": str(exc)}


def internal(job_id: str, exc: Exception, stage: str, on_gpu: bool) -> dict[str, Any]:
    log.error("job %s: %s failed: %s", job_id, stage, bug_report(exc))  # no caller text
    log.debug("job %s: %s", job_id, exc)
    reply: dict[str, Any] = {"error": f"internal error: {type(exc).__name__}"}
    return (reply | {"refresh_worker": True}) if on_gpu else reply


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Serve one RunPod job; never raises."""
    job_id = str(job.get("id", "?"))
    received = time.perf_counter()
    try:
        request = parse_request(job.get("input"))
        bucket = await asyncio.to_thread(DELIVERY.bucket_for, job.get("s3Config"))  # DNS
        plan, warnings = await prepare_async(
            request, ENGINE.steps, SETTINGS.safety_mode, ENGINE.count_tokens)
        DELIVERY.check_estimate(plan, bucket)
    except InputError as exc:
        return rejected(job_id, exc)
    except Exception as exc:  # noqa: BLE001 - a bug in input handling must not crash the job
        return internal(job_id, exc, "preparing the input", on_gpu=False)
    queued = time.perf_counter()
    try:
        result = await asyncio.wrap_future(GPU.submit(plan, progress_reporter(job)))
    except JobError as exc:
        return failed(job_id, exc)
    except Exception as exc:  # noqa: BLE001 - one job's failure must not end the worker
        return internal(job_id, exc, "generating", on_gpu=True)
    generated = time.perf_counter()
    try:
        uris = await DELIVERY.deliver(result.images, plan, job_id, bucket)
    except InputError as exc:  # the result would not fit: the caller's size and format
        return rejected(job_id, exc)
    except JobError as exc:
        return failed(job_id, exc)
    except Exception as exc:  # noqa: BLE001 - encoding or upload, off the GPU
        return internal(job_id, exc, "delivering the images", on_gpu=False)
    delivered = time.perf_counter()
    timings = {"queue": result.started - queued, "generate": result.seconds,
               "deliver": delivered - generated, "total": delivered - received}
    log.info("job %s: %s %dx%d, %d step(s), %d image(s), seed %d: queue %.3f s, generate "
             "%.3f s (batch of %d), deliver %.3f s", job_id, plan.mode, plan.width, plan.height,
             plan.steps, len(plan.seeds), plan.seeds[0], timings["queue"], result.seconds,
             result.batch_jobs, timings["deliver"])
    return delivery.response(plan, uris, timings, warnings)


def _start_or_exit() -> tuple[Settings, pipeline.Engine, delivery.Delivery]:
    runtime.configure_logging()
    try:
        settings = Settings.from_env()
        bucket = upload.bucket_from_env(settings.bucket_env)
        outbox = delivery.Delivery(bucket, settings.max_response_mb, settings.upload_deadline_s)
        return settings, start(settings), outbox
    except StartupError as exc:
        log.error("worker cannot start: %s", exc)
        sys.exit(1)


SETTINGS, ENGINE, DELIVERY = _start_or_exit()
GPU = GpuWorker(ENGINE.generate, max_batch_images=SETTINGS.max_batch_images)


def main() -> None:
    """RunPod's worker loop (or its local test modes: ``--test_input``, ``--rp_serve_api``)."""
    runpod.serverless.start({"handler": handler,
                             "concurrency_modifier": lambda current: SETTINGS.max_concurrency})


if __name__ == "__main__":
    main()
