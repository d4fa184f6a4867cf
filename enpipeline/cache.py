"""A small thread-safe TTL cache for lookups that change rarely (apps, health authorities)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from datetime import timedelta
from typing import Generic, TypeVar

V = TypeVar("V")


class TTLCache(Generic[V]):
    """Caches loader results, including ``None`` (not found), for ``ttl``."""

    def __init__(self, ttl: timedelta, clock: Callable[[], float] = time.monotonic):
        self._ttl = ttl.total_seconds()
        self._clock = clock
        self._items: dict[Hashable, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, loader: Callable[[], V]) -> V:
        now = self._clock()
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        # Load outside the lock: a slow database must not serialise every request.
        value = loader()
        with self._lock:
            self._items[key] = (now + self._ttl, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
