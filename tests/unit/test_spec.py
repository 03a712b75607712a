"""ModelSpec: the one object that says what a worker loads, and the files that takes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from builder import add_spec_arguments, spec_from_args
from tests.support.model_folder import fill_folder
from worker.spec import CHECKPOINTS, ModelSpec


def paths(spec: ModelSpec) -> list[str]:
    return [f.path for f in spec.files()]


class TestFiles:
    def test_the_default_is_the_4_step_checkpoint_and_the_shared_files(self) -> None:
        files = paths(ModelSpec())
        assert "sdxl_lightning_4step_unet.safetensors" in files
        assert {"scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
                "text_encoder_2/model.fp16.safetensors", "tokenizer_2/merges.txt"} <= set(files)
        assert not any(p.startswith(("safety_checker/", "feature_extractor/", "taesdxl/"))
                       for p in files)
        assert len(files) == len(set(files))

    def test_each_checkpoint_adds_its_unet(self) -> None:
        extra = set(paths(ModelSpec(steps=(1, 4)))) - set(paths(ModelSpec(steps=(4,))))
        assert extra == {CHECKPOINTS[1]}

    def test_optional_components_add_their_files(self) -> None:
        base = set(paths(ModelSpec()))
        assert set(paths(ModelSpec(safety_checker=True))) - base == {
            "safety_checker/config.json", "safety_checker/pytorch_model.bin",
            "feature_extractor/preprocessor_config.json"}
        assert set(paths(ModelSpec(tiny_decoder=True))) - base == {
            "taesdxl/config.json", "taesdxl/diffusion_pytorch_model.safetensors"}

    def test_files_come_in_the_order_the_loader_reads_them(self) -> None:
        files = paths(ModelSpec(steps=(2, 4)))
        assert files.index("text_encoder/model.fp16.safetensors") < files.index(
            "vae/diffusion_pytorch_model.safetensors") < files.index(CHECKPOINTS[2]) < \
            files.index(CHECKPOINTS[4])

    def test_every_file_is_pinned(self) -> None:
        for f in ModelSpec(steps=(1, 2, 4, 8), safety_checker=True, tiny_decoder=True).files():
            assert len(f.revision) == 40 and int(f.revision, 16) >= 0, f


class TestMissing:
    def test_absent_and_empty_files_are_missing(self, tmp_path: Path) -> None:
        spec = ModelSpec()
        assert spec.missing(fill_folder(tmp_path, spec)) == []
        (tmp_path / "vae" / "config.json").write_bytes(b"")
        (tmp_path / CHECKPOINTS[4]).unlink()
        assert spec.missing(tmp_path) == ["vae/config.json", CHECKPOINTS[4]]
        assert ModelSpec(steps=(4,), tiny_decoder=True).missing(tmp_path)[-2:] == [
            "taesdxl/config.json", "taesdxl/diffusion_pytorch_model.safetensors"]


class TestValue:
    def test_steps_are_sorted_and_unique(self) -> None:
        assert ModelSpec(steps=(8, 2, 8)).steps == (2, 8)
        assert ModelSpec(steps=(8, 2)) == ModelSpec(steps=(2, 8))

    @pytest.mark.parametrize("steps", [(), (3,), (4, 16)])
    def test_unknown_steps_are_refused(self, steps: tuple[int, ...]) -> None:
        with pytest.raises(ValueError, match="subset of"):
            ModelSpec(steps=steps)

    def test_describe(self) -> None:
        assert ModelSpec().describe() == "checkpoints [4]"
        assert ModelSpec(steps=(2, 4), safety_checker=True, tiny_decoder=True).describe() == \
            "checkpoints [2, 4] + safety checker + tiny decoder"

    @pytest.mark.parametrize("spec", [
        ModelSpec(), ModelSpec(steps=(1, 8), safety_checker=True),
        ModelSpec(steps=(2,), tiny_decoder=True),
        ModelSpec(steps=(1, 2, 4, 8), safety_checker=True, tiny_decoder=True)])
    def test_builder_args_round_trip_through_the_builders_command_line(
            self, spec: ModelSpec) -> None:
        parser = argparse.ArgumentParser()
        add_spec_arguments(parser)
        assert spec_from_args(parser.parse_args(spec.builder_args())) == spec
