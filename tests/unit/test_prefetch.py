"""The start-up prefetch: reads exactly the files the worker will load, and never fails start."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.model_folder import fill_folder
from worker import prefetch
from worker.spec import ModelSpec


class TestPrefetch:
    @pytest.mark.parametrize(("env", "spec"), [
        ({}, ModelSpec()),
        ({"LIGHTNING_STEPS": "2,8", "SAFETY_CHECKER": "true", "VAE_DECODER": "tiny"},
         ModelSpec(steps=(2, 8), safety_checker=True, tiny_decoder=True)),
    ])
    def test_reads_every_file_of_the_settings_spec_in_load_order(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
            spec: ModelSpec) -> None:
        folder = fill_folder(tmp_path, ModelSpec(steps=(1, 2, 4, 8), safety_checker=True,
                                                 tiny_decoder=True))
        read: list[Path] = []
        monkeypatch.setattr(prefetch, "_read", lambda paths: read.extend(paths))
        thread = prefetch.start_from_env({"MODEL_DIR": str(folder), **env})
        assert thread is not None
        thread.join(30)
        assert read == [folder / f.path for f in spec.files()]

    def test_bad_settings_or_missing_folder_start_nothing(self, tmp_path: Path) -> None:
        assert prefetch.start_from_env({"LIGHTNING_STEPS": "3"}) is None
        assert prefetch.start_from_env({"MODEL_DIR": str(tmp_path / "none")}) is None

    def test_unreadable_files_are_skipped(self, tmp_path: Path) -> None:
        good = tmp_path / "good.bin"
        good.write_bytes(b"x" * 100)
        thread = prefetch.start([tmp_path / "missing.bin", good])
        thread.join(30)
        assert not thread.is_alive()
