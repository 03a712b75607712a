"""Decodes a job's images in separate processes, within a CPU-time budget for the whole job.

Why processes: a Python thread cannot be stopped. A decode that runs long (a file built to cost
CPU that ``inputs/structure`` let through, a decoder bug) would keep running after its job was
cancelled or timed out, holding a thread and a core while other jobs wait. A process can be
killed.

- Children are fresh interpreters, ``python -m worker.inputs.pool``, that import Pillow, numpy and
  ``inputs/images`` only. Not forks of the worker (its torch and CUDA state must not be copied),
  and not multiprocessing's spawn or forkserver: they import the parent's ``__main__`` in every
  child, and the worker's is ``handler.py``, which starts a whole worker at import.
- The budget: ``cpu_s`` CPU seconds for all of a job's images (``CPU_S_PER_JOB``). Before each
  decode the child arms ITIMER_PROF with what is left; past it the kernel sends SIGPROF, whose
  default action ends the process, even inside a C decoder holding the GIL. The job gets an
  ``InputError`` naming the field and the limit; the dead child is dropped and a fresh one starts
  when one is next needed.
- Cancellation: ``JobDecoder.cancel()`` (``prepare.prepare_async`` calls it when its task is
  cancelled) kills the child decoding for that job: no decode outlives its job.
- No job waits for another's decode: a decode takes an idle child or starts one, and up to
  ``keep_idle`` stay warm afterwards. Children are bounded by the threads that wait on them
  (``max_threads``: one per job in flight).
- The wire: a length-prefixed JSON header and raw bytes, each way. A child reads hostile files,
  so the parent checks what it sends back and never unpickles it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from worker import runtime
from worker.errors import InputError, JobError
from worker.inputs.images import Decoder, InputLimits, decode_flat
from worker.inputs.structure import WorkLimits

log = logging.getLogger(__name__)

# CPU seconds for all of a job's images (init image and mask). The largest accepted image,
# 4096², decodes in 0.13-0.7 s here (JPEG baseline to progressive 4:4:4; PNG 0.24 s, WebP 0.4-0.5
# s: bench/RESULTS.md, "Decode work"): 10 s leaves 7x for both images on a slower CPU.
CPU_S_PER_JOB = 10.0
KEEP_IDLE = 2  # settings.DEFAULT_CONCURRENCY jobs, each decoding one image at a time
MAX_THREADS = 64  # the MAX_CONCURRENCY ceiling (worker/settings.py): a thread per job in flight
CHILD_MODULE = "worker.inputs.pool"
ROOT = Path(__file__).resolve().parents[2]  # where a child imports ``worker`` from
_FRAME = struct.Struct(">IQ")  # header length, payload length
_MAX_HEADER = 64 * 1024  # a header is a few hundred bytes; an error message at most ~1 KB
_MAX_REQUEST = 1 << 31  # a child's sanity bound; the parent sends at most InputLimits.max_bytes
_CHANNELS = {"RGB": 3, "L": 1, "LA": 2}  # LA: a mask whose alpha marks the repaint area
# Child threads for libraries that start them at import; a child decodes on one core.
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class DecodePool:
    """Child processes that decode images, and the threads that prepare jobs and wait on them."""

    def __init__(self, cpu_s: float = CPU_S_PER_JOB, *, keep_idle: int = KEEP_IDLE,
                 max_threads: int = MAX_THREADS, command: Sequence[str] | None = None) -> None:
        if cpu_s <= 0 or keep_idle < 0 or max_threads < 1:
            raise ValueError(f"invalid pool: cpu_s={cpu_s}, keep_idle={keep_idle}, "
                             f"max_threads={max_threads}")
        self.cpu_s = cpu_s
        self.threads = ThreadPoolExecutor(max_threads, thread_name_prefix="prepare")
        self._command = list(command or [sys.executable, "-m", CHILD_MODULE])
        self._keep_idle = keep_idle
        self._idle: list[_Child] = []
        self._busy: set[_Child] = set()
        self._lock = threading.Lock()
        self._closed = False

    def job(self) -> JobDecoder:
        """A decoder for one job's images, with a fresh CPU-time budget."""
        return JobDecoder(self, self.cpu_s)

    @property
    def busy(self) -> list[int]:
        """The process ids of the children decoding now."""
        with self._lock:
            return sorted(child.process.pid for child in self._busy)

    def close(self) -> None:
        """Stop the idle children and the threads (those at work finish first)."""
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for child in idle:
            child.close()
        self.threads.shutdown(wait=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _take(self) -> _Child:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.process.poll() is None:
                    self._busy.add(child)
                    return child
        child = _Child(self._command)  # outside the lock: a start takes ~0.1 s
        with self._lock:
            self._busy.add(child)
        return child

    def _give_back(self, child: _Child) -> None:
        """Keep ``child`` for the next decode, or end it: killed, ended or not needed."""
        keep = child.usable and child.process.poll() is None
        with self._lock:
            if keep and not self._closed and len(self._idle) < self._keep_idle:
                self._busy.discard(child)
                self._idle.append(child)
                return
        child.close()
        with self._lock:
            self._busy.discard(child)


class JobDecoder:
    """One job's ``images.Decoder``: each call decodes in a child, within what is left of the
    job's CPU-time budget; ``cancel()`` kills the decode in progress and refuses later ones."""

    def __init__(self, pool: DecodePool, cpu_s: float) -> None:
        self.cpu_s = self.cpu_left = cpu_s
        self._pool = pool
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._cancelled = False

    def __call__(self, data: bytes, field: str, limits: InputLimits, mode: str,
                 background: int) -> Image.Image:
        if mode not in _CHANNELS:
            raise ValueError(f"mode must be one of {sorted(_CHANNELS)}, got {mode!r}")
        if self.cpu_left <= 0:
            raise self._over_budget(field)
        child = self._pool._take()
        with self._lock:
            cancelled = self._cancelled
            if not cancelled:
                self._child = child  # from here, cancel() kills it
        if cancelled:
            self._pool._give_back(child)
            raise JobError(f"{field}: the job was cancelled")
        request = {"field": field, "mode": mode, "background": background,
                   "formats": sorted(limits.formats), "max_pixels": limits.max_pixels,
                   "max_side": limits.max_side, "work": asdict(limits.work),
                   "cpu_s": self.cpu_left}
        try:
            reply = child.exchange(request, data, limits.max_pixels * _CHANNELS[mode])
        finally:
            with self._lock:
                self._child = None
            self._pool._give_back(child)
        if reply is None:
            raise self._ended(child, field)
        header, payload = reply
        cpu = header.get("cpu_s")
        self.cpu_left -= cpu if isinstance(cpu, float | int) and cpu > 0 else 0
        return _image(header, payload, field, mode, limits)

    def cancel(self) -> None:
        """Kill the decode in progress, if any, and refuse any later one."""
        with self._lock:
            self._cancelled = True
            if self._child is not None:
                self._child.kill()

    def _over_budget(self, field: str) -> InputError:
        return InputError(f"{field}: decoding was stopped at the CPU-time limit ({self.cpu_s:g} s "
                          f"for a job's images): the file costs far more work than its size")

    def _ended(self, child: _Child, field: str) -> Exception:
        code = child.process.wait()
        if self._cancelled:
            return JobError(f"{field}: the job was cancelled")
        if code == -signal.SIGPROF:  # the kernel ended it at the budget (see the docstring)
            self.cpu_left = 0
            return self._over_budget(field)
        how = (f"signal {signal.Signals(-code).name}" if code < 0 and -code in
               signal.valid_signals() else f"exit status {code}")
        log.warning("an image decoder process ended (%s) while decoding %s", how, field)
        return JobError(f"{field}: the image decoder stopped ({how}); the image was not decoded")


def _image(header: dict[str, Any], payload: bytearray, field: str, mode: str,
           limits: InputLimits) -> Image.Image:
    """The image a child sent back, after checking that it is what was asked for."""
    if isinstance(header.get("error"), str):
        message = header["error"]
        if not message.startswith(f"{field}: ") or len(message) > 2000:
            raise RuntimeError("the image decoder process sent a malformed error")
        raise InputError(message)
    if "bug" in header:
        raise RuntimeError(f"the image decoder process failed: {str(header['bug'])[:100]}")
    width, height = header.get("width"), header.get("height")
    if header.get("mode") != mode or type(width) is not int or type(height) is not int \
            or not 0 < width * height <= limits.max_pixels or width <= 0 \
            or len(payload) != width * height * _CHANNELS[mode]:
        raise RuntimeError("the image decoder process sent a malformed image")
    return Image.frombytes(mode, (width, height), payload)


class _Child:
    """One decoder process and its pipes."""

    def __init__(self, command: list[str]) -> None:
        env = {**os.environ, **_CHILD_ENV,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        # A session of its own: a Ctrl-C meant for the worker is not a decode error; it exits
        # when the worker closes its input or ends.
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        cwd=ROOT, env=env, start_new_session=True)
        self.usable = True  # False once killed or ended: never handed a request again

    def exchange(self, header: dict[str, Any], data: bytes, max_payload: int
                 ) -> tuple[dict[str, Any], bytearray] | None:
        """Send one request and read its reply; None if the child ended first."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            _send(self.process.stdin.fileno(), header, data)
            reply = _receive(self.process.stdout.fileno(), max_payload)
        except (BrokenPipeError, ValueError):  # ValueError: a frame that breaks the protocol
            reply = None
        if reply is None:
            self.kill()  # it ended, or it is no longer to be trusted
        return reply

    def kill(self) -> None:
        self.usable = False
        self.process.kill()  # a no-op once it has been waited for

    def close(self) -> None:
        """Ask it to exit (end of input); kill it if it does not."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


@functools.cache
def shared_pool() -> DecodePool:
    """The worker's pool, made on first use (a child starts when an image first arrives)."""
    return DecodePool()


# --- the wire ------------------------------------------------------------------------------

def _send(fd: int, header: dict[str, Any], payload: bytes | bytearray = b"") -> None:
    head = json.dumps(header).encode()
    for part in (_FRAME.pack(len(head), len(payload)), head, payload):
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


def _receive(fd: int, max_payload: int) -> tuple[dict[str, Any], bytearray] | None:
    """One frame from ``fd``; None at end of input; ValueError for a frame out of bounds."""
    sizes = _read_exact(fd, _FRAME.size)
    if sizes is None:
        return None
    head_size, payload_size = _FRAME.unpack(sizes)
    if head_size > _MAX_HEADER or payload_size > max_payload:
        raise ValueError(f"frame of {head_size} + {payload_size} bytes")
    head = _read_exact(fd, head_size)
    payload = _read_exact(fd, payload_size)
    if head is None or payload is None:
        return None
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ValueError("frame header is not an object")
    return header, payload


def _read_exact(fd: int, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        count = os.readv(fd, [view[got:]])
        if count == 0:
            return None
        got += count
    return buffer


# --- the child -----------------------------------------------------------------------------

def serve(decode: Decoder = decode_flat) -> None:
    """A child's loop: one request at a time from stdin, one reply each on stdout, until end of
    input (the parent closed the pipe or ended)."""
    runtime.configure_libraries()
    signal.signal(signal.SIGPROF, signal.SIG_DFL)  # an ignored signal stays ignored across exec
    replies = os.dup(1)
    os.dup2(2, 1)  # a stray print goes to stderr, not into the replies
    while (request := _receive(0, _MAX_REQUEST)) is not None:
        reply, pixels = _decode_one(decode, *request)
        _send(replies, reply, pixels)


def _decode_one(decode: Decoder, header: dict[str, Any], data: bytearray
                ) -> tuple[dict[str, Any], bytes]:
    field = header["field"]
    limits = InputLimits(max_bytes=max(1, len(data)), max_pixels=header["max_pixels"],
                         max_side=header["max_side"], formats=frozenset(header["formats"]),
                         work=WorkLimits(**header["work"]))
    start = _cpu_seconds()
    signal.setitimer(signal.ITIMER_PROF, max(header["cpu_s"], 1e-6))  # 0 would disarm it
    try:
        image = decode(bytes(data), field, limits, header["mode"], header["background"])
        pixels = image.tobytes()
        reply: dict[str, Any] = {"mode": image.mode, "width": image.width,
                                 "height": image.height}
    except InputError as exc:
        reply, pixels = {"error": str(exc)}, b""
    except Exception as exc:  # noqa: BLE001 - a bug: reported by type, the traceback logged here
        log.error("decoding %s failed", field, exc_info=exc)
        reply, pixels = {"bug": type(exc).__name__}, b""
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
    return reply | {"cpu_s": _cpu_seconds() - start}, pixels


def _cpu_seconds() -> float:
    # getrusage, not time.process_time(): on a Linux 6.18 VM here, CLOCK_PROCESS_CPUTIME_ID
    # stopped advancing for short spans once ITIMER_PROF had been armed; getrusage did not.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    serve()
