"""EN interval arithmetic and UTC truncation; every function takes time as an argument."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

INTERVAL_SECONDS = 600
INTERVALS_PER_DAY = 144
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def interval_number(t: datetime) -> int:
    """floor(unix_seconds(t) / 600), the EN rolling interval that contains ``t``."""
    return int(t.timestamp()) // INTERVAL_SECONDS


def time_of_interval(n: int) -> datetime:
    return EPOCH + timedelta(seconds=n * INTERVAL_SECONDS)


def truncate(t: datetime, step: timedelta) -> datetime:
    """Go's time.Truncate: round down to a multiple of ``step`` since the Unix epoch (UTC aligned)."""
    step_s = int(step.total_seconds())
    if step_s <= 0:
        return t
    secs = int(t.timestamp())
    return EPOCH + timedelta(seconds=secs - secs % step_s)


def utc_midnight(t: datetime) -> datetime:
    return truncate(t, timedelta(days=1))


def days_between(a_interval: int, b_interval: int) -> int:
    """Whole UTC days from the day of interval ``a`` to the day of interval ``b``."""
    return (b_interval // INTERVALS_PER_DAY) - (a_interval // INTERVALS_PER_DAY)
