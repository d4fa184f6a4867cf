"""The export importer on real Postgres, fed with real export files of health authorities (../shared/realworld).

The files are served by a local HTTP server from a temporary folder laid out like a CDN bucket
(``<bucket>/<root>/index.txt`` + zips), or read through ``file://`` URLs. The loose export.bin/export.sig pairs
(Germany, Switzerland) are zipped here, byte for byte, as their CDNs served them.

Time: these keys are from 2020. The publish rules the importer applies are relative to ``now`` (a key must have
ended less than 15 days ago and must not start in the future), so every run passes a ``now`` an hour after the
file's window ended, which is when the partner's server would have published it. Against today's clock every
key would be rejected as too old.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enpipeline.db import importer as importer_db
from enpipeline.export.format import (
    ExportHeader,
    KeyColumns,
    SignatureInfo,
    build_export_zip,
    build_zip,
    read_export,
)
from enpipeline.export.signing import FileSigner
from enpipeline.federation.importer import (
    ExportImportError,
    ImporterBusy,
    default_fetch,
    import_exports,
    parse_index,
    resolve_entry,
)
from enpipeline.timeutil import interval_number


def _realworld_dir() -> Path:
    override = os.environ.get("ENP_REALWORLD_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2].parent / "shared" / "realworld"


REALWORLD = _realworld_dir()
AVAILABLE = (REALWORLD / "manifest.json").is_file()
# Locally a missing folder skips; in CI (CI=true, ../shared is always beside the clone) it must fail loudly.
needs_realworld = pytest.mark.skipif(not AVAILABLE and not os.environ.get("CI"),
                                     reason=f"real-world export files not found at {REALWORLD} "
                                            "(set ENP_REALWORLD_DIR)")

# An hour after each file's window ended (see the module docstring).
DE_NOW = datetime(2020, 7, 23, 1, 0, tzinfo=UTC)      # CWA daily package 2020-07-22
CH_NOW = datetime(2020, 8, 26, 3, 0, tzinfo=UTC)      # SwissCovid 2020-08-26 00:00-02:00
FI_NOW = datetime(2020, 12, 4, 1, 0, tzinfo=UTC)      # Koronavilkku test batches of 2020-12-03
US_NOW = datetime(2020, 11, 19, 21, 50, tzinfo=UTC)   # Google reference server, 2020-11-19 20:45-20:50

DE_KEY = ("262", "v1", "de-cwa-prod-262-v1.pem")
CH_KEY = ("228", "v1", "ch-swisscovid-prod.pem")
FI_KEY = ("244", "v1", "fi-koronavilkku-test-secp256k1.pem")
US_KEY = ("310", "v1", "us-google-sample-310-v1.pem")


# -- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_importers(engine):
    """conftest's `engine` empties the core tables; the importer tables are emptied here."""
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE export_importer, export_importer_key, import_file RESTART IDENTITY CASCADE"))
    return engine


@dataclass
class Cdn:
    """A folder served over HTTP on 127.0.0.1; ``requests`` records every path asked for."""

    root: Path
    base: str
    requests: list[str] = field(default_factory=list)

    def put(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def index(self, name: str, entries: list[str]) -> str:
        self.put(name, "\n".join(entries).encode())  # the reference writes no trailing newline
        return self.url(name)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def file_url(self, name: str) -> str:
        return (self.root / name).as_uri()


@pytest.fixture
def cdn(tmp_path: Path) -> Iterator[Cdn]:
    root = tmp_path / "cdn"
    root.mkdir()
    seen: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Cdn(root=root, base=f"http://127.0.0.1:{server.server_address[1]}", requests=seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _loose_zip(folder: str) -> bytes:
    d = REALWORLD / "exports" / folder
    return build_zip((d / "export.bin").read_bytes(), (d / "export.sig").read_bytes())


def de_zip() -> bytes:
    return _loose_zip("de-cwa-production/2020-07-22")


def ch_zip() -> bytes:
    return _loose_zip("ch-swisscovid-production/2020-08-26T00-02Z")


def real_file(name: str) -> bytes:
    return (REALWORLD / "exports" / name).read_bytes()


def pem(filename: str) -> str:
    return (REALWORLD / "keys" / filename).read_text()


def add_importer(engine, name: str, index_url: str, keys: list[tuple[str, str, str]], *,
                 export_root: str | None = None, regions: tuple[str, ...] = (), traveler: bool = False,
                 key_window: tuple[datetime | None, datetime | None] = (None, None)) -> int:
    with engine.begin() as conn:
        importer_id = importer_db.add_importer(conn, name=name, partner=f"partner-{name}", index_url=index_url,
                                               export_root=export_root, regions=regions, traveler=traveler,
                                               now=datetime(2020, 1, 1, tzinfo=UTC))
        for key_id, version, pem_or_file in keys:
            text = pem_or_file if "BEGIN" in pem_or_file else pem(pem_or_file)
            importer_db.add_importer_key(conn, importer_id, key_id=key_id, key_version=version, public_key_pem=text,
                                         from_timestamp=key_window[0], thru_timestamp=key_window[1])
    return importer_id


def files(engine, importer_id: int) -> dict[str, importer_db.ImportFile]:
    with engine.connect() as conn:
        return {f.filename: f for f in importer_db.list_import_files(conn, importer_id)}


def stored(engine, where: str = "TRUE", **params) -> list[sa.Row]:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT exposure_key, transmission_risk, interval_number, interval_count, regions, traveler, created_at,"
            " local_provenance, report_type, export_import_id, import_file_id, revised_import_file_id,"
            f" revised_report_type, revised_at, sync_id FROM exposure WHERE {where} ORDER BY exposure_key"),
            params).all()


