"""Retention: keys and export files are kept only as long as they can matter, then removed everywhere.

Keys: the exposure table is partitioned by UTC day, so expiring a day is detaching and dropping its
partition (constant time, whatever the table size); only the day that contains the cutoff loses rows
one by one. Export files go through mark -> index -> sweep: a file is first marked DEL_PEND, the
index is rebuilt without it, and only then is its blob deleted, so index.txt never names a missing
object (the reference's #453/#1148 bugs). Every step is idempotent and converges when re-run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection, Engine

from enpipeline.blobstore import BlobNotFound, Blobstore
from enpipeline.config import MIN_RETENTION, Settings
from enpipeline.db import export as export_db
from enpipeline.db import migrate
from enpipeline.db import retention as db
from enpipeline.db.revision_keys import PgRevisionKeyStore
from enpipeline.export.pipeline import index_name, write_index, write_index_on
from enpipeline.revision import KeyWrapper, RevisionKeyRecord, rotate_keys

log = logging.getLogger(__name__)


class RetentionError(Exception):
    """Cleanup refused to run or could not finish; the message says what to fix."""


def retention_cutoff(interval_end: datetime, retention: timedelta, *, allow_short: bool = False) -> datetime:
    """Keys created before the cutoff are expired: end of the run's data interval minus the retention."""
    if interval_end.tzinfo is None:
        raise ValueError("interval_end must be timezone-aware")
    if retention <= timedelta(0):
        raise RetentionError(f"retention must be positive, got {retention}")
    if retention < MIN_RETENTION and not allow_short:
        raise RetentionError(f"cleanup retention {retention} is less than the configured minimum "
                             f"{MIN_RETENTION.days}d (ENP_DEBUG_OVERRIDE_CLEANUP_MIN_DURATION=true overrides it)")
    return as_utc(interval_end) - retention


def as_utc(t: datetime) -> datetime:
    """A plain aware datetime in UTC (Airflow hands out pendulum DateTimes, which compare oddly once converted)."""
    u = t.astimezone(UTC)
    return datetime(u.year, u.month, u.day, u.hour, u.minute, u.second, u.microsecond, tzinfo=UTC)


def _midnight(t: datetime) -> datetime:
    return datetime(t.year, t.month, t.day, tzinfo=UTC)


@dataclass
class PartitionReport:
    created: int = 0
    days: list[str] = field(default_factory=list)


@dataclass
class ExposureReport:
    cutoff: str = ""
    dropped_partitions: list[str] = field(default_factory=list)
    dropped_rows: int = 0            # exact in a dry run; planner estimate otherwise (counting is O(rows))
    dropped_rows_exact: bool = False
    dropped_bytes: int = 0
    boundary_partition: str | None = None
    boundary_rows_deleted: int = 0
    # Where the time went: detaching is what takes the keys out of the table (constant time); dropping frees
    # their files, which costs the filesystem time in proportion to the bytes freed.
    detach_seconds: float = 0.0
    drop_seconds: float = 0.0
    boundary_seconds: float = 0.0


@dataclass
class MarkReport:
    batches: int = 0
    files: int = 0
    configs: list[int] = field(default_factory=list)


@dataclass
class IndexReport:
    configs: dict[int, int] = field(default_factory=dict)  # config id -> files the new index names


@dataclass
class SweepReport:
    blobs_deleted: int = 0
    file_rows_deleted: int = 0
    batches_deleted: int = 0
    indexes_rewritten: int = 0
    batch_statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class FederationStateReport:
    efgs_batches_cleared: int = 0


@dataclass
class RotationReport:
    created: int | None = None
    destroyed: list[int] = field(default_factory=list)
    allowed_keys: int = 0


def report_dict(report: Any) -> dict[str, Any]:
    return asdict(report)


