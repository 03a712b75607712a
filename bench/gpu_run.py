"""GPU numbers in one command: the GPU benchmarks of ``bench/`` in one run within a time limit.

Usage, on the GPU machine: ``bash bench/gpu/run.sh --out DIR`` (it installs the wheels that
``bench/gpu/wheels.sh`` fetched, then runs this); where the worker's packages are installed:
``python -m bench.gpu_run --out DIR [--device cpu --tiny]``. ``--device cpu --tiny`` runs every
part on the tiny model in about a minute (tests/e2e/test_gpu_bench_cpu.py), so the GPU run
cannot fail on a typo; its figures say nothing about a GPU.

Parts, in this order. Each has a time window (``Profile.parts``: a cap, and the least time it
needs): its cap, or less where the time left minus the least of every later part is shorter,
so an earlier part cannot starve a later one; a part whose window is below its least is skipped
with a note, and a part that loops starts no new round past its window. The clock starts at
``--started-at`` (run.sh's own start, so the install counts) and the whole run ends by
``--budget-s`` after it (450 s: under 8 minutes).

1. model: the full-size random SDXL-Lightning folder (``bench/full_model.py``; 7.1 GB, fp16
   UNet and encoders), or the tiny one.
2. start: ``import handler``, the worker's own start (settings, load, warm-up), timed; the
   worker's log goes to ``worker.log`` beside the results.
3. recipes (``bench/throughput.py``): ours, ours + TAESDXL and the plain model-card recipe, as
   the card writes it, at batch 1 and 4, interleaved rounds, synchronized; FLOP-floor fraction
   with each row's own decoder.
4. sweep: jobs through ``handler.handler`` at concurrency 1, 2, 4 (images/s, p50/p95 latency).
5. compile: a fresh process (``--compile-child``): the same engine eager at batch 1, then
   ``Engine.compile`` (the worker's ``COMPILE=true`` path, one size, fresh inductor and Triton
   caches), then compiled; the speed-up is eager / compiled. Killed at its window's end, with
   what it measured by then.
6. coldstart (``bench/coldstart.py``): fresh processes with the page cache cold (load with the
   worker's prefetch, as ``handler`` starts it) and warm (load), each with ``warm_up``, and
   plain reads of the same files.

After every part it writes ``gpu-results.json`` (every figure as ``{"value", "unit"}``, with the
torch, CUDA, diffusers and driver versions and the GPU's name) and ``gpu-results.md`` (the tables
for bench/RESULTS.md) into ``--out``, so a run cut short keeps what it measured. At the end it
prints the goal checks as PASS/FAIL lines with the measured ratio (N/A off the full model on
CUDA at 1024²). Exit status 1 if a part failed, 2 if a package is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON, RESULTS_MD, WORKER_LOG = "gpu-results.json", "gpu-results.md", "worker.log"
# Import names the run needs; a missing one stops it before anything heavy is loaded. boto3 is
# left to the start part to report: once worker/outputs/upload.py imports it only for a bucket,
# wheels.sh may leave it out (SKIP).
NEEDED = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub",
          "tokenizers", "numpy", "PIL", "psutil", "pydantic", "runpod", "fpng", "pybase64")
VERSIONS = ("torch", "diffusers", "transformers", "tokenizers", "accelerate", "safetensors",
            "huggingface_hub", "numpy", "pillow", "pydantic", "runpod", "boto3", "fpng",
            "pybase64", "triton")
RESERVE_S = 10.0  # kept back from every part for writing the results and exiting
PART_NAMES = ("model", "start", "recipes", "sweep", "compile", "coldstart")
REQUIRED = ("model", "start")  # the parts every later part needs


@dataclass(frozen=True)
class Profile:
    """What one run measures: sizes, rounds and each part's (cap s, least time left s)."""

    model: str
    size: int
    batches: tuple[int, ...]
    recipe_rounds: int
    concurrency: tuple[int, ...]
    jobs: int
    sweep_rounds: int
    compile_rounds: int
    budget_s: float
    parts: dict[str, tuple[float, float]]


