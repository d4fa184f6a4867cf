"""Unit tests for enpipeline.publish.transform: the publish validation rules of protocol.md §2.7.

The expected texts are the reference's (internal/publish/model/exposure_model.go, go-multierror).
Time is fixed: NOW is a Friday afternoon, never the wall clock.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from enpipeline.config import Settings
from enpipeline.errors import CODE_BAD_REQUEST, PublishError
from enpipeline.model import ExposureKeyInput, PublishRequest, VerifiedClaims
from enpipeline.publish.transform import (
    TransformResult,
    check_overlaps,
    format_multierror,
    is_insertable,
    symptom_onset,
    transform,
)
from enpipeline.timeutil import days_between, interval_number, time_of_interval

NOW = datetime(2024, 3, 15, 13, 27, 45, tzinfo=UTC)
CURRENT = interval_number(NOW)  # 13:20 today
TODAY = interval_number(datetime(2024, 3, 15, tzinfo=UTC))  # 00:00 today
DAY = 144
HOUR = 6
MIN_WINDOW = interval_number(NOW - timedelta(hours=360))  # 2024-02-29 13:20
SETTINGS = Settings()
APP = "com.example.app"
HA_ID = 42


def test_fixed_clock_constants() -> None:
    assert CURRENT == TODAY + 13 * HOUR + 2
    assert time_of_interval(MIN_WINDOW) == datetime(2024, 2, 29, 13, 20, tzinfo=UTC)
    assert TODAY % DAY == 0


def tek(n: int) -> str:
    """A distinct, valid 16-byte key in standard base64."""
    return base64.b64encode(bytes([n]) * 16).decode()


def key(start: int, period: int = DAY, tr: int = 0, n: int | None = None, text: str | None = None) -> ExposureKeyInput:
    return ExposureKeyInput(text if text is not None else tek(n if n is not None else start % 251),
                            rolling_start_number=start, rolling_period=period, transmission_risk=tr)


def daily_keys(count: int, last_start: int = TODAY - DAY) -> list[ExposureKeyInput]:
    """``count`` non-overlapping full-day keys ending the day before ``last_start + DAY``."""
    return [key(last_start - i * DAY, n=i) for i in range(count)]


def run(keys: list[ExposureKeyInput], *, claims: VerifiedClaims | None = None, onset: int = 0,
        traveler: bool = False, regions: tuple[str, ...] = ("us",), settings: Settings = SETTINGS,
        now: datetime = NOW) -> TransformResult:
    request = PublishRequest(keys=tuple(keys), symptom_onset_interval=onset, traveler=traveler)
    return transform(request, app_name=APP, regions=list(regions), claims=claims, settings=settings, now=now)


def fails(keys: list[ExposureKeyInput], **kwargs: object) -> PublishError:
    with pytest.raises(PublishError) as info:
        run(keys, **kwargs)  # type: ignore[arg-type]
    assert info.value.status == 400
    assert info.value.code == CODE_BAD_REQUEST
    return info.value


def one_error(index: int, message: str) -> str:
    return f"unable to read request data: 1 error occurred:\n\t* key {index} cannot be imported: {message}\n\n"


# --- request-level rules ---------------------------------------------------------------------------


def test_no_keys() -> None:
    err = fails([])
    assert err.message == "unable to read request data: no exposure keys in publish request"
    assert err.warnings == []


def test_max_keys_on_publish_default_is_30() -> None:
    assert len(run(_thirty_keys()).exposures) == 30
    err = fails([*_thirty_keys(), key(TODAY, period=1, n=200)])
    assert err.message == "unable to read request data: too many exposure keys in publish: 31, max of 30 is allowed"


def _thirty_keys() -> list[ExposureKeyInput]:
    # 30 back-to-back 12-interval keys over the last ~2.5 days: valid and non-overlapping.
    return [key(TODAY - 30 * 12 + i * 12, period=12, n=i) for i in range(30)]


def test_too_many_keys_is_checked_before_any_key() -> None:
    bad = [key(0, period=0, text="!!")] * 31
    assert fails(bad).message.endswith("too many exposure keys in publish: 31, max of 30 is allowed")


def test_max_keys_setting_is_honoured() -> None:
    settings = SETTINGS.replace(max_keys_on_publish=2)
    assert len(run(daily_keys(2), settings=settings).exposures) == 2
    err = fails(daily_keys(3), settings=settings)
    assert err.message == "unable to read request data: too many exposure keys in publish: 3, max of 2 is allowed"


# --- per-key rules, in the reference's order --------------------------------------------------------


@pytest.mark.parametrize(("bad_key", "message"), [
    # 1. base64 (lenient: std or URL alphabet, padding optional; offsets into the unpadded URL form)
    (key(TODAY - DAY, text="AAAA!AAAAAAAAAAAAAAAAA=="), "illegal base64 data at input byte 4"),
    (key(TODAY - DAY, text="AAAAAAAAAAAAAAAAAAAAA A"), "illegal base64 data at input byte 21"),
    (key(TODAY - DAY, text="AAAAA"), "illegal base64 data at input byte 4"),  # a lone trailing character
    (key(TODAY - DAY, text="AA=AAAAAAAAAAAAAAAAAAA=="), "illegal base64 data at input byte 2"),
    (key(TODAY - DAY, text="AAAA\u00e9AAA"), "illegal base64 data at input byte 4"),
    # 2. length
    (key(TODAY - DAY, text=base64.b64encode(bytes(14)).decode()), "invalid key length, 14, must be 16"),
    (key(TODAY - DAY, text=base64.b64encode(bytes(17)).decode()), "invalid key length, 17, must be 16"),
    (key(TODAY - DAY, text=""), "invalid key length, 0, must be 16"),
    # 3. rolling period 1..144
    (key(TODAY - DAY, period=0), "invalid interval count, 0, must be >= 1 && <= 144"),
    (key(TODAY - DAY, period=145), "invalid interval count, 145, must be >= 1 && <= 144"),
    (key(TODAY - DAY, period=-1), "invalid interval count, -1, must be >= 1 && <= 144"),
    # 4. too old: start + period <= IntervalNumber(now - 360h)
    (key(MIN_WINDOW - DAY), f"key expires before minimum window; {MIN_WINDOW - DAY} + 144 = {MIN_WINDOW} "
                            f"which is too old, must be >= {MIN_WINDOW}"),
    (key(MIN_WINDOW - 10, period=10), f"key expires before minimum window; {MIN_WINDOW - 10} + 10 = {MIN_WINDOW} "
                                      f"which is too old, must be >= {MIN_WINDOW}"),
    (key(TODAY - 30 * DAY), f"key expires before minimum window; {TODAY - 30 * DAY} + 144 = {TODAY - 29 * DAY} "
                            f"which is too old, must be >= {MIN_WINDOW}"),
    # 5. future start
    (key(CURRENT + 1, period=1), f"interval number {CURRENT + 1} is in the future, must be <= {CURRENT}"),
    (key(TODAY + DAY), f"interval number {TODAY + DAY} is in the future, must be <= {CURRENT}"),
    # 7. transmission risk 0..8
    (key(TODAY - DAY, tr=9), "invalid transmission risk: 9, must be >= 0 && <= 8"),
    (key(TODAY - DAY, tr=-1), "invalid transmission risk: -1, must be >= 0 && <= 8"),
    (key(TODAY - DAY, tr=2**31), "invalid transmission risk: 2147483648, must be >= 0 && <= 8"),
    (key(CURRENT, tr=9), "invalid transmission risk: 9, must be >= 0 && <= 8"),  # still-valid keys too
])
def test_invalid_key(bad_key: ExposureKeyInput, message: str) -> None:
    # Alone, the key's failure fails the request with the multierror text.
    err = fails([bad_key])
    assert err.message == one_error(0, message)
    # Next to a good key, only the bad one is dropped (partial failure).
    good = key(TODAY - 3 * DAY, n=250)
    result = run([good, bad_key])
    assert [e.interval_number for e in result.exposures] == [TODAY - 3 * DAY]
    assert result.key_errors == [f"key 1 cannot be imported: {message}"]
    assert result.warnings == []


@pytest.mark.parametrize(("bad_key", "message"), [
    (key(MIN_WINDOW - DAY, period=0, text="AAAA"), "invalid key length, 3, must be 16"),
    (key(MIN_WINDOW - DAY, period=0, tr=9), "invalid interval count, 0, must be >= 1 && <= 144"),
    (key(MIN_WINDOW - DAY, tr=9), f"key expires before minimum window; {MIN_WINDOW - DAY} + 144 = {MIN_WINDOW} "
                                  f"which is too old, must be >= {MIN_WINDOW}"),
    (key(CURRENT + 1, period=200), "invalid interval count, 200, must be >= 1 && <= 144"),
    (key(CURRENT + 1, tr=9), f"interval number {CURRENT + 1} is in the future, must be <= {CURRENT}"),
])
def test_first_failing_rule_wins(bad_key: ExposureKeyInput, message: str) -> None:
    assert fails([bad_key]).message == one_error(0, message)


@pytest.mark.parametrize("text", [
    tek(7),  # standard, padded
    tek(7).rstrip("="),  # unpadded
    tek(7) + "==",  # extra '=' are trimmed
    base64.urlsafe_b64encode(bytes([0xFB, 0xFF] * 8)).decode(),  # URL alphabet
    base64.b64encode(bytes([0xFB, 0xFF] * 8)).decode(),  # the same bytes in the std alphabet
])
def test_lenient_base64_keys_accepted(text: str) -> None:
    result = run([key(TODAY - DAY, text=text)])
    assert len(result.exposures[0].exposure_key) == 16
    assert result.key_errors == []


def test_key_bytes_are_stored_decoded() -> None:
    result = run([key(TODAY - DAY, text=base64.urlsafe_b64encode(bytes(range(16))).decode().rstrip("="))])
    assert result.exposures[0].exposure_key == bytes(range(16))


@pytest.mark.parametrize("period", [1, 2, 72, 143, 144])
def test_rolling_period_bounds_accepted(period: int) -> None:
    [exposure] = run([key(TODAY - DAY, period=period)]).exposures
    assert exposure.interval_count == period


@pytest.mark.parametrize("tr", range(0, 9))
def test_transmission_risk_bounds_accepted(tr: int) -> None:
    assert run([key(TODAY - DAY, tr=tr)]).exposures[0].transmission_risk == tr


# --- the minimum window -----------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "period"), [
    (MIN_WINDOW - DAY + 1, DAY),  # started before the window, still valid one interval into it
    (MIN_WINDOW - 1, 2),
    (MIN_WINDOW, 1),  # starts exactly at the window's first interval
    (MIN_WINDOW + 1, DAY),
])
def test_key_valid_at_the_window_edge_is_accepted(start: int, period: int) -> None:
    [exposure] = run([key(start, period=period)]).exposures
    assert exposure.interval_number == start


def test_window_boundary_is_exclusive() -> None:
    # validUntil == IntervalNumber(now - 360h) is rejected (the reference checks `<=`).
    assert fails([key(MIN_WINDOW - 1, period=1)]).message == one_error(
        0, f"key expires before minimum window; {MIN_WINDOW - 1} + 1 = {MIN_WINDOW} which is too old, "
           f"must be >= {MIN_WINDOW}")
    assert run([key(MIN_WINDOW - 1, period=2)]).exposures


def test_max_interval_age_setting_is_honoured() -> None:
    settings = SETTINGS.replace(max_interval_age_on_publish=timedelta(hours=24))
    limit = interval_number(NOW - timedelta(hours=24))
    assert run([key(limit - DAY + 1)], settings=settings).exposures
    err = fails([key(limit - DAY)], settings=settings)
    assert err.message == one_error(
        0, f"key expires before minimum window; {limit - DAY} + 144 = {limit} which is too old, must be >= {limit}")


# --- future keys and the still-valid embargo --------------------------------------------------------


def test_key_starting_in_the_current_interval_is_accepted() -> None:
    [exposure] = run([key(CURRENT, period=1)]).exposures
    assert exposure.interval_number == CURRENT


@dataclass(frozen=True)
class CreatedAtCase:
    start: int
    period: int
    expected: datetime
    settings: Settings = SETTINGS


@pytest.mark.parametrize("case", [
    # Today's key, ending at 00:00 UTC tomorrow: embargoed until 01:00 tomorrow.
    CreatedAtCase(TODAY, DAY, datetime(2024, 3, 16, 1, 0, tzinfo=UTC)),
    # Ends 13:30 today (current interval + 1): 13:30 + 1h truncated to the hour = 14:00.
    CreatedAtCase(CURRENT, 1, datetime(2024, 3, 15, 14, 0, tzinfo=UTC)),
    # Ends 18:00: 19:00.
    CreatedAtCase(TODAY + 12 * HOUR, 6 * HOUR, datetime(2024, 3, 15, 19, 0, tzinfo=UTC)),
    # Started yesterday 14:00, ends today 14:00: still valid now, so 15:00.
    CreatedAtCase(TODAY - 10 * HOUR, DAY, datetime(2024, 3, 15, 15, 0, tzinfo=UTC)),
    # Ends exactly at the current interval's start: no longer valid, normal created_at (truncate(now, 1h)).
    CreatedAtCase(CURRENT - 1, 1, datetime(2024, 3, 15, 13, 0, tzinfo=UTC)),
    CreatedAtCase(TODAY - DAY, DAY, datetime(2024, 3, 15, 13, 0, tzinfo=UTC)),
    CreatedAtCase(MIN_WINDOW, 1, datetime(2024, 3, 15, 13, 0, tzinfo=UTC)),
    # DEBUG_RELEASE_SAME_DAY_KEYS turns the embargo off.
    CreatedAtCase(TODAY, DAY, datetime(2024, 3, 15, 13, 0, tzinfo=UTC),
                  SETTINGS.replace(debug_release_same_day_keys=True)),
    CreatedAtCase(CURRENT, 1, datetime(2024, 3, 15, 13, 0, tzinfo=UTC),
                  SETTINGS.replace(debug_release_same_day_keys=True)),
    # Another TRUNCATE_WINDOW: 15 minutes.
    CreatedAtCase(TODAY - DAY, DAY, datetime(2024, 3, 15, 13, 15, tzinfo=UTC),
                  SETTINGS.replace(truncate_window=timedelta(minutes=15))),
    CreatedAtCase(CURRENT, 1, datetime(2024, 3, 15, 13, 45, tzinfo=UTC),
                  SETTINGS.replace(truncate_window=timedelta(minutes=15))),
    CreatedAtCase(TODAY, DAY, datetime(2024, 3, 16, 0, 15, tzinfo=UTC),
                  SETTINGS.replace(truncate_window=timedelta(minutes=15))),
], ids=lambda c: f"{c.start - TODAY:+d}+{c.period}")
def test_created_at(case: CreatedAtCase) -> None:
    [exposure] = run([key(case.start, period=case.period)], settings=case.settings).exposures
    assert exposure.created_at == case.expected


def test_embargo_formula() -> None:
    # created_at = truncate(time_of(start + period) + TRUNCATE_WINDOW, TRUNCATE_WINDOW), for every still-valid key.
    for start in range(CURRENT - DAY + 1, CURRENT + 1, 7):
        for period in (DAY, 100, 37):
            end = start + period
            if end <= CURRENT:
                continue
            [exposure] = run([key(start, period=period)]).exposures
            end_time = time_of_interval(end) + timedelta(hours=1)
            assert exposure.created_at == end_time.replace(minute=0, second=0, microsecond=0)
            assert exposure.created_at > time_of_interval(end)


# --- report type and transmission risk --------------------------------------------------------------


@pytest.mark.parametrize(("report_type", "tr_in", "tr_out"), [
    ("confirmed", 0, 2),
    ("likely", 0, 4),
    ("negative", 0, 6),
    ("user-report", 0, 0),  # TransmissionRiskSelfReport (5) is not used by the backfill
    (None, 0, 0),  # no claims (e.g. the app bypasses verification)
    ("confirmed", 5, 5),  # a non-zero TR sent by the app is kept
    ("likely", 1, 1),
    ("negative", 3, 3),
    ("user-report", 8, 8),
    (None, 7, 7),
])
def test_transmission_risk_backfill(report_type: str | None, tr_in: int, tr_out: int) -> None:
    claims = VerifiedClaims(health_authority_id=HA_ID, report_type=report_type) if report_type else None
    [exposure] = run([key(TODAY - DAY, tr=tr_in)], claims=claims).exposures
    assert exposure.transmission_risk == tr_out
    assert exposure.report_type == (report_type or "")
    assert exposure.health_authority_id == (HA_ID if report_type else None)


def test_negative_keys_are_transformed_but_not_insertable() -> None:
    claims = VerifiedClaims(health_authority_id=HA_ID, report_type="negative")
    [exposure] = run([key(TODAY - DAY)], claims=claims).exposures
    assert exposure.report_type == "negative"
    assert not is_insertable(exposure)
    for report_type in ("confirmed", "likely", "user-report", ""):
        exposure.report_type = report_type
        assert is_insertable(exposure)


# --- the stored row ---------------------------------------------------------------------------------


def test_row_fields() -> None:
    claims = VerifiedClaims(health_authority_id=HA_ID, report_type="confirmed")
    result = run([key(TODAY - 2 * DAY, tr=3, text=tek(9))], claims=claims, traveler=True, regions=("us", "ca", "US"))
    [e] = result.exposures
    assert e.exposure_key == bytes([9]) * 16
    assert (e.interval_number, e.interval_count, e.transmission_risk) == (TODAY - 2 * DAY, DAY, 3)
    assert e.app_package_name == APP
    assert e.local_provenance is True
    assert e.traveler is True
    # Regions are upper-cased (DEVIATION: also de-duplicated and sorted; the reference keeps the list as is).
    assert e.regions == ["CA", "US"]
    assert e.revised_at is None and e.revised_report_type is None
    assert e.created_at == datetime(2024, 3, 15, 13, 0, tzinfo=UTC)


@pytest.mark.parametrize("traveler", [True, False])
def test_traveler_is_copied_to_every_key(traveler: bool) -> None:
    result = run(daily_keys(4), traveler=traveler)
    assert [e.traveler for e in result.exposures] == [traveler] * 4


def test_regions_upper_cased_on_every_key() -> None:
    result = run(daily_keys(3), regions=("de", "fr"))
    assert all(e.regions == ["DE", "FR"] for e in result.exposures)
    # Each row gets its own list.
    result.exposures[0].regions.append("X")
    assert result.exposures[1].regions == ["DE", "FR"]


# --- symptom onset ----------------------------------------------------------------------------------

MIN_ONSET = interval_number(datetime(2024, 2, 16, tzinfo=UTC))  # UTC midnight of now - 28 days
DEFAULT_ONSET = interval_number(NOW - timedelta(days=4))


def claims_with_onset(onset: int) -> VerifiedClaims:
    return VerifiedClaims(health_authority_id=HA_ID, report_type="confirmed", symptom_onset_interval=onset)


@pytest.mark.parametrize(("request_onset", "claim_onset", "expected"), [
    (TODAY - 3 * DAY, TODAY - 5 * DAY, TODAY - 3 * DAY),  # the request wins over the certificate
    (TODAY - 3 * DAY, None, TODAY - 3 * DAY),
    (0, TODAY - 5 * DAY, TODAY - 5 * DAY),  # no request value: the certificate's
    (CURRENT, TODAY - 5 * DAY, TODAY - 5 * DAY),  # request not < current: the certificate's
    (CURRENT + 500, TODAY - 5 * DAY, TODAY - 5 * DAY),
    (MIN_ONSET - 1, TODAY - 5 * DAY, TODAY - 5 * DAY),  # request too old
    (-5, TODAY - 5 * DAY, TODAY - 5 * DAY),
    (MIN_ONSET, TODAY - 5 * DAY, MIN_ONSET),  # range is [minOnset, current)
    (CURRENT - 1, TODAY - 5 * DAY, CURRENT - 1),
    (0, MIN_ONSET, MIN_ONSET),
    (0, CURRENT - 1, CURRENT - 1),
    (0, CURRENT, DEFAULT_ONSET),  # neither usable: 4 days before now
    (0, MIN_ONSET - 1, DEFAULT_ONSET),
    (0, 0, DEFAULT_ONSET),
    (0, None, DEFAULT_ONSET),
    (CURRENT, None, DEFAULT_ONSET),
    (MIN_ONSET - 1, MIN_ONSET - 1, DEFAULT_ONSET),
])
def test_symptom_onset_selection(request_onset: int, claim_onset: int | None, expected: int) -> None:
    claims = claims_with_onset(claim_onset) if claim_onset is not None else None
    assert symptom_onset(request_onset, claims, SETTINGS, NOW) == expected


def test_min_onset_constant() -> None:
    assert MIN_ONSET == interval_number(datetime(2024, 3, 15, tzinfo=UTC) - timedelta(days=28))
    assert DEFAULT_ONSET == CURRENT - 4 * DAY


def test_default_onset_setting_is_honoured() -> None:
    settings = SETTINGS.replace(default_symptom_onset_days_ago=2)
    assert symptom_onset(0, None, settings, NOW) == CURRENT - 2 * DAY
    [exposure] = run([key(TODAY - DAY)], settings=settings).exposures
    assert exposure.days_since_symptom_onset == 1  # onset 2 days ago, key yesterday


def test_valid_report_days_setting_is_honoured() -> None:
    settings = SETTINGS.replace(max_valid_symptom_onset_report_days=3)
    assert symptom_onset(TODAY - 3 * DAY, None, settings, NOW) == TODAY - 3 * DAY
    assert symptom_onset(TODAY - 3 * DAY - 1, None, settings, NOW) == CURRENT - 4 * DAY  # too old: default


def test_days_between_examples_from_the_reference_tests() -> None:
    # protocol.md §2.7: onset midnight vs +35h -> 1; vs -25h -> -2; vs -47h -> -2; vs +8d2h -> 8.
    midnight = TODAY - 10 * DAY
    offsets = {35 * HOUR: 1, -25 * HOUR: -2, -47 * HOUR: -2, 8 * DAY + 2 * HOUR: 8}
    for offset, expected in offsets.items():
        assert days_between(midnight, midnight + offset) == expected
    # The same through the transform: each key's days_since_symptom_onset.
    keys = [key(midnight + offset, period=1, n=i) for i, offset in enumerate(offsets)]
    result = run(keys, onset=midnight)
    assert result.warnings == [] and result.key_errors == []
    by_start = {e.interval_number: e.days_since_symptom_onset for e in result.exposures}
    assert by_start == {midnight + offset: expected for offset, expected in offsets.items()}


def test_days_since_onset_ignores_time_of_day() -> None:
    onset = TODAY - 5 * DAY + 23 * HOUR  # 23:00 five days ago
    keys = [key(TODAY - 5 * DAY, period=1, n=1), key(TODAY - 4 * DAY + 1, period=1, n=2),
            key(TODAY - 6 * DAY + 143, period=1, n=3)]
    dsos = {e.interval_number: e.days_since_symptom_onset for e in run(keys, onset=onset).exposures}
    assert dsos == {TODAY - 5 * DAY: 0, TODAY - 4 * DAY + 1: 1, TODAY - 6 * DAY + 143: -1}


def test_every_key_gets_days_since_onset_from_the_default_onset() -> None:
    result = run(daily_keys(5, last_start=TODAY))
    # default onset = now - 4 days; keys today .. 4 days ago
    assert sorted(e.days_since_symptom_onset for e in result.exposures) == [0, 1, 2, 3, 4]


def test_claim_onset_is_used_for_days_since_onset() -> None:
    claims = claims_with_onset(TODAY - 7 * DAY + 5)
    [exposure] = run([key(TODAY - DAY)], claims=claims).exposures
    assert exposure.days_since_symptom_onset == 6


def test_symptom_onset_too_large_drops_key_with_warning() -> None:
    onset = TODAY - 20 * DAY
    keys = [
        key(TODAY - 6 * DAY, n=1),  # 14 days: kept (limit inclusive)
        key(TODAY - 5 * DAY, n=2),  # 15 days: dropped
        key(TODAY - DAY, n=3),  # 19 days: dropped
    ]
    result = run(keys, onset=onset)
    assert [e.interval_number for e in result.exposures] == [TODAY - 6 * DAY]
    assert result.exposures[0].days_since_symptom_onset == 14
    assert result.warnings == [
        "key 1 symptom onset is too large, 15 > 14 - saving without this key",
        "key 2 symptom onset is too large, 19 > 14 - saving without this key",
    ]
    assert result.key_errors == []  # a warning, not a partial failure


def test_negative_days_since_onset_warning_prints_the_magnitude() -> None:
    onset = TODAY  # today 00:00
    keys = [key(TODAY - 14 * DAY, n=1), key(TODAY - 15 * DAY + DAY // 2, n=2)]
    result = run(keys, onset=onset)
    assert [e.days_since_symptom_onset for e in result.exposures] == [-14]
    assert result.warnings == ["key 1 symptom onset is too large, 15 > 14 - saving without this key"]


def test_all_keys_dropped_by_symptom_onset_is_not_an_error() -> None:
    result = run([key(TODAY - DAY, n=1), key(TODAY - 2 * DAY, n=2)], onset=TODAY - 27 * DAY)
    assert result.exposures == []
    assert result.key_errors == []
    assert result.warnings == [
        "key 0 symptom onset is too large, 26 > 14 - saving without this key",
        "key 1 symptom onset is too large, 25 > 14 - saving without this key",
    ]


def test_invalid_keys_plus_onset_drops_fail_with_errors_and_warnings() -> None:
    err = fails([key(TODAY - DAY, n=1), key(TODAY - DAY, period=0, n=2)], onset=TODAY - 27 * DAY)
    assert err.message == one_error(1, "invalid interval count, 0, must be >= 1 && <= 144")
    assert err.warnings == ["key 0 symptom onset is too large, 26 > 14 - saving without this key"]


def test_max_symptom_onset_days_setting_is_honoured() -> None:
    settings = SETTINGS.replace(max_symptom_onset_days=3)
    result = run([key(TODAY - DAY, n=1), key(TODAY - 8 * DAY, n=2)], onset=TODAY - 4 * DAY, settings=settings)
    assert [e.days_since_symptom_onset for e in result.exposures] == [3]
    assert result.warnings == ["key 1 symptom onset is too large, 4 > 3 - saving without this key"]


# --- partial failure: go-multierror text ------------------------------------------------------------


def test_multierror_format_one() -> None:
    text = format_multierror(["key 1 cannot be imported: x"])
    assert text == "1 error occurred:\n\t* key 1 cannot be imported: x\n\n"


def test_multierror_format_many() -> None:
    assert format_multierror(["a", "b", "c"]) == "3 errors occurred:\n\t* a\n\t* b\n\t* c\n\n"


def test_partial_failure_keeps_good_keys_and_lists_errors_in_request_order() -> None:
    keys = [
        key(TODAY - 5 * DAY, text="AAAA", n=0),
        key(TODAY - 4 * DAY, n=1),
        key(TODAY - 3 * DAY, period=145, n=2),
        key(TODAY - 2 * DAY, tr=9, n=3),
        key(TODAY - DAY, n=4),
    ]
    result = run(keys)
    assert [e.interval_number for e in result.exposures] == [TODAY - 4 * DAY, TODAY - DAY]
    assert format_multierror(result.key_errors) == (
        "3 errors occurred:\n"
        "\t* key 0 cannot be imported: invalid key length, 3, must be 16\n"
        "\t* key 2 cannot be imported: invalid interval count, 145, must be >= 1 && <= 144\n"
        "\t* key 3 cannot be imported: invalid transmission risk: 9, must be >= 0 && <= 8\n\n")


def test_all_keys_invalid_fails_with_the_whole_multierror() -> None:
    err = fails([key(TODAY - DAY, text="AAAA"), key(CURRENT + 1, period=1)])
    assert err.message == (
        "unable to read request data: 2 errors occurred:\n"
        "\t* key 0 cannot be imported: invalid key length, 3, must be 16\n"
        f"\t* key 1 cannot be imported: interval number {CURRENT + 1} is in the future, must be <= {CURRENT}\n\n")
    assert err.warnings == []


# --- overlapping keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [
    [key(TODAY - DAY, DAY, n=1), key(TODAY - DAY, 72, n=2), key(TODAY - DAY, 1, n=3)],  # same start may overlap
    [key(TODAY - 2 * DAY, DAY, n=1), key(TODAY - DAY, DAY, n=2)],  # back to back
    [key(TODAY - 2 * DAY, 10, n=1), key(TODAY - DAY, DAY, n=2)],  # gaps are allowed
    [key(TODAY - DAY + 7, 50, n=1), key(TODAY - DAY + 57, 13, n=2), key(TODAY - DAY + 70, 1, n=3)],  # not midnight
    [key(TODAY - DAY, DAY, n=2), key(TODAY - 2 * DAY, DAY, n=1), key(TODAY, 30, n=3)],  # any request order
    [key(TODAY - 2 * DAY, 50, n=1), key(TODAY - 2 * DAY, DAY, n=2), key(TODAY - DAY, DAY, n=3)],  # group end = longest
])
def test_allowed_key_layouts(keys: list[ExposureKeyInput]) -> None:
    result = run(keys)
    assert len(result.exposures) == len(keys)
    assert result.key_errors == []


@pytest.mark.parametrize(("keys", "start", "group_start", "group_end"), [
    ([key(TODAY - 2 * DAY, DAY, n=1), key(TODAY - DAY - 1, DAY, n=2)], TODAY - DAY - 1, TODAY - 2 * DAY, TODAY - DAY),
    ([key(TODAY - DAY + 100, 1, n=2), key(TODAY - DAY, DAY, n=1)], TODAY - DAY + 100, TODAY - DAY, TODAY),
    # The group's end is its longest key's, not the last one sent.
    ([key(TODAY - 2 * DAY, DAY, n=1), key(TODAY - 2 * DAY, 50, n=2), key(TODAY - 2 * DAY + 100, 10, n=3)],
     TODAY - 2 * DAY + 100, TODAY - 2 * DAY, TODAY - DAY),
    # Compared with the previous start group only.
    ([key(TODAY - 3 * DAY, 10, n=1), key(TODAY - 3 * DAY + 20, 100, n=2), key(TODAY - 3 * DAY + 119, 5, n=3)],
     TODAY - 3 * DAY + 119, TODAY - 3 * DAY + 20, TODAY - 3 * DAY + 120),
])
def test_non_aligned_overlap_fails(keys: list[ExposureKeyInput], start: int, group_start: int, group_end: int) -> None:
    err = fails(keys)
    assert err.message == (
        f"unable to read request data: exposure keys have non aligned overlapping intervals. {start} overlaps "
        f"with previous key that is good from {group_start} to {group_end}.")


def test_overlap_is_checked_on_surviving_keys_only() -> None:
    # The overlapping key is dropped for its transmission risk first, so the publish is a partial success.
    result = run([key(TODAY - 2 * DAY, DAY, n=1), key(TODAY - DAY - 1, DAY, tr=9, n=2)])
    assert [e.interval_number for e in result.exposures] == [TODAY - 2 * DAY]
    assert result.key_errors == ["key 1 cannot be imported: invalid transmission risk: 9, must be >= 0 && <= 8"]


def test_overlap_error_replaces_key_errors_and_keeps_warnings() -> None:
    keys = [
        key(TODAY - 2 * DAY, DAY, n=1),
        key(TODAY - DAY - 1, DAY, n=2),
        key(TODAY - DAY, text="AAAA"),
        key(TODAY - 15 * DAY + DAY // 2, n=4),  # dropped for its symptom onset (warning)
    ]
    err = fails(keys, onset=TODAY)
    assert err.message == (
        f"unable to read request data: exposure keys have non aligned overlapping intervals. {TODAY - DAY - 1} "
        f"overlaps with previous key that is good from {TODAY - 2 * DAY} to {TODAY - DAY}.")
    assert err.warnings == ["key 3 symptom onset is too large, 15 > 14 - saving without this key"]


def test_too_many_keys_with_the_same_start() -> None:
    keys = [key(TODAY - DAY, p, n=p) for p in (DAY, 100, 50, 1)]
    err = fails(keys)
    assert err.message == (f"unable to read request data: too many overlapping keys for start interval: "
                           f"{TODAY - DAY} want: <= 3, got: 4")
    assert len(run(keys[:3]).exposures) == 3


def test_same_start_limit_setting_is_honoured() -> None:
    settings = SETTINGS.replace(max_same_start_interval_keys=1)
    err = fails([key(TODAY - DAY, DAY, n=1), key(TODAY - DAY, 10, n=2)], settings=settings)
    assert err.message == (f"unable to read request data: too many overlapping keys for start interval: "
                           f"{TODAY - DAY} want: <= 1, got: 2")


def test_overlap_is_reported_before_the_same_start_count() -> None:
    # Both rules are broken; the reference finds the overlap first.
    keys = [key(TODAY - 2 * DAY, p, n=p) for p in (DAY, 100, 50, 1)] + [key(TODAY - DAY - 1, 1, n=200)]
    err = fails(keys)
    assert "non aligned overlapping intervals. " in err.message
    assert "too many overlapping" not in err.message


def test_same_start_count_only_counts_surviving_keys() -> None:
    keys = [key(TODAY - DAY, p, n=p) for p in (DAY, 100, 50)] + [key(TODAY - DAY, 0, n=99)]
    result = run(keys)
    assert len(result.exposures) == 3
    assert result.key_errors == ["key 3 cannot be imported: invalid interval count, 0, must be >= 1 && <= 144"]


def test_check_overlaps_directly() -> None:
    exposures = run([key(TODAY - 2 * DAY, n=1), key(TODAY - DAY, n=2)]).exposures
    check_overlaps(exposures, SETTINGS)  # fine
    exposures[1].interval_number = TODAY - DAY - 1
    with pytest.raises(ValueError, match=r"^exposure keys have non aligned overlapping intervals\. "):
        check_overlaps(exposures, SETTINGS)


def test_duplicate_keys_both_pass_the_transform() -> None:
    # The storage layer folds them into one; the transform keeps both.
    result = run([key(TODAY - DAY, text=tek(5)), key(TODAY - DAY, text=tek(5))])
    assert len(result.exposures) == 2
