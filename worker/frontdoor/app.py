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
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from worker.errors import InputError, shown
from worker.frontdoor import a1111, openai_images
from worker.outputs import encoding
from worker.plan import Plan, Preview, StepCallback
from worker.service import Outcome, Service

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a Lightning job takes about a second on the GPU: try again after one
LOADING_RETRY_S = 10  # a cold start loads for tens of seconds
STATUS = {"done": 200, "rejected": 400, "failed": 500, "internal": 500}
MAX_BODY_BYTES = 30_000_000  # RunPod's load-balancing endpoints carry 30 MB each way
DISCONNECT_POLL_S = 0.1
WARNINGS_HEADER = "X-Worker-Warnings"


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

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.headers, self.param = status, headers or {}, param


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
           headers: dict[str, str] | None = None, retry: bool | None = None) -> JSONResponse:
    # The OpenAI SDK retries 429 and 5xx twice unless told not to: a bad request or a job that
    # failed for good (out of GPU memory, an invalid image) would cost three GPU runs.
    if retry is None:
        retry = status == 429 or status >= 500
    extra = {} if retry else {"x-should-retry": "false"}
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
        return _error(request.url.path, exc.status, str(exc), exc.param, headers=exc.headers)

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
        stream = body.pop("stream", False) if isinstance(body, dict) else False
        if type(stream) is not bool:
            raise Refused(400, f"invalid input: stream={shown(stream)} is invalid; allowed: true "
                               f"or false", param="stream")
        if not stream:
            outcome = await _run(backend, request, body)
            return _reply(request, outcome)
        _check_ready(backend)  # busy and loading are 429 and 503 here, before the stream starts
        _check_room(backend)
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
        _check_ready(backend)
        _check_room(backend)  # before reading the uploads
        form = await request.form()
        try:
            files = [*form.getlist("image"), *form.getlist("image[]")]
            images = [await item.read() for item in files if hasattr(item, "read")]
            mask_file = form.get("mask")
            mask = await mask_file.read() if hasattr(mask_file, "read") else None
            scalars = {key: value for key, value in form.multi_items()
                       if key not in ("image", "image[]", "mask") and isinstance(value, str)}
        finally:
            await form.close()
        return await _openai_job(backend, request, lambda has_bucket: (
            openai_images.edit_input(scalars, images, mask, has_bucket)))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        engine = backend.service.engine if backend.service is not None else None
        return openai_images.models_list(getattr(engine, "served", None))

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> JSONResponse:
        return await _a1111_job(backend, request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> JSONResponse:
        return await _a1111_job(backend, request, "img2img")

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        engine = _check_ready(backend).engine
        return a1111.sd_models(engine.steps, getattr(engine, "served", None))

    @app.get("/sdapi/v1/options")
    async def options() -> dict[str, Any]:
        engine = _check_ready(backend).engine
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

    app.add_middleware(BodyLimit)
    if backend.api_key:  # added last: the outermost, so an unauthorised body is never read
        app.add_middleware(RequireKey, key=backend.api_key)
    return app


class BodyLimit:
    """Refuses a request body over RunPod's payload limit before reading it (413), and a body
    of unknown length (411): queue mode has RunPod's cap in front of it, HTTP mode this."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            refusal = None
            if length is None and b"chunked" in headers.get(b"transfer-encoding", b""):
                refusal = (411, "send the request body with a Content-Length")
            elif length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                refusal = (413, f"the request body is over the {MAX_BODY_BYTES // 1_000_000} MB "
                                f"limit (RunPod's load-balancing payload limit)")
            if refusal:
                await _error(scope["path"], *refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    except RecursionError:
        raise Refused(400, "invalid input: the body nests too deep to parse") from None
    except ValueError:
        raise Refused(400, "invalid input: the body is not valid JSON") from None


def _check_ready(backend: Backend) -> Service:
    if backend.service is None or backend.failure is not None:
        message = backend.failure or "the model is still loading"
        raise Refused(503, f"not ready: {message}", {"Retry-After": str(LOADING_RETRY_S)})
    return backend.service


def _check_room(backend: Backend) -> None:
    if backend.held >= backend.max_running + backend.max_waiting:
        raise Refused(429, f"busy: {backend.held} requests are running or waiting (MAX_CONCURRENCY"
                           f" {backend.max_running} + MAX_WAITING {backend.max_waiting}); retry "
                           f"after {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _job_id(request: Request) -> str:
    """The caller's ``X-Request-Id`` when it is a plain token (it is logged), else a new id."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else f"http-{uuid.uuid4().hex[:12]}"


async def _run(backend: Backend, request: Request, job_input: Any,
               on_step: Callable[[Plan], StepCallback | None] | None = None,
               inline: bool = False) -> Outcome:
    """``Service.run`` under admission control, cancelled if the client goes away.

    A request counts against ``MAX_CONCURRENCY + MAX_WAITING`` from admission until its job
    ends. Whatever ends the wait (the client gone, this coroutine cancelled with its stream)
    cancels the job: one still queued for the GPU never runs.
    """
    service = _check_ready(backend)
    _check_room(backend)
    backend.held += 1
    slots = backend.slots()
    try:
        await slots.acquire()
    except BaseException:
        backend.held -= 1
        raise
    task = asyncio.ensure_future(service.run(job_input, None, _job_id(request), on_step,
                                             inline=inline))

    def finished(_: asyncio.Future) -> None:
        backend.held -= 1
        slots.release()

    task.add_done_callback(finished)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return _checked(backend, task.result())
            if await request.is_disconnected():
                log.info("client went away: job cancelled")
                raise Refused(499, "client closed the request")
    except BaseException:
        task.cancel()  # no-op once it is done
        raise


def _checked(backend: Backend, outcome: Outcome) -> Outcome:
    """A bug on the GPU thread may have left CUDA unusable: in queue mode the reply asks RunPod
    for a new worker; here ``/ping`` turns unhealthy, so RunPod replaces this one."""
    if not outcome.reply.get("refresh_worker"):
        return outcome
    backend.failure = (f"a job failed on the GPU ({outcome.reply['error']}): this worker "
                       f"stops serving so that RunPod replaces it")
    log.error("HTTP mode: %s", backend.failure)
    reply = {key: value for key, value in outcome.reply.items() if key != "refresh_worker"}
    return replace(outcome, reply=reply)


def _reply(request: Request, outcome: Outcome) -> JSONResponse:
    if outcome.kind == "done":
        return JSONResponse(outcome.reply)
    return _error(request.url.path, STATUS[outcome.kind], outcome.reply["error"],
                  retry=outcome.kind == "internal")


async def _openai_job(backend: Backend, request: Request,
                      translate: Callable[[bool], tuple[dict[str, Any], str, list[str]]]
                      ) -> JSONResponse:
    service = _check_ready(backend)
    try:
        job, response_format, warnings = translate(service.delivery.bucket is not None)
    except openai_images.OpenAIFieldError as exc:
        raise Refused(400, str(exc), param=exc.param or None) from None
    except InputError as exc:
        raise Refused(400, str(exc)) from None
    outcome = await _run(backend, request, job, inline=response_format == "b64_json")
    if outcome.kind != "done":
        return _reply(request, outcome)
    try:
        body, withheld = openai_images.images_response(outcome.reply, response_format)
    except openai_images.OpenAIFieldError as exc:
        return _error(request.url.path, 400, str(exc), exc.param)
    warnings += outcome.reply.get("warnings", []) + withheld
    return JSONResponse(body, headers=_warnings_header(warnings))


async def _a1111_job(backend: Backend, request: Request, mode: str) -> JSONResponse:
    _check_ready(backend)
    body = await _json(request)
    try:
        job, warnings = a1111.job_input(body, mode)
    except InputError as exc:
        raise Refused(400, str(exc)) from None
    outcome = await _run(backend, request, job, inline=True)  # A1111 clients decode base64
    if outcome.kind != "done":
        return _reply(request, outcome)
    try:
        answer = a1111.images_response(body, outcome.reply, warnings)
    except InputError as exc:
        return _error(request.url.path, 400, str(exc))
    return JSONResponse(answer, headers=_warnings_header(
        warnings + outcome.reply.get("warnings", [])))


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
            outcome = await _run(backend, request, job_input, on_step)  # bucket as in queue mode
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
