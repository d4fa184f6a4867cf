"""Runs an enpipeline DAG with ``dag.test()`` in a process of its own; one JSON command per stdin line.

Started by tests/dags (``python -m tests.dags.airflow_driver``) with AIRFLOW_HOME, the metadata database and the
enp_* connections in its environment, so Airflow's import-time configuration never touches the pytest process.
Each command ``{"logical_date": ISO or null, "retries": N, "retry_delay": seconds, "dag_id": ID}`` (all but the
first optional; the DAG defaults to en_export) runs one DAG run; the driver prints ``@@BEGIN`` before it
(everything printed in between is that run's log) and ``@@RESULT {json}`` after it: the run's state and data
interval, every task instance's state and try number, and the tasks' return values.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.dag_processing.dagbag import DagBag
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select

DAGS = Path(__file__).resolve().parents[2] / "dags"


def describe(dr) -> dict:
    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dr.dag_id,
                                                          TaskInstance.run_id == dr.run_id)).all()
        xcoms = session.scalars(XComModel.get_many(run_id=dr.run_id, dag_ids=dr.dag_id, key="return_value")).all()
        returns: dict[str, dict[str, object]] = {}
        for x in xcoms:
            returns.setdefault(x.task_id, {})[str(x.map_index)] = XComModel.deserialize_value(x)
        return {
            "run_id": dr.run_id,
            "state": str(dr.state),
            "data_interval": [dr.data_interval_start.isoformat() if dr.data_interval_start else None,
                              dr.data_interval_end.isoformat() if dr.data_interval_end else None],
            "tasks": sorted(({"task_id": ti.task_id, "map_index": ti.map_index, "state": str(ti.state),
                              "try_number": ti.try_number} for ti in tis),
                            key=lambda t: (t["task_id"], t["map_index"])),
            "returns": returns,
        }


def load(dag_id: str):
    bag = DagBag(dag_folder=str(DAGS / f"{dag_id}.py"), safe_mode=False)
    if bag.import_errors:
        raise SystemExit(f"import errors: {bag.import_errors}")
    return bag.dags[dag_id]


def main() -> None:
    dags: dict[str, object] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        dag_id = cmd.get("dag_id") or "en_export"
        if dag_id not in dags:
            dags[dag_id] = load(dag_id)
        dag = dags[dag_id]
        for t in dag.tasks:  # a test that provokes failures need not wait out the DAG's retry delays
            if cmd.get("retries") is not None:
                t.retries = int(cmd["retries"])
            if cmd.get("retry_delay") is not None:
                t.retry_delay = timedelta(seconds=float(cmd["retry_delay"]))
                t.retry_exponential_backoff = 0
        logical_date = pendulum.parse(cmd["logical_date"]) if cmd.get("logical_date") else None
        print("@@BEGIN", flush=True)
        dr = dag.test(logical_date=logical_date)
        sys.stderr.flush()
        print("@@RESULT " + json.dumps(describe(dr)), flush=True)


if __name__ == "__main__":
    main()
