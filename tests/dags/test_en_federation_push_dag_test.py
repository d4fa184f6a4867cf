"""en_federation_push through ``dag.test()`` against real Postgres and the EFGS gateway double: one mapped push per
target; the run for [S, E) uploads the keys created in [S - 1h, E - 1h), signed and verified by the gateway (with
openssl). A target whose gateway is down fails only its own task, its batch recorded FAILED for the retry. (Re-runs
converging is tested without Airflow in tests/integration/test_efgs.py.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from tests.dags.airflow_env import AirflowEnv
from tests.integration.test_efgs import insert, local_key
from tests.support_efgs import FakeEfgs, add_target

HOUR = timedelta(hours=1)


def test_dag_test_pushes_each_target_in_its_own_mapped_task(airflow: AirflowEnv, engine):
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    gateway, down = FakeEfgs.start(), FakeEfgs.start()
    try:
        add_target(engine, airflow.key_dir, gateway, gateway.country("DE"), "a-eu")
        add_target(engine, airflow.key_dir, down, down.country("DE"), "b-down")
        down.stop()
        keys = insert(engine, [local_key(hour - 2 * HOUR) for _ in range(3)])
        insert(engine, [local_key(hour - HOUR)])   # the next window: not this run's

        with airflow.driver() as driver:
            run = driver.run(hour, dag_id="en_federation_push", retries=0)
            assert run.state == "failed", run.log[-5000:]
            assert run.data_interval == [(hour - HOUR).isoformat(), hour.isoformat()]
            pushes = sorted((t["map_index"], t["state"]) for t in run.tasks if t["task_id"] == "push")
            assert pushes == [(0, "success"), (1, "failed")], run.log[-5000:]
            assert run.returns["list_targets"]["-1"] == ["a-eu", "b-down"]
            (window,) = run.returns["push"]["0"]["windows"]
            assert (window["start"], window["end"]) == ((hour - 2 * HOUR).isoformat(), (hour - HOUR).isoformat())
            assert (window["keys"], window["uploaded"], window["keys_stored"]) == (3, 1, 3)
            assert "EFGS target 'b-down'" in run.log and "ConnectionRefusedError" in run.log

            (upload,) = gateway.uploads
            assert sorted(k.keyData for k in upload.keys) == sorted(k.exposure_key for k in keys)
            with engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT target_id, status, key_count FROM efgs_upload_batch"
                                            " ORDER BY target_id")).all()
            assert [tuple(r) for r in rows] == [("a-eu", "UPLOADED", 3), ("b-down", "FAILED", 3)]
    finally:
        gateway.stop()
