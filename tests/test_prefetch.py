"""The start-up prefetch: reads exactly the files the worker will load, and never fails start."""

from __future__ import annotations

from pathlib import Path

import pytest

import model_files
import prefetch


class TestPrefetch:
    def test_reads_every_required_file(self, tiny_model_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
        read: list[Path] = []
        monkeypatch.setattr(prefetch, "_read", lambda paths: read.extend(paths))
        thread = prefetch.start_from_env({"MODEL_DIR": str(tiny_model_dir)})
        assert thread is not None
        thread.join(30)
        assert read == [tiny_model_dir / f.path for f in model_files.required_files((4,))]

    def test_bad_settings_or_missing_folder_start_nothing(self, tmp_path: Path) -> None:
        assert prefetch.start_from_env({"LIGHTNING_STEPS": "3"}) is None
        assert prefetch.start_from_env({"MODEL_DIR": str(tmp_path / "none")}) is None

    def test_unreadable_files_are_skipped(self, tmp_path: Path) -> None:
        good = tmp_path / "good.bin"
        good.write_bytes(b"x" * 100)
        thread = prefetch.start([tmp_path / "missing.bin", good])
        thread.join(30)
        assert not thread.is_alive()
