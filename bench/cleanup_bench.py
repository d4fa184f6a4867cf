"""Retention benchmark: removing the expired days of a 16-day key table, cleanup path vs plain DELETE.

    .venv/bin/python bench/cleanup_bench.py [--rows 1000000,10000000] [--database-url URL]

For each size: a scratch database gets 16 days of synthetic keys (`enpipeline generate`), then an identical copy
is made (CREATE DATABASE ... TEMPLATE) and, in that copy, an unpartitioned table with the same rows and indexes
(the reference's shape). With ENP_RETENTION 14d and a run whose interval ends at midnight, two whole days are
expired. Timed, in the same run:

* cleanup path: `RetentionCleaner.expire_exposures` on the original (detach + drop of the day partitions);
* `DELETE FROM exposure WHERE created_at < cutoff` on the identical partitioned copy;
* the same DELETE on the unpartitioned table (what the reference runs).

Each timed operation runs after a CHECKPOINT and includes its commit. Prints one line per size and a summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from enpipeline.blobstore import MemoryBlobstore
from enpipeline.config import Settings
from enpipeline.db.admin import scratch_database, with_database
from enpipeline.db.engine import make_engine, normalize_url
from enpipeline.db.migrate import migrate
from enpipeline.generate import generate_keys
from enpipeline.retention import RetentionCleaner

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
NOW = datetime(2026, 3, 17, tzinfo=UTC)  # keys on 2026-03-01 .. 2026-03-16; cutoff 2026-03-03 00:00
DAYS = 16
RETENTION = timedelta(days=14)

FLAT_INDEXES = [
    "CREATE INDEX ON exposure_flat (exposure_key)",
    "CREATE INDEX ON exposure_flat (created_at, exposure_key)",
    "CREATE INDEX ON exposure_flat (revised_at, exposure_key) WHERE revised_at IS NOT NULL",
    "CREATE INDEX ON exposure_flat (export_import_id) WHERE export_import_id IS NOT NULL",
    "CREATE INDEX ON exposure_flat (sync_query_id) WHERE sync_query_id IS NOT NULL",
    "CREATE INDEX ON exposure_flat (created_at) WHERE app_package_name = 'export-generated'",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(engine: sa.Engine, statement: str) -> tuple[float, int]:
    with engine.connect() as conn:
        conn.execute(sa.text("CHECKPOINT"))
        conn.commit()
        started = time.perf_counter()
        rows = conn.execute(sa.text(statement)).rowcount
        conn.commit()
        return time.perf_counter() - started, rows


def count(engine: sa.Engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def run_size(server_url: str, rows: int) -> dict[str, float | int]:
    per_day = rows // DAYS
    with scratch_database(server_url, "enp_bench_cleanup") as url_a:
        engine_a = make_engine(url_a, pool_size=2, max_overflow=0)
        migrate(engine_a, now=NOW, retention=RETENTION, days_ahead=1)
        started = time.perf_counter()
        generate_keys(engine_a, days=DAYS, keys_per_day=per_day, regions=["US"], now=NOW)
        with engine_a.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE exposure"))
        log(f"  {rows:,} rows generated and analysed in {time.perf_counter() - started:.1f}s")
        engine_a.dispose()

        name_b = sa.engine.make_url(normalize_url(url_a)).database + "_copy"
        admin = sa.create_engine(normalize_url(server_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name_b}" TEMPLATE "{sa.engine.make_url(url_a).database}"'
                                 " STRATEGY FILE_COPY"))
        url_b = with_database(server_url, name_b)
        try:
            engine_b = make_engine(url_b, pool_size=2, max_overflow=0)
            started = time.perf_counter()
            with engine_b.begin() as conn:
                conn.execute(sa.text("CREATE TABLE exposure_flat (LIKE exposure INCLUDING DEFAULTS)"))
                conn.execute(sa.text("INSERT INTO exposure_flat SELECT * FROM exposure"))
                for ddl in FLAT_INDEXES:
                    conn.execute(sa.text(ddl))
            with engine_b.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text("VACUUM ANALYZE exposure_flat"))
            log(f"  identical copy and unpartitioned table ready in {time.perf_counter() - started:.1f}s")

            engine_a = make_engine(url_a, pool_size=2, max_overflow=0)
            settings = Settings(database_url=url_a, retention=RETENTION)
            cleaner = RetentionCleaner(settings, engine_a, MemoryBlobstore())
            cutoff = cleaner.cutoff(NOW)
            with engine_a.connect() as conn:
                conn.execute(sa.text("CHECKPOINT"))
                conn.commit()
            started = time.perf_counter()
            report = cleaner.expire_exposures(cutoff)
            cleanup_s = time.perf_counter() - started
            expired = per_day * len(report.dropped_partitions) + report.boundary_rows_deleted

            delete = f"DELETE FROM {{}} WHERE created_at < '{cutoff.isoformat()}'"
            partitioned_s, partitioned_rows = timed(engine_b, delete.format("exposure"))
            flat_s, flat_rows = timed(engine_b, delete.format("exposure_flat"))
            left_a, left_b, left_flat = count(engine_a, "exposure"), count(engine_b, "exposure"), \
                count(engine_b, "exposure_flat")
            assert partitioned_rows == flat_rows == expired, (partitioned_rows, flat_rows, expired)
            assert left_a == left_b == left_flat == rows - expired, (left_a, left_b, left_flat)
            engine_a.dispose()
            engine_b.dispose()
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name_b}" WITH (FORCE)'))
            admin.dispose()
    result = {"rows": per_day * DAYS, "expired": expired, "partitions": len(report.dropped_partitions),
              "cleanup_s": cleanup_s, "delete_partitioned_s": partitioned_s, "delete_flat_s": flat_s,
              "detach_s": report.detach_seconds, "drop_s": report.drop_seconds, "bytes": report.dropped_bytes}
    print(f"{result['rows']:>11,} rows, {expired:>9,} expired in {result['partitions']} day(s) "
          f"({report.dropped_bytes / 2**20:,.0f} MB): cleanup path {cleanup_s * 1000:6.1f} ms (detach "
          f"{report.detach_seconds * 1000:5.1f} ms, drop {report.drop_seconds * 1000:5.1f} ms)"
          f" | DELETE on the partitioned copy {partitioned_s * 1000:7.1f} ms"
          f" ({partitioned_s / cleanup_s:5.1f}x) | DELETE on an unpartitioned table {flat_s * 1000:9.1f} ms"
          f" ({flat_s / cleanup_s:5.1f}x)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1000000,10000000", help="comma-separated table sizes")
    parser.add_argument("--database-url", default=LOCAL_URL, help="server to create scratch databases on")
    args = parser.parse_args()
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        log(f"size {rows:,}:")
        results.append(run_size(args.database_url, rows))
    if len(results) > 1:
        small, large = results[0], results[-1]
        print(f"growth from {small['rows']:,} to {large['rows']:,} rows: cleanup path "
              f"{large['cleanup_s'] / small['cleanup_s']:.2f}x (detach {large['detach_s'] / small['detach_s']:.2f}x,"
              f" drop {large['drop_s'] / small['drop_s']:.2f}x), DELETE (partitioned) "
              f"{large['delete_partitioned_s'] / small['delete_partitioned_s']:.2f}x, DELETE (unpartitioned) "
              f"{large['delete_flat_s'] / small['delete_flat_s']:.2f}x")


if __name__ == "__main__":
    main()
