"""SQLAlchemy Core table objects for statements built in Python; the schema itself is owned by ``sql/``."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

metadata = sa.MetaData()

exposure = sa.Table(
    "exposure",
    metadata,
    sa.Column("exposure_key", sa.LargeBinary, nullable=False),
    sa.Column("transmission_risk", sa.BigInteger, nullable=False),
    sa.Column("app_package_name", sa.Text),
    sa.Column("regions", pg.ARRAY(sa.Text), nullable=False),
    sa.Column("traveler", sa.Boolean, nullable=False),
    sa.Column("interval_number", sa.BigInteger, nullable=False),
    sa.Column("interval_count", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("local_provenance", sa.Boolean, nullable=False),
    sa.Column("sync_id", sa.BigInteger),
    sa.Column("sync_query_id", sa.Text),
    sa.Column("health_authority_id", sa.BigInteger),
    sa.Column("report_type", sa.Text, nullable=False),
    sa.Column("days_since_symptom_onset", sa.BigInteger),
    sa.Column("revised_report_type", sa.Text),
    sa.Column("revised_at", sa.DateTime(timezone=True)),
    sa.Column("revised_days_since_symptom_onset", sa.BigInteger),
    sa.Column("revised_transmission_risk", sa.BigInteger),
    sa.Column("export_import_id", sa.BigInteger),
    sa.Column("import_file_id", sa.BigInteger),
    sa.Column("revised_import_file_id", sa.BigInteger),
    sa.Column("padding_seq", sa.BigInteger),
)

EXPOSURE_COLUMNS = [c.name for c in exposure.columns]
