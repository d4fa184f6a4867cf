"""Fixtures for tests on a real Postgres: ENP_TEST_DATABASE_URL when set, otherwise embedded pgserver."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from enpipeline.config import Settings
from enpipeline.db.admin import scratch_database
from enpipeline.db.engine import make_engine
from enpipeline.db.migrate import migrate
from tests import logscan, support

# Every log line of the session is scanned for secrets and client addresses at the end (tests/logscan.py).
pytest_plugins = ["tests.logscan"]

# Anything that imports Airflow in the test process (the GCS hook tests) must not create ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="enp-test-airflow-home-"))

TABLES = ("exposure, authorized_app, health_authority_key, health_authority, revision_key, export_file, "
          "export_shard, export_batch, export_config, signature_info, federation_in_sync, federation_in_query, "
          "federation_out_authorization, import_file, export_importer_key, export_importer, efgs_upload_batch, "
          "efgs_push_window, efgs_pull_cursor, efgs_download, efgs_target")


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Postgres server's maintenance database."""
    url = os.environ.get("ENP_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pgserver

    server = pgserver.get_server(str(tmp_path_factory.mktemp("pgdata")), cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A fresh database for this test session, dropped at the end."""
    with scratch_database(server_url, "enp_test") as url:
        yield url


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """An empty, unmigrated database of its own, for tests that start from nothing."""
    with scratch_database(server_url, "enp_empty") as url:
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    kek, aad, var_dir = os.urandom(32), os.urandom(16), tmp_path_factory.mktemp("var")
    logscan.register_secret(kek, "revision-token KEK")
    logscan.register_secret(aad, "revision-token AAD")
    logscan.register_key_dir(var_dir)
    # Keys and blobs inside the session's var dir, as load_settings places them: Settings' own defaults are relative
    # to the working directory, and a test writing a signing key there would leave it in the checkout's var/.
    return Settings(database_url=database_url, var_dir=var_dir, key_dir=var_dir / "keys",
                    blobstore=f"file://{var_dir / 'blobs'}", revision_token_kek=kek, revision_token_aad=aad)


@pytest.fixture(scope="session")
def migrated_engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    migrate(engine, now=datetime.now(UTC), retention=settings.retention, days_ahead=settings.partition_days_ahead)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(migrated_engine: Engine) -> Engine:
    """The migrated database, emptied before each test."""
    with migrated_engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    return migrated_engine


@pytest.fixture
def ha_key():
    return support.new_signing_key()


@pytest.fixture
def seeded(engine: Engine, ha_key) -> dict:
    """One health authority with an active key and one app that trusts it (region US)."""
    ha_id = support.seed_app(engine, ha_key)
    return {"ha_id": ha_id, "key": ha_key, "cert": support.Certificate(key=ha_key)}


@pytest.fixture
def cli(engine, settings, monkeypatch, capsys, tmp_path):
    """Run `enpipeline ARGS...` in-process against the test database; returns (exit code, stdout, stderr)."""
    from enpipeline.cli import main

    monkeypatch.setenv("ENP_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ENP_KEY_DIR", str(tmp_path / "keys"))
    logscan.register_key_dir(tmp_path / "keys")
    monkeypatch.setenv("ENP_BLOBSTORE", f"file://{tmp_path / 'blobs'}")

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:  # commands that report a verdict through the exit status
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run

