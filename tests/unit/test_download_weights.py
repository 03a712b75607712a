"""builder/download_weights.py against a stand-in Hugging Face hub on 127.0.0.1.

The stand-in (``tests/support/fake_hub``) serves small stand-in files that pass the format
checks, and fails on demand, so the downloader's promises are checked end to end: every file of
the spec in place byte for byte, retries, no truncated or corrupt file ever in place, no ``.part``
left behind, present files skipped, fast failure on 404, and the token kept off other origins.
That the engine loads what it writes is tested on the tiny model in ``tests/integration``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import download_weights
from builder.download_weights import DownloadError, check_file, download
from tests.support.fake_hub import (
    FakeHub,
    safetensors_bytes,
    serving_hub,
    stand_in_files,
    url_path,
)
from worker.spec import ModelSpec

SPEC = ModelSpec(steps=(4,))
CHECKPOINT = next(f for f in SPEC.files() if f.path.endswith("4step_unet.safetensors"))
TEXT_CONFIG = next(f for f in SPEC.files() if f.path == "text_encoder/config.json")
EVERYTHING = ModelSpec(steps=(1, 2, 4, 8), safety_checker=True, tiny_decoder=True)


@pytest.fixture(scope="module")
def tiny_files() -> dict[str, bytes]:
    """URL path -> bytes, for every file of every spec."""
    return stand_in_files(EVERYTHING)


@pytest.fixture
def hub(tiny_files: dict[str, bytes]) -> Iterator[FakeHub]:
    with serving_hub(tiny_files) as hub:
        yield hub


@pytest.fixture
def cdn(tiny_files: dict[str, bytes]) -> Iterator[FakeHub]:
    """A second origin (another port), like the CDN the Hub redirects large files to."""
    with serving_hub(tiny_files) as hub:
        yield hub


@pytest.fixture(autouse=True)
def no_hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.part")) if folder.exists() else []


class TestCompleteDownload:
    @pytest.mark.parametrize("spec", [SPEC, EVERYTHING], ids=["4-step", "everything"])
    def test_folder_has_every_file_of_the_spec_intact(
            self, hub: FakeHub, tiny_files: dict[str, bytes], tmp_path: Path,
            spec: ModelSpec) -> None:
        folder = tmp_path / "model"
        fetched = download(folder, spec, endpoint=hub.url, backoff_s=0)
        assert fetched == len(spec.files())
        for f in spec.files():
            assert (folder / f.path).read_bytes() == tiny_files[url_path(f)], f.path
        assert leftovers(folder) == [] and spec.missing(folder) == []
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert on_disk == {f.path for f in spec.files()}  # nothing the spec does not name

    def test_cli_uses_hf_endpoint_and_sends_hf_token(
            self, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        assert download_weights.main([str(tmp_path / "model"), "--steps", "4"]) == 0
        assert SPEC.missing(tmp_path / "model") == []
        assert hub.requests, "the CLI did not use HF_ENDPOINT"
        assert {headers.get("Authorization") for _, headers in hub.requests} == \
            {"Bearer hf_test_token"}

    def test_cli_exits_1_when_a_file_cannot_be_fetched(
            self, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        del hub.files[url_path(CHECKPOINT)]
        assert download_weights.main([str(tmp_path / "model"), "--steps", "4"]) == 1


class TestOptionalComponents:
    @pytest.mark.parametrize("option, flag", [("safety_checker", "--safety-checker"),
                                              ("tiny_decoder", "--tiny-decoder")])
    def test_their_files_are_fetched_only_when_asked(
            self, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str,
            flag: str) -> None:
        with_option = ModelSpec(steps=(4,), **{option: True})
        base = {f.path for f in SPEC.files()}
        extra = [f for f in with_option.files() if f.path not in base]
        assert extra, f"{option} adds files"
        download(tmp_path / "plain", SPEC, endpoint=hub.url, backoff_s=0)
        assert not any((tmp_path / "plain" / f.path).exists() for f in extra)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        folder = tmp_path / "with"
        assert download_weights.main([str(folder), "--steps", "4", flag]) == 0
        assert with_option.missing(folder) == []

    def test_the_cli_spells_a_spec_as_builder_args_does(self, hub: FakeHub, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        spec = ModelSpec(steps=(2, 8), safety_checker=True, tiny_decoder=True)
        assert download_weights.main([str(tmp_path / "m"), *spec.builder_args()]) == 0
        assert spec.missing(tmp_path / "m") == []
        assert not (tmp_path / "m" / CHECKPOINT.path).exists()  # 4 steps was not asked for


class TestRedirects:
    def test_token_is_dropped_when_redirected_to_another_origin(
            self, hub: FakeHub, cdn: FakeHub, tiny_files: dict[str, bytes], tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        path = url_path(CHECKPOINT)
        hub.redirects[path] = f"{cdn.url}{path}"
        download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0)
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
        download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0)
        assert hub.count("/cache/checkpoint") == 1
        auth = [h.get("Authorization") for p, h in hub.requests if p == "/cache/checkpoint"]
        assert auth == ["Bearer hf_secret"]


class TestRetries:
    @pytest.mark.parametrize("fault", ["500", "503", "drop", "short", "chunked_cut", "cut"])
    def test_one_failed_attempt_is_retried_and_succeeds(
            self, hub: FakeHub, tiny_files: dict[str, bytes], tmp_path: Path, fault: str) -> None:
        path = url_path(CHECKPOINT)
        hub.faults[path] = [fault]
        download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0)
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
            download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0, attempts=3)
        assert f"{hub.url}{path}" in str(info.value)
        assert "after 3 attempts" in str(info.value)
        assert hub.count(path) == 3
        assert not (tmp_path / "model" / CHECKPOINT.path).exists()
        assert leftovers(tmp_path) == []

    def test_corrupt_json_is_refused(self, hub: FakeHub, tmp_path: Path) -> None:
        path = url_path(TEXT_CONFIG)
        hub.faults[path] = ["corrupt"] * 10
        with pytest.raises(DownloadError, match="not valid JSON"):
            download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0, attempts=2)
        assert not (tmp_path / "model" / TEXT_CONFIG.path).exists()
        assert leftovers(tmp_path) == []

    def test_a_truncated_file_already_in_the_folder_is_fetched_again(
            self, hub: FakeHub, tiny_files: dict[str, bytes], tmp_path: Path) -> None:
        path = url_path(CHECKPOINT)
        dest = tmp_path / "model" / CHECKPOINT.path
        dest.parent.mkdir(parents=True)
        dest.write_bytes(tiny_files[path][: len(tiny_files[path]) // 2])
        download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0)
        assert hub.count(path) == 1
        assert dest.read_bytes() == tiny_files[path]


class TestCheckFile:
    """The validity check behind 'never a truncated file in place'."""

    safetensors = staticmethod(safetensors_bytes)

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
        download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0)
        hub.requests.clear()
        assert download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0) == 0
        assert hub.requests == []

    def test_only_a_missing_file_is_fetched(self, hub: FakeHub, tmp_path: Path) -> None:
        download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0)
        (tmp_path / "model" / TEXT_CONFIG.path).unlink()
        hub.requests.clear()
        assert download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0) == 1
        assert [p for p, _ in hub.requests] == [url_path(TEXT_CONFIG)]


class TestFailsFast:
    @pytest.mark.parametrize("code", ["404", "401", "403"])
    def test_a_final_http_answer_is_not_retried_and_names_the_url(
            self, hub: FakeHub, tmp_path: Path, code: str) -> None:
        path = url_path(CHECKPOINT)
        hub.faults[path] = [code] * 10
        with pytest.raises(DownloadError) as info:
            download(tmp_path / "model", SPEC, endpoint=hub.url, backoff_s=0)
        assert f"{hub.url}{path}" in str(info.value)
        assert f"HTTP {code}" in str(info.value)
        assert hub.count(path) == 1
        assert leftovers(tmp_path) == []
