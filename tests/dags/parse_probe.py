"""Parses dags/ the way Airflow's DAG processor does, in a fresh process, and prints one JSON report.

Run by tests/dags/test_dag_integrity.py as ``python -m tests.dags.parse_probe DAGS_FOLDER`` with AIRFLOW_HOME
in a temporary directory. Airflow (and the DagBag machinery) is imported first, as it is in the DAG processor
before it parses a file; what the DAG files add on top of that, and any socket they open, is recorded.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

# The DAG processor has all of this loaded before it parses any DAG file.
import airflow.sdk  # noqa: F401
import pendulum
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.serialized_objects import DagSerialization

CONNECTS: list[str] = []
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _no_connect(self, address):
    CONNECTS.append(repr(address))
    raise ConnectionRefusedError(f"parse_probe: no connection at parse time ({address!r})")


def _no_connect_ex(self, address):
    CONNECTS.append(repr(address))
    return 111


def parse(folder: str) -> tuple[DagBag, float]:
    started = time.perf_counter()
    bag = DagBag(dag_folder=folder, safe_mode=False, collect_dags=False)
    bag.collect_dags(dag_folder=folder, only_if_updated=False, safe_mode=False)
    return bag, time.perf_counter() - started


def timetable_facts(dag) -> dict:
    """What the scheduler and `airflow backfill create` see: the serialized DAG's timetable."""
    sdag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    t0 = pendulum.datetime(2026, 3, 10, tz="UTC")
    infos = list(sdag.iter_dagrun_infos_between(t0, t0 + timedelta(hours=5, minutes=59)))
    manual = sdag.timetable.infer_manual_data_interval(run_after=t0 + timedelta(hours=10, minutes=17, seconds=5))
    return {
        "class": type(sdag.timetable).__name__,
        "periodic": bool(sdag.timetable.periodic),
        "summary": sdag.timetable.summary,
        "runs": [[i.logical_date.isoformat(), i.data_interval.start.isoformat(), i.data_interval.end.isoformat(),
                  i.run_after.isoformat()] for i in infos],
        "manual_at_10_17_05": [manual.start.isoformat(), manual.end.isoformat()],
    }


def main() -> None:
    folder = sys.argv[1]
    before = set(sys.modules)
    socket.socket.connect = _no_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _no_connect_ex  # type: ignore[method-assign]
    try:
        bag, seconds = parse(folder)
    finally:
        socket.socket.connect = _real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]
    new_modules = sorted(set(sys.modules) - before)
    report = {
        "files": sorted(p.name for p in Path(folder).glob("*.py")),
        "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
        "parse_seconds": seconds,
        "file_seconds": {s.file: s.duration.total_seconds() for s in bag.dagbag_stats},
        "file_dags": {s.file: s.dags for s in bag.dagbag_stats},
        "new_modules": new_modules,
        "all_modules": sorted(sys.modules),
        "connects": CONNECTS,
        "dags": {},
    }
    for dag_id, dag in bag.dags.items():
        report["dags"][dag_id] = {
            "fileloc": dag.fileloc,
            "tags": sorted(dag.tags),
            "owner": dag.owner,
            "doc_md": dag.doc_md or "",
            "catchup": dag.catchup,
            "max_active_runs": dag.max_active_runs,
            "tasks": {t.task_id: {"retries": t.retries, "retry_delay": t.retry_delay.total_seconds(),
                                  "retry_exponential_backoff": bool(t.retry_exponential_backoff),
                                  "trigger_rule": str(t.trigger_rule), "owner": t.owner,
                                  "class": type(t).__name__,
                                  "upstream": sorted(t.upstream_task_ids)} for t in dag.tasks},
            "timetable": timetable_facts(dag),
        }
    # The schedule comes from ENP_EXPORT_SCHEDULE at parse time: parse again with another one.
    os.environ["ENP_EXPORT_SCHEDULE"] = "*/15 * * * *"
    quarter = DagBag(dag_folder=str(Path(folder) / "en_export.py"), safe_mode=False)
    report["en_export_every_15_minutes"] = timetable_facts(quarter.dags["en_export"])
    print("@@REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
