"""The publish API through Flask's test client, on a real Postgres, checked against the reference's wire behaviour.

Statuses, `code` strings, messages and body shapes are those of google/exposure-notifications-server's v1
publish API. Deliberate differences are tested as such (see the `Deliberate difference` docstrings).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import socket
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient
from openapi_schema_validator import OAS30Validator, oas30_format_checker
from openapi_spec_validator import validate as validate_spec
from sqlalchemy.engine import Engine

from api.app import OPENAPI_PATH, create_app
from enpipeline.db import apps
from enpipeline.db.engine import make_engine
from enpipeline.model import AuthorizedApp, ExposureKeyInput
from enpipeline.publish.service import create_publish_service
from enpipeline.timeutil import interval_number, truncate
from tests import support
from tests.support import APP_ID, AUDIENCE, ISSUER, Certificate, day_keys, fixed_now, publish_body, random_key_b64

SPEC = json.loads(OPENAPI_PATH.read_text())
PADDING_MIN_CHARS, PADDING_MAX_CHARS = 1368, 2732  # base64 of 1024..2047 random bytes
MAINTENANCE_BODY = b'{"error": "please try again later"}'
RESPONSE_FIELD_ORDER = ["revisionToken", "insertedExposures", "error", "code", "padding", "warnings"]
HMAC_MISMATCH = "HMAC mismatch, publish request does not match disgnosis verification certificate"


# -- helpers -------------------------------------------------------------------------------------------


def _inline_refs(node: Any) -> Any:
    return support.inline_refs(node, SPEC)


def assert_matches_spec(path: str, method: str, response: Any) -> None:
    """The reply's status is documented for the operation, and a JSON body validates against its schema."""
    responses = SPEC["paths"][path][method]["responses"]
    assert str(response.status_code) in responses, f"{response.status_code} not documented for {method} {path}"
    documented = _inline_refs(responses[str(response.status_code)])
    assert response.mimetype in documented["content"]
    if response.mimetype == "application/json":
        schema = documented["content"]["application/json"]["schema"]
        OAS30Validator(schema, format_checker=oas30_format_checker).validate(response.get_json())


def request_schema_errors(body: dict[str, Any]) -> list[str]:
    schema = _inline_refs(SPEC["components"]["schemas"]["PublishRequest"])
    return [e.message for e in OAS30Validator(schema, format_checker=oas30_format_checker).iter_errors(body)]


def post(client: FlaskClient, body: dict[str, Any] | None = None, *, raw: bytes | str | None = None,
         content_type: str | None = "application/json", headers: dict[str, str] | None = None,
         **kwargs: Any) -> Any:
    """POST /v1/publish and check the reply against api/openapi.json."""
    all_headers = dict(headers or {})
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    data = raw if raw is not None else json.dumps(body)
    response = client.post("/v1/publish", data=data, headers=all_headers, **kwargs)
    assert_matches_spec("/v1/publish", "post", response)
    return response


def assert_padding(value: str, *, max_chars: int | None = PADDING_MAX_CHARS) -> None:
    assert PADDING_MIN_CHARS <= len(value), len(value)
    if max_chars is not None:
        assert len(value) <= max_chars, len(value)
    raw = base64.b64decode(value, validate=True)  # standard alphabet, with padding
    assert base64.b64encode(raw).decode() == value


