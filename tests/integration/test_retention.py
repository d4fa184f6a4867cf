"""Retention cleanup on real Postgres: UTC day partitions, the boundary day, mark -> index -> sweep of export
files (with the index checked after every blob operation), batch statuses, revision-key rotation, dry runs."""

from __future__ import annotations

import base64
import json
import os
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from enpipeline.blobstore import MemoryBlobstore
from enpipeline.config import ConfigError, load_settings
from enpipeline.db import export as export_db
from enpipeline.db import exposures as exposures_db
from enpipeline.db import retention as retention_db
from enpipeline.db.admin import scratch_database
from enpipeline.db.engine import make_engine
from enpipeline.db.migrate import migrate
from enpipeline.db.revision_keys import PgRevisionKeyStore
from enpipeline.export import format as fmt
from enpipeline.export.pipeline import ExportPipeline, ShardTask
from enpipeline.export.signing import FilesystemKeyManager
from enpipeline.model import Exposure, RevisableKey
from enpipeline.retention import RetentionCleaner, RetentionError, retention_cutoff
from enpipeline.revision import KeyWrapper, RevisionTokenCodec, RevisionTokenError
from enpipeline.timeutil import interval_number

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
# A fixed past calendar far from the real clock, so the partitions migrate makes around today are never involved.
T0 = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture
def own_engine(server_url):
    """A database of its own: these tests drop partitions, which other tests' fixtures rely on."""
    with scratch_database(server_url, "enp_retention") as url:
        engine = make_engine(url)
        migrate(engine, now=datetime.now(UTC), retention=timedelta(days=14), days_ahead=3)
        yield engine
        engine.dispose()


@pytest.fixture
def cleaner(own_engine, settings):
    return RetentionCleaner(settings.replace(database_url=""), own_engine, MemoryBlobstore())


def exposure(created_at: datetime, **extra) -> Exposure:
    start = interval_number(datetime(created_at.year, created_at.month, created_at.day, tzinfo=UTC)) - 144
    return Exposure(exposure_key=os.urandom(16), transmission_risk=2, app_package_name="com.example.test",
                    regions=["US"], traveler=False, interval_number=start, interval_count=144,
                    created_at=created_at, report_type="confirmed", days_since_symptom_onset=0, **extra)


def insert(engine, rows: list[Exposure]) -> None:
    exposures_db.PartitionGuard(engine).ensure(r.created_at for r in rows)
    with engine.begin() as conn:
        exposures_db.insert_exposures(conn, rows)


def created_ats(engine) -> list[datetime]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT created_at FROM exposure ORDER BY created_at")).scalars())


def partition_days(engine) -> list[str]:
    with engine.connect() as conn:
        return [p.name for p in retention_db.list_partitions(conn)]


def edge_rows(first_day: datetime, days: int) -> list[Exposure]:
    """Per UTC day: its first microsecond, noon, and its last microsecond."""
    rows = []
    for d in range(days):
        start = first_day + d * DAY
        rows += [exposure(start), exposure(start + 12 * HOUR), exposure(start + DAY - timedelta(microseconds=1))]
    return rows


# -- cutoff and the minimum-retention guard ----------------------------------------------------------

def test_cutoff_is_interval_end_minus_retention_in_utc():
    end = datetime(2026, 6, 20, 2, 0, tzinfo=timezone(timedelta(hours=2)))  # = 2026-06-20T00:00Z
    assert retention_cutoff(end, timedelta(days=14)) == datetime(2026, 6, 6, tzinfo=UTC)
    assert retention_cutoff(end, timedelta(days=14)).tzinfo == UTC


