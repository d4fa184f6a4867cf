"""SQL of federation pulls: the partners' servers we query (with their saved cursors) and each pull's sync row."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# As the schema's CHECK; the id also names the credentials file and appears in provenance (sync_query_id).
QUERY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_HOST_PORT_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


class QueryExistsError(Exception):
    """add_query was given an id that is already configured."""


@dataclass(frozen=True)
class Cursors:
    """Where the partner's Fetch stream stands: a unix-second timestamp and an opaque token per key kind."""

    last_timestamp: datetime | None = None
    primary_cursor: str | None = None
    last_revised_timestamp: datetime | None = None
    revised_cursor: str | None = None


@dataclass(frozen=True)
class FederationInQuery:
    """One partner server we pull from, and what we ask it for."""

    query_id: str
    partner: str
    server_addr: str
    audience: str
    credentials: str        # key reference of our ES256 signing key, never the key itself
    issuer: str
    subject: str
    include_regions: tuple[str, ...] = ()
    exclude_regions: tuple[str, ...] = ()
    only_local_provenance: bool = False
    only_travelers: bool = False
    tls: bool = False
    ca_file: str | None = None
    cursors: Cursors = Cursors()
    created_at: datetime | None = None


@dataclass(frozen=True)
class FederationInSync:
    """One pull of one query: when it ran, what it stored, and why it stopped if it failed."""

    sync_id: int
    query_id: str
    started: datetime
    completed: datetime | None
    pages: int
    insertions: int
    revisions: int
    rejected: int
    skipped: int
    max_timestamp: datetime | None
    max_revised_timestamp: datetime | None
    error: str | None


def normalize_regions(regions: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Upper-cased, trimmed, sorted and unique, as the partner's server compares them."""
    return tuple(sorted({r.strip().upper() for r in regions if r.strip()}))


def check_query(query: FederationInQuery) -> list[str]:
    """Every problem with a query to be added (empty when it is valid), each naming its field."""
    problems = []
    if not QUERY_ID_RE.fullmatch(query.query_id or ""):
        problems.append(f"query id {query.query_id!r} must be 1-100 of [A-Za-z0-9_.-]")
    if not query.partner.strip():
        problems.append("partner must not be empty")
    m = _HOST_PORT_RE.fullmatch(query.server_addr or "")
    if m is None or not 1 <= int(m.group(1)) <= 65535:
        problems.append(f"server {query.server_addr!r} must be HOST:PORT, e.g. keys.example.org:443")
    for name in ("audience", "issuer", "subject", "credentials"):
        if not getattr(query, name).strip():
            problems.append(f"{name} must not be empty")
    overlap = set(normalize_regions(query.include_regions)) & set(normalize_regions(query.exclude_regions))
    if overlap:
        # The partner's server refuses such a request; better to say so now than at every pull.
        problems.append(f"regions both included and excluded: {', '.join(sorted(overlap))}")
    if query.ca_file and not query.tls:
        problems.append("a CA file only applies with TLS")
    return problems


_QUERY_COLUMNS = ("query_id, partner, server_addr, audience, include_regions, exclude_regions, only_local_provenance,"
                  " only_travelers, credentials, issuer, subject, tls, ca_file, last_timestamp, primary_cursor,"
                  " last_revised_timestamp, revised_cursor, created_at")


def _query(row: sa.Row) -> FederationInQuery:
    return FederationInQuery(
        query_id=row.query_id, partner=row.partner, server_addr=row.server_addr, audience=row.audience,
        credentials=row.credentials, issuer=row.issuer, subject=row.subject,
        include_regions=tuple(row.include_regions or ()), exclude_regions=tuple(row.exclude_regions or ()),
        only_local_provenance=row.only_local_provenance, only_travelers=row.only_travelers, tls=row.tls,
        ca_file=row.ca_file, created_at=row.created_at,
        cursors=Cursors(row.last_timestamp, row.primary_cursor, row.last_revised_timestamp, row.revised_cursor))


def add_query(conn: Connection, query: FederationInQuery, now: datetime) -> FederationInQuery:
    """Validate and insert a query with empty cursors (its first pull starts at the partner's beginning)."""
    problems = check_query(query)
    if problems:
        raise ValueError("; ".join(problems))
    row = conn.execute(sa.text(
        f"INSERT INTO federation_in_query ({_QUERY_COLUMNS})"
        " VALUES (:query_id, :partner, :server_addr, :audience, :include_regions, :exclude_regions,"
        " :only_local_provenance, :only_travelers, :credentials, :issuer, :subject, :tls, :ca_file,"
        " NULL, NULL, NULL, NULL, :created_at)"
        f" ON CONFLICT (query_id) DO NOTHING RETURNING {_QUERY_COLUMNS}"),
        {"query_id": query.query_id, "partner": query.partner.strip(), "server_addr": query.server_addr,
         "audience": query.audience, "include_regions": list(normalize_regions(query.include_regions)),
         "exclude_regions": list(normalize_regions(query.exclude_regions)),
         "only_local_provenance": query.only_local_provenance, "only_travelers": query.only_travelers,
         "credentials": query.credentials, "issuer": query.issuer, "subject": query.subject, "tls": query.tls,
         "ca_file": query.ca_file, "created_at": now}).one_or_none()
    if row is None:
        raise QueryExistsError(f"a federation query with id {query.query_id!r} already exists")
    return _query(row)


def get_query(conn: Connection, query_id: str) -> FederationInQuery | None:
    row = conn.execute(sa.text(f"SELECT {_QUERY_COLUMNS} FROM federation_in_query WHERE query_id = :q"),
                       {"q": query_id}).one_or_none()
    return _query(row) if row is not None else None


def list_queries(conn: Connection) -> list[FederationInQuery]:
    rows = conn.execute(sa.text(f"SELECT {_QUERY_COLUMNS} FROM federation_in_query ORDER BY query_id"))
    return [_query(r) for r in rows]


def list_query_ids(conn: Connection) -> list[str]:
    return list(conn.execute(sa.text("SELECT query_id FROM federation_in_query ORDER BY query_id")).scalars())


def remove_query(conn: Connection, query_id: str) -> FederationInQuery | None:
    """Delete a query and its sync history; the keys it pulled stay. Returns what was removed."""
    row = conn.execute(sa.text(f"DELETE FROM federation_in_query WHERE query_id = :q RETURNING {_QUERY_COLUMNS}"),
                       {"q": query_id}).one_or_none()
    return _query(row) if row is not None else None


def save_cursors(conn: Connection, query_id: str, cursors: Cursors) -> None:
    """Store where the partner's stream stands; call it in the transaction that stores the keys it covers."""
    result = conn.execute(sa.text(
        "UPDATE federation_in_query SET last_timestamp = :lt, primary_cursor = :pc, last_revised_timestamp = :lrt,"
        " revised_cursor = :rc WHERE query_id = :q"),
        {"q": query_id, "lt": cursors.last_timestamp, "pc": cursors.primary_cursor,
         "lrt": cursors.last_revised_timestamp, "rc": cursors.revised_cursor})
    if result.rowcount != 1:
        # Removed while a pull ran: storing keys without the cursor would repeat them after a re-add.
        raise LookupError(f"federation query {query_id!r} no longer exists")


# -- one pull at a time per query ---------------------------------------------------------------------------

def try_lock_query(autocommit_conn: Connection, query_id: str) -> bool:
    """Take the session advisory lock of one query's pulls; False when another pull holds it.

    The two-int form keeps these locks apart from the per-key locks (single bigint) of the exposure writers.
    """
    return bool(autocommit_conn.execute(
        sa.text("SELECT pg_try_advisory_lock(hashtext('enp_federation_pull'), hashtext(:q))"),
        {"q": query_id}).scalar_one())


def unlock_query(autocommit_conn: Connection, query_id: str) -> None:
    autocommit_conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext('enp_federation_pull'), hashtext(:q))"),
                            {"q": query_id})


