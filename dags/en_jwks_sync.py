"""
### en_jwks_sync: health-authority verification keys from their JWKS documents

Every 5 minutes by default (`ENP_JWKS_SYNC_SCHEDULE`), for each health authority with a `jwks_uri`: fetch the
document (a bare JSON array of JWKs, as the reference serves it, or the standard `{"keys": [...]}`; timeout
`ENP_JWKS_REQUEST_TIMEOUT`, at most `ENP_JWKS_MAX_BYTES`), add keys that are new (version = `kid`, valid from now),
revoke keys that are no longer served (valid until now), and purge keys revoked more than
`ENP_HEALTH_AUTHORITY_KEY_CLEANUP_TTL` (30 days) ago.

Each authority is synced in its own transaction. A bad document (unreachable, not JSON, not EC P-256, a kid
reused for another key, ...) changes nothing for that authority and fails the task with its issuer, URL and
reason, after the healthy authorities were synced. The same path: `enpipeline health-authority sync-jwks`.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

SCHEDULE = os.environ.get("ENP_JWKS_SYNC_SCHEDULE", "*/5 * * * *")
# Not print(): stdout reaches the task log late, after lines logged since (the UI folds it into "Post Execute").
log = logging.getLogger("dags.en_jwks_sync")


@dag(
    dag_id="en_jwks_sync",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["enpipeline", "verification"],
    default_args={
        "owner": "enpipeline",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "execution_timeout": timedelta(minutes=10),
    },
)
def en_jwks_sync():
    @task
    def sync_jwks() -> dict:
        from enpipeline.config import load_settings
        from enpipeline.jwks import sync_health_authority_keys
        from plugins.enp_hooks import enp_engine

        settings = load_settings(require_database=False)
        with enp_engine() as engine:
            report = sync_health_authority_keys(engine, pendulum.now("UTC"), timeout=settings.jwks_request_timeout,
                                                cleanup_ttl=settings.health_authority_key_cleanup_ttl,
                                                max_bytes=settings.jwks_max_bytes)
        summary = {r.issuer: r.as_row() for r in report.results}
        ok = [r for r in report.results if not r.error]
        counts = ", ".join(f"{sum(getattr(r, k) for r in ok)} {k}"
                           for k in ("added", "restored", "revoked", "purged", "unchanged"))
        log.info(f"synced {len(ok)} of {len(report.results)} health authority(ies) with a jwks_uri; keys: {counts}")
        report.raise_for_failures()
        return summary

    sync_jwks()


en_jwks_sync()
