"""Loopback S3 for the upload tests: moto's server with IAM auth enforced, and a flaky proxy.

``MotoS3`` runs moto's S3 and IAM in a thread on 127.0.0.1. How auth is enforced: moto checks
requests only once ``ActionAuthenticatorMixin.request_count`` has reached
``moto.settings.INITIAL_NO_AUTH_ACTION_COUNT`` (from the env var of that name, read when moto is
imported; default infinity, i.e. never). With the count at 0 from the start, even the IAM calls
that create the first user would need a key that does not exist yet, so instead: start open,
create IAM users, policies and access keys, then ``POST /moto-api/reset-auth`` with ``0`` (what
moto's ``set_initial_no_auth_action_count`` does in server mode). From then on every request
must carry a SigV4 signature from a known IAM key (else ``InvalidAccessKeyId`` or
``SignatureDoesNotMatch``) and be allowed by that user's policies (else ``AccessDenied``).

moto (5.2.5) does not implement query-string (presigned URL) auth: with auth on, a presigned GET
has no ``Authorization`` header and moto answers 500. ``auth_off()`` lifts auth around such a
fetch; moto never checks a presigned URL's signature either way.

``FlakyProxy`` forwards requests unchanged (the Host header too, so signatures stay valid) and
fails the next requests on demand: a 500, a 503 ``SlowDown`` or a dropped connection.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

HOST = "127.0.0.1"
REGION = "us-east-1"
TIMEOUT_S = 10
ALLOW = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                 "Resource": "*"}]}
READ_ONLY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject",
                                                     "Resource": "*"}]}


class MotoS3:
    """moto on an ephemeral loopback port; ``close()`` restores auth and stops it."""

    def __init__(self) -> None:
        # werkzeug logs each request line, presigned URLs included: server noise, not the worker's.
        self._werkzeug = logging.getLogger("werkzeug")
        self._werkzeug_level = self._werkzeug.level
        self._werkzeug.setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.port = port
        self._previous_auth = "inf"

    def client(self, service: str, key_id: str = "setup", secret: str = "setup") -> Any:
        # Any key works while auth is off: used only to set the server up.
        return boto3.session.Session().client(
            service, endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=key_id, aws_secret_access_key=secret)

    def create_user(self, name: str, policy: dict[str, Any]) -> tuple[str, str]:
        """An IAM user with an inline policy; returns (access key id, secret)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def set_auth_after(self, count: float) -> str:
        """Enforce auth after ``count`` more requests (0: now; inf: never); returns the old one."""
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth", data=str(count).encode(), method="POST",
            # Flask would read a form-encoded body (urllib's default type) as a form, not data.
            headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.load(response)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]

    def enforce_auth(self) -> None:
        self._previous_auth = self.set_auth_after(0)

    @contextlib.contextmanager
    def auth_off(self) -> Iterator[None]:
        previous = self.set_auth_after(float("inf"))
        try:
            yield
        finally:
            self.set_auth_after(float(previous))

    def close(self) -> None:
        try:
            self.set_auth_after(float(self._previous_auth))  # settings are process-wide
        finally:
            self._server.stop()
            self._werkzeug.setLevel(self._werkzeug_level)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # answers botocore's Expect: 100-continue
    server: FlakyProxy

    def log_message(self, *args: Any) -> None:
        pass  # request lines carry presigned URLs

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.close_connection = True
        self.server.count(self.command)
        mode = self.server.next_failure()
        if mode == "drop":
            return  # close without a response: the client sees the connection dropped
        if mode:
            status, code = (500, "InternalError") if mode == "500" else (503, "SlowDown")
            self._reply(status, [("Content-Type", "application/xml")],
                        f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode())
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("connection", "expect", "transfer-encoding")}
        upstream = http.client.HTTPConnection(HOST, self.server.upstream_port, timeout=TIMEOUT_S)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self._reply(response.status, [(k, v) for k, v in response.getheaders() if k.lower()
                                          not in ("connection", "transfer-encoding",
                                                  "content-length")], data)
        finally:
            upstream.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FlakyProxy(http.server.ThreadingHTTPServer):
    """Loopback proxy to ``upstream_port`` that fails the next requests as told by ``fail``."""

    daemon_threads = True

    def __init__(self, upstream_port: int) -> None:
        super().__init__((HOST, 0), _ProxyHandler)
        self.upstream_port = upstream_port
        self.endpoint = f"http://{HOST}:{self.server_address[1]}"
        self._lock = threading.Lock()
        self._failures: list[str] = []
        self.requests: dict[str, int] = {}
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def fail(self, *modes: str) -> None:
        """Fail the next requests, one mode each: "500", "503" or "drop"; resets the counts."""
        with self._lock:
            self._failures = list(modes)
            self.requests = {}

    def next_failure(self) -> str | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def count(self, method: str) -> None:
        with self._lock:
            self.requests[method] = self.requests.get(method, 0) + 1

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=TIMEOUT_S)
