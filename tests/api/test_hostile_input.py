"""Hostile request bodies against the real publish API (Flask test client, real Postgres).

Deep nesting, huge and odd numbers, duplicate names, every wrong JSON type in every field, invalid UTF-8, a
byte-order mark, SQL-injection strings in every string field, oversized bodies with and without a
Content-Length. Each must get the documented status with the reference's `code` (a clear 4xx unless the
input is harmless and the publish legitimately succeeds), never a 5xx, and the database must come out
intact: every table still there, no row added by a refused request, injected text stored only as inert
data. Streaming cases against a real gunicorn server live in tests/integration/test_slow_bodies.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Response
from flask.testing import FlaskClient
from openapi_schema_validator import OAS30Validator, oas30_format_checker
from sqlalchemy.engine import Engine
from werkzeug.test import EnvironBuilder

from api.app import OPENAPI_PATH, create_app
from enpipeline.db import apps
from enpipeline.model import AuthorizedApp, ExposureKeyInput
from enpipeline.publish.service import create_publish_service
from enpipeline.timeutil import interval_number, truncate
from tests import support
from tests.conftest import TABLES
from tests.support import APP_ID, day_keys, fixed_now, publish_body, random_key_b64

SPEC = json.loads(OPENAPI_PATH.read_text())
BYPASS_APP = "com.example.hostile"  # registered, skips certificate checks: hostile values reach the database
DECODE = "error unmarshalling API call, code: 400: "
TOO_LARGE = "error unmarshalling API call, code: 413: http: request body too large"
MAX_BODY = 64_000

SQL_INJECTIONS = [
    "'; DROP TABLE exposure; --",
    "' OR '1'='1",
    '" OR ""="',
    "1; SELECT pg_sleep(5); --",
    "'||(SELECT version())||'",
    "' UNION SELECT app_package_name, NULL FROM authorized_app --",
    "*/ DROP TABLE authorized_app /*",
    "\\'; TRUNCATE exposure; --",
    "$$; DROP TABLE exposure; $$",
    "%s%s%s%n", "%(n)s", ":n", "$1",
    "a\x00b", "\x00",
    "com.example.test\x00' OR '1'='1",
    "\u2028\u2029\ufeff", "\ud800",  # line separators, a BOM, a lone surrogate (sent as \\ud800)
    "{{7*7}}${jndi:ldap://127.0.0.1/a}",
    "'" * 5000,
]

# Counted by every helper that sends a request, reported at the end of the module.
SENT: list[int] = []


# -- helpers -------------------------------------------------------------------------------------------


def _inline(node: Any) -> Any:
    return support.inline_refs(node, SPEC)


def send(client: FlaskClient, body: bytes | str | dict, *, content_type: str | None = "application/json",
         **kwargs: Any) -> Any:
    """POST /v1/publish; the reply must be documented, schema-conformant and never a 5xx."""
    data = json.dumps(body) if isinstance(body, dict) else body
    headers = {"Content-Type": content_type} if content_type is not None else {}
    started = time.perf_counter()
    response = client.post("/v1/publish", data=data, headers=headers, **kwargs)
    assert time.perf_counter() - started < 5, "a hostile request took more than 5 s (pg_sleep injected?)"
    return check_reply(response)


def send_stream(client: FlaskClient, stream: Any, headers: dict[str, str]) -> Any:
    """POST a body from ``stream`` exactly as a WSGI server hands it over (the test client would measure or
    rewind the stream), with CONTENT_LENGTH only when the headers give one."""
    environ = EnvironBuilder(path="/v1/publish", method="POST", headers=headers).get_environ()
    environ["wsgi.input"] = stream
    environ.pop("CONTENT_LENGTH", None)
    if "Content-Length" in headers:
        environ["CONTENT_LENGTH"] = headers["Content-Length"]
    else:  # chunked, as gunicorn passes it: no length, the stream ends where the body ends
        environ["wsgi.input_terminated"] = True
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    return check_reply(Response.from_app(client.application, environ, buffered=True))


def check_reply(response: Any) -> Any:
    SENT.append(response.status_code)
    assert response.status_code < 500, response.get_data(as_text=True)[:300]
    documented = SPEC["paths"]["/v1/publish"]["post"]["responses"]
    assert str(response.status_code) in documented, response.status_code
    schema = _inline(documented[str(response.status_code)])["content"]["application/json"]["schema"]
    OAS30Validator(schema, format_checker=oas30_format_checker).validate(response.get_json())
    return response


def refused(response: Any, status: int, code: str, message: str | None = None, *, prefix: str = "") -> dict:
    payload = response.get_json()
    assert response.status_code == status, payload.get("error")
    assert payload["code"] == code, payload
    if message is not None:
        assert payload["error"] == message
    assert payload["error"].startswith(prefix), payload["error"]
    assert "revisionToken" not in payload and "insertedExposures" not in payload
    return payload


def counts(engine: Engine) -> dict[str, int]:
    """Row count of every table of the schema; fails if one is missing."""
    with engine.connect() as conn:
        return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
                for t in (name.strip() for name in TABLES.split(","))}


def valid_body(now: datetime, app: str = BYPASS_APP, n: int = 2) -> dict[str, Any]:
    keys = day_keys(now, n)
    body = publish_body(keys, None, now, app_id=app)
    body["verificationPayload"] = "not-a-certificate"
    return body


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def now() -> datetime:
    return fixed_now()


@pytest.fixture
def make_client(settings, engine, seeded, now):
    with engine.begin() as conn:
        apps.upsert_app(conn, AuthorizedApp(app_package_name=BYPASS_APP, allowed_regions=("US",),
                                            bypass_health_authority_verification=True))

    def make(**overrides: Any) -> FlaskClient:
        s = settings.replace(**overrides)
        return create_app(s, service=create_publish_service(s, engine), clock=lambda: now).test_client()

    return make


@pytest.fixture
def client(make_client) -> FlaskClient:
    return make_client()


@pytest.fixture
def intact(engine: Engine) -> Iterator[None]:
    """The test's requests are all refused: afterwards every table exists with the same row count."""
    before = counts(engine)
    yield
    assert counts(engine) == before


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print(f"\nhostile input: {len(SENT)} requests, statuses {sorted(set(SENT))}")


