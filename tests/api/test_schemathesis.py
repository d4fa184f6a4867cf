"""Schema-driven fuzzing (schemathesis) of the publish API against its own description, api/openapi.json.

The real Flask app (real service, real migrated Postgres) is called in-process through WSGI. Every request
that reaches the app is counted by a WSGI wrapper, so the figures are requests actually served, not cases
planned. Every reply must have a documented status, a documented content type and a body that matches its
schema, and no reply may be a 5xx (the database is up the whole time).

Random `healthAuthorityID`s stop at the app lookup (401). So every schema-valid publish case is also sent
in derived variants (see Steering): to the verified app without a certificate (401), to a registered app
that bypasses verification with fresh keys folded into the 15-day window (stored, or refused by a publish
rule), the same body with other field-name cases (same outcome), and its keys re-sent without and with
the revision token it got. Those reach per-key validation, the overlap rules, the revision rules and the
database. The generated values are otherwise kept as they are. Schema-violating cases are sent once.

Generation is deterministic (fixed seed, derandomized hypothesis, no example database), so CI sends the
same requests on every run.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import schemathesis
import sqlalchemy as sa
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.config import PositiveDataAcceptanceConfig
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection
from sqlalchemy.engine import Engine

from api.app import OPENAPI_PATH, create_app
from enpipeline.config import Settings
from enpipeline.db import apps, authorities
from enpipeline.db.engine import make_engine
from enpipeline.model import AuthorizedApp
from enpipeline.publish.service import create_publish_service
from enpipeline.timeutil import interval_number, truncate
from tests import support
from tests.conftest import TABLES

MIN_REQUESTS = 10_000
# Examples per operation in the fuzzing phase. Operations without inputs (GET /health, /metrics,
# /openapi.json) have a single possible request and stop early; the publish operation carries the volume.
# The examples and coverage phases add their own cases on top. About 11,000 requests in 75 s.
POSITIVE_EXAMPLES = 1900
NEGATIVE_EXAMPLES = 600
SEED = 7
FUZZ_APP = "com.example.fuzz"
DAY = 144
# One clock for the app and the steering (midday UTC today), so the same cases get the same answers on
# every run, whatever the time of day.
NOW = support.fixed_now()


@dataclass
class Traffic:
    """What the WSGI wrapper saw: one (method, path, status) per request served."""

    seen: list[tuple[str, str, int]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def wrap(self, wsgi_app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            def recording_start_response(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
                self.seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], int(status.split()[0])))
                return start_response(status, headers, *args)

            return wsgi_app(environ, recording_start_response)

        return counted

    def by_status(self) -> Counter[int]:
        return Counter(status for _, _, status in self.seen)


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    """Requests seen by the app during this module's schemathesis run (one app for all operations)."""
    return Traffic()


@pytest.fixture(scope="module")
def fuzz_app(settings: Settings, migrated_engine: Engine, traffic: Traffic) -> Iterator[Flask]:
    """The real app on a freshly emptied database with one verified and one verification-bypassing app."""
    with migrated_engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
        ha_key = support.new_signing_key()
        ha_id = authorities.add_authority(conn, issuer=support.ISSUER, audience=support.AUDIENCE, name="Test HA")
        authorities.add_key(conn, ha_id, version=support.KID, public_key_pem=support.public_pem(ha_key),
                            from_timestamp=datetime(2020, 1, 1, tzinfo=UTC))
        apps.upsert_app(conn, AuthorizedApp(app_package_name=support.APP_ID, allowed_regions=("US",),
                                            allowed_health_authority_ids=(ha_id,)))
        # A registered app that skips certificate checks, so generated keys get as far as the database.
        apps.upsert_app(conn, AuthorizedApp(app_package_name=FUZZ_APP, allowed_regions=("US", "CA"),
                                            bypass_health_authority_verification=True))
    # Chaff replies copy recent latency; keep them short so the run's time goes into real requests.
    s = settings.replace(chaff_request_max_latency_ms=5)
    engine = make_engine(s.database_url)
    # Thousands of small commits: not waiting for the WAL flush makes each one cheap (durability across a
    # crash is not what this test is about).
    sa.event.listen(engine, "connect", _no_synchronous_commit)
    app = create_app(s, service=create_publish_service(s, engine), clock=lambda: NOW)
    app.wsgi_app = traffic.wrap(app.wsgi_app)  # type: ignore[method-assign]
    yield app
    engine.dispose()


