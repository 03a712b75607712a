"""inputs/images and inputs/fetch: encodings, normalisation, rejections, bombs, masks, SSRF-safe
URLs.

URL tests talk only to a server on 127.0.0.1 (``tests/support/http_fixtures``). Names such as
``ok.example`` exist only in stub resolvers; a stub ``Network`` opener dials the local server
whatever address was checked, and records that address.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.support import image_bombs as bombs
from tests.support.http_fixtures import LocalServer, Network, Route, make_certificate
from worker.errors import InputError
from worker.inputs import fetch, images
from worker.inputs.fetch import FetchError, FetchLimits, blocked_reason
from worker.inputs.images import InputLimits, load_image, load_mask
from worker.inputs.structure import WORK_LIMITS, WorkLimits

# worker/runtime.py silences Pillow's bomb warning for the worker process; that is checked in a
# fresh interpreter below (TestBombs). Here the warning would only be noise.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_IP = "93.184.216.34"  # a global address; never dialled (Network routes it locally)
LOCAL = InputLimits(allow_http=True, allow_private=True)
HTTP_PUBLIC_ONLY = InputLimits(allow_http=True)


def pattern(width: int = 16, height: int = 12) -> Image.Image:
    """RGB noise: any pixel moved, dropped or altered shows."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


PNG = encode(pattern())
PIXELS = np.asarray(pattern())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@lru_cache
def bomb_png(width: int, height: int) -> bytes:
    """A black 1-bit PNG, its rows streamed through zlib: a tiny file, a huge image, and no
    image is held in memory while building it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    compressor, parts, left = zlib.compressobj(9), [], height
    while left:
        rows = min(left, max(1, 2**20 // len(row)))
        parts.append(compressor.compress(row * rows))
        left -= rows
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def message(value: object, limits: InputLimits = images.DEFAULT_LIMITS, field: str = "image",
            **kwargs: object) -> str:
    with pytest.raises(InputError) as caught:
        load_image(value, field, limits, **kwargs)
    error = caught.value  # no chained traceback behind the message
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return str(caught.value)


class TestEncodings:
    @pytest.mark.parametrize("value", [
        b64(PNG),
        f"data:image/png;base64,{b64(PNG)}",
        "DATA:image/jpeg;BASE64," + b64(PNG),  # declared type ignored: the header decides
        base64.encodebytes(PNG).decode(),  # MIME style: a newline every 76 characters
        f"  \n{b64(PNG)}\r\n\t",
        b64(PNG).rstrip("="),
        base64.urlsafe_b64encode(PNG).decode(),
        list(PNG),  # Cloudflare Workers AI: image: [137, 80, 78, 71, ...]
        PNG,
    ], ids=["raw", "data-uri", "data-uri-case", "newlines", "padded-whitespace", "no-padding",
            "urlsafe", "byte-array", "bytes"])
    def test_every_encoding_gives_the_same_pixels(self, value: object) -> None:
        assert b64(PNG).endswith("="), "the no-padding case needs padding to strip"
        image = load_image(value, "image")
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), PIXELS)

    def test_webp_is_accepted(self) -> None:
        image = load_image(b64(encode(pattern(), "WEBP", lossless=True)), "image")
        np.testing.assert_array_equal(np.asarray(image), PIXELS)


class TestNormalisation:
    def test_rgba_is_composited_on_white(self) -> None:
        rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8)
        image = load_image(encode(Image.fromarray(rgba, "RGBA")), "image")
        assert image.mode == "RGB"
        assert image.getpixel((0, 0)) == (255, 255, 255)
        assert image.getpixel((1, 0)) == (10, 20, 30)
        assert all(126 <= c <= 128 for c in image.getpixel((2, 0)))

    def test_greyscale_with_alpha(self) -> None:
        la = Image.fromarray(np.array([[[100, 0], [100, 255]]], np.uint8), "LA")
        image = load_image(encode(la), "image")
        assert [image.getpixel((x, 0)) for x in range(2)] == [(255,) * 3, (100,) * 3]

    @pytest.mark.parametrize("mode", ["L", "1"])
    def test_greyscale_and_bilevel(self, mode: str) -> None:
        grey = Image.fromarray(np.array([[0, 255]], np.uint8)).convert(mode)
        image = load_image(encode(grey), "image")
        assert image.mode == "RGB"
        assert [image.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]

    def test_palette_with_a_transparent_index(self) -> None:
        palette = Image.new("P", (3, 1))
        palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
        palette.putdata([0, 1, 2])
        image = load_image(encode(palette, transparency=2), "image")
        assert image.mode == "RGB"
        assert [image.getpixel((x, 0)) for x in range(3)] == [(255, 0, 0), (0, 255, 0),
                                                              (255, 255, 255)]

    def test_sixteen_bit_greyscale_is_scaled_not_clipped(self) -> None:
        deep = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
        assert deep.mode.startswith("I;16")
        image = load_image(encode(deep), "image")
        assert [image.getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]

    def test_cmyk_jpeg(self) -> None:
        red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
        image = load_image(encode(red, "JPEG", quality=95), "image")
        assert image.mode == "RGB"
        r, g, b = image.getpixel((8, 8))
        assert r > 230 and g < 30 and b < 30

    def test_exif_orientation_is_applied(self) -> None:
        stored = Image.new("RGB", (40, 20), (255, 0, 0))
        stored.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90° clockwise to display"
        image = load_image(encode(stored, "JPEG", quality=95, exif=exif), "image")
        assert image.size == (20, 40)
        top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
        assert top[0] > 200 and top[2] < 50, top  # the left column is now the top row
        assert bottom[2] > 200 and bottom[0] < 50, bottom


def jpeg_with_bad_huffman_table() -> bytes:
    data = encode(pattern(64, 64), "JPEG", quality=90)
    table = data.index(b"\xff\xc4")
    return data[:table + 4] + b"\xff" * 30 + data[table + 34:]


class TestRejections:
    @pytest.mark.parametrize(("value", "expected"), [
        ("", "image: is empty; expected base64 image data"),
        (" \n ", "image: is empty"),
        ("iVBORw0KGgo!AAAA", "image: not valid base64 (unexpected '!' at character 12)"),
        ("abc=defg", "image: not valid base64 (unexpected '='"),
        ("iVBORw0KGgoA", "not a decodable image"),
        ("abcde", "image: not valid base64 (5 characters: cut short?)"),
        ("data:image/png,iVBORw0KGgo", "image: a data URI must be base64"),
        ("data:image/png;base64", "image: a data URI must be base64"),
        ("data:image/png;base64,", "image: is empty"),
        (b64(b"hello, world: not an image"),
         "image: not a decodable image (not a JPEG, PNG or WEBP file)"),
        (b64(PNG[:len(PNG) // 2]), "image: not a decodable image (PNG: image file is truncated"),
        (b64(PNG[:33]), "image: not a decodable image (broken PNG header)"),
        (b64(jpeg_with_bad_huffman_table()), "image: not a decodable image (JPEG: broken data"),
        (b64(encode(pattern(), "GIF")), "image: format GIF is not accepted (JPEG, PNG, WEBP)"),
        (b64(encode(pattern(), "TIFF")), "image: format TIFF is not accepted (JPEG, PNG, WEBP)"),
        (b64(encode(pattern(), "BMP")), "image: format BMP is not accepted (JPEG, PNG, WEBP)"),
        ([137, 80, 256], "image: byte array element 2 is 256; expected integers 0-255"),
        ([137, -1], "image: byte array element 1 is -1; expected integers 0-255"),
        ([True, 80], "image: byte array element 0 is True; expected integers 0-255"),
        ([137, "a"], "image: byte array element 1 is 'a'; expected integers 0-255"),
        ([137, 80.0], "image: byte array element 1 is 80.0; expected integers 0-255"),
        ([[137, 80]], "image: byte array element 0 is [137, 80]; expected integers 0-255"),
        ([], "image: is an empty array"),
        (5, "image: expected base64 image data, a data: URI, an https URL or an array of byte "
            "values 0-255, got number"),
        (True, "got boolean"),
        (None, "got null"),
        ({"url": "https://x.example/a.png"}, "got object"),
        ("file:///etc/passwd", "image: URL must use https (got file)"),
        ("ftp://x.example/a.png", "image: URL must use https (got ftp)"),
    ])
    def test_message_names_the_field_and_the_problem(self, value: object, expected: str) -> None:
        assert expected in message(value)

    def test_the_field_name_is_the_one_given(self) -> None:
        assert message("!!!!", field="mask").startswith("mask: not valid base64")

    def test_a_gif_is_decoded_only_when_allowed(self) -> None:
        gif = b64(encode(pattern(), "GIF"))
        assert load_image(gif, "image", InputLimits(formats={"GIF", "png"})).size == (16, 12)

    @pytest.mark.parametrize("encoder", [b64, list, bytes], ids=["base64", "array", "bytes"])
    def test_too_many_bytes(self, encoder: Callable[[bytes], object]) -> None:
        assert 100 < len(PNG) < 1024
        assert message(encoder(PNG), InputLimits(max_bytes=100)) == \
            f"image: the file is {len(PNG)} bytes; the limit is 100 bytes"

    def test_byte_cap_in_megabytes(self) -> None:
        assert message("A" * (3 * 2**20), InputLimits(max_bytes=2 * 2**20)) == \
            "image: the file is 2.2 MiB; the limit is 2 MiB"  # 3 MiB of base64 = 2.25 MiB

    def test_a_huge_bad_value_is_not_echoed(self) -> None:
        text = message("A" * 100_000 + "!" + "B" * 100_000)
        assert len(text) < 300 and "AAAAAAAAAA" not in text and "BBBB" not in text

    def test_truncated_files_stay_errors(self) -> None:
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
        assert "truncated" in message(b64(PNG[:-60]))
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Sizes of images whose pixels were decoded (ImageFile.load called)."""
    calls: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


