"""The export pipeline: plan a window's batch and shards, write each shard's signed file, finalise, index.

Every step is idempotent over its window: the batch row, padding keys and shard plan are persisted in
one transaction, file names are deterministic, signatures are deterministic (RFC 6979), and the index
is rebuilt from the database. Re-runs, retries and backfills therefore converge on the same files.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection, Engine

from enpipeline.blobstore import Blobstore
from enpipeline.config import Settings
from enpipeline.db import export as export_db
from enpipeline.db import exposures as exposures_db
from enpipeline.export import format as fmt
from enpipeline.export.signing import KeyManager
from enpipeline.export.stats import merge_stats, render, shard_stats
from enpipeline.export.windows import is_aligned, windows_for_interval
from enpipeline.model import Exposure

log = logging.getLogger(__name__)

INDEX_NAME = "index.txt"


@dataclass(frozen=True)
class ShardTask:
    """What a shard task needs: ids only, so task messages (XCom) never carry key material."""

    batch_id: int
    shard_num: int
    config: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "shard_num": self.shard_num, "config": self.config}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardTask:
        return cls(int(data["batch_id"]), int(data["shard_num"]), str(data.get("config", "")))


@dataclass
class PlanResult:
    tasks: list[ShardTask] = field(default_factory=list)
    batch_ids: list[int] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # config name -> reason
    configs: int = 0  # enabled export configs looked at


class ExportError(Exception):
    """An export step failed; the message names the config or batch."""


def object_name(root: str, start: datetime, end: datetime, file_num: int) -> str:
    return f"{root}/{int(start.timestamp())}-{int(end.timestamp())}-{file_num:05d}.zip"


def sorted_keys(keys: np.ndarray) -> np.ndarray:
    """An (n, 16) uint8 key array in ascending byte order (what bytea comparison in Postgres gives)."""
    if len(keys) < 2:
        return keys
    halves = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2)
    return keys[np.lexsort((halves[:, 1], halves[:, 0]))]


def plan_shards(primary: int, revised: int, max_records: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Split [primary keys..., revised keys...] into files of at most ``max_records``.

    Returns per file the [from, to) positions in the key-sorted primary list and in the revised list.
    """
    total = primary + revised
    out = []
    for k in range(math.ceil(total / max_records)):
        lo, hi = k * max_records, min((k + 1) * max_records, total)
        out.append(((min(lo, primary), min(hi, primary)), (max(lo - primary, 0), max(hi - primary, 0))))
    return out


def write_index(engine: Engine, blobstore: Blobstore, config_id: int, since: datetime) -> list[str]:
    """index.txt from the database: live files of complete batches that start at or after ``since``, sorted.

    Holds the config's index lock while it reads and writes, so an index written later always reflects
    file states committed earlier (retention marks files under the same lock before sweeping them).
    """
    with engine.begin() as conn:
        return write_index_on(conn, blobstore, config_id, since)


def write_index_on(conn: Connection, blobstore: Blobstore, config_id: int, since: datetime) -> list[str]:
    """write_index inside the caller's transaction (the index lock is re-entrant within one session)."""
    export_db.lock_index(conn, config_id)
    cfg = export_db.get_export_config(conn, config_id=config_id)
    names = export_db.index_filenames(conn, config_id, since)
    blobstore.create(cfg.bucket_name, index_name(cfg.filename_root), "\n".join(names).encode(),
                     content_type="text/plain", cacheable=False)
    log.info("index %s/%s: %d file(s)", cfg.bucket_name, index_name(cfg.filename_root), len(names))
    return names


def index_name(filename_root: str) -> str:
    return f"{filename_root}/{INDEX_NAME}"


