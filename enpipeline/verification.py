"""Verify health-authority verification certificates (ES256 JWTs) and their TEK HMAC like the reference server."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from enpipeline.cache import TTLCache
from enpipeline.durations import format_duration
from enpipeline.errors import VerificationError
from enpipeline.model import VALID_REPORT_TYPES, AuthorizedApp, ExposureKeyInput, VerifiedClaims

__all__ = [
    "CachedHealthAuthorityLookup",
    "HealthAuthority",
    "HealthAuthorityKey",
    "HealthAuthorityLookup",
    "compute_tekmacs",
    "decode_lenient_base64",
    "hmac_messages",
    "verify_certificate",
]

# Reason strings are the reference's (internal/verification, golang-jwt v3) so logs and API messages match.
REASON_UNSUPPORTED_ALG = "unsupported signing method, must be ES256"
REASON_MISSING_KID = "missing required header field, 'kid' indicating key id"
REASON_NO_PUBLIC_KEYS = "no active public keys for health authority"
REASON_NOT_VALID_YET = "not valid yet (NBF or IAT) in the future"
REASON_BAD_SIGNATURE = "crypto/ecdsa: verification error"
REASON_HMAC_MISMATCH = "HMAC mismatch, publish request does not match disgnosis verification certificate"

_ES256 = jwt.get_algorithm_by_name("ES256")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UINT32_MAX = 2**32 - 1
_URL_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# golang-jwt v3 DecodeSegment: URL alphabet, padding optional but, if present, correct.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*={0,2}")


@dataclass(frozen=True)
class HealthAuthorityKey:
    """One signing key of a health authority (table HealthAuthorityKey)."""

    version: str
    public_key_pem: str
    from_timestamp: datetime
    thru_timestamp: datetime | None = None

    def is_valid_at(self, now: datetime) -> bool:
        """Reference HealthAuthorityKey.IsValid: strictly after from, strictly before thru (if set)."""
        return self.from_timestamp < now and (self.thru_timestamp is None or self.thru_timestamp > now)


@dataclass(frozen=True)
class HealthAuthority:
    """A health authority (table HealthAuthority) with its keys."""

    id: int
    issuer: str
    audience: str
    name: str
    keys: tuple[HealthAuthorityKey, ...] = ()
    jwks_uri: str | None = None


class HealthAuthorityLookup(Protocol):
    def get_by_issuer(self, issuer: str) -> HealthAuthority | None: ...


class CachedHealthAuthorityLookup:
    """TTL cache in front of a lookup; "not found" (None) is cached too, exceptions are not."""

    def __init__(
        self,
        inner: HealthAuthorityLookup,
        ttl: timedelta,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        self._inner = inner
        # `iss` comes from an unverified token, so unknown issuers must not grow the cache without bound.
        self._cache: TTLCache[HealthAuthority | None] = TTLCache(ttl, clock, max_entries)

    def get_by_issuer(self, issuer: str) -> HealthAuthority | None:
        return self._cache.get(issuer, lambda: self._inner.get_by_issuer(issuer))

    def clear(self) -> None:
        self._cache.clear()


# --- base64 -----------------------------------------------------------------------------------------


def decode_lenient_base64(text: str) -> bytes:
    """Decode std or URL base64, padded or not (reference pkg/base64util, i.e. Go RawURLEncoding).

    Raises ValueError("illegal base64 data at input byte N") with Go's byte offset.
    """
    raw = text.replace("+", "-").replace("/", "_").rstrip("=").encode("utf-8")
    data = bytearray()
    for index, byte in enumerate(raw):
        if byte in (0x0A, 0x0D):  # Go's decoder skips CR and LF anywhere
            continue
        if byte not in _URL_ALPHABET:
            raise ValueError(f"illegal base64 data at input byte {index}")
        data.append(byte)
    if len(data) % 4 == 1:
        # A lone trailing character cannot encode a byte; Go reports the last input offset.
        raise ValueError(f"illegal base64 data at input byte {len(raw) - 1}")
    return base64.urlsafe_b64decode(bytes(data) + b"=" * (-len(data) % 4))


def _decode_segment(segment: str) -> bytes:
    padded = segment + "=" * (-len(segment) % 4)
    if not _SEGMENT.fullmatch(padded):
        raise ValueError("illegal base64 data")
    try:
        return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("illegal base64 data") from exc


# --- HMAC -------------------------------------------------------------------------------------------


def hmac_messages(keys: Sequence[ExposureKeyInput]) -> list[bytes]:
    """Canonical HMAC cleartexts: the main form, plus the no-TR form only when every key's TR is 0.

    Raises ValueError for an empty key list (the reference cannot compute an HMAC then).
    """
    if not keys:
        raise ValueError("cannot calculate hmac on empty exposure keys")
    # Sort by the base64 text exactly as sent (Go strings.Compare is byte-wise); never re-encode.
    ordered = sorted(keys, key=lambda k: k.key.encode("utf-8"))
    main = ",".join(f"{k.key}.{k.rolling_start_number}.{k.rolling_period}.{k.transmission_risk}" for k in ordered)
    messages = [main.encode("utf-8")]
    if all(k.transmission_risk == 0 for k in ordered):
        alternate = ",".join(f"{k.key}.{k.rolling_start_number}.{k.rolling_period}" for k in ordered)
        messages.append(alternate.encode("utf-8"))
    return messages


def compute_tekmacs(keys: Sequence[ExposureKeyInput], hmac_key: bytes) -> list[bytes]:
    """HMAC-SHA256 of each acceptable canonical cleartext (see hmac_messages)."""
    return [hmac.new(hmac_key, message, hashlib.sha256).digest() for message in hmac_messages(keys)]


# --- token parsing ----------------------------------------------------------------------------------


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs in document order (Go applies duplicates in order)."""


