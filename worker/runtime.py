"""Process-wide settings of the libraries the worker uses: the one place that sets them.

``configure_libraries()`` runs first in every entry point that loads them (``handler``,
``pipeline``, ``builder.make_tiny_model``), before runpod, torch, diffusers or transformers are
imported, because they read their environment at import: defaults set later would not act.
(``builder.download_weights`` loads none of them: it runs on the bare interpreter.)
``configure_logging()`` is the worker process's logging setup. Stdlib and Pillow only.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import MutableMapping

from PIL import Image

# Defaults only: a variable the operator set wins.
LIBRARY_ENV = {
    # runpod's default level (DEBUG) logs every job's whole output, base64 images included.
    "RUNPOD_LOG_LEVEL": "INFO",
    # Everything is read from local files: nothing may reach for the Hub at run time.
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # Their notices are noise here (torchvision fallbacks, 77-token truncation: the worker reports
    # truncation itself; "modules that should be kept in float32: []").
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}
# The same quiet levels for a library imported before the variables above were set (its
# verbosity variable is read once, when it configures its logger).
QUIET_LOGGERS = ("diffusers", "transformers")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_libraries(env: MutableMapping[str, str] = os.environ) -> None:
    """Library defaults: environment variables, log levels and Pillow's bomb warning."""
    for name, value in LIBRARY_ENV.items():
        env.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Pillow warns (DecompressionBombWarning) past Image.MAX_IMAGE_PIXELS and raises past twice
    # that. inputs/images.py checks the pixel count itself right after Image.open, against the
    # lower of its limit and Pillow's, so the warning adds nothing. Set once per process:
    # warnings.catch_warnings() per call is not thread-safe, and images decode in several
    # threads at once.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def configure_logging() -> None:
    """The worker's log format at INFO; ``force``: runpod's rp_upload configures the root
    logger at import with a format of its own."""
    logging.basicConfig(level=logging.INFO, force=True, format=LOG_FORMAT)
