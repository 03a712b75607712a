"""builder/make_tiny_model: the folder the tests run on is the real layout, with the real
scheduler config, for exactly the spec it is given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

import pipeline
from builder.make_tiny_model import SDXL_BASE_SCHEDULER_CONFIG, build
from worker.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[2]


class TestSchedulerConfig:
    def test_is_sdxl_bases_every_field(self, tiny_model_dir: Path) -> None:
        written = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
        assert written == SDXL_BASE_SCHEDULER_CONFIG
        # The fields the other schedulers read, with SDXL base's values (not their defaults).
        assert (written["clip_sample"], written["set_alpha_to_one"], written["skip_prk_steps"],
                written["timestep_spacing"]) == (False, False, True, "leading")

    def test_every_scheduler_gets_the_real_models_settings(self, tiny_model_dir: Path) -> None:
        config = EulerDiscreteScheduler.load_config(tiny_model_dir / "scheduler")
        ddim = DDIMScheduler.from_config(config, timestep_spacing="trailing")
        # DDIMScheduler's own defaults are True: the old tiny config ran DDIM with those.
        assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
        assert PNDMScheduler.from_config(config).config.skip_prk_steps is True

    def test_the_engines_views_read_it(self, tiny_model_dir: Path) -> None:
        engine = pipeline.Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)
        ddim = engine.view(4, "txt2img", "DDIM").scheduler
        assert (ddim.config.clip_sample, ddim.config.set_alpha_to_one,
                ddim.config.timestep_spacing) == (False, False, "trailing")


class TestFolder:
    def test_holds_exactly_the_files_of_its_spec(self, tmp_path: Path) -> None:
        spec = ModelSpec(steps=(2, 8))
        folder = build(tmp_path / "model", spec)
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert on_disk == {f.path for f in spec.files()}

    def test_the_same_arguments_give_the_same_bytes_as_a_module_and_as_a_file(
            self, tmp_path: Path) -> None:
        args = ModelSpec(steps=(4,), tiny_decoder=True).builder_args()
        for name, command in (("module", ["-m", "builder.make_tiny_model"]),
                              ("file", ["builder/make_tiny_model.py"])):
            subprocess.run([sys.executable, *command, str(tmp_path / name), *args], cwd=ROOT,
                           check=True, capture_output=True, timeout=300)
        files = sorted(p.relative_to(tmp_path / "module") for p in
                       (tmp_path / "module").rglob("*") if p.is_file())
        assert files
        for f in files:
            assert (tmp_path / "module" / f).read_bytes() == (tmp_path / "file" / f).read_bytes()

    @pytest.mark.parametrize("spec", [ModelSpec(steps=(1,)), ModelSpec(safety_checker=True)])
    def test_the_engine_loads_what_it_writes(self, tmp_path: Path, spec: ModelSpec) -> None:
        engine = pipeline.Engine.load(spec, build(tmp_path / "model", spec))
        assert engine.steps == spec.steps and (engine.checker is not None) == spec.safety_checker