@dataclass
class _Claims:
    issuer: str = ""
    audience: str = ""
    expires_at: int = 0
    issued_at: int = 0
    not_before: int = 0
    report_type: str = ""
    symptom_onset_interval: int = 0
    tekmac: str = ""


# JSON name -> (attribute, kind). Names are those of golang-jwt v3 StandardClaims + verifyapi.VerificationClaims.
_CLAIM_FIELDS: dict[str, tuple[str | None, str]] = {
    "iss": ("issuer", "string"),
    "aud": ("audience", "string"),
    "exp": ("expires_at", "int64"),
    "iat": ("issued_at", "int64"),
    "nbf": ("not_before", "int64"),
    "sub": (None, "string"),
    "jti": (None, "string"),
    "reportType": ("report_type", "string"),
    "symptomOnsetInterval": ("symptom_onset_interval", "uint32"),
    "tekmac": ("tekmac", "string"),
}


def _fold(name: str) -> str | None:
    # Go's encoding/json matches struct fields case-insensitively (incl. the Kelvin sign and long s).
    name = name.replace("\u212a", "k").replace("\u017f", "s")
    return name.lower() if name.isascii() else None


_FOLDED_FIELDS = {name.lower(): name for name in _CLAIM_FIELDS}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def _load_json(data: bytes) -> Any:
    # Go's decoder replaces invalid UTF-8 in strings and has no NaN/Infinity; mirror both.
    return _replace_lone_surrogates(
        json.loads(data.decode("utf-8", errors="replace"), object_pairs_hook=_Pairs, parse_constant=_reject_constant))


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(value: Any) -> Any:
    """Go turns an unpaired ``\\ud800`` escape into U+FFFD; Python keeps the surrogate, which no database
    driver can encode (an unverified token's ``iss`` is looked up in Postgres)."""
    if isinstance(value, str):
        if _LONE_SURROGATE.search(value):
            return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return value
    if isinstance(value, _Pairs):
        return _Pairs((_replace_lone_surrogates(k), _replace_lone_surrogates(v)) for k, v in value)
    if isinstance(value, list):
        return [_replace_lone_surrogates(v) for v in value]
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return f"number {json.dumps(value)}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, _Pairs):
        return "object"
    return "array"


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    if kind == "uint32":
        return 0 <= value <= _UINT32_MAX
    return _INT64_MIN <= value <= _INT64_MAX


def _decode_claims(payload: bytes) -> _Claims:
    document = _load_json(payload)
    claims = _Claims()
    if document is None:  # Go: unmarshalling `null` into a struct is a no-op
        return claims
    if not isinstance(document, _Pairs):
        raise ValueError(f"json: cannot unmarshal {_json_kind(document)} into Go value of type VerificationClaims")
    for name, value in document:
        folded = _fold(name)
        canonical = _FOLDED_FIELDS.get(folded) if folded is not None else None
        if canonical is None or value is None:  # unknown claims are ignored; null leaves the zero value
            continue
        attribute, kind = _CLAIM_FIELDS[canonical]
        if not _type_ok(value, kind):
            raise ValueError(
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
                f"VerificationClaims.{canonical} of type {kind}"
            )
        if attribute is not None:
            setattr(claims, attribute, value)
    return claims


def _parse_token(token: str) -> tuple[dict[str, Any], _Claims, bytes, str]:
    """Split and decode header and claims (golang-jwt v3 ParseUnverified); the signature stays encoded."""
    if not isinstance(token, str):
        raise VerificationError("token is malformed")
    parts = token.split(".")
    if len(parts) != 3:
        raise VerificationError("token contains an invalid number of segments")
    try:
        header = _load_json(_decode_segment(parts[0]))
    except (ValueError, RecursionError) as exc:
        raise VerificationError(f"token is malformed: invalid header: {exc}") from exc
    if not isinstance(header, _Pairs):
        raise VerificationError("token is malformed: header is not a JSON object")
    try:
        claims = _decode_claims(_decode_segment(parts[1]))
    except (ValueError, RecursionError) as exc:
        raise VerificationError(f"token is malformed: invalid claims: {exc}") from exc
    # The header is a Go map: exact, case-sensitive names, the last duplicate wins.
    return dict(header), claims, f"{parts[0]}.{parts[1]}".encode("ascii"), parts[2]