def _no_synchronous_commit(dbapi_connection: Any, _record: Any) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO off")


def load_schema(mode: GenerationMode, max_examples: int) -> Any:
    """The description as the app serves it (the same file: test_served_description_is_the_file)."""
    loaded = schemathesis.openapi.from_path(OPENAPI_PATH)
    loaded.config.seed = SEED
    loaded.config.generation.update(max_examples=max_examples, deterministic=True, database="none", modes=[mode])
    # A schema-valid publish can still be refused for what a schema cannot say: keys outside the time window,
    # overlapping keys, keys already stored (revision rules) - the 400s the description documents. Those stay
    # allowed; `schema_valid_body_is_decoded` below makes sure such a 400 is never a decoding refusal.
    loaded.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
        expected_statuses=["2xx", "400", "401", "403", "404", "409", "413", "429"])
    return loaded


# Schema-valid cases are cheap to generate and each is sent in several variants (see Steering), schema-
# violating ones are costly to generate and sent once: separate budgets.
positive = load_schema(GenerationMode.POSITIVE, POSITIVE_EXAMPLES)
# Only the publish operation takes input that can be made invalid.
negative = load_schema(GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES).include(path="/v1/publish")


def schema_valid_body_is_decoded(ctx: Any, response: Any, case: Any) -> bool | None:
    """The decoder accepts every body the description calls valid: the description is not laxer than the
    decoder. (A schema-valid body over 64,000 bytes may still get 413: the size limit is not in the schema.)"""
    if case.operation.path != "/v1/publish" or case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    if response.status_code in (400, 415):
        payload = json.loads(response.content)
        assert not payload.get("error", "").startswith("error unmarshalling API call"), (
            f"schema-valid body refused by the decoder: {payload.get('error')}")
    return True


@dataclass
class Steering:
    """Deterministic steering of publish cases towards the code behind the app lookup.

    * Three in four cases lose a generated X-Chaff header: chaff is answered without reading anything, and
      hypothesis sets the optional header on most cases.
    * Every schema-valid case with an object body also goes out in the variants the module docstring lists,
      built from its "deep" variant: the same body for the registered verification-bypassing app, with
      fresh keys whose rollingStartNumbers are folded into the 15-day window.
    """

    count: int = 0
    deep: int = 0
    now: datetime = NOW

    def thin_chaff(self, case: Any) -> None:
        self.count += 1
        if case.operation.path == "/v1/publish" and case.headers and "X-Chaff" in case.headers and self.count % 4:
            del case.headers["X-Chaff"]

    def deep_variant(self, case: Any) -> Any | None:
        if case.operation.path != "/v1/publish" or not isinstance(case.body, dict):
            return None
        if case.meta is None or not case.meta.generation.mode.is_positive:
            return None
        body = copy.deepcopy(case.body)
        body["healthAuthorityID"] = FUZZ_APP
        today = interval_number(truncate(self.now, timedelta(days=1)))
        self.deep += 1
        for i, item in enumerate(body.get("temporaryExposureKeys") or []):
            item["key"] = fresh_key(item["key"], f"{self.deep}.{i}")
            start = item["rollingStartNumber"]
            if start % 2 == 0:  # even values become whole past days: usually no overlap, so usually stored
                item["rollingStartNumber"] = today - (1 + start // 2 % 14) * DAY
                item["rollingPeriod"] = DAY
            else:  # odd ones any interval of the window, with the generated period
                item["rollingStartNumber"] = today - 15 * DAY + start % (15 * DAY)
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "x-chaff"}
        return case.operation.Case(body=body, headers=headers, media_type=case.media_type)

    def renamed(self, body: dict[str, Any]) -> dict[str, Any]:
        """Field names upper-cased (keys' fields lower-cased), each key replaced by a fresh one."""
        self.deep += 1
        keys = [{name.lower(): (fresh_key(value, f"{self.deep}.{i}") if name == "key" else value)
                 for name, value in item.items()} for i, item in enumerate(body["temporaryExposureKeys"])]
        return {name.upper(): (keys if name == "temporaryExposureKeys" else value) for name, value in body.items()}


def fresh_key(generated: str, salt: str) -> str:
    """A key nobody has sent yet, in the generated key's spelling (URL alphabet, padding or not).

    Hypothesis repeats key strings a lot; without this nearly every steered publish would re-send a stored
    key and stop at the revision-token rule."""
    raw = hashlib.sha256(f"{salt}:{generated}".encode()).digest()[:16]
    text = base64.urlsafe_b64encode(raw).decode() if set(generated) & set("-_") else base64.b64encode(raw).decode()
    return text if generated.endswith("=") else text.rstrip("=")


