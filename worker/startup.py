"""Start-up: from settings to a loaded, warmed engine, or one clear reason why not.

Checks the device, finds the model folder (``location``; its files were already being read by
``prefetch``, which ``handler`` starts before the heavy imports), fetches missing files when
allowed (``builder.download_weights``), loads the engine (``pipeline.Engine.load``) and logs
what its weights hold in memory per checkpoint, then compiles when asked (which warms the
compiled sizes, and replaces the default warm-up: a warm-up at another size would compile every
UNet once more) or warms it up, logging each phase's time. Any reason the worker cannot serve
becomes a ``StartupError`` with a message for the operator. ``assemble`` adds the GPU queue
and delivery: the ``Service`` both front doors (queue handler, HTTP) serve from.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pipeline
from builder import download_weights
from worker.adapters.store import LoraStore, default_lora_dir
from worker.engine.loading import choose_device
from worker.errors import MIB, ModelFolderError, StartupError
from worker.gpu_queue import GpuWorker
from worker.location import locate
from worker.outputs import delivery, upload
from worker.service import Service
from worker.settings import Settings
from worker.spec import ModelSpec

log = logging.getLogger(__name__)


def how_to_get_weights(spec: ModelSpec) -> str:
    """The advice every missing-weights message ends with, for this very spec."""
    args = " ".join(spec.builder_args())
    return (f"To get weights: run `python -m builder.download_weights DIR {args}` where "
            f"huggingface.co is reachable and set MODEL_DIR=DIR (the Docker image bakes them at "
            f"build time). To try the worker without them: `python -m builder.make_tiny_model "
            f"/tmp/tiny-sdxl {args}` and run with MODEL_DIR=/tmp/tiny-sdxl (random weights: "
            f"noise images, real code path).")


def ensure_weights(model_dir: Path, spec: ModelSpec, download_missing: bool) -> None:
    """Complete the model folder, fetching missing files if allowed; else explain how."""
    missing = spec.missing(model_dir)
    if not missing:
        return
    if not download_missing:
        raise StartupError(f"model folder {model_dir} is missing {len(missing)} file(s) "
                           f"({missing[0]}, ...). {how_to_get_weights(spec)}")
    log.info("model folder %s is incomplete: fetching %d file(s)", model_dir, len(missing))
    try:
        download_weights.download(model_dir, spec)
    except download_weights.DownloadError as exc:
        raise StartupError(f"model folder {model_dir} is incomplete and the weights could not "
                           f"be fetched: {exc}. {how_to_get_weights(spec)}") from None


def log_memory(engine: pipeline.Engine) -> None:
    """One line: the device memory each checkpoint's UNet and the shared modules hold."""
    held = engine.resident_bytes()
    parts = ", ".join(f"{name} {pipeline.memory_text(count)}" for name, count in held.items())
    log.info("weights on %s: %s; total %s", engine.device, parts,
             pipeline.memory_text(sum(held.values())))


def start(settings: Settings) -> pipeline.Engine:
    """Device, weights, load, compile, warm-up, each timed in the log."""
    t0 = time.perf_counter()
    spec = settings.model_spec
    device, dtype = choose_device(settings.device)
    model_dir, source = locate(settings.model_dir, spec)
    log.info("model folder: %s (%s)", model_dir, source)
    ensure_weights(model_dir, spec, settings.download_missing)
    t1 = time.perf_counter()
    try:
        engine = pipeline.Engine.load(spec, model_dir, device, dtype)
    except ModelFolderError as exc:
        raise StartupError(f"cannot load the model folder {model_dir}: {exc}") from None
    log_memory(engine)
    t2 = time.perf_counter()
    if settings.compile:  # warms its sizes itself, through the same generation path
        engine.compile(settings.compile_sizes, settings.compile_cache_dir)
        if settings.warmup:
            log.info("warm-up: done by the compile (another size would compile again)")
    elif settings.warmup:
        engine.warm_up()
    t3 = time.perf_counter()
    log.info("ready on %s/%s with %s: weights check %.2f s, load %.2f s, compile + warm-up "
             "%.2f s", engine.device, str(engine.dtype).removeprefix("torch."), spec.describe(),
             t1 - t0, t2 - t1, t3 - t2)
    return engine


def assemble(settings: Settings) -> Service:
    """Everything a front door serves from: the started engine, its GPU queue, delivery."""
    bucket = upload.bucket_from_env(settings.bucket_env)  # a bad BUCKET_* fails before the load
    engine = start(settings)
    gpu = GpuWorker(engine.generate, max_batch_images=settings.max_batch_images)
    outbox = delivery.Delivery(bucket, settings.max_response_mb, settings.upload_deadline_s)
    return Service(settings, engine, outbox, gpu, lora_store(settings))


def lora_store(settings: Settings) -> LoraStore:
    """The per-job LoRA sources these settings allow (worker/adapters/store)."""
    lora_dir = settings.lora_dir or default_lora_dir(
        locate(settings.model_dir, settings.model_spec)[0])
    cache = {"cache_dir": settings.lora_cache_dir} if settings.lora_cache_dir else {}
    return LoraStore(lora_dir=lora_dir, cache_bytes=settings.lora_cache_gb * 1e9,
                     max_bytes=settings.lora_max_mb * MIB, max_loras=settings.max_loras,
                     allow_urls=settings.allow_lora_urls, **cache)