class TestBombs:
    def test_the_bomb_builder_makes_real_pngs(self, decoded: list[tuple[int, int]]) -> None:
        image = load_image(bomb_png(64, 40), "image")
        assert image.size == (64, 40) and image.getextrema() == ((0, 0),) * 3
        assert decoded and set(decoded) == {(64, 40)}  # the spy sees decoding when it happens

    def test_over_the_pixel_limit_is_refused_from_the_header(
            self, decoded: list[tuple[int, int]]) -> None:
        data = bomb_png(5000, 5000)
        assert len(data) < 10_000
        assert message(data) == "image: 5000x5000 pixels is over the 16.8 MP limit"
        assert decoded == []

    def test_a_pillow_sized_bomb_is_refused(self, decoded: list[tuple[int, int]]) -> None:
        # 30000² = 900 MP, past twice Pillow's MAX_IMAGE_PIXELS: Image.open itself refuses it.
        data = bomb_png(30000, 30000)
        assert len(data) < 200_000  # 113 MB of pixel rows
        assert message(b64(data)) == "image: 900.0 MP is over the 16.8 MP limit"
        assert decoded == []

    def test_between_pillows_warning_and_error(self, decoded: list[tuple[int, int]]) -> None:
        assert message(bomb_png(12000, 12000)) == \
            "image: 12000x12000 pixels is over the 16.8 MP limit"
        assert decoded == []

    def test_pillows_own_limit_applies_when_lower(self, monkeypatch: pytest.MonkeyPatch,
                                                   decoded: list[tuple[int, int]]) -> None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # its warning becomes an error
        assert message(bomb_png(40, 40)) == "image: 40x40 pixels is over the 0.0 MP limit"
        assert decoded == []

    def test_a_long_side_is_refused(self, decoded: list[tuple[int, int]]) -> None:
        assert message(bomb_png(9000, 2)) == \
            "image: 9000x2 pixels: a side is over the 8192-pixel limit"
        assert decoded == []

    def test_pillows_warning_is_ignored_once_the_libraries_are_configured(self) -> None:
        # A fresh interpreter where the warning is an error until worker.runtime configures the
        # process: without its filter this would be "not a decodable image (Image size ...)".
        code = ("import sys, warnings\n"
                "from PIL import Image\n"
                "warnings.simplefilter('error', Image.DecompressionBombWarning)\n"
                "from worker import runtime\n"
                "from worker.errors import InputError\n"
                "from worker.inputs import images\n"
                "runtime.configure_libraries({})\n"
                "try:\n"
                "    images.load_image(sys.stdin.buffer.read(), 'image')\n"
                "except InputError as exc:\n"
                "    print(exc)\n")
        run = subprocess.run([sys.executable, "-c", code], input=bomb_png(12000, 12000),
                             capture_output=True, cwd=ROOT, timeout=120, check=True)
        assert run.stdout.decode().strip() == \
            "image: 12000x12000 pixels is over the 16.8 MP limit"

    def test_decoding_in_several_threads_at_once(self) -> None:
        def outcome(value: bytes) -> bytes | str:
            try:
                return np.asarray(load_image(value, "image")).tobytes()
            except InputError as exc:
                return str(exc)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(outcome, [PNG, bomb_png(12000, 12000)] * 8))
        assert results == [PIXELS.tobytes(),
                           "image: 12000x12000 pixels is over the 16.8 MP limit"] * 8


