"""SQL of EFGS: gateway targets, pushed windows and their upload batches, download cursors and history."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from enpipeline.db.export import GENERATED_APP
from enpipeline.efgs.validation import PushRow

TARGET_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SOURCE_PREFIX = "efgs:"

# Batch statuses. PLANNED and the two failures are retried by the next push of the window; the others are final.
PLANNED, UPLOADED, SKIPPED, REJECTED, FAILED = "PLANNED", "UPLOADED", "SKIPPED", "REJECTED", "FAILED"
FINAL = (UPLOADED, SKIPPED)


def source_id(target_id: str) -> str:
    """exposure.sync_query_id of keys pulled from a target (':' never occurs in a federation query id)."""
    return SOURCE_PREFIX + target_id


class TargetExistsError(Exception):
    """add_target was given an id that is already configured."""


@dataclass(frozen=True)
class EfgsTarget:
    """One gateway we upload to and download from, as one country."""

    target_id: str
    url: str
    country: str
    client_cert: str            # PEM
    tls_credentials: str        # key reference, never the key
    signing_cert: str           # PEM
    signing_credentials: str    # key reference, never the key
    ca_cert: str | None = None  # PEM bundle
    created_at: datetime | None = None
    trust_anchor: str | None = None  # PEM bundle: signs every country's signing certificate (pulls need it)


_TARGET_COLUMNS = ("target_id, url, country, client_cert, tls_credentials, signing_cert, signing_credentials,"
                   " ca_cert, created_at, trust_anchor")


def add_target(conn: Connection, target: EfgsTarget, now: datetime) -> EfgsTarget:
    row = conn.execute(sa.text(
        f"INSERT INTO efgs_target ({_TARGET_COLUMNS}) VALUES (:target_id, :url, :country, :client_cert,"
        " :tls_credentials, :signing_cert, :signing_credentials, :ca_cert, :created_at, :trust_anchor)"
        f" ON CONFLICT (target_id) DO NOTHING RETURNING {_TARGET_COLUMNS}"),
        {**{f: getattr(target, f) for f in ("target_id", "url", "country", "client_cert", "tls_credentials",
                                            "signing_cert", "signing_credentials", "ca_cert", "trust_anchor")},
         "created_at": now}).one_or_none()
    if row is None:
        raise TargetExistsError(f"an EFGS target with id {target.target_id!r} already exists")
    return EfgsTarget(**row._asdict())


def set_trust_anchor(conn: Connection, target_id: str, trust_anchor: str) -> bool:
    """Replace a target's trust anchor; False if there is no such target."""
    return conn.execute(sa.text("UPDATE efgs_target SET trust_anchor = :a WHERE target_id = :t"),
                        {"a": trust_anchor, "t": target_id}).rowcount == 1


def get_target(conn: Connection, target_id: str) -> EfgsTarget | None:
    row = conn.execute(sa.text(f"SELECT {_TARGET_COLUMNS} FROM efgs_target WHERE target_id = :t"),
                       {"t": target_id}).one_or_none()
    return EfgsTarget(**row._asdict()) if row is not None else None


def list_targets(conn: Connection) -> list[EfgsTarget]:
    rows = conn.execute(sa.text(f"SELECT {_TARGET_COLUMNS} FROM efgs_target ORDER BY target_id"))
    return [EfgsTarget(**r._asdict()) for r in rows]


def list_target_ids(conn: Connection) -> list[str]:
    return list(conn.execute(sa.text("SELECT target_id FROM efgs_target ORDER BY target_id")).scalars())


def remove_target(conn: Connection, target_id: str) -> EfgsTarget | None:
    """Delete a target with its push and pull history; the keys it pulled stay. Returns what was removed."""
    row = conn.execute(sa.text(f"DELETE FROM efgs_target WHERE target_id = :t RETURNING {_TARGET_COLUMNS}"),
                       {"t": target_id}).one_or_none()
    return EfgsTarget(**row._asdict()) if row is not None else None


# -- one push and one pull at a time per target -------------------------------------------------------------

def try_lock(autocommit_conn: Connection, kind: str, target_id: str) -> bool:
    """Session advisory lock of a target's pushes (kind 'push') or pulls ('pull'); False when it is held."""
    return bool(autocommit_conn.execute(
        sa.text("SELECT pg_try_advisory_lock(hashtext(:k), hashtext(:t))"),
        {"k": f"enp_efgs_{kind}", "t": target_id}).scalar_one())