# -- nesting and syntax --------------------------------------------------------------------------------


def test_100000_nested_arrays_are_refused_without_recursion(client, make_client, intact):
    body = b"[" * 100_000
    refused(send(client, body), 413, "bad_request", TOO_LARGE)
    # With a limit that lets it through, the parser stops at Go's depth limit (10,000) instead of recursing.
    big = make_client(max_body_bytes=1_000_000)
    refused(send(big, body), 400, "bad_request", DECODE + "malformed json at position 10001")
    refused(send(big, b"[" * 100_000 + b"]" * 100_000), 400, "bad_request", DECODE + "malformed json at position 10001")
    refused(send(big, b'{"a":' * 50_000), 400, "bad_request", DECODE + "malformed json at position 50001")


@pytest.mark.parametrize("depth", [1, 9_999])
def test_nesting_within_the_limit_is_a_type_error_not_a_crash(client, intact, depth):
    # Within Go's limit the document parses; the array is not a valid padding string.
    body = b'{"padding":' + b"[" * depth + b"]" * depth + b"}"
    refused(send(client, body), 400, "bad_request", DECODE + 'invalid value "padding" at position 12')


def test_nesting_deeper_than_10000_inside_a_field(client, intact):
    body = b'{"temporaryExposureKeys":' + b"[" * 10_001 + b"]" * 10_001 + b"}"
    # The object is the first container, so the 10,000th bracket is the one too deep.
    refused(send(client, body), 400, "bad_request", DECODE + "malformed json at position 10025")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"+1", b".5", b"01",
                                     b"0x10", b"1e", b"-", b"--1", b"1_000", b"True", b"None", b"undefined"])
def test_non_json_number_literals_are_malformed(client, intact, literal):
    for field in (b"symptomOnsetInterval", b"traveler", b"padding"):
        response = send(client, b'{"' + field + b'":' + literal + b"}")
        refused(response, 400, "bad_request", prefix=DECODE + "malformed json")


HUGE_NUMBERS = {
    "1e999999": "1e999999",
    "-1e999999": "-1e999999",
    "10,000 digits": "9" * 10_000,
    "-10,000 digits": "-" + "9" * 10_000,
    "int32 + 1": str(2**31),
    "int64 + 1": str(2**63),
    "float": "1.0",
    "exponent": "1e2",
    "tiny": "1e-999999",
}


