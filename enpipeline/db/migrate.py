"""Apply the numbered ``sql/NNNN_*.sql`` migrations once each, safely from several processes at once."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

# Session-level advisory lock that serialises concurrent `enpipeline db migrate` runs.
_MIGRATE_LOCK = 0x656E705F6D6967  # "enp_mig"


def sql_dir() -> Path:
    """The migrations folder: ENP_SQL_DIR, the source checkout, or the installed data files."""
    if os.environ.get("ENP_SQL_DIR"):
        return Path(os.environ["ENP_SQL_DIR"])
    checkout = Path(__file__).resolve().parents[2] / "sql"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "enpipeline" / "sql"


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    found = sorted(p for p in directory.glob("*.sql") if p.name[:4].isdigit())
    if not found:
        raise FileNotFoundError(f"no migrations found in {directory}")
    return [Migration(p.stem, p) for p in found]


def applied_versions(conn: Connection) -> set[str]:
    exists = conn.execute(sa.text("SELECT to_regclass('schema_migrations') IS NOT NULL")).scalar_one()
    if not exists:
        return set()
    return set(conn.execute(sa.text("SELECT version FROM schema_migrations")).scalars())


def migrate(engine: Engine, *, now: datetime, retention: timedelta, days_ahead: int,
            directory: Path | None = None) -> list[str]:
    """Apply pending migrations in order, then make sure exposure partitions cover the live window.

    Returns the versions applied by this call (empty when already up to date).
    """
    migrations = discover(directory)
    applied_now: list[str] = []
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATE_LOCK})
        conn.commit()
        try:
            conn.execute(sa.text(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"))
            conn.commit()
            done = applied_versions(conn)
            conn.commit()
            for migration in migrations:
                if migration.version in done:
                    continue
                log.info("applying migration %s", migration.version)
                # Raw DBAPI cursor: migration files contain '%' (format()) that must not be
                # treated as bind parameters.
                with conn.begin():
                    cursor = conn.connection.driver_connection.cursor()
                    cursor.execute(migration.path.read_text())
                    cursor.close()
                    conn.execute(sa.text("INSERT INTO schema_migrations (version) VALUES (:v)"),
                                 {"v": migration.version})
                applied_now.append(migration.version)
            with conn.begin():
                ensure_partitions(conn, now.date() - retention - timedelta(days=1),
                                  now.date() + timedelta(days=days_ahead))
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATE_LOCK})
            conn.commit()
    return applied_now


def ensure_partitions(conn: Connection, from_day: date, to_day: date) -> int:
    """Create any missing daily exposure partitions in [from_day, to_day]; returns how many."""
    return conn.execute(
        sa.text("SELECT enp_ensure_exposure_partitions(:f, :t)"), {"f": from_day, "t": to_day}
    ).scalar_one()


def pending(engine: Engine, directory: Path | None = None) -> list[str]:
    with engine.connect() as conn:
        done = applied_versions(conn)
    return [m.version for m in discover(directory) if m.version not in done]
