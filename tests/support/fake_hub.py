"""A stand-in for the Hugging Face hub on 127.0.0.1, for the weight downloader's tests.

It serves files at ``/{repo}/resolve/{revision}/{remote_path}``, as the Hub does, and fails on
demand (HTTP errors, dropped connections, short or corrupt bodies, redirects to another origin).
``stand_in_files`` makes small files that pass the downloader's format checks without torch;
``files_of`` serves a real (tiny) model folder instead.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.loopback import serving
from worker.spec import ModelSpec, RemoteFile


def url_path(f: RemoteFile) -> str:
    return f"/{f.repo}/resolve/{f.revision}/{f.remote_path}"


def safetensors_bytes(header: object, data: bytes = b"") -> bytes:
    """A safetensors file by hand: 8-byte header length, the JSON header, the data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def stand_in_files(spec: ModelSpec) -> dict[str, bytes]:
    """URL path -> bytes for every file of ``spec``: distinct per file, valid in format."""
    files = {}
    for f in spec.files():
        tag = f.path.encode()
        if f.path.endswith(".json"):
            body = json.dumps({"stand_in_for": f.path}).encode()
        elif f.path.endswith(".safetensors"):
            body = safetensors_bytes({"w": {"dtype": "U8", "shape": [len(tag)],
                                            "data_offsets": [0, len(tag)]}}, tag)
        else:
            body = b"stand-in " + tag
        files[url_path(f)] = body
    return files


def files_of(folder: Path, spec: ModelSpec) -> dict[str, bytes]:
    """URL path -> bytes for every file of ``spec`` in a model folder."""
    return {url_path(f): (folder / f.path).read_bytes() for f in spec.files()}


@dataclass
class FakeHub:
    """What the stand-in serves, the faults it injects, and every request it saw."""

    files: dict[str, bytes]
    # url path -> faults for its next requests, consumed one per request; then served normally
    faults: dict[str, list[str]] = field(default_factory=dict)
    # url path -> absolute URL to redirect to (302)
    redirects: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)


def handler_for(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked encoding needs it

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest's output clean

        def _send(self, status: int, body: bytes, length: int | None = None,
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.send_header("Connection", "close")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def do_GET(self) -> None:
            with hub.lock:
                hub.requests.append((self.path, dict(self.headers.items())))
                queue = hub.faults.get(self.path)
                fault = queue.pop(0) if queue else None
            if self.path in hub.redirects:
                self._send(302, b"", headers={"Location": hub.redirects[self.path]})
                return
            body = hub.files.get(self.path)
            if body is None or fault in ("401", "403", "404", "500", "503"):
                code = 404 if body is None else int(fault or 404)
                self._send(code, f"error {code}".encode())
            elif fault == "drop":  # the connection closes before any response
                self.close_connection = True
            elif fault == "short":  # announces more bytes than it sends
                self._send(200, body, length=len(body) + 100)
            elif fault == "cut":  # a consistent answer, but the file itself is cut short
                self._send(200, body[: len(body) // 2])
            elif fault == "corrupt":  # right length, garbage content
                self._send(200, b"\xff" * len(body))
            elif fault == "chunked_cut":  # chunked encoding, connection lost mid-chunk
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(f"{len(body):x}\r\n".encode() + body[: len(body) // 2])
                self.close_connection = True
            else:
                self._send(200, body)

    return Handler


@contextlib.contextmanager
def serving_hub(files: dict[str, bytes]) -> Iterator[FakeHub]:
    """A ``FakeHub`` serving ``files`` on an ephemeral loopback port (``hub.url``)."""
    hub = FakeHub(files=dict(files))
    with serving(handler_for(hub)) as hub.url:
        yield hub