def assert_v1_reply(response: Any, status: int) -> dict[str, Any]:
    """Status, headers and padding of every non-chaff, non-maintenance publish reply; returns the body."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.headers["x-api-version"] == "v1"
    assert response.headers["Content-Type"] == "application/json"
    payload = json.loads(response.get_data())
    assert_padding(payload["padding"])
    # omitempty fields in the reference's order, compact like Go's encoding/json
    assert list(payload) == [f for f in RESPONSE_FIELD_ORDER if f in payload]
    assert b'": ' not in response.get_data() and b'", "' not in response.get_data()
    return payload


def assert_error(response: Any, status: int, code: str, message: str) -> dict[str, Any]:
    payload = assert_v1_reply(response, status)
    assert payload["code"] == code
    assert payload["error"] == message
    assert "revisionToken" not in payload and "insertedExposures" not in payload
    return payload


def rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        result = conn.execute(sa.text("SELECT * FROM exposure ORDER BY interval_number, exposure_key"))
        return [dict(r) for r in result.mappings()]


def stored_keys(engine: Engine) -> set[str]:
    return {base64.b64encode(bytes(r["exposure_key"])).decode() for r in rows(engine)}


def add_app(engine: Engine, name: str, *, regions: tuple[str, ...] = ("US",), ha_ids: tuple[int, ...] = (),
            bypass_verification: bool = False) -> None:
    with engine.begin() as conn:
        apps.upsert_app(conn, AuthorizedApp(app_package_name=name, allowed_regions=regions,
                                            allowed_health_authority_ids=ha_ids,
                                            bypass_health_authority_verification=bypass_verification))


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sorted_index(keys: list[ExposureKeyInput], key: ExposureKeyInput) -> int:
    """The reference sorts the request's keys by their base64 string before it names them in errors."""
    return sorted(k.key.encode() for k in keys).index(key.key.encode())


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def now() -> datetime:
    return fixed_now()


@pytest.fixture
def make_client(settings, engine, now):
    def make(*, service_engine: Engine | None = None, **overrides: Any) -> FlaskClient:
        s = settings.replace(**overrides)
        service = create_publish_service(s, service_engine or engine)
        return create_app(s, service=service, clock=lambda: now).test_client()
    return make


@pytest.fixture
def client(make_client, seeded) -> FlaskClient:
    return make_client()


@pytest.fixture
def unreachable_engine(settings) -> Engine:
    engine = make_engine(f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres",
                         connect_timeout=timedelta(seconds=1))
    yield engine
    engine.dispose()


@pytest.fixture
def failing_inserts(engine: Engine):
    """A real database error on every exposure insert (a trigger that raises)."""
    with support.exposure_insert_trigger(engine, "enp_test_fail_insert", "RAISE EXCEPTION 'injected failure';"):
        yield


@pytest.fixture
def connection_killing_inserts(engine: Engine):
    """Every exposure insert makes the server terminate the inserting connection mid-transaction."""
    with support.exposure_insert_trigger(engine, "enp_test_kill_insert",
                                         "PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW;"):
        yield


# -- success ---------------------------------------------------------------------------------------


def test_publish_success_stores_keys(client, engine, seeded, now):
    keys = day_keys(now)
    response = post(client, publish_body(keys, seeded["cert"], now))

    payload = assert_v1_reply(response, 200)
    assert list(payload) == ["revisionToken", "insertedExposures", "padding"]
    assert payload["insertedExposures"] == 14
    assert base64.b64decode(payload["revisionToken"], validate=True)
    assert response.get_data().startswith(b'{"revisionToken":"')

    stored = rows(engine)
    assert {base64.b64encode(bytes(r["exposure_key"])).decode() for r in stored} == {k.key for k in keys}
    by_start = {r["interval_number"]: r for r in stored}
    today = interval_number(truncate(now, timedelta(days=1)))
    for days_back in range(1, 15):
        row = by_start[today - 144 * days_back]
        assert row["interval_count"] == 144
        assert row["regions"] == ["US"]
        assert row["report_type"] == "confirmed"
        assert row["transmission_risk"] == 2  # TR 0 backfilled from the report type
        assert row["health_authority_id"] == seeded["ha_id"]
        assert row["app_package_name"] == APP_ID
        assert row["traveler"] is False
        assert row["local_provenance"] is True
        assert row["created_at"] == truncate(now, timedelta(hours=1))
        assert row["days_since_symptom_onset"] == 4 - days_back  # default onset: 4 days before now
        assert row["revised_at"] is None


def test_publish_keeps_explicit_transmission_risk_and_traveler(client, engine, seeded, now):
    keys = day_keys(now, 3, tr=5)
    response = post(client, publish_body(keys, seeded["cert"], now, traveler=True))
    assert assert_v1_reply(response, 200)["insertedExposures"] == 3
    assert {(r["transmission_risk"], r["traveler"]) for r in rows(engine)} == {(5, True)}


