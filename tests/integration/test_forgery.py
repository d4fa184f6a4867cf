"""Forgery matrix: every way we know to fake a publish or a revision, against the real API on real Postgres.

Each case is one named row of a parametrized table. A rejection must carry the reference's HTTP status, `code` and
message (protocol.md §2.5, §3, §4), and must leave the database as it was: no exposure row inserted or revised.
Harmless variations (keys in another order, unknown extra claims) are accepted, so the matrix is not vacuous.

Covered elsewhere and not repeated here:
* tests/unit/test_verification.py::test_rejections and ::test_garbage_tokens_are_rejected_cleanly: the same
  verifier on claim *types* (float exp, uint32 overflow, bool onset, ...), without a database.
* tests/integration/test_publish_service.py::test_undecryptable_token_with_existing_keys_is_invalid,
  ::test_token_metadata_different_from_stored_is_invalid, ::test_token_covering_only_some_existing_keys: revision
  tokens through the service layer.
* tests/unit/test_revision.py: the codec on tampered, truncated, destroyed-key and wrong-AAD tokens.
* tests/integration/test_federation_server.py::test_auth_failures_are_unauthenticated_with_a_clear_one_line_reason
  (18 cases: missing/duplicate header, not Bearer, alg none, HS256 with the public PEM, unregistered key, unknown
  issuer/subject, wrong audience, expired, lifetime > 1 h, missing exp/iat/aud, nbf/iat in the future). The
  federation cases below are only those it lacks.
* tests/integration/test_efgs.py::test_a_tampered_share_or_a_wrong_certificate_refuses_that_country_only and
  ::test_audit_checks_country_amount_and_certificate_country (tampered share, audit naming another certificate,
  certificate of another country, wrong thumbprint, expired certificate). The EFGS cases below add the
  end-to-end forgeries by the gateway itself and the TLS checks of our client.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from flask.testing import FlaskClient
from sqlalchemy.engine import Engine

from api.app import create_app
from enpipeline.db import apps, authorities
from enpipeline.db.revision_keys import PgRevisionKeyStore
from enpipeline.model import AuthorizedApp, ExposureKeyInput
from enpipeline.proto import revision_pb2
from enpipeline.publish.service import create_publish_service
from enpipeline.revision import KeyWrapper, RevisionTokenCodec, create_key, rotate_keys
from enpipeline.verification import compute_tekmacs, hmac_messages
from tests import logscan, support
from tests.support import APP_ID, AUDIENCE, ISSUER, KID

INVALID_CERT = "health_authority_verification_certificate_invalid"
PREFIX = "unable to validate diagnosis verification: "
HMAC_MISMATCH = "HMAC mismatch, publish request does not match disgnosis verification certificate"
BAD_SIGNATURE = "crypto/ecdsa: verification error"
BAD_ALG = "unsupported signing method, must be ES256"
NO_KEY = "no active public keys for health authority"
NOT_YET = "not valid yet (NBF or IAT) in the future"
OTHER_ISSUER, OTHER_APP = "other-ha", "com.example.other"


# -- a JWS toolkit that lets a case control every byte ------------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(header: dict[str, Any] | str, claims: dict[str, Any] | str) -> str:
    """``header.claims`` as a JWS signing input; strings are taken as the JSON text itself."""
    h = header if isinstance(header, str) else json.dumps(header)
    c = claims if isinstance(claims, str) else json.dumps(claims)
    return f"{b64url(h.encode())}.{b64url(c.encode())}"


def es256_raw(key: ec.EllipticCurvePrivateKey, signing_input: str) -> bytes:
    return jwt.get_algorithm_by_name("ES256").sign(signing_input.encode(), key)


def signed(key: Any, header: dict[str, Any], claims: dict[str, Any], alg: str = "ES256") -> str:
    signing_input = segments(header, claims)
    return f"{signing_input}.{b64url(jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key))}"


def hs256(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = segments(header, claims)
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def tekmac(keys: list[ExposureKeyInput], secret: bytes, form: int = 0) -> str:
    return base64.b64encode(compute_tekmacs(keys, secret)[form]).decode()


def public_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big"))}


# -- the world every publish case runs in --------------------------------------------------------------------------

@dataclass
class World:
    """Our health authority (keys v1 active, 'old' revoked, 'next' not yet active), a second authority with its own
    app, a stranger's key, 14 keys to publish and the HMAC secret the phone made."""

    now: datetime
    ha_key: ec.EllipticCurvePrivateKey
    ha_id: int
    other_key: ec.EllipticCurvePrivateKey
    other_id: int
    old_key: ec.EllipticCurvePrivateKey
    next_key: ec.EllipticCurvePrivateKey
    stranger: ec.EllipticCurvePrivateKey
    keys: list[ExposureKeyInput]
    secret: bytes = field(default_factory=lambda: os.urandom(16))

    @property
    def unix(self) -> int:
        return int(self.now.timestamp())

    def header(self, **changes: Any) -> dict[str, Any]:
        return {k: v for k, v in {"alg": "ES256", "kid": KID, "typ": "JWT", **changes}.items() if v is not None}

    def claims(self, keys: list[ExposureKeyInput] | None = None, **changes: Any) -> dict[str, Any]:
        base = {"iss": ISSUER, "aud": AUDIENCE, "iat": self.unix - 1, "exp": self.unix + 300,
                "reportType": "confirmed", "tekmac": tekmac(self.keys if keys is None else keys, self.secret)}
        return {k: v for k, v in {**base, **changes}.items() if v is not None}

    def token(self, key: Any = None, *, header: dict[str, Any] | None = None, **claim_changes: Any) -> str:
        return signed(key or self.ha_key, header or self.header(), self.claims(**claim_changes))

    def body(self, token: str, *, keys: list[ExposureKeyInput] | None = None, secret: bytes | None = None,
             app_id: str = APP_ID) -> dict[str, Any]:
        keys = self.keys if keys is None else keys
        logscan.register_secret(self.secret if secret is None else secret, "phone HMAC secret")
        return {"temporaryExposureKeys": [{"key": k.key, "rollingStartNumber": k.rolling_start_number,
                                           "rollingPeriod": k.rolling_period,
                                           **({"transmissionRisk": k.transmission_risk}
                                              if k.transmission_risk else {})} for k in keys],
                "healthAuthorityID": app_id, "verificationPayload": token,
                "hmacKey": base64.b64encode(self.secret if secret is None else secret).decode(),
                "padding": base64.b64encode(os.urandom(32)).decode()}


