"""The error types, the helpers that quote bad values, and the one image-signature table."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from worker.errors import (
    InputError,
    JobError,
    ModelFolderError,
    StartupError,
    brief_reason,
    bug_report,
    shown,
    size_text,
)
from worker.formats import sniff


class TestErrorTypes:
    def test_the_three_kinds_are_distinct_and_none_is_a_value_error(self) -> None:
        kinds = (InputError, JobError, StartupError)
        for kind in kinds:
            assert not issubclass(kind, ValueError)  # a stray ValueError is never the caller's
            assert [issubclass(kind, other) for other in kinds].count(True) == 1
        assert issubclass(ModelFolderError, StartupError)


class TestQuoting:
    def test_short_values_are_shown_whole(self) -> None:
        assert shown("widht") == "'widht'" and shown(1.5) == "1.5"

    def test_long_values_are_cut_and_their_length_said(self) -> None:
        assert shown("x" * 5000, 10) == "'xxxxxxxxx... (5002 chars)"

    def test_reasons_lose_object_addresses_and_length(self) -> None:
        assert brief_reason(RuntimeError(f"cannot read {io.BytesIO()}")) == "cannot read data"
        assert brief_reason(RuntimeError("")) == "RuntimeError"
        assert len(brief_reason(RuntimeError("y" * 500))) == 123

    @pytest.mark.parametrize(("count", "text"), [(50, "50 bytes"), (100_000, "97.7 KiB"),
                                                 (20 * 2**20, "20 MiB"), (2**20 + 1, "1 MiB")])
    def test_sizes_are_in_binary_units(self, count: int, text: str) -> None:
        assert size_text(count) == text


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format=fmt)
    return buffer.getvalue()


class TestSniff:
    @pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP", "ICO", "PDF"])
    def test_names_pillows_format_of_real_files(self, fmt: str) -> None:
        assert sniff(encoded(fmt)) == fmt

    @pytest.mark.parametrize(("head", "fmt"), [(b"\0\0\0\x18ftypheic", "HEIF/AVIF"),
                                               (b"8BPS\0\1", "PSD"), (b"%!PS-Adobe", "EPS"),
                                               (b"MM\0*\0\0\0\x08", "TIFF")])
    def test_names_formats_pillow_does_not_write(self, head: bytes, fmt: str) -> None:
        assert sniff(head) == fmt

    @pytest.mark.parametrize("data", [b"", b"hello", b"RIFF\0\0\0\0WAVE", b"BM\1\1\1\1\1\1\1\1"])
    def test_anything_else_is_none(self, data: bytes) -> None:
        assert sniff(data) is None


class TestBugReport:
    def test_frames_and_types_without_any_message(self) -> None:
        def inner(prompt: str) -> None:
            raise ValueError(f"input_value={prompt!r}")

        marker = "-".join(["caller", "text", "5c1"])  # in no source line the frames quote
        try:
            try:
                inner(marker)
            except ValueError as exc:
                raise KeyError(marker) from exc
        except KeyError as exc:
            report = bug_report(exc)
        assert marker not in report
        assert report.startswith("KeyError (message at DEBUG)")
        assert "which came from: ValueError (message at DEBUG)" in report
        assert "in inner" in report and "test_errors_and_formats.py" in report

    def test_a_suppressed_context_is_left_out(self) -> None:
        try:
            try:
                raise OSError("first")
            except OSError:
                raise RuntimeError("second") from None
        except RuntimeError as exc:
            assert "OSError" not in bug_report(exc)