def test_still_valid_key_is_embargoed_until_it_expires(client, engine, seeded, now):
    today = interval_number(truncate(now, timedelta(days=1)))
    keys = [ExposureKeyInput(random_key_b64(), today, 144)]
    assert assert_v1_reply(post(client, publish_body(keys, seeded["cert"], now)), 200)["insertedExposures"] == 1
    # ends at next midnight; created_at = truncate(end + 1h, 1h)
    assert rows(engine)[0]["created_at"] == truncate(now, timedelta(days=1)) + timedelta(days=1, hours=1)


def test_content_type_with_charset_is_accepted(client, seeded, now):
    response = post(client, publish_body(day_keys(now), seeded["cert"], now),
                    content_type="application/json; charset=utf-8")
    assert assert_v1_reply(response, 200)["insertedExposures"] == 14


def test_field_names_match_case_insensitively(client, engine, seeded, now):
    keys = day_keys(now)
    body = publish_body(keys, seeded["cert"], now)
    renamed = {
        "TemporaryExposureKeys": [{"KEY": k["key"], "rollingstartnumber": k["rollingStartNumber"],
                                   "RollingPeriod": k["rollingPeriod"]} for k in body["temporaryExposureKeys"]],
        "HEALTHAUTHORITYID": body["healthAuthorityID"],
        "verificationpayload": body["verificationPayload"],
        "HMACKey": body["hmacKey"],
        "Padding": body["padding"],
    }
    response = post(client, renamed)
    assert assert_v1_reply(response, 200)["insertedExposures"] == 14
    assert stored_keys(engine) == {k.key for k in keys}


def test_health_authority_id_is_looked_up_case_insensitively(client, engine, seeded, now):
    keys = day_keys(now)
    response = post(client, publish_body(keys, seeded["cert"], now, app_id="COM.Example.Test"))
    assert assert_v1_reply(response, 200)["insertedExposures"] == 14
    assert {r["app_package_name"] for r in rows(engine)} == {APP_ID}


def test_revision_reply_counts_only_inserted_keys(client, engine, seeded, now):
    """insertedExposures counts new rows only; a revision-only publish leaves it out (omitempty)."""
    keys = day_keys(now, 3)
    likely = Certificate(key=seeded["key"], report_type="likely")
    first = assert_v1_reply(post(client, publish_body(keys, likely, now)), 200)
    assert first["insertedExposures"] == 3

    second = assert_v1_reply(post(client, publish_body(keys, seeded["cert"], now,
                                                       revision_token=first["revisionToken"])), 200)
    assert "insertedExposures" not in second
    assert "code" not in second and "error" not in second
    assert base64.b64decode(second["revisionToken"], validate=True)
    stored = rows(engine)
    assert len(stored) == 3
    assert {(r["report_type"], r["revised_report_type"]) for r in stored} == {("likely", "confirmed")}


def test_existing_keys_without_revision_token(client, engine, seeded, now):
    keys = day_keys(now, 3)
    assert_v1_reply(post(client, publish_body(keys, Certificate(key=seeded["key"], report_type="likely"), now)), 200)
    response = post(client, publish_body(keys, seeded["cert"], now))
    assert_error(response, 400, "missing_revision_token", "no revision token, but sent existing keys")
    assert {r["revised_report_type"] for r in rows(engine)} == {None}


# -- transport errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "Application/JSON",
                                          "application/jso", None])
def test_wrong_content_type_is_415(client, engine, seeded, now, content_type):
    response = post(client, publish_body(day_keys(now), seeded["cert"], now), content_type=content_type)
    assert_error(response, 415, "bad_request",
                 "error unmarshalling API call, code: 415: content-type is not application/json")
    assert rows(engine) == []


def _body_of_size(keys, cert, now, size: int) -> bytes:
    body = publish_body(keys, cert, now)
    body["padding"] = ""
    body["padding"] = "A" * (size - len(json.dumps(body)))
    data = json.dumps(body).encode()
    assert len(data) == size
    return data


def test_body_of_64000_bytes_passes_the_size_check(client, engine, seeded, now):
    keys = day_keys(now)
    response = post(client, raw=_body_of_size(keys, seeded["cert"], now, 64_000))
    assert assert_v1_reply(response, 200)["insertedExposures"] == 14
    assert stored_keys(engine) == {k.key for k in keys}


