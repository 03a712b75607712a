"""A loopback HTTP(S) server and a stand-in network for the URL-fetching tests.

``LocalServer`` listens on 127.0.0.1 only and serves canned ``Route``s (status, headers, body,
a delay before answering, a drip between body bytes). Every wait in a handler thread is bounded
(``MAX_WAIT_S``) and ends early when the server closes; ``close()`` joins every thread it
started, so a test that gives up on a slow route leaves nothing running.

``Network`` stands in for the internet: the code under test dials the address it checked (a
public one, say), and ``Network`` records that address and connects to the local server instead.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
MAX_WAIT_S = 10.0
JOIN_S = 5.0


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    length: int | None = -1  # Content-Length: -1 = len(body), None = none (body ends at close)
    delay_s: float = 0.0  # before the status line
    hold_s: float = 0.0  # after the headers, before the body
    drip_s: float = 0.0  # between bytes of the whole response, status line and headers too


class _Handler(BaseHTTPRequestHandler):
    timeout = JOIN_S  # a stuck client cannot hold a handler thread
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        app = self.server.app
        app.requests.append((self.path, dict(self.headers)))
        route = app.routes.get(self.path.split("?")[0])
        try:
            if route is None:
                self.send_error(404)
                return
            if route.delay_s and app.wait(route.delay_s):
                return
            lines = [f"HTTP/1.0 {route.status} {self.responses.get(route.status, ('',))[0]}"]
            lines += [f"{name}: {value}" for name, value in route.headers.items()]
            length = len(route.body) if route.length == -1 else route.length
            if length is not None:
                lines.append(f"Content-Length: {length}")
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            if route.drip_s:
                self._drip(head + route.body, route.drip_s)
                return
            self.wfile.write(head)
            if not (route.hold_s and app.wait(route.hold_s)):
                self.wfile.write(route.body)
        except OSError:  # the client gave up (timeout, refusal): expected in these tests
            pass

    def _drip(self, data: bytes, pause_s: float) -> None:
        app = self.server.app
        for index in range(len(data)):
            self.wfile.write(data[index:index + 1])
            app.sent[self.path] = index + 1
            if app.wait(pause_s):
                return

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: LocalServer

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address), daemon=True)
        self.app.threads.append(thread)
        thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that refused our certificate or gave up: expected here, not worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class LocalServer:
    """``with LocalServer() as server:`` serves ``server.routes`` on 127.0.0.1."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers) as received
        self.threads: list[threading.Thread] = []
        self.sent: dict[str, int] = {}  # path -> bytes a dripping route got out
        self._stop = threading.Event()
        self._httpd = _Server((HOST, 0), _Handler)
        self._httpd.app = self
        if tls is not None:  # handshake in the handler thread, bounded by its timeout
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str, host: str = HOST, scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (at most MAX_WAIT_S); True if the server is closing."""
        return self._stop.wait(min(seconds, MAX_WAIT_S))

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, wake every waiting handler and join all threads (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for thread in [self._thread, *self.threads]:
            thread.join(JOIN_S)
        assert not any(t.is_alive() for t in self.threads), "a handler thread outlived the test"


class Network:
    """An opener for ``worker.inputs.fetch``: records each dialled address, dials 127.0.0.1."""

    def __init__(self) -> None:
        self.dialled: list[str] = []

    def __call__(self, address: str, port: int, timeout: float) -> socket.socket:
        self.dialled.append(address)
        return socket.create_connection((HOST, port), timeout=timeout)


def make_certificate(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed certificate (and key) for ``hostname``; skips the test without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = directory / f"{hostname}.crt", directory / f"{hostname}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={hostname}",
                    "-addext", f"subjectAltName=DNS:{hostname}",
                    "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
                    "-addext", "extendedKeyUsage=serverAuth"],
                   check=True, capture_output=True, timeout=30)
    return cert, key
