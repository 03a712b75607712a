"""Where a job's LoRA files come from: a name in LORA_DIR, or an https URL through the SSRF-safe
fetcher into a bounded disk cache; the rules of the ``loras`` field that need the worker's
settings (MAX_LORAS cut, scale clamp, URLs allowed).

``LoraStore.resolve(entries)`` turns the request's entries into ``plan.LoraUse``s (local file,
sha256, effective scale) plus warnings, or raises ``InputError`` naming the entry. Downloads
are cached by URL under ``LORA_CACHE_DIR`` as ``<sha256 of the URL>.safetensors``, least
recently used deleted beyond ``LORA_CACHE_GB``; two jobs asking for one URL at once share one
download (a lock per URL). Blocking: called on the input threads (``inputs/prepare``), never on
the event loop. No URL or path reaches a log record above DEBUG (it may carry a token).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from schemas import LORA_SCALES, EmbeddingInput, LoraInput
from worker.adapters.cache import Lru
from worker.errors import MIB, InputError, shown
from worker.inputs.fetch import FetchLimits, fetch
from worker.plan import EmbeddingUse, LoraUse
from worker.spec import sha256_of

log = logging.getLogger(__name__)

VOLUME = Path("/runpod-volume")  # RunPod mounts the network volume here
# A path inside LORA_DIR; each name in it is capped at 255 by the file system (caught below).
MAX_NAME_CHARS = 1024
SUFFIX = ".safetensors"
# A 1 GB file at the ~10 MB/s a slow origin gives takes ~100 s; past 3 minutes the job has
# waited longer than any client does.
DOWNLOAD_TIMEOUT_S = 180.0

Fetcher = Callable[[str, FetchLimits], bytes]


def default_lora_dir(model_dir: Path | None, volume: Path = VOLUME) -> Path:
    """LORA_DIR's default: the network volume's ``loras`` when one is mounted, else the
    model folder's."""
    if volume.is_dir():
        return volume / "loras"
    return (model_dir or Path.cwd()) / "loras"



