"""Partners that fail in the middle of a pull (issue #7, task faults): a federation Fetch server, a partner's
export files on a CDN, and the EU gateway, each against real Postgres.

In every case the pull fails with one line that names the partner and the reason, the cursor or the processed
file records stay exactly where the last good page / batch / file left them, nothing of the bad page is stored,
and a later good run resumes there, storing every key exactly once.

Already covered elsewhere (not repeated here):

* federation pull (tests/integration/test_federation_pull.py): garbage, timeout, token refused, dead port and a
  partial page that does not move its cursor, on the first pages (``test_a_broken_partner_gives_a_clear_error...``);
  UNAVAILABLE on page 3 and resumption (``test_the_partner_failing_on_page_3_resumes_there``); crashes while
  storing (``test_a_crash_while_storing_page_3...``, ``test_batched_pages_keep_their_cursor_with_their_keys``);
* export importer (tests/integration/test_importer.py): a signature by an unregistered key and a wrong signature
  over an altered file (``test_unregistered_key_tampered_file_and_expired_key_are_failed_and_store_nothing``), an
  index naming a missing file (``test_a_failed_download_is_not_recorded_and_is_retried_next_run``, the GCS test),
  unsafe index entries, unsigned files, oversized files, crashes mid-run;
* EFGS pull (tests/integration/test_efgs.py): a share whose signature does not verify or whose certificate is
  another (refused per country, by design the other countries' keys of the batch are kept:
  ``test_a_tampered_share_or_a_wrong_certificate_refuses_that_country_only``) and an audit answering 500
  (``test_a_failed_pull_resumes_at_the_first_batch_not_stored``);
* through Airflow: tests/dags/test_en_federation_pull_dag_test.py (a dead partner, and garbage mid-pull followed
  by a run that resumes).
"""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enpipeline.db import efgs as efgs_db
from enpipeline.db import importer as importer_db
from enpipeline.efgs.pull import EfgsPullError, pull_day
from enpipeline.export.format import ExportHeader, KeyColumns, SignatureInfo, build_export_zip
from enpipeline.export.signing import FileSigner
from enpipeline.federation.importer import ExportImportError, import_exports
from enpipeline.federation.pull import COMPLETE, FederationPullError, pull_query
from enpipeline.proto import federation_pb2 as pb
from enpipeline.timeutil import interval_number
from tests import support
from tests.integration.test_federation_pull import (
    FakePartner,
    _where,
    add_query,
    clean_federation,
    exposure_count,
    query_row,
    syncs,
    tek,
)
from tests.support_efgs import add_target, efgs_key, upload_as

GARBAGE = b"\x0a\xff\xff\xff\x0f<html>502 Bad Gateway</html>"  # a length-delimited field past the end: no message


def stored_keys(engine) -> list[bytes]:
    with engine.connect() as conn:
        return sorted(bytes(k) for k in conn.execute(sa.text("SELECT exposure_key FROM exposure")).scalars())


# == federation pull: the partner's Fetch server fails on page 3 of 4 ============================================

