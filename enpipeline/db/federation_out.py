"""SQL of the Fetch server: partners allowed to pull from us, and the keyset-paged key reads it serves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import psycopg2.extensions
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from enpipeline.db.export import GENERATED_APP
from enpipeline.federation.auth import FederationAuthorization
from enpipeline.federation.cursor import Position


def _fetchall(conn: Connection, sql: str, params: dict) -> list[tuple]:
    """The rows of ``sql`` run on the DBAPI cursor (psycopg2's pyformat: %(name)s parameters, %% for a %).

    For the statements of every Fetch: SQLAlchemy's statement handling and Row objects cost ~70 µs a
    statement and ~0.3 µs a row (measured), a good part of a Fetch of 500 keys.
    """
    with conn.connection.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


# --- authorizations ---------------------------------------------------------------------------------

_AUTH_COLS = ("issuer, subject, audience, partner, public_key, include_regions, exclude_regions, note,"
              " created_at")


def _authorization(row: tuple) -> FederationAuthorization:
    issuer, subject, audience, partner, public_key, include_regions, exclude_regions, note, created_at = row
    return FederationAuthorization(
        issuer=issuer, subject=subject, audience=audience, partner=partner, public_key_pem=public_key,
        include_regions=tuple(include_regions or ()), exclude_regions=tuple(exclude_regions or ()), note=note,
        created_at=created_at)


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
    # On the DBAPI cursor: every Fetch starts with this (see _fetchall).
    rows = _fetchall(conn, f"SELECT {_AUTH_COLS} FROM federation_out_authorization"
                           " WHERE issuer = %(issuer)s AND subject = %(subject)s",
                     {"issuer": issuer, "subject": subject})
    return _authorization(rows[0]) if rows else None


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
#
# The Fetch server reads up to a million keys a minute through these queries, so they avoid what costs per
# row: they run on the DBAPI cursor (see _fetchall) and select only text and integer columns (psycopg2 takes
# ~1.8 µs to turn a bytea into a memoryview, ~0.5 µs a timestamptz into a datetime, ~0.1 µs a column).


@dataclass(frozen=True)
class PartnerSources:
    """Where keys that came from one partner are stored from: its pull queries and its export importers."""

    query_ids: tuple[str, ...] = ()
    importer_ids: tuple[int, ...] = ()


_PARTNER_SOURCES = ("ARRAY(SELECT query_id FROM federation_in_query WHERE partner = %(p)s ORDER BY 1),"
                    " ARRAY(SELECT id FROM export_importer WHERE partner = %(p)s ORDER BY 1)")


def partner_sources(conn: Connection, partner: str) -> PartnerSources:
    """The sources of ``partner``'s keys, so that they are never served back to it."""
    [(query_ids, importer_ids)] = _fetchall(conn, "SELECT " + _PARTNER_SOURCES, {"p": partner})
    return PartnerSources(tuple(query_ids), tuple(importer_ids))


@dataclass(frozen=True)
class KeyFilter:
    """Which keys a Fetch may see. Regions are upper case; an empty include means every region."""

    include_regions: tuple[str, ...] = ()
    exclude_regions: tuple[str, ...] = ()
    only_travelers: bool = False
    only_local_provenance: bool = False
    skip: PartnerSources = PartnerSources()


# One served key as a page query selects it: (exposure_key as hex, position, values). position is the
# stream's timestamp (created_at for primary keys, revised_at for revised ones) as Postgres writes it; only
# the last key's is needed (page_position()), so it is not parsed per row. values is the key's other fields in
# one string (see key_values()): keys with equal values share it, so the Fetch server encodes each distinct
# one once. Formatting it is much of the query's cost: concat_ws measured ~0.3 µs a row cheaper than a
# ROW(...) cast to text in Postgres, and than separate columns in Postgres and psycopg2 together.
PageRow = tuple[str, str, str]


class KeyValues(NamedTuple):
    """Everything of a served key but the key itself (the revised values for a revised key)."""

    interval_number: int
    transmission_risk: int
    interval_count: int
    report_type: str
    days_since_symptom_onset: int | None
    traveler: bool
    regions: tuple[str, ...]  # a NULL element (which no writer stores) is None, as psycopg2 reads it


# The values of a PageRow: six comma-free fields (integers, the traveler flag t/f, the onset or "n" for none,
# the report type's length in characters), then the report type itself, a comma and the regions in text[] form,
# which psycopg2's own array parser reads.
_VALUES = ("concat_ws(',', interval_number, {tr}, interval_count, traveler, coalesce(({dsos})::text, 'n'),"
           " length({report_type}), {report_type}, regions)")


def key_values(values: str) -> KeyValues:
    """The typed fields of a PageRow's values string."""
    number, risk, count, traveler, onset, length, rest = values.split(",", 6)
    cut = int(length)
    regions = psycopg2.extensions.STRINGARRAY(rest[cut + 1:], None)
    return KeyValues(int(number), int(risk), int(count), rest[:cut], None if onset == "n" else int(onset),
                     traveler == "t", tuple(regions))


def page_position(row: PageRow) -> Position:
    """The position a page row names: the cursor after serving it."""
    # Pages only hold timestamps in [the epoch, until), which Postgres writes as ISO 8601 (the DateStyle
    # psycopg2 itself needs), with µs and the UTC offset.
    return Position(datetime.fromisoformat(row[1]), bytes.fromhex(row[0]))


# A page's timestamps stay strings (see PageRow): psycopg2's own conversion measured ~0.5 µs a row.
_TIMESTAMPTZ_AS_TEXT = psycopg2.extensions.new_type(psycopg2.extensions.PYDATETIMETZ.values,
                                                    "ENP_TIMESTAMPTZ_AS_TEXT", lambda value, cursor: value)


def _page_rows(conn: Connection, sql: str, params: dict) -> list[PageRow]:
    with conn.connection.cursor() as cur:
        psycopg2.extensions.register_type(_TIMESTAMPTZ_AS_TEXT, cur)
        cur.execute(sql, params)
        return cur.fetchall()


# Primary keys carry their published values; revised keys their revised ones (TR falls back to the original when
# a revision did not set one).
_STREAMS = {
    "primary": ("created_at", "transmission_risk", "report_type", "days_since_symptom_onset"),
    "revised": ("revised_at", "COALESCE(revised_transmission_risk, transmission_risk)",
                "COALESCE(revised_report_type, '')", "revised_days_since_symptom_onset"),
}


def _page_statement(stream: str, filt: KeyFilter, after: Position, until: datetime,
                    limit: int) -> tuple[str, dict]:
    at, tr, report_type, dsos = _STREAMS[stream]
    # The row comparison and ORDER BY match the (at, exposure_key) indexes of sql/0005, so a page is a merge of
    # per-partition index range scans that stops after `limit` rows, never a sort of a whole window.
    where = [f"({at}, exposure_key) > (CAST(%(after_at)s AS TIMESTAMPTZ), CAST(%(after_key)s AS BYTEA))",
             f"{at} < %(until)s",
             f"app_package_name IS DISTINCT FROM '{GENERATED_APP}'",  # export padding is never real
             # Keys from the EU gateway may only be used by the country that downloaded them (EFGS terms).
             "(sync_query_id IS NULL OR sync_query_id NOT LIKE 'efgs:%%')"]
    params: dict = {"after_at": after.at, "after_key": after.key, "until": until, "limit": limit}
    if stream == "primary":
        # Implied by the row comparison, but only a plain bound lets the planner skip older day partitions.
        where.append("created_at >= CAST(%(after_at)s AS TIMESTAMPTZ)")
    if filt.include_regions:
        # As the reference (IncludeTravelers): travelers are served whatever their regions.
        where.append("(regions && CAST(%(include)s AS TEXT[]) OR traveler)")
        params["include"] = list(filt.include_regions)
    if filt.exclude_regions:
        where.append("NOT (regions && CAST(%(exclude)s AS TEXT[]))")
        params["exclude"] = list(filt.exclude_regions)
    if filt.only_travelers:
        where.append("traveler")
    if filt.only_local_provenance:
        where.append("local_provenance")
    if filt.skip.query_ids:
        where.append("(sync_query_id IS NULL OR sync_query_id <> ALL(CAST(%(skip_queries)s AS TEXT[])))")
        params["skip_queries"] = list(filt.skip.query_ids)
    if filt.skip.importer_ids:
        where.append("(export_import_id IS NULL OR export_import_id <> ALL(CAST(%(skip_importers)s AS BIGINT[])))")
        params["skip_importers"] = list(filt.skip.importer_ids)
    sql = (f"SELECT encode(exposure_key, 'hex'), {at}, {_VALUES.format(tr=tr, dsos=dsos, report_type=report_type)}"
           f" FROM exposure WHERE {' AND '.join(where)}"
           f" ORDER BY {at}, exposure_key LIMIT %(limit)s")
    return sql, params


@contextmanager
def _ordered_plan(conn: Connection) -> Iterator[None]:
    """Keep the planner on the ordered index scan for the statements inside.

    Its estimates are poor here: every bound on revised_at counts the NULL fraction again (so a backlog of
    revisions looks 100x smaller than it is), and a selective filter (onlyTravelers, regions) looks cheap to
    sort. A sort plan reads every key after the cursor on every page, quadratic over a first sync; the index
    scan stops as soon as the page is full. Scoped to the caller's transaction and restored afterwards.
    """
    [(previous, _)] = _fetchall(conn, "SELECT current_setting('enable_sort'), set_config('enable_sort', 'off', true)",
                                {})
    yield
    _fetchall(conn, "SELECT set_config('enable_sort', %(previous)s, true)", {"previous": previous})


def _page(conn: Connection, stream: str, filt: KeyFilter, after: Position, until: datetime,
          limit: int) -> list[PageRow]:
    sql, params = _page_statement(stream, filt, after, until, limit)
    with _ordered_plan(conn):
        return _page_rows(conn, sql, params)


def primary_page(conn: Connection, filt: KeyFilter, *, after: Position, until: datetime,
                 limit: int) -> list[PageRow]:
    """Up to ``limit`` keys with (created_at, exposure_key) after ``after`` and created_at before ``until``."""
    return _page(conn, "primary", filt, after, until, limit)


def revised_page(conn: Connection, filt: KeyFilter, *, after: Position, until: datetime,
                 limit: int) -> list[PageRow]:
    """Up to ``limit`` revised keys with (revised_at, exposure_key) after ``after`` and revised_at before ``until``."""
    return _page(conn, "revised", filt, after, until, limit)


class FetchPages:
    """The pages of one Fetch, read in the caller's transaction, which must be the Fetch's own.

    As primary_page() and revised_page(), with fewer round trips (a Fetch is a handful of statements, and each
    costs about as much as 50 keys): opening reads the partner's sources (see partner_sources) and turns sort
    plans off (see _ordered_plan) in one statement, and they stay off until the transaction ends.
    """

    def __init__(self, conn: Connection, partner: str):
        [(_, query_ids, importer_ids)] = _fetchall(
            conn, "SELECT set_config('enable_sort', 'off', true), " + _PARTNER_SOURCES, {"p": partner})
        self._conn = conn
        self.sources = PartnerSources(tuple(query_ids), tuple(importer_ids))

    def primary_page(self, filt: KeyFilter, *, after: Position, until: datetime, limit: int) -> list[PageRow]:
        return _page_rows(self._conn, *_page_statement("primary", filt, after, until, limit))

    def revised_page(self, filt: KeyFilter, *, after: Position, until: datetime, limit: int) -> list[PageRow]:
        return _page_rows(self._conn, *_page_statement("revised", filt, after, until, limit))


def explain_page(conn: Connection, stream: str, filt: KeyFilter, *, after: Position, until: datetime,
                 limit: int) -> str:
    """The planner's plan for one page (``stream`` is "primary" or "revised"), to check that it uses the index."""
    sql, params = _page_statement(stream, filt, after, until, limit)
    with _ordered_plan(conn):
        rows = _fetchall(conn, "EXPLAIN " + sql, params)
    return "\n".join(r[0] for r in rows)
