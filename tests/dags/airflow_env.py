"""Airflow test environments for the DAG tests: a private AIRFLOW_HOME and metadata database per environment,
the enp_* connections pointing at the test database and a blob directory, and ways to run the DAG:
``dag.test()`` in a driver process, the ``airflow`` CLI, or a real api-server + dag-processor + scheduler.

Everything Airflow runs in subprocesses: Airflow reads its configuration when it is first imported, so the
pytest process never imports it and never sees (or creates) an ``~/airflow``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from enpipeline.db import export as export_db
from enpipeline.db import exposures as exposures_db
from enpipeline.db.engine import normalize_url
from enpipeline.export import format as fmt
from enpipeline.export.signing import FilesystemKeyManager
from enpipeline.local_airflow import postgres_connection
from enpipeline.model import Exposure
from enpipeline.timeutil import interval_number, truncate
from tests import logscan

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
BUCKET = "exports"


def clean_environ() -> dict[str, str]:
    """This process's environment without any Airflow or enpipeline setting a developer may have exported."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW", "ENP_"))}


def airflow_sql_url(database_url: str) -> str:
    return normalize_url(database_url)  # postgresql+psycopg2://..., which Airflow 3 accepts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunResult:
    """One ``dag.test()`` run as the driver reported it, with the log it printed."""

    state: str
    run_id: str
    data_interval: list[str | None]
    tasks: list[dict[str, Any]]
    returns: dict[str, dict[str, Any]]
    log: str

    def task_states(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t in self.tasks:
            out.setdefault(t["task_id"], []).append(t["state"])
        return out


class DagTestDriver:
    """``python -m tests.dags.airflow_driver`` kept running; ``run()`` does one ``dag.test()`` in it."""

    def __init__(self, env: dict[str, str], cwd: Path, log_path: Path):
        self.log_path = log_path
        self._log = log_path.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.dags.airflow_driver"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, start_new_session=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._lines.put(line)
        self._lines.put(None)

    def run(self, logical_date: datetime | None, *, retries: int | None = None, retry_delay: float | None = None,
            timeout: float = 180, dag_id: str = "en_export") -> RunResult:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"logical_date": logical_date.isoformat() if logical_date else None,
                                          "retries": retries, "retry_delay": retry_delay, "dag_id": dag_id}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        log: list[str] = []
        begun = False
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"dag.test did not finish within {timeout}s; see {self.log_path}") from None
            if line is None:
                raise AssertionError(f"the dag.test driver exited ({self.proc.poll()}); see {self.log_path}:\n"
                                     + "".join(log[-40:]))
            if line.startswith("@@BEGIN"):
                begun = True
            elif line.startswith("@@RESULT "):
                data = json.loads(line[len("@@RESULT "):])
                return RunResult(log="".join(log), **data)
            elif begun:
                log.append(line)

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        self._log.close()