@pytest.fixture
def world(engine: Engine) -> World:
    now = support.fixed_now()
    ha_key, other_key, old_key, next_key = (support.new_signing_key() for _ in range(4))
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    with engine.begin() as conn:
        ha_id = authorities.add_authority(conn, issuer=ISSUER, audience=AUDIENCE, name="Test HA")
        authorities.add_key(conn, ha_id, version=KID, public_key_pem=support.public_pem(ha_key),
                            from_timestamp=long_ago)
        authorities.add_key(conn, ha_id, version="old", public_key_pem=support.public_pem(old_key),
                            from_timestamp=long_ago, thru_timestamp=now - timedelta(days=1))
        authorities.add_key(conn, ha_id, version="next", public_key_pem=support.public_pem(next_key),
                            from_timestamp=now + timedelta(days=1))
        other_id = authorities.add_authority(conn, issuer=OTHER_ISSUER, audience=AUDIENCE, name="Other HA")
        # The other authority also has a key "v2" that ours lacks, and a "v1" of its own.
        authorities.add_key(conn, other_id, version=KID, public_key_pem=support.public_pem(other_key),
                            from_timestamp=long_ago)
        authorities.add_key(conn, other_id, version="v2", public_key_pem=support.public_pem(other_key),
                            from_timestamp=long_ago)
        apps.upsert_app(conn, AuthorizedApp(app_package_name=APP_ID, allowed_regions=("US",),
                                            allowed_health_authority_ids=(ha_id,)))
        apps.upsert_app(conn, AuthorizedApp(app_package_name=OTHER_APP, allowed_regions=("CA",),
                                            allowed_health_authority_ids=(other_id,)))
    return World(now=now, ha_key=ha_key, ha_id=ha_id, other_key=other_key, other_id=other_id, old_key=old_key,
                 next_key=next_key, stranger=support.new_signing_key(), keys=support.day_keys(now))


@pytest.fixture
def make_client(settings, engine: Engine, world: World) -> Callable[..., FlaskClient]:
    def make(**overrides: Any) -> FlaskClient:
        s = settings.replace(**overrides)
        return create_app(s, service=create_publish_service(s, engine), clock=lambda: world.now).test_client()
    return make


@pytest.fixture
def client(make_client) -> FlaskClient:
    return make_client()


def post(client: FlaskClient, body: dict[str, Any] | str) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/v1/publish", data=data, headers={"Content-Type": "application/json"})
    return response.status_code, response.get_json()


def exposure_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT exposure_key, report_type, revised_report_type, revised_at, health_authority_id, regions"
            " FROM exposure ORDER BY exposure_key")).mappings()]


# -- certificate cases ----------------------------------------------------------------------------------------------

def _alter(keys: list[ExposureKeyInput], index: int, **changes: Any) -> list[ExposureKeyInput]:
    out = list(keys)
    out[index] = dataclasses.replace(out[index], **changes)
    return out


def _der_signature(w: World) -> dict[str, Any]:
    signing_input = segments(w.header(), w.claims())
    raw = es256_raw(w.ha_key, signing_input)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    return w.body(f"{signing_input}.{b64url(der)}")


def _resign_other_claims(w: World) -> dict[str, Any]:
    """Claims changed after signing: a likely certificate turned into a confirmed one."""
    token = signed(w.ha_key, w.header(), w.claims(reportType="likely"))
    header, _, signature = token.split(".")
    claims = segments(w.header(), w.claims()).split(".")[1]
    return w.body(f"{header}.{claims}.{signature}")


def _header_changed_after_signing(w: World) -> dict[str, Any]:
    token = w.token()
    _, claims, signature = token.split(".")
    header = b64url(json.dumps(w.header(typ="JOSE", cty="forged")).encode())
    return w.body(f"{header}.{claims}.{signature}")


def _signature_of_another_token(w: World) -> dict[str, Any]:
    victim = w.token()
    other = w.token(iat=w.unix - 2)
    return w.body(victim.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1])


def _keys_added(w: World) -> dict[str, Any]:
    certified = w.keys[:-1]
    return w.body(w.token(keys=certified))


def _keys_removed(w: World) -> dict[str, Any]:
    return w.body(w.token(), keys=w.keys[:-1])


def _alternate_form_with_tr(w: World) -> dict[str, Any]:
    keys = [dataclasses.replace(k, transmission_risk=3) for k in w.keys]
    # The TR-less form is only accepted when every key's TR is 0.
    alternate = hmac.new(w.secret, hmac_messages([dataclasses.replace(k, transmission_risk=0) for k in keys])[1],
                         hashlib.sha256).digest()
    return w.body(w.token(tekmac=base64.b64encode(alternate).decode()), keys=keys)


def _replay_with_other_keys(w: World) -> dict[str, Any]:
    token = w.token()
    return w.body(token, keys=support.day_keys(w.now))


def _huge_header(w: World) -> dict[str, Any]:
    return w.body(signed(w.stranger, w.header(pad="x" * 40_000), w.claims()))


def _nested_header(w: World) -> dict[str, Any]:
    return w.body(f"{b64url(b'[' * 30_000)}.{segments(w.header(), w.claims()).split('.')[1]}.AAAA")


Build = Callable[[World], "dict[str, Any] | str"]


@dataclass(frozen=True)
class Case:
    build: Build
    reason: str                      # the message after "unable to validate diagnosis verification: "
    status: int = 401
    code: str = INVALID_CERT
    exact: bool = True               # False: ``reason`` is a prefix (the rest quotes Python or JSON detail)


