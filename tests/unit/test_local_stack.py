"""The pieces of ``make up`` that need no running stack: ports, where Airflow's metadata goes, the files with secrets.
(tests/e2e/test_airflow_ui.py runs the whole stack.)"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time

import pytest
from sqlalchemy.engine import make_url

from enpipeline import local
from enpipeline import local_airflow as af

EMBEDDED = "postgresql://postgres:@/postgres?host=/srv/var/pgdata"
EXTERNAL = "postgresql://enp:secret@db.internal:5432/enp"


def test_ports_default_to_8080_and_8088_and_follow_the_environment(monkeypatch):
    for name in ("ENP_LOCAL_API_PORT", "ENP_LOCAL_AIRFLOW_PORT", "ENP_LOCAL_AIRFLOW_WORKER_LOG_PORT",
                 "ENP_LOCAL_AIRFLOW_TRIGGER_LOG_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert local.Ports.from_env() == local.Ports(api=8080, airflow=8088, worker_logs=8793, trigger_logs=8794)
    monkeypatch.setenv("ENP_LOCAL_AIRFLOW_PORT", "9001")
    assert local.Ports.from_env().airflow == 9001
    assert local.Ports.from_env(airflow=9002).airflow == 9002  # a flag beats the environment
    monkeypatch.setenv("ENP_LOCAL_API_PORT", "http")
    with pytest.raises(SystemExit, match="ENP_LOCAL_API_PORT must be a port number"):
        local.Ports.from_env()


def test_airflow_metadata_lives_next_to_the_enpipeline_database(monkeypatch):
    monkeypatch.delenv("ENP_AIRFLOW_DATABASE_URL", raising=False)
    embedded = make_url(af.metadata_url(EMBEDDED, embedded=True))
    assert (embedded.database, embedded.query["host"]) == ("airflow", "/srv/var/pgdata")
    external = make_url(af.metadata_url(EXTERNAL, embedded=False))
    assert (external.username, external.password, external.host, external.port, external.database) == (
        "enp", "secret", "db.internal", 5432, "enp_airflow")
    monkeypatch.setenv("ENP_AIRFLOW_DATABASE_URL", "postgresql://af@other:5432/meta")
    assert af.metadata_url(EXTERNAL, embedded=False) == "postgresql://af@other:5432/meta"


def test_the_unix_socket_of_the_embedded_server_reaches_the_enp_postgres_connection():
    conn = json.loads(af.postgres_connection(EMBEDDED))
    assert conn["conn_type"] == "postgres" and conn["schema"] == "postgres"
    assert conn["extra"] == {"sqlalchemy_query": {"host": "/srv/var/pgdata"}}


def test_secrets_and_the_admin_password_are_made_once_and_only_their_owner_reads_them(tmp_path):
    paths = af.AirflowPaths.of(tmp_path)
    password = af.admin_password(paths)
    assert len(password) == 16 and af.admin_password(paths) == password
    assert json.loads(paths.passwords.read_text()) == {"admin": password}  # SimpleAuthManager's passwords file
    values = af.settings(tmp_path, port=18081, worker_log_port=18793, trigger_log_port=18794,
                         database_url=EMBEDDED, meta_url=af.metadata_url(EMBEDDED, embedded=True))
    again = af.settings(tmp_path, port=18081, worker_log_port=18793, trigger_log_port=18794,
                        database_url=EMBEDDED, meta_url=af.metadata_url(EMBEDDED, embedded=True))
    assert values == again  # the Fernet key and JWT secret survive a restart
    af.write_env_file(paths, values)
    for path in (paths.passwords, paths.secrets, paths.env_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(paths.home.stat().st_mode) == 0o700
    assert values["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18081/execution/"
    assert values["AIRFLOW__CORE__PARALLELISM"] == "4" and values["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert values["AIRFLOW__CORE__DAGS_FOLDER"] == str(af.REPO / "dags")

    # The env file is what a shell sources for the airflow CLI: every value, JSON quotes included, survives.
    out = subprocess.run(["bash", "-c", f"set -a; . {paths.env_file}; set +a; env -0"], capture_output=True,
                         check=True, env={"PATH": os.environ["PATH"]}).stdout.decode()
    sourced = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    assert {k: sourced[k] for k in values} == values


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_down_finds_the_processes_that_left_their_group(tmp_path):
    """A child in a session of its own (like an Airflow task process) is still found below its ancestor."""
    script = "import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; " \
             "time.sleep(60)'], start_new_session=True); time.sleep(60)"
    parent = subprocess.Popen(["python3", "-c", script], start_new_session=True)
    try:
        found: set[int] = set()
        for _ in range(200):  # until the child runs in its own session
            found = {pid for pid in local._descendants({parent.pid}) if _pgid(pid) not in (parent.pid, None)}
            if found:
                break
            time.sleep(0.05)
        assert len(found) == 1
        local._stop_groups({"probe": parent.pid}, grace=2)  # the unreaped parent is a zombie till then
        parent.wait(timeout=10)
        assert not any(local._alive(pid) for pid in found)
    finally:
        if parent.poll() is None:
            parent.kill()
