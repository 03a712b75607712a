"""Stand-in model folders for tests that need a spec's files on disk, not a model: the layout
of a ``MODEL_DIR`` and of RunPod's Hugging Face cache, each file non-empty and distinct."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from worker.location import hf_cache_path
from worker.spec import ModelSpec, RemoteFile

Content = Callable[[RemoteFile], bytes]


def path_bytes(f: RemoteFile) -> bytes:
    """The default content: the file's own path, so each file is told apart by its bytes."""
    return f.path.encode()


def fill_folder(folder: Path, spec: ModelSpec, content: Content = path_bytes) -> Path:
    """Every file of ``spec`` in a model folder laid out as ``MODEL_DIR``."""
    for f in spec.files():
        (folder / f.path).parent.mkdir(parents=True, exist_ok=True)
        (folder / f.path).write_bytes(content(f))
    return folder


def fill_hf_cache(cache: Path, spec: ModelSpec, content: Content = path_bytes) -> None:
    """Every file of ``spec`` where huggingface_hub keeps it, at the pinned revisions."""
    for f in spec.files():
        target = hf_cache_path(cache, f)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content(f))
