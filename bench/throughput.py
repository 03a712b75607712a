"""Throughput benchmark: jobs through the real handler at several concurrencies, and (with a
GPU) the worker's pipeline against the plain model-card recipe.

Usage (from the repository root):
  ``python -m bench.throughput``                 CPU, tiny model (builder/make_tiny_model.py),
                                                  512x512, 4 steps; both parts (~3 min)
  ``python -m bench.throughput --device cuda``   GPU, full-size random-weight model
                                                  (bench/full_model.py), 1024x1024, 4 steps

Part 1, handler: ``import handler`` with ``MODEL_DIR`` set (the worker's own start: load and
warm-up), then ``--jobs`` jobs per concurrency level through ``handler.handler(job)``, at most
``c`` in flight at once (an ``asyncio.Semaphore`` in front of ``asyncio.gather``, as RunPod feeds
a worker whose concurrency modifier returns ``c``). Levels are shuffled within each of
``--rounds`` rounds. Reports images/s (median over rounds), p50/p95 job latency (all rounds
pooled) and the mean jobs per GPU batch (``handler.GPU.batches_run``). A failed job is counted
and reported, not timed; its traceback is in the worker log (whose path is printed first).

Part 2, recipes (batch 1 and 4, interleaved, ``torch.cuda.synchronize`` around each call):
- ours: ``handler.ENGINE.run_batch(...)``, the worker's generation as configured
  (on CUDA: channels_last and fused QKV; ``--compile``: torch.compile of the UNet);
- ours + TAESDXL: the same with the tiny decoder swapped in (what ``VAE_DECODER=tiny`` runs);
- plain: the model card's recipe as the card writes it (``plain_recipe``): its own UNet from
  the config filled with ``load_state_dict``, ``StableDiffusionXLPipeline.from_pretrained`` of
  SDXL base in fp16 (``variant="fp16"``; base's stock VAE config, ``force_upcast=True``: the VAE
  decodes in fp32), Euler trailing, guidance 0, PIL output; nothing of the worker's.
Reports images/s, ms per image, and the fraction of the FLOP floor (``floor_seconds``: 4 UNet
steps plus the decoder the row uses; 37.6 TFLOP per 1024² image with the full VAE at 800 TFLOP/s
is 47 ms, with TAESDXL 27.6 TFLOP, 35 ms; sdxl-architecture.md), with the goals: >= 2x the plain
recipe's images/s, single image <= 200 ms, >= 6 images/s at full load. The goals and the floor
apply to the full-size model on a GPU only; with the tiny model the script just exercises the
code. ``bench/gpu_run.py`` runs these parts, and more, as one command within a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# TFLOP of one UNet step at batch 1 (no CFG) and of one decode, by square side, counted with
# torch's FlopCounterMode (sdxl-architecture.md; tests/e2e/test_gpu_bench_cpu.py recounts the
# decoders). A TAESDXL row's floor uses TAESDXL's own decode, not the full VAE's.
UNET_STEP_TFLOP = {512: 1.59, 768: 3.64, 1024: 6.76, 1280: 11.20}
DECODE_TFLOP = {"vae": {512: 2.51, 768: 5.75, 1024: 10.47, 1280: 16.84},
                "taesdxl": {512: 0.14, 768: 0.32, 1024: 0.57, 1280: 0.88}}
PRACTICAL_TFLOPS = 800.0  # an H100's practical dense fp16 rate
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
RECIPES = ("ours", "ours + TAESDXL", "plain")
# SDXL base's model_index.json: what the card's StableDiffusionXLPipeline.from_pretrained reads.
BASE_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def decoder_of(recipe: str) -> str:
    return "taesdxl" if "TAESDXL" in recipe else "vae"


def floor_seconds(size: int, decoder: str = "vae", steps: int = 4) -> float | None:
    """The FLOP floor of one ``size``² image (``steps`` UNet steps + one decode with
    ``decoder``) at ``PRACTICAL_TFLOPS``; None for a size not counted."""
    if size not in UNET_STEP_TFLOP:
        return None
    return (steps * UNET_STEP_TFLOP[size] + DECODE_TFLOP[decoder][size]) / PRACTICAL_TFLOPS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("tiny", "full"), default=None,
                        help="default: tiny on cpu, full on cuda")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="model",
                        help="same as --model tiny (a smoke run of the GPU code path)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sdxl-lightning-full"),
                        help="where the full-size model is (built if incomplete)")
    parser.add_argument("--size", type=int, default=None, help="default 512 cpu, 1024 cuda")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--jobs", type=int, default=None, help="jobs per level (16 cpu, 32 cuda)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--recipe-rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true",
                        help="COMPILE=true: torch.compile the UNet at start (each new batch size "
                             "compiles on first use: use with --concurrency 1 --batches 1)")
    args = parser.parse_args()
    args.model = args.model or ("tiny" if args.device == "cpu" else "full")
    args.size = args.size or (512 if args.device == "cpu" else 1024)
    args.jobs = args.jobs or (16 if args.device == "cpu" else 32)
    return args


def build_model(device: str, model: str, model_dir: Path) -> Path:
    """The model folder to benchmark: the tiny one in a fresh temporary folder, or the
    full-size one at ``model_dir`` (built if incomplete)."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the worker picks CUDA whenever it sees one
    if model == "tiny":
        from builder import make_tiny_model
        from worker.spec import ModelSpec
        # TAESDXL too: the recipe table swaps it in (load_taesd below).
        return make_tiny_model.build(Path(tempfile.mkdtemp(prefix="sdxl-tiny-")) / "m",
                                     ModelSpec(steps=(4,), tiny_decoder=True))
    from bench import full_model
    return full_model.build(model_dir)


