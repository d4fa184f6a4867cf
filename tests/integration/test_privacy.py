"""Client addresses and secrets never reach a log or /metrics: publishes carrying forwarding headers with
documentation-range addresses, over every answer path, under gunicorn and in-process (with the root logger at
DEBUG through tests/logscan.py), then the logs of this test are scanned right here as well as at session end."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from api.app import create_app
from enpipeline.db.engine import make_engine
from enpipeline.db.revision_keys import PgRevisionKeyStore
from enpipeline.publish.service import create_publish_service
from enpipeline.revision import KeyWrapper
from tests import logscan, support

# The clients' addresses: documentation ranges only (RFC 5737, RFC 3849), which is what makes them findable.
CLIENT_V4, OTHER_V4, CLIENT_V6 = "198.51.100.23", "203.0.113.7", "2001:db8::23"
FORWARDING_HEADERS = {
    "X-Forwarded-For": f"{CLIENT_V4}, {OTHER_V4}",
    "X-Real-IP": CLIENT_V4,
    "Forwarded": f'for={CLIENT_V4};proto=https, for="[{CLIENT_V6}]:4711"',
    "X-Client-IP": CLIENT_V6,
    "True-Client-IP": CLIENT_V4,
    "CF-Connecting-IP": CLIENT_V6,
    "X-Cluster-Client-IP": OTHER_V4,
    "Via": f"1.1 {CLIENT_V4}",
    "User-Agent": f"ExposureApp/1.0 (client {CLIENT_V6})",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, *, body: bytes | None = None, method: str = "POST", headers: dict[str, str] | None = None
             ) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={**FORWARDING_HEADERS, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


@pytest.fixture
def gunicorn(settings, seeded, tmp_path) -> Iterator[tuple[str, Path]]:
    """`enpipeline api` with 2 workers; its whole output goes to a log file the session scan reads too."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENP_")}
    env.update(ENP_DATABASE_URL=settings.database_url, ENP_VAR_DIR=str(tmp_path),
               ENP_REVISION_TOKEN_KEK=base64.b64encode(settings.revision_token_kek).decode(),
               ENP_REVISION_TOKEN_AAD=base64.b64encode(settings.revision_token_aad).decode())
    log_path = tmp_path / "api.log"
    logscan.register_log_file(log_path)
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "enpipeline.cli", "-v", "api", "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "2"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(base + "/health", timeout=1) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        pytest.fail("the API did not become healthy; see " + str(log_path))
                    time.sleep(0.2)
            yield base, log_path
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.fixture
def failing_inserts(engine: Engine) -> Iterator[None]:
    """A real database error on every exposure insert (a trigger that raises), so the 500 path logs."""
    with support.exposure_insert_trigger(engine, "enp_test_privacy_fail", "RAISE EXCEPTION 'injected failure';"):
        yield


def _register_revision_deks(engine: Engine, settings) -> list[bytes]:
    """The data keys that sealed this test's revision tokens, so the scans look for them too."""
    wrapper = KeyWrapper(settings.revision_token_kek)
    deks = [wrapper.unwrap(r.wrapped_cipher, r.aad) for r in PgRevisionKeyStore(engine).list_allowed()
            if r.wrapped_cipher is not None and r.aad is not None]
    for dek in deks:
        logscan.register_secret(dek, "revision-token DEK")
    return deks


def _index(secrets: list[bytes | str], keys: list[Any]) -> logscan.SecretIndex:
    index = logscan.SecretIndex()
    for value in secrets:
        index.add("secret", logscan.secret_forms(value))
    for key in keys:
        index.add("private key", logscan.private_key_forms(key))
    return index


def _credentials(*bodies: dict[str, Any]) -> list[bytes | str]:
    """What of a publish body is secret: the HMAC secret and the certificate (its signature above all)."""
    out: list[bytes | str] = []
    for body in bodies:
        out += [base64.b64decode(body["hmacKey"]), body["verificationPayload"].rsplit(".", 1)[-1]]
    return out


def _publishes(seeded: dict[str, Any], now: datetime, secrets: list[bytes | str]
               ) -> dict[str, tuple[bytes, dict[str, str], int]]:
    """Every answer path of POST /v1/publish: name -> (body, extra headers, expected status); the bodies'
    credentials are appended to ``secrets``."""
    good = support.publish_body(support.day_keys(now), seeded["cert"], now)
    bad_hmac = {**support.publish_body(support.day_keys(now), seeded["cert"], now),
                "hmacKey": base64.b64encode(os.urandom(16)).decode()}
    secrets += _credentials(good, bad_hmac)
    return {
        "accepted": (_json(good), {"Content-Type": "application/json"}, 200),
        "existing keys without a token": (_json(good), {"Content-Type": "application/json"}, 400),
        "bad certificate": (_json(bad_hmac), {"Content-Type": "application/json"}, 401),
        "unknown app": (_json({**good, "healthAuthorityID": "com.example.nobody"}),
                        {"Content-Type": "application/json"}, 401),
        "not json": (b"{not json", {"Content-Type": "application/json"}, 400),
        "wrong content type": (b"{}", {"Content-Type": "text/plain"}, 415),
        "too large": (b"{" + b" " * 70_000 + b"}", {"Content-Type": "application/json"}, 413),
        "chaff": (b"{}", {"Content-Type": "application/json", "X-Chaff": "1"}, 200),
    }


