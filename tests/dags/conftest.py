"""Fixtures for the DAG tests: a migrated Airflow metadata database (once per session, cloned per environment)
and Airflow environments wired to the test database."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from enpipeline.db.admin import scratch_database, with_database
from enpipeline.db.engine import normalize_url
from tests.dags.airflow_env import AIRFLOW, AirflowEnv, airflow_sql_url, clean_environ

TIMINGS: dict[str, str] = {}  # printed after the run: how long Airflow took here


@pytest.fixture(scope="session")
def airflow_template(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Name of a Postgres database that `airflow db migrate` has migrated; environments clone it."""
    with scratch_database(server_url, "enp_airflow_tpl") as url:
        home = tmp_path_factory.mktemp("airflow_template_home")
        env = {**clean_environ(), "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_sql_url(url)}
        started = time.perf_counter()
        out = subprocess.run([AIRFLOW, "db", "migrate"], cwd=home, env=env, capture_output=True, text=True,
                             timeout=600, check=False)
        TIMINGS["airflow db migrate"] = f"{time.perf_counter() - started:.1f}s"
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        yield str(make_url(url).database)


@pytest.fixture
def airflow_factory(airflow_template: str, server_url: str, settings, tmp_path: Path
                    ) -> Iterator[Callable[[str], AirflowEnv]]:
    """``make(name)`` -> a fresh Airflow environment: its own home, metadata database (a clone of the migrated
    template) and blob directory; all share the test database and the signing key directory."""
    admin = sa.create_engine(normalize_url(server_url), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    created: list[str] = []

    def make(name: str) -> AirflowEnv:
        db = f"enp_airflow_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{db}" TEMPLATE "{airflow_template}"'))
        created.append(db)
        return AirflowEnv.create(home=tmp_path / name / "airflow", metadata_url=with_database(server_url, db),
                                 blob_dir=tmp_path / name / "blobs",
                                 key_dir=tmp_path / "keys", database_url=settings.database_url)

    yield make
    with admin.connect() as conn:
        for db in created:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def airflow(airflow_factory: Callable[[str], AirflowEnv]) -> AirflowEnv:
    return airflow_factory("env")


def pytest_terminal_summary(terminalreporter) -> None:
    if TIMINGS:
        terminalreporter.write_line("DAG test timings: " + ", ".join(f"{k} {v}" for k, v in TIMINGS.items()))
