"""Keep health-authority verification keys in step with each authority's published JWKS document.

Like the reference server, keys are matched by the public key itself, not by ``kid``: a served key that is
already active is left alone whatever its stored version, a new one is stored with ``version = kid`` and
``from = now``, an active key that is no longer served is revoked (``thru = now``), and revoked keys older
than the cleanup TTL are purged. Unlike the reference:

* the standard ``{"keys": [...]}`` form is accepted as well as the reference's bare array;
* only EC P-256 (ES256) public keys are accepted, each with a non-empty string ``kid``;
* a document that fails to fetch or to validate changes nothing for that authority (not even the purge),
  and the sync goes on with the other authorities; ``JwksSyncReport.raise_for_failures`` then fails the
  task naming every authority that failed;
* a revoked key that is served again under its own kid is restored (``thru`` cleared), because the JWKS is
  the source of truth for these authorities: the reference keeps it revoked until it is purged, which locks
  the authority's certificates out for the whole cleanup TTL after a transient bad publish. To revoke a key
  for good, the authority must stop serving it (or the operator clears its jwks_uri);
* a key that vanishes before it ever became valid (``from >= now``) is deleted rather than revoked, since
  ``thru`` must be after ``from`` and such a key never verified anything.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import Engine

from enpipeline import httpget
from enpipeline.db import authorities
from enpipeline.verification import HealthAuthority, HealthAuthorityKey

__all__ = [
    "DEFAULT_MAX_BYTES",
    "HealthAuthorityJwksResult",
    "JwksError",
    "JwksKey",
    "JwksSyncError",
    "JwksSyncReport",
    "KeyChanges",
    "fetch_jwks",
    "parse_jwks",
    "plan_key_changes",
    "sync_health_authority_keys",
]

logger = logging.getLogger("enpipeline.jwks")

DEFAULT_MAX_BYTES = 256 * 1024
# The reference runs at most this many authorities at once (MAX_WORKERS).
DEFAULT_MAX_WORKERS = 5
# RFC 7515 base64url, padding tolerated (some publishers add it).
_B64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


class JwksError(Exception):
    """A JWKS document could not be fetched, parsed or applied; the message is the reason, one line."""


class JwksSyncError(Exception):
    """At least one health authority's JWKS sync failed; the message names each one and its reason."""

    def __init__(self, failures: Sequence[HealthAuthorityJwksResult], total: int):
        self.failures = tuple(failures)
        details = "; ".join(f"{f.issuer!r} ({f.jwks_uri}): {f.error}" for f in self.failures)
        super().__init__(f"JWKS sync failed for {len(self.failures)} of {total} health authorit"
                         f"{'y' if total == 1 else 'ies'}: {details}")


@dataclass(frozen=True)
class JwksKey:
    """One key served in a JWKS document: its kid and its public key as SubjectPublicKeyInfo PEM and DER."""

    kid: str
    pem: str
    der: bytes = field(repr=False)


# -- parsing --------------------------------------------------------------------------------------------