def zips_requested(cdn: Cdn) -> list[str]:
    return [p for p in cdn.requests if p.endswith(".zip")]


# -- pure helpers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("index_url", "entry", "export_root", "want"), [
    # The reference server: <root>/index.txt lists names relative to the bucket, "<root>/<file>".
    ("https://cdn.example/bucket/exposureKeyExport-US/index.txt", "exposureKeyExport-US/1-2-00001.zip", None,
     "https://cdn.example/bucket/exposureKeyExport-US/1-2-00001.zip"),
    # Nested roots: the whole shared part is not repeated.
    ("https://cdn.example/b/v1/US/index.txt", "v1/US/1-2-00001.zip", None, "https://cdn.example/b/v1/US/1-2-00001.zip"),
    # Plain names are relative to the index's directory.
    ("https://cdn.example/b/root/index.txt", "1-2.zip", None, "https://cdn.example/b/root/1-2.zip"),
    ("https://cdn.example/b/root/index.txt", "sub/1-2.zip", None, "https://cdn.example/b/root/sub/1-2.zip"),
    ("https://cdn.example/index.txt", "root/1-2.zip", None, "https://cdn.example/root/1-2.zip"),
    ("gs://bucket/root/index.txt", "root/1-2.zip", None, "gs://bucket/root/1-2.zip"),
    ("file:///srv/cdn/bucket/root/index.txt", "root/1-2.zip", None, "file:///srv/cdn/bucket/root/1-2.zip"),
    # An explicit root wins, with or without its trailing slash.
    ("https://a.example/x/index.txt", "root/1.zip", "https://files.example/b/", "https://files.example/b/root/1.zip"),
    ("https://a.example/x/index.txt", "root/1.zip", "https://files.example/b", "https://files.example/b/root/1.zip"),
])
def test_resolve_entry(index_url, entry, export_root, want):
    assert resolve_entry(index_url, entry, export_root) == want


def test_parse_index_keeps_safe_relative_names_only():
    body = b"a/1.zip\r\n\n  a/2.zip  \na/1.zip\n../etc/passwd\n/abs.zip\nhttp://evil/x.zip\na//3.zip\na b.zip\nx%2e.zip"
    entries, refused = parse_index(body)
    assert entries == ["a/1.zip", "a/2.zip"]
    assert [line for line, _ in refused] == ["../etc/passwd", "/abs.zip", "http://evil/x.zip", "a//3.zip",
                                            "a b.zip", "x%2e.zip"]
    with pytest.raises(ValueError, match="US-ASCII"):
        parse_index("a/1.zip\nä.zip".encode())


# -- real files -----------------------------------------------------------------------------------------

