"""Turn a v1 publish request into exposure rows, applying every validation rule of the reference."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from enpipeline.config import Settings
from enpipeline.errors import CODE_BAD_REQUEST, PublishError
from enpipeline.model import (
    REPORT_TYPE_NEGATIVE,
    TRANSMISSION_RISK_BY_REPORT_TYPE,
    Exposure,
    ExposureKeyInput,
    PublishRequest,
    VerifiedClaims,
)
from enpipeline.timeutil import (
    INTERVALS_PER_DAY,
    days_between,
    interval_number,
    time_of_interval,
    truncate,
    utc_midnight,
)
from enpipeline.verification import decode_lenient_base64

KEY_LENGTH = 16
MIN_TRANSMISSION_RISK = 0
MAX_TRANSMISSION_RISK = 8


def format_multierror(errors: list[str]) -> str:
    """hashicorp/go-multierror's list format, which the reference puts in the `error` field."""
    if len(errors) == 1:
        return f"1 error occurred:\n\t* {errors[0]}\n\n"
    points = "\n\t".join(f"* {e}" for e in errors)
    return f"{len(errors)} errors occurred:\n\t{points}\n\n"


@dataclass
class TransformResult:
    exposures: list[Exposure] = field(default_factory=list)
    # Per-key failures: the keys were dropped; the publish still succeeds with partial_failure.
    key_errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def symptom_onset(request_onset: int, claims: VerifiedClaims | None, settings: Settings, now: datetime) -> int:
    """The onset interval used for days-since-onset: request value, else certificate, else a default."""
    current = interval_number(now)
    min_onset = interval_number(utc_midnight(now - timedelta(days=settings.max_valid_symptom_onset_report_days)))
    onset = 0
    if min_onset <= request_onset < current:
        onset = request_onset
    elif claims is not None and min_onset <= claims.symptom_onset_interval < current:
        onset = claims.symptom_onset_interval
    if onset == 0 or abs(days_between(onset, current)) > settings.max_valid_symptom_onset_report_days:
        onset = interval_number(now - timedelta(days=settings.default_symptom_onset_days_ago))
    return onset


def _validate_key(index: int, key: ExposureKeyInput, settings: Settings, now: datetime) -> tuple[bytes, datetime]:
    """Check one key in the reference's order; returns its bytes and created_at or raises ValueError."""
    try:
        raw = decode_lenient_base64(key.key)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return raw, validate_key_fields(raw, key.rolling_start_number, key.rolling_period, key.transmission_risk,
                                    settings, now)


@dataclass(frozen=True)
class KeyRules:
    """The per-key publish rules for one ``now``: a federation page or an imported file checks thousands of keys
    against the same bounds, so they are computed once (``key_rules``) and ``check`` only compares."""

    min_interval: int            # a key must still be valid after this interval
    current: int                 # the interval of ``now``: no key may start after it
    created_at: datetime         # ``now`` truncated to the window: created_at of a key that has expired
    truncate_window: timedelta
    release_same_day: bool       # ENP_DEBUG_RELEASE_SAME_DAY_KEYS: no embargo for keys still valid

    def check(self, raw: bytes, rolling_start: int, rolling_period: int, transmission_risk: int) -> datetime:
        """The rules in the reference's order; returns the key's created_at (embargo applied) or raises
        ValueError."""
        if len(raw) != KEY_LENGTH:
            raise ValueError(f"invalid key length, {len(raw)}, must be {KEY_LENGTH}")
        if not 1 <= rolling_period <= INTERVALS_PER_DAY:
            raise ValueError(f"invalid interval count, {rolling_period}, must be >= 1 && <= {INTERVALS_PER_DAY}")
        end = rolling_start + rolling_period
        # The reference rejects `validUntil <= min` (its message says ">=", which is off by one).
        if end <= self.min_interval:
            raise ValueError(
                f"key expires before minimum window; {rolling_start} + {rolling_period} = {end}"
                f" which is too old, must be >= {self.min_interval}")
        if rolling_start > self.current:
            raise ValueError(f"interval number {rolling_start} is in the future, must be <= {self.current}")
        created_at = self.created_at
        if end > self.current and not self.release_same_day:
            # Still valid: accept, but embargo until the key has expired (plus the truncate window).
            created_at = truncate(time_of_interval(end) + self.truncate_window, self.truncate_window)
        if not MIN_TRANSMISSION_RISK <= transmission_risk <= MAX_TRANSMISSION_RISK:
            raise ValueError(f"invalid transmission risk: {transmission_risk}, must be >= {MIN_TRANSMISSION_RISK}"
                             f" && <= {MAX_TRANSMISSION_RISK}")
        return created_at


def key_rules(settings: Settings, now: datetime) -> KeyRules:
    """The per-key rules for keys arriving at ``now``."""
    return _key_rules(now, settings.max_interval_age_on_publish, settings.truncate_window,
                      settings.debug_release_same_day_keys)


