"""SQL of the export pipeline: signature infos, export configs, batches, shard plans, files, key reads."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

GENERATED_APP = "export-generated"

# --- signature infos --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureInfoRow:
    id: int
    name: str
    signing_key: str
    verification_key_id: str
    verification_key_version: str
    signature_algorithm: str
    from_timestamp: datetime
    thru_timestamp: datetime | None

    def is_active(self, at: datetime) -> bool:
        return self.from_timestamp <= at and (self.thru_timestamp is None or self.thru_timestamp > at)


_SI_COLS = ("id, name, signing_key, verification_key_id, verification_key_version, signature_algorithm,"
            " from_timestamp, thru_timestamp")


def add_signature_info(conn: Connection, *, name: str, signing_key: str, key_id: str, key_version: str,
                       algorithm: str, from_timestamp: datetime, thru_timestamp: datetime | None,
                       now: datetime) -> int:
    return conn.execute(sa.text(
        "INSERT INTO signature_info (name, signing_key, verification_key_id, verification_key_version,"
        " signature_algorithm, from_timestamp, thru_timestamp, created_at)"
        " VALUES (:n, :sk, :kid, :kv, :alg, :f, :t, :now) RETURNING id"),
        {"n": name, "sk": signing_key, "kid": key_id, "kv": key_version, "alg": algorithm, "f": from_timestamp,
         "t": thru_timestamp, "now": now}).scalar_one()


def list_signature_infos(conn: Connection, ids: Sequence[int] | None = None) -> list[SignatureInfoRow]:
    if ids is None:
        rows = conn.execute(sa.text(f"SELECT {_SI_COLS} FROM signature_info ORDER BY id"))
    else:
        rows = conn.execute(sa.text(f"SELECT {_SI_COLS} FROM signature_info WHERE id = ANY(:ids) ORDER BY id"),
                            {"ids": list(ids)})
    return [SignatureInfoRow(**r._asdict()) for r in rows]


def get_signature_info(conn: Connection, name: str) -> SignatureInfoRow | None:
    row = conn.execute(sa.text(f"SELECT {_SI_COLS} FROM signature_info WHERE name = :n"), {"n": name}).first()
    return SignatureInfoRow(**row._asdict()) if row else None


def set_signature_info_thru(conn: Connection, name: str, thru: datetime | None) -> bool:
    return conn.execute(sa.text("UPDATE signature_info SET thru_timestamp = :t WHERE name = :n"),
                        {"t": thru, "n": name}).rowcount > 0


# --- export configs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportConfigRow:
    config_id: int
    name: str
    bucket_name: str
    filename_root: str
    period_seconds: int
    output_region: str
    input_regions: tuple[str, ...]
    include_travelers: bool
    only_non_travelers: bool
    exclude_regions: tuple[str, ...]
    max_records_override: int | None
    signature_info_ids: tuple[int, ...]
    from_timestamp: datetime
    thru_timestamp: datetime | None
    disabled: bool


_EC_COLS = ("config_id, name, bucket_name, filename_root, period_seconds, output_region, input_regions,"
            " include_travelers, only_non_travelers, exclude_regions, max_records_override, signature_info_ids,"
            " from_timestamp, thru_timestamp, disabled")


def _config(row: sa.Row) -> ExportConfigRow:
    values = row._asdict()
    for name in ("input_regions", "exclude_regions", "signature_info_ids"):
        values[name] = tuple(values[name] or ())
    return ExportConfigRow(**values)


def add_export_config(conn: Connection, cfg: ExportConfigRow) -> int:
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items() if k != "config_id"}
    cols = ", ".join(values)
    return conn.execute(sa.text(f"INSERT INTO export_config ({cols}) VALUES ({', '.join(':' + c for c in values)})"
                                " RETURNING config_id"), values).scalar_one()


def list_export_configs(conn: Connection, *, include_disabled: bool = True) -> list[ExportConfigRow]:
    where = "" if include_disabled else "WHERE NOT disabled"
    return [_config(r) for r in conn.execute(sa.text(f"SELECT {_EC_COLS} FROM export_config {where} ORDER BY name"))]


def get_export_config(conn: Connection, *, name: str | None = None, config_id: int | None = None
                      ) -> ExportConfigRow | None:
    if name is not None:
        row = conn.execute(sa.text(f"SELECT {_EC_COLS} FROM export_config WHERE name = :v"), {"v": name}).first()
    else:
        row = conn.execute(sa.text(f"SELECT {_EC_COLS} FROM export_config WHERE config_id = :v"),
                           {"v": config_id}).first()
    return _config(row) if row else None


def set_export_config_disabled(conn: Connection, name: str, disabled: bool) -> bool:
    return conn.execute(sa.text("UPDATE export_config SET disabled = :d WHERE name = :n"),
                        {"d": disabled, "n": name}).rowcount > 0


def set_export_config_signature_infos(conn: Connection, name: str, ids: Sequence[int]) -> bool:
    return conn.execute(sa.text("UPDATE export_config SET signature_info_ids = :ids WHERE name = :n"),
                        {"ids": list(ids), "n": name}).rowcount > 0


# --- batches ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchRow:
    batch_id: int
    config_id: int
    start_timestamp: datetime
    end_timestamp: datetime
    status: str
    bucket_name: str
    filename_root: str
    output_region: str
    input_regions: tuple[str, ...]
    include_travelers: bool
    only_non_travelers: bool
    exclude_regions: tuple[str, ...]
    max_records: int
    file_count: int | None
    padding_key_count: int | None = None
    padding_seq_max: int = 0


_B_COLS = ("batch_id, config_id, start_timestamp, end_timestamp, status, bucket_name, filename_root, output_region,"
           " input_regions, include_travelers, only_non_travelers, exclude_regions, max_records, file_count,"
           " padding_key_count, padding_seq_max")


def _batch(row: sa.Row) -> BatchRow:
    values = row._asdict()
    values["input_regions"] = tuple(values["input_regions"] or ())
    values["exclude_regions"] = tuple(values["exclude_regions"] or ())
    return BatchRow(**values)


def ensure_batch(conn: Connection, cfg: ExportConfigRow, start: datetime, end: datetime, max_records: int,
                 now: datetime) -> BatchRow:
    """The batch of (config, window), created with a snapshot of the config if it does not exist yet."""
    conn.execute(sa.text(
        "INSERT INTO export_batch (config_id, start_timestamp, end_timestamp, bucket_name, filename_root,"
        " output_region, input_regions, include_travelers, only_non_travelers, exclude_regions, max_records,"
        " created_at) VALUES (:c, :s, :e, :b, :root, :out, :inr, :inct, :onlynt, :excl, :maxr, :now)"
        " ON CONFLICT (config_id, start_timestamp, end_timestamp) DO NOTHING"),
        {"c": cfg.config_id, "s": start, "e": end, "b": cfg.bucket_name, "root": cfg.filename_root,
         "out": cfg.output_region, "inr": list(cfg.input_regions), "inct": cfg.include_travelers,
         "onlynt": cfg.only_non_travelers, "excl": list(cfg.exclude_regions), "maxr": max_records, "now": now})
    return get_batch_for(conn, cfg.config_id, start, end)


def find_batch(conn: Connection, config_id: int, start: datetime, end: datetime) -> BatchRow | None:
    row = conn.execute(sa.text(f"SELECT {_B_COLS} FROM export_batch WHERE config_id = :c AND start_timestamp = :s"
                               " AND end_timestamp = :e"), {"c": config_id, "s": start, "e": end}).first()
    return _batch(row) if row else None


def get_batch_for(conn: Connection, config_id: int, start: datetime, end: datetime) -> BatchRow:
    batch = find_batch(conn, config_id, start, end)
    if batch is None:
        raise LookupError(f"no export batch for config {config_id} window {start.isoformat()}..{end.isoformat()}")
    return batch


def get_batch(conn: Connection, batch_id: int, *, for_update: bool = False) -> BatchRow:
    lock = " FOR UPDATE" if for_update else ""
    return _batch(conn.execute(sa.text(f"SELECT {_B_COLS} FROM export_batch WHERE batch_id = :b{lock}"),
                               {"b": batch_id}).one())


def lock_batch(conn: Connection, batch_id: int) -> None:
    """Serialise planning and finalising of one batch across processes (until the transaction ends)."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('enp_export_batch'), CAST(:b AS INTEGER))"),
                 {"b": batch_id})


