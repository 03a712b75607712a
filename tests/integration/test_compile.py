"""Opt-in torch.compile: every size is warmed, the cache is loaded before and saved after.

On CPU the UNet is compiled with the "eager" backend: the plumbing is real, while inductor's
own compile (minutes on this CPU) is exercised by the GPU-marked test only. The settings that
drive it are tested in tests/unit/test_settings.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import Engine
from worker.engine import compiler
from worker.plan import Plan
from worker.spec import ModelSpec


def plan(side: int = 512) -> Plan:
    return Plan(prompt="p", negative_prompt=None, width=side, height=side, steps=4,
                guidance_scale=0.0, seeds=(4,))


@pytest.fixture
def model(tiny_model_dir: Path) -> Engine:
    return Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)


class TestCompile:
    def test_every_size_is_warmed_and_results_are_unchanged(
            self, model: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        before = np.asarray(model.generate([plan()])[0][0], np.int16)
        sizes: list[tuple[int, int]] = []
        original = model.run_batch

        def spy(plans: Sequence[Plan], on_step: Any = None) -> Any:
            sizes.extend((p.width, p.height) for p in plans)
            return original(plans, on_step)

        monkeypatch.setattr(model, "run_batch", spy)
        model.compile(((512, 512), (768, 512)), None, backend="eager")
        assert sizes == [(512, 512), (768, 512)]  # one warm-up set, nothing compiled twice
        assert model.pipes[4].unet._compiled_call_impl is not None
        monkeypatch.undo()
        after = np.asarray(model.generate([plan()])[0][0], np.int16)
        assert np.abs(before - after).max() <= 1

    def test_cache_is_loaded_before_and_saved_after(self, model: Engine, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        loaded: list[bytes] = []
        monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
        monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"kernels", None))
        model.compile(((512, 512),), tmp_path / "cache", backend="eager")
        assert (tmp_path / "cache" / compiler.ARTIFACTS).read_bytes() == b"kernels"
        assert loaded == []
        model.compile(((512, 512),), tmp_path / "cache", backend="eager")
        assert loaded == [b"kernels"]


@pytest.mark.gpu
def test_inductor_compiles_the_real_path_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)
    seconds = model.compile(((512, 512),), tmp_path)
    assert seconds > 0 and (tmp_path / compiler.ARTIFACTS).is_file()
