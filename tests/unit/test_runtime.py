"""worker/runtime: the one place that sets the libraries' process-wide defaults."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from worker import runtime

ROOT = Path(__file__).resolve().parents[2]


class TestLibraryDefaults:
    def test_defaults_are_set_and_an_operators_value_wins(self) -> None:
        env = {"HF_HUB_OFFLINE": "0"}
        runtime.configure_libraries(env)
        assert env == {**runtime.LIBRARY_ENV, "HF_HUB_OFFLINE": "0"}
        assert env["RUNPOD_LOG_LEVEL"] == "INFO"  # runpod's DEBUG would log every image

    def test_the_libraries_loggers_are_quiet_whatever_the_import_order(self) -> None:
        runtime.configure_libraries({})
        for name in runtime.QUIET_LOGGERS:
            assert logging.getLogger(name).level == logging.ERROR

    def test_the_worker_imports_set_them_before_the_libraries_load(self) -> None:
        # A fresh interpreter: importing handler's first lines must leave the variables set
        # before runpod/torch could read them; worker.runtime itself imports neither.
        code = ("import os, sys\n"
                "for name in ('RUNPOD_LOG_LEVEL', 'HF_HUB_OFFLINE'): os.environ.pop(name, None)\n"
                "from worker import runtime\n"
                "assert 'runpod' not in sys.modules and 'torch' not in sys.modules\n"
                "runtime.configure_libraries()\n"
                "print(os.environ['RUNPOD_LOG_LEVEL'], os.environ['HF_HUB_OFFLINE'])\n")
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, check=True)
        assert run.stdout.split() == ["INFO", "1"]

    def test_logging_is_the_workers_format_at_info(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[dict[str, object]] = []
        monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: calls.append(kwargs))
        runtime.configure_logging()
        # force: runpod configures the root logger at import; the session's log audit stays.
        assert calls == [{"level": logging.INFO, "force": True, "format": runtime.LOG_FORMAT}]