def start_handler(device: str, model_dir: Path, compile: bool = False,
                  log_path: Path | None = None) -> Any:
    """Point MODEL_DIR at ``model_dir`` and import the worker (its own start: load + warm-up);
    the worker's log lines go to ``log_path`` (default: a temporary file), not the tables."""
    # DEVICE=cuda: a worker whose GPU does not work stops at start instead of running on the CPU.
    os.environ.update(MODEL_DIR=str(model_dir), DOWNLOAD_MISSING_WEIGHTS="false", DEVICE=device)
    if compile:
        os.environ["COMPILE"] = "true"
    started = time.perf_counter()
    import handler
    print(f"import handler (load + warm-up): {time.perf_counter() - started:.1f} s; model on "
          f"{handler.ENGINE.device}/{handler.ENGINE.dtype}", flush=True)
    log_path = log_path or Path(tempfile.mkdtemp(prefix="sdxl-bench-")) / "worker.log"
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(open(log_path, "a"))  # noqa: SIM115 - lives as long as the process
    print(f"worker log: {log_path}")
    return handler


def import_handler(args: argparse.Namespace) -> Any:
    """Build the model folder, point MODEL_DIR at it and import the worker (load + warm-up)."""
    return start_handler(args.device, build_model(args.device, args.model, args.model_dir),
                         args.compile)


def job(i: int, size: int) -> dict[str, Any]:
    return {"id": f"bench-{i}", "input": {"prompt": f"{PROMPT} {i}", "width": size,
                                          "height": size, "num_inference_steps": 4, "seed": i}}


