"""From request to the parameters actually used: snapping, clamping, steps, strength, guidance,
seeds and the safety-checker decision."""

from __future__ import annotations

import pytest

from schemas import SCHEDULERS, SEED_LIMIT, parse_request
from worker.errors import InputError
from worker.plan import (
    draw_seed,
    resolve,
    resolve_safety,
    resolve_steps,
    schedulers_for,
    sizes_from_image,
    snap_side,
    warmup_plan,
)


def plan_for(available: tuple[int, ...] = (4,), image_size: tuple[int, int] | None = None,
             safety_mode: str = "off", **fields: object):
    return resolve(parse_request({"prompt": "p", **fields}), available, safety_mode=safety_mode,
                   image_size=image_size, new_seed=lambda: 99)


class TestSizes:
    @pytest.mark.parametrize(("value", "expected"), [(1001, 1000), (1004, 1008), (1003, 1000),
                                                     (1020, 1024), (513, 512)])
    def test_snaps_to_nearest_multiple_of_8(self, value: int, expected: int) -> None:
        side, warning = snap_side("width", value)
        assert side == expected
        assert warning == f"width {value} was snapped to {expected} (a multiple of 8)"

    @pytest.mark.parametrize(("value", "expected"), [(1, 512), (100, 512), (2000, 1536),
                                                     (10**12, 1536), (1540, 1536)])
    def test_clamps_to_512_1536(self, value: int, expected: int) -> None:
        side, warning = snap_side("height", value)
        assert side == expected
        assert warning == f"height {value} was clamped to {expected} (allowed 512-1536)"

    @pytest.mark.parametrize("value", [512, 768, 1024, 1536])
    def test_valid_sizes_pass_without_warning(self, value: int) -> None:
        assert snap_side("width", value) == (value, None)

    def test_plan_uses_snapped_sizes_and_reports_them(self) -> None:
        plan, warnings = plan_for(width=1001, height=4000)
        assert (plan.width, plan.height) == (1000, 1536)
        assert warnings == ["width 1001 was snapped to 1000 (a multiple of 8)",
                            "height 4000 was clamped to 1536 (allowed 512-1536)"]


class TestSteps:
    def test_loaded_step_count_passes_silently(self) -> None:
        assert resolve_steps(4, (4,)) == (4, None)

    @pytest.mark.parametrize(("requested", "available", "expected"),
                             [(8, (4,), 4), (1, (4,), 4), (3, (2, 4), 4), (1, (2, 4), 2),
                              (6, (4, 8), 8), (100, (2, 4, 8), 8)])
    def test_resolves_to_nearest_loaded_checkpoint(self, requested: int,
                                                   available: tuple[int, ...],
                                                   expected: int) -> None:
        steps, warning = resolve_steps(requested, available)
        assert steps == expected
        assert warning and f"num_inference_steps {requested} was resolved to {expected}" in warning

    def test_plan_names_the_checkpoint(self) -> None:
        plan, _ = plan_for(num_inference_steps=8)
        assert plan.parameters()["checkpoint"] == "sdxl_lightning_4step_unet.safetensors"
        assert plan.parameters()["num_inference_steps"] == 4


class TestSchedulerCheckpointPairs:
    @pytest.mark.parametrize("name", ["K_EULER_ANCESTRAL", "PNDM"])
    def test_x0_checkpoint_refuses_schedulers_that_cannot_step_it(self, name: str) -> None:
        with pytest.raises(InputError) as caught:
            plan_for(available=(1, 4), num_inference_steps=1, scheduler=name)
        assert str(caught.value) == (
            f"invalid input: scheduler {name!r} cannot run the 1-step checkpoint "
            "(sdxl_lightning_1step_unet_x0.safetensors, x0-prediction); with 1 step(s) use one "
            "of: K_EULER, DDIM, DPMSolverMultistep, KarrasDPM, DPM++2MSDE, HeunDiscrete")

    def test_refusal_follows_the_resolved_checkpoint_not_the_request(self) -> None:
        # 3 steps resolve to 4 here: ancestral runs; on a 1-step-only worker it is refused.
        plan, _ = plan_for(available=(1, 4), num_inference_steps=3, scheduler="K_EULER_ANCESTRAL")
        assert (plan.steps, plan.scheduler) == (4, "K_EULER_ANCESTRAL")
        with pytest.raises(InputError, match="cannot run the 1-step checkpoint"):
            plan_for(available=(1,), num_inference_steps=4, scheduler="k_euler_ancestral")

    @pytest.mark.parametrize("steps", [2, 4, 8])
    def test_epsilon_checkpoints_run_every_scheduler(self, steps: int) -> None:
        assert schedulers_for(steps) == SCHEDULERS

    def test_default_scheduler_runs_every_checkpoint(self) -> None:
        assert all("K_EULER" in schedulers_for(steps) for steps in (1, 2, 4, 8))


