"""Opt-in ``torch.compile`` of the UNet(s), warmed at start for declared resolution buckets.

A compiled UNet specialises on input shapes: each new size (or batch size) compiles again on
first use (diffusers#5495), which on a cold worker takes minutes. So compilation is off unless
``COMPILE=true``; then every ``COMPILE_BUCKETS`` size is generated once at start, before any
job is taken, and sizes outside the buckets still work but pay their compile on first use.
``COMPILE_CACHE_DIR`` (e.g. on a network volume) persists inductor's compiled artefacts with
PyTorch's Mega-Cache (``torch.compiler.save_cache_artifacts``), so the next cold start loads
kernels instead of compiling them. Results are unchanged within fp rounding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

import pipeline
from resolve import Plan

log = logging.getLogger("worker")

ARTIFACTS = "torch-compile-artifacts.bin"
# Buckets x batch sizes x checkpoints each take a cache entry; dynamo's default of 8 would
# silently fall back to eager after the eighth shape.
CACHE_SIZE_LIMIT = 64


def compile_model(model: pipeline.Model, buckets: tuple[tuple[int, int], ...],
                  cache_dir: Path | None, backend: str = "inductor") -> float:
    """Compile every UNet in place, warm each bucket, persist the cache; returns seconds."""
    started = time.perf_counter()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                CACHE_SIZE_LIMIT)
    cached = cache_dir / ARTIFACTS if cache_dir else None
    if cached is not None and cached.is_file():
        torch.compiler.load_cache_artifacts(cached.read_bytes())
        log.info("compile cache loaded from %s", cached)
    for pipe in model.pipes.values():
        pipe.unet.compile(backend=backend)  # in place: every view shares this module
    for steps in model.steps:
        for width, height in buckets:
            pipeline.generate(model, Plan(prompt="compile warm-up", negative_prompt=None,
                                          width=width, height=height, steps=steps,
                                          guidance_scale=0.0, seeds=(0,)))
    if cached is not None:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(artifacts[0])
            log.info("compile cache saved to %s (%d bytes)", cached, len(artifacts[0]))
    seconds = time.perf_counter() - started
    log.info("compiled %d UNet(s) for %d bucket(s) in %.1f s", len(model.pipes), len(buckets),
             seconds)
    return seconds
