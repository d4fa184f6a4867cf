"""Import the export files a partner publishes (``index.txt`` + signed zips) as keys from that partner.

One run of one importer:

1. takes the importer's run lock (a second run of the same importer fails fast with ``ImporterBusy``);
2. fetches ``index_url`` (http(s) with bounded time and size, or a ``file://`` / ``gs://`` blob URL);
3. for each entry not processed before, downloads the file, checks that at least one of its signatures verifies
   with a registered key named by that signature's SignatureInfo (key id and version) and valid at ``now``,
   validates every key like a publish and stores it with local provenance false, ``export_import_id`` = the
   importer's id and ``import_file_id`` = the file's record;
4. raises ``ExportImportError`` at the end if any file failed, after the others were processed.

Where the files are. ``export_root``, when set, is the URL the entries are relative to. When it is not set, it is
derived from ``index_url``: an entry is relative to the index's directory, except that when the entry starts
with the last directory name(s) of that directory, those are not repeated. So both common layouts work:

* the reference server writes ``<root>/index.txt`` listing ``<root>/<start>-<end>-00001.zip`` (names relative to
  the bucket): ``https://cdn/bucket/root/index.txt`` + ``root/1-2-00001.zip`` -> ``https://cdn/bucket/root/1-2-00001.zip``;
* an index listing plain names: ``https://cdn/bucket/root/index.txt`` + ``1-2.zip`` -> ``https://cdn/bucket/root/1-2.zip``.

A layout this guesses wrong (files really at ``.../root/root/x.zip``) needs an explicit ``export_root``.

What is recorded. Files are known by their index entry, so a file is imported once whatever its URL becomes.

* COMPLETE: the file verified; its keys were stored in the same transaction as its record, so a crash never
  leaves a half-imported file (the partition check runs just before that transaction, in its own).
* FAILED: the file is unusable for good (not an export file, unsigned, no signature by a registered valid key,
  altered, larger than ``ENP_IMPORTER_MAX_FILE_BYTES``). Nothing of it is stored. It is skipped by later runs
  unless ``retry_failed`` (after registering a key or raising the limit).
* not recorded: a download that failed (network, timeout, HTTP error, missing object: a CDN may list a file
  before it serves it) and an index entry that is not a safe relative name. They count as failed in this run
  and are tried again by the next one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection, Engine

from enpipeline import httpget
from enpipeline.blobstore import BlobNotFound, FilesystemBlobstore, GcsBlobstore, InvalidBlobName
from enpipeline.config import Settings
from enpipeline.db import importer as importer_db
from enpipeline.db.exposures import PartitionGuard
from enpipeline.export.format import ParsedExport, PublicKey, load_public_key, read_export, verify_export
from enpipeline.federation.foreign import ForeignKey, store_foreign_keys, to_exposure
from enpipeline.model import REPORT_TYPE_NEGATIVE, Exposure
from enpipeline.timeutil import truncate

__all__ = [
    "MAX_INDEX_BYTES",
    "ExportImportError",
    "FetchError",
    "FileTooLarge",
    "ImportReport",
    "ImporterBusy",
    "check_url",
    "default_fetch",
    "import_exports",
    "parse_index",
    "resolve_entry",
]

logger = logging.getLogger("enpipeline.federation.importer")

# The reference mirror's limit for an index; at ~55 bytes a line that is about 19,000 files.
MAX_INDEX_BYTES = 1024 * 1024
MAX_REPORTED_FAILURES = 20
# Characters that need no escaping in a URL path and mean the same on a filesystem; '%' is left out so an entry
# never means one thing over http and another on disk.
_ENTRY_RE = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/-]+")

Fetch = Callable[[str, int], bytes]
"""``fetch(url, max_bytes) -> body``. Raises FetchError when it may work later, FileTooLarge past ``max_bytes``;
anything else it raises ends the run (files already done stay done)."""


class ExportImportError(Exception):
    """An import run failed, in part or as a whole; the message names the importer, the files and the reasons."""

    def __init__(self, message: str, report: ImportReport | None = None):
        super().__init__(message)
        self.report = report


class ImporterBusy(ExportImportError):
    """Another run of the same importer holds its lock."""


class FetchError(Exception):
    """A download failed in a way that may pass (network, timeout, HTTP status, missing object)."""


class FileTooLarge(Exception):
    """The object is larger than allowed; it will not shrink, so the file is refused for good."""


# -- the index ------------------------------------------------------------------------------------------

def parse_index(body: bytes) -> tuple[list[str], list[tuple[str, str]]]:
    """Split an index into usable entries (in order, without repeats) and refused ``(line, reason)`` pairs.

    Raises ValueError if the index is not US-ASCII text, as the format requires: then nothing in it is trusted.
    """
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(f"index is not US-ASCII text (byte {exc.start})") from None
    entries: list[str] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line in seen:
            continue
        seen.add(line)
        problem = _entry_problem(line)
        if problem:
            refused.append((line, problem))
        else:
            entries.append(line)
    return entries, refused


def _entry_problem(entry: str) -> str | None:
    if not _ENTRY_RE.fullmatch(entry):
        return "index entry has characters other than letters, digits and -._~!$&'()*+,;=:@/"
    if entry.startswith("/") or "://" in entry:
        return "index entry is not a relative name"
    if any(segment in ("", ".", "..") for segment in entry.split("/")):
        return "index entry has an empty, '.' or '..' path segment"
    return None


def resolve_entry(index_url: str, entry: str, export_root: str | None = None) -> str:
    """The URL of an index entry: under ``export_root`` if given, else under the root derived from the index URL."""
    if export_root:
        return export_root.rstrip("/") + "/" + entry
    parts = urllib.parse.urlsplit(index_url)
    directory = parts.path.split("/")[1:-1]  # "/b/root/index.txt" -> ["b", "root"]
    entry_dirs = entry.split("/")[:-1]
    overlap = 0
    for k in range(min(len(directory), len(entry_dirs)), 0, -1):
        if directory[-k:] == entry_dirs[:k]:
            overlap = k
            break
    base = directory[: len(directory) - overlap]
    path = "/" + "".join(segment + "/" for segment in base)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")) + entry


# -- fetching -------------------------------------------------------------------------------------------

def _http_get(url: str, timeout: timedelta, max_bytes: int) -> bytes:
    """GET a 200 body of at most ``max_bytes``; the whole download is abandoned after ``timeout``."""
    try:
        return httpget.bounded_get(url, timeout=timeout, max_bytes=max_bytes,
                                   headers={"User-Agent": "enpipeline-importer"})
    except httpget.TooLarge as exc:
        raise FileTooLarge(f"{exc.declared} bytes, more than the {exc.limit} allowed" if exc.declared is not None
                           else f"more than the {exc.limit} bytes allowed") from None
    except httpget.BadStatus as exc:
        raise FetchError(f"HTTP status {exc.status}" + (", expected 200" if exc.status < 300 else "")) from None
    except httpget.HttpGetError as exc:
        raise FetchError(str(exc)) from None


def _file_location(url: str) -> tuple[FilesystemBlobstore, str, str]:
    # file:///a/b/c.zip is object "c.zip" of bucket "b" in a store rooted at /a; file://rel/c.zip is relative,
    # as ENP_BLOBSTORE reads it.
    path = urllib.parse.unquote(url.partition("://")[2])
    parent = Path(path).parent
    if not parent.name:
        raise FetchError(f"{url} is not inside a directory")
    return FilesystemBlobstore(parent.parent), parent.name, Path(path).name


def _file_get(url: str, max_bytes: int) -> bytes:
    store, bucket, name = _file_location(url)
    try:
        size = (store.root / bucket / name).stat().st_size
    except OSError:
        raise FetchError(f"{url}: not found") from None
    if size > max_bytes:
        raise FileTooLarge(f"{size} bytes, more than the {max_bytes} allowed")
    try:
        data = store.get(bucket, name)
    except (BlobNotFound, InvalidBlobName, OSError) as exc:
        raise FetchError(f"{url}: {_one_line(str(exc))}") from None
    if len(data) > max_bytes:  # it grew since the stat
        raise FileTooLarge(f"more than the {max_bytes} bytes allowed")
    return data


def _gcs_get(store: GcsBlobstore, url: str, max_bytes: int) -> bytes:
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError

    parts = urllib.parse.urlsplit(url)
    bucket, name = parts.netloc, urllib.parse.unquote(parts.path.lstrip("/"))
    try:
        # The size is checked before the download: GcsBlobstore.get reads whole objects.
        blob = store.client.bucket(bucket).get_blob(name, timeout=store.timeout)
        if blob is None:
            raise FetchError(f"{url}: not found")
        if blob.size is not None and blob.size > max_bytes:
            raise FileTooLarge(f"{blob.size} bytes, more than the {max_bytes} allowed")
        data = store.get(bucket, name)
    except BlobNotFound:
        raise FetchError(f"{url}: not found") from None
    except (GoogleAPIError, GoogleAuthError, InvalidBlobName, OSError, ValueError) as exc:
        raise FetchError(f"{url}: {_one_line(str(exc)) or type(exc).__name__}") from None
    if len(data) > max_bytes:
        raise FileTooLarge(f"more than the {max_bytes} bytes allowed")
    return data


def default_fetch(settings: Settings, *, gcs_client_factory: Callable[[], Any] | None = None) -> Fetch:
    """The fetch an import uses unless given one: http(s), ``file://`` and ``gs://`` URLs."""
    timeout = settings.importer_request_timeout
    gcs: list[GcsBlobstore] = []  # one client per run, made on first gs:// use

    def fetch(url: str, max_bytes: int) -> bytes:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return _http_get(url, timeout, max_bytes)
        if scheme == "file":
            return _file_get(url, max_bytes)
        if scheme == "gs":
            if not gcs:
                gcs.append(GcsBlobstore(timeout=timeout.total_seconds(), client_factory=gcs_client_factory))
            return _gcs_get(gcs[0], url, max_bytes)
        raise FetchError(f"unsupported URL scheme in {url!r}; use http(s)://, file:// or gs://")

    return fetch


