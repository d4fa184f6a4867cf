"""The bulk store of foreign keys (federation pulls, export imports, the EU gateway) on real Postgres.

Keys go through a staging table and one anti-join against the partitions that hold rows, under at most 256
exclusive bucket locks; publishes take the same buckets shared plus a lock per key (enpipeline/db/exposures.py).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from enpipeline.db import exposures as exposures_db
from enpipeline.federation.foreign import StoreCounts, store_foreign_keys
from enpipeline.model import REPORT_TYPE_CONFIRMED, REPORT_TYPE_NEGATIVE, Exposure
from enpipeline.timeutil import interval_number, truncate

NOW = datetime.now(UTC)
HOUR = truncate(NOW, timedelta(hours=1))


def row(key: bytes, created_at: datetime = HOUR, **values) -> Exposure:
    fields = {"transmission_risk": 2, "app_package_name": None, "regions": ["DE"], "traveler": False,
              "interval_number": interval_number(created_at) - 144, "interval_count": 144,
              "created_at": created_at, "local_provenance": False, "report_type": REPORT_TYPE_CONFIRMED,
              "sync_id": None, "sync_query_id": "q1", **values}
    return Exposure(exposure_key=key, **fields)


def staged(keys: list[bytes], created_at: datetime = HOUR) -> exposures_db.StagedRows:
    rows = exposures_db.StagedRows(sync_id=7, sync_query_id="q1")
    for k in keys:
        rows.add_foreign(k, 2, ("DE",), False, interval_number(created_at) - 144, 144, created_at,
                         REPORT_TYPE_CONFIRMED, None)
    return rows


def store(engine: Engine, primary, revised=()) -> StoreCounts:
    exposures_db.PartitionGuard(engine).ensure(
        primary.created_ats() if isinstance(primary, exposures_db.StagedRows) else [e.created_at for e in primary])
    with engine.begin() as conn:
        return store_foreign_keys(conn, primary, list(revised), same_source=lambda e: e.sync_query_id == "q1",
                                  revised_at=HOUR)


def stored_keys(engine: Engine) -> list[bytes]:
    with engine.connect() as conn:
        return [bytes(k) for k in conn.execute(sa.text("SELECT exposure_key FROM exposure")).scalars()]


def test_the_first_store_into_an_empty_table_inserts_everything_once(engine):
    keys = [os.urandom(16) for _ in range(300)]
    counts = store(engine, staged(keys + keys[:10]))
    assert (counts.inserted, counts.skipped) == (300, 10)
    assert sorted(stored_keys(engine)) == sorted(keys)


def test_keys_stored_in_any_partition_are_found_and_skipped(engine):
    days = [HOUR - timedelta(days=d) for d in (12, 5, 0)]
    old = {d: [os.urandom(16) for _ in range(3)] for d in days}
    for d, keys in old.items():
        assert store(engine, [row(k, d) for k in keys]).inserted == 3
    fresh = [os.urandom(16) for _ in range(100)]
    again = [k for keys in old.values() for k in keys]
    counts = store(engine, staged(fresh + again))
    assert (counts.inserted, counts.skipped) == (100, 9)
    assert sorted(stored_keys(engine)) == sorted(fresh + again)


def test_keys_a_publish_stored_are_skipped_and_revoked_keys_never_stored(engine):
    local = os.urandom(16)
    exposures_db.PartitionGuard(engine).ensure([HOUR])
    with engine.begin() as conn:
        exposures_db.insert_exposures(conn, [row(local, app_package_name="com.example.app", local_provenance=True,
                                                 sync_query_id=None)])
    revoked = os.urandom(16)
    counts = store(engine, [row(local), row(revoked, report_type=REPORT_TYPE_NEGATIVE), row(os.urandom(16))])
    assert (counts.inserted, counts.skipped) == (1, 1)
    assert revoked not in stored_keys(engine) and len(stored_keys(engine)) == 2


def test_a_key_and_its_revision_in_one_batch(engine):
    key = os.urandom(16)
    counts = store(engine, staged([key]), [row(key, report_type="likely")])
    assert (counts.inserted, counts.revised, counts.skipped) == (1, 1, 0)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT revised_report_type FROM exposure")).scalar_one() == "likely"


def test_two_stores_in_one_transaction_see_each_other(engine):
    first, second = [os.urandom(16) for _ in range(5)], [os.urandom(16) for _ in range(5)]
    exposures_db.PartitionGuard(engine).ensure([HOUR])
    with engine.begin() as conn:
        a = store_foreign_keys(conn, staged(first), [], same_source=lambda e: True, revised_at=HOUR)
        b = store_foreign_keys(conn, staged(second + first), [], same_source=lambda e: True, revised_at=HOUR)
    assert (a.inserted, b.inserted, b.skipped) == (5, 5, 5)
    assert sorted(stored_keys(engine)) == sorted(first + second)


def test_a_bulk_store_holds_at_most_256_locks_however_many_keys(engine):
    """A lock per key filled Postgres' shared lock table: three pulls storing 5,000 keys each at once failed with
    "out of shared memory" (max_locks_per_transaction 64 x max_connections 100)."""
    keys = [os.urandom(16) for _ in range(10_000)]
    exposures_db.PartitionGuard(engine).ensure([HOUR])
    with engine.begin() as conn:
        counts = store_foreign_keys(conn, staged(keys), [], same_source=lambda e: True, revised_at=HOUR)
        held = conn.execute(sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                                    " AND pid = pg_backend_pid()")).scalar_one()
    assert counts.inserted == 10_000
    assert 200 < held <= 256


def test_concurrent_bulk_stores_of_5000_keys_all_succeed(engine):
    batches = [[os.urandom(16) for _ in range(5000)] for _ in range(4)]
    exposures_db.PartitionGuard(engine).ensure([HOUR])

    def one(keys: list[bytes]) -> int:
        with engine.begin() as conn:
            return store_foreign_keys(conn, staged(keys), [], same_source=lambda e: True,
                                      revised_at=HOUR).inserted

    with futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, batches)) == [5000] * 4
    assert len(stored_keys(engine)) == 20_000


@pytest.mark.parametrize("first", ["publish", "bulk"])
def test_a_key_published_and_pulled_at_once_is_stored_once(engine, first):
    """Whichever writer gets the key's bucket first stores it; the other waits for its commit and skips it."""
    key, others = os.urandom(16), [os.urandom(16) for _ in range(50)]
    exposures_db.PartitionGuard(engine).ensure([HOUR])
    holding, results = threading.Event(), {}

    def publish() -> None:
        with engine.begin() as conn:
            exposures_db.lock_keys(conn, [key])
            existing = exposures_db.read_for_update(conn, [key])
            if first == "publish":
                holding.set()
                time.sleep(0.5)
            results["publish"] = 0 if key in existing else exposures_db.insert_exposures(
                conn, [row(key, app_package_name="com.example.app", local_provenance=True, sync_query_id=None)])

    def bulk() -> None:
        with engine.begin() as conn:
            counts = store_foreign_keys(conn, staged([*others, key]), [], same_source=lambda e: True,
                                        revised_at=HOUR)
            if first == "bulk":
                holding.set()
                time.sleep(0.5)
            results["bulk"] = counts.inserted

    leader, follower = (publish, bulk) if first == "publish" else (bulk, publish)
    thread = threading.Thread(target=leader)
    thread.start()
    assert holding.wait(10)
    follower()
    thread.join(10)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM exposure WHERE exposure_key = :k"), {"k": key}
                            ).scalar_one() == 1
    # The leader stored the key; the follower found it (the bulk store still inserted its other keys).
    assert results == ({"publish": 1, "bulk": 50} if first == "publish" else {"bulk": 51, "publish": 0})