@pytest.mark.parametrize("number", HUGE_NUMBERS.values(), ids=HUGE_NUMBERS.keys())
def test_huge_and_fractional_numbers_are_type_errors(client, intact, number):
    top = '{"symptomOnsetInterval":' + number + "}"
    refused(send(client, top), 400, "bad_request", DECODE + f'invalid value "symptomOnsetInterval" at position '
                                                            f"{len(top) - 1}")
    for field in ("rollingStartNumber", "rollingPeriod", "transmissionRisk"):
        if field == "transmissionRisk" and number == str(2**31):
            continue  # transmissionRisk is a Go int (64-bit): 2^31 fits, and is then refused as a per-key rule
        prefix = '{"temporaryExposureKeys":[{"' + field + '":'
        body = prefix + number + "}]}"
        refused(send(client, body), 400, "bad_request",
                DECODE + f'invalid value "temporaryExposureKeys.{field}" at position {len(prefix) + len(number)}')


def test_minus_zero_is_zero(client, engine, now):
    body = valid_body(now)
    raw = json.dumps(body).replace('"rollingPeriod": 144', '"rollingPeriod": -0', 1)
    payload = send(client, raw).get_json()
    # -0 decodes to 0 as in Go: that key is dropped (period 0), the other one is stored.
    assert payload["code"] == "partial_failure" and payload["insertedExposures"] == 1
    assert "invalid interval count, 0, must be >= 1 && <= 144" in payload["error"]
    raw = json.dumps(valid_body(now, n=1)).replace("{", '{"symptomOnsetInterval": -0, ', 1)
    assert send(client, raw).get_json()["insertedExposures"] == 1


def test_duplicate_names_the_last_one_wins(client, engine, now):
    body = valid_body(now)
    text = json.dumps(body)
    # An unknown app first, the registered one last (also under another letter case): the last one counts.
    first_unknown = text.replace("{", '{"healthAuthorityID": "com.example.nobody", ', 1)
    assert send(client, first_unknown).get_json()["insertedExposures"] == 2
    body = valid_body(now)
    text = json.dumps(body)
    last_unknown = text[:-1] + ', "HEALTHAUTHORITYID": "com.example.nobody"}'
    refused(send(client, last_unknown), 401, "unknown_health_authority_id",
            "unauthorized health authority: com.example.nobody")
    # Two key lists: only the second is used.
    body = valid_body(now, n=1)
    extra = valid_body(now, n=1)["temporaryExposureKeys"]
    extra[0]["rollingStartNumber"] -= 144 * 3
    text = json.dumps(body)[:-1] + ', "temporaryExposureKeys": ' + json.dumps(extra) + "}"
    assert send(client, text).get_json()["insertedExposures"] == 1
    with engine.connect() as conn:
        stored = {bytes(r[0]) for r in conn.execute(sa.text("SELECT exposure_key FROM exposure"))}
    assert base64.b64decode(extra[0]["key"]) in stored
    assert base64.b64decode(body["temporaryExposureKeys"][0]["key"]) not in stored


@pytest.mark.parametrize("body, message", [
    (b"", "body must not be empty"),
    (b" \t\r\n ", "body must not be empty"),
    (b"{}{}", "body must contain only one JSON object"),
    (b'{} {"padding": ""}', "body must contain only one JSON object"),
    (b"{} x", "body must contain only one JSON object"),
    (b'{"padding": "x"', "malformed json"),
    (b'{"padding": "x\x00"}', "malformed json at position 15"),  # a raw control character in a string
    (b'{"padding": "\\x41"}', "malformed json at position 15"),  # not a JSON escape
    (b"\xef\xbb\xbf{}", "malformed json at position 1"),  # UTF-8 byte-order mark
    ('{"padding": ""}'.encode("utf-16"), "malformed json at position 1"),
    (b"\x00\x00\x00{", "malformed json at position 1"),
    (b"'single-quoted'", "malformed json at position 1"),
    (b"{padding: 1}", "malformed json at position 2"),
    (b'{"padding": ""},', "body must contain only one JSON object"),
])
def test_malformed_documents(client, intact, body, message):
    refused(send(client, body), 400, "bad_request", DECODE + message)


# -- invalid UTF-8 in every string ---------------------------------------------------------------------

BAD_UTF8 = {"lone 0xff": b"\xff", "overlong slash": b"\xc0\xaf", "encoded surrogate": b"\xed\xa0\x80",
            "above U+10FFFF": b"\xf4\x90\x80\x80", "truncated euro": b"\xe2\x82", "lone continuation": b"\x80",
            "latin-1 e-acute": b"caf\xe9"}