PROFILES = {
    # 16 jobs per level: 4 full GPU batches at concurrency 4; 3 rounds for a median.
    "full": Profile(model="full", size=1024, batches=(1, 4), recipe_rounds=5,
                    concurrency=(1, 2, 4), jobs=16, sweep_rounds=3, compile_rounds=5,
                    budget_s=450.0,
                    parts={"model": (150, 0), "start": (90, 0), "recipes": (90, 30),
                           "sweep": (75, 25), "compile": (400, 120), "coldstart": (90, 60)}),
    # The same code on the tiny model, small counts (about a minute on 2 cores): it checks the
    # plumbing, not speed; batch 2 takes the batched paths that batch 4 takes on the GPU.
    "tiny": Profile(model="tiny", size=512, batches=(1, 2), recipe_rounds=1,
                    concurrency=(1, 2, 4), jobs=4, sweep_rounds=1, compile_rounds=1,
                    budget_s=900.0,
                    parts={"model": (120, 0), "start": (120, 0), "recipes": (120, 10),
                           "sweep": (120, 10), "compile": (300, 10), "coldstart": (240, 10)}),
}


def fig(value: float | None, unit: str) -> dict[str, Any] | None:
    """One measured figure with its unit (None when not measured)."""
    return None if value is None else {"value": round(float(value), 6), "unit": unit}


def val(figure: dict[str, Any] | None) -> float | None:
    return None if figure is None else figure["value"]


class Gate:
    """``more()`` for a loop of rounds: True while another round, as long as the longest so
    far, ends before ``deadline`` (epoch seconds)."""

    def __init__(self, deadline: float) -> None:
        self.deadline, self.last, self.longest = deadline, time.time(), 0.0

    def __call__(self) -> bool:
        now = time.time()
        self.longest, self.last = max(self.longest, now - self.last), now
        return now + self.longest < self.deadline


@dataclass
class Part:
    """One part's time window."""

    name: str
    deadline: float  # epoch seconds: its cap, or the run's end if sooner

    def left(self) -> float:
        return self.deadline - time.time()


# ---------------------------------------------------------------- environment


def missing_packages() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def nvidia_smi() -> dict[str, str]:
    """Name, driver and memory as nvidia-smi reports them ({} without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    name, driver, memory = (part.strip() for part in out.split(","))
    return {"name": name, "driver": driver, "memory": memory}


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "device": device,
        "versions": {name: package_version(name) for name in VERSIONS},
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
        if torch.backends.cudnn.is_available() else None,
        "git_commit": git_commit(), "wheels_installed": os.environ.get("GPU_BENCH_WHEELS", ""),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        smi = nvidia_smi()
        env["gpu"] = {"name": torch.cuda.get_device_name(0),
                      "memory": fig(props.total_memory / 2**30, "GiB"),
                      "multiprocessors": props.multi_processor_count,
                      "capability": f"{props.major}.{props.minor}",
                      "driver": smi.get("driver"), "nvidia_smi_name": smi.get("name")}
    return env


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # the device machine gets a copy of the tree, maybe without .git


# ---------------------------------------------------------------- the parts


class Run:
    """The run's state: arguments, clock, results so far, and the worker once started."""

    def __init__(self, args: argparse.Namespace, profile: Profile) -> None:
        self.args, self.profile = args, profile
        self.deadline = args.started_at + (args.budget_s or profile.budget_s)
        self.out: Path = args.out
        self.model_dir: Path | None = None
        self.handler: Any = None
        self.results: dict[str, Any] = {
            "environment": {}, "settings": {
                **{k: v for k, v in asdict(profile).items() if k not in ("parts", "budget_s")},
                "part_budgets": {k: {"cap": fig(c, "s"), "least_left": fig(m, "s")}
                                 for k, (c, m) in profile.parts.items()},
                "device": args.device, "backend": args.backend,
                "budget": fig(self.deadline - args.started_at, "s"),
                "started_at_epoch": args.started_at,
                "command": " ".join(["python -m bench.gpu_run", *sys.argv[1:]])},
            "parts": {}, "goals": []}

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.results["goals"] = goals(self.results)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / RESULTS_JSON).write_text(json.dumps(self.results, indent=1) + "\n")
        (self.out / RESULTS_MD).write_text(markdown(self.results))

    def part(self, name: str, fn: Callable[[Part], dict[str, Any]]) -> bool:
        """Run one part in its window (or skip it with the reason); record and save.

        The window: the part's cap, or less where the time left, minus the least that each
        later part asked for needs, is shorter; so an earlier part cannot starve a later one.
        """
        cap, least = self.profile.parts[name]
        later = PART_NAMES[PART_NAMES.index(name) + 1:]
        kept = sum(self.profile.parts[p][1] for p in later if p in self.args.parts)
        left = self.left() - RESERVE_S - kept
        needs = [r for r in REQUIRED if r != name and PART_NAMES.index(r) < PART_NAMES.index(name)
                 and self.results["parts"].get(r, {}).get("status") != "ran"]
        record: dict[str, Any] = {"status": "skipped", "seconds": None, "note": ""}
        if needs:
            record["note"] = f"needs the {', '.join(needs)} part"
        elif name not in self.args.parts and name not in REQUIRED:
            record["note"] = "not asked for (--parts)"
        elif left < least and name not in REQUIRED:
            record["note"] = (f"{left:.0f} s left of the run's budget ({kept:.0f} s more kept "
                              f"for the parts after it), below the {least:.0f} s this part "
                              f"needs")
        else:
            print(f"\n== {name}: budget {max(min(cap, left), 0):.0f} s ({self.left():.0f} s "
                  f"left)", flush=True)
            started = time.time()
            try:
                record.update(fn(Part(name, started + max(min(cap, left), 0))))
                record["status"] = "failed" if record.get("error") else "ran"
                record["note"] = record.get("error") or record["note"]
            except Exception as exc:  # noqa: BLE001 - the other parts still run and report
                record.update(status="failed", note=f"{type(exc).__name__}: {exc}"[:2000])
                traceback.print_exc()
            record["seconds"] = fig(time.time() - started, "s")
        if record["status"] != "ran":
            print(f"\n== {name}: {record['status'].upper()} ({record['note']})", flush=True)
        self.results["parts"][name] = record
        self.save()
        if record["status"] == "ran":
            print(markdown_part(name, record), flush=True)
        return record["status"] == "ran"


