"""The optional safety checker: off by default, withholds flagged images, per-job opt-out."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import handler
import pipeline
import safety
from schemas import Settings, parse_request


def run(**fields: Any) -> dict[str, Any]:
    job = {"id": "safety", "input": {"prompt": "p", "width": 512, "height": 512, "seed": 1,
                                     **fields}}
    return asyncio.run(handler.handler(job))


def set_verdict(model: pipeline.Model, flag_everything: bool) -> None:
    """Move the tiny checker's concept thresholds so it flags everything, or nothing."""
    checker, _ = model.safety
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0 if flag_everything else 10.0)
        checker.special_care_embeds_weights.fill_(-10.0 if flag_everything else 10.0)


@pytest.fixture(scope="module")
def checked_model(tiny_model_dir: Path) -> pipeline.Model:
    return pipeline.load(tiny_model_dir, (4,), safety=True)


@pytest.fixture
def worker_with_checker(monkeypatch: pytest.MonkeyPatch,
                        checked_model: pipeline.Model) -> Iterator[pipeline.Model]:
    monkeypatch.setattr(handler.MODEL, "safety", checked_model.safety)
    monkeypatch.setattr(handler, "SETTINGS",
                        handler.SETTINGS.model_copy(update={"safety_checker": "on"}))
    yield checked_model


class TestChecker:
    def test_off_by_default(self) -> None:
        assert Settings.from_env({}).safety_checker == "off"
        assert handler.MODEL.safety is None
        assert "nsfw" not in run()["images"][0]

    def test_flags_follow_the_checker(self, checked_model: pipeline.Model) -> None:
        images = [Image.new("RGB", (512, 512), (i * 60, 10, 10)) for i in range(3)]
        set_verdict(checked_model, flag_everything=True)
        assert safety.nsfw_flags(checked_model, images) == [True, True, True]
        set_verdict(checked_model, flag_everything=False)
        assert safety.nsfw_flags(checked_model, images) == [False, False, False]

    @pytest.mark.parametrize(("text", "mode"), [("true", "on"), ("0", "off"),
                                                ("ALWAYS", "always")])
    def test_setting_values(self, text: str, mode: str) -> None:
        assert Settings.from_env({"SAFETY_CHECKER": text}).safety_checker == mode

    def test_bad_setting_is_named(self) -> None:
        with pytest.raises(ValueError, match="SAFETY_CHECKER='sometimes'"):
            Settings.from_env({"SAFETY_CHECKER": "sometimes"})


class TestWithholding:
    def test_flagged_image_is_withheld_not_blacked_out(
            self, worker_with_checker: pipeline.Model) -> None:
        set_verdict(worker_with_checker, flag_everything=True)
        response = run(num_images=2)
        assert response["images"] == [{"image": None, "seed": 1, "nsfw": True},
                                       {"image": None, "seed": 2, "nsfw": True}]
        assert response["parameters"]["safety_checker"] is True

    def test_clean_images_are_returned_and_marked(
            self, worker_with_checker: pipeline.Model) -> None:
        set_verdict(worker_with_checker, flag_everything=False)
        response = run()
        assert response["images"][0]["nsfw"] is False
        assert response["images"][0]["image"].startswith("data:image/png;base64,")

    def test_only_the_flagged_image_of_a_batch_is_withheld(
            self, worker_with_checker: pipeline.Model, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(safety, "nsfw_flags", lambda model, images: [True, False])
        items = run(num_images=2)["images"]
        assert items[0] == {"image": None, "seed": 1, "nsfw": True}
        assert items[1]["nsfw"] is False and items[1]["image"]

    def test_caller_may_disable_it_when_the_setting_is_on(
            self, worker_with_checker: pipeline.Model) -> None:
        set_verdict(worker_with_checker, flag_everything=True)
        response = run(disable_safety_checker=True)
        assert response["images"][0]["image"] and "nsfw" not in response["images"][0]
        assert response["parameters"]["safety_checker"] is False

    def test_always_overrules_the_caller_and_says_so(self) -> None:
        settings = Settings(safety_checker="always")
        checked, warnings = settings.safety_for(parse_request({"prompt": "p",
                                                               "disable_safety_checker": True}))
        assert checked is True
        assert warnings == ["disable_safety_checker was ignored: this worker always runs the "
                            "safety checker (SAFETY_CHECKER=always)"]
