"""Postgres store for the data keys that encrypt revision tokens."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from enpipeline.revision import RevisionKeyRecord


class PgRevisionKeyStore:
    """RevisionKeyStore on the ``revision_key`` table."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def list_allowed(self) -> list[RevisionKeyRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT kid, aad, wrapped_cipher, created_at, allowed FROM revision_key"
                " WHERE allowed ORDER BY created_at DESC, kid DESC"))
            return [RevisionKeyRecord(kid=r.kid, aad=bytes(r.aad) if r.aad is not None else None,
                                      wrapped_cipher=bytes(r.wrapped_cipher) if r.wrapped_cipher is not None else None,
                                      created_at=r.created_at, allowed=r.allowed) for r in rows]

    def insert(self, aad: bytes, wrapped_cipher: bytes, created_at: datetime) -> int:
        with self._engine.begin() as conn:
            return conn.execute(
                sa.text("INSERT INTO revision_key (aad, wrapped_cipher, created_at, allowed)"
                        " VALUES (:aad, :wc, :at, true) RETURNING kid"),
                {"aad": aad, "wc": wrapped_cipher, "at": created_at},
            ).scalar_one()

    def destroy(self, kid: int) -> None:
        with self._engine.begin() as conn:
            conn.execute(sa.text("UPDATE revision_key SET wrapped_cipher = NULL, aad = NULL, allowed = false"
                                 " WHERE kid = :kid"), {"kid": kid})
