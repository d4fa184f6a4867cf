"""``enpipeline federation serve|authorize|list-authorizations|remove-authorization``: partners who pull from us."""

from __future__ import annotations

import argparse
import hashlib
from typing import Any

from enpipeline.cli import CliError, _engine, _now, _print, _read_public_key, _settings, _split


def _key_fingerprint(pem: str) -> str:
    """A short SHA-256 of the key's DER, so operators can compare keys without reading PEM."""
    from cryptography.hazmat.primitives import serialization

    der = serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def cmd_serve(args: argparse.Namespace) -> None:
    from enpipeline.db.engine import make_engine
    from enpipeline.federation.server import serve

    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together")
    if args.max_workers < 1:
        raise CliError("--max-workers must be at least 1")
    settings = _settings()
    # One connection per worker thread: a Fetch holds one for its whole page.
    engine = make_engine(settings.database_url, pool_size=args.max_workers, max_overflow=0,
                         connect_timeout=settings.db_connect_timeout, application_name="enpipeline-federation")

    def ready(port: int) -> None:
        mode = "TLS" if args.tls_cert else "plaintext, no TLS"
        print(f"serving /Federation/Fetch on {args.host}:{port} ({mode}); stop with SIGTERM or Ctrl-C", flush=True)

    try:
        serve(settings, engine, args.host, args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
              max_workers=args.max_workers, on_ready=ready)
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    finally:
        engine.dispose()
    print("stopped", flush=True)


def _region_list(values: list[str] | None) -> tuple[str, ...]:
    return tuple(sorted({r.upper() for r in _split(values)}))


def cmd_authorize(args: argparse.Namespace) -> None:
    from enpipeline.db import federation_out
    from enpipeline.federation.auth import FederationAuthorization

    pem = _read_public_key(args.public_key)
    include, exclude = _region_list(args.include_regions), _region_list(args.exclude_regions)
    overlap = set(include) & set(exclude)
    if overlap:
        raise CliError(f"--include-regions and --exclude-regions overlap: {', '.join(sorted(overlap))}")
    if args.audience is not None and not args.audience.strip():
        raise CliError("--audience must not be empty (leave it out to accept the default audience)")
    partner = (args.partner or args.subject).strip()
    if not partner:
        raise CliError("--partner must not be empty")
    auth = FederationAuthorization(issuer=args.issuer, subject=args.subject, partner=partner, public_key_pem=pem,
                                   audience=args.audience, include_regions=include, exclude_regions=exclude,
                                   note=args.note)
    with _engine(_settings()).begin() as conn:
        if args.replace:
            federation_out.upsert_authorization(conn, auth, now=_now())
        elif not federation_out.add_authorization(conn, auth, now=_now()):
            raise CliError(f"issuer {args.issuer!r} subject {args.subject!r} is already authorized "
                           "(use --replace to change it)")
    print(f"partner {partner!r} (issuer {args.issuer!r}, subject {args.subject!r}) may fetch keys of "
          f"{','.join(include) or 'every region'}"
          + (f" except {','.join(exclude)}" if exclude else "")
          + f"; token audience {args.audience or '(server default)'}")


def _auth_row(auth: Any, as_json: bool) -> dict[str, Any]:
    return {"partner": auth.partner, "issuer": auth.issuer, "subject": auth.subject,
            "audience": auth.audience if as_json else (auth.audience or "(default)"),
            "include_regions": list(auth.include_regions) if as_json else ",".join(auth.include_regions),
            "exclude_regions": list(auth.exclude_regions) if as_json else ",".join(auth.exclude_regions),
            "key_sha256": _key_fingerprint(auth.public_key_pem),
            "note": auth.note if as_json else (auth.note or ""),
            "created_at": auth.created_at.isoformat() if auth.created_at else None}


def cmd_list_authorizations(args: argparse.Namespace) -> None:
    from enpipeline.db import federation_out

    with _engine(_settings()).connect() as conn:
        rows = federation_out.list_authorizations(conn)
    _print([_auth_row(a, args.json) for a in rows], args.json)


def cmd_remove_authorization(args: argparse.Namespace) -> None:
    from enpipeline.db import federation_out

    with _engine(_settings()).begin() as conn:
        if not federation_out.remove_authorization(conn, args.issuer, args.subject):
            raise CliError(f"no authorization for issuer {args.issuer!r} subject {args.subject!r}")
    print(f"removed authorization of issuer {args.issuer!r} subject {args.subject!r}")


def register(group: Any, add: Any) -> None:
    """Add the Fetch server and its partner authorizations to ``enpipeline federation``."""
    p = add(group, "serve", cmd_serve, "serve /Federation/Fetch (gRPC) to authorized partners until SIGTERM")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8081, help="port (default 8081; 0 picks a free one)")
    p.add_argument("--tls-cert", metavar="PEM", help="certificate chain; with --tls-key serves TLS")
    p.add_argument("--tls-key", metavar="PEM", help="unencrypted private key of --tls-cert")
    p.add_argument("--max-workers", type=int, default=8, metavar="N", help="concurrent Fetch calls (default 8)")

    p = add(group, "authorize", cmd_authorize,
            "allow a partner to Fetch with ES256 bearer tokens of (issuer, subject)")
    p.add_argument("--issuer", required=True, help="the token's iss")
    p.add_argument("--subject", required=True, help="the token's sub")
    p.add_argument("--public-key", required=True, metavar="PEM_FILE", help="the partner's ECDSA P-256 public key")
    p.add_argument("--audience", help="the aud its tokens must carry (default ENP_FEDERATION_AUDIENCE)")
    p.add_argument("--partner", help="the partner's name, matching its pull queries and importers (default: subject)")
    p.add_argument("--include-regions", action="append", metavar="US,CA",
                   help="only these regions (requests are narrowed to them); repeatable")
    p.add_argument("--exclude-regions", action="append", metavar="MX", help="never these regions; repeatable")
    p.add_argument("--note")
    p.add_argument("--replace", action="store_true", help="overwrite an existing authorization")

    p = add(group, "list-authorizations", cmd_list_authorizations, "list partners allowed to Fetch")
    p.add_argument("--json", action="store_true")

    p = add(group, "remove-authorization", cmd_remove_authorization, "stop a partner from fetching")
    p.add_argument("--issuer", required=True)
    p.add_argument("--subject", required=True)