STRING_FIELDS = ["healthAuthorityID", "verificationPayload", "hmacKey", "revisionToken", "padding"]


@pytest.mark.parametrize("bad", BAD_UTF8.values(), ids=BAD_UTF8.keys())
def test_invalid_utf8_in_every_string_is_refused(client, intact, now, bad):
    for field in [*STRING_FIELDS, "key", "name"]:
        body = valid_body(now)
        if field == "key":
            body["temporaryExposureKeys"][0]["key"] = "@@BAD@@"
        elif field == "name":  # inside a member name
            body["@@BAD@@"] = 1
        else:
            body[field] = "@@BAD@@"
        raw = json.dumps(body).encode().replace(b"@@BAD@@", b"ok" + bad)
        # Reported like a syntax error: bytes read up to and including the first bad one.
        first_bad = raw.index(bad) + next(i for i, b in enumerate(bad) if b >= 0x80)
        position = first_bad + 1
        refused(send(client, raw), 400, "bad_request", DECODE + f"malformed json at position {position}")


# -- wrong types in every field ------------------------------------------------------------------------

WRONG = {"string": '"x"', "integer": "7", "float": "1.5", "true": "true", "array": "[]", "object": "{}",
         "array of strings": '["a"]'}
TOP_TYPES = {"temporaryExposureKeys": "keys", "healthAuthorityID": "string", "verificationPayload": "string",
             "hmacKey": "string", "symptomOnsetInterval": "integer", "traveler": "true", "revisionToken": "string",
             "padding": "string"}
KEY_TYPES = {"key": "string", "rollingStartNumber": "integer", "rollingPeriod": "integer",
             "transmissionRisk": "integer"}


@pytest.mark.parametrize("field", TOP_TYPES)
def test_every_wrong_type_in_every_top_level_field(client, intact, field):
    for kind, literal in WRONG.items():
        if kind == TOP_TYPES[field] or (field == "temporaryExposureKeys" and kind in ("array",)):
            continue
        if field == "temporaryExposureKeys" and kind == "array of strings":
            body = '{"temporaryExposureKeys":["a"]}'
            refused(send(client, body), 400, "bad_request",
                    DECODE + 'invalid value "temporaryExposureKeys" at position 29')
            continue
        prefix = '{"healthAuthorityID":"com.example.x","' + field + '":'
        body = prefix + literal + "}"
        position = len(prefix) + (1 if literal[0] in "[{" else len(literal))
        refused(send(client, body), 400, "bad_request", DECODE + f'invalid value "{field}" at position {position}')


@pytest.mark.parametrize("field", KEY_TYPES)
def test_every_wrong_type_in_every_key_field(client, intact, field):
    for kind, literal in WRONG.items():
        if kind == KEY_TYPES[field]:
            continue
        prefix = '{"temporaryExposureKeys":[{"key":"AAAAAAAAAAAAAAAAAAAAAA==","' + field + '":'
        body = prefix + literal + "}]}"
        if field == "key":
            prefix = '{"temporaryExposureKeys":[{"key":'
            body = prefix + literal + "}]}"
        position = len(prefix) + (1 if literal[0] in "[{" else len(literal))
        refused(send(client, body), 400, "bad_request",
                DECODE + f'invalid value "temporaryExposureKeys.{field}" at position {position}')


def test_null_leaves_the_zero_value(client, engine, now):
    body = valid_body(now, n=1)
    for field in ("verificationPayload", "hmacKey", "symptomOnsetInterval", "traveler", "revisionToken", "padding"):
        body[field] = None
    body["temporaryExposureKeys"][0]["transmissionRisk"] = None
    assert send(client, body).get_json()["insertedExposures"] == 1
    body = valid_body(now, n=1)
    body["temporaryExposureKeys"].append(None)  # a null key is a zero-value key, dropped as invalid
    payload = send(client, body).get_json()
    assert payload["code"] == "partial_failure" and "invalid key length, 0, must be 16" in payload["error"]


@pytest.mark.parametrize("name", ["regions", "appPackageName", "platform", "'; DROP TABLE exposure; --", "",
                                  "healthAuthorityIDs", "hmac_key", "\u212aey"])
def test_unknown_fields_are_refused(client, intact, name):
    body = {"healthAuthorityID": "com.example.x", name: ["US"]}
    refused(send(client, body), 400, "bad_request", prefix=DECODE + "unknown field ")


