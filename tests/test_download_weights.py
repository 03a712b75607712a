"""builder/download_weights.py against a stand-in Hugging Face hub on 127.0.0.1.

The stand-in serves a tiny model's files at ``/{repo}/resolve/{revision}/{remote_path}``, as the
Hub does, and can fail on demand (HTTP errors, dropped connections, short or corrupt bodies,
redirects to another origin), so the downloader's promises are checked end to end: a folder the
real loader loads, retries, no truncated or corrupt file ever in place, no ``.part`` left behind,
present files skipped, fast failure on 404, and the token kept off other origins.
"""

from __future__ import annotations

import http.server
import json
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from loopback import serving

import model_files
from builder import download_weights, make_tiny_model
from builder.download_weights import DownloadError, check_file, download

STEPS = (4,)
CHECKPOINT = model_files.checkpoint_file(4)
TEXT_CONFIG = next(f for f in model_files.required_files(STEPS)
                   if f.path == "text_encoder/config.json")


def url_path(f: model_files.RemoteFile) -> str:
    return f"/{f.repo}/resolve/{f.revision}/{f.remote_path}"


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


def _handler_for(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
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


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """URL path -> bytes, for every file the worker needs, from a freshly built tiny model."""
    folder = make_tiny_model.build(tmp_path_factory.mktemp("hub") / "tiny", steps=STEPS)
    return {url_path(f): (folder / f.path).read_bytes()
            for f in model_files.required_files(STEPS)}


def _serve(files: dict[str, bytes]) -> Iterator[FakeHub]:
    hub = FakeHub(files=dict(files))
    with serving(_handler_for(hub)) as hub.url:
        yield hub


@pytest.fixture
def hub(tiny_files: dict[str, bytes]) -> Iterator[FakeHub]:
    yield from _serve(tiny_files)


@pytest.fixture
def cdn(tiny_files: dict[str, bytes]) -> Iterator[FakeHub]:
    """A second origin (another port), like the CDN the Hub redirects large files to."""
    yield from _serve(tiny_files)


@pytest.fixture(autouse=True)
def no_hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.part")) if folder.exists() else []


class TestCompleteDownload:
    def test_folder_has_every_file_intact_and_the_worker_loads_it(
            self, hub: FakeHub, tiny_files: dict[str, bytes], tmp_path: Path) -> None:
        import torch

        import pipeline

        folder = tmp_path / "model"
        fetched = download(folder, STEPS, endpoint=hub.url, backoff_s=0)
        required = model_files.required_files(STEPS)
        assert fetched == len(required)
        for f in required:
            assert (folder / f.path).read_bytes() == tiny_files[url_path(f)], f.path
        assert leftovers(folder) == []
        model = pipeline.load(folder, STEPS, device=torch.device("cpu"), dtype=torch.float32)
        assert model.steps == STEPS

    def test_cli_uses_hf_endpoint_and_sends_hf_token(
            self, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        assert download_weights.main([str(tmp_path / "model"), "--steps", "4"]) == 0
        assert model_files.missing_files(tmp_path / "model", STEPS) == []
        assert hub.requests, "the CLI did not use HF_ENDPOINT"
        assert {headers.get("Authorization") for _, headers in hub.requests} == \
            {"Bearer hf_test_token"}

    def test_cli_exits_1_when_a_file_cannot_be_fetched(
            self, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        del hub.files[url_path(CHECKPOINT)]
        assert download_weights.main([str(tmp_path / "model"), "--steps", "4"]) == 1


class TestOptionalComponents:
    @pytest.mark.parametrize("option, flag", [("safety", "--safety-checker"),
                                              ("tiny_decoder", "--tiny-decoder")])
    def test_their_files_are_fetched_only_when_asked(
            self, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str,
            flag: str) -> None:
        base = {f.path for f in model_files.required_files(STEPS)}
        extra = [f for f in model_files.required_files(STEPS, **{option: True})
                 if f.path not in base]
        assert extra, f"{option} adds files"
        for f in extra:  # small stand-ins that pass the format checks
            hub.files[url_path(f)] = b"{}" if f.path.endswith(".json") else \
                TestCheckFile.safetensors({}) if f.path.endswith(".safetensors") else b"weights"
        download(tmp_path / "plain", STEPS, endpoint=hub.url, backoff_s=0)
        assert not any((tmp_path / "plain" / f.path).exists() for f in extra)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        folder = tmp_path / "with"
        assert download_weights.main([str(folder), "--steps", "4", flag]) == 0
        assert model_files.missing_files(folder, STEPS, **{option: True}) == []


class TestRedirects:
    def test_token_is_dropped_when_redirected_to_another_origin(
            self, hub: FakeHub, cdn: FakeHub, tiny_files: dict[str, bytes], tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        path = url_path(CHECKPOINT)
        hub.redirects[path] = f"{cdn.url}{path}"
        download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0)
        assert (tmp_path / "model" / CHECKPOINT.path).read_bytes() == tiny_files[path]
        assert cdn.count(path) == 1
        assert [h.get("Authorization") for p, h in cdn.requests] == [None]
        assert all(h.get("Authorization") == "Bearer hf_secret" for _, h in hub.requests)

    def test_token_is_kept_on_a_same_origin_redirect(
            self, hub: FakeHub, tiny_files: dict[str, bytes], tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        path = url_path(CHECKPOINT)
        hub.files["/cache/checkpoint"] = tiny_files[path]
        hub.redirects[path] = f"{hub.url}/cache/checkpoint"
        download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0)
        assert hub.count("/cache/checkpoint") == 1
        auth = [h.get("Authorization") for p, h in hub.requests if p == "/cache/checkpoint"]
        assert auth == ["Bearer hf_secret"]


class TestRetries:
    @pytest.mark.parametrize("fault", ["500", "503", "drop", "short", "chunked_cut", "cut"])
    def test_one_failed_attempt_is_retried_and_succeeds(
            self, hub: FakeHub, tiny_files: dict[str, bytes], tmp_path: Path, fault: str) -> None:
        path = url_path(CHECKPOINT)
        hub.faults[path] = [fault]
        download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0)
        assert hub.count(path) == 2
        assert (tmp_path / "model" / CHECKPOINT.path).read_bytes() == tiny_files[path]
        assert leftovers(tmp_path) == []


class TestRefusesBadFiles:
    @pytest.mark.parametrize("fault", ["short", "cut", "corrupt", "chunked_cut", "drop", "500"])
    def test_a_file_that_never_arrives_intact_is_never_put_in_place(
            self, hub: FakeHub, tmp_path: Path, fault: str) -> None:
        path = url_path(CHECKPOINT)
        hub.faults[path] = [fault] * 10
        with pytest.raises(DownloadError) as info:
            download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0, attempts=3)
        assert f"{hub.url}{path}" in str(info.value)
        assert "after 3 attempts" in str(info.value)
        assert hub.count(path) == 3
        assert not (tmp_path / "model" / CHECKPOINT.path).exists()
        assert leftovers(tmp_path) == []

    def test_corrupt_json_is_refused(self, hub: FakeHub, tmp_path: Path) -> None:
        path = url_path(TEXT_CONFIG)
        hub.faults[path] = ["corrupt"] * 10
        with pytest.raises(DownloadError, match="not valid JSON"):
            download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0, attempts=2)
        assert not (tmp_path / "model" / TEXT_CONFIG.path).exists()
        assert leftovers(tmp_path) == []

    def test_a_truncated_file_already_in_the_folder_is_fetched_again(
            self, hub: FakeHub, tiny_files: dict[str, bytes], tmp_path: Path) -> None:
        path = url_path(CHECKPOINT)
        dest = tmp_path / "model" / CHECKPOINT.path
        dest.parent.mkdir(parents=True)
        dest.write_bytes(tiny_files[path][:1000])
        download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0)
        assert hub.count(path) == 1
        assert dest.read_bytes() == tiny_files[path]


