"""Domain types shared by publish, verification, revision tokens and storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

REPORT_TYPE_CONFIRMED = "confirmed"
REPORT_TYPE_LIKELY = "likely"
REPORT_TYPE_NEGATIVE = "negative"
REPORT_TYPE_SELF_REPORT = "user-report"
VALID_REPORT_TYPES = frozenset(
    {REPORT_TYPE_CONFIRMED, REPORT_TYPE_LIKELY, REPORT_TYPE_NEGATIVE, REPORT_TYPE_SELF_REPORT}
)

# TR backfill when a key arrives with transmissionRisk 0 (reference: publish transform).
TRANSMISSION_RISK_BY_REPORT_TYPE = {
    REPORT_TYPE_CONFIRMED: 2,
    REPORT_TYPE_LIKELY: 4,
    REPORT_TYPE_NEGATIVE: 6,
}


@dataclass(frozen=True)
class ExposureKeyInput:
    """One TEK as the app sent it; ``key`` is the base64 string exactly as received."""

    key: str
    rolling_start_number: int = 0
    rolling_period: int = 0
    transmission_risk: int = 0


@dataclass(frozen=True)
class PublishRequest:
    """The v1 publish body after JSON decoding (field names are the reference's)."""

    keys: tuple[ExposureKeyInput, ...] = ()
    health_authority_id: str = ""
    # The certificate, the HMAC secret and the revision token are credentials: never in a repr (or a log).
    verification_payload: str = field(default="", repr=False)
    hmac_key: str = field(default="", repr=False)
    symptom_onset_interval: int = 0
    traveler: bool = False
    revision_token: str = field(default="", repr=False)
    padding: str = field(default="", repr=False)


@dataclass(frozen=True)
class AuthorizedApp:
    app_package_name: str
    allowed_regions: tuple[str, ...] = ()
    allowed_health_authority_ids: tuple[int, ...] = ()
    bypass_health_authority_verification: bool = False
    bypass_revision_token: bool = False


@dataclass(frozen=True)
class VerifiedClaims:
    """What a valid verification certificate tells us."""

    health_authority_id: int
    report_type: str
    symptom_onset_interval: int = 0


@dataclass
class Exposure:
    """A row of the exposure table."""

    exposure_key: bytes
    transmission_risk: int
    app_package_name: str
    regions: list[str]
    traveler: bool
    interval_number: int
    interval_count: int
    created_at: datetime
    local_provenance: bool = True
    health_authority_id: int | None = None
    report_type: str = ""
    days_since_symptom_onset: int | None = None
    revised_report_type: str | None = None
    revised_at: datetime | None = None
    revised_days_since_symptom_onset: int | None = None
    revised_transmission_risk: int | None = None
    sync_id: int | None = None
    sync_query_id: str | None = None
    export_import_id: int | None = None
    import_file_id: int | None = None
    revised_import_file_id: int | None = None
    padding_seq: int | None = None  # only export padding keys: see sql/0003


@dataclass(frozen=True)
class RevisableKey:
    """One entry of a revision token."""

    key: bytes
    interval_number: int
    interval_count: int


@dataclass
class PublishResult:
    inserted: int = 0
    revised: int = 0
    dropped: int = 0
    revision_token: str = field(default="", repr=False)
    warnings: list[str] = field(default_factory=list)
    partial_failure: str = ""