def test_body_of_64001_bytes_is_413(client, engine, seeded, now):
    response = post(client, raw=_body_of_size(day_keys(now), seeded["cert"], now, 64_001))
    assert_error(response, 413, "bad_request", "error unmarshalling API call, code: 413: http: request body too large")
    assert rows(engine) == []


def test_streamed_body_without_content_length_is_limited_too(client, engine, seeded, now):
    data = _body_of_size(day_keys(now), seeded["cert"], now, 64_001)
    # As gunicorn passes a chunked body: no Content-Length, the stream ends where the body ends.
    response = client.post("/v1/publish", content_type="application/json",
                           environ_overrides={"wsgi.input": io.BytesIO(data), "wsgi.input_terminated": True,
                                              "HTTP_TRANSFER_ENCODING": "chunked"})
    assert "CONTENT_LENGTH" not in response.request.environ
    assert_error(response, 413, "bad_request", "error unmarshalling API call, code: 413: http: request body too large")
    assert rows(engine) == []


@pytest.mark.parametrize(("raw", "reason"), [
    ("{bad json}", "malformed json at position 2"),
    ('{"temporaryExposureKeys": [', "malformed json"),
    ("", "body must not be empty"),
    ("   \n", "body must not be empty"),
    ("{}{}", "body must contain only one JSON object"),
    ('{"healthAuthorityID": "com.example.test", "regions": ["US"]}', 'unknown field "regions"'),
    ('{"appPackageName": "com.example.test"}', 'unknown field "appPackageName"'),
    ('{"temporaryExposureKeys": [{"key": "AAAAAAAAAAAAAAAAAAAAAA==", "interval": 1}]}', 'unknown field "interval"'),
])
def test_undecodable_body_is_400(client, engine, seeded, raw, reason):
    response = post(client, raw=raw)
    assert_error(response, 400, "bad_request", f"error unmarshalling API call, code: 400: {reason}")
    assert rows(engine) == []


def test_wrong_type_names_field_and_position(client, seeded):
    raw = '{"temporaryExposureKeys":[{"key":"AAAAAAAAAAAAAAAAAAAAAA==","rollingPeriod":"144"}]}'
    position = raw.index('"144"') + len('"144"')
    response = post(client, raw=raw)
    assert_error(response, 400, "bad_request", "error unmarshalling API call, code: 400: invalid value "
                 f'"temporaryExposureKeys.rollingPeriod" at position {position}')


def test_wrong_type_is_400_bad_request(client, engine, seeded):
    response = post(client, raw='{"traveler": "yes"}')
    payload = assert_v1_reply(response, 400)
    assert payload["code"] == "bad_request"
    assert payload["error"].startswith('error unmarshalling API call, code: 400: invalid value "traveler"')
    assert rows(engine) == []


def test_trailing_slash_is_404(client, seeded, now):
    response = client.post("/v1/publish/", json=publish_body(day_keys(now), seeded["cert"], now))
    assert response.status_code == 404


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(client, engine, seeded, now, method):
    """Deliberate difference: the reference routes every method to the handler (a GET gets 415 there)."""
    response = client.open("/v1/publish", method=method, json=publish_body(day_keys(now), seeded["cert"], now))
    assert response.status_code == 405
    assert "POST" in response.headers["Allow"]
    assert rows(engine) == []


# -- authorization ---------------------------------------------------------------------------------


def test_unknown_health_authority_is_401(client, engine, seeded, now):
    response = post(client, publish_body(day_keys(now), seeded["cert"], now, app_id="com.example.unknown"))
    assert_error(response, 401, "unknown_health_authority_id", "unauthorized health authority: com.example.unknown")
    assert rows(engine) == []


def test_unknown_health_authority_message_keeps_the_id_as_sent(client, seeded, now):
    response = post(client, publish_body(day_keys(now), seeded["cert"], now, app_id="Com.Example.Unknown"))
    assert_error(response, 401, "unknown_health_authority_id", "unauthorized health authority: Com.Example.Unknown")


