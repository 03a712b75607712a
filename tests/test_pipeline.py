"""The Lightning loader and generator on the tiny model: the code path the real weights take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import model_files
import pipeline
from builder import make_tiny_model
from resolve import Plan


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> pipeline.Model:
    return pipeline.load(tiny_model_dir, (4,))


@pytest.fixture(scope="module")
def two_checkpoint_dir(scratch_dir: Path) -> Path:
    return make_tiny_model.build(scratch_dir / "tiny-1-4", steps=(1, 4))


def plan(seeds: tuple[int, ...] = (1,), side: int = 512, steps: int = 4) -> Plan:
    return Plan(prompt="a cat", negative_prompt=None, width=side, height=side, steps=steps,
                guidance_scale=0.0, seeds=seeds)


def pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


class TestLoading:
    def test_unet_holds_the_lightning_checkpoint(self, model: pipeline.Model,
                                                 tiny_model_dir: Path) -> None:
        state = load_file(tiny_model_dir / model_files.CHECKPOINTS[4])
        unet_state = model.pipes[4].unet.state_dict()
        assert state.keys() == unet_state.keys()
        for name, tensor in state.items():
            assert torch.equal(unet_state[name], tensor.to(torch.float32)), name

    def test_nothing_is_left_on_the_meta_device(self, model: pipeline.Model) -> None:
        for module in model.pipes[4].components.values():
            if isinstance(module, torch.nn.Module):
                tensors = list(module.parameters()) + list(module.buffers())
                assert {t.device.type for t in tensors} == {"cpu"}
                assert {t.dtype for t in module.parameters()} == {torch.float32}

    def test_unet_is_built_on_meta_not_randomly_initialised(
            self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        seen: list[set[str]] = []
        original = pipeline.UNet2DConditionModel.from_config

        def spy(*args, **kwargs):
            unet = original(*args, **kwargs)
            seen.append({p.device.type for p in unet.parameters()})
            return unet

        monkeypatch.setattr(pipeline.UNet2DConditionModel, "from_config", spy)
        pipeline.load_unet(tiny_model_dir, 4, torch.device("cpu"), torch.float32)
        assert seen == [{"meta"}]

    def test_scheduler_is_euler_trailing(self, model: pipeline.Model) -> None:
        scheduler = model.pipes[4].scheduler
        assert type(scheduler).__name__ == "EulerDiscreteScheduler"
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
        assert scheduler.config.prediction_type == "epsilon"

    def test_vae_does_not_upcast(self, model: pipeline.Model) -> None:
        assert model.pipes[4].vae.config.force_upcast is False

    def test_one_step_checkpoint_predicts_x0(self, two_checkpoint_dir: Path) -> None:
        loaded = pipeline.load(two_checkpoint_dir, (1, 4))
        assert loaded.pipes[1].scheduler.config.prediction_type == "sample"
        assert loaded.pipes[4].scheduler.config.prediction_type == "epsilon"

    def test_checkpoints_share_everything_but_the_unet(self, two_checkpoint_dir: Path) -> None:
        loaded = pipeline.load(two_checkpoint_dir, (1, 4))
        one, four = loaded.pipes[1], loaded.pipes[4]
        for name in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"):
            assert getattr(one, name) is getattr(four, name)
        assert one.unet is not four.unet
        assert not torch.equal(next(one.unet.parameters()), next(four.unet.parameters()))

    def test_missing_file_is_named(self, scratch_dir: Path, tiny_model_dir: Path) -> None:
        with pytest.raises(pipeline.ModelFolderError, match="sdxl_lightning_8step_unet"):
            pipeline.load(tiny_model_dir, (4, 8))

    def test_checkpoint_of_the_wrong_architecture_is_refused(self, scratch_dir: Path) -> None:
        folder = make_tiny_model.build(scratch_dir / "tiny-wrong", steps=(4,))
        ckpt = folder / model_files.CHECKPOINTS[4]
        state = load_file(ckpt)
        state.pop(next(iter(state)))
        save_file(state, ckpt)
        with pytest.raises(pipeline.ModelFolderError, match="does not fit unet/config.json"):
            pipeline.load(folder, (4,))


class TestGeneration:
    def test_images_have_the_requested_size(self, model: pipeline.Model) -> None:
        images = pipeline.generate(model, Plan(prompt="p", negative_prompt=None, width=768,
                                               height=512, steps=4, guidance_scale=0.0,
                                               seeds=(3,)))
        assert [image.size for image in images] == [(768, 512)]

    def test_same_seed_gives_the_same_image(self, model: pipeline.Model) -> None:
        first = pixels(pipeline.generate(model, plan((42,))))
        second = pixels(pipeline.generate(model, plan((42,))))
        assert np.array_equal(first, second)

    def test_different_seeds_give_different_images(self, model: pipeline.Model) -> None:
        a = pixels(pipeline.generate(model, plan((1,))))
        b = pixels(pipeline.generate(model, plan((2,))))
        assert np.abs(a - b).mean() > 1.0

    def test_batch_equals_single_runs_within_one_level(self, model: pipeline.Model) -> None:
        batch = pixels(pipeline.generate(model, plan((7, 8, 9))))
        singles = np.concatenate([pixels(pipeline.generate(model, plan((s,))))
                                  for s in (7, 8, 9)])
        assert batch.shape == (3, 512, 512, 3)
        assert np.abs(batch - singles).max() <= 1

    def test_global_rng_is_not_used(self, model: pipeline.Model) -> None:
        torch.manual_seed(0)
        a = pixels(pipeline.generate(model, plan((5,))))
        torch.manual_seed(12345)
        b = pixels(pipeline.generate(model, plan((5,))))
        assert np.array_equal(a, b)

    def test_guidance_with_negative_prompt_runs(self, model: pipeline.Model) -> None:
        guided = Plan(prompt="a cat", negative_prompt="a dog", width=512, height=512, steps=4,
                      guidance_scale=5.0, seeds=(1,))
        unguided = pixels(pipeline.generate(model, plan((1,))))
        assert np.abs(pixels(pipeline.generate(model, guided)) - unguided).max() > 0

    def test_prompt_tokens_counts_clip_tokens(self, model: pipeline.Model) -> None:
        short = pipeline.prompt_tokens(model, "a cat")
        assert short >= 3  # start, end and at least one content token
        assert pipeline.prompt_tokens(model, "a cat " * 100) > 77


class TestThreadSafety:
    def test_counting_tokens_never_disturbs_the_pipelines_tokenizer(
            self, model: pipeline.Model) -> None:
        """Request threads count tokens while the GPU thread encodes prompts as diffusers does
        (padded to 77): the padded encodes must all stay 77 tokens long."""
        import threading

        stop = threading.Event()

        def count() -> None:
            while not stop.is_set():
                pipeline.prompt_tokens(model, "a cat " * 40)

        counters = [threading.Thread(target=count) for _ in range(2)]
        for thread in counters:
            thread.start()
        lengths = set()
        try:
            for _ in range(1500):
                ids = model.tokenizer("a dog", padding="max_length", max_length=77,
                                      truncation=True).input_ids
                lengths.add(len(ids))
        finally:
            stop.set()
            for thread in counters:
                thread.join(30)
        assert lengths == {77}
