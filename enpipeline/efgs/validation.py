"""EFGS's rules for an uploaded key, its days-since-onset encoding, and the mapping between its keys and ours.

The gateway refuses a whole batch for one invalid key (the signature covers all of them, efgs#233), so every key
is checked here first, with EFGS's own limits and a safety margin where its clock could disagree with ours.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

from enpipeline.federation.foreign import ForeignKey, normalize_regions
from enpipeline.model import (
    REPORT_TYPE_CONFIRMED,
    REPORT_TYPE_LIKELY,
    REPORT_TYPE_SELF_REPORT,
)
from enpipeline.timeutil import INTERVALS_PER_DAY, interval_number, utc_midnight

if TYPE_CHECKING:  # the generated module loads only when keys are built
    from enpipeline.proto import efgs_pb2

MAX_UPLOAD_KEYS = 5000                 # the gateway's maximum-upload-batch-size (413 above)
KEY_LENGTH = 16
TRL_NOT_PROVIDED = 0x7FFFFFFF          # EFGS's "no transmission risk level"
MAX_KEY_AGE_DAYS = 15                  # rolling start >= (today - 15 days), today being the gateway's UTC day
# The gateway checks with its clock when our upload arrives; a key on the edge of its window could turn invalid
# in between and sink the batch. Keys within this margin of the edge are held back instead.
CLOCK_MARGIN = timedelta(minutes=10)
COUNTRY_RE = re.compile(r"[A-Z]{2}")

# Report types: the proto enum (the same numbers as our federation.proto).
UNKNOWN, CONFIRMED_TEST, CONFIRMED_CLINICAL_DIAGNOSIS, SELF_REPORT, RECURSIVE, REVOKED = range(6)
REPORT_TYPE_TO_EFGS = {REPORT_TYPE_CONFIRMED: CONFIRMED_TEST, REPORT_TYPE_LIKELY: CONFIRMED_CLINICAL_DIAGNOSIS,
                       REPORT_TYPE_SELF_REPORT: SELF_REPORT, "": UNKNOWN}

# -- days since onset of symptoms ----------------------------------------------------------------------------
# Each symptom status owns a value range (DP-3T's encoding, used by every EFGS country):
#   symptomatic, onset known:            d            d in [-14, 14]
#   symptomatic, onset within n days:    n*100 + d    n in 1..19
#   symptomatic, onset unknown:          2000 + d     d counted from the submission
#   asymptomatic:                        3000 + d     d counted from the submission
#   symptom status unknown:              4000 + d     d counted from the submission
EXACT, RANGE, ONSET_UNKNOWN, ASYMPTOMATIC, STATUS_UNKNOWN, INVALID = (
    "exact", "range", "onset_unknown", "asymptomatic", "status_unknown", "invalid")
DSOS_SPREAD = 14
_ZERO_POINTS = {2000: ONSET_UNKNOWN, 3000: ASYMPTOMATIC, 4000: STATUS_UNKNOWN}


class Dsos(NamedTuple):
    """A decoded days_since_onset_of_symptoms: its kind, the day offset within its range, the range's length."""

    kind: str
    offset: int | None = None
    range_days: int | None = None

    @property
    def days_since_onset(self) -> int | None:
        """What our exposure row can hold: a known onset only. Every other kind has no onset day to store; an
        onset range's anchor day is not the onset, and a submission-relative offset is not one either."""
        return self.offset if self.kind == EXACT else None