@needs_realworld
def test_german_production_file_verifies_and_imports(engine, settings, cdn):
    data = de_zip()
    cdn.put("bucket/de/2020-07-22.zip", data)
    index = cdn.index("bucket/de/index.txt", ["de/2020-07-22.zip"])  # relative to the bucket, as the reference
    importer_id = add_importer(engine, "de-cwa", index, [DE_KEY])

    report = import_exports(settings, engine, "de-cwa", DE_NOW)

    assert report.as_dict() == {"importer": "de-cwa", "files_seen": 1, "files_imported": 1, "files_failed": 0,
                                "files_skipped": 0, "keys_inserted": 720, "keys_revised": 0, "keys_rejected": 0,
                                "keys_skipped": 0}
    record = files(engine, importer_id)["de/2020-07-22.zip"]
    assert (record.status, record.keys_inserted, record.keys_rejected, record.error) == ("COMPLETE", 720, 0, None)
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    rows = stored(engine)
    assert len(rows) == 720
    assert {(r.local_provenance, r.export_import_id, r.import_file_id, r.sync_id) for r in rows} == {
        (False, importer_id, record.import_file_id, None)}
    assert {tuple(r.regions) for r in rows} == {("DE",)} and not any(r.traveler for r in rows)
    # Every key as the file has it; all had ended before DE_NOW, so none is embargoed.
    parsed = read_export(data)
    want = sorted((k.key_data, k.transmission_risk, k.interval_number, k.interval_count) for k in parsed.keys)
    assert [(bytes(r.exposure_key), r.transmission_risk, r.interval_number, r.interval_count) for r in rows] == want
    assert {r.created_at for r in rows} == {DE_NOW}
    assert {r.report_type for r in rows} == {""}  # CWA wrote no report_type in July 2020


@needs_realworld
def test_swiss_production_file_verifies_and_imports_with_the_importers_regions(engine, settings, cdn):
    cdn.put("ch/v1/2020-08-26T00-02Z.zip", ch_zip())
    index = cdn.index("ch/v1/index.txt", ["2020-08-26T00-02Z.zip"])  # plain names, relative to the index
    importer_id = add_importer(engine, "ch", index, [CH_KEY], regions=("CH", "LI"), traveler=True)

    report = import_exports(settings, engine, "ch", CH_NOW)

    assert (report.files_imported, report.keys_inserted) == (1, 1)
    [row] = stored(engine)
    record = files(engine, importer_id)["2020-08-26T00-02Z.zip"]
    assert (row.local_provenance, row.export_import_id, row.import_file_id) == (False, importer_id,
                                                                              record.import_file_id)
    assert (row.regions, row.traveler) == (["CH", "LI"], True)
    # The key (2020-08-26, 144 intervals) was still valid at CH_NOW: embargoed like a publish, until it ended.
    assert row.created_at == datetime(2020, 8, 27, 1, 0, tzinfo=UTC)
    assert (row.interval_number, row.interval_count, row.transmission_risk) == (2664000, 144, 0)


@needs_realworld
def test_unregistered_key_tampered_file_and_expired_key_are_failed_and_store_nothing(engine, settings, cdn):
    good = de_zip()
    parsed = read_export(good)
    tampered_bin = bytearray(parsed.export_bin)
    tampered_bin[-5] ^= 0x01  # inside the last key's data: still a valid export.bin, no longer the signed bytes
    sig = (REALWORLD / "exports/de-cwa-production/2020-07-22/export.sig").read_bytes()
    cdn.put("b/de/de.zip", good)
    cdn.put("b/de/de-tampered.zip", build_zip(bytes(tampered_bin), sig))
    cdn.put("b/de/ch.zip", ch_zip())
    index = cdn.index("b/de/index.txt", ["de/ch.zip", "de/de-tampered.zip", "de/de.zip"])
    importer_id = add_importer(engine, "de", index, [DE_KEY])

    with pytest.raises(ExportImportError) as caught:
        import_exports(settings, engine, "de", DE_NOW)

    message = str(caught.value)
    assert message.startswith("importer 'de': 2 of 3 file(s) failed: ")
    assert "de/ch.zip: no valid signature by a registered key: signature 0 names key id '228' version 'v1', " \
           "which is not registered" in message
    assert "de/de-tampered.zip: no valid signature by a registered key: signature 0 does not verify" in message
    assert "\n" not in message
    report = caught.value.report
    assert (report.files_imported, report.files_failed, report.keys_inserted) == (1, 2, 720)
    recorded = files(engine, importer_id)
    assert {n: f.status for n, f in recorded.items()} == {"de/ch.zip": "FAILED", "de/de-tampered.zip": "FAILED",
                                                          "de/de.zip": "COMPLETE"}
    assert recorded["de/ch.zip"].keys_inserted == 0 and "not registered" in recorded["de/ch.zip"].error
    # Nothing of the failed files was stored: only the good file's keys, all naming its record.
    assert {r.import_file_id for r in stored(engine)} == {recorded["de/de.zip"].import_file_id}
    assert len(stored(engine)) == 720

    # FAILED is for good: the next run downloads nothing and succeeds.
    cdn.requests.clear()
    again = import_exports(settings, engine, "de", DE_NOW + timedelta(hours=1))
    assert (again.files_skipped, again.files_failed, zips_requested(cdn)) == (3, 0, [])

    # After the operator registers the Swiss key, --retry-failed imports that file; the altered one stays FAILED.
    with engine.begin() as conn:
        importer_db.add_importer_key(conn, importer_id, key_id="228", key_version="v1",
                                     public_key_pem=pem("ch-swisscovid-prod.pem"))
    with pytest.raises(ExportImportError, match="1 of 3 file"):
        import_exports(settings, engine, "de", CH_NOW, retry_failed=True)
    recorded = files(engine, importer_id)
    assert (recorded["de/ch.zip"].status, recorded["de/ch.zip"].keys_inserted, recorded["de/ch.zip"].error) == (
        "COMPLETE", 1, None)
    assert recorded["de/de-tampered.zip"].status == "FAILED"
    assert len(stored(engine)) == 721


