"""examples/client.py against a small stand-in for RunPod's cloud API on 127.0.0.1.

It checks what the worker's local server cannot show: ``GET /status``, ``IN_QUEUE`` /
``IN_PROGRESS`` with progress in ``output``, the API key, failures and the deadline; plus saving
images and reading input. The whole path against the worker's own local API server is
tests/integration/test_example_client_local.py.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.support.example_client import client, saved
from tests.support.loopback import serving


def png(width: int = 8, height: int = 8, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ---- a stand-in for RunPod's cloud API ------------------------------------------------------


@dataclass
class FakeApi:
    """Answers /run with IN_QUEUE, then plays ``statuses`` on GET /status/{id}, one per poll."""

    statuses: list[dict[str, Any]]
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # path -> (body, type)
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, auth
    url: str = ""

    def answer(self, method: str, path: str) -> tuple[int, bytes, str]:
        if path in self.files:
            body, content_type = self.files[path]
            return 200, body, content_type
        if method == "POST" and path in ("/run", "/runsync"):
            return 200, json.dumps({"id": "job-1", "status": "IN_QUEUE"}).encode(), \
                "application/json"
        if method == "GET" and path == "/status/job-1":
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            return 200, json.dumps({"id": "job-1", **status}).encode(), "application/json"
        return 404, b"{}", "application/json"


@pytest.fixture
def fake_api() -> Iterator[FakeApi]:
    api = FakeApi(statuses=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _reply(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            api.seen.append((method, self.path, self.headers.get("Authorization")))
            code, body, content_type = api.answer(method, self.path)
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._reply("GET")

        def do_POST(self) -> None:
            self._reply("POST")

    with serving(Handler) as api.url:
        yield api


class TestAgainstTheRunPodApi:
    def test_polls_with_get_reports_progress_and_sends_the_key(
            self, fake_api: FakeApi, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        image = data_uri(png(16, 24), "image/png")
        fake_api.statuses = [
            {"status": "IN_QUEUE"},
            {"status": "IN_PROGRESS", "output": {"step": 1, "of": 4}},
            {"status": "IN_PROGRESS", "output": {"step": 1, "of": 4}},  # unchanged: shown once
            {"status": "IN_PROGRESS", "output": {"step": 3, "of": 4}},
            {"status": "COMPLETED", "output": {"images": [{"image": image, "seed": 5}],
                                               "warnings": ["width 1000 was snapped"]}},
        ]
        with caplog.at_level(logging.INFO, logger="sdxl-lightning-client"):
            code = client.main(["--base-url", fake_api.url, "--api-key", "rp_key", "--prompt",
                                "p", "--out", str(tmp_path), "--poll-interval", "0.01",
                                "--timeout", "60"])
        assert code == 0
        methods = {(m, p) for m, p, _ in fake_api.seen}
        assert methods == {("POST", "/run"), ("GET", "/status/job-1")}
        assert {auth for _, _, auth in fake_api.seen} == {"Bearer rp_key"}
        progress = [r.getMessage() for r in caplog.records if "progress" in r.getMessage()]
        assert len(progress) == 2 and "'step': 3" in progress[1]
        [path] = saved(tmp_path)
        assert path.name == "job-1-0-seed5.png"
        with Image.open(path) as saved_image:
            assert saved_image.size == (16, 24)

    def test_a_failed_job_exits_1_and_shows_its_error(
            self, fake_api: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        fake_api.statuses = [{"status": "FAILED", "error": "out of GPU memory"}]
        code = client.main(["--base-url", fake_api.url, "--prompt", "p", "--out",
                            str(tmp_path), "--poll-interval", "0.01", "--timeout", "60"])
        assert code == 1
        assert "out of GPU memory" in capsys.readouterr().err

    def test_gives_up_at_the_deadline(self, fake_api: FakeApi, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
        fake_api.statuses = [{"status": "IN_PROGRESS"}]
        code = client.main(["--base-url", fake_api.url, "--prompt", "p", "--out",
                            str(tmp_path), "--poll-interval", "0.05", "--timeout", "0.5"])
        assert code == 1
        assert "timed out" in capsys.readouterr().err

    def test_the_runpod_api_needs_a_key(self, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
        code = client.main(["--endpoint-id", "abc123", "--prompt", "p", "--out", str(tmp_path)])
        assert code == 1
        assert "API key" in capsys.readouterr().err


class TestImages:
    @pytest.mark.parametrize("mime, fmt, ext", [("image/png", "PNG", ".png"),
                                                ("image/jpeg", "JPEG", ".jpg"),
                                                ("image/webp", "WEBP", ".webp")])
    def test_a_data_uri_is_saved_with_its_types_extension(
            self, tmp_path: Path, mime: str, fmt: str, ext: str) -> None:
        data = png(fmt=fmt)
        endpoint = client.Endpoint("http://127.0.0.1:9", None, time.monotonic() + 30)
        [path] = client.save_images({"images": [{"image": data_uri(data, mime), "seed": 1}]},
                                    "job", tmp_path, endpoint)
        assert path.suffix == ext
        assert path.read_bytes() == data

    @pytest.mark.parametrize("route, content_type, ext", [
        ("/bucket/a", "image/webp", ".webp"),
        ("/bucket/b.jpeg", "application/octet-stream", ".jpg"),  # type from the URL's suffix
    ])
    def test_an_image_url_is_downloaded(self, fake_api: FakeApi, tmp_path: Path, route: str,
                                        content_type: str, ext: str) -> None:
        data = png(fmt="WEBP" if ext == ".webp" else "JPEG")
        fake_api.files[route] = (data, content_type)
        endpoint = client.Endpoint(fake_api.url, "rp_key", time.monotonic() + 30)
        [path] = client.save_images({"images": [{"image": f"{fake_api.url}{route}"}]}, "job",
                                    tmp_path, endpoint)
        assert path.suffix == ext and path.read_bytes() == data
        assert fake_api.seen == [("GET", route, None)]  # the API key stays with the API

    @pytest.mark.parametrize("ref", ["data:image/gif;base64,R0lGOD==", "data:image/png,abc",
                                     "iVBORw0KGgo=", "data:image/png;base64,***"])
    def test_an_unusable_image_is_an_error(self, tmp_path: Path, ref: str) -> None:
        endpoint = client.Endpoint("http://127.0.0.1:9", None, time.monotonic() + 30)
        with pytest.raises(client.ClientError):
            client.save_images({"images": [{"image": ref}]}, "job", tmp_path, endpoint)


class TestInput:
    def test_a_test_input_file_is_unwrapped_and_prompt_overrides(self, tmp_path: Path) -> None:
        path = tmp_path / "in.json"
        path.write_text(json.dumps({"input": {"prompt": "old", "width": 768}}))
        args = client.parse_args(["--base-url", "http://x", "--input", f"@{path}",
                                  "--prompt", "new"])
        assert client.job_input_from(args) == {"prompt": "new", "width": 768}

    @pytest.mark.parametrize("argv", [["--input", "{not json"], ["--input", "[1]"],
                                      ["--input", '{"width": 512}']])
    def test_bad_or_promptless_input_is_refused(self, argv: list[str]) -> None:
        args = client.parse_args(["--base-url", "http://x", *argv])
        with pytest.raises(client.ClientError):
            client.job_input_from(args)