@dataclass
class AirflowEnv:
    """One Airflow installation: home, metadata database, connections, and the enpipeline settings it runs with."""

    home: Path
    metadata_url: str
    blob_dir: Path
    key_dir: Path
    database_url: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, *, home: Path, metadata_url: str, blob_dir: Path, key_dir: Path, database_url: str
               ) -> AirflowEnv:
        home.mkdir(parents=True, exist_ok=True)
        blob_dir.mkdir(parents=True, exist_ok=True)
        self = cls(home=home, metadata_url=metadata_url, blob_dir=blob_dir, key_dir=key_dir,
                   database_url=database_url)
        jwt_secret, api_secret = os.urandom(32).hex(), os.urandom(16).hex()
        # Component logs, the dag.test driver's log and task logs all live under home: the log scan reads them.
        logscan.register_log_dir(home)
        logscan.register_key_dir(key_dir)
        logscan.register_secret(jwt_secret, "Airflow JWT secret")
        logscan.register_secret(api_secret, "Airflow API secret key")
        self.env = {
            **clean_environ(),
            "PYTHONPATH": str(REPO),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_sql_url(metadata_url),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
            "AIRFLOW__API__SECRET_KEY": api_secret,
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW_CONN_ENP_POSTGRES": postgres_connection(database_url),
            "AIRFLOW_CONN_ENP_BLOBSTORE": json.dumps({"conn_type": "fs", "extra": {"path": str(blob_dir)}}),
            "ENP_KEY_DIR": str(key_dir),
        }
        return self

    def airflow(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([AIRFLOW, *args], cwd=self.home, env={**self.env, **(env or {})}, text=True,
                              capture_output=True, timeout=timeout, check=False)

    @contextmanager
    def driver(self) -> Iterator[DagTestDriver]:
        d = DagTestDriver(self.env, self.home, self.home / "driver.log")
        try:
            yield d
        finally:
            d.close()

    def metadata(self) -> Engine:
        return sa.create_engine(airflow_sql_url(self.metadata_url), poolclass=sa.pool.NullPool)

    # -- blobs ------------------------------------------------------------------------------------------

    def blobs(self) -> dict[str, bytes]:
        """Every file under the blob directory (temporary files included), by relative path."""
        return {p.relative_to(self.blob_dir).as_posix(): p.read_bytes()
                for p in sorted(self.blob_dir.rglob("*")) if p.is_file()}

    def zips(self, root: str) -> list[str]:
        base = self.blob_dir / BUCKET
        return sorted(p.relative_to(base).as_posix() for p in (base / root).glob("*.zip"))

    def read(self, name: str) -> fmt.ParsedExport:
        return fmt.read_export(self.blob_dir / BUCKET / name)

    def index(self, root: str) -> str:
        return (self.blob_dir / BUCKET / root / "index.txt").read_text()


@contextmanager
def running(env: AirflowEnv, name: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """An Airflow component (`airflow NAME ARGS`) in its own process group, stopped (group and all) on exit."""
    log = (env.home / f"{name}.log").open("ab")
    proc = subprocess.Popen([AIRFLOW, name, *args], cwd=env.home, env=env.env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen[Any], grace: float = 30) -> None:
    """SIGTERM to the process group we started (the component and the workers it forked), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the component left behind in its group
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_http_ok(url: str, proc: subprocess.Popen[Any], timeout: float) -> float:
    """Poll ``url`` until it answers 200 (the first request also warms the app up); returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s")


# -- seeding the enpipeline database ---------------------------------------------------------------------


def add_signing_key(engine: Engine, key_dir: Path, name: str, now: datetime, *, key_id: str = "310",
                    key_version: str = "v1"):
    """A filesystem signing key and its signature info; returns (signature info id, public key)."""
    from cryptography.hazmat.primitives import serialization

    keys = FilesystemKeyManager(key_dir)
    ref = keys.create_signing_key(name)
    with engine.begin() as conn:
        sig_id = export_db.add_signature_info(conn, name=name, signing_key=ref, key_id=key_id, key_version=key_version,
                                              algorithm=fmt.ALGORITHM_ECDSA_P256_SHA256,
                                              from_timestamp=now - timedelta(days=30), thru_timestamp=None, now=now)
    return sig_id, serialization.load_pem_public_key(keys.signer(ref).public_key_pem().encode())


def add_config(engine: Engine, name: str, *, period: timedelta, sig_ids: tuple[int, ...], region: str = "US",
               root: str | None = None, max_records: int | None = None, now: datetime) -> export_db.ExportConfigRow:
    cfg = export_db.ExportConfigRow(
        config_id=0, name=name, bucket_name=BUCKET, filename_root=root or f"exposureKeyExport-{name}",
        period_seconds=int(period.total_seconds()), output_region=region, input_regions=(region,),
        include_travelers=False, only_non_travelers=False, exclude_regions=(), max_records_override=max_records,
        signature_info_ids=sig_ids, from_timestamp=now - timedelta(days=30), thru_timestamp=None, disabled=False)
    with engine.begin() as conn:
        export_db.add_export_config(conn, cfg)
        return export_db.get_export_config(conn, name=name)


def exposure(created_at: datetime, *, region: str = "US", dsos: int = 0, report_type: str = "confirmed") -> Exposure:
    start = interval_number(truncate(created_at, timedelta(days=1))) - 144
    return Exposure(exposure_key=os.urandom(16), transmission_risk=2, app_package_name="com.example.test",
                    regions=[region], traveler=False, interval_number=start, interval_count=144,
                    created_at=created_at, report_type=report_type, days_since_symptom_onset=dsos)


def insert(engine: Engine, rows: list[Exposure]) -> list[Exposure]:
    exposures_db.PartitionGuard(engine).ensure(r.created_at for r in rows)
    with engine.begin() as conn:
        exposures_db.insert_exposures(conn, rows)
    return rows


def batches(engine: Engine) -> list[dict[str, Any]]:
    """Every export batch with its config name, in window order: what a run left in the database."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT c.name AS config, b.start_timestamp, b.end_timestamp, b.status, b.key_count,"
            " b.revised_key_count, b.padding_key_count, b.file_count, b.stats"
            " FROM export_batch b JOIN export_config c USING (config_id)"
            " ORDER BY c.name, b.start_timestamp")).mappings().all()
    return [dict(r) for r in rows]