CERTIFICATE_CASES: dict[str, Case] = {
    # algorithm confusion: the algorithm is pinned to ES256 before any key is touched
    "alg-hs256-public-pem-as-secret": Case(
        lambda w: w.body(hs256(support.public_pem(w.ha_key).encode(), w.header(alg="HS256"), w.claims())), BAD_ALG),
    "alg-hs256-public-der-as-secret": Case(
        lambda w: w.body(hs256(public_der(w.ha_key), w.header(alg="HS256"), w.claims())), BAD_ALG),
    "alg-rs256": Case(lambda w: w.body(signed(rsa.generate_private_key(65537, 2048), w.header(alg="RS256"),
                                              w.claims(), "RS256")), BAD_ALG),
    "alg-ps256": Case(lambda w: w.body(signed(rsa.generate_private_key(65537, 2048), w.header(alg="PS256"),
                                              w.claims(), "PS256")), BAD_ALG),
    "alg-es384": Case(lambda w: w.body(signed(ec.generate_private_key(ec.SECP384R1()), w.header(alg="ES384"),
                                              w.claims(), "ES384")), BAD_ALG),
    "alg-es512": Case(lambda w: w.body(signed(ec.generate_private_key(ec.SECP521R1()), w.header(alg="ES512"),
                                              w.claims(), "ES512")), BAD_ALG),
    "alg-es256k": Case(lambda w: w.body(signed(ec.generate_private_key(ec.SECP256K1()), w.header(alg="ES256K"),
                                               w.claims(), "ES256K")), BAD_ALG),
    "alg-lowercase-es256": Case(lambda w: w.body(signed(w.ha_key, w.header(alg="es256"), w.claims())), BAD_ALG),
    "alg-none-empty-signature": Case(lambda w: w.body(segments(w.header(alg="none"), w.claims()) + "."), BAD_ALG),
    "alg-NONE-empty-signature": Case(lambda w: w.body(segments(w.header(alg="NONE"), w.claims()) + "."), BAD_ALG),
    "alg-none-without-signature-part": Case(lambda w: w.body(segments(w.header(alg="none"), w.claims())),
                                            "token contains an invalid number of segments"),
    "alg-missing": Case(lambda w: w.body(signed(w.ha_key, {"kid": KID, "typ": "JWT"}, w.claims())), BAD_ALG),
    "alg-es256-with-hmac-signature": Case(
        lambda w: w.body(hs256(support.public_pem(w.ha_key).encode(), w.header(), w.claims())), BAD_SIGNATURE),
    "alg-es256-with-der-signature": Case(_der_signature, BAD_SIGNATURE),
    # keys: only the registered key named by kid, of the issuer named by iss, verifies
    "stranger-key": Case(lambda w: w.body(w.token(w.stranger)), BAD_SIGNATURE),
    "other-authority-key-our-issuer": Case(lambda w: w.body(w.token(w.other_key)), BAD_SIGNATURE),
    "other-authority-certificate-not-allowed-by-app": Case(
        lambda w: w.body(w.token(w.other_key, iss=OTHER_ISSUER)),
        f"app {APP_ID} has not authorized health authority issuer: {OTHER_ISSUER}"),
    "other-authority-kid-our-issuer": Case(lambda w: w.body(w.token(w.other_key, header=w.header(kid="v2"))), NO_KEY),
    "embedded-jwk-header": Case(
        lambda w: w.body(w.token(w.stranger, header=w.header(jwk=public_jwk(w.stranger)))), BAD_SIGNATURE),
    "jku-header": Case(lambda w: w.body(w.token(w.stranger, header=w.header(jku="https://attacker.example/jwks"))),
                       BAD_SIGNATURE),
    "x5u-header": Case(lambda w: w.body(w.token(w.stranger, header=w.header(x5u="https://attacker.example/c.pem"))),
                       BAD_SIGNATURE),
    "kid-unknown": Case(lambda w: w.body(w.token(w.stranger, header=w.header(kid="v9"))), NO_KEY),
    "kid-revoked": Case(lambda w: w.body(w.token(w.old_key, header=w.header(kid="old"))), NO_KEY),
    "kid-not-yet-active": Case(lambda w: w.body(w.token(w.next_key, header=w.header(kid="next"))), NO_KEY),
    "kid-path-traversal": Case(lambda w: w.body(w.token(w.stranger, header=w.header(kid="../../../../dev/null"))),
                               NO_KEY),
    "kid-sql": Case(lambda w: w.body(w.token(w.stranger, header=w.header(kid="v1' OR '1'='1"))), NO_KEY),
    "kid-missing": Case(lambda w: w.body(w.token(header={"alg": "ES256", "typ": "JWT"})),
                        "missing required header field, 'kid' indicating key id"),
    "kid-not-a-string": Case(lambda w: w.body(w.token(header=w.header(kid=["v1"]))), NO_KEY),
    # time
    "expired": Case(lambda w: w.body(w.token(iat=w.unix - 600, exp=w.unix - 60)), "token is expired by 1m0s"),
    "expired-by-1s": Case(lambda w: w.body(w.token(iat=w.unix - 600, exp=w.unix - 1)), "token is expired by 1s"),
    "iat-1s-in-the-future": Case(lambda w: w.body(w.token(iat=w.unix + 1)), NOT_YET),
    "nbf-1s-in-the-future": Case(lambda w: w.body(w.token(nbf=w.unix + 1)), NOT_YET),
    "iat-a-day-in-the-future": Case(lambda w: w.body(w.token(iat=w.unix + 86_400, exp=w.unix + 86_700)), NOT_YET),
    # audience, issuer, claims
    "wrong-audience": Case(lambda w: w.body(w.token(aud="someone-else")),
                           f"audience mismatch for issuer: {ISSUER} (+someone-else, -{AUDIENCE})"),
    "audience-missing": Case(lambda w: w.body(signed(w.ha_key, w.header(), {
        k: v for k, v in w.claims().items() if k != "aud"})),
        f"audience mismatch for issuer: {ISSUER} (+, -{AUDIENCE})"),
    "audience-as-list": Case(lambda w: w.body(w.token(aud=[AUDIENCE])),
                             "token is malformed: invalid claims: json: cannot unmarshal array into Go struct field "
                             "VerificationClaims.aud of type string"),
    "wrong-issuer": Case(lambda w: w.body(w.token(iss="nobody")), "issuer not found: nobody"),
    "issuer-missing": Case(lambda w: w.body(signed(w.ha_key, w.header(), {
        k: v for k, v in w.claims().items() if k != "iss"})), "issuer not found: "),
    "issuer-case-changed": Case(lambda w: w.body(w.token(iss=ISSUER.upper())), f"issuer not found: {ISSUER.upper()}"),
    "report-type-missing": Case(lambda w: w.body(signed(w.ha_key, w.header(), {
        k: v for k, v in w.claims().items() if k != "reportType"})), 'invalid report type: ""'),
    "report-type-unknown": Case(lambda w: w.body(w.token(reportType="positive")), 'invalid report type: "positive"'),
    "tekmac-missing": Case(lambda w: w.body(signed(w.ha_key, w.header(), {
        k: v for k, v in w.claims().items() if k != "tekmac"})), HMAC_MISMATCH),
    "tekmac-not-base64": Case(lambda w: w.body(w.token(tekmac="!!")),
                              "error decoding HMAC from claims: illegal base64 data at input byte 0"),
    # tekmac: the certificate binds exactly the keys (and their metadata) it was issued for
    "tekmac-key-added": Case(_keys_added, HMAC_MISMATCH),
    "tekmac-key-removed": Case(_keys_removed, HMAC_MISMATCH),
    "tekmac-key-altered": Case(lambda w: w.body(w.token(), keys=_alter(w.keys, 3, key=support.random_key_b64())),
                               HMAC_MISMATCH),
    "tekmac-rolling-start-altered": Case(
        lambda w: w.body(w.token(), keys=_alter(w.keys, 0, rolling_start_number=w.keys[0].rolling_start_number - 1)),
        HMAC_MISMATCH),
    "tekmac-rolling-period-altered": Case(lambda w: w.body(w.token(), keys=_alter(w.keys, 5, rolling_period=143)),
                                          HMAC_MISMATCH),
    "tekmac-transmission-risk-altered": Case(lambda w: w.body(w.token(), keys=_alter(w.keys, 7, transmission_risk=5)),
                                             HMAC_MISMATCH),
    "tekmac-alternate-form-with-nonzero-tr": Case(_alternate_form_with_tr, HMAC_MISMATCH),
    "tekmac-other-hmac-secret": Case(lambda w: w.body(w.token(), secret=os.urandom(16)), HMAC_MISMATCH),
    "replay-certificate-with-other-keys": Case(_replay_with_other_keys, HMAC_MISMATCH),
    "no-keys": Case(lambda w: w.body(w.token(keys=w.keys), keys=[]),
                    "calculating expected HMAC: cannot calculate hmac on empty exposure keys"),
    "hmac-key-not-base64": Case(lambda w: {**w.body(w.token()), "hmacKey": "#secret#"},
                                "error decoding HMAC secret from publish request: illegal base64 data at input byte 0"),
    # the signature covers exactly header.claims
    "claims-changed-after-signing": Case(_resign_other_claims, BAD_SIGNATURE),
    "header-changed-after-signing": Case(_header_changed_after_signing, BAD_SIGNATURE),
    "signature-of-another-token": Case(_signature_of_another_token, BAD_SIGNATURE),
    "signature-truncated": Case(lambda w: w.body(w.token()[:-8]), BAD_SIGNATURE),
    "signature-empty": Case(lambda w: w.body(w.token().rsplit(".", 1)[0] + "."), BAD_SIGNATURE),
    "signature-not-base64url": Case(lambda w: w.body(w.token()[:-2] + "+/"), BAD_SIGNATURE),
    # malformed
    "empty-payload": Case(lambda w: w.body(""), "token contains an invalid number of segments"),
    "one-segment": Case(lambda w: w.body(b64url(json.dumps(w.claims()).encode())),
                        "token contains an invalid number of segments"),
    "four-segments": Case(lambda w: w.body(w.token() + ".AAAA"), "token contains an invalid number of segments"),
    "header-bad-base64": Case(lambda w: w.body("!!!." + w.token().split(".", 1)[1]),
                              "token is malformed: invalid header: illegal base64 data"),
    "claims-bad-base64": Case(lambda w: w.body(w.token().split(".")[0] + ".!!!.AAAA"),
                              "token is malformed: invalid claims: illegal base64 data"),
    "header-not-json": Case(lambda w: w.body(f"{b64url(b'not json')}.{b64url(b'{}')}.AAAA"),
                            "token is malformed: invalid header: ", exact=False),
    "header-not-an-object": Case(lambda w: w.body(f"{b64url(b'[1]')}.{b64url(b'{}')}.AAAA"),
                                 "token is malformed: header is not a JSON object"),
    "header-nested-30000-deep": Case(_nested_header, "token is malformed: invalid header: ", exact=False),
    "header-40kb-signed-by-stranger": Case(_huge_header, BAD_SIGNATURE),
    "header-over-the-body-limit": Case(lambda w: w.body(segments(w.header(pad="x" * 70_000), w.claims()) + ".AA"),
                                       "error unmarshalling API call, code: 413: http: request body too large",
                                       status=413, code="bad_request"),
    "payload-not-a-string": Case(lambda w: {**w.body(""), "verificationPayload": 12345},
                                 'error unmarshalling API call, code: 400: invalid value "verificationPayload"',
                                 status=400, code="bad_request", exact=False),
}


