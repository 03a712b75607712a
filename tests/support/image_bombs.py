"""Image files that are small in bytes and pixels but cost far more work to decode.

Built in memory from files Pillow writes, so each is a real, decodable file of its format: with
a count under ``inputs/structure``'s limit it decodes to the same pixels as the file it was made
from (the tests check this, so a refusal is for the count alone). Used by the unit tests and by
``bench/decode.py``, which measures what each costs a decoder when nothing refuses it.
"""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
from PIL import Image

_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan of a JPEG written by Pillow: its SOS segment and coded data."""
    scans, pos = [], 2
    while data[pos + 1] != 0xD9:  # Pillow writes no padding: markers follow each other
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if data[pos + 1] == 0xDA:
            end = _SCAN_END.search(data, end).start()
            scans.append((pos, end))
        pos = end
    return scans


def repeated_scans(width: int, height: int, repeats: int, *, grey: int = 128) -> bytes:
    """A progressive JPEG (libjpeg's 10-scan script) whose last scan, a refinement of 0 bits over
    every block of one component, is there ``repeats`` more times: ~12 bytes a copy, and each
    copy makes the decoder walk the whole image again."""
    data = encode(Image.new("RGB", (width, height), (grey,) * 3), "JPEG", progressive=True,
                  quality=90)
    start, end = jpeg_scans(data)[-1]
    return data[:end] + data[start:end] * repeats + data[end:]


def jpeg_segments(base: bytes, count: int) -> bytes:
    """``base`` with ``count`` empty comment (COM) segments after its SOI marker."""
    return base[:2] + b"\xff\xfe\x00\x02" * count + base[2:]


def jpeg_padding(base: bytes, count: int) -> bytes:
    """``base`` with ``count`` 0xFF fill bytes before its first header segment."""
    return base[:2] + b"\xff" * count + base[2:]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


def png_chunks(base: bytes, count: int) -> bytes:
    """``base`` (a PNG) with ``count`` empty private ancillary chunks after IHDR, which a
    decoder must read and skip one by one."""
    after_ihdr = 8 + 12 + 13
    return base[:after_ihdr] + png_chunk(b"prVt", b"") * count + base[after_ihdr:]


def png_split_idat(base: bytes, size: int) -> bytes:
    """``base`` (a PNG) with its pixel data (all its IDAT chunks, which follow each other)
    split into IDAT chunks of ``size`` bytes."""
    first = pos = base.index(b"IDAT") - 4
    data = []
    while base[pos + 4:pos + 8] == b"IDAT":
        length = int.from_bytes(base[pos:pos + 4], "big")
        data.append(base[pos + 8:pos + 8 + length])
        pos += 12 + length
    joined = b"".join(data)
    idats = b"".join(png_chunk(b"IDAT", joined[i:i + size]) for i in range(0, len(joined), size))
    return base[:first] + idats + base[pos:]


def webp_frames(count: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """An animated lossless WebP of ``count`` frames (alternating red and green)."""
    frames = [Image.new("RGB", size, colour) for colour in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True,
                  duration=40)
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        chunks.append(data[pos:pos + 8 + length + (length & 1)])
        pos += 8 + length + (length & 1)
    kinds = [chunk[:4] for chunk in chunks]
    assert kinds == [b"VP8X", b"ANIM", b"ANMF", b"ANMF"], kinds
    frames_data = b"".join(chunks[2 + i % 2] for i in range(count))
    body = b"WEBP" + chunks[0] + chunks[1] + frames_data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def gif_blocks(base: bytes, count: int) -> bytes:
    """``base`` (a GIF) with a comment extension of ``count`` one-byte sub-blocks before its
    first image: ``count + 1`` blocks with the terminator."""
    flags = base[10]
    start = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return base[:start] + b"\x21\xfe" + b"\x01x" * count + b"\x00" + base[start:]
