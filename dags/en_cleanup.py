"""
### en_cleanup: retention of keys and export files, revision-key rotation

Runs once per data interval (daily by default, `ENP_CLEANUP_SCHEDULE`). The cutoff is the **end of the run's
interval minus `ENP_RETENTION`** (default 14 days, at least 10 unless `ENP_DEBUG_OVERRIDE_CLEANUP_MIN_DURATION`),
so re-runs, retries and backfills of one interval converge on the same result.

Tasks:

1. **ensure_partitions**: today's key partition and `ENP_PARTITION_DAYS_AHEAD` days ahead exist.
2. **expire_keys**: whole UTC-day partitions that end at or before the cutoff are detached (concurrently: publishes
   keep flowing) and dropped; only the rows of the day containing the cutoff are deleted one by one.
3. **mark_expired_exports**: batches starting before the cutoff and their files become `DEL_PEND`.
4. **rebuild_indexes**: each affected config's `index.txt` is rewritten without them.
5. **sweep_exports**: their blobs (a missing one is fine) and rows are deleted, after checking that the
   index no longer names them; batches end `DELETED`.
6. **expire_federation_state**: key bytes that federation keeps as bookkeeping (EFGS upload batch boundaries)
   past the cutoff are cleared.
7. **rotate_revision_keys**: a new revision-token key every `ENP_REVISION_NEW_KEY_PERIOD`, old ones destroyed
   `ENP_REVISION_DELETE_OLD_KEY_PERIOD` after their successor appeared.

Each task logs its counts. The same path runs from the shell: `enpipeline cleanup run [--dry-run]`.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, get_current_context, task

SCHEDULE = os.environ.get("ENP_CLEANUP_SCHEDULE", "0 0 * * *")


def _interval_end():
    end = get_current_context().get("data_interval_end")
    if end is None:
        raise ValueError("en_cleanup needs a data interval: its cutoff is the interval's end minus ENP_RETENTION")
    return end


@dag(
    dag_id="en_cleanup",
    schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["enpipeline", "retention"],
    default_args={
        "owner": "enpipeline",
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=15),
        "execution_timeout": timedelta(minutes=30),
    },
)
def en_cleanup():
    @task
    def ensure_partitions() -> dict:
        from enpipeline.retention import report_dict
        from plugins.enp_hooks import retention_cleaner

        with retention_cleaner() as cleaner:
            return report_dict(cleaner.ensure_partitions(pendulum.now("UTC")))

    @task
    def expire_keys() -> dict:
        from enpipeline.retention import report_dict
        from plugins.enp_hooks import retention_cleaner

        with retention_cleaner() as cleaner:
            return report_dict(cleaner.expire_exposures(cleaner.cutoff(_interval_end())))

    @task
    def mark_expired_exports() -> dict:
        from enpipeline.retention import report_dict
        from plugins.enp_hooks import retention_cleaner

        with retention_cleaner() as cleaner:
            return report_dict(cleaner.mark_expired_exports(cleaner.cutoff(_interval_end())))

    @task
    def rebuild_indexes() -> dict:
        from enpipeline.retention import report_dict
        from plugins.enp_hooks import retention_cleaner

        with retention_cleaner() as cleaner:
            report = report_dict(cleaner.rebuild_indexes(pendulum.now("UTC")))
        # XCom keys must be strings.
        return {"configs": {str(k): v for k, v in report["configs"].items()}}

    @task
    def sweep_exports() -> dict:
        from enpipeline.retention import report_dict
        from plugins.enp_hooks import retention_cleaner

        with retention_cleaner() as cleaner:
            return report_dict(cleaner.sweep_exports(pendulum.now("UTC")))

    @task
    def expire_federation_state() -> dict:
        from enpipeline.retention import report_dict
        from plugins.enp_hooks import retention_cleaner

        with retention_cleaner() as cleaner:
            return report_dict(cleaner.expire_federation_state(cleaner.cutoff(_interval_end())))

    @task
    def rotate_revision_keys() -> dict:
        from enpipeline.retention import report_dict
        from plugins.enp_hooks import retention_cleaner

        with retention_cleaner() as cleaner:
            return report_dict(cleaner.rotate_revision_keys(pendulum.now("UTC")))

    ensure_partitions() >> expire_keys()
    mark_expired_exports() >> rebuild_indexes() >> sweep_exports()
    expire_federation_state()
    rotate_revision_keys()


en_cleanup()