@pytest.mark.parametrize("name", list(CERTIFICATE_CASES))
def test_forged_certificate_is_refused_and_nothing_is_stored(client, engine, world, name):
    case = CERTIFICATE_CASES[name]
    status, payload = post(client, case.build(world))
    assert status == case.status, payload
    assert payload["code"] == case.code
    expected = case.reason if case.code != INVALID_CERT else PREFIX + case.reason
    if case.exact:
        assert payload["error"] == expected
    else:
        assert payload["error"].startswith(expected), payload["error"]
    assert "revisionToken" not in payload and "insertedExposures" not in payload
    assert exposure_rows(engine) == []


ACCEPTED_VARIATIONS: dict[str, Build] = {
    "as-issued": lambda w: w.body(w.token()),
    # The HMAC is over the keys sorted by their base64 text, so the order of the request does not matter.
    "keys-in-another-order": lambda w: w.body(w.token(), keys=list(reversed(w.keys))),
    # Unknown claims are ignored (golang-jwt's StandardClaims); they grant nothing.
    "extra-unknown-claims": lambda w: w.body(w.token(admin=True, scope="all", regions=["ZZ"])),
    "no-exp": lambda w: w.body(signed(w.ha_key, w.header(), {k: v for k, v in w.claims().items() if k != "exp"})),
    "alternate-tekmac-form-all-tr-zero": lambda w: w.body(w.token(tekmac=tekmac(w.keys, w.secret, form=1))),
    "unpadded-url-safe-tekmac": lambda w: w.body(w.token(
        tekmac=base64.urlsafe_b64encode(compute_tekmacs(w.keys, w.secret)[0]).rstrip(b"=").decode())),
}


@pytest.mark.parametrize("name", list(ACCEPTED_VARIATIONS))
def test_harmless_variations_are_accepted(client, engine, world, name):
    """The controls: the same setup accepts a genuine certificate, so every refusal above is the forgery's doing."""
    status, payload = post(client, ACCEPTED_VARIATIONS[name](world))
    assert status == 200, payload
    assert payload["insertedExposures"] == 14
    rows = exposure_rows(engine)
    assert len(rows) == 14 and {r["report_type"] for r in rows} == {"confirmed"}
    assert {r["health_authority_id"] for r in rows} == {world.ha_id}


def test_extra_claims_cannot_widen_regions_or_change_the_authority(client, engine, world):
    status, _ = post(client, world.body(world.token(regions=["CA", "ZZ"], health_authority_id=world.other_id,
                                                    appPackageName=OTHER_APP)))
    assert status == 200
    assert {tuple(r["regions"]) for r in exposure_rows(engine)} == {("US",)}
    assert {r["health_authority_id"] for r in exposure_rows(engine)} == {world.ha_id}


# -- revision tokens ----------------------------------------------------------------------------------------------

@dataclass
class Published:
    """Three keys published as 'likely' through our app, and the token the server returned."""

    keys: list[ExposureKeyInput]
    token: str
    raw: bytes

    def revision(self, w: World, token: str, *, app_id: str = APP_ID, key: Any = None,
                 issuer: str = ISSUER) -> dict[str, Any]:
        """A confirmed re-publish of the same keys: a revision, if the token allows it."""
        w.secret = os.urandom(16)
        return {**w.body(w.token(key, iss=issuer, keys=self.keys), keys=self.keys, app_id=app_id),
                "revisionToken": token}


