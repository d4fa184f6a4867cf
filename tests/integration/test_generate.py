"""`enpipeline generate` on a real Postgres: rows per UTC day, key validity, partitions, refusal, CLI."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from enpipeline.db import exposures, migrate, synthetic
from enpipeline.db.export import GENERATED_APP
from enpipeline.generate import DayResult, GenerateRefused, generate_keys, generation_days
from enpipeline.model import Exposure

# Far from the session's "now", so these days' partitions exist only if a test makes them.
NOW = datetime(2024, 3, 10, 15, 30, tzinfo=UTC)
DAYS = [date(2024, 3, 7), date(2024, 3, 8), date(2024, 3, 9)]
# Whole UTC days from a key's start to the day it was uploaded.
KEY_AGE_DAYS = ("(created_at AT TIME ZONE 'UTC')::date"
                " - (to_timestamp(interval_number * 600) AT TIME ZONE 'UTC')::date")


def generate(engine: Engine, **kwargs) -> object:
    args = {"days": 3, "keys_per_day": 480, "regions": ["US"], "now": NOW} | kwargs
    return generate_keys(engine, **args)


def drop_partitions(engine: Engine, days: list[date]) -> None:
    with engine.begin() as conn:
        for day in days:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {synthetic.partition_name(day)}"))


def per_day(engine: Engine) -> dict[date, tuple[str, int]]:
    """UTC day of created_at -> (partition holding the rows, row count); one partition per day asserted."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT (created_at AT TIME ZONE 'UTC')::date AS day, tableoid::regclass::text AS part, count(*) AS n"
            " FROM exposure GROUP BY 1, 2 ORDER BY 1")).all()
    assert len({r.day for r in rows}) == len(rows), "a day's rows are spread over several partitions"
    return {r.day: (r.part, r.n) for r in rows}


def all_keys(engine: Engine) -> list[bytes]:
    with engine.connect() as conn:
        return [bytes(k) for k in conn.execute(sa.text("SELECT exposure_key FROM exposure")).scalars()]


def real_exposure(created_at: datetime, app: str | None = "com.example.test") -> Exposure:
    return Exposure(exposure_key=os.urandom(16), transmission_risk=2, app_package_name=app, regions=["US"],
                    traveler=False, interval_number=int(created_at.timestamp()) // 600 // 144 * 144 - 144,
                    interval_count=144, created_at=created_at, report_type="confirmed")


def insert(engine: Engine, *rows: Exposure) -> None:
    with engine.begin() as conn:
        migrate.ensure_partitions(conn, min(r.created_at.date() for r in rows), max(r.created_at.date() for r in rows))
        exposures.insert_exposures(conn, list(rows))


def partition_indexes_attached(engine: Engine, day: date) -> tuple[int, int]:
    """(indexes of exposure, indexes of the day's partition attached to them)."""
    with engine.connect() as conn:
        parent = conn.execute(sa.text("SELECT count(*) FROM pg_index WHERE indrelid = 'exposure'::regclass"))
        parent = parent.scalar_one()
        attached = conn.execute(sa.text(
            "SELECT count(*) FROM pg_index x JOIN pg_inherits i ON i.inhrelid = x.indexrelid"
            " WHERE x.indrelid = CAST(:p AS regclass)"), {"p": synthetic.partition_name(day)}).scalar_one()
    return parent, attached


# -- which days, how many rows ----------------------------------------------------------------------


def test_days_are_the_whole_utc_days_before_nows_day():
    assert generation_days(NOW, 3) == DAYS
    assert generation_days(datetime(2024, 3, 10, tzinfo=UTC), 1) == [date(2024, 3, 9)]
    # 01:00 at UTC+2 is still the 9th in UTC.
    assert generation_days(datetime(2024, 3, 10, 1, 0, tzinfo=timezone(timedelta(hours=2))), 2) == \
        [date(2024, 3, 7), date(2024, 3, 8)]


def test_exact_rows_per_utc_day_each_in_its_own_partition(engine):
    drop_partitions(engine, DAYS)  # the missing-partition path: generate creates them
    seen: list[DayResult] = []
    report = generate(engine, progress=seen.append)

    assert per_day(engine) == {d: (synthetic.partition_name(d), 480) for d in DAYS}
    assert [r.day for r in seen] == DAYS and all(r.rows == 480 for r in seen)
    assert report.rows == 1440 and [r.day for r in report.days] == DAYS and report.rows_per_second > 0
    for day in DAYS:
        parent, attached = partition_indexes_attached(engine, day)
        assert attached == parent > 0
    with engine.connect() as conn:
        leftovers = conn.execute(sa.text("SELECT count(*) FROM pg_class WHERE relname LIKE 'exposure_generating%'"))
        assert leftovers.scalar_one() == 0


