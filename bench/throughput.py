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
- plain: the model card's recipe, a stock ``StableDiffusionXLPipeline`` in fp16 with the stock
  VAE config (``force_upcast=True``: the VAE decodes in fp32), Euler trailing, guidance 0,
  PIL output, with its own UNet and VAE loaded without the worker's optimisations; it shares
  only the (untouched) text encoders.
Reports images/s, ms per image, and the fraction of the FLOP floor (37.6 TFLOP per 1024² 4-step
image at 800 TFLOP/s: 47 ms; sdxl-architecture.md), with the goals: >= 2x the plain recipe's
images/s, single image <= 200 ms, >= 6 images/s at full load. The goals and the floor apply to
the full-size model on a GPU only; with the tiny model the script just exercises the code.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# TFLOP per image (4 UNet steps at batch 1 + one full VAE decode), from sdxl-architecture.md.
TFLOP_PER_IMAGE = {512: 4 * 1.59 + 2.51, 768: 4 * 3.64 + 5.75, 1024: 4 * 6.76 + 10.47,
                   1280: 4 * 11.20 + 16.84}
PRACTICAL_TFLOPS = 800.0  # an H100's practical dense fp16 rate
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


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


def import_handler(args: argparse.Namespace) -> Any:
    """Build the model folder, point MODEL_DIR at it and import the worker (load + warm-up)."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the worker picks CUDA whenever it sees one
    if args.model == "tiny":
        from builder import make_tiny_model
        from worker.spec import ModelSpec
        # TAESDXL too: the recipe table swaps it in (load_taesd below).
        model_dir = make_tiny_model.build(Path(tempfile.mkdtemp(prefix="sdxl-tiny-")) / "m",
                                          ModelSpec(steps=(4,), tiny_decoder=True))
    else:
        from bench import full_model
        model_dir = full_model.build(args.model_dir)
    # DEVICE=cuda: a worker whose GPU does not work stops at start instead of running on the CPU.
    os.environ.update(MODEL_DIR=str(model_dir), DOWNLOAD_MISSING_WEIGHTS="false",
                      DEVICE=args.device)
    if args.compile:
        os.environ["COMPILE"] = "true"
    started = time.perf_counter()
    import handler
    print(f"import handler (load + warm-up): {time.perf_counter() - started:.1f} s; model on "
          f"{handler.ENGINE.device}/{handler.ENGINE.dtype}", flush=True)
    log_path = Path(tempfile.mkdtemp(prefix="sdxl-bench-")) / "worker.log"
    for h in logging.getLogger().handlers:  # the worker's log lines go to a file, not the table
        if isinstance(h, logging.StreamHandler):
            h.setStream(open(log_path, "w"))  # noqa: SIM115 - lives as long as the process
    print(f"worker log: {log_path}")
    return handler


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


def handler_sweep(handler: Any, args: argparse.Namespace) -> float:
    """Part 1; returns the best images/s."""
    levels = list(args.concurrency)
    rate: dict[int, list[float]] = {c: [] for c in levels}
    lat: dict[int, list[float]] = {c: [] for c in levels}
    batches: dict[int, int] = {c: 0 for c in levels}
    errors: dict[int, list[str]] = {c: [] for c in levels}
    shuffle = random.Random(0).shuffle
    for r in range(args.rounds):
        shuffle(levels)
        for c in levels:
            before = handler.GPU.batches_run
            wall, latencies, failed = asyncio.run(run_level(handler, c, args.jobs, args.size))
            batches[c] += handler.GPU.batches_run - before
            rate[c].append(len(latencies) / wall)
            lat[c] += latencies
            errors[c] += failed
            print(f"round {r + 1} concurrency {c}: {len(latencies) / wall:.2f} images/s"
                  + (f", {len(failed)} job(s) FAILED" if failed else ""), flush=True)
    base = statistics.median(rate[1]) if 1 in rate else None
    print(f"\nhandler, {args.model} model, {args.size}x{args.size}, 4 steps, png, {args.jobs} jobs "
          f"per level, median of {args.rounds} rounds (latency: all rounds pooled)")
    print("| concurrency | images/s | vs concurrency 1 | p50 latency s | p95 latency s | "
          "jobs per GPU batch | failed jobs |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c in sorted(rate):
        med = statistics.median(rate[c])
        print(f"| {c} | {med:.2f} | {f'{med / base:.2f}x' if base else '-'} | "
              f"{percentile(lat[c], 0.5):.3f} | {percentile(lat[c], 0.95):.3f} | "
              f"{args.jobs * args.rounds / batches[c]:.2f} | {len(errors[c])} |")
    if any(errors.values()):
        first = next(e for e in errors.values() if e)[0]
        print(f"WARNING: {sum(map(len, errors.values()))} job(s) failed (first: {first}); "
              f"the tracebacks are in the worker log")
    return max(statistics.median(v) for v in rate.values())


def plain_recipe(handler: Any) -> Any:
    """The model card's pipeline: stock VAE config (fp32 upcast), Euler trailing, guidance 0.

    Its own UNet (same file, loaded without the worker's channels_last and fused QKV, which
    change the module in place) and its own VAE; the text encoders are shared (untouched).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    from worker.engine.loading import load_unet

    model, ours = handler.ENGINE, handler.ENGINE.pipes[4]
    model_dir = Path(os.environ["MODEL_DIR"])
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", dtype=model.dtype, force_upcast=True)
    if not vae.config.force_upcast:
        raise RuntimeError("the plain recipe's VAE must have force_upcast=True")
    scheduler = EulerDiscreteScheduler.from_pretrained(model_dir / "scheduler")
    pipe = StableDiffusionXLPipeline(
        vae=vae.to(model.device), text_encoder=ours.text_encoder,
        text_encoder_2=ours.text_encoder_2, tokenizer=ours.tokenizer,
        tokenizer_2=ours.tokenizer_2,
        unet=load_unet(model_dir, 4, model.device, model.dtype),
        scheduler=EulerDiscreteScheduler.from_config(scheduler.config,
                                                     timestep_spacing="trailing"))
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


