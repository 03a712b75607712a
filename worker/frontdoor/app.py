"""The ASGI app of HTTP mode: RunPod's load-balancing contract and three APIs on one job flow.

Routes: ``GET /ping`` (RunPod's health: 204 while the model loads, 200 when ready, 500 with the
reason when it cannot serve); ``POST /v1/generate`` (our API: the queue job's ``input`` as the
body, its output as the response, or server-sent events with ``"stream": true``); OpenAI
Images (``POST /v1/images/generations``, ``POST /v1/images/edits``, ``GET /v1/models``);
AUTOMATIC1111 (``POST /sdapi/v1/txt2img``, ``/img2img`` and the read-only probes). Every
generation goes through ``Service.run``, the queue handler's code path: same validation, limits,
batching and error texts. Each API answers in its own error shape.

Load-balancing endpoints have no backlog queue, so admission is bounded: ``MAX_CONCURRENCY``
jobs run, ``MAX_WAITING`` more wait, and the next gets 429 with ``Retry-After`` at once. A client
that disconnects cancels its job unless the GPU already runs it. With ``API_KEY`` set, every
route but ``/ping`` needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from worker.errors import InputError
from worker.frontdoor import a1111, openai_images
from worker.outputs import encoding
from worker.plan import Plan, Preview, StepCallback
from worker.service import Outcome, Service

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a Lightning job takes about a second on the GPU: try again after one
LOADING_RETRY_S = 10  # a cold start loads for tens of seconds
STATUS = {"done": 200, "rejected": 400, "failed": 500, "internal": 500}
DISCONNECT_POLL_S = 0.1
WARNINGS_HEADER = "X-Worker-Warnings"
HTTP_ONLY = ("stream",)  # fields of POST /v1/generate that the queue job has no use for


@dataclass
class Backend:
    """What the app serves from: nothing while loading, then the service, or why it failed."""

    service: Service | None = None
    failure: str | None = None
    api_key: str | None = None
    max_running: int = 1
    max_waiting: int = 0
    held: int = field(default=0, init=False)  # requests admitted: running or waiting
    _slots: asyncio.Semaphore | None = field(default=None, init=False)

    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:  # made on the server's event loop
            self._slots = asyncio.Semaphore(self.max_running)
        return self._slots


class Refused(Exception):
    """A request answered before it reaches the job flow: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


# --- error shapes per API --------------------------------------------------------------------

