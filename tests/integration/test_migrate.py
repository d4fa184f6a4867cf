"""Migrations on real Postgres: idempotent, recorded, safe to run concurrently, partitions by UTC day."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa

from enpipeline.db import migrate as migrate_mod
from enpipeline.db.engine import make_engine


def _partitions(engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'exposure'::regclass ORDER BY 1"))
        return [(r[0], r[1]) for r in rows]


def test_migrate_applies_once_and_records_versions(empty_database_url):
    engine = make_engine(empty_database_url)
    now = datetime(2026, 3, 10, 12, tzinfo=UTC)
    first = migrate_mod.migrate(engine, now=now, retention=timedelta(days=14), days_ahead=3)
    assert first == [m.version for m in migrate_mod.discover()]
    second = migrate_mod.migrate(engine, now=now, retention=timedelta(days=14), days_ahead=3)
    assert second == []
    with engine.connect() as conn:
        recorded = conn.execute(sa.text("SELECT version FROM schema_migrations ORDER BY 1")).scalars().all()
    assert recorded == first
    assert migrate_mod.pending(engine) == []
    engine.dispose()


def test_partitions_cover_retention_and_days_ahead_on_utc_boundaries(empty_database_url):
    engine = make_engine(empty_database_url)
    now = datetime(2026, 3, 10, 23, 59, tzinfo=UTC)
    migrate_mod.migrate(engine, now=now, retention=timedelta(days=14), days_ahead=3)
    parts = dict(_partitions(engine))
    first_day, last_day = date(2026, 2, 23), date(2026, 3, 13)
    expected = {f"exposure_p{(first_day + timedelta(days=i)):%Y%m%d}"
                for i in range((last_day - first_day).days + 1)}
    assert set(parts) == expected
    bound = parts["exposure_p20260310"]
    assert "2026-03-10 00:00:00+00" in bound and "2026-03-11 00:00:00+00" in bound
    # A row at 23:59:59.999 UTC belongs to its own day, 00:00 UTC to the next.
    with engine.begin() as conn:
        conn.execute(sa.text("SET TIME ZONE 'America/Los_Angeles'"))  # session time zone must not matter
        for ts in ("2026-03-10T23:59:59.999+00:00", "2026-03-11T00:00:00+00:00"):
            conn.execute(sa.text(
                "INSERT INTO exposure (exposure_key, transmission_risk, interval_number, interval_count, created_at)"
                " VALUES (:k, 0, 1, 144, :t)"), {"k": bytes(16) if ts.startswith("2026-03-10T") else b"\x01" * 16,
                                                  "t": ts})
        rows = conn.execute(sa.text("SELECT tableoid::regclass::text, created_at FROM exposure ORDER BY 2")).all()
    assert [r[0] for r in rows] == ["exposure_p20260310", "exposure_p20260311"]
    engine.dispose()


def test_ensure_partitions_is_idempotent_and_counts_created(empty_database_url):
    engine = make_engine(empty_database_url)
    now = datetime(2026, 3, 10, 12, tzinfo=UTC)
    migrate_mod.migrate(engine, now=now, retention=timedelta(days=14), days_ahead=1)
    with engine.begin() as conn:
        assert migrate_mod.ensure_partitions(conn, date(2026, 3, 10), date(2026, 3, 14)) == 3
    with engine.begin() as conn:
        assert migrate_mod.ensure_partitions(conn, date(2026, 3, 10), date(2026, 3, 14)) == 0
    engine.dispose()


def test_concurrent_migrate_from_several_processes(empty_database_url):
    code = (
        "import sys; from datetime import UTC, datetime, timedelta;"
        "from enpipeline.db.engine import make_engine; from enpipeline.db.migrate import migrate;"
        "e = make_engine(sys.argv[1]);"
        "print(len(migrate(e, now=datetime.now(UTC), retention=timedelta(days=14), days_ahead=3)))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, empty_database_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-500:] for r in results]
    applied_counts = sorted(int(r[0].strip()) for r in results)
    # Exactly one process applied the migrations; the others found them done.
    assert applied_counts == [0, 0, 0, len(migrate_mod.discover())]
    engine = make_engine(empty_database_url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM schema_migrations")).scalar_one()
    assert n == len(migrate_mod.discover())
    engine.dispose()


def test_exposure_table_is_partitioned_by_created_at(engine):
    with engine.connect() as conn:
        strategy, column = conn.execute(sa.text(
            "SELECT p.partstrat, a.attname FROM pg_partitioned_table p JOIN pg_attribute a"
            " ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]"
            " WHERE p.partrelid = 'exposure'::regclass")).one()
    assert (strategy, column) == ("r", "created_at")