def test_minimum_retention_is_enforced_unless_overridden():
    end = T0 + 20 * DAY
    with pytest.raises(RetentionError, match="less than the configured minimum 10d"):
        retention_cutoff(end, timedelta(days=9, hours=23))
    assert retention_cutoff(end, timedelta(days=10)) == end - timedelta(days=10)
    assert retention_cutoff(end, timedelta(hours=1), allow_short=True) == end - HOUR
    with pytest.raises(RetentionError, match="positive"):
        retention_cutoff(end, timedelta(0), allow_short=True)

    with pytest.raises(ConfigError, match="ENP_RETENTION 9 days, 0:00:00 is less than the minimum 10d"):
        load_settings({"ENP_RETENTION": "9d"}, require_database=False)
    settings = load_settings({"ENP_RETENTION": "1h", "ENP_DEBUG_OVERRIDE_CLEANUP_MIN_DURATION": "true"},
                             require_database=False)
    assert settings.retention == HOUR


def test_cleaner_refuses_a_short_retention_without_the_override(cleaner):
    short = RetentionCleaner(cleaner.settings.replace(retention=timedelta(days=3)), cleaner.engine, cleaner.blobstore)
    with pytest.raises(RetentionError, match="minimum"):
        short.run(T0 + 20 * DAY, T0 + 20 * DAY)


# -- exposure partitions -----------------------------------------------------------------------------

def test_whole_days_before_a_midnight_cutoff_are_dropped_and_the_rest_untouched(own_engine, cleaner):
    rows = edge_rows(T0, 16)  # days T0 .. T0+15
    insert(own_engine, rows)
    cutoff = cleaner.cutoff(T0 + 16 * DAY)  # = T0 + 2 days, midnight UTC
    assert cutoff == T0 + 2 * DAY

    report = cleaner.expire_exposures(cutoff)

    assert report.dropped_partitions == ["exposure_p20260601", "exposure_p20260602"]
    assert report.boundary_partition is None and report.boundary_rows_deleted == 0
    left = created_ats(own_engine)
    assert left == sorted(r.created_at for r in rows if r.created_at >= cutoff)
    assert left[0] == cutoff  # the cutoff's own first microsecond stays
    assert "exposure_p20260602" not in partition_days(own_engine)
    assert "exposure_p20260603" in partition_days(own_engine)

    again = cleaner.expire_exposures(cutoff)  # idempotent: nothing left to do, nothing fails
    assert again.dropped_partitions == [] and again.boundary_rows_deleted == 0
    assert created_ats(own_engine) == left


def test_a_mid_day_cutoff_deletes_only_the_older_rows_of_the_boundary_day(own_engine, cleaner):
    rows = edge_rows(T0, 4)
    insert(own_engine, rows)
    cutoff = T0 + 2 * DAY + 12 * HOUR  # noon of the third day
    report = cleaner.expire_exposures(cutoff)
    assert report.dropped_partitions == ["exposure_p20260601", "exposure_p20260602"]
    assert report.boundary_partition == "exposure_p20260603"
    assert report.boundary_rows_deleted == 1  # the third day's first microsecond; its noon row == cutoff stays
    assert created_ats(own_engine) == sorted(r.created_at for r in rows if r.created_at >= cutoff)


def test_a_dry_run_counts_exactly_and_changes_nothing(own_engine, cleaner):
    rows = edge_rows(T0, 4)
    insert(own_engine, rows)
    cutoff = T0 + 2 * DAY + 12 * HOUR
    before = (created_ats(own_engine), partition_days(own_engine))
    dry = cleaner.expire_exposures(cutoff, dry_run=True)
    assert (created_ats(own_engine), partition_days(own_engine)) == before
    assert dry.dropped_rows == 6 and dry.dropped_rows_exact and dry.boundary_rows_deleted == 1
    real = cleaner.expire_exposures(cutoff)
    assert real.dropped_partitions == dry.dropped_partitions
    assert real.boundary_rows_deleted == dry.boundary_rows_deleted


