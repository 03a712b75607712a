"""Opt-in torch.compile: bucket warm-up, cache persistence, and the settings that drive it.

On CPU the UNet is compiled with the "eager" backend: the plumbing is real, while inductor's
own compile (minutes on this CPU) is exercised by the GPU-marked test only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import compilation
import pipeline
from resolve import Plan
from schemas import Settings


def plan(side: int = 512) -> Plan:
    return Plan(prompt="p", negative_prompt=None, width=side, height=side, steps=4,
                guidance_scale=0.0, seeds=(4,))


@pytest.fixture
def model(tiny_model_dir: Path) -> pipeline.Model:
    return pipeline.load(tiny_model_dir, (4,))


class TestCompile:
    def test_every_bucket_is_warmed_and_results_are_unchanged(
            self, model: pipeline.Model, monkeypatch: pytest.MonkeyPatch) -> None:
        before = np.asarray(pipeline.generate(model, plan())[0], np.int16)
        sizes: list[tuple[int, int]] = []
        original = pipeline.generate

        def spy(m: pipeline.Model, p: Plan, on_step: Any = None) -> Any:
            sizes.append((p.width, p.height))
            return original(m, p, on_step)

        monkeypatch.setattr(pipeline, "generate", spy)
        compilation.compile_model(model, ((512, 512), (768, 512)), None, backend="eager")
        assert sizes == [(512, 512), (768, 512)]
        assert model.pipes[4].unet._compiled_call_impl is not None
        monkeypatch.undo()
        after = np.asarray(pipeline.generate(model, plan())[0], np.int16)
        assert np.abs(before - after).max() <= 1

    def test_cache_is_loaded_before_and_saved_after(self, model: pipeline.Model, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        loaded: list[bytes] = []
        monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
        monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"kernels", None))
        compilation.compile_model(model, ((512, 512),), tmp_path / "cache", backend="eager")
        assert (tmp_path / "cache" / compilation.ARTIFACTS).read_bytes() == b"kernels"
        assert loaded == []
        compilation.compile_model(model, ((512, 512),), tmp_path / "cache", backend="eager")
        assert loaded == [b"kernels"]


class TestSettings:
    def test_defaults_leave_compilation_off(self) -> None:
        settings = Settings.from_env({})
        assert settings.compile is False and settings.compile_buckets == ((1024, 1024),)

    def test_buckets_are_parsed(self) -> None:
        settings = Settings.from_env({"COMPILE": "true", "COMPILE_CACHE_DIR": "/v/cache",
                                      "COMPILE_BUCKETS": "1024x1024, 832X1216,1024x1024"})
        assert settings.compile_buckets == ((1024, 1024), (832, 1216))
        assert settings.compile_cache_dir == Path("/v/cache")

    @pytest.mark.parametrize("text", ["1001x1024", "1024", "2048x1024", "axb", ","])
    def test_bad_buckets_are_named(self, text: str) -> None:
        with pytest.raises(ValueError, match="COMPILE_BUCKETS"):
            Settings.from_env({"COMPILE_BUCKETS": text})


@pytest.mark.gpu
def test_inductor_compiles_the_real_path_on_cuda(model: pipeline.Model, tmp_path: Path) -> None:
    seconds = compilation.compile_model(model, ((512, 512),), tmp_path)
    assert seconds > 0 and (tmp_path / compilation.ARTIFACTS).is_file()