def unlock(autocommit_conn: Connection, kind: str, target_id: str) -> None:
    autocommit_conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:k), hashtext(:t))"),
                            {"k": f"enp_efgs_{kind}", "t": target_id})


# -- push: windows and upload batches -------------------------------------------------------------------------

# Keys we may upload: published here (local provenance and no source of any kind), not export padding, not
# revoked. The values are the revision's where a revision set them.
_PUSHABLE = (
    "e.local_provenance AND e.sync_query_id IS NULL AND e.sync_id IS NULL AND e.export_import_id IS NULL"
    " AND e.import_file_id IS NULL AND e.padding_seq IS NULL"
    f" AND e.app_package_name IS DISTINCT FROM '{GENERATED_APP}'"
    " AND COALESCE(e.revised_report_type, e.report_type) <> 'negative'")
# A key whose created_at lies in an earlier window of the target belongs to that window.
_IN_WINDOW = (
    "e.created_at >= :start AND e.created_at < :end AND NOT EXISTS (SELECT 1 FROM efgs_push_window w"
    " WHERE w.target_id = :target AND w.window_id < :window_id"
    " AND e.created_at >= w.window_start AND e.created_at < w.window_end)")


@dataclass
class UploadBatch:
    window_id: int
    batch_num: int
    target_id: str
    window_start: datetime
    window_end: datetime
    batch_tag: str
    key_from: bytes | None
    key_to: bytes | None
    key_count: int
    keys_sent: int = 0
    status: str = PLANNED
    http_status: int | None = None
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 0
    uploaded_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class PushWindow:
    window_id: int
    target_id: str
    window_start: datetime
    window_end: datetime
    key_count: int
    batches: int
    planned_at: datetime


_BATCH_COLUMNS = ("window_id, batch_num, target_id, window_start, window_end, batch_tag, key_from, key_to,"
                  " key_count, keys_sent, status, http_status, results, error, attempts, uploaded_at, updated_at")
_WINDOW_COLUMNS = "window_id, target_id, window_start, window_end, key_count, batches, planned_at"


def _batch(row: sa.Row) -> UploadBatch:
    values = row._asdict()
    for name in ("key_from", "key_to"):
        values[name] = bytes(values[name]) if values[name] is not None else None
    values["results"] = dict(values["results"] or {})
    return UploadBatch(**values)


def get_window(conn: Connection, target_id: str, start: datetime, end: datetime) -> PushWindow | None:
    row = conn.execute(sa.text(f"SELECT {_WINDOW_COLUMNS} FROM efgs_push_window WHERE target_id = :t"
                               " AND window_start = :s AND window_end = :e"),
                       {"t": target_id, "s": start, "e": end}).one_or_none()
    return PushWindow(**row._asdict()) if row is not None else None


def last_window_end(conn: Connection, target_id: str) -> datetime | None:
    """Where the target's pushed windows end (the latest end), None before its first push."""
    return conn.execute(sa.text("SELECT max(window_end) FROM efgs_push_window WHERE target_id = :t"),
                        {"t": target_id}).scalar_one()


def add_window(conn: Connection, target_id: str, start: datetime, end: datetime, now: datetime) -> int:
    return conn.execute(sa.text(
        "INSERT INTO efgs_push_window (target_id, window_start, window_end, key_count, batches, planned_at)"
        " VALUES (:t, :s, :e, 0, 0, :now) RETURNING window_id"), {"t": target_id, "s": start, "e": end, "now": now}
    ).scalar_one()


def window_keys(conn: Connection, target_id: str, window_id: int, start: datetime, end: datetime) -> list[bytes]:
    """The window's pushable keys, sorted by key bytes (the order the upload batches split)."""
    rows = conn.execute(sa.text(f"SELECT e.exposure_key FROM exposure e WHERE {_PUSHABLE} AND {_IN_WINDOW}"
                                " ORDER BY e.exposure_key"),
                        {"target": target_id, "window_id": window_id, "start": start, "end": end}).scalars()
    return [bytes(k) for k in rows]


def save_plan(conn: Connection, window_id: int, key_count: int, batches: Sequence[UploadBatch],
              now: datetime) -> None:
    conn.execute(sa.text("UPDATE efgs_push_window SET key_count = :n, batches = :b WHERE window_id = :w"),
                 {"n": key_count, "b": len(batches), "w": window_id})
    if batches:
        conn.execute(sa.text(
            f"INSERT INTO efgs_upload_batch ({_BATCH_COLUMNS}) VALUES (:window_id, :batch_num, :target_id,"
            " :window_start, :window_end, :batch_tag, :key_from, :key_to, :key_count, 0, :status, NULL,"
            " CAST('{}' AS JSONB), NULL, 0, NULL, :now)"),
            [{"window_id": b.window_id, "batch_num": b.batch_num, "target_id": b.target_id,
              "window_start": b.window_start, "window_end": b.window_end, "batch_tag": b.batch_tag,
              "key_from": b.key_from, "key_to": b.key_to, "key_count": b.key_count, "status": b.status, "now": now}
             for b in batches])