@dataclass
class FaultyPartner:
    """The scripted FakePartner behind a raw gRPC handler, so a page can also be answered with bytes that are no
    FederationFetchResponse (``garbage``), never be answered (``hang``), or take the whole server down while it
    is in flight (``die``, a partner process that crashes); ``restart`` brings it back on the same port."""

    fake: FakePartner
    faults: dict[int, str] = field(default_factory=dict)  # page number -> garbage | hang | die
    once: bool = False  # each fault fires once, as a partner's passing trouble would
    released: threading.Event = field(default_factory=threading.Event)
    server: grpc.Server | None = None

    @property
    def addr(self) -> str:
        return self.fake.addr

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.unary_unary_rpc_method_handler(self._fetch, request_deserializer=None,
                                                      response_serializer=None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("Federation", {"Fetch": handler}),))
        port = server.add_insecure_port(f"127.0.0.1:{self.fake.port}")
        assert port == self.fake.port, f"port {self.fake.port} taken"
        server.start()
        self.server = server

    def stop(self) -> None:
        self.released.set()
        if self.server is not None:
            self.server.stop(0).wait(5)

    def restart(self) -> None:
        self.stop()
        self.released.clear()
        self.start()

    def _fetch(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        request = pb.FederationFetchRequest.FromString(body)
        page = self.fake.pages.get(_where(request.state), 0)
        fault = self.faults.pop(page, None) if self.once else self.faults.get(page)
        if fault == "garbage":
            self.fake.requests.append(request)
            return GARBAGE
        if fault == "hang":
            self.fake.requests.append(request)
            self.released.wait(30)
            return GARBAGE
        if fault == "die":
            self.fake.requests.append(request)
            assert self.server is not None
            self.server.stop(0)  # every call in flight, this one included, is cut off
            self.released.wait(30)
            return GARBAGE
        return self.fake.Fetch(request, context).SerializeToString()


@pytest.fixture
def faulty_partner_factory() -> Iterator[Callable[[ec.EllipticCurvePublicKey], FaultyPartner]]:
    partners: list[FaultyPartner] = []

    def make(public_key: ec.EllipticCurvePublicKey) -> FaultyPartner:
        partner = FaultyPartner(FakePartner(port=support_free_port(), public_key=public_key))
        partner.start()
        partners.append(partner)
        return partner

    yield make
    for p in partners:
        p.stop()


def support_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def federation(engine) -> Iterator[None]:
    clean_federation(engine)
    yield
    clean_federation(engine)


EXPECT = {"garbage": "page 3: INTERNAL", "hang": "page 3: DEADLINE_EXCEEDED", "die": "page 3: "}


@pytest.mark.parametrize("fault", ["garbage", "hang", "die"])
def test_a_partner_failing_mid_pull_leaves_the_cursor_after_the_last_good_page_and_a_later_pull_resumes(
        engine, settings, tmp_path, federation, faulty_partner_factory, fault):
    now = datetime.now(UTC)
    key = support.new_signing_key()
    partner = faulty_partner_factory(key.public_key())
    pages = [[tek(now) for _ in range(3)] for _ in range(4)]
    nexts = partner.fake.script(pages)
    partner.faults[3] = fault
    # The store batches pages as in production (ENP_FEDERATION_STORE_BATCH); a 1 s deadline per Fetch.
    s = settings.replace(key_dir=tmp_path / "keys", federation_rpc_timeout=timedelta(seconds=1))
    add_query(engine, s.key_dir, "q1", partner.addr, key)
    assert query_row(engine, "q1").cursors == query_row(engine, "q1").cursors.__class__(None, None, None, None)

    started = time.monotonic()
    with pytest.raises(FederationPullError) as failed:
        pull_query(s, engine, "q1", now)
    assert time.monotonic() - started < 5

    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"federation pull of query 'q1' (partner 'partner-q1', server {partner.addr}) failed: ")
    assert EXPECT[fault] in message
    if fault == "die":  # the partner went away with the call: cut off, or found nobody listening
        assert "page 3: CANCELLED" in message or "page 3: UNAVAILABLE" in message, message
    # Pages 1 and 2 are stored with the cursor that follows page 2; nothing of page 3.
    assert query_row(engine, "q1").cursors.primary_cursor == nexts[1].keyCursor.nextToken
    assert stored_keys(engine) == sorted(k.exposureKey for p in pages[:2] for k in p)
    (sync,) = syncs(engine, "q1")
    assert (sync.pages, sync.insertions, sync.completed) == (2, 6, None)
    assert EXPECT[fault] in sync.error and sync.error in message

    partner.faults.clear()
    if fault == "die":
        partner.restart()
    partner.fake.requests.clear()
    report = pull_query(s, engine, "q1", datetime.now(UTC))
    assert report.status == COMPLETE and (report.pages, report.insertions, report.skipped) == (2, 6, 0)
    assert partner.fake.requests[0].state == nexts[1]  # resumed at page 3, not at the beginning
    assert stored_keys(engine) == sorted(k.exposureKey for p in pages for k in p) and exposure_count(engine) == 12
    assert [x.error is None for x in syncs(engine, "q1")] == [True, False]


# == export importer: a partner's CDN that fails ===================================================================