def parse_jwks(body: bytes) -> list[JwksKey]:
    """Parse a JWKS document (a bare array of JWKs, or ``{"keys": [...]}``) into ES256 public keys.

    All or nothing: any entry that is not a usable EC P-256 public key with a string kid rejects the whole
    document with a JwksError, so a half-broken publish never revokes the keys it failed to list.
    """
    try:
        doc = json.loads(body)
    except RecursionError:
        raise JwksError("document is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise JwksError(f"document is not valid JSON: {_one_line(str(exc))}") from None
    if isinstance(doc, dict):
        if "keys" not in doc:
            raise JwksError('document is a JSON object without "keys"; expected a JWK array or {"keys": [...]}')
        doc = doc["keys"]
        if not isinstance(doc, list):
            raise JwksError(f'"keys" must be a JSON array, got {_json_type(doc)}')
    elif not isinstance(doc, list):
        raise JwksError(f'document must be a JWK array or {{"keys": [...]}}, got {_json_type(doc)}')

    by_kid: dict[str, JwksKey] = {}
    by_der: dict[bytes, str] = {}
    for index, entry in enumerate(doc, start=1):
        key = _parse_jwk(entry, index)
        seen = by_kid.get(key.kid)
        if seen is not None:
            if seen.der != key.der:
                raise JwksError(f"kid {key.kid!r} is served twice with different keys")
            continue  # an exact repeat is harmless
        if key.der in by_der:
            # Matching is by key, so one key under two kids would make "which version is it" ambiguous.
            raise JwksError(f"the same key is served under kids {by_der[key.der]!r} and {key.kid!r}")
        by_kid[key.kid] = key
        by_der[key.der] = key.kid
    return list(by_kid.values())


def _parse_jwk(entry: Any, index: int) -> JwksKey:
    where = f"key #{index}"
    if not isinstance(entry, dict):
        raise JwksError(f"{where} must be a JSON object, got {_json_type(entry)}")
    kid = entry.get("kid")
    if kid is None:
        raise JwksError(f"{where} has no kid")
    if not isinstance(kid, str) or not kid:
        raise JwksError(f"{where} has a kid that is not a non-empty string: {kid!r}")
    where = f"key #{index} (kid {kid!r})"
    kty, crv = entry.get("kty"), entry.get("crv")
    if kty != "EC" or crv != "P-256":
        got = f"kty {kty!r}" + (f", crv {crv!r}" if kty == "EC" else "")
        raise JwksError(f"{where}: {got} is not supported; only EC P-256 (ES256) keys are accepted")
    if "alg" in entry and entry["alg"] != "ES256":
        raise JwksError(f"{where}: alg {entry['alg']!r} is not ES256")
    if "use" in entry and entry["use"] != "sig":
        raise JwksError(f"{where}: use {entry['use']!r} is not sig")
    if "d" in entry:
        # Refuse rather than strip it: a published private key is compromised and must be rotated.
        raise JwksError(f"{where} contains a private key (\"d\"); a JWKS must publish public keys only")
    x = _coordinate(entry, "x", where)
    y = _coordinate(entry, "y", where)
    try:
        public_key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError:
        raise JwksError(f"{where}: x, y is not a point on P-256") from None
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = public_key.public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return JwksKey(kid=kid, pem=pem, der=der)


def _coordinate(entry: dict[str, Any], name: str, where: str) -> int:
    raw = entry.get(name)
    if not isinstance(raw, str) or not _B64URL.fullmatch(raw):
        raise JwksError(f"{where}: {name} must be a base64url string")
    try:
        data = base64.urlsafe_b64decode(raw.rstrip("=") + "=" * (-len(raw.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise JwksError(f"{where}: {name} is not valid base64url") from None
    if len(data) != 32:
        raise JwksError(f"{where}: {name} must be 32 bytes for P-256, got {len(data)}")
    return int.from_bytes(data, "big")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- fetching -------------------------------------------------------------------------------------------

def fetch_jwks(url: str, timeout: timedelta, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """GET ``url`` (http or https only) and return the body of a 200 response, at most ``max_bytes`` long.

    ``timeout`` bounds connecting and each read, and the whole download is abandoned once it has taken
    longer than ``timeout``, so a server that trickles bytes holds the sync for at most about twice that.
    (Name resolution is not covered: urllib has no timeout for it.) Every failure is a JwksError.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise JwksError(f"only http and https URLs are allowed, got {scheme + ':' if scheme else 'no scheme'}")
    try:
        return httpget.bounded_get(url, timeout=timeout, max_bytes=max_bytes,
                                   headers={"Accept": "application/json", "User-Agent": "enpipeline-jwks"})
    except httpget.BadStatus as exc:
        if exc.location is not None:  # urllib refuses redirects to schemes other than http(s) and ftp this way
            raise JwksError(f"HTTP status {exc.status}: redirect to {exc.location!r} not followed") from None
        raise JwksError(f"HTTP status {exc.status}, expected 200") from None
    except httpget.TooLarge as exc:
        raise JwksError(f"body is {exc.declared} bytes, more than the {exc.limit} bytes allowed"
                        if exc.declared is not None else f"body is more than the {exc.limit} bytes allowed") from None
    except httpget.TimedOut as exc:
        raise JwksError(str(exc)) from None
    except httpget.Unreachable as exc:
        raise JwksError(f"cannot fetch: {exc}") from None


# -- planning -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyChanges:
    """What one sync does to one authority's keys (versions refer to stored keys)."""

    add: tuple[JwksKey, ...] = ()
    restore: tuple[str, ...] = ()
    revoke: tuple[str, ...] = ()
    # Vanished before they ever became valid: deleted, because thru must be after from.
    drop: tuple[str, ...] = ()
    purge: tuple[str, ...] = ()
    unchanged: int = 0


def plan_key_changes(stored: Sequence[HealthAuthorityKey], served: Sequence[JwksKey], now: datetime,
                     cleanup_ttl: timedelta) -> KeyChanges:
    """Work out the changes that bring ``stored`` in line with ``served`` at ``now``; pure, writes nothing.

    Raises JwksError when a served kid is already stored for a different key: the authority reused a kid,
    and storing the new key under it would either overwrite history or collide with the stored version.
    """
    purge_before = now - cleanup_ttl
    purge = [k for k in stored if k.thru_timestamp is not None and k.thru_timestamp < purge_before]
    kept = [k for k in stored if k not in purge]
    der_of = {k.version: _stored_der(k) for k in kept}
    active = [k for k in kept if k.thru_timestamp is None or k.thru_timestamp > now]
    active_ders = {der_of[k.version] for k in active}
    by_version = {k.version: k for k in kept}

    add: list[JwksKey] = []
    restore: list[str] = []
    unchanged = 0
    for key in served:
        if key.der in active_ders:
            unchanged += 1
            continue
        existing = by_version.get(key.kid)
        if existing is None:
            add.append(key)
        elif der_of[existing.version] == key.der:
            restore.append(existing.version)  # not active (checked above), so it was revoked
        else:
            raise JwksError(f"kid {key.kid!r} is already stored for a different key; a new key needs a new kid")

    served_ders = {key.der for key in served}
    gone = [k for k in active if der_of[k.version] not in served_ders]
    return KeyChanges(
        add=tuple(add), restore=tuple(restore),
        revoke=tuple(k.version for k in gone if k.from_timestamp < now),
        drop=tuple(k.version for k in gone if k.from_timestamp >= now),
        purge=tuple(k.version for k in purge), unchanged=unchanged,
    )


def _stored_der(key: HealthAuthorityKey) -> bytes | None:
    # Compare the key itself, not the PEM text: line endings, wrapping and trailing whitespace vary.
    try:
        public_key = serialization.load_pem_public_key(key.public_key_pem.encode())
    except ValueError:
        return None  # unreadable rows match nothing, so they get revoked rather than block the sync
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- sync -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HealthAuthorityJwksResult:
    """The outcome for one authority: counts of what changed, or the reason nothing did."""

    issuer: str
    jwks_uri: str
    added: int = 0
    restored: int = 0
    revoked: int = 0
    purged: int = 0
    unchanged: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_row(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "jwks_uri": self.jwks_uri, "added": self.added, "restored": self.restored,
                "revoked": self.revoked, "purged": self.purged, "unchanged": self.unchanged,
                "error": self.error or ""}


@dataclass(frozen=True)
class JwksSyncReport:
    """Per-authority outcomes of one sync run, in health-authority id order."""

    results: tuple[HealthAuthorityJwksResult, ...] = ()

    @property
    def failures(self) -> tuple[HealthAuthorityJwksResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    def raise_for_failures(self) -> None:
        """Raise JwksSyncError naming every failed authority (the healthy ones are already synced)."""
        if self.failures:
            raise JwksSyncError(self.failures, len(self.results))


def sync_health_authority_keys(
    engine: Engine,
    now: datetime,
    *,
    timeout: timedelta,
    cleanup_ttl: timedelta,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_workers: int = DEFAULT_MAX_WORKERS,
    fetch: Callable[[str, timedelta, int], bytes] = fetch_jwks,
) -> JwksSyncReport:
    """Sync the keys of every health authority that has a jwks_uri, each in its own transaction.

    Documents are fetched in parallel with no transaction open; then each authority's changes are planned
    and written under an advisory lock on its keys, so overlapping runs serialise and the later one finds
    nothing left to do. A failing authority is reported and skipped; call ``raise_for_failures`` on the
    report to fail the caller after the healthy ones were synced.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    with engine.connect() as conn:
        has = authorities.list_jwks_authorities(conn)
    if not has:
        return JwksSyncReport()

    def load(ha: HealthAuthority) -> list[JwksKey] | JwksError:
        try:
            return parse_jwks(fetch(ha.jwks_uri or "", timeout, max_bytes))
        except JwksError as exc:
            return exc
        except Exception as exc:  # a fetcher bug must not stop the other authorities
            logger.exception("unexpected error fetching the JWKS of %r", ha.issuer)
            return JwksError(f"unexpected {type(exc).__name__}: {_one_line(str(exc))}")

    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(has))),
                            thread_name_prefix="enp-jwks") as pool:
        documents = list(pool.map(load, has))

    results = []
    for ha, document in zip(has, documents, strict=True):
        result = _sync_one(engine, ha, document, now, cleanup_ttl)
        if result is not None:
            results.append(result)
    return JwksSyncReport(tuple(results))


def _sync_one(engine: Engine, ha: HealthAuthority, document: list[JwksKey] | JwksError, now: datetime,
              cleanup_ttl: timedelta) -> HealthAuthorityJwksResult | None:
    url = _display_url(ha.jwks_uri or "")
    try:
        if isinstance(document, JwksError):
            raise document
        with engine.begin() as conn:
            authorities.lock_authority_keys(conn, ha.id)
            current = authorities.get_by_id(conn, ha.id)
            if current is None:
                logger.info("jwks %r: removed during the sync, skipped", ha.issuer)
                return None
            if current.jwks_uri != ha.jwks_uri:
                raise JwksError("jwks_uri changed during the sync; the next run uses the new one")
            changes = plan_key_changes(current.keys, document, now, cleanup_ttl)
            for version in (*changes.purge, *changes.drop):
                authorities.remove_key(conn, ha.id, version)
            for version in changes.revoke:
                authorities.revoke_key(conn, ha.id, version, now)
            for version in changes.restore:
                authorities.restore_key(conn, ha.id, version)
            for key in changes.add:
                authorities.add_key(conn, ha.id, version=key.kid, public_key_pem=key.pem, from_timestamp=now)
    except JwksError as exc:
        error = _one_line(str(exc))
    except Exception as exc:  # e.g. the database: report it with the others, keep the traceback in the log
        logger.exception("unexpected error syncing the JWKS of %r", ha.issuer)
        error = f"unexpected {type(exc).__name__}: {_one_line(str(exc)).split(' [SQL:')[0]}"
    else:
        result = HealthAuthorityJwksResult(
            issuer=ha.issuer, jwks_uri=url, added=len(changes.add), restored=len(changes.restore),
            revoked=len(changes.revoke) + len(changes.drop), purged=len(changes.purge), unchanged=changes.unchanged)
        logger.info("jwks %r (%s): added=%d restored=%d revoked=%d purged=%d unchanged=%d", ha.issuer, url,
                    result.added, result.restored, result.revoked, result.purged, result.unchanged)
        return result
    logger.error("jwks %r (%s): sync failed, nothing changed: %s", ha.issuer, url, error)
    return HealthAuthorityJwksResult(issuer=ha.issuer, jwks_uri=url, error=error)


def _display_url(url: str) -> str:
    """The URL without any user:password@ part, so credentials never reach logs or reports."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))
