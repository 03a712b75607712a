"""A decoder process for the pool tests: ``python -m tests.support.spin_decoder``.

The pool's own child loop (``worker.inputs.pool.serve``) with a decoder that burns CPU until its
budget ends it for a file starting ``SPIN``, and ends its own process by SIGSEGV for one starting
``CRASH`` (a decoder bug); any other file is decoded as the worker does.
"""

from __future__ import annotations

import os
import signal

from PIL import Image

from worker.inputs.images import InputLimits, decode_flat
from worker.inputs.pool import serve

SPIN, CRASH = b"SPIN", b"CRASH"


def decode(data: bytes, field: str, limits: InputLimits, mode: str,
           background: int) -> Image.Image:
    if data.startswith(SPIN):
        while True:  # only the CPU-time budget or a kill ends this
            pass
    if data.startswith(CRASH):
        os.kill(os.getpid(), signal.SIGSEGV)
    return decode_flat(data, field, limits, mode, background)


if __name__ == "__main__":
    serve(decode)
