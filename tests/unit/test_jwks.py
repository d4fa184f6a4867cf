"""Unit tests for enpipeline.jwks: JWKS parsing, change planning, URL rules and the failure report."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enpipeline.jwks import (
    HealthAuthorityJwksResult,
    JwksError,
    JwksKey,
    JwksSyncError,
    JwksSyncReport,
    fetch_jwks,
    parse_jwks,
    plan_key_changes,
)
from enpipeline.verification import HealthAuthorityKey
from tests import support

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(days=30)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(key: ec.EllipticCurvePrivateKey, kid: Any, **extra: Any) -> dict[str, Any]:
    """The public JWK of a P-256 key, as a verification server publishes it."""
    numbers = key.public_key().public_numbers()
    out = {"kid": kid, "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
           "x": b64url(numbers.x.to_bytes(32, "big")), "y": b64url(numbers.y.to_bytes(32, "big"))}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def doc(*jwks: dict[str, Any], wrapped: bool = False) -> bytes:
    return json.dumps({"keys": list(jwks)} if wrapped else list(jwks)).encode()


def der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


# --- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare-array", "keys-object"])
def test_parses_both_document_forms_into_pem(wrapped):
    k1, k2 = support.new_signing_key(), support.new_signing_key()
    keys = parse_jwks(doc(jwk(k1, "r2v1"), jwk(k2, "r2v2", alg=None, use=None), wrapped=wrapped))
    assert [k.kid for k in keys] == ["r2v1", "r2v2"]
    assert keys[0].pem == support.public_pem(k1) and keys[1].pem == support.public_pem(k2)
    assert keys[0].der == der(k1)


def test_empty_key_list_is_a_valid_document():
    assert parse_jwks(b"[]") == [] and parse_jwks(b'{"keys": []}') == []


def test_an_exact_repeat_is_served_once():
    k = support.new_signing_key()
    assert [x.kid for x in parse_jwks(doc(jwk(k, "a"), jwk(k, "a")))] == ["a"]


def test_padded_coordinates_are_tolerated():
    k = support.new_signing_key()
    entry = jwk(k, "a")
    entry["x"] += "=" * (-len(entry["x"]) % 4)
    assert parse_jwks(doc(entry))[0].der == der(k)


def _rsa_jwk() -> dict[str, Any]:
    n = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers().n
    return {"kid": "rsa1", "kty": "RSA", "e": "AQAB", "n": b64url(n.to_bytes(256, "big"))}


def _p384_jwk() -> dict[str, Any]:
    numbers = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    return {"kid": "p384", "kty": "EC", "crv": "P-384", "x": b64url(numbers.x.to_bytes(48, "big")),
            "y": b64url(numbers.y.to_bytes(48, "big"))}


K = support.new_signing_key()
K2 = support.new_signing_key()
BAD_DOCUMENTS = {
    "empty body": (b"", "not valid JSON"),
    "malformed JSON": (b'[{"kid": "a",', "not valid JSON"),
    "not UTF-8": (b'["\xff"]', "not valid JSON"),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    "a string": (b'"hello"', "got a string"),
    "object without keys": (b'{"kid": "a"}', 'without "keys"'),
    "keys not an array": (b'{"keys": {"kid": "a"}}', '"keys" must be a JSON array, got an object'),
    "entry not an object": (b"[1]", "key #1 must be a JSON object, got a number"),
    "missing kid": (doc(jwk(K, None)), "key #1 has no kid"),
    "numeric kid": (doc(jwk(K, 7)), "kid that is not a non-empty string: 7"),
    "empty kid": (doc(jwk(K, "")), "kid that is not a non-empty string: ''"),
    "RSA key": (doc(_rsa_jwk()), "kty 'RSA' is not supported; only EC P-256 (ES256)"),
    "P-384 key": (doc(_p384_jwk()), "crv 'P-384' is not supported"),
    "alg RS256": (doc(jwk(K, "a", alg="RS256")), "alg 'RS256' is not ES256"),
    "use enc": (doc(jwk(K, "a", use="enc")), "use 'enc' is not sig"),
    "private key": (doc(jwk(K, "a", d=b64url(b"\x01" * 32))), "contains a private key"),
    "x missing": (doc(jwk(K, "a", x=None)), "x must be a base64url string"),
    "y not a string": (doc(jwk(K, "a", y=12)), "y must be a base64url string"),
    "x not base64url": (doc(jwk(K, "a", x="a+b/c")), "x must be a base64url string"),
    "x too short": (doc(jwk(K, "a", x=b64url(b"\x01" * 31))), "x must be 32 bytes for P-256, got 31"),
    "not on the curve": (doc(jwk(K, "a", y=b64url(b"\x01" * 32))), "not a point on P-256"),
    "one bad key among good ones": (doc(jwk(K, "a"), jwk(K2, "b", crv="P-521")), "key #2 (kid 'b')"),
    "kid twice, different keys": (doc(jwk(K, "a"), jwk(K2, "a")), "kid 'a' is served twice with different keys"),
    "key under two kids": (doc(jwk(K, "a"), jwk(K, "b")), "the same key is served under kids 'a' and 'b'"),
}


@pytest.mark.parametrize(("body", "reason"), list(BAD_DOCUMENTS.values()), ids=list(BAD_DOCUMENTS))
def test_bad_documents_are_rejected_with_a_clear_one_line_reason(body, reason):
    with pytest.raises(JwksError) as info:
        parse_jwks(body)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


# --- planning -------------------------------------------------------------------------------------


def stored(key: ec.EllipticCurvePrivateKey, version: str, *, since: timedelta = timedelta(days=100),
           thru: datetime | None = None, pem: str | None = None) -> HealthAuthorityKey:
    return HealthAuthorityKey(version=version, public_key_pem=pem or support.public_pem(key),
                              from_timestamp=NOW - since, thru_timestamp=thru)


def served(key: ec.EllipticCurvePrivateKey, kid: str) -> JwksKey:
    return JwksKey(kid=kid, pem=support.public_pem(key), der=der(key))


def test_plan_adds_new_keys_and_leaves_served_active_keys_alone():
    a, b = support.new_signing_key(), support.new_signing_key()
    changes = plan_key_changes([stored(a, "a")], [served(a, "a"), served(b, "b")], NOW, TTL)
    assert [k.kid for k in changes.add] == ["b"] and changes.unchanged == 1
    assert changes.revoke == changes.restore == changes.drop == changes.purge == ()


def test_plan_matches_by_key_not_by_kid_or_pem_text():
    a = support.new_signing_key()
    crlf_pem = support.public_pem(a).replace("\n", "\r\n").strip()
    changes = plan_key_changes([stored(a, "manual", pem=crlf_pem)], [served(a, "r2v1")], NOW, TTL)
    assert changes.unchanged == 1 and changes.add == () and changes.revoke == ()


def test_plan_revokes_vanished_keys_and_deletes_ones_that_never_became_valid():
    a, b, c, d = (support.new_signing_key() for _ in range(4))
    keys = [stored(a, "a"), stored(b, "future", since=-timedelta(days=1)), stored(c, "exactly-now", since=timedelta(0)),
            stored(d, "scheduled-expiry", thru=NOW + timedelta(days=3))]
    changes = plan_key_changes(keys, [], NOW, TTL)
    assert changes.revoke == ("a", "scheduled-expiry") and changes.drop == ("future", "exactly-now")


def test_plan_restores_a_revoked_key_served_again_under_its_kid():
    a = support.new_signing_key()
    changes = plan_key_changes([stored(a, "a", thru=NOW - timedelta(days=2))], [served(a, "a")], NOW, TTL)
    assert changes.restore == ("a",) and changes.add == () and changes.unchanged == 0


def test_plan_stores_a_revoked_key_served_under_a_new_kid_as_a_new_version():
    a = support.new_signing_key()
    changes = plan_key_changes([stored(a, "old", thru=NOW - timedelta(days=2))], [served(a, "new")], NOW, TTL)
    assert [k.kid for k in changes.add] == ["new"] and changes.restore == ()


def test_plan_purges_keys_revoked_longer_than_the_ttl_ago():
    a, b, c = (support.new_signing_key() for _ in range(3))
    keys = [stored(a, "old", thru=NOW - TTL - timedelta(seconds=1)), stored(b, "edge", thru=NOW - TTL),
            stored(c, "young", thru=NOW - timedelta(days=29))]
    changes = plan_key_changes(keys, [], NOW, TTL)
    assert changes.purge == ("old",) and changes.revoke == ()


def test_plan_refuses_a_kid_reused_for_a_different_key():
    a, b = support.new_signing_key(), support.new_signing_key()
    for existing in (stored(a, "v1"), stored(a, "v1", thru=NOW - timedelta(days=1))):
        with pytest.raises(JwksError, match="kid 'v1' is already stored for a different key"):
            plan_key_changes([existing], [served(b, "v1")], NOW, TTL)


def test_plan_lets_a_kid_be_reused_once_its_old_key_is_purged():
    a, b = support.new_signing_key(), support.new_signing_key()
    changes = plan_key_changes([stored(a, "v1", thru=NOW - timedelta(days=31))], [served(b, "v1")], NOW, TTL)
    assert changes.purge == ("v1",) and [k.kid for k in changes.add] == ["v1"]


def test_plan_revokes_an_unreadable_stored_key_instead_of_failing():
    a = support.new_signing_key()
    changes = plan_key_changes([stored(a, "junk", pem="not a pem")], [served(a, "a")], NOW, TTL)
    assert changes.revoke == ("junk",) and [k.kid for k in changes.add] == ["a"]


# --- fetching and reporting -----------------------------------------------------------------------


@pytest.mark.parametrize(("url", "reason"), [
    ("file:///etc/passwd", "got file:"),
    ("ftp://example.invalid/jwks", "got ftp:"),
    ("example.invalid/jwks", "got no scheme"),
])
def test_fetch_accepts_only_http_and_https(url, reason):
    with pytest.raises(JwksError, match=f"only http and https URLs are allowed, {reason}"):
        fetch_jwks(url, timedelta(seconds=1), 1024)


def test_report_raises_naming_every_failed_authority():
    report = JwksSyncReport((
        HealthAuthorityJwksResult("good", "https://good.example/jwks", added=1),
        HealthAuthorityJwksResult("bad", "https://bad.example/jwks", error="HTTP status 500, expected 200"),
        HealthAuthorityJwksResult("worse", "https://worse.example/jwks", error="document is not valid JSON"),
    ))
    assert [f.issuer for f in report.failures] == ["bad", "worse"]
    with pytest.raises(JwksSyncError) as info:
        report.raise_for_failures()
    message = str(info.value)
    assert message.startswith("JWKS sync failed for 2 of 3 health authorities: ")
    assert "'bad' (https://bad.example/jwks): HTTP status 500" in message
    assert "'worse' (https://worse.example/jwks): document is not valid JSON" in message
    assert "good" not in message
    JwksSyncReport(report.results[:1]).raise_for_failures()  # nothing failed: no exception
