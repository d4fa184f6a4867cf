"""The local stack behind ``make up``/``make down``/``make status``: embedded Postgres, migrations, demo seed, the
API under gunicorn, and Airflow (api-server with the UI, scheduler, dag-processor, triggerer; enpipeline.local_airflow).

Every process runs in a process group of its own with a PID file under ``var/run``; ``down`` stops exactly those
groups (and the embedded Postgres), nothing else. All state lives under ``var/`` and survives a restart.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from enpipeline.config import load_settings

API_HOST, API_PORT = "127.0.0.1", 8080
AIRFLOW_PORT = 8088  # as in docker/compose.yaml; 8081 is the federation server's default
START_TIMEOUT = 300.0  # seconds for every component to become healthy (ENP_LOCAL_START_TIMEOUT); 2 cores are slow
STOP_GRACE = 30.0      # seconds between SIGTERM and SIGKILL of a process group
DEMO_ISSUER = "enpipeline-demo-ha"
DEMO_AUDIENCE = "enpipeline"
DEMO_APP = "com.example.enpipeline.demo"
DEMO_KID = "v1"
DEMO_REGION = "US"
DEMO_SIGNING_KEY = "demo-us-v1"
DEMO_EXPORT_CONFIG = "us"


def _paths(var: Path) -> dict[str, Path]:
    return {
        "pgdata": var / "pgdata",
        "env": var / "enp.env",
        "stack": var / "run" / "stack.json",
        "api_pid": var / "run" / "api.pid",
        "api_log": var / "log" / "api.log",
        "demo_key": var / "demo" / "verification-key.pem",
        "demo_pub": var / "demo" / "verification-key.pub.pem",
    }


@dataclass(frozen=True)
class Ports:
    """Where the stack listens. ``make up`` takes the defaults or ENP_LOCAL_*_PORT; tests pass free ports."""

    api: int = API_PORT
    airflow: int = AIRFLOW_PORT
    worker_logs: int = 8793   # LocalExecutor workers serve running tasks' logs to the UI
    trigger_logs: int = 8794  # the triggerer does the same for deferred tasks

    @classmethod
    def from_env(cls, api: int | None = None, airflow: int | None = None) -> Ports:
        def get(name: str, given: int | None, default: int) -> int:
            if given is not None:
                return given
            raw = os.environ.get(name, "")
            try:
                return int(raw) if raw else default
            except ValueError:
                raise SystemExit(f"enpipeline: {name} must be a port number, got {raw!r}") from None

        return cls(api=get("ENP_LOCAL_API_PORT", api, cls.api),
                   airflow=get("ENP_LOCAL_AIRFLOW_PORT", airflow, cls.airflow),
                   worker_logs=get("ENP_LOCAL_AIRFLOW_WORKER_LOG_PORT", None, cls.worker_logs),
                   trigger_logs=get("ENP_LOCAL_AIRFLOW_TRIGGER_LOG_PORT", None, cls.trigger_logs))


def saved_stack(var: Path) -> dict:
    """What the last ``up`` recorded in var/run/stack.json (ports, Airflow on or off), or {}."""
    path = _paths(var.resolve())["stack"]
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def start_embedded_postgres(pgdata: Path) -> str:
    """Start (or reuse) the pgserver instance in ``pgdata`` and return its URL; it outlives this process."""
    import logging

    import pgserver

    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every start-up step at INFO
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(pgdata.resolve()), cleanup_mode=None)
    return server.get_uri()


def stop_embedded_postgres(pgdata: Path) -> bool:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().splitlines()[0])
    try:
        os.kill(pid, signal.SIGINT)  # "fast" shutdown: roll back open transactions, keep data safe
    except ProcessLookupError:
        return False
    for _ in range(100):
        if not pid_file.exists():
            break
        time.sleep(0.1)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _running(pid_file: Path, marker: str = "") -> int | None:
    """The pid in ``pid_file`` if that process runs and (on Linux) its command line mentions ``marker``:
    a pid recycled by an unrelated process after a reboot is never mistaken for ours."""
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        return None
    if not _alive(pid):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if marker and cmdline.exists():
        try:
            if marker not in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                return None
        except OSError:
            return None
    return pid


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _descendants(roots: set[int]) -> set[int]:
    """Every live process below ``roots`` (Linux /proc). Airflow runs each task in a session of its own, so a
    running task is outside its scheduler's process group but still its descendant."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass


def _stop_groups(groups: dict[str, int], grace: float = STOP_GRACE) -> None:
    """SIGTERM each process group (the leader and everything it forked) and any descendant that left the
    group; SIGKILL whatever is left after ``grace`` seconds."""
    strays: set[int] = set()
    for pid in _descendants(set(groups.values())):
        try:
            if os.getpgid(pid) not in groups.values():
                strays.add(pid)
        except ProcessLookupError:
            pass
    for pgid in groups.values():
        _signal(pgid, signal.SIGTERM, group=True)
    for pid in strays:
        _signal(pid, signal.SIGTERM, group=False)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (any(_group_alive(g) for g in groups.values())
                                           or any(_alive(pid) for pid in strays)):
        time.sleep(0.2)
    for name, pgid in groups.items():
        if _group_alive(pgid):
            print(f"  {name} did not stop within {grace:.0f}s: killed")
            _signal(pgid, signal.SIGKILL, group=True)
    for pid in strays:
        if _alive(pid):
            _signal(pid, signal.SIGKILL, group=False)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((API_HOST, port))
        except OSError:
            return False
    return True


def _check_ports(wanted: dict[str, tuple[int, str]]) -> None:
    """Fail before starting anything when a port we are about to listen on is taken by someone else."""
    taken = [f"{port} ({what}; set {var} to use another)" for what, (port, var) in wanted.items()
             if not _port_free(port)]
    if taken:
        raise SystemExit("enpipeline: port(s) in use by another process: " + ", ".join(taken))


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a file only its owner can read: created 0600 (never briefly wider), and an older file of
    that name, whatever its mode, is replaced rather than reused."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # O_CREAT's mode is subject to the umask too
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_env_file(var: Path, database_url: str) -> None:
    """``var/enp.env`` for the admin CLI; mode 0600, since an external database's URL carries its password."""
    write_private_file(_paths(var)["env"], f"ENP_DATABASE_URL={database_url}\nENP_VAR_DIR={var}\n".encode())