def part_model(run: Run, part: Part) -> dict[str, Any]:
    from bench import throughput

    run.model_dir = throughput.build_model(run.args.device, run.profile.model, run.args.model_dir)
    size = sum(f.stat().st_size for f in run.model_dir.rglob("*") if f.is_file())
    return {"folder": str(run.model_dir), "bytes": fig(size / 1e6, "MB")}


def part_start(run: Run, part: Part) -> dict[str, Any]:
    from bench import throughput

    started = time.perf_counter()
    run.handler = throughput.start_handler(run.args.device, run.model_dir,
                                           log_path=run.out / WORKER_LOG)
    seconds = time.perf_counter() - started
    engine = run.handler.ENGINE
    return {"import_handler": fig(seconds, "s"), "engine_device": str(engine.device),
            "engine_dtype": str(engine.dtype).removeprefix("torch."),
            "note": "in-process start: imports (torch, diffusers, runpod), settings, "
                    "Engine.load, warm_up (one 512² image), GPU queue"}


def part_recipes(run: Run, part: Part) -> dict[str, Any]:
    import torch

    from bench import throughput

    p = run.profile
    times = throughput.recipes(run.handler, p.size, list(p.batches), p.recipe_rounds,
                               more=Gate(part.deadline))
    if run.handler.ENGINE.device.type == "cuda":
        torch.cuda.empty_cache()  # the plain pipeline's memory, for the parts after this
    medians = {cell: statistics.median(t) for cell, t in times.items()}
    full = p.model == "full"
    rows = []
    for (recipe, batch), seconds in sorted(medians.items(), key=lambda kv: (kv[0][1],
                                                                              kv[0][0])):
        per_image = seconds / batch
        floor = throughput.floor_seconds(p.size, throughput.decoder_of(recipe)) if full else None
        rows.append({
            "recipe": recipe, "batch": batch, "decoder": throughput.decoder_of(recipe),
            "rounds": len(times[(recipe, batch)]), "s_per_batch": fig(seconds, "s"),
            "images_per_s": fig(batch / seconds, "images/s"),
            "ms_per_image": fig(per_image * 1e3, "ms"),
            "vs_plain": fig(medians[("plain", batch)] / seconds, "x")
            if recipe != "plain" else None,
            "flop_floor_ms": fig(floor * 1e3 if floor else None, "ms"),
            "fraction_of_floor": fig(floor / per_image if floor else None, "fraction")})
    return {"rows": rows, "size": p.size, "steps": 4,
            "practical_tflops": fig(throughput.PRACTICAL_TFLOPS, "TFLOP/s"),
            "note": "median of interleaved rounds after one untimed call of each"
                    + ("; torch.cuda.synchronize around each call"
                       if run.handler.ENGINE.device.type == "cuda" else "")
                    + ("" if full else "; FLOP floor n/a: not the SDXL architecture")}


