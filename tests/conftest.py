"""Test session setup for every kind of test: ``tests/unit``, ``tests/integration``, ``tests/e2e``.

- ``tiny_model_dir``: the tiny SDXL model, built once per session by ``builder.make_tiny_model``
  on first request (not at configure time), with ``MODEL_DIR`` pointed at it for the session.
  Unit tests never ask for it, so they never build it and never import torch.
- ``handler``: the worker module, ``handler.py``, imported on that model: it loads and warms up
  at import, exactly as on RunPod.
- Tests marked ``gpu`` are skipped without CUDA (torch is imported only if there are some).
- The log audit: every record at the worker's level (INFO and up) during the whole session is
  kept and scanned at the end; one carrying a test prompt, image data or a secret fails the run.

Nothing here reads the network.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from worker.spec import ModelSpec

# Every component, so any setting can run on it; one checkpoint keeps the session fast.
TINY_SPEC = ModelSpec(steps=(4,), safety_checker=True, tiny_decoder=True)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.pop("LIGHTNING_STEPS", None)  # a developer's shell must not change the tests
    os.environ["DOWNLOAD_MISSING_WEIGHTS"] = "false"  # a test must never reach for the hub


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny model folder (``TINY_SPEC``); ``MODEL_DIR`` points at it for the session, so
    the worker started in-process or as a subprocess loads it."""
    from builder import make_tiny_model

    folder = make_tiny_model.build(tmp_path_factory.mktemp("tiny") / "model", TINY_SPEC)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODEL_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def handler(tiny_model_dir: Path) -> ModuleType:
    """``handler``, started on the tiny model (settings, load, warm-up, GPU queue)."""
    module = importlib.import_module("handler")
    _keep_records()  # its start-up reconfigured the root logger (basicConfig(force=True))
    return module


# Logs must never carry prompts, image data or credentials (issue: reliability and security).
# Prompts: the ones these tests send; image data: the base64 openings of PNG, JPEG and WebP
# files; credentials: the literal secrets tests use.
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


_KEEPER = _Keep(level=logging.INFO)
_KEEPER.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))


def _keep_records() -> None:
    root = logging.getLogger()
    if _KEEPER not in root.handlers:
        root.addHandler(_KEEPER)
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))  # the worker's level


@pytest.fixture(scope="session", autouse=True)
def keep_logs() -> Iterator[None]:
    _keep_records()
    yield
    logging.getLogger().removeHandler(_KEEPER)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaks = [line for line in _RECORDS if any(m in line for m in LEAK_MARKERS)]
    if leaks:
        print(f"\n{len(leaks)} log record(s) carry a prompt, image data or a secret:")
        for line in leaks[:10]:
            print("  ", line[:300])
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
