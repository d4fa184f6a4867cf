"""Tests for enpipeline.verification: HMAC canonical form, lenient base64, certificate checks, issuer cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enpipeline.errors import VerificationError
from enpipeline.model import AuthorizedApp, ExposureKeyInput, VerifiedClaims
from enpipeline.verification import (
    CachedHealthAuthorityLookup,
    HealthAuthority,
    HealthAuthorityKey,
    compute_tekmacs,
    decode_lenient_base64,
    hmac_messages,
    verify_certificate,
)

# --- shared fixtures / helpers ----------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
NOW_UNIX = int(NOW.timestamp())
ISSUER = "gov.example.ha"
AUDIENCE = "exposure-notifications-server"
HA_ID = 7
APP = AuthorizedApp(app_package_name="com.example.app", allowed_health_authority_ids=(3, HA_ID))

# protocol.md §3 test vectors: secret = bytes 1..16.
SECRET = bytes(range(1, 17))
HMAC_KEY = base64.b64encode(SECRET).decode()
VECTOR_KEYS = (
    ExposureKeyInput("z2Cx9hdz2SlxZ8GEgqTYpA==", 1, 144, 3),
    ExposureKeyInput("dPCphLzfG4uzXneNimkPRQ==", 144, 144, 5),
)
VECTOR_TEXT = "dPCphLzfG4uzXneNimkPRQ==.144.144.5,z2Cx9hdz2SlxZ8GEgqTYpA==.1.144.3"
VECTOR_TEKMAC = "2u1nHt5WWurJytFLF3xitNzM99oNrad2y4YGOL53AeY="
TR0_KEYS = tuple(replace(k, transmission_risk=0) for k in VECTOR_KEYS)
TR0_MAIN_TEKMAC = "mFNI9zhTA17n4ndd1Vu5tsn4XQX0gPrIKyjeh/9noUE="
TR0_ALT_TEKMAC = "J9S7xVebH/66dm14wGsIcAnSUR3PHD4NtDQEOGZbDUo="

DROP = object()  # sentinel: remove this header field / claim


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _pem(private_key: ec.EllipticCurvePrivateKey) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


HA_PRIVATE = ec.generate_private_key(ec.SECP256R1())
HA_PEM = _pem(HA_PRIVATE)
STRANGER_PRIVATE = ec.generate_private_key(ec.SECP256R1())


def _merge(base: dict[str, Any], changes: dict[str, Any] | None) -> dict[str, Any]:
    merged = dict(base)
    for name, value in (changes or {}).items():
        if value is DROP:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def make_token(
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
    *,
    signer: ec.EllipticCurvePrivateKey | None = None,
) -> str:
    """Build an ES256 JWS by hand so tests control every header field and claim type."""
    full_header = _merge({"alg": "ES256", "kid": "v1", "typ": "JWT"}, header)
    full_claims = _merge(
        {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": NOW_UNIX,
            "exp": NOW_UNIX + 300,
            "reportType": "confirmed",
            "symptomOnsetInterval": 2_850_000,
            "tekmac": VECTOR_TEKMAC,
        },
        claims,
    )
    signing_input = f"{_b64url(json.dumps(full_header).encode())}.{_b64url(json.dumps(full_claims).encode())}"
    signature = jwt.get_algorithm_by_name("ES256").sign(signing_input.encode(), signer or HA_PRIVATE)
    return f"{signing_input}.{_b64url(signature)}"


class FakeLookup:
    """In-memory HealthAuthorityLookup that counts calls."""

    def __init__(self, *authorities: HealthAuthority, error: Exception | None = None) -> None:
        self.by_issuer = {a.issuer: a for a in authorities}
        self.calls: list[str] = []
        self.error = error

    def get_by_issuer(self, issuer: str) -> HealthAuthority | None:
        self.calls.append(issuer)
        if self.error is not None:
            raise self.error
        return self.by_issuer.get(issuer)


def make_authority(*keys: HealthAuthorityKey) -> HealthAuthority:
    if not keys:
        keys = (HealthAuthorityKey("v1", HA_PEM, NOW - timedelta(days=1)),)
    return HealthAuthority(id=HA_ID, issuer=ISSUER, audience=AUDIENCE, name="Example HA", keys=keys)


def verify(
    token: str,
    *,
    authority: HealthAuthority | None = None,
    keys: tuple[ExposureKeyInput, ...] = VECTOR_KEYS,
    hmac_key: str = HMAC_KEY,
    app: AuthorizedApp = APP,
    now: datetime = NOW,
) -> VerifiedClaims:
    lookup = FakeLookup(authority or make_authority())
    return verify_certificate(token, app=app, keys=keys, hmac_key=hmac_key, lookup=lookup, now=now)


# --- HMAC canonical form ----------------------------------------------------------------------------


def test_hmac_main_vector() -> None:
    assert hmac_messages(VECTOR_KEYS) == [VECTOR_TEXT.encode()]
    assert [base64.b64encode(m).decode() for m in compute_tekmacs(VECTOR_KEYS, SECRET)] == [VECTOR_TEKMAC]


def test_hmac_tr0_vector_has_main_and_alternate_forms() -> None:
    main, alternate = hmac_messages(TR0_KEYS)
    assert main == b"dPCphLzfG4uzXneNimkPRQ==.144.144.0,z2Cx9hdz2SlxZ8GEgqTYpA==.1.144.0"
    assert alternate == b"dPCphLzfG4uzXneNimkPRQ==.144.144,z2Cx9hdz2SlxZ8GEgqTYpA==.1.144"
    assert [base64.b64encode(m).decode() for m in compute_tekmacs(TR0_KEYS, SECRET)] == [
        TR0_MAIN_TEKMAC,
        TR0_ALT_TEKMAC,
    ]


def test_hmac_alternate_form_only_when_every_tr_is_zero() -> None:
    mixed = (replace(VECTOR_KEYS[0], transmission_risk=0), VECTOR_KEYS[1])
    assert hmac_messages(mixed) == [b"dPCphLzfG4uzXneNimkPRQ==.144.144.5,z2Cx9hdz2SlxZ8GEgqTYpA==.1.144.0"]


@pytest.mark.parametrize(
    ("sent", "expected_order"),
    [
        # byte-wise: '+' < '-' < '/' < digits < upper case < '_' < lower case
        (
            ["bAAA", "BAAA", "-AAA", "+AAA", "_AAA", "/AAA", "0AAA"],
            ["+AAA", "-AAA", "/AAA", "0AAA", "BAAA", "_AAA", "bAAA"],
        ),
        # the string exactly as sent: unpadded and padded spellings are kept and sorted as text
        (["QUFB", "QUE=", "QUE"], ["QUE", "QUE=", "QUFB"]),
    ],
)
def test_hmac_sorts_by_sent_string(sent: list[str], expected_order: list[str]) -> None:
    keys = [ExposureKeyInput(k, 10, 144, 1) for k in sent]
    (message,) = hmac_messages(keys)
    assert message.decode() == ",".join(f"{k}.10.144.1" for k in expected_order)


def test_hmac_is_independent_of_input_order() -> None:
    assert compute_tekmacs(VECTOR_KEYS, SECRET) == compute_tekmacs(tuple(reversed(VECTOR_KEYS)), SECRET)


def test_hmac_refuses_empty_key_list() -> None:
    with pytest.raises(ValueError, match=r"empty exposure keys"):
        hmac_messages([])
    with pytest.raises(ValueError):
        compute_tekmacs((), SECRET)


# --- lenient base64 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+/+/", b"\xfb\xff\xbf"),  # std alphabet
        ("-_-_", b"\xfb\xff\xbf"),  # URL alphabet
        ("AQIDBA==", b"\x01\x02\x03\x04"),  # padded
        ("AQIDBA", b"\x01\x02\x03\x04"),  # unpadded
        ("AQIDBA=====", b"\x01\x02\x03\x04"),  # extra '=' trimmed
        ("AQID", b"\x01\x02\x03"),
        ("", b""),
        ("AQ\r\nID", b"\x01\x02\x03"),  # Go skips CR/LF
        (VECTOR_TEKMAC, base64.b64decode(VECTOR_TEKMAC)),
    ],
)
def test_decode_lenient_base64_accepts(text: str, expected: bytes) -> None:
    assert decode_lenient_base64(text) == expected


@pytest.mark.parametrize(
    ("text", "offset"),
    [
        ("AQ!D", 2),
        ("AQ=D", 2),  # '=' only allowed as trailing padding
        ("AQIDB", 4),  # a lone trailing character cannot encode a byte
        ("AQIDB===", 4),
        ("AQ ID", 2),
        ("é", 0),
    ],
)
def test_decode_lenient_base64_rejects_with_go_offset(text: str, offset: int) -> None:
    with pytest.raises(ValueError, match=rf"^illegal base64 data at input byte {offset}$"):
        decode_lenient_base64(text)


# --- HealthAuthorityKey -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("from_ts", "thru_ts", "valid"),
    [
        (NOW - timedelta(seconds=1), None, True),
        (NOW - timedelta(days=1), NOW + timedelta(seconds=1), True),
        (NOW, None, False),  # from must be strictly before now
        (NOW + timedelta(days=1), None, False),
        (NOW - timedelta(days=1), NOW, False),  # thru must be strictly after now
        (NOW - timedelta(days=1), NOW - timedelta(hours=1), False),
    ],
)
def test_key_validity_window(from_ts: datetime, thru_ts: datetime | None, valid: bool) -> None:
    assert HealthAuthorityKey("v1", HA_PEM, from_ts, thru_ts).is_valid_at(NOW) is valid


# --- verify_certificate: acceptance -----------------------------------------------------------------


def test_valid_certificate_is_accepted() -> None:
    lookup = FakeLookup(make_authority())
    claims = verify_certificate(make_token(), app=APP, keys=VECTOR_KEYS, hmac_key=HMAC_KEY, lookup=lookup, now=NOW)
    assert claims == VerifiedClaims(
        health_authority_id=HA_ID, report_type="confirmed", symptom_onset_interval=2_850_000
    )
    assert lookup.calls == [ISSUER]


@pytest.mark.parametrize("report_type", ["confirmed", "likely", "negative", "user-report"])
def test_every_report_type_is_accepted(report_type: str) -> None:
    assert verify(make_token(claims={"reportType": report_type})).report_type == report_type


@pytest.mark.parametrize(
    ("claims", "now"),
    [
        ({"symptomOnsetInterval": DROP}, NOW),  # optional -> 0
        ({"symptomOnsetInterval": None}, NOW),  # JSON null leaves the zero value, as in Go
        ({"exp": NOW_UNIX}, NOW + timedelta(milliseconds=999)),  # now == exp (whole seconds): not expired
        ({"exp": DROP, "iat": DROP}, NOW),  # time claims are optional
        ({"exp": 0, "iat": 0, "nbf": 0}, NOW),  # golang-jwt v3 treats 0 as "not set"
        ({"nbf": NOW_UNIX, "iat": NOW_UNIX}, NOW),  # zero leeway boundary
        ({"sub": "anything", "jti": "x", "testDateInterval": 1, "trisk": []}, NOW),  # extra claims ignored
    ],
)
def test_edge_claims_accepted(claims: dict[str, Any], now: datetime) -> None:
    result = verify(make_token(claims=claims), now=now)
    assert result.health_authority_id == HA_ID
    expected_soi = claims.get("symptomOnsetInterval", 2_850_000)
    assert result.symptom_onset_interval == (0 if expected_soi in (DROP, None) else expected_soi)


def test_claim_names_match_case_insensitively_like_go() -> None:
    token = make_token(claims={"reportType": DROP, "REPORTTYPE": "likely", "tekmac": DROP, "TekMac": VECTOR_TEKMAC})
    assert verify(token).report_type == "likely"


@pytest.mark.parametrize(
    "tekmac",
    [VECTOR_TEKMAC.rstrip("="), VECTOR_TEKMAC.replace("+", "-").replace("/", "_"), VECTOR_TEKMAC + "=="],
)
def test_tekmac_is_decoded_leniently(tekmac: str) -> None:
    assert verify(make_token(claims={"tekmac": tekmac})).report_type == "confirmed"


def test_hmac_key_is_decoded_leniently() -> None:
    assert verify(make_token(), hmac_key=_b64url(SECRET)).health_authority_id == HA_ID


def test_alternate_tekmac_accepted_when_all_tr_zero() -> None:
    for tekmac in (TR0_MAIN_TEKMAC, TR0_ALT_TEKMAC):
        assert verify(make_token(claims={"tekmac": tekmac}), keys=TR0_KEYS).health_authority_id == HA_ID


def test_alternate_tekmac_rejected_when_some_tr_nonzero() -> None:
    no_tr_text = "dPCphLzfG4uzXneNimkPRQ==.144.144,z2Cx9hdz2SlxZ8GEgqTYpA==.1.144"
    no_tr_mac = base64.b64encode(hmac.new(SECRET, no_tr_text.encode(), hashlib.sha256).digest()).decode()
    with pytest.raises(VerificationError, match=r"^HMAC mismatch, publish request does not match disgnosis"):
        verify(make_token(claims={"tekmac": no_tr_mac}), keys=VECTOR_KEYS)


def test_kid_selects_the_matching_key_among_several() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    authority = make_authority(
        HealthAuthorityKey("v1", HA_PEM, NOW - timedelta(days=2)),
        HealthAuthorityKey("v2", _pem(other), NOW - timedelta(days=1)),
    )
    assert verify(make_token(header={"kid": "v2"}, signer=other), authority=authority).health_authority_id == HA_ID
    with pytest.raises(VerificationError, match=r"^crypto/ecdsa: verification error$"):
        verify(make_token(header={"kid": "v1"}, signer=other), authority=authority)


# --- verify_certificate: rejections -----------------------------------------------------------------


def _hs256_with_public_pem() -> str:
    """Classic alg confusion: HMAC-sign with the (public) PEM as the secret."""
    header = json.dumps({"alg": "HS256", "kid": "v1", "typ": "JWT"}).encode()
    claims = json.dumps({"iss": ISSUER, "aud": AUDIENCE, "reportType": "confirmed", "tekmac": VECTOR_TEKMAC}).encode()
    signing_input = f"{_b64url(header)}.{_b64url(claims)}"
    mac = hmac.new(HA_PEM.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(mac)}"


def _unsigned(header: dict[str, Any]) -> str:
    token = make_token(header=header)
    return token.rsplit(".", 1)[0] + "."


def _tampered_claims() -> str:
    header, _, signature = make_token().split(".")
    claims = _b64url(
        json.dumps({"iss": ISSUER, "aud": AUDIENCE, "reportType": "likely", "tekmac": VECTOR_TEKMAC}).encode()
    )
    return f"{header}.{claims}.{signature}"


_EXPIRED_OR_FUTURE = [
    pytest.param(make_token(claims={"exp": NOW_UNIX - 60}), "^token is expired by 1m0s$", id="expired-1m"),
    pytest.param(make_token(claims={"exp": NOW_UNIX - 1}), "^token is expired by 1s$", id="expired-1s"),
    pytest.param(make_token(claims={"exp": NOW_UNIX - 3723}), "^token is expired by 1h2m3s$", id="expired-1h2m3s"),
    pytest.param(make_token(claims={"iat": NOW_UNIX + 1}), r"^not valid yet \(NBF or IAT\) in the future$", id="iat"),
    pytest.param(make_token(claims={"nbf": NOW_UNIX + 1}), r"^not valid yet \(NBF or IAT\) in the future$", id="nbf"),
]

_REJECTIONS = [
    pytest.param(_hs256_with_public_pem(), "^unsupported signing method, must be ES256$", id="hs256-pem-secret"),
    pytest.param(_unsigned({"alg": "none"}), "^unsupported signing method, must be ES256$", id="alg-none"),
    pytest.param(_unsigned({"alg": "None"}), "^unsupported signing method, must be ES256$", id="alg-None"),
    pytest.param(make_token(header={"alg": DROP}), "^unsupported signing method, must be ES256$", id="alg-missing"),
    pytest.param(make_token(header={"alg": "ES384"}), "^unsupported signing method, must be ES256$", id="alg-es384"),
    pytest.param(make_token(header={"alg": ["ES256"]}), "^unsupported signing method, must be ES256$", id="alg-list"),
    pytest.param(make_token(signer=STRANGER_PRIVATE), "^crypto/ecdsa: verification error$", id="stranger-key"),
    pytest.param(_tampered_claims(), "^crypto/ecdsa: verification error$", id="tampered-claims"),
    pytest.param(make_token().rsplit(".", 1)[0] + ".", "^crypto/ecdsa: verification error$", id="empty-signature"),
    pytest.param(make_token() + "AA", "^crypto/ecdsa: verification error$", id="long-signature"),
    pytest.param(make_token()[:-1] + "!", "^crypto/ecdsa: verification error$", id="signature-bad-base64"),
    *_EXPIRED_OR_FUTURE,
    pytest.param(make_token(claims={"aud": "someone-else"}), "^audience mismatch for issuer: gov.example.ha", id="aud"),
    pytest.param(make_token(claims={"aud": DROP}), "^audience mismatch for issuer", id="aud-missing"),
    pytest.param(make_token(claims={"aud": [AUDIENCE]}), "^token is malformed: .*aud", id="aud-list"),
    pytest.param(make_token(header={"kid": "v9"}), "^no active public keys for health authority$", id="unknown-kid"),
    pytest.param(make_token(header={"kid": DROP}), "^missing required header field, 'kid'", id="missing-kid"),
    pytest.param(make_token(header={"kid": None}), "^no active public keys for health authority$", id="null-kid"),
    pytest.param(make_token(header={"kid": ["v1"]}), "^no active public keys for health authority$", id="list-kid"),
    pytest.param(make_token(claims={"iss": "nobody"}), "^issuer not found: nobody$", id="unknown-issuer"),
    pytest.param(make_token(claims={"iss": DROP}), "^issuer not found: $", id="missing-issuer"),
    pytest.param(make_token(claims={"iss": 5}), "^token is malformed: .*iss", id="issuer-not-string"),
    pytest.param(make_token(claims={"reportType": DROP}), '^invalid report type: ""$', id="report-type-missing"),
    pytest.param(make_token(claims={"reportType": "positive"}), '^invalid report type: "positive"$', id="report-type"),
    pytest.param(make_token(claims={"reportType": "CONFIRMED"}), "^invalid report type", id="report-type-case"),
    pytest.param(make_token(claims={"reportType": 1}), "^token is malformed: .*reportType", id="report-type-int"),
    pytest.param(make_token(claims={"symptomOnsetInterval": -1}), "symptomOnsetInterval", id="soi-negative"),
    pytest.param(make_token(claims={"symptomOnsetInterval": 2**32}), "symptomOnsetInterval", id="soi-overflow"),
    pytest.param(make_token(claims={"symptomOnsetInterval": 1.5}), "symptomOnsetInterval", id="soi-float"),
    pytest.param(make_token(claims={"symptomOnsetInterval": "1"}), "symptomOnsetInterval", id="soi-string"),
    pytest.param(make_token(claims={"symptomOnsetInterval": True}), "symptomOnsetInterval", id="soi-bool"),
    pytest.param(make_token(claims={"exp": "tomorrow"}), "^token is malformed: .*exp", id="exp-string"),
    pytest.param(make_token(claims={"exp": float(NOW_UNIX + 300)}), "^token is malformed: .*exp", id="exp-float"),
    pytest.param(make_token(claims={"iat": 2**63}), "^token is malformed: .*iat", id="iat-overflow"),
    pytest.param(make_token(claims={"tekmac": DROP}), "^HMAC mismatch", id="tekmac-missing"),
    pytest.param(
        make_token(claims={"tekmac": "!!"}), "^error decoding HMAC from claims: illegal base64", id="tekmac-bad"
    ),
    pytest.param(make_token(claims={"tekmac": TR0_ALT_TEKMAC}), "^HMAC mismatch", id="tekmac-other"),
]


@pytest.mark.parametrize(("token", "reason"), _REJECTIONS)
def test_rejections(token: str, reason: str) -> None:
    with pytest.raises(VerificationError, match=reason):
        verify(token)


GOOD_HEADER = json.dumps({"alg": "ES256", "kid": "v1"}).encode()


def _segments(header: bytes, claims: bytes) -> str:
    return f"{_b64url(header)}.{_b64url(claims)}.AAAA"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "a.b.c",
        "!!!.e30.sig",
        _segments(b"[1]", b"{}"),  # header not an object
        _segments(b'{"alg":"ES256"', b"{}"),  # truncated header JSON
        _segments(GOOD_HEADER, b"[]"),  # claims an array
        _segments(GOOD_HEADER, b'{"exp": NaN}'),  # Go's JSON has no NaN
        _segments(GOOD_HEADER, b"[" * 100_000),  # absurd nesting
        _segments(GOOD_HEADER, b"\xff\xfe"),  # not JSON at all
        "eyJhbGciOiJFUzI1NiJ9+.e30.AA",  # std alphabet is not valid in a JWS segment
        "\u00e9.\u00e9.\u00e9",
    ],
)
def test_garbage_tokens_are_rejected_cleanly(token: str) -> None:
    with pytest.raises(VerificationError) as excinfo:
        verify(token)
    assert str(excinfo.value)  # a short, non-empty reason


def test_non_string_token_is_rejected() -> None:
    with pytest.raises(VerificationError, match=r"malformed"):
        verify(None)  # type: ignore[arg-type]


def test_non_string_kid_never_matches_a_version() -> None:
    # The key version is the string "1": the JSON number 1 must still not select it.
    authority = make_authority(HealthAuthorityKey("1", HA_PEM, NOW - timedelta(days=1)))
    assert verify(make_token(header={"kid": "1"}), authority=authority).health_authority_id == HA_ID
    with pytest.raises(VerificationError, match=r"^no active public keys for health authority$"):
        verify(make_token(header={"kid": 1}), authority=authority)


@pytest.mark.parametrize(
    ("from_ts", "thru_ts"),
    [
        (NOW + timedelta(minutes=1), None),  # not yet active
        (NOW, None),  # from == now is not "before now"
        (NOW - timedelta(days=2), NOW - timedelta(days=1)),  # revoked
        (NOW - timedelta(days=2), NOW),  # thru == now is not "after now"
    ],
)
def test_key_outside_validity_window_is_rejected(from_ts: datetime, thru_ts: datetime | None) -> None:
    authority = make_authority(HealthAuthorityKey("v1", HA_PEM, from_ts, thru_ts))
    with pytest.raises(VerificationError, match=r"^no active public keys for health authority$"):
        verify(make_token(), authority=authority)


def test_app_must_allow_the_health_authority() -> None:
    app = AuthorizedApp(app_package_name="com.example.other", allowed_health_authority_ids=(1, 2))
    with pytest.raises(
        VerificationError, match=r"^app com.example.other has not authorized health authority issuer: gov.example.ha$"
    ):
        verify(make_token(), app=app)


def test_app_check_happens_after_signature() -> None:
    # An unauthorised app with a forged token learns about the signature first, never about authorisation.
    app = AuthorizedApp(app_package_name="com.example.other")
    with pytest.raises(VerificationError, match=r"^crypto/ecdsa: verification error$"):
        verify(make_token(signer=STRANGER_PRIVATE), app=app)


def test_tekmac_mismatch_when_one_key_is_tampered() -> None:
    tampered = (VECTOR_KEYS[0], replace(VECTOR_KEYS[1], transmission_risk=6))
    with pytest.raises(
        VerificationError, match=r"^HMAC mismatch, publish request does not match disgnosis verification certificate$"
    ):
        verify(make_token(), keys=tampered)


def test_tekmac_mismatch_when_a_key_is_added_or_the_secret_differs() -> None:
    with pytest.raises(VerificationError, match=r"^HMAC mismatch"):
        verify(make_token(), keys=(*VECTOR_KEYS, ExposureKeyInput("AAAAAAAAAAAAAAAAAAAAAA==", 1, 144, 3)))
    with pytest.raises(VerificationError, match=r"^HMAC mismatch"):
        verify(make_token(), hmac_key=base64.b64encode(bytes(16)).decode())


def test_zero_keys_are_rejected() -> None:
    with pytest.raises(VerificationError, match=r"^calculating expected HMAC: cannot calculate hmac on empty"):
        verify(make_token(), keys=())


def test_bad_hmac_key_is_rejected() -> None:
    with pytest.raises(VerificationError, match=r"^error decoding HMAC secret from publish request: illegal base64"):
        verify(make_token(), hmac_key="not base64!")


def test_not_yet_valid_wins_over_bad_signature() -> None:
    # golang-jwt reports both; the reference maps the iat/nbf bit first.
    token = make_token(claims={"iat": NOW_UNIX + 60}, signer=STRANGER_PRIVATE)
    with pytest.raises(VerificationError, match=r"^not valid yet \(NBF or IAT\)"):
        verify(token)


def test_bad_signature_wins_over_expiry() -> None:
    token = make_token(claims={"exp": NOW_UNIX - 60}, signer=STRANGER_PRIVATE)
    with pytest.raises(VerificationError, match=r"^crypto/ecdsa: verification error$"):
        verify(token)


def test_time_claims_use_the_given_clock_not_the_wall_clock() -> None:
    # Valid far in the past relative to wall-clock time: pyjwt's own exp check would reject it.
    old_now = datetime(2021, 1, 1, tzinfo=UTC)
    old_unix = int(old_now.timestamp())
    authority = make_authority(HealthAuthorityKey("v1", HA_PEM, old_now - timedelta(days=1)))
    token = make_token(claims={"iat": old_unix, "exp": old_unix + 300})
    assert verify(token, authority=authority, now=old_now).health_authority_id == HA_ID
    with pytest.raises(VerificationError, match=r"^token is expired by 5m1s$"):
        verify(token, authority=authority, now=old_now + timedelta(seconds=601))


@pytest.mark.parametrize(
    "pem",
    [
        "not a pem",
        _pem(ec.generate_private_key(ec.SECP384R1())),  # wrong curve for ES256
    ],
)
def test_unusable_stored_key_is_a_verification_error(pem: str) -> None:
    authority = make_authority(HealthAuthorityKey("v1", pem, NOW - timedelta(days=1)))
    with pytest.raises(VerificationError, match=r"^unable to parse public key"):
        verify(make_token(), authority=authority)


def test_lookup_failure_propagates_so_the_api_answers_500() -> None:
    # Deliberate difference from the reference (401): an outage is not a bad certificate.
    lookup = FakeLookup(error=RuntimeError("db down"))
    with pytest.raises(RuntimeError, match=r"^db down$"):
        verify_certificate(make_token(), app=APP, keys=VECTOR_KEYS, hmac_key=HMAC_KEY, lookup=lookup, now=NOW)


def test_unsupported_alg_is_rejected_before_any_lookup() -> None:
    lookup = FakeLookup(make_authority())
    with pytest.raises(VerificationError, match=r"^unsupported signing method"):
        verify_certificate(
            _hs256_with_public_pem(), app=APP, keys=VECTOR_KEYS, hmac_key=HMAC_KEY, lookup=lookup, now=NOW
        )
    assert lookup.calls == []


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match=r"timezone-aware"):
        verify(make_token(), now=NOW.replace(tzinfo=None))


# --- CachedHealthAuthorityLookup --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


def test_cache_hits_do_not_reach_the_inner_lookup() -> None:
    inner = FakeLookup(make_authority())
    cache = CachedHealthAuthorityLookup(inner, ttl=timedelta(minutes=5), clock=FakeClock())
    first = cache.get_by_issuer(ISSUER)
    second = cache.get_by_issuer(ISSUER)
    assert first is second is inner.by_issuer[ISSUER]
    assert inner.calls == [ISSUER]


def test_cache_keeps_not_found() -> None:
    inner = FakeLookup()
    cache = CachedHealthAuthorityLookup(inner, ttl=timedelta(minutes=5), clock=FakeClock())
    assert cache.get_by_issuer("nobody") is None
    assert cache.get_by_issuer("nobody") is None
    assert inner.calls == ["nobody"]


def test_cache_entries_expire_after_ttl() -> None:
    clock = FakeClock()
    inner = FakeLookup(make_authority())
    cache = CachedHealthAuthorityLookup(inner, ttl=timedelta(minutes=5), clock=clock)
    cache.get_by_issuer(ISSUER)
    clock.value += 299.9
    cache.get_by_issuer(ISSUER)
    assert inner.calls == [ISSUER]
    clock.value += 0.1  # exactly 5 minutes after the fill
    cache.get_by_issuer(ISSUER)
    assert inner.calls == [ISSUER, ISSUER]


def test_cache_keys_by_issuer_and_does_not_cache_errors() -> None:
    inner = FakeLookup(make_authority(), error=RuntimeError("db down"))
    cache = CachedHealthAuthorityLookup(inner, ttl=timedelta(minutes=5), clock=FakeClock())
    with pytest.raises(RuntimeError):
        cache.get_by_issuer(ISSUER)
    inner.error = None
    assert cache.get_by_issuer(ISSUER) is inner.by_issuer[ISSUER]
    assert cache.get_by_issuer("other") is None
    assert inner.calls == [ISSUER, ISSUER, "other"]


def test_cache_is_bounded() -> None:
    inner = FakeLookup()
    cache = CachedHealthAuthorityLookup(inner, ttl=timedelta(minutes=5), clock=FakeClock(), max_entries=2)
    for issuer in ("a", "b", "c"):
        cache.get_by_issuer(issuer)
    cache.get_by_issuer("c")  # still cached
    cache.get_by_issuer("a")  # oldest was evicted
    assert inner.calls == ["a", "b", "c", "a"]


def test_cache_clear() -> None:
    inner = FakeLookup()
    cache = CachedHealthAuthorityLookup(inner, ttl=timedelta(minutes=5), clock=FakeClock())
    cache.get_by_issuer("x")
    cache.clear()
    cache.get_by_issuer("x")
    assert inner.calls == ["x", "x"]


def test_cache_concurrent_misses_load_once() -> None:
    release = threading.Event()
    authority = make_authority()

    class SlowLookup:
        calls = 0

        def get_by_issuer(self, issuer: str) -> HealthAuthority | None:
            SlowLookup.calls += 1
            release.wait(5)
            return authority

    cache = CachedHealthAuthorityLookup(SlowLookup(), ttl=timedelta(minutes=5))
    results: list[HealthAuthority | None] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_by_issuer(ISSUER))) for _ in range(8)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(5)
    assert SlowLookup.calls == 1
    assert results == [authority] * 8


def test_cached_lookup_plugs_into_verify_certificate() -> None:
    inner = FakeLookup(make_authority())
    cache = CachedHealthAuthorityLookup(inner, ttl=timedelta(minutes=5), clock=FakeClock())
    for _ in range(3):
        claims = verify_certificate(make_token(), app=APP, keys=VECTOR_KEYS, hmac_key=HMAC_KEY, lookup=cache, now=NOW)
        assert claims.health_authority_id == HA_ID
    assert inner.calls == [ISSUER]