@needs_realworld
def test_a_registered_key_outside_its_validity_window_does_not_count(engine, settings, cdn):
    cdn.put("b/de/de.zip", de_zip())
    index = cdn.index("b/de/index.txt", ["de/de.zip"])
    add_importer(engine, "de", index, [DE_KEY], key_window=(None, datetime(2020, 7, 1, tzinfo=UTC)))
    with pytest.raises(ExportImportError, match="registered key id '262' version 'v1' is not valid at 2020-07-23"):
        import_exports(settings, engine, "de", DE_NOW)
    assert stored(engine) == []


@needs_realworld
def test_rerun_imports_nothing_twice_and_a_new_file_is_picked_up(engine, settings, cdn):
    cdn.put("b/eu/de.zip", de_zip())
    index = cdn.index("b/eu/index.txt", ["eu/de.zip"])
    importer_id = add_importer(engine, "eu", index, [DE_KEY, CH_KEY])
    assert import_exports(settings, engine, "eu", DE_NOW).keys_inserted == 720

    cdn.requests.clear()
    again = import_exports(settings, engine, "eu", DE_NOW + timedelta(minutes=15))
    assert again.as_dict() | {"importer": None} == {"importer": None, "files_seen": 1, "files_imported": 0,
                                                    "files_failed": 0, "files_skipped": 1, "keys_inserted": 0,
                                                    "keys_revised": 0, "keys_rejected": 0, "keys_skipped": 0}
    assert cdn.requests == ["/b/eu/index.txt"]  # the processed file is not even downloaded
    assert len(stored(engine)) == 720

    # The partner publishes another file: only that one is fetched and imported.
    cdn.put("b/eu/ch.zip", ch_zip())
    cdn.index("b/eu/index.txt", ["eu/de.zip", "eu/ch.zip"])
    cdn.requests.clear()
    later = import_exports(settings, engine, "eu", CH_NOW)
    assert (later.files_seen, later.files_skipped, later.files_imported, later.keys_inserted) == (2, 1, 1, 1)
    assert zips_requested(cdn) == ["/b/eu/ch.zip"]
    assert set(files(engine, importer_id)) == {"eu/de.zip", "eu/ch.zip"}
    assert len(stored(engine)) == 721


@needs_realworld
def test_finnish_files_signed_with_a_secp256k1_key_verify(engine, settings, cdn):
    for name in ("batch_test.zip", "batch_test_2.zip", "batch_test_invalid_key.zip"):
        cdn.put(f"fi/{name}", real_file(f"fi-koronavilkku-test/{name}"))
    index = cdn.index("fi/index.txt", ["batch_test.zip", "batch_test_2.zip", "batch_test_invalid_key.zip"])
    importer_id = add_importer(engine, "fi", index, [FI_KEY])

    with pytest.raises(ExportImportError, match=r"batch_test_invalid_key\.zip: no valid signature") as caught:
        import_exports(settings, engine, "fi", FI_NOW)

    recorded = files(engine, importer_id)
    assert {n: f.status for n, f in recorded.items()} == {
        "batch_test.zip": "COMPLETE", "batch_test_2.zip": "COMPLETE", "batch_test_invalid_key.zip": "FAILED"}
    report = caught.value.report
    # batch_test_2.zip repeats the one key of batch_test.zip and adds one: stored once, then skipped.
    assert (report.keys_inserted, report.keys_skipped, report.keys_rejected) == (2, 1, 0)
    assert (recorded["batch_test_2.zip"].keys_inserted, recorded["batch_test_2.zip"].keys_skipped) == (1, 1)
    rows = stored(engine)
    assert len(rows) == 2
    assert {tuple(r.regions) for r in rows} == {("FI",)}
    assert {r.import_file_id for r in rows} <= {recorded["batch_test.zip"].import_file_id,
                                                recorded["batch_test_2.zip"].import_file_id}


