"""Pull keys from a partner's Fetch server: page by page, each page's keys stored with its cursor in one transaction.

The reference (federationin) saves the partner's cursors only once the whole pull is done, so a pull that dies
after many pages fetches them all again. Here each page commits its keys, the cursor that follows them, and the
sync row's counters together: a pull that fails or is killed resumes at the first page that was not stored, and
no page is ever stored twice. Primary keys are insert-only; revised keys only revise keys this query pulled.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from enpipeline.config import Settings
from enpipeline.db import exposures as exposures_db
from enpipeline.db import federation_in as db
from enpipeline.db.federation_in import Cursors, FederationInQuery
from enpipeline.federation.auth import mint_token
from enpipeline.federation.credentials import load_credentials
from enpipeline.federation.foreign import ForeignKey, ForeignKeyRules, store_foreign_keys, to_exposure
from enpipeline.model import Exposure

if TYPE_CHECKING:  # grpc and the generated modules load only when a pull runs
    import grpc

    from enpipeline.proto import federation_pb2

__all__ = ["MAX_EXPOSURE_KEYS", "FederationPullError", "PullReport", "default_channel", "fetch_state",
           "foreign_key", "next_cursors", "pull_query"]

log = logging.getLogger(__name__)

# What the reference's puller asks for; its server never sends more than 500 per response anyway. We ask for
# ENP_FEDERATION_PAGE_SIZE (default the same 500); a partner may send fewer.
MAX_EXPOSURE_KEYS = 500
# Enough distinct rejection reasons to diagnose a partner, without a log line per key.
MAX_REASONS = 5
_MAX_REASON_CHARS = 500
# Cursor timestamps are unix seconds; anything past year 9999 cannot be stored and is a broken response.
_MAX_UNIX = 253402300799

COMPLETE = "complete"            # the partner said there is nothing more (partialResponse false)
TIME_LIMIT = "time_limit"        # stopped after ENP_FEDERATION_MAX_PULL_DURATION; the next pull goes on
ALREADY_RUNNING = "already_running"

ChannelFactory = Callable[[FederationInQuery], "grpc.Channel"]


class FederationPullError(Exception):
    """A pull stopped: the message names the query, its partner and server, and the reason, on one line.

    Everything before the failing page is stored, with the cursor after it; the sync row holds the reason.
    """

    def __init__(self, query_id: str, reason: str, *, partner: str | None = None, server: str | None = None,
                 sync_id: int | None = None):
        self.query_id, self.reason, self.partner, self.server, self.sync_id = query_id, reason, partner, server, sync_id
        where = f" (partner {partner!r}, server {server})" if partner is not None else ""
        super().__init__(f"federation pull of query {query_id!r}{where} failed: {reason}")


class _PullProblem(Exception):
    """A page could not be fetched or stored; the text is the reason as the operator should read it."""


@dataclass
class PullReport:
    """What one pull did; ``as_dict`` is small and JSON-safe (it is a task's XCom)."""

    query_id: str
    partner: str
    server: str
    status: str
    sync_id: int | None = None
    pages: int = 0
    insertions: int = 0
    revisions: int = 0
    rejected: int = 0
    skipped: int = 0
    max_timestamp: datetime | None = None
    max_revised_timestamp: datetime | None = None
    rejected_reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"query_id": self.query_id, "partner": self.partner, "server": self.server, "status": self.status,
                "sync_id": self.sync_id, "pages": self.pages, "insertions": self.insertions,
                "revisions": self.revisions, "rejected": self.rejected, "skipped": self.skipped,
                "max_timestamp": self.max_timestamp.isoformat() if self.max_timestamp else None,
                "max_revised_timestamp": self.max_revised_timestamp.isoformat() if self.max_revised_timestamp
                else None, "rejected_reasons": list(self.rejected_reasons)}

    def summary(self) -> str:
        if self.status == ALREADY_RUNNING:
            return f"query {self.query_id!r}: another pull of it is running; nothing done"
        more = "; more keys are waiting (the next pull goes on)" if self.status == TIME_LIMIT else ""
        return (f"query {self.query_id!r} from {self.partner!r} ({self.server}): {self.pages} page(s),"
                f" {self.insertions} inserted, {self.revisions} revised, {self.skipped} skipped,"
                f" {self.rejected} rejected (sync {self.sync_id}){more}")


