"""en_export under Airflow's CeleryExecutor: one run's shards are signed on two different Celery workers.

A real api-server (REST and Execution API), dag-processor and scheduler (CeleryExecutor) and two ``airflow
celery worker`` processes with one slot each share this machine's Redis as the broker (``ENP_TEST_REDIS_URL``,
default ``redis://127.0.0.1:6379/7``; skipped without Redis) and the Airflow metadata database as Celery's result
backend. One run, triggered through the REST API for a past logical date, plans four files; ``export_shard``
runs at most two at a time per run, and a worker with one slot and a prefetch of one holds one task at a time,
so the shards spread over both workers.

Which worker ran a shard is read back two independent ways:

* ``task_instance.hostname``, which the task process reports to the Execution API when it starts. Both workers
  run on one machine here, so each gets ``[core] hostname_callable`` = ``tests.dags.worker_hostname.hostname``
  and its own ``ENP_TEST_WORKER_HOSTNAME`` (equal to its Celery node name); across machines the default FQDN
  would already differ.
* Celery's own record: ``task_instance.external_executor_id`` is the Celery task id the executor sent, and the
  result backend (``celery_taskmeta`` with ``result_extended``) stores the node name of the worker that ran it.

Isolation on a shared Redis: every key (queues, bindings, unacked messages, the control mailbox) carries a
per-test ``global_keyprefix``, the queue name is unique per test as well, and the test deletes its keys after.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from enpipeline.export import format as fmt
from enpipeline.timeutil import truncate
from tests.dags.airflow_env import (
    AIRFLOW,
    REPO,
    AirflowEnv,
    add_config,
    add_signing_key,
    batches,
    exposure,
    free_port,
    insert,
    running,
    stop,
    wait_http_ok,
)
from tests.dags.conftest import TIMINGS

HOUR = timedelta(hours=1)
FAULTS = REPO / "tests" / "dags" / "faults"  # its sitecustomize slows uploads down (ENP_TEST_EXPORT_UPLOAD_DELAY)
REDIS_URL = os.environ.get("ENP_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")
PER_FILE = 10
KEYS = 35  # four files: 10 + 10 + 10 + 5
WORKERS = ("a", "b")
START_TIMEOUT = 120  # components up and both workers answering a ping
RUN_TIMEOUT = 150  # the triggered run, from trigger to success


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the test Redis; every key under it is deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.skip(f"no Redis at {REDIS_URL} ({exc}); set ENP_TEST_REDIS_URL")
    prefix = f"enp-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        left = list(client.scan_iter(match=prefix + "*", count=1000))
        if left:
            client.delete(*left)
        client.close()


@contextmanager
def celery_worker(env: AirflowEnv, letter: str, queue: str, node: str) -> Iterator[subprocess.Popen[bytes]]:
    """``airflow celery worker`` with one slot on ``queue``, named ``node``, logging to worker-<letter>.log."""
    log = (env.home / f"worker-{letter}.log").open("ab")
    proc = subprocess.Popen(
        [AIRFLOW, "celery", "worker", "--queues", queue, "--concurrency", "1", "--celery-hostname", node,
         "--pid", str(env.home / f"worker-{letter}.pid"), "--skip-serve-logs"],
        cwd=env.home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**env.env, "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.dags.worker_hostname.hostname",
             "ENP_TEST_WORKER_HOSTNAME": node,
             # Each shard upload takes 2 s (tests/dags/faults/sitecustomize.py): a worker that finished a 0.6 s
             # shard could otherwise take every shard in turn before the other one is handed any (seen in CI).
             "PYTHONPATH": os.pathsep.join(p for p in (str(FAULTS), str(REPO), env.env.get("PYTHONPATH")) if p),
             "ENP_TEST_EXPORT_UPLOAD_DELAY": "2"})
    try:
        yield proc
    finally:
        stop(proc)
        log.close()


def ping(prefix: str, nodes: list[str]) -> set[str]:
    """The nodes among ``nodes`` that answer a Celery control ping on this test's broker prefix."""
    from celery import Celery

    app = Celery("enp-test-ping", broker=REDIS_URL, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    try:
        return {name for reply in app.control.ping(destination=nodes, timeout=1.0) for name in reply}
    finally:
        app.close()


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"POST {url}: {exc.code} {exc.read()[:2000]!r}") from None


def terminate(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM to a component's process group without waiting (``stop`` waits and cleans up after)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def dag_serialized(env: AirflowEnv) -> bool:
    engine = env.metadata()
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM serialized_dag WHERE dag_id = 'en_export'")
                                ).scalar_one() > 0
    finally:
        engine.dispose()


def has_table(env: AirflowEnv, name: str) -> bool:
    engine = env.metadata()
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": name}).scalar_one()
    finally:
        engine.dispose()