@needs_realworld
def test_unsigned_google_sample_is_refused(engine, settings, cdn):
    name = "1605818700-1605819000-0001-ff23e2.zip"
    cdn.put(f"us/{name}", real_file(f"us-google-reference/{name}"))
    index = cdn.index("us/index.txt", [name])
    importer_id = add_importer(engine, "us", index, [US_KEY])
    with pytest.raises(ExportImportError, match=r"unsigned: export\.sig holds no signatures"):
        import_exports(settings, engine, "us", US_NOW)
    assert files(engine, importer_id)[name].status == "FAILED"
    assert stored(engine) == []


@needs_realworld
def test_a_failed_download_is_not_recorded_and_is_retried_next_run(engine, settings, cdn):
    index = cdn.index("b/de/index.txt", ["de/de.zip"])  # listed before the CDN serves it
    importer_id = add_importer(engine, "de", index, [DE_KEY])
    with pytest.raises(ExportImportError, match=r"de/de.zip: download failed, will retry: HTTP status 404") as caught:
        import_exports(settings, engine, "de", DE_NOW)
    assert (caught.value.report.files_failed, caught.value.report.files_imported) == (1, 0)
    assert files(engine, importer_id) == {}

    cdn.put("b/de/de.zip", de_zip())
    report = import_exports(settings, engine, "de", DE_NOW + timedelta(minutes=15))
    assert (report.files_imported, report.keys_inserted) == (1, 720)
    assert files(engine, importer_id)["de/de.zip"].status == "COMPLETE"


@needs_realworld
def test_index_from_a_file_blobstore_url(engine, settings, cdn, tmp_path):
    cdn.put("bucket/de/2020-07-22.zip", de_zip())
    cdn.index("bucket/de/index.txt", ["de/2020-07-22.zip"])
    index_url = cdn.file_url("bucket/de/index.txt")
    assert index_url.startswith("file:///")
    importer_id = add_importer(engine, "de-file", index_url, [DE_KEY])
    report = import_exports(settings, engine, "de-file", DE_NOW)
    assert (report.files_imported, report.keys_inserted) == (1, 720)
    assert cdn.requests == []  # all of it through the filesystem
    assert files(engine, importer_id)["de/2020-07-22.zip"].status == "COMPLETE"


@needs_realworld
def test_index_on_a_blobstore_files_under_an_explicit_http_export_root(engine, settings, cdn, tmp_path):
    cdn.put("files/ch/latest.zip", ch_zip())
    index_dir = tmp_path / "mirror" / "index"
    index_dir.mkdir(parents=True)
    (index_dir / "index.txt").write_text("ch/latest.zip\n")
    add_importer(engine, "ch", (index_dir / "index.txt").as_uri(), [CH_KEY], export_root=cdn.url("files"))
    report = import_exports(settings, engine, "ch", CH_NOW)
    assert (report.files_imported, report.keys_inserted) == (1, 1)
    assert zips_requested(cdn) == ["/files/ch/latest.zip"]


@pytest.fixture(scope="module")
def gcs_client() -> Iterator[object]:
    """A google-cloud-storage client of an in-process gcp-storage-emulator on a free localhost port."""
    import socket

    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
            yield storage.Client(project="enp-test", credentials=AnonymousCredentials())
    finally:
        server.stop()


@needs_realworld
def test_index_and_files_in_a_gcs_bucket(engine, settings, gcs_client):
    bucket = gcs_client.create_bucket("enp-importer-test")
    bucket.blob("de/2020-07-22.zip").upload_from_string(de_zip())
    bucket.blob("de/index.txt").upload_from_string(b"de/2020-07-22.zip\nde/missing.zip")
    importer_id = add_importer(engine, "de-gcs", "gs://enp-importer-test/de/index.txt", [DE_KEY])
    fetch = default_fetch(settings, gcs_client_factory=lambda: gcs_client)
    with pytest.raises(ExportImportError, match=r"de/missing\.zip: download failed, will retry: .*not found"):
        import_exports(settings, engine, "de-gcs", DE_NOW, fetch=fetch)
    assert {n: f.status for n, f in files(engine, importer_id).items()} == {"de/2020-07-22.zip": "COMPLETE"}
    assert len(stored(engine)) == 720


