"""The admin CLI contract: commands, flags, outputs and one-line errors, against real Postgres."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from enpipeline.cli import main
from tests import support


@pytest.fixture
def pem_file(tmp_path: Path, ha_key) -> Path:
    path = tmp_path / "ha.pem"
    path.write_text(support.public_pem(ha_key))
    return path


def test_db_migrate_is_idempotent(cli):
    code, out, _ = cli("db", "migrate")
    assert code == 0 and "applied 0 migration(s)" in out and "up to date" in out
    code, out, _ = cli("db", "status")
    assert code == 0 and "schema is up to date" in out


def test_health_authority_lifecycle(cli, pem_file):
    code, out, _ = cli("health-authority", "add", "--issuer", "gov.example", "--audience", "keyserver",
                       "--name", "Example HA", "--jwks-uri", "https://example.invalid/jwks")
    assert code == 0 and "added health authority" in out
    code, _, err = cli("health-authority", "add", "--issuer", "gov.example", "--audience", "x", "--name", "y")
    assert code == 1 and "already exists" in err

    code, out, _ = cli("health-authority", "add-key", "--issuer", "gov.example", "--version", "v1",
                       "--public-key", str(pem_file), "--from", "2020-01-01T00:00:00Z")
    assert code == 0 and "added key 'v1'" in out
    code, _, err = cli("health-authority", "add-key", "--issuer", "gov.example", "--version", "v1",
                       "--public-key", str(pem_file))
    assert code == 1 and "already has a key" in err

    code, out, _ = cli("health-authority", "list", "--json")
    rows = json.loads(out)
    assert code == 0 and rows[0]["issuer"] == "gov.example" and rows[0]["keys"] == "v1"
    assert rows[0]["jwks_uri"] == "https://example.invalid/jwks"

    code, out, _ = cli("health-authority", "show", "--issuer", "gov.example", "--json")
    shown = json.loads(out)
    assert shown["keys"][0]["active"] is True and "BEGIN PUBLIC KEY" in shown["keys"][0]["public_key"]

    code, out, _ = cli("health-authority", "revoke-key", "--issuer", "gov.example", "--version", "v1")
    assert code == 0
    code, out, _ = cli("health-authority", "show", "--issuer", "gov.example", "--json")
    assert json.loads(out)["keys"][0]["active"] is False

    code, out, _ = cli("health-authority", "remove-key", "--issuer", "gov.example", "--version", "v1")
    assert code == 0
    code, out, _ = cli("health-authority", "remove", "--issuer", "gov.example")
    assert code == 0
    code, out, _ = cli("health-authority", "list")
    assert "(none)" in out


def test_add_key_rejects_non_p256_keys(cli, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    cli("health-authority", "add", "--issuer", "gov.example", "--audience", "a", "--name", "n")
    for i, key in enumerate([rsa.generate_private_key(public_exponent=65537, key_size=2048),
                             ec.generate_private_key(ec.SECP384R1())]):
        path = tmp_path / f"bad{i}.pem"
        path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
        code, _, err = cli("health-authority", "add-key", "--issuer", "gov.example", "--version", f"v{i}",
                           "--public-key", str(path))
        assert code == 1 and "ECDSA P-256" in err
    (tmp_path / "junk.pem").write_text("not a key")
    code, _, err = cli("health-authority", "add-key", "--issuer", "gov.example", "--version", "v9",
                       "--public-key", str(tmp_path / "junk.pem"))
    assert code == 1 and "not a PEM public key" in err


def test_app_lifecycle(cli, pem_file):
    cli("health-authority", "add", "--issuer", "iss-a", "--audience", "a", "--name", "A")
    cli("health-authority", "add", "--issuer", "iss-b", "--audience", "b", "--name", "B")
    code, out, _ = cli("app", "add", "--id", "Com.Example.App", "--regions", "us,ca", "--allow-issuer", "iss-a",
                       "--allow-issuer", "iss-b")
    assert code == 0, out
    code, _, err = cli("app", "add", "--id", "com.example.app", "--regions", "US", "--allow-issuer", "iss-a")
    assert code == 1 and "already exists" in err
    code, out, _ = cli("app", "show", "--id", "COM.EXAMPLE.APP", "--json")
    shown = json.loads(out)
    assert shown == {"id": "com.example.app", "regions": "US,CA", "issuers": "iss-a,iss-b",
                     "bypass_verification": False, "bypass_revision_token": False}
    code, out, _ = cli("app", "add", "--id", "com.example.app", "--regions", "DE", "--bypass-verification",
                       "--bypass-revision-token", "--replace")
    assert code == 0
    code, out, _ = cli("app", "list", "--json")
    assert json.loads(out) == [{"id": "com.example.app", "regions": "DE", "issuers": "",
                                "bypass_verification": True, "bypass_revision_token": True}]
    code, _, err = cli("app", "add", "--id", "x", "--regions", "US", "--allow-issuer", "nobody")
    assert code == 1 and "no health authority with issuer 'nobody'" in err
    code, _, err = cli("app", "add", "--id", "x", "--regions", "US")
    assert code == 1 and "--allow-issuer" in err
    code, _, err = cli("health-authority", "remove", "--issuer", "iss-a")
    assert code == 0  # the replaced app no longer uses it
    cli("app", "add", "--id", "y", "--regions", "US", "--allow-issuer", "iss-b")
    code, _, err = cli("health-authority", "remove", "--issuer", "iss-b")
    assert code == 1 and "apps still allow" in err
    code, out, _ = cli("app", "remove", "--id", "com.example.app")
    assert code == 0
    code, _, err = cli("app", "remove", "--id", "com.example.app")
    assert code == 1 and "no app" in err


def test_bad_time_flag_is_a_one_line_error(cli, pem_file):
    cli("health-authority", "add", "--issuer", "i", "--audience", "a", "--name", "n")
    code, _, err = cli("health-authority", "add-key", "--issuer", "i", "--version", "v1", "--public-key",
                       str(pem_file), "--from", "yesterday")
    assert code == 1 and err.count("\n") == 1 and "--from must be an ISO 8601 time" in err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "ENP_DATABASE_URL is not set"),
        ({"ENP_DATABASE_URL": "mysql://x"}, "ENP_DATABASE_URL must be a postgresql:// URL"),
        ({"ENP_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}, "cannot use the database in ENP_DATABASE_URL"),
        ({"ENP_DATABASE_URL": "postgresql://x@h/db", "ENP_MAX_KEYS_ON_PUBLISH": "many"},
         "ENP_MAX_KEYS_ON_PUBLISH must be an integer"),
    ],
)
def test_configuration_problems_are_one_line_without_traceback(env, expected):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ENP_")}
    proc = subprocess.run([sys.executable, "-m", "enpipeline.cli", "app", "list"], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unmigrated_database_says_what_to_do(empty_database_url, monkeypatch, capsys):
    monkeypatch.setenv("ENP_DATABASE_URL", empty_database_url)
    assert main(["app", "list"]) == 1
    assert "has `enpipeline db migrate` run?" in capsys.readouterr().err
