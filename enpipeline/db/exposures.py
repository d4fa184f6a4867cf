"""Reads and writes of the day-partitioned exposure table.

exposure_key cannot be a primary key of a table partitioned by created_at, so writers serialise on
a transaction-level advisory lock per key before they look a key up; with that, "insert unless it
exists" stays correct under concurrent publishes of the same key.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Iterable, Sequence
from dataclasses import fields
from datetime import date, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from enpipeline.db import migrate
from enpipeline.db.tables import EXPOSURE_COLUMNS, exposure
from enpipeline.model import Exposure

_FIELDS = [f.name for f in fields(Exposure)]
_SELECT = "SELECT " + ", ".join(EXPOSURE_COLUMNS) + " FROM exposure"


def key_lock_id(key: bytes) -> int:
    """A signed 64-bit advisory-lock id from a key's first 8 bytes (keys are random)."""
    return int.from_bytes(key[:8], "big", signed=True)


def lock_keys(conn: Connection, keys: Iterable[bytes]) -> None:
    """Take transaction-scoped advisory locks for ``keys`` in a fixed order (no deadlocks)."""
    ids = sorted({key_lock_id(k) for k in keys})
    if ids:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(i) FROM unnest(CAST(:ids AS BIGINT[])) AS i"),
                     {"ids": ids})


def _row_to_exposure(row: sa.Row) -> Exposure:
    values = row._asdict()
    values["exposure_key"] = bytes(values["exposure_key"])
    values["regions"] = list(values["regions"] or [])
    values.pop("vaccine_status", None)
    return Exposure(**values)


def read_for_update(conn: Connection, keys: Sequence[bytes]) -> dict[bytes, Exposure]:
    """Existing rows for ``keys``, locked until the transaction ends."""
    if not keys:
        return {}
    rows = conn.execute(sa.text(_SELECT + " WHERE exposure_key = ANY(:keys) FOR UPDATE"), {"keys": list(keys)})
    return {bytes(r.exposure_key): _row_to_exposure(r) for r in rows}


def read_keys(conn: Connection, keys: Sequence[bytes]) -> dict[bytes, Exposure]:
    if not keys:
        return {}
    rows = conn.execute(sa.text(_SELECT + " WHERE exposure_key = ANY(:keys)"), {"keys": list(keys)})
    return {bytes(r.exposure_key): _row_to_exposure(r) for r in rows}


# Above this many rows a COPY is cheaper than a parameterised INSERT (whose 22 bound values per row cost the
# client ~0.13 ms a row to render: a 500-key federation page spent 60 ms there and 5 ms in the server).
COPY_THRESHOLD = 64


def insert_exposures(conn: Connection, rows: Sequence[Exposure]) -> int:
    if not rows:
        return 0
    if len(rows) >= COPY_THRESHOLD:
        return copy_exposures(conn, rows)
    # A shallow dict per row: dataclasses.asdict deep-copies and costs ~0.45 ms per publish.
    conn.execute(sa.insert(exposure), [{name: getattr(r, name) for name in _FIELDS} for r in rows])
    return len(rows)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: object) -> str:
    """One field in COPY's text format."""
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, bytes):
        return "\\\\x" + value.hex()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        # An array literal with every element quoted, then escaped once more for COPY.
        items = ",".join('"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"' for v in value)
        return ("{" + items + "}").translate(_COPY_ESCAPES)
    return str(value).translate(_COPY_ESCAPES)


@functools.lru_cache(maxsize=1024)
def _copy_cached(value: str | tuple[str, ...] | None) -> str:
    # Regions, report types and source ids repeat across a whole batch: render each distinct one once.
    return _copy_text(value)


def _copy_line(r: Exposure) -> str:
    # Spelled out per column (in _FIELDS order): half the cost of the generic per-field loop.
    n = "\\N"
    return "\t".join((
        "\\\\x" + r.exposure_key.hex(), str(r.transmission_risk),
        n if r.app_package_name is None else _copy_cached(r.app_package_name), _copy_cached(tuple(r.regions)),
        "t" if r.traveler else "f", str(r.interval_number), str(r.interval_count), r.created_at.isoformat(),
        "t" if r.local_provenance else "f",
        n if r.health_authority_id is None else str(r.health_authority_id), _copy_cached(r.report_type),
        n if r.days_since_symptom_onset is None else str(r.days_since_symptom_onset),
        _copy_cached(r.revised_report_type), n if r.revised_at is None else r.revised_at.isoformat(),
        n if r.revised_days_since_symptom_onset is None else str(r.revised_days_since_symptom_onset),
        n if r.revised_transmission_risk is None else str(r.revised_transmission_risk),
        n if r.sync_id is None else str(r.sync_id), _copy_cached(r.sync_query_id),
        n if r.export_import_id is None else str(r.export_import_id),
        n if r.import_file_id is None else str(r.import_file_id),
        n if r.revised_import_file_id is None else str(r.revised_import_file_id),
        n if r.padding_seq is None else str(r.padding_seq))) + "\n"


def copy_exposures(conn: Connection, rows: Sequence[Exposure]) -> int:
    """Bulk insert with COPY FROM STDIN (tuple routing sends each row to its day partition)."""
    buffer = io.StringIO("".join(map(_copy_line, rows)))
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.copy_expert(f"COPY exposure ({', '.join(_FIELDS)}) FROM STDIN", buffer)
    finally:
        cursor.close()
    return len(rows)


def revise_exposure(conn: Connection, revised: Exposure) -> None:
    """Write a revision; the row must still be unrevised (exactly one row changes)."""
    result = conn.execute(
        sa.text(
            "UPDATE exposure SET revised_report_type = :revised_report_type, revised_at = :revised_at,"
            " revised_days_since_symptom_onset = :revised_days_since_symptom_onset,"
            " revised_transmission_risk = :revised_transmission_risk,"
            " health_authority_id = :health_authority_id, regions = :regions,"
            " revised_import_file_id = :revised_import_file_id"
            " WHERE exposure_key = :exposure_key AND created_at = :created_at AND revised_at IS NULL"
        ),
        {
            "revised_report_type": revised.revised_report_type,
            "revised_at": revised.revised_at,
            "revised_days_since_symptom_onset": revised.revised_days_since_symptom_onset,
            "revised_transmission_risk": revised.revised_transmission_risk,
            "health_authority_id": revised.health_authority_id,
            "regions": revised.regions,
            "revised_import_file_id": revised.revised_import_file_id,
            "exposure_key": revised.exposure_key,
            "created_at": revised.created_at,
        },
    )
    if result.rowcount != 1:
        raise RuntimeError(f"revising a key changed {result.rowcount} rows, want 1")


def count(conn: Connection) -> int:
    return conn.execute(sa.text("SELECT count(*) FROM exposure")).scalar_one()


class PartitionGuard:
    """Makes sure a day partition exists before rows for that day are inserted.

    Partitions are created days ahead by migrate and cleanup; this covers a process that outlives
    them (or a clock jump) so a publish never fails for want of a partition. Each day is checked once
    per process, in its own short transaction, so the publish transaction never holds the DDL lock.
    """

    def __init__(self, engine: Engine):
        self._engine = engine
        self._known: set[date] = set()
        self._lock = threading.Lock()

    def ensure(self, created_ats: Iterable[datetime]) -> None:
        days = {t.date() for t in created_ats} - self._known
        if not days:
            return
        with self._lock:
            days -= self._known
            if not days:
                return
            with self._engine.begin() as conn:
                migrate.ensure_partitions(conn, min(days), max(days))
            self._known |= days