def test_created_at_covers_each_day_uniformly_and_never_reaches_today(engine):
    generate(engine, keys_per_day=2400)
    with engine.connect() as conn:
        hours = conn.execute(sa.text(
            "SELECT date_trunc('hour', created_at AT TIME ZONE 'UTC') AS h, count(*) AS n FROM exposure GROUP BY 1"
        )).all()
        latest = conn.execute(sa.text("SELECT max(created_at) FROM exposure")).scalar_one()
    # 2400 keys a day, one per 36-second slice: exactly 100 in every hour of the three days.
    assert len(hours) == 72 and {r.n for r in hours} == {100}
    assert latest < datetime(2024, 3, 10, tzinfo=UTC)


def test_keys_are_valid_expired_temporary_exposure_keys(engine):
    generate(engine, keys_per_day=3000, regions=["us", "ca", "US"])
    keys = all_keys(engine)
    assert len(keys) == 9000 and len(set(keys)) == 9000 and {len(k) for k in keys} == {16}
    with engine.connect() as conn:
        r = conn.execute(sa.text(
            "SELECT bool_and(interval_count = 144) AS period,"
            " bool_and(interval_number % 144 = 0) AS midnight,"
            " bool_and((interval_number + interval_count) * 600 <= extract(epoch FROM created_at)) AS expired,"
            f" min({KEY_AGE_DAYS}) AS min_age, max({KEY_AGE_DAYS}) AS max_age,"
            " bool_and(regions = ARRAY['CA', 'US']) AS regions,"
            " bool_and(app_package_name = :marker) AS marker,"
            " bool_and(local_provenance AND health_authority_id IS NULL AND revised_at IS NULL"
            "          AND revised_report_type IS NULL AND revised_transmission_risk IS NULL"
            "          AND revised_days_since_symptom_onset IS NULL AND padding_seq IS NULL) AS plain,"
            " bool_and((report_type = 'confirmed' AND transmission_risk = 2)"
            "          OR (report_type = 'likely' AND transmission_risk = 4)) AS report_types,"
            " count(*) FILTER (WHERE report_type = 'likely') AS likely,"
            " count(*) FILTER (WHERE traveler) AS travelers,"
            " count(*) FILTER (WHERE days_since_symptom_onset IS NULL) AS no_onset,"
            " min(days_since_symptom_onset) AS min_dsos, max(days_since_symptom_onset) AS max_dsos"
            " FROM exposure"), {"marker": synthetic.MARKER}).one()
    assert r.period and r.midnight and r.expired and r.regions and r.marker and r.plain and r.report_types
    assert (r.min_age, r.max_age) == (1, 14)
    assert -14 <= r.min_dsos < r.max_dsos <= 14
    # Shares are ~10% likely, ~5% travelers, ~5% without onset (9000 rows: wide bounds, no flakes).
    assert 600 < r.likely < 1200 and 250 < r.travelers < 650 and 250 < r.no_onset < 650


# -- real data, reruns and seeds --------------------------------------------------------------------


def test_refuses_when_real_publishes_exist_and_writes_with_force(engine):
    insert(engine, real_exposure(datetime(2024, 3, 8, 9, 0, tzinfo=UTC)))
    with pytest.raises(GenerateRefused, match=r"holds 1 real exposure key.*--force"):
        generate(engine)
    with engine.connect() as conn:
        assert exposures.count(conn) == 1  # nothing written

    report = generate(engine, force=True)
    assert report.rows == 1440
    assert {d: n for d, (_, n) in per_day(engine).items()} == {DAYS[0]: 480, DAYS[1]: 481, DAYS[2]: 480}


def test_rows_without_an_app_count_as_real_and_export_padding_does_not(engine):
    insert(engine, real_exposure(datetime(2024, 3, 8, 9, 0, tzinfo=UTC), app=GENERATED_APP))
    with engine.connect() as conn:
        assert synthetic.count_real_publishes(conn) == 0
    insert(engine, real_exposure(datetime(2024, 3, 8, 9, 0, tzinfo=UTC), app=None))
    with engine.connect() as conn:
        assert synthetic.count_real_publishes(conn) == 1


def test_day_with_rows_is_added_to_not_replaced(engine):
    """A partition that already holds rows (here export padding) gets a plain INSERT; its rows stay."""
    padding = real_exposure(datetime(2024, 3, 8, 9, 0, tzinfo=UTC), app=GENERATED_APP)
    insert(engine, padding)
    generate(engine, keys_per_day=100)
    assert {d: n for d, (_, n) in per_day(engine).items()} == {DAYS[0]: 100, DAYS[1]: 101, DAYS[2]: 100}
    assert padding.exposure_key in all_keys(engine)


def test_existing_empty_partitions_are_replaced_with_indexes_attached(engine):
    with engine.begin() as conn:
        migrate.ensure_partitions(conn, DAYS[0], DAYS[-1])
    generate(engine, keys_per_day=50)
    assert per_day(engine) == {d: (synthetic.partition_name(d), 50) for d in DAYS}
    parent, attached = partition_indexes_attached(engine, DAYS[1])
    assert attached == parent > 0


