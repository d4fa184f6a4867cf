"""Publish throughput benchmark: gunicorn + Flask publish API against a DB-only baseline.

What it measures (issue spec): concurrent clients post verified 14-key publishes (fresh keys for the last
14 days, a fresh ES256 certificate signed by the seeded health authority, tekmac) to the API served by
gunicorn, for ``--duration`` seconds; printed are publishes/s, keys/s and p50/p90/p99 latency. In the same
run a DB-only baseline does the same inserts through the same DB layer (``enpipeline.db.exposures``:
lock_keys, read_for_update, insert_exposures in one ``engine.begin()`` transaction, with the rows
``transform`` produces) at the same concurrency for the same time, with no HTTP, JSON or JWT. The figure
of merit is ratio = API publishes/s / DB-only publishes/s. Targets: ratio >= 0.5 and API p99 <= 200 ms.

The two sides run in alternating slices (``--rounds``), so background load on a shared machine hits both
alike. Request bodies and DB rows are generated before each slice, outside the timing. Everything
(clients, gunicorn, Postgres) shares this machine's cores, so the figures are for the whole stack on one
box; the per-process CPU split printed with each side shows where the cores went, and "other/kernel"
above ~0.15 cores means something outside the benchmark was running.

    .venv/bin/python bench/publish_bench.py                      # the server's default config, 20 s a side
    .venv/bin/python bench/publish_bench.py --config 2:1,3:1,3:4  # compare gunicorn configs (workers:threads)
    .venv/bin/python bench/publish_bench.py --profile /tmp/prof   # py-spy on the workers, time by category
    .venv/bin/python bench/publish_bench.py --breakdown 300       # plus in-process CPU per server step
    .venv/bin/python bench/publish_bench.py --json                # machine-readable figures on stdout

A fresh database ``enp_bench_<random>`` is created on --database-url (else ENP_BENCH_DATABASE_URL,
ENP_DATABASE_URL, the local postgres on 127.0.0.1:5432, else an embedded pgserver in a temp dir),
migrated, seeded with one health authority, key and app, and dropped at the end. The exit status is 0
when the best config meets both targets.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enpipeline.config import Settings
from enpipeline.db import apps as apps_db
from enpipeline.db import authorities as authorities_db
from enpipeline.db import exposures as exposures_db
from enpipeline.db.engine import make_engine, normalize_url
from enpipeline.db.migrate import migrate
from enpipeline.model import AuthorizedApp, ExposureKeyInput, PublishRequest, VerifiedClaims
from enpipeline.publish.transform import is_insertable, transform
from enpipeline.timeutil import interval_number, truncate
from enpipeline.verification import compute_tekmacs

REPO = Path(__file__).resolve().parents[1]
LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ISSUER = "enp-bench-ha"
AUDIENCE = "enp-bench"
APP_ID = "com.example.enpbench"
REGION = "US"
KID = "v1"
KEYS_PER_PUBLISH = 14
# What `enpipeline api` runs without --workers/--threads (api/serve.py: 2 x CPUs + 1 sync workers).
DEFAULT_CONFIG = f"{2 * (os.cpu_count() or 1) + 1}:1"
TARGET_RATIO = 0.5
TARGET_P99_MS = 200.0
# CPU used outside the benchmark's processes (kernel work for loopback TCP is ~0.05 cores) above which a
# phase is flagged as disturbed.
NOISY_OTHER_CORES = 0.15


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- database ----------------------------------------------------------------------------------------


def _reachable(url: str) -> bool:
    try:
        engine = sa.create_engine(normalize_url(url), connect_args={"connect_timeout": 3}, poolclass=sa.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:  # any failure means "try the next candidate"
        return False


@contextmanager
def server_url(explicit: str | None) -> Iterator[tuple[str, str]]:
    """A Postgres URL (maintenance database) and a description of where it came from."""
    candidates = [(explicit, "--database-url")] if explicit else [
        (os.environ.get("ENP_BENCH_DATABASE_URL"), "ENP_BENCH_DATABASE_URL"),
        (os.environ.get("ENP_DATABASE_URL"), "ENP_DATABASE_URL"),
        (LOCAL_URL, "local postgres"),
    ]
    for url, source in candidates:
        if url and _reachable(url):
            yield url, source
            return
    if explicit:
        raise SystemExit(f"database not reachable: {explicit}")
    import pgserver

    tmp = tempfile.mkdtemp(prefix="enp-bench-pg-")
    log(f"no Postgres reachable; starting an embedded pgserver in {tmp}")
    server = pgserver.get_server(str(Path(tmp) / "pgdata"), cleanup_mode="delete")
    try:
        yield server.get_uri(), "embedded pgserver"
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def bench_database(base_url: str) -> Iterator[str]:
    """Create ``enp_bench_<random>`` next to ``base_url``'s database, yield its URL, drop it afterwards."""
    name = f"enp_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(normalize_url(base_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(normalize_url(base_url)).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        log(f"dropped database {name}")


@dataclass
class Fixture:
    """What the clients need to build verified publishes for the seeded app."""

    signing_key_pem: bytes
    ha_id: int
    request_padding: int

    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        return serialization.load_pem_private_key(self.signing_key_pem, password=None)  # type: ignore[return-value]


