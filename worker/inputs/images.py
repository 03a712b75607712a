"""Turns a job's ``image`` / ``mask`` field into a PIL image, refusing anything unsafe.

Owns: the encodings a field may use, the byte, pixel and format limits, decoding (the file's
structure checked by ``inputs/structure`` and its size from the header before any pixel is
decoded) and mode and orientation normalisation. URLs are fetched by ``inputs/fetch``; its
``FetchError`` gains the field's name here. Every refusal is an ``InputError`` whose message
starts with the field. Decoding runs in the calling thread unless a ``decoder`` is given: the
worker passes one that decodes in a separate process within a CPU-time budget (``inputs/pool``).

One value may be (what Cloudflare Workers AI, Replicate and RunPod clients send):
- base64, raw or as a ``data:<type>;base64,`` URI; whitespace, missing padding and the URL-safe
  alphabet are tolerated. The declared MIME type is ignored: the file header decides.
- an ``https://`` URL (``http://`` only with ``allow_http``), fetched by ``inputs/fetch``.
- a JSON array of byte values 0-255 of an image file (Cloudflare's ``image: [137, 80, ...]``).

Limits (``InputLimits``; defaults): 20 MiB a file (RunPod's /runsync payload cap is 20 MB, so
nothing larger arrives inline); 16.8 MP (4096²) and 8192 px a side (outputs are at most 1536²);
formats PNG, JPEG and WEBP (GIF is palette-only and animated, BMP and TIFF are rare from API
clients and widen the decoder surface; ``formats`` can add them); for URLs 10 s for the whole
download, redirects included, at most 3 redirects, https only, public addresses only; the
structure limits of ``inputs/structure.WorkLimits`` (JPEG scans and segments, PNG and WebP
chunks, GIF blocks).

Results: ``load_image`` gives RGB with transparency composited on white (what a viewer shows;
dropping alpha would expose whatever colour transparent pixels happen to store) and EXIF
orientation applied. ``load_mask`` gives "L" at the init image's size: white = repaint, black =
keep, transparent = keep (masks painted as strokes on a transparent canvas work). Logs never
carry image data.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.errors import MIB, InputError, brief_reason, shown, size_text
from worker.formats import sniff
from worker.inputs.fetch import (
    FetchError,
    FetchLimits,
    Opener,
    Resolver,
    fetch,
    system_resolver,
    tcp_connect,
)
from worker.inputs.structure import WORK_LIMITS, WorkLimits, refusal

log = logging.getLogger(__name__)

EXPECTED = "base64 image data, a data: URI, an https URL or an array of byte values 0-255"
# Pillow's DecompressionBombWarning is silenced process-wide by worker/runtime.py: decode()
# checks the pixel count itself, and DecompressionBombError is still caught there.


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int = 20 * MIB
    max_pixels: int = 4096 * 4096
    max_side: int = 8192
    formats: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP"})
    url_timeout_s: float = 10.0  # the whole fetch, redirects included, not per read
    allow_http: bool = False
    allow_private: bool = False
    max_redirects: int = 3
    work: WorkLimits = WORK_LIMITS  # the structure a file may have (inputs/structure)

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_side) < 1 or self.url_timeout_s <= 0 \
                or self.max_redirects < 0 or not self.formats:
            raise ValueError(f"invalid {self}")
        object.__setattr__(self, "formats", frozenset(f.upper() for f in self.formats))

    @property
    def fetch_limits(self) -> FetchLimits:
        """The part of these limits that governs downloading a URL."""
        return FetchLimits(self.max_bytes, self.url_timeout_s, self.max_redirects,
                           self.allow_http, self.allow_private,
                           tuple(f"image/{fmt.lower()}" for fmt in sorted(self.formats)))


DEFAULT_LIMITS = InputLimits()


def decode_flat(data: bytes, field: str, limits: InputLimits, mode: str,
                background: int) -> Image.Image:
    """``data`` decoded (``decode``) and flattened to ``mode`` ("RGB" or "L") on grey
    ``background``, or "LA" with its transparency kept (grey and alpha): the whole CPU-heavy
    part of loading a field, what a ``Decoder`` does."""
    image = decode(data, field, limits)
    if mode == "LA":
        return image.convert("RGBA").convert("LA")  # via RGBA: palette transparency too
    return _flatten(image, mode, background)


# (data, field, limits, mode, background) -> image: ``decode_flat`` here, or in another process.
Decoder = Callable[[bytes, str, InputLimits, str, int], Image.Image]


def load_image(value: Any, field: str, limits: InputLimits = DEFAULT_LIMITS, *,
               resolver: Resolver = system_resolver, opener: Opener = tcp_connect,
               ssl_context: ssl.SSLContext | None = None,
               decoder: Decoder = decode_flat) -> Image.Image:
    """``value`` as an RGB image; raises ``InputError`` naming ``field``."""
    data = read_bytes(value, field, limits, resolver=resolver, opener=opener,
                      ssl_context=ssl_context)
    return decoder(data, field, limits, "RGB", 255)


def load_mask(value: Any, field: str, size: tuple[int, int],
              limits: InputLimits = DEFAULT_LIMITS, *, resolver: Resolver = system_resolver,
              opener: Opener = tcp_connect, ssl_context: ssl.SSLContext | None = None,
              decoder: Decoder = decode_flat, repaint: str = "white") -> Image.Image:
    """``value`` as an "L" mask of ``size`` (width, height): white = repaint, black = keep.

    ``repaint`` says which pixels of the caller's file repaint: ``white`` (ours, A1111's),
    ``black`` (A1111's ``inpainting_mask_invert``) or ``transparent`` (alpha 0: OpenAI's edits).
    Stretched to ``size`` with bilinear resampling: no ringing, edges stay where they were; grey
    values are kept (the inpainting pipeline binarises at 50 %).
    """
    if len(size) != 2 or not all(type(side) is int and side > 0 for side in size):
        raise ValueError(f"size must be (width, height) in pixels, got {size!r}")
    if repaint not in ("white", "black", "transparent"):
        raise ValueError(f"repaint must be white, black or transparent, got {repaint!r}")
    data = read_bytes(value, field, limits, resolver=resolver, opener=opener,
                      ssl_context=ssl_context)
    if repaint == "transparent":
        alpha = decoder(data, field, limits, "LA", 0).getchannel("A")
        if alpha.getextrema()[0] > 0:
            raise _error(field, "mask_mode transparent repaints fully transparent pixels, and "
                                "this mask has none (no alpha channel, or none at 0)")
        mask = alpha.point(lambda a: 255 if a == 0 else 0)
    else:
        # Transparent pixels are "keep" either way: on black before white repaints, on white
        # before the inversion that makes black repaint.
        mask = decoder(data, field, limits, "L", 255 if repaint == "black" else 0)
        if repaint == "black":
            mask = ImageOps.invert(mask)
    return mask if mask.size == tuple(size) else mask.resize(size, Image.Resampling.BILINEAR)


# --- encodings -----------------------------------------------------------------------------

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # base64 never contains ':'
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/_-]")
_URLSAFE = str.maketrans("-_", "+/")


def read_bytes(value: Any, field: str, limits: InputLimits = DEFAULT_LIMITS, *,
               resolver: Resolver = system_resolver, opener: Opener = tcp_connect,
               ssl_context: ssl.SSLContext | None = None) -> bytes:
    """The encoded file carried by ``value``, within ``limits.max_bytes``."""
    if isinstance(value, str):
        text = value.strip()
        scheme = _SCHEME.match(text[:40])
        if scheme is None:
            return _from_base64(text, field, limits)
        if scheme.group(1).lower() == "data":
            head, comma, body = text.partition(",")
            if not comma or not head.lower().endswith(";base64"):
                raise _error(field, "a data URI must be base64: data:image/png;base64,...")
            return _from_base64(body, field, limits)
        try:
            return fetch(text, limits.fetch_limits, label=field, resolver=resolver,
                         opener=opener, ssl_context=ssl_context)
        except FetchError as exc:
            raise _error(field, str(exc)) from None
    if isinstance(value, list):
        return _from_byte_array(value, field, limits)
    if isinstance(value, bytes | bytearray):  # Python callers only; JSON has no bytes
        _check_size(len(value), field, limits)
        return bytes(value)
    raise _error(field, f"expected {EXPECTED}, got {_json_type(value)}")


def _from_base64(text: str, field: str, limits: InputLimits) -> bytes:
    compact = "".join(text.split()).rstrip("=")  # padding is optional: added back below
    if not compact:
        raise _error(field, f"is empty; expected {EXPECTED}")
    if bad := _NOT_BASE64.search(compact):
        raise _error(field, f"not valid base64 (unexpected {shown(bad.group())} at character "
                            f"{bad.start() + 1}); expected {EXPECTED}")
    if len(compact) % 4 == 1:
        raise _error(field, f"not valid base64 ({len(compact)} characters: cut short?)")
    _check_size(len(compact) * 3 // 4, field, limits)
    try:
        return base64.b64decode(compact.translate(_URLSAFE) + "=" * (-len(compact) % 4))
    except binascii.Error as exc:
        raise _error(field, f"not valid base64 ({exc})") from None


def _from_byte_array(items: list[Any], field: str, limits: InputLimits) -> bytes:
    if not items:
        raise _error(field, f"is an empty array; expected {EXPECTED}")
    _check_size(len(items), field, limits)
    if all(type(item) is int for item in items):  # not bool, not float: JSON 1.0 is no byte
        with contextlib.suppress(ValueError):
            return bytes(items)
    for index, item in enumerate(items):
        if type(item) is not int or not 0 <= item <= 255:
            raise _error(field, f"byte array element {index} is {shown(item)}; expected "
                                f"integers 0-255")
    raise AssertionError("unreachable")


# --- decoding ------------------------------------------------------------------------------

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def decode(data: bytes, field: str, limits: InputLimits = DEFAULT_LIMITS) -> Image.Image:
    """Open ``data`` (accepted formats only), check its structure and its size from the header,
    then decode it."""
    pixel_limit = min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)
    sniffed = sniff(data)  # before Image.open: Pillow parses headers in Python, byte by byte
    if sniffed in limits.formats and (reason := refusal(data, sniffed, limits.work)):
        raise _error(field, reason)
    try:
        image = Image.open(io.BytesIO(data), formats=sorted(limits.formats))  # header only
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "the image"
        raise _error(field, f"{size} is over the {pixel_limit / 1e6:.1f} MP limit") from None
    except UnidentifiedImageError:
        raise _error(field, _unidentified(data, limits)) from None
    except Exception as exc:  # noqa: BLE001 - a hostile header can raise nearly anything
        raise _error(field, f"not a decodable image ({brief_reason(exc)})") from None
    width, height = image.size
    if width * height > pixel_limit:
        raise _error(field, f"{width}x{height} pixels is over the {pixel_limit / 1e6:.1f} MP "
                            f"limit")
    if max(width, height) > limits.max_side:
        raise _error(field, f"{width}x{height} pixels: a side is over the {limits.max_side}-"
                            f"pixel limit")
    fmt = "JPEG" if image.format == "MPO" else image.format  # MPO: a camera's multi-image JPEG
    try:
        image.load()  # ImageFile.LOAD_TRUNCATED_IMAGES stays False: a cut file is an error
    except Exception as exc:  # noqa: BLE001 - as above
        raise _error(field, f"not a decodable image ({fmt}: {brief_reason(exc)})") from None
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - unreadable EXIF: keep the pixels as stored
        log.info("%s: unreadable EXIF orientation ignored", field)
    return image


def _unidentified(data: bytes, limits: InputLimits) -> str:
    accepted = ", ".join(sorted(limits.formats))
    found = sniff(data)
    if found and found not in limits.formats:
        return f"format {found} is not accepted ({accepted})"
    if found:
        return f"not a decodable image (broken {found} header)"
    *others, last = sorted(limits.formats)
    return f"not a decodable image (not a {', '.join(others) + ' or ' * bool(others) + last} file)"


def _flatten(image: Image.Image, mode: str, background: int) -> Image.Image:
    """``image`` in ``mode`` ("RGB" or "L"), transparency composited on grey ``background``."""
    if image.mode.startswith("I"):  # 16-bit greyscale PNG: convert() would clip, not scale
        scaled = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(scaled.round().clip(0, 255).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        flat = Image.new("RGBA", image.size, (background, background, background, 255))
        flat.alpha_composite(image.convert("RGBA"))
        image = flat
    return image if image.mode == mode else image.convert(mode)


# --- messages ------------------------------------------------------------------------------

def _error(field: str, message: str) -> InputError:
    return InputError(f"{field}: {message}")


def _check_size(size: int, field: str, limits: InputLimits) -> None:
    if size > limits.max_bytes:
        got, limit = size_text(size), size_text(limits.max_bytes)
        if got == limit:  # 20 MiB + 1 byte
            got, limit = f"{size} bytes", f"{limits.max_bytes} bytes"
        raise _error(field, f"the file is {got}; the limit is {limit}")


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
