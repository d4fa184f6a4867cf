"""Federation authentication: partners present an ES256 bearer JWT signed with a key registered for them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enpipeline.durations import format_duration

log = logging.getLogger(__name__)

ALGORITHM = "ES256"
# Partners' clocks drift a little; the leeway applies to exp, nbf and an iat slightly in the future, never to
# the exp - iat lifetime bound (that would let every token live max_lifetime + leeway).
LEEWAY = timedelta(seconds=30)
_REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat")


class FederationAuthError(Exception):
    """A bearer token was refused. The message is safe to send to the caller: it never quotes the token."""


@dataclass(frozen=True)
class FederationAuthorization:
    """A partner allowed to Fetch from us (table federation_out_authorization)."""

    issuer: str
    subject: str
    partner: str
    public_key_pem: str
    audience: str | None = None      # None: the server's default audience (ENP_FEDERATION_AUDIENCE)
    include_regions: tuple[str, ...] = ()
    exclude_regions: tuple[str, ...] = ()
    note: str | None = None
    created_at: datetime | None = None


def mint_token(private_key_pem: str | bytes, *, issuer: str, subject: str, audience: str, now: datetime,
               lifetime: timedelta) -> str:
    """The bearer token a puller sends: ES256, with iss/sub/aud and a short exp."""
    issued = int(now.timestamp())
    claims = {"iss": issuer, "sub": subject, "aud": audience, "iat": issued,
              "nbf": issued, "exp": issued + int(lifetime.total_seconds())}
    return jwt.encode(claims, private_key_pem, algorithm="ES256")


def bearer_token(values: Sequence[str]) -> str:
    """The token from the ``authorization`` metadata values of one call (the header must appear exactly once)."""
    if not values:
        raise FederationAuthError("missing authorization metadata")
    if len(values) > 1:
        # Two headers could be read differently by a proxy and by us; refuse rather than pick one.
        raise FederationAuthError("authorization metadata must appear exactly once")
    scheme, _, token = str(values[0]).strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise FederationAuthError("authorization must be 'Bearer <token>'")
    return token


def token_principal(token: str) -> tuple[str, str]:
    """The unverified (iss, sub) of an ES256 token, to find the key that must have signed it.

    The algorithm is checked here, before any key is looked up, so no key is ever used with an algorithm the
    partner chose ("none", or HS256 with the public key as the HMAC secret).
    """
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise FederationAuthError("malformed token") from None
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise FederationAuthError(f"token must be signed with {ALGORITHM}, got {str(alg)[:16]!r}")
    if not isinstance(claims, dict):
        raise FederationAuthError("malformed token")
    issuer, subject = claims.get("iss"), claims.get("sub")
    if not isinstance(issuer, str) or not issuer or not isinstance(subject, str) or not subject:
        raise FederationAuthError("token must have string claims 'iss' and 'sub'")
    return issuer, subject


@lru_cache(maxsize=256)
def _public_key(pem: str) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("not an ECDSA P-256 public key")
    return key


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FederationAuthError(f"token claim {name!r} must be a number")
    return float(value)


def verify_token(token: str, authorization: FederationAuthorization, *, default_audience: str, now: datetime,
                 max_lifetime: timedelta, leeway: timedelta = LEEWAY) -> dict[str, Any]:
    """Check ``token`` against the partner's registered key and the time and audience rules; returns its claims.

    Time is a parameter (the server's clock), so PyJWT's own exp/nbf/iat checks, which read the system clock,
    are off and done here instead.
    """
    try:
        key = _public_key(authorization.public_key_pem)
    except ValueError:
        log.error("federation authorization %s/%s has an unusable public key", authorization.issuer,
                  authorization.subject)
        raise FederationAuthError("invalid token signature") from None
    try:
        claims = jwt.decode(token, key, algorithms=[ALGORITHM],
                            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                     "verify_aud": False, "verify_iss": False, "verify_sub": False,
                                     "verify_jti": False})
    except jwt.InvalidSignatureError:
        raise FederationAuthError("invalid token signature") from None
    except jwt.InvalidTokenError:
        raise FederationAuthError("malformed token") from None
    missing = [name for name in _REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise FederationAuthError(f"token is missing claim(s) {', '.join(missing)}")
    if (claims["iss"], claims["sub"]) != (authorization.issuer, authorization.subject):
        raise FederationAuthError("invalid issuer/subject")

    expected = authorization.audience or default_audience
    audience = claims["aud"]
    audiences = audience if isinstance(audience, list) else [audience]  # RFC 7519: a string or a list
    if expected not in audiences:
        raise FederationAuthError("token audience does not match")

    exp, iat = _number(claims, "exp"), _number(claims, "iat")
    now_s, leeway_s = now.timestamp(), leeway.total_seconds()
    if exp <= now_s - leeway_s:
        raise FederationAuthError("token has expired")
    if "nbf" in claims and _number(claims, "nbf") > now_s + leeway_s:
        raise FederationAuthError("token is not valid yet (nbf)")
    if iat > now_s + leeway_s:
        raise FederationAuthError("token is issued in the future (iat)")
    if exp <= iat:
        raise FederationAuthError("token exp must be after iat")
    if exp - iat > max_lifetime.total_seconds():
        raise FederationAuthError(f"token lifetime (exp - iat) exceeds {format_duration(max_lifetime)}")
    return claims