def test_a_cleanup_interrupted_after_detaching_finishes_on_the_next_run(own_engine, cleaner):
    insert(own_engine, edge_rows(T0, 3))
    with own_engine.begin() as conn:  # as if the process died between DETACH and DROP
        conn.execute(sa.text("ALTER TABLE exposure DETACH PARTITION exposure_p20260601"))
    assert "exposure_p20260601" in partition_days(own_engine)  # a loose table now, found by name
    report = cleaner.expire_exposures(T0 + 2 * DAY)
    assert report.dropped_partitions == ["exposure_p20260601", "exposure_p20260602"]
    with own_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('exposure_p20260601')")).scalar() is None


def test_a_concurrent_detach_left_pending_is_finalized(own_engine, cleaner):
    insert(own_engine, edge_rows(T0, 3))
    # A reader holding a snapshot makes DETACH ... CONCURRENTLY wait in its second phase; cancelling it
    # there leaves the partition "detach pending", as a killed cleanup would.
    reader = own_engine.connect()
    reader.execute(sa.text("SELECT count(*) FROM exposure"))
    detacher = own_engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    detacher.execute(sa.text("SET statement_timeout = '300ms'"))
    with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
        detacher.execute(sa.text("ALTER TABLE exposure DETACH PARTITION exposure_p20260601 CONCURRENTLY"))
    detacher.close()
    reader.rollback()
    reader.close()
    with own_engine.connect() as conn:
        pending = [p for p in retention_db.list_partitions(conn) if p.detach_pending]
    assert [p.name for p in pending] == ["exposure_p20260601"]

    report = cleaner.expire_exposures(T0 + 2 * DAY)
    assert report.dropped_partitions == ["exposure_p20260601", "exposure_p20260602"]
    assert [t.date() for t in created_ats(own_engine)] == [(T0 + 2 * DAY).date()] * 3


def test_publishes_keep_flowing_while_partitions_are_dropped(own_engine, cleaner):
    """Detaching CONCURRENTLY never takes an exclusive lock on exposure: inserts into today's partition
    proceed while old days are dropped."""
    today = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    insert(own_engine, edge_rows(T0, 6))
    stop = threading.Event()
    inserted: list[int] = []
    errors: list[BaseException] = []

    def publisher():
        try:
            while not stop.is_set():
                insert(own_engine, [exposure(today)])
                inserted.append(1)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        report = cleaner.expire_exposures(T0 + 5 * DAY)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert len(report.dropped_partitions) == 5
    with own_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM exposure WHERE created_at >= :t"),
                            {"t": today}).scalar_one() == len(inserted) > 0


def test_partitions_are_made_ahead(own_engine, cleaner):
    now = T0 + 40 * DAY + 5 * HOUR
    dry = cleaner.ensure_partitions(now, dry_run=True)
    assert dry.days == [(now + n * DAY).date().isoformat() for n in range(4)]
    assert not {f"exposure_p{(now + n * DAY):%Y%m%d}" for n in range(4)} & set(partition_days(own_engine))
    made = cleaner.ensure_partitions(now)
    assert made.created == 4
    assert {f"exposure_p{(now + n * DAY):%Y%m%d}" for n in range(4)} <= set(partition_days(own_engine))
    assert cleaner.ensure_partitions(now).created == 0


# -- export files: mark -> index -> sweep --------------------------------------------------------------

class CheckedBlobstore(MemoryBlobstore):
    """A store that checks the index invariant at every write and delete: index.txt never names a missing
    object, and an object is never deleted while an index names it."""

    def __init__(self):
        super().__init__()
        self.deleted: list[str] = []

    def _indexes(self, bucket):
        return {n: self.get(bucket, n).decode().split("\n") for n in self.list(bucket) if n.endswith("/index.txt")}

    def create(self, bucket, name, data, *, content_type, cacheable):
        super().create(bucket, name, data, content_type=content_type, cacheable=cacheable)
        if name.endswith("/index.txt"):
            named = [n for n in data.decode().split("\n") if n]
            missing = [n for n in named if not self.exists(bucket, n)]
            assert not missing, f"index {name} names missing objects {missing}"

    def delete(self, bucket, name):
        for index, names in self._indexes(bucket).items():
            assert name not in names, f"deleting {name} while {index} names it"
        self.deleted.append(name)
        super().delete(bucket, name)