@pytest.mark.parametrize(("tamper", "reason"), [
    ("hmac", HMAC_MISMATCH),
    ("garbage", "token contains an invalid number of segments"),
])
def test_invalid_certificate_is_401(client, engine, seeded, now, tamper, reason):
    body = publish_body(day_keys(now), seeded["cert"], now)
    if tamper == "hmac":
        body["hmacKey"] = base64.b64encode(os.urandom(16)).decode()
    else:
        body["verificationPayload"] = "not-a-jwt"
    response = post(client, body)
    assert_error(response, 401, "health_authority_verification_certificate_invalid",
                 f"unable to validate diagnosis verification: {reason}")
    assert rows(engine) == []


@pytest.mark.parametrize("cert_kwargs", [
    {"iat_offset": 3600},  # issued in the future
    {"exp_offset": -60},  # expired
    {"report_type": "bogus"},
    {"issuer": "someone-else"},
])
def test_rejected_certificate_claims_are_401(client, engine, seeded, now, cert_kwargs):
    cert = Certificate(key=seeded["key"], **cert_kwargs)
    payload = assert_v1_reply(post(client, publish_body(day_keys(now), cert, now)), 401)
    assert payload["code"] == "health_authority_verification_certificate_invalid"
    assert payload["error"].startswith("unable to validate diagnosis verification: ")
    assert len(payload["error"]) > len("unable to validate diagnosis verification: ")
    assert rows(engine) == []


def test_no_keys_without_bypass_fails_verification(client, engine, seeded, now):
    """As in the reference, the certificate check runs first and cannot compute an HMAC over no keys."""
    payload = assert_v1_reply(post(client, publish_body([], seeded["cert"], now)), 401)
    assert payload["code"] == "health_authority_verification_certificate_invalid"
    assert payload["error"].startswith("unable to validate diagnosis verification: ")


def test_bypass_app_accepts_publish_without_certificate(client, engine, seeded, now):
    add_app(engine, "com.example.bypass", regions=("us", "CA"), bypass_verification=True)
    keys = day_keys(now)
    response = post(client, publish_body(keys, None, now, app_id="com.example.bypass"))
    payload = assert_v1_reply(response, 200)
    assert payload["insertedExposures"] == 14 and "code" not in payload
    stored = rows(engine)
    assert {base64.b64encode(bytes(r["exposure_key"])).decode() for r in stored} == {k.key for k in keys}
    for row in stored:
        assert row["report_type"] == ""
        assert row["transmission_risk"] == 0  # no claims, so no backfill
        assert row["health_authority_id"] is None
        assert row["regions"] == ["CA", "US"]
        assert row["app_package_name"] == "com.example.bypass"


def test_app_without_regions_and_no_default_region_is_500(client, engine, seeded, now):
    add_app(engine, "com.example.noregion", regions=(), ha_ids=(seeded["ha_id"],))
    response = post(client, publish_body(day_keys(now), seeded["cert"], now, app_id="com.example.noregion"))
    assert_error(response, 500, "health_authority_missing_region_config",
                 "unknown health authority regions for com.example.noregion")
    assert rows(engine) == []


def test_app_without_regions_uses_default_region(make_client, engine, seeded, now):
    add_app(engine, "com.example.noregion", regions=(), ha_ids=(seeded["ha_id"],))
    client = make_client(default_region="ca")
    response = post(client, publish_body(day_keys(now), seeded["cert"], now, app_id="com.example.noregion"))
    assert assert_v1_reply(response, 200)["insertedExposures"] == 14
    assert {tuple(r["regions"]) for r in rows(engine)} == {("CA",)}


# -- key validation --------------------------------------------------------------------------------


def test_partial_failure_stores_only_good_keys(client, engine, seeded, now):
    today = interval_number(truncate(now, timedelta(days=1)))
    good = day_keys(now)
    short = ExposureKeyInput(base64.b64encode(os.urandom(14)).decode(), today - 144, 144)
    risky = ExposureKeyInput(random_key_b64(), today - 288, 144, 9)
    keys = [*good, short, risky]
    response = post(client, publish_body(keys, seeded["cert"], now))

    payload = assert_v1_reply(response, 200)
    assert list(payload) == ["revisionToken", "insertedExposures", "error", "code", "padding"]
    assert payload["code"] == "partial_failure"
    assert payload["insertedExposures"] == 14
    errors = sorted([
        (sorted_index(keys, short), "invalid key length, 14, must be 16"),
        (sorted_index(keys, risky), "invalid transmission risk: 9, must be >= 0 && <= 8"),
    ])
    items = "\n\t".join(f"* key {i} cannot be imported: {msg}" for i, msg in errors)
    assert payload["error"] == f"2 errors occurred:\n\t{items}\n\n"
    assert stored_keys(engine) == {k.key for k in good}