class RetentionCleaner:
    """The cleanup steps. Each is its own Airflow task and its own transaction(s); ``dry_run`` changes nothing."""

    def __init__(self, settings: Settings, engine: Engine, blobstore: Blobstore):
        self.settings = settings
        self.engine = engine
        self.blobstore = blobstore

    def cutoff(self, interval_end: datetime) -> datetime:
        return retention_cutoff(interval_end, self.settings.retention,
                                allow_short=self.settings.debug_override_cleanup_min_duration)

    # -- exposure partitions ------------------------------------------------------------------------

    def ensure_partitions(self, now: datetime, *, dry_run: bool = False) -> PartitionReport:
        """Partitions for today and ENP_PARTITION_DAYS_AHEAD days ahead, so no publish waits for DDL."""
        first = now.astimezone(UTC).date()
        last = first + timedelta(days=self.settings.partition_days_ahead)
        with self.engine.begin() as conn:
            missing = db.missing_partition_days(conn, first, last)
            created = len(missing) if dry_run else migrate.ensure_partitions(conn, first, last)
        report = PartitionReport(created=created, days=[d.isoformat() for d in missing])
        log.info("partitions %s..%s: %d %s%s", first, last, created, "missing" if dry_run else "created",
                 f" ({', '.join(report.days)})" if missing else "")
        return report

    def expire_exposures(self, cutoff: datetime, *, dry_run: bool = False) -> ExposureReport:
        """Drop day partitions that end at or before the cutoff; delete the older rows of the cutoff's day."""
        report = ExposureReport(cutoff=cutoff.isoformat(), dropped_rows_exact=dry_run)
        boundary_start = _midnight(cutoff.astimezone(UTC))
        with self._session_lock(db.EXPOSURE_CLEANUP_LOCK) as conn:
            partitions = [p for p in db.list_partitions(conn) if p.end <= cutoff]
            for p in partitions:
                report.dropped_partitions.append(p.name)
                report.dropped_bytes += p.bytes
                rows = db.count_rows(conn, p.name) if dry_run else max(p.estimated_rows, 0)
                report.dropped_rows += rows
                if dry_run:
                    log.info("would drop %s (%d rows, %d bytes)", p.name, rows, p.bytes)
                    continue
                # Detach in autocommit (CONCURRENTLY refuses a transaction block), then drop the loose table.
                started = time.perf_counter()
                db.detach_partition(conn, p)
                detached = time.perf_counter()
                db.drop_detached(conn, p.name)
                report.detach_seconds += detached - started
                report.drop_seconds += time.perf_counter() - detached
                log.info("dropped %s (about %d rows, %d bytes)", p.name, rows, p.bytes)
            if cutoff > boundary_start:
                report.boundary_partition = f"exposure_p{boundary_start:%Y%m%d}"
                # One statement in autocommit: its own transaction, confined to one partition by pruning.
                started = time.perf_counter()
                if dry_run:
                    report.boundary_rows_deleted = db.count_before(conn, boundary_start, cutoff)
                else:
                    report.boundary_rows_deleted = db.delete_before(conn, boundary_start, cutoff)
                report.boundary_seconds = time.perf_counter() - started
                log.info("%s %d row(s) of %s created before %s", "would delete" if dry_run else "deleted",
                         report.boundary_rows_deleted, report.boundary_partition, cutoff.isoformat())
        log.info("keys before %s: %d partition(s) %s (%s%d rows, %d bytes), %d boundary row(s)", cutoff.isoformat(),
                 len(report.dropped_partitions), "to drop" if dry_run else "dropped",
                 "" if dry_run else "about ", report.dropped_rows, report.dropped_bytes, report.boundary_rows_deleted)
        return report

    # -- export files: mark -> index -> sweep -------------------------------------------------------

    def mark_expired_exports(self, cutoff: datetime, *, dry_run: bool = False) -> MarkReport:
        """Batches starting before the cutoff and their files -> DEL_PEND (they leave the index next)."""
        report = MarkReport()
        with self.engine.connect() as conn:
            expired = db.expired_batches(conn, cutoff)
        by_config: dict[int, list[int]] = {}
        for b in expired:
            by_config.setdefault(b.config_id, []).append(b.batch_id)
        for config_id, batch_ids in sorted(by_config.items()):
            if dry_run:
                report.batches += len(batch_ids)
                report.files += sum(b.live_files for b in expired if b.config_id == config_id)
                report.configs.append(config_id)
                continue
            with self.engine.begin() as conn:
                # The index lock first: an index being written now finishes before files change state,
                # and any index written after this commit leaves these files out.
                export_db.lock_index(conn, config_id)
                for batch_id in sorted(batch_ids):
                    export_db.lock_batch(conn, batch_id)
                batches, files = db.mark_batches(conn, batch_ids)
            report.batches += batches
            report.files += files
            report.configs.append(config_id)
            log.info("export config %d: marked %d batch(es) and %d file(s) DEL_PEND (start before %s)", config_id,
                     batches, files, cutoff.isoformat())
        log.info("marked %d batch(es), %d file(s) for deletion in %d config(s)%s", report.batches, report.files,
                 len(report.configs), " (dry run)" if dry_run else "")
        return report

    def rebuild_indexes(self, now: datetime, *, dry_run: bool = False) -> IndexReport:
        """Rewrite index.txt of every config that has files waiting to be swept (without those files)."""
        report = IndexReport()
        with self.engine.connect() as conn:
            config_ids = db.configs_with_pending_deletes(conn)
        for config_id in config_ids:
            if dry_run:
                with self.engine.connect() as conn:
                    report.configs[config_id] = len(export_db.index_filenames(conn, config_id, self._index_since(now)))
                continue
            report.configs[config_id] = len(write_index(self.engine, self.blobstore, config_id, self._index_since(now)))
        log.info("rebuilt %d index(es)%s", len(report.configs), " (dry run)" if dry_run else "")
        return report

    def sweep_exports(self, now: datetime, *, dry_run: bool = False) -> SweepReport:
        """Delete the blobs and rows of DEL_PEND files (a missing blob is fine); finished batches -> DELETED.

        Before deleting, the config's current index.txt is read back: if it still names a file about to
        go (the index step failed or another writer raced), the index is rewritten first.

        A blob that cannot be deleted keeps its row (DEL_PEND) and its batch; the others are swept and committed,
        every config is still visited, and the call then raises RetentionError naming the failures, so a retry
        only has the failed blobs left to do (one transient error must not undo the progress of a whole config).
        """
        report = SweepReport()
        failures: list[str] = []
        with self.engine.connect() as conn:
            config_ids = db.configs_with_pending_deletes(conn)
        for config_id in config_ids:
            with self.engine.begin() as conn:
                export_db.lock_index(conn, config_id)
                cfg = export_db.get_export_config(conn, config_id=config_id)
                files = db.pending_files(conn, config_id)
                if dry_run:
                    report.blobs_deleted += len(files)
                    report.file_rows_deleted += len(files)
                    continue
                going = {f.filename for f in files}
                if going & set(self._read_index(cfg.bucket_name, cfg.filename_root)):
                    write_index_on(conn, self.blobstore, config_id, self._index_since(now))
                    report.indexes_rewritten += 1
                    if going & set(self._read_index(cfg.bucket_name, cfg.filename_root)):
                        raise RetentionError(f"index of export config {cfg.name!r} still names files marked for "
                                             "deletion; nothing swept")
                swept = 0
                for f in files:
                    try:
                        self.blobstore.delete(f.bucket_name, f.filename)
                    except Exception as exc:  # the row stays DEL_PEND: the next sweep tries this blob again
                        failures.append(f"{f.bucket_name}/{f.filename}: {type(exc).__name__}: {exc}")
                        log.warning("export config %r: could not delete %s/%s: %s", cfg.name, f.bucket_name,
                                    f.filename, exc)
                        continue
                    report.blobs_deleted += 1
                    db.delete_file_row(conn, f.bucket_name, f.filename)
                    report.file_rows_deleted += 1
                    swept += 1
                batches = db.finish_deleted_batches(conn, config_id, now)
                report.batches_deleted += batches
            log.info("export config %r: swept %d file(s), %d batch(es) now DELETED", cfg.name, swept, batches)
        with self.engine.connect() as conn:
            report.batch_statuses = db.batch_status_counts(conn)
        log.info("swept %d blob(s), %d file row(s); %d batch(es) DELETED; batch statuses now %s%s",
                 report.blobs_deleted, report.file_rows_deleted, report.batches_deleted, report.batch_statuses,
                 " (dry run)" if dry_run else "")
        if failures:
            more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
            raise RetentionError(f"could not delete {len(failures)} of {len(failures) + report.blobs_deleted} "
                                 f"expired blob(s), which stay marked for the next sweep: "
                                 + "; ".join(failures[:5]) + more)
        return report

    def _index_since(self, now: datetime) -> datetime:
        return now - self.settings.retention

    def _read_index(self, bucket: str, root: str) -> list[str]:
        try:
            return self.blobstore.get(bucket, index_name(root)).decode().split("\n")
        except BlobNotFound:
            return []

    # -- other key material --------------------------------------------------------------------------

    def expire_federation_state(self, cutoff: datetime, *, dry_run: bool = False) -> FederationStateReport:
        """Key bytes kept as bookkeeping by federation (EFGS upload batch boundaries) past the cutoff are cleared."""
        report = FederationStateReport()
        with self.engine.begin() as conn:
            report.efgs_batches_cleared = db.clear_efgs_key_bounds(conn, cutoff, dry_run=dry_run)
        log.info("federation state before %s: %d EFGS upload batch key range(s) cleared%s", cutoff.isoformat(),
                 report.efgs_batches_cleared, " (dry run)" if dry_run else "")
        return report

    # -- revision keys --------------------------------------------------------------------------------

    def rotate_revision_keys(self, now: datetime, *, dry_run: bool = False) -> RotationReport:
        """A new revision-token data key every ENP_REVISION_NEW_KEY_PERIOD; old ones destroyed
        ENP_REVISION_DELETE_OLD_KEY_PERIOD after their successor appeared (tokens stay readable till then)."""
        if not self.settings.revision_token_kek:
            raise RetentionError("ENP_REVISION_TOKEN_KEK is not available: cannot wrap a new revision key")
        store: Any = PgRevisionKeyStore(self.engine)
        if dry_run:
            store = _DryRunKeyStore(store)
        with self._session_lock(db.REVISION_ROTATION_LOCK):
            result = rotate_keys(store, KeyWrapper(self.settings.revision_token_kek), now,
                                 new_key_period=self.settings.revision_new_key_period,
                                 delete_old_key_period=self.settings.revision_delete_old_key_period)
            allowed = len(store.list_allowed())
        report = RotationReport(created=result.created, destroyed=list(result.destroyed), allowed_keys=allowed)
        log.info("revision keys%s: created %s, destroyed %s, %d usable", " (dry run)" if dry_run else "",
                 result.created if result.created is not None else "none", list(result.destroyed) or "none",
                 allowed)
        return report

    # -- everything (CLI) ----------------------------------------------------------------------------

    def run(self, interval_end: datetime, now: datetime, *, dry_run: bool = False) -> dict[str, Any]:
        """All steps in the DAG's order; returns each step's report."""
        cutoff = self.cutoff(interval_end)
        return {
            "cutoff": cutoff.isoformat(),
            "dry_run": dry_run,
            "partitions": report_dict(self.ensure_partitions(now, dry_run=dry_run)),
            "exposures": report_dict(self.expire_exposures(cutoff, dry_run=dry_run)),
            "mark": report_dict(self.mark_expired_exports(cutoff, dry_run=dry_run)),
            "index": report_dict(self.rebuild_indexes(now, dry_run=dry_run)),
            "sweep": report_dict(self.sweep_exports(now, dry_run=dry_run)),
            "federation_state": report_dict(self.expire_federation_state(cutoff, dry_run=dry_run)),
            "revision_keys": report_dict(self.rotate_revision_keys(now, dry_run=dry_run)),
        }

    @contextmanager
    def _session_lock(self, key: int) -> Iterator[Connection]:
        """An autocommit connection holding a session advisory lock (one cleanup of this kind at a time)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            db.session_lock(conn, key)
            try:
                yield conn
            finally:
                db.session_unlock(conn, key)


class _DryRunKeyStore:
    """Answers like the real store but records nothing: what a rotation would do."""

    def __init__(self, store: PgRevisionKeyStore):
        self._store = store
        self._created: list[RevisionKeyRecord] = []
        self._destroyed: set[int] = set()

    def list_allowed(self) -> list[RevisionKeyRecord]:
        return [r for r in self._store.list_allowed() if r.kid not in self._destroyed] + self._created

    def insert(self, aad: bytes, wrapped_cipher: bytes, created_at: datetime) -> int:
        self._created.append(RevisionKeyRecord(kid=-1, aad=aad, wrapped_cipher=wrapped_cipher, created_at=created_at,
                                               allowed=True))
        return -1

    def destroy(self, kid: int) -> None:
        self._destroyed.add(kid)

