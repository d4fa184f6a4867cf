"""
### en_export: signed, padded, sharded export files

For the data interval **[S, E)** of a run, every enabled export config exports each of its period-aligned
windows whose end falls in **(S - age, E - age]** (`age` = `ENP_EXPORT_MIN_WINDOW_AGE`, default 2 h). Intervals
tile time, so each window is exported by exactly one run: on time, retried, or backfilled with
`airflow backfill create --dag-id en_export --from-date ... --to-date ...`; and no open window is touched.

Tasks:

1. **plan**: per config and window, create the batch (a snapshot of the config), add persisted padding keys if
   the window has fewer than `ENP_EXPORT_MIN_RECORDS`, and store the shard plan (at most
   `ENP_EXPORT_MAX_RECORDS` keys per file). Passes only `(batch_id, shard_num)` on.
2. **export_shard** (mapped, one task per file): read the shard's keys, encode `export.bin`, sign it with every
   active signing key, zip, upload `<root>/<start>-<end>-<NNNNN>.zip`, record the file.
3. **finalize**: mark batches complete with their statistics and rebuild each config's `index.txt` from the
   database.

Every step converges on the same files when re-run. Database: Airflow connection `enp_postgres` (else
`ENP_DATABASE_URL`); blobs: connection `enp_blobstore` (else `ENP_BLOBSTORE`).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, get_current_context, task

SCHEDULE = os.environ.get("ENP_EXPORT_SCHEDULE", "0 * * * *")
# Not print(): stdout reaches the task log late, after lines logged since (the UI folds it into "Post Execute").
log = logging.getLogger("dags.en_export")


def _interval() -> tuple:
    """The run's data interval; a run without one (a manual trigger with no logical date) has no windows."""
    context = get_current_context()
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is None or end is None:
        raise ValueError("en_export needs a data interval: trigger it with a logical date (the run exports the "
                         "interval that ends at or before it), or use `airflow dags test` / `airflow backfill`")
    return start, end


@dag(
    dag_id="en_export",
    schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    doc_md=__doc__,
    tags=["enpipeline", "export"],
    default_args={
        "owner": "enpipeline",
        "retries": 3,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(minutes=20),
    },
)
def en_export():
    @task
    def plan() -> list[dict]:
        from plugins.enp_hooks import export_pipeline

        start, end = _interval()
        with export_pipeline() as pipeline:
            result = pipeline.plan_interval(start, end, pendulum.now("UTC"))
        if result.failures:
            raise RuntimeError("export planning failed for config(s): "
                               + "; ".join(f"{name}: {why}" for name, why in result.failures.items()))
        log.info(f"planned {len(result.tasks)} file(s) in {len(result.batch_ids)} batch(es) for {start} .. {end} "
                 f"({result.configs} enabled export config(s))")
        return [t.to_dict() for t in result.tasks]

    @task(max_active_tis_per_dagrun=2)
    def export_shard(shard: dict) -> dict:
        from enpipeline.export.pipeline import ShardTask
        from plugins.enp_hooks import export_pipeline

        task = ShardTask.from_dict(shard)
        try:
            with export_pipeline() as pipeline:
                return pipeline.export_shard(task, pendulum.now("UTC"))
        except Exception as exc:  # name the config and file in the failure, whatever the cause
            raise RuntimeError(f"export config {task.config!r} batch {task.batch_id} file {task.shard_num} failed: "
                               f"{type(exc).__name__}: {exc}") from exc

    @task(trigger_rule="none_failed")
    def finalize() -> dict:
        from plugins.enp_hooks import export_pipeline

        start, end = _interval()
        with export_pipeline() as pipeline:
            batch_ids = pipeline.batches_for_interval(start, end)
            done = pipeline.finalize(batch_ids, pendulum.now("UTC"))
        summary = {"batches": len(batch_ids), "completed": len(done),
                   "keys": sum(s.get("keys", 0) for s in done.values()),
                   "files": sum(s.get("files", 0) for s in done.values())}
        log.info(f"finalized {summary['completed']} of {summary['batches']} batch(es) for {start} .. {end}: "
                 f"{summary['keys']} keys in {summary['files']} file(s)")
        return summary

    shards = export_shard.expand(shard=plan())
    shards >> finalize()


en_export()
