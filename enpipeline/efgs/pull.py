"""Pull other countries' keys from an EFGS gateway: follow a day's batchTag -> nextBatchTag chain from the saved
cursor, verify every country's share of each batch against its signature from the audit endpoint, and store the
keys, the cursor and the download's counters of each batch in one transaction.

A crash resumes at the first batch not stored. A country whose share does not verify (tampered keys, another
certificate, a certificate the target's trust anchor did not sign, a certificate for another country, expired) is
refused, its keys dropped, and the other countries' keys of the batch are kept. Our own country's keys are dropped
too (the gateway leaves them out; we do not rely on it). Keys are stored with local_provenance false,
sync_query_id ``efgs:<target>`` and sync_id = the download row; a key the gateway marks REVOKED revises only a
key that came from the same target.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography import x509
from sqlalchemy.engine import Engine

from enpipeline.config import Settings
from enpipeline.db import efgs as db
from enpipeline.db import exposures as exposures_db
from enpipeline.db.efgs import EfgsTarget
from enpipeline.efgs.canonical import batch_bytes
from enpipeline.efgs.client import EfgsClient, EfgsTransportError
from enpipeline.efgs.signing import (
    SignatureError,
    certificate_country,
    check_certificate_at,
    same_thumbprint,
    thumbprint,
    verify_batch_signature,
    verify_operator_signature,
)
from enpipeline.efgs.targets import TargetError, load_trust_anchors, ssl_context
from enpipeline.efgs.validation import REVOKED, foreign_key
from enpipeline.federation.foreign import store_foreign_keys, to_exposure
from enpipeline.model import Exposure

if TYPE_CHECKING:
    from enpipeline.proto import efgs_pb2

log = logging.getLogger(__name__)

MAX_AGE_DAYS = 2        # the gateway's max-age-in-days: older dates answer 410
MAX_REASONS = 5
NO_MORE = "null"        # nextBatchTag at the end of a day's chain

COMPLETE = "complete"
NO_BATCHES = "no_batches"          # the gateway has no batch for the day (yet)
ALREADY_RUNNING = "already_running"

ClientFactory = Callable[[EfgsTarget], EfgsClient]


class EfgsPullError(Exception):
    """A pull of one day stopped; every batch before the failing one is stored with its cursor."""

    def __init__(self, target_id: str, day: date | None, reason: str):
        self.target_id, self.day, self.reason = target_id, day, reason
        when = f" for {day.isoformat()}" if day is not None else ""
        super().__init__(f"EFGS pull of target {target_id!r}{when} failed: {reason}")


class _Problem(Exception):
    """The text is the reason as the operator should read it."""


@dataclass
class PullReport:
    """What one pull of one day did; ``as_dict`` is small and JSON-safe (a task's XCom)."""

    target_id: str
    day: date
    status: str
    download_id: int | None = None
    batches: int = 0
    keys: int = 0
    inserted: int = 0
    revised: int = 0
    skipped: int = 0
    rejected: int = 0
    own_origin: int = 0
    refused: int = 0
    refused_countries: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    last_batch_tag: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"target_id": self.target_id, "day": self.day.isoformat(), "status": self.status,
                "download_id": self.download_id, "batches": self.batches, "keys": self.keys,
                "inserted": self.inserted, "revised": self.revised, "skipped": self.skipped,
                "rejected": self.rejected, "own_origin": self.own_origin, "refused": self.refused,
                "refused_countries": list(self.refused_countries), "reasons": list(self.reasons),
                "last_batch_tag": self.last_batch_tag}

    def summary(self) -> str:
        if self.status == ALREADY_RUNNING:
            return f"EFGS target {self.target_id!r}: another pull is running; {self.day.isoformat()} skipped"
        refused = (f", {self.refused} refused ({', '.join(self.refused_countries)}: signature check failed)"
                   if self.refused else "")
        return (f"EFGS target {self.target_id!r} {self.day.isoformat()}: {self.batches} batch(es), {self.keys} "
                f"key(s): {self.inserted} inserted, {self.revised} revised, {self.skipped} skipped, {self.rejected}"
                f" rejected, {self.own_origin} of our own origin{refused} (download {self.download_id})")


