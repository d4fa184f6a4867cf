"""GCS blob stores for real, over HTTP against gcp-storage-emulator; and the Airflow hooks in plugins/enp_hooks.py.

The emulator runs in this process on a free localhost port. If it cannot start, the fixture raises and these
tests error: nothing here is skipped.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from sqlalchemy.engine import make_url

from enpipeline.blobstore import (
    CACHEABLE,
    NOT_CACHEABLE,
    FilesystemBlobstore,
    GcsBlobstore,
    MemoryBlobstore,
    blobstore_from_url,
)
from enpipeline.config import ConfigError
from enpipeline.db.engine import make_engine
from plugins import enp_hooks
from plugins.enp_hooks import GcsHookBlobstore, blobstore_for_airflow, enp_database_url
from tests.unit.test_blobstore import BlobstoreContract, MetadataContract

PROJECT = "enp-test"
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    """Base URL of a running in-memory gcp-storage-emulator; STORAGE_EMULATOR_HOST points at it."""
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(base + "/", timeout=10) as response:  # the emulator's health check
            assert response.read() == b"OK", "gcp-storage-emulator did not answer its health check"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", base)
            yield base
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(emulator: str) -> storage.Client:
    gcs = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
    assert gcs._connection.API_BASE_URL == emulator  # never real GCS
    return gcs


def _new_bucket(client: storage.Client) -> str:
    name = f"enp-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    return name


def emulator_object(emulator: str, bucket: str, name: str) -> dict:
    """The object's resource as the emulator stores it, read with plain HTTP (no client library)."""
    url = f"{emulator}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


class GcsContract(BlobstoreContract, MetadataContract):
    @pytest.fixture
    def bucket(self, client):
        return _new_bucket(client)

    @pytest.fixture
    def other_bucket(self, client):
        return _new_bucket(client)

    def metadata(self, store, bucket, name):
        blob = storage.Client(project=PROJECT, credentials=AnonymousCredentials()).bucket(bucket).get_blob(name)
        return blob.content_type, blob.cache_control

    def test_metadata_as_stored_by_the_server(self, store, bucket, emulator):
        store.create(bucket, "exposureKeyExport-US/1600000000-1600003600-00001.zip", b"PK\x03\x04",
                     content_type="application/zip", cacheable=True)
        store.create(bucket, "exposureKeyExport-US/index.txt",
                     b"exposureKeyExport-US/1600000000-1600003600-00001.zip", content_type="text/plain",
                     cacheable=False)
        zip_obj = emulator_object(emulator, bucket, "exposureKeyExport-US/1600000000-1600003600-00001.zip")
        index_obj = emulator_object(emulator, bucket, "exposureKeyExport-US/index.txt")
        assert (zip_obj["contentType"], zip_obj["cacheControl"]) == ("application/zip", CACHEABLE)
        assert (index_obj["contentType"], index_obj["cacheControl"]) == ("text/plain", NOT_CACHEABLE)
        assert zip_obj["size"] in (4, "4")

    def test_missing_bucket_is_an_error_not_an_empty_list(self, store):
        from google.api_core.exceptions import NotFound

        with pytest.raises(NotFound):
            store.list(f"enp-missing-{uuid.uuid4().hex[:8]}")


class TestGcsBlobstore(GcsContract):
    @pytest.fixture
    def store(self, client):
        return GcsBlobstore(client)

    def test_from_url_with_client_factory(self, client, bucket):
        store = blobstore_from_url("gs://", gcs_client_factory=lambda: client)
        store.create(bucket, "v1/index.txt", b"v1/0-0-00001.zip", content_type="text/plain", cacheable=False)
        assert client.bucket(bucket).blob("v1/index.txt").download_as_bytes() == b"v1/0-0-00001.zip"

    def test_default_client_follows_storage_emulator_host(self, emulator, client, bucket, monkeypatch):
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
        store = GcsBlobstore()  # google.cloud.storage.Client() with no arguments, as in production
        store.create(bucket, "x.zip", b"1", content_type="application/zip", cacheable=True)
        assert store.client._connection.API_BASE_URL == emulator
        assert client.bucket(bucket).get_blob("x.zip").cache_control == CACHEABLE