@lru_cache(maxsize=256)
def _load_p256_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    # Keys change rarely and parsing is the costly part of a lookup, so parsed keys are memoised.
    key = load_pem_public_key(pem.encode("utf-8"))
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("public key is not an ECDSA P-256 key")
    return key


def _signature_valid(signing_input: bytes, signature_segment: str, key: ec.EllipticCurvePublicKey) -> bool:
    try:
        signature = _decode_segment(signature_segment)
        # pyjwt's ES256 expects the JWS raw R||S form and verifies over the exact bytes we parsed the
        # claims from, so there is no second parser that could disagree with ours.
        return bool(_ES256.verify(signing_input, key, signature))
    except Exception:  # any failure inside pyjwt/cryptography means "not verified", never a 500
        return False


# --- verification -----------------------------------------------------------------------------------


def verify_certificate(
    token: str,
    *,
    app: AuthorizedApp,
    keys: Sequence[ExposureKeyInput],
    hmac_key: str,
    lookup: HealthAuthorityLookup,
    now: datetime,
) -> VerifiedClaims:
    """Verify a diagnosis verification certificate for a publish request (protocol.md §3 steps 1-9).

    Raises VerificationError(reason) on any rejection; ``now`` must be timezone-aware.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")

    # 1. Parse; the algorithm is pinned before any key is touched (defeats HS256 confusion and alg=none).
    header, claims, signing_input, signature_segment = _parse_token(token)
    if header.get("alg") != "ES256":
        raise VerificationError(REASON_UNSUPPORTED_ALG)
    if "kid" not in header:
        raise VerificationError(REASON_MISSING_KID)
    kid = header["kid"]

    # 2. Issuer -> health authority (the caller passes a cached lookup).
    # A failing lookup (database down) propagates: the reference answers 401 there, which tells the
    # app its certificate is bad and not to retry; the caller answers 500 so the app retries later.
    authority = lookup.get_by_issuer(claims.issuer)
    if authority is None:
        raise VerificationError(f"issuer not found: {claims.issuer}")

    # 3. Audience: one exact string.
    if claims.audience != authority.audience:
        raise VerificationError(
            f"audience mismatch for issuer: {authority.issuer} (+{claims.audience}, -{authority.audience})"
        )

    # 4. Key with version == kid, valid now. A non-string kid never equals a version (as in Go).
    key = next((k for k in authority.keys if isinstance(kid, str) and k.version == kid and k.is_valid_at(now)), None)
    if key is None:
        raise VerificationError(REASON_NO_PUBLIC_KEYS)
    try:
        public_key = _load_p256_public_key(key.public_key_pem)
    except Exception as exc:  # a bad stored key must not surface as a 500
        raise VerificationError(f"unable to parse public key for health authority: {exc}") from exc

    # 5. Time claims against the given clock, whole Unix seconds, zero leeway; 0 means "not set" (v3).
    now_unix = math.floor(now.timestamp())
    expired_reason = None
    if claims.expires_at and now_unix > claims.expires_at:
        expired_reason = f"token is expired by {format_duration(timedelta(seconds=now_unix - claims.expires_at))}"
    not_yet = bool(
        (claims.issued_at and now_unix < claims.issued_at) or (claims.not_before and now_unix < claims.not_before)
    )

    # 6. Signature. golang-jwt reports claim and signature errors together; the reference maps an
    # iat/nbf problem first, then a bad signature overrides an expiry message.
    signature_ok = _signature_valid(signing_input, signature_segment, public_key)
    if not_yet:
        raise VerificationError(REASON_NOT_VALID_YET)
    if not signature_ok:
        raise VerificationError(REASON_BAD_SIGNATURE)
    if expired_reason:
        raise VerificationError(expired_reason)

    # 7. App authorisation, only after the signature so unsigned probes learn nothing from timing.
    if authority.id not in app.allowed_health_authority_ids:
        raise VerificationError(
            f"app {app.app_package_name} has not authorized health authority issuer: {claims.issuer}"
        )

    # 8. Custom claims.
    if claims.report_type not in VALID_REPORT_TYPES:
        raise VerificationError(f"invalid report type: {json.dumps(claims.report_type, ensure_ascii=False)}")

    # 9. TEK HMAC, constant-time against every acceptable form.
    try:
        certificate_mac = decode_lenient_base64(claims.tekmac)
    except ValueError as exc:
        raise VerificationError(f"error decoding HMAC from claims: {exc}") from exc
    try:
        secret = decode_lenient_base64(hmac_key)
    except ValueError as exc:
        raise VerificationError(f"error decoding HMAC secret from publish request: {exc}") from exc
    try:
        expected = compute_tekmacs(keys, secret)
    except ValueError as exc:
        raise VerificationError(f"calculating expected HMAC: {exc}") from exc
    matched = False
    for want in expected:
        # No short-circuit: compare every form so timing does not reveal which one matched.
        matched = hmac.compare_digest(want, certificate_mac) | matched
    if not matched:
        raise VerificationError(REASON_HMAC_MISMATCH)

    return VerifiedClaims(
        health_authority_id=authority.id,
        report_type=claims.report_type,
        symptom_onset_interval=claims.symptom_onset_interval,
    )
