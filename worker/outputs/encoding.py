"""Encodes generated images for the response: PNG, JPEG or WebP bytes, and base64 data URIs.

``encode(image, fmt, quality)`` takes a PIL image or a uint8 HxWx3 numpy array and always writes
8-bit RGB. ``data_uri(data)`` names the MIME type that the bytes' signature shows.

The encoders were chosen by measurement (``bench/encode.py``; the figures are in
``bench/RESULTS.md``, "Encoding"), against Pillow's default PNG on a 1024² generated-looking image:

- PNG: **fpng** (a 0.1 MB wheel), lossless, far under the goal of 1/10 of Pillow's default time;
  files are a little larger. imagecodecs' and OpenCV's fast PNG levels and Pillow's level 0/1
  missed the goal; fpng-py/fpng-py-fix wrap the same code but ship no wheels.
- JPEG: Pillow (libjpeg-turbo), 4:2:0 chroma (its default); simplejpeg was no faster from a PIL
  image (the pipeline's output): not adopted. 4:4:4 costs more time and bytes for little PSNR.
- WebP: Pillow with ``method=0`` (``WEBP_METHOD``): several times faster than libwebp's default
  method 4 at the same PSNR and size on generated images.

fpng has sharp edges, handled here: it writes corrupt files for sides of 65536 px or more and
returns empty bytes instead of raising on failure, and it silently casts any dtype to uint8. So
inputs are checked first (sides up to ``MAX_ENCODABLE_SIDE``, the WebP limit), and empty output
raises. It also holds the GIL, so PNG encodes do not overlap in threads; at a few ms each that
costs little.
"""

from __future__ import annotations

import io
import numbers
from typing import Any

import fpng
import numpy as np
import pybase64  # SIMD base64: several times faster than the stdlib's on a 1024² PNG (bench)
from PIL import Image

from schemas import OUTPUT_FORMATS
from worker.formats import sniff

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}

# libwebp's method 0-6 trades time for size; 0 was the fastest at quality 90 with the same PSNR
# and no bigger files on generated images (bench/RESULTS.md).
WEBP_METHOD = 0
# WebP's largest side; fpng writes corrupt PNGs from 65536 px. The worker serves 512-1536 px.
MAX_ENCODABLE_SIDE = 16383
# 8-bit PIL modes that convert to RGB without losing range (alpha is dropped).
_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                      "LAB", "HSV"}


def encode(image: Image.Image | np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """``image`` as a ``fmt`` file; ``quality`` (1-100) is checked always, used by jpeg/webp."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}: use one of "
                         f"{', '.join(OUTPUT_FORMATS)}")
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) \
            or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer from 1 to 100, got {quality!r}")
    if fmt == "png":
        data = fpng.from_ndarray(_rgb_array(image))
        if sniff(data) != "PNG":
            raise RuntimeError("fpng returned no PNG data")
        return data
    buffer = io.BytesIO()
    pil = Image.fromarray(_rgb_array(image)) if isinstance(image, np.ndarray) \
        else _rgb_image(image)
    if fmt == "jpeg":
        pil.save(buffer, format="JPEG", quality=int(quality))
    else:
        pil.save(buffer, format="WEBP", quality=int(quality), method=WEBP_METHOD)
    return buffer.getvalue()


def data_uri(data: bytes, fmt: str | None = None) -> str:
    """A ``data:`` URI whose MIME type is the one the bytes' signature shows.

    ``fmt``, when given, must agree with the bytes: a mismatch (JPEG bytes labelled PNG) raises.
    """
    found = (sniff(data) or "").lower()
    if found not in MIME_TYPES:
        raise ValueError(f"not PNG, JPEG or WebP data (starts with {bytes(data[:12])!r})")
    if fmt is not None and fmt != found:
        raise ValueError(f"data is {found}, not {fmt!r}")
    return f"data:{MIME_TYPES[found]};base64,{pybase64.b64encode(data).decode('ascii')}"


def base64_payload(uri: str) -> str:
    """The base64 of a ``data_uri`` (APIs that carry raw base64: OpenAI's ``b64_json``,
    A1111's ``images``); anything else (a bucket URL) as it is."""
    return uri.split(",", 1)[1] if uri.startswith("data:") else uri


def _rgb_image(image: Image.Image) -> Image.Image:
    """``image`` in mode RGB, after checking its size."""
    _check_size(image.width, image.height)
    if image.mode == "RGB":
        return image
    if image.mode not in _CONVERTIBLE_MODES:
        raise ValueError(f"cannot encode a PIL image in mode {image.mode!r}: convert it to RGB "
                         f"first (8-bit modes such as RGBA, L and P are converted here)")
    return image.convert("RGB")


def _rgb_array(image: Any) -> np.ndarray:
    """``image`` as a C-contiguous uint8 HxWx3 array (a copy only where one is needed)."""
    if isinstance(image, Image.Image):
        return np.asarray(_rgb_image(image))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array, got dtype {image.dtype}: scale floats in [0, 1] "
                         f"with (x * 255).round().astype(np.uint8)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB array of shape (height, width, 3), got {image.shape}")
    _check_size(image.shape[1], image.shape[0])
    return np.ascontiguousarray(image)


def _check_size(width: int, height: int) -> None:
    if not (1 <= width <= MAX_ENCODABLE_SIDE and 1 <= height <= MAX_ENCODABLE_SIDE):
        raise ValueError(f"cannot encode a {width}x{height} image: each side must be 1 to "
                         f"{MAX_ENCODABLE_SIDE} px")
