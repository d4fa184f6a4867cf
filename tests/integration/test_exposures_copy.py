"""Bulk inserts through COPY store exactly what the parameterised INSERT stores, whatever the text contains."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta

from enpipeline.db import exposures as exposures_db
from enpipeline.model import Exposure

T = datetime(2026, 11, 1, 10, tzinfo=UTC)
ODD = ["US", 'A"B', "C\\D", "E,F", "{G}", "H\tI", "J\nK", "Ł", "NULL", ""]


def row(i: int) -> Exposure:
    extra = {}
    if i % 5 == 0:  # every column filled, so a column written in the wrong place cannot go unnoticed
        extra = {"health_authority_id": 11, "revised_report_type": "negative", "revised_at": T + timedelta(hours=2),
                 "revised_days_since_symptom_onset": 2, "revised_transmission_risk": 6, "export_import_id": 12,
                 "import_file_id": 13, "revised_import_file_id": 14, "padding_seq": 15 + i}
    return Exposure(exposure_key=os.urandom(16), transmission_risk=i % 9, app_package_name=None if i % 2 else "a\\b\tc",
                    regions=[ODD[i % len(ODD)], "US"], traveler=bool(i % 3), interval_number=2_900_000 + i,
                    interval_count=144, created_at=T + timedelta(microseconds=i), local_provenance=False,
                    report_type="confirmed", days_since_symptom_onset=None if i % 4 else -3, sync_id=7,
                    sync_query_id="q-1", **extra)


def test_copy_and_insert_store_the_same_rows(engine):
    rows = [row(i) for i in range(exposures_db.COPY_THRESHOLD * 2)]
    exposures_db.PartitionGuard(engine).ensure(r.created_at for r in rows)
    few = rows[:3]  # below the threshold: parameterised INSERT
    many = rows[3:]  # COPY
    with engine.begin() as conn:
        assert exposures_db.insert_exposures(conn, few) == 3
        assert exposures_db.insert_exposures(conn, many) == len(many)
    with engine.connect() as conn:
        stored = exposures_db.read_keys(conn, [r.exposure_key for r in rows])
    for r in rows:
        got = stored[r.exposure_key]
        want = dataclasses.replace(r, regions=list(r.regions))
        assert dataclasses.asdict(got) == dataclasses.asdict(want)