class TestGuidance:
    def test_negative_prompt_without_guidance_is_dropped_and_reported(self) -> None:
        plan, warnings = plan_for(negative_prompt="blurry")
        assert plan.negative_prompt is None
        assert any("negative_prompt was ignored" in w for w in warnings)

    def test_negative_prompt_with_guidance_is_used(self) -> None:
        plan, warnings = plan_for(negative_prompt="blurry", guidance_scale=2)
        assert (plan.negative_prompt, plan.guidance_scale) == ("blurry", 2.0)
        assert warnings == []

    @pytest.mark.parametrize("value", [2.5, 7.5, 20])
    def test_guidance_far_above_lightnings_gets_a_warning_but_runs(self, value: float) -> None:
        plan, warnings = plan_for(guidance_scale=value)
        assert plan.guidance_scale == value
        assert warnings == [f"guidance_scale {value:g} is far above what SDXL-Lightning was "
                            f"distilled for (0): expect over-saturated, burnt-looking images "
                            f"and twice the GPU time; use 0, or up to 2 with a negative prompt"]

    def test_guidance_up_to_2_runs_without_a_warning(self) -> None:
        assert plan_for(guidance_scale=2)[1] == []

    @pytest.mark.parametrize("value", [0.5, 1.0])
    def test_guidance_at_or_below_1_acts_as_0(self, value: float) -> None:
        plan, warnings = plan_for(guidance_scale=value)
        assert plan.guidance_scale == 0.0
        assert warnings == [f"guidance_scale {value:g} acts as 0: classifier-free guidance "
                            f"only runs above 1"]

    def test_default_request_has_no_warnings(self) -> None:
        assert plan_for()[1] == []


class TestSeeds:
    def test_image_i_uses_seed_plus_i(self) -> None:
        plan, _ = plan_for(seed=10, num_images=3)
        assert plan.seeds == (10, 11, 12)

    def test_seeds_wrap_at_32_bits(self) -> None:
        plan, _ = plan_for(seed=SEED_LIMIT - 1, num_images=2)
        assert plan.seeds == (SEED_LIMIT - 1, 0)

    def test_null_seed_is_drawn_and_reported(self) -> None:
        plan, _ = plan_for(num_images=2)
        assert plan.seeds == (99, 100)
        assert plan.parameters()["seed"] == 99

    def test_drawn_seeds_cover_the_32_bit_range(self) -> None:
        seeds = {draw_seed() for _ in range(200)}
        assert all(0 <= s < SEED_LIMIT for s in seeds)
        assert len(seeds) > 195 and max(seeds) > 2**16  # not a 2-byte seed


class TestParameters:
    def test_parameters_echo_every_used_value(self) -> None:
        plan, _ = plan_for(width=768, height=1344, seed=5, num_images=2, guidance_scale=3,
                           negative_prompt="n")
        assert plan.parameters() == {
            "prompt": "p", "negative_prompt": "n", "width": 768, "height": 1344,
            "num_inference_steps": 4, "guidance_scale": 3.0, "seed": 5, "num_images": 2,
            "mode": "txt2img", "strength": None, "scheduler": "K_EULER", "output_format": "png",
            "quality": None, "safety_checker": False, "model": "ByteDance/SDXL-Lightning",
            "checkpoint": "sdxl_lightning_4step_unet.safetensors"}


class TestStrength:
    @pytest.mark.parametrize(("strength", "effective"), [(0.25, 0.25), (0.6, 0.5), (0.8, 0.75),
                                                         (1.0, 1.0)])
    def test_is_quantised_to_whole_steps(self, strength: float, effective: float) -> None:
        plan, _ = plan_for(image_size=(512, 512), image="x", strength=strength)
        assert plan.strength == effective and plan.mode == "img2img"

    def test_too_small_to_run_a_step_is_an_input_error_naming_the_minimum(self) -> None:
        with pytest.raises(InputError) as info:
            plan_for(image_size=(512, 512), image="x", strength=0.2)
        assert str(info.value) == ("invalid input: strength=0.2 runs no denoising step with the "
                                   "4-step checkpoint; the smallest allowed is 0.25")

    def test_inpainting_defaults_to_every_step(self) -> None:
        plan, warnings = plan_for(image_size=(512, 512), image="x", mask="y")
        assert (plan.mode, plan.strength, warnings) == ("inpaint", 1.0, [])


class TestInitImageSize:
    def test_the_output_follows_the_image_snapped(self) -> None:
        plan, warnings = plan_for(image_size=(601, 700), image="x", strength=0.5)
        assert (plan.width, plan.height) == (600, 704)
        assert warnings == ["output size 600x704 follows the init image (601x700), fitted to "
                            "512-1536 in multiples of 8"]

    def test_a_huge_side_beside_an_image_is_clamped_not_an_overflow(self) -> None:
        req = parse_request({"prompt": "p", "image": "x", "width": 10**400})
        width, height = sizes_from_image(req, (512, 256))
        assert width == 10**400 and height > 10**399  # integer arithmetic, clamped later
        plan, _ = plan_for(image_size=(512, 256), image="x", width=10**400, strength=0.5)
        assert (plan.width, plan.height) == (1536, 1536)


class TestSafetyChecker:
    @pytest.mark.parametrize(("setting", "disable", "checked"), [
        ("off", False, False), ("off", True, False), ("on", False, True), ("on", True, False),
        ("always", False, True)])
    def test_who_decides(self, setting: str, disable: bool, checked: bool) -> None:
        req = parse_request({"prompt": "p", "disable_safety_checker": disable})
        assert resolve_safety(setting, req) == (checked, [])

    def test_always_overrules_the_caller_and_says_so(self) -> None:
        plan, warnings = plan_for(safety_mode="always", disable_safety_checker=True)
        assert plan.safety_check is True
        assert warnings == ["disable_safety_checker was ignored: this worker always runs the "
                            "safety checker (SAFETY_CHECKER=always)"]
        assert plan.parameters()["safety_checker"] is True


class TestWarmupPlan:
    def test_one_image_at_the_size_without_guidance(self) -> None:
        plan = warmup_plan(2, 768, 512)
        assert (plan.steps, plan.width, plan.height, plan.seeds) == (2, 768, 512, (0,))
        assert plan.guidance_scale == 0.0 and plan.mode == "txt2img" and not plan.safety_check