class TestWorkBombs:
    """Small in bytes and pixels, costly in work: refused from their structure, undecoded; the
    same files with counts under the limits decode to the pixels of the file they were made
    from, so a refusal is for the count alone."""

    def over(self, fmt: str, what: str, limit: int, usual: str) -> str:
        return (f"image: {fmt} with more than {limit} {what}: refused before decoding (the limit "
                f"is {limit}; {usual})")

    def test_repeated_jpeg_scans_are_refused_before_decoding(
            self, decoded: list[tuple[int, int]]) -> None:
        data = bombs.repeated_scans(1024, 1024, 1000)  # 1010 scans, each one a walk of 1 MP
        assert len(data) < 20_000
        assert message(data) == self.over("JPEG", "scans", 64, "encoders write at most 18")
        assert decoded == []

    def test_up_to_the_scan_limit_the_same_file_decodes(self) -> None:
        plain, at_limit = bombs.repeated_scans(64, 48, 0), bombs.repeated_scans(64, 48, 54)
        assert len(bombs.jpeg_scans(plain)) == 10 and len(bombs.jpeg_scans(at_limit)) == 64
        np.testing.assert_array_equal(np.asarray(load_image(at_limit, "image")),
                                      np.asarray(load_image(plain, "image")))
        assert "more than 64 scans" in message(bombs.repeated_scans(64, 48, 55))

    @pytest.mark.parametrize(("mode", "scans"), [("RGB", 10), ("L", 6), ("CMYK", 18)])
    def test_libjpeg_progressive_files_are_far_under_the_limit(self, mode: str,
                                                               scans: int) -> None:
        data = encode(pattern(64, 48).convert(mode), "JPEG", progressive=True)
        assert len(bombs.jpeg_scans(data)) == scans < WORK_LIMITS.jpeg_scans
        assert load_image(data, "image").size == (64, 48)

    @pytest.mark.parametrize("progressive", [False, True])
    def test_restart_markers_are_part_of_a_scan_not_segments(self, progressive: bool) -> None:
        # One restart marker (RST0-7) per MCU: thousands inside the coded data of each scan.
        data = encode(pattern(1024, 512), "JPEG", restart_marker_blocks=1,
                      progressive=progressive)
        restarts = sum(data.count(bytes([0xFF, 0xD0 + n])) for n in range(8))
        assert restarts > WORK_LIMITS.jpeg_segments
        with Image.open(io.BytesIO(data)) as direct:
            np.testing.assert_array_equal(np.asarray(load_image(data, "image")),
                                          np.asarray(direct.convert("RGB")))

    def test_many_jpeg_segments(self, decoded: list[tuple[int, int]]) -> None:
        base = encode(pattern(), "JPEG", quality=95)
        np.testing.assert_array_equal(np.asarray(load_image(bombs.jpeg_segments(base, 500),
                                                            "image")),
                                      np.asarray(load_image(base, "image")))
        decoded.clear()
        assert message(bombs.jpeg_segments(base, 1024)) == \
            self.over("JPEG", "marker segments", 1024, "encoders write under 400")
        assert decoded == []

    def test_padding_between_jpeg_header_segments(self, decoded: list[tuple[int, int]]) -> None:
        base = encode(pattern(), "JPEG", quality=95)
        np.testing.assert_array_equal(np.asarray(load_image(bombs.jpeg_padding(base, 1024),
                                                            "image")),
                                      np.asarray(load_image(base, "image")))
        decoded.clear()
        expected = self.over("JPEG", "bytes of padding between header segments", 1024,
                             "encoders write none")
        assert message(bombs.jpeg_padding(base, 1025)) == expected
        assert message(bombs.jpeg_padding(base, 20 * 2**20 - 1024)) == expected  # one search
        assert decoded == []

    def test_what_follows_the_end_of_a_jpeg_is_not_counted(self) -> None:
        # An MPO (a camera's multi-picture JPEG) carries its next images there; none is decoded.
        base = encode(pattern(), "JPEG", quality=95)
        data = base + bombs.repeated_scans(64, 48, 100)
        np.testing.assert_array_equal(np.asarray(load_image(data, "image")),
                                      np.asarray(load_image(base, "image")))

    def test_many_png_chunks(self, decoded: list[tuple[int, int]]) -> None:
        np.testing.assert_array_equal(np.asarray(load_image(bombs.png_chunks(PNG, 1000),
                                                            "image")), PIXELS)
        decoded.clear()
        expected = self.over("PNG", "chunks", 16384,
                             "encoders write one per 8 KiB of pixel data or fewer")
        assert message(bombs.png_chunks(PNG, 16384)) == expected
        noisy = encode(pattern(128, 128))
        assert len(noisy) > 16384  # one-byte IDATs: more chunks than the limit
        assert message(bombs.png_split_idat(noisy, 1)) == expected
        assert decoded == []

    def test_png_pixel_data_split_into_small_chunks_decodes(self) -> None:
        one_byte_idats = bombs.png_split_idat(PNG, 1)
        assert one_byte_idats.count(b"IDAT") > 100
        np.testing.assert_array_equal(np.asarray(load_image(one_byte_idats, "image")), PIXELS)

    def test_many_webp_frames(self, decoded: list[tuple[int, int]]) -> None:
        image = load_image(bombs.webp_frames(3), "image")
        assert image.size == (16, 16) and image.getextrema() == ((255, 255), (0, 0), (0, 0))
        decoded.clear()
        assert message(bombs.webp_frames(16384)) == self.over(
            "WEBP", "chunks (frames and metadata)", 16384, "a still image has at most 7")
        assert decoded == []

    def test_many_gif_blocks_before_the_first_image(self,
                                                    decoded: list[tuple[int, int]]) -> None:
        gif = InputLimits(formats={"GIF"})
        base = encode(pattern(), "GIF")
        np.testing.assert_array_equal(
            np.asarray(load_image(bombs.gif_blocks(base, 100), "image", gif)),
            np.asarray(load_image(base, "image", gif)))
        decoded.clear()
        assert message(bombs.gif_blocks(base, 4096), gif) == self.over(
            "GIF", "blocks before its first image", 4096, "encoders write under 10")
        assert decoded == []
        # Not accepted: the format is named, as before, whatever the structure.
        assert message(bombs.gif_blocks(base, 4096)) == \
            "image: format GIF is not accepted (JPEG, PNG, WEBP)"

    def test_the_limits_can_be_set(self) -> None:
        strict = InputLimits(work=WorkLimits(jpeg_scans=5))
        data = encode(pattern(), "JPEG", progressive=True)
        assert "image: JPEG with more than 5 scans" in message(data, strict)
        with pytest.raises(ValueError, match="invalid"):
            WorkLimits(png_chunks=0)