def lock_planning(conn: Connection) -> None:
    """Serialise batch planning (padding creation) across processes, until the transaction ends."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('enp_export_plan'))"))


def next_padding_seqs(conn: Connection, n: int) -> list[int]:
    return list(conn.execute(sa.text("SELECT nextval('exposure_padding_seq') FROM generate_series(1, :n)"),
                             {"n": n}).scalars())


def padding_seq_high_water(conn: Connection) -> int:
    """The highest padding number handed out so far (call it under lock_planning)."""
    last, called = conn.execute(sa.text("SELECT last_value, is_called FROM exposure_padding_seq")).one()
    return int(last) if called else 0


def lock_index(conn: Connection, config_id: int) -> None:
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('enp_export_index'), CAST(:c AS INTEGER))"),
                 {"c": config_id})


def set_batch_planned(conn: Connection, batch_id: int, *, key_count: int, revised_key_count: int,
                      padding_key_count: int, file_count: int, padding_seq_max: int) -> None:
    conn.execute(sa.text(
        "UPDATE export_batch SET status = 'PENDING', key_count = :k, revised_key_count = :r, padding_key_count = :p,"
        " file_count = :f, padding_seq_max = :seq, completed_at = NULL WHERE batch_id = :b"),
        {"k": key_count, "r": revised_key_count, "p": padding_key_count, "f": file_count, "seq": padding_seq_max,
         "b": batch_id})


def set_batch_complete(conn: Connection, batch_id: int, stats: dict[str, Any], now: datetime) -> None:
    conn.execute(sa.text("UPDATE export_batch SET status = 'COMPLETE', stats = CAST(:s AS JSONB), completed_at = :now"
                         " WHERE batch_id = :b"), {"s": _json(stats), "now": now, "b": batch_id})


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


# --- shard plans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRow:
    batch_id: int
    shard_num: int
    primary_from: bytes | None
    primary_to: bytes | None
    has_primary: bool
    revised_from: bytes | None
    revised_to: bytes | None
    has_revised: bool


def replace_shards(conn: Connection, batch_id: int, shards: Sequence[ShardRow]) -> None:
    conn.execute(sa.text("DELETE FROM export_shard WHERE batch_id = :b"), {"b": batch_id})
    if shards:
        conn.execute(sa.text(
            "INSERT INTO export_shard (batch_id, shard_num, primary_from, primary_to, has_primary, revised_from,"
            " revised_to, has_revised) VALUES (:batch_id, :shard_num, :primary_from, :primary_to, :has_primary,"
            " :revised_from, :revised_to, :has_revised)"), [s.__dict__ for s in shards])


def get_shard(conn: Connection, batch_id: int, shard_num: int) -> ShardRow:
    row = conn.execute(sa.text("SELECT * FROM export_shard WHERE batch_id = :b AND shard_num = :n"),
                       {"b": batch_id, "n": shard_num}).one()
    values = row._asdict()
    for name in ("primary_from", "primary_to", "revised_from", "revised_to"):
        if values[name] is not None:
            values[name] = bytes(values[name])
    return ShardRow(**values)


def list_shard_nums(conn: Connection, batch_id: int) -> list[int]:
    return list(conn.execute(sa.text("SELECT shard_num FROM export_shard WHERE batch_id = :b ORDER BY 1"),
                             {"b": batch_id}).scalars())


# --- files ------------------------------------------------------------------------------------------


def upsert_file(conn: Connection, *, bucket: str, filename: str, batch_id: int, batch_num: int, batch_size: int,
                key_count: int, revised_key_count: int, size: int, sha256: str, stats: dict[str, Any],
                now: datetime) -> None:
    conn.execute(sa.text(
        "INSERT INTO export_file (bucket_name, filename, batch_id, batch_num, batch_size, key_count,"
        " revised_key_count, bytes, sha256, stats, status, created_at)"
        " VALUES (:bucket, :fn, :b, :num, :size_n, :k, :r, :bytes, :sha, CAST(:stats AS JSONB), 'COMPLETE', :now)"
        " ON CONFLICT (bucket_name, filename) DO UPDATE SET batch_id = EXCLUDED.batch_id,"
        " batch_num = EXCLUDED.batch_num, batch_size = EXCLUDED.batch_size, key_count = EXCLUDED.key_count,"
        " revised_key_count = EXCLUDED.revised_key_count, bytes = EXCLUDED.bytes, sha256 = EXCLUDED.sha256,"
        " stats = EXCLUDED.stats, status = 'COMPLETE'"),
        {"bucket": bucket, "fn": filename, "b": batch_id, "num": batch_num, "size_n": batch_size, "k": key_count,
         "r": revised_key_count, "bytes": size, "sha": sha256, "stats": _json(stats), "now": now})


@dataclass(frozen=True)
class FileRow:
    bucket_name: str
    filename: str
    batch_num: int
    key_count: int
    revised_key_count: int
    bytes: int
    sha256: str
    stats: dict[str, Any]


def files_of_batch(conn: Connection, batch_id: int) -> list[FileRow]:
    rows = conn.execute(sa.text(
        "SELECT bucket_name, filename, batch_num, key_count, revised_key_count, bytes, sha256, stats FROM export_file"
        " WHERE batch_id = :b AND status = 'COMPLETE' ORDER BY batch_num"), {"b": batch_id})
    return [FileRow(**r._asdict()) for r in rows]


def file_recorded(conn: Connection, bucket: str, filename: str) -> bool:
    """Whether a file row (in any state, DEL_PEND included) records the object."""
    return conn.execute(sa.text("SELECT EXISTS (SELECT 1 FROM export_file WHERE bucket_name = :b AND filename = :f)"),
                        {"b": bucket, "f": filename}).scalar_one()


def delete_file_rows(conn: Connection, bucket: str, filenames: Sequence[str]) -> None:
    conn.execute(sa.text("DELETE FROM export_file WHERE bucket_name = :b AND filename = ANY(:f)"),
                 {"b": bucket, "f": list(filenames)})


def index_filenames(conn: Connection, config_id: int, since: datetime) -> list[str]:
    """Live files of the config's complete batches that start inside retention, sorted as index.txt wants."""
    return list(conn.execute(sa.text(
        "SELECT f.filename FROM export_file f JOIN export_batch b ON b.batch_id = f.batch_id"
        " WHERE b.config_id = :c AND b.status = 'COMPLETE' AND f.status = 'COMPLETE' AND b.start_timestamp >= :since"
        " ORDER BY f.filename COLLATE \"C\""), {"c": config_id, "since": since}).scalars())


