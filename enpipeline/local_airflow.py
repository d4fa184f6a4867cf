"""The Airflow half of ``make up``: api-server (UI + REST + Execution API), scheduler, dag-processor and triggerer.

Each component runs as ``airflow <component>`` in a process group of its own (PID file under ``var/run``, output
in ``var/log/airflow-<component>.log``), with AIRFLOW_HOME in ``var/airflow`` and its metadata in a database
next to enpipeline's. Airflow is configured entirely through the environment built here (also written to
``var/airflow/airflow.env`` for the ``airflow`` CLI); this module never imports Airflow.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
HOST = "127.0.0.1"
ADMIN = "admin"
# Started in this order; the api-server first, because the others' tasks talk to its Execution API.
COMPONENTS = ("api-server", "dag-processor", "scheduler", "triggerer")
# The /api/v2/monitor/health entry of each component that heartbeats.
HEALTH_KEYS = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}


class StartError(RuntimeError):
    """A component did not come up; the message names it, says why and where its log is."""


@dataclass(frozen=True)
class AirflowPaths:
    home: Path
    passwords: Path
    secrets: Path
    env_file: Path
    migrated: Path
    task_logs: Path
    run: Path
    logs: Path

    @classmethod
    def of(cls, var: Path) -> AirflowPaths:
        home = var / "airflow"
        return cls(home=home, passwords=home / "passwords.json", secrets=home / "secrets.json",
                   env_file=home / "airflow.env", migrated=home / "migrated.json", task_logs=home / "logs",
                   run=var / "run", logs=var / "log")

    def pid(self, component: str) -> Path:
        return self.run / f"airflow-{component}.pid"

    def log(self, component: str) -> Path:
        return self.logs / f"airflow-{component}.log"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (created 0600, never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def _private_json(path: Path, fill: Callable[[dict[str, str]], bool]) -> dict[str, str]:
    data: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    if fill(data) or not path.exists():
        write_private(path, json.dumps(data, indent=2) + "\n")
    os.chmod(path, 0o600)
    return data


def admin_password(paths: AirflowPaths) -> str:
    """The generated password of the UI's ``admin`` user (SimpleAuthManager's passwords file), made once."""

    def fill(data: dict[str, str]) -> bool:
        if data.get(ADMIN):
            return False
        data[ADMIN] = base64.b32encode(os.urandom(10)).decode().lower()  # 16 characters, easy to type
        return True

    return _private_json(paths.passwords, fill)[ADMIN]


def _secrets(paths: AirflowPaths) -> dict[str, str]:
    """Fernet key, JWT secret and API secret key: generated once so tokens, cookies and encrypted fields survive
    a restart, and shared by every component (a task's token is signed by the scheduler, checked by the API)."""

    def fill(data: dict[str, str]) -> bool:
        made = {"fernet_key": lambda: base64.urlsafe_b64encode(os.urandom(32)).decode(),
                "jwt_secret": lambda: os.urandom(32).hex(), "api_secret_key": lambda: os.urandom(24).hex()}
        missing = [k for k in made if not data.get(k)]
        for k in missing:
            data[k] = made[k]()
        return bool(missing)

    return _private_json(paths.secrets, fill)


# -- configuration ----------------------------------------------------------------------------------------


def metadata_url(database_url: str, embedded: bool) -> str:
    """The Airflow metadata database: ``ENP_AIRFLOW_DATABASE_URL``, else database ``airflow`` on the embedded
    server, else ``<enpipeline database>_airflow`` on the server of ``ENP_DATABASE_URL``."""
    from sqlalchemy.engine import make_url

    from enpipeline.db.admin import with_database

    explicit = os.environ.get("ENP_AIRFLOW_DATABASE_URL", "")
    if explicit:
        return explicit
    return with_database(database_url, "airflow" if embedded else f"{make_url(database_url).database}_airflow")


def ensure_database(database_url: str, meta_url: str) -> bool:
    """Create the metadata database if it is missing (connecting through enpipeline's); True if it was made."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from enpipeline.db.engine import normalize_url

    meta, enp = make_url(normalize_url(meta_url)), make_url(normalize_url(database_url))
    if (meta.host, meta.port, meta.query.get("host")) != (enp.host, enp.port, enp.query.get("host")):
        return False  # another server (ENP_AIRFLOW_DATABASE_URL): whoever runs it creates the database
    name = meta.database
    admin = sa.create_engine(enp, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with admin.connect() as conn:
            if conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
                return False
            conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
            return True
    except sa.exc.SQLAlchemyError as exc:
        raise StartError(f"could not create the Airflow metadata database {name!r} next to enpipeline's: "
                         f"{exc.__class__.__name__}: {str(exc).splitlines()[0]} (create it, or set "
                         "ENP_AIRFLOW_DATABASE_URL to an existing one)") from None
    finally:
        admin.dispose()


def postgres_connection(database_url: str) -> str:
    """AIRFLOW_CONN_ENP_POSTGRES (JSON form) for a database URL, including a unix-socket host in the query."""
    from sqlalchemy.engine import make_url

    parsed = make_url(database_url)
    conn: dict[str, Any] = {"conn_type": "postgres", "login": parsed.username or "", "password": parsed.password or "",
                            "host": parsed.host or "", "schema": parsed.database or ""}
    if parsed.port:
        conn["port"] = parsed.port
    if parsed.query:
        conn["extra"] = {"sqlalchemy_query": dict(parsed.query)}
    return json.dumps(conn)


def blobstore_connection(var: Path, blobstore: str) -> str:
    """AIRFLOW_CONN_ENP_BLOBSTORE: Airflow's File connection on var/blobs, or the URL of ENP_BLOBSTORE if set."""
    if blobstore in ("", f"file://{var / 'blobs'}"):
        return json.dumps({"conn_type": "fs", "extra": {"path": str(var / "blobs")}})
    return json.dumps({"conn_type": "generic", "extra": {"url": blobstore}})


def settings(var: Path, *, port: int, worker_log_port: int, trigger_log_port: int, database_url: str,
             meta_url: str, blobstore: str = "") -> dict[str, str]:
    """Every AIRFLOW_* / ENP_* variable the components run with (small-machine sizing, LocalExecutor)."""
    from enpipeline.db.engine import normalize_url

    paths = AirflowPaths.of(var)
    paths.home.mkdir(parents=True, exist_ok=True)
    paths.home.chmod(0o700)  # secrets, the passwords file and airflow.cfg live here
    secret = _secrets(paths)
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "AIRFLOW_HOME": str(paths.home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",  # the demo runs at once; a DAG paused later stays so
        "AIRFLOW__CORE__FERNET_KEY": secret["fernet_key"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{HOST}:{port}/execution/",
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(paths.passwords),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": normalize_url(meta_url),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "2",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "4",
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": secret["api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": secret["jwt_secret"],
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(paths.task_logs),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(worker_log_port),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(trigger_log_port),
        # On a busy 2-core machine the first Execution API calls of a task can take several seconds; the
        # default 5 s would fail the attempt and send the task into its retry delay.
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
        "AIRFLOW_CONN_ENP_POSTGRES": postgres_connection(database_url),
        "AIRFLOW_CONN_ENP_BLOBSTORE": blobstore_connection(var, blobstore),
        "ENP_DATABASE_URL": database_url,
        "ENP_VAR_DIR": str(var),
    }


def environment(values: dict[str, str]) -> dict[str, str]:
    """This process's environment without a developer's own Airflow settings, plus ``values``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW"))}
    return {**base, **values}


def write_env_file(paths: AirflowPaths, values: dict[str, str]) -> None:
    """``set -a; . var/airflow/airflow.env; set +a`` gives a shell the stack's ``airflow`` CLI (it holds secrets)."""
    lines = ["# The local stack's Airflow settings (make up writes this file; it holds secrets: mode 0600)."]
    lines += [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    write_private(paths.env_file, "\n".join(lines) + "\n")


# -- metadata database ------------------------------------------------------------------------------------


def _alembic_revision(meta_url: str) -> str | None:
    import sqlalchemy as sa

    from enpipeline.db.engine import normalize_url

    engine = sa.create_engine(normalize_url(meta_url), poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.ProgrammingError:  # no alembic_version yet: never migrated
        return None
    except sa.exc.OperationalError as exc:
        where = "ENP_AIRFLOW_DATABASE_URL" if os.environ.get("ENP_AIRFLOW_DATABASE_URL") else _redacted(meta_url)
        raise StartError(f"cannot connect to Airflow's metadata database ({where}): "
                         f"{str(exc.orig).strip().splitlines()[-1]}") from None
    finally:
        engine.dispose()


def migrate(paths: AirflowPaths, env: dict[str, str], meta_url: str) -> str:
    """``airflow db migrate`` unless this Airflow version already migrated this database (saves ~8 s a start)."""
    version = importlib.metadata.version("apache-airflow-core")
    done = json.loads(paths.migrated.read_text()) if paths.migrated.exists() else {}
    revision = _alembic_revision(meta_url)
    if revision and done == {"airflow": version, "revision": revision, "database": _redacted(meta_url)}:
        return "up to date"
    log = paths.log("db-migrate")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("ab") as out:
        try:
            result = subprocess.run([AIRFLOW, "db", "migrate"], cwd=paths.home, env=env, stdout=out,  # noqa: S603
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            raise StartError(f"airflow db migrate did not finish within 900s; see {log}") from None
    if result.returncode != 0:
        raise StartError(f"airflow db migrate failed (exit {result.returncode}); see {log}:\n{tail(log)}")
    paths.migrated.write_text(json.dumps({"airflow": version, "revision": _alembic_revision(meta_url),
                                          "database": _redacted(meta_url)}) + "\n")
    return f"migrated in {time.monotonic() - started:.0f}s"


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# -- processes --------------------------------------------------------------------------------------------


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join("  | " + line for line in text[-lines:])


def command(component: str, port: int) -> list[str]:
    if component == "api-server":
        return [AIRFLOW, "api-server", "--host", HOST, "--port", str(port), "--workers", "1"]
    return [AIRFLOW, component]


def start(paths: AirflowPaths, component: str, env: dict[str, str], port: int) -> int:
    """Start one component in a new session (its own process group); returns its pid."""
    for d in (paths.run, paths.logs, paths.home):
        d.mkdir(parents=True, exist_ok=True)
    with paths.log(component).open("ab") as log:
        log.write(f"\n==== {datetime.now(UTC).isoformat()} make up: starting airflow {component}\n".encode())
        log.flush()
        proc = subprocess.Popen(command(component, port), cwd=paths.home, env=env, stdout=log,  # noqa: S603
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    paths.pid(component).write_text(f"{proc.pid}\n")
    return proc.pid


def get_json(url: str, *, token: str | None = None, timeout: float = 5, data: dict | None = None) -> Any:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = None
    if data is not None:
        body = json.dumps(data).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")  # noqa: S310
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (our own local URL)
        return json.loads(resp.read() or b"null")


def health(port: int, timeout: float = 5) -> dict[str, Any] | None:
    """Airflow's own health summary (no login needed), or None while the api-server does not answer."""
    try:
        return get_json(f"http://{HOST}:{port}/api/v2/monitor/health", timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def heartbeat(report: dict[str, Any] | None, component: str) -> tuple[str, datetime | None]:
    """(status, latest heartbeat) of a component in a health report; ("unknown", None) without one."""
    if not report:
        return "unknown", None
    entry = report.get(HEALTH_KEYS.get(component, ""), {}) or {}
    beat = next((v for k, v in entry.items() if k.startswith("latest_") and v), None)
    return str(entry.get("status") or "unknown"), datetime.fromisoformat(beat) if beat else None


def wait_ready(paths: AirflowPaths, port: int, started: dict[str, tuple[int, datetime]], deadline: float,
               alive: Callable[[int], bool], need: tuple[str, ...] = COMPONENTS) -> dict[str, Any]:
    """Wait until the api-server answers and each component in ``need`` heartbeats healthily; a component
    started now must heartbeat after its start (a stale heartbeat of its previous run does not count).
    ``deadline`` is a time.monotonic() value."""
    pending: list[str] = list(need)
    while True:
        for component, (pid, _) in started.items():
            if not alive(pid):
                raise StartError(f"airflow {component} (pid {pid}) exited during start-up; see "
                                 f"{paths.log(component)}:\n{tail(paths.log(component))}")
        report = health(port)
        pending = [] if report is not None else ["api-server"]
        if report is not None:
            if (report.get("metadatabase") or {}).get("status") != "healthy":
                pending.append("metadatabase")
            for component in HEALTH_KEYS:
                if component not in need:
                    continue
                status, beat = heartbeat(report, component)
                since = started.get(component, (0, None))[1]
                if status != "healthy" or (since is not None and (beat is None or beat < since)):
                    pending.append(component)
        if not pending:
            return report or {}
        if time.monotonic() > deadline:
            late = [c for c in pending if c in COMPONENTS] or ["api-server"]
            raise StartError(f"not ready in time: {', '.join(pending)} (ENP_LOCAL_START_TIMEOUT waits longer); see "
                             f"{', '.join(str(paths.log(c)) for c in late)}:\n{tail(paths.log(late[0]))}")
        time.sleep(1)


def start_all(paths: AirflowPaths, env: dict[str, str], port: int, running: dict[str, int | None], deadline: float,
              alive: Callable[[int], bool]) -> dict[str, int]:
    """Start the components that are not running: the api-server first and alone (the scheduler's tasks call
    its Execution API, and would fail their first attempt if it were not answering yet), then the others;
    returns every component's pid once all are healthy."""
    started: dict[str, tuple[int, datetime]] = {}
    pids = {c: pid for c, pid in running.items() if pid}
    if not running.get("api-server"):
        started["api-server"] = (start(paths, "api-server", env, port), datetime.now(UTC))
    wait_ready(paths, port, started, deadline, alive, need=("api-server",))
    for component in COMPONENTS[1:]:
        if not running.get(component):
            started[component] = (start(paths, component, env, port), datetime.now(UTC))
    wait_ready(paths, port, started, deadline, alive)
    return {**pids, **{c: pid for c, (pid, _) in started.items()}}


def token(port: int, password: str) -> str:
    """A JWT for the REST API, as the UI's login gets one."""
    answer = get_json(f"http://{HOST}:{port}/auth/token", data={"username": ADMIN, "password": password},
                      timeout=30)
    return str(answer["access_token"])


def dag_files() -> list[str]:
    return sorted(p.stem for p in (REPO / "dags").glob("*.py") if not p.name.startswith("_"))


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "import error"


def wait_dags(port: int, password: str, timeout: float) -> tuple[dict[str, bool], dict[str, str]]:
    """Wait until every DAG file is either parsed or reported as an import error; returns
    ({dag_id: is_paused}, {file: first line of its import error}). Not finishing in time is not fatal."""
    deadline = time.monotonic() + timeout
    dags: dict[str, bool] = {}
    errors: dict[str, str] = {}
    jwt: str | None = None
    while True:
        try:
            jwt = jwt or token(port, password)
            listing = get_json(f"http://{HOST}:{port}/api/v2/dags?limit=100", token=jwt, timeout=30)
            dags = {d["dag_id"]: bool(d["is_paused"]) for d in listing.get("dags", [])}
            found = get_json(f"http://{HOST}:{port}/api/v2/importErrors?limit=100", token=jwt, timeout=30)
            errors = {Path(e["filename"]).stem: _last_line(e.get("stack_trace"))
                      for e in found.get("import_errors", [])}
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        if all(f in dags or f in errors for f in dag_files()) or time.monotonic() > deadline:
            return dags, errors
        time.sleep(2)
