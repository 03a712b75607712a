"""From request to the parameters actually used: snapping, clamping, steps, guidance, seeds."""

from __future__ import annotations

import pytest

from resolve import draw_seed, resolve, resolve_steps, snap_side
from schemas import SEED_LIMIT, parse_request


def plan_for(available: tuple[int, ...] = (4,), **fields: object):
    return resolve(parse_request({"prompt": "p", **fields}), available, new_seed=lambda: 99)


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


class TestGuidance:
    def test_negative_prompt_without_guidance_is_dropped_and_reported(self) -> None:
        plan, warnings = plan_for(negative_prompt="blurry")
        assert plan.negative_prompt is None
        assert any("negative_prompt was ignored" in w for w in warnings)

    def test_negative_prompt_with_guidance_is_used(self) -> None:
        plan, warnings = plan_for(negative_prompt="blurry", guidance_scale=2)
        assert (plan.negative_prompt, plan.guidance_scale) == ("blurry", 2.0)
        assert warnings == []

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