def setup_database(url: str, request_padding: int) -> Fixture:
    settings = Settings(database_url=url)
    engine = make_engine(url, pool_size=1, max_overflow=0)
    migrate(engine, now=datetime.now(UTC), retention=settings.retention, days_ahead=settings.partition_days_ahead)
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with engine.begin() as conn:
        ha_id = authorities_db.add_authority(conn, issuer=ISSUER, audience=AUDIENCE, name="Bench health authority")
        authorities_db.add_key(conn, ha_id, version=KID, public_key_pem=public_pem,
                               from_timestamp=datetime.now(UTC) - timedelta(minutes=5))
        apps_db.upsert_app(conn, AuthorizedApp(app_package_name=APP_ID, allowed_regions=(REGION,),
                                               allowed_health_authority_ids=(ha_id,)))
    engine.dispose()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return Fixture(signing_key_pem=pem, ha_id=ha_id, request_padding=request_padding)


def reset_exposures(url: str) -> None:
    """Each phase starts from an empty exposure table and a fresh checkpoint."""
    engine = make_engine(url, pool_size=1, max_overflow=0)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE exposure"))
    with suppress(Exception), engine.connect() as conn:  # CHECKPOINT needs a privileged role; optional
        conn.execute(sa.text("CHECKPOINT"))
        conn.commit()
    engine.dispose()


def stored_keys(url: str) -> int:
    engine = make_engine(url, pool_size=1, max_overflow=0)
    with engine.connect() as conn:
        n = exposures_db.count(conn)
    engine.dispose()
    return n


# -- work items --------------------------------------------------------------------------------------


def fresh_keys(now: datetime) -> list[ExposureKeyInput]:
    """14 full-day keys for the 14 days before today: what a phone uploads after a positive test."""
    today = interval_number(truncate(now, timedelta(days=1)))
    return [ExposureKeyInput(base64.b64encode(os.urandom(16)).decode(), today - 144 * d, 144, 0)
            for d in range(1, KEYS_PER_PUBLISH + 1)]


class ApiClient:
    """One keep-alive HTTP connection posting pre-built, certificate-signed publish bodies."""

    def __init__(self, fixture: Fixture, host: str, port: int):
        self.fixture = fixture
        self.key = fixture.signing_key()
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        self.headers = {"Content-Type": "application/json"}
        self.retries = 0

    def make_items(self, n: int) -> list[bytes]:
        now = datetime.now(UTC)
        out = []
        for _ in range(n):
            keys = fresh_keys(now)
            hmac_secret = os.urandom(16)
            claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": int(now.timestamp()) - 1,
                      "exp": int(now.timestamp()) + 1800, "reportType": "confirmed",
                      "tekmac": base64.b64encode(compute_tekmacs(keys, hmac_secret)[0]).decode()}
            body = {
                "temporaryExposureKeys": [{"key": k.key, "rollingStartNumber": k.rolling_start_number,
                                           "rollingPeriod": k.rolling_period} for k in keys],
                "healthAuthorityID": APP_ID,
                "verificationPayload": jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": KID}),
                "hmacKey": base64.b64encode(hmac_secret).decode(),
                "padding": base64.b64encode(os.urandom(self.fixture.request_padding)).decode(),
            }
            out.append(json.dumps(body).encode())
        return out

    def reset(self) -> None:
        """Start the next run on a new connection (the server may have dropped an idle keep-alive one)."""
        self.conn.close()

    def do(self, body: bytes) -> tuple[int, str]:
        for attempt in (1, 2):
            reused = self.conn.sock is not None
            try:
                self.conn.request("POST", "/v1/publish", body, self.headers)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.conn.close()
                # A kept-alive connection the server closed meanwhile fails before any answer; any HTTP
                # client retries that once on a new connection. Everything else is an error.
                stale = isinstance(exc, (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected))
                if attempt == 1 and reused and stale:
                    self.retries += 1
                    continue
                return 0, f"{type(exc).__name__}: {exc}"
        if resp.status == 200:
            return 200, ""
        try:
            answer = json.loads(data)
            answer.pop("padding", None)
            return resp.status, json.dumps(answer)[:300]
        except ValueError:
            return resp.status, data[:300].decode(errors="replace")

    def close(self) -> None:
        self.conn.close()


class DbClient:
    """The DB work of one publish, through the same functions and transaction shape as PublishService._store."""

    def __init__(self, fixture: Fixture, url: str):
        # The engine factory the API uses; one connection per client, as each API worker thread holds one.
        self.engine = make_engine(url, pool_size=1, max_overflow=2, application_name="enp-bench-db")
        self.fixture = fixture
        self.settings = Settings(database_url=url)
        self.claims = VerifiedClaims(health_authority_id=fixture.ha_id, report_type="confirmed")

    def make_items(self, n: int) -> list[dict[bytes, Any]]:
        now = datetime.now(UTC)
        out = []
        for _ in range(n):
            keys = sorted(fresh_keys(now), key=lambda k: k.key.encode())  # the service's key order
            request = PublishRequest(keys=tuple(keys), health_authority_id=APP_ID)
            result = transform(request, app_name=APP_ID, regions=[REGION], claims=self.claims,
                               settings=self.settings, now=now)
            out.append({e.exposure_key: e for e in result.exposures})
        return out

    retries = 0

    def reset(self) -> None:
        pass

    def do(self, incoming: dict[bytes, Any]) -> tuple[int, str]:
        try:
            with self.engine.begin() as conn:
                exposures_db.lock_keys(conn, incoming)
                existing = exposures_db.read_for_update(conn, list(incoming))
                rows = [e for k, e in incoming.items() if k not in existing and is_insertable(e)]
                exposures_db.insert_exposures(conn, rows)
        except Exception as exc:  # counted as an error, like a 500 from the API
            return 500, f"{type(exc).__name__}: {exc}"[:300]
        return 200, ""

    def close(self) -> None:
        self.engine.dispose()


