"""en_export end to end through Airflow 3's ``dag.test()`` (and ``airflow dags test``) against real Postgres."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from enpipeline.export import format as fmt
from enpipeline.timeutil import truncate
from tests.dags.airflow_env import AirflowEnv, add_config, add_signing_key, batches, exposure, insert

HOUR = timedelta(hours=1)


def ts(t: datetime) -> int:
    return int(t.timestamp())


def keyset(parsed: list[fmt.ParsedExport]) -> list[bytes]:
    return [k.key_data for p in parsed for k in p.keys]


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


def test_dag_test_exports_each_configs_windows_signed_sharded_and_indexed(airflow: AirflowEnv, engine, now):
    """One run, three configs: a period equal to, shorter than and longer than the hourly schedule."""
    w = truncate(now - 8 * HOUR, 4 * HOUR)  # the run for [w+1h, w+2h) exports the windows ending in (w-1h, w]
    sig, public_key = add_signing_key(engine, airflow.key_dir, "us-v1", now)
    add_config(engine, "us", period=HOUR, sig_ids=(sig,), region="US", max_records=25, now=now)
    add_config(engine, "ca", period=HOUR / 2, sig_ids=(sig,), region="CA", now=now)
    add_config(engine, "mx", period=4 * HOUR, sig_ids=(sig,), region="MX", now=now)
    us = insert(engine, [exposure(w - HOUR + timedelta(seconds=85 * i), region="US", dsos=i % 3) for i in range(40)])
    ca_1 = insert(engine, [exposure(w - HOUR + timedelta(minutes=2 * i), region="CA") for i in range(15)])
    ca_2 = insert(engine, [exposure(w - HOUR / 2 + timedelta(minutes=2 * i), region="CA") for i in range(15)])
    mx = insert(engine, [exposure(w - 4 * HOUR + timedelta(minutes=12 * i), region="MX") for i in range(20)])
    outside = insert(engine, [exposure(w, region=r) for r in ("US", "CA", "MX")]
                     + [exposure(w - HOUR - timedelta(seconds=1), region="US"),
                        exposure(w - 4 * HOUR - timedelta(seconds=1), region="MX")])

    with airflow.driver() as driver:
        run = driver.run(w + 2 * HOUR)

    assert run.state == "success", run.log[-5000:]
    assert run.data_interval == [(w + HOUR).isoformat(), (w + 2 * HOUR).isoformat()]
    states = run.task_states()
    assert states == {"plan": ["success"], "export_shard": ["success"] * 5, "finalize": ["success"]}
    planned = run.returns["plan"]["-1"]
    assert sorted(p["config"] for p in planned) == ["ca", "ca", "mx", "us", "us"]
    assert all(set(p) == {"batch_id", "shard_num", "config"} for p in planned)  # ids only, never key material
    written = sorted(r["filename"] for r in run.returns["export_shard"].values())
    assert run.returns["finalize"]["-1"] == {"batches": 4, "completed": 4, "files": 5,
                                            "keys": sum(r["keys"] for r in run.returns["export_shard"].values())}
    assert "planned 5 file(s) in 4 batch(es)" in run.log
    assert all(f"wrote exports/{name}" in run.log for name in written)
    assert re.search(r"complete:\s*\n\s*keys=40 revised_keys=0 padding_keys=0 files=2", run.log)

    start, end = ts(w - HOUR), ts(w)
    assert airflow.zips("exposureKeyExport-us") == [f"exposureKeyExport-us/{start}-{end}-0000{n}.zip" for n in (1, 2)]
    assert airflow.zips("exposureKeyExport-ca") == [f"exposureKeyExport-ca/{start}-{ts(w - HOUR / 2)}-00001.zip",
                                                    f"exposureKeyExport-ca/{ts(w - HOUR / 2)}-{end}-00001.zip"]
    assert airflow.zips("exposureKeyExport-mx") == [f"exposureKeyExport-mx/{ts(w - 4 * HOUR)}-{end}-00001.zip"]
    assert written == sorted(airflow.zips("exposureKeyExport-us") + airflow.zips("exposureKeyExport-ca")
                             + airflow.zips("exposureKeyExport-mx"))
    parsed = {name: airflow.read(name) for name in written}
    for name, p in parsed.items():
        assert len(fmt.verify_export(p, [public_key], strict=True)) == 1, name
        keys = [k.key_data for k in p.keys]
        assert keys == sorted(keys) and len(keys) == len(set(keys)), name
    never = {e.exposure_key for e in outside}

    # "us": 40 real keys sharded at 25; padding never pushes a window past one file, so none is added here.
    us_files = [parsed[n] for n in airflow.zips("exposureKeyExport-us")]
    assert [len(p.keys) for p in us_files] == [25, 15]
    assert sorted(keyset(us_files)) == sorted(e.exposure_key for e in us)
    assert [(p.start_timestamp, p.end_timestamp, p.batch_num, p.batch_size, p.region) for p in us_files] == [
        (start, end, 1, 1, "US"), (start, end + 1, 1, 1, "US")]
    # "ca": two half-hour windows, each padded to at least ENP_EXPORT_MIN_RECORDS with its own real keys.
    for name, real, other in ((airflow.zips("exposureKeyExport-ca")[0], ca_1, ca_2),
                              (airflow.zips("exposureKeyExport-ca")[1], ca_2, ca_1)):
        got = set(keyset([parsed[name]]))
        assert {e.exposure_key for e in real} <= got and not got & ({e.exposure_key for e in other} | never)
        assert 1000 <= len(got) <= 15 * -(-1100 // 15) and parsed[name].region == "CA"
    (mx_name,) = airflow.zips("exposureKeyExport-mx")
    got = set(keyset([parsed[mx_name]]))
    assert {e.exposure_key for e in mx} <= got and not got & never and len(got) >= 1000

    for root in ("exposureKeyExport-us", "exposureKeyExport-ca", "exposureKeyExport-mx"):
        assert airflow.index(root) == "\n".join(airflow.zips(root))
    rows = batches(engine)
    assert [(r["config"], r["start_timestamp"], r["status"], r["file_count"]) for r in rows] == [
        ("ca", w - HOUR, "COMPLETE", 1), ("ca", w - HOUR / 2, "COMPLETE", 1),
        ("mx", w - 4 * HOUR, "COMPLETE", 1), ("us", w - HOUR, "COMPLETE", 2)]
    for r in rows:
        files = [p for n, p in parsed.items() if n.startswith(f"exposureKeyExport-{r['config']}/"
                                                              f"{ts(r['start_timestamp'])}-")]
        assert r["stats"]["keys"] == r["key_count"] == sum(len(p.keys) for p in files)
        assert r["stats"]["files"] == len(files) and r["stats"]["padding_keys"] == r["padding_key_count"]
        assert sum(r["stats"]["report_type"].values()) == r["key_count"]
    assert rows[3]["stats"]["days_since_onset"] == {"0": 14, "1": 13, "2": 13}


def test_retries_and_reruns_of_an_interval_converge_on_identical_files(airflow: AirflowEnv, engine, now):
    """export_shard fails once after uploading its file, Airflow retries it; a forced re-export and a plain
    rerun of the interval follow: always the same names and bytes."""
    w = truncate(now - 5 * HOUR, HOUR)
    sig, public_key = add_signing_key(engine, airflow.key_dir, "us-v1", now)
    add_config(engine, "us", period=HOUR, sig_ids=(sig,), now=now)
    real = insert(engine, [exposure(w + timedelta(minutes=3 * i)) for i in range(12)])
    logical_date = w + 3 * HOUR  # interval [w+2h, w+3h) exports the window [w, w+1h)
    with engine.begin() as conn:  # recording the first written file fails once (a sequence survives the rollback)
        conn.execute(sa.text("CREATE SEQUENCE enp_test_fail_once"))
        conn.execute(sa.text(
            "CREATE FUNCTION enp_test_fail_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF nextval('enp_test_fail_once') = 1 THEN RAISE EXCEPTION 'simulated failure recording %',"
            " NEW.filename; END IF; RETURN NEW; END $$"))
        conn.execute(sa.text("CREATE TRIGGER enp_test_fail_once BEFORE INSERT ON export_file FOR EACH ROW"
                             " EXECUTE FUNCTION enp_test_fail_once()"))
    try:
        with airflow.driver() as driver:
            retried = driver.run(logical_date, retries=1, retry_delay=0)
            assert retried.state == "success", retried.log[-5000:]
            assert "simulated failure recording exposureKeyExport-us/" in retried.log
            assert [(t["task_id"], t["state"], t["try_number"]) for t in retried.tasks] == [
                ("export_shard", "success", 2), ("finalize", "success", 1), ("plan", "success", 1)]
            first = airflow.blobs()
            (name,) = airflow.zips("exposureKeyExport-us")
            assert retried.returns["export_shard"]["0"]["filename"] == name
            parsed = airflow.read(name)
            assert len(fmt.verify_export(parsed, [public_key])) == 1
            (batch,) = batches(engine)
            padding = batch["padding_key_count"]
            assert padding and len(parsed.keys) == len(real) + padding == batch["key_count"] >= 1000
            assert {e.exposure_key for e in real} <= set(keyset([parsed]))

            # Re-export the window from scratch (as if finalize had never run and the files were lost).
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE export_batch SET status = 'PENDING'"))
            shutil.rmtree(airflow.blob_dir)
            again = driver.run(logical_date, retries=0)
            assert again.state == "success" and again.task_states()["export_shard"] == ["success"]
            assert airflow.blobs() == first  # same names, same bytes (same keys and padding; RFC 6979 signatures)
            assert batches(engine)[0]["padding_key_count"] == padding  # no second helping of padding

            rerun = driver.run(logical_date, retries=0)  # the batch is complete: nothing to write, index rebuilt
            assert rerun.state == "success"
            assert rerun.task_states() == {"plan": ["success"], "export_shard": ["skipped"], "finalize": ["success"]}
            assert airflow.blobs() == first
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER IF EXISTS enp_test_fail_once ON export_file"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS enp_test_fail_once()"))
            conn.execute(sa.text("DROP SEQUENCE IF EXISTS enp_test_fail_once"))


def test_finalize_runs_when_there_are_zero_shards(airflow: AirflowEnv, engine, now):
    w = truncate(now - 5 * HOUR, HOUR)
    sig, _ = add_signing_key(engine, airflow.key_dir, "us-v1", now)
    add_config(engine, "us", period=HOUR, sig_ids=(sig,), now=now)
    insert(engine, [exposure(w + HOUR), exposure(w - timedelta(seconds=1))])  # neighbours only: the window is empty

    with airflow.driver() as driver:
        run = driver.run(w + 3 * HOUR)

    assert run.state == "success", run.log[-5000:]
    assert run.task_states() == {"plan": ["success"], "export_shard": ["skipped"], "finalize": ["success"]}
    assert run.returns["plan"]["-1"] == []
    assert run.returns["finalize"]["-1"] == {"batches": 1, "completed": 1, "keys": 0, "files": 0}
    assert "planned 0 file(s) in 1 batch(es)" in run.log
    assert airflow.zips("exposureKeyExport-us") == []
    assert airflow.index("exposureKeyExport-us") == ""
    (row,) = batches(engine)
    assert (row["start_timestamp"], row["status"], row["stats"]["keys"], row["stats"]["files"]) == (
        w, "COMPLETE", 0, 0)


def test_a_config_whose_planning_fails_fails_the_run_and_is_named(airflow: AirflowEnv, engine, now):
    w = truncate(now - 5 * HOUR, HOUR)
    sig, public_key = add_signing_key(engine, airflow.key_dir, "us-v1", now)
    add_config(engine, "us", period=HOUR, sig_ids=(sig,), now=now)
    add_config(engine, "broken", period=HOUR, sig_ids=(sig,), root="broken-root", now=now)
    insert(engine, [exposure(w + timedelta(minutes=i)) for i in range(5)])
    logical_date = w + 3 * HOUR
    with engine.begin() as conn:  # a database failure that hits one config's planning only
        conn.execute(sa.text(
            "CREATE FUNCTION enp_test_fail_batch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'simulated failure for %', NEW.filename_root; END $$"))
        conn.execute(sa.text(
            "CREATE TRIGGER enp_test_fail_batch BEFORE INSERT ON export_batch FOR EACH ROW"
            " WHEN (NEW.filename_root = 'broken-root') EXECUTE FUNCTION enp_test_fail_batch()"))
    try:
        with airflow.driver() as driver:
            failed = driver.run(logical_date, retries=0)
            assert failed.state == "failed"
            assert failed.task_states() == {"plan": ["failed"], "export_shard": ["upstream_failed"],
                                            "finalize": ["upstream_failed"]}
            assert "export planning failed for config(s): broken: " in failed.log
            assert "simulated failure for broken-root" in failed.log
            assert [(r["config"], r["status"]) for r in batches(engine)] == [("us", "PENDING")]  # others planned
            assert not (airflow.blob_dir / "exports").exists()

            with engine.begin() as conn:
                conn.execute(sa.text("DROP TRIGGER enp_test_fail_batch ON export_batch"))
            recovered = driver.run(logical_date, retries=0)
            assert recovered.state == "success", recovered.log[-5000:]
            assert [(r["config"], r["status"]) for r in batches(engine)] == [("broken", "COMPLETE"),
                                                                              ("us", "COMPLETE")]
            for root in ("broken-root", "exposureKeyExport-us"):
                (name,) = airflow.zips(root)
                assert len(fmt.verify_export(airflow.read(name), [public_key])) == 1

            # A manual trigger without a logical date has no data interval: fail loudly, export nothing.
            no_interval = driver.run(None, retries=0)
            assert no_interval.state == "failed" and no_interval.data_interval == [None, None]
            assert no_interval.task_states()["plan"] == ["failed"]
            assert "en_export needs a data interval" in no_interval.log
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER IF EXISTS enp_test_fail_batch ON export_batch"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS enp_test_fail_batch()"))


def test_airflow_dags_test_cli_with_a_minute_schedule_exports_the_minute_before_t(airflow: AirflowEnv, engine, now):
    t = truncate(now, timedelta(minutes=1)) - timedelta(minutes=5)
    if t.minute == 0:  # keep T off the hour, so the hourly config has no window ending in (T - 1m, T]
        t -= timedelta(minutes=1)
    minute = timedelta(minutes=1)
    sig, public_key = add_signing_key(engine, airflow.key_dir, "us-v1", now)
    add_config(engine, "us-1m", period=minute, sig_ids=(sig,), now=now)
    add_config(engine, "us", period=HOUR, sig_ids=(sig,), now=now)
    inside = insert(engine, [exposure(t - minute + timedelta(seconds=5 * i)) for i in range(12)])
    outside = insert(engine, [exposure(t), exposure(t + timedelta(seconds=30)), exposure(t - minute * 2)])

    out = airflow.airflow("dags", "test", "en_export", t.isoformat(), timeout=300,
                          env={"ENP_EXPORT_SCHEDULE": "* * * * *", "ENP_EXPORT_MIN_WINDOW_AGE": "0s"})

    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    log = out.stdout + out.stderr
    assert f"planned 1 file(s) in 1 batch(es) for {t - minute} .. {t}" in log
    assert "Marking run" in log and "successful" in log
    assert airflow.zips("exposureKeyExport-us") == []
    (name,) = airflow.zips("exposureKeyExport-us-1m")
    assert name == f"exposureKeyExport-us-1m/{ts(t - minute)}-{ts(t)}-00001.zip"
    parsed = airflow.read(name)
    assert len(fmt.verify_export(parsed, [public_key])) == 1
    got = set(keyset([parsed]))
    assert {e.exposure_key for e in inside} <= got and not got & {e.exposure_key for e in outside}
    assert airflow.index("exposureKeyExport-us-1m") == name
    assert [(r["config"], r["start_timestamp"], r["end_timestamp"], r["status"]) for r in batches(engine)] == [
        ("us-1m", t - minute, t, "COMPLETE")]


def test_overlapping_configs_each_ship_exactly_the_keys_they_planned(airflow: AirflowEnv, engine, now):
    """Two configs over the same US keys, hourly and half-hourly: the half-hourly one pads its windows."""
    w = truncate(now - 5 * HOUR, HOUR)
    sig, _ = add_signing_key(engine, airflow.key_dir, "us-v1", now)
    add_config(engine, "us", period=HOUR, sig_ids=(sig,), max_records=25, now=now)
    add_config(engine, "us-30m", period=HOUR / 2, sig_ids=(sig,), now=now)
    real = insert(engine, [exposure(w + timedelta(seconds=85 * i)) for i in range(40)])

    with airflow.driver() as driver:
        run = driver.run(w + 3 * HOUR)

    assert run.state == "success", run.log[-5000:]
    (us,) = [r for r in batches(engine) if r["config"] == "us"]
    us_files = [airflow.read(n) for n in airflow.zips("exposureKeyExport-us")]
    assert sum(len(p.keys) for p in us_files) == us["key_count"] == us["stats"]["keys"]
    assert all(len(p.keys) <= 25 for p in us_files)
    assert sorted(keyset(us_files)) == sorted(e.exposure_key for e in real)  # 40 real keys, no padding (capped)