class TestMask:
    def test_resized_to_the_image_size_in_mode_l(self) -> None:
        grey = np.zeros((10, 20), np.uint8)
        grey[:, 10:] = 255  # right half: repaint
        mask = load_mask(b64(encode(Image.fromarray(grey))), "mask", (64, 48))
        assert mask.mode == "L" and mask.size == (64, 48)
        assert mask.getpixel((2, 24)) == 0 and mask.getpixel((61, 24)) == 255

    def test_an_rgb_mask_becomes_luminance(self) -> None:
        mask = load_mask(encode(Image.new("RGB", (8, 8), (255, 255, 255))), "mask", (8, 8))
        assert mask.mode == "L" and mask.getextrema() == (255, 255)

    def test_transparent_means_keep(self) -> None:
        strokes = np.zeros((8, 8, 4), np.uint8)
        strokes[:4] = (255, 255, 255, 255)  # painted top half on a transparent canvas
        mask = load_mask(encode(Image.fromarray(strokes, "RGBA")), "mask", (8, 8))
        assert mask.getpixel((4, 1)) == 255 and mask.getpixel((4, 6)) == 0

    def test_mask_mode_black_repaints_black(self) -> None:
        grey = np.zeros((8, 8), np.uint8)
        grey[:, 4:] = 255
        mask = load_mask(encode(Image.fromarray(grey)), "mask", (8, 8), repaint="black")
        assert mask.getpixel((1, 1)) == 255 and mask.getpixel((6, 1)) == 0

    def test_mask_mode_transparent_repaints_alpha_zero_only(self) -> None:
        # OpenAI's edits: fully transparent pixels are the area to edit, whatever their colour.
        rgba = np.zeros((8, 8, 4), np.uint8)
        rgba[:, :, :3] = 255
        rgba[:, :4, 3] = 0  # left: transparent (white underneath: ignored)
        rgba[:, 4:6, 3] = 1  # nearly transparent is not "fully": keep
        rgba[:, 6:, 3] = 255
        mask = load_mask(encode(Image.fromarray(rgba, "RGBA")), "mask", (8, 8),
                         repaint="transparent")
        assert [mask.getpixel((x, 3)) for x in (0, 3, 4, 5, 6, 7)] == [255, 255, 0, 0, 0, 0]

    @pytest.mark.parametrize("image", [Image.new("RGB", (8, 8), 0),
                                       Image.new("RGBA", (8, 8), (0, 0, 0, 255))])
    def test_mask_mode_transparent_needs_transparent_pixels(self, image: Image.Image) -> None:
        with pytest.raises(InputError, match=r"^mask: mask_mode transparent repaints fully "
                                             r"transparent pixels, and this mask has none"):
            load_mask(encode(image), "mask", (8, 8), repaint="transparent")

    def test_errors_name_the_mask_field(self) -> None:
        with pytest.raises(InputError, match=r"^mask: format GIF is not accepted"):
            load_mask(b64(encode(pattern(), "GIF")), "mask", (16, 12))

    @pytest.mark.parametrize("size", [(0, 8), (8,), (8.0, 8), (True, 8)])
    def test_a_bad_size_is_a_programming_error(self, size: tuple[int, int]) -> None:
        with pytest.raises(ValueError, match="size must be"):
            load_mask(PNG, "mask", size)