class TestCheckFile:
    """The validity check behind 'never a truncated file in place'."""

    @staticmethod
    def safetensors(header: object, data: bytes = b"") -> bytes:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    def test_a_whole_safetensors_file_passes(self, tmp_path: Path) -> None:
        path = tmp_path / "ok.safetensors"
        path.write_bytes(self.safetensors(
            {"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4))
        assert check_file(path) is None

    @pytest.mark.parametrize("content", [
        b"",  # empty
        b"\x05\0\0",  # shorter than the length prefix
        struct.pack("<Q", 10**12) + b"{}",  # header longer than the file
        struct.pack("<Q", 4) + b"{{{{",  # header is not JSON
    ])
    def test_broken_safetensors_are_reported_not_raised(
            self, tmp_path: Path, content: bytes) -> None:
        path = tmp_path / "bad.safetensors"
        path.write_bytes(content)
        assert isinstance(check_file(path), str)

    @pytest.mark.parametrize("header", [[1, 2], {"w": 5}, {"w": {"shape": [1]}},
                                        {"w": {"data_offsets": []}}, {"w": {"data_offsets": "x"}}])
    def test_a_header_of_the_wrong_shape_is_corrupt(self, tmp_path: Path, header: object) -> None:
        path = tmp_path / "bad.safetensors"
        path.write_bytes(self.safetensors(header))
        assert check_file(path) == "corrupt safetensors header"

    def test_a_partial_download_is_checked_as_its_destination(self, tmp_path: Path) -> None:
        path = tmp_path / "model.safetensors.part"  # a download in progress
        path.write_bytes(self.safetensors(
            {"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 5))
        assert "truncated or corrupt" in (check_file(path, "model.safetensors") or "")

    def test_a_safetensors_file_cut_short_is_reported(self, tmp_path: Path) -> None:
        path = tmp_path / "cut.safetensors"
        path.write_bytes(self.safetensors(
            {"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 5))
        assert "truncated or corrupt" in (check_file(path) or "")


class TestSkipsPresentFiles:
    def test_a_complete_folder_is_not_fetched_again(self, hub: FakeHub, tmp_path: Path) -> None:
        download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0)
        hub.requests.clear()
        assert download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0) == 0
        assert hub.requests == []

    def test_only_a_missing_file_is_fetched(self, hub: FakeHub, tmp_path: Path) -> None:
        download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0)
        (tmp_path / "model" / TEXT_CONFIG.path).unlink()
        hub.requests.clear()
        assert download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0) == 1
        assert [p for p, _ in hub.requests] == [url_path(TEXT_CONFIG)]


class TestFailsFast:
    @pytest.mark.parametrize("code", ["404", "401", "403"])
    def test_a_final_http_answer_is_not_retried_and_names_the_url(
            self, hub: FakeHub, tmp_path: Path, code: str) -> None:
        path = url_path(CHECKPOINT)
        hub.faults[path] = [code] * 10
        with pytest.raises(DownloadError) as info:
            download(tmp_path / "model", STEPS, endpoint=hub.url, backoff_s=0)
        assert f"{hub.url}{path}" in str(info.value)
        assert f"HTTP {code}" in str(info.value)
        assert hub.count(path) == 1
        assert leftovers(tmp_path) == []
