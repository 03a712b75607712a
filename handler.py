"""The RunPod adapter: starts the worker at import, then serves ``handler(job)``.

At import (before ``runpod.serverless.start``, so no job is taken by a worker that cannot serve
it): library defaults (``worker/runtime``), the weights prefetch, settings, then
``worker/startup.assemble`` (load, warm-up, GPU queue, delivery). A start-up failure logs one
clear message and exits non-zero. ``WORKER_MODE=http`` instead serves RunPod's load-balancing
contract (``worker/frontdoor``): listening first, loading in the background.

``handler(job)`` is async, so one worker holds up to ``MAX_CONCURRENCY`` jobs. The job flow and
its error mapping live in ``worker/service`` (shared with HTTP mode): this adapter adds RunPod's
per-step ``progress_update`` and returns the reply (``refresh_worker`` in it only after a bug on
the GPU).
"""

from __future__ import annotations

from worker import prefetch, runtime

runtime.configure_libraries()  # before runpod, torch and diffusers read their environment
prefetch.start_from_env()  # reads the weights into the page cache while torch imports

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from worker.errors import StartupError
from worker.outputs import encoding
from worker.plan import Plan, Preview, StepCallback
from worker.service import Service
from worker.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def progress_reporter(job: dict[str, Any], plan: Plan) -> StepCallback | None:
    """Per-step progress through RunPod (shown by /status while the job runs), with a small
    JPEG of the estimate when the job asked for ``preview``.

    Only on the platform: locally the SDK would POST to a placeholder URL and log an error.
    """
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return None

    def report(done: int, total: int, preview: Preview | None = None) -> None:
        update: dict[str, Any] = {"step": done, "steps": total, "progress": round(done / total, 3)}
        if plan.preview and preview is not None:
            update["preview"] = encoding.data_uri(preview(), "jpeg")
        runpod.serverless.progress_update(job, update)

    return report


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Serve one RunPod job; never raises."""
    outcome = await SERVICE.run(job.get("input"), job.get("s3Config"), str(job.get("id", "?")),
                                lambda plan: progress_reporter(job, plan))
    return outcome.reply


def _or_exit(step: Callable[[], T]) -> T:
    """A start-up step, or its one-line reason in the log and a non-zero exit."""
    try:
        return step()
    except StartupError as exc:
        log.error("worker cannot start: %s", exc)
        sys.exit(1)


runtime.configure_logging()
SETTINGS = _or_exit(Settings.from_env)
if SETTINGS.worker_mode == "queue":
    # torch and diffusers load only here: HTTP mode listens first (its /ping answers 204 while
    # they import and the model loads in the background).
    import runpod

    from worker import startup
    SERVICE = _or_exit(lambda: startup.assemble(SETTINGS))
    ENGINE, DELIVERY, GPU = SERVICE.engine, SERVICE.delivery, SERVICE.gpu


def _assemble_in_background() -> Service:
    from worker import startup  # the heavy imports, on the start-up thread

    return startup.assemble(SETTINGS)


def main() -> None:
    """RunPod's worker loop (or its local test modes: ``--test_input``, ``--rp_serve_api``), or
    with ``WORKER_MODE=http`` the HTTP server of a load-balancing endpoint."""
    if SETTINGS.worker_mode == "http":
        from worker.frontdoor import server

        server.serve(SETTINGS, _assemble_in_background)
        return
    runpod.serverless.start({"handler": handler,
                             "concurrency_modifier": lambda current: SETTINGS.max_concurrency})


if __name__ == "__main__":
    main()
