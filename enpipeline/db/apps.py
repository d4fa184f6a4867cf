"""Authorized apps: which health authorities may sign for an app and which regions it writes."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from enpipeline.model import AuthorizedApp

_COLUMNS = ("app_package_name, allowed_regions, allowed_health_authority_ids, "
            "bypass_health_authority_verification, bypass_revision_token")


def _row_to_app(row: sa.Row) -> AuthorizedApp:
    return AuthorizedApp(
        app_package_name=row.app_package_name,
        allowed_regions=tuple(row.allowed_regions or ()),
        allowed_health_authority_ids=tuple(row.allowed_health_authority_ids or ()),
        bypass_health_authority_verification=row.bypass_health_authority_verification,
        bypass_revision_token=row.bypass_revision_token,
    )


def get_app(conn: Connection, name: str) -> AuthorizedApp | None:
    if "\x00" in name:
        # The name comes straight from a publish request. Postgres text cannot hold U+0000, so no app has
        # it, and the driver would refuse the query with a ValueError (a 500) instead of "unknown app".
        return None
    row = conn.execute(sa.text(f"SELECT {_COLUMNS} FROM authorized_app WHERE app_package_name = :n"),
                       {"n": name.lower()}).first()
    return _row_to_app(row) if row else None


def list_apps(conn: Connection) -> list[AuthorizedApp]:
    rows = conn.execute(sa.text(f"SELECT {_COLUMNS} FROM authorized_app ORDER BY app_package_name"))
    return [_row_to_app(r) for r in rows]


def upsert_app(conn: Connection, app: AuthorizedApp) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO authorized_app (app_package_name, allowed_regions, allowed_health_authority_ids,"
            " bypass_health_authority_verification, bypass_revision_token)"
            " VALUES (:n, :r, :h, :bv, :br)"
            " ON CONFLICT (app_package_name) DO UPDATE SET allowed_regions = EXCLUDED.allowed_regions,"
            " allowed_health_authority_ids = EXCLUDED.allowed_health_authority_ids,"
            " bypass_health_authority_verification = EXCLUDED.bypass_health_authority_verification,"
            " bypass_revision_token = EXCLUDED.bypass_revision_token"
        ),
        {
            "n": app.app_package_name.lower(),
            "r": [r.upper() for r in app.allowed_regions],
            "h": list(app.allowed_health_authority_ids),
            "bv": app.bypass_health_authority_verification,
            "br": app.bypass_revision_token,
        },
    )


def delete_app(conn: Connection, name: str) -> bool:
    result = conn.execute(sa.text("DELETE FROM authorized_app WHERE app_package_name = :n"), {"n": name.lower()})
    return result.rowcount > 0
