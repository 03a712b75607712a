"""Cold-start benchmark: a fresh process loading the full-size model against reading its bytes.

Usage: ``python -m bench.coldstart [--device cpu|cuda] [--rounds 3] [--model-dir DIR]
[--warmup] [--fp32]``, from the repository root. Builds the full-size random-weight folder first
(``bench/full_model.py``, outside all timing; skipped when complete), then runs, in shuffled
order within each round, with the page cache warm (files read once just before) and cold (the
model files evicted with ``posix_fadvise(DONTNEED)``, checked with ``fincore``: only this
folder's pages, so other users of the shared machine keep theirs; ``drop_caches`` would evict
everything):

- load: a fresh ``python -c`` (run in the repository root, so it imports the worker from there)
  importing the worker's loading code (``worker.startup``, which imports ``pipeline``), then
  ``pipeline.Engine.load(ModelSpec(steps=(4,)), DIR, device, fp16)``, what ``worker.startup.start``
  runs after its file checks; ``--warmup`` adds ``Engine.warm_up`` (one 512² image; on a CPU this
  takes minutes with the full model, so it is off there by default and on for ``cuda``).
  fp16 on the CPU too, so the bytes read are the GPU path's (7.1 GB; the worker's own CPU choice,
  fp32, also converts them). On the CPU ``safetensors`` may leave tensors mapped, not read:
  ``touch`` then reads one element per 4 KiB page of every tensor, so all bytes are resident,
  as after a GPU copy. On cuda, load includes the copy to the GPU (synchronized).
- load with prefetch (cold cache only): the same, plus a thread started before the heavy imports
  that reads the model files, in load order, into the page cache: the worker's own
  ``worker.prefetch.start``, which ``handler.py`` starts before its heavy imports.
- read: a fresh ``python -c`` reading the same files in 16 MiB chunks, and ``cat FILES``.

Goal: start-to-ready <= import + 1.5 x read (+ warm-up, when on), i.e. everything after the
imports but the warm-up (load, touch, interpreter start) within 1.5x of reading the bytes.
Prints the runs and one table of medians over the rounds. ~3 min on a 2-core CPU for 3 rounds
(with ``--fp32``); the folder takes ~15 s to build once. ``--fp32`` adds one warm-cache fp32 CPU
load if the machine has the RAM for it (~15 GB available).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from bench import full_model
from worker.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent  # the children run here: the worker's imports

CHUNK = 16 << 20
LOAD_CHILD = textwrap.dedent("""
    import json, sys, threading, time
    t0 = time.perf_counter()
    if {prefetch!r}:  # the worker's own start-up prefetch (handler.py starts it first)
        from worker import prefetch
        from pathlib import Path as _P
        prefetch.start([_P(f) for f in {files!r}])
    import torch, worker.startup, pipeline
    from pathlib import Path
    from worker.spec import ModelSpec
    t1 = time.perf_counter()
    device, dtype = torch.device({device!r}), getattr(torch, {dtype!r})
    model = pipeline.Engine.load(ModelSpec(steps=(4,)), Path({model_dir!r}), device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t2 = time.perf_counter()
    if device.type == "cpu":  # one element per 4 KiB page: the bytes become resident
        pipe = model.pipes[4]
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            for t in getattr(pipe, name).state_dict().values():
                flat = t.reshape(-1)
                flat[::max(1, 4096 // flat.element_size())].float().sum()
    t3 = time.perf_counter()
    if {warmup!r}:
        model.warm_up()
        sync()
    t4 = time.perf_counter()
    ready = time.time()
    import psutil
    print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, touch_s=t3 - t2, warmup_s=t4 - t3,
                          ready_epoch=ready, rss_gb=psutil.Process().memory_info().rss / 1e9)))
""")
READ_CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    buf, n = bytearray({chunk}), 0
    for path in sys.argv[1:]:
        with open(path, "rb", buffering=0) as f:
            while (k := f.readinto(buf)):
                n += k
    print(json.dumps(dict(read_s=time.perf_counter() - t0, bytes=n)))
""")


def model_files_of(model_dir: Path) -> list[Path]:
    """The files ``pipeline.Engine.load`` reads for the 4-step checkpoint, in its order (UNet
    last)."""
    order = ("scheduler", "unet/", "tokenizer", "text_encoder", "vae", "sdxl_lightning")
    paths = [f.path for f in ModelSpec(steps=(4,)).files()]
    return [model_dir / p for p in sorted(paths, key=lambda p: (
        next(i for i, name in enumerate(order) if p.startswith(name)), p))]


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of ``files`` in the page cache (``fincore``), or None without it."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES",
                          *map(str, files)], capture_output=True, text=True, check=True)
    return sum(int(line) for line in out.stdout.split())


def set_cache(files: list[Path], warm: bool) -> None:
    """Warm: read every file once. Cold: evict exactly these files' pages."""
    for path in files:
        if warm:
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(CHUNK)
                while f.readinto(buf):
                    pass
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def child(code: str, *args: str, timeout: float | None = None) -> tuple[float, dict[str, float]]:
    """Wall seconds of a fresh interpreter running ``code``, and the JSON it printed last
    (``subprocess.TimeoutExpired`` past ``timeout`` seconds: the child is killed)."""
    started, epoch = time.perf_counter(), time.time()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
                          timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "ready_epoch" in out:  # start to ready, without the exit (unmapping 7 GB takes ~1 s)
        out["ready_s"] = out.pop("ready_epoch") - epoch
    return wall, out


