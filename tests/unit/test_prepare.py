"""inputs/prepare: from a validated request to the plan the GPU runs, with its images attached.

A stand-in token counter replaces the engine's tokenizer (one token per word, plus start and
end), so no model is needed: the real counter is tested on the tiny model.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from schemas import parse_request
from worker.errors import InputError
from worker.inputs import images
from worker.inputs.pool import DecodePool, shared_pool
from worker.inputs.prepare import prepare, prepare_async


def count_words(text: str) -> int:
    return len(text.split()) + 2


def png(width: int, height: int, mode: str = "RGB", value: int = 200) -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), value if mode == "L" else (value, 30, 30)).save(
        buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def prepared(safety_mode: str = "off", **fields: Any):
    return prepare(parse_request({"prompt": "a fox", "seed": 1, **fields}), (4,), safety_mode,
                   count_words)


class TestTextToImage:
    def test_no_images_and_no_warnings(self) -> None:
        plan, warnings = prepared(width=512, height=512)
        assert plan.init_image is None and plan.mask_image is None and warnings == []

    def test_the_safety_setting_decides_the_check(self) -> None:
        assert prepared(safety_mode="on")[0].safety_check is True
        assert prepared(safety_mode="on", disable_safety_checker=True)[0].safety_check is False


class TestInitImages:
    def test_the_init_image_is_resized_to_the_plan_size(self) -> None:
        plan, warnings = prepared(image=png(601, 700), strength=0.5)
        assert (plan.width, plan.height) == (600, 704)
        assert plan.init_image.mode == "RGB" and plan.init_image.size == (600, 704)
        assert warnings[0].startswith("output size 600x704 follows the init image (601x700)")

    def test_an_image_of_the_plan_size_is_used_as_decoded(self) -> None:
        plan, _ = prepared(image=png(512, 512), strength=0.5)
        assert np.asarray(plan.init_image)[0, 0].tolist() == [200, 30, 30]

    def test_the_mask_is_loaded_at_the_plan_size(self) -> None:
        plan, warnings = prepared(image=png(512, 768), mask=png(64, 64, "L", 255))
        assert plan.mode == "inpaint" and plan.mask_image.mode == "L"
        assert plan.mask_image.size == (512, 768) and warnings == []

    def test_a_bad_image_is_an_input_error_naming_the_field(self) -> None:
        with pytest.raises(InputError, match=r"^image: not valid base64"):
            prepared(image="not base64 at all!")
        with pytest.raises(InputError, match=r"^mask: "):
            prepared(image=png(512, 512), mask=base64.b64encode(b"GIF89a").decode())

    def test_a_decoder_bug_is_not_passed_off_as_the_callers_mistake(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        def broken(data: bytes, field: str, limits: Any = None) -> Any:
            raise ValueError("a bug in the decoder")

        monkeypatch.setattr(images, "decode", broken)
        with pytest.raises(ValueError) as info:
            prepared(image=png(512, 512))
        assert not isinstance(info.value, InputError)


class TestTruncation:
    def test_a_long_prompt_is_reported_with_its_token_count(self) -> None:
        _, warnings = prepared(prompt="word " * 80, prompt_weighting=False)
        assert warnings == ["prompt is 82 CLIP tokens; only the first 77 were used"]

    def test_with_prompt_weighting_a_long_prompt_is_chunked_not_cut(self) -> None:
        plan, warnings = prepared(prompt="word " * 80)
        assert warnings == [] and plan.weighted

    def test_an_unused_negative_prompt_is_not_counted(self) -> None:
        _, warnings = prepared(negative_prompt="word " * 80)
        assert warnings == ["negative_prompt was ignored: it only takes effect with "
                            "guidance_scale > 1 (Lightning is distilled for 0)"]

    def test_a_used_negative_prompt_is_counted(self) -> None:
        _, warnings = prepared(negative_prompt="word " * 80, guidance_scale=2,
                               prompt_weighting=False)
        assert warnings == ["negative_prompt is 82 CLIP tokens; only the first 77 were used"]


class TestPrepareAsync:
    """What the handler awaits: the same plan, its images decoded in the decode pool."""

    def test_the_same_plan_from_the_shared_pool(self) -> None:
        fields = {"prompt": "a fox", "seed": 1, "image": png(601, 700), "strength": 0.5,
                  "mask": png(64, 64, "L", 255)}
        here, here_warnings = prepare(parse_request(fields), (4,), "off", count_words)
        there, there_warnings = asyncio.run(prepare_async(parse_request(fields), (4,), "off",
                                                          count_words))
        assert there_warnings == here_warnings and there.mode == here.mode == "inpaint"
        for image in ("init_image", "mask_image"):
            np.testing.assert_array_equal(np.asarray(getattr(there, image)),
                                          np.asarray(getattr(here, image)))
        assert shared_pool() is shared_pool() and shared_pool()._idle  # kept warm

    def test_a_text_only_job_starts_no_decoder(self) -> None:
        with DecodePool() as pool:
            plan, _ = asyncio.run(prepare_async(parse_request({"prompt": "a fox"}), (4,), "off",
                                                count_words, pool=pool))
            assert plan.init_image is None and pool._idle == [] and pool.busy == []

    def test_errors_name_the_field(self) -> None:
        request = parse_request({"prompt": "a fox", "image": png(64, 64),
                                 "mask": base64.b64encode(b"GIF89a").decode()})
        with pytest.raises(InputError, match=r"^mask: format GIF is not accepted"):
            asyncio.run(prepare_async(request, (4,), "off", count_words))