class TestAddressPolicy:
    @pytest.mark.parametrize(("address", "why"), [
        ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
        ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
        ("fd00::1", "private"), ("fd00:ec2::254", "private"), ("2002:a00:1::1", "private"),
        ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"), ("100.100.100.200", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"), ("240.0.0.1", "private"), ("192.0.0.8", "special-purpose"),
        ("fec0::1", "site-local"), ("::7f00:1", "reserved"), ("64:ff9b::a00:1", "reserved"),
        ("2001:db8::1", "private"), ("not-an-ip", "not an IP address"),
    ])
    def test_blocked(self, address: str, why: str) -> None:
        assert why in (blocked_reason(address) or "")

    @pytest.mark.parametrize("address", [PUBLIC_IP, "8.8.8.8", "2606:4700::1",
                                         "::ffff:8.8.8.8"])
    def test_public(self, address: str) -> None:
        assert blocked_reason(address) is None


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as local:
        local.routes["/image.png"] = Route(body=PNG, headers={"Content-Type": "image/png"})
        yield local


def resolver(table: dict[str, list[str]], calls: list[str] | None = None
             ) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    return resolve


def fetched(url: str, limits: InputLimits, **kwargs: object) -> np.ndarray:
    return np.asarray(load_image(url, "image", limits, **kwargs))