def test_running_twice_adds_more_distinct_keys(engine):
    """Not idempotent by design: each run draws a fresh seed and adds its keys to the days."""
    first = generate(engine, keys_per_day=200)
    second = generate(engine, keys_per_day=200)
    assert first.seed != second.seed
    assert {d: n for d, (_, n) in per_day(engine).items()} == dict.fromkeys(DAYS, 400)
    keys = all_keys(engine)
    assert len(set(keys)) == len(keys) == 1200


def test_a_seed_reproduces_its_keys_and_is_not_applied_twice(engine):
    generate(engine, seed=42)
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT exposure_key, created_at, interval_number, report_type,"
                                      " days_since_symptom_onset, traveler FROM exposure ORDER BY 1")).all()
    with pytest.raises(GenerateRefused, match="seed 42 already generated 2024-03-07 and 2 more day"):
        generate(engine, seed=42, keys_per_day=10)

    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE exposure"))
    generate(engine, seed=42)
    with engine.connect() as conn:
        after = conn.execute(sa.text("SELECT exposure_key, created_at, interval_number, report_type,"
                                     " days_since_symptom_onset, traveler FROM exposure ORDER BY 1")).all()
    assert after == before
    generate(engine, seed=43)  # another seed over the same days is fine
    assert len(set(all_keys(engine))) == 2880


# -- input validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"days": 0}, "days must be between 1 and 60"),
    ({"days": 61}, "days must be between 1 and 60"),
    ({"keys_per_day": 0}, "keys per day must be between 1 and 50,000,000"),
    ({"keys_per_day": 50_000_001}, "keys per day must be between 1 and 50,000,000"),
    ({"regions": []}, "at least one region"),
    ({"regions": [" ", ""]}, "at least one region"),
    ({"regions": ["US", "U-S"]}, "ASCII letters and digits"),
    ({"regions": ["ÜS"]}, "ASCII letters and digits"),
    ({"now": datetime(2024, 3, 10)}, "timezone-aware"),
])
def test_bad_arguments_are_refused_before_touching_the_database(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(engine, **kwargs)
    with engine.connect() as conn:
        assert exposures.count(conn) == 0


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_prints_a_line_per_day_and_a_total(cli, engine):
    code, out, err = cli("generate", "--days", "2", "--keys-per-day", "300", "--now", "2024-03-10T15:30:00Z",
                         "--regions", "us,ca", "--regions", "mx", "--seed", "7")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("2024-03-08") and "300 keys" in lines[0] and "rows/s" in lines[0]
    assert lines[1].startswith("2024-03-09")
    assert lines[2].startswith("generated 600 keys over 2 day(s) 2024-03-08..2024-03-09 (regions CA,MX,US, seed 7)")
    assert lines[2].endswith("rows/s")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT DISTINCT regions FROM exposure")).scalars().all() == [["CA", "MX", "US"]]


def test_cli_default_region_is_us(cli, engine):
    code, _, err = cli("generate", "--days", "1", "--keys-per-day", "5", "--now", "2024-03-10T00:00:00Z")
    assert code == 0, err
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT DISTINCT regions FROM exposure")).scalars().all() == [["US"]]


def test_cli_refuses_real_data_in_one_line_unless_forced(cli, engine):
    insert(engine, real_exposure(datetime(2024, 3, 9, 9, 0, tzinfo=UTC)))
    code, out, err = cli("generate", "--days", "1", "--keys-per-day", "5", "--now", "2024-03-10T00:00:00Z")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("enpipeline: error: the database holds 1 real exposure key")
    assert "--force" in err
    code, out, err = cli("generate", "--days", "1", "--keys-per-day", "5", "--now", "2024-03-10T00:00:00Z", "--force")
    assert code == 0 and "generated 5 keys" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--days", "0", "--keys-per-day", "5"], "days must be between 1 and 60"),
    (["--days", "1", "--keys-per-day", "0"], "keys per day must be between"),
    (["--days", "1", "--keys-per-day", "5", "--regions", ","], "at least one region"),
    (["--days", "1", "--keys-per-day", "5", "--regions", "U$"], "ASCII letters and digits"),
    (["--days", "1", "--keys-per-day", "5", "--now", "yesterday"], "--now must be an ISO 8601 time"),
])
def test_cli_input_errors_are_one_line_with_exit_1(cli, engine, argv, message):
    code, out, err = cli("generate", *argv)
    assert code == 1 and out == "" and message in err and err.count("\n") == 1


def test_cli_missing_required_flags_is_a_usage_error(cli):
    code, _, err = cli("generate", "--days", "1")
    assert code == 2 and "--keys-per-day" in err
