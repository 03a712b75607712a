"""End-to-end proofs (the SDK's worker loop against a loopback job API, fuzzing, load, faults):
every test here is marked ``slow``, so ``make test-fast`` leaves the folder out."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
