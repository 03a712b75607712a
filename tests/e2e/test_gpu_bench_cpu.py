"""The one-command GPU benchmark (bench/gpu/run.sh -> bench/gpu_run.py), run here on the CPU.

The GPU machine is lent for 15 minutes at most, so its run must not fail on a typo, a missing
wheel or a part that overruns: ``run.sh --device cpu --tiny`` goes through every part on the
tiny model (about a minute), and the pure pieces are checked directly: the wheel list against
requirements.txt's closure, the folder check of ``wheels.sh``, the time budget's skips, the goal
verdicts and the decoders' FLOP counts behind the floor. No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from bench import gpu_run

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "bench" / "gpu"
# The GPU machine's interpreter, for requirement markers: CPython 3.12 on Linux x86_64.
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "extra": ""}
# Integer settings and counts: the only numbers in the results that are not figures.
COUNTS = {"batch", "batches", "rounds", "concurrency", "jobs", "failed_jobs", "size", "steps",
          "files", "recipe_rounds", "sweep_rounds", "compile_rounds", "started_at_epoch", "cpus",
          "multiprocessors", "cudnn", "graphs_after_compile", "graphs_compiled_while_timing"}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version ('' when none) of a list file, comments dropped."""
    out = {}
    for line in path.read_text().splitlines():
        pin = line.split("#")[0].strip()
        if pin:
            name, _, version = pin.partition("==")
            out[canon(name)] = version
    return out


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess,
                                                                Path]:
    """``run.sh --device cpu --tiny`` with no wheels (this venv has every package)."""
    out = tmp_path_factory.mktemp("gpu-bench") / "out"
    empty = out.parent / "no-wheels"
    empty.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "GPU_WHEELS": str(empty)}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(GPU / "run.sh"), "--device", "cpu", "--tiny",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    return proc, out


class TestTheCpuRun:
    def test_every_part_runs_and_every_file_is_written(self, cpu_run: Any) -> None:
        proc, out = cpu_run
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        results = json.loads((out / gpu_run.RESULTS_JSON).read_text())
        assert {name: r["status"] for name, r in results["parts"].items()} == dict.fromkeys(
            gpu_run.PART_NAMES, "ran")
        assert {f.name for f in out.iterdir()} == {gpu_run.RESULTS_JSON, gpu_run.RESULTS_MD,
                                                   gpu_run.WORKER_LOG, "gpu-run.log"}
        assert "no wheels in" in proc.stdout  # run.sh said it used the interpreter's packages

    def test_every_figure_has_its_unit(self, cpu_run: Any) -> None:
        results = json.loads((cpu_run[1] / gpu_run.RESULTS_JSON).read_text())
        bare: list[str] = []

        def walk(node: Any, path: str) -> None:
            if isinstance(node, dict):
                if "value" in node:
                    assert set(node) == {"value", "unit"} and node["unit"], path
                    return
                for key, child in node.items():
                    walk(child, f"{path}.{key}")
            elif isinstance(node, list):
                for i, child in enumerate(node):
                    walk(child, f"{path}[{i}]")
            elif isinstance(node, float | int) and not isinstance(node, bool) \
                    and path.rsplit(".", 1)[-1].split("[")[0] not in COUNTS:
                bare.append(path)

        walk(results, "results")
        assert bare == []
        versions = results["environment"]["versions"]
        assert versions["torch"] and versions["diffusers"] and versions["runpod"]

    def test_the_tables_and_the_goal_lines(self, cpu_run: Any) -> None:
        proc, out = cpu_run
        results = json.loads((out / gpu_run.RESULTS_JSON).read_text())
        md = (out / gpu_run.RESULTS_MD).read_text()
        for part in ("recipes", "sweep", "coldstart", "compile"):
            assert f"\n## {part}\n" in md
        rows = results["parts"]["recipes"]["rows"]
        assert {(r["recipe"], r["batch"]) for r in rows} == {
            (recipe, batch) for recipe in ("ours", "ours + TAESDXL", "plain") for batch in (1, 2)}
        assert gpu_run.PROFILES["full"].batches == (1, 4)
        assert [r["concurrency"] for r in results["parts"]["sweep"]["rows"]] == [1, 2, 4]
        assert results["parts"]["compile"]["speedup"]["unit"] == "x"
        # Off the full model on CUDA no goal is judged, but each still shows its figure.
        verdicts = {g["goal"]: g["verdict"] for g in results["goals"]}
        assert set(verdicts.values()) <= {"N/A", "INFO"}
        for goal in results["goals"]:
            assert gpu_run.goal_line(goal) in proc.stdout
        assert "N/A  ours vs the plain model-card recipe, images/s, batch 2: " in proc.stdout


