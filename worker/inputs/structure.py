"""Refuses image files whose structure would cost far more work than their pixels, before decoding.

Bytes and pixels do not bound a decode's work. A progressive JPEG decodes every scan over the
whole image, and a scan can be a dozen bytes: 10,000 copies of one scan (122 KB) make a 4096²
file that costs minutes. Pillow reads JPEG headers, PNG chunks and GIF extension blocks in
Python, one marker, chunk or padding byte at a time, so a file made of millions of them costs
seconds before the first pixel. So the structure is counted first, with limits far above what
encoders write (``WorkLimits``, each default tied to them below), and a file over one is refused
with a message naming what was counted and the limit. Whatever slips past is bounded by the
decode processes' CPU-time limit (``inputs/pool``).

Each walk does at most one Python step per counted item (so at most its limit of steps) and
skips data with C-speed searches. A broken structure (a length past the end, a bad marker) is
not judged here: the walk stops and the decoder reports the file as it always did. Pure: no
imports beyond the standard library.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# A marker: 0xFF and a code that is neither stuffing (0x00) nor fill (0xFF).
_MARKER = re.compile(rb"\xff[^\x00\xff]")
# The marker that ends a scan's entropy-coded data, where RST0-7 restart markers also sit.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI: markers without a length field
_SOS, _EOI = 0xDA, 0xD9
_PNG_CHUNK = struct.Struct(">I4s")  # length, type
_RIFF_CHUNK = struct.Struct("<4sI")  # type, length


@dataclass(frozen=True)
class WorkLimits:
    """How much structure a file may have; the defaults are far above what encoders write."""

    # libjpeg's progressive script writes 10 scans for colour, 6 for greyscale, 18 for CMYK
    # (jcparam.c, 2 + 4 per component); mozjpeg writes 9-11 for colour; baseline writes 1.
    jpeg_scans: int = 64
    # Marker segments: ~10-30 in a header (APPn, DQT, SOF, a DHT per scan, SOS); metadata split
    # into 64 KiB APPn segments (ICC numbers at most 255, extended XMP) adds ~320 in 20 MiB.
    jpeg_segments: int = 1024
    # Bytes between header segments (0xFF fill, junk): encoders write none. Pillow reads each
    # in Python (0.18 s a MiB measured: bench/RESULTS.md, "Decode work").
    jpeg_header_padding: int = 1024
    # libpng splits pixel data into 8 KiB IDAT chunks (2560 in a 20 MiB file), Pillow into 64 KiB;
    # one per row of an 8192-row image is 8192; APNG adds two per frame.
    png_chunks: int = 16384
    # A still WebP has at most 7 chunks (VP8X, ICCP, ANIM, ALPH, VP8/VP8L, EXIF, XMP); an
    # animation one ANMF per frame (16384 frames is 9 minutes at 30 fps; frame 0 is decoded).
    webp_chunks: int = 16384
    # Blocks before a GIF's first image (extensions and their sub-blocks): encoders write 1-4
    # extensions of 1-2 sub-blocks; raw XMP parses as ~1 sub-block per 80 bytes.
    gif_blocks: int = 4096

    def __post_init__(self) -> None:
        if min(self.jpeg_scans, self.jpeg_segments, self.jpeg_header_padding, self.png_chunks,
               self.webp_chunks, self.gif_blocks) < 1:
            raise ValueError(f"invalid {self}")


WORK_LIMITS = WorkLimits()


def refusal(data: bytes, fmt: str, limits: WorkLimits = WORK_LIMITS) -> str | None:
    """Why ``data``, a file of format ``fmt`` (``formats.sniff``), is refused, or None."""
    walk = {"JPEG": _jpeg, "PNG": _png, "WEBP": _webp, "GIF": _gif}.get(fmt)
    return walk(data, limits) if walk else None


def _over(fmt: str, what: str, limit: int, usual: str) -> str:
    return f"{fmt} with more than {limit} {what}: refused before decoding (the limit is " \
           f"{limit}; {usual})"


def _jpeg(data: bytes, limits: WorkLimits) -> str | None:
    pos, segments, scans, padding, in_scan = 2, 0, 0, 0, False  # after SOI
    while True:
        if scans == 0:  # the header, which Pillow reads in Python: look no further than allowed
            window = pos + limits.jpeg_header_padding - padding + 2
            found = _MARKER.search(data, pos, window)
            if found is None:
                if window >= len(data):
                    return None  # cut short: the decoder reports it
                return _over("JPEG", "bytes of padding between header segments",
                             limits.jpeg_header_padding, "encoders write none")
            padding += found.start() - pos
        else:
            found = (_SCAN_END if in_scan else _MARKER).search(data, pos)
            if found is None:
                return None  # cut short: the decoder reports it
        code, pos = data[found.start() + 1], found.end()
        if code == _EOI:
            return None  # the image ends; what follows (an MPO's next image) is not decoded
        segments += 1
        if segments > limits.jpeg_segments:
            return _over("JPEG", "marker segments", limits.jpeg_segments,
                         "encoders write under 400")
        in_scan = False
        if code in _NO_LENGTH:
            continue
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return None  # broken: the decoder reports it
        pos += length
        if code == _SOS:
            scans += 1
            if scans > limits.jpeg_scans:
                return _over("JPEG", "scans", limits.jpeg_scans, "encoders write at most 18")
            in_scan = True


def _png(data: bytes, limits: WorkLimits) -> str | None:
    pos, chunks, end = 8, 0, len(data) - 8  # after the signature
    while pos <= end:
        chunks += 1
        if chunks > limits.png_chunks:
            return _over("PNG", "chunks", limits.png_chunks,
                         "encoders write one per 8 KiB of pixel data or fewer")
        length, kind = _PNG_CHUNK.unpack_from(data, pos)
        if kind == b"IEND":
            return None
        pos += 12 + length  # length, type, data, CRC
    return None


def _webp(data: bytes, limits: WorkLimits) -> str | None:
    pos, chunks, end = 12, 0, len(data) - 8  # after RIFF, the size and WEBP
    while pos <= end:
        chunks += 1
        if chunks > limits.webp_chunks:
            return _over("WEBP", "chunks (frames and metadata)", limits.webp_chunks,
                         "a still image has at most 7")
        size = _RIFF_CHUNK.unpack_from(data, pos)[1]
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    return None


def _gif(data: bytes, limits: WorkLimits) -> str | None:
    if len(data) < 13:
        return None
    flags, blocks = data[10], 0
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global palette
    while pos + 1 < len(data) and data[pos] == 0x21:  # extensions up to the first image
        pos += 2  # introducer, label
        while pos < len(data):
            blocks += 1
            if blocks > limits.gif_blocks:
                return _over("GIF", "blocks before its first image", limits.gif_blocks,
                             "encoders write under 10")
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
    return None  # the first image (decoded in C), the trailer, or a broken file