class TestUrlPolicy:
    def test_a_png_is_fetched_when_local_http_is_allowed(self, server: LocalServer) -> None:
        np.testing.assert_array_equal(fetched(server.url("/image.png"), LOCAL), PIXELS)
        assert [path for path, _ in server.requests] == ["/image.png"]

    @pytest.mark.parametrize("url", ["https://exa mple.com/", "https://a\x01b.example/x.png"])
    def test_a_host_with_a_space_or_control_character_is_the_callers_error(
            self, url: str) -> None:
        # Found by the fuzz: http.client raised InvalidURL when connecting, an internal error.
        assert message(url, resolver=lambda host, port: [PUBLIC_IP], opener=Network()) == (
            "image: not a valid URL (the host has a space or a control character)")

    def test_http_is_refused_by_default(self, server: LocalServer) -> None:
        assert message(server.url("/image.png")) == "image: URL must use https (got http)"
        assert server.requests == []

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
    def test_loopback_is_refused(self, server: LocalServer, host: str) -> None:
        network = Network()
        text = message(server.url("/image.png", host), HTTP_PUBLIC_ONLY, opener=network)
        assert text.startswith(f"image: refusing to fetch http://{host}:{server.port}: ")
        assert "a loopback address" in text
        assert network.dialled == [] and server.requests == []

    def test_a_public_name_resolving_to_loopback_is_refused(self, server: LocalServer) -> None:
        network = Network()
        text = message(server.url("/image.png", "public.example"), HTTP_PUBLIC_ONLY,
                       resolver=resolver({"public.example": ["127.0.0.1"]}), opener=network)
        assert "public.example resolves to 127.0.0.1, which is a loopback address" in text
        assert network.dialled == [] and server.requests == []

    @pytest.mark.parametrize("address", ["10.0.0.1", "169.254.169.254", "::1",
                                         "::ffff:127.0.0.1", "100.64.0.1", "0.0.0.0"])
    def test_refused_without_a_connection(self, address: str) -> None:
        network = Network()
        text = message("https://name.example/a.png", opener=network,
                       resolver=resolver({"name.example": [address]}))
        assert text.startswith(f"image: refusing to fetch https://name.example: name.example "
                               f"resolves to {address}, which is ")
        assert network.dialled == []

    def test_one_private_address_among_public_ones_is_enough(self) -> None:
        network = Network()
        text = message("https://name.example/a.png", opener=network,
                       resolver=resolver({"name.example": [PUBLIC_IP, "10.0.0.1"]}))
        assert "10.0.0.1, which is a private address" in text and network.dialled == []

    def test_an_ip_literal_is_checked_without_the_resolver(self) -> None:
        network = Network()
        assert message("https://[::1]:8443/a.png", resolver=resolver({}), opener=network) == \
            "image: refusing to fetch https://[::1]:8443: ::1 is a loopback address"
        assert network.dialled == []

    def test_an_unknown_host(self) -> None:
        assert message("https://nowhere.example/", resolver=resolver({})).startswith(
            "image: cannot resolve nowhere.example (")

    def test_credentials_in_the_url_are_refused(self) -> None:
        assert message("https://user:secret@x.example/a.png") == \
            "image: the URL must not carry credentials (user:password@)"

    def test_the_checked_address_is_the_one_dialled(self, server: LocalServer) -> None:
        # DNS rebinding: a second lookup would say 127.0.0.1. There must not be one.
        calls: list[str] = []
        answers = iter([[PUBLIC_IP], ["127.0.0.1"]])
        network = Network()
        pixels = fetched(server.url("/image.png", "ok.example"), HTTP_PUBLIC_ONLY,
                         resolver=lambda host, port: calls.append(host) or next(answers),
                         opener=network)
        np.testing.assert_array_equal(pixels, PIXELS)
        assert calls == ["ok.example"] and network.dialled == [PUBLIC_IP]
        assert server.requests[0][1]["Host"] == f"ok.example:{server.port}"


class TestRedirects:
    @pytest.fixture
    def network(self) -> Network:
        return Network()

    def fetch(self, server: LocalServer, network: Network, path: str,
              limits: InputLimits = HTTP_PUBLIC_ONLY) -> np.ndarray:
        names = resolver({"ok.example": [PUBLIC_IP], "evil.example": ["10.0.0.5"]})
        return fetched(server.url(path, "ok.example"), limits, resolver=names, opener=network)

    def test_a_relative_redirect_is_followed(self, server: LocalServer, network: Network) -> None:
        server.routes["/hop"] = Route(status=302, headers={"Location": "/image.png"})
        np.testing.assert_array_equal(self.fetch(server, network, "/hop"), PIXELS)
        assert [path for path, _ in server.requests] == ["/hop", "/image.png"]
        assert network.dialled == [PUBLIC_IP, PUBLIC_IP]

    @pytest.mark.parametrize(("host", "refusal"), [
        ("evil.example", "evil.example resolves to 10.0.0.5, which is a private address"),
        ("127.0.0.1", "127.0.0.1 is a loopback address"),
    ])
    def test_a_redirect_to_a_private_address_is_refused(
            self, server: LocalServer, network: Network, host: str, refusal: str) -> None:
        server.routes["/hop"] = Route(status=301, headers={
            "Location": server.url("/image.png", host)})
        with pytest.raises(InputError) as caught:
            self.fetch(server, network, "/hop")
        assert str(caught.value) == \
            f"image: refusing to fetch http://{host}:{server.port}: {refusal}"
        assert network.dialled == [PUBLIC_IP] and len(server.requests) == 1

    def test_a_redirect_to_an_unparsable_url_is_the_callers_error(
            self, server: LocalServer, network: Network) -> None:
        server.routes["/hop"] = Route(status=302, headers={"Location": "http://[::1"})
        with pytest.raises(InputError) as caught:
            self.fetch(server, network, "/hop")
        assert str(caught.value).startswith(
            f"image: http://ok.example:{server.port} redirected to an invalid URL (")

    def test_a_redirect_to_another_scheme_is_refused(self, server: LocalServer,
                                                     network: Network) -> None:
        server.routes["/hop"] = Route(status=307, headers={"Location": "file:///etc/passwd"})
        with pytest.raises(InputError, match=r"^image: URL must use https \(got file\)$"):
            self.fetch(server, network, "/hop")

    def test_a_redirect_loop_stops_after_max_redirects(self, server: LocalServer,
                                                       network: Network) -> None:
        server.routes["/loop"] = Route(status=302, headers={"Location": "/loop"})
        with pytest.raises(InputError, match=r"^image: too many redirects \(more than 3\)$"):
            self.fetch(server, network, "/loop")
        assert len(server.requests) == 4  # the first request and 3 redirects

    def test_no_redirects_allowed(self, server: LocalServer, network: Network) -> None:
        server.routes["/hop"] = Route(status=302, headers={"Location": "/image.png"})
        with pytest.raises(InputError, match=r"more than 0"):
            self.fetch(server, network, "/hop", InputLimits(allow_http=True, max_redirects=0))


