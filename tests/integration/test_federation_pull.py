"""Federation pull against real Postgres and a fake partner: an in-process gRPC Fetch server that serves scripted
pages along its cursors, checks our ES256 tokens, and fails, stalls or talks garbage on demand."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enpipeline.db import exposures as exposures_db
from enpipeline.db import federation_in as db
from enpipeline.federation import pull as pull_module
from enpipeline.federation.credentials import credentials_name, store_credentials
from enpipeline.federation.pull import ALREADY_RUNNING, COMPLETE, TIME_LIMIT, FederationPullError, pull_query
from enpipeline.model import Exposure
from enpipeline.proto import federation_pb2 as pb
from enpipeline.proto import federation_pb2_grpc
from enpipeline.timeutil import interval_number, truncate, utc_midnight
from tests import support

AUD = "https://partner.example/federation"
ISS = "enpipeline-test-puller"
SUB = "us-server"
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, where the fake partner's cursors start
CONFIRMED, CLINICAL, SELF_REPORT, RECURSIVE, REVOKED = 1, 2, 3, 4, 5


# -- the fake partner ---------------------------------------------------------------------------------------

def state(ts: int, token: str = "", rts: int = 0, rtoken: str = "") -> pb.FetchState:
    return pb.FetchState(keyCursor=pb.Cursor(timestamp=ts, nextToken=token),
                         revisedKeyCursor=pb.Cursor(timestamp=rts, nextToken=rtoken))


def _where(s: pb.FetchState) -> tuple[int, str]:
    return s.keyCursor.timestamp, s.keyCursor.nextToken


@dataclass
class FakePartner:
    """Answers each Fetch by the request's key cursor (as a real server does): ``script`` builds the chain."""

    port: int
    public_key: ec.EllipticCurvePublicKey
    audience: str = AUD
    responses: dict[tuple[int, str], pb.FederationFetchResponse] = field(default_factory=dict)
    requests: list[pb.FederationFetchRequest] = field(default_factory=list)
    metadata: list[list[tuple[str, str]]] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    # Page numbers count from 1 along the script; 0 is any cursor past its end.
    fail: dict[int, tuple[grpc.StatusCode, str]] = field(default_factory=dict)   # page number -> abort once
    delay: dict[int, float] = field(default_factory=dict)                         # page number -> seconds
    gate: threading.Event | None = None        # when set by a test: block every call until it is released
    entered: threading.Event = field(default_factory=threading.Event)
    pages: dict[tuple[int, str], int] = field(default_factory=dict)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def script(self, pages: list[list[pb.ExposureKey]], revised: list[list[pb.ExposureKey]] | None = None, *,
               start: pb.FetchState | None = None) -> list[pb.FetchState]:
        """Serve ``pages`` one after the other from ``start`` on; returns each page's nextFetchState."""
        revised = revised or [[] for _ in pages]
        at = start or state(0)
        nexts = []
        for i, keys in enumerate(pages):
            last = i == len(pages) - 1
            base = _where(at)[0] or T0
            nxt = state(base + 60, "" if last else f"off-{base}-{i + 1}", base + 30, "" if last else f"r-{i + 1}")
            self.responses[_where(at)] = pb.FederationFetchResponse(keys=keys, revisedKeys=revised[i],
                                                                    partialResponse=not last, nextFetchState=nxt)
            self.pages[_where(at)] = i + 1
            nexts.append(nxt)
            at = nxt
        return nexts

    def Fetch(self, request: pb.FederationFetchRequest, context: grpc.ServicerContext) -> pb.FederationFetchResponse:
        md = list(context.invocation_metadata())
        self.requests.append(request)
        self.metadata.append(md)
        auth = [v for k, v in md if k == "authorization"]
        if len(auth) != 1 or not auth[0].startswith("Bearer "):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or repeated authorization")
        token = auth[0][len("Bearer "):]
        try:
            self.claims.append(jwt.decode(token, self.public_key, algorithms=["ES256"], audience=self.audience))
            self.headers.append(jwt.get_unverified_header(token))
        except jwt.PyJWTError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"Invalid token: {exc}")
        page = self.pages.get(_where(request.state), 0)
        if page in self.fail:
            code, details = self.fail.pop(page)
            context.abort(code, details)
        if page in self.delay:
            time.sleep(self.delay[page])
        if self.gate is not None:
            self.entered.set()
            self.gate.wait(20)
        # Past the end of the script: nothing new, the cursor stays where it is.
        return self.responses.get(_where(request.state),
                                  pb.FederationFetchResponse(partialResponse=False, nextFetchState=request.state))


