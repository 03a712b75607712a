"""The worker's settings: every environment variable, its default, and how a bad one is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import StartupError
from worker.settings import BUCKET_ENV, Settings
from worker.spec import ModelSpec


class TestDefaults:
    def test_defaults(self) -> None:
        settings = Settings.from_env({})
        assert settings.lightning_steps == (4,) and settings.warmup is True
        assert settings.safety_mode == "off" and settings.compile is False
        assert settings.compile_sizes == ((1024, 1024),) and settings.bucket_env == {}

    def test_defaults_load_the_4_step_checkpoint_alone(self) -> None:
        assert Settings.from_env({}).model_spec == ModelSpec(steps=(4,), safety_checker=False,
                                                             tiny_decoder=False)


class TestEnvironment:
    def test_environment_is_read(self) -> None:
        settings = Settings.from_env({"MODEL_DIR": "/m", "LIGHTNING_STEPS": "8, 2,4",
                                      "WARMUP": "false", "DOWNLOAD_MISSING_WEIGHTS": "0"})
        assert settings.model_dir == Path("/m")
        assert settings.lightning_steps == (2, 4, 8)
        assert settings.warmup is False and settings.download_missing is False

    def test_empty_values_mean_the_default(self) -> None:
        assert Settings.from_env({"LIGHTNING_STEPS": "", "MODEL_DIR": ""}) == Settings()

    def test_the_model_spec_follows_the_settings(self) -> None:
        settings = Settings.from_env({"LIGHTNING_STEPS": "2,4", "SAFETY_CHECKER": "always",
                                      "VAE_DECODER": "tiny"})
        assert settings.model_spec == ModelSpec(steps=(2, 4), safety_checker=True,
                                                tiny_decoder=True)

    def test_only_set_bucket_variables_are_kept(self) -> None:
        settings = Settings.from_env({"BUCKET_ENDPOINT_URL": "https://b.example",
                                      "BUCKET_NAME": "", "OTHER": "x"})
        assert settings.bucket_env == {"BUCKET_ENDPOINT_URL": "https://b.example"}

    def test_every_bucket_variable_is_a_setting(self) -> None:
        assert all(Settings.ENV[name] == "bucket_env" for name in BUCKET_ENV)


class TestBadValues:
    @pytest.mark.parametrize("steps", ["3", "four", "4,16", ","])
    def test_bad_steps_name_the_variable(self, steps: str) -> None:
        with pytest.raises(StartupError, match="LIGHTNING_STEPS"):
            Settings.from_env({"LIGHTNING_STEPS": steps})

    def test_bad_boolean_names_the_variable(self) -> None:
        with pytest.raises(StartupError, match="WARMUP='maybe'"):
            Settings.from_env({"WARMUP": "maybe"})

    @pytest.mark.parametrize(("name", "value", "allowed"), [
        ("MAX_CONCURRENCY", "0", "an integer from 1 to 64"),
        ("MAX_BATCH_IMAGES", "x", "an integer from 1 to 64"),
        ("MAX_RESPONSE_MB", "2000", "an integer from 1 to 1024"),
        ("VAE_DECODER", "small", "one of full, tiny"),
        ("DEVICE", "tpu", "one of auto, cuda, cpu"),
    ])
    def test_bad_values_say_what_is_allowed(self, name: str, value: str, allowed: str) -> None:
        with pytest.raises(StartupError) as info:
            Settings.from_env({name: value})
        assert str(info.value) == f"{name}={value!r} is invalid: {allowed}"

    def test_a_renamed_variable_is_still_read_with_a_warning(
            self, caplog: pytest.LogCaptureFixture) -> None:
        settings = Settings.from_env({"COMPILE_BUCKETS": "832x1216"})
        assert settings.compile_sizes == ((832, 1216),)
        assert "COMPILE_BUCKETS is deprecated: it was renamed COMPILE_SIZES" in caplog.text
        assert Settings.from_env({"COMPILE_BUCKETS": "832x1216", "COMPILE_SIZES": "832x1216"}
                                 ).compile_sizes == ((832, 1216),)

    def test_the_old_and_new_names_must_not_disagree(self) -> None:
        with pytest.raises(StartupError, match="COMPILE_BUCKETS and COMPILE_SIZES are both set"):
            Settings.from_env({"COMPILE_BUCKETS": "1024x1024", "COMPILE_SIZES": "832x1216"})

    def test_an_old_name_is_checked_like_the_new_one(self) -> None:
        with pytest.raises(StartupError, match="COMPILE_SIZES='1001x1024' is invalid"):
            Settings.from_env({"COMPILE_BUCKETS": "1001x1024"})


class TestSafetyChecker:
    @pytest.mark.parametrize(("text", "mode"), [("true", "on"), ("0", "off"),
                                                ("ALWAYS", "always")])
    def test_setting_values(self, text: str, mode: str) -> None:
        assert Settings.from_env({"SAFETY_CHECKER": text}).safety_mode == mode

    def test_bad_setting_is_named(self) -> None:
        with pytest.raises(StartupError, match="SAFETY_CHECKER='sometimes'"):
            Settings.from_env({"SAFETY_CHECKER": "sometimes"})


class TestCompile:
    def test_sizes_are_parsed(self) -> None:
        settings = Settings.from_env({"COMPILE": "true", "COMPILE_CACHE_DIR": "/v/cache",
                                      "COMPILE_SIZES": "1024x1024, 832X1216,1024x1024"})
        assert settings.compile_sizes == ((1024, 1024), (832, 1216))
        assert settings.compile_cache_dir == Path("/v/cache")

    @pytest.mark.parametrize("text", ["1001x1024", "1024", "2048x1024", "axb", ","])
    def test_bad_sizes_are_named(self, text: str) -> None:
        with pytest.raises(StartupError, match="COMPILE_SIZES"):
            Settings.from_env({"COMPILE_SIZES": text})
