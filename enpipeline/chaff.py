"""Chaff: answer decoy publishes so they look like real ones in size and timing."""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass

WINDOW = 100  # the reference (go-chaff) averages over the last 100 real requests


@dataclass(frozen=True)
class ChaffProfile:
    latency_seconds: float
    header_bytes: int
    body_bytes: int


class ChaffTracker:
    """Rolling averages of real publishes; chaff replies are shaped by them."""

    def __init__(self, max_latency_seconds: float, window: int = WINDOW):
        self._max_latency = max_latency_seconds
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def record(self, latency_seconds: float, header_bytes: int, body_bytes: int) -> None:
        with self._lock:
            self._samples.append((latency_seconds, header_bytes, body_bytes))

    def profile(self) -> ChaffProfile:
        with self._lock:
            samples = list(self._samples)
        if not samples:
            return ChaffProfile(0.0, 0, 0)
        n = len(samples)
        latency = sum(s[0] for s in samples) / n
        return ChaffProfile(
            latency_seconds=min(latency, self._max_latency),
            header_bytes=int(sum(s[1] for s in samples) / n),
            body_bytes=int(sum(s[2] for s in samples) / n),
        )

    def delay_for(self, elapsed_seconds: float) -> float:
        """How much longer a chaff reply should wait; jittered so it is not a constant tell."""
        target = self.profile().latency_seconds * random.uniform(0.9, 1.1)
        return max(0.0, min(target, self._max_latency) - elapsed_seconds)
