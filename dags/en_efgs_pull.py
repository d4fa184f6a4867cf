"""
### en_efgs_pull: other countries' keys from the EU Federation Gateway Service (EFGS)

Every 30 minutes by default (`ENP_EFGS_PULL_SCHEDULE`, a cron string); the gateway batches uploads every 5.

1. **list_targets** → **pull** (mapped, one task per EFGS target): for each day the gateway still serves
   (today and the two days before: a missed run is caught up by the next), follow the day's
   `batchTag` → `nextBatchTag` chain from the saved cursor. Each batch's keys are checked per country against
   the uploader's signature from the audit endpoint (a country whose share does not verify is refused, the
   others kept), our own country's keys are dropped, the days-since-onset ranges decoded, and the keys stored
   (validated like a publish, `local_provenance=false`, source `efgs:<target>`) in one transaction with the
   cursor, so a crash resumes at the first batch not stored.

A separate DAG rather than a task of `en_federation_pull`: EFGS pulls are per day and per target, on their own
schedule and retry policy. The same path from the shell: `enpipeline efgs pull --target T [--date YYYY-MM-DD]`;
history: `enpipeline efgs downloads --target T`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

SCHEDULE = os.environ.get("ENP_EFGS_PULL_SCHEDULE", "*/30 * * * *")


@dag(
    dag_id="en_efgs_pull",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["enpipeline", "federation"],
    default_args={
        "owner": "enpipeline",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(minutes=20),
    },
)
def en_efgs_pull():
    @task
    def list_targets() -> list[str]:
        from enpipeline.db import efgs
        from plugins.enp_hooks import enp_engine

        with enp_engine() as engine, engine.connect() as conn:
            ids = efgs.list_target_ids(conn)
        print(f"{len(ids)} EFGS target(s) to pull from" + (f": {', '.join(ids)}" if ids else ""))
        return ids

    @task(max_active_tis_per_dagrun=4)
    def pull(target_id: str) -> list[dict]:
        from enpipeline.config import load_settings
        from enpipeline.efgs.pull import pull_recent
        from plugins.enp_hooks import enp_engine

        with enp_engine() as engine:
            reports = pull_recent(load_settings(require_database=False), engine, target_id, pendulum.now("UTC"))
        for report in reports:
            print(report.summary())
        return [r.as_dict() for r in reports]

    pull.expand(target_id=list_targets())


en_efgs_pull()