def run_state(env: AirflowEnv, run_id: str) -> tuple[Any, list[tuple]]:
    engine = env.metadata()
    try:
        with engine.connect() as conn:
            run = conn.execute(sa.text(
                "SELECT state, data_interval_start, data_interval_end FROM dag_run"
                " WHERE dag_id = 'en_export' AND run_id = :r"), {"r": run_id}).one_or_none()
            tis = conn.execute(sa.text(
                "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = 'en_export' AND run_id = :r"
                " ORDER BY task_id, map_index"), {"r": run_id}).all()
        return run, [tuple(t) for t in tis]
    finally:
        engine.dispose()


def task_instances(env: AirflowEnv, run_id: str) -> list[dict[str, Any]]:
    """The run's task instances with the Celery worker that the result backend says ran each one."""
    engine = env.metadata()
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT ti.task_id, ti.map_index, ti.state, ti.try_number, ti.queue, ti.hostname,"
                " ti.external_executor_id, ti.start_date, ti.end_date, m.worker AS celery_worker,"
                " m.status AS celery_status"
                " FROM task_instance ti LEFT JOIN celery_taskmeta m ON m.task_id = ti.external_executor_id"
                " WHERE ti.dag_id = 'en_export' AND ti.run_id = :r ORDER BY ti.task_id, ti.map_index"),
                {"r": run_id}).mappings().all()
        return [dict(r) for r in rows]
    finally:
        engine.dispose()


def wait_for(what: str, check, procs: dict[str, subprocess.Popen[Any]], env: AirflowEnv, timeout: float,
             interval: float = 1.0) -> float:
    """Poll ``check()`` until it is true; fail naming the log files if a component exits or time runs out."""
    started = time.monotonic()
    while not check():
        for name, proc in procs.items():
            assert proc.poll() is None, (f"{name} exited with {proc.returncode} while waiting for {what}; "
                                         f"see {env.home}/{name}.log")
        assert time.monotonic() - started < timeout, (
            f"{what}: not within {timeout}s; logs: {', '.join(f'{env.home}/{n}.log' for n in procs)}")
        time.sleep(interval)
    return time.monotonic() - started


