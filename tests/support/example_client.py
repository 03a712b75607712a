"""examples/client.py loaded as a module (it is a script, not part of a package), and helpers
its tests share."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _load_client() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_client", ROOT / "examples" / "client.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = _load_client()


def saved(out: Path) -> list[Path]:
    """The files the client saved into ``out``, by name."""
    return sorted(out.iterdir()) if out.exists() else []