class TestResponses:
    def test_404_is_named(self, server: LocalServer) -> None:
        assert message(server.url("/missing.png"), LOCAL) == \
            f"image: http://127.0.0.1:{server.port} returned HTTP 404 ('Not Found')"

    def test_a_redirect_without_location_is_an_error(self, server: LocalServer) -> None:
        server.routes["/hop"] = Route(status=302)
        assert "returned HTTP 302" in message(server.url("/hop"), LOCAL)

    def test_an_html_page_is_refused(self, server: LocalServer) -> None:
        server.routes["/page"] = Route(body=b"<html></html>",
                                       headers={"Content-Type": "text/html; charset=utf-8"})
        assert message(server.url("/page"), LOCAL).endswith(
            "sent Content-Type 'text/html', not an image")

    @pytest.mark.parametrize("kind", ["application/octet-stream", "binary/octet-stream", None])
    def test_binary_or_untyped_bodies_are_sniffed(self, server: LocalServer,
                                                  kind: str | None) -> None:
        server.routes["/blob"] = Route(body=PNG, headers={"Content-Type": kind} if kind else {})
        np.testing.assert_array_equal(fetched(server.url("/blob"), LOCAL), PIXELS)

    def test_a_large_content_length_is_refused_before_the_body(self, server: LocalServer) -> None:
        # The server then sends nothing: reading the body would time out instead.
        server.routes["/big"] = Route(length=50 * 2**20, hold_s=5)
        limits = InputLimits(allow_http=True, allow_private=True, url_timeout_s=4)
        assert message(server.url("/big"), limits) == \
            f"image: http://127.0.0.1:{server.port} announces 50 MiB; the limit is 20 MiB"

    def test_an_unannounced_body_is_cut_at_the_cap(self, server: LocalServer) -> None:
        server.routes["/stream"] = Route(body=PNG + bytes(300_000), length=None)
        limits = InputLimits(allow_http=True, allow_private=True, max_bytes=100_000)
        assert message(server.url("/stream"), limits) == \
            f"image: the download from http://127.0.0.1:{server.port} is over the 97.7 KiB limit"

    def test_bytes_past_the_content_length_are_not_read(self, server: LocalServer) -> None:
        server.routes["/extra"] = Route(body=PNG + bytes(200_000), length=len(PNG))
        limits = InputLimits(allow_http=True, allow_private=True, max_bytes=len(PNG))
        np.testing.assert_array_equal(fetched(server.url("/extra"), limits), PIXELS)

    def test_a_body_shorter_than_announced(self, server: LocalServer) -> None:
        server.routes["/short"] = Route(body=PNG[:50], length=len(PNG))
        assert message(server.url("/short"), LOCAL).endswith(
            f"sent 50 of the {len(PNG)} bytes it announced")

    def test_a_silent_server_times_out(self, server: LocalServer) -> None:
        server.routes["/slow"] = Route(body=PNG, delay_s=5)
        limits = InputLimits(allow_http=True, allow_private=True, url_timeout_s=0.5)
        assert message(server.url("/slow"), limits) == (
            f"image: fetching http://127.0.0.1:{server.port} timed out (limit 0.5 s for the "
            f"whole download)")

    def test_the_deadline_covers_the_whole_download(self, server: LocalServer) -> None:
        # Each read gets a byte well within any per-read timeout: only a deadline for the whole
        # download stops it, and it must stop it inside the headers (10 s of them, at 0.05 s a
        # byte), where http.client reads lines with no hook for a deadline check.
        headers = {"X-Padding": "x" * 200}
        server.routes["/drip"] = Route(body=PNG, headers=headers, drip_s=0.05)
        limits = InputLimits(allow_http=True, allow_private=True, url_timeout_s=0.5)
        assert message(server.url("/drip"), limits) == (
            f"image: fetching http://127.0.0.1:{server.port} timed out (limit 0.5 s for the "
            f"whole download)")
        server.close()  # joins the handler: ``sent`` is final
        assert 0 < server.sent["/drip"] < 200

    def test_a_slow_resolver_counts_in_the_deadline(self) -> None:
        # getaddrinfo cannot be interrupted: before, its whole delay came on top of the limit.
        release = threading.Event()
        calls: list[str] = []

        def stuck(host: str, port: int) -> list[str]:
            calls.append(host)
            release.wait(10)
            return [PUBLIC_IP]

        network = Network()
        limits = InputLimits(url_timeout_s=0.3)
        try:
            assert message("https://slow-dns.example/a.png", limits, resolver=stuck,
                           opener=network) == ("image: fetching https://slow-dns.example timed "
                                               "out (limit 0.3 s for the whole download)")
        finally:
            release.set()
        assert calls == ["slow-dns.example"] and network.dialled == []

    def test_resolver_time_of_every_redirect_hop_counts(self, server: LocalServer) -> None:
        # Each lookup alone is within the limit; together with the redirect they are not.
        server.routes["/hop"] = Route(status=302, headers={
            "Location": server.url("/image.png", "second.example")})
        lookups: list[str] = []

        def slow(host: str, port: int) -> list[str]:
            lookups.append(host)
            time.sleep(0.2)
            return ["127.0.0.1"]

        limits = InputLimits(allow_http=True, allow_private=True, url_timeout_s=0.3)
        assert message(server.url("/hop", "first.example"), limits, resolver=slow) == (
            f"image: fetching http://second.example:{server.port} timed out (limit 0.3 s for "
            f"the whole download)")
        assert lookups == ["first.example", "second.example"]
        assert [path for path, _ in server.requests] == ["/hop"]

    def test_no_log_record_at_info_names_the_callers_host(
            self, server: LocalServer, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="worker.inputs")
        limits = InputLimits(allow_http=True)
        names = resolver({"caller-host.example": ["127.0.0.1"]})
        message(server.url("/image.png", "caller-host.example"), limits, resolver=names)
        fetched(server.url("/image.png"), LOCAL)
        assert caplog.records and "caller-host" not in caplog.text
        assert "127.0.0.1" not in caplog.text

    def test_a_refused_connection(self) -> None:
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        assert message(f"http://127.0.0.1:{port}/a.png", LOCAL).startswith(
            f"image: could not fetch http://127.0.0.1:{port} (")

    def test_logs_and_errors_carry_no_path_or_query(self, server: LocalServer,
                                                    caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG, logger="worker.inputs")
        text = message(server.url("/secret-path.png?token=SECRET"), LOCAL)
        assert "HTTP 404" in text and "SECRET" not in text and "secret-path" not in text
        assert "127.0.0.1" in caplog.text
        assert "SECRET" not in caplog.text and "secret-path" not in caplog.text