# -- wire conversions -----------------------------------------------------------------------------------------

def _unix(t: datetime | None) -> int:
    return int(t.timestamp()) if t is not None else 0


def _time(seconds: int) -> datetime | None:
    if seconds == 0:
        return None
    if not 0 < seconds <= _MAX_UNIX:
        raise ValueError(f"cursor timestamp {seconds} is out of range")
    return datetime.fromtimestamp(seconds, UTC)


def fetch_state(cursors: Cursors) -> federation_pb2.FetchState:
    """The request state for saved cursors (all empty before the first pull)."""
    from enpipeline.proto import federation_pb2 as pb

    return pb.FetchState(
        keyCursor=pb.Cursor(timestamp=_unix(cursors.last_timestamp), nextToken=cursors.primary_cursor or ""),
        revisedKeyCursor=pb.Cursor(timestamp=_unix(cursors.last_revised_timestamp),
                                   nextToken=cursors.revised_cursor or ""))


def next_cursors(current: Cursors, response: federation_pb2.FederationFetchResponse) -> Cursors:
    """The cursors after a response; raises ValueError for a timestamp that cannot be a unix second.

    A response without a state (or without one of its cursors) keeps what we had: resetting to zero would make
    the next pull start over at the partner's beginning.
    """
    if not response.HasField("nextFetchState"):
        return current
    state = response.nextFetchState
    ts, token = current.last_timestamp, current.primary_cursor
    if state.HasField("keyCursor"):
        ts, token = _time(state.keyCursor.timestamp), state.keyCursor.nextToken or None
    rts, rtoken = current.last_revised_timestamp, current.revised_cursor
    if state.HasField("revisedKeyCursor"):
        rts, rtoken = _time(state.revisedKeyCursor.timestamp), state.revisedKeyCursor.nextToken or None
    return Cursors(ts, token, rts, rtoken)


def foreign_key(key: federation_pb2.ExposureKey) -> ForeignKey:
    """A proto key as the shared foreign-key validation takes it."""
    return ForeignKey(key=bytes(key.exposureKey), transmission_risk=key.transmissionRisk,
                      interval_number=key.intervalNumber, interval_count=key.intervalCount,
                      report_type=int(key.reportType),
                      # proto3 cannot tell 0 from unset: hasSymptomOnset says whether the partner knew the onset.
                      days_since_onset=key.daysSinceOnsetOfSymptoms if key.hasSymptomOnset else None,
                      regions=tuple(key.regions), traveler=key.traveler)


def default_channel(query: FederationInQuery) -> grpc.Channel:
    """A channel to the query's server: plaintext, or TLS trusting ``ca_file`` (else the system roots)."""
    import grpc

    if not query.tls:
        return grpc.insecure_channel(query.server_addr)
    roots = Path(query.ca_file).read_bytes() if query.ca_file else None
    return grpc.secure_channel(query.server_addr, grpc.ssl_channel_credentials(root_certificates=roots))


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS - 3] + "..."


