"""A thread-safe TTL cache for lookups that change rarely (authorized apps, health authorities)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    expires_at: float


class TTLCache(Generic[V]):
    """Caches loader results, ``None`` ("not found") included, for ``ttl``; exceptions are not cached.

    Keys often come from unauthenticated input (an app id, a token's issuer), so the cache is bounded
    and drops its oldest entries first.
    """

    def __init__(self, ttl: timedelta, clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000):
        self._ttl = ttl.total_seconds()
        self._clock = clock
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry[V]] = {}
        # One fill lock per key being loaded: concurrent misses for one key hit the database once,
        # while a slow load of one key does not block the others.
        self._filling: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable, loader: Callable[[], V]) -> V:
        with self._lock:
            hit, value = self._fresh(key)
            if hit:
                return value
            fill_lock = self._filling.setdefault(key, threading.Lock())
        with fill_lock:
            with self._lock:
                hit, value = self._fresh(key)
                if hit:
                    return value
            try:
                value = loader()
                with self._lock:
                    self._store(key, value)
            finally:
                with self._lock:
                    if self._filling.get(key) is fill_lock:
                        del self._filling[key]
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _fresh(self, key: Hashable) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if self._clock() >= entry.expires_at:
            del self._entries[key]
            return False, None
        return True, entry.value

    def _store(self, key: Hashable, value: V) -> None:
        now = self._clock()
        if len(self._entries) >= self._max_entries:
            for stale in [k for k, e in self._entries.items() if now >= e.expires_at]:
                del self._entries[stale]
            while len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]  # dicts keep insertion order: oldest first
        self._entries[key] = _Entry(value, now + self._ttl)