def window_batches(conn: Connection, window_id: int) -> list[UploadBatch]:
    rows = conn.execute(sa.text(f"SELECT {_BATCH_COLUMNS} FROM efgs_upload_batch WHERE window_id = :w"
                                " ORDER BY batch_num"), {"w": window_id})
    return [_batch(r) for r in rows]


def batch_keys(conn: Connection, batch: UploadBatch, window: PushWindow) -> list[PushRow]:
    """The keys of one planned batch: the window's pushable keys in [key_from, key_to)."""
    where = [_PUSHABLE, _IN_WINDOW]
    params: dict[str, Any] = {"target": window.target_id, "window_id": window.window_id,
                              "start": window.window_start, "end": window.window_end}
    if batch.key_from is not None:
        where.append("e.exposure_key >= :key_from")
        params["key_from"] = batch.key_from
    if batch.key_to is not None:
        where.append("e.exposure_key < :key_to")
        params["key_to"] = batch.key_to
    rows = conn.execute(sa.text(
        "SELECT e.exposure_key, COALESCE(e.revised_transmission_risk, e.transmission_risk) AS transmission_risk,"
        " e.interval_number, e.interval_count, COALESCE(e.revised_report_type, e.report_type) AS report_type,"
        " CASE WHEN e.revised_at IS NULL THEN e.days_since_symptom_onset"
        " ELSE e.revised_days_since_symptom_onset END AS days_since_onset, e.regions, e.created_at"
        f" FROM exposure e WHERE {' AND '.join(where)} ORDER BY e.exposure_key"), params)
    return [PushRow(bytes(r.exposure_key), r.transmission_risk, r.interval_number, r.interval_count,
                    r.report_type, r.days_since_onset, tuple(r.regions or ()), r.created_at) for r in rows]


def record_batch(conn: Connection, batch: UploadBatch, now: datetime) -> None:
    """Store a batch's outcome; a final batch's key boundaries (key bytes) are cleared, they are not needed again."""
    final = batch.status in FINAL
    conn.execute(sa.text(
        "UPDATE efgs_upload_batch SET status = :status, http_status = :http_status, keys_sent = :keys_sent,"
        " results = CAST(:results AS JSONB), error = :error, attempts = attempts + 1, uploaded_at = :uploaded_at,"
        " updated_at = :now, key_from = CASE WHEN :final THEN NULL ELSE key_from END,"
        " key_to = CASE WHEN :final THEN NULL ELSE key_to END WHERE window_id = :w AND batch_num = :n"),
        {"status": batch.status, "http_status": batch.http_status, "keys_sent": batch.keys_sent,
         "results": json.dumps(batch.results, sort_keys=True), "error": batch.error,
         "uploaded_at": batch.uploaded_at, "now": now, "final": final, "w": batch.window_id,
         "n": batch.batch_num})


def list_batches(conn: Connection, target_id: str, limit: int = 50) -> list[UploadBatch]:
    """A target's upload batches, newest window first."""
    rows = conn.execute(sa.text(f"SELECT {_BATCH_COLUMNS} FROM efgs_upload_batch WHERE target_id = :t"
                                " ORDER BY window_start DESC, window_end DESC, batch_num LIMIT :n"),
                        {"t": target_id, "n": limit})
    return [_batch(r) for r in rows]


# -- pull: cursors and downloads ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PullCursor:
    target_id: str
    day: date
    last_batch_tag: str
    next_batch_tag: str | None
    batches: int
    updated_at: datetime


def get_cursor(conn: Connection, target_id: str, day: date) -> PullCursor | None:
    row = conn.execute(sa.text("SELECT target_id, day, last_batch_tag, next_batch_tag, batches, updated_at"
                               " FROM efgs_pull_cursor WHERE target_id = :t AND day = :d"),
                       {"t": target_id, "d": day}).one_or_none()
    return PullCursor(**row._asdict()) if row is not None else None


