"""pipeline.Engine on the tiny model: loading, generation and its policy (OOM fallback, one
generator per image, batching), the code path the real weights take."""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from builder import make_tiny_model
from pipeline import Engine, GpuMemoryError
from worker.engine import loading
from worker.errors import JobError, ModelFolderError
from worker.gpu_queue import GpuWorker
from worker.plan import Plan
from worker.spec import CHECKPOINTS, ModelSpec

WAIT = 60  # seconds; a bound on every wait, never an assertion on speed


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Engine:
    return Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)


@pytest.fixture(scope="module")
def two_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model.build(tmp_path_factory.mktemp("tiny-1-4") / "model",
                                 ModelSpec(steps=(1, 4)))


def generate(engine: Engine, plan: Plan, on_step: Any = None) -> list[Any]:
    """One plan through the engine's policy path (what the GPU queue calls)."""
    return engine.generate([plan], on_step)[0]


def plan(seeds: tuple[int, ...] = (1,), side: int = 512, steps: int = 4) -> Plan:
    return Plan(prompt="a cat", negative_prompt=None, width=side, height=side, steps=steps,
                guidance_scale=0.0, seeds=seeds)


def pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


class TestLoading:
    def test_unet_holds_the_lightning_checkpoint(self, model: Engine,
                                                 tiny_model_dir: Path) -> None:
        state = load_file(tiny_model_dir / CHECKPOINTS[4])
        unet_state = model.pipes[4].unet.state_dict()
        assert state.keys() == unet_state.keys()
        for name, tensor in state.items():
            assert torch.equal(unet_state[name], tensor.to(torch.float32)), name

    def test_nothing_is_left_on_the_meta_device(self, model: Engine) -> None:
        for module in model.pipes[4].components.values():
            if isinstance(module, torch.nn.Module):
                tensors = list(module.parameters()) + list(module.buffers())
                assert {t.device.type for t in tensors} == {"cpu"}
                assert {t.dtype for t in module.parameters()} == {torch.float32}

    def test_unet_is_built_on_meta_not_randomly_initialised(
            self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        seen: list[set[str]] = []
        original = loading.UNet2DConditionModel.from_config

        def spy(*args, **kwargs):
            unet = original(*args, **kwargs)
            seen.append({p.device.type for p in unet.parameters()})
            return unet

        monkeypatch.setattr(loading.UNet2DConditionModel, "from_config", spy)
        loading.load_unet(tiny_model_dir, 4, torch.device("cpu"), torch.float32)
        assert seen == [{"meta"}]

    def test_scheduler_is_euler_trailing(self, model: Engine) -> None:
        scheduler = model.pipes[4].scheduler
        assert type(scheduler).__name__ == "EulerDiscreteScheduler"
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
        assert scheduler.config.prediction_type == "epsilon"

    def test_vae_does_not_upcast(self, model: Engine) -> None:
        assert model.pipes[4].vae.config.force_upcast is False

    def test_one_step_checkpoint_predicts_x0(self, two_checkpoint_dir: Path) -> None:
        loaded = Engine.load(ModelSpec(steps=(1, 4)), two_checkpoint_dir)
        assert loaded.pipes[1].scheduler.config.prediction_type == "sample"
        assert loaded.pipes[4].scheduler.config.prediction_type == "epsilon"

    def test_checkpoints_share_everything_but_the_unet(self, two_checkpoint_dir: Path) -> None:
        loaded = Engine.load(ModelSpec(steps=(1, 4)), two_checkpoint_dir)
        one, four = loaded.pipes[1], loaded.pipes[4]
        for name in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"):
            assert getattr(one, name) is getattr(four, name)
        assert one.unet is not four.unet
        assert not torch.equal(next(one.unet.parameters()), next(four.unet.parameters()))

    def test_missing_file_is_named(self, tiny_model_dir: Path) -> None:
        with pytest.raises(ModelFolderError, match="sdxl_lightning_8step_unet"):
            Engine.load(ModelSpec(steps=(4, 8)), tiny_model_dir)

    def test_checkpoint_of_the_wrong_architecture_is_refused(self, tmp_path: Path) -> None:
        folder = make_tiny_model.build(tmp_path / "tiny-wrong", ModelSpec(steps=(4,)))
        ckpt = folder / CHECKPOINTS[4]
        state = load_file(ckpt)
        state.pop(next(iter(state)))
        save_file(state, ckpt)
        with pytest.raises(ModelFolderError, match="does not fit unet/config.json"):
            Engine.load(ModelSpec(steps=(4,)), folder)

    def test_only_the_components_of_the_spec_are_loaded(self, tiny_model_dir: Path) -> None:
        plain = Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)
        assert plain.checker is None and plain.taesd is None
        full = Engine.load(ModelSpec(steps=(4,), safety_checker=True, tiny_decoder=True),
                           tiny_model_dir)
        assert full.checker is not None and type(full.taesd).__name__ == "AutoencoderTiny"


