"""Keys that arrive from elsewhere (a partner's Fetch server or a partner's export files).

They go through the same rules as a publish (key length, interval count, age, future, embargo, transmission
risk), are stored with local provenance false and their source, are insert-only as primary keys, and may only
revise keys that came from the same source.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sqlalchemy.engine import Connection

from enpipeline.config import Settings
from enpipeline.db import exposures as exposures_db
from enpipeline.model import (
    REPORT_TYPE_CONFIRMED,
    REPORT_TYPE_LIKELY,
    REPORT_TYPE_NEGATIVE,
    TRANSMISSION_RISK_BY_REPORT_TYPE,
    Exposure,
)
from enpipeline.publish.transform import validate_key_fields

# Report types as numbered in federation.proto and export.proto.
UNKNOWN, CONFIRMED_TEST, CONFIRMED_CLINICAL_DIAGNOSIS, SELF_REPORT, RECURSIVE, REVOKED = range(6)
MAX_DAYS_SINCE_ONSET = 14


class ForeignKey(NamedTuple):
    """One key as a partner sent it, before validation (a NamedTuple: pulls build millions)."""

    key: bytes
    transmission_risk: int
    interval_number: int
    interval_count: int
    report_type: int                   # the proto enum value
    days_since_onset: int | None       # None when the partner sent none
    regions: tuple[str, ...] = ()
    traveler: bool = False


def report_type_name(value: int, *, accept_self_report: bool, accept_recursive: bool) -> str:
    """Our stored report type for a proto enum value; raises ValueError for types we do not take."""
    if value == CONFIRMED_TEST:
        return REPORT_TYPE_CONFIRMED
    if value == CONFIRMED_CLINICAL_DIAGNOSIS:
        return REPORT_TYPE_LIKELY
    if value == REVOKED:
        return REPORT_TYPE_NEGATIVE
    if value == SELF_REPORT:
        if not accept_self_report:
            raise ValueError("self-reported key refused (ENP_FEDERATION_ACCEPT_SELF_REPORT is off)")
        return REPORT_TYPE_LIKELY
    if value == RECURSIVE:
        if not accept_recursive:
            raise ValueError("recursive key refused (ENP_FEDERATION_ACCEPT_RECURSIVE is off)")
        return REPORT_TYPE_LIKELY
    if value == UNKNOWN:
        return ""
    raise ValueError(f"unknown report type {value}")


def normalize_regions(regions: Sequence[str]) -> list[str]:
    return list(_normalized(tuple(regions)))


@functools.lru_cache(maxsize=1024)
def _normalized(regions: tuple[str, ...]) -> tuple[str, ...]:
    # Partners send the same few region lists over and over (a 1M-key pull: one or two distinct lists).
    return tuple(sorted({r.strip().upper() for r in regions if r.strip()}))


def to_exposure(key: ForeignKey, *, settings: Settings, now: datetime, **provenance) -> Exposure:
    """Validate ``key`` like a publish and build its row; raises ValueError naming the broken rule.

    ``provenance`` sets the source columns (sync_id and sync_query_id, or export_import_id and import_file_id).
    """
    created_at = validate_key_fields(key.key, key.interval_number, key.interval_count, key.transmission_risk,
                                     settings, now)
    report_type = report_type_name(key.report_type, accept_self_report=settings.federation_accept_self_report,
                                   accept_recursive=settings.federation_accept_recursive)
    tr = key.transmission_risk or TRANSMISSION_RISK_BY_REPORT_TYPE.get(report_type, 0)
    dsos = key.days_since_onset
    if dsos is not None and abs(dsos) > MAX_DAYS_SINCE_ONSET:
        dsos = None  # as the reference: an out-of-range onset is dropped, the key kept
    return Exposure(exposure_key=bytes(key.key), transmission_risk=tr, app_package_name=None,
                    regions=normalize_regions(key.regions), traveler=key.traveler,
                    interval_number=key.interval_number, interval_count=key.interval_count, created_at=created_at,
                    local_provenance=False, report_type=report_type, days_since_symptom_onset=dsos, **provenance)


@dataclass
class StoreCounts:
    inserted: int = 0
    revised: int = 0
    skipped: int = 0   # already stored, or a revision of a key from another source (or already revised)

    def add(self, other: StoreCounts) -> None:
        self.inserted += other.inserted
        self.revised += other.revised
        self.skipped += other.skipped


def store_foreign_keys(conn: Connection, primary: Sequence[Exposure], revised: Sequence[Exposure], *,
                       same_source: Callable[[Exposure], bool], revised_at: datetime,
                       revised_provenance: dict | None = None) -> StoreCounts:
    """Insert new primary keys and apply revisions to keys of the same source, in the caller's transaction.

    Negative (revoked) primary keys are never stored, as in a publish. Takes the same per-key advisory locks as
    the publish path, so a key arriving at once from a phone and a partner is stored once. The caller must have
    made sure the partitions for the rows' created_at exist (exposures_db.PartitionGuard).
    """
    counts = StoreCounts()
    primary = [e for e in primary if e.report_type != REPORT_TYPE_NEGATIVE]
    by_key: dict[bytes, Exposure] = {}
    for e in primary:  # a page may repeat a key: the first one wins
        by_key.setdefault(e.exposure_key, e)
    counts.skipped += len(primary) - len(by_key)
    keys = set(by_key) | {e.exposure_key for e in revised}
    if not keys:
        return counts
    exposures_db.lock_keys(conn, keys)
    existing = exposures_db.read_for_update(conn, sorted(keys))
    new = [e for k, e in by_key.items() if k not in existing]
    counts.skipped += len(by_key) - len(new)
    counts.inserted = exposures_db.insert_exposures(conn, new)
    for e in new:
        existing[e.exposure_key] = e
    for incoming in revised:
        stored = existing.get(incoming.exposure_key)
        if (stored is None or not same_source(stored) or stored.revised_at is not None
                or stored.report_type == incoming.report_type):
            counts.skipped += 1
            continue
        updated = dataclasses.replace(
            stored, revised_report_type=incoming.report_type, revised_at=revised_at,
            revised_days_since_symptom_onset=incoming.days_since_symptom_onset,
            revised_transmission_risk=incoming.transmission_risk,
            regions=sorted(set(stored.regions) | set(incoming.regions)),
            **(revised_provenance or {}))
        exposures_db.revise_exposure(conn, updated)
        existing[incoming.exposure_key] = updated
        counts.revised += 1
    return counts
