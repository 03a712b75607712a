"""Start-up: from settings to a loaded, warmed model, or one clear reason why not.

Finds the model folder (``model_location``), completes it when allowed (``builder``), loads it
(``pipeline``) and runs one small warm-up image per checkpoint, logging each phase's time. Any
reason the worker cannot serve becomes a ``StartupError`` with a message for the operator.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

import compilation
import model_files
import model_location
import pipeline
from builder import download_weights
from resolve import Plan
from schemas import Settings

log = logging.getLogger("worker")

# Warm-up at the smallest allowed size: it initialises CUDA, cuBLAS and every checkpoint's
# kernels for a fraction of a real image's cost.
WARMUP_SIDE = 512
HOW_TO_GET_WEIGHTS = (
    "To get weights: run `python builder/download_weights.py DIR` where huggingface.co is "
    "reachable and set MODEL_DIR=DIR (the Docker image bakes them at build time). To try the "
    "worker without them: `python builder/make_tiny_model.py /tmp/tiny-sdxl` and run with "
    "MODEL_DIR=/tmp/tiny-sdxl (random weights: noise images, real code path).")


class StartupError(RuntimeError):
    """The worker cannot serve: bad settings, no weights, or weights that do not load."""


def ensure_weights(model_dir: Path, settings: Settings) -> None:
    """Complete the model folder, fetching missing files if allowed; else explain how."""
    missing = model_files.missing_files(model_dir, settings.lightning_steps,
                                        settings.load_safety_checker, settings.tiny_decoder)
    if not missing:
        return
    if not settings.download_missing:
        raise StartupError(f"model folder {model_dir} is missing {len(missing)} file(s) "
                           f"({missing[0]}, ...). {HOW_TO_GET_WEIGHTS}")
    log.info("model folder %s is incomplete: fetching %d file(s)", model_dir, len(missing))
    try:
        download_weights.download(model_dir, settings.lightning_steps,
                                  safety=settings.load_safety_checker,
                                  tiny_decoder=settings.tiny_decoder)
    except download_weights.DownloadError as exc:
        raise StartupError(f"model folder {model_dir} is incomplete and the weights could not "
                           f"be fetched: {exc}. {HOW_TO_GET_WEIGHTS}") from None


def warm_up(model: pipeline.Model) -> None:
    """One small image per loaded checkpoint."""
    for steps in model.steps:
        pipeline.generate(model, Plan(prompt="warm-up", negative_prompt=None, width=WARMUP_SIDE,
                                      height=WARMUP_SIDE, steps=steps, guidance_scale=0.0,
                                      seeds=(0,)))


def choose_device(wanted: str) -> tuple[torch.device, torch.dtype]:
    """The device to load onto: ``auto`` takes CUDA if present; ``cuda`` insists on a GPU
    that really works (a worker on a broken or missing GPU must not take jobs)."""
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return pipeline.placement("cpu")
    if not torch.cuda.is_available():
        raise StartupError("DEVICE=cuda but no usable CUDA device is visible "
                           "(torch.cuda.is_available() is False): check the GPU and driver")
    try:
        torch.ones(1, device="cuda").add_(1).item()  # initialises the context, fails if broken
    except RuntimeError as exc:
        raise StartupError(f"the CUDA device does not work: {exc}") from None
    return pipeline.placement("cuda")


def start(settings: Settings) -> pipeline.Model:
    """Weights, load, warm-up, each timed in the log."""
    t0 = time.perf_counter()
    device, dtype = choose_device(settings.device)
    model_dir, source = model_location.locate(settings.model_dir, settings.lightning_steps,
                                              safety=settings.load_safety_checker,
                                              tiny_decoder=settings.tiny_decoder)
    log.info("model folder: %s (%s)", model_dir, source)
    ensure_weights(model_dir, settings)
    t1 = time.perf_counter()
    try:
        model = pipeline.load(model_dir, settings.lightning_steps, device, dtype,
                              safety=settings.load_safety_checker,
                              tiny_decoder=settings.tiny_decoder)
    except pipeline.ModelFolderError as exc:
        raise StartupError(f"cannot load the model folder {model_dir}: {exc}") from None
    t2 = time.perf_counter()
    if settings.compile:  # warms its buckets itself, with the same generation path
        compilation.compile_model(model, settings.compile_buckets, settings.compile_cache_dir)
    if settings.warmup:
        warm_up(model)
    t3 = time.perf_counter()
    log.info("ready on %s/%s with checkpoints %s%s: weights check %.2f s, load %.2f s, "
             "compile + warm-up %.2f s", model.device, str(model.dtype).removeprefix("torch."),
             list(model.steps), (" + safety checker" if model.safety else "")
             + (" + tiny decoder" if model.tiny_decoder else ""),
             t1 - t0, t2 - t1, t3 - t2)
    return model