@pytest.fixture
def partner_factory() -> Iterator[Callable[..., FakePartner]]:
    servers: list[grpc.Server] = []

    def make(public_key: ec.EllipticCurvePublicKey, **kwargs) -> FakePartner:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        port = server.add_insecure_port("127.0.0.1:0")
        fake = FakePartner(port=port, public_key=public_key, **kwargs)
        federation_pb2_grpc.add_FederationServicer_to_server(fake, server)
        server.start()
        servers.append(server)
        return fake

    yield make
    for s in servers:
        s.stop(0)


@pytest.fixture
def garbage_server() -> Iterator[str]:
    """Speaks gRPC at /Federation/Fetch but answers bytes that are no FederationFetchResponse."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"\x0a\xff\xff\xff\x0f\x01",
                                                  request_deserializer=lambda b: b,
                                                  response_serializer=lambda b: b)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("Federation", {"Fetch": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


# -- our side -----------------------------------------------------------------------------------------------

def clean_federation(engine) -> None:
    """The shared fixtures do not know the federation tables: every test here starts without queries."""
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE federation_in_query CASCADE"))


@pytest.fixture(autouse=True)
def _no_queries(engine) -> Iterator[None]:
    clean_federation(engine)
    yield
    clean_federation(engine)


@pytest.fixture
def fsettings(settings, tmp_path):
    # One page per transaction, so the tests can name the page a failure stops at (batching is tested apart).
    return settings.replace(key_dir=tmp_path / "keys", federation_rpc_timeout=timedelta(seconds=5),
                            federation_store_batch=1)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def add_query(engine, key_dir: Path, query_id: str, server: str, key: ec.EllipticCurvePrivateKey, **kwargs
              ) -> db.FederationInQuery:
    ref = store_credentials(key_dir, credentials_name(query_id), private_pem(key))
    fields = {"partner": f"partner-{query_id}", "audience": AUD, "issuer": ISS, "subject": SUB, **kwargs}
    with engine.begin() as conn:
        return db.add_query(conn, db.FederationInQuery(query_id=query_id, server_addr=server, credentials=ref,
                                                       **fields), datetime.now(UTC))


def tek(now: datetime, *, days_ago: int = 2, key: bytes | None = None, tr: int = 2, rt: int = CONFIRMED,
        dsos: int | None = None, regions: tuple[str, ...] = ("us",), traveler: bool = False, count: int = 144,
        start: int | None = None, has_onset: bool | None = None, raw_dsos: int | None = None) -> pb.ExposureKey:
    """A key as a partner sends it: by default a full day two days ago, confirmed, valid everywhere."""
    if start is None:
        start = interval_number(utc_midnight(now)) - 144 * days_ago
    return pb.ExposureKey(exposureKey=key if key is not None else os.urandom(16), transmissionRisk=tr,
                          intervalNumber=start, intervalCount=count, reportType=rt,
                          daysSinceOnsetOfSymptoms=raw_dsos if raw_dsos is not None else (dsos or 0),
                          hasSymptomOnset=dsos is not None if has_onset is None else has_onset,
                          traveler=traveler, regions=list(regions))


def stored(engine, keys: list[pb.ExposureKey] | None = None) -> dict[bytes, Exposure]:
    with engine.connect() as conn:
        if keys is None:
            rows = conn.execute(sa.text("SELECT exposure_key FROM exposure")).scalars()
            return exposures_db.read_keys(conn, [bytes(k) for k in rows])
        return exposures_db.read_keys(conn, [k.exposureKey for k in keys])


def exposure_count(engine) -> int:
    with engine.connect() as conn:
        return exposures_db.count(conn)


def query_row(engine, query_id: str) -> db.FederationInQuery:
    with engine.connect() as conn:
        q = db.get_query(conn, query_id)
    assert q is not None
    return q


def syncs(engine, query_id: str) -> list[db.FederationInSync]:
    with engine.connect() as conn:
        return db.list_syncs(conn, query_id)


def as_time(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return support.new_signing_key()


@pytest.fixture
def partner(partner_factory, key) -> FakePartner:
    return partner_factory(key.public_key())


# -- the happy path -----------------------------------------------------------------------------------------

def test_pull_follows_the_cursors_page_by_page_and_stores_keys_with_their_source(engine, fsettings, partner, key):
    now = datetime.now(UTC)
    pages = [[tek(now, regions=(" us", "ca ")), tek(now, traveler=True)], [tek(now, rt=CLINICAL, tr=0)],
             [tek(now, regions=())]]
    nexts = partner.script(pages)
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key, include_regions=("US", "CA"),
              exclude_regions=("MX",), only_travelers=False, only_local_provenance=True)

    report = pull_query(fsettings, engine, "q1", now)

    assert report.status == COMPLETE and report.pages == 3
    assert (report.insertions, report.revisions, report.rejected, report.skipped) == (4, 0, 0, 0)
    assert report.max_timestamp == as_time(_where(nexts[-1])[0])
    # Each call carries the cursor the previous page returned, and what the query asks for.
    assert [_where(r.state) for r in partner.requests] == [(0, ""), _where(nexts[0]), _where(nexts[1])]
    assert partner.requests[1].state == nexts[0]
    for r in partner.requests:
        assert list(r.includeRegions) == ["CA", "US"] and list(r.excludeRegions) == ["MX"]
        assert r.onlyLocalProvenance and not r.onlyTravelers and r.maxExposureKeys == 500
    # Tokens: ES256, our iss/sub and the query's audience (the fake verified the signature with our public key).
    assert len(partner.claims) == 3 and {h["alg"] for h in partner.headers} == {"ES256"}
    for claims in partner.claims:
        assert (claims["iss"], claims["sub"], claims["aud"]) == (ISS, SUB, AUD)
        assert 0 < claims["exp"] - claims["iat"] <= fsettings.federation_token_lifetime.total_seconds()
    assert all(sum(1 for k, _ in md if k == "authorization") == 1 for md in partner.metadata)

    rows = stored(engine, [k for page in pages for k in page])
    assert len(rows) == 4
    for row in rows.values():
        assert row.local_provenance is False and row.sync_id == report.sync_id and row.sync_query_id == "q1"
        assert row.app_package_name is None and row.created_at == truncate(now, timedelta(hours=1))
    assert rows[pages[0][0].exposureKey].regions == ["CA", "US"]
    assert rows[pages[0][1].exposureKey].traveler is True
    assert rows[pages[1][0].exposureKey].report_type == "likely"
    assert rows[pages[1][0].exposureKey].transmission_risk == 4  # backfilled from the report type
    assert rows[pages[0][0].exposureKey].report_type == "confirmed"

    q = query_row(engine, "q1")
    assert q.cursors == db.Cursors(as_time(_where(nexts[-1])[0]), None, as_time(nexts[-1].revisedKeyCursor.timestamp),
                                   None)
    (sync,) = syncs(engine, "q1")
    assert (sync.pages, sync.insertions, sync.revisions, sync.rejected, sync.skipped) == (3, 4, 0, 0, 0)
    assert sync.completed is not None and sync.error is None
    assert sync.max_timestamp == q.cursors.last_timestamp

    # The next pull starts where this one ended; the partner has nothing new.
    again = pull_query(fsettings, engine, "q1", datetime.now(UTC))
    assert again.status == COMPLETE and again.insertions == 0 and again.pages == 1
    assert _where(partner.requests[-1].state) == (_where(nexts[-1])[0], "")
    assert exposure_count(engine) == 4


def test_a_key_the_partner_sends_twice_or_we_already_have_is_stored_once(engine, fsettings, partner, key):
    now = datetime.now(UTC)
    local = Exposure(exposure_key=os.urandom(16), transmission_risk=2, app_package_name="com.example", regions=["US"],
                     traveler=False, interval_number=interval_number(utc_midnight(now)) - 288, interval_count=144,
                     created_at=truncate(now, timedelta(hours=1)), report_type="confirmed")
    support_insert(engine, [local])
    dup = tek(now)
    partner.script([[dup, tek(now, key=dup.exposureKey)],
                    [tek(now, key=dup.exposureKey), tek(now, key=local.exposure_key)]])
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key)
    report = pull_query(fsettings, engine, "q1", now)
    assert (report.insertions, report.skipped) == (1, 3)
    assert stored(engine)[local.exposure_key].local_provenance is True  # our own key is not taken over
    assert exposure_count(engine) == 2


def support_insert(engine, rows: list[Exposure]) -> None:
    exposures_db.PartitionGuard(engine).ensure(r.created_at for r in rows)
    with engine.begin() as conn:
        exposures_db.insert_exposures(conn, rows)


# -- validation -------------------------------------------------------------------------------------------

def test_keys_that_fail_the_publish_rules_are_counted_and_never_stored(engine, fsettings, partner, key):
    now = datetime.now(UTC)
    good = [tek(now), tek(now, days_ago=10)]
    bad = [tek(now, days_ago=20),                                  # expired before the 15-day window
           tek(now, key=os.urandom(15)),                           # wrong length
           tek(now, start=interval_number(now) + 6),               # starts in the future
           tek(now, tr=9),                                         # transmission risk out of range
           tek(now, count=0),                                      # no interval count
           tek(now, rt=SELF_REPORT),                               # refused by default
           tek(now, rt=RECURSIVE)]                                 # refused by default
    partner.script([good[:1] + bad[:4], bad[4:] + good[1:]])
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key)

    report = pull_query(fsettings, engine, "q1", now)

    assert (report.insertions, report.rejected) == (2, 7)
    assert set(stored(engine)) == {k.exposureKey for k in good}
    reasons = " | ".join(report.rejected_reasons)
    assert len(report.rejected_reasons) == 5  # a few, to diagnose the partner, not one per key
    for part in ("too old", "invalid key length", "in the future", "invalid transmission risk"):
        assert part in reasons
    (sync,) = syncs(engine, "q1")
    assert (sync.rejected, sync.insertions) == (7, 2)


def test_self_reports_and_recursive_keys_are_taken_when_accepted(engine, fsettings, partner, key):
    now = datetime.now(UTC)
    keys = [tek(now, rt=SELF_REPORT), tek(now, rt=RECURSIVE), tek(now, rt=REVOKED)]
    partner.script([keys])
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key)
    accepting = fsettings.replace(federation_accept_self_report=True, federation_accept_recursive=True)
    report = pull_query(accepting, engine, "q1", now)
    assert (report.insertions, report.rejected) == (2, 0)
    rows = stored(engine, keys)
    assert {rows[k.exposureKey].report_type for k in keys[:2]} == {"likely"}
    assert keys[2].exposureKey not in rows  # a revoked key is never stored as a new key, as in a publish


def test_days_since_onset_missing_is_not_zero(engine, fsettings, partner, key):
    now = datetime.now(UTC)
    missing = tek(now)
    zero = tek(now, dsos=0)
    unset_but_nonzero = tek(now, raw_dsos=5, has_onset=False)
    negative = tek(now, dsos=-3)
    out_of_range = tek(now, dsos=20)
    keys = [missing, zero, unset_but_nonzero, negative, out_of_range]
    partner.script([keys])
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key)
    assert pull_query(fsettings, engine, "q1", now).insertions == 5
    rows = stored(engine, keys)
    assert [rows[k.exposureKey].days_since_symptom_onset for k in keys] == [None, 0, None, -3, None]


# -- revisions ----------------------------------------------------------------------------------------------

def test_revised_keys_only_revise_keys_this_query_pulled(engine, fsettings, partner_factory, key):
    now = datetime.now(UTC)
    at = truncate(now, timedelta(hours=1))
    start = interval_number(utc_midnight(now)) - 288
    local = Exposure(exposure_key=os.urandom(16), transmission_risk=2, app_package_name="com.example",
                     regions=["US"], traveler=False, interval_number=start, interval_count=144, created_at=at,
                     report_type="likely")
    other = Exposure(exposure_key=os.urandom(16), transmission_risk=2, app_package_name=None, regions=["US"],
                     traveler=False, interval_number=start, interval_count=144, created_at=at,
                     local_provenance=False, report_type="likely", sync_id=999, sync_query_id="other")
    support_insert(engine, [local, other])
    ours = tek(now, rt=CLINICAL)
    revoke = [tek(now, key=k, rt=REVOKED) for k in (local.exposure_key, other.exposure_key, ours.exposureKey)]
    confirm_again = tek(now, key=ours.exposureKey, rt=CONFIRMED)  # a second revision of the same key: skipped
    partner = partner_factory(key.public_key())
    partner.script([[ours], [], []], revised=[[], revoke, [confirm_again]])
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key)

    report = pull_query(fsettings, engine, "q1", now)

    assert (report.insertions, report.revisions, report.skipped) == (1, 1, 3)
    rows = stored(engine)
    assert rows[ours.exposureKey].revised_report_type == "negative" and rows[ours.exposureKey].revised_at is not None
    assert rows[ours.exposureKey].report_type == "likely"
    for untouched in (local, other):
        assert rows[untouched.exposure_key].revised_report_type is None
        assert rows[untouched.exposure_key].revised_at is None
    (sync,) = syncs(engine, "q1")
    assert (sync.revisions, sync.skipped) == (1, 3)
    assert sync.max_revised_timestamp is not None


# -- failures and resumption ----------------------------------------------------------------------------------

def _three_pages(now: datetime, partner: FakePartner) -> tuple[list[list[pb.ExposureKey]], list[pb.FetchState]]:
    pages = [[tek(now) for _ in range(3)] for _ in range(4)]
    return pages, partner.script(pages)


@pytest.mark.parametrize("where", ["store_foreign_keys", "record_page"])
def test_a_crash_while_storing_page_3_resumes_from_page_3_without_loss_or_duplication(
        engine, fsettings, partner, key, monkeypatch, where):
    now = datetime.now(UTC)
    pages, nexts = _three_pages(now, partner)
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key)
    target = pull_module if where == "store_foreign_keys" else pull_module.db
    real = getattr(target, where)
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)  # the page's statements ran; the crash comes before the commit
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return result

    monkeypatch.setattr(target, where, crashing)
    with pytest.raises(FederationPullError) as failed:
        pull_query(fsettings, engine, "q1", now)
    message = str(failed.value)
    assert "'q1'" in message and "partner-q1" in message and partner.addr in message
    assert "page 3: storing it failed: RuntimeError: disk on fire" in message and "\n" not in message

    # Pages 1 and 2 are stored with the cursor after page 2; nothing of page 3 (keys, cursor, counters).
    assert set(stored(engine)) == {k.exposureKey for p in pages[:2] for k in p}
    assert query_row(engine, "q1").cursors.primary_cursor == nexts[1].keyCursor.nextToken
    (sync,) = syncs(engine, "q1")
    assert (sync.pages, sync.insertions, sync.completed) == (2, 6, None)
    assert "disk on fire" in sync.error

    monkeypatch.setattr(target, where, real)
    partner.requests.clear()
    report = pull_query(fsettings, engine, "q1", datetime.now(UTC))
    assert report.status == COMPLETE and (report.pages, report.insertions, report.skipped) == (2, 6, 0)
    assert partner.requests[0].state == nexts[1]  # resumed at page 3, not at the beginning
    assert set(stored(engine)) == {k.exposureKey for p in pages for k in p} and exposure_count(engine) == 12
    assert [s.error is None for s in syncs(engine, "q1")] == [True, False]


def test_the_partner_failing_on_page_3_resumes_there(engine, fsettings, partner, key):
    now = datetime.now(UTC)
    _, nexts = _three_pages(now, partner)
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key)
    partner.fail[3] = (grpc.StatusCode.UNAVAILABLE, "partner restarting")
    with pytest.raises(FederationPullError, match=r"page 3: UNAVAILABLE: partner restarting"):
        pull_query(fsettings, engine, "q1", now)
    assert exposure_count(engine) == 6
    assert query_row(engine, "q1").cursors.primary_cursor == nexts[1].keyCursor.nextToken
    report = pull_query(fsettings, engine, "q1", datetime.now(UTC))
    assert (report.pages, report.insertions) == (2, 6) and exposure_count(engine) == 12


@pytest.mark.parametrize("mode", ["garbage", "timeout", "unauthenticated", "dead_port", "no_progress"])
def test_a_broken_partner_gives_a_clear_error_and_leaves_the_cursor(engine, fsettings, partner_factory, key,
                                                                    garbage_server, mode):
    now = datetime.now(UTC)
    settings = fsettings
    if mode == "garbage":
        server, expect = garbage_server, "page 1: INTERNAL"
    elif mode == "dead_port":
        server, expect = f"127.0.0.1:{support_free_port()}", "page 1: UNAVAILABLE"
    else:
        partner = partner_factory(key.public_key() if mode != "unauthenticated"
                                  else support.new_signing_key().public_key())
        server = partner.addr
        first = partner.script([[tek(now)], [tek(now)]])[0]
        if mode == "timeout":
            partner.delay[2] = 2.0
            settings = fsettings.replace(federation_rpc_timeout=timedelta(milliseconds=300))
            expect = "page 2: DEADLINE_EXCEEDED"
        elif mode == "unauthenticated":
            expect = "page 1: UNAUTHENTICATED: Invalid token"
        else:  # a partial page whose cursor does not move would be asked for again and again
            partner.responses[_where(first)] = pb.FederationFetchResponse(keys=[tek(now)], partialResponse=True,
                                                                          nextFetchState=first)
            expect = "page 2: the partner sent a partial response without moving its cursor"
    add_query(engine, fsettings.key_dir, "q1", server, key)
    before = query_row(engine, "q1").cursors

    started = time.monotonic()
    with pytest.raises(FederationPullError) as failed:
        pull_query(settings, engine, "q1", now)
    assert time.monotonic() - started < 5
    message = str(failed.value)
    assert message.startswith(f"federation pull of query 'q1' (partner 'partner-q1', server {server}) failed: ")
    assert expect in message and "\n" not in message
    (sync,) = syncs(engine, "q1")
    assert sync.completed is None and expect in sync.error
    after = query_row(engine, "q1").cursors
    if mode in ("timeout", "no_progress"):  # page 1 was fine and is kept
        assert after.primary_cursor == first.keyCursor.nextToken and exposure_count(engine) == 1
    else:
        assert after == before and exposure_count(engine) == 0


def support_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_missing_credentials_or_query_fail_clearly(engine, fsettings, partner, key):
    with pytest.raises(FederationPullError, match=r"query 'nope' failed: no such query"):
        pull_query(fsettings, engine, "nope", datetime.now(UTC))
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key)
    (fsettings.key_dir / f"{credentials_name('q1')}.pem").unlink()
    with pytest.raises(FederationPullError, match=r"credentials 'file:federation-in-q1' not found"):
        pull_query(fsettings, engine, "q1", datetime.now(UTC))
    assert partner.requests == []


# -- one pull per query at a time, time limit, history ----------------------------------------------------------

def test_a_concurrent_pull_of_the_same_query_is_skipped_but_other_queries_run(engine, fsettings, partner_factory,
                                                                               key):
    now = datetime.now(UTC)
    slow = partner_factory(key.public_key())
    slow.script([[tek(now)]])
    slow.gate = threading.Event()
    fast = partner_factory(key.public_key())
    fast.script([[tek(now)]])
    add_query(engine, fsettings.key_dir, "slow", slow.addr, key)
    add_query(engine, fsettings.key_dir, "fast", fast.addr, key)
    results: list = []
    worker = threading.Thread(target=lambda: results.append(pull_query(fsettings, engine, "slow", now)))
    worker.start()
    try:
        assert slow.entered.wait(10)
        skipped = pull_query(fsettings, engine, "slow", now)
        assert skipped.status == ALREADY_RUNNING and skipped.sync_id is None
        assert skipped.as_dict()["status"] == "already_running" and "another pull" in skipped.summary()
        assert len(slow.requests) == 1 and len(syncs(engine, "slow")) == 1
        assert pull_query(fsettings, engine, "fast", now).insertions == 1
    finally:
        slow.gate.set()
        worker.join(20)
    assert results[0].status == COMPLETE and results[0].insertions == 1
    # The lock is gone with the pull: the next one runs.
    assert pull_query(fsettings, engine, "slow", datetime.now(UTC)).status == COMPLETE


def test_a_pull_stops_after_the_time_limit_and_the_next_one_goes_on(engine, fsettings, partner, key):
    now = datetime.now(UTC)
    _three_pages(now, partner)
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key)
    quick = fsettings.replace(federation_max_pull_duration=timedelta(microseconds=1))
    statuses = []
    for _ in range(4):
        report = pull_query(quick, engine, "q1", datetime.now(UTC))
        statuses.append((report.status, report.pages, report.insertions))
    assert statuses == [(TIME_LIMIT, 1, 3)] * 3 + [(COMPLETE, 1, 3)]
    assert exposure_count(engine) == 12
    history = syncs(engine, "q1")
    assert len(history) == 4 and all(s.completed is not None and s.error is None for s in history)
    assert [s.sync_id for s in history] == sorted((s.sync_id for s in history), reverse=True)


def test_a_new_token_is_minted_when_the_old_one_is_half_spent(engine, fsettings, partner, key):
    now = datetime.now(UTC)
    partner.script([[tek(now)], [tek(now)], [tek(now)]])
    partner.delay[1] = 1.2
    add_query(engine, fsettings.key_dir, "q1", partner.addr, key)
    pull_query(fsettings.replace(federation_token_lifetime=timedelta(seconds=2)), engine, "q1", now)
    tokens = [next(v for k, v in md if k == "authorization") for md in partner.metadata]
    # Page 1 took more than half the 2 s lifetime: page 2 gets a new token, page 3 reuses it.
    assert len(tokens) == 3 and tokens[0] != tokens[1] and tokens[1] == tokens[2]
    assert pull_query(fsettings, engine, "q1", now).status == COMPLETE


# -- the CLI ----------------------------------------------------------------------------------------------------

def _pem_file(tmp_path: Path, key, name: str = "partner-key.pem") -> str:
    path = tmp_path / name
    path.write_bytes(private_pem(key))
    return str(path)


def test_cli_add_list_pull_syncs_remove(cli, engine, tmp_path, partner, key):
    now = datetime.now(UTC)
    pages = [[tek(now), tek(now)], [tek(now, rt=SELF_REPORT)]]
    partner.script(pages)
    creds = _pem_file(tmp_path, key)
    code, out, err = cli("federation", "add-query", "--id", "ca-pull", "--server", partner.addr, "--audience", AUD,
                         "--credentials", creds, "--issuer", ISS, "--subject", SUB, "--include-regions", "us,ca",
                         "--exclude-regions", "mx", "--only-travelers")
    assert code == 0, err
    assert "added federation query 'ca-pull': pull from 'ca-pull'" in out  # the partner defaults to the id
    key_file = tmp_path / "keys" / "federation-in-ca-pull.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600 and (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM federation_in_query")).mappings().one()
    assert row["credentials"] == "file:federation-in-ca-pull" and row["partner"] == "ca-pull"
    assert "PRIVATE KEY" not in str(dict(row))
    assert row["include_regions"] == ["CA", "US"] and row["only_travelers"] is True and row["tls"] is False

    code, out, _ = cli("federation", "list-queries")
    assert code == 0 and "ca-pull" in out and partner.addr in out
    code, out, _ = cli("federation", "list-queries", "--json")
    (listed,) = json.loads(out)
    assert listed["id"] == "ca-pull" and listed["audience"] == AUD and listed["issuer"] == ISS
    assert listed["last_timestamp"] == ""

    code, out, err = cli("federation", "pull", "--query", "ca-pull")
    assert code == 0, err
    assert "2 page(s), 2 inserted, 0 revised, 0 skipped, 1 rejected" in out
    assert "rejected: self-reported key refused" in out
    assert partner.requests[0].onlyTravelers and list(partner.requests[0].includeRegions) == ["CA", "US"]

    code, out, _ = cli("federation", "list-queries", "--json")
    assert json.loads(out)[0]["last_timestamp"] != ""
    partner.fail[0] = (grpc.StatusCode.UNAUTHENTICATED, "Invalid issuer/subject")  # 0: past the script
    code, out, err = cli("federation", "pull", "--query", "ca-pull")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("enpipeline: error: federation pull of query 'ca-pull'")
    assert "UNAUTHENTICATED: Invalid issuer/subject" in err

    code, out, _ = cli("federation", "syncs", "--query", "ca-pull", "--json")
    history = json.loads(out)
    assert [h["inserted"] for h in history] == [0, 2] and "Invalid issuer/subject" in history[0]["error"]
    assert history[1]["completed"] and history[1]["pages"] == 2 and history[1]["rejected"] == 1
    code, out, _ = cli("federation", "syncs", "--query", "ca-pull")
    assert code == 0 and "SYNC_ID" in out and "Invalid issuer/subject" in out

    code, out, _ = cli("federation", "remove-query", "--id", "ca-pull")
    assert code == 0 and "removed federation query 'ca-pull'" in out
    assert not key_file.exists() and exposure_count(engine) == 2  # pulled keys stay
    code, _, err = cli("federation", "remove-query", "--id", "ca-pull")
    assert code == 1 and "no federation query 'ca-pull'" in err
    code, _, err = cli("federation", "syncs", "--query", "ca-pull")
    assert code == 1 and "no federation query" in err
    code, _, err = cli("federation", "pull", "--query", "ca-pull")
    assert code == 1 and "no such query" in err


def test_cli_add_query_refuses_bad_input(cli, tmp_path, key):
    good = _pem_file(tmp_path, key)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_file = _pem_file(tmp_path, rsa_key, "rsa.pem")
    not_key = tmp_path / "junk.pem"
    not_key.write_text("hello")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    base = ["federation", "add-query", "--audience", AUD, "--issuer", ISS, "--subject", SUB]

    def add(*extra: str, creds: str = good, server: str = "partner.example:443") -> tuple[int, str]:
        code, _, err = cli(*base, "--server", server, "--credentials", creds, *extra)
        return code, err

    assert add("--id", "q1", "--partner", "Partner One", "--tls", "--ca", str(ca)) == (0, "")
    for extra, creds, server, expect in [
        (("--id", "q1"), good, "partner.example:443", "already exists"),
        (("--id", "q/2"), good, "partner.example:443", "query id 'q/2' must be"),
        (("--id", "q2"), good, "partner.example", "must be HOST:PORT"),
        (("--id", "q2"), good, "partner.example:70000", "must be HOST:PORT"),
        (("--id", "q2", "--include-regions", "US", "--exclude-regions", "us"), good, "p:1",
         "both included and excluded: US"),
        (("--id", "q2", "--ca", str(ca)), good, "p:1", "--ca only applies with --tls"),
        (("--id", "q2", "--tls", "--ca", str(tmp_path / "missing.pem")), good, "p:1", "cannot read --ca"),
        (("--id", "q2", "--tls", "--ca", str(not_key)), good, "p:1", "holds no PEM certificate"),
        (("--id", "q2"), str(not_key), "p:1", "is not a PEM private key"),
        (("--id", "q2"), rsa_file, "p:1", "must be an ECDSA P-256 private key"),
        (("--id", "q2"), str(tmp_path / "nothing.pem"), "p:1", "cannot read --credentials"),
    ]:
        code, err = add(*extra, creds=creds, server=server)
        assert code == 1 and expect in err, (extra, err)
        assert err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["federation-in-q1.pem"]
    code, out, _ = cli("federation", "list-queries", "--json")
    (q,) = json.loads(out)
    assert (q["partner"], q["tls"], q["ca"]) == ("Partner One", True, str(ca.resolve()))


def test_cli_pull_with_tls_to_a_plaintext_server_fails_clearly(cli, tmp_path, partner, key):
    code, _, err = cli("federation", "add-query", "--id", "q1", "--server", partner.addr, "--audience", AUD,
                       "--credentials", _pem_file(tmp_path, key), "--issuer", ISS, "--subject", SUB, "--tls")
    assert code == 0, err
    code, _, err = cli("federation", "pull", "--query", "q1")
    assert code == 1 and "federation pull of query 'q1' (partner 'q1'" in err and "UNAVAILABLE" in err


def test_batched_pages_keep_their_cursor_with_their_keys(engine, fsettings, partner, key, monkeypatch):
    """With many pages per transaction (the default), a crash loses only whole uncommitted batches: whatever the
    grouping the prefetcher happened to produce, the saved cursor always matches the stored keys exactly."""
    settings = fsettings.replace(federation_store_batch=1000)
    now = datetime.now(UTC)
    pages = [[tek(now) for _ in range(3)] for _ in range(6)]
    nexts = partner.script(pages)
    add_query(engine, settings.key_dir, "q1", partner.addr, key)
    real = pull_module.store_foreign_keys
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return result

    monkeypatch.setattr(pull_module, "store_foreign_keys", crashing)
    try:
        pull_query(settings, engine, "q1", now)
    except FederationPullError as exc:
        assert "disk on fire" in str(exc)
    saved = query_row(engine, "q1").cursors.primary_cursor
    upto = 0 if saved is None else [n.keyCursor.nextToken for n in nexts].index(saved) + 1
    assert set(stored(engine)) == {k.exposureKey for p in pages[:upto] for k in p}
    monkeypatch.setattr(pull_module, "store_foreign_keys", real)
    report = pull_query(settings, engine, "q1", datetime.now(UTC))
    assert report.status == COMPLETE and report.skipped == 0
    assert set(stored(engine)) == {k.exposureKey for p in pages for k in p} and exposure_count(engine) == 18