def _describe(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


_RPC_HINTS = {
    "UNAVAILABLE": "the server cannot be reached",
    "DEADLINE_EXCEEDED": "no answer within ENP_FEDERATION_RPC_TIMEOUT ({timeout})",
    "UNAUTHENTICATED": "the partner refused our token: check --issuer, --subject, --audience and the public key"
                       " the partner registered for us",
    "PERMISSION_DENIED": "the partner refused our token: check --issuer, --subject, --audience and the public key"
                         " the partner registered for us",
    "INTERNAL": "the answer is not a valid Fetch response",
    "UNIMPLEMENTED": "the server does not serve /Federation/Fetch",
}


def _rpc_reason(exc: Exception, timeout: timedelta) -> str:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    name = getattr(code, "name", None) or "RPC error"
    hint = _RPC_HINTS.get(name, "").format(timeout=timeout)
    return _one_line(f"{name}: {details or '(no details)'}" + (f" ({hint})" if hint else ""))


# -- the pull -------------------------------------------------------------------------------------------------

def pull_query(settings: Settings, engine: Engine, query_id: str, now: datetime, *,
               channel_factory: ChannelFactory | None = None) -> PullReport:
    """Pull everything the partner has for one query, from its saved cursors on; raises FederationPullError.

    At most one pull per query runs at a time (a Postgres session advisory lock): a second one returns at once
    with status ``already_running``, which is not an error. ``now`` is the pull's start; later pages use it plus
    the time elapsed, so a long pull mints fresh tokens and stamps keys with the hour they really arrived in.
    """
    started = time.monotonic()

    def clock() -> datetime:
        return now + timedelta(seconds=time.monotonic() - started)

    with engine.connect() as lock_conn:
        # Autocommit: the lock is held for the whole pull, and must not keep a transaction open that long.
        lock_conn = lock_conn.execution_options(isolation_level="AUTOCOMMIT")
        if not db.try_lock_query(lock_conn, query_id):
            with engine.connect() as conn:
                query = db.get_query(conn, query_id)
            log.info("federation query %r: another pull is running; skipping", query_id)
            return PullReport(query_id, query.partner if query else "", query.server_addr if query else "",
                              ALREADY_RUNNING)
        try:
            return _pull_locked(settings, engine, query_id, clock, started, channel_factory or default_channel)
        finally:
            try:
                db.unlock_query(lock_conn, query_id)
            except Exception:  # a broken connection took its lock with it; don't hide the pull's own outcome
                log.warning("federation query %r: could not release the pull lock", query_id, exc_info=True)


def _pull_locked(settings: Settings, engine: Engine, query_id: str, clock: Callable[[], datetime],
                 started: float, channel_factory: ChannelFactory) -> PullReport:
    # Read under the lock: the cursors are the ones the previous pull committed last.
    with engine.begin() as conn:
        query = db.get_query(conn, query_id)
        if query is None:
            raise FederationPullError(query_id, "no such query (see `enpipeline federation list-queries`)")
        sync_id = db.start_sync(conn, query_id, clock())
    report = PullReport(query.query_id, query.partner, query.server_addr, COMPLETE, sync_id=sync_id)
    log.info("federation query %r: pulling from %r at %s (sync %d)", query_id, query.partner, query.server_addr,
             sync_id)
    try:
        _pull_pages(settings, engine, query, report, clock, started, channel_factory)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, _PullProblem) else _describe(exc)
        try:
            with engine.begin() as conn:
                db.fail_sync(conn, sync_id, reason)
        except Exception:  # the original failure matters more than the bookkeeping (the DB may be the problem)
            log.exception("federation query %r: could not record the failure on sync %d", query_id, sync_id)
        raise FederationPullError(query_id, reason, partner=query.partner, server=query.server_addr,
                                  sync_id=sync_id) from exc
    with engine.begin() as conn:
        db.finish_sync(conn, sync_id, clock())
    log.info("federation %s", report.summary())
    return report


@dataclass
class _Page:
    """One response, already validated into rows (by the fetching thread, while the store works)."""

    number: int
    cursors: Cursors                      # the partner's cursors after this page
    keys: int                             # primary and revised keys the partner sent
    primary: exposures_db.StagedRows
    revised: list[Exposure]
    rejected: int
    reasons: list[str]                    # a few distinct rejection reasons


_DONE = object()         # the partner has nothing more (or the time limit was reached)
_PREFETCH_PAGES = 16     # pages fetched (and validated) ahead of the store: a full store batch and more


