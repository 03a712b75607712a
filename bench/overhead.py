"""Per-job overhead benchmark: the real handler's cost outside generation and encoding.

Usage: ``python -m bench.overhead [--jobs 200] [--rounds 5]``, from the repository root (~1 min
on 2 cores; exits 0).

``import handler`` on the tiny model (CPU), then ``handler.ENGINE.run_batch`` (the raw batched
pass under ``Engine.generate``) is replaced by a function returning precomputed 1024x1024 images
at once and ``worker.outputs.encoding.encode`` by one returning precomputed bytes, so a job's wall
time is only what the handler adds: validation (``parse_request``), ``prepare`` in a thread
(``worker.inputs.prepare``: safety setting, ``resolve``, the prompt's CLIP token count), the GPU
queue hand-off (with ``Engine.generate``'s policy around the fake), delivery in the delivery
pool, logging and the response. The prompt is counted by a full-size CLIP tokenizer (49408
tokens, ``bench/full_model.py``) put in the engine's place (``ENGINE._counter``, the copy that
``count_tokens`` uses), as the real worker's would.

Variants, interleaved in shuffled order within each round (``--jobs`` sequential jobs each):
``overhead``: ``encoding.data_uri`` replaced too, the goal's figure (<= 5 ms per job);
``+ base64 png`` / ``+ base64 jpeg``: the real ``data_uri`` of a 2.3 MB fpng PNG / 0.27 MB JPEG
(base64 is part of encoding, listed for scale); ``overhead, 4 in flight``: wall / jobs with four
jobs in flight. Then the parts, each timed alone (median of many calls).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

os.environ["CUDA_VISIBLE_DEVICES"] = ""
from bench import full_model  # noqa: E402 - after hiding CUDA, before torch is imported
from bench.encode import make_image  # noqa: E402
from builder import make_tiny_model  # noqa: E402
from worker.spec import ModelSpec  # noqa: E402

GOAL_MS = 5.0
SIDE = 1024
INPUT = {"prompt": "a photograph of an astronaut riding a horse on the moon, highly detailed, "
                   "dramatic lighting", "num_inference_steps": 4}
Variant = tuple[str, str, bool, int]  # name, output format, real data_uri, jobs in flight
VARIANTS: list[Variant] = [("overhead", "png", False, 1), ("+ base64 png", "png", True, 1),
                           ("+ base64 jpeg", "jpeg", True, 1),
                           ("overhead, 4 in flight", "png", False, 4)]


@dataclass
class Fakes:
    """The instant stand-ins, and the real ``data_uri`` for the variants that keep it."""

    encoding: Any
    real_data_uri: Callable[..., str]
    uris: dict[str, str]

    def use_real_data_uri(self, real: bool) -> None:
        self.encoding.data_uri = self.real_data_uri if real else (
            lambda data, fmt="png": self.uris[fmt])


def start_worker() -> tuple[Any, Fakes]:
    """Import the handler on a tiny model, with a full-size tokenizer and instant fakes."""
    tmp = Path(tempfile.mkdtemp(prefix="sdxl-overhead-"))
    os.environ.update(MODEL_DIR=str(make_tiny_model.build(tmp / "tiny", ModelSpec(steps=(4,)))),
                      DOWNLOAD_MISSING_WEIGHTS="false")
    from transformers import CLIPTokenizer

    import handler
    from worker.outputs import encoding

    for h in logging.getLogger().handlers:  # the log lines are formatted, then dropped
        if isinstance(h, logging.StreamHandler):
            h.setStream(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    full_model.write_tokenizer(tmp / "tokenizer", "<|endoftext|>")
    # Counting uses the engine's private copy made at load, not pipes[4].tokenizer: swap both.
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    handler.ENGINE.pipes[4].tokenizer = tokenizer
    handler.ENGINE._counter = tokenizer
    image = Image.fromarray(make_image(size=SIDE))
    data = {"png": encoding.encode(image, "png"), "jpeg": encoding.encode(image, "jpeg", 90)}
    fakes = Fakes(encoding, encoding.data_uri,
                  {fmt: encoding.data_uri(d, fmt) for fmt, d in data.items()})
    handler.ENGINE.run_batch = lambda plans, on_step=None: [
        [image] * len(plan.seeds) for plan in plans]
    encoding.encode = lambda img, fmt="png", quality=90: data[fmt]
    return handler, fakes


async def run_variant(handler: Any, fakes: Fakes, variant: Variant, jobs: int) -> list[float]:
    """Per-job seconds (sequential) or wall / jobs for each of ``jobs`` (in flight > 1)."""
    name, fmt, real, in_flight = variant
    fakes.use_real_data_uri(real)
    gate = asyncio.Semaphore(in_flight)
    times: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            response = await handler.handler({"id": f"o-{i}", "input": {
                **INPUT, "seed": i, "output_format": fmt}})
            times.append(time.perf_counter() - started)
            if "error" in response:
                raise RuntimeError(response["error"])

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(jobs)))
    return times if in_flight == 1 else [(time.perf_counter() - started) / jobs] * jobs


def median_ms(fn: Any, n: int = 300) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


async def amedian_ms(fn: Any, n: int = 300) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


async def parts(handler: Any, fakes: Fakes) -> dict[str, float]:
    """Each piece of a job alone, in ms (median)."""
    from schemas import parse_request
    from worker.inputs.prepare import prepare

    engine, settings = handler.ENGINE, handler.SETTINGS
    fakes.use_real_data_uri(False)
    job = {"id": "p", "input": {**INPUT, "seed": 1}}
    request = parse_request(job["input"])

    def prepare_job() -> tuple[Any, list[str]]:  # as the handler calls it
        return prepare(request, engine.steps, settings.safety_mode, engine.count_tokens)

    plan, _ = prepare_job()
    loop = asyncio.get_running_loop()
    data = fakes.encoding.encode(None, "png")
    return {
        "parse_request (validation)": median_ms(lambda: parse_request(job["input"])),
        "prepare (resolve, token count)": median_ms(prepare_job),
        "  of which prompt token count": median_ms(lambda: engine.count_tokens(plan.prompt)),
        "asyncio.to_thread round trip": await amedian_ms(lambda: asyncio.to_thread(int)),
        "GPU executor round trip": await amedian_ms(
            lambda: asyncio.wrap_future(handler.GPU.submit(plan, None))),
        # One image through the delivery pool, as Delivery.deliver runs it per image.
        "encode-pool round trip (deliver)": await amedian_ms(lambda: loop.run_in_executor(
            handler.DELIVERY._pool, handler.DELIVERY._one, "image", 0, plan, "p", None)),
        "plan.parameters()": median_ms(plan.parameters),
        "data_uri png 2.3 MB (base64)": median_ms(
            lambda: fakes.real_data_uri(data, "png"), 50),
    }


async def bench(handler: Any, fakes: Fakes, args: argparse.Namespace) -> None:
    times: dict[str, list[float]] = {v[0]: [] for v in VARIANTS}
    variants = list(VARIANTS)
    for v in variants:  # warm-up
        await run_variant(handler, fakes, v, 8)
    shuffle = random.Random(0).shuffle
    for _ in range(args.rounds):
        shuffle(variants)
        for v in variants:
            times[v[0]] += await run_variant(handler, fakes, v, args.jobs)
    print(f"\nper-job wall time, {SIDE}x{SIDE} png/jpeg, 1 image, {args.jobs} jobs x "
          f"{args.rounds} interleaved rounds per variant (goal <= {GOAL_MS:g} ms)")
    print("| variant | median ms | p95 ms | goal |")
    print("|---|---:|---:|---|")
    for name, values in times.items():
        ms = sorted(t * 1e3 for t in values)
        p95 = ms[round(0.95 * (len(ms) - 1))]
        goal = ("met" if statistics.median(ms) <= GOAL_MS else "NOT met") \
            if name.startswith("overhead") else "(includes base64)"
        print(f"| {name} | {statistics.median(ms):.2f} | {p95:.2f} | {goal} |")
    print("\nparts, each alone (median ms)")
    print("| part | ms |")
    print("|---|---:|")
    for name, ms in (await parts(handler, fakes)).items():
        print(f"| {name} | {ms:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    handler, fakes = start_worker()
    print(f"worker started on the tiny model in {time.perf_counter() - started:.1f} s; load "
          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    asyncio.run(bench(handler, fakes, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
