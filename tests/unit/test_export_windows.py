"""Window selection and shard planning: pure functions of the data interval and key counts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from enpipeline.export.pipeline import object_name, plan_shards
from enpipeline.export.windows import is_aligned, validate_period, windows_ending_in, windows_for_interval

T = datetime(2026, 3, 10, tzinfo=UTC)
H = timedelta(hours=1)


def at(hours: float) -> datetime:
    return T + timedelta(hours=hours)


@pytest.mark.parametrize("period", ["15m", "30m", "1h", "2h", "4h", "12h", "24h", "1m", "10m"])
def test_periods_that_divide_a_day_are_valid(period):
    from enpipeline.durations import parse_duration

    assert 86400 % validate_period(parse_duration(period)) == 0


@pytest.mark.parametrize("period", [timedelta(hours=7), timedelta(hours=25), timedelta(seconds=0),
                                    timedelta(seconds=1.5), timedelta(hours=48)])
def test_periods_that_do_not_divide_a_day_are_refused(period):
    with pytest.raises(ValueError, match="divide 24h"):
        validate_period(period)


def test_hourly_run_exports_the_window_two_hours_back():
    # Run for data interval [10:00, 11:00) with a 2 h minimum age: windows ending in (08:00, 09:00].
    assert windows_for_interval(3600, at(10), at(11), 2 * H) == [(at(8), at(9))]


def test_quarter_hour_period_with_hourly_runs_gives_four_windows():
    got = windows_for_interval(900, at(10), at(11), 2 * H)
    assert got == [(at(8), at(8.25)), (at(8.25), at(8.5)), (at(8.5), at(8.75)), (at(8.75), at(9))]


def test_four_hour_period_only_in_the_run_whose_interval_holds_the_boundary():
    got = {h: windows_for_interval(4 * 3600, at(h), at(h + 1), 2 * H) for h in range(24)}
    non_empty = {h: w for h, w in got.items() if w}
    # Windows end at 00, 04, 08, ...; the run for [h, h+1) takes ends in (h-2, h-1], so end e runs at e+1.
    assert sorted(non_empty) == [1, 5, 9, 13, 17, 21]
    assert non_empty[9] == [(at(4), at(8))]
    assert non_empty[1] == [(at(-4), at(0))]


def test_minute_schedule_without_age_exports_the_minute_before_t():
    t = datetime(2026, 3, 10, 12, 34, tzinfo=UTC)
    # `airflow dags test en_export T` runs the interval that ends at T.
    assert windows_for_interval(60, t - timedelta(minutes=1), t, timedelta(0)) == [(t - timedelta(minutes=1), t)]


@pytest.mark.parametrize("period", [60, 900, 3600, 4 * 3600, 86400])
@pytest.mark.parametrize("schedule", [60, 900, 3600, 86400])
def test_consecutive_intervals_export_every_window_exactly_once(period, schedule):
    age = 2 * H
    seen = []
    start = T
    for i in range(2 * 86400 // schedule):
        s = start + timedelta(seconds=i * schedule)
        seen.extend(windows_for_interval(period, s, s + timedelta(seconds=schedule), age))
    assert len(seen) == len(set(seen))
    expected = windows_ending_in(period, T - age, T + timedelta(days=2) - age)
    assert seen == expected
    assert all(is_aligned(a, period) and b - a == timedelta(seconds=period) for a, b in seen)
    assert all(b <= T + timedelta(days=2) - age for _, b in seen)  # never an open window


def test_windows_are_aligned_to_utc_midnight():
    assert windows_ending_in(86400, at(-1), at(30)) == [(T - timedelta(days=1), T), (T, T + timedelta(days=1))]
    assert windows_ending_in(86400, at(0), at(23)) == []
    assert windows_ending_in(6 * 3600, at(0), at(12)) == [(at(0), at(6)), (at(6), at(12))]


@pytest.mark.parametrize(("primary", "revised", "max_records", "expected"), [
    (0, 0, 10, []),
    (5, 0, 10, [((0, 5), (0, 0))]),
    (10, 0, 10, [((0, 10), (0, 0))]),                          # exactly max: one file
    (11, 0, 10, [((0, 10), (0, 0)), ((10, 11), (0, 0))]),      # max + 1: two files
    (8, 5, 10, [((0, 8), (0, 2)), ((8, 8), (2, 5))]),          # primary first, then revised
    (0, 3, 10, [((0, 0), (0, 3))]),
    (20, 20, 10, [((0, 10), (0, 0)), ((10, 20), (0, 0)), ((20, 20), (0, 10)), ((20, 20), (10, 20))]),
])
def test_plan_shards(primary, revised, max_records, expected):
    plan = plan_shards(primary, revised, max_records)
    assert plan == expected
    assert sum((b - a) + (d - c) for (a, b), (c, d) in plan) == primary + revised
    assert all((b - a) + (d - c) <= max_records for (a, b), (c, d) in plan)


def test_object_names_are_deterministic():
    assert object_name("exposureKeyExport-US", at(8), at(9), 1) == (
        f"exposureKeyExport-US/{int(at(8).timestamp())}-{int(at(9).timestamp())}-00001.zip")
    assert object_name("v1", datetime(1970, 1, 1, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC), 2) == (
        "v1/0-0-00002.zip")
