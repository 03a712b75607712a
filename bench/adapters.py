"""Adapter cost benchmark: a job with a LoRA (first use and cached), switching between two
cached LoRAs, a weighted prompt (compel) and an embedding, each relative to a plain job,
measured side by side in one run (rounds interleave the variants; medians).

Usage (from the repository root):
  ``python -m bench.adapters``                  CPU, tiny model, 512x512, 4 steps (~1 min)
  ``python -m bench.adapters --device cuda``    GPU, full-size random-weight model
                                                 (bench/full_model.py), 1024x1024, 4 steps

Variants, each one generation of one image through ``Engine.generate`` (what the GPU queue
calls), ``torch.cuda.synchronize`` around it on a GPU:
- plain: no adapter;
- lora cached: the same LoRA every time (merged into the weights and restored per batch);
- lora switch: two cached LoRAs alternating;
- lora first use: a new URL each time: ``LoraStore.resolve`` downloads it from a loopback HTTP
  server through the SSRF-safe fetcher into an empty cache, hashes it, then the engine reads,
  converts and merges it (a fresh ``LoraBank``, so nothing is cached);
- weighted prompt: ``(word:1.3)`` syntax, encoded by compel;
- embedding: a 2-vector SDXL textual-inversion embedding added and removed around the batch.
The LoRAs are kohya-layout files of rank ``--rank`` on every attention and feed-forward linear
of the UNet's transformer blocks (builder/make_tiny_model.py). Also timed alone: the merge and
restore of one cached LoRA, the part of its cost that does not depend on noise in the job.
Goal: a cached LoRA adds at most 10 % to a 4-step job (meaningful on the full-size model on a
GPU; the tiny model only exercises the code and shows the fixed costs).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from builder import make_tiny_model
from pipeline import Engine
from schemas import LoraInput
from worker.adapters.store import LoraStore
from worker.engine.adapters import LoraBank
from worker.inputs.fetch import FetchLimits, fetch
from worker.plan import EmbeddingUse, LoraUse, Plan
from worker.spec import ModelSpec

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
SPEC = ModelSpec(steps=(4,))


def lora_use(path: Path, scale: float = 1.0) -> LoraUse:
    return LoraUse(path=path.name, file=str(path),
                   sha256=hashlib.sha256(path.read_bytes()).hexdigest(), scale=scale)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    """A loopback HTTP server for ``folder``: the "internet" the first-use downloads come from."""
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def loopback_fetcher(port: int) -> Callable[[str, FetchLimits], bytes]:
    """The store's fetcher, sent to the loopback server: the real fetch path (limits, reads),
    only plain HTTP and a private address allowed for it."""
    def fetcher(url: str, limits: FetchLimits) -> bytes:
        local = url.replace("https://loras.bench", f"http://127.0.0.1:{port}")
        return fetch(local, replace(limits, allow_http=True, allow_private=True))

    return fetcher


def timed(device: torch.device, work: Callable[[], object]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model-dir", type=Path, help="default: built in a temp folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--side", type=int, help="default: 512 on the CPU, 1024 on CUDA")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    side = args.side or (1024 if device.type == "cuda" else 512)
    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    model_dir = args.model_dir
    if model_dir is None:
        if device.type == "cuda":
            from bench import full_model

            model_dir = full_model.build(work / "model")
        else:
            model_dir = make_tiny_model.build(work / "model", SPEC)
    loras = work / "loras"
    files = [make_tiny_model.write_kohya_lora(loras / f"{i}.safetensors", model_dir, seed=i,
                                              rank=args.rank) for i in range(2)]
    embedding_file = make_tiny_model.write_sdxl_embedding(
        work / "embedding.safetensors", 2, widths=(768, 1280) if device.type == "cuda"
        else (make_tiny_model.TEXT_HIDDEN,) * 2)
    server, port = serve(loras)

    engine = Engine.load(SPEC, model_dir, device)
    engine.warm_up(((side, side),))
    plain = Plan(prompt=PROMPT, negative_prompt=None, width=side, height=side, steps=4,
                 guidance_scale=0.0, seeds=(1,))
    a, b = lora_use(files[0]), lora_use(files[1])
    embedding = EmbeddingUse(path="e", file=str(embedding_file), sha256="e" * 64,
                             tokens=("<s0>", "<s1>"))
    first_uses = [0]

    def first_use() -> None:
        first_uses[0] += 1
        store = LoraStore(loras, cache_dir=work / f"cache-{first_uses[0]}",
                          fetcher=loopback_fetcher(port))
        url = f"https://loras.bench/{first_uses[0] % 2}.safetensors"
        uses, _ = store.resolve((LoraInput(path=url),))
        engine.loras = LoraBank(device, engine.dtype)
        engine.generate([replace(plain, loras=uses)])

    switch = [a, b]
    variants: dict[str, Callable[[], object]] = {
        "plain": lambda: engine.generate([plain]),
        "lora cached": lambda: engine.generate([replace(plain, loras=(a,))]),
        "lora switch": lambda: (switch.reverse(),
                                engine.generate([replace(plain, loras=(switch[0],))])),
        "lora first use": first_use,
        "weighted prompt": lambda: engine.generate([replace(
            plain, prompt="a photograph of an (astronaut:1.3) riding a [horse] on the moon",
            weighted=True)]),
        "embedding": lambda: engine.generate([replace(
            plain, prompt=PROMPT + ", <s0> <s1>", embeddings=(embedding,))]),
    }
    for variant in variants.values():  # once each: compel built, LoRAs loaded, kernels warm
        variant()
    engine.loras = LoraBank(device, engine.dtype)
    variants["lora cached"]()
    variants["lora switch"]()
    variants["lora switch"]()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, variant in variants.items():
            if name == "lora first use":
                cached = engine.loras
                times[name].append(timed(device, variant))
                engine.loras = cached
            else:
                times[name].append(timed(device, variant))
    server.shutdown()
    # The cached LoRA's own cost, without a generation around it: merge into the weights and
    # restore them (what each batch with that LoRA pays), median of 20.
    pipe = engine.pipes[4]

    def merge_restore() -> None:
        with engine.loras.merged(4, pipe, (a,)):
            pass

    merge_s = statistics.median(timed(device, merge_restore) for _ in range(20))
    base = statistics.median(times["plain"])
    size_mb = files[0].stat().st_size / 1e6
    # Minimums too: on a shared machine other processes only ever add time, so the fastest
    # round is the best estimate of a variant's own cost.
    low = min(times["plain"])
    results = {name: {"median_s": statistics.median(t), "ratio": statistics.median(t) / base,
                      "min_s": min(t), "min_ratio": min(t) / low}
               for name, t in times.items()}
    print(f"{device} {side}x{side}, 4 steps, LoRA rank {args.rank} ({size_mb:.1f} MB), "
          f"{args.rounds} rounds (median, fastest):")
    for name, row in results.items():
        print(f"  {name:16s} {row['median_s'] * 1000:9.1f} ms  x{row['ratio']:.3f}   "
              f"{row['min_s'] * 1000:9.1f} ms  x{row['min_ratio']:.3f}")
    added = results["lora cached"]["ratio"] - 1
    print(f"cached LoRA adds {added * 100:.1f} % (goal <= 10 %); its merge + restore alone: "
          f"{merge_s * 1000:.1f} ms = {merge_s / base * 100:.1f} % of a plain job")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "side": side, "rank": args.rank,
                                         "lora_mb": size_mb, "results": results,
                                         "merge_restore_s": merge_s}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
