"""SQL of the Fetch server: partners allowed to pull from us, and the keyset-paged key reads it serves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from enpipeline.db.export import GENERATED_APP
from enpipeline.federation.auth import FederationAuthorization
from enpipeline.federation.cursor import Position

# --- authorizations ---------------------------------------------------------------------------------

_AUTH_COLS = ("issuer, subject, audience, partner, public_key, include_regions, exclude_regions, note,"
              " created_at")


def _authorization(row: sa.Row) -> FederationAuthorization:
    return FederationAuthorization(
        issuer=row.issuer, subject=row.subject, audience=row.audience, partner=row.partner,
        public_key_pem=row.public_key, include_regions=tuple(row.include_regions or ()),
        exclude_regions=tuple(row.exclude_regions or ()), note=row.note, created_at=row.created_at)


def _auth_params(auth: FederationAuthorization, now: datetime) -> dict:
    return {"issuer": auth.issuer, "subject": auth.subject, "audience": auth.audience, "partner": auth.partner,
            "public_key": auth.public_key_pem, "include": list(auth.include_regions),
            "exclude": list(auth.exclude_regions), "note": auth.note, "created_at": auth.created_at or now}


_INSERT_AUTH = (
    f"INSERT INTO federation_out_authorization ({_AUTH_COLS})"
    " VALUES (:issuer, :subject, :audience, :partner, :public_key, CAST(:include AS TEXT[]),"
    " CAST(:exclude AS TEXT[]), :note, :created_at)")


def add_authorization(conn: Connection, auth: FederationAuthorization, *, now: datetime) -> bool:
    """Insert unless (issuer, subject) exists; True if inserted. ``now`` is the created_at when auth has none."""
    result = conn.execute(sa.text(_INSERT_AUTH + " ON CONFLICT (issuer, subject) DO NOTHING"),
                          _auth_params(auth, now))
    return result.rowcount == 1


def upsert_authorization(conn: Connection, auth: FederationAuthorization, *, now: datetime) -> None:
    """Insert or replace every field of (issuer, subject); created_at keeps the first registration's time."""
    conn.execute(sa.text(
        _INSERT_AUTH + " ON CONFLICT (issuer, subject) DO UPDATE SET audience = EXCLUDED.audience,"
        " partner = EXCLUDED.partner, public_key = EXCLUDED.public_key,"
        " include_regions = EXCLUDED.include_regions, exclude_regions = EXCLUDED.exclude_regions,"
        " note = EXCLUDED.note"), _auth_params(auth, now))


def get_authorization(conn: Connection, issuer: str, subject: str) -> FederationAuthorization | None:
    row = conn.execute(sa.text(f"SELECT {_AUTH_COLS} FROM federation_out_authorization"
                               " WHERE issuer = :issuer AND subject = :subject"),
                       {"issuer": issuer, "subject": subject}).first()
    return _authorization(row) if row else None


def list_authorizations(conn: Connection) -> list[FederationAuthorization]:
    rows = conn.execute(sa.text(f"SELECT {_AUTH_COLS} FROM federation_out_authorization"
                                " ORDER BY partner, issuer, subject"))
    return [_authorization(r) for r in rows]


def remove_authorization(conn: Connection, issuer: str, subject: str) -> bool:
    result = conn.execute(sa.text("DELETE FROM federation_out_authorization"
                                  " WHERE issuer = :issuer AND subject = :subject"),
                          {"issuer": issuer, "subject": subject})
    return result.rowcount == 1


# --- key pages --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartnerSources:
    """Where keys that came from one partner are stored from: its pull queries and its export importers."""

    query_ids: tuple[str, ...] = ()
    importer_ids: tuple[int, ...] = ()


def partner_sources(conn: Connection, partner: str) -> PartnerSources:
    """The sources of ``partner``'s keys, so that they are never served back to it."""
    query_ids = conn.execute(sa.text("SELECT query_id FROM federation_in_query WHERE partner = :p ORDER BY 1"),
                             {"p": partner}).scalars().all()
    importer_ids = conn.execute(sa.text("SELECT id FROM export_importer WHERE partner = :p ORDER BY 1"),
                                {"p": partner}).scalars().all()
    return PartnerSources(tuple(query_ids), tuple(importer_ids))


@dataclass(frozen=True)
class KeyFilter:
    """Which keys a Fetch may see. Regions are upper case; an empty include means every region."""

    include_regions: tuple[str, ...] = ()
    exclude_regions: tuple[str, ...] = ()
    only_travelers: bool = False
    only_local_provenance: bool = False
    skip: PartnerSources = PartnerSources()


class PageRow(NamedTuple):
    """One served key with the values of its stream (the revised values for a revised key).

    A NamedTuple: a page builds thousands of them, and a frozen dataclass costs ~3 µs more each."""

    exposure_key: bytes
    transmission_risk: int
    interval_number: int
    interval_count: int
    report_type: str
    days_since_symptom_onset: int | None
    traveler: bool
    regions: tuple[str, ...]
    position: datetime          # created_at (primary) or revised_at (revised): the cursor's timestamp


