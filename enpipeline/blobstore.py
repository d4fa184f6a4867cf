"""Blob storage for export files and indexes: one small interface, with memory, filesystem and GCS stores."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import unquote

if TYPE_CHECKING:  # google-cloud-storage is imported only when a GCS store is used
    from google.cloud import storage

CACHEABLE = "public, max-age=86400"
NOT_CACHEABLE = "no-cache, max-age=0"
DEFAULT_TIMEOUT = 50.0  # seconds, for every blob operation (protocol §6.5)

# Prefix of in-flight files of FilesystemBlobstore; such names are never listed and never accepted as objects.
TEMP_PREFIX = ".enp-tmp-"


class BlobNotFound(Exception):
    """The object does not exist in the bucket."""

    def __init__(self, bucket: str, name: str):
        self.bucket = bucket
        self.name = name
        super().__init__(f"blob not found: {bucket}/{name}")


class InvalidBlobName(ValueError):
    """A bucket or object name that is empty, absolute, or could step outside its bucket."""


@runtime_checkable
class Blobstore(Protocol):
    def create(self, bucket: str, name: str, data: bytes, *, content_type: str, cacheable: bool) -> None:
        """Write (or overwrite) an object atomically: readers see the old object or the new one, never a part."""

    def get(self, bucket: str, name: str) -> bytes:
        """Return the object's bytes; raise BlobNotFound if it does not exist."""

    def delete(self, bucket: str, name: str) -> None:
        """Remove the object; a missing object is not an error."""

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        """Names (relative to the bucket) of the objects that start with ``prefix``, sorted."""

    def exists(self, bucket: str, name: str) -> bool:
        """Whether the object exists."""


def cache_control(cacheable: bool) -> str:
    return CACHEABLE if cacheable else NOT_CACHEABLE


def check_bucket(bucket: str) -> str:
    if not bucket or "/" in bucket or "\\" in bucket or "\x00" in bucket or bucket in (".", ".."):
        raise InvalidBlobName(f"invalid bucket name {bucket!r}")
    return bucket


def check_name(name: str) -> str:
    """Refuse names that a filesystem would resolve elsewhere, so every store accepts the same names.

    Empty segments ("a//b", "a/") and "." would alias another name on disk; ".." and a leading "/" escape the bucket.
    """
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise InvalidBlobName(f"invalid object name {name!r}")
    for segment in name.split("/"):
        if segment in ("", ".", "..") or segment.startswith(TEMP_PREFIX):
            raise InvalidBlobName(f"invalid object name {name!r}")
    return name


@dataclass(frozen=True)
class StoredBlob:
    data: bytes
    content_type: str
    cache_control: str


