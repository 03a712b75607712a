"""The error types that cross rooms, and the helpers that quote bad values briefly.

Three kinds of failure, told apart by type alone (``handler`` maps each to a reply):

- ``InputError``: the caller's request cannot be served as sent. Its text is the caller-facing
  message naming the field, the value and what is allowed. Every validation site raises it (or a
  subclass); the handler answers it as a rejection and never recycles the worker for it.
- ``JobError``: the job was valid but could not be completed (out of GPU memory, an invalid
  output, a failed upload). Its text tells the caller what happened; the worker is fine.
- ``StartupError``: the worker cannot serve at all (settings, weights, device); the process
  logs it and exits before taking a job.

Anything else is a bug: logged with its traceback, answered as ``internal error: <type>``.
No third-party imports.
"""

from __future__ import annotations

import re
import traceback
from typing import Any

MIB = 1024 * 1024  # image inputs are limited in MiB; result sizes are counted in MB (10^6 bytes)


class InputError(Exception):
    """The caller's input cannot be served; ``str(exc)`` is the message for the caller."""


class JobError(Exception):
    """A valid job that could not be completed; ``str(exc)`` is the message for the caller."""


class StartupError(Exception):
    """The worker cannot serve: bad settings, no weights, weights that do not load, no GPU."""


class ModelFolderError(StartupError):
    """The model folder is missing files or holds files that do not load."""


def shown(value: Any, limit: int = 40) -> str:
    """A short repr of a bad value: enough to recognise it, never a whole prompt or image."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def brief_reason(exc: BaseException) -> str:
    """An exception as a short message: no traceback, no object addresses."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "data", str(exc)) or type(exc).__name__
    return text if len(text) <= 120 else text[:120] + "..."


def size_text(count: int) -> str:
    """A byte count for people, in binary units: "20 MiB", "97.7 KiB", "50 bytes"."""
    if count >= MIB:
        return f"{count / MIB:.1f}".removesuffix(".0") + " MiB"
    if count >= 1024:
        return f"{count / 1024:.1f}".removesuffix(".0") + " KiB"
    return f"{count} bytes"


def bug_report(exc: BaseException) -> str:
    """A bug's exception types and stack frames for the log, without the messages.

    Messages may quote the caller's input (pydantic's ``input_value``, a prompt, a URL), which
    no log record at INFO or above may carry; the frames (file, line, source) say where it broke.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # the chain, newest first
        seen.add(id(current))
        frames = "".join(traceback.format_tb(current.__traceback__))
        parts.append(f"{type(current).__name__} (message at DEBUG)\n{frames}".rstrip())
        current = current.__cause__ or (None if current.__suppress_context__
                                        else current.__context__)
    return "\n  which came from: ".join(parts)
