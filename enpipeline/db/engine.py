"""Engine construction for Postgres through SQLAlchemy Core and psycopg2."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url


def normalize_url(url: str) -> str:
    """Accept ``postgres://`` and ``postgresql://`` URLs and pin the psycopg2 driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, pool_size: int = 10, max_overflow: int = 10,
                connect_timeout: timedelta = timedelta(seconds=10), application_name: str = "enpipeline") -> Engine:
    return sa.create_engine(
        normalize_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        # Connections are recycled so a failed-over database is picked up without a restart.
        pool_recycle=300,
        connect_args={
            "connect_timeout": max(1, int(connect_timeout.total_seconds())),
            "application_name": application_name,
        },
    )


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means "the database cannot be reached right now", not "this statement is wrong".

    Connection refused or dropped, the server shutting down or restarting, an exhausted pool, a cancelled
    statement, a serialization failure or deadlock: all transient, all worth a retry by the caller, so the
    API answers them with 503 instead of 500. Constraint violations, bad SQL and errors raised by the
    database on purpose are not.
    """
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError
                      | sa.exc.DisconnectionError)


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