@pytest.mark.slow
def test_celery_workers_sign_the_shards_of_one_run_on_different_workers(redis_prefix: str, airflow: AirflowEnv,
                                                                        engine):
    now = datetime.now(UTC)
    w = truncate(now - 5 * HOUR, HOUR)  # the run for the interval [w+2h, w+3h) exports the window [w, w+1h)
    sig, public_key = add_signing_key(engine, airflow.key_dir, "us-v1", now)
    add_config(engine, "us", period=HOUR, sig_ids=(sig,), max_records=PER_FILE, now=now)
    keys = insert(engine, [exposure(w + timedelta(seconds=97 * i), dsos=i % 3) for i in range(KEYS)])

    token = redis_prefix.removeprefix("enp-test-").rstrip(":")
    queue = f"enp-export-{token}"
    host = socket.gethostname()
    nodes = {letter: f"worker-{letter}.{token}@{host}" for letter in WORKERS}
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    airflow.env.update({
        "ENP_EXPORT_MIN_RECORDS": "0",  # no random padding keys: every key in the files is one we inserted
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # the REST trigger below needs no login
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the triggered run
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
        "AIRFLOW__CELERY__BROKER_URL": REDIS_URL,
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": redis_prefix,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
        "AIRFLOW__CELERY__EXTRA_CELERY_CONFIG": '{"result_extended": true}',  # the worker's name per result
        "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
        # The scheduler's first publish (connection set-up) on a busy 2-core machine can take over the default
        # 1 s, which costs a publish retry and, three times over, a failed attempt.
        "AIRFLOW__CELERY__OPERATION_TIMEOUT": "30",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        # First Execution API calls on a busy 2-core machine can take seconds (see the backfill test).
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
    })
    run_id = f"celery__{token}"
    started = time.perf_counter()
    with ExitStack() as stack:
        procs: dict[str, subprocess.Popen[Any]] = {}
        try:
            procs["api-server"] = stack.enter_context(
                running(airflow, "api-server", "--apps", "core,execution", "--host", "127.0.0.1", "--port", str(port)))
            procs["dag-processor"] = stack.enter_context(running(airflow, "dag-processor"))
            procs["scheduler"] = stack.enter_context(running(airflow, "scheduler"))
            procs["worker-a"] = stack.enter_context(celery_worker(airflow, "a", queue, nodes["a"]))
            # Worker b starts once a has created Celery's result tables: two workers creating them at the same
            # moment can race on Postgres' catalog.
            wait_for("worker a creating celery_taskmeta", lambda: has_table(airflow, "celery_taskmeta"), procs,
                     airflow, START_TIMEOUT)
            procs["worker-b"] = stack.enter_context(celery_worker(airflow, "b", queue, nodes["b"]))
            wait_for("the dag-processor serializing en_export", lambda: dag_serialized(airflow), procs, airflow,
                     START_TIMEOUT)
            wait_http_ok(f"{api}/execution/health", procs["api-server"], timeout=START_TIMEOUT)
            wait_http_ok(f"{api}/api/v2/monitor/health", procs["api-server"], timeout=START_TIMEOUT)
            # Trigger only when both workers consume: a worker still starting could leave every shard to the other.
            wait_for("both Celery workers answering a ping", lambda: ping(redis_prefix, list(nodes.values()))
                     == set(nodes.values()), procs, airflow, START_TIMEOUT, interval=0.5)
            TIMINGS["celery: components up"] = f"{time.perf_counter() - started:.1f}s"

            # The REST API (as the UI does) derives the data interval from the logical date; `airflow dags
            # trigger --logical-date` in Airflow 3.3 derives it from the current time instead.
            triggered = time.perf_counter()
            created = post_json(f"{api}/api/v2/dags/en_export/dagRuns",
                                {"dag_run_id": run_id, "logical_date": (w + 3 * HOUR).isoformat()})
            assert (datetime.fromisoformat(created["data_interval_start"]),
                    datetime.fromisoformat(created["data_interval_end"])) == (w + 2 * HOUR, w + 3 * HOUR), created

            def finished() -> bool:
                run, _ = run_state(airflow, run_id)
                if run is None or run.state not in ("success", "failed"):
                    return False
                # A task reports its state through the Execution API before its Celery task returns: wait for
                # the workers to record every result before they are stopped.
                return run.state == "failed" or all(t["celery_status"] in ("SUCCESS", "FAILURE")
                                                    for t in task_instances(airflow, run_id))

            try:
                wait_for(f"run {run_id} finishing", finished, procs, airflow, RUN_TIMEOUT, interval=2)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; task instances: {run_state(airflow, run_id)[1]}") from None
            TIMINGS["celery: run (trigger to success)"] = f"{time.perf_counter() - triggered:.1f}s"
        finally:
            for proc in procs.values():  # stop them all at once; each context then waits for its own
                terminate(proc)
    TIMINGS["celery: total incl. shutdown"] = f"{time.perf_counter() - started:.1f}s"

    run, _ = run_state(airflow, run_id)
    tis = task_instances(airflow, run_id)
    assert run.state == "success", f"{tis}; see the logs in {airflow.home}"
    assert (run.data_interval_start, run.data_interval_end) == (w + 2 * HOUR, w + 3 * HOUR)

    # -- where each shard ran ---------------------------------------------------------------------------------
    shards = [t for t in tis if t["task_id"] == "export_shard"]
    print("\nexport_shard task instances (map_index, try, TI hostname, Celery worker, Celery task id):")
    for t in shards:
        print(f"  {t['map_index']}  try {t['try_number']}  {t['hostname']:<40} {t['celery_worker']:<40} "
              f"{t['external_executor_id']}  {t['start_date']:%H:%M:%S.%f} .. {t['end_date']:%H:%M:%S.%f}")
    assert sorted((t["task_id"], t["state"]) for t in tis) == sorted(
        [("plan", "success"), ("finalize", "success")] + [("export_shard", "success")] * 4)
    assert [t["map_index"] for t in shards] == [0, 1, 2, 3]
    assert {t["queue"] for t in tis} == {queue}
    for t in tis:
        # The Celery task the scheduler sent for this TI succeeded on the worker that the TI says ran it.
        assert t["external_executor_id"] and t["celery_status"] == "SUCCESS", t
        assert t["hostname"] == t["celery_worker"] and t["hostname"] in nodes.values(), t
    assert {t["hostname"] for t in shards} == set(nodes.values()), (
        f"all shards ran on one worker: {[(t['map_index'], t['hostname']) for t in shards]}")
    TIMINGS["celery: shards per worker"] = ", ".join(
        f"{n.split('.')[0]} {sum(t['hostname'] == n for t in shards)}" for n in nodes.values())

    # -- what they wrote --------------------------------------------------------------------------------------
    root = "exposureKeyExport-us"
    start, end = int(w.timestamp()), int((w + HOUR).timestamp())
    names = airflow.zips(root)
    assert names == [f"{root}/{start}-{end}-{n:05d}.zip" for n in range(1, 5)]
    parsed = [airflow.read(n) for n in names]
    for name, p in zip(names, parsed, strict=True):
        assert len(fmt.verify_export(p, [public_key], strict=True)) == 1, name
    assert [len(p.keys) for p in parsed] == [10, 10, 10, 5]
    exported = [k.key_data for p in parsed for k in p.keys]
    assert len(exported) == len(set(exported)) and sorted(exported) == sorted(e.exposure_key for e in keys)
    assert airflow.index(root) == "\n".join(names)
    assert [(r["status"], r["key_count"], r["padding_key_count"], r["file_count"]) for r in batches(engine)] == [
        ("COMPLETE", KEYS, 0, 4)]