@pytest.fixture
def exports(own_engine, settings, tmp_path):
    keys = FilesystemKeyManager(tmp_path / "keys")
    blobs = CheckedBlobstore()
    s = settings.replace(database_url="", export_min_window_age=2 * HOUR, export_min_records=10)
    pipeline = ExportPipeline(s, own_engine, blobs, keys)
    ref = keys.create_signing_key("us-v1")
    with own_engine.begin() as conn:
        sig_id = export_db.add_signature_info(conn, name="us-v1", signing_key=ref, key_id="310", key_version="v1",
                                              algorithm=fmt.ALGORITHM_ECDSA_P256_SHA256,
                                              from_timestamp=T0 - 30 * DAY, thru_timestamp=None, now=T0)
        for name, period in (("us", 86400), ("us-hourly", 3 * 3600)):
            export_db.add_export_config(conn, export_db.ExportConfigRow(
                config_id=0, name=name, bucket_name="exports", filename_root=f"exposureKeyExport-{name}",
                period_seconds=period, output_region="US", input_regions=(), include_travelers=False,
                only_non_travelers=False, exclude_regions=(), max_records_override=3,
                signature_info_ids=(sig_id,), from_timestamp=T0 - 30 * DAY, thru_timestamp=None, disabled=False))
    return {"pipeline": pipeline, "blobs": blobs, "cleaner": RetentionCleaner(s, own_engine, blobs),
            "engine": own_engine}


def export_days(env, days: int) -> None:
    """Keys over `days` days from T0, exported day by day as the hourly DAG would have (now = each window's end)."""
    insert(env["engine"], [exposure(T0 + d * DAY + h * HOUR) for d in range(days) for h in range(0, 24, 2)])
    for d in range(days):
        end = T0 + (d + 1) * DAY
        now = end + 3 * HOUR
        result = env["pipeline"].plan_interval(end - DAY + 2 * HOUR, end + 2 * HOUR, now)
        assert not result.failures
        for task in result.tasks:
            env["pipeline"].export_shard(task, now)
        env["pipeline"].finalize(result.batch_ids, now)


def index(env, name="us") -> list[str]:
    return [n for n in env["blobs"].get("exports", f"exposureKeyExport-{name}/index.txt").decode().split("\n") if n]


def statuses(env) -> dict[str, int]:
    with env["engine"].connect() as conn:
        return retention_db.batch_status_counts(conn)


def file_rows(env) -> dict[str, str]:
    with env["engine"].connect() as conn:
        return dict(conn.execute(sa.text("SELECT filename, status FROM export_file")).all())


