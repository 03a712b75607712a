"""Test session setup: a tiny SDXL model, built once, before the worker module is imported.

``handler`` loads its model at import, as on RunPod; so this file builds the tiny model with
``builder/make_tiny_model.py`` and points ``MODEL_DIR`` at it while pytest configures itself,
before any test module (and so ``handler``) is imported. Nothing here reads the network.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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