# --- keys of a window -------------------------------------------------------------------------------

REPORT_TYPE_SQL = ("CASE {col} WHEN 'confirmed' THEN 1 WHEN 'likely' THEN 2 WHEN 'user-report' THEN 3"
                   " WHEN 'negative' THEN 5 ELSE 0 END")


def _filters(batch: BatchRow, time_col: str) -> tuple[str, dict[str, Any]]:
    """Window + region/traveler filters, correct for any number of input regions (the reference's SQL
    applied no region filter at all with two or more)."""
    params: dict[str, Any] = {"start": batch.start_timestamp, "end": batch.end_timestamp,
                              "input_regions": list(batch.input_regions or (batch.output_region,))}
    where = [f"{time_col} >= :start", f"{time_col} < :end"]
    region = "regions && CAST(:input_regions AS TEXT[])"
    where.append(f"({region} OR traveler)" if batch.include_travelers else region)
    if batch.only_non_travelers:
        where.append("NOT traveler")
    if batch.exclude_regions:
        where.append("NOT (regions && CAST(:exclude_regions AS TEXT[]))")
        params["exclude_regions"] = list(batch.exclude_regions)
    return " AND ".join(where), params


def padding_sources(conn: Connection, batch: BatchRow) -> list[sa.Row]:
    """Real primary keys of the window (metadata only is cloned), in key order."""
    where, params = _filters(batch, "created_at")
    return list(conn.execute(sa.text(
        "SELECT exposure_key, transmission_risk, regions, traveler, interval_number, interval_count, report_type,"
        " days_since_symptom_onset, health_authority_id, created_at FROM exposure"
        f" WHERE app_package_name IS DISTINCT FROM '{GENERATED_APP}' AND {where} ORDER BY exposure_key"), params))


