"""Faults that must fail one job clearly, or be repaired, and never end the worker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import Engine
from tests.integration.conftest import Run
from worker.plan import Plan
from worker.spec import ModelSpec


@pytest.fixture(scope="module")
def run(job_runner: Callable[..., Run]) -> Run:
    return job_runner("fault", prompt="p", width=512, height=512, seed=1)


def plan(seeds: tuple[int, ...] = (1,)) -> Plan:
    return Plan(prompt="p", negative_prompt=None, width=512, height=512, steps=4,
                guidance_scale=0.0, seeds=seeds)


class TestResponseSize:
    def test_hopeless_png_batch_is_refused_before_the_gpu(
            self, run: Run, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(handler.ENGINE, "run_batch",
                            lambda *a, **k: pytest.fail("the GPU ran a job that cannot fit"))
        error = run(width=1536, height=1536, num_images=4)["error"]
        assert error.startswith("the response would be at least 18.9 MB, over the 10 MB")
        assert "output_format jpeg or webp" in error and "bucket" in error

    def test_response_over_the_limit_after_encoding_is_refused(
            self, run: Run, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(handler.DELIVERY, "max_response_mb", 1.0)
        error = run(num_images=2)["error"]  # 2 x 512² noise PNGs: ~2 MB of base64
        assert error.startswith("the response would be ") and "over the 1 MB" in error

    def test_jpeg_fits_where_png_does_not(
            self, run: Run, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(handler.DELIVERY, "max_response_mb", 1.0)
        assert len(run(num_images=2, output_format="jpeg")["images"]) == 2


class TestBadOutput:
    def test_nan_from_a_half_precision_vae_is_decoded_again_in_fp32(
            self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        model = Engine.load(ModelSpec(steps=(4,)), tiny_model_dir, torch.device("cpu"),
                            torch.float16)
        vae = model.pipes[4].vae
        original = type(vae).decode

        def nan_in_half(self: Any, latents: torch.Tensor, **kwargs: Any) -> Any:
            out = original(self, latents, **kwargs)
            if self.dtype == torch.float16:
                return (torch.full_like(out[0], float("nan")),)
            return out

        monkeypatch.setattr(type(vae), "decode", nan_in_half)
        image = np.asarray(model.generate([plan()])[0][0])
        assert image.shape == (512, 512, 3) and image.max() > 0
        assert vae.dtype == torch.float16  # restored after the fp32 decode

    def test_views_keep_the_shared_modules_in_half_precision(self,
                                                             tiny_model_dir: Path) -> None:
        model = Engine.load(ModelSpec(steps=(4,)), tiny_model_dir, torch.device("cpu"),
                            torch.float16)
        for mode in ("txt2img", "img2img", "inpaint"):
            model.view(4, mode, "DDIM")
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert getattr(model.pipes[4], name).dtype == torch.float16, name

    def test_nan_that_full_precision_cannot_fix_fails_the_job_only(
            self, run: Run, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        vae_cls = type(handler.ENGINE.vae)
        original = vae_cls.decode
        monkeypatch.setattr(vae_cls, "decode", lambda self, latents, **kw: (
            torch.full_like(original(self, latents, **kw)[0], float("nan")),))
        assert run()["error"].startswith("the model produced an invalid (NaN or all-black)")
        monkeypatch.undo()
        assert "images" in run()

    def test_all_black_output_is_not_a_success(
            self, run: Run, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        vae_cls = type(handler.ENGINE.vae)
        original = vae_cls.decode
        monkeypatch.setattr(vae_cls, "decode", lambda self, latents, **kw: (
            torch.full_like(original(self, latents, **kw)[0], -1.0),))
        assert "invalid (NaN or all-black)" in run()["error"]


class TestOutOfMemory:
    def test_multi_image_job_is_retried_one_image_at_a_time(
            self, run: Run, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        original = handler.ENGINE.run_batch
        sizes: list[int] = []

        def small_gpu(plans: Any, on_step: Any = None) -> Any:
            sizes.append(sum(len(p.seeds) for p in plans))
            if sizes[-1] > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return original(plans, on_step)

        expected = run(num_images=1, seed=7)["images"][0]["image"]
        monkeypatch.setattr(handler.ENGINE, "run_batch", small_gpu)
        response = run(num_images=3, seed=7)
        assert [item["seed"] for item in response["images"]] == [7, 8, 9]
        assert sizes == [3, 1, 1, 1]
        assert response["images"][0]["image"] == expected

    def test_single_image_out_of_memory_is_a_clear_error(
            self, run: Run, handler: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        def oom(*args: Any, **kwargs: Any) -> Any:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        monkeypatch.setattr(handler.ENGINE, "run_batch", oom)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        response = run()
        assert response == {"error": "out of GPU memory generating 1 image(s) at 512x512: try "
                                     "fewer images or a smaller size"}
        monkeypatch.undo()
        assert "images" in run()


class TestCancellation:
    def test_cancelling_the_handler_task_cancels_its_queued_work(
            self, run: Run, handler: ModuleType) -> None:
        async def scenario() -> bool:
            task = asyncio.create_task(handler.handler(
                {"id": "c", "input": {"prompt": "p", "width": 512, "height": 512}}))
            await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

        assert asyncio.run(scenario()) is True
        assert "images" in run()  # the worker still serves
