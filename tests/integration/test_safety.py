"""The optional safety checker: off by default, withholds flagged images, per-job opt-out.

Which jobs are checked (SAFETY_CHECKER off/on/always and the caller's opt-out) is decided in
``worker/plan.py`` and tested in tests/unit; here the checker itself runs on the tiny model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from pipeline import Engine
from tests.integration.conftest import Run
from worker.engine import safety
from worker.plan import Plan
from worker.spec import ModelSpec


@pytest.fixture(scope="module")
def run(job_runner: Callable[..., Run]) -> Run:
    return job_runner("safety", prompt="p", width=512, height=512, seed=1)


def set_verdict(model: Engine, flag_everything: bool) -> None:
    """Move the tiny checker's concept thresholds so it flags everything, or nothing."""
    checker, _ = model.checker
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0 if flag_everything else 10.0)
        checker.special_care_embeds_weights.fill_(-10.0 if flag_everything else 10.0)


@pytest.fixture(scope="module")
def checked_model(tiny_model_dir: Path) -> Engine:
    return Engine.load(ModelSpec(steps=(4,), safety_checker=True), tiny_model_dir)


@pytest.fixture
def worker_with_checker(handler: ModuleType, monkeypatch: pytest.MonkeyPatch,
                        checked_model: Engine) -> Iterator[Engine]:
    monkeypatch.setattr(handler.ENGINE, "checker", checked_model.checker)
    monkeypatch.setattr(handler.SERVICE, "settings",
                        handler.SETTINGS.model_copy(update={"safety_mode": "on"}))
    yield checked_model


def flags(model: Engine, images: list[Image.Image]) -> list[bool]:
    return safety.nsfw_flags(model.checker, images, model.device, model.dtype)


class TestChecker:
    def test_off_by_default(self, handler: ModuleType, run: Run) -> None:
        assert handler.SETTINGS.safety_mode == "off" and handler.ENGINE.checker is None
        assert "nsfw" not in run()["images"][0]

    def test_flags_follow_the_checker(self, checked_model: Engine) -> None:
        images = [Image.new("RGB", (512, 512), (i * 60, 10, 10)) for i in range(3)]
        set_verdict(checked_model, flag_everything=True)
        assert flags(checked_model, images) == [True, True, True]
        set_verdict(checked_model, flag_everything=False)
        assert flags(checked_model, images) == [False, False, False]

    def test_a_job_asking_for_a_check_the_engine_cannot_run_is_an_internal_error(
            self, tiny_model_dir: Path) -> None:
        plain = Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)
        plan = Plan(prompt="p", negative_prompt=None, width=512, height=512, steps=4,
                    guidance_scale=0.0, seeds=(1,), safety_check=True)
        with pytest.raises(RuntimeError, match="the safety checker is not loaded"):
            plain.generate([plan])


class TestWithholding:
    def test_flagged_image_is_withheld_not_blacked_out(
            self, run: Run, worker_with_checker: Engine) -> None:
        set_verdict(worker_with_checker, flag_everything=True)
        response = run(num_images=2)
        assert response["images"] == [{"image": None, "seed": 1, "nsfw": True},
                                       {"image": None, "seed": 2, "nsfw": True}]
        assert response["parameters"]["safety_checker"] is True

    def test_clean_images_are_returned_and_marked(
            self, run: Run, worker_with_checker: Engine) -> None:
        set_verdict(worker_with_checker, flag_everything=False)
        response = run()
        assert response["images"][0]["nsfw"] is False
        assert response["images"][0]["image"].startswith("data:image/png;base64,")

    def test_only_the_flagged_image_of_a_batch_is_withheld(
            self, run: Run, worker_with_checker: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(safety, "nsfw_flags", lambda *args: [True, False])
        items = run(num_images=2)["images"]
        assert items[0] == {"image": None, "seed": 1, "nsfw": True}
        assert items[1]["nsfw"] is False and items[1]["image"]

    def test_caller_may_disable_it_when_the_setting_is_on(
            self, run: Run, worker_with_checker: Engine) -> None:
        set_verdict(worker_with_checker, flag_everything=True)
        response = run(disable_safety_checker=True)
        assert response["images"][0]["image"] and "nsfw" not in response["images"][0]
        assert response["parameters"]["safety_checker"] is False

