"""A stand-in for RunPod's worker-facing job API, on 127.0.0.1, for the SDK's real worker loop.

It speaks what runpod-python 1.12's production loop sends (``serverless/modules``: rp_job,
rp_http, rp_scale, rp_ping, rp_progress), given the URLs from ``FakeRunPod.worker_env()``:

- ``GET  .../job-take/{worker}?gpu=fake&job_in_progress=0|1``: one job as a JSON object, or 204.
- ``GET  .../job-take-batch/{worker}?gpu=fake&batch_size=N&job_in_progress=0|1``: a JSON list of
  at most N jobs, or 204. The SDK asks for ``concurrency - jobs it holds`` jobs.
- ``POST .../job-done/{worker}/{job}?gpu=fake&isStream=false``: the body is JSON text (sent as
  form-urlencoded). ``{"status": "IN_PROGRESS", "output": ...}`` is a ``progress_update``;
  anything else is the job's result (``output`` / ``error`` / ``stopPod``).
- ``POST .../job-stream/{worker}/{job}?gpu=fake&isStream=true``: generator handlers' partials.
- ``GET  .../job-stop/{worker}?gpu=fake``: ``{"jobsToStop": [ids]}`` or 204; the SDK cancels the
  task of each job named. RunPod uses this channel for ``/cancel`` and for execution timeouts.
- ``GET  .../ping/{worker}?gpu=fake&job_id=a,b&runpod_version=...``: the heartbeat.

Every request must carry ``Authorization: <api key>``; anything else is counted as a
violation. Both long polls are held for at most ``hold_s`` and wake as soon as there is work, so
an idle worker polls a few times a second, not in a busy loop.

Besides serving, it checks the protocol as it goes (``violations``): a second result for a job,
a result for a job never handed out, ``job_in_progress=0`` while a job it handed out has neither
a result nor a stop signal (a lost job), a wrong key or worker id, an unreadable body. A job is
handed out once (``JobRecord.takes``), never more jobs than the SDK asked for.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ENDPOINT = "fake-endpoint"


@dataclass
class JobRecord:
    """One job's life on the fake platform."""

    job: dict[str, Any]
    added: float = field(default_factory=time.monotonic)
    taken: float | None = None
    takes: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)  # more than one: duplicated
    finished: float | None = None
    progress: list[Any] = field(default_factory=list)
    progress_after_result: int = 0
    streams: list[Any] = field(default_factory=list)
    stop_requested: str | None = None  # "cancel" or "timeout"
    stop_delivered: float | None = None

    @property
    def result(self) -> dict[str, Any] | None:
        return self.results[0] if self.results else None

    @property
    def settled(self) -> bool:
        """Nothing more is owed: a result arrived, or the worker was told to stop the job."""
        return bool(self.results) or self.stop_delivered is not None


