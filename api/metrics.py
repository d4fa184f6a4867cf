"""Prometheus metrics of the publish API (outcomes, keys, latency; never per-request identifiers)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector


class PublishMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.publishes = Counter("enp_publish_requests", "Publish requests by outcome code.", ["outcome"],
                                 registry=self.registry)
        self.keys_inserted = Counter("enp_publish_keys_inserted", "Exposure keys inserted by publish.",
                                     registry=self.registry)
        self.keys_revised = Counter("enp_publish_keys_revised", "Exposure keys revised by publish.",
                                    registry=self.registry)
        self.latency = Histogram("enp_publish_latency_seconds", "Publish handling latency.",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
                                 registry=self.registry)

    def render(self) -> bytes:
        # Under gunicorn every worker writes to PROMETHEUS_MULTIPROC_DIR; /metrics must sum them.
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
