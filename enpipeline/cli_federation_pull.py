"""``enpipeline federation add-query|list-queries|remove-query|pull|syncs``: the partners we pull keys from."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from enpipeline.cli import CliError, _engine, _now, _print, _settings, _split


def _query_row(q: Any) -> dict[str, Any]:
    c = q.cursors
    return {"id": q.query_id, "partner": q.partner, "server": q.server_addr, "tls": q.tls,
            "audience": q.audience, "issuer": q.issuer, "subject": q.subject,
            "include_regions": ",".join(q.include_regions), "exclude_regions": ",".join(q.exclude_regions),
            "only_local_provenance": q.only_local_provenance, "only_travelers": q.only_travelers,
            "ca": q.ca_file or "", "credentials": q.credentials,
            "last_timestamp": c.last_timestamp.isoformat() if c.last_timestamp else "",
            "last_revised_timestamp": c.last_revised_timestamp.isoformat() if c.last_revised_timestamp else ""}


def cmd_add_query(args: argparse.Namespace) -> None:
    from enpipeline.db import federation_in as db
    from enpipeline.federation import credentials as creds

    settings = _settings()
    if args.ca and not args.tls:
        raise CliError("--ca only applies with --tls")
    ca_file = None
    if args.ca:
        ca = Path(args.ca).resolve()
        try:
            if b"-----BEGIN CERTIFICATE-----" not in ca.read_bytes():
                raise CliError(f"--ca {args.ca} holds no PEM certificate")
        except OSError as exc:
            raise CliError(f"cannot read --ca {args.ca}: {exc.strerror}") from None
        ca_file = str(ca)  # the puller may run elsewhere (Airflow): an absolute path at least means one thing
    try:
        pem = Path(args.credentials).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read --credentials {args.credentials}: {exc.strerror}") from None
    try:
        creds.parse_private_key(pem, f"--credentials {args.credentials}")
    except creds.CredentialsError as exc:
        raise CliError(str(exc)) from None
    name = creds.credentials_name(args.id)
    query = db.FederationInQuery(
        query_id=args.id, partner=args.partner or args.id, server_addr=args.server, audience=args.audience,
        credentials="file:" + name, issuer=args.issuer, subject=args.subject,
        include_regions=tuple(_split(args.include_regions)), exclude_regions=tuple(_split(args.exclude_regions)),
        only_local_provenance=args.only_local_provenance, only_travelers=args.only_travelers, tls=args.tls,
        ca_file=ca_file)
    problems = db.check_query(query)
    if problems:
        raise CliError("; ".join(problems))
    engine = _engine(settings)
    with engine.connect() as conn:
        if db.get_query(conn, args.id) is not None:
            raise CliError(f"a federation query with id {args.id!r} already exists (remove it first)")
    # The key file first: a row must never point at a key that is not there. No row uses this name yet.
    ref = creds.store_credentials(settings.key_dir, name, pem)
    try:
        with engine.begin() as conn:
            added = db.add_query(conn, dataclasses.replace(query, credentials=ref), _now())
    except db.QueryExistsError as exc:  # added concurrently: the file may be theirs now, so it stays
        raise CliError(str(exc)) from None
    except BaseException:
        creds.remove_credentials(settings.key_dir, ref)
        raise
    print(f"added federation query {added.query_id!r}: pull from {added.partner!r} at {added.server_addr}"
          f" ({'TLS' if added.tls else 'plaintext'}), token iss={added.issuer!r} sub={added.subject!r}"
          f" aud={added.audience!r}, key {ref} in {settings.key_dir}")


def cmd_list_queries(args: argparse.Namespace) -> None:
    from enpipeline.db import federation_in as db

    with _engine(_settings()).connect() as conn:
        rows = [_query_row(q) for q in db.list_queries(conn)]
    if not args.json:  # the table keeps to what tells queries apart; --json has every field
        rows = [{k: r[k] for k in ("id", "partner", "server", "tls", "include_regions", "exclude_regions",
                                   "last_timestamp")} for r in rows]
    _print(rows, args.json)


def cmd_remove_query(args: argparse.Namespace) -> None:
    from enpipeline.db import federation_in as db
    from enpipeline.federation import credentials as creds

    settings = _settings()
    with _engine(settings).begin() as conn:
        removed = db.remove_query(conn, args.id)
    if removed is None:
        raise CliError(f"no federation query {args.id!r}")
    creds.remove_credentials(settings.key_dir, removed.credentials)
    print(f"removed federation query {args.id!r}, its sync history and its credentials key;"
          " the keys it pulled stay until retention drops them")


def cmd_pull(args: argparse.Namespace) -> None:
    from enpipeline.federation.pull import FederationPullError, pull_query

    settings = _settings()
    try:
        report = pull_query(settings, _engine(settings), args.query, _now())
    except FederationPullError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    print(report.summary())
    for reason in report.rejected_reasons:
        print(f"  rejected: {reason}")


def cmd_syncs(args: argparse.Namespace) -> None:
    from enpipeline.db import federation_in as db

    if args.limit <= 0:
        raise CliError("--limit must be positive")
    with _engine(_settings()).connect() as conn:
        if db.get_query(conn, args.query) is None:
            raise CliError(f"no federation query {args.query!r}")
        syncs = db.list_syncs(conn, args.query, args.limit)
    rows = [{"sync_id": s.sync_id, "started": s.started.isoformat(),
             "completed": s.completed.isoformat() if s.completed else "", "pages": s.pages,
             "inserted": s.insertions, "revised": s.revisions, "rejected": s.rejected, "skipped": s.skipped,
             "max_timestamp": s.max_timestamp.isoformat() if s.max_timestamp else "",
             "error": s.error or ""} for s in syncs]
    _print(rows, args.json)


def register(group: Any, add: Any) -> None:
    """Add the pull side's subcommands to the ``federation`` group."""
    p = add(group, "add-query", cmd_add_query, "pull keys from a partner's Fetch server (gRPC /Federation/Fetch)")
    p.add_argument("--id", required=True, help="the query id (letters, digits, _ . -); keys remember it")
    p.add_argument("--server", required=True, metavar="HOST:PORT")
    p.add_argument("--audience", required=True, help="aud of our token, as the partner expects it")
    p.add_argument("--credentials", required=True, metavar="KEY.pem",
                   help="our ES256 (P-256) private key; copied into ENP_KEY_DIR, never stored in the database")
    p.add_argument("--issuer", required=True, help="iss of our token, as the partner registered us")
    p.add_argument("--subject", required=True, help="sub of our token, as the partner registered us")
    p.add_argument("--partner", help="name of the neighbouring server (default: the query id)")
    p.add_argument("--include-regions", action="append", metavar="US,CA", help="ask only for these regions")
    p.add_argument("--exclude-regions", action="append", metavar="X,Y", help="ask to leave these out")
    p.add_argument("--only-local-provenance", action="store_true", help="only keys published at the partner")
    p.add_argument("--only-travelers", action="store_true")
    p.add_argument("--tls", action="store_true", help="connect with TLS (default plaintext)")
    p.add_argument("--ca", metavar="PEM", help="trust this CA bundle instead of the system roots (with --tls)")
    p = add(group, "list-queries", cmd_list_queries, "list the partners we pull from, with their cursors")
    p.add_argument("--json", action="store_true")
    p = add(group, "remove-query", cmd_remove_query, "stop pulling from a partner (pulled keys stay)")
    p.add_argument("--id", required=True)
    p = add(group, "pull", cmd_pull, "pull one query now, from its saved cursor on (the DAG's code path)")
    p.add_argument("--query", required=True, metavar="ID")
    p.add_argument("--json", action="store_true")
    p = add(group, "syncs", cmd_syncs, "a query's pull history, newest first")
    p.add_argument("--query", required=True, metavar="ID")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