class TestGoals:
    def results(self, ours_ms: float, plain_ms: float, best_rate: float) -> dict[str, Any]:
        def row(recipe: str, batch: int, ms: float) -> dict[str, Any]:
            return {"recipe": recipe, "batch": batch, "ms_per_image": gpu_run.fig(ms, "ms"),
                    "vs_plain": gpu_run.fig(plain_ms / ms, "x") if recipe != "plain" else None,
                    "fraction_of_floor": gpu_run.fig(47 / ms, "fraction")}

        rows = [row(r, b, ms) for b in (1, 4) for r, ms in (("ours", ours_ms),
                                                             ("plain", plain_ms))]
        return {"settings": {"device": "cuda", "model": "full", "size": 1024, "batches": [1, 4]},
                "parts": {"recipes": {"status": "ran", "rows": rows},
                          "sweep": {"status": "ran", "rows": [
                              {"concurrency": 4, "images_per_s": gpu_run.fig(best_rate,
                                                                             "images/s")}]},
                          "coldstart": {"status": "skipped"}}}

    def test_pass_and_fail_with_the_measured_ratio(self) -> None:
        goals = {g["goal"]: g for g in gpu_run.goals(self.results(150.0, 400.0, 5.0))}
        lines = [gpu_run.goal_line(g) for g in goals.values()]
        assert ("PASS ours vs the plain model-card recipe, images/s, batch 4: 2.67x "
                "(goal >= 2.00x)") in lines
        assert "PASS one 1024² image, ours, batch 1: 150.00 ms (goal <= 200.00 ms)" in lines
        assert ("FAIL images/s under load (handler, best concurrency = 4): 5.00 images/s "
                "(goal >= 6.00 images/s)") in lines
        assert goals["cold start with prefetch: (ready - import - warm-up) / read"][
            "verdict"] == "SKIP"
        assert goals["fraction of the FLOP floor, ours, batch 1"]["verdict"] == "INFO"
        slow = {g["goal"]: g["verdict"] for g in gpu_run.goals(self.results(250.0, 400.0, 7.0))}
        assert slow["ours vs the plain model-card recipe, images/s, batch 1"] == "FAIL"
        assert slow["one 1024² image, ours, batch 1"] == "FAIL"


class TestBudget:
    @pytest.fixture(autouse=True)
    def no_tables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # These parts return no measurements: the time windows are the point, not the tables.
        monkeypatch.setattr(gpu_run, "markdown_part", lambda name, record: "")

    def run(self, tmp_path: Path, budget_s: float) -> gpu_run.Run:
        args = argparse.Namespace(started_at=time.time(), budget_s=budget_s, out=tmp_path,
                                  device="cuda", backend="inductor",
                                  parts=set(gpu_run.PART_NAMES))
        run = gpu_run.Run(args, gpu_run.PROFILES["full"])
        run.results["parts"] = {name: {"status": "ran", "seconds": None, "note": ""}
                                for name in gpu_run.REQUIRED}
        return run

    def test_a_part_that_does_not_fit_is_skipped_with_a_note(self, tmp_path: Path) -> None:
        run = self.run(tmp_path, budget_s=30)
        ran: list[str] = []
        assert not run.part("recipes", lambda part: ran.append(part.name) or {})
        assert ran == []
        record = run.results["parts"]["recipes"]
        assert record["status"] == "skipped" and "below the 30 s this part needs" in record["note"]
        saved = json.loads((tmp_path / gpu_run.RESULTS_JSON).read_text())
        assert saved["parts"]["recipes"]["status"] == "skipped"

    def test_a_part_gets_its_cap_or_what_is_left(self, tmp_path: Path) -> None:
        run = self.run(tmp_path, budget_s=300)
        windows: list[float] = []
        assert run.part("sweep", lambda part: windows.append(part.left()) or {})
        assert 60 < windows[0] <= 75  # the sweep's cap
        assert run.part("compile", lambda part: windows.append(part.left()) or {})
        # The rest of the run, not its cap of 400, less the 60 s kept for the cold start.
        assert 200 < windows[1] <= 300 - gpu_run.RESERVE_S - 60

    def test_a_part_after_a_failed_start_is_skipped(self, tmp_path: Path) -> None:
        run = self.run(tmp_path, budget_s=300)
        run.results["parts"]["start"] = {"status": "failed"}
        assert not run.part("sweep", lambda part: {})
        assert run.results["parts"]["sweep"]["note"] == "needs the start part"

    def test_a_failing_part_keeps_the_run_going(self, tmp_path: Path) -> None:
        run = self.run(tmp_path, budget_s=300)

        def broken(part: gpu_run.Part) -> dict[str, Any]:
            raise RuntimeError("boom")

        assert not run.part("sweep", broken)
        assert run.results["parts"]["sweep"]["note"] == "RuntimeError: boom"
        assert run.part("coldstart", lambda part: {"rows": []})

    def test_the_gate_stops_a_round_that_would_overrun(self) -> None:
        gate = gpu_run.Gate(time.time() + 3600)
        assert gate()
        gate.longest = 7200.0
        assert not gate()


