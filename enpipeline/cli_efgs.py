"""``enpipeline efgs ...``: EU Federation Gateway targets, push and pull (command names and flags are a contract)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import date
from pathlib import Path
from typing import Any

from enpipeline.cli import CliError, _engine, _now, _parse_time, _print, _settings


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {flag} {path}: {exc.strerror}") from None


def _target_row(t: Any) -> dict[str, Any]:
    from cryptography import x509

    signing = x509.load_pem_x509_certificate(t.signing_cert.encode())
    client = x509.load_pem_x509_certificate(t.client_cert.encode())
    return {"id": t.target_id, "url": t.url, "country": t.country,
            "client_cert": client.subject.rfc4514_string(),
            "client_cert_expires": client.not_valid_after_utc.isoformat(),
            "signing_cert": signing.subject.rfc4514_string(),
            "signing_cert_expires": signing.not_valid_after_utc.isoformat(),
            "ca": "custom" if t.ca_cert else "system",
            "trust_anchor": ", ".join(a.subject.rfc4514_string() for a in x509.load_pem_x509_certificates(
                t.trust_anchor.encode())) if t.trust_anchor else "none (pulls refused)",
            "tls_credentials": t.tls_credentials,
            "signing_credentials": t.signing_credentials}


def cmd_add_target(args: argparse.Namespace) -> None:
    from enpipeline.db import efgs as db
    from enpipeline.efgs import targets

    settings = _settings()
    files = targets.TargetFiles(
        client_cert=_read(args.client_cert, "--client-cert") or b"", client_key=_read(args.client_key, "--client-key")
        or b"", signing_cert=_read(args.signing_cert, "--signing-cert") or b"",
        signing_key=_read(args.signing_key, "--signing-key") or b"", ca=_read(args.ca, "--ca"),
        trust_anchor=_read(args.trust_anchor, "--trust-anchor"))
    now = _now()
    try:
        target = targets.check_target(args.id, args.url, args.country, files, now)
    except targets.TargetError as exc:
        raise CliError(str(exc)) from None
    engine = _engine(settings)
    with engine.connect() as conn:
        if db.get_target(conn, args.id) is not None:
            raise CliError(f"an EFGS target with id {args.id!r} already exists (remove it first)")
    # The key files first: a row must never point at keys that are not there.
    tls_ref, signing_ref = targets.store_target_keys(settings.key_dir, target, files)
    stored = dataclasses.replace(target, tls_credentials=tls_ref, signing_credentials=signing_ref)
    try:
        with engine.begin() as conn:
            db.add_target(conn, stored, now)
    except db.TargetExistsError as exc:  # added concurrently: the files may be theirs now, so they stay
        raise CliError(str(exc)) from None
    except BaseException:
        targets.remove_target_keys(settings.key_dir, stored)
        raise
    print(f"added EFGS target {args.id!r}: {target.url} as {target.country}; private keys {tls_ref} and "
          f"{signing_ref} in {settings.key_dir} (mode 0600)")
    if target.trust_anchor is None:
        print("note: no --trust-anchor, so pushes work but pulls are refused (other countries' signing "
              "certificates could not be checked); add one with `enpipeline efgs set-trust-anchor` to pull")


def cmd_set_trust_anchor(args: argparse.Namespace) -> None:
    """Give an existing target its trust anchor (or a new one) without losing its push and pull history."""
    from enpipeline.db import efgs as db
    from enpipeline.efgs import targets

    try:
        anchor = targets.check_trust_anchor(_read(args.trust_anchor, "--trust-anchor") or b"")
    except targets.TargetError as exc:
        raise CliError(str(exc)) from None
    with _engine(_settings()).begin() as conn:
        if not db.set_trust_anchor(conn, args.id, anchor):
            raise CliError(f"no EFGS target with id {args.id!r}")
    print(f"EFGS target {args.id!r}: trust anchor set; pulls check every country's signing certificate against it")


def cmd_list_targets(args: argparse.Namespace) -> None:
    from enpipeline.db import efgs as db

    with _engine(_settings()).connect() as conn:
        rows = [_target_row(t) for t in db.list_targets(conn)]
    if not args.json:
        rows = [{k: r[k] for k in ("id", "url", "country", "signing_cert_expires", "client_cert_expires", "ca")}
                for r in rows]
    _print(rows, args.json)


def cmd_remove_target(args: argparse.Namespace) -> None:
    from enpipeline.db import efgs as db
    from enpipeline.efgs import targets

    settings = _settings()
    with _engine(settings).begin() as conn:
        removed = db.remove_target(conn, args.id)
    if removed is None:
        raise CliError(f"no EFGS target {args.id!r}")
    targets.remove_target_keys(settings.key_dir, removed)
    print(f"removed EFGS target {args.id!r}, its push and pull history and its private keys; the keys it pulled "
          "stay until retention drops them")


def cmd_push(args: argparse.Namespace) -> None:
    from enpipeline.efgs.push import EfgsPushError, push_window

    start, end = _parse_time(args.start, "--start"), _parse_time(args.end, "--end")
    assert start is not None and end is not None
    settings = _settings()
    try:
        report = push_window(settings, _engine(settings), args.target, start, end, _now())
    except EfgsPushError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())


def cmd_pull(args: argparse.Namespace) -> None:
    from enpipeline.efgs.pull import EfgsPullError, pull_day, pull_recent

    settings = _settings()
    engine = _engine(settings)
    try:
        if args.date:
            try:
                day = date.fromisoformat(args.date)
            except ValueError:
                raise CliError(f"--date must be YYYY-MM-DD, got {args.date!r}") from None
            reports = [pull_day(settings, engine, args.target, day, _now())]
        else:
            reports = pull_recent(settings, engine, args.target, _now())
    except EfgsPullError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
        return
    for r in reports:
        print(r.summary())
        for reason in r.reasons:
            print(f"  {reason}")


def _known_target(conn: Any, target_id: str) -> None:
    from enpipeline.db import efgs as db

    if db.get_target(conn, target_id) is None:
        raise CliError(f"no EFGS target {target_id!r}")


def cmd_batches(args: argparse.Namespace) -> None:
    from enpipeline.db import efgs as db

    if args.limit <= 0:
        raise CliError("--limit must be positive")
    with _engine(_settings()).connect() as conn:
        _known_target(conn, args.target)
        batches = db.list_batches(conn, args.target, args.limit)
    rows = [{"window_start": b.window_start.isoformat(), "window_end": b.window_end.isoformat(),
             "batch_tag": b.batch_tag, "keys": b.key_count, "sent": b.keys_sent, "status": b.status,
             "http": b.http_status if b.http_status is not None else "",
             "results": (b.results if args.json else
                         " ".join(f"{k}={b.results[k]}" for k in ("201", "409", "500", "400", "invalid")
                                  if b.results.get(k))),
             "uploaded_at": b.uploaded_at.isoformat() if b.uploaded_at else "", "error": b.error or ""}
            for b in batches]
    _print(rows, args.json)


def cmd_downloads(args: argparse.Namespace) -> None:
    from enpipeline.db import efgs as db

    if args.limit <= 0:
        raise CliError("--limit must be positive")
    with _engine(_settings()).connect() as conn:
        _known_target(conn, args.target)
        downloads = db.list_downloads(conn, args.target, args.limit)
        cursors = {c.day: c for c in db.list_cursors(conn, args.target)}
    rows = [{"download_id": d.download_id, "day": d.day.isoformat(), "started": d.started.isoformat(),
             "completed": d.completed.isoformat() if d.completed else "", "batches": d.batches,
             "keys": d.keys_received, "inserted": d.insertions, "revised": d.revisions, "skipped": d.skipped,
             "rejected": d.rejected, "own_origin": d.own_origin, "refused": d.refused,
             "refused_countries": ",".join(d.refused_countries),
             "cursor": cursors[d.day].last_batch_tag if d.day in cursors else "", "error": d.error or ""}
            for d in downloads]
    _print(rows, args.json)


def register(sub: Any, add: Any) -> None:
    """The ``efgs`` command group."""
    efgs = sub.add_parser("efgs", help="exchange keys with the EU Federation Gateway Service").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = add(efgs, "add-target", cmd_add_target, "configure a gateway we upload to and download from")
    p.add_argument("--id", required=True, help="the target id (letters, digits, _ . -); pulled keys remember it")
    p.add_argument("--url", required=True, help="the gateway's base URL, e.g. https://efgs.example.eu")
    p.add_argument("--country", required=True, help="our country (ISO 3166-1 alpha-2), the origin of our keys")
    p.add_argument("--client-cert", required=True, metavar="PEM", help="TLS client certificate (AUTHENTICATION)")
    p.add_argument("--client-key", required=True, metavar="PEM",
                   help="its private key; copied into ENP_KEY_DIR (mode 0600), never stored in the database")
    p.add_argument("--signing-cert", required=True, metavar="PEM", help="batch signing certificate (SIGNING)")
    p.add_argument("--signing-key", required=True, metavar="PEM",
                   help="its private key; copied into ENP_KEY_DIR (mode 0600), never stored in the database")
    p.add_argument("--ca", metavar="PEM", help="trust this CA bundle for the gateway instead of the system roots")
    p.add_argument("--trust-anchor", metavar="PEM",
                   help="the gateway's trust anchor certificate(s): it signs every country's signing certificate; "
                        "pulls refuse to run without it")
    p = add(efgs, "set-trust-anchor", cmd_set_trust_anchor,
            "set or replace a target's trust anchor (keeps its history; pulls need one)")
    p.add_argument("--id", required=True)
    p.add_argument("--trust-anchor", required=True, metavar="PEM")
    p = add(efgs, "list-targets", cmd_list_targets, "list the configured gateways")
    p.add_argument("--json", action="store_true")
    p = add(efgs, "remove-target", cmd_remove_target, "forget a gateway, its history and its private keys")
    p.add_argument("--id", required=True)
    p = add(efgs, "push", cmd_push, "upload the keys published in [--start, --end) (the push DAG's code path)")
    p.add_argument("--target", required=True, metavar="ID")
    p.add_argument("--start", required=True, metavar="ISO")
    p.add_argument("--end", required=True, metavar="ISO")
    p.add_argument("--json", action="store_true")
    p = add(efgs, "pull", cmd_pull,
            "download a day's batches from the saved cursor on (default: every day the gateway still serves)")
    p.add_argument("--target", required=True, metavar="ID")
    p.add_argument("--date", metavar="YYYY-MM-DD")
    p.add_argument("--json", action="store_true")
    p = add(efgs, "batches", cmd_batches, "what was uploaded: upload batches, newest window first")
    p.add_argument("--target", required=True, metavar="ID")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p = add(efgs, "downloads", cmd_downloads, "pull history with the per-day cursor, newest first")
    p.add_argument("--target", required=True, metavar="ID")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
