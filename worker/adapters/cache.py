"""Least-recently-used bookkeeping with a size budget, for the LoRA disk and memory caches.

Pure and not thread-safe by itself: the disk cache (``store``) holds its own lock around it,
the engine's memory cache lives on the GPU thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """Entries whose sizes sum to at most ``limit``; putting one evicts the least recently
    used until it fits (an entry larger than the whole budget stays alone, until the next)."""

    def __init__(self, limit: float, size: Callable[[V], float]) -> None:
        self.limit, self._size = limit, size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The entry, now the most recently used; None if absent."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Add (or replace) ``key``; returns what was evicted to make room, oldest first."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        return self.trim()

    def trim(self) -> list[tuple[K, V]]:
        """Evict the least recently used (never the newest) until the budget holds."""
        evicted = []
        while self.used() > self.limit and len(self._entries) > 1:
            evicted.append(self._entries.popitem(last=False))
        return evicted

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)

    def used(self) -> float:
        return sum(self._size(value) for value in self._entries.values())

    def keys(self) -> list[K]:
        return list(self._entries)