class TestWheels:
    def closure(self) -> dict[str, str]:
        """requirements.txt's closure on CPython 3.12 Linux, torch left out, stopping at the
        GPU machine's packages: name -> the version installed here."""
        has = set(pins(GPU / "gpu-has.txt"))
        roots = [name for name in pins(ROOT / "requirements.txt") if name != "torch"]
        found: dict[str, str] = {}
        todo = list(roots)
        while todo:
            name = todo.pop()
            if name in found or name in has:
                continue
            try:
                dist = distribution(name)
            except PackageNotFoundError:
                pytest.fail(f"{name} is needed but not installed here")
            found[name] = dist.version
            for text in dist.requires or []:
                req = Requirement(text)
                if req.marker is None or req.marker.evaluate(MARKERS):
                    todo.append(canon(req.name))
        return found

    def test_the_list_is_requirements_minus_what_the_machine_has(self) -> None:
        assert pins(GPU / "wheels.txt") == self.closure()
        assert "torch" not in pins(GPU / "wheels.txt")

    def test_every_known_machine_version_meets_the_wheels_or_has_a_floor(self) -> None:
        has, floor = pins(GPU / "gpu-has.txt"), pins(GPU / "wheels-floor.txt")
        unmet = []
        for name in pins(GPU / "wheels.txt"):
            for text in distribution(name).requires or []:
                req = Requirement(text)
                need, there = canon(req.name), has.get(canon(req.name))
                if (req.marker is None or req.marker.evaluate(MARKERS)) and there \
                        and not req.specifier.contains(there, prereleases=True) \
                        and need not in floor:
                    unmet.append(f"{name} needs {req}, the machine has {there}")
        assert unmet == []

    def fake_folder(self, tmp_path: Path) -> Path:
        folder = tmp_path / "wheels"
        (folder / "floor").mkdir(parents=True)
        for sub, path in (("", "wheels.txt"), ("floor", "wheels-floor.txt")):
            for name, version in pins(GPU / path).items():
                (folder / sub / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").touch()
        return folder

    def check(self, folder: Path, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(GPU / "wheels.sh"), "--check"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHON": sys.executable,
                                   "GPU_WHEELS": str(folder), **env})

    def test_the_folder_check_passes_the_listed_wheels(self, tmp_path: Path) -> None:
        run = self.check(self.fake_folder(tmp_path))
        assert run.returncode == 0, run.stderr
        assert "wheels: OK" in run.stdout

    def test_the_folder_check_refuses_two_versions_a_gap_and_excess(self,
                                                                     tmp_path: Path) -> None:
        folder = self.fake_folder(tmp_path)
        (folder / "diffusers-0.1.0-py3-none-any.whl").touch()
        (folder / "runpod-1.12.0-py3-none-any.whl").unlink()
        (folder / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"x" * 64)
        run = self.check(folder, LIMIT_MIB="0")
        assert run.returncode != 0
        for problem in ("diffusers: 2 versions", "runpod==1.12.0: missing",
                        "torch: not in bench/gpu/wheels.txt", "over the 0 MiB limit"):
            assert problem in run.stderr

    def test_skip_leaves_wheels_out(self, tmp_path: Path) -> None:
        folder = self.fake_folder(tmp_path)
        for name in ("boto3", "botocore"):
            (folder / f"{name}-1.44.5-py3-none-any.whl").unlink()
        assert self.check(folder).returncode != 0
        assert self.check(folder, SKIP="boto3 botocore").returncode == 0


def test_the_decoders_flop_counts_behind_the_floor() -> None:
    """TAESDXL rows' floor uses TAESDXL's own decode; both counts recounted on the meta
    device (2 x multiply-adds, torch's FlopCounterMode), within 1 %."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny
    from torch.utils.flop_counter import FlopCounterMode

    from bench import throughput
    from bench.full_model import VAE_CONFIG

    with torch.device("meta"):
        decoders = {"vae": AutoencoderKL(**VAE_CONFIG), "taesdxl": AutoencoderTiny()}
    for name, module in decoders.items():
        for side in (512, 1024):
            with FlopCounterMode(display=False) as counter:
                module.decode(torch.empty(1, 4, side // 8, side // 8, device="meta"))
            assert counter.get_total_flops() / 1e12 == pytest.approx(
                throughput.DECODE_TFLOP[name][side], rel=0.01)
    full, tiny = throughput.floor_seconds(1024, "vae"), throughput.floor_seconds(1024, "taesdxl")
    assert full == pytest.approx(37.51 / 800) and tiny == pytest.approx(27.61 / 800)