_BIND = re.compile(r"(?<!:):([a-z_]+)\b")

# Binary COPY rows of fixed width: 7 columns, all NOT NULL, so numpy can view the stream directly.
_COPY_HEADER = 19
_ROW_DTYPE = np.dtype([
    ("nfields", ">i2"),
    ("l_key", ">i4"), ("key", "u1", (16,)),
    ("l_tr", ">i4"), ("tr", ">i8"),
    ("l_in", ">i4"), ("interval_number", ">i8"),
    ("l_ic", ">i4"), ("interval_count", ">i8"),
    ("l_rt", ">i4"), ("report_type", ">i2"),
    ("l_dsos", ">i4"), ("dsos", ">i8"),
    ("l_dp", ">i4"), ("dsos_present", "u1"),
])


@dataclass
class KeyArrays:
    key: np.ndarray
    transmission_risk: np.ndarray
    interval_number: np.ndarray
    interval_count: np.ndarray
    report_type: np.ndarray
    dsos: np.ndarray
    dsos_present: np.ndarray


def _window_where(batch: BatchRow, revised: bool, key_from: bytes | None = None, key_to: bytes | None = None,
                  *, planned: bool = False) -> tuple[str, dict[str, Any]]:
    where, params = _filters(batch, "revised_at" if revised else "created_at")
    if revised:
        where = "revised_at IS NOT NULL AND " + where
    elif planned:
        # Only the padding that existed when the batch was planned (sql/0003).
        where += (f" AND (app_package_name IS DISTINCT FROM '{GENERATED_APP}'"
                  " OR COALESCE(padding_seq, 0) <= :padding_seq_max)")
        params["padding_seq_max"] = batch.padding_seq_max
    if key_from is not None:
        where += " AND exposure_key >= :key_from"
        params["key_from"] = key_from
    if key_to is not None:
        where += " AND exposure_key < :key_to"
        params["key_to"] = key_to
    return where, params