def _note(report: PullReport, reason: str) -> None:
    if reason not in report.reasons and len(report.reasons) < MAX_REASONS:
        report.reasons.append(reason)
        log.warning("EFGS target %r %s: %s", report.target_id, report.day.isoformat(), reason)


def pullable_days(now: datetime) -> list[date]:
    """The days the gateway still serves, oldest first (a missed pull is caught up within them)."""
    today = now.date()
    return [today - timedelta(days=n) for n in range(MAX_AGE_DAYS, -1, -1)]


def default_client(settings: Settings, target: EfgsTarget) -> EfgsClient:
    return EfgsClient(target.url, ssl_context(settings.key_dir, target), settings.efgs_request_timeout)


def pull_recent(settings: Settings, engine: Engine, target_id: str, now: datetime, *,
                client_factory: ClientFactory | None = None) -> list[PullReport]:
    """Pull every day the gateway still serves (the DAG's task); a failing day does not stop the others, and the
    call raises EfgsPullError after all of them were tried."""
    reports, failures = [], []
    for day in pullable_days(now):
        try:
            reports.append(pull_day(settings, engine, target_id, day, now, client_factory=client_factory))
        except EfgsPullError as exc:
            failures.append(str(exc))
    if failures:
        raise EfgsPullError(target_id, None, "; ".join(failures))
    return reports


def pull_day(settings: Settings, engine: Engine, target_id: str, day: date, now: datetime, *,
             client_factory: ClientFactory | None = None) -> PullReport:
    """Pull one day's batches from its saved cursor on; raises EfgsPullError (the download row holds why)."""
    if not now.date() - timedelta(days=MAX_AGE_DAYS) <= day <= now.date():
        raise EfgsPullError(target_id, day, f"the gateway serves only the last {MAX_AGE_DAYS} days and today "
                                            f"({(now.date() - timedelta(days=MAX_AGE_DAYS)).isoformat()} .. "
                                            f"{now.date().isoformat()})")
    started = time.monotonic()

    def clock() -> datetime:
        return now + timedelta(seconds=time.monotonic() - started)

    with engine.connect() as lock_conn:
        lock_conn = lock_conn.execution_options(isolation_level="AUTOCOMMIT")
        if not db.try_lock(lock_conn, "pull", target_id):
            log.info("EFGS target %r: another pull is running; skipping %s", target_id, day.isoformat())
            return PullReport(target_id, day, ALREADY_RUNNING)
        try:
            return _pull_locked(settings, engine, target_id, day, clock, client_factory)
        finally:
            try:
                db.unlock(lock_conn, "pull", target_id)
            except Exception:  # a broken connection took its lock with it
                log.warning("EFGS target %r: could not release the pull lock", target_id, exc_info=True)


def _pull_locked(settings: Settings, engine: Engine, target_id: str, day: date, clock: Callable[[], datetime],
                 client_factory: ClientFactory | None) -> PullReport:
    with engine.begin() as conn:
        target = db.get_target(conn, target_id)
        if target is None:
            raise EfgsPullError(target_id, day, "no such target (see `enpipeline efgs list-targets`)")
        # Before anything is downloaded: a target without a trust anchor would take any certificate the gateway
        # names, so nothing is pulled (and no cursor moves) until one is configured.
        try:
            anchors = load_trust_anchors(target)
        except TargetError as exc:
            raise EfgsPullError(target_id, day, str(exc)) from None
        download_id = db.start_download(conn, target_id, day, clock())
    report = PullReport(target_id, day, COMPLETE, download_id=download_id)
    try:
        try:
            client = client_factory(target) if client_factory else default_client(settings, target)
        except TargetError as exc:
            raise _Problem(str(exc)) from None
        _follow_chain(settings, engine, client, target, day, report, clock, anchors)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, _Problem) else f"{type(exc).__name__}: {exc}"
        try:
            with engine.begin() as conn:
                db.fail_download(conn, download_id, reason)
        except Exception:  # the original failure matters more than the bookkeeping
            log.exception("EFGS target %r: could not record the failure on download %d", target_id, download_id)
        raise EfgsPullError(target_id, day, reason) from exc
    with engine.begin() as conn:
        db.finish_download(conn, download_id, clock())
    log.info("%s", report.summary())
    return report


def _next(tag: str | None) -> str | None:
    return None if tag is None or tag.strip() in ("", NO_MORE) else tag.strip()