def test_expired_exports_are_marked_unindexed_then_swept_and_batches_end_deleted(exports):
    env = exports
    export_days(env, 17)
    # Cleanup runs a day after the last export: the index that export wrote still names files that
    # have just expired, which is exactly when deleting blobs first would break phones.
    now = T0 + 18 * DAY
    cleaner: RetentionCleaner = env["cleaner"]
    cutoff = cleaner.cutoff(now)  # T0 + 4 days
    daily_before, hourly_before = index(env), index(env, "us-hourly")
    zips_before = [n for n in env["blobs"].list("exports") if n.endswith(".zip")]
    assert statuses(env) == {"COMPLETE": 17 + 17 * 8}

    def expired(name: str) -> bool:
        start = int(name.rsplit("/", 1)[1].split("-")[0])
        return datetime.fromtimestamp(start, UTC) < cutoff

    assert any(expired(n) for n in hourly_before)
    mark = cleaner.mark_expired_exports(cutoff)
    assert mark.batches == 4 + 4 * 8
    assert mark.files == sum(expired(n) for n in zips_before)
    assert statuses(env) == {"COMPLETE": 13 + 13 * 8, "DEL_PEND": 4 + 4 * 8}
    assert env["blobs"].deleted == []  # nothing is deleted while the old index may still name it

    cleaner.rebuild_indexes(now)
    assert index(env) == [n for n in daily_before if not expired(n)]
    assert index(env, "us-hourly") == [n for n in hourly_before if not expired(n)]

    sweep = cleaner.sweep_exports(now)
    assert sorted(env["blobs"].deleted) == sorted(n for n in zips_before if expired(n))
    assert sweep.blobs_deleted == sweep.file_rows_deleted == mark.files
    assert sweep.batches_deleted == mark.batches
    assert statuses(env) == {"COMPLETE": 13 + 13 * 8, "DELETED": 4 + 4 * 8}
    assert all(not expired(n) for n in file_rows(env))
    with env["engine"].connect() as conn:  # shard plans hold key bytes: gone with their batches
        assert conn.execute(sa.text("SELECT count(*) FROM export_shard s JOIN export_batch b USING (batch_id)"
                                    " WHERE b.status = 'DELETED'")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM export_batch WHERE status = 'DELETED'"
                                    " AND deleted_at IS NULL")).scalar_one() == 0

    # Re-running every step converges: nothing more to mark, index unchanged, nothing to sweep.
    index_now = index(env)
    assert cleaner.mark_expired_exports(cutoff).batches == 0
    assert cleaner.rebuild_indexes(now).configs == {}
    assert cleaner.sweep_exports(now).blobs_deleted == 0
    assert index(env) == index_now

    # A backfill of an expired window does not resurrect it.
    replan = env["pipeline"].plan_interval(T0 + 2 * HOUR, T0 + DAY + 2 * HOUR, now)
    assert replan.tasks == [] and replan.batch_ids == []


def test_sweep_rewrites_an_index_that_still_names_marked_files(exports):
    env = exports
    export_days(env, 16)
    now = T0 + 17 * DAY
    cleaner: RetentionCleaner = env["cleaner"]
    cleaner.mark_expired_exports(cleaner.cutoff(now))
    # The index step "failed": the hourly index written by the last export still names marked files.
    stale = set(index(env, "us-hourly"))
    sweep = cleaner.sweep_exports(now)
    assert sweep.indexes_rewritten == 1 and sweep.blobs_deleted > 0
    assert stale & set(env["blobs"].deleted)  # those files were named, and are now swept ...
    assert not set(env["blobs"].deleted) & set(index(env, "us-hourly"))  # ... after the index dropped them


def test_a_missing_blob_and_a_crash_mid_sweep_converge(exports):
    env = exports
    export_days(env, 16)
    now = T0 + 16 * DAY + 3 * HOUR
    cleaner: RetentionCleaner = env["cleaner"]
    cleaner.mark_expired_exports(cleaner.cutoff(T0 + 16 * DAY))
    cleaner.rebuild_indexes(now)
    pending = sorted(file_rows(env).items())
    doomed = [n for n, status in pending if status == "DEL_PEND"]
    env["blobs"]._objects.pop(("exports", doomed[0]))  # someone already removed it: fine

    real_delete = env["blobs"].delete
    calls = {"n": 0}

    doomed_order: list[str] = []

    def flaky(bucket, name):
        calls["n"] += 1
        doomed_order.append(name)
        if calls["n"] == 3:
            raise OSError("storage unavailable")
        real_delete(bucket, name)

    env["blobs"].delete = flaky
    with pytest.raises(RetentionError, match=r"could not delete 1 of \d+ expired blob\(s\).*storage unavailable"):
        cleaner.sweep_exports(now)
    env["blobs"].delete = real_delete
    # Only the blob that failed is still pending; the others of its config and of the other config are swept.
    assert [n for n, s in file_rows(env).items() if s == "DEL_PEND"] == [doomed_order[2]]

    sweep = cleaner.sweep_exports(now)
    assert sweep.batches_deleted > 0
    assert "DEL_PEND" not in file_rows(env).values()
    assert not any(env["blobs"].exists("exports", n) for n in doomed)
    assert "DEL_PEND" not in statuses(env) and statuses(env)["DELETED"] == 2 + 2 * 8