def _seed_demo(settings, var: Path) -> None:
    """An authorized app, a health authority and its verification key, so publishes work at once."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from enpipeline.db import apps, authorities
    from enpipeline.db.engine import make_engine
    from enpipeline.model import AuthorizedApp

    p = _paths(var)
    if not p["demo_key"].exists():
        demo = p["demo_key"].parent
        demo.mkdir(parents=True, exist_ok=True)
        os.chmod(demo, 0o700)  # mkdir's mode is subject to the umask; nobody else may swap the keys in here
        key = ec.generate_private_key(ec.SECP256R1())
        write_private_file(p["demo_key"], key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        p["demo_pub"].write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        os.chmod(p["demo_pub"], 0o644)  # public, but seeded into the database as a trusted key: not writable
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    with engine.begin() as conn:
        ha = authorities.get_by_issuer(conn, DEMO_ISSUER)
        ha_id = ha.id if ha else authorities.add_authority(conn, issuer=DEMO_ISSUER, audience=DEMO_AUDIENCE,
                                                           name="Demo health authority")
        if not ha or not any(k.version == DEMO_KID for k in ha.keys):
            authorities.add_key(conn, ha_id, version=DEMO_KID, public_key_pem=p["demo_pub"].read_text(),
                                from_timestamp=datetime.now(UTC) - timedelta(minutes=1))
        if apps.get_app(conn, DEMO_APP) is None:
            apps.upsert_app(conn, AuthorizedApp(app_package_name=DEMO_APP, allowed_regions=(DEMO_REGION,),
                                                allowed_health_authority_ids=(ha_id,)))
    _seed_export(settings, engine)
    engine.dispose()


def _seed_export(settings, engine) -> None:
    """A signing key and an hourly export config for the demo region."""
    from enpipeline.db import export as export_db
    from enpipeline.export.format import ALGORITHM_ECDSA_P256_SHA256
    from enpipeline.export.signing import key_manager_from_settings

    now = datetime.now(UTC)
    with engine.begin() as conn:
        info = export_db.get_signature_info(conn, DEMO_SIGNING_KEY)
        if info is None:
            ref = key_manager_from_settings(settings).create_signing_key(DEMO_SIGNING_KEY)
            sig_id = export_db.add_signature_info(
                conn, name=DEMO_SIGNING_KEY, signing_key=ref, key_id="310", key_version="v1",
                algorithm=ALGORITHM_ECDSA_P256_SHA256, from_timestamp=now - timedelta(days=1), thru_timestamp=None,
                now=now)
        else:
            sig_id = info.id
        if export_db.get_export_config(conn, name=DEMO_EXPORT_CONFIG) is None:
            export_db.add_export_config(conn, export_db.ExportConfigRow(
                config_id=0, name=DEMO_EXPORT_CONFIG, bucket_name="exports", filename_root="exposureKeyExport-US",
                period_seconds=3600, output_region=DEMO_REGION, input_regions=(), include_travelers=True,
                only_non_travelers=False, exclude_regions=(), max_records_override=None, signature_info_ids=(sig_id,),
                from_timestamp=now - timedelta(days=14), thru_timestamp=None, disabled=False))


def _wait_healthy(url: str, timeout: float, pid: int | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            return False
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (fixed local URL)
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def _start_timeout() -> float:
    raw = os.environ.get("ENP_LOCAL_START_TIMEOUT", "")
    try:
        return float(raw) if raw else START_TIMEOUT
    except ValueError:
        raise SystemExit(f"enpipeline: ENP_LOCAL_START_TIMEOUT must be a number of seconds, got {raw!r}") from None


def up(var: Path, *, api_port: int | None = None, airflow_port: int | None = None, airflow: bool = True) -> None:
    """Start what is not running yet (idempotent); exits non-zero naming the component and its log on failure."""
    from enpipeline import local_airflow as af
    from enpipeline.db.engine import make_engine
    from enpipeline.db.migrate import migrate

    var = var.resolve()
    p = _paths(var)
    af_paths = af.AirflowPaths.of(var)
    saved = saved_stack(var)
    ports = Ports.from_env(api_port, airflow_port)
    api_pid = _running(p["api_pid"], "enpipeline")
    af_pids = {c: _running(af_paths.pid(c), "airflow") for c in af.COMPONENTS}
    if (api_pid or any(af_pids.values())) and saved.get("ports"):
        running_ports = Ports(**saved["ports"])
        explicit = api_port or airflow_port or os.environ.get("ENP_LOCAL_API_PORT") or os.environ.get(
            "ENP_LOCAL_AIRFLOW_PORT")
        if explicit and running_ports != ports:
            print(f"note: the stack already runs with API port {running_ports.api} and Airflow port "
                  f"{running_ports.airflow}; `make down` first to change them")
        ports = running_ports
    airflow_wanted = airflow or any(af_pids.values())  # never leave half of Airflow running
    if api_pid and (not airflow_wanted or all(af_pids.values())):
        print("enpipeline is already running")
        _summary(var, ports, airflow_wanted, applied=None, meta_note="")
        return

    wanted = {} if api_pid else {"API": (ports.api, "ENP_LOCAL_API_PORT")}
    if airflow_wanted and not af_pids["api-server"]:
        wanted["Airflow UI"] = (ports.airflow, "ENP_LOCAL_AIRFLOW_PORT")
    if airflow_wanted and not af_pids["scheduler"]:
        wanted["Airflow worker log server"] = (ports.worker_logs, "ENP_LOCAL_AIRFLOW_WORKER_LOG_PORT")
    if airflow_wanted and not af_pids["triggerer"]:
        wanted["Airflow triggerer log server"] = (ports.trigger_logs, "ENP_LOCAL_AIRFLOW_TRIGGER_LOG_PORT")
    _check_ports(wanted)  # before anything starts
    started_at = time.monotonic()
    given = os.environ.get("ENP_DATABASE_URL", "")
    # A URL naming our own pgdata socket (e.g. after sourcing var/enp.env) still means the embedded server.
    embedded = not given or str(p["pgdata"]) in given
    url = start_embedded_postgres(p["pgdata"]) if embedded else given
    os.environ["ENP_DATABASE_URL"] = url
    os.environ.setdefault("ENP_VAR_DIR", str(var))
    settings = load_settings()
    engine = make_engine(url, pool_size=1, max_overflow=0)
    applied = migrate(engine, now=datetime.now(UTC), retention=settings.retention,
                      days_ahead=settings.partition_days_ahead)
    engine.dispose()
    _seed_demo(settings, var)
    write_env_file(var, url)

    p["stack"].parent.mkdir(parents=True, exist_ok=True)
    p["stack"].write_text(json.dumps({"ports": ports.__dict__, "airflow": airflow_wanted, "embedded": embedded,
                                      "blobstore": settings.blobstore}) + "\n")

    if api_pid is None:  # gunicorn starts in a few seconds, alongside Airflow
        for d in ("api_pid", "api_log"):
            p[d].parent.mkdir(parents=True, exist_ok=True)
        with open(p["api_log"], "ab") as log:
            proc = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "enpipeline.cli", "api", "--host", API_HOST, "--port", str(ports.api),
                 "--workers", "3"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=dict(os.environ))
        p["api_pid"].write_text(str(proc.pid))
        api_pid = proc.pid

    deadline = started_at + _start_timeout()
    problems = []
    meta_note = ""
    if airflow_wanted and not all(af_pids.values()):
        try:
            meta_url = af.metadata_url(url, embedded)
            created = af.ensure_database(url, meta_url)
            values = af.settings(var, port=ports.airflow, worker_log_port=ports.worker_logs,
                                 trigger_log_port=ports.trigger_logs, database_url=url, meta_url=meta_url,
                                 blobstore=settings.blobstore)
            env = af.environment(values)
            af.write_env_file(af_paths, values)
            af.admin_password(af_paths)
            meta_note = ("created, " if created else "") + af.migrate(af_paths, env, meta_url)
            af.start_all(af_paths, env, ports.airflow, af_pids, deadline, _alive)
        except af.StartError as exc:
            problems.append(str(exc))
    if not _wait_healthy(f"http://{API_HOST}:{ports.api}/health", max(30.0, deadline - time.monotonic()), api_pid):
        problems.append(f"the API (pid {api_pid}) is not healthy on http://{API_HOST}:{ports.api}/health; see "
                        f"{p['api_log']}:\n{af.tail(p['api_log'])}")
    print(f"enpipeline is up ({time.monotonic() - started_at:.0f}s)" if not problems else
          "enpipeline did NOT start completely")
    _summary(var, ports, airflow_wanted, applied=applied, meta_note=meta_note)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print("(what did start keeps running: `make status`, `make down`)", file=sys.stderr)
        raise SystemExit(1)


def _summary(var: Path, ports: Ports, airflow: bool, *, applied: list | None, meta_note: str) -> None:
    from enpipeline import local_airflow as af

    p = _paths(var)
    saved = saved_stack(var)
    embedded = saved.get("embedded", True)
    blobstore = saved.get("blobstore") or f"file://{var / 'blobs'}"
    migrations = "" if applied is None else f"  (migrations applied now: {len(applied)})"
    print(f"  database   {'embedded Postgres, data in ' + str(p['pgdata']) if embedded else 'ENP_DATABASE_URL'}"
          f"{migrations}")
    api_pid = _running(p["api_pid"], "enpipeline")
    healthy = api_pid is not None and _wait_healthy(f"http://{API_HOST}:{ports.api}/health", 5, api_pid)
    print(f"  publish    http://{API_HOST}:{ports.api}/v1/publish   (pid {api_pid}, "
          f"{'healthy' if healthy else 'NOT healthy: see the log'})")
    print(f"  health     http://{API_HOST}:{ports.api}/health   metrics: /metrics   OpenAPI: /openapi.json")
    if airflow:
        af_paths = af.AirflowPaths.of(var)
        password = af.admin_password(af_paths)
        pids = {c: _running(af_paths.pid(c), "airflow") for c in af.COMPONENTS}
        print(f"  airflow    http://{API_HOST}:{ports.airflow}/   login {af.ADMIN} / {password}"
              f"   (password file {af_paths.passwords}, mode 0600)")
        print("             " + ", ".join(f"{c} pid {pids[c]}" for c in af.COMPONENTS)
              + (f"; metadata database {meta_note}" if meta_note else ""))
        if not pids["api-server"]:
            print("  dags       (the Airflow api-server is not running)")
            dags, errors = {}, {}
        else:
            dags, errors = af.wait_dags(ports.airflow, password, 90 if meta_note else 10)
        if dags:
            print("  dags       " + ", ".join(f"{d}{' (paused)' if paused else ''}" for d, paused in sorted(
                dags.items())) + "   (new DAGs start unpaused)")
        for file, error in sorted(errors.items()):
            print(f"  dags       IMPORT ERROR in dags/{file}.py: {error}")
        if pids["api-server"] and not dags and not errors:
            print(f"  dags       not parsed yet: see {af_paths.log('dag-processor')}")
    print(f"  logs       {p['api_log']}" + (f", {var / 'log'}/airflow-*.log; task logs under "
                                            f"{af.AirflowPaths.of(var).task_logs}" if airflow else ""))
    print(f"  demo       app {DEMO_APP!r} (region {DEMO_REGION}), issuer {DEMO_ISSUER!r} kid {DEMO_KID!r},"
          f" certificate key {p['demo_key']}")
    print(f"  export     config {DEMO_EXPORT_CONFIG!r} (hourly, signing key {DEMO_SIGNING_KEY!r}); files under"
          f" {blobstore}/exports/exposureKeyExport-US/")
    print(f"  admin CLI  set -a; . {p['env']}; set +a; .venv/bin/enpipeline app list")
    if airflow:
        print(f"  airflow CLI  set -a; . {af.AirflowPaths.of(var).env_file}; set +a; .venv/bin/airflow dags list")
    print(f"  try it     .venv/bin/python -m enpipeline.local publish-demo {var}")
    print("  stop       make down   (status: make status)")


def down(var: Path) -> None:
    """Stop every process group ``up`` started (by PID file) and the embedded Postgres; keep the data."""
    from enpipeline import local_airflow as af

    var = var.resolve()
    p = _paths(var)
    af_paths = af.AirflowPaths.of(var)
    # Airflow first (its tasks may still write to the database), then the API.
    for batch in ([(f"airflow {c}", af_paths.pid(c), "airflow") for c in ("scheduler", "triggerer", "dag-processor")],
                  [("airflow api-server", af_paths.pid("api-server"), "airflow"),
                   ("the API", p["api_pid"], "enpipeline")]):
        groups = {name: pid for name, pid_file, marker in batch if (pid := _running(pid_file, marker))}
        _stop_groups(groups)
        for name, pid in groups.items():
            print(f"stopped {name} (pid {pid})")
        for _, pid_file, _ in batch:
            pid_file.unlink(missing_ok=True)
    if stop_embedded_postgres(p["pgdata"]):
        print(f"stopped the embedded Postgres (data kept in {p['pgdata']})")
    print(f"nothing else runs from {var}; `make up` starts it again with the same data")


def status(var: Path) -> None:
    """One line per component: running or not, pid, health, URL and log."""
    from enpipeline import local_airflow as af

    var = var.resolve()
    p = _paths(var)
    saved = saved_stack(var)
    ports = Ports(**saved["ports"]) if saved.get("ports") else Ports.from_env()

    def line(name: str, pid: int | None, detail: str, log: Path | str) -> None:
        state = f"running (pid {pid})" if pid else "stopped"
        print(f"{name:<22} {state:<20} {detail if pid or 'not used' in detail else '':<48} {log}")

    pg_pid = None
    if (p["pgdata"] / "postmaster.pid").exists():
        pg_pid = int((p["pgdata"] / "postmaster.pid").read_text().splitlines()[0])
        pg_pid = pg_pid if _alive(pg_pid) else None
    line("embedded postgres", pg_pid, "" if saved.get("embedded", True) else "(not used: ENP_DATABASE_URL)",
         p["pgdata"] / "log")
    pid = _running(p["api_pid"], "enpipeline")
    healthy = pid is not None and _wait_healthy(f"http://{API_HOST}:{ports.api}/health", 3, pid)
    line("api", pid, f"http://{API_HOST}:{ports.api}/  {'healthy' if healthy else 'NOT healthy'}", p["api_log"])
    af_paths = af.AirflowPaths.of(var)
    report = af.health(ports.airflow, timeout=10)  # one api-server worker may be busy for a few seconds
    for c in af.COMPONENTS:
        pid = _running(af_paths.pid(c), "airflow")
        if c == "api-server":
            detail = f"http://{API_HOST}:{ports.airflow}/  {'answering' if report else 'NOT answering'}"
        else:
            state, beat = af.heartbeat(report, c)
            detail = state + (f", heartbeat {(datetime.now(UTC) - beat).total_seconds():.0f}s ago" if beat else "")
        line(f"airflow {c}", pid, detail, af_paths.log(c))


def publish_demo(var: Path, base_url: str | None = None) -> dict:
    """Send one certificate-signed 14-key publish as the demo app would, and return the JSON answer."""
    import jwt

    from enpipeline.model import ExposureKeyInput
    from enpipeline.timeutil import interval_number, truncate
    from enpipeline.verification import compute_tekmacs

    p = _paths(var.resolve())
    if base_url is None:
        base_url = f"http://{API_HOST}:{saved_stack(var).get('ports', {}).get('api', API_PORT)}"
    now = datetime.now(UTC)
    today = interval_number(truncate(now, timedelta(days=1)))
    keys = [ExposureKeyInput(base64.b64encode(os.urandom(16)).decode(), today - 144 * d, 144, 0)
            for d in range(1, 15)]
    hmac_secret = os.urandom(16)
    tekmac = base64.b64encode(compute_tekmacs(keys, hmac_secret)[0]).decode()
    claims = {"iss": DEMO_ISSUER, "aud": DEMO_AUDIENCE, "iat": int(now.timestamp()) - 1,
              "exp": int(now.timestamp()) + 300, "reportType": "confirmed", "tekmac": tekmac}
    token = jwt.encode(claims, p["demo_key"].read_bytes(), algorithm="ES256", headers={"kid": DEMO_KID})
    body = {"temporaryExposureKeys": [{"key": k.key, "rollingStartNumber": k.rolling_start_number,
                                       "rollingPeriod": k.rolling_period} for k in keys],
            "healthAuthorityID": DEMO_APP, "verificationPayload": token,
            "hmacKey": base64.b64encode(hmac_secret).decode(), "padding": base64.b64encode(os.urandom(1024)).decode()}
    req = urllib.request.Request(f"{base_url}/v1/publish", data=json.dumps(body).encode(),  # noqa: S310
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "publish-demo":
        answer = publish_demo(Path(sys.argv[2]))
        answer.pop("padding", None)
        print(json.dumps(answer, indent=2))
    else:
        print("usage: python -m enpipeline.local publish-demo VAR_DIR", file=sys.stderr)
        sys.exit(2)