def _follow_chain(settings: Settings, engine: Engine, client: EfgsClient, target: EfgsTarget, day: date,
                  report: PullReport, clock: Callable[[], datetime], anchors: list[x509.Certificate]) -> None:
    from enpipeline.proto import efgs_pb2

    with engine.connect() as conn:
        cursor = db.get_cursor(conn, target.target_id, day)
    # Without a cursor: the day's first batch. With one: the batch it says comes next; when the gateway had said
    # "null", ask for the last stored batch again, only to learn whether a next one has been linked since.
    request: str | None = None
    relink = False
    if cursor is not None:
        request, relink = (cursor.next_batch_tag, False) if cursor.next_batch_tag else (cursor.last_batch_tag, True)
    guard = exposures_db.PartitionGuard(engine)
    seen: set[str] = set()
    while True:
        what = f"batch {request!r}" if request else "the first batch"
        try:
            response = client.download(day, request)
        except EfgsTransportError as exc:
            raise _Problem(f"download of {what}: {exc}") from None
        if response.status == 404 and request is None:
            report.status = NO_BATCHES
            return
        if response.status == 410:
            raise _Problem(f"download of {what}: 410, the gateway no longer serves {day.isoformat()}")
        if response.status != 200:
            raise _Problem(f"download of {what}: HTTP {response.status}: {response.text()}")
        tag = (response.header("batchTag") or "").strip()
        if not tag or (request is not None and tag != request):
            raise _Problem(f"download of {what}: the answer is batch {tag!r}")
        following = _next(response.header("nextBatchTag"))
        if relink:
            relink = False
            if following is None:
                return
            with engine.begin() as conn:
                db.save_cursor(conn, target.target_id, day, tag, following, clock(), stored=False)
            request = following
            continue
        if tag in seen or following in seen:
            raise _Problem(f"batch {tag!r}: the chain loops back to a batch already read")
        seen.add(tag)
        try:
            batch = efgs_pb2.DiagnosisKeyBatch.FromString(response.body)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise _Problem(f"batch {tag!r}: not a DiagnosisKeyBatch ({type(exc).__name__})") from None
        _store_batch(settings, engine, client, target, day, tag, following, list(batch.keys), report, guard, clock,
                     anchors)
        if following is None:
            return
        request = following


def _store_batch(settings: Settings, engine: Engine, client: EfgsClient, target: EfgsTarget, day: date, tag: str,
                 following: str | None, keys: list[efgs_pb2.DiagnosisKey], report: PullReport,
                 guard: exposures_db.PartitionGuard, clock: Callable[[], datetime],
                 anchors: list[x509.Certificate]) -> None:
    at = clock()
    foreign = [k for k in keys if k.origin != target.country]
    own = len(keys) - len(foreign)
    accepted, refused = foreign, {}
    if foreign:
        try:
            response = client.audit(day, tag)
        except EfgsTransportError as exc:
            raise _Problem(f"audit of batch {tag!r}: {exc}") from None
        if response.status != 200:
            raise _Problem(f"audit of batch {tag!r}: HTTP {response.status}: {response.text()}")
        try:
            entries = json.loads(response.body)
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ValueError("not a list of objects")
        except ValueError as exc:
            raise _Problem(f"audit of batch {tag!r}: not a JSON list of entries ({exc})") from None
        accepted, refused = verify_shares(foreign, entries, at, trust_anchors=anchors)
        for country, (count, reason) in sorted(refused.items()):
            _note(report, f"batch {tag!r}: {count} key(s) of {country} refused: {reason}")
    source = db.source_id(target.target_id)
    provenance = {"sync_id": report.download_id, "sync_query_id": source}
    primary: list[Exposure] = []
    revised: list[Exposure] = []
    rejected = 0
    for key in accepted:
        try:
            row = to_exposure(foreign_key(key, target.country), settings=settings, now=at, **provenance)
        except (ValueError, OverflowError) as exc:
            rejected += 1
            _note(report, f"rejected a key of {key.origin}: {exc}")
            continue
        (revised if key.reportType == REVOKED else primary).append(row)
    refused_keys = sum(n for n, _ in refused.values())
    try:
        guard.ensure(e.created_at for e in primary)
        with engine.begin() as conn:
            counts = store_foreign_keys(conn, primary, revised, same_source=lambda e: e.sync_query_id == source,
                                        revised_at=at)
            db.save_cursor(conn, target.target_id, day, tag, following, at, stored=True)
            db.record_download_batch(conn, report.download_id or 0, batch_tag=tag, received=len(keys),
                                     inserted=counts.inserted, revised=counts.revised, skipped=counts.skipped,
                                     rejected=rejected, own_origin=own, refused=refused_keys,
                                     refused_countries=sorted(refused))
    except Exception as exc:
        raise _Problem(f"batch {tag!r}: storing it failed: {type(exc).__name__}: {exc}") from exc
    report.batches += 1
    report.keys += len(keys)
    report.inserted += counts.inserted
    report.revised += counts.revised
    report.skipped += counts.skipped
    report.rejected += rejected
    report.own_origin += own
    report.refused += refused_keys
    report.refused_countries = sorted(set(report.refused_countries) | set(refused))
    report.last_batch_tag = tag