def _copy_rows(conn: Connection, select: str, where: str, params: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    """Rows of ``SELECT select FROM exposure WHERE where`` through a binary COPY, viewed as ``dtype``.

    Every selected column is NOT NULL and fixed-width, so each row has the same layout and numpy can view
    the stream without a per-row Python loop.
    """
    cursor = conn.connection.driver_connection.cursor()
    try:
        # COPY takes no bind parameters: psycopg2 quotes them into the statement instead.
        psycopg_where = _BIND.sub(r"%(\1)s", where)
        query = cursor.mogrify(f"SELECT {select} FROM exposure WHERE {psycopg_where}", params).decode()
        buf = io.BytesIO()
        cursor.copy_expert(f"COPY ({query}) TO STDOUT WITH (FORMAT binary)", buf)
    finally:
        cursor.close()
    data = buf.getbuffer()
    n = (len(data) - _COPY_HEADER - 2) // dtype.itemsize
    rows = np.frombuffer(data, dtype=dtype, count=n, offset=_COPY_HEADER)
    if n and (rows["nfields"] != len(dtype.names) // 2).any():
        raise RuntimeError("unexpected COPY row layout")
    return rows


_KEY_DTYPE = np.dtype([("nfields", ">i2"), ("l_key", ">i4"), ("key", "u1", (16,)),
                       ("l_generated", ">i4"), ("generated", "u1")])


def read_window_keys(conn: Connection, batch: BatchRow, *, revised: bool) -> tuple[np.ndarray, np.ndarray]:
    """(keys as an (n, 16) uint8 array, is-padding flags) of the window: one cheap read to count and split."""
    where, params = _window_where(batch, revised)
    rows = _copy_rows(conn, f"exposure_key, app_package_name IS NOT DISTINCT FROM '{GENERATED_APP}'", where, params,
                      _KEY_DTYPE)
    return np.ascontiguousarray(rows["key"]), rows["generated"].astype(bool)


def read_shard_keys(conn: Connection, batch: BatchRow, *, revised: bool, key_from: bytes | None,
                    key_to: bytes | None) -> KeyArrays:
    """Keys of one shard slice as numpy columns, read with a binary COPY (the export hot path)."""
    where, params = _window_where(batch, revised, key_from, key_to, planned=True)
    if revised:
        # The revision's own TR: the reference exported the original TR with the revised report type.
        select = (f"exposure_key, COALESCE(revised_transmission_risk, transmission_risk), interval_number,"
                  f" interval_count, ({REPORT_TYPE_SQL.format(col='revised_report_type')})::int2,"
                  f" COALESCE(revised_days_since_symptom_onset, 0),"
                  f" revised_days_since_symptom_onset IS NOT NULL")
    else:
        select = (f"exposure_key, transmission_risk, interval_number, interval_count,"
                  f" ({REPORT_TYPE_SQL.format(col='report_type')})::int2, COALESCE(days_since_symptom_onset, 0),"
                  f" days_since_symptom_onset IS NOT NULL")
    rows = _copy_rows(conn, select, where, params, _ROW_DTYPE)
    return KeyArrays(
        key=np.ascontiguousarray(rows["key"]),
        transmission_risk=rows["tr"].astype(np.int64),
        interval_number=rows["interval_number"].astype(np.int64),
        interval_count=rows["interval_count"].astype(np.int64),
        report_type=rows["report_type"].astype(np.int8),
        dsos=rows["dsos"].astype(np.int64),
        dsos_present=rows["dsos_present"].astype(bool),
    )
