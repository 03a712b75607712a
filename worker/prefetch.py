"""Read the model's files into the page cache while Python is still importing torch.

A cold worker spends 4-7 s importing torch, diffusers and transformers before it reads a byte of
the ~7 GB of weights; reading them meanwhile, in a daemon thread, overlaps the two (measured in
bench/RESULTS.md, "Cold start"). No torch import, so ``handler`` starts it before the heavy
imports; best effort: any problem here is left for the real start-up to report.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

CHUNK = 16 << 20  # large sequential reads; the data itself is dropped


def _read(paths: list[Path]) -> None:
    buffer = bytearray(CHUNK)
    for path in paths:
        try:
            with path.open("rb", buffering=0) as fh:
                while fh.readinto(buffer):
                    pass
        except OSError:
            continue


def start(paths: list[Path]) -> threading.Thread:
    """Read ``paths`` in order, in a daemon thread; returns it (tests join it)."""
    thread = threading.Thread(target=_read, args=(paths,), name="prefetch", daemon=True)
    thread.start()
    return thread


def start_from_env(env: Mapping[str, str] | None = None) -> threading.Thread | None:
    """Prefetch the files the worker is about to load, found as start-up will find them."""
    try:
        from worker.location import locate
        from worker.settings import Settings

        settings = Settings.from_env(os.environ if env is None else env)
        spec = settings.model_spec
        model_dir, _ = locate(settings.model_dir, spec)
        files = spec.files()
    except Exception:  # noqa: BLE001 - start-up reports bad settings properly
        return None
    # spec.files() lists them in the order the loader reads them: encoders, VAE, UNet.
    paths = [model_dir / f.path for f in files if (model_dir / f.path).is_file()]
    if own := spec.model_weights(model_dir):  # BASE_MODEL: loaded first, then its Lightning files
        paths = [p for p in paths if p.suffix != ".safetensors"] + own + [
            p for p in paths if p.suffix == ".safetensors"]
    return start(paths) if paths else None
