"""One job through the worker, whichever front door it came in by (RunPod's queue or HTTP).

``Service.run`` is the whole job flow: parse the input (``schemas``) -> prepare the plan off the
event loop, its images decoded in the decode pool (``worker/inputs``) -> queue it on the GPU
(``worker/gpu_queue`` -> ``pipeline.Engine``) -> deliver (``worker/outputs``) -> the response.
It never raises: it returns an ``Outcome`` whose ``kind`` tells the front door how to answer.
Error types map to outcomes here and nowhere else: ``InputError`` is the caller's mistake
(``rejected``) and ``JobError`` a job that could not complete (``failed``), each
``{"error": "<its message>"}``; any other exception is a bug (``internal``),
``internal error: <type>``, with ``refresh_worker`` only when it happened on the GPU (a failure
inside torch may leave the GPU in a bad state). No log record at INFO or above carries the
caller's text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from schemas import parse_request
from worker.adapters.store import LoraStore
from worker.errors import InputError, JobError, bug_report
from worker.gpu_queue import GpuWorker
from worker.inputs.prepare import prepare_async
from worker.outputs import delivery
from worker.plan import Plan, StepCallback, with_defaults
from worker.settings import Settings

log = logging.getLogger(__name__)

Kind = Literal["done", "rejected", "failed", "internal"]


class EngineInfo(Protocol):
    """What the job flow needs of ``pipeline.Engine`` (the GPU work itself goes through
    ``GpuWorker``), so this module imports no torch."""

    steps: tuple[int, ...]

    def count_tokens(self, text: str) -> int: ...


@dataclass(frozen=True)
class Outcome:
    """A job's answer: ``reply`` is the output dict, or ``{"error": ...}``."""

    kind: Kind
    reply: dict[str, Any]
    plan: Plan | None = field(default=None, compare=False)


@dataclass
class Service:
    settings: Settings
    engine: EngineInfo
    delivery: delivery.Delivery
    gpu: GpuWorker
    loras: LoraStore | None = None  # per-job LoRAs (worker/adapters/store)

    async def run(self, job_input: Any, s3_config: Any, job_id: str,
                  on_step: Callable[[Plan], StepCallback | None] | None = None, *,
                  inline: bool = False) -> Outcome:
        """Serve one job; never raises. ``on_step(plan)`` may give a per-step callback;
        ``inline``: the images come back as data URIs even where a bucket is configured (the
        wire formats that carry base64 only)."""
        received = time.perf_counter()
        try:
            request = with_defaults(parse_request(job_input), self.settings.request_defaults())
            bucket = None if inline else await asyncio.to_thread(self.delivery.bucket_for,
                                                                  s3_config)
            plan, warnings = await prepare_async(  # decodes in the pool, cancellable
                request, self.engine.steps, self.settings.safety_mode, self.engine.count_tokens,
                loras=self.loras)
            plan = plan.with_served(getattr(self.engine, "served", None))  # BASE_MODEL's names
            self.delivery.check_estimate(plan, bucket)
        except InputError as exc:
            return rejected(job_id, exc)
        except Exception as exc:  # noqa: BLE001 - a bug in input handling must not crash the job
            return internal(job_id, exc, "preparing the input", on_gpu=False)
        queued = time.perf_counter()
        try:
            callback = on_step(plan) if on_step else None
        except Exception as exc:  # noqa: BLE001 - a front door's bug must not crash the job
            return internal(job_id, exc, "reporting progress", on_gpu=False)
        if plan.preview and (callback is None or getattr(self.engine, "previewer", 0) is None):
            warnings.append("preview was ignored: previews go to the progress updates on RunPod "
                            "and to streamed HTTP requests, and need TAESDXL on the worker")
        try:
            result = await asyncio.wrap_future(self.gpu.submit(plan, callback))
        except InputError as exc:  # a LoRA file the engine found unusable: the caller's
            return rejected(job_id, exc)
        except JobError as exc:
            return failed(job_id, exc)
        except Exception as exc:  # noqa: BLE001 - one job's failure must not end the worker
            return internal(job_id, exc, "generating", on_gpu=True)
        generated = time.perf_counter()
        try:
            uris = await self.delivery.deliver(result.images, plan, job_id, bucket)
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
                 "%.3f s (batch of %d), deliver %.3f s", job_id, plan.mode, plan.width,
                 plan.height, plan.steps, len(plan.seeds), plan.seeds[0], timings["queue"],
                 result.seconds, result.batch_jobs, timings["deliver"])
        return Outcome("done", delivery.response(plan, uris, timings, warnings), plan)


def rejected(job_id: str, exc: InputError) -> Outcome:
    log.info("job %s rejected", job_id)  # the message may quote the prompt: DEBUG only
    log.debug("job %s: %s", job_id, exc)
    return Outcome("rejected", {"error": str(exc)})


def failed(job_id: str, exc: JobError) -> Outcome:
    log.warning("job %s failed: %s", job_id, exc)  # out of GPU memory, invalid image, upload
    return Outcome("failed", {"error": str(exc)})


def internal(job_id: str, exc: Exception, stage: str, on_gpu: bool) -> Outcome:
    log.error("job %s: %s failed: %s", job_id, stage, bug_report(exc))  # no caller text
    log.debug("job %s: %s", job_id, exc)
    reply: dict[str, Any] = {"error": f"internal error: {type(exc).__name__}"}
    return Outcome("internal", (reply | {"refresh_worker": True}) if on_gpu else reply)
