"""Where the worker finds its model folder: the documented order, first complete one wins.

Folders are filled with stand-in files (``spec.missing`` only asks for non-empty files); that
the engine loads a folder assembled from RunPod's model cache is tested in tests/integration.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.model_folder import fill_folder, fill_hf_cache
from worker import location
from worker.spec import ModelSpec

SPEC = ModelSpec(steps=(4,))


class TestOrder:
    def test_model_dir_wins(self, tmp_path: Path) -> None:
        fill_folder(tmp_path / "sdxl-lightning", SPEC)
        assert location.locate(tmp_path / "mine", SPEC, volume_root=tmp_path) == (
            tmp_path / "mine", "MODEL_DIR")

    def test_network_volume_before_baked(self, tmp_path: Path) -> None:
        fill_folder(tmp_path / "volume" / "sdxl-lightning", SPEC)
        found = location.locate(None, SPEC, volume_root=tmp_path / "volume",
                                baked_dir=tmp_path / "baked")
        assert found == (tmp_path / "volume" / "sdxl-lightning", "network volume")

    def test_incomplete_volume_falls_back_to_baked(self, tmp_path: Path) -> None:
        (tmp_path / "sdxl-lightning" / "unet").mkdir(parents=True)
        found = location.locate(None, SPEC, volume_root=tmp_path, baked_dir=tmp_path / "baked")
        assert found == (tmp_path / "baked", "baked folder")

    def test_a_volume_without_a_component_the_spec_needs_is_skipped(self, tmp_path: Path) -> None:
        fill_folder(tmp_path / "sdxl-lightning", SPEC)  # no safety checker in it
        found = location.locate(None, ModelSpec(steps=(4,), safety_checker=True),
                                volume_root=tmp_path, baked_dir=tmp_path / "baked")
        assert found[1] == "baked folder"

    def test_the_baked_folder_sits_beside_handler(self) -> None:
        assert location.BAKED_DIR == Path(__file__).resolve().parents[2] / "models" / \
            "sdxl-lightning"


class TestRunpodModelCache:
    def test_a_folder_of_links_is_assembled_from_the_pinned_revisions(
            self, tmp_path: Path) -> None:
        fill_hf_cache(tmp_path / "huggingface-cache" / "hub", SPEC)
        found, source = location.locate(None, SPEC, volume_root=tmp_path,
                                        baked_dir=tmp_path / "baked")
        assert source.startswith("RunPod model cache")
        assert SPEC.missing(found) == []
        for f in SPEC.files():
            assert (found / f.path).is_symlink()
            assert (found / f.path).read_bytes() == f.path.encode()

    def test_cache_missing_a_checkpoint_is_not_used(self, tmp_path: Path) -> None:
        fill_hf_cache(tmp_path / "huggingface-cache" / "hub", SPEC)
        found, source = location.locate(None, ModelSpec(steps=(2, 4)), volume_root=tmp_path,
                                        baked_dir=tmp_path / "baked")
        assert source == "baked folder"

    def test_locating_twice_reuses_one_linked_folder(self, tmp_path: Path) -> None:
        fill_hf_cache(tmp_path / "huggingface-cache" / "hub", SPEC)
        first = location.locate(None, SPEC, volume_root=tmp_path, baked_dir=tmp_path / "b")
        second = location.locate(None, SPEC, volume_root=tmp_path, baked_dir=tmp_path / "b")
        assert first == second and SPEC.missing(first[0]) == []