async def run_level(handler: Any, concurrency: int, jobs: int,
                    size: int) -> tuple[float, list[float], list[str]]:
    """Wall seconds for ``jobs`` jobs with at most ``concurrency`` in flight; the latencies of
    the jobs that succeeded and the errors of those that did not (the worker log has why)."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: list[str] = []

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            response = await handler.handler(job(i, size))
            if "error" in response:
                errors.append(f"job {i}: {response['error']}")
            else:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(jobs)))
    return time.perf_counter() - started, latencies, errors


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sweep(handler: Any, levels: list[int], jobs: int, rounds: int, size: int,
          more: Callable[[], bool] = lambda: True) -> dict[int, dict[str, Any]]:
    """Part 1's measurements: per concurrency level, the images/s of each round, every
    successful job's latency, the GPU batches run and the errors. Levels are shuffled within
    each round; a new round starts only while ``more()`` (a time budget) says so."""
    levels = list(levels)
    data: dict[int, dict[str, Any]] = {c: {"rates": [], "latencies": [], "batches": 0,
                                           "jobs": 0, "errors": []} for c in levels}
    shuffle = random.Random(0).shuffle
    for r in range(rounds):
        if r and not more():
            break
        shuffle(levels)
        for c in levels:
            before = handler.GPU.batches_run
            wall, latencies, failed = asyncio.run(run_level(handler, c, jobs, size))
            cell = data[c]
            cell["batches"] += handler.GPU.batches_run - before
            cell["jobs"] += jobs
            cell["rates"].append(len(latencies) / wall)
            cell["latencies"] += latencies
            cell["errors"] += failed
            print(f"round {r + 1} concurrency {c}: {len(latencies) / wall:.2f} images/s"
                  + (f", {len(failed)} job(s) FAILED" if failed else ""), flush=True)
    return data


def handler_sweep(handler: Any, args: argparse.Namespace) -> float:
    """Part 1; returns the best images/s."""
    data = sweep(handler, list(args.concurrency), args.jobs, args.rounds, args.size)
    base = statistics.median(data[1]["rates"]) if 1 in data else None
    print(f"\nhandler, {args.model} model, {args.size}x{args.size}, 4 steps, png, {args.jobs} jobs "
          f"per level, median of {args.rounds} rounds (latency: all rounds pooled)")
    print("| concurrency | images/s | vs concurrency 1 | p50 latency s | p95 latency s | "
          "jobs per GPU batch | failed jobs |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c in sorted(data):
        cell = data[c]
        med = statistics.median(cell["rates"])
        print(f"| {c} | {med:.2f} | {f'{med / base:.2f}x' if base else '-'} | "
              f"{percentile(cell['latencies'], 0.5):.3f} | "
              f"{percentile(cell['latencies'], 0.95):.3f} | "
              f"{cell['jobs'] / cell['batches']:.2f} | {len(cell['errors'])} |")
    errors = [e for cell in data.values() for e in cell["errors"]]
    if errors:
        print(f"WARNING: {len(errors)} job(s) failed (first: {errors[0]}); "
              f"the tracebacks are in the worker log")
    return max(statistics.median(cell["rates"]) for cell in data.values())


def base_folder(model_dir: Path) -> Path:
    """SDXL base as the card's ``from_pretrained`` reads it, made of ``model_dir``'s files.

    A temporary folder of links, with base's ``model_index.json`` and base's own VAE config:
    the same VAE architecture as the worker's fp16-fix one but ``force_upcast: true``, so the
    stock pipeline decodes in fp32, as it does with SDXL base's VAE. The VAE weights are linked
    under the fp16 variant name that ``variant="fp16"`` looks for.
    """
    from worker.spec import VAE_WEIGHTS

    base = Path(tempfile.mkdtemp(prefix="sdxl-base-"))
    for sub in ("scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet"):
        (base / sub).symlink_to(model_dir / sub, target_is_directory=True)
    (base / "vae").mkdir()
    config = json.loads((model_dir / "vae" / "config.json").read_text())
    (base / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": True}))
    (base / "vae" / VAE_WEIGHTS.replace(".safetensors", ".fp16.safetensors")).symlink_to(
        model_dir / "vae" / VAE_WEIGHTS)
    (base / "model_index.json").write_text(json.dumps(BASE_MODEL_INDEX))
    return base


def plain_recipe(model_dir: Path, device: Any, dtype: Any) -> Any:
    """The model card's pipeline, as the card writes it, from ``model_dir``'s files.

    UNet from its config, ``.to(device, fp16)``, then ``load_state_dict(load_file(ckpt))``;
    ``StableDiffusionXLPipeline.from_pretrained(base, unet=unet, torch_dtype=fp16,
    variant="fp16")`` (its own text encoders and base's stock VAE, ``base_folder``); the
    scheduler swapped for Euler trailing. One change that cannot change its speed: the UNet's
    random initialisation runs on ``device``, not the CPU (the card's ``from_config`` would
    spend ~10 s of CPU initialising 2.6 B parameters that the checkpoint then overwrites). The
    progress bar is off, as in the worker. ``dtype`` is fp16 on CUDA, as on the card.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from worker.spec import CHECKPOINTS

    base = base_folder(model_dir)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(base / "unet")).to(device, dtype)
    unet.load_state_dict(load_file(model_dir / CHECKPOINTS[4], device=str(device)))
    with warnings.catch_warnings():  # the card's torch_dtype= is deprecated for dtype=
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=unet, torch_dtype=dtype,
                                                         variant="fp16").to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                        timestep_spacing="trailing")
    if not pipe.vae.config.force_upcast:
        raise RuntimeError("the plain recipe's VAE must have force_upcast=True")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_taesd(handler: Any) -> Any:
    """TAESDXL as the worker loads it with VAE_DECODER=tiny (channels_last on CUDA)."""
    import torch
    from diffusers import AutoencoderTiny

    from worker.spec import TAESD_DIR

    model = handler.ENGINE
    taesd = AutoencoderTiny.from_pretrained(Path(os.environ["MODEL_DIR"]) / TAESD_DIR,
                                            dtype=model.dtype).to(model.device).eval()
    if model.device.type == "cuda":
        taesd.to(memory_format=torch.channels_last)
    return taesd