def test_all_keys_invalid_is_400(client, engine, seeded, now):
    today = interval_number(truncate(now, timedelta(days=1)))
    keys = [ExposureKeyInput(base64.b64encode(os.urandom(14)).decode(), today - 144, 144)]
    response = post(client, publish_body(keys, seeded["cert"], now))
    assert_error(response, 400, "bad_request", "unable to read request data: 1 error occurred:\n\t* key 0 cannot be "
                 "imported: invalid key length, 14, must be 16\n\n")
    assert rows(engine) == []


def test_no_keys_is_400(client, engine, seeded, now):
    """Deliberate difference: the reference panics into an empty 500 here."""
    add_app(engine, "com.example.bypass", bypass_verification=True)
    response = post(client, publish_body([], None, now, app_id="com.example.bypass"))
    assert_error(response, 400, "bad_request", "unable to read request data: no exposure keys in publish request")


def test_too_many_keys_is_400(client, engine, seeded, now):
    """Deliberate difference: the reference panics into an empty 500 here."""
    keys = day_keys(now, 31)
    response = post(client, publish_body(keys, seeded["cert"], now))
    assert_error(response, 400, "bad_request",
                 "unable to read request data: too many exposure keys in publish: 31, max of 30 is allowed")
    assert rows(engine) == []


# -- server-side failures ----------------------------------------------------------------------------


@pytest.mark.usefixtures("failing_inserts")
def test_database_failure_while_storing_is_500(client, engine, seeded, now):
    """Deliberate difference: the reference answers such errors with 400 internal_error."""
    response = post(client, publish_body(day_keys(now), seeded["cert"], now))
    assert_error(response, 500, "internal_error", "Internal Server Error")
    assert rows(engine) == []


def test_database_unreachable_when_loading_app_is_503(make_client, unreachable_engine, now, seeded):
    """Deliberate difference: protocol.md gives 500 here (the reference's code answers 404); 503 tells the app
    to retry, with the reference's code string kept."""
    client = make_client(service_engine=unreachable_engine)
    response = post(client, publish_body(day_keys(now), seeded["cert"], now))
    assert_error(response, 503, "unable_to_load_health_authority",
                 "error loading health authority config: database unavailable")
    assert response.headers["Retry-After"] == "5"
    assert_matches_spec("/v1/publish", "post", response)


@pytest.mark.usefixtures("connection_killing_inserts")
def test_connection_lost_while_storing_is_503_and_stores_nothing(client, engine, seeded, now):
    """The server drops the connection in the middle of the publish transaction (a trigger terminates its own
    backend, as a database restart would): nothing is stored and the app is told to retry."""
    response = post(client, publish_body(day_keys(now), seeded["cert"], now))
    assert_error(response, 503, "internal_error", "database unavailable, please try again later")
    assert response.headers["Retry-After"] == "5"
    assert_matches_spec("/v1/publish", "post", response)
    assert rows(engine) == []


# -- maintenance and chaff -------------------------------------------------------------------------------


def test_maintenance_mode_answers_429_on_publish_and_health(make_client, engine, seeded, now):
    client = make_client(maintenance_mode=True)
    response = post(client, publish_body(day_keys(now), seeded["cert"], now))
    assert response.status_code == 429
    assert response.get_data() == MAINTENANCE_BODY
    assert response.headers["Content-Type"] == "application/json"
    assert "x-api-version" not in response.headers
    assert rows(engine) == []

    health = client.get("/health")
    assert health.status_code == 429
    assert health.get_data() == MAINTENANCE_BODY
    assert_matches_spec("/health", "get", health)


def _assert_chaff_reply(response: Any) -> None:
    assert response.status_code == 200
    payload = json.loads(response.get_data())
    assert list(payload) == ["padding"]
    assert_padding(payload["padding"], max_chars=None)  # sized like recent real replies


