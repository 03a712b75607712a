"""The job-input contract: what is accepted, what is rejected, and how errors read."""

from __future__ import annotations

import pytest

from schemas import MAX_NESTING, MAX_PROMPT_CHARS, SEED_LIMIT, nests_deeper, parse_request
from worker.errors import InputError

NUMERIC = ["height", "width", "num_inference_steps", "guidance_scale", "seed", "num_images"]


def rejected(raw: object) -> str:
    with pytest.raises(InputError) as info:
        parse_request(raw)
    return str(info.value)


class TestDefaults:
    def test_only_prompt_gives_the_documented_defaults(self) -> None:
        req = parse_request({"prompt": "a cat"})
        assert (req.width, req.height, req.num_inference_steps) == (None, None, 4)  # 1024 later
        assert (req.guidance_scale, req.seed, req.num_images) == (0.0, None, 1)
        assert req.negative_prompt is None


class TestPrompt:
    def test_missing_prompt_is_named(self) -> None:
        assert "prompt is required" in rejected({"width": 512})

    @pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
    def test_blank_prompt_is_rejected(self, blank: str) -> None:
        assert "empty or blank" in rejected({"prompt": blank})

    @pytest.mark.parametrize("value", [5, ["a"], {"a": 1}, None])
    def test_non_string_prompt_is_rejected(self, value: object) -> None:
        message = rejected({"prompt": value})
        assert message.startswith("invalid input: prompt=")

    def test_overlong_prompt_is_rejected_without_echoing_it(self) -> None:
        message = rejected({"prompt": "x" * (MAX_PROMPT_CHARS + 1)})
        assert str(MAX_PROMPT_CHARS) in message
        assert len(message) < 600

    def test_unicode_prompt_is_accepted(self) -> None:
        assert parse_request({"prompt": "猫 🐱 café"}).prompt == "猫 🐱 café"


class TestNumbers:
    @pytest.mark.parametrize("field", NUMERIC)
    def test_booleans_are_not_numbers(self, field: str) -> None:
        message = rejected({"prompt": "p", field: True})
        assert f"{field}=True" in message and "boolean" in message

    def test_numeric_strings_are_numbers(self) -> None:
        req = parse_request({"prompt": "p", "width": "768", "height": "640", "seed": "42",
                             "guidance_scale": "1.5", "num_images": "2",
                             "num_inference_steps": "4"})
        assert (req.width, req.height, req.seed, req.guidance_scale) == (768, 640, 42, 1.5)
        assert req.num_images == 2 and req.num_inference_steps == 4

    @pytest.mark.parametrize("field", ["width", "seed", "num_images"])
    def test_fractional_values_are_not_integers(self, field: str) -> None:
        assert f"{field}=1.5" in rejected({"prompt": "p", field: 1.5})

    @pytest.mark.parametrize("value", ["nan", "inf", float("nan"), float("-inf")])
    def test_non_finite_guidance_is_rejected(self, value: object) -> None:
        assert "guidance_scale=" in rejected({"prompt": "p", "guidance_scale": value})

    @pytest.mark.parametrize("value", [-0.1, 20.01, 100])
    def test_guidance_outside_0_to_20_is_rejected(self, value: float) -> None:
        assert "a number from 0 to 20" in rejected({"prompt": "p", "guidance_scale": value})

    @pytest.mark.parametrize("value", [-1, SEED_LIMIT, 10**30])
    def test_seed_outside_32_bits_is_rejected(self, value: int) -> None:
        assert f"0 to {SEED_LIMIT - 1}" in rejected({"prompt": "p", "seed": value})

    def test_seed_limits_are_accepted(self) -> None:
        assert parse_request({"prompt": "p", "seed": 0}).seed == 0
        assert parse_request({"prompt": "p", "seed": SEED_LIMIT - 1}).seed == SEED_LIMIT - 1

    @pytest.mark.parametrize("value", [0, 5, -1])
    def test_num_images_outside_1_to_4_is_rejected(self, value: int) -> None:
        assert "from 1 to 4" in rejected({"prompt": "p", "num_images": value})

    @pytest.mark.parametrize("field", ["width", "height", "num_inference_steps"])
    @pytest.mark.parametrize("value", [0, -8])
    def test_sizes_and_steps_must_be_positive(self, field: str, value: int) -> None:
        assert f"{field}={value}" in rejected({"prompt": "p", field: value})

    def test_numeric_garbage_string_is_rejected(self) -> None:
        assert "width='wide'" in rejected({"prompt": "p", "width": "wide"})


