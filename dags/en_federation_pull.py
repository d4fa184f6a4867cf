"""
### en_federation_pull: keys from partner key servers and from partners' export files

Every 15 minutes by default (`ENP_FEDERATION_PULL_SCHEDULE`, a cron string):

1. **list_queries** → **pull** (mapped, one task per federation query): call the partner's gRPC
   `/Federation/Fetch` with an ES256 bearer token, page after page from the query's saved cursor. Each page's
   keys are validated like a publish, stored with `local_provenance=false` and the query as their source, and
   committed together with the cursor that follows them, so a failed or killed pull resumes at the first page it
   did not store. A pull stops (resumably) after `ENP_FEDERATION_MAX_PULL_DURATION`; a pull of a query that is
   still running elsewhere returns at once. A partner that fails (unreachable, timeout, token refused, garbage)
   fails only its own task, with the query, partner and reason in the message and on the sync row.
2. **list_importers** → **import_exports** (mapped, one task per export importer): fetch the partner's
   `index.txt` and import the signed export files not imported yet.

Tasks return counts only. The same paths from the shell: `enpipeline federation pull --query ID` and
`enpipeline importer run`. History: `enpipeline federation syncs --query ID`.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

SCHEDULE = os.environ.get("ENP_FEDERATION_PULL_SCHEDULE", "*/15 * * * *")
# Not print(): stdout reaches the task log late, after lines logged since (the UI folds it into "Post Execute").
log = logging.getLogger("dags.en_federation_pull")


@dag(
    dag_id="en_federation_pull",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["enpipeline", "federation"],
    default_args={
        "owner": "enpipeline",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=5),
        # A pull stops itself after ENP_FEDERATION_MAX_PULL_DURATION (10m) plus one RPC timeout.
        "execution_timeout": timedelta(minutes=20),
    },
)
def en_federation_pull():
    @task
    def list_queries() -> list[str]:
        from enpipeline.db import federation_in
        from plugins.enp_hooks import enp_engine

        with enp_engine() as engine, engine.connect() as conn:
            ids = federation_in.list_query_ids(conn)
        log.info(f"{len(ids)} federation query(ies) to pull" + (f": {', '.join(ids)}" if ids else ""))
        return ids

    @task(max_active_tis_per_dagrun=4)
    def pull(query_id: str) -> dict:
        from enpipeline.config import load_settings
        from enpipeline.federation.pull import pull_query
        from plugins.enp_hooks import enp_engine

        settings = load_settings(require_database=False)
        with enp_engine() as engine:
            report = pull_query(settings, engine, query_id, pendulum.now("UTC"))
        log.info(report.summary())
        return report.as_dict()

    @task
    def list_importers() -> list[str]:
        from plugins.enp_hooks import enp_engine

        try:
            from enpipeline.db.importer import list_importer_names
        except ModuleNotFoundError as exc:
            if exc.name != "enpipeline.db.importer":
                raise
            log.info("export importer not installed: nothing to import")
            return []
        with enp_engine() as engine, engine.connect() as conn:
            names = list(list_importer_names(conn))
        log.info(f"{len(names)} export importer(s) to run" + (f": {', '.join(names)}" if names else ""))
        return names

    @task(max_active_tis_per_dagrun=4)
    def import_exports(importer: str) -> dict:
        from enpipeline.config import load_settings
        from enpipeline.federation.importer import import_exports as run_import
        from plugins.enp_hooks import enp_engine

        settings = load_settings(require_database=False)
        with enp_engine() as engine:
            r = run_import(settings, engine, importer, pendulum.now("UTC"))
        log.info(f"importer {importer!r}: {r.files_seen} file(s) in the index, {r.files_imported} imported, "
                 f"{r.files_skipped} done before, {r.files_failed} failed; keys {r.keys_inserted} inserted, "
                 f"{r.keys_revised} revised, {r.keys_skipped} skipped, {r.keys_rejected} rejected")
        return r.as_dict()

    pull.expand(query_id=list_queries())
    import_exports.expand(importer=list_importers())


en_federation_pull()
