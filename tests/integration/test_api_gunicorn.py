"""`enpipeline api` under gunicorn: a certificate-signed publish over real HTTP is stored in Postgres."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import sqlalchemy as sa

from tests import logscan, support


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def api_server(settings, seeded, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENP_")}
    env.update(ENP_DATABASE_URL=settings.database_url, ENP_VAR_DIR=str(tmp_path),
               ENP_REVISION_TOKEN_KEK=base64.b64encode(settings.revision_token_kek).decode(),
               ENP_REVISION_TOKEN_AAD=base64.b64encode(settings.revision_token_aad).decode())
    log = open(tmp_path / "api.log", "wb")
    logscan.register_log_file(tmp_path / "api.log")
    proc = subprocess.Popen([sys.executable, "-m", "enpipeline.cli", "api", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("API did not become healthy: " + (tmp_path / "api.log").read_text()[-2000:])
    yield base, tmp_path / "api.log"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def test_signed_publish_over_http_is_stored(api_server, seeded, engine):
    base, log_path = api_server
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    keys = support.day_keys(now)
    status, answer = _post(base + "/v1/publish", support.publish_body(keys, seeded["cert"], now),
                           headers={"User-Agent": "ExposureNotification/1.0 (iPhone; privacy-canary-ua)"})
    assert status == 200, answer
    assert answer["insertedExposures"] == 14 and answer["revisionToken"]
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM exposure WHERE exposure_key = ANY(:k)"),
                              {"k": [base64.b64decode(k.key) for k in keys]}).scalar_one()
    assert stored == 14

    # Several workers answer; /metrics sums them all.
    for _ in range(4):
        assert _post(base + "/v1/publish", {"temporaryExposureKeys": []})[0] == 401
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'enp_publish_requests_total{outcome="ok"} 1.0' in metrics
    assert 'enp_publish_requests_total{outcome="unknown_health_authority_id"} 4.0' in metrics
    assert "enp_publish_keys_inserted_total 14.0" in metrics

    # Privacy: no address, user agent or key material in the server's log.
    logged = log_path.read_text()
    assert "127.0.0.1 -" not in logged and "privacy-canary-ua" not in logged
    assert not any(k.key in logged for k in keys)