def test_chaff_is_answered_and_nothing_is_stored(client, engine, seeded, now):
    response = post(client, publish_body(day_keys(now), seeded["cert"], now), headers={"X-Chaff": "1"})
    _assert_chaff_reply(response)
    assert rows(engine) == []


@pytest.mark.parametrize(("raw", "content_type"), [("not json at all", "text/plain"), ("{}", None), ("", None)])
def test_chaff_body_is_never_read(client, engine, seeded, raw, content_type):
    _assert_chaff_reply(post(client, raw=raw, content_type=content_type, headers={"X-Chaff": "yes"}))


def test_empty_chaff_header_is_a_real_request(client, engine, seeded, now):
    keys = day_keys(now)
    response = post(client, publish_body(keys, seeded["cert"], now), headers={"X-Chaff": ""})
    assert assert_v1_reply(response, 200)["insertedExposures"] == 14
    assert stored_keys(engine) == {k.key for k in keys}


def test_chaff_is_answered_in_maintenance_mode(make_client, engine, seeded, now):
    client = make_client(maintenance_mode=True)
    _assert_chaff_reply(post(client, publish_body(day_keys(now), seeded["cert"], now), headers={"X-Chaff": "1"}))
    assert rows(engine) == []


def test_chaff_body_size_tracks_recent_replies(client, seeded, now):
    sizes = [len(post(client, publish_body(day_keys(now), seeded["cert"], now)).get_data()) for _ in range(3)]
    sizes += [len(post(client, raw="{}", content_type="text/plain").get_data()) for _ in range(3)]
    chaff = post(client, raw="", headers={"X-Chaff": "1"})
    _assert_chaff_reply(chaff)
    assert abs(len(chaff.get_data()) - sum(sizes) / len(sizes)) <= 4


