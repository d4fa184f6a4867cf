"""The export pipeline and retention against a blob store that fails 30 % of its writes (issue #7, task faults).

``FlakyBlobstore`` (tests/support_faults.py) fails a seeded 30 % of creates and deletes, half of them before the
operation and half after it took effect (the answer lost). Every step is retried as Airflow would retry its task,
in the DAG's order: plan, each shard, finalize, per hourly interval; then retention's mark, index, sweep. Under it
sits ``IndexWatch``, which checks at every index.txt write and every delete that the index names only complete,
signed objects and that nothing it names is deleted.

What must hold: the faulty run ends with the same objects (names, bytes, content type, cache control) and the
same batches and statistics as a clean run; every file verifies; and after the faulty cleanup, the store holds
exactly the files the index names, which are exactly the live files in the database.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from enpipeline.blobstore import MemoryBlobstore
from enpipeline.db import export as export_db
from enpipeline.db import exposures as exposures_db
from enpipeline.export import format as fmt
from enpipeline.export.pipeline import ExportPipeline, ShardTask
from enpipeline.export.signing import FilesystemKeyManager
from enpipeline.model import Exposure
from enpipeline.retention import RetentionCleaner
from enpipeline.timeutil import interval_number, truncate
from tests.support_faults import FlakyBlobstore, IndexWatch, InjectedFault, retry

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
HOURS = 12
KEYS_PER_HOUR = 60
BUCKET = "exports"
ROOTS = ("exposureKeyExport-us", "exposureKeyExport-us-3h")


def exposure(created_at: datetime) -> Exposure:
    start = interval_number(truncate(created_at, DAY)) - 144
    return Exposure(exposure_key=os.urandom(16), transmission_risk=2, app_package_name="com.example.test",
                    regions=["US"], traveler=False, interval_number=start, interval_count=144,
                    created_at=created_at, report_type="confirmed", days_since_symptom_onset=1)


@pytest.fixture
def world(engine, settings, tmp_path):
    """Two configs over 12 hours of keys: hourly (60 keys, two files each) and 3-hourly (180 keys, two files)."""
    t0 = truncate(datetime.now(UTC), DAY) - 3 * DAY
    keys = FilesystemKeyManager(tmp_path / "keys")
    ref = keys.create_signing_key("us-v1")
    from cryptography.hazmat.primitives import serialization

    public_key = serialization.load_pem_public_key(keys.signer(ref).public_key_pem().encode())
    with engine.begin() as conn:
        sig = export_db.add_signature_info(conn, name="us-v1", signing_key=ref, key_id="310", key_version="v1",
                                           algorithm=fmt.ALGORITHM_ECDSA_P256_SHA256, from_timestamp=t0 - 30 * DAY,
                                           thru_timestamp=None, now=t0)
        for name, root, period, per_file in (("us", ROOTS[0], HOUR, 40), ("us-3h", ROOTS[1], 3 * HOUR, 100)):
            export_db.add_export_config(conn, export_db.ExportConfigRow(
                config_id=0, name=name, bucket_name=BUCKET, filename_root=root,
                period_seconds=int(period.total_seconds()), output_region="US", input_regions=(),
                include_travelers=False, only_non_travelers=False, exclude_regions=(), max_records_override=per_file,
                signature_info_ids=(sig,), from_timestamp=t0 - 30 * DAY, thru_timestamp=None, disabled=False))
    rows = [exposure(t0 + h * HOUR + timedelta(seconds=59 * i)) for h in range(HOURS) for i in range(KEYS_PER_HOUR)]
    exposures_db.PartitionGuard(engine).ensure(r.created_at for r in rows)
    with engine.begin() as conn:
        exposures_db.insert_exposures(conn, rows)
    # No padding: padding keys are fresh random bytes by design, so a clean and a faulty run could not agree.
    s = settings.replace(export_min_records=0, export_min_window_age=2 * HOUR)
    return {"t0": t0, "settings": s, "keys": keys, "public_key": public_key, "engine": engine,
            "all_keys": sorted(r.exposure_key for r in rows)}


def export_hours(world, store) -> dict[str, int]:
    """The hourly DAG over the 12 hours, every task retried until it succeeds; returns the failed attempts."""
    pipeline = ExportPipeline(world["settings"], world["engine"], store, world["keys"])
    failed = {"plan": 0, "export_shard": 0, "finalize": 0}
    for i in range(HOURS):
        start = world["t0"] + (i + 2) * HOUR  # windows ending in (start - 2h, end - 2h]
        end, now = start + HOUR, start + HOUR + timedelta(minutes=5)
        planned, n = retry(lambda start=start, end=end, now=now: pipeline.plan_interval(start, end, now))
        failed["plan"] += n
        assert not planned.failures
        for task in planned.tasks:
            _, n = retry(lambda task=task, now=now: pipeline.export_shard(ShardTask.from_dict(task.to_dict()), now))
            failed["export_shard"] += n
        _, n = retry(lambda start=start, end=end, now=now: pipeline.finalize(
            pipeline.batches_for_interval(start, end), now))
        failed["finalize"] += n
    return failed


def comparable_batches(engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT c.name, b.start_timestamp, b.end_timestamp, b.status, b.key_count, b.file_count, b.stats"
            " FROM export_batch b JOIN export_config c USING (config_id) ORDER BY 1, 2"))]


def live_files(engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.text("SELECT filename FROM export_file WHERE status <> 'DEL_PEND'")).scalars())


def zips(memory: MemoryBlobstore) -> list[str]:
    return [n for n in memory.list(BUCKET) if n.endswith(".zip")]


def index(memory: MemoryBlobstore, root: str) -> list[str]:
    return [n for n in memory.get(BUCKET, f"{root}/index.txt").decode().split("\n") if n]


@pytest.mark.parametrize("seed", [7, 2024])
def test_a_store_failing_30_percent_of_writes_converges_on_the_clean_runs_files(world, seed):
    engine = world["engine"]
    faulty_memory = MemoryBlobstore()
    watch = IndexWatch(faulty_memory)
    flaky = FlakyBlobstore(watch, seed=seed, create_rate=0.3, delete_rate=0.3)

    failed = export_hours(world, flaky)
    faulty_blobs = dict(faulty_memory._objects)
    faulty_batches = comparable_batches(engine)
    assert flaky.failed["create_before"] and flaky.failed["create_after"]  # both kinds of fault really happened
    assert failed["export_shard"] and failed["finalize"]
    # A rerun of every interval (as a manual re-trigger would) changes nothing.
    failed_rerun = export_hours(world, flaky)
    assert dict(faulty_memory._objects) == faulty_blobs and comparable_batches(engine) == faulty_batches

    # The same hours exported again from scratch without faults.
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE export_file, export_shard, export_batch"))
    clean_memory = MemoryBlobstore()
    assert export_hours(world, IndexWatch(clean_memory)) == {"plan": 0, "export_shard": 0, "finalize": 0}
    assert faulty_blobs == dict(clean_memory._objects)  # names, bytes, content type, cache control
    assert faulty_batches == comparable_batches(engine)

    names = zips(clean_memory)
    assert len(names) == HOURS * 2 + HOURS // 3 * 2
    for root in ROOTS:
        assert index(clean_memory, root) == [n for n in names if n.startswith(root + "/")]
        exported = []
        for name in index(clean_memory, root):
            parsed = fmt.read_export(clean_memory.get(BUCKET, name))
            assert len(fmt.verify_export(parsed, [world["public_key"]], strict=True)) == 1, name
            exported += [k.key_data for k in parsed.keys]
        assert sorted(exported) == world["all_keys"]  # every key once per config: none lost, none twice

    # -- retention on the faulty store: half of the hours are past the cutoff -------------------------------------
    cleaner = RetentionCleaner(world["settings"], engine, flaky)
    interval_end = world["t0"] + HOURS // 2 * HOUR + world["settings"].retention
    before = dict(flaky.failed)
    cutoff = cleaner.cutoff(interval_end)
    _, mark_failed = retry(lambda: cleaner.mark_expired_exports(cutoff))
    _, index_failed = retry(lambda: cleaner.rebuild_indexes(interval_end))
    _, sweep_failed = retry(lambda: cleaner.sweep_exports(interval_end))
    assert flaky.failed["delete_before"] + flaky.failed["delete_after"] > before["delete_before"] \
        + before["delete_after"] and sweep_failed
    kept = live_files(engine)
    starts = {n: datetime.fromtimestamp(int(n.rsplit("/", 1)[1].split("-")[0]), UTC) for n in names}
    assert kept == sorted(n for n in names if starts[n] >= cutoff)
    assert 0 < len(kept) < len(names)
    assert zips(faulty_memory) == kept  # no orphan, nothing named missing
    assert sorted(index(faulty_memory, ROOTS[0]) + index(faulty_memory, ROOTS[1])) == kept

    assert watch.violations == [], watch.violations
    index_writes = [e for e in watch.events if e["op"] == "index"]
    deletes = [e for e in watch.events if e["op"] == "delete"]
    assert len(index_writes) >= HOURS * 2 and len(deletes) >= len(names) - len(kept)
    print(f"\nseed {seed}: {flaky.calls['create']} creates, {flaky.calls['delete']} deletes, {flaky.faults} faults "
          f"injected {flaky.failed}; failed task attempts: export {failed}, rerun {failed_rerun}, retention mark "
          f"{mark_failed} index {index_failed} sweep {sweep_failed}; {len(index_writes)} index writes and "
          f"{len(deletes)} deletes checked, {len(world['all_keys'])} keys compared")


def test_the_index_watch_catches_missing_half_written_and_deleted_named_objects(world):
    """The check the fault tests rely on is not vacuous: each kind of violation is reported."""
    memory = MemoryBlobstore()
    watch = IndexWatch(memory)
    ExportPipeline(world["settings"], world["engine"], watch, world["keys"]).plan_interval(
        world["t0"] + 2 * HOUR, world["t0"] + 3 * HOUR, world["t0"] + 3 * HOUR)
    good = fmt.build_zip(b"EK Export v1    ", b"")  # parses, but carries no signature
    watch.create(BUCKET, "r/a.zip", good, content_type="application/zip", cacheable=True)
    memory.create(BUCKET, "r/half.zip", good[: len(good) // 2], content_type="application/zip", cacheable=True)
    watch.create(BUCKET, "r/index.txt", b"r/a.zip\nr/half.zip\nr/missing.zip", content_type="text/plain",
                 cacheable=False)
    watch.delete(BUCKET, "r/a.zip")
    problems = [v["problem"] for v in watch.violations]
    assert problems[0] == "exports/r/a.zip has no signature"
    assert problems[1].startswith("exports/r/half.zip is not a complete export file")
    assert problems[2] == "exports/r/missing.zip is missing"
    assert "exports/r/a.zip is named by r/index.txt" in problems[3:]
    assert "exports/r/a.zip is missing" in problems[3:]


class MarksDuringUpload(FlakyBlobstore):
    """Retention marks every expired batch while a zip is being uploaded (the race export_shard must handle);
    optionally the first delete fails."""

    def __init__(self, inner, cleaner: RetentionCleaner, cutoff: datetime, *, fail_first_delete: bool = False):
        super().__init__(inner, seed=0, create_rate=0, delete_rate=0)
        self.cleaner, self.cutoff, self.fail_first_delete = cleaner, cutoff, fail_first_delete

    def create(self, bucket: str, name: str, data: bytes, *, content_type: str, cacheable: bool) -> None:
        super().create(bucket, name, data, content_type=content_type, cacheable=cacheable)
        if name.endswith(".zip"):
            self.cleaner.mark_expired_exports(self.cutoff)

    def delete(self, bucket: str, name: str) -> None:
        if self.fail_first_delete and not self.failed["delete_before"]:
            self.failed["delete_before"] += 1
            raise InjectedFault(f"injected: delete of {bucket}/{name} failed")
        super().delete(bucket, name)


def test_a_file_written_after_its_batch_expired_is_removed_even_if_the_first_delete_fails(world):
    """export_shard finds the batch marked by retention after its upload and deletes the file again; when that
    delete fails, Airflow's retry finds the batch expired and must still remove the file: unrecorded, no sweep
    would ever find it."""
    engine = world["engine"]
    memory = MemoryBlobstore()
    watch = IndexWatch(memory)
    start = world["t0"] + 2 * HOUR
    now = start + HOUR
    cleaner = RetentionCleaner(world["settings"], engine, watch)
    store = MarksDuringUpload(watch, cleaner, world["t0"] + DAY, fail_first_delete=True)
    pipeline = ExportPipeline(world["settings"], engine, store, world["keys"])
    task = next(t for t in pipeline.plan_interval(start, start + HOUR, now).tasks if t.config == "us")
    with pytest.raises(InjectedFault):
        pipeline.export_shard(task, now)
    assert len(zips(memory)) == 1 and live_files(engine) == []  # uploaded, not recorded, its delete failed
    again = pipeline.export_shard(task, now)  # Airflow's retry
    assert again["expired"] is True
    assert zips(memory) == [] and watch.violations == []


def test_a_rerun_shard_of_an_indexed_batch_that_retention_marks_meanwhile_leaves_its_file_to_the_sweep(world):
    """A cleared (re-run) shard task of a complete window rewrites its file; if retention marks the batch during
    that upload, the file is still named by the index written before the mark: deleting it there would leave
    phones an index naming a missing file. Only the sweep, which rewrites the index first, may delete it."""
    engine = world["engine"]
    memory = MemoryBlobstore()
    watch = IndexWatch(memory)
    start = world["t0"] + 2 * HOUR
    now = start + HOUR
    pipeline = ExportPipeline(world["settings"], engine, watch, world["keys"])
    planned = pipeline.plan_interval(start, start + HOUR, now)
    for task in planned.tasks:
        pipeline.export_shard(task, now)
    pipeline.finalize(planned.batch_ids, now)
    task = next(t for t in planned.tasks if t.config == "us")
    (name,) = [n for n in index(memory, ROOTS[0]) if n.endswith(f"-{task.shard_num:05d}.zip")]
    cleaner = RetentionCleaner(world["settings"], engine, watch)
    pipeline.blobstore = MarksDuringUpload(watch, cleaner, world["t0"] + DAY)

    rerun = pipeline.export_shard(task, now)

    assert rerun["expired"] is True
    assert watch.violations == [], watch.violations
    assert name in index(memory, ROOTS[0]) and memory.exists(BUCKET, name)
    cleaner.rebuild_indexes(now)
    cleaner.sweep_exports(now)
    assert zips(memory) == [] and index(memory, ROOTS[0]) == [] and watch.violations == []