class TestGeneration:
    def test_images_have_the_requested_size(self, model: Engine) -> None:
        images = generate(model, Plan(prompt="p", negative_prompt=None, width=768,
                                               height=512, steps=4, guidance_scale=0.0,
                                               seeds=(3,)))
        assert [image.size for image in images] == [(768, 512)]

    def test_same_seed_gives_the_same_image(self, model: Engine) -> None:
        first = pixels(generate(model, plan((42,))))
        second = pixels(generate(model, plan((42,))))
        assert np.array_equal(first, second)

    def test_different_seeds_give_different_images(self, model: Engine) -> None:
        a = pixels(generate(model, plan((1,))))
        b = pixels(generate(model, plan((2,))))
        assert np.abs(a - b).mean() > 1.0

    def test_batch_equals_single_runs_within_one_level(self, model: Engine) -> None:
        batch = pixels(generate(model, plan((7, 8, 9))))
        singles = np.concatenate([pixels(generate(model, plan((s,))))
                                  for s in (7, 8, 9)])
        assert batch.shape == (3, 512, 512, 3)
        assert np.abs(batch - singles).max() <= 1

    def test_global_rng_is_not_used(self, model: Engine) -> None:
        torch.manual_seed(0)
        a = pixels(generate(model, plan((5,))))
        torch.manual_seed(12345)
        b = pixels(generate(model, plan((5,))))
        assert np.array_equal(a, b)

    def test_guidance_with_negative_prompt_runs(self, model: Engine) -> None:
        guided = Plan(prompt="a cat", negative_prompt="a dog", width=512, height=512, steps=4,
                      guidance_scale=5.0, seeds=(1,))
        unguided = pixels(generate(model, plan((1,))))
        assert np.abs(pixels(generate(model, guided)) - unguided).max() > 0

    def test_count_tokens_counts_clip_tokens(self, model: Engine) -> None:
        short = model.count_tokens("a cat")
        assert short >= 3  # start, end and at least one content token
        assert model.count_tokens("a cat " * 100) > 77


class TestThreadSafety:
    def test_counting_tokens_never_disturbs_the_pipelines_tokenizer(
            self, model: Engine) -> None:
        """Request threads count tokens while the GPU thread encodes prompts as diffusers does
        (padded to 77): the padded encodes must all stay 77 tokens long."""
        stop = threading.Event()

        def count() -> None:
            while not stop.is_set():
                model.count_tokens("a cat " * 40)

        counters = [threading.Thread(target=count) for _ in range(2)]
        for thread in counters:
            thread.start()
        lengths = set()
        try:
            for _ in range(1500):
                ids = model.pipes[4].tokenizer("a dog", padding="max_length", max_length=77,
                                               truncation=True).input_ids
                lengths.add(len(ids))
        finally:
            stop.set()
            for thread in counters:
                thread.join(30)
        assert lengths == {77}