def part_sweep(run: Run, part: Part) -> dict[str, Any]:
    from bench import throughput

    p = run.profile
    data = throughput.sweep(run.handler, list(p.concurrency), p.jobs, p.sweep_rounds, p.size,
                            more=Gate(part.deadline))
    base = statistics.median(data[min(data)]["rates"])
    rows = []
    for c in sorted(data):
        cell = data[c]
        median = statistics.median(cell["rates"])
        lat = cell["latencies"] or [float("nan")]
        rows.append({"concurrency": c, "rounds": len(cell["rates"]), "jobs": cell["jobs"],
                     "images_per_s": fig(median, "images/s"),
                     "vs_lowest": fig(median / base, "x"),
                     "p50_latency": fig(throughput.percentile(lat, 0.5), "s"),
                     "p95_latency": fig(throughput.percentile(lat, 0.95), "s"),
                     "jobs_per_gpu_batch": fig(cell["jobs"] / max(cell["batches"], 1), "jobs"),
                     "failed_jobs": len(cell["errors"]),
                     "first_error": cell["errors"][0] if cell["errors"] else None})
    failed = sum(r["failed_jobs"] for r in rows)
    error = (f"{failed} job(s) failed (first: "
             f"{next(r['first_error'] for r in rows if r['first_error'])}); tracebacks in "
             f"{WORKER_LOG}") if failed else None
    return {"rows": rows, "size": p.size, "steps": 4, "output": "png", "error": error,
            "note": f"{p.jobs} jobs per level and round through handler.handler, at most "
                    f"`concurrency` in flight; images/s: median over rounds; latency: all "
                    f"rounds pooled"}


def part_coldstart(run: Run, part: Part) -> dict[str, Any]:
    from bench import coldstart

    files = coldstart.model_files_of(run.model_dir)
    total = sum(f.stat().st_size for f in files)
    child_args = argparse.Namespace(device=run.args.device, model_dir=run.model_dir, warmup=True)
    dtype = "float16" if run.args.device == "cuda" else "float32"  # the worker's own dtypes
    cells: dict[str, dict[str, Any]] = {}
    cut = ""
    # Cold first: the worker's own start (cold cache, prefetch) is the figure that matters.
    for cache, kind in (("cold", "read"), ("cold", "prefetch"), ("warm", "read"),
                        ("warm", "load")):
        if part.left() < 5:
            cut = f"; CUT at the part's budget before {cache}/{kind}"
            break
        coldstart.set_cache(files, warm=cache == "warm")
        resident = coldstart.resident_bytes(files)
        print(f"coldstart: {cache} {kind} ...", flush=True)
        try:
            res = coldstart.measure(kind, files, child_args, dtype, timeout=part.left())
        except subprocess.TimeoutExpired:
            cut = f"; CUT at the part's budget during {cache}/{kind}"
            break
        cells[f"{cache}/{kind}"] = {
            **{key: fig(value, "s") for key, value in res.items()
               if key.endswith("_s")},
            "cached_before": fig(resident / 1e9 if resident is not None else None, "GB"),
            "rss": fig(res.get("rss_gb"), "GB")}
    rows = []
    for cache, kind in (("warm", "load"), ("cold", "prefetch")):
        cell, read = cells.get(f"{cache}/{kind}"), cells.get(f"{cache}/read")
        if cell is None:
            continue
        ratio = None
        if read is not None:
            ratio = (val(cell["ready_s"]) - val(cell["import_s"]) - val(cell["warmup_s"])) / \
                val(read["read_s"])
        rows.append({"cache": cache, "start": "load, no prefetch" if kind == "load"
                     else "load + prefetch (as the worker starts)", **cell,
                     "read_s": read["read_s"] if read else None,
                     "ratio_to_read": fig(ratio, "x")})
    if not rows:
        raise RuntimeError("no cold-start cell finished within the part's budget")
    return {"rows": rows, "files": len(files), "bytes": fig(total / 1e9, "GB"),
            "cells_run": sorted(cells),
            "note": "fresh processes, 1 round; load = pipeline.Engine.load"
                    + (" (to the GPU, synchronized)" if run.args.device == "cuda" else
                       " (+ touching every page)") + ", then Engine.warm_up (one 512² image); "
                    "ratio = (ready - import - warm-up) / read" + cut}


