"""en_cleanup through Airflow 3's ``dag.test()`` against real Postgres and a filesystem blob store: expired key
partitions dropped, expired export files marked, unindexed and swept, batches DELETED, revision key made."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from enpipeline.blobstore import FilesystemBlobstore
from enpipeline.db import retention as retention_db
from enpipeline.export.pipeline import ExportPipeline
from enpipeline.export.signing import FilesystemKeyManager
from tests.dags.airflow_env import BUCKET, AirflowEnv, add_config, add_signing_key, batches, exposure, insert

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


def test_dag_test_expires_keys_and_export_files(airflow: AirflowEnv, engine, settings):
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - 17 * DAY
    sig, _ = add_signing_key(engine, airflow.key_dir, "us-v1", first)
    add_config(engine, "us", period=DAY, sig_ids=(sig,), max_records=4, now=first)
    rows = insert(engine, [exposure(first + d * DAY + h * HOUR) for d in range(17) for h in range(0, 24, 4)])
    pipeline = ExportPipeline(settings.replace(export_min_records=0), engine, FilesystemBlobstore(airflow.blob_dir),
                              FilesystemKeyManager(airflow.key_dir))
    for d in range(17):  # the daily windows, exported as the hourly runs would have
        end = first + (d + 1) * DAY
        plan = pipeline.plan_interval(end, end + 3 * HOUR, end + 3 * HOUR)
        for task in plan.tasks:
            pipeline.export_shard(task, end + 3 * HOUR)
        pipeline.finalize(plan.batch_ids, end + 3 * HOUR)
    zips = airflow.zips("exposureKeyExport-us")
    assert len(zips) == 17 * 2  # 6 keys a day, 4 per file
    cutoff = today - 14 * DAY  # the run for the interval ending today

    def expired(name: str) -> bool:
        return datetime.fromtimestamp(int(name.rsplit("/", 1)[1].split("-")[0]), UTC) < cutoff

    with airflow.driver() as driver:
        run = driver.run(today, dag_id="en_cleanup", retries=0)
        assert run.state == "success", run.log[-5000:]
        assert run.data_interval == [(today - DAY).isoformat(), today.isoformat()]
        assert run.task_states() == {t: ["success"] for t in ("ensure_partitions", "expire_keys",
                                                               "mark_expired_exports", "rebuild_indexes",
                                                               "sweep_exports", "expire_federation_state",
                                                               "rotate_revision_keys")}
        expire = run.returns["expire_keys"]["-1"]
        assert {f"exposure_p{first + d * DAY:%Y%m%d}" for d in range(3)} <= set(expire["dropped_partitions"])
        assert run.returns["mark_expired_exports"]["-1"]["files"] == 6
        assert run.returns["sweep_exports"]["-1"]["blobs_deleted"] == 6
        assert run.returns["rotate_revision_keys"]["-1"]["created"] is not None
        for line in ("dropped exposure_p", "marked 3 batch(es) and 6 file(s) DEL_PEND", "swept 6 file(s)",
                     "revision keys: created"):
            assert line in run.log, line

        with engine.connect() as conn:
            left = list(conn.execute(sa.text("SELECT created_at FROM exposure")).scalars())
            names = [p.name for p in retention_db.list_partitions(conn)]
        assert sorted(left) == sorted(r.created_at for r in rows if r.created_at >= cutoff)
        assert not any(n < f"exposure_p{cutoff:%Y%m%d}" for n in names)
        assert airflow.zips("exposureKeyExport-us") == [n for n in zips if not expired(n)]
        named = [n for n in airflow.index("exposureKeyExport-us").split("\n") if n]
        assert named and not any(expired(n) for n in named)
        assert all((airflow.blob_dir / BUCKET / n).exists() for n in named)
        assert [b["status"] for b in batches(engine)] == ["DELETED"] * 3 + ["COMPLETE"] * 14

        again = driver.run(today, dag_id="en_cleanup", retries=0)  # a re-run of the same interval converges
        assert again.state == "success", again.log[-5000:]
        assert again.returns["mark_expired_exports"]["-1"]["files"] == 0
        assert again.returns["rotate_revision_keys"]["-1"]["created"] is None
        assert airflow.zips("exposureKeyExport-us") == [n for n in zips if not expired(n)]