@needs_realworld
def test_a_file_over_the_size_limit_is_failed_for_good(engine, settings, cdn):
    cdn.put("b/de/de.zip", de_zip())
    index = cdn.index("b/de/index.txt", ["de/de.zip"])
    importer_id = add_importer(engine, "de", index, [DE_KEY])
    small = settings.replace(importer_max_file_bytes=1000)
    with pytest.raises(ExportImportError, match=r"de/de\.zip: file too large: \d+ bytes, more than the 1000 allowed"):
        import_exports(small, engine, "de", DE_NOW)
    assert files(engine, importer_id)["de/de.zip"].status == "FAILED" and stored(engine) == []
    # Raising the limit and retrying failed files brings it in.
    report = import_exports(settings, engine, "de", DE_NOW, retry_failed=True)
    assert (report.files_imported, report.keys_inserted) == (1, 720)


@needs_realworld
def test_unsafe_index_entries_are_reported_and_the_rest_imported(engine, settings, cdn):
    cdn.put("b/de/de.zip", de_zip())
    index = cdn.index("b/de/index.txt", ["de/../../secret.zip", "de/de.zip"])
    importer_id = add_importer(engine, "de", index, [DE_KEY])
    with pytest.raises(ExportImportError, match=r"de/\.\./\.\./secret.zip: index entry has an empty, '\.' or '\.\.'"):
        import_exports(settings, engine, "de", DE_NOW)
    assert set(files(engine, importer_id)) == {"de/de.zip"}
    assert zips_requested(cdn) == ["/b/de/de.zip"]


@needs_realworld
def test_crash_after_the_first_file_leaves_it_imported_and_the_second_unrecorded(engine, settings, cdn):
    cdn.put("b/x/de.zip", de_zip())
    cdn.put("b/x/ch.zip", ch_zip())
    index = cdn.index("b/x/index.txt", ["x/de.zip", "x/ch.zip"])
    importer_id = add_importer(engine, "x", index, [DE_KEY, CH_KEY])
    real = default_fetch(settings)

    def crashing(url: str, max_bytes: int) -> bytes:
        if url.endswith("/ch.zip"):
            raise RuntimeError("worker killed")
        return real(url, max_bytes)

    with pytest.raises(RuntimeError, match="worker killed"):
        import_exports(settings, engine, "x", DE_NOW, fetch=crashing)
    assert {n: f.status for n, f in files(engine, importer_id).items()} == {"x/de.zip": "COMPLETE"}
    assert len(stored(engine)) == 720

    # The lock went with the crash, and the next run picks up where it stopped.
    report = import_exports(settings, engine, "x", CH_NOW)
    assert (report.files_skipped, report.files_imported, report.keys_inserted) == (1, 1, 1)


@needs_realworld
def test_a_crash_inside_a_files_transaction_stores_none_of_it(engine, settings, cdn, monkeypatch):
    cdn.put("b/x/de.zip", de_zip())
    index = cdn.index("b/x/index.txt", ["x/de.zip"])
    importer_id = add_importer(engine, "x", index, [DE_KEY])

    def boom(*args, **kwargs):
        raise RuntimeError("connection lost")

    # After the record and all 720 keys were written, before the commit.
    monkeypatch.setattr(importer_db, "set_import_file_counts", boom)
    with pytest.raises(RuntimeError, match="connection lost"):
        import_exports(settings, engine, "x", DE_NOW)
    assert files(engine, importer_id) == {} and stored(engine) == []


@needs_realworld
def test_a_second_run_of_the_same_importer_is_refused_while_one_holds_the_lock(engine, settings, cdn):
    index = cdn.index("b/de/index.txt", [])
    importer_id = add_importer(engine, "de", index, [DE_KEY])
    with engine.connect() as holder:
        assert importer_db.try_lock_importer(holder, importer_id)
        holder.commit()
        with pytest.raises(ImporterBusy, match="already running"):
            import_exports(settings, engine, "de", DE_NOW)
        importer_db.unlock_importer(holder, importer_id)
        holder.commit()
    assert import_exports(settings, engine, "de", DE_NOW).files_seen == 0


def test_unknown_and_disabled_importers(engine, settings):
    with pytest.raises(ExportImportError, match="no importer named 'nope'"):
        import_exports(settings, engine, "nope", DE_NOW)
    add_importer(engine, "off", "http://127.0.0.1:9/index.txt", [])
    add_importer(engine, "on", "http://127.0.0.1:9/index.txt", [])
    with engine.begin() as conn:
        assert importer_db.set_importer_disabled(conn, "off", True)
        assert importer_db.list_importer_names(conn) == ["on"]
    with pytest.raises(ExportImportError, match="importer 'off' is disabled"):
        import_exports(settings, engine, "off", DE_NOW)


# -- revisions (a synthetic partner: no real file carries revised keys) --------------------------------

