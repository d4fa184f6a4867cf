"""Reads and writes of the day-partitioned exposure table.

exposure_key cannot be a primary key of a table partitioned by created_at, so writers serialise on
advisory locks before they look a key up; with that, "insert unless it exists" stays correct under
concurrent writers of the same key. Two levels, so that a bulk writer needs a bounded number of locks:

* a publish takes its keys' buckets (the first byte: 256 buckets) in shared mode, then a
  transaction-level lock per key: publishes of different keys never wait for each other;
* a bulk writer (federation pull, export import, EU gateway) takes its keys' buckets in exclusive
  mode: at most 256 locks however many keys it stores (a lock per key would fill Postgres' shared
  lock table, which holds max_locks_per_transaction x max_connections locks in all: two pulls of
  5,000-key batches at once failed with "out of shared memory"). It waits for the publishes in
  flight in those buckets, and they wait for its transaction.

Every writer takes its bucket locks in ascending order before any key lock, so there is no deadlock.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Iterable, Sequence
from dataclasses import fields
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from psycopg2 import sql as pgsql
from sqlalchemy.engine import Connection, Engine

from enpipeline.db import migrate
from enpipeline.db.tables import EXPOSURE_COLUMNS, exposure
from enpipeline.model import Exposure

_FIELDS = [f.name for f in fields(Exposure)]
_SELECT = "SELECT " + ", ".join(EXPOSURE_COLUMNS) + " FROM exposure"


def key_lock_id(key: bytes) -> int:
    """A signed 64-bit advisory-lock id from a key's first 8 bytes (keys are random)."""
    return int.from_bytes(key[:8], "big", signed=True)


# The two-int advisory lock space of the key buckets (the single-bigint space holds the per-key locks).
_BUCKET_LOCK_SPACE = 0x656E7062  # "enpb"


def key_bucket(key: bytes) -> int:
    """The lock bucket of a key (keys are random, so buckets are even)."""
    return key[0] if key else 0


def lock_keys(conn: Connection, keys: Iterable[bytes]) -> None:
    """A publish's locks: its keys' buckets shared, then one lock per key, each in ascending order."""
    keys = list(keys)
    ids = sorted({key_lock_id(k) for k in keys})
    if ids:
        conn.execute(sa.text(
            "SELECT pg_advisory_xact_lock_shared(:space, b) FROM unnest(CAST(:buckets AS INTEGER[])) AS b;"
            " SELECT pg_advisory_xact_lock(i) FROM unnest(CAST(:ids AS BIGINT[])) AS i"),
            {"space": _BUCKET_LOCK_SPACE, "buckets": sorted({key_bucket(k) for k in keys}), "ids": ids})


def lock_key_buckets(conn: Connection, keys: Iterable[bytes]) -> None:
    """A bulk writer's locks: its keys' buckets, exclusive, in ascending order (at most 256 locks)."""
    buckets = sorted({key_bucket(k) for k in keys})
    if buckets:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:space, b) FROM unnest(CAST(:buckets AS INTEGER[])) AS b"),
                     {"space": _BUCKET_LOCK_SPACE, "buckets": buckets})


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


class StagedRows:
    """Rows for ``insert_new_exposures``: COPY text built one key at a time, each key once (the first wins).

    ``add_foreign`` renders a key from a partner (no app, no health authority, not revised, not padding) straight
    from its values, without an Exposure per key: a federation pull stores millions of them.
    """

    def __init__(self, *, sync_id: int | None = None, sync_query_id: str | None = None,
                 export_import_id: int | None = None, import_file_id: int | None = None):
        self.keys: list[bytes] = []
        self.duplicates = 0           # keys given again after their first row (not stored twice)
        self._seen: set[bytes] = set()
        self._lines: list[str] = []
        # The provenance columns end every line (as _FIELDS: ..., revised_import_file_id, padding_seq).
        self._tail = "\t".join(_copy_text(v) for v in (sync_id, sync_query_id, export_import_id, import_file_id,
                                                         None, None)) + "\n"
        self._time: tuple[datetime | None, str] = (None, "")
        self._created_ats: set[datetime] = set()

    def __len__(self) -> int:
        return len(self.keys)

    def _first(self, key: bytes) -> bool:
        if key in self._seen:
            self.duplicates += 1
            return False
        self._seen.add(key)
        self.keys.append(key)
        return True

    def created_ats(self) -> set[datetime]:
        """The distinct created_at of the rows (their day partitions must exist before the insert)."""
        return self._created_ats

    def add_exposure(self, row: Exposure) -> None:
        if self._first(row.exposure_key):
            self._lines.append(_copy_line(row))
            self._created_ats.add(row.created_at)

    def add_foreign(self, key: bytes, transmission_risk: int, regions: tuple[str, ...], traveler: bool,
                    interval_number: int, interval_count: int, created_at: datetime, report_type: str,
                    days_since_symptom_onset: int | None) -> None:
        """The same line as ``_copy_line`` of the Exposure with these values, this provenance and nothing else."""
        if not self._first(key):
            return
        at, text = self._time
        if at != created_at:  # a batch has one created_at, bar the odd embargoed key
            text = created_at.isoformat()
            self._time = (created_at, text)
            self._created_ats.add(created_at)
        dsos = "\\N" if days_since_symptom_onset is None else str(days_since_symptom_onset)
        self._lines.append("\t".join((
            "\\\\x" + key.hex(), str(transmission_risk), "\\N", _copy_cached(regions), "t" if traveler else "f",
            str(interval_number), str(interval_count), text, "f", "\\N", _copy_cached(report_type), dsos,
            "\\N\t\\N\t\\N\t\\N", self._tail)))

    def copy_text(self) -> str:
        return "".join(self._lines)

    @classmethod
    def merged(cls, parts: Sequence[StagedRows]) -> StagedRows:
        """The rows of several stagings in order, each key once (the first); their lines are kept as rendered."""
        out = cls()
        for part in parts:
            out.duplicates += part.duplicates
            out._created_ats |= part._created_ats
            if out._seen.isdisjoint(part.keys):  # the usual case: pages of one stream do not repeat keys
                out.keys += part.keys
                out._lines += part._lines
                out._seen.update(part.keys)
                continue
            for key, line in zip(part.keys, part._lines, strict=True):
                if out._first(key):
                    out._lines.append(line)
        return out


