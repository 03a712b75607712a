"""Integration tests: the tiny model (``tiny_model_dir``) and the worker started on it
(``handler``), both from tests/conftest.py; ``job_runner`` makes the ``run(**fields)`` helpers
that send one job through ``handler.handler``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

Run = Callable[..., dict[str, Any]]


@pytest.fixture(scope="session")
def job_runner(handler: ModuleType) -> Callable[..., Run]:
    """``job_runner(job_id, **defaults)``: a ``run(**fields)`` that serves one job whose input
    is ``defaults`` updated with ``fields``, and returns the handler's answer."""
    def make(job_id: str, **defaults: Any) -> Run:
        def run(**fields: Any) -> dict[str, Any]:
            job = {"id": job_id, "input": {**defaults, **fields}}
            return asyncio.run(handler.handler(job))

        return run

    return make