@pytest.fixture
def published(client, engine, world) -> Published:
    keys = world.keys[:3]
    status, payload = post(client, world.body(world.token(keys=keys, reportType="likely"), keys=keys))
    assert status == 200 and payload["insertedExposures"] == 3, payload
    token = payload["revisionToken"]
    return Published(keys, token, base64.b64decode(token))


def _flip(raw: bytes, position: int) -> str:
    flipped = bytearray(raw)
    flipped[position % len(raw)] ^= 0x01
    return base64.b64encode(bytes(flipped)).decode()


def _flip_published(ctx: RevisionContext, *, position: int) -> str:
    return _flip(ctx.published.raw, position)


def _envelope(kid: str, data: bytes) -> str:
    return base64.b64encode(revision_pb2.RevisionToken(kid=kid, data=data).SerializeToString()).decode()


def _token_of_other_app(ctx: RevisionContext) -> str:
    keys = support.day_keys(ctx.world.now, 3)
    body = ctx.world.body(ctx.world.token(ctx.world.other_key, iss=OTHER_ISSUER, keys=keys), keys=keys,
                          app_id=OTHER_APP)
    status, payload = post(ctx.client, body)
    assert status == 200, payload
    return payload["revisionToken"]


def _token_for_other_keys_same_app(ctx: RevisionContext) -> str:
    keys = support.day_keys(ctx.world.now, 3)
    status, payload = post(ctx.client, ctx.world.body(ctx.world.token(keys=keys, reportType="likely"), keys=keys))
    assert status == 200, payload
    return payload["revisionToken"]


def _other_deployment(ctx: RevisionContext) -> str:
    """Sealed by another server: its own KEK and AAD, and (like ours) revision key id 1."""
    from enpipeline.revision import InMemoryRevisionKeyStore

    store = InMemoryRevisionKeyStore()
    codec = RevisionTokenCodec(store, KeyWrapper(os.urandom(32)), os.urandom(16))
    return codec.encrypt(ctx.codec_entries(), ctx.world.now)


def _same_key_other_aad(ctx: RevisionContext) -> str:
    """Our own revision key, but another AAD: what a token minted for another deployment sharing a KEK looks like."""
    codec = RevisionTokenCodec(PgRevisionKeyStore(ctx.engine), KeyWrapper(ctx.settings.revision_token_kek),
                               os.urandom(16))
    return codec.encrypt(ctx.codec_entries(), ctx.world.now)


def _kid_swapped(ctx: RevisionContext) -> str:
    """The data of our token under the id of another allowed revision key."""
    create_key(PgRevisionKeyStore(ctx.engine), KeyWrapper(ctx.settings.revision_token_kek), ctx.world.now)
    envelope = revision_pb2.RevisionToken.FromString(ctx.published.raw)
    return _envelope(str(int(envelope.kid) + 1), envelope.data)


@dataclass
class RevisionContext:
    world: World
    published: Published
    client: FlaskClient
    engine: Engine
    settings: Any

    def codec_entries(self) -> list[Any]:
        from enpipeline.model import RevisableKey

        return [RevisableKey(base64.b64decode(k.key), k.rolling_start_number, k.rolling_period)
                for k in self.published.keys]


INVALID_TOKEN = ("invalid_revision_token", "revision token is invalid")
MISSING_TOKEN = ("missing_revision_token", "no revision token, but sent existing keys")

