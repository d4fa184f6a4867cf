"""The ``enpipeline`` admin command line (its command names and flags are a contract for operators)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from enpipeline.config import ConfigError, Settings, load_settings


class CliError(Exception):
    """A problem the operator can fix; printed as one line without a traceback."""


def _now() -> datetime:
    return datetime.now(UTC)


def _settings() -> Settings:
    return load_settings()


def _engine(settings: Settings):
    from enpipeline.db.engine import make_engine

    return make_engine(settings.database_url, pool_size=2, max_overflow=0,
                       connect_timeout=settings.db_connect_timeout, application_name="enpipeline-cli")


def _parse_time(text: str | None, flag: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{flag} must be an ISO 8601 time such as 2026-01-31T00:00:00Z, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _split(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def _print(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        print("(none)")
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


# -- db ----------------------------------------------------------------------------------------------

def cmd_db_migrate(args: argparse.Namespace) -> None:
    from enpipeline.db.migrate import migrate

    settings = _settings()
    applied = migrate(_engine(settings), now=_now(), retention=settings.retention,
                      days_ahead=settings.partition_days_ahead)
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}; schema is up to date")


def cmd_db_status(args: argparse.Namespace) -> None:
    from enpipeline.db.migrate import pending

    waiting = pending(_engine(_settings()))
    print("schema is up to date" if not waiting else "pending migrations: " + ", ".join(waiting))
    if waiting:
        raise SystemExit(1)


# -- health authorities ------------------------------------------------------------------------------

def _ha_or_fail(conn, issuer: str):
    from enpipeline.db import authorities

    ha = authorities.get_by_issuer(conn, issuer)
    if ha is None:
        raise CliError(f"no health authority with issuer {issuer!r}")
    return ha


def _read_public_key(path: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        pem = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read --public-key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError:
        raise CliError(f"--public-key {path} is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CliError(f"--public-key {path} must be an ECDSA P-256 key (ES256)")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def cmd_ha_add(args: argparse.Namespace) -> None:
    from enpipeline.db import authorities

    with _engine(_settings()).begin() as conn:
        if authorities.get_by_issuer(conn, args.issuer):
            raise CliError(f"a health authority with issuer {args.issuer!r} already exists")
        ha_id = authorities.add_authority(conn, issuer=args.issuer, audience=args.audience, name=args.name,
                                          jwks_uri=args.jwks_uri)
    print(f"added health authority {ha_id} (issuer {args.issuer!r}); use its id with `enpipeline app add --id ...`")


def cmd_ha_add_key(args: argparse.Namespace) -> None:
    from enpipeline.db import authorities

    pem = _read_public_key(args.public_key)
    start = _parse_time(args.from_, "--from") or _now()
    thru = _parse_time(args.thru, "--thru")
    if thru is not None and thru <= start:
        raise CliError("--thru must be after --from")
    with _engine(_settings()).begin() as conn:
        ha = _ha_or_fail(conn, args.issuer)
        if any(k.version == args.version for k in ha.keys):
            raise CliError(f"health authority {args.issuer!r} already has a key with version {args.version!r}")
        authorities.add_key(conn, ha.id, version=args.version, public_key_pem=pem, from_timestamp=start,
                            thru_timestamp=thru)
    print(f"added key {args.version!r} to {args.issuer!r}, valid from {start.isoformat()}"
          + (f" thru {thru.isoformat()}" if thru else ""))


def _ha_row(ha) -> dict[str, Any]:
    return {"id": ha.id, "issuer": ha.issuer, "audience": ha.audience, "name": ha.name,
            "jwks_uri": ha.jwks_uri or "", "keys": ",".join(k.version for k in ha.keys)}


def cmd_ha_list(args: argparse.Namespace) -> None:
    from enpipeline.db import authorities

    with _engine(_settings()).connect() as conn:
        _print([_ha_row(ha) for ha in authorities.list_authorities(conn)], args.json)


def cmd_ha_show(args: argparse.Namespace) -> None:
    with _engine(_settings()).connect() as conn:
        ha = _ha_or_fail(conn, args.issuer)
    now = _now()
    if args.json:
        row = _ha_row(ha)
        row["keys"] = [{"version": k.version, "from": k.from_timestamp, "thru": k.thru_timestamp,
                        "active": k.is_valid_at(now), "public_key": k.public_key_pem} for k in ha.keys]
        print(json.dumps(row, indent=2, default=str))
        return
    for name, value in _ha_row(ha).items():
        if name != "keys":
            print(f"{name}: {value}")
    print("keys:")
    _print([{"version": k.version, "from": k.from_timestamp.isoformat(),
             "thru": k.thru_timestamp.isoformat() if k.thru_timestamp else "",
             "active": k.is_valid_at(now)} for k in ha.keys], False)


def cmd_ha_revoke_key(args: argparse.Namespace) -> None:
    from enpipeline.db import authorities

    at = _parse_time(args.at, "--at") or _now()
    with _engine(_settings()).begin() as conn:
        ha = _ha_or_fail(conn, args.issuer)
        if not authorities.revoke_key(conn, ha.id, args.version, at):
            raise CliError(f"no active key {args.version!r} for {args.issuer!r}")
    print(f"key {args.version!r} of {args.issuer!r} is valid only until {at.isoformat()}")


def cmd_ha_remove_key(args: argparse.Namespace) -> None:
    from enpipeline.db import authorities

    with _engine(_settings()).begin() as conn:
        ha = _ha_or_fail(conn, args.issuer)
        if not authorities.remove_key(conn, ha.id, args.version):
            raise CliError(f"no key {args.version!r} for {args.issuer!r}")
    print(f"removed key {args.version!r} of {args.issuer!r}")


def cmd_ha_remove(args: argparse.Namespace) -> None:
    from enpipeline.db import apps, authorities

    with _engine(_settings()).begin() as conn:
        ha = _ha_or_fail(conn, args.issuer)
        users = [a.app_package_name for a in apps.list_apps(conn) if ha.id in a.allowed_health_authority_ids]
        if users and not args.force:
            raise CliError(f"apps still allow this health authority: {', '.join(users)} (use --force)")
        authorities.remove_authority(conn, ha.id)
    print(f"removed health authority {args.issuer!r} and its keys")


def cmd_ha_sync_jwks(args: argparse.Namespace) -> None:
    from enpipeline.jwks import JwksSyncError, sync_health_authority_keys

    settings = _settings()
    report = sync_health_authority_keys(_engine(settings), _now(), timeout=settings.jwks_request_timeout,
                                        cleanup_ttl=settings.health_authority_key_cleanup_ttl,
                                        max_bytes=settings.jwks_max_bytes)
    _print([r.as_row() for r in report.results], args.json)
    try:
        report.raise_for_failures()
    except JwksSyncError as exc:  # the healthy authorities are synced; say which ones were not
        raise CliError(str(exc)) from None


# -- authorized apps ---------------------------------------------------------------------------------

def cmd_app_add(args: argparse.Namespace) -> None:
    from enpipeline.db import apps
    from enpipeline.model import AuthorizedApp

    app_id = args.id.strip().lower()
    if not app_id:
        raise CliError("--id must not be empty")
    regions = [r.upper() for r in _split(args.regions)]
    if not regions:
        raise CliError("--regions needs at least one region, e.g. --regions US")
    with _engine(_settings()).begin() as conn:
        if apps.get_app(conn, app_id) and not args.replace:
            raise CliError(f"app {app_id!r} already exists (use --replace to change it)")
        ha_ids = []
        for issuer in args.allow_issuer or []:
            ha_ids.append(_ha_or_fail(conn, issuer).id)
        if not ha_ids and not args.bypass_verification:
            raise CliError("give at least one --allow-issuer (or --bypass-verification for testing)")
        apps.upsert_app(conn, AuthorizedApp(
            app_package_name=app_id, allowed_regions=tuple(regions), allowed_health_authority_ids=tuple(ha_ids),
            bypass_health_authority_verification=args.bypass_verification,
            bypass_revision_token=args.bypass_revision_token))
    print(f"app {app_id!r} may publish to {','.join(regions)} with certificates from "
          f"{', '.join(args.allow_issuer or []) or '(anyone: verification bypassed)'}")


def _app_row(app, issuers: dict[int, str]) -> dict[str, Any]:
    return {"id": app.app_package_name, "regions": ",".join(app.allowed_regions),
            "issuers": ",".join(issuers.get(i, str(i)) for i in app.allowed_health_authority_ids),
            "bypass_verification": app.bypass_health_authority_verification,
            "bypass_revision_token": app.bypass_revision_token}


def cmd_app_list(args: argparse.Namespace) -> None:
    from enpipeline.db import apps, authorities

    with _engine(_settings()).connect() as conn:
        issuers = {ha.id: ha.issuer for ha in authorities.list_authorities(conn)}
        _print([_app_row(a, issuers) for a in apps.list_apps(conn)], args.json)


def cmd_app_show(args: argparse.Namespace) -> None:
    from enpipeline.db import apps, authorities

    with _engine(_settings()).connect() as conn:
        app = apps.get_app(conn, args.id)
        if app is None:
            raise CliError(f"no app {args.id.lower()!r}")
        issuers = {ha.id: ha.issuer for ha in authorities.list_authorities(conn)}
    row = _app_row(app, issuers)
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        for name, value in row.items():
            print(f"{name}: {value}")


def cmd_app_remove(args: argparse.Namespace) -> None:
    from enpipeline.db import apps

    with _engine(_settings()).begin() as conn:
        if not apps.delete_app(conn, args.id):
            raise CliError(f"no app {args.id.lower()!r}")
    print(f"removed app {args.id.lower()!r}")


# -- serving -----------------------------------------------------------------------------------------

def cmd_api(args: argparse.Namespace) -> None:
    import importlib

    serve_api = importlib.import_module("api.serve").serve_api  # the CLI is the composition root

    settings = _settings()
    serve_api(settings, host=args.host, port=args.port, workers=args.workers, threads=args.threads)


def cmd_local(args: argparse.Namespace) -> None:
    from enpipeline import local

    if args.action == "up":
        local.up(Path(args.var_dir), api_port=args.api_port, airflow_port=args.airflow_port, airflow=args.airflow)
    else:
        {"down": local.down, "status": local.status}[args.action](Path(args.var_dir))


# -- synthetic data ----------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> None:
    from enpipeline.generate import DayResult, GenerateRefused, generate_keys

    now = _parse_time(args.now, "--now") or _now()

    def show(day: DayResult) -> None:
        rate = day.rows / day.seconds if day.seconds > 0 else 0.0
        print(f"{day.day.isoformat()}  {day.rows:>12,} keys  {day.seconds:7.2f}s  {rate:>10,.0f} rows/s", flush=True)

    try:
        report = generate_keys(_engine(_settings()), days=args.days, keys_per_day=args.keys_per_day,
                               regions=["US"] if args.regions is None else _split(args.regions), now=now,
                               force=args.force, seed=args.seed, progress=show)
    except (GenerateRefused, ValueError) as exc:
        raise CliError(str(exc)) from None
    first, last = report.days[0].day, report.days[-1].day
    print(f"generated {report.rows:,} keys over {len(report.days)} day(s) {first.isoformat()}..{last.isoformat()}"
          f" (regions {','.join(report.regions)}, seed {report.seed}) in {report.seconds:.2f}s:"
          f" {report.rows_per_second:,.0f} rows/s")


def cmd_simulate(args: argparse.Namespace) -> None:
    from enpipeline import local
    from enpipeline.simulate import (
        SimulateError,
        SimulateOptions,
        format_summary,
        load_health_authority,
        progress_stream,
        run_simulation,
    )

    if args.ha_key:
        missing = [flag for flag, value in (("--issuer", args.issuer), ("--audience", args.audience),
                                            ("--app", args.app)) if not value]
        if missing:
            raise CliError(f"--ha-key needs {', '.join(missing)} as well (demo values apply only without it)")
        key_path = Path(args.ha_key)
    else:
        key_path = Path(args.var_dir) / "demo" / "verification-key.pem"
        if not key_path.exists():
            raise CliError(f"no demo health authority key at {key_path}: run `make up` first, or give"
                           " --ha-key PEM --issuer ISS --audience AUD --app APP")
    options = SimulateOptions(publishes=args.publishes, url=args.url, rate=args.rate, chaff_ratio=args.chaff_ratio,
                              revision_ratio=args.revision_ratio, concurrency=args.concurrency, seed=args.seed,
                              timeout=args.timeout)
    try:
        authority = load_health_authority(key_path, issuer=args.issuer or local.DEMO_ISSUER,
                                          audience=args.audience or local.DEMO_AUDIENCE, kid=args.kid,
                                          app=args.app or local.DEMO_APP)
        summary = run_simulation(options, authority, clock=_now, progress=progress_stream())
    except SimulateError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(summary.as_dict(), indent=2) if args.json else format_summary(summary))
    if not summary.ok:
        raise SystemExit(1)


# -- parser ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enpipeline", description="Administer and run an enpipeline key server.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(group, name: str, func: Callable[[argparse.Namespace], None], help_: str):
        p = group.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="action", required=True, metavar="ACTION")
    add(db, "migrate", cmd_db_migrate, "apply pending migrations and create upcoming day partitions")
    add(db, "status", cmd_db_status, "list pending migrations (exit 1 if any)")

    ha = sub.add_parser("health-authority", help="certificate issuers and their keys").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = add(ha, "add", cmd_ha_add, "register a health authority (certificate issuer)")
    p.add_argument("--issuer", required=True)
    p.add_argument("--audience", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--jwks-uri")
    p = add(ha, "add-key", cmd_ha_add_key, "add a verification public key (ES256) to a health authority")
    p.add_argument("--issuer", required=True)
    p.add_argument("--version", required=True, help="the certificate's kid")
    p.add_argument("--public-key", required=True, metavar="FILE.pem")
    p.add_argument("--from", dest="from_", metavar="ISO", help="valid from (default now)")
    p.add_argument("--thru", metavar="ISO", help="valid until (default open-ended)")
    p = add(ha, "list", cmd_ha_list, "list health authorities")
    p.add_argument("--json", action="store_true")
    p = add(ha, "show", cmd_ha_show, "show one health authority with its keys")
    p.add_argument("--issuer", required=True)
    p.add_argument("--json", action="store_true")
    p = add(ha, "revoke-key", cmd_ha_revoke_key, "end a key's validity (now or --at)")
    p.add_argument("--issuer", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--at", metavar="ISO")
    p = add(ha, "remove-key", cmd_ha_remove_key, "delete a key")
    p.add_argument("--issuer", required=True)
    p.add_argument("--version", required=True)
    p = add(ha, "remove", cmd_ha_remove, "delete a health authority and its keys")
    p.add_argument("--issuer", required=True)
    p.add_argument("--force", action="store_true", help="even if apps still allow it")
    p = add(ha, "sync-jwks", cmd_ha_sync_jwks,
            "fetch every jwks_uri: add new keys, revoke vanished ones, purge old revoked ones (exit 1 if any fails)")
    p.add_argument("--json", action="store_true")

    app = sub.add_parser("app", help="authorized apps").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(app, "add", cmd_app_add, "authorize an app (healthAuthorityID) to publish")
    p.add_argument("--id", required=True, metavar="HEALTH_AUTHORITY_ID", help="the healthAuthorityID apps send")
    p.add_argument("--regions", required=True, action="append", help="US or US,CA")
    p.add_argument("--allow-issuer", action="append", metavar="ISS", help="repeatable")
    p.add_argument("--bypass-verification", action="store_true", help="accept publishes without a valid certificate")
    p.add_argument("--bypass-revision-token", action="store_true", help="allow revisions without a token")
    p.add_argument("--replace", action="store_true", help="overwrite an existing app")
    p = add(app, "list", cmd_app_list, "list authorized apps")
    p.add_argument("--json", action="store_true")
    p = add(app, "show", cmd_app_show, "show one authorized app")
    p.add_argument("--id", required=True)
    p.add_argument("--json", action="store_true")
    p = add(app, "remove", cmd_app_remove, "remove an authorized app")
    p.add_argument("--id", required=True)

    p = add(sub, "api", cmd_api, "serve the publish API with gunicorn")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=None, help="gunicorn worker processes (default 2 x CPUs + 1)")
    p.add_argument("--threads", type=int, default=1, help="threads per worker")

    p = add(sub, "generate", cmd_generate,
            "write synthetic exposure keys for the D whole UTC days before today (tests, demos, benchmarks)")
    p.add_argument("--days", type=int, required=True, metavar="D", help="how many days, 1-60")
    p.add_argument("--keys-per-day", type=int, required=True, metavar="N", help="keys per day, 1-50000000")
    p.add_argument("--regions", action="append", metavar="US", help="US or US,CA; repeatable (default US)")
    p.add_argument("--force", action="store_true", help="even if the database holds real published keys")
    p.add_argument("--now", metavar="ISO", help="pretend it is this time (default now)")
    p.add_argument("--seed", type=int, help="reproduce the keys of an earlier run (default random)")

    p = add(sub, "simulate", cmd_simulate,
            "act as a population of phones against a running publish API: signed publishes, revisions, chaff"
            " (exit 1 on 5xx or connection errors)")
    p.add_argument("--publishes", type=int, required=True, metavar="N", help="phones that publish their keys")
    p.add_argument("--rate", type=float, metavar="R",
                   help="at most R requests/s, publishes, revisions and chaff together (default unlimited)")
    p.add_argument("--chaff-ratio", type=float, default=0.1, metavar="X", help="chaff requests per publish (0.1)")
    p.add_argument("--revision-ratio", type=float, default=0.1, metavar="Y",
                   help="share of phones that later revise their report type, e.g. likely -> confirmed (0.1)")
    p.add_argument("--concurrency", type=int, default=4, metavar="C", help="phones sending at once (4)")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the API's base URL (http://127.0.0.1:8080)")
    p.add_argument("--var-dir", default="var", help="where `make up` put the demo health authority key (var)")
    p.add_argument("--ha-key", metavar="PEM", help="the health authority's ES256 private key instead of the demo's")
    p.add_argument("--issuer", metavar="ISS", help="certificate iss (demo: enpipeline-demo-ha)")
    p.add_argument("--audience", metavar="AUD", help="certificate aud (demo: enpipeline)")
    p.add_argument("--kid", default="v1", help="certificate kid (v1)")
    p.add_argument("--app", metavar="APP", help="healthAuthorityID to publish as (demo: com.example.enpipeline.demo)")
    p.add_argument("--seed", type=int, metavar="S", help="reproduce the mix of an earlier run (keys are always new)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per request (30)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    from enpipeline import cli_export

    cli_export.register(sub, add)
    from enpipeline import cli_retention

    cli_retention.register(sub, add)
    from enpipeline import cli_federation

    cli_federation.register(sub, add)
    from enpipeline import cli_efgs

    cli_efgs.register(sub, add)

    p = add(sub, "local", cmd_local, "run the local stack on the embedded Postgres (used by make up/down)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--var-dir", default="var")
    p.add_argument("--api-port", type=int, help="publish API port (default ENP_LOCAL_API_PORT or 8080)")
    p.add_argument("--airflow-port", type=int, help="Airflow UI/API port (default ENP_LOCAL_AIRFLOW_PORT or 8088)")
    p.add_argument("--no-airflow", dest="airflow", action="store_false", help="up: only Postgres and the API")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    try:
        args.func(args)
    except ConfigError as exc:
        print(f"enpipeline: configuration error: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"enpipeline: error: {exc}", file=sys.stderr)
        return 1
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        print(f"enpipeline: error: cannot use the database in ENP_DATABASE_URL: {reason}", file=sys.stderr)
        return 1
    except ProgrammingError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        print(f"enpipeline: error: {reason} (has `enpipeline db migrate` run?)", file=sys.stderr)
        return 1
    except IntegrityError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        print(f"enpipeline: error: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