def decode_dsos(value: int) -> Dsos:
    """Which of EFGS's DSOS ranges ``value`` lies in, and where."""
    if -DSOS_SPREAD <= value <= DSOS_SPREAD:
        return Dsos(EXACT, value)
    zero = (value + DSOS_SPREAD) // 100 * 100 if value > 0 else 0
    if zero and abs(value - zero) <= DSOS_SPREAD:
        if zero in _ZERO_POINTS:
            return Dsos(_ZERO_POINTS[zero], value - zero)
        if 100 <= zero <= 1900:
            return Dsos(RANGE, value - zero, zero // 100)
    return Dsos(INVALID)


def encode_dsos(days_since_onset: int | None, *, rolling_start: int, submitted: datetime) -> int:
    """EFGS's DSOS for one of our keys: the known onset as is, else "symptom status unknown" (4000) plus the
    key's day relative to the submission day (our keys do not record whether the person had symptoms)."""
    if days_since_onset is not None and abs(days_since_onset) <= DSOS_SPREAD:
        return days_since_onset
    offset = rolling_start // INTERVALS_PER_DAY - interval_number(submitted) // INTERVALS_PER_DAY
    return 4000 + max(-DSOS_SPREAD, min(DSOS_SPREAD, offset))


# -- upload --------------------------------------------------------------------------------------------------

def rolling_start_bounds(now: datetime) -> tuple[int, int]:
    """The rolling start numbers the gateway will accept when our upload reaches it, with the clock margin."""
    earliest = interval_number(utc_midnight(now + CLOCK_MARGIN) - timedelta(days=MAX_KEY_AGE_DAYS))
    return earliest, interval_number(now) + 1


def check_upload_key(key: efgs_pb2.DiagnosisKey, *, country: str, bounds: tuple[int, int]) -> str | None:
    """Why the gateway would refuse ``key`` (and with it the whole batch), or None when it is fine."""
    if len(key.keyData) != KEY_LENGTH:
        return f"key data is {len(key.keyData)} bytes, EFGS takes {KEY_LENGTH}"
    earliest, latest = bounds
    if not earliest <= key.rollingStartIntervalNumber <= latest:
        return (f"rolling start {key.rollingStartIntervalNumber} is outside EFGS's window {earliest}..{latest}"
                " (today - 15 days .. now)")
    if not 1 <= key.rollingPeriod <= INTERVALS_PER_DAY:
        return f"rolling period {key.rollingPeriod} is not 1..{INTERVALS_PER_DAY}"
    trl = key.transmissionRiskLevel
    if not (0 <= trl <= 8 or trl == TRL_NOT_PROVIDED):
        return f"transmission risk level {trl} is not 0..8 (or 0x7FFFFFFF)"
    if key.origin != country:
        return f"origin {key.origin!r} is not the certificate's country {country!r}"
    if not UNKNOWN <= key.reportType <= REVOKED:
        return f"report type {key.reportType} is not an EFGS report type"
    if decode_dsos(key.days_since_onset_of_symptoms).kind == INVALID:
        return f"days since onset {key.days_since_onset_of_symptoms} is in none of EFGS's ranges"
    bad = [c for c in key.visitedCountries if not COUNTRY_RE.fullmatch(c)]
    if bad:
        return f"visited countries {bad} are not ISO 3166 alpha-2 codes"
    return None


def visited_countries(regions: Sequence[str], country: str) -> list[str]:
    """Our key's regions that are countries other than the origin ("countries of interest")."""
    return sorted({r.strip().upper() for r in regions if COUNTRY_RE.fullmatch(r.strip().upper())} - {country})


class PushRow(NamedTuple):
    """One of our keys as push reads it: the values a revision set, where it set them."""

    exposure_key: bytes
    transmission_risk: int
    interval_number: int
    interval_count: int
    report_type: str
    days_since_onset: int | None
    regions: tuple[str, ...]
    created_at: datetime


def to_efgs_key(row: PushRow, country: str) -> efgs_pb2.DiagnosisKey:
    """Our key as EFGS's DiagnosisKey; raises ValueError for a report type EFGS has no value for."""
    from enpipeline.proto import efgs_pb2

    if row.report_type not in REPORT_TYPE_TO_EFGS:
        raise ValueError(f"report type {row.report_type!r} is not uploaded")
    return efgs_pb2.DiagnosisKey(
        keyData=row.exposure_key, rollingStartIntervalNumber=row.interval_number,
        rollingPeriod=row.interval_count, transmissionRiskLevel=row.transmission_risk,
        visitedCountries=visited_countries(row.regions, country), origin=country,
        reportType=REPORT_TYPE_TO_EFGS[row.report_type],  # type: ignore[arg-type]
        days_since_onset_of_symptoms=encode_dsos(row.days_since_onset, rolling_start=row.interval_number,
                                                 submitted=row.created_at))


# -- download ------------------------------------------------------------------------------------------------

def foreign_key(key: efgs_pb2.DiagnosisKey, our_country: str) -> ForeignKey:
    """A downloaded key as the shared foreign-key validation takes it (to_exposure applies our publish rules).

    "Not provided" risk becomes 0, which to_exposure fills from the report type; the DSOS is decoded and only a
    known onset is kept. The key's regions are its origin and visited countries; it is a traveler's key when the
    person said they visited us.
    """
    trl = key.transmissionRiskLevel
    return ForeignKey(key=bytes(key.keyData), transmission_risk=0 if trl == TRL_NOT_PROVIDED else trl,
                      interval_number=key.rollingStartIntervalNumber, interval_count=key.rollingPeriod,
                      report_type=int(key.reportType),
                      days_since_onset=decode_dsos(key.days_since_onset_of_symptoms).days_since_onset,
                      regions=tuple(normalize_regions([*key.visitedCountries, key.origin])),
                      traveler=our_country in key.visitedCountries)