class ExportPipeline:
    def __init__(self, settings: Settings, engine: Engine, blobstore: Blobstore, keys: KeyManager,
                 *, rng: random.Random | None = None):
        self.settings = settings
        self.engine = engine
        self.blobstore = blobstore
        self.keys = keys
        self.rng = rng or random.SystemRandom()

    # -- planning --------------------------------------------------------------------------------

    def plan_interval(self, interval_start: datetime, interval_end: datetime, now: datetime) -> PlanResult:
        """Plan every window of every active config whose end is in (S - age, E - age]."""
        result = PlanResult()
        with self.engine.connect() as conn:
            configs = export_db.list_export_configs(conn, include_disabled=False)
        result.configs = len(configs)
        for cfg in configs:
            try:
                for start, end in self.windows(cfg, interval_start, interval_end):
                    if start < now - self.settings.retention:
                        # Retention has removed (or is removing) its keys and files; a backfill this far
                        # back must not publish a file that the next cleanup would sweep again.
                        log.info("export config %r: window %s..%s is past retention; skipped", cfg.name,
                                 start.isoformat(), end.isoformat())
                        continue
                    tasks, batch_id = self.plan_window(cfg, start, end, now)
                    result.tasks.extend(tasks)
                    result.batch_ids.append(batch_id)
            except Exception as exc:  # one config's failure must not stop the others; reported at the end
                log.exception("export config %r: planning failed", cfg.name)
                result.failures[cfg.name] = f"{type(exc).__name__}: {exc}"
        return result

    def batches_for_interval(self, interval_start: datetime, interval_end: datetime) -> list[int]:
        """Ids of the existing batches of the interval's windows (what finalize has to look at)."""
        ids = []
        with self.engine.connect() as conn:
            for cfg in export_db.list_export_configs(conn, include_disabled=False):
                for start, end in self.windows(cfg, interval_start, interval_end):
                    batch = export_db.find_batch(conn, cfg.config_id, start, end)
                    if batch is not None:
                        ids.append(batch.batch_id)
        return ids

    def windows(self, cfg: export_db.ExportConfigRow, interval_start: datetime, interval_end: datetime
                ) -> list[tuple[datetime, datetime]]:
        out = []
        for start, end in windows_for_interval(cfg.period_seconds, interval_start, interval_end,
                                               self.settings.export_min_window_age):
            if start < cfg.from_timestamp or (cfg.thru_timestamp is not None and end > cfg.thru_timestamp):
                continue
            out.append((start, end))
        return out

    def check_window(self, cfg: export_db.ExportConfigRow, start: datetime, end: datetime, now: datetime) -> None:
        if end - start != timedelta(seconds=cfg.period_seconds) or not is_aligned(start, cfg.period_seconds):
            raise ExportError(f"window {start.isoformat()}..{end.isoformat()} is not one aligned period "
                              f"({cfg.period_seconds}s) of export config {cfg.name!r}")
        if start < now - self.settings.retention:
            raise ExportError(f"window starting {start.isoformat()} is past retention (ENP_RETENTION "
                              f"{self.settings.retention}): its keys and files are removed by cleanup")
        if end > now - self.settings.export_min_window_age:
            raise ExportError(f"window ending {end.isoformat()} is still open: it must end before now minus "
                              f"ENP_EXPORT_MIN_WINDOW_AGE ({self.settings.export_min_window_age})")

    def plan_window(self, cfg: export_db.ExportConfigRow, start: datetime, end: datetime, now: datetime,
                    *, force: bool = False) -> tuple[list[ShardTask], int]:
        """Create (or re-plan) the batch of one window: padding and the shard plan in one transaction."""
        max_records = cfg.max_records_override or self.settings.export_max_records
        stale: list[str] = []
        with self.engine.begin() as conn:
            # One plan at a time: the padding a plan sees and creates is then exactly what its shards read.
            export_db.lock_planning(conn)
            batch = export_db.ensure_batch(conn, cfg, start, end, max_records, now)
            export_db.lock_batch(conn, batch.batch_id)
            batch = export_db.get_batch(conn, batch.batch_id, for_update=True)
            if batch.status in ("DEL_PEND", "DELETED") or (batch.status == "COMPLETE" and not force):
                return [], batch.batch_id
            keys, is_padding = export_db.read_window_keys(conn, batch, revised=False)
            real, generated = int((~is_padding).sum()), int(is_padding.sum())
            padding = self._pad(conn, batch, real, generated)
            if padding:
                keys, _ = export_db.read_window_keys(conn, batch, revised=False)
            primary_keys = sorted_keys(keys)
            revised_keys = sorted_keys(export_db.read_window_keys(conn, batch, revised=True)[0])
            primary, revised = len(primary_keys), len(revised_keys)
            shards = self._shard_rows(batch, primary_keys, revised_keys)
            export_db.replace_shards(conn, batch.batch_id, shards)
            export_db.set_batch_planned(conn, batch.batch_id, key_count=primary, revised_key_count=revised,
                                        padding_key_count=generated + padding, file_count=len(shards),
                                        padding_seq_max=export_db.padding_seq_high_water(conn))
            # A re-plan with fewer files than before (only possible if keys were deleted) drops the extras.
            stale = [f.filename for f in export_db.files_of_batch(conn, batch.batch_id) if f.batch_num > len(shards)]
            if stale:
                export_db.delete_file_rows(conn, batch.bucket_name, stale)
        for name in stale:
            self.blobstore.delete(batch.bucket_name, name)
        log.info("export config %r window %s..%s: %d keys (%d real, %d padding), %d revised, %d file(s)",
                 cfg.name, start.isoformat(), end.isoformat(), primary, real, generated + padding, revised,
                 len(shards))
        return [ShardTask(batch.batch_id, s.shard_num, cfg.name) for s in shards], batch.batch_id

    def _pad(self, conn: Connection, batch: export_db.BatchRow, real: int, generated: int) -> int:
        """Add persisted fake keys so a small window still ships at least ENP_EXPORT_MIN_RECORDS keys.

        Fakes clone the real keys' metadata in full passes (every real key is cloned at least once, as
        in the reference) with fresh random key bytes. They are stored, so every export of the window,
        by any config and on any re-run, shows the same ones.
        """
        s = self.settings
        if real == 0 or real + generated >= s.export_min_records:
            return 0
        target = s.export_min_records + self.rng.randint(0, s.export_padding_range)
        final = min(real * math.ceil(target / real), batch.max_records)
        need = final - real - generated
        if need <= 0:
            return 0
        sources = export_db.padding_sources(conn, batch)
        created_at = max(r.created_at for r in sources)
        seqs = export_db.next_padding_seqs(conn, need)
        fakes = []
        for i, seq in enumerate(seqs):
            src = sources[i % len(sources)]
            fakes.append(Exposure(
                exposure_key=os.urandom(16), transmission_risk=src.transmission_risk,
                app_package_name=export_db.GENERATED_APP, regions=list(src.regions), traveler=src.traveler,
                interval_number=src.interval_number, interval_count=src.interval_count, created_at=created_at,
                local_provenance=True, health_authority_id=src.health_authority_id, report_type=src.report_type,
                days_since_symptom_onset=src.days_since_symptom_onset, padding_seq=seq))
        exposures_db.insert_exposures(conn, fakes)
        return need

    def _shard_rows(self, batch: export_db.BatchRow, primary_keys: np.ndarray, revised_keys: np.ndarray
                    ) -> list[export_db.ShardRow]:
        """Shard boundaries as keys: file k holds the key-sorted slice [from, to) of each list."""
        primary, revised = len(primary_keys), len(revised_keys)

        def bound(keys: np.ndarray, position: int, size: int) -> bytes | None:
            return keys[position].tobytes() if 0 < position < size else None

        rows = []
        for num, ((a, b), (c, d)) in enumerate(plan_shards(primary, revised, batch.max_records), start=1):
            rows.append(export_db.ShardRow(
                batch_id=batch.batch_id, shard_num=num,
                primary_from=bound(primary_keys, a, primary), primary_to=bound(primary_keys, b, primary),
                has_primary=b > a,
                revised_from=bound(revised_keys, c, revised), revised_to=bound(revised_keys, d, revised),
                has_revised=d > c))
        return rows

    # -- one shard -------------------------------------------------------------------------------

    def export_shard(self, task: ShardTask, now: datetime) -> dict[str, Any]:
        """Encode, sign and upload one file; record it. Safe to retry: same name, same bytes."""
        with self.engine.connect() as conn:
            batch = export_db.get_batch(conn, task.batch_id)
            if batch.status in ("DEL_PEND", "DELETED"):
                log.warning("batch %d is past retention (%s); file %d not written", batch.batch_id, batch.status,
                            task.shard_num)
                # An earlier attempt may have uploaded the file just before retention marked the batch and then
                # died, or failed to delete it again: unrecorded, no sweep would ever find it.
                self._remove_unrecorded(batch, object_name(batch.filename_root, batch.start_timestamp,
                                                           batch.end_timestamp, task.shard_num))
                return {"batch_id": batch.batch_id, "shard_num": task.shard_num, "filename": None, "keys": 0,
                        "revised_keys": 0, "bytes": 0, "signatures": 0, "expired": True}
            shard = export_db.get_shard(conn, task.batch_id, task.shard_num)
            cfg = export_db.get_export_config(conn, config_id=batch.config_id)
            infos = [i for i in export_db.list_signature_infos(conn, cfg.signature_info_ids) if i.is_active(now)]
            primary = self._read(conn, batch, revised=False, enabled=shard.has_primary, key_from=shard.primary_from,
                                 key_to=shard.primary_to)
            revised = self._read(conn, batch, revised=True, enabled=shard.has_revised, key_from=shard.revised_from,
                                 key_to=shard.revised_to)
            file_count = len(export_db.list_shard_nums(conn, task.batch_id))
        if not infos:
            raise ExportError(f"export config {cfg.name!r} has no signature info active at {now.isoformat()}; "
                              "refusing to publish unsigned files")
        infos.sort(key=lambda i: i.id, reverse=True)  # newest key first, as the reference orders them
        sig_infos = tuple(fmt.SignatureInfo(i.verification_key_id, i.verification_key_version,
                                            i.signature_algorithm) for i in infos)
        start_s, end_s = int(batch.start_timestamp.timestamp()), int(batch.end_timestamp.timestamp())
        # Every file is batch 1 of 1 (devices treat it as complete on its own); the k-th file of a split
        # window moves its end by k-1 seconds so (start, end, batch_num) stays unique for Android's dedup.
        header = fmt.ExportHeader(start_timestamp=start_s, end_timestamp=end_s + task.shard_num - 1,
                                  region=batch.output_region, batch_num=1, batch_size=1, signature_infos=sig_infos)
        export_bin = fmt.encode_export_bin(header, primary, revised)
        signatures = [(si, self.keys.signer(i.signing_key).sign(export_bin)) for si, i in zip(sig_infos, infos,
                                                                                            strict=True)]
        export_sig = fmt.encode_export_sig(signatures, 1, 1)
        data = fmt.build_zip(export_bin, export_sig, compresslevel=self.settings.export_zip_compresslevel)
        name = object_name(batch.filename_root, batch.start_timestamp, batch.end_timestamp, task.shard_num)
        self.blobstore.create(batch.bucket_name, name, data, content_type="application/zip", cacheable=True)
        stats = shard_stats(primary, revised)
        digest = hashlib.sha256(data).hexdigest()
        with self.engine.begin() as conn:
            export_db.lock_batch(conn, batch.batch_id)
            expired = export_db.get_batch(conn, batch.batch_id, for_update=True).status in ("DEL_PEND", "DELETED")
            if not expired:
                export_db.upsert_file(conn, bucket=batch.bucket_name, filename=name, batch_id=batch.batch_id,
                                      batch_num=task.shard_num, batch_size=file_count, key_count=len(primary),
                                      revised_key_count=len(revised), size=len(data), sha256=digest, stats=stats,
                                      now=now)
        if expired:
            # Retention marked the batch while this file was being written: the file must not come back.
            if self._remove_unrecorded(batch, name):
                log.warning("batch %d was expired by retention while %s was written; removed it again",
                            batch.batch_id, name)
            return {"batch_id": batch.batch_id, "shard_num": task.shard_num, "filename": name, "keys": 0,
                    "revised_keys": 0, "bytes": 0, "signatures": 0, "expired": True}
        log.info("wrote %s/%s: %d keys, %d revised keys, %d bytes, %d signature(s) (%s)", batch.bucket_name, name,
                 len(primary), len(revised), len(data), len(signatures),
                 ", ".join(f"{s.verification_key_id}/{s.verification_key_version}" for s in sig_infos))
        return {"batch_id": batch.batch_id, "shard_num": task.shard_num, "filename": name, "keys": len(primary),
                "revised_keys": len(revised), "bytes": len(data), "signatures": len(signatures)}

    def _remove_unrecorded(self, batch: export_db.BatchRow, name: str) -> bool:
        """Delete the object of an expired batch unless a file row records it; returns whether it did.

        A recorded file (a rerun of a shard whose batch was complete) may still be named by the index written
        before retention marked it: only the sweep, which rewrites that index first, may delete it.
        """
        with self.engine.connect() as conn:
            if export_db.file_recorded(conn, batch.bucket_name, name):
                return False
        self.blobstore.delete(batch.bucket_name, name)
        return True

    def _read(self, conn: Connection, batch: export_db.BatchRow, *, revised: bool, enabled: bool,
              key_from: bytes | None, key_to: bytes | None) -> fmt.KeyColumns:
        if not enabled:
            return fmt.KeyColumns.empty()
        arrays = export_db.read_shard_keys(conn, batch, revised=revised, key_from=key_from, key_to=key_to)
        return fmt.KeyColumns(**arrays.__dict__).sorted_by_key()

    # -- finalising ------------------------------------------------------------------------------

    def finalize(self, batch_ids: list[int], now: datetime) -> dict[int, dict[str, Any]]:
        """Mark batches whose files are all written COMPLETE (with stats) and rebuild their indexes."""
        done: dict[int, dict[str, Any]] = {}
        config_ids: set[int] = set()
        missing: list[str] = []
        for batch_id in batch_ids:
            with self.engine.begin() as conn:
                export_db.lock_batch(conn, batch_id)
                batch = export_db.get_batch(conn, batch_id, for_update=True)
                config_ids.add(batch.config_id)
                if batch.status != "PENDING":
                    continue
                expected = export_db.list_shard_nums(conn, batch_id)
                files = export_db.files_of_batch(conn, batch_id)
                written = {f.batch_num for f in files}
                if not set(expected) <= written:
                    missing.append(f"batch {batch_id} ({batch.filename_root} {batch.start_timestamp.isoformat()}):"
                                   f" files {sorted(set(expected) - written)} not written")
                    continue
                stats = merge_stats([f.stats for f in files])
                stats.update(files=len(files), bytes=sum(f.bytes for f in files),
                             padding_keys=batch.padding_key_count or 0, filenames=[f.filename for f in files])
                export_db.set_batch_complete(conn, batch_id, stats, now)
                done[batch_id] = stats
            log.info("batch %d %s %s..%s complete:\n%s", batch_id, batch.filename_root,
                     batch.start_timestamp.isoformat(), batch.end_timestamp.isoformat(), render(stats))
        for config_id in sorted(config_ids):
            self.rebuild_index(config_id, now)
        if missing:
            raise ExportError("; ".join(missing))
        return done

    def rebuild_index(self, config_id: int, now: datetime) -> list[str]:
        return write_index(self.engine, self.blobstore, config_id, now - self.settings.retention)

    # -- the whole path for one window (CLI) -------------------------------------------------------

    def run_window(self, config_name: str, start: datetime, end: datetime, now: datetime, *, force: bool = False
                   ) -> dict[str, Any]:
        with self.engine.connect() as conn:
            cfg = export_db.get_export_config(conn, name=config_name)
        if cfg is None:
            raise ExportError(f"no export config named {config_name!r}")
        self.check_window(cfg, start, end, now)
        tasks, batch_id = self.plan_window(cfg, start, end, now, force=force)
        files = [self.export_shard(t, now) for t in tasks]
        stats = self.finalize([batch_id], now).get(batch_id)
        return {"batch_id": batch_id, "files": files, "stats": stats}