class MemoryBlobstore:
    """In-process store for tests; keeps content type and cache control so tests can assert them."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], StoredBlob] = {}
        self._lock = threading.Lock()

    def create(self, bucket: str, name: str, data: bytes, *, content_type: str, cacheable: bool) -> None:
        key = (check_bucket(bucket), check_name(name))
        blob = StoredBlob(bytes(data), content_type, cache_control(cacheable))
        with self._lock:
            self._objects[key] = blob

    def stat(self, bucket: str, name: str) -> StoredBlob:
        """The stored object with its metadata; raises BlobNotFound."""
        with self._lock:
            try:
                return self._objects[(check_bucket(bucket), check_name(name))]
            except KeyError:
                raise BlobNotFound(bucket, name) from None

    def get(self, bucket: str, name: str) -> bytes:
        return self.stat(bucket, name).data

    def delete(self, bucket: str, name: str) -> None:
        with self._lock:
            self._objects.pop((check_bucket(bucket), check_name(name)), None)

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        check_bucket(bucket)
        with self._lock:
            return sorted(n for b, n in self._objects if b == bucket and n.startswith(prefix))

    def exists(self, bucket: str, name: str) -> bool:
        with self._lock:
            return (check_bucket(bucket), check_name(name)) in self._objects


class FilesystemBlobstore:
    """Objects as files at ``<root>/<bucket>/<name>``; the local default. Content type is not kept on disk."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FilesystemBlobstore({str(self.root)!r})"

    def _path(self, bucket: str, name: str) -> Path:
        return self.root / check_bucket(bucket) / check_name(name)

    def create(self, bucket: str, name: str, data: bytes, *, content_type: str, cacheable: bool) -> None:
        path = self._path(bucket, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the target, so os.replace is a rename within one filesystem and therefore atomic.
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fchmod(fh.fileno(), 0o644)  # mkstemp's 0600 would hide exports from a web server
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(path.parent)

    def get(self, bucket: str, name: str) -> bytes:
        try:
            return self._path(bucket, name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(bucket, name) from None

    def delete(self, bucket: str, name: str) -> None:
        try:
            self._path(bucket, name).unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        base = self.root / check_bucket(bucket)
        names = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(base).as_posix()
            for file in files:
                if file.startswith(TEMP_PREFIX):
                    continue
                name = file if rel == "." else f"{rel}/{file}"
                if name.startswith(prefix):
                    names.append(name)
        return sorted(names)

    def exists(self, bucket: str, name: str) -> bool:
        return self._path(bucket, name).is_file()


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable; not every platform lets a directory be opened for this."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class GcsBlobstore:
    """Google Cloud Storage through the google-cloud-storage client; the bucket comes with every call."""

    def __init__(self, client: storage.Client | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 client_factory: Callable[[], storage.Client] | None = None):
        self._client = client
        self._client_factory = client_factory
        self.timeout = timeout

    @property
    def client(self) -> storage.Client:
        # Created on first use: building a client looks up credentials, which must not happen at import or config.
        if self._client is None:
            if self._client_factory is not None:
                self._client = self._client_factory()
            else:
                from google.cloud import storage

                self._client = storage.Client()
        return self._client

    def _blob(self, bucket: str, name: str) -> Any:
        return self.client.bucket(check_bucket(bucket)).blob(check_name(name))

    def create(self, bucket: str, name: str, data: bytes, *, content_type: str, cacheable: bool) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self._blob(bucket, name)
        blob.cache_control = cache_control(cacheable)
        # A GCS upload becomes visible only once complete. Rewriting the same name with the same bytes is
        # idempotent, so retrying without a generation precondition is safe.
        blob.upload_from_string(data, content_type=content_type, timeout=self.timeout, retry=DEFAULT_RETRY)

    def get(self, bucket: str, name: str) -> bytes:
        from google.api_core.exceptions import NotFound

        try:
            return self._blob(bucket, name).download_as_bytes(timeout=self.timeout)
        except NotFound:
            raise BlobNotFound(bucket, name) from None

    def delete(self, bucket: str, name: str) -> None:
        from google.api_core.exceptions import NotFound

        try:
            self._blob(bucket, name).delete(timeout=self.timeout)
        except NotFound:
            pass

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        blobs = self.client.list_blobs(check_bucket(bucket), prefix=prefix or None, timeout=self.timeout)
        return sorted(blob.name for blob in blobs)

    def exists(self, bucket: str, name: str) -> bool:
        return bool(self._blob(bucket, name).exists(timeout=self.timeout))


SCHEMES = ("file", "memory", "gs")


def parse_blobstore_url(url: str, *, setting: str = "ENP_BLOBSTORE") -> tuple[str, str]:
    """Split a blobstore URL into (scheme, path); raise ValueError naming ``setting`` if it is not usable."""
    usage = f"{setting} must be file://PATH (file:///absolute or file://relative), memory:// or gs://"
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"{usage}, got {url!r}")
    if scheme == "file":
        path = unquote(rest)
        if not path:
            raise ValueError(f"{usage}: the file:// URL has no path, got {url!r}")
        return scheme, path
    if rest:
        if scheme == "gs":
            raise ValueError(f"{setting}: use plain gs://, the bucket comes from each export config; got {url!r}")
        raise ValueError(f"{usage}, got {url!r}")
    return scheme, ""


def blobstore_from_url(url: str, *, gcs_client_factory: Callable[[], storage.Client] | None = None,
                       setting: str = "ENP_BLOBSTORE") -> Blobstore:
    """Build the store a URL names: ``file:///abs/path``, ``file://relative/path``, ``memory://`` or ``gs://``."""
    scheme, path = parse_blobstore_url(url, setting=setting)
    if scheme == "file":
        return FilesystemBlobstore(Path(path))
    if scheme == "memory":
        return MemoryBlobstore()
    return GcsBlobstore(client_factory=gcs_client_factory)