def list_cursors(conn: Connection, target_id: str) -> list[PullCursor]:
    rows = conn.execute(sa.text("SELECT target_id, day, last_batch_tag, next_batch_tag, batches, updated_at"
                                " FROM efgs_pull_cursor WHERE target_id = :t ORDER BY day DESC"), {"t": target_id})
    return [PullCursor(**r._asdict()) for r in rows]


def save_cursor(conn: Connection, target_id: str, day: date, last_tag: str, next_tag: str | None, now: datetime,
                *, stored: bool) -> None:
    """Move a day's cursor; call it in the transaction that stores the batch's keys (``stored``: a batch was
    processed, not only its link re-read)."""
    conn.execute(sa.text(
        "INSERT INTO efgs_pull_cursor (target_id, day, last_batch_tag, next_batch_tag, batches, updated_at)"
        " VALUES (:t, :d, :last, :next, :inc, :now) ON CONFLICT (target_id, day) DO UPDATE"
        " SET last_batch_tag = EXCLUDED.last_batch_tag, next_batch_tag = EXCLUDED.next_batch_tag,"
        " batches = efgs_pull_cursor.batches + EXCLUDED.batches, updated_at = EXCLUDED.updated_at"),
        {"t": target_id, "d": day, "last": last_tag, "next": next_tag, "inc": 1 if stored else 0, "now": now})


@dataclass(frozen=True)
class EfgsDownload:
    download_id: int
    target_id: str
    day: date
    started: datetime
    completed: datetime | None
    batches: int
    keys_received: int
    insertions: int
    revisions: int
    skipped: int
    rejected: int
    own_origin: int
    refused: int
    refused_countries: list[str]
    last_batch_tag: str | None
    error: str | None


_DOWNLOAD_COLUMNS = ("download_id, target_id, day, started, completed, batches, keys_received, insertions,"
                     " revisions, skipped, rejected, own_origin, refused, refused_countries, last_batch_tag, error")


def start_download(conn: Connection, target_id: str, day: date, started: datetime) -> int:
    return conn.execute(sa.text("INSERT INTO efgs_download (target_id, day, started) VALUES (:t, :d, :s)"
                                " RETURNING download_id"), {"t": target_id, "d": day, "s": started}).scalar_one()


def record_download_batch(conn: Connection, download_id: int, *, batch_tag: str, received: int, inserted: int,
                          revised: int, skipped: int, rejected: int, own_origin: int, refused: int,
                          refused_countries: Sequence[str]) -> None:
    """Add one stored batch to the download's counters (in the batch's transaction)."""
    conn.execute(sa.text(
        "UPDATE efgs_download SET batches = batches + 1, keys_received = keys_received + :rec,"
        " insertions = insertions + :ins, revisions = revisions + :rev, skipped = skipped + :skip,"
        " rejected = rejected + :rej, own_origin = own_origin + :own, refused = refused + :ref,"
        " refused_countries = ARRAY(SELECT DISTINCT unnest(refused_countries || CAST(:countries AS TEXT[]))"
        " ORDER BY 1), last_batch_tag = :tag WHERE download_id = :id"),
        {"id": download_id, "rec": received, "ins": inserted, "rev": revised, "skip": skipped, "rej": rejected,
         "own": own_origin, "ref": refused, "countries": list(refused_countries), "tag": batch_tag})


def finish_download(conn: Connection, download_id: int, completed: datetime) -> None:
    conn.execute(sa.text("UPDATE efgs_download SET completed = :c, error = NULL WHERE download_id = :id"),
                 {"id": download_id, "c": completed})


def fail_download(conn: Connection, download_id: int, error: str) -> None:
    conn.execute(sa.text("UPDATE efgs_download SET error = :e WHERE download_id = :id"),
                 {"id": download_id, "e": error})


def get_download(conn: Connection, download_id: int) -> EfgsDownload | None:
    row = conn.execute(sa.text(f"SELECT {_DOWNLOAD_COLUMNS} FROM efgs_download WHERE download_id = :id"),
                       {"id": download_id}).one_or_none()
    return _download(row) if row is not None else None


def list_downloads(conn: Connection, target_id: str, limit: int = 20) -> list[EfgsDownload]:
    rows = conn.execute(sa.text(f"SELECT {_DOWNLOAD_COLUMNS} FROM efgs_download WHERE target_id = :t"
                                " ORDER BY started DESC, download_id DESC LIMIT :n"), {"t": target_id, "n": limit})
    return [_download(r) for r in rows]


def _download(row: sa.Row) -> EfgsDownload:
    values = row._asdict()
    values["refused_countries"] = list(values["refused_countries"] or [])
    return EfgsDownload(**values)
