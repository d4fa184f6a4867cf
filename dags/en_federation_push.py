"""
### en_federation_push: our keys to the EU Federation Gateway Service (EFGS)

Runs once per data interval (hourly by default, `ENP_EFGS_PUSH_SCHEDULE`). For the interval **[S, E)** it pushes
the keys published here whose `created_at` lies in **[S - d, E - d)** (`d` = `ENP_EFGS_PUSH_DELAY`, default 1 h,
at least `ENP_TRUNCATE_WINDOW`: by then no key can still arrive for that window), plus any gap since the
target's last pushed window (the DAG does not catch up; the gap reaches back at most 15 days).

1. **list_targets** → **push** (mapped, one task per EFGS target): plan the window once into batches of at most
   `ENP_EFGS_UPLOAD_BATCH_SIZE` (5000) keys with deterministic batch tags, drop keys EFGS would refuse, sign
   each batch (detached CMS over EFGS's canonical stream) and upload it over mutual TLS. 201 and 409 (the tag
   exists: an earlier attempt landed) are success; 207 resends what the gateway does not have yet; 413 halves
   the batch; 400 is REJECTED. A target with batches left un-uploaded fails only its own task.

Only keys with local provenance and no source are read: keys from EFGS or any partner never go back out.
Retries and re-runs converge: the plan is stored, uploaded batches are skipped. The same path from the shell:
`enpipeline efgs push --target T --start ISO --end ISO`; what was sent: `enpipeline efgs batches --target T`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, get_current_context, task

SCHEDULE = os.environ.get("ENP_EFGS_PUSH_SCHEDULE", "0 * * * *")


def _interval() -> tuple:
    context = get_current_context()
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is None or end is None:
        raise ValueError("en_federation_push needs a data interval: trigger it with a logical date, or use "
                         "`enpipeline efgs push --start --end`")
    return start, end


@dag(
    dag_id="en_federation_push",
    schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two runs would contend for a target's push lock
    doc_md=__doc__,
    tags=["enpipeline", "federation"],
    default_args={
        "owner": "enpipeline",
        "retries": 3,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=20),
        "execution_timeout": timedelta(minutes=30),
    },
)
def en_federation_push():
    @task
    def list_targets() -> list[str]:
        from enpipeline.db import efgs
        from plugins.enp_hooks import enp_engine

        with enp_engine() as engine, engine.connect() as conn:
            ids = efgs.list_target_ids(conn)
        print(f"{len(ids)} EFGS target(s) to push to" + (f": {', '.join(ids)}" if ids else ""))
        return ids

    @task(max_active_tis_per_dagrun=4)
    def push(target_id: str) -> dict:
        from enpipeline.config import load_settings
        from enpipeline.efgs.push import push_interval
        from plugins.enp_hooks import enp_engine

        start, end = _interval()
        with enp_engine() as engine:
            report = push_interval(load_settings(require_database=False), engine, target_id, start, end,
                                   pendulum.now("UTC"))
        print(report.summary())
        return report.as_dict()

    push.expand(target_id=list_targets())


en_federation_push()