def verify_shares(keys: list[efgs_pb2.DiagnosisKey], entries: list[dict[str, Any]], now: datetime, *,
                  trust_anchors: Sequence[x509.Certificate]
                  ) -> tuple[list[efgs_pb2.DiagnosisKey], dict[str, tuple[int, str]]]:
    """Split a batch's keys into those whose country's signature verifies and, per other country, how many were
    refused and why.

    The audit has one entry per upload in the batch, each with the uploader's signing certificate, its key count
    (amount) and its batchSignature. The gateway keeps each upload together and in order, so a country's keys are
    its uploads one after the other, in the order they were uploaded.
    """
    by_country: dict[str, list[efgs_pb2.DiagnosisKey]] = {}
    for key in keys:
        by_country.setdefault(key.origin, []).append(key)
    accepted: list[efgs_pb2.DiagnosisKey] = []
    refused: dict[str, tuple[int, str]] = {}

    def refuse(country: str, count: int, reason: str) -> None:
        before, why = refused.get(country, (0, reason))
        refused[country] = (before + count, why)

    for country, country_keys in by_country.items():
        uploads = sorted((e for e in entries if e.get("country") == country), key=lambda e: str(e.get("uploadedTime")))
        try:
            amounts = [int(e.get("amount", -1)) for e in uploads]
        except (TypeError, ValueError):
            amounts = [-1]
        if not uploads:
            refuse(country, len(country_keys), "no audit entry for it")
            continue
        if sum(amounts) != len(country_keys) or min(amounts) < 0:
            refuse(country, len(country_keys),
                   f"the audit counts {sum(amounts)} key(s), the batch holds {len(country_keys)}")
            continue
        at = 0
        for entry, amount in zip(uploads, amounts, strict=True):
            share = country_keys[at:at + amount]
            at += amount
            try:
                verify_share(entry, share, country, now, trust_anchors)
            except SignatureError as exc:
                refuse(country, len(share), str(exc))
                continue
            accepted.extend(share)
    return accepted, refused


def verify_share(entry: dict[str, Any], keys: list[efgs_pb2.DiagnosisKey], country: str, now: datetime,
                 trust_anchors: Sequence[x509.Certificate]) -> None:
    """One upload's keys against its audit entry; raises SignatureError naming the failed check."""
    certificate_text = str(entry.get("signingCertificate") or "")
    try:
        certificate = x509.load_pem_x509_certificate(certificate_text.encode())
    except ValueError:
        raise SignatureError("the audit entry has no readable signing certificate") from None
    # First the trust anchor: the gateway serves the audit too, so the certificate is only as good as this check.
    verify_operator_signature(certificate_text, str(entry.get("signingCertificateOperatorSignature") or ""),
                              trust_anchors)
    issued_for = certificate_country(certificate)
    if issued_for != country:
        raise SignatureError(f"the signing certificate is for country {issued_for!r}, not {country!r}")
    check_certificate_at(certificate, now)
    claimed = entry.get("uploaderSigningThumbprint")
    if claimed and not same_thumbprint(str(claimed), thumbprint(certificate)):
        raise SignatureError("the signing certificate does not match the audit's thumbprint")
    verify_batch_signature(str(entry.get("batchSignature") or ""), batch_bytes(keys), certificate)
