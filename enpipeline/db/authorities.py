"""Health authorities (certificate issuers) and their verification keys."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from enpipeline.verification import HealthAuthority, HealthAuthorityKey


def _load(conn: Connection, where: str, params: dict) -> list[HealthAuthority]:
    rows = conn.execute(sa.text(f"SELECT id, iss, aud, name, jwks_uri FROM health_authority {where} ORDER BY id"),
                        params).all()
    if not rows:
        return []
    keys: dict[int, list[HealthAuthorityKey]] = {r.id: [] for r in rows}
    key_rows = conn.execute(
        sa.text("SELECT health_authority_id, version, public_key, from_timestamp, thru_timestamp"
                " FROM health_authority_key WHERE health_authority_id = ANY(:ids)"
                " ORDER BY health_authority_id, from_timestamp, version"),
        {"ids": list(keys)},
    )
    for k in key_rows:
        keys[k.health_authority_id].append(
            HealthAuthorityKey(version=k.version, public_key_pem=k.public_key,
                               from_timestamp=k.from_timestamp, thru_timestamp=k.thru_timestamp))
    return [HealthAuthority(id=r.id, issuer=r.iss, audience=r.aud, name=r.name, keys=tuple(keys[r.id]),
                            jwks_uri=r.jwks_uri) for r in rows]


def get_by_issuer(conn: Connection, issuer: str) -> HealthAuthority | None:
    if "\x00" in issuer:
        # `iss` comes from an unverified token. Postgres text cannot hold U+0000, so no issuer matches, and
        # the driver would refuse the query with a ValueError (a 500) instead of "issuer not found".
        return None
    found = _load(conn, "WHERE iss = :iss", {"iss": issuer})
    return found[0] if found else None


def get_by_id(conn: Connection, ha_id: int) -> HealthAuthority | None:
    found = _load(conn, "WHERE id = :id", {"id": ha_id})
    return found[0] if found else None


def list_authorities(conn: Connection) -> list[HealthAuthority]:
    return _load(conn, "", {})


def list_jwks_authorities(conn: Connection) -> list[HealthAuthority]:
    """Health authorities whose keys come from a JWKS document (an empty jwks_uri means none, as in the reference)."""
    return _load(conn, "WHERE jwks_uri IS NOT NULL AND jwks_uri <> ''", {})


def lock_authority_keys(conn: Connection, ha_id: int) -> None:
    """Serialise changes to one authority's keys across processes until the transaction ends.

    Two JWKS syncs that overlap would otherwise both see a key as new and collide on its version.
    """
    # Two-int form keeps the lock apart from other advisory-lock users; ids past 2**31 only share a lock.
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('enp_ha_keys'), CAST(:id % 2147483648 AS INTEGER))"),
                 {"id": ha_id})


def add_authority(conn: Connection, *, issuer: str, audience: str, name: str, jwks_uri: str | None = None) -> int:
    return conn.execute(
        sa.text("INSERT INTO health_authority (iss, aud, name, jwks_uri) VALUES (:iss, :aud, :name, :jwks)"
                " RETURNING id"),
        {"iss": issuer, "aud": audience, "name": name, "jwks": jwks_uri},
    ).scalar_one()


def add_key(conn: Connection, ha_id: int, *, version: str, public_key_pem: str, from_timestamp: datetime,
            thru_timestamp: datetime | None = None) -> None:
    conn.execute(
        sa.text("INSERT INTO health_authority_key (health_authority_id, version, public_key, from_timestamp,"
                " thru_timestamp) VALUES (:id, :v, :pk, :f, :t)"),
        {"id": ha_id, "v": version, "pk": public_key_pem, "f": from_timestamp, "t": thru_timestamp},
    )


def revoke_key(conn: Connection, ha_id: int, version: str, at: datetime) -> bool:
    result = conn.execute(
        sa.text("UPDATE health_authority_key SET thru_timestamp = :at WHERE health_authority_id = :id"
                " AND version = :v AND (thru_timestamp IS NULL OR thru_timestamp > :at)"),
        {"id": ha_id, "v": version, "at": at},
    )
    return result.rowcount > 0


def restore_key(conn: Connection, ha_id: int, version: str) -> bool:
    """Make a revoked key open-ended again (its from_timestamp is kept)."""
    result = conn.execute(
        sa.text("UPDATE health_authority_key SET thru_timestamp = NULL WHERE health_authority_id = :id"
                " AND version = :v AND thru_timestamp IS NOT NULL"),
        {"id": ha_id, "v": version},
    )
    return result.rowcount > 0


def remove_key(conn: Connection, ha_id: int, version: str) -> bool:
    result = conn.execute(
        sa.text("DELETE FROM health_authority_key WHERE health_authority_id = :id AND version = :v"),
        {"id": ha_id, "v": version},
    )
    return result.rowcount > 0


def remove_authority(conn: Connection, ha_id: int) -> bool:
    result = conn.execute(sa.text("DELETE FROM health_authority WHERE id = :id"), {"id": ha_id})
    return result.rowcount > 0


class DbHealthAuthorityLookup:
    """HealthAuthorityLookup backed by Postgres (wrap it in the verification cache)."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def get_by_issuer(self, issuer: str) -> HealthAuthority | None:
        with self._engine.connect() as conn:
            return get_by_issuer(conn, issuer)