def make_client(kind: str, fixture: Fixture, target: dict[str, Any]) -> ApiClient | DbClient:
    if kind == "api":
        return ApiClient(fixture, target["host"], target["port"])
    return DbClient(fixture, target["url"])


class WorkSource:
    """Pre-generated work shared by the clients of one process; refills (and counts it) if it runs dry."""

    def __init__(self, make: Callable[[int], list]):
        self._make = make
        self._items: list = []
        self._next = 0
        self._lock = threading.Lock()
        self.refills = 0

    def fill(self, n: int) -> None:
        self._items, self._next = self._make(n), 0

    def take(self) -> Any:
        with self._lock:
            if self._next >= len(self._items):
                # Generation now runs inside the timed window; the report flags it.
                self.refills += 1
                self._items, self._next = self._make(max(50, len(self._items) // 4)), 0
            item = self._items[self._next]
            self._next += 1
            return item

    def clear(self) -> None:
        self._items, self._next = [], 0


@dataclass
class RunResult:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    ended: float = 0.0
    retries: int = 0


def run_items(client: ApiClient | DbClient, source: WorkSource, start: float, deadline: float) -> RunResult:
    """Do work back to back from ``start`` until ``deadline`` (monotonic clock, shared by processes)."""
    out = RunResult()
    client.reset()
    retries_before = client.retries
    delay = start - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    perf, mono = time.perf_counter, time.monotonic
    while mono() < deadline:
        item = source.take()
        t0 = perf()
        status, error = client.do(item)
        out.latencies.append(perf() - t0)
        out.statuses[status] += 1
        if error:
            out.errors[f"{status} {error}"] += 1
    out.ended = mono()
    out.retries = client.retries - retries_before
    return out


def _client_process(pipe, kind: str, fixture: Fixture, target: dict[str, Any]) -> None:
    """Process-mode client: obeys ("gen", n), ("run", start, deadline) and ("stop",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    client = make_client(kind, fixture, target)
    source = WorkSource(client.make_items)
    try:
        while True:
            cmd = pipe.recv()
            if cmd[0] == "gen":
                source.fill(cmd[1])
                pipe.send(("ok", cmd[1]))
            elif cmd[0] == "run":
                refills = source.refills
                result = run_items(client, source, cmd[1], cmd[2])
                source.clear()
                pipe.send(("ok", result, source.refills - refills))
            else:
                break
    finally:
        client.close()


class ClientPool:
    """``n`` concurrent clients, as threads of this process or as separate processes."""

    def __init__(self, mode: str, n: int, kind: str, fixture: Fixture, target: dict[str, Any]):
        self.mode, self.n = mode, n
        self.pids: list[int] = [os.getpid()]  # this process (threads mode, or driving the processes)
        self.refills = 0
        if mode == "thread":
            self.clients = [make_client(kind, fixture, target) for _ in range(n)]
            # One queue for all threads: with keep-alive, a connection sticks to one gunicorn worker and
            # some clients go faster than others; a shared queue keeps every client busy to the end.
            self.source = WorkSource(self.clients[0].make_items)
            self.executor = ThreadPoolExecutor(max_workers=n)
        else:
            ctx = multiprocessing.get_context("spawn")  # no inherited DB sockets
            self.pipes, self.procs = [], []
            for _ in range(n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_client_process, args=(child, kind, fixture, target), daemon=True)
                proc.start()
                self.pipes.append(parent)
                self.procs.append(proc)
            self.pids += [p.pid for p in self.procs]

    def generate(self, total: int) -> None:
        if self.mode == "thread":
            self.source.fill(total)  # the GIL would serialise generation anyway
        else:
            for p in self.pipes:
                p.send(("gen", math.ceil(total / self.n)))
            for p in self.pipes:
                p.recv()

    def run(self, start: float, deadline: float) -> list[RunResult]:
        if self.mode == "thread":
            refills = self.source.refills
            futures = [self.executor.submit(run_items, c, self.source, start, deadline) for c in self.clients]
            results = [f.result() for f in futures]
            self.source.clear()
            self.refills += self.source.refills - refills
            return results
        for p in self.pipes:
            p.send(("run", start, deadline))
        results = []
        for p in self.pipes:
            _, result, refills = p.recv()
            results.append(result)
            self.refills += refills
        return results

    def close(self) -> None:
        if self.mode == "thread":
            for c in self.clients:
                c.close()
            self.executor.shutdown()
            return
        for p in self.pipes:
            with suppress(OSError):
                p.send(("stop",))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


# -- CPU accounting ----------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    """utime+stime seconds of one process (all its threads); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _children(pid: int) -> list[int]:
    out = []
    with suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    return out


def _postgres_pids(url: str) -> list[int]:
    """Backends of the bench database plus the server's background processes (WAL writer, checkpointer...).

    Other databases on a shared server are left out. Pids are only meaningful for a local server.
    """
    engine = sa.create_engine(normalize_url(url), poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(
                "SELECT pid FROM pg_stat_activity WHERE (datname = current_database() AND pid <> pg_backend_pid())"
                " OR backend_type <> 'client backend'")).scalars())
    except Exception:  # no stats access: no postgres figure
        return []
    finally:
        engine.dispose()


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine: user, nice, system, irq, softirq (guest is inside user)."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    return (parts[0] + parts[1] + parts[2] + parts[5] + parts[6]) / _TICK


class CpuMeter:
    """CPU seconds per group of processes over a window, as a share of the machine's cores."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]):
        self.groups = groups

    def _sample(self) -> dict[str, dict[int, float]]:
        return {name: {pid: _proc_cpu(pid) for pid in pids()} for name, pids in self.groups.items()}

    def start(self) -> None:
        self.before, self.busy_before = self._sample(), _machine_busy()

    def stop(self, wall: float) -> dict[str, float]:
        after, busy_after = self._sample(), _machine_busy()
        cores = os.cpu_count() or 1
        out: dict[str, float] = {}
        for name, pids in after.items():
            used = sum(t - self.before[name].get(pid, 0.0) for pid, t in pids.items())
            out[name] = used / wall  # in cores (1.0 = one core busy)
        out["machine"] = (busy_after - self.busy_before) / wall
        # Kernel work not charged to a process (softirq for loopback TCP, block I/O) and anything else running.
        out["other"] = max(0.0, out["machine"] - sum(v for k, v in out.items() if k != "machine"))
        out["cores"] = float(cores)
        return out


# -- the API server ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enpipeline_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("enpipeline")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "enpipeline.cli"]


# Revision-token secrets for this run, shared by every server and the in-process breakdown (the first
# server stores a data key wrapped under this KEK; a later one with another KEK could not unwrap it).
SECRETS = {"kek": os.urandom(32), "aad": os.urandom(16)}


@contextmanager
def api_server(url: str, workers: int, threads: int, logdir: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    port = _free_port()
    env = dict(os.environ)
    env.update({
        "ENP_DATABASE_URL": url,
        "ENP_ENV": "local",
        "ENP_VAR_DIR": str(logdir),
        "ENP_REVISION_TOKEN_KEK": base64.b64encode(SECRETS["kek"]).decode(),
        "ENP_REVISION_TOKEN_AAD": base64.b64encode(SECRETS["aad"]).decode(),
    })
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    logfile = logdir / f"api-{workers}x{threads}.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [*_enpipeline_cmd(), "api", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
             "--threads", str(threads)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the API exited with {proc.returncode}; see {logfile}:\n"
                                 f"{logfile.read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200 and len(_children(proc.pid)) >= workers:
                    conn.close()
                    break
                conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the API did not become healthy in 60 s; see {logfile}")
            time.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# -- profiling ---------------------------------------------------------------------------------------

# py-spy's collapsed stacks name frames "function (path:line)". A sample belongs to the step of the
# outermost frame that is one of the publish steps below; samples outside every step (HTTP parsing,
# socket I/O, Flask dispatch, metrics) go by the innermost frame whose path matches a fallback.
STEPS: dict[str, str] = {
    "PublishService.verify": "JWT verify (ES256 signature, claims, tekmac)",
    "PublishService.read_token": "revision token (decrypt old, encrypt new)",
    "PublishService._next_token": "revision token (decrypt old, encrypt new)",
    "PublishService._store": "DB (SQLAlchemy, psycopg2, waits for Postgres)",
    "PartitionGuard.ensure": "DB (SQLAlchemy, psycopg2, waits for Postgres)",
    "PublishService.load_app": "app + authority lookup (cached)",
    "transform": "transform / validation",
    "_with_sorted_keys": "transform / validation",
    "decode_publish": "request JSON decode (wire.decode_publish)",
    "check_content_type": "request JSON decode (wire.decode_publish)",
    "random_padding": "response padding (urandom + base64)",
    "publish_response": "response JSON encode",
    "_json": "response JSON encode",
}
FALLBACKS: list[tuple[str, tuple[str, ...]]] = [
    ("DB (SQLAlchemy, psycopg2, waits for Postgres)", ("sqlalchemy/", "psycopg2/", "enpipeline/db/")),
    ("metrics + chaff tracker", ("prometheus_client/", "api/metrics.py", "enpipeline/chaff.py")),
    ("other app code (views, service glue)", ("enpipeline/", "api/")),
    ("Flask / werkzeug", ("flask/", "werkzeug/")),
    ("gunicorn (accept, HTTP parse, socket write/close, threads)",
     ("gunicorn/", "concurrent/futures/", "selectors.py", "threading.py", "socket.py")),
]


def _sample_category(frames: list[str]) -> str:
    funcs = [f.partition(" (")[0] for f in frames]
    for func in funcs:  # outermost first
        if func in STEPS:
            return STEPS[func]
    for frame in reversed(frames):  # innermost first
        path = frame.partition(" (")[2].rsplit(":", 1)[0]
        for name, paths in FALLBACKS:
            if any(p in path for p in paths):
                return name
    return "other"


def summarise_profile(raw_files: list[Path]) -> dict[str, Any]:
    """Share of samples per category (and per leaf function) from py-spy ``--format raw`` output."""
    totals: Counter = Counter()
    functions: Counter = Counter()
    n = 0
    for path in raw_files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count_s = line.rpartition(" ")
            if not count_s.isdigit():
                continue
            count = int(count_s)
            frames = stack.split(";")
            n += count
            totals[_sample_category(frames)] += count
            leaf = frames[-1]
            functions[leaf.split(" (")[0] + " (" + leaf.rsplit("/", 1)[-1].lstrip("(")] += count
    return {
        "samples": n,
        "categories": {k: v / n for k, v in totals.most_common()} if n else {},
        "top_leaf_functions": {k: v / n for k, v in functions.most_common(15)} if n else {},
    }


def start_profilers(worker_pids: list[int], outdir: Path, duration: float,
                    idle: bool) -> list[tuple[subprocess.Popen, Path]]:
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        log("py-spy not found next to the interpreter; no profile")
        return []
    out = []
    for pid in worker_pids:
        raw = outdir / f"worker-{pid}-{time.monotonic_ns()}.txt"
        proc = subprocess.Popen(
            [str(spy), "record", "--pid", str(pid), "--format", "raw", "--output", str(raw), "--rate", "200",
             "--duration", str(max(1, int(duration))), "--nonblocking", *(["--idle"] if idle else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        out.append((proc, raw))
    return out


# -- in-process breakdown ----------------------------------------------------------------------------


def breakdown(url: str, fixture: Fixture, n: int) -> dict[str, dict[str, float]]:
    """CPU and wall ms per publish of each server step, run serially in this process (no HTTP server).

    Each figure is the best of three passes over N publishes. Precise where py-spy is statistical; it
    leaves out gunicorn (HTTP parsing, socket I/O), which the py-spy profile and the CPU split show.
    """
    import dataclasses

    from api.app import create_app
    from enpipeline.model import RevisableKey
    from enpipeline.publish.wire import decode_publish, publish_response, random_padding

    settings = Settings(database_url=url, revision_token_kek=SECRETS["kek"], revision_token_aad=SECRETS["aad"],
                        db_pool_size=1, db_pool_max_overflow=2)
    app = create_app(settings)
    service = app.extensions["enpipeline"].service
    client = app.test_client()
    maker = ApiClient(fixture, "127.0.0.1", 1)
    db = DbClient(fixture, url)
    out: dict[str, dict[str, float]] = {}

    def measure(label: str, fn: Callable[[Any], Any], items: Callable[[], list], repeats: int = 3) -> list:
        """Best of ``repeats`` passes (the least disturbed by other load); returns the last pass's results."""
        results: list = []
        for _ in range(repeats):
            batch = items()
            if not batch:
                return []
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                results = [fn(x) for x in batch]
            except Exception as exc:  # the code under test moves on; report and keep going
                log(f"breakdown step {label!r} failed: {type(exc).__name__}: {exc}")
                return []
            cpu_ms = 1000 * (time.process_time() - c0) / len(batch)
            wall_ms = 1000 * (time.perf_counter() - t0) / len(batch)
            if label not in out or cpu_ms < out[label]["cpu_ms"]:
                out[label] = {"cpu_ms": cpu_ms, "wall_ms": wall_ms}
        return results

    def post(body: bytes) -> None:
        resp = client.post("/v1/publish", data=body, content_type="application/json")
        if resp.status_code != 200:
            raise RuntimeError(f"publish answered {resp.status_code}: {resp.get_data(as_text=True)[:200]}")

    try:
        for body in maker.make_items(30):  # warm caches, pool, revision key
            post(body)
        measure("full publish via Flask test client (no gunicorn)", post, lambda: maker.make_items(n))
        bodies = maker.make_items(n)
        requests = measure("  request JSON decode (wire.decode_publish)",
                           lambda b: decode_publish(b, settings.max_body_bytes), lambda: bodies)
        now = datetime.now(UTC)
        authorized = service.load_app(APP_ID)
        claims = measure("  JWT verify (service.verify)", lambda r: service.verify(r, authorized, now),
                         lambda: requests)
        transformed = measure(
            "  transform / validation",
            lambda r: transform(r, app_name=APP_ID, regions=[REGION], claims=claims[0], settings=settings, now=now),
            lambda: requests)
        measure("  revision token encrypt (14 keys)",
                lambda t: service.codec.encrypt([RevisableKey(e.exposure_key, e.interval_number, e.interval_count)
                                                 for e in t.exposures], now), lambda: transformed)
        measure("  response padding + JSON encode",
                lambda _: json.dumps(publish_response(revision_token="x" * 400, inserted=KEYS_PER_PUBLISH,
                                                      padding=random_padding(settings.response_padding_min_bytes,
                                                                             settings.response_padding_range))),
                lambda: transformed)
        measure("  DB store (same as the baseline's transaction)", db.do, lambda: db.make_items(n))
        measure("    of which dataclasses.asdict of the 14 rows",
                lambda t: [dataclasses.asdict(e) for e in t.exposures], lambda: transformed)
    finally:
        db.close()
        service.engine.dispose()
    return out


# -- phases ------------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class Phase:
    """One side of the comparison (the API or the DB-only baseline), timed in slices.

    The two sides run in alternating slices (db, api, api, db, ...) rather than one after the other, so
    drifting background load on a shared machine hits both alike and the ratio stays meaningful.
    """

    def __init__(self, label: str, pool: ClientPool, meter: CpuMeter, args: argparse.Namespace):
        self.label, self.pool, self.meter, self.args = label, pool, meter, args
        self.results: list[RunResult] = []
        self.wall = 0.0
        self.core_seconds: Counter = Counter()
        self.rate = 0.0
        self.warm_ok = 0
        self.refills = 0

    def warm(self) -> None:
        """Untimed: fills pools and caches, and measures a rate to size the pre-generated work."""
        pool, args = self.pool, self.args
        pool.generate(max(5, args.warmup_requests) * pool.n)
        t0 = time.monotonic()
        warm = pool.run(t0, t0 + args.warmup)
        wall = max(r.ended for r in warm) - t0
        self.rate = sum(len(r.latencies) for r in warm) / max(wall, 1e-3)
        self.warm_ok = sum(r.statuses.get(200, 0) for r in warm)
        errors: Counter = Counter()
        for r in warm:
            errors.update(r.errors)
        if errors:
            log(f"{self.label}: {sum(errors.values())} warm-up errors, e.g. {errors.most_common(2)}")
        log(f"{self.label}: warm-up {self.rate:.0f} publishes/s")

    def slice(self, seconds: float, on_start: Callable[[float], None] | None = None) -> None:
        pool = self.pool
        pool.generate(math.ceil(self.rate * seconds * self.args.body_factor) + 20 * pool.n)
        refills = pool.refills
        start = time.monotonic() + 0.2
        while time.monotonic() < start - 0.02:
            time.sleep(0.005)
        self.meter.start()
        if on_start:
            on_start(seconds)
        results = pool.run(start, start + seconds)
        wall = max([r.ended for r in results] + [start + seconds]) - start
        for name, cores in self.meter.stop(wall).items():
            self.core_seconds[name] += cores * wall
        self.wall += wall
        self.results.extend(results)
        self.refills += pool.refills - refills
        # The warm-up may have run cold; size the next slice's work by the fastest rate seen.
        self.rate = max(self.rate, sum(r.statuses.get(200, 0) for r in results) / wall)

    def summary(self) -> dict[str, Any]:
        lat = sorted(x for r in self.results for x in r.latencies)
        statuses: Counter = Counter()
        errors: Counter = Counter()
        for r in self.results:
            statuses.update(r.statuses)
            errors.update(r.errors)
        ok, wall = statuses.get(200, 0), self.wall
        cpu = {k: v / wall for k, v in self.core_seconds.items() if k != "cores"}
        cpu["cores"] = float(os.cpu_count() or 1)
        if self.refills:
            log(f"{self.label}: WARNING pre-generated work ran out {self.refills} times and was topped up inside "
                "the timed window; raise --body-factor")
        return {
            "requests": len(lat),
            "ok": ok,
            "errors": len(lat) - ok,
            "error_samples": dict(errors.most_common(5)),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "wall_s": wall,
            "publishes_per_s": ok / wall if wall else float("nan"),
            "keys_per_s": ok * KEYS_PER_PUBLISH / wall if wall else float("nan"),
            "latency_ms": {"mean": 1000 * sum(lat) / len(lat) if lat else float("nan"),
                           "p50": 1000 * percentile(lat, 50), "p90": 1000 * percentile(lat, 90),
                           "p99": 1000 * percentile(lat, 99), "max": 1000 * lat[-1] if lat else float("nan")},
            "cpu_cores_used": cpu,
            "warmup_publishes": self.warm_ok,
            "generated_during_run": self.refills,
            "keep_alive_retries": sum(r.retries for r in self.results),
        }


def compare(url: str, fixture: Fixture, args: argparse.Namespace, db_pool: ClientPool, workers: int,
            threads: int, logdir: Path) -> dict[str, Any]:
    """One server config against the DB-only baseline, in ``--rounds`` alternating slices each."""
    name = f"{workers}x{threads}"
    reset_exposures(url)
    db = Phase(f"db baseline ({name} run)", db_pool,
               CpuMeter({"clients": lambda: db_pool.pids, "postgres": lambda: _postgres_pids(url)}), args)
    with api_server(url, workers, threads, logdir) as (proc, port):
        worker_pids = _children(proc.pid)
        api_pool = ClientPool(args.client_mode, args.clients, "api", fixture, {"host": "127.0.0.1", "port": port})
        profilers: list[tuple[subprocess.Popen, Path]] = []
        groups: dict[str, Callable[[], list[int]]] = {
            "clients": lambda: api_pool.pids,
            "api_server": lambda: [proc.pid, *_children(proc.pid)],
            "postgres": lambda: _postgres_pids(url)}
        if args.profile:  # py-spy's own CPU, on the same cores: a profiled run's figures are depressed
            groups["py-spy"] = lambda: [p.pid for p, _ in profilers]
        api = Phase(f"api {name}", api_pool, CpuMeter(groups), args)
        profile_dir = Path(args.profile) / name if args.profile else None

        def on_start(seconds: float) -> None:
            if profile_dir:
                profile_dir.mkdir(parents=True, exist_ok=True)
                profilers.extend(start_profilers(worker_pids, profile_dir, seconds, args.profile_idle))

        try:
            db.warm()
            api.warm()
            seconds = args.duration / args.rounds
            log(f"{name}: {args.rounds} alternating slices of {seconds:.1f} s per side")
            for i in range(args.rounds):
                if i % 2 == 0:
                    db.slice(seconds)
                    api.slice(seconds, on_start)
                else:
                    api.slice(seconds, on_start)
                    db.slice(seconds)
        finally:
            api_pool.close()
        profile = collect_profile(profilers, args.profile_idle)
    out = {"workers": workers, "threads": threads, "worker_class": "gthread" if threads > 1 else "sync",
           "api": api.summary(), "db_baseline": db.summary()}
    if profile:
        out["api"]["profile"] = profile
    out["stored_keys"] = stored_keys(url)
    out["expected_keys"] = KEYS_PER_PUBLISH * sum(out[side]["ok"] + out[side]["warmup_publishes"]
                                                  for side in ("api", "db_baseline"))
    out["verdict"] = verdict(out["api"], out["db_baseline"])
    return out


def collect_profile(profilers: list[tuple[subprocess.Popen, Path]], idle: bool) -> dict[str, Any] | None:
    if not profilers:
        return None
    for p, _ in profilers:
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode:
            log(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    profile = summarise_profile([raw for _, raw in profilers])
    profile["raw_files"] = [str(raw) for _, raw in profilers]
    profile["mode"] = "wall time, idle included" if idle else "on-CPU only"
    return profile


# -- output ------------------------------------------------------------------------------------------


def _fmt_phase(name: str, r: dict[str, Any]) -> list[str]:
    lat, cpu = r["latency_ms"], r["cpu_cores_used"]
    lines = [
        f"  {name}",
        f"    publishes/s {r['publishes_per_s']:8.1f}   keys/s {r['keys_per_s']:9.0f}   "
        f"({r['ok']} ok / {r['requests']} requests in {r['wall_s']:.1f} s)",
        f"    latency ms  p50 {lat['p50']:6.1f}   p90 {lat['p90']:6.1f}   p99 {lat['p99']:6.1f}   "
        f"max {lat['max']:6.1f}   mean {lat['mean']:6.1f}",
        "    CPU (cores) " + "   ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k not in ("cores", "other"))
        + f"   other/kernel {cpu['other']:.2f}   (of {cpu['cores']:.0f} cores)",
    ]
    if cpu["other"] > NOISY_OTHER_CORES:
        lines.append(f"    WARNING {cpu['other']:.2f} cores went to processes outside the benchmark: the machine was "
                     "not idle, so these figures are low and noisy")
    if r["errors"]:
        lines.append(f"    ERRORS {r['errors']}: statuses {r['statuses']}")
        lines.extend(f"      {n} x {msg}" for msg, n in r["error_samples"].items())
    if r["generated_during_run"]:
        lines.append(f"    WARNING pre-generated work ran out; topped up {r['generated_during_run']} times "
                     "in the timed window (raise --body-factor)")
    if r["keep_alive_retries"]:
        lines.append(f"    note: {r['keep_alive_retries']} requests retried once on a new connection after the server "
                     "closed an idle keep-alive one")
    if cpu.get("py-spy", 0) > 0.05:
        lines.append(f"    note: py-spy itself used {cpu['py-spy']:.2f} cores during the API slices, so this run's API "
                     "figures and ratio are depressed; take figures from a run without --profile")
    prof = r.get("profile")
    if prof and prof["samples"]:
        lines.append(f"    py-spy over the workers ({prof['samples']} samples, {prof['mode']}; on a saturated box a "
                     "thread waiting for a core after I/O counts as active, which inflates the DB share):")
        lines.extend(f"      {share:6.1%}  {cat}" for cat, share in prof["categories"].items())
        lines.append("    top leaf functions:")
        lines.extend(f"      {share:6.1%}  {fn}" for fn, share in list(prof["top_leaf_functions"].items())[:10])
    return lines


def verdict(api: dict[str, Any], db: dict[str, Any]) -> dict[str, Any]:
    ratio = api["publishes_per_s"] / db["publishes_per_s"] if db["publishes_per_s"] else float("nan")
    p99 = api["latency_ms"]["p99"]
    return {"ratio": ratio, "ratio_ok": ratio >= TARGET_RATIO, "p99_ms": p99, "p99_ok": p99 <= TARGET_P99_MS,
            "errors_ok": api["errors"] == 0}


def _plural(mode: str) -> str:
    return {"thread": "threads", "process": "processes"}[mode]


def print_report(report: dict[str, Any]) -> None:
    print()
    print(f"publish benchmark: {report['machine']['cpus']} CPUs, {report['clients']} concurrent clients per side "
          f"(API clients: {_plural(report['client_mode'])} with keep-alive connections, baseline clients: "
          f"{_plural(report['baseline_mode'])}), "
          f"{report['duration_s']:.0f} s per side in {report['rounds']} alternating slices; "
          f"database: {report['database']}")
    print("  note: the clients, gunicorn and Postgres all share these cores, so the API figures include the load "
          "generator's own cost;")
    print(f"  the CPU lines show who used the cores (machine load before the start: {report['idle_load_cores']:.2f} "
          "cores).")
    for run in report["runs"]:
        print()
        print(f"config: gunicorn {run['workers']} workers x {run['threads']} threads ({run['worker_class']})")
        for line in _fmt_phase("DB-only baseline (lock_keys + read_for_update + insert_exposures, one transaction)",
                               run["db_baseline"]):
            print(line)
        for line in _fmt_phase("API: POST /v1/publish, 14 keys, ES256 certificate verified", run["api"]):
            print(line)
        if run["stored_keys"] != run["expected_keys"]:
            print(f"  WARNING the database holds {run['stored_keys']} keys, expected {run['expected_keys']}")
        v = run["verdict"]
        print(f"  ratio api/db {v['ratio']:.2f} (target >= {TARGET_RATIO}: {'MET' if v['ratio_ok'] else 'MISSED'})"
              f"   API p99 {v['p99_ms']:.1f} ms (target <= {TARGET_P99_MS:.0f}: {'MET' if v['p99_ok'] else 'MISSED'})"
              f"{'' if v['errors_ok'] else '   API errors present'}")
    if report.get("breakdown"):
        steps = report["breakdown"]
        full = next(iter(steps.values()))["cpu_ms"]
        print()
        print("in-process breakdown, serial, ms per publish (CPU / wall; share of the full publish's CPU):")
        for label, v in steps.items():
            print(f"  {label:55s} {v['cpu_ms']:6.3f} / {v['wall_ms']:6.3f}   {v['cpu_ms'] / full:6.1%}")
    best = report["best"]
    print()
    print(f"best: {best['workers']}x{best['threads']} -> {best['publishes_per_s']:.1f} publishes/s, "
          f"p99 {best['p99_ms']:.1f} ms, ratio {best['ratio']:.2f}: "
          f"{'targets MET' if best['targets_met'] else 'targets MISSED'}")


# -- main --------------------------------------------------------------------------------------------


def parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        w, _, t = part.strip().partition(":")
        out.append((int(w), int(t or 1)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", help="Postgres server to create the bench database on (default: "
                                          "ENP_BENCH_DATABASE_URL, ENP_DATABASE_URL, local 127.0.0.1:5432, pgserver)")
    p.add_argument("--duration", type=float, default=20.0, help="timed seconds per side and config (default 20)")
    p.add_argument("--rounds", type=int, default=4,
                   help="split each side's time into this many alternating slices (default 4; 1 = one block each)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"gunicorn configs to run, WORKERS:THREADS[,...] (threads 1 = sync worker; default "
                        f"{DEFAULT_CONFIG}, the server's own default here)")
    p.add_argument("--client-mode", choices=["thread", "process"], default="thread",
                   help="API clients as threads of this process (default) or separate processes")
    p.add_argument("--baseline-mode", choices=["thread", "process"], default="process",
                   help="DB baseline clients as processes (default, no GIL limit) or threads")
    p.add_argument("--warmup", type=float, default=3.0, help="untimed warm-up seconds per side (default 3)")
    p.add_argument("--warmup-requests", type=int, default=60,
                   help="pre-generated warm-up publishes per client (default 60)")
    p.add_argument("--body-factor", type=float, default=2.0,
                   help="pre-generate this multiple of the expected rate x slice length (default 2)")
    p.add_argument("--request-padding", type=int, default=1024, help="random bytes of request padding")
    p.add_argument("--profile", metavar="DIR", help="py-spy record every worker during the API slices; "
                                                    "raw stacks go to DIR, a summary by category is printed")
    p.add_argument("--profile-idle", action="store_true",
                   help="with --profile: sample idle/waiting threads too (wall time instead of CPU time)")
    p.add_argument("--breakdown", type=int, metavar="N", default=0,
                   help="also time each server step in-process, serially, over N publishes (e.g. 300)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout instead")
    args = p.parse_args(argv)
    configs = parse_configs(args.config)
    args.rounds = max(1, args.rounds)

    logdir = Path(tempfile.mkdtemp(prefix="enp-bench-"))
    report: dict[str, Any] = {"clients": args.clients, "duration_s": args.duration, "rounds": args.rounds,
                              "client_mode": args.client_mode, "baseline_mode": args.baseline_mode,
                              "machine": {"cpus": os.cpu_count()}, "runs": []}
    failed = True
    try:
        with server_url(args.database_url) as (base_url, source), bench_database(base_url) as url:
            report["database"] = source
            log(f"database {sa.engine.make_url(url).database} on {source}; server logs in {logdir}")
            fixture = setup_database(url, args.request_padding)
            b0 = _machine_busy()
            time.sleep(2)
            report["idle_load_cores"] = (_machine_busy() - b0) / 2
            if report["idle_load_cores"] > NOISY_OTHER_CORES:
                log(f"WARNING the machine is busy before the benchmark ({report['idle_load_cores']:.2f} cores); "
                    "figures will be low and noisy")
            db_pool = ClientPool(args.baseline_mode, args.clients, "db", fixture, {"url": url})
            try:
                for workers, threads in configs:
                    run = compare(url, fixture, args, db_pool, workers, threads, logdir)
                    report["runs"].append(run)
                    log(f"{workers}x{threads}: api {run['api']['publishes_per_s']:.1f} publishes/s "
                        f"(p99 {run['api']['latency_ms']['p99']:.1f} ms, errors {run['api']['errors']}), "
                        f"db {run['db_baseline']['publishes_per_s']:.1f} publishes/s, "
                        f"ratio {run['verdict']['ratio']:.2f}")
            finally:
                db_pool.close()
            if args.breakdown:
                reset_exposures(url)
                report["breakdown"] = breakdown(url, fixture, args.breakdown)
        failed = False
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if failed:
            log(f"server logs kept in {logdir}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)

    best = max(report["runs"], key=lambda r: (r["verdict"]["p99_ok"] and r["verdict"]["errors_ok"],
                                              r["verdict"]["ratio"]))
    v = best["verdict"]
    report["best"] = {"workers": best["workers"], "threads": best["threads"],
                      "publishes_per_s": best["api"]["publishes_per_s"], "p99_ms": v["p99_ms"], "ratio": v["ratio"],
                      "targets_met": v["ratio_ok"] and v["p99_ok"] and v["errors_ok"]}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    return 0 if report["best"]["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