def test_staged_lines_are_the_rows_copy_lines():
    """add_foreign renders the same COPY line as the generic path for the Exposure with those values."""
    created = HOUR - timedelta(days=2)
    cases = [(("DE", "FR"), True, 3, None, REPORT_TYPE_CONFIRMED), ((), False, 0, -14, ""),
             (('we"ird', "back\\slash", "tab\tnl\n"), False, 8, 14, "likely")]
    for regions, traveler, tr, dsos, report_type in cases:
        key = os.urandom(16)
        rows = exposures_db.StagedRows(sync_id=42, sync_query_id="q\t1")
        rows.add_foreign(key, tr, regions, traveler, 2_900_000, 144, created, report_type, dsos)
        expected = exposures_db._copy_line(Exposure(
            exposure_key=key, transmission_risk=tr, app_package_name=None, regions=list(regions), traveler=traveler,
            interval_number=2_900_000, interval_count=144, created_at=created, local_provenance=False,
            report_type=report_type, days_since_symptom_onset=dsos, sync_id=42, sync_query_id="q\t1"))
        assert rows.copy_text() == expected
    rows = exposures_db.StagedRows(export_import_id=3, import_file_id=9)
    rows.add_foreign(key, 1, ("DE",), False, 1, 1, created, "", None)
    assert rows.copy_text() == exposures_db._copy_line(Exposure(
        exposure_key=key, transmission_risk=1, app_package_name=None, regions=["DE"], traveler=False,
        interval_number=1, interval_count=1, created_at=created, local_provenance=False, export_import_id=3,
        import_file_id=9))