def part_compile(run: Run, part: Part) -> dict[str, Any]:
    p = run.profile
    cache = tempfile.mkdtemp(prefix="inductor-cache-")  # a cold compile, whatever ran before
    argv = [sys.executable, "-m", "bench.gpu_run", "--compile-child", "--out", str(run.out),
            "--device", run.args.device, "--backend", run.args.backend,
            "--model-dir", str(run.model_dir), "--size", str(p.size),
            "--rounds", str(p.compile_rounds)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": f"{cache}/triton",
           "PYTHONUNBUFFERED": "1"}
    timeout = max(part.left(), 1.0)
    cut = False
    # A process group of its own: at the deadline the child and inductor's compile workers go
    # together, none left compiling into the next part.
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        cut = True
    error = None if cut or proc.returncode == 0 else (
        f"compile child failed ({proc.returncode}): {stderr.strip()[-1500:]}")
    got: dict[str, Any] = {}
    for line in stdout.splitlines():  # one JSON object per step, as the child got there
        if line.startswith("{"):
            got.update(json.loads(line))
    eager = statistics.median(got["eager_s"]) if got.get("eager_s") else None
    compiled = statistics.median(got["compiled_s"]) if got.get("compiled_s") else None
    note = (f"backend {run.args.backend}, {p.size}² batch 1, 4 steps, fresh inductor and "
            f"Triton caches; eager then compiled in one fresh process (Engine.compile: the "
            f"worker's COMPILE=true path, the UNet compiled, the VAE decode not); times per "
            f"image, decode included; medians of {p.compile_rounds}")
    if got.get("graphs_compiled_while_timing"):
        note += f"; {got['graphs_compiled_while_timing']} graph(s) RECOMPILED while timing"
    if cut:
        note += f"; CUT at the part's budget ({timeout:.0f} s) after: {', '.join(got) or '-'}"
    return {"load": fig(got.get("load_s"), "s"),
            "eager_batch1": fig(eager, "s"),
            "compile_and_warm_up": fig(got.get("compile_s"), "s"),
            "first_compiled_call": fig(got.get("first_compiled_s"), "s"),
            "compiled_batch1": fig(compiled, "s"),
            "speedup": fig(eager / compiled if eager and compiled else None, "x"),
            "graphs_after_compile": got.get("graphs_after_compile"),
            "graphs_compiled_while_timing": got.get("graphs_compiled_while_timing"),
            "cut_at_budget": cut, "backend": run.args.backend, "size": p.size, "note": note,
            "error": error}