class TestOutOfMemory:
    """The engine's fallback: out of GPU memory with several images, one image at a time."""

    def test_a_batch_is_retried_one_image_at_a_time_with_the_same_images(
            self, model: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        expected = [generate(model, plan((seed,)))[0] for seed in (7, 8, 9)]  # alone
        original = model.run_batch
        sizes: list[int] = []

        def small_gpu(plans: Sequence[Plan], on_step: Any = None) -> Any:
            sizes.append(sum(len(p.seeds) for p in plans))
            if sizes[-1] > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return original(plans, on_step)

        monkeypatch.setattr(model, "run_batch", small_gpu)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        got = generate(model, plan((7, 8, 9)))
        assert sizes == [3, 1, 1, 1]
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(got, expected, strict=True))

    def test_the_retry_runs_once_the_failed_attempt_is_released(
            self, model: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """Inside the ``except`` block the traceback would keep the failed batch's frames, and
        their tensors, alive through the retry: the retry must run after it."""
        batch = pixels(generate(model, plan((7, 8))))
        alone = pixels([generate(model, plan((seed,)))[0] for seed in (7, 8)])
        original = model.run_batch
        failed: list[weakref.ref] = []
        retries: list[tuple[object, bool]] = []

        def small_gpu(plans: Sequence[Plan], on_step: Any = None) -> Any:
            if sum(len(p.seeds) for p in plans) > 1:
                activations = torch.ones(8)  # stands for the failed batch's tensors
                failed.append(weakref.ref(activations))
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            retries.append((sys.exc_info(), failed[0]() is None))
            return original(plans, on_step)

        monkeypatch.setattr(model, "run_batch", small_gpu)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        got = pixels(generate(model, plan((7, 8))))
        assert retries == [((None, None, None), True)] * 2
        assert np.array_equal(got, alone)
        assert np.abs(got - batch).max() <= 1  # the non-OOM batch, within fp rounding

    def test_the_job_error_does_not_hold_the_failed_attempt(
            self, model: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """The error waits in a future until the handler reads it: no context, no frames."""
        failed: list[weakref.ref] = []

        def oom(plans: Sequence[Plan], on_step: Any = None) -> Any:
            activations = torch.ones(8)
            failed.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        monkeypatch.setattr(model, "run_batch", oom)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        with pytest.raises(GpuMemoryError) as info:
            model.generate([plan((1, 2))])
        assert info.value.__context__ is None and info.value.__cause__ is None
        assert len(failed) == 2 and all(ref() is None for ref in failed)

    def test_one_image_that_does_not_fit_is_a_job_error_saying_what_to_try(
            self, model: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        def oom(plans: Sequence[Plan], on_step: Any = None) -> Any:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        freed: list[bool] = []
        monkeypatch.setattr(model, "run_batch", oom)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
        with pytest.raises(GpuMemoryError) as info:
            model.generate([replace(plan(), width=768)])
        assert isinstance(info.value, JobError) and freed
        assert str(info.value) == ("out of GPU memory generating 1 image(s) at 768x512: try "
                                   "fewer images or a smaller size")


class TestBatchedThroughTheQueue:
    """Batches through the GPU queue and the real pipeline equal lone runs."""

    def test_batched_results_equal_lone_results(self, model: Engine) -> None:
        calls: list[int] = []
        entered, gate = threading.Event(), threading.Event()

        def run(plans: Sequence[Plan], on_step: Any) -> list[list[Any]]:
            entered.set()
            gate.wait(WAIT)
            calls.append(len(plans))
            return model.generate(plans, on_step)

        worker = GpuWorker(run)
        plans = [plan((11,)), replace(plan((20, 21)), prompt="a dog"),
                 replace(plan((33,)), prompt="a bird")]
        blocker = worker.submit(plan((1,)))
        assert entered.wait(WAIT)
        futures = [worker.submit(p) for p in plans]
        gate.set()
        blocker.result(WAIT)
        batched = [f.result(WAIT).images for f in futures]
        assert calls == [1, 3]
        for p, images in zip(plans, batched, strict=True):
            alone = generate(model, p)
            for got, want in zip(images, alone, strict=True):
                diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
                assert diff.max() <= 1
        worker.close(WAIT)
