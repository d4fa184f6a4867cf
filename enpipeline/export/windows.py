"""Which export windows a run covers: period-aligned, closed, and a pure function of the data interval."""

from __future__ import annotations

from datetime import datetime, timedelta

from enpipeline.timeutil import EPOCH

DAY_SECONDS = 86_400


def validate_period(period: timedelta) -> int:
    """The period in whole seconds; it must divide 24 h (15m, 30m, 1h, 2h, 4h, 12h, 24h, ...)."""
    seconds = period.total_seconds()
    if seconds != int(seconds) or seconds <= 0 or DAY_SECONDS % int(seconds) != 0:
        raise ValueError(f"the period must be whole seconds that divide 24h evenly, got {period}")
    return int(seconds)


def is_aligned(t: datetime, period_seconds: int) -> bool:
    return (t - EPOCH).total_seconds() % period_seconds == 0


def windows_ending_in(period_seconds: int, after: datetime, upto: datetime) -> list[tuple[datetime, datetime]]:
    """Every window [end - period, end) with period-aligned ``end`` in (after, upto], oldest first.

    Periods divide 24 h, so alignment to the Unix epoch is alignment to UTC midnight.
    """
    after_s = int((after - EPOCH).total_seconds())
    upto_s = int((upto - EPOCH).total_seconds())
    first_end = (after_s // period_seconds + 1) * period_seconds
    out = []
    for end_s in range(first_end, upto_s + 1, period_seconds):
        end = EPOCH + timedelta(seconds=end_s)
        out.append((end - timedelta(seconds=period_seconds), end))
    return out


def windows_for_interval(period_seconds: int, interval_start: datetime, interval_end: datetime,
                         min_age: timedelta) -> list[tuple[datetime, datetime]]:
    """The windows a run for data interval [S, E) exports: those whose end is in (S - age, E - age].

    Consecutive intervals tile time, so every window is exported by exactly one run, whether it ran on
    time, was retried or was backfilled; and no window younger than ``min_age`` is ever touched.
    """
    return windows_ending_in(period_seconds, interval_start - min_age, interval_end - min_age)
