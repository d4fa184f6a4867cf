"""Per-batch statistics of what an export shipped (report types, days since onset, keys per day)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

REPORT_TYPE_NAMES = {0: "unknown", 1: "confirmed", 2: "likely", 3: "user-report", 4: "recursive", 5: "revoked"}


def shard_stats(primary: Any, revised: Any) -> dict[str, Any]:
    """Aggregates of one file's keys (never key material): counts that add up across shards."""
    frame = pd.DataFrame({
        "report_type": np.asarray(primary.report_type, dtype=np.int64),
        "dsos": np.where(np.asarray(primary.dsos_present, dtype=bool), np.asarray(primary.dsos), np.nan),
        "day": np.asarray(primary.interval_number, dtype=np.int64) // 144,
    })
    by_type = frame["report_type"].map(REPORT_TYPE_NAMES).value_counts()
    dsos = frame["dsos"].dropna().astype(int).value_counts()
    days = frame["day"].value_counts()
    revised_types = pd.Series(np.asarray(revised.report_type, dtype=np.int64)).map(REPORT_TYPE_NAMES).value_counts()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return {
        "keys": len(frame),
        "revised_keys": len(revised.report_type),
        "report_type": {str(k): int(v) for k, v in by_type.items()},
        "revised_report_type": {str(k): int(v) for k, v in revised_types.items()},
        "days_since_onset": {str(int(k)): int(v) for k, v in dsos.items()},
        "keys_per_day": {(epoch + timedelta(days=int(k))).date().isoformat(): int(v) for k, v in days.items()},
    }


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"keys": 0, "revised_keys": 0}
    for name in ("report_type", "revised_report_type", "days_since_onset", "keys_per_day"):
        total: Counter[str] = Counter()
        for part in parts:
            total.update(part.get(name, {}))
        merged[name] = dict(sorted(total.items(), key=lambda kv: _sort_key(kv[0])))
    for part in parts:
        merged["keys"] += int(part.get("keys", 0))
        merged["revised_keys"] += int(part.get("revised_keys", 0))
    return merged


def _sort_key(label: str) -> tuple[int, Any]:
    try:
        return (0, int(label))
    except ValueError:
        return (1, label)


def render(stats: dict[str, Any]) -> str:
    """A compact table for task logs."""
    lines = [f"keys={stats.get('keys', 0)} revised_keys={stats.get('revised_keys', 0)}"
             f" padding_keys={stats.get('padding_keys', 0)} files={stats.get('files', 0)}"
             f" bytes={stats.get('bytes', 0)}"]
    for name in ("report_type", "revised_report_type", "days_since_onset", "keys_per_day"):
        values = stats.get(name) or {}
        if values:
            series = pd.Series(values, name="keys")
            lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in series.items()))
    return "\n".join(lines)
