"""Where the worker finds its model folder: one documented order, first complete one wins.

1. ``MODEL_DIR``, when set: used as given (and filled there if incomplete and fetching is on).
2. ``/runpod-volume/sdxl-lightning``: the folder on a RunPod network volume.
3. RunPod's cached models: the Hugging Face cache at ``/runpod-volume/huggingface-cache/hub``
   holding the pinned revisions of the repositories; assembled into a folder of links.
4. The folder baked into the image (``models/sdxl-lightning`` beside ``handler.py``; ``/app/...``).

So one image works with weights baked, on a network volume, or from RunPod's model cache. No
torch import; pure apart from reading the file system (and writing links for case 3).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from worker.spec import ModelSpec, RemoteFile

VOLUME_ROOT = Path("/runpod-volume")
BAKED_DIR = Path(__file__).resolve().parent.parent / "models" / "sdxl-lightning"
LINKED_DIR = "sdxl-lightning-from-cache"


def hf_cache_path(cache: Path, f: RemoteFile) -> Path:
    """Where ``huggingface_hub`` keeps ``f`` at its pinned revision in the cache ``cache``."""
    return (cache / f"models--{f.repo.replace('/', '--')}" / "snapshots" / f.revision
            / f.remote_path)


def link_from_hf_cache(cache: Path, spec: ModelSpec, out: Path) -> Path | None:
    """A model folder of links into the cache, or None if any pinned file is absent."""
    files = spec.files()
    sources = [hf_cache_path(cache, f) for f in files]
    if not all(source.is_file() for source in sources):
        return None
    for f, source in zip(files, sources, strict=True):
        link = out / f.path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(source.resolve())
    return out


def locate(model_dir: Path | None, spec: ModelSpec, volume_root: Path = VOLUME_ROOT,
           baked_dir: Path = BAKED_DIR) -> tuple[Path, str]:
    """The model folder to use and where it came from (for the start-up log)."""
    if model_dir is not None:
        return model_dir, "MODEL_DIR"
    volume_dir = volume_root / "sdxl-lightning"
    if not spec.missing(volume_dir):
        return volume_dir, "network volume"
    cache = volume_root / "huggingface-cache" / "hub"
    if cache.is_dir():
        # A fixed folder: locating twice (the start-up prefetch, then the load) links the same
        # files into the same place instead of leaving a second folder behind.
        linked = link_from_hf_cache(cache, spec, Path(tempfile.gettempdir()) / LINKED_DIR)
        if linked is not None:
            return linked, f"RunPod model cache ({cache})"
    return baked_dir, "baked folder"