@functools.lru_cache(maxsize=8)
def _key_rules(now: datetime, max_age: timedelta, window: timedelta, release_same_day: bool) -> KeyRules:
    return KeyRules(interval_number(now - max_age), interval_number(now), truncate(now, window), window,
                    release_same_day)


def validate_key_fields(raw: bytes, rolling_start: int, rolling_period: int, transmission_risk: int,
                        settings: Settings, now: datetime) -> datetime:
    """The publish rules for one key's fields, in the reference's order; returns its created_at (embargo
    applied) or raises ValueError. Federation pulls and export imports apply the same rules."""
    return key_rules(settings, now).check(raw, rolling_start, rolling_period, transmission_risk)


def check_overlaps(exposures: list[Exposure], settings: Settings) -> None:
    """Keys of different start intervals must not overlap; at most N keys may share a start."""
    ordered = sorted(exposures, key=lambda e: (e.interval_number, e.interval_count))
    # As in the reference, the overlap check runs first; the per-start count only after it passed.
    prev: Exposure | None = None
    for e in ordered:
        if prev is not None and e.interval_number != prev.interval_number:
            prev_end = prev.interval_number + prev.interval_count
            if e.interval_number < prev_end:
                raise ValueError(
                    f"exposure keys have non aligned overlapping intervals. {e.interval_number} overlaps with "
                    f"previous key that is good from {prev.interval_number} to {prev_end}.")
        # Within one start group the sort puts the longest key last; it defines the group's end.
        prev = e
    per_start: dict[int, int] = {}
    for e in ordered:
        per_start[e.interval_number] = per_start.get(e.interval_number, 0) + 1
    for start, n in per_start.items():
        if n > settings.max_same_start_interval_keys:
            raise ValueError(f"too many overlapping keys for start interval: {start} want: <= "
                             f"{settings.max_same_start_interval_keys}, got: {n}")


def transform(request: PublishRequest, *, app_name: str, regions: list[str], claims: VerifiedClaims | None,
              settings: Settings, now: datetime) -> TransformResult:
    """Validate ``request`` and build exposure rows (negative-report keys included; the caller decides)."""
    keys = request.keys
    if not keys:
        raise PublishError(400, CODE_BAD_REQUEST, "unable to read request data: no exposure keys in publish request")
    if len(keys) > settings.max_keys_on_publish:
        raise PublishError(400, CODE_BAD_REQUEST,
                           f"unable to read request data: too many exposure keys in publish: {len(keys)}, "
                           f"max of {settings.max_keys_on_publish} is allowed")

    report_type = claims.report_type if claims else ""
    ha_id = claims.health_authority_id if claims else None
    onset = symptom_onset(request.symptom_onset_interval, claims, settings, now)
    upper_regions = sorted({r.strip().upper() for r in regions if r.strip()})

    result = TransformResult()
    for i, key in enumerate(keys):
        try:
            raw, created_at = _validate_key(i, key, settings, now)
        except ValueError as exc:
            result.key_errors.append(f"key {i} cannot be imported: {exc}")
            continue
        dsos = days_between(onset, key.rolling_start_number)
        if abs(dsos) > settings.max_symptom_onset_days:
            # The reference prints the magnitude (Go float64 %v: "15", not "15.0" or "-15").
            result.warnings.append(f"key {i} symptom onset is too large, {abs(dsos)} > "
                                   f"{settings.max_symptom_onset_days} - saving without this key")
            continue
        tr = key.transmission_risk
        if tr == 0:
            tr = TRANSMISSION_RISK_BY_REPORT_TYPE.get(report_type, 0)
        result.exposures.append(Exposure(
            exposure_key=raw,
            transmission_risk=tr,
            app_package_name=app_name,
            regions=list(upper_regions),
            traveler=request.traveler,
            interval_number=key.rolling_start_number,
            interval_count=key.rolling_period,
            created_at=created_at,
            local_provenance=True,
            health_authority_id=ha_id,
            report_type=report_type,
            days_since_symptom_onset=dsos,
        ))

    if not result.exposures and result.key_errors:
        raise PublishError(400, CODE_BAD_REQUEST,
                           f"unable to read request data: {format_multierror(result.key_errors)}", result.warnings)
    # Keys dropped only for their symptom onset leave nothing to store, but that is a warning, not an
    # error (the reference answers 200 with the warnings).
    try:
        check_overlaps(result.exposures, settings)
    except ValueError as exc:
        raise PublishError(400, CODE_BAD_REQUEST, f"unable to read request data: {exc}", result.warnings) from None
    return result


def is_insertable(exposure: Exposure) -> bool:
    """Keys first reported negative are never stored (they only go into the revision token)."""
    return exposure.report_type != REPORT_TYPE_NEGATIVE
