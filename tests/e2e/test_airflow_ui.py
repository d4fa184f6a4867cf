"""The local stack end to end, seen in a browser.

``enpipeline local up`` (what ``make up`` runs) starts the whole stack in a temporary var dir on free ports:
embedded Postgres, the API, and Airflow's api-server, scheduler, dag-processor and triggerer. Keys are seeded for
yesterday and en_export is triggered through Airflow's REST API for a past interval, as an operator would. Then
headless Debian Chromium, driven by Playwright, logs in to the Airflow UI with the generated admin password, finds
the DAGs, opens the finished en_export run and reads the key counts in two task logs; the counts must be those of
the database and of the file written. ``enpipeline local down`` stops it all, and no process of it may survive.

Screenshots of every step go to ``test-artifacts/e2e/`` in the repository root (``failure.png`` shows the page as it
was when a step failed). Chromium comes from Debian (``make browser``); Playwright never downloads a browser.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from enpipeline.db.engine import normalize_url
from enpipeline.local_airflow import get_json
from tests import logscan
from tests.dags.airflow_env import free_port

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "e2e"
CHROMIUM = Path("/usr/bin/chromium")
RUN_ID = "e2e_export"
KEYS_PER_DAY = 2400  # 100 per hour: well below one file, so the run pads to ENP_EXPORT_MIN_RECORDS
UP_TIMEOUT = 900     # the first start migrates Airflow's metadata database; 1-3 minutes on 2 busy cores
RUN_TIMEOUT = 420
UI_TIMEOUT_MS = 120_000  # the React bundle and its API calls are slow on a loaded 2-core machine
TIMINGS: dict[str, float] = {}


@dataclass
class Stack:
    var: Path
    api_port: int
    airflow_port: int
    env: dict[str, str]
    password: str
    up_output: str

    @property
    def airflow(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}"

    def database_url(self) -> str:
        line = next(ln for ln in (self.var / "enp.env").read_text().splitlines() if ln.startswith("ENP_DATABASE_URL="))
        return line.split("=", 1)[1]

    def logs(self) -> str:
        """The tail of every component log and of this test's en_export task logs, for a failure message."""
        parts = []
        for log in sorted((self.var / "log").glob("*.log")):
            parts.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        for log in sorted((self.var / "airflow" / "logs" / "dag_id=en_export").glob(f"run_id={RUN_ID}/**/*.log")):
            parts.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)