@pytest.fixture(scope="module")
def steering() -> Steering:
    return Steering()


FUZZ_SETTINGS = settings(deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                HealthCheck.data_too_large])


def send_generated(case: Any, app: Flask, steering: Steering) -> None:
    steering.thin_chaff(case)
    # A chaff request (X-Chaff non-empty) is answered 200 without reading its body, by contract (see the
    # XChaff parameter), so "invalid body must be rejected" cannot apply to it; every other check still does.
    chaff = bool((case.headers or {}).get("X-Chaff"))
    case.call_and_validate(app=app, additional_checks=[schema_valid_body_is_decoded],
                           excluded_checks=[negative_data_rejection] if chaff else None)


@negative.parametrize()
@FUZZ_SETTINGS
def test_schema_violating_requests_are_refused(case: Any, fuzz_app: Flask, steering: Steering) -> None:
    send_generated(case, fuzz_app, steering)


@positive.parametrize()
@FUZZ_SETTINGS
def test_schema_valid_requests_conform(case: Any, fuzz_app: Flask, steering: Steering) -> None:
    send_generated(case, fuzz_app, steering)
    deep = steering.deep_variant(case)
    if deep is None:
        return
    # The verified app without a valid certificate: always the certificate error, whatever the keys.
    verified = variant(deep, {**deep.body, "healthAuthorityID": support.APP_ID})
    response = verified.call_and_validate(app=fuzz_app)
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "health_authority_verification_certificate_invalid"

    first = publish_deep(deep, fuzz_app)
    # The same body spelled with other field-name cases (Go matches names case-insensitively) and fresh keys:
    # the same outcome.
    renamed = variant(deep, steering.renamed(deep.body))
    second = publish_deep(renamed, fuzz_app)
    assert (second.get("code"), second.get("insertedExposures"), second.get("warnings")) == (
        first.get("code"), first.get("insertedExposures"), first.get("warnings"))
    if first.get("revisionToken"):
        # The same keys again: without the token the revision rules refuse them, with it they pass them.
        again = variant(deep, {k: v for k, v in deep.body.items() if k != "revisionToken"})
        assert publish_deep(again, fuzz_app).get("code") == "missing_revision_token"
        revised = variant(deep, {**deep.body, "revisionToken": first["revisionToken"]})
        assert publish_deep(revised, fuzz_app).get("code") in (None, "partial_failure", "bad_request")


def variant(case: Any, body: dict[str, Any]) -> Any:
    return case.operation.Case(body=body, headers=case.headers, media_type=case.media_type)


def publish_deep(case: Any, app: Flask) -> dict[str, Any]:
    """Send a steered (schema-valid, registered-app) case with every check; it is stored or refused by a rule."""
    response = case.call_and_validate(app=app)
    payload = response.json()
    assert response.status_code in (200, 400), payload
    assert not payload.get("error", "").startswith("error unmarshalling API call"), payload
    return payload


def test_served_description_is_the_file(fuzz_app: Flask) -> None:
    response = fuzz_app.test_client().get("/openapi.json")
    assert response.status_code == 200 and response.get_data() == OPENAPI_PATH.read_bytes()


def test_fuzzing_volume_and_no_server_errors(traffic: Traffic) -> None:
    """Runs after the parametrized tests above (file order) and judges their whole run."""
    elapsed = time.perf_counter() - traffic.started
    statuses = traffic.by_status()
    per_operation = Counter(f"{method} {path}" for method, path, _ in traffic.seen)
    print(f"\nschemathesis: {len(traffic.seen)} requests in {elapsed:.1f} s;"
          f" statuses {dict(sorted(statuses.items()))}; per operation {dict(per_operation)}")
    server_errors = [s for s in traffic.seen if s[2] >= 500]
    assert not server_errors, f"{len(server_errors)} replies were 5xx, e.g. {server_errors[:5]}"
    assert len(traffic.seen) >= MIN_REQUESTS, f"only {len(traffic.seen)} requests sent, want >= {MIN_REQUESTS}"
    # The steering worked: keys were stored, and so the deep paths ran.
    assert statuses[200] > 0 and statuses[400] > 0 and statuses[401] > 0