@dataclass
class LoraStore:
    """The worker's LoRA sources and download cache (one per worker, shared by all jobs)."""

    lora_dir: Path
    cache_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "lora-cache")
    cache_bytes: float = 10e9
    max_bytes: int = 1024 * MIB
    max_loras: int = 4
    allow_urls: bool = True
    fetcher: Fetcher = fetch  # tests inject one with an in-process resolver and opener
    downloads: int = 0  # fetches made: what tests count

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._url_locks: dict[str, threading.Lock] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256
        self._disk: Lru[str, int] = Lru(limit=self.cache_bytes, size=lambda size: size)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Files a previous worker left (on a volume), oldest first, so the budget counts them:
        # a smaller LORA_CACHE_GB than last time deletes the oldest now.
        for path in sorted(self.cache_dir.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
            self._evict(self._disk.put(path.name, path.stat().st_size))

    def resolve(self, entries: Sequence[LoraInput]) -> tuple[tuple[LoraUse, ...], list[str]]:
        """The job's LoRAs, resolved; warnings for what was cut or clamped."""
        warnings = []
        if len(entries) > self.max_loras:
            if self.max_loras == 0:
                raise InputError("invalid input: loras are turned off on this worker "
                                 "(MAX_LORAS=0)")
            warnings.append(f"loras: only the first {self.max_loras} of {len(entries)} were "
                            f"used (MAX_LORAS={self.max_loras})")
            entries = entries[:self.max_loras]
        uses = []
        for index, entry in enumerate(entries):
            low, high = LORA_SCALES
            scale = min(max(entry.scale, low), high)
            if scale != entry.scale:
                warnings.append(f"loras[{index}].scale {entry.scale:g} was clamped to "
                                f"{scale:g} (allowed {low:g} to {high:g})")
            path = self._file_for(entry.path, f"loras[{index}].path")
            uses.append(LoraUse(path=entry.path, file=str(path), sha256=self._hash(path),
                                scale=scale))
        return tuple(uses), warnings

    def resolve_embeddings(self, entries: Sequence[EmbeddingInput], texts: Sequence[str | None],
                           ) -> tuple[tuple[EmbeddingUse, ...], list[str]]:
        """The job's embeddings, found or downloaded like LoRAs; a warning for each token that
        appears in none of ``texts`` (the prompts the job uses)."""
        uses, warnings = [], []
        for index, entry in enumerate(entries):
            path = self._file_for(entry.path, f"embeddings[{index}].path")
            uses.append(EmbeddingUse(path=entry.path, file=str(path), sha256=self._hash(path),
                                     tokens=entry.tokens))
            for token in entry.tokens:
                if not any(text and token in text for text in texts):
                    warnings.append(f"embeddings[{index}]: token {shown(token)} appears in no "
                                    f"prompt, so the embedding does nothing there")
        return tuple(uses), warnings

    def _file_for(self, given: str, field_name: str) -> Path:
        if "://" in given:
            if not given.lower().startswith("https://"):
                raise InputError(f"invalid input: {field_name}={shown(given, 80)} is invalid: "
                                 f"a LoRA URL must be https://")
            if not self.allow_urls:
                raise InputError(f"invalid input: {field_name}: this worker takes LoRAs only "
                                 f"from its LoRA folder (ALLOW_LORA_URLS=false); give a file "
                                 f"name")
            return self._download(given, field_name)
        return self._local(given, field_name)

    def _local(self, given: str, field_name: str) -> Path:
        """A file inside LORA_DIR; the name may hold sub-folders but never leave the folder."""
        root = self.lora_dir.resolve()
        if "\x00" in given or len(given) > MAX_NAME_CHARS:
            raise InputError(f"invalid input: {field_name}={shown(given, 80)} is invalid: a "
                             f"file name of at most {MAX_NAME_CHARS} characters, without NUL")
        try:
            candidate = (root / given).resolve()
        except (OSError, ValueError) as exc:  # e.g. a component past the file system's limit
            raise InputError(f"invalid input: {field_name}={shown(given, 80)} is not a usable "
                             f"file name ({type(exc).__name__})") from None
        if not given.endswith(SUFFIX):
            raise InputError(f"invalid input: {field_name}={shown(given, 80)} is invalid: only "
                             f"{SUFFIX} files are accepted")
        if Path(given).is_absolute() or not candidate.is_relative_to(root):
            raise InputError(f"invalid input: {field_name}={shown(given, 80)} leaves the LoRA "
                             f"folder: give a file name inside it, or an https URL")
        try:
            present = candidate.is_file()
        except (OSError, ValueError):  # ENAMETOOLONG and the like: no such file either
            present = False
        if not present:
            available = sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{SUFFIX}")
                               )[:10] if root.is_dir() else []
            raise InputError(f"invalid input: {field_name}={shown(given, 80)}: no such file in "
                             f"the LoRA folder (available: {', '.join(available) or 'none'})")
        return candidate

    def _hash(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            known = sha256_of(path)
            with self._lock:
                self._hashes[key] = known
        return known

    def _download(self, url: str, field_name: str) -> Path:
        name = hashlib.sha256(url.encode()).hexdigest() + SUFFIX
        path = self.cache_dir / name
        with self._lock:
            url_lock = self._url_locks.setdefault(name, threading.Lock())
        with url_lock:  # a second job for this URL waits for the first one's download
            with self._lock:
                if name in self._disk and path.is_file():
                    self._disk.get(name)
                    os.utime(path)  # the order a restarted worker rebuilds its LRU from
                    return path
            limits = FetchLimits(max_bytes=self.max_bytes, timeout_s=DOWNLOAD_TIMEOUT_S,
                                 accept=("application/octet-stream",))
            try:
                body = self.fetcher(url, limits)
            except InputError as exc:  # FetchError: names the origin, never the path
                raise InputError(f"invalid input: {field_name}: the LoRA could not be "
                                 f"downloaded: {exc}") from None
            with self._lock:
                self.downloads += 1
            partial = path.with_suffix(".part")
            partial.write_bytes(body)
            os.replace(partial, path)  # whole or absent: no job reads half a file
            with self._lock:
                self._evict(self._disk.put(name, len(body)))
            log.info("%s: LoRA downloaded, %d bytes", field_name, len(body))
            return path

    def _evict(self, evicted: list[tuple[str, int]]) -> None:
        for old, _ in evicted:
            (self.cache_dir / old).unlink(missing_ok=True)
            self._hashes = {k: v for k, v in self._hashes.items()
                            if k[0] != str(self.cache_dir / old)}