# -- SQL injection in every string field ---------------------------------------------------------------


@pytest.mark.parametrize("text", SQL_INJECTIONS, ids=range(len(SQL_INJECTIONS)))
def test_sql_injection_in_every_string_field(client, engine, seeded, now, text):
    before = counts(engine)
    stored = 0

    # healthAuthorityID: never a registered app (compared lower-cased, echoed back as text).
    body = valid_body(now)
    body["healthAuthorityID"] = text
    expected_echo = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    refused(send(client, body), 401, "unknown_health_authority_id",
            f"unauthorized health authority: {expected_echo}")

    # verificationPayload and hmacKey of the verified app: the certificate check refuses them.
    for field in ("verificationPayload", "hmacKey"):
        body = publish_body(day_keys(now, 2), seeded["cert"], now, app_id=APP_ID)
        body[field] = text
        refused(send(client, body), 401, "health_authority_verification_certificate_invalid",
                prefix="unable to validate diagnosis verification: ")

    # padding and revisionToken with new keys: both are inert, the keys are stored.
    for field in ("padding", "revisionToken"):
        body = valid_body(now)
        body[field] = text
        assert send(client, body).get_json()["insertedExposures"] == 2
        stored += 2

    # revisionToken when re-sending stored keys: a token that is not one is refused with a revision code.
    body[field] = text
    refused(send(client, body), 400, _token_code(text))

    # key: not base64, so dropped; alone it leaves nothing to store, beside a good key it is a partial failure.
    body = valid_body(now, n=1)
    body["temporaryExposureKeys"][0]["key"] = text
    refused(send(client, body), 400, "bad_request", prefix="unable to read request data: 1 error occurred:\n\t* key 0 ")
    body["temporaryExposureKeys"].append({"key": random_key_b64(), "rollingStartNumber": interval_number(
        truncate(now, timedelta(days=1))) - 144 * 3, "rollingPeriod": 144})
    payload = send(client, body).get_json()
    assert payload["code"] == "partial_failure" and payload["insertedExposures"] == 1
    assert "illegal base64 data at input byte" in payload["error"]
    stored += 1

    # In the integer and boolean fields a string is a type error.
    for field in ("symptomOnsetInterval", "traveler"):
        body = valid_body(now)
        body[field] = text
        refused(send(client, body), 400, "bad_request", prefix=DECODE + f'invalid value "{field}"')

    after = counts(engine)
    # The first publish that returns a revision token creates the token key: the only other new row.
    assert after == {**before, "exposure": before["exposure"] + stored, "revision_key": max(1, before["revision_key"])}
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM authorized_app WHERE app_package_name = :a"),
                            {"a": APP_ID}).scalar_one() == 1
        # Every stored row is an ordinary 16-byte key from the registered app.
        bad = conn.execute(sa.text("SELECT count(*) FROM exposure WHERE length(exposure_key) <> 16"
                                   " OR app_package_name <> :a"), {"a": BYPASS_APP}).scalar_one()
    assert bad == 0


