"""Opt-in torch.compile: every size is warmed, the cache is loaded before and saved after,
start-up compiles once (one warm-up set), and a compile that fails is one clear start-up error.

On CPU the UNet is compiled with the "eager" backend, or a counting or failing callable: the
plumbing is real, while inductor's own compile (minutes on this CPU) is exercised by the
GPU-marked test only (and its failure without a C++ compiler, which comes in seconds, by
tests/integration/test_startup.py). The settings that drive it are tested in
tests/unit/test_settings.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import Engine
from worker import startup
from worker.engine import compiler
from worker.errors import StartupError
from worker.plan import Plan
from worker.settings import Settings
from worker.spec import ModelSpec


def plan(side: int = 512) -> Plan:
    return Plan(prompt="p", negative_prompt=None, width=side, height=side, steps=4,
                guidance_scale=0.0, seeds=(4,))


@pytest.fixture
def model(tiny_model_dir: Path) -> Engine:
    return Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's caches are per code object, shared by every UNet: each test starts clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend(graphs: list[int]) -> Any:
    """A torch.compile backend that runs graphs eagerly and counts each one it compiles."""
    def counting(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(len(graph.graph.nodes))
        return graph.forward

    return counting


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


class TestCompileAtStart:
    def test_start_compiles_once_and_warms_only_the_compiled_sizes(
            self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
            caplog: pytest.LogCaptureFixture) -> None:
        """COMPILE=true with WARMUP=true: the compile's warm-up is the warm-up. Another size
        after it (the 512x512 default warm-up did this) compiles the UNet again."""
        sizes: list[tuple[int, int]] = []
        graphs: list[int] = []
        run_batch, compile_in_place = Engine.run_batch, compiler.compile_in_place

        def spy(self: Engine, plans: Sequence[Plan], on_step: Any = None) -> Any:
            sizes.extend((p.width, p.height) for p in plans)
            return run_batch(self, plans, on_step)

        monkeypatch.setattr(Engine, "run_batch", spy)
        monkeypatch.setattr(compiler, "compile_in_place", lambda unets, cache_dir, backend:
                            compile_in_place(unets, cache_dir, counting_backend(graphs)))
        settings = Settings.from_env({"MODEL_DIR": str(tiny_model_dir), "DEVICE": "cpu",
                                      "COMPILE": "true", "COMPILE_SIZES": "768x512",
                                      "WARMUP": "true"})
        with caplog.at_level(logging.INFO):
            engine = startup.start(settings)
        assert sizes == [(768, 512)]
        compiled = len(graphs)
        assert compiled > 0
        assert "compiled 1 UNet(s) (4-step) with inductor for 768x512, batch size 1: " \
            in caplog.text
        assert "warm-up: done by the compile" in caplog.text
        engine.generate([replace(plan(), width=768)])
        assert len(graphs) == compiled  # a compiled size: no compile
        engine.generate([plan(512)])
        assert len(graphs) > compiled  # what the separate warm-up used to cost at start

    def test_a_failing_compiler_is_one_startup_line_with_the_fix(
            self, model: Engine) -> None:
        def no_c_compiler(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment "
                               "variable or set triton.knobs.build.impl.\nmore detail")

        with pytest.raises(StartupError) as info:
            model.compile(((512, 512),), None, backend=no_c_compiler)
        message = str(info.value)
        assert isinstance(info.value, compiler.CompileError)
        assert message == (
            "COMPILE=true but torch.compile failed compiling the UNet for 512x512: "
            "RuntimeError: Failed to find C compiler. Please specify via CC environment variable "
            "or set triton.knobs.build.impl. Set COMPILE=false to start without compiling, or "
            "give the worker a C compiler (inductor and Triton build kernels with it; the "
            "Docker image: --build-arg TRITON_COMPILER=true)")
        assert info.value.__cause__ is None and info.value.__suppress_context__

    def test_root_cause_is_the_innermost_exception(self) -> None:
        try:
            try:
                raise OSError("cc: not found\nsecond line")
            except OSError as inner:
                raise RuntimeError("wrapper\n\nSet TORCHDYNAMO_VERBOSE=1 ...") from inner
        except RuntimeError as outer:
            assert compiler.root_cause(outer) == "OSError: cc: not found"


@pytest.mark.gpu
def test_inductor_compiles_the_real_path_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)
    seconds = model.compile(((512, 512),), tmp_path)
    assert seconds > 0 and (tmp_path / compiler.ARTIFACTS).is_file()
