"""All enpipeline settings, read from ``ENP_*`` environment variables and validated in one place."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from enpipeline.blobstore import parse_blobstore_url
from enpipeline.durations import parse_duration

# The reference's floor for CLEANUP_TTL: exports must stay listed long enough for every phone to fetch them.
MIN_RETENTION = timedelta(days=10)


class ConfigError(Exception):
    """One or more settings are missing or invalid; the message names every offending variable."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _secret(default: Any = None) -> Any:
    return field(default=default, repr=False, metadata={"secret": True})


@dataclass(frozen=True)
class Settings:
    """Validated settings. Field ``foo_bar`` is read from ``ENP_FOO_BAR``."""

    # Deployment
    env: str = "local"  # local | production
    database_url: str = field(default="", repr=False)
    var_dir: Path = Path("var")
    db_pool_size: int = 10
    db_pool_max_overflow: int = 10
    db_connect_timeout: timedelta = timedelta(seconds=10)

    # Publish API (names and defaults are the reference server's)
    maintenance_mode: bool = False
    max_keys_on_publish: int = 30
    max_same_start_interval_keys: int = 3
    max_interval_age_on_publish: timedelta = timedelta(hours=360)
    truncate_window: timedelta = timedelta(hours=1)
    max_symptom_onset_days: int = 14
    max_valid_symptom_onset_report_days: int = 28
    default_symptom_onset_days_ago: int = 4
    debug_release_same_day_keys: bool = False
    response_padding_min_bytes: int = 1024
    response_padding_range: int = 1024
    allow_partial_revisions: bool = False
    default_region: str = ""
    chaff_request_max_latency_ms: int = 1000
    authorized_app_cache_duration: timedelta = timedelta(minutes=5)
    verification_cache_duration: timedelta = timedelta(minutes=5)
    max_body_bytes: int = 64_000
    # The whole body must arrive within this (under gunicorn), else 408: a slow or stalled client cannot hold
    # a worker (sync) or a thread (gthread) for longer. Keep it below gunicorn's 30 s worker timeout.
    body_read_timeout: timedelta = timedelta(seconds=10)

    # Health-authority keys synced from a jwks_uri (reference: REQUEST_TIMEOUT, HEALTH_AUTHORITY_KEY_CLEANUP_TTL)
    jwks_request_timeout: timedelta = timedelta(seconds=30)
    jwks_max_bytes: int = 262_144
    health_authority_key_cleanup_ttl: timedelta = timedelta(days=30)

    # Revision tokens
    revision_token_min_length: int = 28
    revision_key_cache_duration: timedelta = timedelta(minutes=1)
    revision_token_aad: bytes = _secret(b"")
    revision_token_kek: bytes = _secret(b"")
    revision_new_key_period: timedelta = timedelta(days=7)
    revision_delete_old_key_period: timedelta = timedelta(days=15)

    # Storage layout
    partition_days_ahead: int = 3
    retention: timedelta = timedelta(days=14)
    # Retention below 10 days is refused (phones need the files that long) unless this is set, for tests.
    debug_override_cleanup_min_duration: bool = False
    cleanup_schedule: str = "0 0 * * *"
    jwks_sync_schedule: str = "*/5 * * * *"

    # Federation (pull from partners, serve partners, import partners' export files)
    federation_pull_schedule: str = "*/15 * * * *"
    federation_page_size: int = 500                      # most keys the server puts in one Fetch response
    federation_audience: str = "https://exposure-notifications-server/federation"  # aud we accept by default
    federation_token_lifetime: timedelta = timedelta(minutes=5)  # of the bearer JWTs we sign
    federation_max_token_lifetime: timedelta = timedelta(hours=1)  # longest exp - iat we accept
    federation_rpc_timeout: timedelta = timedelta(seconds=60)     # per Fetch call, client side
    federation_max_pull_duration: timedelta = timedelta(minutes=10)  # one pull stops (resumably) after this
    federation_store_batch: int = 5000                   # most pulled keys stored in one transaction
    federation_accept_self_report: bool = False          # pulled SELF_REPORT keys are dropped unless set
    federation_accept_recursive: bool = False            # pulled RECURSIVE keys are dropped unless set
    importer_request_timeout: timedelta = timedelta(seconds=60)
    importer_max_file_bytes: int = 64 * 1024 * 1024

    # EFGS (the EU Federation Gateway Service): push our keys, pull other countries' keys
    efgs_push_schedule: str = "0 * * * *"                # cron of en_federation_push (a data-interval timetable)
    efgs_pull_schedule: str = "*/30 * * * *"             # cron of en_efgs_pull
    efgs_push_delay: timedelta = timedelta(hours=1)      # a run for [S, E) pushes keys created in [S - d, E - d)
    efgs_upload_batch_size: int = 5000                   # keys per upload; the gateway refuses more than 5000
    efgs_request_timeout: timedelta = timedelta(seconds=60)

    # Blob storage for export files: file://PATH (relative or absolute), memory:// or gs://
    blobstore: str = "file://var/blobs"

    # Export (names as in the issue; defaults are the reference's)
    export_min_records: int = 1000
    export_padding_range: int = 100
    export_max_records: int = 500_000
    export_min_window_age: timedelta = timedelta(hours=2)
    export_schedule: str = "0 * * * *"
    export_zip_compresslevel: int = 6

    # Export signing keys: filesystem (PEM files under key_dir) or gcpkms (Cloud KMS key ring)
    key_manager: str = "filesystem"
    key_dir: Path = Path("var/keys")
    kms_key_ring: str = ""

    def __repr__(self) -> str:  # secrets never reach logs
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr and not f.metadata.get("secret")
        )
        return f"Settings({shown})"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def is_production(self) -> bool:
        return self.env == "production"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(name: str, raw: str, kind: Any) -> Any:
    if kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{name} must be true or false, got {raw!r}")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if kind is timedelta:
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if kind is bytes:
        try:
            return base64.b64decode(raw.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{name} must be standard base64") from None
    if kind is Path:
        return Path(raw)
    return raw


_KINDS = {"bool": bool, "int": int, "timedelta": timedelta, "bytes": bytes, "Path": Path, "str": str}


def env_name(field_name: str) -> str:
    return "ENP_" + field_name.upper()


def load_settings(environ: Mapping[str, str] | None = None, *, require_database: bool = True,
                  **overrides: Any) -> Settings:
    """Read every ``ENP_*`` variable, validate, and report all problems at once."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        name = env_name(f.name)
        if name not in environ:
            continue
        try:
            values[f.name] = _convert(name, environ[name], _KINDS[str(f.type)])
        except ValueError as exc:
            problems.append(str(exc))
    # Local state defaults follow ENP_VAR_DIR, so one variable moves all of it.
    var_dir = values.get("var_dir", Settings.var_dir)
    values.setdefault("key_dir", Path(var_dir) / "keys")
    values.setdefault("blobstore", f"file://{Path(var_dir) / 'blobs'}")
    settings = Settings(**values)
    problems.extend(_validate(settings, require_database))
    if problems:
        raise ConfigError(problems)
    return settings


_KMS_KEY_RING = re.compile(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+")


def _validate(s: Settings, require_database: bool) -> list[str]:
    problems = []
    if s.env not in ("local", "production"):
        problems.append(f"ENP_ENV must be local or production, got {s.env!r}")
    if require_database and not s.database_url:
        problems.append("ENP_DATABASE_URL is not set (e.g. postgresql://user@host:5432/dbname)")
    elif s.database_url and not s.database_url.startswith(("postgresql://", "postgresql+psycopg2://", "postgres://")):
        problems.append("ENP_DATABASE_URL must be a postgresql:// URL")
    positive = ["max_keys_on_publish", "max_same_start_interval_keys", "max_symptom_onset_days",
                "max_valid_symptom_onset_report_days", "revision_token_min_length", "max_body_bytes",
                "db_pool_size", "jwks_max_bytes"]
    for name in positive:
        if getattr(s, name) <= 0:
            problems.append(f"{env_name(name)} must be > 0")
    non_negative = ["default_symptom_onset_days_ago", "response_padding_min_bytes", "response_padding_range",
                    "chaff_request_max_latency_ms", "db_pool_max_overflow", "partition_days_ahead"]
    for name in non_negative:
        if getattr(s, name) < 0:
            problems.append(f"{env_name(name)} must be >= 0")
    if s.export_min_records < 0 or s.export_padding_range < 0:
        problems.append("ENP_EXPORT_MIN_RECORDS and ENP_EXPORT_PADDING_RANGE must be >= 0")
    if s.export_max_records <= 0:
        problems.append("ENP_EXPORT_MAX_RECORDS must be > 0")
    if s.export_min_window_age < timedelta(0):
        problems.append("ENP_EXPORT_MIN_WINDOW_AGE must not be negative")
    if len(s.export_schedule.split()) != 5:
        problems.append(f"ENP_EXPORT_SCHEDULE must be a 5-field cron expression, got {s.export_schedule!r}")
    if not 0 <= s.export_zip_compresslevel <= 9:
        problems.append("ENP_EXPORT_ZIP_COMPRESSLEVEL must be 0..9")
    if s.retention < MIN_RETENTION and not s.debug_override_cleanup_min_duration:
        problems.append(f"ENP_RETENTION {s.retention} is less than the minimum {MIN_RETENTION.days}d "
                        "(set ENP_DEBUG_OVERRIDE_CLEANUP_MIN_DURATION=true only for tests)")
    if s.retention <= timedelta(0):
        problems.append("ENP_RETENTION must be a positive duration")
    if not 1 <= s.federation_page_size <= 100_000:
        problems.append("ENP_FEDERATION_PAGE_SIZE must be 1..100000")
    if s.federation_store_batch < 1:
        problems.append("ENP_FEDERATION_STORE_BATCH must be >= 1")
    for name in ("federation_token_lifetime", "federation_max_token_lifetime", "federation_rpc_timeout",
                 "federation_max_pull_duration", "importer_request_timeout"):
        if getattr(s, name) <= timedelta(0):
            problems.append(f"{env_name(name)} must be a positive duration")
    if s.federation_token_lifetime > s.federation_max_token_lifetime:
        problems.append("ENP_FEDERATION_TOKEN_LIFETIME must not exceed ENP_FEDERATION_MAX_TOKEN_LIFETIME")
    if s.importer_max_file_bytes <= 0:
        problems.append("ENP_IMPORTER_MAX_FILE_BYTES must be > 0")
    if not 1 <= s.efgs_upload_batch_size <= 5000:
        problems.append("ENP_EFGS_UPLOAD_BATCH_SIZE must be 1..5000 (the gateway's maximum-upload-batch-size)")
    if s.efgs_request_timeout <= timedelta(0):
        problems.append("ENP_EFGS_REQUEST_TIMEOUT must be a positive duration")
    if s.efgs_push_delay < s.truncate_window:
        # Keys are stamped with created_at truncated to the window: a younger window may still receive keys.
        problems.append("ENP_EFGS_PUSH_DELAY must be at least ENP_TRUNCATE_WINDOW")
    for name in ("cleanup_schedule", "jwks_sync_schedule", "federation_pull_schedule", "efgs_push_schedule",
                 "efgs_pull_schedule"):
        if len(getattr(s, name).split()) != 5:
            problems.append(f"{env_name(name)} must be a 5-field cron expression, got {getattr(s, name)!r}")
    if s.truncate_window <= timedelta(0):
        problems.append("ENP_TRUNCATE_WINDOW must be a positive duration")
    if s.max_interval_age_on_publish <= timedelta(0):
        problems.append("ENP_MAX_INTERVAL_AGE_ON_PUBLISH must be a positive duration")
    if s.jwks_request_timeout <= timedelta(0):
        problems.append("ENP_JWKS_REQUEST_TIMEOUT must be a positive duration")
    if not timedelta(0) < s.body_read_timeout < timedelta(seconds=30):
        problems.append("ENP_BODY_READ_TIMEOUT must be > 0 and below gunicorn's 30 s worker timeout")
    if s.health_authority_key_cleanup_ttl <= timedelta(0):
        problems.append("ENP_HEALTH_AUTHORITY_KEY_CLEANUP_TTL must be a positive duration")
    if not timedelta(0) < s.revision_key_cache_duration <= timedelta(minutes=60):
        problems.append("ENP_REVISION_KEY_CACHE_DURATION must be > 0 and <= 60m")
    try:
        parse_blobstore_url(s.blobstore, setting="ENP_BLOBSTORE")
    except ValueError as exc:
        problems.append(str(exc))
    if s.key_manager not in ("filesystem", "gcpkms"):
        problems.append(f"ENP_KEY_MANAGER must be filesystem or gcpkms, got {s.key_manager!r}")
    if s.key_manager == "gcpkms" and not _KMS_KEY_RING.fullmatch(s.kms_key_ring):
        problems.append("ENP_KMS_KEY_RING must be projects/<project>/locations/<location>/keyRings/<ring> "
                        f"when ENP_KEY_MANAGER=gcpkms, got {s.kms_key_ring!r}")
    if s.revision_token_kek and len(s.revision_token_kek) != 32:
        problems.append("ENP_REVISION_TOKEN_KEK must be 32 bytes (base64 of an AES-256 key)")
    if s.is_production:
        if not s.revision_token_kek:
            problems.append("ENP_REVISION_TOKEN_KEK is required in production (base64 of 32 random bytes)")
        if not s.revision_token_aad:
            problems.append("ENP_REVISION_TOKEN_AAD is required in production (base64)")
    return problems


def with_local_secrets(settings: Settings) -> Settings:
    """Fill revision-token secrets for the local default, generated once and kept under ``var_dir``.

    Production never gets here: ``load_settings`` already refused to start without them.
    """
    if settings.revision_token_kek and settings.revision_token_aad:
        return settings
    if settings.is_production:
        raise ConfigError(["ENP_REVISION_TOKEN_KEK and ENP_REVISION_TOKEN_AAD are required in production"])
    secrets_dir = settings.var_dir / "secrets"
    kek = settings.revision_token_kek or _read_or_create(secrets_dir / "revision-token-kek", 32)
    aad = settings.revision_token_aad or _read_or_create(secrets_dir / "revision-token-aad", 16)
    return settings.replace(revision_token_kek=kek, revision_token_aad=aad)


def _read_or_create(path: Path, size: int) -> bytes:
    if path.exists():
        return base64.b64decode(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)  # mkdir's mode is subject to the umask, and an existing directory keeps its own
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    # A temporary file left by a crash keeps its mode through O_CREAT: start from a new one, made 0600.
    tmp.unlink(missing_ok=True)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(base64.b64encode(os.urandom(size)).decode())
    # link() fails if the file exists, so two processes starting at once agree on one secret.
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return base64.b64decode(path.read_text().strip())
