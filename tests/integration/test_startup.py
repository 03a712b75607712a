"""Start-up: RunPod's local test mode as a process, start failures, fetching missing weights.

Where the folder is found (the location order) is tested without a model in tests/unit.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import pipeline
from builder import make_tiny_model
from tests.support.fake_hub import FakeHub, files_of, serving_hub
from tests.support.model_folder import fill_hf_cache
from worker import location, startup
from worker.errors import StartupError
from worker.settings import Settings
from worker.spec import CHECKPOINTS, ModelSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def tiny_model(tiny_model_dir: Path) -> Path:
    """Every test here starts a worker: MODEL_DIR points at the tiny model."""
    return tiny_model_dir


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
        assert "python -m builder.make_tiny_model /tmp/tiny-sdxl --steps 4`" in result.stderr
        assert "python -m builder.download_weights DIR --steps 4`" in result.stderr
        assert "Traceback" not in result.stderr

    def test_unreachable_hub_is_reported_without_a_traceback(self, tmp_path: Path) -> None:
        # A port on loopback with nothing listening: the fetch fails fast, as offline.
        result = worker("--test_input", job(), MODEL_DIR=str(tmp_path / "empty"),
                        DOWNLOAD_MISSING_WEIGHTS="true", HF_ENDPOINT="http://127.0.0.1:9")
        assert result.returncode == 1
        assert "could not be fetched" in result.stderr and "Traceback" not in result.stderr

    def test_corrupt_checkpoint_fails_at_start(self, tmp_path: Path) -> None:
        folder = make_tiny_model.build(tmp_path / "model", ModelSpec(steps=(4,)))
        (folder / CHECKPOINTS[4]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
        result = worker("--test_input", job(), MODEL_DIR=str(folder))
        assert result.returncode == 1
        assert "cannot load the model folder" in result.stderr

    def test_a_compiler_that_cannot_build_is_one_line_not_a_traceback(self) -> None:
        """COMPILE=true where inductor finds no C++ compiler (CXX names none): the real
        compile fails in seconds on the tiny model; the worker says why and what to set."""
        result = worker("--test_input", job(), COMPILE="true", COMPILE_SIZES="512x512",
                        CXX="/nonexistent/g++")
        assert result.returncode == 1
        assert ("worker cannot start: COMPILE=true but torch.compile failed compiling the UNet "
                "for 512x512: InvalidCxxCompiler: No working C++ compiler") in result.stderr
        assert "Set COMPILE=false to start without compiling" in result.stderr
        assert "Traceback" not in result.stderr

    def test_out_of_memory_while_loading_is_said_to_be_memory(
            self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from worker.engine import loading

        def oom(*args: object, **kwargs: object) -> None:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        monkeypatch.setattr(loading, "load_unet", oom)
        settings = Settings.from_env({"MODEL_DIR": str(tiny_model_dir), "DEVICE": "cpu"})
        with pytest.raises(StartupError) as info:
            startup.start(settings)
        assert str(info.value).startswith("out of GPU memory loading checkpoints [4] on cpu: ")
        assert "cannot load the model folder" not in str(info.value)

    @pytest.mark.parametrize("compile_", [False, True])
    def test_out_of_memory_while_warming_up_is_said_to_be_memory(
            self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, compile_: bool) -> None:
        import pipeline

        def oom(self: object, plans: object, on_step: object = None) -> None:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        monkeypatch.setattr(pipeline.Engine, "run_batch", oom)
        monkeypatch.setattr(pipeline.compiler, "compile_in_place", lambda *args: None)
        settings = Settings.from_env({"MODEL_DIR": str(tiny_model_dir), "DEVICE": "cpu",
                                      "COMPILE": str(compile_).lower(),
                                      "COMPILE_SIZES": "768x768"})
        with pytest.raises(StartupError) as info:
            startup.start(settings)
        size = "768x768" if compile_ else "512x512"
        assert str(info.value).startswith(f"out of GPU memory warming up one {size} image with "
                                          f"the 4-step checkpoint on cpu: the weights loaded")
        assert "compile" not in type(info.value).__name__.lower()

    def test_out_of_memory_inside_the_compiler_is_memory_not_a_missing_compiler(
            self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import pipeline

        def wrapped_oom(*args: object) -> None:
            import torch

            try:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            except torch.cuda.OutOfMemoryError as exc:  # as Dynamo wraps a backend's failure
                raise RuntimeError("BackendCompilerFailed: backend='inductor' raised") from exc

        monkeypatch.setattr(pipeline.compiler, "compile_in_place", wrapped_oom)
        settings = Settings.from_env({"MODEL_DIR": str(tiny_model_dir), "DEVICE": "cpu",
                                      "COMPILE": "true"})
        with pytest.raises(StartupError) as info:
            startup.start(settings)
        assert str(info.value).startswith("out of GPU memory compiling the UNet for 1024x1024")
        assert "C compiler" not in str(info.value)

    def test_bad_setting_is_named(self) -> None:
        result = worker("--test_input", job(), LIGHTNING_STEPS="3")
        assert result.returncode == 1
        assert "LIGHTNING_STEPS='3' is invalid" in result.stderr


class TestStartLog:
    def test_the_memory_each_checkpoint_holds_is_logged(
            self, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
        settings = Settings.from_env({"MODEL_DIR": str(tiny_model_dir), "DEVICE": "cpu",
                                      "WARMUP": "false", "LIGHTNING_STEPS": "4"})
        with caplog.at_level(logging.INFO, logger="worker.startup"):
            engine = startup.start(settings)
        held = engine.resident_bytes()
        unet, shared = held["4-step UNet"], held["shared (text encoders, VAE)"]
        text = pipeline.memory_text
        assert (f"weights on cpu: 4-step UNet {text(unet)}, shared (text encoders, VAE) "
                f"{text(shared)}; total {text(unet + shared)}") in caplog.text
        assert text(5_140_000_000) == "5.14 GB" and text(12_340_000) == "12.3 MB"


class TestRunpodModelCache:
    def test_a_folder_assembled_from_the_cache_loads(self, tmp_path: Path,
                                                     tiny_model_dir: Path) -> None:
        spec = ModelSpec(steps=(4,))
        fill_hf_cache(tmp_path / "huggingface-cache" / "hub", spec,
                      lambda f: (tiny_model_dir / f.path).read_bytes())
        found, source = location.locate(None, spec, volume_root=tmp_path,
                                        baked_dir=tmp_path / "baked")
        assert source.startswith("RunPod model cache")
        assert pipeline.Engine.load(spec, found).steps == (4,)


@pytest.fixture
def hub(tiny_model_dir: Path) -> Iterator[FakeHub]:
    """The tiny model's files served as the Hugging Face hub serves them."""
    spec = ModelSpec(steps=(4,), safety_checker=True, tiny_decoder=True)
    with serving_hub(files_of(tiny_model_dir, spec)) as served:
        yield served