def recipes(handler: Any, args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """Part 2; returns median seconds per (recipe, batch)."""
    import torch

    from worker.plan import Plan

    model, plain, taesd = handler.ENGINE, plain_recipe(handler), load_taesd(handler)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    own_decoder = model.taesd

    def run(recipe: str, batch: int) -> None:
        if recipe == "plain":
            plain(prompt=[PROMPT] * batch, num_inference_steps=4, guidance_scale=0.0,
                  width=args.size, height=args.size,
                  generator=[torch.Generator(model.device).manual_seed(i) for i in range(batch)])
            return
        model.taesd = taesd if recipe == "ours + TAESDXL" else None
        try:
            model.run_batch([Plan(
                prompt=PROMPT, negative_prompt=None, width=args.size, height=args.size, steps=4,
                guidance_scale=0.0, seeds=tuple(range(batch)))])
        finally:
            model.taesd = own_decoder

    cells = [(r, b) for r in ("ours", "ours + TAESDXL", "plain") for b in args.batches]
    times: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    for cell in cells:  # warm-up: kernels, allocator, cuDNN choices (and compiles, if on)
        run(*cell)
    shuffle = random.Random(1).shuffle
    for _ in range(args.recipe_rounds):
        shuffle(cells)
        for cell in cells:
            sync()
            started = time.perf_counter()
            run(*cell)
            sync()
            times[cell].append(time.perf_counter() - started)
    return {cell: statistics.median(t) for cell, t in times.items()}


def print_recipes(med: dict[tuple[str, int], float], args: argparse.Namespace) -> None:
    full = args.model == "full" and args.size in TFLOP_PER_IMAGE
    floor = TFLOP_PER_IMAGE.get(args.size, 0.0) / PRACTICAL_TFLOPS
    print(f"\nrecipes, {args.model} model, {args.size}x{args.size}, 4 steps, median of "
          f"{args.recipe_rounds} interleaved rounds"
          + (f"; FLOP floor {floor * 1e3:.0f} ms per image (full VAE) at "
             f"{PRACTICAL_TFLOPS:.0f} TFLOP/s" if full
             else "; FLOP floor: n/a (not the SDXL architecture)"))
    print("| recipe | batch | s per batch | images/s | ms per image | ours vs plain | "
          "fraction of FLOP floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (recipe, batch), seconds in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        speedup = med[("plain", batch)] / seconds
        print(f"| {recipe} | {batch} | {seconds:.3f} | {batch / seconds:.2f} | "
              f"{seconds / batch * 1e3:.1f} | {f'{speedup:.2f}x' if recipe != 'plain' else '-'} | "
              f"{f'{floor / (seconds / batch):.0%}' if full else 'n/a'} |")


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
    med = recipes(handler, args)
    print_recipes(med, args)
    print_goals(med, best, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