# Primary keys carry their published values; revised keys their revised ones (TR falls back to the original when
# a revision did not set one).
_STREAMS = {
    "primary": ("created_at", "transmission_risk", "report_type", "days_since_symptom_onset"),
    "revised": ("revised_at", "COALESCE(revised_transmission_risk, transmission_risk)",
                "COALESCE(revised_report_type, '')", "revised_days_since_symptom_onset"),
}


def _page_statement(stream: str, filt: KeyFilter, after: Position, until: datetime,
                    limit: int) -> tuple[sa.TextClause, dict]:
    at, tr, report_type, dsos = _STREAMS[stream]
    # The row comparison and ORDER BY match the (at, exposure_key) indexes of sql/0005, so a page is a merge of
    # per-partition index range scans that stops after `limit` rows, never a sort of a whole window.
    where = [f"({at}, exposure_key) > (CAST(:after_at AS TIMESTAMPTZ), CAST(:after_key AS BYTEA))",
             f"{at} < :until",
             f"app_package_name IS DISTINCT FROM '{GENERATED_APP}'",  # export padding is never real
             # Keys from the EU gateway may only be used by the country that downloaded them (EFGS terms).
             "(sync_query_id IS NULL OR sync_query_id NOT LIKE 'efgs:%')"]
    params: dict = {"after_at": after.at, "after_key": after.key, "until": until, "limit": limit}
    if stream == "primary":
        # Implied by the row comparison, but only a plain bound lets the planner skip older day partitions.
        where.append("created_at >= CAST(:after_at AS TIMESTAMPTZ)")
    if filt.include_regions:
        # As the reference (IncludeTravelers): travelers are served whatever their regions.
        where.append("(regions && CAST(:include AS TEXT[]) OR traveler)")
        params["include"] = list(filt.include_regions)
    if filt.exclude_regions:
        where.append("NOT (regions && CAST(:exclude AS TEXT[]))")
        params["exclude"] = list(filt.exclude_regions)
    if filt.only_travelers:
        where.append("traveler")
    if filt.only_local_provenance:
        where.append("local_provenance")
    if filt.skip.query_ids:
        where.append("(sync_query_id IS NULL OR sync_query_id <> ALL(CAST(:skip_queries AS TEXT[])))")
        params["skip_queries"] = list(filt.skip.query_ids)
    if filt.skip.importer_ids:
        where.append("(export_import_id IS NULL OR export_import_id <> ALL(CAST(:skip_importers AS BIGINT[])))")
        params["skip_importers"] = list(filt.skip.importer_ids)
    sql = (f"SELECT exposure_key, {tr} AS transmission_risk, interval_number, interval_count,"
           f" {report_type} AS report_type, {dsos} AS days_since_symptom_onset, traveler, regions,"
           f" {at} AS position FROM exposure WHERE {' AND '.join(where)}"
           f" ORDER BY {at}, exposure_key LIMIT :limit")
    return sa.text(sql), params


@contextmanager
def _ordered_plan(conn: Connection) -> Iterator[None]:
    """Keep the planner on the ordered index scan for the statements inside.

    Its estimates are poor here: every bound on revised_at counts the NULL fraction again (so a backlog of
    revisions looks 100x smaller than it is), and a selective filter (onlyTravelers, regions) looks cheap to
    sort. A sort plan reads every key after the cursor on every page, quadratic over a first sync; the index
    scan stops as soon as the page is full. Scoped to the caller's transaction and restored afterwards.
    """
    previous = conn.execute(sa.text("SELECT current_setting('enable_sort'), set_config('enable_sort', 'off', true)"
                                    )).scalar_one()
    yield
    conn.execute(sa.text("SELECT set_config('enable_sort', :previous, true)"), {"previous": previous})


def _page(conn: Connection, stream: str, filt: KeyFilter, after: Position, until: datetime,
          limit: int) -> list[PageRow]:
    statement, params = _page_statement(stream, filt, after, until, limit)
    with _ordered_plan(conn):
        rows = conn.execute(statement, params).all()
    # Positional unpacking (the SELECT's column order): attribute access on Rows cost ~9 µs a key.
    return [PageRow(bytes(key), tr, number, count, report_type, dsos, traveler, tuple(regions or ()), position)
            for key, tr, number, count, report_type, dsos, traveler, regions, position in rows]


def primary_page(conn: Connection, filt: KeyFilter, *, after: Position, until: datetime,
                 limit: int) -> list[PageRow]:
    """Up to ``limit`` keys with (created_at, exposure_key) after ``after`` and created_at before ``until``."""
    return _page(conn, "primary", filt, after, until, limit)


def revised_page(conn: Connection, filt: KeyFilter, *, after: Position, until: datetime,
                 limit: int) -> list[PageRow]:
    """Up to ``limit`` revised keys with (revised_at, exposure_key) after ``after`` and revised_at before ``until``."""
    return _page(conn, "revised", filt, after, until, limit)


def explain_page(conn: Connection, stream: str, filt: KeyFilter, *, after: Position, until: datetime,
                 limit: int) -> str:
    """The planner's plan for one page (``stream`` is "primary" or "revised"), to check that it uses the index."""
    statement, params = _page_statement(stream, filt, after, until, limit)
    with _ordered_plan(conn):
        rows = conn.execute(sa.text("EXPLAIN " + statement.text), params).all()
    return "\n".join(r[0] for r in rows)