def test_client_addresses_never_reach_the_gunicorn_log_or_metrics(gunicorn, seeded, engine, settings,
                                                                  failing_inserts):
    base, log_path = gunicorn
    now = datetime.now(UTC)
    with engine.begin() as conn:  # the first publishes must succeed: lift the failure until the 500 path
        conn.execute(sa.text("ALTER TABLE exposure DISABLE TRIGGER enp_test_privacy_fail"))
    statuses = {}
    secrets: list[bytes | str] = [settings.revision_token_kek, settings.revision_token_aad]
    for name, (body, headers, expected) in _publishes(seeded, now, secrets).items():
        status, answer = _request(base + "/v1/publish", body=body, headers=headers)
        statuses[name] = (status, expected)
        if name == "accepted":
            secrets.append(base64.b64decode(json.loads(answer)["revisionToken"]))
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE exposure ENABLE TRIGGER enp_test_privacy_fail"))
    failing = support.publish_body(support.day_keys(now), seeded["cert"], now)
    secrets += _credentials(failing)
    statuses["database error"] = (_request(base + "/v1/publish", body=_json(failing),
                                           headers={"Content-Type": "application/json"})[0], 500)
    statuses["other method"] = (_request(base + "/v1/publish", method="GET")[0], 405)
    statuses["no such path"] = (_request(base + f"/v1/publish/{CLIENT_V4}", body=b"{}")[0], 404)
    statuses["health"] = (_request(base + "/health", method="GET")[0], 200)
    status, metrics = _request(base + "/metrics", method="GET")
    statuses["metrics"] = (status, 200)
    assert {name: got for name, (got, _) in statuses.items()} == {name: want for name, (_, want) in statuses.items()}

    deks = _register_revision_deks(engine, settings)
    assert deks, "the accepted publish sealed a revision token"
    time.sleep(0.5)  # let the workers flush what they log
    logged = log_path.read_text()
    assert "publish transaction failed" in logged, "the 500 path is expected to log"
    index = _index([*secrets, *deks], [seeded["key"]])
    for source, text in (("gunicorn log", logged), ("/metrics", metrics.decode())):
        lines, findings = logscan.scan([(source, text)], index)
        assert lines > 0 and findings == [], [str(f) for f in findings]
        for address in (CLIENT_V4, OTHER_V4, CLIENT_V6, "2001:db8:0:0:0:0:0:23"):
            assert address not in text, source
        assert "ExposureApp/1.0" not in text
    assert 'enp_publish_requests_total{outcome="ok"} 1.0' in metrics.decode()  # the metrics did count


def test_client_addresses_never_reach_a_log_in_process(make_app_client, seeded, engine, settings, caplog,
                                                       failing_inserts):
    """The same through the Flask app in this process, whose every record (DEBUG included) the log scan sees; the
    socket address itself is a client's too here (REMOTE_ADDR)."""
    caplog.set_level(logging.DEBUG)
    now = support.fixed_now()
    client = make_app_client(clock=lambda: now)
    client.environ_base.update(REMOTE_ADDR=CLIENT_V4)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE exposure DISABLE TRIGGER enp_test_privacy_fail"))
    secrets: list[bytes | str] = [settings.revision_token_kek, settings.revision_token_aad]
    for body, headers, expected in _publishes(seeded, now, secrets).values():
        response = client.post("/v1/publish", data=body, headers={**FORWARDING_HEADERS, **headers})
        assert response.status_code == expected
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE exposure ENABLE TRIGGER enp_test_privacy_fail"))
    failing = support.publish_body(support.day_keys(now), seeded["cert"], now)
    secrets += _credentials(failing)
    response = client.post("/v1/publish", json=failing, headers=FORWARDING_HEADERS)
    assert response.status_code == 500
    unreachable = make_app_client(clock=lambda: now, engine=make_engine(
        f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres", connect_timeout=timedelta(seconds=1)))
    unreachable.environ_base.update(REMOTE_ADDR=CLIENT_V6)
    assert unreachable.post("/v1/publish", json=failing, headers=FORWARDING_HEADERS).status_code >= 500
    assert unreachable.get("/health", headers=FORWARDING_HEADERS).status_code >= 500

    deks = _register_revision_deks(engine, settings)
    assert caplog.records, "the failure paths above are expected to log"
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    text = "\n".join(formatter.format(r) for r in caplog.records)
    index = _index([*secrets, *deks], [seeded["key"]])
    lines, findings = logscan.scan([("records of this test", text)], index)
    assert lines >= len(caplog.records) and findings == [], [str(f) for f in findings]


@pytest.fixture
def make_app_client(settings, engine):
    """A Flask test client on the test database (or on ``engine``, disposed afterwards)."""
    own: list[Engine] = []

    def make(*, clock, engine: Engine | None = None):
        if engine is not None:
            own.append(engine)
        service = create_publish_service(settings, engine or default)
        return create_app(settings, service=service, clock=clock).test_client()

    default = engine
    yield make
    for e in own:
        e.dispose()