class TestFetchingMissingWeights:
    def test_an_empty_folder_is_filled_from_the_hub_and_the_worker_starts(
            self, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "model"), "WARMUP": "false",
                                      "SAFETY_CHECKER": "true", "DEVICE": "cpu"})
        engine = startup.start(settings)
        assert engine.steps == (4,) and engine.checker is not None
        assert settings.model_spec.missing(tmp_path / "model") == []
        assert len(hub.requests) == len(settings.model_spec.files())

    def test_a_folder_that_may_not_be_filled_is_a_startup_error_with_advice(
            self, tmp_path: Path) -> None:
        settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "DOWNLOAD_MISSING_WEIGHTS":
                                      "false", "LIGHTNING_STEPS": "2,8", "VAE_DECODER": "tiny"})
        with pytest.raises(StartupError) as info:
            startup.start(settings)
        message = str(info.value)
        count = len(settings.model_spec.files())
        assert message.startswith(f"model folder {tmp_path} is missing {count} file(s)")
        assert "python -m builder.make_tiny_model /tmp/tiny-sdxl --steps 2 8 --tiny-decoder`" \
            in message


@pytest.mark.gpu
class TestGpu:
    def test_tiny_model_generates_on_cuda_in_fp16(self, tiny_model_dir: Path) -> None:
        import numpy as np
        import torch

        from worker.plan import Plan

        model = pipeline.Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)
        assert model.device.type == "cuda" and model.dtype == torch.float16
        [images] = model.generate([Plan(prompt="a cat", negative_prompt=None, width=512,
                                        height=512, steps=4, guidance_scale=0.0, seeds=(1, 2))])
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

        from worker.engine.loading import choose_device

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        assert choose_device("auto") == (torch.device("cpu"), torch.float32)
        assert choose_device("cpu") == (torch.device("cpu"), torch.float32)