# A session's staging table for insert_new_exposures: temporary, emptied at every commit.
_STAGE = "enp_incoming_exposure"
_COLUMNS = ", ".join(_FIELDS)


# Settings for the anti-join of insert_new_exposures, scoped to its transaction and restored afterwards. The
# planner has no statistics on the fresh staging table (and often none on the partition being filled), so it may
# prefer hashing every stored key, which grows with the table, over probing the exposure_key index per staged
# row; and its cost estimate can pass jit_above_cost, where compiling took longer than the statement.
_INSERT_PLAN = {"enable_hashjoin": "off", "enable_mergejoin": "off", "jit": "off"}


def _occupied_partitions(cursor: Any) -> list[str]:
    """The exposure partitions that hold at least one visible row."""
    cursor.execute("SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid"
                   " WHERE i.inhparent = 'exposure'::regclass ORDER BY 1")
    names = [r[0] for r in cursor.fetchall()]
    if not names:
        return []
    cursor.execute(pgsql.SQL(" UNION ALL ").join(
        pgsql.SQL("SELECT {} WHERE EXISTS (SELECT 1 FROM {})").format(pgsql.Literal(n), pgsql.Identifier(n))
        for n in names))
    return [r[0] for r in cursor.fetchall()]


def insert_new_exposures(conn: Connection, rows: StagedRows) -> int:
    """Insert the rows whose key is not stored yet, in one statement; returns how many were inserted.

    The caller holds the keys' bucket locks (``lock_key_buckets``) and has made sure the partitions exist. The
    rows go through a temporary table, so the duplicate check is one anti-join in Postgres: no key list in the
    SQL text (a 5,000-key ``= ANY(...)`` literal cost the planner ~6 us a key) and no round trip with the keys.
    Only partitions that hold rows are probed: they are read under the bucket locks, so no row of these keys can
    appear elsewhere before the insert. A database filled by its first sync probes one index instead of ~17.
    """
    if not rows:
        return 0
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE exposure INCLUDING DEFAULTS)"
                       " ON COMMIT DELETE ROWS")
        cursor.copy_expert(f"COPY {_STAGE} ({_COLUMNS}) FROM STDIN", io.StringIO(rows.copy_text()))
        occupied = _occupied_partitions(cursor)
        insert = pgsql.SQL(f"INSERT INTO exposure ({_COLUMNS}) SELECT {_COLUMNS} FROM {_STAGE} AS s")
        if not occupied:
            cursor.execute(insert)
            inserted = cursor.rowcount
        else:
            names = list(_INSERT_PLAN)
            cursor.execute("SELECT " + ", ".join(f"current_setting('{n}')" for n in names) + ", "
                           + ", ".join(f"set_config('{n}', '{v}', true)" for n, v in _INSERT_PLAN.items()))
            previous = cursor.fetchone()[:len(names)]
            cursor.execute(insert + pgsql.SQL(" WHERE ") + pgsql.SQL(" AND ").join(
                pgsql.SQL("NOT EXISTS (SELECT 1 FROM {} AS e WHERE e.exposure_key = s.exposure_key)").format(
                    pgsql.Identifier(n)) for n in occupied))
            inserted = cursor.rowcount
            cursor.execute("SELECT " + ", ".join(f"set_config('{n}', %s, true)" for n in names), previous)
        # Empty now rather than at commit, so a second call in the same transaction starts clean.
        cursor.execute(f"TRUNCATE {_STAGE}")
    finally:
        cursor.close()
    return inserted


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
