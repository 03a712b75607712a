"""img2img, inpainting, schedulers and step checkpoints through the real pipeline (tiny model)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline
from builder import make_tiny_model
from pipeline import Engine
from schemas import SCHEDULERS, parse_request
from worker.engine import decode
from worker.errors import InputError
from worker.plan import Plan, resolve, schedulers_for
from worker.spec import ModelSpec

# UNet evaluations of each scheduler for a 4-step run (the README's table).
UNET_EVALS_AT_4_STEPS = {"K_EULER": 4, "K_EULER_ANCESTRAL": 4, "DDIM": 4,
                         "DPMSolverMultistep": 4, "KarrasDPM": 4, "DPM++2MSDE": 4,
                         "HeunDiscrete": 7, "PNDM": 5}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    spec = ModelSpec(steps=(2, 4))
    return Engine.load(spec, make_tiny_model.build(tmp_path_factory.mktemp("modes") / "m", spec))


def generate(engine: Engine, plan: Plan, on_step: object = None) -> list[Image.Image]:
    return engine.generate([plan], on_step)[0]


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)),
                          np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 128, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


def txt2img(**fields: object) -> Plan:
    base = Plan(prompt="a cat", negative_prompt=None, width=512, height=512, steps=4,
                guidance_scale=0.0, seeds=(1,))
    return replace(base, **fields)


def count_unet_calls(model: Engine, plan: Plan, steps: int = 4) -> int:
    calls = 0
    unet = model.pipes[steps].unet

    def hook(*_: object) -> None:
        nonlocal calls
        calls += 1

    handle = unet.register_forward_hook(hook)
    try:
        generate(model, plan)
    finally:
        handle.remove()
    return calls


class TestImg2Img:
    def test_output_has_the_plan_size_and_changes_with_strength(self,
                                                             model: Engine) -> None:
        init = gradient(512, 640)
        plans = [txt2img(mode="img2img", width=512, height=640, strength=s, init_image=init)
                 for s in (0.25, 1.0)]
        weak, strong = (np.asarray(generate(model, p)[0], np.int16) for p in plans)
        assert weak.shape == strong.shape == (640, 512, 3)
        # Less strength keeps more of the init image.
        target = np.asarray(init, np.int16)
        assert np.abs(weak - target).mean() < np.abs(strong - target).mean()

    @pytest.mark.parametrize(("strength", "unet_calls"), [(0.25, 1), (0.5, 2), (0.8, 3),
                                                         (1.0, 4)])
    def test_steps_run_are_int_steps_times_strength(self, model: Engine,
                                                    strength: float, unet_calls: int) -> None:
        plan = txt2img(mode="img2img", strength=strength, init_image=gradient(512, 512))
        assert count_unet_calls(model, plan) == unet_calls

    def test_same_seed_same_image(self, model: Engine) -> None:
        plan = txt2img(mode="img2img", strength=0.5, init_image=gradient(512, 512))
        a, b = (np.asarray(generate(model, plan)[0]) for _ in range(2))
        assert np.array_equal(a, b)


class TestInpaint:
    def test_inpainting_runs_every_step_at_the_plan_size(self, model: Engine) -> None:
        mask = Image.new("L", (768, 512), 0)
        mask.paste(255, (200, 100, 500, 400))
        plan = txt2img(mode="inpaint", width=768, height=512, strength=1.0,
                       init_image=gradient(768, 512), mask_image=mask)
        assert count_unet_calls(model, plan) == 4  # diffusers' default 0.9999 would run 3
        assert generate(model, plan)[0].size == (768, 512)

    def test_mask_changes_the_result(self, model: Engine) -> None:
        init = gradient(512, 512)
        empty, full = Image.new("L", (512, 512), 0), Image.new("L", (512, 512), 255)
        results = [np.asarray(generate(model, txt2img(
            mode="inpaint", strength=1.0, init_image=init, mask_image=m))[0], np.int16)
            for m in (empty, full)]
        assert np.abs(results[0] - results[1]).max() > 0


class TestSchedulers:
    def test_every_scheduler_is_offered(self) -> None:
        assert set(pipeline.SCHEDULERS) == set(SCHEDULERS) == set(UNET_EVALS_AT_4_STEPS)

    @pytest.mark.parametrize("name", SCHEDULERS)
    def test_scheduler_runs_with_its_documented_cost(self, model: Engine,
                                                     name: str) -> None:
        plan = txt2img(scheduler=name)
        assert count_unet_calls(model, plan) == UNET_EVALS_AT_4_STEPS[name]
        images = generate(model, plan)
        assert images[0].size == (512, 512)

    @pytest.mark.parametrize("name", SCHEDULERS)
    def test_scheduler_uses_trailing_timesteps(self, model: Engine, name: str) -> None:
        scheduler = model.view(4, "txt2img", name).scheduler
        assert scheduler.config.timestep_spacing == "trailing"
        scheduler.set_timesteps(4)
        assert int(scheduler.timesteps[0]) == 999

    def test_per_job_scheduler_leaves_the_shared_pipeline_unchanged(
            self, model: Engine) -> None:
        shared = model.pipes[4]
        before = (type(shared.scheduler), dict(shared.scheduler.config), id(shared.scheduler))
        baseline = np.asarray(generate(model, txt2img(seeds=(5,)))[0])
        for name in SCHEDULERS:
            generate(model, txt2img(scheduler=name))
        assert (type(shared.scheduler), dict(shared.scheduler.config),
                id(shared.scheduler)) == before
        assert np.array_equal(np.asarray(generate(model, txt2img(seeds=(5,)))[0]),
                              baseline)

    def test_views_share_the_weights(self, model: Engine) -> None:
        views = [model.view(4, mode, "DDIM") for mode in ("txt2img", "img2img",
                                                                    "inpaint")]
        assert all(v.unet is model.pipes[4].unet and v.vae is model.pipes[4].vae for v in views)


class TestCheckpoints:
    def test_steps_resolve_to_the_nearest_loaded_checkpoint(self, model: Engine) -> None:
        for requested, expected in ((1, 2), (2, 2), (3, 4), (8, 4)):
            plan, _ = resolve(parse_request({"prompt": "p", "num_inference_steps": requested}),
                              model.steps)
            assert plan.steps == expected
            assert plan.parameters()["checkpoint"] == f"sdxl_lightning_{expected}step_unet" \
                                                      ".safetensors"

    def test_each_checkpoint_runs_with_its_own_unet(self, model: Engine) -> None:
        assert count_unet_calls(model, txt2img(steps=2), steps=2) == 2
        two = np.asarray(generate(model, txt2img(steps=2))[0], np.int16)
        four = np.asarray(generate(model, txt2img(steps=4))[0], np.int16)
        assert np.abs(two - four).max() > 0


class TestProgress:
    def test_one_callback_per_denoising_step(self, model: Engine) -> None:
        seen: list[tuple[int, int]] = []
        generate(model, txt2img(), on_step=lambda d, t, preview: seen.append((d, t)))
        assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    def test_img2img_progress_counts_the_steps_it_runs(self, model: Engine) -> None:
        seen: list[tuple[int, int]] = []
        plan = txt2img(mode="img2img", strength=0.5, init_image=gradient(512, 512))
        generate(model, plan, on_step=lambda d, t, preview: seen.append((d, t)))
        assert seen == [(1, 2), (2, 2)]


def test_generation_runs_without_grad(model: Engine) -> None:
    assert not any(p.requires_grad for p in model.pipes[4].unet.parameters())
    assert torch.is_grad_enabled()  # inference_mode is scoped to the call


class TestSpeedOptions:
    def test_tiny_decoder_decodes_instead_of_the_full_vae(self, tiny_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        model = Engine.load(ModelSpec(steps=(4,), tiny_decoder=True), tiny_model_dir)
        used: list[str] = []
        monkeypatch.setattr(decode, "_decode",
                            lambda vae, latents, _d=decode._decode: used.append(
                                type(vae).__name__) or _d(vae, latents))
        images = generate(model, txt2img(width=768, seeds=(1, 2)))
        assert used == ["AutoencoderTiny", "AutoencoderTiny"]
        assert [image.size for image in images] == [(768, 512)] * 2

    def test_gpu_optimisations_leave_results_unchanged(self, tiny_model_dir: Path) -> None:
        model = Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)
        before = np.asarray(generate(model, txt2img(seeds=(3,)))[0], np.int16)
        model.optimize()  # applied automatically on CUDA; forced here on CPU
        unet = model.pipes[4].unet
        assert {type(p).__name__ for p in unet.attn_processors.values()} == {
            "FusedAttnProcessor2_0"}
        conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        after = np.asarray(generate(model, txt2img(seeds=(3,)))[0], np.int16)
        assert np.abs(before - after).max() <= 1


@pytest.fixture(scope="module")
def every_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    spec = ModelSpec(steps=(1, 2, 4, 8))
    return Engine.load(spec, make_tiny_model.build(tmp_path_factory.mktemp("all") / "m", spec))


class TestEverySchedulerWithEveryCheckpoint:
    """Each pair either runs or is refused up front (worker/plan.py), never fails on the GPU."""

    @pytest.mark.parametrize("steps", [1, 2, 4, 8])
    @pytest.mark.parametrize("name", SCHEDULERS)
    def test_pair_runs_or_is_refused_before_the_gpu(self, every_checkpoint: Engine, name: str,
                                                    steps: int) -> None:
        plan = txt2img(steps=steps, scheduler=name, width=512, height=512)
        if name in schedulers_for(steps):
            image = generate(every_checkpoint, plan)[0]
            assert image.size == (512, 512)
            assert np.asarray(image).std() > 0
            return
        # The refusal is what diffusers itself does with this pair, not a guess.
        with pytest.raises((NotImplementedError, ValueError), match="sample"):
            generate(every_checkpoint, plan)
        with pytest.raises(InputError, match=f"cannot run the {steps}-step checkpoint"):
            resolve(parse_request({"prompt": "p", "num_inference_steps": steps,
                                   "scheduler": name}), (1, 2, 4, 8))


class TestPreviewEstimate:
    @pytest.mark.parametrize("name", ["K_EULER", "DDIM", "DPMSolverMultistep", "HeunDiscrete"])
    def test_the_x0_estimate_is_caught_as_the_pipelines_call_step(self, model: Engine,
                                                                  name: str) -> None:
        scheduler = model.view(4, "txt2img", name).scheduler
        scheduler.set_timesteps(4)
        estimate = pipeline._Estimate(scheduler)
        sample = torch.randn(1, 4, 8, 8)
        try:
            scheduler.step(torch.randn(1, 4, 8, 8), scheduler.timesteps[0], sample,
                           return_dict=False)  # as diffusers' SDXL pipelines call it
            assert estimate.x0 is not None and estimate.x0.shape == sample.shape
            assert not torch.equal(estimate.x0, sample)
        finally:
            estimate.release()
        assert "step" not in vars(scheduler)  # the class's own method again
