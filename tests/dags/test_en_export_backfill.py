"""A backfill of 48 missed hours, run by a real Airflow 3 scheduler, produces exactly what on-time runs would have.

On time: the 48 hourly intervals one by one with ``dag.test()`` into blob directory A. Then the export tables
are emptied (the keys stay) and ``airflow backfill create`` queues the same 48 intervals, which a real
api-server + dag-processor + scheduler (LocalExecutor) run into blob directory B. Padding is disabled
(``ENP_EXPORT_MIN_RECORDS=0``) in both, because padding keys are fresh random bytes by design: with it the two
sides could never agree byte for byte. Everything else must: file names, export.bin and export.sig bytes,
index.txt, and each batch's counts and statistics.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from enpipeline.export import format as fmt
from enpipeline.timeutil import truncate
from tests.dags.airflow_env import (
    AirflowEnv,
    add_config,
    add_signing_key,
    batches,
    exposure,
    free_port,
    insert,
    running,
    wait_http_ok,
)
from tests.dags.conftest import TIMINGS

HOUR = timedelta(hours=1)
HOURS = 48
BACKFILL_TIMEOUT = 900  # a hang guard for the scheduler's 48 runs (2-3 minutes here; 8+ when the machine is overloaded)
NO_PADDING = {"ENP_EXPORT_MIN_RECORDS": "0"}


def keys_in_window(j: int) -> int:
    return (j * 7) % 45  # 0 .. 44 keys: empty windows, one file, and two files at 30 keys per file


def comparable(rows: list[dict]) -> list[tuple]:
    return [(r["config"], r["start_timestamp"], r["end_timestamp"], r["status"], r["key_count"],
             r["revised_key_count"], r["padding_key_count"], r["file_count"], r["stats"]) for r in rows]


def backfill_runs(env: AirflowEnv) -> list[sa.Row]:
    engine = env.metadata()
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(
                "SELECT run_id, run_type, state, logical_date, data_interval_start, data_interval_end, backfill_id"
                " FROM dag_run WHERE dag_id = 'en_export' ORDER BY logical_date")))
    finally:
        engine.dispose()


@pytest.mark.slow
def test_scheduler_backfill_of_48_missed_hours_matches_on_time_runs_byte_for_byte(airflow_factory, engine):
    now = datetime.now(UTC)
    base = truncate(now, HOUR) - (HOURS + 3) * HOUR  # first missed interval [base, base+1h); last ends 3 h ago
    # Interval [base+i, base+i+1h) exports the windows ending in (base+i-2h, base+i-1h] (min window age 2 h).
    ontime = airflow_factory("ontime")
    ontime.env.update(NO_PADDING)
    sig, public_key = add_signing_key(engine, ontime.key_dir, "us-v1", now)
    add_config(engine, "us", period=HOUR, sig_ids=(sig,), max_records=30, now=now)
    add_config(engine, "us-4h", period=4 * HOUR, sig_ids=(sig,), root="exposureKeyExport-us-4h", now=now)
    rows = []
    for j in range(-3, HOURS - 1):  # hourly windows j = -2 .. 45 are exported; j = -3 and 46 lie outside
        start = base + j * HOUR
        rows += [exposure(start + timedelta(seconds=(j * 131 + 79 * i) % 3600), dsos=i % 4)
                 for i in range(keys_in_window(j))]
    insert(engine, rows)

    # -- on time: one dag.test() per interval --------------------------------------------------------------
    started = time.perf_counter()
    with ontime.driver() as driver:
        for i in range(HOURS):
            run = driver.run(base + (i + 1) * HOUR)
            assert run.state == "success", run.log[-5000:]
            assert run.data_interval == [(base + i * HOUR).isoformat(), (base + (i + 1) * HOUR).isoformat()]
    TIMINGS[f"{HOURS} on-time dag.test runs"] = f"{time.perf_counter() - started:.1f}s"
    expected = comparable(batches(engine))
    on_time_blobs = ontime.blobs()

    windows = [base + j * HOUR for j in range(-2, HOURS - 2)]
    us_names = sorted(f"exposureKeyExport-us/{int(w.timestamp())}-{int((w + HOUR).timestamp())}-{n:05d}.zip"
                      for j, w in zip(range(-2, HOURS - 2), windows, strict=True)
                      for n in range(1, -(-keys_in_window(j) // 30) + 1))
    assert [f"exports/{n}" for n in us_names] == sorted(
        n for n in on_time_blobs if n.startswith("exports/exposureKeyExport-us/") and n.endswith(".zip"))
    assert on_time_blobs["exports/exposureKeyExport-us/index.txt"] == "\n".join(us_names).encode()
    assert len([r for r in expected if r[0] == "us"]) == HOURS
    four_hourly = [r for r in expected if r[0] == "us-4h"]
    assert len(four_hourly) == HOURS // 4 and all(r[2] - r[1] == 4 * HOUR for r in four_hourly)
    for name, data in on_time_blobs.items():
        if name.endswith(".zip"):
            assert len(fmt.verify_export(fmt.read_export(data), [public_key])) == 1, name

    # -- the same hours missed, then backfilled by the scheduler ----------------------------------------------
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE export_file, export_shard, export_batch"))
        assert conn.execute(sa.text("SELECT count(*) FROM exposure WHERE app_package_name = 'export-generated'")
                            ).scalar_one() == 0  # no padding was made, so nothing random is left behind
    backfill = airflow_factory("backfill")
    port = free_port()
    backfill.env.update(NO_PADDING)
    backfill.env.update({
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the backfill's runs, no run for the latest hour
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        # The first Execution API calls on a busy 2-core machine can take several seconds; the default
        # 5 s client timeout would fail the task attempt and send it into a 30 s retry delay.
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
    })
    out = backfill.airflow("dags", "reserialize")
    assert out.returncode == 0, out.stderr[-3000:]
    started = time.perf_counter()
    out = backfill.airflow("backfill", "create", "--dag-id", "en_export", "--from-date", base.isoformat(),
                           "--to-date", (base + (HOURS - 1) * HOUR).isoformat(), "--max-active-runs", "4")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = backfill_runs(backfill)
    assert len(runs) == HOURS and {r.run_type for r in runs} == {"backfill"} and {r.state for r in runs} == {"queued"}

    with running(backfill, "api-server", "--apps", "execution", "--host", "127.0.0.1", "--port", str(port)) as api:
        wait_http_ok(f"http://127.0.0.1:{port}/execution/health", api, timeout=120)
        with running(backfill, "dag-processor") as processor, running(backfill, "scheduler") as scheduler:
            deadline = time.monotonic() + BACKFILL_TIMEOUT
            while True:
                runs = backfill_runs(backfill)
                if all(r.state in ("success", "failed") for r in runs):
                    break
                for proc in (api, processor, scheduler):
                    assert proc.poll() is None, f"{proc.args} exited; see {backfill.home}"
                assert time.monotonic() < deadline, (
                    f"backfill unfinished after {BACKFILL_TIMEOUT}s: {sorted(r.state for r in runs)}")
                time.sleep(2)
    TIMINGS[f"backfill of {HOURS} h (create + scheduler)"] = f"{time.perf_counter() - started:.1f}s"

    assert [r.state for r in runs] == ["success"] * HOURS
    assert [(r.data_interval_start, r.data_interval_end) for r in runs] == [
        (base + i * HOUR, base + (i + 1) * HOUR) for i in range(HOURS)]
    assert all(r.logical_date == r.data_interval_start for r in runs)

    assert backfill.blobs() == on_time_blobs  # same names, same bytes, same index
    assert comparable(batches(engine)) == expected  # same batches, counts and statistics

    # The task logs carry what each run shipped.
    logs = backfill.home / "logs" / "dag_id=en_export"
    attempts = list(logs.glob("run_id=*/task_id=*/**/attempt=*.log"))
    TIMINGS["backfill task attempts"] = f"{len(attempts)} ({sum(p.name != 'attempt=1.log' for p in attempts)} retries)"
    for r in runs:
        plan = sorted((logs / f"run_id={r.run_id}" / "task_id=plan").glob("attempt=*.log"))[-1].read_text()
        assert re.search(r"planned \d+ file\(s\) in [12] batch\(es\)", plan), r.run_id
        final = sorted((logs / f"run_id={r.run_id}" / "task_id=finalize").glob("attempt=*.log"))[-1].read_text()
        assert "Returned value was: {'batches': " in final and "complete:\\nkeys=" in final, r.run_id
