"""Encodes generated images for the response: bytes in a format, and base64 data URIs.

Encoding sits on the hot path (a 1024² PNG at Pillow's default level costs ~150-200 ms on these
CPUs, as long as the GPU takes for the whole image), so the settings here are chosen by
measurement; see ``bench/`` once it exists.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

MIME_TYPES = {"png": "image/png"}
# zlib level 1 halves Pillow's default PNG time for 10-20 % more bytes (measured at 1024²).
PNG_COMPRESS_LEVEL = 1


def encode(image: Image.Image, fmt: str = "png") -> bytes:
    """The image as a file in ``fmt``."""
    if fmt not in MIME_TYPES:
        raise ValueError(f"unsupported output format {fmt!r}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def data_uri(data: bytes, fmt: str = "png") -> str:
    """A ``data:`` URI whose MIME type matches the bytes."""
    return f"data:{MIME_TYPES[fmt]};base64,{base64.b64encode(data).decode('ascii')}"