def _token_code(text: str) -> str:
    """Undecodable base64 counts as no token; decodable bytes that do not decrypt are an invalid token."""
    from enpipeline.verification import decode_lenient_base64

    try:
        decode_lenient_base64(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
    except ValueError:
        return "missing_revision_token"
    return "invalid_revision_token" if text.strip("=") else "missing_revision_token"


def test_injection_through_certificate_claims_and_header(client, engine, seeded, now):
    """iss and kid come from an unsigned token: hostile values there must be a 401, not a query failure."""
    def unsigned(header: dict, claims: dict) -> str:
        enc = [base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=") for part in (header, claims)]
        return ".".join([*enc, "c2lnbmF0dXJl"])

    before = counts(engine)
    for text in SQL_INJECTIONS:
        for header, claims in (({"alg": "ES256", "kid": "v1"}, {"iss": text, "aud": "x", "reportType": "confirmed"}),
                               ({"alg": "ES256", "kid": text}, {"iss": "test-ha", "aud": "enpipeline-test",
                                                                  "reportType": "confirmed"}),
                               ({"alg": text, "kid": "v1"}, {"iss": text})):
            body = publish_body(day_keys(now, 1), None, now, app_id=APP_ID)
            body["verificationPayload"] = unsigned(header, claims)
            refused(send(client, body), 401, "health_authority_verification_certificate_invalid",
                    prefix="unable to validate diagnosis verification: ")
    assert counts(engine) == before


def test_hostile_keys_that_happen_to_decode(client, engine, now):
    """Base64 that decodes to SQL text is just bytes: stored as a 16-byte key or dropped for its length."""
    sixteen = base64.b64encode(b"';DROP TABLE x;-").decode()
    body = valid_body(now, n=1)
    body["temporaryExposureKeys"][0]["key"] = sixteen
    assert send(client, body).get_json()["insertedExposures"] == 1
    with engine.connect() as conn:
        assert bytes(conn.execute(sa.text("SELECT exposure_key FROM exposure")).scalar_one()) == b"';DROP TABLE x;-"
    body = valid_body(now, n=1)
    body["temporaryExposureKeys"][0]["key"] = base64.b64encode(b"'; DROP TABLE exposure; --").decode()
    refused(send(client, body), 400, "bad_request", prefix="unable to read request data: 1 error occurred:\n\t"
                                                           "* key 0 cannot be imported: invalid key length, 26")


# -- oversized bodies ----------------------------------------------------------------------------------


class EndlessBody(io.RawIOBase):
    """An effectively endless request body that records how much of it the server read."""

    def __init__(self, size: int = 50 * 1024 * 1024):
        self.size = size
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.read_bytes)
        buffer[:n] = b" " * n
        self.read_bytes += n
        return n


def test_oversized_body_with_content_length_is_413_without_reading_it(client, intact):
    stream = EndlessBody()
    response = send_stream(client, stream, {"Content-Type": "application/json", "Content-Length": str(stream.size)})
    refused(response, 413, "bad_request", TOO_LARGE)
    assert stream.read_bytes == 0


def test_oversized_chunked_body_is_413_after_reading_only_the_limit(client, intact):
    stream = EndlessBody()
    response = send_stream(client, stream, {"Content-Type": "application/json"})
    refused(response, 413, "bad_request", TOO_LARGE)
    assert MAX_BODY < stream.read_bytes <= MAX_BODY + 64 * 1024, stream.read_bytes


@pytest.mark.parametrize("declared, actual, status, message", [
    # A Content-Length shorter than the body: only that much is read, so the JSON is cut short.
    (100, 200, 400, "malformed json"),
    (MAX_BODY, MAX_BODY, 401, None),  # exactly the limit: decoded, then the (unknown) app is looked up
    (MAX_BODY + 1, MAX_BODY + 1, 413, TOO_LARGE),
    (MAX_BODY + 1, 10, 413, TOO_LARGE),  # the declared size alone decides, before anything is read
    (10**12, 10, 413, TOO_LARGE),
])
def test_declared_and_actual_sizes(client, intact, declared, actual, status, message):
    body = b'{"healthAuthorityID":"x","padding":"' + b"A" * (actual - 38) + b'"}'
    assert len(body) == max(actual, 38)
    stream = io.BytesIO(body[:actual])
    response = send_stream(client, stream, {"Content-Type": "application/json", "Content-Length": str(declared)})
    assert response.status_code == status
    if status == 413:
        refused(response, status, "bad_request", message)
        assert stream.tell() == 0
    elif status == 400:
        refused(response, status, "bad_request", DECODE + message)
    else:
        refused(response, status, "unknown_health_authority_id", "unauthorized health authority: x")


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "APPLICATION/JSON", "application/jso",
                                          " application/json", "application/xml", "text/json"])
def test_content_types_other_than_json_are_415(client, intact, now, content_type):
    response = send(client, json.dumps(valid_body(now)), content_type=content_type)
    refused(response, 415, "bad_request",
            "error unmarshalling API call, code: 415: content-type is not application/json")


def test_chaff_with_a_hostile_body_reads_nothing(client, intact):
    stream = EndlessBody()
    response = send_stream(client, stream, {"Content-Type": "application/json", "Content-Length": str(stream.size),
                                            "X-Chaff": "'; DROP TABLE x; --"})
    assert response.status_code == 200 and list(response.get_json()) == ["padding"]
    assert stream.read_bytes == 0


def test_database_still_serves_ordinary_publishes_afterwards(client, engine, seeded, now):
    keys = [ExposureKeyInput(random_key_b64(), interval_number(truncate(now, timedelta(days=1))) - 144, 144)]
    body = publish_body(keys, seeded["cert"], now, hmac_secret=os.urandom(16))
    assert send(client, body).get_json()["insertedExposures"] == 1
    assert counts(engine)["exposure"] == 1