def _pull_pages(settings: Settings, engine: Engine, query: FederationInQuery, report: PullReport,
                clock: Callable[[], datetime], started: float, channel_factory: ChannelFactory) -> None:
    """Fetch on a thread of its own while this one stores: the partner's work and ours overlap.

    Pages that are already waiting are stored together, up to ENP_FEDERATION_STORE_BATCH keys per transaction,
    with the cursor after the last of them; a batch is all or nothing, so a failure still resumes exactly at
    the first page not stored.
    """
    guard = exposures_db.PartitionGuard(engine)
    provenance = {"sync_id": report.sync_id, "sync_query_id": query.query_id}
    pages: queue.Queue[Any] = queue.Queue(maxsize=_PREFETCH_PAGES)
    stop = threading.Event()
    limit_reached = threading.Event()
    fetcher = threading.Thread(target=_fetch_pages, name=f"federation-fetch-{query.query_id}", daemon=True,
                               args=(settings, query, clock, started, channel_factory, provenance, pages, stop,
                                     limit_reached))
    fetcher.start()
    try:
        pending: Any = None
        while True:
            item = pending if pending is not None else pages.get()
            pending = None
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            batch = [item]
            keys = item.keys
            # Take what else is already waiting, up to the batch size; stop at a marker (done or an error),
            # which is handled after this batch is stored.
            while keys < settings.federation_store_batch:
                try:
                    nxt = pages.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, _Page):
                    pending = nxt
                    break
                batch.append(nxt)
                keys += nxt.keys
            _store_batch(engine, guard, query.query_id, report, batch, clock())
    finally:
        stop.set()
        while fetcher.is_alive():  # unblock a fetcher waiting on a full queue
            try:
                pages.get_nowait()
            except queue.Empty:
                fetcher.join(0.05)
    if limit_reached.is_set():
        report.status = TIME_LIMIT
        log.info("federation query %r: stopping after %s (ENP_FEDERATION_MAX_PULL_DURATION); the next pull goes on "
                 "from the saved cursor", query.query_id, settings.federation_max_pull_duration)


def _fetch_pages(settings: Settings, query: FederationInQuery, clock: Callable[[], datetime], started: float,
                 channel_factory: ChannelFactory, provenance: dict[str, Any], pages: queue.Queue[Any],
                 stop: threading.Event, limit_reached: threading.Event) -> None:
    """The fetching thread: puts each _Page in order, then _DONE, or the exception that ended it.

    Pages are validated here, while the other thread stores: the store is the slower side of a pull.
    """
    import grpc

    from enpipeline.proto import federation_pb2 as pb
    from enpipeline.proto.federation_pb2_grpc import FederationStub

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                pages.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        private_pem = load_credentials(settings.key_dir, query.credentials)
        lifetime = settings.federation_token_lifetime
        timeout = settings.federation_rpc_timeout
        cursors = query.cursors
        token, minted = "", 0.0
        channel = channel_factory(query)
    except Exception as exc:
        put(exc)
        return
    try:
        stub = FederationStub(channel)
        number = 0
        while not stop.is_set():
            number += 1
            # Reuse a token while it has at least half its life left, so it cannot expire in flight.
            if not token or time.monotonic() - minted > lifetime.total_seconds() / 2:
                minted = time.monotonic()
                token = mint_token(private_pem, issuer=query.issuer, subject=query.subject,
                                   audience=query.audience, now=clock(), lifetime=lifetime)
            request = pb.FederationFetchRequest(
                includeRegions=list(query.include_regions), excludeRegions=list(query.exclude_regions),
                onlyTravelers=query.only_travelers, onlyLocalProvenance=query.only_local_provenance,
                maxExposureKeys=settings.federation_page_size, state=fetch_state(cursors))
            try:
                response = stub.Fetch(request, metadata=(("authorization", f"Bearer {token}"),),
                                      timeout=timeout.total_seconds())
            except grpc.RpcError as exc:
                raise _PullProblem(f"page {number}: {_rpc_reason(exc, timeout)}") from exc
            try:
                new_cursors = next_cursors(cursors, response)
            except ValueError as exc:
                raise _PullProblem(f"page {number}: invalid nextFetchState: {exc}") from exc
            if response.partialResponse and new_cursors == cursors:
                raise _PullProblem(f"page {number}: the partner sent a partial response without moving its "
                                   "cursor, so it would be asked for the same page forever")
            if not put(_prepare(number, response, new_cursors, settings, clock(), provenance)):
                return
            cursors = new_cursors
            if not response.partialResponse:
                break
            if time.monotonic() - started >= settings.federation_max_pull_duration.total_seconds():
                limit_reached.set()
                break
        put(_DONE)
    except Exception as exc:
        put(exc)
    finally:
        channel.close()


def _prepare(number: int, response: federation_pb2.FederationFetchResponse, cursors: Cursors, settings: Settings,
             at: datetime, provenance: dict[str, Any]) -> _Page:
    """Validate a response's keys by the publish rules as of ``at`` (the time it arrived)."""
    reasons: list[str] = []
    primary = exposures_db.StagedRows(**provenance)
    rejected = _stage(response.keys, ForeignKeyRules(settings, at), primary, reasons)
    revised: list[Exposure] = []
    if response.revisedKeys:
        revised, bad = _convert(response.revisedKeys, settings, at, provenance, reasons)
        rejected += bad
    return _Page(number, cursors, len(response.keys) + len(response.revisedKeys), primary, revised, rejected,
                 reasons)


