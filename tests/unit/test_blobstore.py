"""Blob stores: one behavioural contract run on the memory and filesystem stores, plus their specifics."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from enpipeline import blobstore as bs
from enpipeline.blobstore import (
    CACHEABLE,
    NOT_CACHEABLE,
    BlobNotFound,
    Blobstore,
    FilesystemBlobstore,
    GcsBlobstore,
    InvalidBlobName,
    MemoryBlobstore,
    blobstore_from_url,
)
from enpipeline.config import ConfigError, load_settings

ZIP = "application/zip"
TEXT = "text/plain"

BAD_NAMES = ["", "/etc/passwd", "../escape", "a/../../escape", "a/..", "..", ".", "a/./b", "a//b", "a/", "a\\b",
             "a\x00b", f"v1/{bs.TEMP_PREFIX}x"]
BAD_BUCKETS = ["", ".", "..", "a/b", "a\\b"]


class BlobstoreContract:
    """Behaviour every Blobstore shares. Subclasses provide ``store`` and ``bucket`` fixtures."""

    def put(self, store: Blobstore, bucket: str, name: str, data: bytes = b"x") -> None:
        store.create(bucket, name, data, content_type=ZIP, cacheable=True)

    def test_is_a_blobstore(self, store):
        assert isinstance(store, Blobstore)

    def test_create_get_exists(self, store, bucket):
        assert not store.exists(bucket, "v1/0-0-00001.zip")
        self.put(store, bucket, "v1/0-0-00001.zip", b"PK\x03\x04zip bytes")
        assert store.get(bucket, "v1/0-0-00001.zip") == b"PK\x03\x04zip bytes"
        assert store.exists(bucket, "v1/0-0-00001.zip")

    def test_binary_and_empty_round_trip(self, store, bucket):
        every_byte = bytes(range(256)) * 4
        self.put(store, bucket, "bin", every_byte)
        self.put(store, bucket, "empty", b"")
        assert store.get(bucket, "bin") == every_byte
        assert store.get(bucket, "empty") == b""
        assert store.exists(bucket, "empty")

    def test_overwrite_replaces_content(self, store, bucket):
        self.put(store, bucket, "v1/index.txt", b"a long first version")
        store.create(bucket, "v1/index.txt", b"short", content_type=TEXT, cacheable=False)
        assert store.get(bucket, "v1/index.txt") == b"short"
        assert store.list(bucket) == ["v1/index.txt"]

    def test_get_missing_raises_blob_not_found(self, store, bucket):
        with pytest.raises(BlobNotFound) as info:
            store.get(bucket, "v1/missing.zip")
        assert (info.value.bucket, info.value.name) == (bucket, "v1/missing.zip")
        assert "v1/missing.zip" in str(info.value)

    def test_delete(self, store, bucket):
        self.put(store, bucket, "v1/a.zip")
        self.put(store, bucket, "v1/b.zip")
        store.delete(bucket, "v1/a.zip")
        assert not store.exists(bucket, "v1/a.zip")
        with pytest.raises(BlobNotFound):
            store.get(bucket, "v1/a.zip")
        assert store.list(bucket) == ["v1/b.zip"]

    def test_delete_missing_is_fine(self, store, bucket):
        self.put(store, bucket, "keep")
        store.delete(bucket, "never-written")
        store.delete(bucket, "dir/never-written")
        assert store.list(bucket) == ["keep"]

    def test_list_empty_bucket(self, store, bucket):
        assert store.list(bucket) == []
        assert store.list(bucket, "v1/") == []

    def test_list_sorted_relative_and_prefixed(self, store, bucket):
        names = ["v2/103-303-00001.zip", "v1/index.txt", "v1/2-2-00002.zip", "v1/0-0-00001.zip", "top.txt",
                 "v10/0-0-00001.zip", "v1/deep/er/x.zip"]
        for name in names:
            self.put(store, bucket, name)
        assert store.list(bucket) == sorted(names)
        assert store.list(bucket, "") == sorted(names)
        assert store.list(bucket, "v1/") == ["v1/0-0-00001.zip", "v1/2-2-00002.zip", "v1/deep/er/x.zip",
                                             "v1/index.txt"]
        assert store.list(bucket, "v1") == ["v1/0-0-00001.zip", "v1/2-2-00002.zip", "v1/deep/er/x.zip",
                                            "v1/index.txt", "v10/0-0-00001.zip"]
        assert store.list(bucket, "v1/0") == ["v1/0-0-00001.zip"]
        assert store.list(bucket, "nothing") == []

    def test_buckets_are_separate(self, store, bucket, other_bucket):
        self.put(store, bucket, "v1/index.txt", b"one")
        self.put(store, other_bucket, "v1/index.txt", b"two")
        assert store.get(bucket, "v1/index.txt") == b"one"
        assert store.get(other_bucket, "v1/index.txt") == b"two"
        store.delete(other_bucket, "v1/index.txt")
        assert store.get(bucket, "v1/index.txt") == b"one"
        assert store.list(other_bucket) == []

    @pytest.mark.parametrize("name", BAD_NAMES)
    def test_escaping_names_refused(self, store, bucket, name):
        with pytest.raises(InvalidBlobName):
            self.put(store, bucket, name)
        for call in (store.get, store.delete, store.exists):
            with pytest.raises(InvalidBlobName):
                call(bucket, name)
        assert store.list(bucket) == []

    @pytest.mark.parametrize("bad_bucket", BAD_BUCKETS)
    def test_bad_bucket_names_refused(self, store, bad_bucket):
        with pytest.raises(InvalidBlobName):
            self.put(store, bad_bucket, "v1/index.txt")
        with pytest.raises(InvalidBlobName):
            store.list(bad_bucket)

    def test_invalid_name_is_a_value_error(self):
        assert issubclass(InvalidBlobName, ValueError)


class MetadataContract:
    """For stores that keep content type and cache control: ``metadata`` returns (content_type, cache_control)."""

    def metadata(self, store, bucket: str, name: str) -> tuple[str, str]:
        raise NotImplementedError

    def test_zip_cacheable_index_not(self, store, bucket):
        store.create(bucket, "v1/0-0-00001.zip", b"PK", content_type=ZIP, cacheable=True)
        store.create(bucket, "v1/index.txt", b"v1/0-0-00001.zip", content_type=TEXT, cacheable=False)
        assert self.metadata(store, bucket, "v1/0-0-00001.zip") == ("application/zip", "public, max-age=86400")
        assert self.metadata(store, bucket, "v1/index.txt") == ("text/plain", "no-cache, max-age=0")

    def test_overwrite_replaces_metadata(self, store, bucket):
        store.create(bucket, "obj", b"1", content_type=ZIP, cacheable=True)
        store.create(bucket, "obj", b"2", content_type=TEXT, cacheable=False)
        assert self.metadata(store, bucket, "obj") == (TEXT, NOT_CACHEABLE)


class TestMemoryBlobstore(BlobstoreContract, MetadataContract):
    @pytest.fixture
    def store(self):
        return MemoryBlobstore()

    @pytest.fixture
    def bucket(self):
        return "exports"

    @pytest.fixture
    def other_bucket(self):
        return "exports-eu"

    def metadata(self, store, bucket, name):
        info = store.stat(bucket, name)
        return info.content_type, info.cache_control

    def test_stat_missing_raises(self, store):
        with pytest.raises(BlobNotFound):
            store.stat("exports", "nope")

    def test_stored_bytes_are_a_copy(self, store):
        data = bytearray(b"abc")
        store.create("exports", "obj", data, content_type=ZIP, cacheable=True)  # type: ignore[arg-type]
        data[0] = ord("X")
        assert store.get("exports", "obj") == b"abc"
        assert type(store.get("exports", "obj")) is bytes


class TestFilesystemBlobstore(BlobstoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        return FilesystemBlobstore(tmp_path / "blobs")

    @pytest.fixture
    def bucket(self):
        return "exports"

    @pytest.fixture
    def other_bucket(self):
        return "exports-eu"

    @staticmethod
    def all_files(root: Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def test_object_lives_at_root_bucket_name(self, store, tmp_path):
        store.create("exports", "v1/0-0-00001.zip", b"zip", content_type=ZIP, cacheable=True)
        path = tmp_path / "blobs" / "exports" / "v1" / "0-0-00001.zip"
        assert path.read_bytes() == b"zip"
        assert stat.S_IMODE(path.stat().st_mode) == 0o644

    def test_no_temp_files_left(self, store, tmp_path):
        for i in range(3):
            store.create("exports", "v1/index.txt", f"version {i}".encode(), content_type=TEXT, cacheable=False)
        store.create("exports", "v1/0-0-00001.zip", b"zip", content_type=ZIP, cacheable=True)
        assert self.all_files(tmp_path / "blobs") == ["exports/v1/0-0-00001.zip", "exports/v1/index.txt"]

    def test_write_goes_through_a_temp_file_in_the_same_directory(self, store, tmp_path, monkeypatch):
        renames = []
        real_replace = os.replace

        def spy(src, dst):
            renames.append((Path(src), Path(dst), Path(src).read_bytes()))
            real_replace(src, dst)

        monkeypatch.setattr(bs.os, "replace", spy)
        store.create("exports", "v1/index.txt", b"index", content_type=TEXT, cacheable=False)
        [(src, dst, content)] = renames
        assert dst == tmp_path / "blobs" / "exports" / "v1" / "index.txt"
        assert src.parent == dst.parent and src.name.startswith(bs.TEMP_PREFIX)
        assert content == b"index"  # complete before it gets the real name

    def test_failed_write_keeps_old_object_and_leaves_no_temp(self, store, tmp_path, monkeypatch):
        store.create("exports", "v1/index.txt", b"old", content_type=TEXT, cacheable=False)

        def failing_fsync(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(bs.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="No space left"):
            store.create("exports", "v1/index.txt", b"new", content_type=TEXT, cacheable=False)
        monkeypatch.undo()
        assert store.get("exports", "v1/index.txt") == b"old"
        assert self.all_files(tmp_path / "blobs") == ["exports/v1/index.txt"]

    def test_readers_never_see_a_partial_object(self, store):
        versions = [bytes([i]) * 256 * 1024 for i in range(1, 6)]
        store.create("exports", "big.zip", versions[0], content_type=ZIP, cacheable=True)
        seen: set[bytes] = set()
        done = threading.Event()

        def reader():
            while not done.is_set():
                seen.add(store.get("exports", "big.zip"))

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for _ in range(10):
                for data in versions:
                    store.create("exports", "big.zip", data, content_type=ZIP, cacheable=True)
        finally:
            done.set()
            thread.join()
        assert seen and seen <= set(versions)

    def test_in_flight_temp_files_are_not_listed(self, store, tmp_path):
        store.create("exports", "v1/a.zip", b"a", content_type=ZIP, cacheable=True)
        (tmp_path / "blobs" / "exports" / "v1" / f"{bs.TEMP_PREFIX}abc").write_bytes(b"half")
        assert store.list("exports") == ["v1/a.zip"]

    def test_directory_is_not_an_object(self, store):
        store.create("exports", "v1/a.zip", b"a", content_type=ZIP, cacheable=True)
        assert not store.exists("exports", "v1")
        with pytest.raises(BlobNotFound):
            store.get("exports", "v1")

    def test_get_below_a_file_is_not_found(self, store):
        store.create("exports", "v1", b"a file", content_type=ZIP, cacheable=True)
        with pytest.raises(BlobNotFound):
            store.get("exports", "v1/a.zip")
        store.delete("exports", "v1/a.zip")
        assert store.get("exports", "v1") == b"a file"

    def test_missing_root_lists_empty_and_is_created_on_write(self, tmp_path):
        store = FilesystemBlobstore(tmp_path / "not" / "yet")
        assert store.list("exports") == []
        store.create("exports", "x", b"1", content_type=ZIP, cacheable=True)
        assert (tmp_path / "not" / "yet" / "exports" / "x").read_bytes() == b"1"


class FakeBlob:
    def __init__(self, client: FakeClient, bucket: str, name: str):
        self.client, self.bucket, self.name = client, bucket, name
        self.cache_control = None

    def upload_from_string(self, data, *, content_type, timeout, retry):
        self.client.calls.append(("upload", self.bucket, self.name, timeout))
        self.client.objects[(self.bucket, self.name)] = (data, content_type, self.cache_control)
        self.client.retries.append(retry)

    def download_as_bytes(self, *, timeout):
        from google.api_core.exceptions import NotFound

        self.client.calls.append(("download", self.bucket, self.name, timeout))
        try:
            return self.client.objects[(self.bucket, self.name)][0]
        except KeyError:
            raise NotFound("no such object") from None

    def delete(self, *, timeout):
        from google.api_core.exceptions import NotFound

        self.client.calls.append(("delete", self.bucket, self.name, timeout))
        if self.client.objects.pop((self.bucket, self.name), None) is None:
            raise NotFound("no such object")

    def exists(self, *, timeout):
        self.client.calls.append(("exists", self.bucket, self.name, timeout))
        return (self.bucket, self.name) in self.client.objects


class FakeClient:
    """Records how GcsBlobstore drives the google-cloud-storage API (the real API is tested on the emulator)."""

    def __init__(self):
        self.objects: dict[tuple[str, str], tuple[bytes, str, str | None]] = {}
        self.calls: list[tuple] = []
        self.retries: list = []

    def bucket(self, bucket):
        return SimpleNamespace(blob=lambda name: FakeBlob(self, bucket, name))

    def list_blobs(self, bucket, *, prefix, timeout):
        self.calls.append(("list", bucket, prefix, timeout))
        # Unsorted on purpose: the store must sort.
        return [SimpleNamespace(name=n) for b, n in reversed(list(self.objects)) if b == bucket
                and n.startswith(prefix or "")]


class TestGcsBlobstoreCalls:
    def test_every_call_carries_the_50s_timeout_and_metadata(self):
        client = FakeClient()
        store = GcsBlobstore(client)
        store.create("b", "v1/1.zip", b"zip", content_type=ZIP, cacheable=True)
        store.create("b", "v1/index.txt", b"v1/1.zip", content_type=TEXT, cacheable=False)
        assert store.get("b", "v1/1.zip") == b"zip"
        assert store.exists("b", "v1/1.zip")
        assert store.list("b", "v1/") == ["v1/1.zip", "v1/index.txt"]
        store.delete("b", "v1/1.zip")
        store.delete("b", "v1/1.zip")  # NotFound is swallowed
        with pytest.raises(BlobNotFound):
            store.get("b", "v1/1.zip")
        assert {call[-1] for call in client.calls} == {50.0}
        assert [call[0] for call in client.calls] == ["upload", "upload", "download", "exists", "list", "delete",
                                                      "delete", "download"]
        assert client.objects[("b", "v1/index.txt")] == (b"v1/1.zip", TEXT, NOT_CACHEABLE)
        assert all(retry is not None for retry in client.retries)

    def test_custom_timeout_and_empty_prefix(self):
        client = FakeClient()
        store = GcsBlobstore(client, timeout=5.0)
        store.create("b", "x", b"1", content_type=ZIP, cacheable=True)
        assert store.list("b") == ["x"]
        assert client.calls[-1] == ("list", "b", None, 5.0)
        assert client.objects[("b", "x")] == (b"1", ZIP, CACHEABLE)

    def test_client_is_built_lazily_from_the_factory(self):
        made = []

        def factory():
            made.append(FakeClient())
            return made[-1]

        store = blobstore_from_url("gs://", gcs_client_factory=factory)
        assert isinstance(store, GcsBlobstore) and made == []
        store.create("b", "x", b"1", content_type=ZIP, cacheable=True)
        assert store.get("b", "x") == b"1"
        assert len(made) == 1 and made[0].objects[("b", "x")][0] == b"1"


class TestBlobstoreFromUrl:
    def test_file_relative(self):
        store = blobstore_from_url("file://var/blobs")
        assert isinstance(store, FilesystemBlobstore) and store.root == Path("var/blobs")
        assert not store.root.is_absolute()

    def test_file_absolute(self, tmp_path):
        store = blobstore_from_url(f"file://{tmp_path}/blobs")
        assert isinstance(store, FilesystemBlobstore) and store.root == tmp_path / "blobs"
        store.create("b", "x", b"1", content_type=ZIP, cacheable=True)
        assert (tmp_path / "blobs" / "b" / "x").read_bytes() == b"1"

    def test_file_percent_decoded(self):
        store = blobstore_from_url("file:///srv/my%20blobs")
        assert isinstance(store, FilesystemBlobstore) and store.root == Path("/srv/my blobs")

    def test_memory_is_fresh_each_time(self):
        first, second = blobstore_from_url("memory://"), blobstore_from_url("memory://")
        assert isinstance(first, MemoryBlobstore) and isinstance(second, MemoryBlobstore)
        first.create("b", "x", b"1", content_type=ZIP, cacheable=True)
        assert not second.exists("b", "x")

    def test_gs(self):
        store = blobstore_from_url("gs://")
        assert isinstance(store, GcsBlobstore) and store.timeout == 50.0

    @pytest.mark.parametrize("url", ["s3://bucket", "var/blobs", "/abs/path", "", "file:/x", "http://x",
                                     "memory://something", "file://", "gs://my-bucket", "FILE://x"])
    def test_bad_urls_name_the_setting(self, url):
        with pytest.raises(ValueError, match="ENP_BLOBSTORE"):
            blobstore_from_url(url)

    def test_bucket_in_gs_url_explained(self):
        with pytest.raises(ValueError, match="bucket comes from each export config"):
            blobstore_from_url("gs://my-bucket")

    def test_other_setting_name(self):
        with pytest.raises(ValueError, match="extra 'url'") as info:
            blobstore_from_url("s3://x", setting="connection extra 'url'")
        assert "ENP_BLOBSTORE" not in str(info.value)


class TestBlobstoreSetting:
    def test_default(self):
        settings = load_settings({}, require_database=False)
        assert settings.blobstore == "file://var/blobs"
        assert isinstance(blobstore_from_url(settings.blobstore), FilesystemBlobstore)

    @pytest.mark.parametrize("url", ["file:///srv/blobs", "memory://", "gs://"])
    def test_accepted(self, url):
        assert load_settings({"ENP_BLOBSTORE": url}, require_database=False).blobstore == url

    @pytest.mark.parametrize("url", ["s3://bucket", "gs://bucket", "file://", "blobs"])
    def test_rejected_with_the_variable_named(self, url):
        with pytest.raises(ConfigError) as info:
            load_settings({"ENP_BLOBSTORE": url}, require_database=False)
        assert any("ENP_BLOBSTORE" in problem for problem in info.value.problems)
