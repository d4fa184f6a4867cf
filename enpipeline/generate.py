"""Fill the exposure table with synthetic Temporary Exposure Keys for tests, demos and benchmarks.

Which days: with ``today`` the UTC date of ``now``, the ``days`` whole UTC days before it, i.e.
``today - days`` .. ``today - 1``. Today itself is never written, so no generated key is created after
``now`` and none lands in an export window that is still open.

Each day is one transaction: a long run shows progress day by day, and an interrupted run leaves
whole days behind, never half of one. Running again adds more keys (a fresh random seed gives fresh
keys); repeating an explicit seed over a day it already wrote is refused, since it would duplicate keys.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from sqlalchemy.engine import Engine

from enpipeline.db import synthetic

MAX_DAYS = 60
MAX_KEYS_PER_DAY = 50_000_000
_REGION = re.compile(r"[A-Z0-9]+")


class GenerateRefused(Exception):
    """Generating would mix synthetic keys with data that must not get them; the message says why."""


@dataclass(frozen=True)
class DayResult:
    day: date
    rows: int
    seconds: float


@dataclass
class GenerateReport:
    seed: int
    regions: list[str]
    days: list[DayResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(d.rows for d in self.days)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def normalize_regions(regions: list[str]) -> list[str]:
    """Upper-cased, de-duplicated and sorted like the regions of a real publish; raises ValueError."""
    out = sorted({r.strip().upper() for r in regions if r.strip()})
    if not out:
        raise ValueError("regions must name at least one region, e.g. US")
    bad = [r for r in out if not (r.isascii() and _REGION.fullmatch(r))]
    if bad:
        raise ValueError(f"regions may only contain ASCII letters and digits, got {', '.join(map(repr, bad))}")
    return out


def generation_days(now: datetime, days: int) -> list[date]:
    """The UTC days that ``generate_keys`` writes, oldest first (see the module docstring)."""
    today = now.astimezone(UTC).date()
    return [today - timedelta(days=days - i) for i in range(days)]


def _validate(days: int, keys_per_day: int, now: datetime) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}, got {days}")
    if not 1 <= keys_per_day <= MAX_KEYS_PER_DAY:
        raise ValueError(f"keys per day must be between 1 and {MAX_KEYS_PER_DAY:,}, got {keys_per_day}")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")


def generate_keys(engine: Engine, *, days: int, keys_per_day: int, regions: list[str], now: datetime,
                  force: bool = False, seed: int | None = None,
                  progress: Callable[[DayResult], None] | None = None) -> GenerateReport:
    """Write ``keys_per_day`` synthetic keys into each of the ``days`` UTC days before ``now``'s day.

    Raises ValueError for bad arguments and GenerateRefused, before writing anything, when the database
    holds real publishes (unless ``force``) or when ``seed`` already wrote one of the days.
    ``progress`` is called after each day commits.
    """
    _validate(days, keys_per_day, now)
    regions = normalize_regions(regions)
    seed = secrets.randbits(63) if seed is None else seed
    day_list = generation_days(now, days)

    with engine.begin() as conn:
        real = synthetic.count_real_publishes(conn)
        if real and not force:
            raise GenerateRefused(
                f"the database holds {real:,} real exposure key(s) (not from {synthetic.MARKER!r} or export "
                "padding); synthetic keys would be exported alongside them. Use --force (force=True) to write anyway")
        repeated = [d for d in day_list if synthetic.day_already_generated(conn, d, seed)]
        if repeated:
            raise GenerateRefused(
                f"seed {seed} already generated {repeated[0].isoformat()}"
                f"{f' and {len(repeated) - 1} more day(s)' if len(repeated) > 1 else ''}; the same seed gives the"
                " same keys, so use another seed (or none) to add more")

    report = GenerateReport(seed=seed, regions=regions)
    started = time.perf_counter()
    for day in day_list:
        day_started = time.perf_counter()
        with engine.begin() as conn:
            rows = synthetic.generate_day(conn, day, keys_per_day, regions, seed)
        result = DayResult(day, rows, time.perf_counter() - day_started)
        report.days.append(result)
        report.seconds = time.perf_counter() - started
        if progress:
            progress(result)
    return report