TOKEN_CASES: dict[str, tuple[Callable[[RevisionContext], str], tuple[str, str]]] = {
    **{f"bit-flip-byte-{p}": (functools.partial(_flip_published, position=p), INVALID_TOKEN)
       for p in (0, 1, 2, 3, 4, 6, 10, 17, 100, 300, -17, -1)},
    "truncated-by-1": (lambda c: base64.b64encode(c.published.raw[:-1]).decode(), INVALID_TOKEN),
    "truncated-tag": (lambda c: base64.b64encode(c.published.raw[:-16]).decode(), INVALID_TOKEN),
    "truncated-to-half": (lambda c: base64.b64encode(c.published.raw[:len(c.published.raw) // 2]).decode(),
                          INVALID_TOKEN),
    "truncated-to-envelope-head": (lambda c: base64.b64encode(c.published.raw[:6]).decode(), INVALID_TOKEN),
    "random-bytes-same-length": (lambda c: base64.b64encode(os.urandom(len(c.published.raw))).decode(),
                                 INVALID_TOKEN),
    "random-16-bytes": (lambda c: base64.b64encode(os.urandom(16)).decode(), INVALID_TOKEN),
    "unknown-key-id": (lambda c: _envelope("999", os.urandom(200)), INVALID_TOKEN),
    "key-id-not-a-number": (lambda c: _envelope("1; DROP TABLE revision_key", c.published.raw[5:]), INVALID_TOKEN),
    "key-id-swapped-to-another-key": (_kid_swapped, INVALID_TOKEN),
    "sealed-by-another-deployment": (_other_deployment, INVALID_TOKEN),
    "our-key-other-aad": (_same_key_other_aad, INVALID_TOKEN),
    "token-of-another-app-and-authority": (_token_of_other_app, INVALID_TOKEN),
    "token-for-other-keys-same-app": (_token_for_other_keys_same_app, INVALID_TOKEN),
    # The reference treats a token that is not base64 at all as no token.
    "not-base64": (lambda c: "***" + c.published.token[3:], MISSING_TOKEN),
    "empty": (lambda c: "", MISSING_TOKEN),
}


def _assert_nothing_revised(engine: Engine, published: Published, world: World) -> None:
    rows = {base64.b64encode(bytes(r["exposure_key"])).decode(): r for r in exposure_rows(engine)}
    for k in published.keys:
        row = rows[k.key]
        assert (row["report_type"], row["revised_report_type"], row["revised_at"]) == ("likely", None, None)
        assert row["health_authority_id"] == world.ha_id


@pytest.mark.parametrize("name", list(TOKEN_CASES))
def test_forged_revision_token_revises_nothing(client, engine, world, published, settings, name):
    build, (code, message) = TOKEN_CASES[name]
    token = build(RevisionContext(world, published, client, engine, settings))
    status, payload = post(client, published.revision(world, token))
    assert (status, payload["code"], payload["error"]) == (400, code, message)
    assert "revisionToken" not in payload
    _assert_nothing_revised(engine, published, world)


def test_token_sealed_by_a_rotated_away_key_revises_nothing(make_client, engine, world, published, settings):
    """Rotation destroys a key 15 days after its successor was made; the token it sealed is then dead for good."""
    store, wrapper = PgRevisionKeyStore(engine), KeyWrapper(settings.revision_token_kek)
    later = world.now + timedelta(days=8)
    rotate_keys(store, wrapper, later, new_key_period=timedelta(days=7), delete_old_key_period=timedelta(days=15))
    result = rotate_keys(store, wrapper, later + timedelta(days=16), new_key_period=timedelta(days=7),
                         delete_old_key_period=timedelta(days=15))
    assert int(revision_pb2.RevisionToken.FromString(published.raw).kid) in result.destroyed
    fresh = make_client()  # a new worker: no cached copy of the destroyed key
    status, payload = post(fresh, published.revision(world, published.token))
    assert (status, payload["code"], payload["error"]) == (400, *INVALID_TOKEN)
    _assert_nothing_revised(engine, published, world)


def test_genuine_token_revises(client, engine, world, published):
    """The control: the token the server handed out does revise the keys it covers."""
    status, payload = post(client, published.revision(world, published.token))
    assert status == 200, payload
    rows = exposure_rows(engine)
    assert [(r["report_type"], r["revised_report_type"]) for r in rows] == [("likely", "confirmed")] * 3


def test_owner_token_through_another_app_revises_like_the_reference(client, engine, world, published):
    """Deliberately as the reference: the token, not the app, proves ownership of the keys (a phone that moved to
    another app keeps its token). The revision is attributed to the authority that certified it, and regions are
    only ever added."""
    status, payload = post(client, published.revision(world, published.token, app_id=OTHER_APP,
                                                      key=world.other_key, issuer=OTHER_ISSUER))
    assert status == 200, payload
    rows = exposure_rows(engine)
    assert {(r["revised_report_type"], r["health_authority_id"], tuple(r["regions"])) for r in rows} == {
        ("confirmed", world.other_id, ("CA", "US"))}


def test_every_single_bit_flip_of_a_token_fails_to_open(settings, engine, world, published):
    """All bit positions, below the API (one publish per position would take minutes): none opens."""
    from enpipeline.errors import RevisionTokenError

    codec = RevisionTokenCodec(PgRevisionKeyStore(engine), KeyWrapper(settings.revision_token_kek),
                               settings.revision_token_aad)
    assert len(codec.decrypt(published.raw)) == 3
    opened = []
    for bit in range(len(published.raw) * 8):
        flipped = bytearray(published.raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            keys = codec.decrypt(bytes(flipped))
        except RevisionTokenError:
            continue
        opened.append((bit, len(keys)))
    assert opened == [], f"{len(opened)} of {len(published.raw) * 8} bit flips still open"


# -- federation bearer tokens: the cases test_federation_server.py lacks ------------------------------------------

@pytest.fixture
def federation(engine, settings) -> Iterator[Federation]:
    from enpipeline.db import exposures
    from enpipeline.federation.server import build_server
    from enpipeline.proto import federation_pb2_grpc as pb_grpc

    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE federation_out_authorization RESTART IDENTITY CASCADE"))
    now = support.fixed_now()
    fed = Federation(now=now, settings=settings, a_key=support.new_signing_key(), b_key=support.new_signing_key())
    fed.authorize(engine, "https://partner-a.example", "fetcher", "partner-a", fed.a_key)
    fed.authorize(engine, "https://partner-b.example", "fetcher", "partner-b", fed.b_key)
    # A key that any authenticated call would be served: a refusal must not carry it.
    hour = now.replace(minute=0, second=0, microsecond=0)
    exposures.PartitionGuard(engine).ensure([hour - timedelta(hours=3)])
    fed.key = os.urandom(16)
    with engine.begin() as conn:
        from enpipeline.model import Exposure
        from enpipeline.timeutil import interval_number

        exposures.insert_exposures(conn, [Exposure(
            exposure_key=fed.key, transmission_risk=2, app_package_name=APP_ID, regions=["US"], traveler=False,
            interval_number=interval_number(now - timedelta(days=2)), interval_count=144,
            created_at=hour - timedelta(hours=3), report_type="confirmed")])
    server, port = build_server(settings, engine, "127.0.0.1", 0, clock=lambda: now, max_workers=2)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    fed.stub = pb_grpc.FederationStub(channel)
    try:
        yield fed
    finally:
        channel.close()
        server.stop(None)


@dataclass
class Federation:
    now: datetime
    settings: Any
    a_key: ec.EllipticCurvePrivateKey
    b_key: ec.EllipticCurvePrivateKey
    stub: Any = None
    key: bytes = b""

    @staticmethod
    def authorize(engine: Engine, issuer: str, subject: str, partner: str, key: ec.EllipticCurvePrivateKey) -> None:
        from enpipeline.db import federation_out
        from enpipeline.federation.auth import FederationAuthorization

        with engine.begin() as conn:
            federation_out.upsert_authorization(conn, FederationAuthorization(
                issuer=issuer, subject=subject, partner=partner, public_key_pem=support.public_pem(key)),
                now=datetime.now(UTC))

    def claims(self, **changes: Any) -> dict[str, Any]:
        unix = int(self.now.timestamp())
        base = {"iss": "https://partner-a.example", "sub": "fetcher", "aud": self.settings.federation_audience,
                "iat": unix, "exp": unix + 300}
        return {k: v for k, v in {**base, **changes}.items() if v is not None}

    def token(self, key: Any = None, *, header: dict[str, Any] | None = None, **changes: Any) -> str:
        return signed(key or self.a_key, {"alg": "ES256", "typ": "JWT", **(header or {})}, self.claims(**changes))

    def fetch(self, authorization: list[tuple[str, str]]) -> Any:
        from enpipeline.proto import federation_pb2 as pb

        return self.stub.Fetch(pb.FederationFetchRequest(), metadata=authorization, timeout=10)


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


FEDERATION_CASES: dict[str, tuple[Callable[[Federation], list[tuple[str, str]]], str]] = {
    "other-partners-registered-key-with-our-iss-sub": (lambda f: _bearer(f.token(f.b_key)), "invalid token signature"),
    "sub-switched-to-another-partner-after-signing": (
        lambda f: _bearer(f.token().split(".")[0] + "." + segments({}, f.claims(
            iss="https://partner-b.example")).split(".")[1] + "." + f.token().split(".")[2]),
        "invalid token signature"),
    "alg-none-without-signature-part": (lambda f: _bearer(segments({"alg": "none"}, f.claims())), "malformed token"),
    "alg-hs256-public-der-as-secret": (
        lambda f: _bearer(hs256(public_der(f.a_key), {"alg": "HS256", "typ": "JWT"}, f.claims())),
        "must be signed with ES256, got 'HS256'"),
    "alg-es256-with-hmac-signature": (
        lambda f: _bearer(hs256(support.public_pem(f.a_key).encode(), {"alg": "ES256"}, f.claims())),
        "invalid token signature"),
    "alg-rs256": (lambda f: _bearer(signed(rsa.generate_private_key(65537, 2048), {"alg": "RS256"}, f.claims(),
                                           "RS256")), "must be signed with ES256, got 'RS256'"),
    "alg-es384": (lambda f: _bearer(signed(ec.generate_private_key(ec.SECP384R1()), {"alg": "ES384"}, f.claims(),
                                           "ES384")), "must be signed with ES256, got 'ES384'"),
    "embedded-jwk-of-a-stranger": (
        lambda f: _bearer(f.token(support.new_signing_key(), header={"jwk": public_jwk(support.new_signing_key())})),
        "invalid token signature"),
    "expired-past-the-leeway": (lambda f: _bearer(f.token(iat=int(f.now.timestamp()) - 600,
                                                          exp=int(f.now.timestamp()) - 31)), "token has expired"),
    "lifetime-1h-plus-1s": (lambda f: _bearer(f.token(exp=int(f.now.timestamp()) + 3601)),
                            "lifetime (exp - iat) exceeds 1h0m0s"),
    "old-iat-long-lived": (lambda f: _bearer(f.token(iat=int(f.now.timestamp()) - 7200,
                                                     exp=int(f.now.timestamp()) + 60)),
                           "lifetime (exp - iat) exceeds 1h0m0s"),
    "audience-list-without-ours": (lambda f: _bearer(f.token(aud=["https://elsewhere.example", "x"])),
                                   "audience does not match"),
    "iss-of-one-partner-sub-unknown": (lambda f: _bearer(f.token(sub="admin")), "invalid issuer/subject"),
    "two-tokens-in-one-header": (lambda f: [("authorization", f"Bearer {f.token()} {f.token()}")],
                                 "authorization must be 'Bearer <token>'"),
    "token-without-scheme": (lambda f: [("authorization", f.token())], "authorization must be 'Bearer <token>'"),
    "token-signature-stripped": (lambda f: _bearer(f.token().rsplit(".", 1)[0] + "."), "invalid token signature"),
}


@pytest.mark.parametrize("name", list(FEDERATION_CASES))
def test_forged_federation_bearer_is_unauthenticated(federation, name):
    build, reason = FEDERATION_CASES[name]
    with pytest.raises(grpc.RpcError) as caught:
        federation.fetch(build(federation))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()
    assert reason in caught.value.details()
    assert federation.key.hex() not in str(caught.value.details())


def test_genuine_federation_bearer_is_served(federation):
    """The control: partner A's own token gets the key the refusals above did not."""
    response = federation.fetch(_bearer(federation.token()))
    assert [k.exposureKey for k in response.keys] == [federation.key]
    response = federation.fetch(_bearer(federation.token(federation.b_key, iss="https://partner-b.example")))
    assert [k.exposureKey for k in response.keys] == [federation.key]


# -- EFGS: forgeries by the gateway itself, and a gateway we cannot verify -------------------------------------------

def _add_target(engine: Engine, key_dir: Any, gateway: Any, country: Any, *, url: str | None = None,
                ca: Any = None) -> None:
    """tests.support_efgs.add_target with the URL and the CA we trust for the gateway's TLS under our control."""
    from enpipeline.db import efgs as efgs_db
    from enpipeline.efgs import targets
    from tests.support_efgs import key_pem, pem

    files = targets.TargetFiles(pem(country.auth_cert), key_pem(country.auth_key), pem(country.signing_cert),
                                key_pem(country.signing_key), pem(ca or gateway.pki.cert),
                                pem(gateway.trust_anchor.cert))
    target = targets.check_target("efgs", url or gateway.url, country.code, files, datetime.now(UTC))
    tls_ref, signing_ref = targets.store_target_keys(key_dir, target, files)
    with engine.begin() as conn:
        efgs_db.add_target(conn, dataclasses.replace(target, tls_credentials=tls_ref,
                                                     signing_credentials=signing_ref), datetime.now(UTC))


def _inject(gateway: Any, country: str, keys: list[Any], cert: Any, key: Any, tag: str) -> None:
    """What only the gateway (or whoever controls it) can do: put an upload in a batch that ``country`` never made,
    with a CMS signature over exactly the keys served, made by a certificate of the forger's choice."""
    from enpipeline.efgs.canonical import batch_bytes
    from enpipeline.efgs.signing import sign_batch
    from tests.support_efgs import Upload

    gateway.uploads.append(Upload(tag, country, keys, sign_batch(batch_bytes(keys), cert, key), cert, cert,
                                  datetime.now(UTC)))


def _stored_keys(engine: Engine) -> set[bytes]:
    with engine.connect() as conn:
        return {bytes(r[0]) for r in conn.execute(sa.text("SELECT exposure_key FROM exposure"))}


def _forged_with_another_countrys_certificate(gateway: Any) -> tuple[str, str]:
    from tests.support_efgs import efgs_key

    be = gateway.country("BE")   # registered, valid, but for BE
    _inject(gateway, "FR", [efgs_key("FR") for _ in range(3)], be.signing_cert, be.signing_key, "forged-be")
    return "FR", "the signing certificate is for country 'BE', not 'FR'"


def _forged_with_a_self_made_certificate(gateway: Any) -> tuple[str, str]:
    """A certificate with C=FR that the gateway made itself: no trust anchor ever signed it."""
    from tests.support_efgs import Country, Pki, efgs_key

    forger = Country.create("FR", Pki.create())
    _inject(gateway, "FR", [efgs_key("FR") for _ in range(3)], forger.signing_cert, forger.signing_key, "forged-fr")
    return "FR", "the signing certificate is not signed by the trust anchor"


def _signed_with_a_key_the_audit_does_not_name(gateway: Any) -> tuple[str, str]:
    """The audit names FR's registered certificate; the signature was made with another key."""
    from tests.support_efgs import efgs_key

    fr = gateway.country("FR")
    intruder = gateway.country("FR")
    _inject(gateway, "FR", [efgs_key("FR") for _ in range(2)], intruder.signing_cert, intruder.signing_key, "fr-x")
    gateway.audit_cert["FR"] = fr.signing_cert
    return "FR", "the batch was not signed with this certificate"


EFGS_FORGERIES: dict[str, Callable[[Any], tuple[str, str]]] = {
    "another-countrys-certificate": _forged_with_another_countrys_certificate,
    "self-made-certificate-of-the-right-country": _forged_with_a_self_made_certificate,
    "signature-by-a-certificate-not-in-the-audit": _signed_with_a_key_the_audit_does_not_name,
}


@pytest.mark.parametrize("name", list(EFGS_FORGERIES))
def test_efgs_batch_forged_by_the_gateway_is_refused(gateway, engine, efgs_settings, name):
    from enpipeline.efgs.pull import pull_day
    from tests.support_efgs import efgs_key, upload_as

    de = gateway.country("DE")
    _add_target(engine, efgs_settings.key_dir, gateway, de)
    nl = gateway.country("NL")
    genuine = [efgs_key("NL") for _ in range(2)]
    assert upload_as(gateway, nl, genuine, "nl-1") == 201   # the control: an honest upload in the same batch
    country, reason = EFGS_FORGERIES[name](gateway)
    gateway.batch()
    report = pull_day(efgs_settings, engine, "efgs", datetime.now(UTC).date(), datetime.now(UTC))
    assert report.refused_countries == [country]
    assert any(reason in r for r in report.reasons), report.reasons
    assert _stored_keys(engine) == {k.keyData for k in genuine}


@pytest.mark.parametrize("name", ["gateway-certificate-from-another-ca", "gateway-name-not-in-its-certificate"])
def test_efgs_gateway_whose_tls_certificate_does_not_verify_gets_nothing(gateway, engine, efgs_settings, name):
    """Neither pull nor push talks to a gateway whose certificate does not verify: no request reaches it."""
    from enpipeline.db import exposures as exposures_db
    from enpipeline.efgs.pull import EfgsPullError, pull_day
    from enpipeline.efgs.push import EfgsPushError, push_window
    from enpipeline.model import Exposure
    from enpipeline.timeutil import interval_number, truncate
    from tests.support_efgs import Pki, efgs_key, upload_as

    de = gateway.country("DE")
    if name == "gateway-certificate-from-another-ca":
        _add_target(engine, efgs_settings.key_dir, gateway, de, ca=Pki.create().cert)
    else:  # the certificate names 127.0.0.1 only
        _add_target(engine, efgs_settings.key_dir, gateway, de, url=gateway.url.replace("127.0.0.1", "localhost"))
    upload_as(gateway, gateway.country("FR"), [efgs_key("FR")], "fr-1")
    gateway.batch()
    gateway.requests.clear()

    with pytest.raises(EfgsPullError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        pull_day(efgs_settings, engine, "efgs", datetime.now(UTC).date(), datetime.now(UTC))
    assert _stored_keys(engine) == set()

    hour = truncate(datetime.now(UTC), timedelta(hours=1))
    exposures_db.PartitionGuard(engine).ensure([hour - timedelta(hours=2)])
    with engine.begin() as conn:
        exposures_db.insert_exposures(conn, [Exposure(
            exposure_key=os.urandom(16), transmission_risk=2, app_package_name=APP_ID, regions=["DE"],
            traveler=False, interval_number=interval_number(hour - timedelta(days=2)), interval_count=144,
            created_at=hour - timedelta(hours=2), report_type="confirmed", days_since_symptom_onset=1)])
    with pytest.raises(EfgsPushError):
        push_window(efgs_settings, engine, "efgs", hour - 3 * timedelta(hours=1), hour - timedelta(hours=1),
                    datetime.now(UTC))
    assert gateway.requests == [] and [u.country for u in gateway.uploads] == ["FR"]


def test_efgs_target_without_a_trust_anchor_pulls_nothing(gateway, engine, efgs_settings):
    """Fail closed: without a trust anchor any certificate the gateway names would do, so no pull runs (and no
    cursor moves, so nothing is lost once an anchor is configured)."""
    from enpipeline.db import efgs as efgs_db
    from enpipeline.efgs.pull import EfgsPullError, pull_day
    from tests.support_efgs import efgs_key, upload_as

    de = gateway.country("DE")
    _add_target(engine, efgs_settings.key_dir, gateway, de)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE efgs_target SET trust_anchor = NULL"))
    upload_as(gateway, gateway.country("FR"), [efgs_key("FR")], "fr-1")
    gateway.batch()
    gateway.requests.clear()
    with pytest.raises(EfgsPullError, match="has no trust anchor"):
        pull_day(efgs_settings, engine, "efgs", datetime.now(UTC).date(), datetime.now(UTC))
    assert gateway.requests == [] and _stored_keys(engine) == set()
    with engine.connect() as conn:
        assert efgs_db.get_cursor(conn, "efgs", datetime.now(UTC).date()) is None


def test_efgs_cli_says_when_a_target_cannot_pull_and_sets_an_anchor_later(gateway, cli, tmp_path, engine):
    de = gateway.country("DE")
    files = de.write(tmp_path / "pem", gateway.pki)
    args = ["efgs", "add-target", "--id", "eu", "--url", gateway.url, "--country", "DE", "--client-cert",
            str(files["client_cert"]), "--client-key", str(files["client_key"]), "--signing-cert",
            str(files["signing_cert"]), "--signing-key", str(files["signing_key"]), "--ca", str(files["ca"])]
    code, out, err = cli(*args)
    assert code == 0, err
    assert "pulls are refused" in out
    code, out, _ = cli("efgs", "list-targets", "--json")
    assert code == 0 and json.loads(out)[0]["trust_anchor"] == "none (pulls refused)"

    # An existing target gets its anchor without being removed (which would drop its history and keys).
    from tests.support_efgs import efgs_key, pem, upload_as

    code, _, err = cli("efgs", "set-trust-anchor", "--id", "eu", "--trust-anchor", str(files["client_cert"]))
    assert code == 0, err  # any certificate with an RSA or EC key is a well-formed anchor; the real one follows
    (tmp_path / "not-pem.txt").write_text("no certificate here")
    code, _, err = cli("efgs", "set-trust-anchor", "--id", "eu", "--trust-anchor", str(tmp_path / "not-pem.txt"))
    assert code != 0 and "--trust-anchor" in err
    code, _, err = cli("efgs", "set-trust-anchor", "--id", "nope", "--trust-anchor", str(files["client_cert"]))
    assert code != 0 and "no EFGS target with id 'nope'" in err
    (tmp_path / "anchor.pem").write_bytes(pem(gateway.trust_anchor.cert))
    code, out, err = cli("efgs", "set-trust-anchor", "--id", "eu", "--trust-anchor", str(tmp_path / "anchor.pem"))
    assert code == 0 and "trust anchor set" in out, err
    code, out, _ = cli("efgs", "list-targets", "--json")
    assert json.loads(out)[0]["trust_anchor"] == gateway.trust_anchor.cert.subject.rfc4514_string()
    fr_key = efgs_key("FR")
    upload_as(gateway, gateway.country("FR"), [fr_key], "fr-1")
    gateway.batch()
    assert _stored_keys(engine) == set()
    code, out, err = cli("efgs", "pull", "--target", "eu", "--json")
    assert code == 0, err
    assert _stored_keys(engine) == {fr_key.keyData}
