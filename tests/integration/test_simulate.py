"""`enpipeline simulate` against the real publish API served over HTTP in-process, checked against Postgres."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from werkzeug.serving import make_server

from api.app import create_app
from enpipeline.publish.service import create_publish_service
from enpipeline.simulate import HealthAuthority, SimulateError, SimulateOptions, run_simulation
from tests import support


def _now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def api_url(settings, engine, seeded) -> Iterator[str]:
    """The Flask app on a real socket (threaded werkzeug server), talking to the seeded test database."""
    # Chaff replies wait as long as the average real reply took; a low cap keeps the test quick.
    s = settings.replace(chaff_request_max_latency_ms=50)
    app = create_app(s, service=create_publish_service(s, engine))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture
def authority(seeded) -> HealthAuthority:
    return HealthAuthority(key=seeded["key"], issuer=support.ISSUER, audience=support.AUDIENCE, kid=support.KID,
                           app=support.APP_ID)


@pytest.fixture
def ha_key_file(tmp_path: Path, seeded) -> Path:
    path = tmp_path / "ha.pem"
    path.write_bytes(seeded["key"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _db_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        row = conn.execute(sa.text(
            "SELECT count(*) AS keys, count(*) FILTER (WHERE revised_at IS NOT NULL) AS revised,"
            " count(DISTINCT report_type) AS types FROM exposure")).mappings().one()
        by_revision = dict(conn.execute(sa.text(
            "SELECT report_type || '->' || revised_report_type, count(*) FROM exposure"
            " WHERE revised_at IS NOT NULL GROUP BY 1")).all())
    return {**row, "by_revision": by_revision}


def test_population_publishes_revises_and_chaffs(api_url, authority, engine):
    options = SimulateOptions(publishes=40, url=api_url, chaff_ratio=0.5, revision_ratio=0.25, concurrency=4, seed=7)
    summary = run_simulation(options, authority, clock=_now)
    d = summary.as_dict()

    assert d["ok"], d
    assert d["publishes"]["sent"] == d["publishes"]["accepted"] == 40
    assert d["rejected"] == {} and d["http_errors"] == {} and d["connection_errors"] == {}
    assert d["chaff"] == {"sent": 20, "answered": 20}
    assert d["revisions"]["planned"] == d["revisions"]["sent"] == d["revisions"]["accepted"] == 10
    assert d["requests"] == 40 + 20 + 10
    assert set(d["publishes"]["report_types"]) >= {"confirmed", "likely"}
    assert 0 < d["latency_ms"]["p50"] <= d["latency_ms"]["p95"] <= d["latency_ms"]["p99"] <= d["latency_ms"]["max"]

    db = _db_counts(engine)
    # Every inserted key the server reported is in the table, and nothing else: chaff stored nothing.
    assert db["keys"] == d["publishes"]["keys_inserted"]
    assert 40 * 14 <= db["keys"] <= 40 * 15
    assert db["revised"] == d["revisions"]["keys_revised"] > 0
    # Each revision the summary counts by transition is one phone's 14 or 15 keys in the table.
    assert sum(d["revisions"]["transitions"].values()) == 10
    for transition, phones in d["revisions"]["transitions"].items():
        assert 14 * phones <= db["by_revision"][transition] <= 15 * phones


def test_same_seed_same_mix_fresh_keys(api_url, authority, engine):
    first = run_simulation(SimulateOptions(publishes=10, url=api_url, seed=3), authority, clock=_now).as_dict()
    second = run_simulation(SimulateOptions(publishes=10, url=api_url, seed=3), authority, clock=_now).as_dict()
    assert first["ok"] and second["ok"]
    assert first["publishes"]["report_types"] == second["publishes"]["report_types"]
    # A re-run never collides with the keys of the first: both inserted everything.
    assert second["publishes"]["accepted"] == 10 and second["rejected"] == {}
    assert _db_counts(engine)["keys"] == first["publishes"]["keys_inserted"] + second["publishes"]["keys_inserted"]


def test_rejections_are_counted_by_code_and_are_not_failures(api_url, seeded, engine):
    wrong = HealthAuthority(key=support.new_signing_key(), issuer=support.ISSUER, audience=support.AUDIENCE,
                            kid=support.KID, app=support.APP_ID)
    summary = run_simulation(SimulateOptions(publishes=5, url=api_url, revision_ratio=0.4, chaff_ratio=0),
                             wrong, clock=_now)
    d = summary.as_dict()
    assert d["rejected"] == {"health_authority_verification_certificate_invalid": 5}
    assert d["revisions"]["sent"] == 0 and d["revisions"]["skipped"] == 2
    assert d["ok"]  # the server answered as it should; only 5xx and unreachable servers fail a run
    assert _db_counts(engine)["keys"] == 0


def test_rate_limit_paces_requests(api_url, authority):
    summary = run_simulation(SimulateOptions(publishes=6, url=api_url, rate=10, chaff_ratio=0, revision_ratio=0,
                                             concurrency=3), authority, clock=_now)
    # A bucket of one token at 10/s: the 6th request may start 0.5 s after the first.
    assert summary.ok and summary.wall_seconds >= 0.45
    assert summary.as_dict()["requests_per_second"] <= 12


def test_server_errors_fail_the_run(api_url, authority, engine):
    with engine.begin() as conn:  # a real database failure on every insert: the API answers 500
        conn.execute(sa.text("CREATE OR REPLACE FUNCTION enp_test_fail_insert() RETURNS trigger LANGUAGE plpgsql"
                             " AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$"))
        conn.execute(sa.text("CREATE TRIGGER enp_test_fail_insert BEFORE INSERT ON exposure"
                             " FOR EACH ROW EXECUTE FUNCTION enp_test_fail_insert()"))
    try:
        summary = run_simulation(SimulateOptions(publishes=3, url=api_url, chaff_ratio=1, revision_ratio=0),
                                 authority, clock=_now)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER IF EXISTS enp_test_fail_insert ON exposure"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS enp_test_fail_insert()"))
    d = summary.as_dict()
    assert not d["ok"] and d["http_errors"] == {"500 internal_error": 3}
    assert d["chaff"]["answered"] == 3


def test_unreachable_url_is_refused_before_sending(authority):
    with pytest.raises(SimulateError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1/publish: "):
        run_simulation(SimulateOptions(publishes=1, url=f"http://127.0.0.1:{_closed_port()}"), authority, clock=_now)


# -- the command line ----------------------------------------------------------------------------------


def _ha_args(key_file: Path) -> list[str]:
    return ["--ha-key", str(key_file), "--issuer", support.ISSUER, "--audience", support.AUDIENCE,
            "--app", support.APP_ID]


def test_cli_summary_text_and_json(cli, api_url, ha_key_file, engine):
    code, out, err = cli("simulate", "--publishes", "8", "--url", api_url, "--chaff-ratio", "0.25",
                         "--revision-ratio", "0.25", "--seed", "1", *_ha_args(ha_key_file))
    assert code == 0, err
    assert err == ""  # no progress line when stderr is not a terminal
    assert f"simulated 8 phones against {api_url}/v1/publish" in out
    assert "publishes    8 sent, 8 accepted" in out
    assert "revisions    2 sent, 2 accepted" in out
    assert "chaff        2 sent, 2 answered" in out
    assert "rejected     0" in out and "HTTP errors  0" in out and "conn errors  0" in out
    assert "latency      p50" in out and "requests/s" in out and "result       OK" in out

    code, out, err = cli("simulate", "--publishes", "4", "--url", api_url + "/v1/publish", "--json",
                         *_ha_args(ha_key_file))
    assert code == 0, err
    d = json.loads(out)
    assert d["ok"] and d["publishes"]["accepted"] == 4 and d["target"] == f"{api_url}/v1/publish"
    assert set(d["latency_ms"]) == {"p50", "p95", "p99", "max"}


def test_cli_argument_errors(cli, ha_key_file, tmp_path):
    ha = _ha_args(ha_key_file)
    cases = [
        (["--publishes", "0", *ha], "--publishes must be at least 1, got 0"),
        (["--publishes", "3", "--revision-ratio", "1.5", *ha], "--revision-ratio must be between 0 and 1"),
        (["--publishes", "3", "--rate", "0", *ha], "--rate must be a positive number"),
        (["--publishes", "3", "--concurrency", "0", *ha], "--concurrency must be between 1 and 512"),
        (["--publishes", "3", "--url", "ftp://example.org", *ha], "--url must look like http://host:port"),
        (["--publishes", "3", "--ha-key", str(ha_key_file)], "--ha-key needs --issuer, --audience, --app"),
        (["--publishes", "3", "--var-dir", str(tmp_path / "nothing")], "no demo health authority key at"),
        (["--publishes", "3", "--ha-key", str(tmp_path / "missing.pem"), "--issuer", "i", "--audience", "a",
          "--app", "x"], "cannot read the health authority key"),
    ]
    for argv, message in cases:
        code, out, err = cli("simulate", *argv)
        assert code == 1 and out == "", (argv, out, err)
        assert err.startswith("enpipeline: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1, err
    code, _, err = cli("simulate")  # argparse: the required flag
    assert code == 2 and "--publishes" in err


def test_cli_unreachable_url_is_one_line(cli, ha_key_file):
    port = _closed_port()
    code, out, err = cli("simulate", "--publishes", "5", "--url", f"http://127.0.0.1:{port}", *_ha_args(ha_key_file))
    assert code == 1 and out == ""
    assert err == (f"enpipeline: error: cannot reach http://127.0.0.1:{port}/v1/publish: Connection refused"
                   " (is the API running? `make up` starts one)\n")
