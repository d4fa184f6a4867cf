"""Push our keys to an EFGS gateway: a window of key creation times, planned once into batches of at most 5000 keys
with deterministic batch tags, each batch pre-validated, signed and uploaded, its outcome recorded.

A window's plan (batch tags and key ranges) is stored before anything is sent, so a retry, a re-run or a backfill
of the window uploads the same batches under the same tags, and a batch the gateway already took answers 409,
which is success. Only keys published here are read (see enpipeline/db/efgs.py): keys from EFGS or a partner never
go back out. The gateway's answers:

* 201: stored. 409: a batch with this tag exists, i.e. an earlier attempt of ours landed: stored.
* 207: the gateway found keys it already has (409 per key) or could not write some (500 per key) and, as EFGS
  does, stored none of the batch. Keys it already has are done; the others go again in a follow-up upload
  ``<tag>.r1`` (then ``.r2``), itself deterministic, so a retry converges.
* 400: refused (signature, validation or origin: EFGS says "Invalid signature" for all of them): REJECTED, the
  error says what the gateway said. 413: the gateway's limit is lower than ours: the batch is halved
  (``<tag>.a``, ``<tag>.b``) until it fits.
* anything else, or no answer: FAILED; the push raises after recording it, and the next attempt sends it again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from enpipeline.config import Settings
from enpipeline.db import efgs as db
from enpipeline.db.efgs import EfgsTarget, PushWindow, UploadBatch
from enpipeline.efgs.canonical import batch_bytes
from enpipeline.efgs.client import EfgsClient, EfgsTransportError, Response
from enpipeline.efgs.signing import sign_batch
from enpipeline.efgs.targets import Signer, TargetError, load_signer, ssl_context
from enpipeline.efgs.validation import MAX_KEY_AGE_DAYS, check_upload_key, rolling_start_bounds, to_efgs_key
from enpipeline.timeutil import truncate

if TYPE_CHECKING:
    from enpipeline.proto import efgs_pb2

log = logging.getLogger(__name__)

# The Fetch server's rule, for the same reason: a publish that began just before a window closed may still be
# committing rows stamped inside it.
COMMIT_GRACE = timedelta(minutes=1)
MAX_ROUNDS = 2          # follow-up uploads after a 207
MAX_SPLIT_DEPTH = 6     # 5000 keys halved six times: 79 per upload, below any sane gateway limit
MAX_REASONS = 5

ClientFactory = Callable[[EfgsTarget], EfgsClient]


class EfgsPushError(Exception):
    """A push left batches not uploaded (or could not start); everything else it did is recorded."""


@dataclass
class WindowReport:
    start: datetime
    end: datetime
    window_id: int
    keys: int = 0
    batches: int = 0
    uploaded: int = 0       # batches, including ones uploaded by an earlier push
    skipped: int = 0
    rejected: int = 0
    failed: int = 0
    keys_sent: int = 0      # by this push
    keys_stored: int = 0    # by this push: the gateway took them (201, or a 409 batch tag)
    keys_known: int = 0     # by this push: the gateway already had them (409 per key)
    invalid: int = 0        # by this push: held back by EFGS's rules

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "window_id": self.window_id,
                "keys": self.keys, "batches": self.batches, "uploaded": self.uploaded, "skipped": self.skipped,
                "rejected": self.rejected, "failed": self.failed, "keys_sent": self.keys_sent,
                "keys_stored": self.keys_stored, "keys_known": self.keys_known, "invalid": self.invalid}


@dataclass
class PushReport:
    """What one push did; ``as_dict`` is small and JSON-safe (it is a task's XCom)."""

    target_id: str
    windows: list[WindowReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"target_id": self.target_id, "windows": [w.as_dict() for w in self.windows],
                "problems": list(self.problems)}

    def summary(self) -> str:
        parts = [f"[{w.start.isoformat()}, {w.end.isoformat()}): {w.keys} key(s) in {w.batches} batch(es),"
                 f" {w.uploaded} uploaded, {w.skipped} skipped, {w.rejected} rejected, {w.failed} failed;"
                 f" this push sent {w.keys_sent} key(s) ({w.keys_stored} stored, {w.keys_known} already at the"
                 f" gateway), held back {w.invalid}" for w in self.windows]
        return f"EFGS target {self.target_id!r}: " + ("; ".join(parts) if parts else "nothing to push")


def closed_until(settings: Settings, now: datetime) -> datetime:
    """Keys created before this are all committed: a window may be pushed once its end is not later."""
    return truncate(now - COMMIT_GRACE, settings.truncate_window)


def batch_tag(country: str, start: datetime, end: datetime, batch_num: int) -> str:
    """Unique among countries (it starts with ours) and windows, and the same on every attempt."""
    return f"{country}-{start:%Y%m%d%H%M%S}-{end:%Y%m%d%H%M%S}-{batch_num}"


def plan_batches(keys: list[bytes], size: int) -> list[tuple[bytes | None, bytes | None, int]]:
    """Key-sorted ``keys`` cut into runs of at most ``size``: (first key or None, next run's first key or None,
    count) per run; None bounds keep the ends open, as the export's shard plan does."""
    runs = []
    for at in range(0, len(keys), size):
        chunk = keys[at:at + size]
        runs.append((keys[at] if at else None, keys[at + size] if at + size < len(keys) else None, len(chunk)))
    return runs


def default_client(settings: Settings, target: EfgsTarget) -> EfgsClient:
    return EfgsClient(target.url, ssl_context(settings.key_dir, target), settings.efgs_request_timeout)


# -- entry points ---------------------------------------------------------------------------------------------

def push_interval(settings: Settings, engine: Engine, target_id: str, start: datetime, end: datetime,
                  now: datetime, *, client_factory: ClientFactory | None = None) -> PushReport:
    """The DAG's push for the data interval [start, end): the keys created in [start - d, end - d) (d =
    ENP_EFGS_PUSH_DELAY, so that window is closed), after any gap since the target's last pushed window.

    The gap window makes missed runs (the DAG does not catch up) heal themselves: it is planned and stored like
    any window, so its retries converge too; it reaches back at most 15 days, EFGS takes nothing older.
    """
    delay = settings.efgs_push_delay
    window = (start - delay, end - delay)
    with engine.connect() as conn:
        last = db.last_window_end(conn, target_id)
    windows = []
    if last is not None and last < window[0]:
        windows.append((max(last, window[0] - timedelta(days=MAX_KEY_AGE_DAYS)), window[0]))
    windows.append(window)
    return _push(settings, engine, target_id, windows, now, client_factory)


def push_window(settings: Settings, engine: Engine, target_id: str, start: datetime, end: datetime, now: datetime,
                *, client_factory: ClientFactory | None = None) -> PushReport:
    """Push the keys created in [start, end) (the CLI's `efgs push`); raises EfgsPushError when batches stay
    un-uploaded, after trying all of them."""
    return _push(settings, engine, target_id, [(start, end)], now, client_factory)


def _push(settings: Settings, engine: Engine, target_id: str, windows: list[tuple[datetime, datetime]],
          now: datetime, client_factory: ClientFactory | None) -> PushReport:
    until = closed_until(settings, now)
    for start, end in windows:
        if start.tzinfo is None or end.tzinfo is None:
            raise EfgsPushError("window bounds must be timezone-aware")
        if not start < end:
            raise EfgsPushError(f"window [{start.isoformat()}, {end.isoformat()}) is empty")
        if end > until:
            raise EfgsPushError(f"window [{start.isoformat()}, {end.isoformat()}) is still open: keys created "
                                f"before {end.isoformat()} may still arrive (push it once it is before "
                                f"{until.isoformat()} + the truncate window)")
    with engine.connect() as lock_conn:
        # Autocommit: held for the whole push without keeping a transaction open.
        lock_conn = lock_conn.execution_options(isolation_level="AUTOCOMMIT")
        if not db.try_lock(lock_conn, "push", target_id):
            raise EfgsPushError(f"another push to EFGS target {target_id!r} is running; try again later")
        try:
            return _push_locked(settings, engine, target_id, windows, now, client_factory)
        finally:
            try:
                db.unlock(lock_conn, "push", target_id)
            except Exception:  # a broken connection took its lock with it
                log.warning("EFGS target %r: could not release the push lock", target_id, exc_info=True)


def _push_locked(settings: Settings, engine: Engine, target_id: str, windows: list[tuple[datetime, datetime]],
                 now: datetime, client_factory: ClientFactory | None) -> PushReport:
    with engine.connect() as conn:
        target = db.get_target(conn, target_id)
    if target is None:
        raise EfgsPushError(f"no EFGS target {target_id!r} (see `enpipeline efgs list-targets`)")
    report = PushReport(target_id)
    client: EfgsClient | None = None
    signer: Signer | None = None
    for start, end in windows:
        window = _plan(settings, engine, target, start, end, now)
        wr = WindowReport(start, end, window.window_id, keys=window.key_count, batches=window.batches)
        report.windows.append(wr)
        with engine.connect() as conn:
            batches = db.window_batches(conn, window.window_id)
        for batch in batches:
            if batch.status not in db.FINAL:
                if client is None or signer is None:
                    try:
                        signer = load_signer(settings.key_dir, target)
                        client = client_factory(target) if client_factory else default_client(settings, target)
                    except TargetError as exc:
                        raise EfgsPushError(str(exc)) from None
                try:
                    _upload(engine, client, signer, target, window, batch, wr, now)
                except _Unreachable as exc:
                    report.problems.append(f"batch {batch.batch_tag}: {exc}")
                    _tally(wr, batch)
                    log.warning("EFGS target %r: %s", target_id, report.problems[-1])
                    raise EfgsPushError(f"EFGS target {target_id!r}: {report.summary()}; "
                                        + "; ".join(report.problems)) from None
                if batch.status in (db.REJECTED, db.FAILED):
                    report.problems.append(f"batch {batch.batch_tag}: {batch.status}: {batch.error}")
            _tally(wr, batch)
    log.info("%s", report.summary())
    if report.problems:
        raise EfgsPushError(f"EFGS target {target_id!r}: " + "; ".join(report.problems))
    return report


def _tally(wr: WindowReport, batch: UploadBatch) -> None:
    if batch.status == db.UPLOADED:
        wr.uploaded += 1
    elif batch.status == db.SKIPPED:
        wr.skipped += 1
    elif batch.status == db.REJECTED:
        wr.rejected += 1
    elif batch.status == db.FAILED:
        wr.failed += 1


def _plan(settings: Settings, engine: Engine, target: EfgsTarget, start: datetime, end: datetime,
          now: datetime) -> PushWindow:
    """The window's stored plan, made now if this is its first push (one transaction: the window with its batches)."""
    with engine.begin() as conn:
        window = db.get_window(conn, target.target_id, start, end)
        if window is not None:
            return window
        window_id = db.add_window(conn, target.target_id, start, end, now)
        keys = db.window_keys(conn, target.target_id, window_id, start, end)
        batches = [UploadBatch(window_id=window_id, batch_num=n, target_id=target.target_id, window_start=start,
                               window_end=end, batch_tag=batch_tag(target.country, start, end, n), key_from=lo,
                               key_to=hi, key_count=count)
                   for n, (lo, hi, count) in enumerate(plan_batches(keys, settings.efgs_upload_batch_size), start=1)]
        db.save_plan(conn, window_id, len(keys), batches, now)
        window = db.get_window(conn, target.target_id, start, end)
        assert window is not None
    log.info("EFGS target %r: planned [%s, %s): %d key(s) in %d batch(es)", target.target_id, start.isoformat(),
             end.isoformat(), len(keys), len(batches))
    return window


class _Unreachable(Exception):
    """No usable answer from the gateway: the batch is FAILED and the push stops (the rest would fail too)."""


@dataclass
class _Outcome:
    stored: int = 0
    known: int = 0
    failed: int = 0
    rejected: int = 0
    duplicate_tags: int = 0
    http_status: int | None = None
    tags: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _upload(engine: Engine, client: EfgsClient, signer: Signer, target: EfgsTarget, window: PushWindow,
            batch: UploadBatch, wr: WindowReport, now: datetime) -> None:
    """Validate, sign and send one planned batch (with its follow-ups), then record the outcome on its row."""
    with engine.connect() as conn:
        rows = db.batch_keys(conn, batch, window)
    bounds = rolling_start_bounds(now)
    keys: list[efgs_pb2.DiagnosisKey] = []
    reasons: list[str] = []
    invalid = 0
    for row in rows:
        try:
            key = to_efgs_key(row, target.country)
            reason = check_upload_key(key, country=target.country, bounds=bounds)
        except (ValueError, TypeError) as exc:  # TypeError: a value protobuf cannot hold (out of uint32 range)
            reason = str(exc)
        if reason is None:
            keys.append(key)
            continue
        invalid += 1
        if reason not in reasons and len(reasons) < MAX_REASONS:
            reasons.append(reason)
    wr.invalid += invalid
    if reasons:
        log.info("EFGS target %r: batch %s: held back %d key(s) EFGS would refuse: %s", target.target_id,
                 batch.batch_tag, invalid, "; ".join(reasons))
    outcome = _Outcome()
    unreachable: _Unreachable | None = None
    if keys:
        try:
            _send(client, signer, keys, batch.batch_tag, outcome, rounds=0, depth=0)
        except _Unreachable as exc:
            unreachable = exc
    wr.keys_sent += len(keys)
    wr.keys_stored += outcome.stored
    wr.keys_known += outcome.known
    batch.keys_sent = len(keys)
    batch.http_status = outcome.http_status
    batch.results = {"201": outcome.stored, "409": outcome.known, "500": outcome.failed, "400": outcome.rejected,
                     "invalid": invalid, "duplicate_batch_tags": outcome.duplicate_tags, "tags": outcome.tags}
    if reasons:
        batch.results["invalid_reasons"] = reasons
    if unreachable is not None:
        batch.status, batch.error = db.FAILED, str(unreachable)
    elif not keys:
        batch.status, batch.error = db.SKIPPED, "no key passed EFGS's rules" if invalid else None
    elif outcome.rejected:
        batch.status, batch.error = db.REJECTED, "; ".join(outcome.errors)
    elif outcome.failed:
        batch.status, batch.error = db.FAILED, "; ".join(outcome.errors)
    else:
        batch.status, batch.error, batch.uploaded_at = db.UPLOADED, None, now
    with engine.begin() as conn:
        db.record_batch(conn, batch, now)
    log.info("EFGS target %r: batch %s: %s (%s)", target.target_id, batch.batch_tag, batch.status,
             json.dumps(batch.results, sort_keys=True))
    if unreachable is not None:
        raise unreachable


def _send(client: EfgsClient, signer: Signer, keys: list[efgs_pb2.DiagnosisKey], tag: str, outcome: _Outcome, *,
          rounds: int, depth: int) -> None:
    from enpipeline.proto import efgs_pb2

    signature = sign_batch(batch_bytes(keys), signer.certificate, signer.private_key)
    body = efgs_pb2.DiagnosisKeyBatch(keys=keys).SerializeToString()
    try:
        response = client.upload(tag, signature, body)
    except EfgsTransportError as exc:
        raise _Unreachable(f"upload {tag}: {exc}") from None
    outcome.tags.append(tag)
    outcome.http_status = response.status
    status = response.status
    if status == 201:
        outcome.stored += len(keys)
    elif status == 409:
        # The tag is taken: by an earlier attempt of ours whose answer we never saw. The batch is there.
        outcome.stored += len(keys)
        outcome.duplicate_tags += 1
    elif status == 207:
        _multi_status(client, signer, keys, tag, outcome, response, rounds=rounds, depth=depth)
    elif status == 413:
        if len(keys) == 1 or depth >= MAX_SPLIT_DEPTH:
            outcome.rejected += len(keys)
            outcome.errors.append(f"{tag}: 413 for {len(keys)} key(s): {response.text()}")
            return
        half = (len(keys) + 1) // 2
        _send(client, signer, keys[:half], f"{tag}.a", outcome, rounds=rounds, depth=depth + 1)
        _send(client, signer, keys[half:], f"{tag}.b", outcome, rounds=rounds, depth=depth + 1)
    elif status == 400:
        outcome.rejected += len(keys)
        outcome.errors.append(f"{tag}: 400 (the gateway refused the batch: signature, key validation or origin): "
                              f"{response.text()}")
    else:
        raise _Unreachable(f"upload {tag}: HTTP {status}: {response.text()}")


def _multi_status(client: EfgsClient, signer: Signer, keys: list[efgs_pb2.DiagnosisKey], tag: str,
                  outcome: _Outcome, response: Response, *, rounds: int, depth: int) -> None:
    try:
        statuses = {int(k): {int(i) for i in v} for k, v in json.loads(response.body or b"{}").items()}
    except (ValueError, TypeError, AttributeError):
        raise _Unreachable(f"upload {tag}: 207 with an unreadable body: {response.text()}") from None
    known = {i for i in statuses.get(409, ()) if 0 <= i < len(keys)}
    outcome.known += len(known)
    rest = [k for i, k in enumerate(keys) if i not in known]
    if not rest:
        return
    if rounds >= MAX_ROUNDS:
        outcome.failed += len(rest)
        outcome.errors.append(f"{tag}: 207 again after {rounds} follow-up upload(s): {len(rest)} key(s) not "
                              f"stored ({len(statuses.get(500, ()))} with status 500)")
        return
    root = tag.rsplit(".r", 1)[0] if rounds else tag
    _send(client, signer, rest, f"{root}.r{rounds + 1}", outcome, rounds=rounds + 1, depth=depth)