def compile_child(args: argparse.Namespace) -> int:
    """The compile part's process: one JSON line per step, so a cut run keeps what it got."""
    import torch

    import pipeline
    from bench.throughput import PROMPT
    from worker.engine.loading import placement
    from worker.plan import Plan
    from worker.spec import ModelSpec

    device, dtype = placement(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def emit(**values: Any) -> None:
        print(json.dumps(values), flush=True)

    started = time.perf_counter()
    engine = pipeline.Engine.load(ModelSpec(steps=(4,)), args.model_dir, device, dtype)
    sync()
    emit(load_s=time.perf_counter() - started)
    plan = Plan(prompt=PROMPT, negative_prompt=None, width=args.size, height=args.size, steps=4,
                guidance_scale=0.0, seeds=(0,))

    def timed() -> float:
        sync()
        t0 = time.perf_counter()
        engine.run_batch([plan])
        sync()
        return time.perf_counter() - t0

    def graphs() -> int:  # dynamo's count of graphs compiled: growth while timing = recompiles
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    timed()  # eager warm-up
    emit(eager_s=[timed() for _ in range(args.rounds)])
    emit(compile_s=engine.compile([(args.size, args.size)], None, args.backend))
    before = graphs()
    emit(first_compiled_s=timed())
    emit(compiled_s=[timed() for _ in range(args.rounds)])
    emit(graphs_after_compile=before, graphs_compiled_while_timing=graphs() - before)
    return 0


# ---------------------------------------------------------------- goals and tables

GOAL_NOTE = "goals apply to the full-size model on CUDA at 1024²"


def _cell(results: dict[str, Any], recipe: str, batch: int) -> dict[str, Any] | None:
    rows = results["parts"].get("recipes", {}).get("rows", [])
    return next((r for r in rows if r["recipe"] == recipe and r["batch"] == batch), None)


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The speed goals from what was measured: PASS/FAIL on the full model on CUDA at 1024²,
    N/A elsewhere (still with the measured figure), SKIP where its part did not run; INFO rows
    carry the figures with no threshold (FLOP-floor fraction, compile speed-up)."""
    settings, parts = results["settings"], results["parts"]
    judged = settings["device"] == "cuda" and settings["model"] == "full" and \
        settings["size"] == 1024
    out: list[dict[str, Any]] = []

    def add(goal: str, part: str, measured: dict[str, Any] | None, op: str | None,
            threshold: float | None) -> None:
        if parts.get(part, {}).get("status") != "ran":
            verdict = "SKIP"
        elif measured is None or (not judged and op is not None):
            verdict = "N/A"  # the figure does not exist here (no FLOP floor off SDXL), or no goal
        elif op is None:
            verdict = "INFO"
        else:
            ok = val(measured) >= threshold if op == ">=" else val(measured) <= threshold
            verdict = "PASS" if ok else "FAIL"
        out.append({"goal": goal, "part": part, "measured": measured, "op": op,
                    "threshold": fig(threshold, measured["unit"]) if measured and threshold
                    is not None else None, "verdict": verdict})

    for batch in settings["batches"]:
        row = _cell(results, "ours", batch)
        add(f"ours vs the plain model-card recipe, images/s, batch {batch}", "recipes",
            row and row["vs_plain"], ">=", 2.0)
    row = _cell(results, "ours", 1)
    add(f"one {settings['size']}² image, ours, batch 1", "recipes",
        row and row["ms_per_image"], "<=", 200.0)
    rows = parts.get("sweep", {}).get("rows", [])
    best = max(rows, key=lambda r: val(r["images_per_s"]), default=None)
    add("images/s under load (handler, best concurrency"
        + (f" = {best['concurrency']})" if best else ")"), "sweep",
        best and best["images_per_s"], ">=", 6.0)
    rows = parts.get("coldstart", {}).get("rows", [])
    cold = next((r for r in rows if r["cache"] == "cold"), None)
    add("cold start with prefetch: (ready - import - warm-up) / read", "coldstart",
        cold and cold["ratio_to_read"], "<=", 1.5)
    largest = max(settings["batches"])
    for recipe, batch in (("ours", 1), ("ours", largest), ("ours + TAESDXL", 1), ("plain", 1)):
        row = _cell(results, recipe, batch)
        add(f"fraction of the FLOP floor, {recipe}, batch {batch}", "recipes",
            row and row["fraction_of_floor"], None, None)
    add("torch.compile speed-up, batch 1 (eager / compiled)", "compile",
        parts.get("compile", {}).get("speedup"), None, None)
    add("torch.compile + warm-up time", "compile",
        parts.get("compile", {}).get("compile_and_warm_up"), None, None)
    return out


def goal_line(goal: dict[str, Any]) -> str:
    measured = goal["measured"]
    text = f"{goal['verdict']:4} {goal['goal']}: "
    text += "not measured" if measured is None else _show(measured)
    if goal["threshold"] is not None:
        text += f" (goal {goal['op']} {_show(goal['threshold'])})"
    if goal["verdict"] == "N/A" and goal["op"] is not None:
        text += f" [{GOAL_NOTE}]"
    return text


def _show(figure: dict[str, Any] | None, digits: int = 2) -> str:
    if figure is None:
        return "-"
    value, unit = figure["value"], figure["unit"]
    if unit == "fraction":
        return f"{value:.0%}"
    if unit == "x":
        return f"{value:.{digits}f}x"
    return f"{value:.{digits}f} {unit}"


def _num(figure: dict[str, Any] | None, digits: int = 2) -> str:
    """A figure's number alone, for a table whose header names the unit."""
    return "-" if figure is None else f"{figure['value']:.{digits}f}"


def markdown_part(name: str, record: dict[str, Any]) -> str:
    """One part's table, as bench/RESULTS.md shows it."""
    n, s = _num, _show
    lines: list[str] = []
    if name == "recipes":
        lines += [f"Recipes, {record['size']}², 4 steps ({record['note']}); FLOP floor at "
                  f"{s(record['practical_tflops'], 0)}:", "",
                  "| recipe | batch | rounds | s per batch | images/s | ms per image | vs plain |"
                  " FLOP floor ms | fraction of floor |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['recipe']} | {r['batch']} | {r['rounds']} | {n(r['s_per_batch'], 3)} | "
                  f"{n(r['images_per_s'])} | {n(r['ms_per_image'], 1)} | {s(r['vs_plain'])} | "
                  f"{n(r['flop_floor_ms'], 0) if r['flop_floor_ms'] else 'n/a'} | "
                  f"{s(r['fraction_of_floor']) if r['fraction_of_floor'] else 'n/a'} |"
                  for r in record["rows"]]
    elif name == "sweep":
        lines += [f"Handler sweep, {record['size']}², 4 steps, png ({record['note']}):", "",
                  "| concurrency | rounds | images/s | vs lowest | p50 latency s | p95 latency s "
                  "| jobs per GPU batch | failed jobs |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['concurrency']} | {r['rounds']} | {n(r['images_per_s'])} | "
                  f"{s(r['vs_lowest'])} | {n(r['p50_latency'], 3)} | {n(r['p95_latency'], 3)} "
                  f"| {n(r['jobs_per_gpu_batch'])} | {r['failed_jobs']} |"
                  for r in record["rows"]]
    elif name == "coldstart":
        lines += [f"Cold start, {record['files']} files, {s(record['bytes'], 3)} "
                  f"({record['note']}):", "",
                  "| cache | start-up | import s | load s | warm-up s | start→ready s | read s | "
                  "(ready − import − warm-up) / read |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['cache']} | {r['start']} | {n(r.get('import_s'))} | "
                  f"{n(r.get('load_s'))} | {n(r.get('warmup_s'))} | {n(r.get('ready_s'))} | "
                  f"{n(r['read_s'])} | {s(r['ratio_to_read'])} |" for r in record["rows"]]
    elif name == "compile":
        lines += [f"torch.compile ({record['note']}):", "",
                  "| load s | eager s | compile + warm-up s | first compiled call s | "
                  "compiled s | speed-up |", "|---:|---:|---:|---:|---:|---:|",
                  f"| {n(record['load'])} | {n(record['eager_batch1'], 3)} | "
                  f"{n(record['compile_and_warm_up'], 1)} | "
                  f"{n(record['first_compiled_call'], 3)} | {n(record['compiled_batch1'], 3)} | "
                  f"{s(record['speedup'])} |"]
    elif name == "start":
        lines += [f"Worker start in-process (`import handler`): {s(record['import_handler'])} "
                  f"on {record['engine_device']}/{record['engine_dtype']} ({record['note']})."]
    elif name == "model":
        lines += [f"Model folder: {record['folder']}, {s(record['bytes'])}."]
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any]) -> str:
    env, settings = results["environment"], results["settings"]
    gpu = env.get("gpu") or {}
    versions = env.get("versions", {})
    head = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    lines = ["# GPU benchmark results (bench/gpu_run.py)", "",
             f"Device {settings['device']}"
             + (f": {gpu['name']}, {_show(gpu['memory'], 0)}, driver {gpu['driver']}, "
                f"capability {gpu['capability']}" if gpu else "")
             + f"; CUDA (torch) {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}; "
               f"Python {env.get('python')}; {env.get('cpus')} CPUs; {head}.",
             f"Model: {settings['model']} (random weights; timings do not depend on their "
             f"values), {settings['size']}², 4 steps. Commit {env.get('git_commit') or 'unknown'}"
             f". Command: `{settings['command']}`.", "",
             "## Goals", "", "| verdict | goal | measured | goal |", "|---|---|---:|---|"]
    for g in results["goals"]:
        threshold = f"{g['op']} {_show(g['threshold'])}" if g["threshold"] else "-"
        lines.append(f"| {g['verdict']} | {g['goal']} | {_show(g['measured'])} | {threshold} |")
    if settings["device"] != "cuda" or settings["model"] != "full":
        lines += ["", f"N/A: {GOAL_NOTE}; this run only exercised the code."]
    lines += ["", "## Parts", "", "| part | status | seconds | note |", "|---|---|---:|---|"]
    for name, record in results["parts"].items():
        note = record.get("note", "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {record['status']} | {_show(record.get('seconds'), 1)} | "
                     f"{note[:300]} |")
    for name, record in results["parts"].items():
        if record["status"] == "ran" and name not in ("model", "start"):
            lines += ["", f"## {name}", "", markdown_part(name, record).rstrip()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny model (a check of the code path, not of speed)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/sdxl-lightning-full"),
                        help="where the full-size model is built (skipped if complete)")
    parser.add_argument("--started-at", type=float, default=None,
                        help="epoch seconds the time budget counts from (default: now)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the whole run's time (default 450 full, 900 tiny)")
    parser.add_argument("--parts", default=",".join(PART_NAMES),
                        help=f"comma-separated subset of {','.join(PART_NAMES)}")
    parser.add_argument("--backend", default=None,
                        help="torch.compile backend (default: inductor on cuda, eager on cpu, "
                             "where inductor takes minutes)")
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.started_at = args.started_at or time.time()
    args.backend = args.backend or ("inductor" if args.device == "cuda" else "eager")
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if unknown := args.parts - set(PART_NAMES):
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from worker import runtime

    # Before anything imports huggingface_hub (bench/full_model.py does): offline mode and the
    # worker's quiet library defaults, for this process and every child. The GPU machine
    # reaches no hub; a library that tried would wait out its network timeouts.
    runtime.configure_libraries()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported anywhere
    if args.device == "cpu" and args.tiny:
        # One intra-op thread, here and in the children: on a shared 2-core machine two threads
        # per process oversubscribe the cores and spin, and the one-minute code check took 2.4
        # minutes at load 4 (36 s with one thread). Its figures are not speed figures anyway.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.compile_child:
        return compile_child(args)
    if missing := missing_packages():
        print(f"missing package(s): {', '.join(missing)}. On the GPU machine: run "
              f"bench/gpu/wheels.sh where PyPI is reachable, carry bench/gpu/wheels and start "
              f"with bench/gpu/run.sh (README in bench/RESULTS.md, 'GPU').", file=sys.stderr)
        return 2
    run = Run(args, PROFILES["tiny" if args.tiny else "full"])
    run.results["environment"] = environment(args.device)
    print(f"gpu_run: {run.profile.model} model on {args.device}, {run.left():.0f} s left of "
          f"the budget; results in {args.out}", flush=True)
    run.part("model", lambda part: part_model(run, part))
    run.part("start", lambda part: part_start(run, part))
    run.part("recipes", lambda part: part_recipes(run, part))
    run.part("sweep", lambda part: part_sweep(run, part))
    run.part("compile", lambda part: part_compile(run, part))
    run.part("coldstart", lambda part: part_coldstart(run, part))
    run.save()
    print("\ngoals:")
    for goal in run.results["goals"]:
        print(goal_line(goal))
    statuses = {name: r["status"] for name, r in run.results["parts"].items()}
    print(f"\nparts: {', '.join(f'{k} {v}' for k, v in statuses.items())}; "
          f"{time.time() - args.started_at:.0f} s since the start; results: "
          f"{args.out / RESULTS_JSON}, {args.out / RESULTS_MD}", flush=True)
    return 1 if "failed" in statuses.values() else 0


if __name__ == "__main__":
    sys.exit(main())
