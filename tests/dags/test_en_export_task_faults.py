"""en_export under a real Airflow 3 scheduler (LocalExecutor) while shard tasks are SIGKILLed mid-upload.

Two hourly windows of 1,000 keys each are exported by two runs (``airflow backfill create``), three files per
window. The Airflow processes get tests/dags/faults on PYTHONPATH: its ``sitecustomize`` patches the filesystem
blob store in every Python process Airflow starts (tests/support_faults.py), its ``airflow_local_settings`` sets
a 1 s retry delay by cluster policy. No production code knows about any of it. Two uploads are killed, once each:

* window 1, file 1: SIGKILL after half of the zip's bytes are in the temporary file (before the atomic rename);
* window 2, file 2: SIGKILL right after the object is complete, before the task records the file in the database.

The watch in the same wrapper checks at every index.txt write and every delete that the index names only
objects that exist and are complete, signed export files, and journals every operation to a file the test reads.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from pathlib import Path

import pytest
import sqlalchemy as sa

from enpipeline.blobstore import TEMP_PREFIX
from enpipeline.export import format as fmt
from enpipeline.export.pipeline import object_name
from enpipeline.timeutil import truncate
from tests.dags.airflow_env import (
    REPO,
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
from tests.support_faults import VIOLATIONS, read_journal

HOUR = timedelta(hours=1)
FAULTS = Path(__file__).resolve().parent / "faults"
ROOT = "exposureKeyExport-us"
KEYS_PER_WINDOW = 1000
PER_FILE = 400  # three files per window: 400 + 400 + 200
RUN_TIMEOUT = 300  # a hang guard; the two runs take well under a minute here


def metadata_rows(env: AirflowEnv, sql: str) -> list[sa.Row]:
    engine = env.metadata()
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql)))
    finally:
        engine.dispose()


def window_keys(engine, start: datetime) -> list[bytes]:
    with engine.connect() as conn:
        return [bytes(k) for k in conn.execute(sa.text(
            "SELECT exposure_key FROM exposure WHERE created_at >= :s AND created_at < :e AND 'US' = ANY(regions)"),
            {"s": start, "e": start + HOUR}).scalars()]


@pytest.mark.slow
def test_shard_tasks_killed_mid_upload_are_retried_and_the_index_never_names_a_missing_object(
        airflow: AirflowEnv, engine, tmp_path):
    now = datetime.now(UTC)
    w = truncate(now - 7 * HOUR, HOUR)
    windows = [w, w + HOUR]  # exported by the runs for [w+2h, w+3h) and [w+3h, w+4h)
    sig, public_key = add_signing_key(engine, airflow.key_dir, "us-v1", now)
    add_config(engine, "us", period=HOUR, sig_ids=(sig,), root=ROOT, max_records=PER_FILE, now=now)
    for start in windows:
        insert(engine, [exposure(start + timedelta(seconds=3 * i), dsos=i % 5) for i in range(KEYS_PER_WINDOW)])
    names = {start: [object_name(ROOT, start, start + HOUR, n) for n in (1, 2, 3)] for start in windows}
    killed = {names[windows[0]][0]: "partial", names[windows[1]][1]: "after"}

    journal = tmp_path / "faults"
    journal.mkdir()
    port = free_port()
    airflow.env.update({
        "PYTHONPATH": f"{FAULTS}:{REPO}",
        "ENP_TEST_FAULTS": json.dumps({"journal": str(journal), "kills": killed}),
        "ENP_TEST_RETRY_DELAY": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the backfill's runs
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",  # first calls on a busy 2-core machine (see the backfill test)
    })
    started = time.perf_counter()
    out = airflow.airflow("dags", "reserialize")  # the DAG as the scheduler sees it (with the policy applied)
    assert out.returncode == 0, out.stderr[-3000:]
    out = airflow.airflow("backfill", "create", "--dag-id", "en_export", "--from-date", (w + 2 * HOUR).isoformat(),
                          "--to-date", (w + 3 * HOUR).isoformat(), "--max-active-runs", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with running(airflow, "api-server", "--apps", "execution", "--host", "127.0.0.1", "--port", str(port)) as api:
        wait_http_ok(f"http://127.0.0.1:{port}/execution/health", api, timeout=120)
        with running(airflow, "dag-processor") as processor, running(airflow, "scheduler") as scheduler:
            deadline = time.monotonic() + RUN_TIMEOUT
            while True:
                runs = metadata_rows(airflow, "SELECT run_id, state FROM dag_run WHERE dag_id = 'en_export'"
                                              " ORDER BY logical_date")
                if len(runs) == 2 and all(r.state in ("success", "failed") for r in runs):
                    break
                for proc in (api, processor, scheduler):
                    assert proc.poll() is None, f"{proc.args} exited; see {airflow.home}"
                assert time.monotonic() < deadline, f"runs unfinished after {RUN_TIMEOUT}s: {runs}"
                time.sleep(1)
    TIMINGS["task faults: backfill create + 2 runs with 2 SIGKILLs"] = f"{time.perf_counter() - started:.1f}s"

    # -- Airflow: both runs succeeded; exactly the two killed shard tasks needed a second try ---------------------
    assert [r.state for r in runs] == ["success", "success"], f"see {airflow.home}"
    tis = metadata_rows(airflow, "SELECT ti.run_id, ti.task_id, ti.map_index, ti.state, ti.try_number, x.value"
                                 " FROM task_instance ti LEFT JOIN xcom x ON x.dag_id = ti.dag_id"
                                 " AND x.run_id = ti.run_id AND x.task_id = ti.task_id AND x.map_index = ti.map_index"
                                 " AND x.key = 'return_value' WHERE ti.dag_id = 'en_export'")
    shards = [t for t in tis if t.task_id == "export_shard"]
    assert len(shards) == 6 and {t.state for t in tis} == {"success"}
    by_name = {(v if isinstance(v := t.value, dict) else json.loads(v))["filename"]: t for t in shards}
    assert {n: t.try_number for n, t in by_name.items()} == {n: 2 if n in killed else 1
                                                             for ns in names.values() for n in ns}
    assert all(t.try_number == 1 for t in tis if t.task_id != "export_shard")
    history = metadata_rows(airflow, "SELECT task_id, map_index, try_number, state FROM task_instance_history"
                                     " WHERE dag_id = 'en_export'")
    assert sorted((h.task_id, h.try_number, h.state) for h in history) == [("export_shard", 1, "failed")] * 2
    logs = airflow.home / "logs" / "dag_id=en_export"
    for name in killed:  # the first attempt's log says how it ended
        t = by_name[name]
        first = logs / f"run_id={t.run_id}" / "task_id=export_shard" / f"map_index={t.map_index}" / "attempt=1.log"
        assert '"signal_name":"SIGKILL"' in first.read_text(), first

    # -- the kills happened where they were meant to --------------------------------------------------------------
    events = read_journal(journal)
    kills = {e["name"]: e for e in events if e["op"] == "kill"}
    assert {n: e["mode"] for n, e in kills.items()} == killed
    partial, after = (kills[n] for n in killed)
    assert 0 < partial["written"] == partial["bytes"] // 2 and after["written"] == after["bytes"]
    assert len({e["pid"] for e in kills.values()}) == 2
    base = airflow.blob_dir / "exports" / ROOT
    # The killed temporary file is still there, half written, and never under a real name.
    leftovers = sorted(p for p in base.iterdir() if p.name.startswith(TEMP_PREFIX))
    assert [p.stat().st_size for p in leftovers] == [partial["written"]]
    # Both retries wrote the very bytes the killed attempts were writing (deterministic files).
    for name, kill in kills.items():
        assert sha256((airflow.blob_dir / "exports" / name).read_bytes()).hexdigest() == kill["sha256"]

    # -- the index never named a missing or half-written object ---------------------------------------------------
    assert read_journal(journal, VIOLATIONS) == [], f"see {journal / VIOLATIONS}"
    index_writes = [e for e in events if e["op"] == "index"]
    # One write per run's finalize. The first names 3 files, or 6 when the other run's batch was marked complete
    # before it (the two runs finalize concurrently); the last always names all 6.
    assert len(index_writes) == 2 and {e["names"] for e in index_writes} <= {3, 6}
    assert max(e["names"] for e in index_writes) == 6
    deletes = [e for e in events if e["op"] == "delete"]
    all_names = sorted(n for ns in names.values() for n in ns)
    assert airflow.zips(ROOT) == all_names
    assert airflow.index(ROOT) == "\n".join(all_names)

    # -- every file verifies; each window's files hold exactly its keys in the database, once ----------------------
    for start in windows:
        keys: list[bytes] = []
        for name in names[start]:
            parsed = airflow.read(name)
            assert len(fmt.verify_export(parsed, [public_key], strict=True)) == 1, name
            keys += [k.key_data for k in parsed.keys]
        expected = window_keys(engine, start)
        assert len(expected) == KEYS_PER_WINDOW
        assert len(keys) == len(set(keys)) and sorted(keys) == sorted(expected)
    assert [(r["status"], r["key_count"], r["file_count"]) for r in batches(engine)] == [
        ("COMPLETE", KEYS_PER_WINDOW, 3)] * 2
    TIMINGS["task faults: injected"] = (f"{len(kills)} SIGKILLs, {len(index_writes)} index writes and "
                                        f"{len(deletes)} deletes checked, {2 * KEYS_PER_WINDOW} keys compared")