@pytest.fixture
def gcp_connection(emulator, monkeypatch):
    """Airflow Connection enp_blobstore of type google_cloud_platform with anonymous credentials.

    GCSHook builds google.cloud.storage.Client itself; STORAGE_EMULATOR_HOST sends it to the emulator.
    """
    monkeypatch.setenv("AIRFLOW_CONN_ENP_BLOBSTORE", json.dumps(
        {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": PROJECT}}))


class TestGcsHookBlobstore(GcsContract):
    @pytest.fixture
    def store(self, gcp_connection):
        store = blobstore_for_airflow()
        assert isinstance(store, GcsHookBlobstore)
        return store

    def test_hook_comes_from_the_connection_and_talks_to_the_emulator(self, store, emulator):
        assert store.hook.gcp_conn_id == "enp_blobstore"
        assert store.hook.get_conn()._connection.API_BASE_URL == emulator
        assert store.hook.get_conn().project == PROJECT

    def test_shares_objects_with_the_plain_client_store(self, store, client, bucket):
        store.create(bucket, "v1/0-0-00001.zip", b"from hook", content_type="application/zip", cacheable=True)
        plain = GcsBlobstore(client)
        assert plain.get(bucket, "v1/0-0-00001.zip") == b"from hook"
        plain.create(bucket, "v1/index.txt", b"from client", content_type="text/plain", cacheable=False)
        assert store.get(bucket, "v1/index.txt") == b"from client"
        assert store.list(bucket) == plain.list(bucket) == ["v1/0-0-00001.zip", "v1/index.txt"]


class TestBlobstoreForAirflow:
    @pytest.fixture(autouse=True)
    def no_connection(self, monkeypatch):
        monkeypatch.delenv("AIRFLOW_CONN_ENP_BLOBSTORE", raising=False)
        monkeypatch.delenv("ENP_BLOBSTORE", raising=False)

    def test_without_connection_uses_enp_blobstore(self, tmp_path, monkeypatch):
        monkeypatch.setenv("ENP_BLOBSTORE", f"file://{tmp_path}/blobs")
        store = blobstore_for_airflow()
        assert isinstance(store, FilesystemBlobstore) and store.root == tmp_path / "blobs"
        store.create("b", "v1/index.txt", b"i", content_type="text/plain", cacheable=False)
        assert (tmp_path / "blobs" / "b" / "v1" / "index.txt").read_bytes() == b"i"

    def test_without_anything_uses_the_default(self):
        store = blobstore_for_airflow()
        assert isinstance(store, FilesystemBlobstore) and store.root == Path("var/blobs")

    def test_bad_enp_blobstore_is_a_config_error(self, monkeypatch):
        monkeypatch.setenv("ENP_BLOBSTORE", "s3://bucket")
        with pytest.raises(ConfigError, match="ENP_BLOBSTORE"):
            blobstore_for_airflow()

    def test_fs_connection_path(self, tmp_path, monkeypatch):
        monkeypatch.setenv("AIRFLOW_CONN_ENP_BLOBSTORE",
                           json.dumps({"conn_type": "fs", "extra": {"path": str(tmp_path / "fs")}}))
        monkeypatch.setenv("ENP_BLOBSTORE", "memory://")  # the Connection wins
        store = blobstore_for_airflow()
        assert isinstance(store, FilesystemBlobstore) and store.root == tmp_path / "fs"

    @pytest.mark.parametrize("conn_type", ["fs", "generic"])
    def test_url_extra(self, tmp_path, monkeypatch, conn_type):
        monkeypatch.setenv("AIRFLOW_CONN_ENP_BLOBSTORE",
                           json.dumps({"conn_type": conn_type, "extra": {"url": f"file://{tmp_path}/u"}}))
        store = blobstore_for_airflow()
        assert isinstance(store, FilesystemBlobstore) and store.root == tmp_path / "u"

    def test_memory_url_extra(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW_CONN_ENP_BLOBSTORE",
                           json.dumps({"conn_type": "generic", "extra": {"url": "memory://"}}))
        assert isinstance(blobstore_for_airflow(), MemoryBlobstore)

    def test_bad_url_extra_names_the_connection(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW_CONN_ENP_BLOBSTORE",
                           json.dumps({"conn_type": "generic", "extra": {"url": "s3://x"}}))
        with pytest.raises(ValueError, match="Airflow connection 'enp_blobstore' extra 'url'"):
            blobstore_for_airflow()

    def test_connection_naming_no_store(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW_CONN_ENP_BLOBSTORE", json.dumps({"conn_type": "fs", "extra": {}}))
        with pytest.raises(ValueError, match="names no blob store"):
            blobstore_for_airflow()


class TestEnpDatabaseUrl:
    @pytest.fixture(autouse=True)
    def no_connection(self, monkeypatch):
        monkeypatch.delenv("AIRFLOW_CONN_ENP_POSTGRES", raising=False)
        monkeypatch.delenv("ENP_DATABASE_URL", raising=False)

    def test_connection_uri_becomes_a_postgresql_url(self, monkeypatch):
        monkeypatch.setenv("AIRFLOW_CONN_ENP_POSTGRES",
                           "postgres://us%40er:p%40ss%2Fw%3Ard@db.example:5433/enp?sslmode=require")
        monkeypatch.setenv("ENP_DATABASE_URL", "postgresql://other@elsewhere/db")  # the Connection wins
        url = make_url(enp_database_url())
        assert url.drivername == "postgresql"
        assert (url.username, url.password, url.host, url.port, url.database) == (
            "us@er", "p@ss/w:rd", "db.example", 5433, "enp")
        assert dict(url.query) == {"sslmode": "require"}

    def test_falls_back_to_enp_database_url(self, monkeypatch):
        monkeypatch.setenv("ENP_DATABASE_URL", "postgresql://u@h:5432/d")
        assert enp_database_url() == "postgresql://u@h:5432/d"

    def test_neither_is_a_config_error(self):
        with pytest.raises(ConfigError, match="ENP_DATABASE_URL"):
            enp_database_url()

    def test_connects_to_the_real_database(self, database_url, monkeypatch):
        parsed = make_url(database_url)
        conn = {"conn_type": "postgres", "login": parsed.username, "password": parsed.password or "",
                "host": parsed.host or "", "schema": parsed.database}
        if parsed.port:
            conn["port"] = parsed.port
        if parsed.query:  # e.g. host=/unix/socket/dir from an embedded server
            conn["extra"] = {"sqlalchemy_query": dict(parsed.query)}
        monkeypatch.setenv("AIRFLOW_CONN_ENP_POSTGRES", json.dumps(conn))
        engine = make_engine(enp_database_url())
        try:
            with engine.connect() as connection:
                assert connection.execute(sa.text("SELECT current_database()")).scalar_one() == parsed.database
        finally:
            engine.dispose()


def test_importing_the_hooks_module_stays_light():
    code = ("import sys, plugins.enp_hooks; "
            "heavy = sorted(m for m in ('airflow', 'google.cloud.storage') if m in sys.modules); "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert enp_hooks.BLOBSTORE_CONN_ID == "enp_blobstore" and enp_hooks.POSTGRES_CONN_ID == "enp_postgres"


def test_an_export_window_lands_in_gcs_signed_and_indexed(client, engine, settings, tmp_path):
    """The export pipeline end to end on the GCS store: zip and index.txt with their cache headers."""
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import serialization

    from enpipeline.db import export as export_db
    from enpipeline.db import exposures as exposures_db
    from enpipeline.export import format as fmt
    from enpipeline.export.pipeline import ExportPipeline
    from enpipeline.export.signing import FilesystemKeyManager
    from enpipeline.model import Exposure
    from enpipeline.timeutil import interval_number, truncate

    bucket = _new_bucket(client)
    keys = FilesystemKeyManager(tmp_path / "keys")
    ref = keys.create_signing_key("gcs-v1")
    now = truncate(datetime.now(UTC), timedelta(hours=1))
    start = now - timedelta(hours=3)
    with engine.begin() as conn:
        sig = export_db.add_signature_info(conn, name="gcs-v1", signing_key=ref, key_id="310", key_version="v1",
                                           algorithm=fmt.ALGORITHM_ECDSA_P256_SHA256,
                                           from_timestamp=now - timedelta(days=1), thru_timestamp=None, now=now)
        export_db.add_export_config(conn, export_db.ExportConfigRow(
            config_id=0, name="gcs", bucket_name=bucket, filename_root="exposureKeyExport-US", period_seconds=3600,
            output_region="US", input_regions=(), include_travelers=False, only_non_travelers=False,
            exclude_regions=(), max_records_override=None, signature_info_ids=(sig,),
            from_timestamp=now - timedelta(days=2), thru_timestamp=None, disabled=False))
    rows = [Exposure(exposure_key=bytes([i]) * 16, transmission_risk=2, app_package_name="t", regions=["US"],
                     traveler=False, interval_number=interval_number(start) - 144, interval_count=144,
                     created_at=start, report_type="confirmed", days_since_symptom_onset=0) for i in range(5)]
    exposures_db.PartitionGuard(engine).ensure([start])
    with engine.begin() as conn:
        exposures_db.insert_exposures(conn, rows)
    store = GcsBlobstore(client)
    result = ExportPipeline(settings, engine, store, keys).run_window("gcs", start, start + timedelta(hours=1), now)
    (written,) = result["files"]
    parsed = fmt.read_export(store.get(bucket, written["filename"]))
    public = serialization.load_pem_public_key(keys.signer(ref).public_key_pem().encode())
    assert fmt.verify_export(parsed, [public])
    assert {k.key_data for k in parsed.keys} >= {r.exposure_key for r in rows}
    assert store.get(bucket, "exposureKeyExport-US/index.txt").decode() == written["filename"]
    zip_blob = client.bucket(bucket).get_blob(written["filename"])
    index_blob = client.bucket(bucket).get_blob("exposureKeyExport-US/index.txt")
    assert (zip_blob.content_type, zip_blob.cache_control) == ("application/zip", CACHEABLE)
    assert (index_blob.content_type, index_blob.cache_control) == ("text/plain", NOT_CACHEABLE)