def _cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enpipeline.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _pids(var: Path) -> dict[str, int]:
    """Every pid the stack recorded: the API, the Airflow components and the embedded Postgres."""
    pids = {f.stem: int(f.read_text().split()[0]) for f in (var / "run").glob("*.pid")}
    postmaster = var / "pgdata" / "postmaster.pid"
    if postmaster.exists():
        pids["postgres"] = int(postmaster.read_text().splitlines()[0])
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    var = tmp_path_factory.mktemp("stack") / "var"
    # Every log of the stack (API, Airflow components, task logs, Postgres) and every key and password it made.
    logscan.register_log_dir(var)
    logscan.register_key_dir(var)
    api, airflow, worker_logs, trigger_logs = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW", "ENP_"))}
    env.update({"ENP_LOCAL_API_PORT": str(api), "ENP_LOCAL_AIRFLOW_PORT": str(airflow),
                "ENP_LOCAL_AIRFLOW_WORKER_LOG_PORT": str(worker_logs),
                "ENP_LOCAL_AIRFLOW_TRIGGER_LOG_PORT": str(trigger_logs),
                "ENP_LOCAL_START_TIMEOUT": str(UP_TIMEOUT - 60)})
    started = time.monotonic()
    up = _cli("local", "up", "--var-dir", str(var), env=env, timeout=UP_TIMEOUT)
    TIMINGS["make up (cold: initdb, migrations, Airflow metadata)"] = time.monotonic() - started
    pids: dict[str, int] = {}
    try:
        pids = _pids(var)
        password = json.loads((var / "airflow" / "passwords.json").read_text())["admin"] if up.returncode == 0 else ""
        s = Stack(var=var, api_port=api, airflow_port=airflow, env=env, password=password, up_output=up.stdout)
        assert up.returncode == 0, f"local up failed:\n{up.stdout}\n{up.stderr}\n{s.logs()}"
        yield s
    finally:
        started = time.monotonic()
        down = _cli("local", "down", "--var-dir", str(var), env=env, timeout=300)
        TIMINGS["make down"] = time.monotonic() - started
        print(f"\nlocal down:\n{down.stdout}{down.stderr}")
        left = {name: pid for name, pid in pids.items() if _alive(pid)}
        assert down.returncode == 0 and not left, f"still running after down: {left}\n{down.stdout}{down.stderr}"
        print("e2e timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in TIMINGS.items()))


def _wait_for_dag(stack: Stack, token: str, dag_id: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            get_json(f"{stack.airflow}/api/v2/dags/{dag_id}", token=token, timeout=30)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{dag_id} not parsed within {timeout}s\n{stack.logs()}") from None
            time.sleep(2)


def _export_run(stack: Stack) -> dict:
    """Seed yesterday's keys, trigger en_export for [yesterday 12:00, 13:00) (it exports the hour 10:00-11:00,
    two hours older than the interval's end) and wait for the run to finish; returns what the UI must show."""
    from enpipeline.local_airflow import token as login

    seed = _cli("generate", "--days", "1", "--keys-per-day", str(KEYS_PER_DAY), "--seed", "8",
                env={**stack.env, "ENP_DATABASE_URL": stack.database_url(), "ENP_VAR_DIR": str(stack.var)},
                timeout=300)
    assert seed.returncode == 0, seed.stdout + seed.stderr
    yesterday = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    window = (yesterday + timedelta(hours=10), yesterday + timedelta(hours=11))
    start, end = yesterday + timedelta(hours=12), yesterday + timedelta(hours=13)
    engine = sa.create_engine(normalize_url(stack.database_url()), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        real = conn.execute(sa.text("SELECT count(*) FROM exposure WHERE created_at >= :s AND created_at < :e"
                                    " AND 'US' = ANY(regions)"), {"s": window[0], "e": window[1]}).scalar_one()
    engine.dispose()
    assert real > 0

    token = login(stack.airflow_port, stack.password)
    _wait_for_dag(stack, token, "en_export")
    started = time.monotonic()
    get_json(f"{stack.airflow}/api/v2/dags/en_export/dagRuns", token=token, timeout=60,
             data={"dag_run_id": RUN_ID, "logical_date": start.isoformat(), "data_interval_start": start.isoformat(),
                   "data_interval_end": end.isoformat(), "note": "e2e test: one past interval"})
    state = "queued"
    while state not in ("success", "failed"):
        assert time.monotonic() - started < RUN_TIMEOUT, f"en_export run still {state}\n{stack.logs()}"
        time.sleep(2)
        state = get_json(f"{stack.airflow}/api/v2/dags/en_export/dagRuns/{RUN_ID}", token=token)["state"]
    TIMINGS["en_export run (REST trigger to success)"] = time.monotonic() - started
    assert state == "success", stack.logs()
    zips = sorted((stack.var / "blobs" / "exports" / "exposureKeyExport-US").glob(
        f"{int(window[0].timestamp())}-{int(window[1].timestamp())}-*.zip"))
    assert len(zips) == 1, zips
    return {"real": real, "file": zips[0]}


class Browser:
    """One headless Chromium page; ``shot`` numbers the screenshots in the order the steps took them."""

    def __init__(self, page):
        self.page = page
        self.count = 0

    def shot(self, name: str) -> Path:
        self.count += 1
        path = ARTIFACTS / f"{self.count:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.mark.slow
@pytest.mark.e2e
def test_airflow_ui_shows_the_export_run_and_its_key_counts(stack: Stack):
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
    from playwright.sync_api import expect, sync_playwright

    assert "airflow    http://127.0.0.1:" in stack.up_output and "login admin / " in stack.up_output, stack.up_output
    expected = _export_run(stack)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    expect.set_options(timeout=UI_TIMEOUT_MS)
    started = time.monotonic()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            # This machine's network is closed: no background calls to Google, no QUIC, no component updates.
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"])
        page = chromium.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(UI_TIMEOUT_MS)
        b = Browser(page)
        try:
            # Log in: the UI sends an anonymous visitor to SimpleAuthManager's form.
            page.goto(stack.airflow + "/")
            expect(page.get_by_label("Username")).to_be_visible()
            b.shot("login")
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(stack.password)
            page.get_by_role("button", name="Sign in").click()
            expect(page).not_to_have_url(re.compile(r"/auth/login"))

            # The DAG list shows the pipeline's DAGs.
            page.get_by_role("link", name="Dags", exact=True).first.click()
            for dag_id in ("en_export", "en_cleanup", "en_federation_pull"):
                expect(page.get_by_role("link", name=dag_id, exact=True)).to_be_visible()
            b.shot("dag-list")

            # en_export -> Runs -> the finished run.
            page.get_by_role("link", name="en_export", exact=True).click()
            page.get_by_role("link", name="Runs", exact=True).click()
            run_link = page.get_by_role("link", name=RUN_ID, exact=True)
            expect(run_link).to_be_visible()
            b.shot("en_export-runs")
            run_link.click()
            expect(page.get_by_role("heading", name=RUN_ID, exact=True)).to_be_visible()
            plan_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="plan", exact=True))
            expect(plan_row).to_contain_text("Success")
            b.shot("en_export-run")

            # The plan task's log: how many keys the window had, and the files planned.
            plan_row.get_by_role("link", name="plan", exact=True).click()
            planned = page.get_by_text(re.compile(r"planned \d+ file\(s\) in \d+ batch\(es\)"))
            expect(planned).to_be_visible()
            window_line = page.get_by_text(re.compile(r"export config 'us' window .*: \d+ keys \(\d+ real"))
            expect(window_line).to_be_visible()
            b.shot("plan-log")
            counts = re.search(r": (\d+) keys \((\d+) real, (\d+) padding\)", window_line.inner_text())
            assert counts, window_line.inner_text()
            total, real, padding = (int(g) for g in counts.groups())
            assert real == expected["real"] and total == real + padding
            assert re.search(r"planned 1 file\(s\) in 1 batch\(es\)", planned.inner_text())

            # The mapped export_shard task's log: the file written, its keys, bytes and signatures.
            page.goto(f"{stack.airflow}/dags/en_export/runs/{RUN_ID}/tasks/export_shard/mapped/0")
            wrote = page.get_by_text(re.compile(r"wrote exports/exposureKeyExport-US/\S+\.zip: \d+ keys"))
            expect(wrote).to_be_visible()
            b.shot("export_shard-log")
            line = wrote.inner_text()
            assert f"exposureKeyExport-US/{expected['file'].name}: {total} keys" in line, line
            assert f"{expected['file'].stat().st_size} bytes, 1 signature(s)" in line, line
        except Exception:
            failure = ARTIFACTS / "failure.png"
            try:
                page.screenshot(path=str(failure), full_page=True)
            except Exception as exc:  # the page may be gone; the original error matters more
                print(f"no failure screenshot: {exc}")
            print(f"\nfailure screenshot: {failure} (url {page.url})")
            raise
        finally:
            chromium.close()
    TIMINGS["browser steps"] = time.monotonic() - started
    print(f"\nscreenshots: {ARTIFACTS} ({b.count})")
