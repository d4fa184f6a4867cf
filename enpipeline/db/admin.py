"""Creating and dropping whole databases (scratch databases for tests and benchmarks)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from enpipeline.db.engine import normalize_url


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead."""
    return sa.engine.make_url(normalize_url(url)).set(database=name).render_as_string(hide_password=False)


@contextmanager
def scratch_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new empty database ``<prefix>_<random>`` on ``server_url``'s server, dropped on exit."""
    name = f"{prefix}_{secrets.token_hex(5)}"
    admin = sa.create_engine(normalize_url(server_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        # template0: template1 may be in use by another session, which makes CREATE DATABASE fail.
        conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
    try:
        yield with_database(server_url, name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
