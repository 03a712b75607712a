"""Start-up as a process: RunPod's local test mode, model location order, and start failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import model_files
import model_location
from builder import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python handler.py ARGS`` in a fresh process, as RunPod starts it."""
    full_env = {**os.environ, "RUNPOD_LOG_LEVEL": "WARN", **env}
    return subprocess.run([sys.executable, "handler.py", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def job(**fields: object) -> str:
    return json.dumps({"input": {"prompt": "a cat", "width": 512, "height": 512, **fields}})


class TestLocalTestMode:
    def test_good_job_exits_0(self) -> None:
        result = worker("--test_input", job(seed=1))
        assert result.returncode == 0, result.stderr[-2000:]
        assert "ready on cpu/float32" in result.stderr

    def test_bad_job_exits_1_with_the_reason(self) -> None:
        result = worker("--test_input", job(num_images=9))
        assert result.returncode == 1
        assert "num_images=9" in result.stdout + result.stderr

    def test_repo_test_input_is_a_valid_job(self) -> None:
        from schemas import parse_request

        parse_request(json.loads((ROOT / "test_input.json").read_text())["input"])


class TestStartFailures:
    def test_missing_weights_without_hub_stop_at_once_with_advice(self, tmp_path: Path) -> None:
        result = worker("--test_input", job(), MODEL_DIR=str(tmp_path / "empty"),
                        DOWNLOAD_MISSING_WEIGHTS="false")
        assert result.returncode == 1
        assert "worker cannot start" in result.stderr
        assert "make_tiny_model.py" in result.stderr and "download_weights.py" in result.stderr
        assert "Traceback" not in result.stderr

    def test_unreachable_hub_is_reported_without_a_traceback(self, tmp_path: Path) -> None:
        # A port on loopback with nothing listening: the fetch fails fast, as offline.
        result = worker("--test_input", job(), MODEL_DIR=str(tmp_path / "empty"),
                        DOWNLOAD_MISSING_WEIGHTS="true", HF_ENDPOINT="http://127.0.0.1:9")
        assert result.returncode == 1
        assert "could not be fetched" in result.stderr and "Traceback" not in result.stderr

    def test_corrupt_checkpoint_fails_at_start(self, tmp_path: Path) -> None:
        folder = make_tiny_model.build(tmp_path / "model", steps=(4,))
        (folder / model_files.CHECKPOINTS[4]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
        result = worker("--test_input", job(), MODEL_DIR=str(folder))
        assert result.returncode == 1
        assert "cannot load the model folder" in result.stderr

    def test_bad_setting_is_named(self) -> None:
        result = worker("--test_input", job(), LIGHTNING_STEPS="3")
        assert result.returncode == 1
        assert "LIGHTNING_STEPS='3' is invalid" in result.stderr


class TestModelLocation:
    def test_model_dir_wins(self, tmp_path: Path) -> None:
        assert model_location.locate(tmp_path, (4,), volume_root=tmp_path) == (tmp_path,
                                                                                "MODEL_DIR")

    def test_network_volume_before_baked(self, tmp_path: Path, tiny_model_dir: Path) -> None:
        volume = tmp_path / "volume"
        volume.mkdir()
        (volume / "sdxl-lightning").symlink_to(tiny_model_dir)
        found, source = model_location.locate(None, (4,), volume_root=volume,
                                              baked_dir=tmp_path / "baked")
        assert (found, source) == (volume / "sdxl-lightning", "network volume")

    def test_incomplete_volume_falls_back_to_baked(self, tmp_path: Path) -> None:
        (tmp_path / "sdxl-lightning" / "unet").mkdir(parents=True)
        found, source = model_location.locate(None, (4,), volume_root=tmp_path,
                                              baked_dir=tmp_path / "baked")
        assert (found, source) == (tmp_path / "baked", "baked folder")

    def test_runpod_model_cache_is_assembled_from_pinned_revisions(
            self, tmp_path: Path, tiny_model_dir: Path) -> None:
        cache = tmp_path / "huggingface-cache" / "hub"
        for f in model_files.required_files((4,)):
            target = model_location.hf_cache_path(cache, f)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((tiny_model_dir / f.path).read_bytes())
        found, source = model_location.locate(None, (4,), volume_root=tmp_path,
                                              baked_dir=tmp_path / "baked")
        assert source.startswith("RunPod model cache")
        assert model_files.missing_files(found, (4,)) == []
        import pipeline

        assert pipeline.load(found, (4,)).steps == (4,)

    def test_cache_missing_a_checkpoint_is_not_used(self, tmp_path: Path,
                                                    tiny_model_dir: Path) -> None:
        cache = tmp_path / "huggingface-cache" / "hub"
        for f in model_files.required_files((4,)):
            target = model_location.hf_cache_path(cache, f)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((tiny_model_dir / f.path).read_bytes())
        found, source = model_location.locate(None, (2, 4), volume_root=tmp_path,
                                              baked_dir=tmp_path / "baked")
        assert source == "baked folder"


@pytest.mark.gpu
class TestGpu:
    def test_tiny_model_generates_on_cuda_in_fp16(self, tiny_model_dir: Path) -> None:
        import numpy as np
        import torch

        import pipeline
        from resolve import Plan

        model = pipeline.load(tiny_model_dir, (4,))
        assert model.device.type == "cuda" and model.dtype == torch.float16
        images = pipeline.generate(model, Plan(prompt="a cat", negative_prompt=None, width=512,
                                               height=512, steps=4, guidance_scale=0.0,
                                               seeds=(1, 2)))
        assert [image.size for image in images] == [(512, 512)] * 2
        assert all(np.isfinite(np.asarray(image, dtype=np.float32)).all() for image in images)


class TestDevice:
    def test_cuda_required_but_absent_stops_the_worker(self) -> None:
        result = worker("--test_input", job(), DEVICE="cuda", CUDA_VISIBLE_DEVICES="")
        assert result.returncode == 1
        assert "DEVICE=cuda but no usable CUDA device is visible" in result.stderr

    def test_bad_device_setting_is_named(self) -> None:
        result = worker("--test_input", job(), DEVICE="tpu")
        assert result.returncode == 1 and "DEVICE='tpu' is invalid" in result.stderr

    def test_cpu_is_chosen_without_a_gpu(self) -> None:
        import torch

        from startup import choose_device

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        assert choose_device("auto") == (torch.device("cpu"), torch.float32)
        assert choose_device("cpu") == (torch.device("cpu"), torch.float32)


def test_locating_twice_reuses_one_linked_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    cache = tmp_path / "huggingface-cache" / "hub"
    for f in model_files.required_files((4,)):
        target = model_location.hf_cache_path(cache, f)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tiny_model_dir / f.path).read_bytes())
    first = model_location.locate(None, (4,), volume_root=tmp_path, baked_dir=tmp_path / "b")
    second = model_location.locate(None, (4,), volume_root=tmp_path, baked_dir=tmp_path / "b")
    assert first == second and model_files.missing_files(first[0], (4,)) == []