class FakeRunPod:
    """The job queue, the result store and the HTTP server in front of them."""

    def __init__(self, api_key: str = "fake-api-key", worker_id: str = "fake-worker-1",
                 hold_s: float = 0.5) -> None:
        self.api_key, self.worker_id, self.hold_s = api_key, worker_id, hold_s
        self.jobs: dict[str, JobRecord] = {}
        self.violations: list[str] = []
        self.requests: dict[str, int] = {}  # route -> count
        self.take_params: list[dict[str, str]] = []
        self.pings: list[dict[str, str]] = []
        self.max_outstanding = 0  # most jobs handed out and not yet settled, at any moment
        self._queue: deque[str] = deque()
        self._stops: deque[str] = deque()
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, name="fake-runpod",
                                        daemon=True)

    # --- test-facing API -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v2/{ENDPOINT}"

    def worker_env(self) -> dict[str, str]:
        """The variables RunPod sets on a serverless worker, pointing at this fake.

        ``$ID`` and ``$RUNPOD_POD_ID`` are the SDK's own placeholders (worker id in job-take,
        worker and job id in job-done); ``&...`` parameters are appended to the ``?gpu=`` query.
        """
        base = self.base_url
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=fake",
            "RUNPOD_PING_INTERVAL": "1000",
            "RUNPOD_AI_API_KEY": self.api_key,
            "RUNPOD_POD_ID": self.worker_id,
        }

    def start(self) -> FakeRunPod:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeRunPod:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, job_id: str, job_input: Any, **extra: Any) -> str:
        """Queue a job (``extra``: job-level keys such as ``s3Config`` or ``policy``)."""
        with self._changed:
            if job_id in self.jobs:
                raise ValueError(f"job {job_id} was already added")
            self.jobs[job_id] = JobRecord({"id": job_id, "input": job_input, **extra})
            self._queue.append(job_id)
            self._changed.notify_all()
        return job_id

    def cancel(self, job_id: str) -> None:
        """What ``POST /cancel/{id}`` does to a job in progress: a stop signal to its worker."""
        with self._changed:
            self.jobs[job_id].stop_requested = "cancel"
            self._stops.append(job_id)
            self._changed.notify_all()

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait (bounded) until ``condition()`` holds; it is checked on every change."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    def wait_settled(self, job_ids: Iterable[str], timeout: float) -> list[str]:
        """Wait for every job to be settled; returns those that are not (empty on success)."""
        ids = list(job_ids)
        self.wait_until(lambda: all(self.jobs[i].settled for i in ids), timeout)
        with self._changed:
            return [i for i in ids if not self.jobs[i].settled]

    def taken(self, job_id: str) -> bool:
        return self.jobs[job_id].taken is not None

    # --- request handling (server threads) --------------------------------------------------

    def _take(self, query: dict[str, str], batch: bool) -> list[dict[str, Any]]:
        wanted = int(query.get("batch_size", "1")) if batch else 1
        deadline = time.monotonic() + self.hold_s
        with self._changed:
            self.take_params.append(query)
            if wanted < 1:
                self.violations.append(f"asked for {wanted} jobs")
            if query.get("job_in_progress") == "0" and (open_ids := self._outstanding()):
                # The SDK forgets a job only after posting its result or stopping it.
                self.violations.append(f"job_in_progress=0 while {open_ids} are open")
            while not self._queue and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            handed = []
            while self._queue and len(handed) < wanted:
                record = self.jobs[self._queue.popleft()]
                record.takes += 1
                record.taken = time.monotonic()
                handed.append(record.job)
            self.max_outstanding = max(self.max_outstanding, len(self._outstanding()))
            self._changed.notify_all()
            return handed

    def _done(self, job_id: str, body: dict[str, Any]) -> None:
        with self._changed:
            record = self.jobs.get(job_id)
            if record is None or record.taken is None:
                self.violations.append(f"result for a job never handed out: {job_id}")
                return
            if body.get("status") == "IN_PROGRESS":  # progress_update
                record.progress.append(body.get("output"))
                record.progress_after_result += bool(record.results)
            else:
                if record.results:
                    self.violations.append(f"duplicate result for {job_id}")
                record.results.append(body)
                record.finished = record.finished or time.monotonic()
            self._changed.notify_all()

    def _stream(self, job_id: str, body: dict[str, Any]) -> None:
        with self._changed:
            if job_id in self.jobs:
                self.jobs[job_id].streams.append(body)
            else:
                self.violations.append(f"stream for an unknown job: {job_id}")
            self._changed.notify_all()

    def _stop_signals(self) -> list[str]:
        """Pending cancels plus execution timeouts due, as the platform would send them."""
        deadline = time.monotonic() + self.hold_s
        with self._changed:
            while True:
                self._timeouts_due()
                if self._stops or (left := deadline - time.monotonic()) <= 0:
                    break
                self._changed.wait(min(left, 0.1))
            ids = list(dict.fromkeys(self._stops))
            self._stops.clear()
            now = time.monotonic()
            for job_id in ids:
                self.jobs[job_id].stop_delivered = now
            self._changed.notify_all()
            return ids

    def _timeouts_due(self) -> None:
        """``policy.executionTimeout`` (ms) counts from when the worker took the job."""
        now = time.monotonic()
        for job_id, record in self.jobs.items():
            limit = (record.job.get("policy") or {}).get("executionTimeout")
            if (limit and record.taken is not None and not record.results
                    and record.stop_requested is None and now - record.taken > limit / 1000):
                record.stop_requested = "timeout"
                self._stops.append(job_id)

    def _outstanding(self) -> list[str]:
        return [i for i, r in self.jobs.items() if r.taken is not None and not r.settled]

    def violation(self, message: str) -> None:
        with self._changed:
            self.violations.append(message)

    def _count(self, route: str) -> None:
        with self._changed:
            self.requests[route] = self.requests.get(route, 0) + 1


def _make_handler(fake: FakeRunPod) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            route, parts, query = self._parse()
            if route is None:
                return
            if route in ("job-take", "job-take-batch"):
                jobs = fake._take(query, batch=route == "job-take-batch")
                if not jobs:
                    self._reply(204)
                else:
                    self._reply(200, jobs if route == "job-take-batch" else jobs[0])
            elif route == "job-stop":
                ids = fake._stop_signals()
                if ids:
                    self._reply(200, {"jobsToStop": ids})
                else:
                    self._reply(204)
            elif route == "ping":
                with fake._changed:
                    fake.pings.append(query)
                self._reply(200, {})
            else:
                self._reply(404)

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            route, parts, query = self._parse()
            if route is None:
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                fake.violation(f"{route}: unreadable body ({exc})")
                self._reply(400)
                return
            job_id = parts[-1] if len(parts) >= 2 else ""
            if route == "job-done":
                fake._done(job_id, body)
            elif route == "job-stream":
                fake._stream(job_id, body)
            else:
                self._reply(404)
                return
            self._reply(200, {})

        def _parse(self) -> tuple[str | None, list[str], dict[str, str]]:
            """(route, path segments after it, query) of an authorised request."""
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            segments = [s for s in url.path.split("/") if s]
            # /v2/{endpoint}/{route}/{worker}[/{job}]
            if len(segments) < 4 or segments[:2] != ["v2", ENDPOINT]:
                self._reply(404)
                return None, [], {}
            route, rest = segments[2], segments[3:]
            fake._count(route)
            if self.headers.get("Authorization") != fake.api_key:
                fake.violation(f"{route}: missing or wrong Authorization header")
                self._reply(401)
                return None, [], {}
            if rest[0] != fake.worker_id:
                fake.violation(f"{route}: worker id {rest[0]!r} in the URL")
            return route, rest, query

        def _reply(self, status: int, payload: Any = None) -> None:
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
            pass

    return Handler
