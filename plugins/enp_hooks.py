"""Airflow hooks that turn the enp_* Connections into enpipeline clients and config, resolved per call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enpipeline.blobstore import (
    DEFAULT_TIMEOUT,
    BlobNotFound,
    Blobstore,
    FilesystemBlobstore,
    blobstore_from_url,
    cache_control,
    check_bucket,
    check_name,
)

if TYPE_CHECKING:  # Airflow and the Google provider are imported inside the functions: nothing heavy at parse time
    from airflow.providers.google.cloud.hooks.gcs import GCSHook
    from airflow.sdk import Connection
    from sqlalchemy.engine import Engine

    from enpipeline.export.pipeline import ExportPipeline
    from enpipeline.retention import RetentionCleaner

BLOBSTORE_CONN_ID = "enp_blobstore"
POSTGRES_CONN_ID = "enp_postgres"
GCP_CONN_TYPE = "google_cloud_platform"

# libpq parameters an Airflow Postgres connection keeps in its extras; carried into the URL's query string.
_LIBPQ_EXTRAS = ("sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "connect_timeout", "options",
                 "application_name", "target_session_attrs")


def _connection(conn_id: str) -> Connection | None:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


class GcsHookBlobstore:
    """The Blobstore interface over the Google provider's GCSHook (credentials from the Airflow Connection)."""

    def __init__(self, hook: GCSHook, *, timeout: float = DEFAULT_TIMEOUT):
        self.hook = hook
        self.timeout = timeout

    def create(self, bucket: str, name: str, data: bytes, *, content_type: str, cacheable: bool) -> None:
        self.hook.upload(bucket_name=check_bucket(bucket), object_name=check_name(name), data=data,
                         mime_type=content_type, cache_control=cache_control(cacheable),
                         timeout=self.timeout)  # type: ignore[arg-type]  # the hook says int; the client takes float

    def get(self, bucket: str, name: str) -> bytes:
        from google.api_core.exceptions import NotFound

        try:
            return self.hook.download(bucket_name=check_bucket(bucket), object_name=check_name(name),
                                      timeout=self.timeout)  # type: ignore[arg-type]
        except NotFound:
            raise BlobNotFound(bucket, name) from None

    def delete(self, bucket: str, name: str) -> None:
        self.hook.delete(bucket_name=check_bucket(bucket), object_name=check_name(name), ignore_error=True)

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(self.hook.list(bucket_name=check_bucket(bucket), prefix=prefix or None))

    def exists(self, bucket: str, name: str) -> bool:
        return bool(self.hook.exists(bucket_name=check_bucket(bucket), object_name=check_name(name)))


def blobstore_for_airflow() -> Blobstore:
    """The store named by the ``enp_blobstore`` Connection, or by ``ENP_BLOBSTORE`` when there is none.

    * conn_type ``google_cloud_platform``: GCS through ``GCSHook(gcp_conn_id="enp_blobstore")``;
    * any Connection with extra ``{"url": "file:///..." | "memory://" | "gs://"}``: that URL;
    * conn_type ``fs`` with extra ``{"path": "/srv/blobs"}`` (Airflow's File connection): that directory.
    """
    conn = _connection(BLOBSTORE_CONN_ID)
    if conn is None:
        from enpipeline.config import load_settings

        return blobstore_from_url(load_settings(require_database=False).blobstore)
    if conn.conn_type == GCP_CONN_TYPE:
        from airflow.providers.google.cloud.hooks.gcs import GCSHook

        return GcsHookBlobstore(GCSHook(gcp_conn_id=BLOBSTORE_CONN_ID))
    extra: dict[str, Any] = conn.extra_dejson
    if extra.get("url"):
        return blobstore_from_url(str(extra["url"]), setting=f"Airflow connection {BLOBSTORE_CONN_ID!r} extra 'url'")
    if conn.conn_type == "fs" and extra.get("path"):
        return FilesystemBlobstore(Path(str(extra["path"])))
    raise ValueError(
        f"Airflow connection {BLOBSTORE_CONN_ID!r} (conn_type {conn.conn_type!r}) names no blob store: use conn_type "
        f"{GCP_CONN_TYPE!r}, conn_type 'fs' with extra {{\"path\": ...}}, or an extra {{\"url\": ...}}"
    )


def enp_database_url() -> str:
    """SQLAlchemy URL (``postgresql://``) of the ``enp_postgres`` Connection, or ``ENP_DATABASE_URL``."""
    conn = _connection(POSTGRES_CONN_ID)
    if conn is None:
        from enpipeline.config import load_settings

        return load_settings(require_database=True).database_url
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    url = PostgresHook(postgres_conn_id=POSTGRES_CONN_ID).sqlalchemy_url
    extra = conn.extra_dejson
    libpq = {key: str(extra[key]) for key in _LIBPQ_EXTRAS if extra.get(key) not in (None, "")}
    # enpipeline pins its own driver (psycopg2); the hook would name psycopg3 when that is installed.
    url = url.set(drivername="postgresql").update_query_dict(libpq)
    return url.render_as_string(hide_password=False)


@contextmanager
def export_pipeline() -> Iterator[ExportPipeline]:
    """An ExportPipeline wired to the enp_postgres / enp_blobstore Connections (or the ENP_* settings).

    A context manager: its engine is disposed on exit, so a task leaves no connection behind even when many
    tasks share one process (``dag.test()`` runs them all in-process).
    """
    from enpipeline.config import load_settings
    from enpipeline.db.engine import make_engine
    from enpipeline.export.pipeline import ExportPipeline
    from enpipeline.export.signing import key_manager_from_settings

    url = enp_database_url()
    settings = load_settings(require_database=False).replace(database_url=url)
    engine = make_engine(url, pool_size=2, max_overflow=2, application_name="enpipeline-airflow")
    try:
        yield ExportPipeline(settings, engine, blobstore_for_airflow(), key_manager_from_settings(settings))
    finally:
        engine.dispose()


@contextmanager
def retention_cleaner() -> Iterator[RetentionCleaner]:
    """A RetentionCleaner wired like export_pipeline(); revision-token secrets from ENP_* (or ./var locally)."""
    from enpipeline.config import load_settings, with_local_secrets
    from enpipeline.db.engine import make_engine
    from enpipeline.retention import RetentionCleaner

    url = enp_database_url()
    settings = with_local_secrets(load_settings(require_database=False).replace(database_url=url))
    engine = make_engine(url, pool_size=2, max_overflow=2, application_name="enpipeline-airflow")
    try:
        yield RetentionCleaner(settings, engine, blobstore_for_airflow())
    finally:
        engine.dispose()


@contextmanager
def enp_engine() -> Iterator[Engine]:
    """An engine on the enp_postgres Connection (or ENP_DATABASE_URL), disposed on exit."""
    from enpipeline.db.engine import make_engine

    engine = make_engine(enp_database_url(), pool_size=2, max_overflow=2, application_name="enpipeline-airflow")
    try:
        yield engine
    finally:
        engine.dispose()