# -- sync history ---------------------------------------------------------------------------------------------

_SYNC_COLUMNS = ("sync_id, query_id, started, completed, pages, insertions, revisions, rejected, skipped,"
                 " max_timestamp, max_revised_timestamp, error")


def start_sync(conn: Connection, query_id: str, started: datetime) -> int:
    return conn.execute(sa.text("INSERT INTO federation_in_sync (query_id, started) VALUES (:q, :s) RETURNING sync_id"),
                        {"q": query_id, "s": started}).scalar_one()


def record_page(conn: Connection, sync_id: int, *, insertions: int, revisions: int, rejected: int, skipped: int,
                max_timestamp: datetime | None, max_revised_timestamp: datetime | None, pages: int = 1) -> None:
    """Add stored pages to the sync's counters (in the pages' transaction, so they match what was stored)."""
    conn.execute(sa.text(
        "UPDATE federation_in_sync SET pages = pages + :pages, insertions = insertions + :i,"
        " revisions = revisions + :r, rejected = rejected + :x, skipped = skipped + :s,"
        " max_timestamp = GREATEST(max_timestamp, :mt), max_revised_timestamp = GREATEST(max_revised_timestamp, :mrt)"
        " WHERE sync_id = :id"),
        {"id": sync_id, "i": insertions, "r": revisions, "x": rejected, "s": skipped, "mt": max_timestamp,
         "mrt": max_revised_timestamp, "pages": pages})


def finish_sync(conn: Connection, sync_id: int, completed: datetime) -> None:
    conn.execute(sa.text("UPDATE federation_in_sync SET completed = :c, error = NULL WHERE sync_id = :id"),
                 {"id": sync_id, "c": completed})


def fail_sync(conn: Connection, sync_id: int, error: str) -> None:
    """Record why a pull stopped; completed stays empty, the counters keep the pages that were stored."""
    conn.execute(sa.text("UPDATE federation_in_sync SET error = :e WHERE sync_id = :id"), {"id": sync_id, "e": error})


def get_sync(conn: Connection, sync_id: int) -> FederationInSync | None:
    row = conn.execute(sa.text(f"SELECT {_SYNC_COLUMNS} FROM federation_in_sync WHERE sync_id = :id"),
                       {"id": sync_id}).one_or_none()
    return FederationInSync(**row._asdict()) if row is not None else None


def list_syncs(conn: Connection, query_id: str, limit: int = 20) -> list[FederationInSync]:
    """A query's pulls, newest first."""
    rows = conn.execute(sa.text(f"SELECT {_SYNC_COLUMNS} FROM federation_in_sync WHERE query_id = :q"
                                " ORDER BY started DESC, sync_id DESC LIMIT :n"), {"q": query_id, "n": limit})
    return [FederationInSync(**r._asdict()) for r in rows]