def _slow_client(make_client, delay: float, **overrides: Any) -> FlaskClient:
    client = make_client(**overrides)
    service = client.application.extensions["enpipeline"].service
    real_publish = service.publish

    def slow_publish(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return real_publish(*args, **kwargs)

    service.publish = slow_publish
    return client


def _timed_chaff(client: FlaskClient) -> float:
    started = time.perf_counter()
    _assert_chaff_reply(post(client, raw="", headers={"X-Chaff": "1"}))
    return time.perf_counter() - started


def test_chaff_delay_tracks_real_latency(make_client, seeded, now):
    client = _slow_client(make_client, 0.3)
    assert _timed_chaff(client) < 0.15  # no real request seen yet: no delay
    for _ in range(2):
        assert_v1_reply(post(client, publish_body(day_keys(now, 2), seeded["cert"], now)), 200)
    assert 0.25 <= _timed_chaff(client) < 0.8


def test_chaff_delay_never_exceeds_max_latency(make_client, seeded, now):
    client = _slow_client(make_client, 0.3, chaff_request_max_latency_ms=50)
    for _ in range(2):
        assert_v1_reply(post(client, publish_body(day_keys(now, 2), seeded["cert"], now)), 200)
    assert 0.03 <= _timed_chaff(client) < 0.2


# -- health, metrics, openapi ---------------------------------------------------------------------------


def test_health_ok(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_data() == b'{"status": "ok"}'
    assert_matches_spec("/health", "get", response)


def test_health_503_when_database_unreachable(make_client, unreachable_engine):
    response = make_client(service_engine=unreachable_engine).get("/health")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.get_json() != {"status": "ok"}
    assert_matches_spec("/health", "get", response)


def test_metrics_count_outcomes_keys_and_latency_without_identifiers(client, seeded, now):
    keys = day_keys(now)
    body = publish_body(keys, seeded["cert"], now)
    assert_v1_reply(post(client, body), 200)
    assert_v1_reply(post(client, raw="{}", content_type="text/plain"), 415)
    assert_v1_reply(post(client, publish_body(day_keys(now), seeded["cert"], now, app_id="com.example.nobody")), 401)
    _assert_chaff_reply(post(client, raw="", headers={"X-Chaff": "1"}))

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    lines = set(text.splitlines())
    assert 'enp_publish_requests_total{outcome="ok"} 1.0' in lines
    assert 'enp_publish_requests_total{outcome="bad_request"} 1.0' in lines
    assert 'enp_publish_requests_total{outcome="unknown_health_authority_id"} 1.0' in lines
    assert 'enp_publish_requests_total{outcome="chaff"} 1.0' in lines
    assert "enp_publish_keys_inserted_total 14.0" in lines
    assert "enp_publish_latency_seconds_count 3.0" in lines  # real requests only, chaff excluded
    assert 'enp_publish_latency_seconds_bucket{le="+Inf"} 3.0' in lines

    # Only the outcome label (and the histogram's le) exist: nothing per request, app or authority.
    samples = [line for line in text.splitlines() if line.startswith("enp_")]
    assert {name for line in samples for name in re.findall(r'(\w+)="', line)} == {"outcome", "le"}
    secrets = [body["hmacKey"], body["verificationPayload"], APP_ID, "com.example.nobody", ISSUER, AUDIENCE]
    for k in keys:
        secrets += [k.key, base64.b64decode(k.key).hex()]
    for secret in secrets:
        assert secret not in text


def test_openapi_document_is_served_and_valid(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    spec = response.get_json()
    validate_spec(spec)
    assert spec["openapi"] == "3.0.3"
    assert {"/v1/publish", "/health", "/metrics"} <= set(spec["paths"])
    publish = spec["paths"]["/v1/publish"]["post"]
    assert set(publish["responses"]) == {"200", "400", "401", "408", "413", "415", "429", "500", "503"}
    assert _inline_refs(publish["parameters"])[0]["name"] == "X-Chaff"
    codes = set(spec["components"]["schemas"]["ErrorCode"]["enum"])
    assert {"bad_request", "internal_error", "unknown_health_authority_id", "partial_failure",
            "health_authority_verification_certificate_invalid", "health_authority_missing_region_config"} <= codes


def test_request_schema_matches_what_the_api_accepts(seeded, now):
    body = publish_body(day_keys(now, 3, tr=4), seeded["cert"], now, traveler=True, symptom_onset_interval=1)
    assert request_schema_errors(body) == []
    assert request_schema_errors({**body, "regions": ["US"]})  # unknown field
    assert request_schema_errors({**body, "temporaryExposureKeys": []})
    too_risky = {**body["temporaryExposureKeys"][0], "transmissionRisk": 9}
    assert request_schema_errors({**body, "temporaryExposureKeys": [too_risky]})
    zero_period = {**body["temporaryExposureKeys"][0], "rollingPeriod": 0}
    assert request_schema_errors({**body, "temporaryExposureKeys": [zero_period]})


# -- privacy -------------------------------------------------------------------------------------------


def test_no_key_material_or_client_identity_in_logs(make_client, engine, seeded, now, caplog, failing_inserts,
                                                    unreachable_engine):
    caplog.set_level(logging.DEBUG)
    ip, user_agent = "203.0.113.77", "ExposureApp/9.9 (unit-test-agent-7f3a)"
    client = make_client()
    client.environ_base.update(REMOTE_ADDR=ip, HTTP_USER_AGENT=user_agent)

    keys = day_keys(now)
    body = publish_body(keys, seeded["cert"], now)
    bad_hmac = {**body, "hmacKey": base64.b64encode(os.urandom(16)).decode()}
    responses = [post(client, body), post(client, bad_hmac)]  # the insert fails (trigger): an error is logged
    assert [r.status_code for r in responses] == [500, 401]
    unreachable = make_client(service_engine=unreachable_engine)
    unreachable.environ_base.update(REMOTE_ADDR=ip, HTTP_USER_AGENT=user_agent)
    assert post(unreachable, body).status_code == 503
    assert unreachable.get("/health").status_code == 503

    assert caplog.records, "the failure paths above are expected to log something"
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logged = "\n".join(formatter.format(r) + repr(r.args) for r in caplog.records)
    forbidden = [ip, user_agent, body["hmacKey"], bad_hmac["hmacKey"], body["verificationPayload"],
                 body["verificationPayload"].split(".")[2]]
    for k in keys:
        forbidden += [k.key, base64.b64decode(k.key).hex(), repr(base64.b64decode(k.key))]
    for secret in forbidden:
        assert secret not in logged