class TestTls:
    @pytest.fixture
    def tls_server(self, tmp_path: Path) -> Iterator[tuple[LocalServer, ssl.SSLContext, list]]:
        cert, key = make_certificate(tmp_path, "public.example")
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(cert, key)
        names: list[str | None] = []
        server_context.sni_callback = lambda sock, name, context: names.append(name)
        with LocalServer(tls=server_context) as local:
            local.routes["/image.png"] = Route(body=PNG, headers={"Content-Type": "image/png"})
            yield local, ssl.create_default_context(cafile=str(cert)), names

    NAMES = staticmethod(resolver({"public.example": [PUBLIC_IP], "other.example": [PUBLIC_IP]}))

    def test_the_hostname_is_sent_and_verified(self, tls_server: tuple) -> None:
        server, client_context, names = tls_server
        network = Network()
        pixels = fetched(server.url("/image.png", "public.example", "https"), InputLimits(),
                         resolver=self.NAMES, opener=network, ssl_context=client_context)
        np.testing.assert_array_equal(pixels, PIXELS)
        assert network.dialled == [PUBLIC_IP] and names == ["public.example"]
        assert server.requests[0][1]["Host"] == f"public.example:{server.port}"

    def test_a_certificate_for_another_name_is_refused(self, tls_server: tuple) -> None:
        server, client_context, _ = tls_server
        text = message(server.url("/image.png", "other.example", "https"),
                       resolver=self.NAMES, opener=Network(), ssl_context=client_context)
        assert text.startswith("image: TLS certificate check failed for other.example (")
        assert server.requests == []

    def test_the_default_context_verifies(self, tls_server: tuple) -> None:
        server, _, _ = tls_server
        text = message(server.url("/image.png", "public.example", "https"),
                       resolver=self.NAMES, opener=Network())
        assert text.startswith("image: TLS certificate check failed for public.example (")

    def test_a_downgrade_to_http_is_refused(self, tls_server: tuple) -> None:
        server, client_context, _ = tls_server
        server.routes["/down"] = Route(status=302, headers={
            "Location": server.url("/image.png", "public.example")})
        assert message(server.url("/down", "public.example", "https"), resolver=self.NAMES,
                       opener=Network(), ssl_context=client_context) == \
            "image: URL must use https (got http)"


class TestUrlFetchModule:
    def test_its_errors_name_no_field(self) -> None:
        with pytest.raises(FetchError) as caught:
            fetch.fetch("http://x.example/a.png", FetchLimits())
        assert str(caught.value) == "URL must use https (got http)"
        assert isinstance(caught.value, InputError)  # the URL is the caller's

    def test_input_limits_give_the_fetch_limits(self) -> None:
        limits = InputLimits(max_bytes=1234, url_timeout_s=2.5, max_redirects=1, allow_http=True,
                             allow_private=True, formats=frozenset({"png", "gif"}))
        assert limits.fetch_limits == FetchLimits(1234, 2.5, 1, True, True,
                                                  ("image/gif", "image/png"))

    def test_the_accept_header_names_the_accepted_formats(self, server: LocalServer) -> None:
        fetched(server.url("/image.png"), LOCAL)
        assert server.requests[0][1]["Accept"] == \
            "image/jpeg, image/png, image/webp, */*;q=0.1"

    @pytest.mark.parametrize("bad", [{"max_bytes": 0}, {"timeout_s": 0}, {"max_redirects": -1}])
    def test_invalid_limits(self, bad: dict[str, int]) -> None:
        with pytest.raises(ValueError):
            FetchLimits(**bad)


def test_module_defaults() -> None:
    limits = InputLimits()
    assert (limits.max_bytes, limits.max_pixels, limits.max_side) == (20 * 2**20, 4096**2, 8192)
    assert limits.formats == {"PNG", "JPEG", "WEBP"} and limits.max_redirects == 3
    assert (limits.allow_http, limits.allow_private, limits.url_timeout_s) == (False, False, 10)
    assert images.DEFAULT_LIMITS == limits
    with pytest.raises(ValueError):
        InputLimits(max_bytes=0)
