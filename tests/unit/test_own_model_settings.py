"""BASE_MODEL and LIGHTNING_MODE settings: the spec they make, and every mode that cannot work
refused at start with one line naming why. Also the DEFAULT_* request fields and the
``parameters`` a worker on its own model reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import parse_request
from worker.errors import StartupError
from worker.plan import warmup_plan, with_defaults
from worker.settings import Settings
from worker.spec import LORAS, ModelSpec


def spec(**env: str) -> ModelSpec:
    return Settings.from_env(env).model_spec


class TestModes:
    def test_without_base_model_nothing_changes(self) -> None:
        assert spec() == ModelSpec() and spec(LIGHTNING_MODE="unet") == ModelSpec()

    def test_a_base_model_defaults_to_the_lora(self) -> None:
        got = spec(BASE_MODEL="/v/juggernaut.safetensors", LIGHTNING_STEPS="4,8")
        assert got.lightning_mode == "lora" and got.steps == (4, 8)
        assert {f.path for f in got.files()} >= {LORAS[4], LORAS[8], "model_index.json"}
        assert not any(f.path.endswith("model.fp16.safetensors") for f in got.files())

    def test_unet_mode_on_a_base_model_fetches_the_lightning_unets(self) -> None:
        got = spec(BASE_MODEL="ft", LIGHTNING_MODE="unet")
        assert "sdxl_lightning_4step_unet.safetensors" in {f.path for f in got.files()}

    def test_a_merge_serves_its_step_range_and_needs_no_lightning_file(self) -> None:
        got = spec(BASE_MODEL="merge", LIGHTNING_MODE="none", STEPS_RANGE="4-8")
        assert got.steps == (4, 5, 6, 7, 8)
        assert not any("lightning" in f.path for f in got.files())
        assert spec(BASE_MODEL="m", LIGHTNING_MODE="none").steps == tuple(range(1, 13))

    def test_the_builders_get_the_model_too(self) -> None:
        args = spec(BASE_MODEL="ft", LIGHTNING_STEPS="2").builder_args()
        assert args[-4:] == ["--base-model", "ft", "--lightning-mode", "lora"]

    @pytest.mark.parametrize(("env", "says"), [
        ({"BASE_MODEL": "ft", "LIGHTNING_STEPS": "1,4"},
         "LIGHTNING_MODE=lora cannot serve LIGHTNING_STEPS 1: ByteDance publishes Lightning "
         "LoRAs for 2, 4, 8 steps only (there is no 1-step LoRA)"),
        ({"LIGHTNING_MODE": "lora"}, "LIGHTNING_MODE=lora needs BASE_MODEL"),
        ({"LIGHTNING_MODE": "none"}, "LIGHTNING_MODE=none needs BASE_MODEL"),
        ({"BASE_MODEL": "ft", "DEFAULT_STEPS": "8"},
         "DEFAULT_STEPS=8 is not served: it must be within LIGHTNING_STEPS 4"),
        ({"BASE_MODEL": "m", "LIGHTNING_MODE": "none", "STEPS_RANGE": "4-8",
          "DEFAULT_STEPS": "3"}, "within STEPS_RANGE 4-8"),
        ({"BASE_MODEL": "ft", "STEPS_RANGE": "4-8"}, "STEPS_RANGE applies to LIGHTNING_MODE=none"),
        ({"DEFAULT_STEPS": "3"}, "DEFAULT_STEPS=3 is not served: it must be within "
                                 "LIGHTNING_STEPS 4"),
        ({"LIGHTNING_MODE": "fast"}, "LIGHTNING_MODE='fast' is invalid: one of unet, lora, none"),
        ({"STEPS_RANGE": "8-4"}, "STEPS_RANGE='8-4' is invalid"),
        ({"LIGHTNING_LORA_SCALE": "3"}, "a number from 0 to 2"),
        ({"DEFAULT_SCHEDULER": "euler"}, "DEFAULT_SCHEDULER='euler' is invalid: one of K_EULER"),
        ({"DEFAULT_GUIDANCE": "nan"}, "a number from 0 to 20"),
    ])
    def test_a_mode_that_cannot_work_stops_the_start(self, env: dict[str, str],
                                                       says: str) -> None:
        with pytest.raises(StartupError) as caught:
            Settings.from_env(env)
        assert says in str(caught.value) and "\n" not in str(caught.value)


class TestDefaults:
    def test_unset_fields_take_the_operators_defaults(self) -> None:
        settings = Settings.from_env({"DEFAULT_GUIDANCE": "1.5", "DEFAULT_SCHEDULER": "karrasdpm",
                                      "DEFAULT_STEPS": "4"})
        req = with_defaults(parse_request({"prompt": "a fox"}), settings.request_defaults())
        assert (req.guidance_scale, req.scheduler, req.num_inference_steps) == (1.5, "KarrasDPM",
                                                                                4)

    def test_a_field_the_caller_set_wins(self) -> None:
        settings = Settings.from_env({"DEFAULT_GUIDANCE": "1.5"})
        req = with_defaults(parse_request({"prompt": "a fox", "guidance_scale": 0}),
                            settings.request_defaults())
        assert req.guidance_scale == 0.0

    def test_no_defaults_leave_the_request_as_it_is(self) -> None:
        req = parse_request({"prompt": "a fox"})
        assert with_defaults(req, Settings().request_defaults()) is req


class TestParameters:
    def test_sdxl_lightning_reports_as_ever(self) -> None:
        params = warmup_plan(4, 512, 512).with_served(None).parameters()
        assert params["model"] == "ByteDance/SDXL-Lightning"
        assert params["checkpoint"] == "sdxl_lightning_4step_unet.safetensors"

    def test_an_own_model_reports_what_ran(self) -> None:
        served = {6: ("someone/merge-xl@abc", None)}
        params = warmup_plan(6, 512, 512).with_served(served).parameters()
        assert (params["model"], params["checkpoint"]) == ("someone/merge-xl@abc", None)


class TestA1111Listing:
    def test_sd_models_names_the_own_model_and_a_merge_once(self) -> None:
        from worker.frontdoor import a1111

        served = {s: ("someone/merge-xl@abc", None) for s in (4, 5, 6)}
        assert [m["title"] for m in a1111.sd_models((4, 5, 6), served)] == [
            "someone/merge-xl@abc"]
        fused = {4: ("ft.safetensors sha256:1", "sdxl_lightning_4step_lora.safetensors")}
        assert a1111.options((4,), fused)["sd_model_checkpoint"] == \
            "ft.safetensors sha256:1 + sdxl_lightning_4step_lora"
        assert a1111.sd_models((4,))[0]["filename"] == "sdxl_lightning_4step_unet.safetensors"


class TestModelPath:
    def test_relative_absolute_and_a_folder_holding_one_file(self, tmp_path: Path) -> None:
        (tmp_path / "baked-model").mkdir()
        (tmp_path / "baked-model" / "x.safetensors").write_bytes(b"x")
        (tmp_path / "ft" / "unet").mkdir(parents=True)
        (tmp_path / "ft" / "model_index.json").write_text("{}")
        (tmp_path / "ft" / "unet" / "w.safetensors").write_bytes(b"w")
        assert ModelSpec(base_model="baked-model").model_path(tmp_path) == \
            tmp_path / "baked-model" / "x.safetensors"
        assert ModelSpec(base_model=str(tmp_path / "ft")).model_path(Path("/elsewhere")) == \
            tmp_path / "ft"
        assert ModelSpec(base_model="ft").model_weights(tmp_path) == [
            tmp_path / "ft" / "unet" / "w.safetensors"]
        assert ModelSpec().model_path(tmp_path) is None
