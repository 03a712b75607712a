"""Which image format a file is, from its first bytes: the one signature table of the worker.

Used on the way in (``inputs/images``: name the format of a file Pillow refused) and on the way
out (``outputs/encoding``: label a data URI with the MIME type its bytes really have). Names are
Pillow's format names. Pure: no imports.
"""

from __future__ import annotations

_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"),
               (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"), (b"8BPS", "PSD"), (b"%PDF", "PDF"),
               (b"\0\0\1\0", "ICO"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"))


def sniff(data: bytes) -> str | None:
    """The format whose signature ``data`` starts with ("PNG", "JPEG", "WEBP", ...), or None."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and head[6:10] == b"\0\0\0\0":  # the reserved bytes are zero
        return "BMP"
    if head[4:8] == b"ftyp":  # ISO base media: HEIC, AVIF
        return "HEIF/AVIF"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)
