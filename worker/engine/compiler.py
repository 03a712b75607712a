"""Opt-in ``torch.compile`` of the UNet(s), and the cache that spares the next cold start.

A compiled UNet specialises on input shapes: each new size (or batch size) compiles again on
first use (diffusers#5495), which on a cold worker takes minutes. So compilation is off unless
``COMPILE=true``; then ``pipeline.Engine.compile`` compiles in place and generates every
``COMPILE_SIZES`` size once at start, before any job is taken; sizes outside them still work
but pay their compile on first use. ``COMPILE_CACHE_DIR`` (e.g. on a network volume) persists
inductor's compiled artefacts with PyTorch's Mega-Cache (``torch.compiler.save_cache_artifacts``),
so the next cold start loads kernels instead of compiling them. Results are unchanged within fp
rounding. A compile that fails at start (inductor without a C++ compiler, Triton without a C
compiler) is a ``CompileError``: one line with the root cause and the fix, like every other
start-up failure; the full traceback goes to the DEBUG log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from worker.errors import StartupError

log = logging.getLogger(__name__)

ARTIFACTS = "torch-compile-artifacts.bin"
# Sizes x batch sizes x checkpoints each take a cache entry; dynamo's default of 8 would
# silently fall back to eager after the eighth shape.
CACHE_SIZE_LIMIT = 64
# torch.compile's backend: a registered name, or a callable (tests pass one that counts or fails).
Backend = str | Callable[..., Any]


class CompileError(StartupError):
    """``COMPILE=true`` but torch.compile failed at start."""

    def __init__(self, exc: BaseException, sizes: str) -> None:
        cause = root_cause(exc).rstrip(".")
        super().__init__(
            f"COMPILE=true but torch.compile failed compiling the UNet for {sizes}: {cause}. "
            f"Set COMPILE=false to start without compiling, or give the worker a C compiler "
            f"(inductor and Triton build kernels with it; the Docker image: --build-arg "
            f"TRITON_COMPILER=true)")


def innermost(exc: BaseException) -> BaseException:
    """The innermost exception of a chain: Dynamo wraps a backend's failure
    (``BackendCompilerFailed``, ``InductorError``), an out-of-memory error included."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain as ``Type: first line``: Dynamo's wrapper has a
    message of several paragraphs; the line that names the problem is the wrapped one's."""
    exc = innermost(exc)
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def compile_in_place(unets: Iterable[torch.nn.Module], cache_dir: Path | None,
                     backend: Backend = "inductor") -> None:
    """Load the persisted kernels, if any, then compile every UNet in place (every pipeline
    view shares these modules, so all of them run compiled)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                CACHE_SIZE_LIMIT)
    cached = cache_dir / ARTIFACTS if cache_dir else None
    if cached is not None and cached.is_file():
        torch.compiler.load_cache_artifacts(cached.read_bytes())
        log.info("compile cache loaded from %s", cached)
    for unet in unets:
        unet.compile(backend=backend)


def save_cache(cache_dir: Path | None) -> None:
    """Persist what was compiled so far (after the warm-up generated every size)."""
    if cache_dir is None:
        return
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is not None:
        cached = cache_dir / ARTIFACTS
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(artifacts[0])
        log.info("compile cache saved to %s (%d bytes)", cached, len(artifacts[0]))