class TestErrors:
    def test_unknown_field_is_named_with_a_suggestion(self) -> None:
        message = rejected({"prompt": "p", "widht": 512})
        assert "unknown field 'widht'" in message and "did you mean 'width'" in message

    def test_every_bad_field_is_reported_in_one_string(self) -> None:
        message = rejected({"prompt": "", "width": "x", "num_images": 9})
        assert isinstance(message, str)
        for field in ("prompt", "width", "num_images"):
            assert field in message

    def test_error_states_the_allowed_range(self) -> None:
        message = rejected({"prompt": "p", "num_images": 9})
        assert "num_images=9" in message and "allowed: an integer from 1 to 4" in message

    def test_long_bad_values_are_shortened(self) -> None:
        message = rejected({"prompt": "p", "width": "9" * 5000})
        assert "chars)" in message and len(message) < 400

    @pytest.mark.parametrize("raw", [None, "prompt", ["prompt"], 42])
    def test_input_that_is_not_an_object_is_rejected(self, raw: object) -> None:
        assert "expected a JSON object" in rejected(raw)


class TestAliases:
    def test_two_names_for_one_field_must_agree(self) -> None:
        message = rejected({"prompt": "p", "num_outputs": 2, "num_images": 3})
        assert message == ("invalid input: num_outputs and num_images name the same field "
                           "(num_images) with different values: 2, 3")

    def test_aliases_are_renamed(self) -> None:
        req = parse_request({"prompt": "p", "num_steps": 2, "guidance": 1.5, "num_outputs": 3})
        assert (req.num_inference_steps, req.guidance_scale, req.num_images) == (2, 1.5, 3)

    def test_a_validation_failure_is_an_input_error_not_a_value_error(self) -> None:
        # The handler treats only InputError as the caller's fault; a ValueError from a bug
        # must never pass for a rejected input.
        with pytest.raises(InputError) as info:
            parse_request({"prompt": ""})
        assert not isinstance(info.value, ValueError)


class TestNesting:
    @pytest.mark.parametrize(("value", "depth"), [
        ("x", 0), ([], 1), ([1, 2], 1), ({"a": 1}, 1), ([[1]], 2), ({"a": [{"b": [1]}]}, 4),
        ([1, [2, [3]]], 3), ((1, (2,)), 2)])
    def test_depth_is_counted_level_by_level(self, value: object, depth: int) -> None:
        assert nests_deeper(value, depth - 1) if depth else not nests_deeper(value, 0)
        assert not nests_deeper(value, depth)

    @pytest.mark.parametrize("levels", [MAX_NESTING + 1, 1_000, 100_000])
    def test_over_deep_values_are_refused_without_recursion(self, levels: int) -> None:
        deep: object = 1
        for _ in range(levels):
            deep = {"k": deep} if levels % 2 else [deep]
        with pytest.raises(InputError) as caught:
            parse_request({"prompt": "p", "seed": deep})
        assert str(caught.value).startswith(
            f"invalid input: 'seed' nests lists or objects more than {MAX_NESTING} levels deep")

    def test_the_limit_itself_is_judged_by_the_field_rules(self) -> None:
        deep: object = 1
        for _ in range(MAX_NESTING):
            deep = [deep]
        with pytest.raises(InputError, match=r"^invalid input: seed=\[\[\[\["):
            parse_request({"prompt": "p", "seed": deep})

    def test_a_wide_flat_byte_array_is_not_deep(self) -> None:
        assert not nests_deeper(list(range(256)) * 4_000, 1)