class FaultyCdn:
    """A partner's CDN: ``files`` by path; ``faults`` by path: ``dropped`` (Content-Length of the whole file, half
    of it sent, then the connection closes), ``trickle`` (a byte every 50 ms), ``stall`` (no answer until
    ``released``)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, str] = {}
        self.requests: list[str] = []
        self.released = threading.Event()
        cdn = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                cdn.requests.append(self.path)
                body = cdn.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                fault = cdn.faults.get(self.path)
                try:
                    if fault == "stall":
                        cdn.released.wait(30)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if fault == "dropped":
                        self.wfile.write(body[: len(body) // 2])
                        self.close_connection = True
                    elif fault == "trickle":
                        for i in range(len(body)):
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(0.05)
                    else:
                        self.wfile.write(body)
                except OSError:  # the importer gave up
                    self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cdn() -> Iterator[FaultyCdn]:
    c = FaultyCdn()
    try:
        yield c
    finally:
        c.stop()


NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
DAY_NUMBER = interval_number(datetime(2024, 2, 27, tzinfo=UTC))


@dataclass
class PartnerExports:
    """Three signed export files of 5 keys each, their index, and the importer 'p' that knows the signing key."""

    files: dict[str, bytes]
    keys: dict[str, list[bytes]]
    index: bytes


@pytest.fixture
def partner_exports(engine, cdn) -> PartnerExports:
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE export_importer, export_importer_key, import_file RESTART IDENTITY CASCADE"))
    signing_key = ec.generate_private_key(ec.SECP256R1())
    info = SignatureInfo("777", "v1")
    files, keys = {}, {}
    for n, name in enumerate(("a.zip", "b.zip", "c.zip")):
        start = NOW - timedelta(hours=3 - n)
        header = ExportHeader(int(start.timestamp()), int((start + timedelta(hours=1)).timestamp()), "US", 1, 1,
                              (info,))
        keys[name] = [os.urandom(16) for _ in range(5)]
        cols = KeyColumns.from_rows([(k, 0, DAY_NUMBER, 144, 1, None) for k in keys[name]])
        files[name] = build_export_zip(header, cols, KeyColumns.empty(), [(info, FileSigner("p", signing_key))])
    index = "\n".join(f"p/{name}" for name in files).encode()
    for name, data in files.items():
        cdn.files[f"/b/p/{name}"] = data
    cdn.files["/b/p/index.txt"] = index
    public_pem = signing_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with engine.begin() as conn:
        importer_id = importer_db.add_importer(conn, name="p", partner="partner-p",
                                               index_url=f"{cdn.base}/b/p/index.txt", export_root=None, regions=(),
                                               traveler=False, now=NOW - timedelta(days=1))
        importer_db.add_importer_key(conn, importer_id, key_id="777", key_version="v1", public_key_pem=public_pem)
    return PartnerExports(files, keys, index)


def import_records(engine) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        return {f.filename: (f.status, f.error) for f in importer_db.list_import_files(
            conn, importer_db.get_importer(conn, "p").id)}


FILE_FAULTS = {
    # fault: (what the CDN does with b.zip, the reason in the error, recorded as, how the later run gets it)
    "dropped": ("download failed, will retry: connection closed after", None, "next run"),
    "trickle": ("download failed, will retry: timed out after 1s", None, "next run"),
    "stall": ("download failed, will retry: timed out after 1s", None, "next run"),
    "truncated": ("not a readable export file", "FAILED", "retry failed"),
    "garbage": ("not a readable export file", "FAILED", "retry failed"),
}


@pytest.mark.parametrize("fault", list(FILE_FAULTS))
def test_a_partner_file_that_breaks_fails_alone_and_is_imported_by_a_later_run(engine, settings, cdn,
                                                                             partner_exports, fault):
    reason, recorded, later = FILE_FAULTS[fault]
    s = settings.replace(importer_request_timeout=timedelta(seconds=1))
    good = partner_exports.files["b.zip"]
    if fault == "truncated":  # the partner published a cut-off file (served whole)
        cdn.files["/b/p/b.zip"] = good[: len(good) * 2 // 3]
    elif fault == "garbage":
        cdn.files["/b/p/b.zip"] = GARBAGE
    else:
        cdn.faults["/b/p/b.zip"] = fault

    started = time.monotonic()
    with pytest.raises(ExportImportError) as failed:
        import_exports(s, engine, "p", NOW)
    assert time.monotonic() - started < 5

    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"importer 'p': 1 of 3 file(s) failed: p/b.zip: {reason}"), message
    records = import_records(engine)
    assert {n: st for n, (st, _) in records.items()} == {"p/a.zip": "COMPLETE", "p/c.zip": "COMPLETE",
                                                        **({"p/b.zip": recorded} if recorded else {})}
    expected = sorted(partner_exports.keys["a.zip"] + partner_exports.keys["c.zip"])
    assert stored_keys(engine) == expected  # nothing of b.zip

    # The partner's CDN is healthy again (and a cut-off file is republished whole).
    cdn.files["/b/p/b.zip"] = good
    cdn.faults.clear()
    cdn.released.set()
    if later == "retry failed":  # a file refused as unreadable stays refused until the operator retries it
        assert import_exports(s, engine, "p", NOW).files_skipped == 3
        report = import_exports(s, engine, "p", NOW, retry_failed=True)
    else:
        report = import_exports(s, engine, "p", NOW)
    assert (report.files_imported, report.files_skipped, report.keys_inserted) == (1, 2, 5)
    assert {st for st, _ in import_records(engine).values()} == {"COMPLETE"}
    assert stored_keys(engine) == sorted(k for ks in partner_exports.keys.values() for k in ks)


INDEX_FAULTS = {"garbage": "index is not US-ASCII text", "dropped": "connection closed after",
                "stall": "timed out after 1s"}


@pytest.mark.parametrize("fault", list(INDEX_FAULTS))
def test_an_index_that_breaks_records_nothing_and_a_later_run_imports_everything(engine, settings, cdn,
                                                                                 partner_exports, fault):
    s = settings.replace(importer_request_timeout=timedelta(seconds=1))
    if fault == "garbage":
        cdn.files["/b/p/index.txt"] = bytes(range(256))
    else:
        cdn.faults["/b/p/index.txt"] = fault

    with pytest.raises(ExportImportError) as failed:
        import_exports(s, engine, "p", NOW)

    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"importer 'p': cannot read index {cdn.base}/b/p/index.txt: {INDEX_FAULTS[fault]}")
    assert import_records(engine) == {} and stored_keys(engine) == []
    assert [r for r in cdn.requests if r.endswith(".zip")] == []  # a cut-off index is not half followed

    cdn.files["/b/p/index.txt"] = partner_exports.index
    cdn.faults.clear()
    cdn.released.set()
    report = import_exports(s, engine, "p", NOW)
    assert (report.files_imported, report.keys_inserted) == (3, 15)
    assert stored_keys(engine) == sorted(k for ks in partner_exports.keys.values() for k in ks)


# == EFGS pull: the gateway fails on batch 2 of 3 ================================================================

EFGS_FAULTS = {
    # (endpoint, fault): the reason in the error
    ("download", "garbage"): "not a DiagnosisKeyBatch (DecodeError)",
    ("download", "truncate"): "connection closed after",
    ("download", "trickle"): "the answer took longer than 1s",
    ("download", "stall"): "timed out",
    ("audit", "garbage"): "not a JSON list of entries",
    ("audit", "truncate"): "connection closed after",
}


@pytest.mark.parametrize(("endpoint", "fault"), list(EFGS_FAULTS))
def test_a_gateway_failing_on_batch_2_leaves_the_cursor_on_batch_1_and_a_later_pull_resumes(
        gateway, engine, settings, tmp_path, endpoint, fault):
    s = settings.replace(key_dir=tmp_path / "keys", efgs_request_timeout=timedelta(seconds=1))
    de = gateway.country("DE")
    add_target(engine, s.key_dir, gateway, de)
    fr = gateway.country("FR")
    today = datetime.now(UTC).date()
    tags, keys = [], []
    for n in range(3):
        batch = [efgs_key("FR") for _ in range(4)]
        assert upload_as(gateway, fr, batch, f"fr-{n}") == 201
        tags += gateway.batch()
        keys.append(batch)
    (gateway.download_fault if endpoint == "download" else gateway.audit_fault)[tags[1]] = fault

    started = time.monotonic()
    with pytest.raises(EfgsPullError) as failed:
        pull_day(s, engine, "efgs", today, datetime.now(UTC))
    assert time.monotonic() - started < 5

    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"EFGS pull of target 'efgs' for {today.isoformat()} failed: ")
    where = f"download of batch {tags[1]!r}" if endpoint == "download" and fault != "garbage" else \
        f"batch {tags[1]!r}" if endpoint == "download" else f"audit of batch {tags[1]!r}"
    assert where in message and EFGS_FAULTS[endpoint, fault] in message, message
    with engine.connect() as conn:
        cursor = efgs_db.get_cursor(conn, "efgs", today)
        (download,) = efgs_db.list_downloads(conn, "efgs")
    assert (cursor.last_batch_tag, cursor.next_batch_tag, cursor.batches) == (tags[0], tags[1], 1)
    assert download.completed is None and download.batches == 1 and download.error in message
    assert stored_keys(engine) == sorted(k.keyData for k in keys[0])  # nothing of batch 2

    gateway.download_fault.clear()
    gateway.audit_fault.clear()
    gateway.release.set()
    gateway.requests.clear()
    report = pull_day(s, engine, "efgs", today, datetime.now(UTC))
    assert (report.batches, report.inserted, report.skipped) == (2, 8, 0)
    assert [r["batchTag"] for r in gateway.requests if "/audit/" not in r["path"]] == tags[1:]
    assert stored_keys(engine) == sorted(k.keyData for batch in keys for k in batch)