def _ours(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": message}


def _openai(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return openai_images.error_body(message, param=param or openai_images.param_of(message),
                                    kind=kind)


def _a1111(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return a1111.error_body(message, status)


Shape = Callable[[int, str, str | None], dict[str, Any]]


def _shape_for(path: str) -> Shape:
    if path.startswith("/v1/images") or path.startswith("/v1/models"):
        return _openai
    if path.startswith("/sdapi/"):
        return _a1111
    return _ours


def _error(path: str, status: int, message: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    extra = {"x-should-retry": "false"} if status < 500 and status != 429 else {}
    return JSONResponse(_shape_for(path)(status, message, param), status_code=status,
                        headers={**extra, **(headers or {})})


def _warnings_header(warnings: list[str]) -> dict[str, str]:
    # Header values are Latin-1 text on one line: JSON with ASCII escapes is both.
    return {WARNINGS_HEADER: json.dumps(warnings)} if warnings else {}


# --- the app ---------------------------------------------------------------------------------

def create_app(backend: Backend) -> FastAPI:
    app = FastAPI(title="SDXL-Lightning worker", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return _error(request.url.path, exc.status, str(exc), headers=exc.headers)

    @app.get("/ping")
    async def ping() -> Response:
        if backend.failure is not None:
            return JSONResponse({"status": "error", "error": backend.failure}, status_code=500)
        if backend.service is None:
            return Response(status_code=204)  # bodiless: RunPod's "initializing"
        return JSONResponse({"status": "healthy"})

    @app.post("/v1/generate", response_model=None)
    async def generate(request: Request) -> Response:
        body = await _json(request)
        stream = isinstance(body, dict) and body.pop("stream", False) is True
        if not stream:
            outcome = await _run(backend, request, body)
            return JSONResponse(outcome.reply, status_code=STATUS[outcome.kind])
        return StreamingResponse(_events(backend, request, body), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.post("/v1/images/generations")
    async def images_generations(request: Request) -> JSONResponse:
        body = await _json(request)
        return await _openai_job(backend, request, lambda has_bucket: (
            openai_images.generation_input(body, has_bucket)))

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> JSONResponse:
        form = await request.form()
        files = [*form.getlist("image"), *form.getlist("image[]")]
        images = [await item.read() for item in files if hasattr(item, "read")]
        mask_file = form.get("mask")
        mask = await mask_file.read() if hasattr(mask_file, "read") else None
        scalars = {key: value for key, value in form.multi_items()
                   if key not in ("image", "image[]", "mask") and isinstance(value, str)}
        return await _openai_job(backend, request, lambda has_bucket: (
            openai_images.edit_input(scalars, images, mask, has_bucket)))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return openai_images.models_list()

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> JSONResponse:
        return await _a1111_job(backend, request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> JSONResponse:
        return await _a1111_job(backend, request, "img2img")

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        engine = _service(backend).engine
        return a1111.sd_models(engine.steps, getattr(engine, "served", None))

    @app.get("/sdapi/v1/options")
    async def options() -> dict[str, Any]:
        engine = _service(backend).engine
        return a1111.options(engine.steps, getattr(engine, "served", None))

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return a1111.schedulers()

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/progress")
    async def progress() -> dict[str, Any]:
        return a1111.progress()

    if backend.api_key:
        app.add_middleware(RequireKey, key=backend.api_key)
    return app


class RequireKey:
    """``Authorization: Bearer <key>`` on every route but ``/ping``. Plain ASGI: Starlette's
    ``BaseHTTPMiddleware`` would hide client disconnects from the routes behind it."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/ping":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error(scope["path"], 401, "missing or wrong API key: send "
                                  "Authorization: Bearer <API_KEY>")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the job flow, shared by every route -----------------------------------------------------

async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise Refused(400, "invalid input: the body is not valid JSON") from None


def _service(backend: Backend) -> Service:
    if backend.service is None:
        message = backend.failure or "the model is still loading"
        raise Refused(503, f"not ready: {message}", {"Retry-After": str(LOADING_RETRY_S)})
    return backend.service


def _job_id(request: Request) -> str:
    return request.headers.get("x-request-id", "")[:64] or f"http-{uuid.uuid4().hex[:12]}"


async def _run(backend: Backend, request: Request, job_input: Any,
               on_step: Callable[[Plan], StepCallback | None] | None = None) -> Outcome:
    """``Service.run`` under admission control, cancelled if the client goes away."""
    service = _service(backend)
    if backend.held >= backend.max_running + backend.max_waiting:
        raise Refused(429, f"busy: {backend.held} requests are running or waiting (MAX_CONCURRENCY"
                           f" {backend.max_running} + MAX_WAITING {backend.max_waiting}); retry "
                           f"after {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})
    backend.held += 1
    try:
        async with backend.slots():
            task = asyncio.ensure_future(service.run(job_input, None, _job_id(request), on_step))
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()  # a job still queued for the GPU never runs
                    log.info("client went away: job cancelled")
                    raise Refused(499, "client closed the request")
    finally:
        backend.held -= 1


async def _openai_job(backend: Backend, request: Request,
                      translate: Callable[[bool], tuple[dict[str, Any], str, list[str]]]
                      ) -> JSONResponse:
    service = _service(backend)
    try:
        job, response_format, warnings = translate(service.delivery.bucket is not None)
    except openai_images.OpenAIFieldError as exc:
        raise Refused(400, str(exc)) from None
    except InputError as exc:
        raise Refused(400, str(exc)) from None
    outcome = await _run(backend, request, job)
    if outcome.kind != "done":
        return _error(request.url.path, STATUS[outcome.kind], outcome.reply["error"])
    warnings += outcome.reply.get("warnings", [])
    return JSONResponse(openai_images.images_response(outcome.reply, response_format),
                        headers=_warnings_header(warnings))


async def _a1111_job(backend: Backend, request: Request, mode: str) -> JSONResponse:
    body = await _json(request)
    try:
        job, warnings = a1111.job_input(body, mode)
    except InputError as exc:
        raise Refused(400, str(exc)) from None
    outcome = await _run(backend, request, job)
    if outcome.kind != "done":
        return _error(request.url.path, STATUS[outcome.kind], outcome.reply["error"])
    return JSONResponse(a1111.images_response(body, outcome.reply, warnings),
                        headers=_warnings_header(warnings + outcome.reply.get("warnings", [])))


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _events(backend: Backend, request: Request, job_input: Any) -> AsyncIterator[bytes]:
    """Server-sent events: ``step`` per denoising step (with ``preview`` when asked for), then
    ``result`` (the output) or ``error``. Refusals (busy, loading) arrive as ``error`` too."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[bytes | None] = asyncio.Queue()

    def on_step(plan: Plan) -> StepCallback:
        def report(done: int, total: int, preview: Preview | None = None) -> None:
            data: dict[str, Any] = {"step": done, "steps": total}
            if plan.preview and preview is not None:
                data["preview"] = encoding.data_uri(preview(), "jpeg")
            loop.call_soon_threadsafe(events.put_nowait, _sse("step", data))
        return report

    async def finish() -> None:
        try:
            outcome = await _run(backend, request, job_input, on_step)
            kind = "result" if outcome.kind == "done" else "error"
            await events.put(_sse(kind, outcome.reply))
        except Refused as exc:
            await events.put(_sse("error", {"error": str(exc), "status": exc.status}))
        finally:
            await events.put(None)

    task = asyncio.ensure_future(finish())
    try:
        while (chunk := await events.get()) is not None:
            yield chunk
    finally:
        task.cancel()  # the client went away mid-stream