def test_revised_keys_revise_only_keys_of_the_same_importer(engine, settings, cdn):
    signing_key = ec.generate_private_key(ec.SECP256R1())
    signer = FileSigner("partner", signing_key)
    info = SignatureInfo("999", "v1")
    now = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    day = interval_number(datetime(2024, 2, 27, tzinfo=UTC))
    k1, k2, k3, k4 = (bytes([n]) * 16 for n in range(1, 5))

    def export(name: str, keys: list[tuple], revised: list[tuple], start: datetime) -> None:
        header = ExportHeader(int(start.timestamp()), int((start + timedelta(hours=1)).timestamp()), "US", 1, 1,
                              (info,))
        cols = KeyColumns.from_rows(keys) if keys else KeyColumns.empty()
        rev = KeyColumns.from_rows(revised) if revised else KeyColumns.empty()
        cdn.put(f"us/{name}", build_export_zip(header, cols, rev, [(info, signer)]))

    export("1.zip", [(k1, 0, day, 144, 1, None)], [], now - timedelta(hours=2))
    # k1 revoked; k2 never seen (skipped); k3 a revoked primary (never stored); k4 with 0 intervals (rejected).
    export("2.zip", [(k3, 0, day, 144, 5, None), (k4, 0, day, 0, 1, None)], [(k1, 0, day, 144, 5, None),
                                                                           (k2, 0, day, 144, 5, None)],
           now - timedelta(hours=1))
    public_pem = signing_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    index = cdn.index("us/index.txt", ["1.zip"])
    importer_id = add_importer(engine, "us", index, [("999", "v1", public_pem)])
    assert import_exports(settings, engine, "us", now).keys_inserted == 1

    cdn.index("us/index.txt", ["1.zip", "2.zip"])
    later = now + timedelta(hours=2, minutes=10)
    report = import_exports(settings, engine, "us", later)
    assert (report.keys_inserted, report.keys_revised, report.keys_rejected, report.keys_skipped) == (0, 1, 1, 2)
    recorded = files(engine, importer_id)
    assert (recorded["2.zip"].keys_revised, recorded["2.zip"].keys_rejected, recorded["2.zip"].keys_skipped) == (
        1, 1, 2)
    [row] = stored(engine)
    assert bytes(row.exposure_key) == k1
    assert (row.report_type, row.revised_report_type) == ("confirmed", "negative")
    assert row.import_file_id == recorded["1.zip"].import_file_id
    assert row.revised_import_file_id == recorded["2.zip"].import_file_id
    assert row.revised_at == datetime(2024, 3, 1, 14, 0, tzinfo=UTC)

    # Another importer listing the same revision file may not revise a key it did not bring.
    add_importer(engine, "other", index, [("999", "v1", public_pem)])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE exposure SET revised_at = NULL, revised_report_type = NULL"))
    other = import_exports(settings, engine, "other", later)
    assert other.keys_revised == 0 and stored(engine)[0].revised_report_type is None


# -- CLI ------------------------------------------------------------------------------------------------

@needs_realworld
def test_cli_add_list_run_files_remove(cli, cdn, tmp_path):
    cdn.put("b/de/de.zip", de_zip())
    index = cdn.index("b/de/index.txt", ["de/de.zip", "de/missing.zip"])
    key_file = REALWORLD / "keys" / "de-cwa-prod-262-v1.pem"

    code, out, err = cli("importer", "add", "--id", "de-cwa", "--index-url", index,
                         "--public-key", f"262:v1:{key_file}", "--regions", "de")
    assert (code, err) == (0, "")
    assert "added importer 'de-cwa' (partner 'de-cwa')" in out and "262/v1" in out
    code, _, err = cli("importer", "add", "--id", "de-cwa", "--index-url", index, "--public-key", f"262:v1:{key_file}")
    assert code == 1 and "already exists" in err

    code, out, _ = cli("importer", "list", "--json")
    [listed] = json.loads(out)
    assert (listed["id"], listed["partner"], listed["regions"], listed["enabled"]) == ("de-cwa", "de-cwa", ["DE"],
                                                                                       True)
    assert [(k["key_id"], k["key_version"]) for k in listed["keys"]] == [("262", "v1")]

    code, out, err = cli("importer", "run", "--id", "de-cwa", "--now", DE_NOW.isoformat())
    assert code == 1
    assert "2 file(s) listed, 1 imported, 0 already processed, 1 failed; keys: 720 inserted" in out
    assert err.startswith("enpipeline: error: importer 'de-cwa': 1 of 2 file(s) failed: de/missing.zip: "
                          "download failed, will retry: HTTP status 404")
    assert err.count("\n") == 1

    cdn.index("b/de/index.txt", ["de/de.zip"])
    code, out, err = cli("importer", "run", "--id", "de-cwa", "--now", "2020-07-23T02:00:00Z")
    assert (code, err) == (0, "")
    assert "1 file(s) listed, 0 imported, 1 already processed, 0 failed" in out

    code, out, _ = cli("importer", "files", "--id", "de-cwa", "--json")
    [row] = json.loads(out)
    assert (row["file"], row["status"], row["inserted"], row["error"]) == ("de/de.zip", "COMPLETE", 720, "")
    code, out, _ = cli("importer", "files", "--id", "de-cwa")
    assert code == 0 and "COMPLETE" in out

    code, out, _ = cli("importer", "remove", "--id", "de-cwa")
    assert code == 0 and "removed importer 'de-cwa'" in out
    assert cli("importer", "list")[1].strip() == "(none)"
    code, _, err = cli("importer", "run", "--id", "de-cwa")
    assert code == 1 and "no importer named 'de-cwa'" in err


