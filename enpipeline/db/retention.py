"""SQL of the retention cleanup: exposure day partitions, and the mark/sweep states of export files."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

PARTITION_NAME = re.compile(r"^exposure_p(\d{8})$")

# Session-level advisory locks: one cleanup of each kind at a time, across processes.
EXPOSURE_CLEANUP_LOCK = 0x656E705F636C6E  # "enp_cln"
REVISION_ROTATION_LOCK = 0x656E705F726F74  # "enp_rot"


@dataclass(frozen=True)
class Partition:
    name: str
    day: date
    attached: bool         # still a partition of exposure (False: detached by an interrupted cleanup)
    detach_pending: bool   # DETACH ... CONCURRENTLY was interrupted between its two transactions
    estimated_rows: int    # planner statistics; -1 when the table was never analysed
    bytes: int

    @property
    def end(self) -> datetime:
        """Exclusive upper bound of the partition (next UTC midnight)."""
        return datetime(self.day.year, self.day.month, self.day.day, tzinfo=UTC) + _ONE_DAY


_ONE_DAY = timedelta(days=1)


def day_of(name: str) -> date | None:
    m = PARTITION_NAME.match(name)
    if not m:
        return None
    try:
        return datetime.strptime(m.group(1), "%Y%m%d").date()
    except ValueError:
        return None


def list_partitions(conn: Connection) -> list[Partition]:
    """Day partitions of exposure, plus exposure_pYYYYMMDD tables left detached by an interrupted cleanup."""
    rows = conn.execute(sa.text(
        "SELECT c.relname, i.inhrelid IS NOT NULL AS attached, coalesce(i.inhdetachpending, false) AS pending,"
        " c.reltuples::bigint AS est, pg_total_relation_size(c.oid) AS bytes"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND i.inhparent = 'exposure'::regclass"
        " WHERE c.relkind = 'r' AND n.nspname = current_schema() AND c.relname ~ '^exposure_p[0-9]{8}$'"
        " AND (i.inhrelid IS NOT NULL OR NOT c.relispartition)"
        " ORDER BY c.relname")).all()
    out = []
    for r in rows:
        day = day_of(r.relname)
        if day is not None:
            out.append(Partition(r.relname, day, r.attached, r.pending, int(r.est), int(r.bytes)))
    return out


def missing_partition_days(conn: Connection, from_day: date, to_day: date) -> list[date]:
    have = {p.day for p in list_partitions(conn) if p.attached}
    days, d = [], from_day
    while d <= to_day:
        if d not in have:
            days.append(d)
        d += _ONE_DAY
    return days


def count_rows(conn: Connection, table: str) -> int:
    return conn.execute(sa.text(f'SELECT count(*) FROM "{_checked(table)}"')).scalar_one()


def detach_partition(autocommit_conn: Connection, partition: Partition) -> None:
    """Detach without blocking publishes: CONCURRENTLY takes only SHARE UPDATE EXCLUSIVE on exposure.

    Must run outside a transaction block. An interrupted detach is completed with FINALIZE.
    """
    name = _checked(partition.name)
    if partition.detach_pending:
        autocommit_conn.execute(sa.text(f'ALTER TABLE exposure DETACH PARTITION "{name}" FINALIZE'))
    elif partition.attached:
        autocommit_conn.execute(sa.text(f'ALTER TABLE exposure DETACH PARTITION "{name}" CONCURRENTLY'))


def drop_detached(conn: Connection, name: str) -> None:
    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{_checked(name)}"'))


def count_before(conn: Connection, start: datetime, cutoff: datetime) -> int:
    return conn.execute(sa.text("SELECT count(*) FROM exposure WHERE created_at >= :s AND created_at < :c"),
                        {"s": start, "c": cutoff}).scalar_one()


def delete_before(conn: Connection, start: datetime, cutoff: datetime) -> int:
    """Delete the rows of one (boundary) day that are older than the cutoff; pruning keeps it to one partition."""
    return conn.execute(sa.text("DELETE FROM exposure WHERE created_at >= :s AND created_at < :c"),
                        {"s": start, "c": cutoff}).rowcount


def _checked(name: str) -> str:
    if not PARTITION_NAME.match(name):
        raise ValueError(f"not an exposure partition name: {name!r}")
    return name


def session_lock(conn: Connection, key: int) -> None:
    conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})


def session_unlock(conn: Connection, key: int) -> None:
    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})


# --- export files -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpiredBatch:
    batch_id: int
    config_id: int
    status: str
    start_timestamp: datetime
    live_files: int


def expired_batches(conn: Connection, cutoff: datetime) -> list[ExpiredBatch]:
    """Batches that start before the cutoff and are not yet marked: out of the index from now on."""
    rows = conn.execute(sa.text(
        "SELECT b.batch_id, b.config_id, b.status, b.start_timestamp,"
        " (SELECT count(*) FROM export_file f WHERE f.batch_id = b.batch_id AND f.status = 'COMPLETE') AS live_files"
        " FROM export_batch b WHERE b.start_timestamp < :cutoff AND b.status IN ('OPEN', 'PENDING', 'COMPLETE')"
        " ORDER BY b.config_id, b.batch_id"), {"cutoff": cutoff}).all()
    return [ExpiredBatch(**r._asdict()) for r in rows]


def mark_batches(conn: Connection, batch_ids: Sequence[int]) -> tuple[int, int]:
    """Batches and their live files -> DEL_PEND. Returns (batches, files) changed."""
    files = conn.execute(sa.text(
        "UPDATE export_file SET status = 'DEL_PEND' WHERE batch_id = ANY(:ids) AND status = 'COMPLETE'"),
        {"ids": list(batch_ids)}).rowcount
    batches = conn.execute(sa.text(
        "UPDATE export_batch SET status = 'DEL_PEND' WHERE batch_id = ANY(:ids)"
        " AND status IN ('OPEN', 'PENDING', 'COMPLETE')"), {"ids": list(batch_ids)}).rowcount
    return batches, files


def configs_with_pending_deletes(conn: Connection) -> list[int]:
    return list(conn.execute(sa.text(
        "SELECT DISTINCT b.config_id FROM export_batch b LEFT JOIN export_file f ON f.batch_id = b.batch_id"
        " WHERE b.status = 'DEL_PEND' OR f.status = 'DEL_PEND' ORDER BY 1")).scalars())


@dataclass(frozen=True)
class PendingFile:
    bucket_name: str
    filename: str
    batch_id: int


def pending_files(conn: Connection, config_id: int) -> list[PendingFile]:
    rows = conn.execute(sa.text(
        "SELECT f.bucket_name, f.filename, f.batch_id FROM export_file f JOIN export_batch b ON b.batch_id = f.batch_id"
        " WHERE b.config_id = :c AND f.status = 'DEL_PEND' ORDER BY f.filename"), {"c": config_id}).all()
    return [PendingFile(**r._asdict()) for r in rows]


def delete_file_row(conn: Connection, bucket: str, filename: str) -> None:
    conn.execute(sa.text("DELETE FROM export_file WHERE bucket_name = :b AND filename = :f AND status = 'DEL_PEND'"),
                 {"b": bucket, "f": filename})


def finish_deleted_batches(conn: Connection, config_id: int, now: datetime) -> int:
    """DEL_PEND batches with no files left -> DELETED; their shard plans (which hold key bytes) go too."""
    ids = list(conn.execute(sa.text(
        "UPDATE export_batch b SET status = 'DELETED', deleted_at = :now WHERE b.config_id = :c"
        " AND b.status = 'DEL_PEND' AND NOT EXISTS (SELECT 1 FROM export_file f WHERE f.batch_id = b.batch_id"
        " AND f.status <> 'DELETED') RETURNING b.batch_id"), {"c": config_id, "now": now}).scalars())
    if ids:
        conn.execute(sa.text("DELETE FROM export_shard WHERE batch_id = ANY(:ids)"), {"ids": ids})
    return len(ids)


def batch_status_counts(conn: Connection) -> dict[str, int]:
    return dict(conn.execute(sa.text("SELECT status, count(*) FROM export_batch GROUP BY status")).all())


def clear_efgs_key_bounds(conn: Connection, cutoff: datetime, *, dry_run: bool = False) -> int:
    """EFGS upload batches record their key range as key bytes; past retention those bytes go (the counts stay).

    Returns how many batches had (dry run: have) key bytes to clear."""
    where = " WHERE window_end <= :cutoff AND (key_from IS NOT NULL OR key_to IS NOT NULL)"
    if dry_run:
        return conn.execute(sa.text("SELECT count(*) FROM efgs_upload_batch" + where), {"cutoff": cutoff}).scalar_one()
    return conn.execute(sa.text("UPDATE efgs_upload_batch SET key_from = NULL, key_to = NULL" + where),
                        {"cutoff": cutoff}).rowcount
