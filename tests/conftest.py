"""Test session setup: a tiny SDXL model, built once, before the worker module is imported.

``handler`` loads its model at import, as on RunPod; so this file builds the tiny model with
``builder/make_tiny_model.py`` and points ``MODEL_DIR`` at it while pytest configures itself,
before any test module (and so ``handler``) is imported. Nothing here reads the network.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_TMP = Path(tempfile.mkdtemp(prefix="sdxl-tests-"))
TINY_MODEL = _TMP / "tiny-model"


def pytest_configure(config: pytest.Config) -> None:
    from builder import make_tiny_model

    make_tiny_model.build(TINY_MODEL, steps=(4,))
    os.environ["MODEL_DIR"] = str(TINY_MODEL)
    os.environ.pop("LIGHTNING_STEPS", None)
    os.environ["DOWNLOAD_MISSING_WEIGHTS"] = "false"  # a test must never reach for the hub


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_TMP, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def scratch_dir() -> Path:
    path = _TMP / "scratch"
    path.mkdir(exist_ok=True)
    return path


# Logs must never carry prompts, image data or credentials (issue: reliability and security).
# Every record at the worker's default level (INFO and up) during the whole session is kept and
# scanned at the end; a hit fails the run. Prompts: the ones these tests send; image data: the
# base64 openings of PNG, JPEG and WebP files; credentials: the literal secrets tests use.
LEAK_MARKERS = ("a red fox", "a lighthouse on a cliff", "a cat sitting", "the sea",
                "iVBORw0KGgo", "data:image/", "/9j/4", "UklGR",
                "wrong-secret-value", "accessSecret\": \"")
_RECORDS: list[str] = []


class _Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _RECORDS.append(self.format(record))
        except Exception:  # noqa: BLE001 - a record that cannot format cannot leak either
            pass


@pytest.fixture(scope="session", autouse=True)
def keep_logs() -> Iterator[None]:
    """Installed after collection: handler.py's start-up reconfigures the root logger."""
    keeper = _Keep(level=logging.INFO)
    keeper.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(keeper)
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))  # the worker's level
    yield
    root.removeHandler(keeper)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaks = [line for line in _RECORDS if any(m in line for m in LEAK_MARKERS)]
    if leaks:
        print(f"\n{len(leaks)} log record(s) carry a prompt, image data or a secret:")
        for line in leaks[:10]:
            print("  ", line[:300])
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
