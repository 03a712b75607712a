"""HTTP mode's process: serve first, load in the background, so ``/ping`` can say 204.

uvicorn listens only after the app's lifespan start-up has finished, so a model loaded there
(or at import) leaves RunPod's health probe with "connection refused" instead of "initializing".
``serve`` starts listening at once and runs the same start-up as queue mode
(``worker/startup.assemble``: load, warm-up, GPU queue, delivery) in a thread; ``/ping`` turns
200 when it is done, or 500 with the reason when it failed (RunPod then replaces the worker).
``PORT_HEALTH`` may differ from ``PORT``: then a second listener serves the same app there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import uvicorn

from worker.errors import StartupError
from worker.frontdoor.app import Backend, create_app
from worker.service import Service
from worker.settings import Settings

log = logging.getLogger(__name__)


def load_in_background(backend: Backend, start: Callable[[], Service]) -> threading.Thread:
    def load() -> None:
        try:
            backend.service = start()
            log.info("ready: serving HTTP requests")
        except StartupError as exc:
            backend.failure = str(exc)
            log.error("worker cannot start: %s", exc)
        except Exception as exc:  # noqa: BLE001 - /ping must report it, not hang at 204
            backend.failure = f"start-up failed ({type(exc).__name__})"
            log.exception("worker cannot start")

    thread = threading.Thread(target=load, name="start-up", daemon=True)
    thread.start()
    return thread


def backend_for(settings: Settings) -> Backend:
    return Backend(api_key=settings.api_key, max_running=settings.max_concurrency,
                   max_waiting=settings.max_waiting)


def serve(settings: Settings, start: Callable[[], Service]) -> None:
    """Listen on ``PORT`` (and ``PORT_HEALTH``), load the model, serve until stopped."""
    backend = backend_for(settings)
    app = create_app(backend)
    ports = sorted({settings.port, settings.port_health})
    servers = [uvicorn.Server(uvicorn.Config(app, host=settings.host, port=port,
                                             log_level="warning", access_log=False))
               for port in ports]
    log.info("HTTP mode: listening on %s port(s) %s; loading the model", settings.host,
             ", ".join(map(str, ports)))
    load_in_background(backend, start)

    async def run_all() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    asyncio.run(run_all())
