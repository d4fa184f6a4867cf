"""Parse and print Go-style durations (``90s``, ``15m``, ``1h30m``, ``14d``) used by ENP_* settings."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> timedelta:
    """Parse ``1h30m``-style text; a leading ``-`` negates. Raises ValueError on anything else."""
    raw = text.strip()
    sign = 1
    if raw.startswith("-"):
        sign, raw = -1, raw[1:]
    if raw == "0":
        return timedelta(0)
    pos = 0
    total = timedelta(0)
    for match in _PART.finditer(raw):
        if match.start() != pos:
            break
        try:
            total += float(match.group(1)) * _UNITS[match.group(2)]
        except OverflowError:  # e.g. 9999999999d: timedelta's range ends near 1e9 days
            raise ValueError(f"duration {text!r} is out of range") from None
        pos = match.end()
    if pos == 0 or pos != len(raw):
        raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 15m, 1h, 14d)")
    return sign * total


def format_duration(value: timedelta) -> str:
    """Render like Go's time.Duration.String for whole seconds (e.g. ``1m0s``, ``1h2m3s``)."""
    seconds = int(value.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"