SCHEMES = ("http", "https", "file", "gs")


def check_url(url: str, what: str) -> str:
    """Raise ValueError unless ``url`` is a URL this importer can read (``what`` names it in the message)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"{what} must be an http://, https://, file:// or gs:// URL, got {url!r}")
    if parts.scheme.lower() in ("http", "https", "gs") and not parts.netloc:
        raise ValueError(f"{what} has no host or bucket: {url!r}")
    if not parts.path.strip("/"):
        raise ValueError(f"{what} has no path: {url!r}")
    return url


# -- report ---------------------------------------------------------------------------------------------

@dataclass
class ImportReport:
    """What one run did; ``failures`` lists ``(file, reason)`` for the files that failed in this run."""

    importer: str
    files_seen: int = 0
    files_imported: int = 0
    files_failed: int = 0
    files_skipped: int = 0      # processed by an earlier run
    keys_inserted: int = 0
    keys_revised: int = 0
    keys_rejected: int = 0      # failed validation; never stored
    keys_skipped: int = 0       # already stored, revoked primary keys, revisions of keys from elsewhere
    failures: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"importer": self.importer, "files_seen": self.files_seen, "files_imported": self.files_imported,
                "files_failed": self.files_failed, "files_skipped": self.files_skipped,
                "keys_inserted": self.keys_inserted, "keys_revised": self.keys_revised,
                "keys_rejected": self.keys_rejected, "keys_skipped": self.keys_skipped}

    def fail(self, filename: str, reason: str) -> None:
        self.files_failed += 1
        self.failures.append((filename, reason))

    def error(self) -> ExportImportError | None:
        if not self.failures:
            return None
        # Bounded, so a partner serving an error page as its index does not produce a message of thousands of lines.
        details = "; ".join(f"{name[:200]}: {reason}" for name, reason in self.failures[:MAX_REPORTED_FAILURES])
        if len(self.failures) > MAX_REPORTED_FAILURES:
            details += f"; and {len(self.failures) - MAX_REPORTED_FAILURES} more"
        return ExportImportError(f"importer {self.importer!r}: {self.files_failed} of {self.files_seen} file(s) "
                                 f"failed: {details}", self)


# -- one file -------------------------------------------------------------------------------------------

@dataclass
class _Verified:
    primary: list[Exposure]
    revised: list[Exposure]
    rejected: int
    negative: int  # revoked primary keys: valid, but never stored (as in a publish)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# Registered keys by (verification_key_id, verification_key_version).
_KeyTable = dict[tuple[str, str], tuple[importer_db.ImporterKey, PublicKey]]


def _check_signatures(parsed: ParsedExport, keys: _KeyTable, now: datetime) -> str | None:
    """None if a signature verifies with the registered key its SignatureInfo names, else why not."""
    if not parsed.signatures:
        return "unsigned: export.sig holds no signatures" if parsed.has_sig else "unsigned: no export.sig"
    reasons = []
    for index, sig in enumerate(parsed.signatures):
        info = sig.signature_info
        label = f"key id {info.verification_key_id!r} version {info.verification_key_version!r}"
        found = keys.get((info.verification_key_id, info.verification_key_version))
        if found is None:
            reasons.append(f"signature {index} names {label}, which is not registered")
            continue
        key, public_key = found
        if not key.is_valid_at(now):
            reasons.append(f"signature {index}: registered {label} is not valid at {now.isoformat()}")
            continue
        # Only this signature against only its named key: a key registered under another name must not count.
        if verify_export(replace(parsed, signatures=[sig]), {label: public_key}):
            return None
        reasons.append(f"signature {index} does not verify with registered {label} (altered file or wrong key)")
    return "no valid signature by a registered key: " + "; ".join(reasons)


def _convert(parsed: ParsedExport, importer: importer_db.Importer, settings: Settings, now: datetime) -> _Verified:
    regions = tuple(importer.regions) or ((parsed.region,) if parsed.region else ())
    out = _Verified(primary=[], revised=[], rejected=0, negative=0)
    for keys, target in ((parsed.keys, out.primary), (parsed.revised_keys, out.revised)):
        for k in keys:
            foreign = ForeignKey(key=k.key_data, transmission_risk=k.transmission_risk,
                                 interval_number=k.interval_number, interval_count=k.interval_count,
                                 report_type=k.report_type, days_since_onset=k.dsos, regions=regions,
                                 traveler=importer.traveler)
            try:
                target.append(to_exposure(foreign, settings=settings, now=now, export_import_id=importer.id))
            except ValueError:
                out.rejected += 1
    out.negative = sum(1 for e in out.primary if e.report_type == REPORT_TYPE_NEGATIVE)
    return out


def _store(conn: Connection, importer: importer_db.Importer, filename: str, sha256: str, data: _Verified,
           settings: Settings, now: datetime) -> tuple[int, int, int, int]:
    """Record the file COMPLETE and store its keys in one transaction; returns the four counts."""
    with conn.begin():
        file_id = importer_db.record_import_file(conn, importer.id, filename, status=importer_db.STATUS_COMPLETE,
                                                 processed_at=now, sha256=sha256)
        for e in data.primary:
            e.import_file_id = file_id  # known only now; the rows were built before the transaction
        counts = store_foreign_keys(
            conn, data.primary, data.revised, same_source=lambda stored: stored.export_import_id == importer.id,
            revised_at=truncate(now, settings.truncate_window),
            revised_provenance={"revised_import_file_id": file_id})
        skipped = counts.skipped + data.negative
        importer_db.set_import_file_counts(conn, file_id, inserted=counts.inserted, revised=counts.revised,
                                           rejected=data.rejected, skipped=skipped)
    return counts.inserted, counts.revised, data.rejected, skipped


def _refuse(conn: Connection, importer: importer_db.Importer, filename: str, sha256: str | None, reason: str,
            now: datetime, report: ImportReport) -> None:
    """Record the file FAILED for good; none of its keys are stored."""
    with conn.begin():
        importer_db.record_import_file(conn, importer.id, filename, status=importer_db.STATUS_FAILED,
                                       processed_at=now, sha256=sha256, error=reason)
    logger.warning("importer %s: %s: FAILED, nothing stored: %s", importer.name, filename, reason)
    report.fail(filename, reason)


# -- the run --------------------------------------------------------------------------------------------

def _public_keys(importer: importer_db.Importer) -> _KeyTable:
    out: _KeyTable = {}
    for key in importer.keys:
        try:
            out[(key.key_id, key.key_version)] = (key, load_public_key(key.public_key_pem))
        except ValueError as exc:  # the CLI checks keys; a row edited by hand must not stop the other keys
            logger.warning("importer %s: key %s/%s is unusable and ignored: %s", importer.name, key.key_id,
                           key.key_version, exc)
    return out


def import_exports(settings: Settings, engine: Engine, importer: str, now: datetime, *, fetch: Fetch | None = None,
                   retry_failed: bool = False) -> ImportReport:
    """Import the files of ``importer``'s index not processed before (see the module docstring).

    Raises ExportImportError (ImporterBusy if another run holds the lock) if the importer is unknown or disabled,
    the index cannot be read, or any file failed; in the last case after every other file was processed, with the
    report attached.
    """
    fetch = fetch or default_fetch(settings)
    with engine.connect() as conn:
        with conn.begin():
            row = importer_db.get_importer(conn, importer)
        if row is None:
            raise ExportImportError(f"no importer named {importer!r}")
        if row.disabled:
            raise ExportImportError(f"importer {importer!r} is disabled")
        with conn.begin():
            locked = importer_db.try_lock_importer(conn, row.id)
        if not locked:
            raise ImporterBusy(f"importer {importer!r} is already running elsewhere; try again later")
        try:
            report = _run(conn, engine, row, settings, now, fetch, retry_failed)
        finally:
            _unlock(conn, row.id)
    error = report.error()
    if error is not None:
        raise error
    return report


def _unlock(conn: Connection, importer_id: int) -> None:
    try:
        if conn.in_transaction():
            conn.rollback()
        with conn.begin():
            importer_db.unlock_importer(conn, importer_id)
    except Exception:
        # A pooled connection must not keep the lock: closing it for good releases it.
        logger.exception("could not release the run lock of importer %s; discarding the connection", importer_id)
        conn.invalidate()


def _run(conn: Connection, engine: Engine, importer: importer_db.Importer, settings: Settings, now: datetime,
         fetch: Fetch, retry_failed: bool) -> ImportReport:
    report = ImportReport(importer=importer.name)
    try:
        body = fetch(importer.index_url, MAX_INDEX_BYTES)
        entries, refused = parse_index(body)
    except (FetchError, FileTooLarge, ValueError) as exc:
        raise ExportImportError(f"importer {importer.name!r}: cannot read index {importer.index_url}: "
                                f"{_one_line(str(exc))}", report) from None
    report.files_seen = len(entries) + len(refused)
    for line, reason in refused:
        logger.warning("importer %s: %r: refused, %s", importer.name, line, reason)
        report.fail(line, reason)
    with conn.begin():
        done = importer_db.processed_files(conn, importer.id)
    keys = _public_keys(importer)
    guard = PartitionGuard(engine)
    for entry in entries:
        status = done.get(entry)
        if status == importer_db.STATUS_COMPLETE or (status == importer_db.STATUS_FAILED and not retry_failed):
            report.files_skipped += 1
            continue
        url = resolve_entry(importer.index_url, entry, importer.export_root)
        _import_file(conn, guard, importer, entry, url, keys, settings, now, fetch, report)
    return report


def _import_file(conn: Connection, guard: PartitionGuard, importer: importer_db.Importer, entry: str, url: str,
                 keys: _KeyTable, settings: Settings, now: datetime, fetch: Fetch, report: ImportReport) -> None:
    try:
        data = fetch(url, settings.importer_max_file_bytes)
    except FetchError as exc:
        reason = f"download failed, will retry: {_one_line(str(exc))}"
        logger.warning("importer %s: %s: %s", importer.name, entry, reason)
        report.fail(entry, reason)
        return
    except FileTooLarge as exc:
        _refuse(conn, importer, entry, None, f"file too large: {_one_line(str(exc))}", now, report)
        return
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        parsed = read_export(data)
    except ValueError as exc:
        _refuse(conn, importer, entry, sha256, f"not a readable export file: {_one_line(str(exc))}", now, report)
        return
    reason = _check_signatures(parsed, keys, now)
    if reason is not None:
        _refuse(conn, importer, entry, sha256, reason, now, report)
        return
    converted = _convert(parsed, importer, settings, now)
    guard.ensure(e.created_at for e in converted.primary)
    inserted, revised, rejected, skipped = _store(conn, importer, entry, sha256, converted, settings, now)
    report.files_imported += 1
    report.keys_inserted += inserted
    report.keys_revised += revised
    report.keys_rejected += rejected
    report.keys_skipped += skipped
    logger.info("importer %s: %s: COMPLETE, region %s, file has %d key(s) + %d revised: %d inserted, %d revised, "
                "%d rejected, %d skipped", importer.name, entry, parsed.region or "-", len(parsed.keys),
                len(parsed.revised_keys), inserted, revised, rejected, skipped)