def _reject(reasons: list[str], exc: Exception) -> None:
    reason = str(exc)
    if reason not in reasons and len(reasons) < MAX_REASONS:
        reasons.append(reason)


def _stage(keys: Iterable[federation_pb2.ExposureKey], rules: ForeignKeyRules, rows: exposures_db.StagedRows,
           reasons: list[str]) -> int:
    """Validate primary keys into ``rows``; returns how many failed the publish rules (dropped; a few reasons
    are kept). The hot loop of a pull: no object per key besides its COPY line."""
    rejected = 0
    stage = rules.stage
    for key in keys:
        try:
            # proto3 cannot tell 0 from unset: hasSymptomOnset says whether the partner knew the onset.
            stage(rows, key.exposureKey, key.transmissionRisk, key.intervalNumber, key.intervalCount, key.reportType,
                  key.daysSinceOnsetOfSymptoms if key.hasSymptomOnset else None, key.regions, key.traveler)
        except (ValueError, OverflowError) as exc:  # overflow: interval numbers no real key can have
            rejected += 1
            _reject(reasons, exc)
    return rejected


def _convert(keys: Iterable[federation_pb2.ExposureKey], settings: Settings, now: datetime,
             provenance: dict[str, Any], reasons: list[str]) -> tuple[list[Exposure], int]:
    """Validated rows and how many keys failed the publish rules (dropped; a few reasons are kept)."""
    out, rejected = [], 0
    for key in keys:
        try:
            out.append(to_exposure(foreign_key(key), settings=settings, now=now, **provenance))
        except (ValueError, OverflowError) as exc:
            rejected += 1
            _reject(reasons, exc)
    return out, rejected


def _store_batch(engine: Engine, guard: exposures_db.PartitionGuard, query_id: str, report: PullReport,
                 batch: list[_Page], at: datetime) -> None:
    """One transaction: the pages' keys, the cursor after the last of them, and the sync counters, or none."""
    primary = batch[0].primary if len(batch) == 1 else exposures_db.StagedRows.merged([p.primary for p in batch])
    revised = [e for page in batch for e in page.revised]
    rejected = sum(page.rejected for page in batch)
    cursors = batch[-1].cursors
    what = f"page {batch[0].number}" if len(batch) == 1 else f"pages {batch[0].number}-{batch[-1].number}"
    try:
        guard.ensure(primary.created_ats())
        with engine.begin() as conn:
            counts = store_foreign_keys(conn, primary, revised, same_source=lambda e: e.sync_query_id == query_id,
                                        revised_at=at)
            db.save_cursors(conn, query_id, cursors)
            db.record_page(conn, report.sync_id, insertions=counts.inserted, revisions=counts.revised,
                           rejected=rejected, skipped=counts.skipped, max_timestamp=cursors.last_timestamp,
                           max_revised_timestamp=cursors.last_revised_timestamp, pages=len(batch))
    except Exception as exc:
        raise _PullProblem(f"{what}: storing {'it' if len(batch) == 1 else 'them'} failed: {_describe(exc)}"
                           ) from exc
    log.debug("federation query %r: %s stored (%d keys, %d revised keys)", query_id, what, len(primary),
              len(revised))
    # The report follows the committed counters, so a failed batch leaves no trace in it either.
    report.pages += len(batch)
    report.insertions += counts.inserted
    report.revisions += counts.revised
    report.skipped += counts.skipped
    report.rejected += rejected
    report.max_timestamp = _later(report.max_timestamp, cursors.last_timestamp)
    report.max_revised_timestamp = _later(report.max_revised_timestamp, cursors.last_revised_timestamp)
    for page in batch:
        for reason in page.reasons:
            if reason not in report.rejected_reasons and len(report.rejected_reasons) < MAX_REASONS:
                report.rejected_reasons.append(reason)
                log.warning("federation query %r: rejected a key: %s", query_id, reason)


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None or (b is not None and b > a) else a