@needs_realworld
def test_cli_accepts_a_secp256k1_key_and_refuses_rsa_and_bad_specs(cli, cdn, tmp_path):
    index = cdn.index("fi/index.txt", ["batch_test.zip"])
    cdn.put("fi/batch_test.zip", real_file("fi-koronavilkku-test/batch_test.zip"))
    fi_key = REALWORLD / "keys" / FI_KEY[2]
    code, out, err = cli("importer", "add", "--id", "fi", "--index-url", index, "--public-key", f"244:v1:{fi_key}",
                         "--partner", "THL")
    assert (code, err) == (0, "")
    code, out, err = cli("importer", "run", "--id", "fi", "--now", FI_NOW.isoformat())
    assert (code, err) == (0, "") and "1 imported" in out

    rsa_file = tmp_path / "rsa.pem"
    rsa_file.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, _, err = cli("importer", "add", "--id", "r", "--index-url", index, "--public-key", f"1:v1:{rsa_file}")
    assert code == 1 and "is a RSAPublicKey; export files are signed with ECDSA" in err
    for spec, message in ((f"v1:{fi_key}", "must be KEY_ID:KEY_VERSION:PEM_FILE"),
                          (f"2-44:v1:{fi_key}", "the key id may only contain"),
                          (f"244::{fi_key}", "the key version must not be empty"),
                          ("244:v1:/nonexistent.pem", "cannot read --public-key file")):
        code, _, err = cli("importer", "add", "--id", "r", "--index-url", index, "--public-key", spec)
        assert code == 1 and message in err, (spec, err)
    code, _, err = cli("importer", "add", "--id", "r", "--index-url", "ftp://x/index.txt", "--public-key",
                       f"244:v1:{fi_key}")
    assert code == 1 and "--index-url must be an http://, https://, file:// or gs:// URL" in err


@needs_realworld
def test_cli_add_key_and_disable_enable(cli, engine, cdn):
    index = cdn.index("b/eu/index.txt", ["eu/de.zip"])
    cdn.put("b/eu/de.zip", de_zip())
    keys = REALWORLD / "keys"
    assert cli("importer", "add", "--id", "eu", "--index-url", index, "--public-key",
               f"228:v1:{keys / CH_KEY[2]}")[0] == 0
    code, out, err = cli("importer", "add-key", "--id", "eu", "--public-key", f"262:v1:{keys / DE_KEY[2]}",
                         "--from", "2020-06-01T00:00:00Z", "--thru", "2021-06-01T00:00:00Z")
    assert (code, err) == (0, "") and "added key 262/v1" in out
    code, _, err = cli("importer", "add-key", "--id", "eu", "--public-key", f"262:v1:{keys / DE_KEY[2]}")
    assert code == 1 and "already has key 262/v1" in err
    [listed] = json.loads(cli("importer", "list", "--json")[1])
    assert [(k["key_id"], k["from"][:10], k["thru"][:10]) for k in listed["keys"]] == [
        ("228", "", ""), ("262", "2020-06-01", "2021-06-01")]

    assert cli("importer", "disable", "--id", "eu")[0] == 0
    with engine.connect() as conn:
        assert importer_db.list_importer_names(conn) == []
    code, _, err = cli("importer", "run", "--id", "eu", "--now", DE_NOW.isoformat())
    assert code == 1 and "importer 'eu' is disabled" in err
    assert cli("importer", "enable", "--id", "eu")[0] == 0
    code, out, err = cli("importer", "run", "--id", "eu", "--now", DE_NOW.isoformat())
    assert (code, err) == (0, "") and "720 inserted" in out