def test_a_file_written_after_its_batch_was_marked_does_not_come_back(exports):
    env = exports
    insert(env["engine"], [exposure(T0 + h * HOUR) for h in range(24)])
    end = T0 + DAY
    planned = env["pipeline"].plan_interval(end - DAY + 2 * HOUR, end + 2 * HOUR, end + 3 * HOUR)
    task = planned.tasks[0]
    env["cleaner"].mark_expired_exports(end + 14 * DAY)
    done = env["pipeline"].export_shard(ShardTask.from_dict(task.to_dict()), end + 3 * HOUR)
    assert done["expired"] and not [n for n in env["blobs"].list("exports") if n.endswith(".zip")]
    assert file_rows(env) == {}


# -- federation bookkeeping ------------------------------------------------------------------------

def test_efgs_upload_batch_key_ranges_are_cleared_past_the_cutoff(own_engine, cleaner):
    with own_engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO efgs_target (target_id, url, country, client_cert, tls_credentials, signing_cert,"
            " signing_credentials, created_at) VALUES ('eu', 'https://efgs.example', 'DE', 'c', 'file:a', 's',"
            " 'file:b', now())"))
        for day in (1, 5):
            start = T0 + day * DAY
            window = conn.execute(sa.text(
                "INSERT INTO efgs_push_window (target_id, window_start, window_end, key_count, batches, planned_at)"
                " VALUES ('eu', :s, :e, 2, 1, now()) RETURNING window_id"), {"s": start, "e": start + HOUR}).scalar()
            conn.execute(sa.text(
                "INSERT INTO efgs_upload_batch (window_id, batch_num, target_id, window_start, window_end, batch_tag,"
                " key_from, key_to, key_count, status, updated_at) VALUES (:w, 1, 'eu', :s, :e, :tag, :f, :t, 2,"
                " 'FAILED', now())"),
                {"w": window, "s": start, "e": start + HOUR, "tag": f"DE-{day}", "f": os.urandom(16),
                 "t": os.urandom(16)})
    cutoff = T0 + 3 * DAY
    assert cleaner.expire_federation_state(cutoff, dry_run=True).efgs_batches_cleared == 1
    assert cleaner.expire_federation_state(cutoff).efgs_batches_cleared == 1
    assert cleaner.expire_federation_state(cutoff).efgs_batches_cleared == 0
    with own_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT batch_tag, key_from IS NULL, key_to IS NULL, key_count"
                                    " FROM efgs_upload_batch ORDER BY batch_tag")).all()
    assert [tuple(r) for r in rows] == [("DE-1", True, True, 2), ("DE-5", False, False, 2)]


# -- revision keys ---------------------------------------------------------------------------------

def test_revision_key_rotation_timeline_on_postgres(own_engine, cleaner):
    store = PgRevisionKeyStore(own_engine)
    wrapper = KeyWrapper(cleaner.settings.revision_token_kek)
    ticks = {"t": 0.0}

    def clock():
        ticks["t"] += 3600  # every read is past the codec's cache period
        return ticks["t"]

    codec = RevisionTokenCodec(store, wrapper, cleaner.settings.revision_token_aad, clock=clock)
    key = RevisableKey(key=b"\x01" * 16, interval_number=2_722_000, interval_count=144)

    first = cleaner.rotate_revision_keys(T0)
    assert first.created is not None and first.destroyed == []
    token = base64.b64decode(codec.encrypt([key], T0 + HOUR))
    assert cleaner.rotate_revision_keys(T0 + 6 * DAY).created is None
    dry = cleaner.rotate_revision_keys(T0 + 7 * DAY, dry_run=True)
    assert dry.created == -1 and len(store.list_allowed()) == 1  # a dry run only says what it would do
    second = cleaner.rotate_revision_keys(T0 + 7 * DAY)
    assert second.created not in (None, first.created) and second.destroyed == []
    assert codec.decrypt(token) == [key]
    # The first key lives until its successor is 15 days old (day 22), then it is destroyed.
    assert cleaner.rotate_revision_keys(T0 + 22 * DAY - timedelta(seconds=1)).destroyed == []
    assert codec.decrypt(token) == [key]
    third = cleaner.rotate_revision_keys(T0 + 22 * DAY)
    assert third.destroyed == [first.created]
    with own_engine.connect() as conn:
        row = conn.execute(sa.text("SELECT allowed, wrapped_cipher FROM revision_key WHERE kid = :k"),
                           {"k": first.created}).one()
    assert row.allowed is False and row.wrapped_cipher is None  # the key material itself is gone
    with pytest.raises(RevisionTokenError):
        codec.decrypt(token)


