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
from enpipeline.publish.transform import key_rules

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


class ForeignKeyRules:
    """Everything ``to_exposure`` checks and derives, for keys arriving at one ``now``, computed once.

    ``values`` is the shared core: ``to_exposure`` builds a row from it, and a pull stages it straight into COPY
    text (``stage``) without an Exposure per key.
    """

    def __init__(self, settings: Settings, now: datetime):
        self._settings = settings
        self._check = key_rules(settings, now).check
        self._report_types: dict[int, str] = {}

    def report_type(self, value: int) -> str:
        name = self._report_types.get(value)
        if name is None:  # first sight of this value, or a refused one (which raises every time)
            name = report_type_name(value, accept_self_report=self._settings.federation_accept_self_report,
                                    accept_recursive=self._settings.federation_accept_recursive)
            self._report_types[value] = name
        return name

    def values(self, key: bytes, transmission_risk: int, interval_number: int, interval_count: int, report_type: int,
               days_since_onset: int | None) -> tuple[datetime, str, int, int | None]:
        """created_at, report type, transmission risk (filled from the report type when 0) and days since onset
        (dropped when out of range, as the reference) of a key; raises ValueError naming the broken rule."""
        created_at = self._check(key, interval_number, interval_count, transmission_risk)
        name = self.report_type(report_type)
        tr = transmission_risk or TRANSMISSION_RISK_BY_REPORT_TYPE.get(name, 0)
        if days_since_onset is not None and abs(days_since_onset) > MAX_DAYS_SINCE_ONSET:
            days_since_onset = None
        return created_at, name, tr, days_since_onset

    def stage(self, rows: exposures_db.StagedRows, key: bytes, transmission_risk: int, interval_number: int,
              interval_count: int, report_type: int, days_since_onset: int | None, regions: Sequence[str],
              traveler: bool) -> None:
        """Validate a primary key and add it to ``rows`` (revoked keys are never stored: skipped silently, as in
        ``store_foreign_keys``); raises ValueError naming the broken rule."""
        created_at, name, tr, dsos = self.values(key, transmission_risk, interval_number, interval_count,
                                                 report_type, days_since_onset)
        if name != REPORT_TYPE_NEGATIVE:
            rows.add_foreign(key, tr, _normalized(tuple(regions)), traveler, interval_number, interval_count,
                             created_at, name, dsos)


def to_exposure(key: ForeignKey, *, settings: Settings, now: datetime, **provenance) -> Exposure:
    """Validate ``key`` like a publish and build its row; raises ValueError naming the broken rule.

    ``provenance`` sets the source columns (sync_id and sync_query_id, or export_import_id and import_file_id).
    """
    created_at, report_type, tr, dsos = ForeignKeyRules(settings, now).values(
        key.key, key.transmission_risk, key.interval_number, key.interval_count, key.report_type,
        key.days_since_onset)
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


def stage_exposures(rows: Sequence[Exposure], **provenance) -> exposures_db.StagedRows:
    """Primary rows as ``store_foreign_keys`` stores them: revoked keys dropped, each key once (the first)."""
    staged = exposures_db.StagedRows(**provenance)
    for e in rows:
        if e.report_type != REPORT_TYPE_NEGATIVE:
            staged.add_exposure(e)
    return staged


def store_foreign_keys(conn: Connection, primary: Sequence[Exposure] | exposures_db.StagedRows,
                       revised: Sequence[Exposure], *, same_source: Callable[[Exposure], bool], revised_at: datetime,
                       revised_provenance: dict | None = None) -> StoreCounts:
    """Insert new primary keys and apply revisions to keys of the same source, in the caller's transaction.

    ``primary`` is rows or already staged rows (``ForeignKeyRules.stage``). Negative (revoked) primary keys are
    never stored, as in a publish. Takes the keys' bucket locks (see enpipeline/db/exposures.py), so a key
    arriving at once from a phone and a partner is stored once. The caller must have made sure the partitions
    for the rows' created_at exist (exposures_db.PartitionGuard).
    """
    counts = StoreCounts()
    staged = primary if isinstance(primary, exposures_db.StagedRows) else stage_exposures(primary)
    counts.skipped += staged.duplicates
    revised_keys = sorted({e.exposure_key for e in revised})
    if not staged.keys and not revised_keys:
        return counts
    exposures_db.lock_key_buckets(conn, [*staged.keys, *revised_keys])
    counts.inserted = exposures_db.insert_new_exposures(conn, staged)
    counts.skipped += len(staged) - counts.inserted
    # Revisions see the rows stored before and the ones just inserted (a key and its revision in one batch).
    existing = exposures_db.read_for_update(conn, revised_keys)
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