def measure(kind: str, files: list[Path], args: argparse.Namespace,
            dtype: str = "float16", timeout: float | None = None) -> dict[str, float]:
    """One fresh-process measurement: load, load+prefetch, read (python) or cat."""
    if kind in ("load", "prefetch"):
        code = LOAD_CHILD.format(device=args.device, dtype=dtype,
                                 model_dir=str(args.model_dir), warmup=args.warmup,
                                 prefetch=kind == "prefetch", files=list(map(str, files)))
        return child(code, timeout=timeout)[1]
    if kind == "read":
        return child(READ_CHILD.format(chunk=CHUNK), *map(str, files), timeout=timeout)[1]
    started = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True,
                   timeout=timeout)
    return {"cat_s": time.perf_counter() - started}


def run_rounds(args: argparse.Namespace, files: list[Path]) -> dict[str, list[dict]]:
    """Every (cache, measurement) cell once per round, cells shuffled within a round."""
    cells = [("warm", k) for k in ("load", "read", "cat")] + [
        ("cold", k) for k in ("load", "prefetch", "read", "cat")]
    results: dict[str, list[dict]] = {f"{c}/{k}": [] for c, k in cells}
    shuffle = random.Random(0).shuffle
    for r in range(args.rounds):
        shuffle(cells)
        for cache, kind in cells:
            set_cache(files, warm=cache == "warm")
            resident = resident_bytes(files)
            res = measure(kind, files, args)
            if resident is not None:
                res["cached_before_gb"] = resident / 1e9
            results[f"{cache}/{kind}"].append(res)
            print(f"round {r + 1} {cache:4} {kind:8} "
                  + " ".join(f"{k}={v:.2f}" for k, v in res.items() if k != "bytes"),
                  flush=True)
    return results


def print_table(results: dict[str, list[dict]], total_bytes: int, args: argparse.Namespace) -> None:
    def med(cell: str, key: str) -> float:
        return statistics.median(r[key] for r in results[cell])

    what = "load + touch" if args.device == "cpu" else "load (to the GPU, synchronized)"
    print(f"\n{args.device}, fp16, {total_bytes / 1e9:.2f} GB of model files, medians of "
          f"{args.rounds} rounds; load = pipeline.Engine.load, compared as {what}; ready = process "
          f"start to loaded{' and warmed' if args.warmup else ''}; goal: ready <= import + "
          f"1.5 x read{' + warm-up' if args.warmup else ''}")
    print("| cache | start-up | import s | load s | touch s | warm-up s | start→ready s | read s "
          "| cat s | read GB/s | (ready − import − warm-up) / read | goal ≤ 1.5 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for cache, kind in (("warm", "load"), ("cold", "load"), ("cold", "prefetch")):
        cell = f"{cache}/{kind}"
        read = med(f"{cache}/read", "read_s")
        ratio = statistics.median(r["ready_s"] - r["import_s"] - r["warmup_s"]
                                  for r in results[cell]) / read
        warmup = f"{med(cell, 'warmup_s'):.2f}" if args.warmup else "off"
        label = "load, no prefetch" if kind == "load" else "load + prefetch.py (worker)"
        print(f"| {cache} | {label} | "
              f"{med(cell, 'import_s'):.2f} | {med(cell, 'load_s'):.2f} | "
              f"{med(cell, 'touch_s'):.2f} | {warmup} | {med(cell, 'ready_s'):.2f} | {read:.2f} | "
              f"{med(f'{cache}/cat', 'cat_s'):.2f} | {total_bytes / read / 1e9:.2f} | "
              f"{ratio:.2f} | {'met' if ratio <= 1.5 else 'NOT met'} |")


def fp32_load(args: argparse.Namespace, files: list[Path]) -> None:
    """One warm-cache fp32 CPU load (the worker's CPU default), only if RAM allows."""
    need = 15e9  # fp32 copies of 3.47 B parameters (13.9 GB) plus the interpreter
    avail = psutil.virtual_memory().available
    if avail < need * 1.25:
        print(f"\nfp32: skipped, {avail / 1e9:.1f} GB available < {need * 1.25 / 1e9:.1f} GB")
        return
    set_cache(files, warm=True)
    res = measure("load", files, argparse.Namespace(**{**vars(args), "device": "cpu",
                                                       "warmup": False}), "float32")
    print(f"\nfp32 CPU load, warm cache (1 run): import {res['import_s']:.2f} s, load "
          f"{res['load_s']:.2f} s, touch {res['touch_s']:.2f} s, RSS {res['rss_gb']:.1f} GB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sdxl-lightning-full"))
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="time Engine.warm_up too (default: on for cuda, off for cpu)")
    parser.add_argument("--fp32", action="store_true", help="also one fp32 CPU load")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = args.device == "cuda"
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    full_model.build(args.model_dir)
    files = model_files_of(args.model_dir)
    total = sum(p.stat().st_size for p in files)
    print(f"{len(files)} files, {total / 1e9:.2f} GB; {psutil.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}", flush=True)
    results = run_rounds(args, files)
    print_table(results, total, args)
    if args.fp32:
        fp32_load(args, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