def recipes(handler: Any, size: int, batches: list[int], rounds: int,
            more: Callable[[], bool] = lambda: True) -> dict[tuple[str, int], list[float]]:
    """Part 2's measurements: seconds of every timed call per (recipe, batch). One untimed call
    of each first; then rounds of every cell in shuffled order, a new round only while
    ``more()`` (a time budget) says so."""
    import torch

    from worker.plan import Plan

    model = handler.ENGINE
    plain = plain_recipe(Path(os.environ["MODEL_DIR"]), model.device, model.dtype)
    taesd = load_taesd(handler)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    own_decoder = model.taesd

    def run(recipe: str, batch: int) -> None:
        if recipe == "plain":  # the card's call; width/height = its default (1024) on SDXL
            plain([PROMPT] * batch, num_inference_steps=4, guidance_scale=0, width=size,
                  height=size)
            return
        model.taesd = taesd if recipe == "ours + TAESDXL" else None
        try:
            model.run_batch([Plan(
                prompt=PROMPT, negative_prompt=None, width=size, height=size, steps=4,
                guidance_scale=0.0, seeds=tuple(range(batch)))])
        finally:
            model.taesd = own_decoder

    cells = [(r, b) for r in RECIPES for b in batches]
    times: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    for cell in cells:  # warm-up: kernels, allocator, cuDNN choices (and compiles, if on)
        run(*cell)
    shuffle = random.Random(1).shuffle
    for r in range(rounds):
        if r and not more():
            break
        shuffle(cells)
        for cell in cells:
            sync()
            started = time.perf_counter()
            run(*cell)
            sync()
            times[cell].append(time.perf_counter() - started)
    return times  # the plain pipeline goes with this frame: its memory is free to reclaim


def print_recipes(med: dict[tuple[str, int], float], args: argparse.Namespace) -> None:
    full = args.model == "full" and args.size in UNET_STEP_TFLOP
    print(f"\nrecipes, {args.model} model, {args.size}x{args.size}, 4 steps, median of "
          f"{args.recipe_rounds} interleaved rounds"
          + (f"; FLOP floor per image at {PRACTICAL_TFLOPS:.0f} TFLOP/s: "
             f"{floor_seconds(args.size, 'vae') * 1e3:.0f} ms (full VAE), "
             f"{floor_seconds(args.size, 'taesdxl') * 1e3:.0f} ms (TAESDXL)" if full
             else "; FLOP floor: n/a (not the SDXL architecture)"))
    print("| recipe | batch | s per batch | images/s | ms per image | ours vs plain | "
          "fraction of FLOP floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (recipe, batch), seconds in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        speedup = med[("plain", batch)] / seconds
        floor = floor_seconds(args.size, decoder_of(recipe)) if full else None
        print(f"| {recipe} | {batch} | {seconds:.3f} | {batch / seconds:.2f} | "
              f"{seconds / batch * 1e3:.1f} | {f'{speedup:.2f}x' if recipe != 'plain' else '-'} | "
              f"{f'{floor / (seconds / batch):.0%}' if floor else 'n/a'} |")


def print_goals(med: dict[tuple[str, int], float], best_rate: float,
                args: argparse.Namespace) -> None:
    if args.device != "cuda" or args.model != "full" or args.size != 1024:
        print("\ngoals (>= 2x plain, single image <= 200 ms, >= 6 images/s): they apply to "
              "--device cuda with the full model at 1024; not evaluated here")
        return
    batch = max(args.batches)
    speedup = (batch / med[("ours", batch)]) / (batch / med[("plain", batch)])
    single = med[("ours", 1)] if ("ours", 1) in med else float("nan")
    for text, ok in ((f">= 2x the plain recipe's images/s (batch {batch}): {speedup:.2f}x",
                      speedup >= 2),
                     (f"single image <= 200 ms: {single * 1e3:.0f} ms", single <= 0.2),
                     (f">= 6 images/s at full load (handler): {best_rate:.2f}", best_rate >= 6)):
        print(f"goal {text}: {'met' if ok else 'NOT met'}")


def main() -> int:
    args = parse_args()
    handler = import_handler(args)
    best = handler_sweep(handler, args)
    times = recipes(handler, args.size, args.batches, args.recipe_rounds)
    med = {cell: statistics.median(t) for cell, t in times.items()}
    print_recipes(med, args)
    print_goals(med, best, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
