"""The RunPod adapter: loads and warms the model at import, then serves ``handler(job)``.

At import (before ``runpod.serverless.start``, so no job is taken by a worker that cannot serve
it): read the settings, make sure the model folder is complete (fetching pinned weights where the
hub is reachable), load the pipeline, run one small warm-up generation, log each phase's time. A
start-up failure logs one clear message and exits non-zero.

``handler(job)``: validate ``job["input"]`` (``schemas``), resolve it to the exact parameters used
(``resolve``), generate (``pipeline``), encode (``encoding``) and return the response dict. Every
failure becomes ``{"error": "<one string>"}`` for that job; the worker keeps serving.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

# runpod's default level (DEBUG) logs every job's whole output, base64 images included.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

import runpod
import torch

import encoding
import model_files
import model_location
import pipeline
from builder import download_weights
from resolve import Plan, resolve
from schemas import CLIP_MAX_TOKENS, Settings, parse_request

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
    missing = model_files.missing_files(model_dir, settings.lightning_steps)
    if not missing:
        return
    if not settings.download_missing:
        raise StartupError(f"model folder {model_dir} is missing {len(missing)} file(s) "
                           f"({missing[0]}, ...). {HOW_TO_GET_WEIGHTS}")
    log.info("model folder %s is incomplete: fetching %d file(s)", model_dir, len(missing))
    try:
        download_weights.download(model_dir, settings.lightning_steps)
    except download_weights.DownloadError as exc:
        raise StartupError(f"model folder {model_dir} is incomplete and the weights could not "
                           f"be fetched: {exc}. {HOW_TO_GET_WEIGHTS}") from None


def warm_up(model: pipeline.Model) -> None:
    """One small image per loaded checkpoint."""
    for steps in model.steps:
        pipeline.generate(model, Plan(prompt="warm-up", negative_prompt=None, width=WARMUP_SIDE,
                                      height=WARMUP_SIDE, steps=steps, guidance_scale=0.0,
                                      seeds=(0,)))


def start(settings: Settings) -> pipeline.Model:
    """Weights, load, warm-up, each timed in the log."""
    t0 = time.perf_counter()
    model_dir, source = model_location.locate(settings.model_dir, settings.lightning_steps)
    log.info("model folder: %s (%s)", model_dir, source)
    ensure_weights(model_dir, settings)
    t1 = time.perf_counter()
    try:
        model = pipeline.load(model_dir, settings.lightning_steps)
    except pipeline.ModelFolderError as exc:
        raise StartupError(f"cannot load the model folder {model_dir}: {exc}") from None
    t2 = time.perf_counter()
    if settings.warmup:
        warm_up(model)
    t3 = time.perf_counter()
    log.info("ready on %s/%s with checkpoints %s: weights check %.2f s, load %.2f s, "
             "warm-up %.2f s", model.device, str(model.dtype).removeprefix("torch."),
             list(model.steps), t1 - t0, t2 - t1, t3 - t2)
    return model


def truncation_warnings(model: pipeline.Model, plan: Plan) -> list[str]:
    """CLIP reads 77 tokens; say so when a prompt that is used runs past them."""
    warnings = []
    for name, text in (("prompt", plan.prompt), ("negative_prompt", plan.negative_prompt)):
        if text and (count := pipeline.prompt_tokens(model, text)) > CLIP_MAX_TOKENS:
            warnings.append(f"{name} is {count} CLIP tokens; only the first {CLIP_MAX_TOKENS} "
                            f"were used")
    return warnings


def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Serve one RunPod job; never raises."""
    job_id = job.get("id", "?")
    try:
        request = parse_request(job.get("input"))
    except ValueError as exc:
        log.info("job %s rejected: %s", job_id, exc)
        return {"error": str(exc)}
    plan, warnings = resolve(request, MODEL.steps)
    warnings += truncation_warnings(MODEL, plan)
    try:
        started = time.perf_counter()
        images = pipeline.generate(MODEL, plan)
        generated = time.perf_counter()
        uris = [encoding.data_uri(encoding.encode(image)) for image in images]
        encoded = time.perf_counter()
    except torch.cuda.OutOfMemoryError:
        log.exception("job %s: out of GPU memory", job_id)
        torch.cuda.empty_cache()
        return {"error": f"out of GPU memory generating {len(plan.seeds)} image(s) at "
                         f"{plan.width}x{plan.height}: try fewer images or a smaller size"}
    except Exception as exc:  # noqa: BLE001 - one job's failure must not end the worker
        log.exception("job %s failed", job_id)
        # A failure inside torch may leave the GPU in a bad state: let RunPod replace the worker.
        return {"error": f"internal error: {type(exc).__name__}", "refresh_worker": True}
    log.info("job %s: %dx%d, %d step(s), %d image(s), seed %d: generate %.3f s, encode %.3f s",
             job_id, plan.width, plan.height, plan.steps, len(plan.seeds), plan.seeds[0],
             generated - started, encoded - generated)
    response: dict[str, Any] = {
        "images": [{"image": uri, "seed": seed}
                   for uri, seed in zip(uris, plan.seeds, strict=True)],
        "generation_time": round(generated - started, 4),
        "parameters": plan.parameters(),
    }
    if warnings:
        response["warnings"] = warnings
    return response


def _load_or_exit() -> pipeline.Model:
    # force: runpod's rp_upload configures the root logger at import with a format of its own.
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return start(Settings.from_env())
    except (StartupError, ValueError) as exc:
        log.error("worker cannot start: %s", exc)
        sys.exit(1)


MODEL = _load_or_exit()

if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