# -- the whole run ---------------------------------------------------------------------------------

def test_run_reports_every_step_and_a_dry_run_predicts_it(exports):
    env = exports
    export_days(env, 16)
    now = T0 + 16 * DAY + 3 * HOUR
    cleaner: RetentionCleaner = env["cleaner"]
    before = (file_rows(env), statuses(env), partition_days(env["engine"]), created_ats(env["engine"]))
    dry = cleaner.run(T0 + 16 * DAY, now, dry_run=True)
    assert (file_rows(env), statuses(env), partition_days(env["engine"]), created_ats(env["engine"])) == before
    real = cleaner.run(T0 + 16 * DAY, now)
    assert real["cutoff"] == dry["cutoff"] == (T0 + 2 * DAY).isoformat()
    assert real["exposures"]["dropped_partitions"] == dry["exposures"]["dropped_partitions"]
    assert real["mark"]["files"] == dry["mark"]["files"] > 0
    assert real["sweep"]["blobs_deleted"] == dry["mark"]["files"]
    assert real["revision_keys"]["created"] is not None
    assert all(t >= T0 + 2 * DAY for t in created_ats(env["engine"]))


# -- CLI -------------------------------------------------------------------------------------------

def test_cleanup_run_cli_dry_run_then_real(own_engine, settings, monkeypatch, capsys, tmp_path):
    from enpipeline.cli import main

    monkeypatch.setenv("ENP_DATABASE_URL", own_engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("ENP_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("ENP_BLOBSTORE", f"file://{tmp_path / 'blobs'}")
    insert(own_engine, edge_rows(T0, 4))
    now = "2026-06-03T12:00:00Z"

    assert main(["cleanup", "run", "--dry-run", "--now", now]) == 0
    out = capsys.readouterr().out
    assert "cutoff 2026-05-20T12:00:00+00:00 (dry run: nothing changed)" in out
    assert "keys: would drop 0 partition(s)" in out
    assert len(created_ats(own_engine)) == 12

    assert main(["cleanup", "run", "--dry-run", "--now", "2026-06-17T12:00:00Z", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exposures"]["dropped_partitions"] == ["exposure_p20260601", "exposure_p20260602"]
    assert report["exposures"]["dropped_rows"] == 6 and report["exposures"]["boundary_rows_deleted"] == 1
    assert len(created_ats(own_engine)) == 12

    assert main(["cleanup", "run", "--now", "2026-06-17T12:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "keys: did drop 2 partition(s)" in out and "did delete 1 row(s) of the boundary day" in out
    assert "revision keys: created 1" in out
    assert len(created_ats(own_engine)) == 5

    monkeypatch.setenv("ENP_RETENTION", "5d")
    assert main(["cleanup", "run", "--dry-run"]) == 2
    assert "ENP_RETENTION 5 days, 0:00:00 is less than the minimum 10d" in capsys.readouterr().err
    monkeypatch.setenv("ENP_DEBUG_OVERRIDE_CLEANUP_MIN_DURATION", "true")
    assert main(["cleanup", "run", "--dry-run", "--now", "2026-06-17T12:00:00Z"]) == 0
