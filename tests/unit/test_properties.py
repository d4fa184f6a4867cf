"""Property tests (hypothesis) for the publish decoder and transform and for the export encoder.

Every oracle here is written independently of the code under test, from protocol.md §2.1-§2.7 and §6.5:
the decoder may only fail with WireError, the transform only with PublishError, and every key the
transform accepts must satisfy every publish rule (and every key that satisfies them must be accepted).
The export encoder must round-trip through the reader, and its numpy fast path must give the same bytes
as the protoc-generated classes.

Runs are derandomized and use no example database, so CI sees the same examples on every run.
"""

from __future__ import annotations

import base64
import itertools
import json
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from enpipeline.config import Settings
from enpipeline.errors import CODE_BAD_REQUEST, PublishError
from enpipeline.export.format import (
    ExportHeader,
    KeyColumns,
    SignatureInfo,
    build_zip,
    encode_export_bin,
    encode_export_sig,
    read_export,
)
from enpipeline.model import ExposureKeyInput, PublishRequest, VerifiedClaims
from enpipeline.publish.transform import transform
from enpipeline.publish.wire import WireError, decode_publish

MAX_BODY = 64_000
SETTINGS = Settings()
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
DAY = 144

# Deterministic: the same examples on every run, nothing stored between runs.
PROPERTY = settings(derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# How many examples each property runs (reported by the README paragraph of issue #7).
EXAMPLES = {
    "decode_bytes": 1500,
    "decode_json": 1000,
    "decode_roundtrip": 500,
    "transform": 1000,
    "export_roundtrip": 400,
    "export_fast_vs_protobuf": 400,
}


# --- independent helpers: the rules as protocol.md states them ------------------------------------------


def interval(t: datetime) -> int:
    return int(t.timestamp()) // 600


def midnight(t: datetime) -> datetime:
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


def hour_floor(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def day_of(interval_number: int) -> int:
    return interval_number // DAY


def expected_onset(request_onset: int, claims: VerifiedClaims | None, now: datetime) -> int:
    """§2.7 'Symptom onset': request value, else certificate value, else 4 days before now."""
    current = interval(now)
    min_onset = interval(midnight(now - timedelta(days=28)))
    onset = 0
    if min_onset <= request_onset < current:
        onset = request_onset
    elif claims is not None and min_onset <= claims.symptom_onset_interval < current:
        onset = claims.symptom_onset_interval
    if onset == 0 or abs(day_of(current) - day_of(onset)) > 28:
        onset = interval(now - timedelta(days=4))
    return onset


# --- strategies ---------------------------------------------------------------------------------------

B64_ALPHABET = set(string.ascii_letters + string.digits + "+/-_=\r\n")


@dataclass(frozen=True)
class KeyCase:
    """A key as sent plus what it decodes to by construction (None: not decodable)."""

    key: ExposureKeyInput
    raw: bytes | None


def weighted(*parts: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """one_of with integer weights (hypothesis picks the branches of one_of evenly)."""
    return st.one_of(*(strategy for weight, strategy in parts for _ in range(weight)))


@st.composite
def key_text(draw: st.DrawFn) -> tuple[str, bytes | None]:
    """Base64 text whose decoded bytes are known by construction, or text that cannot decode."""
    kind = draw(st.sampled_from(["std"] * 6 + ["url", "raw", "extra_pad", "short_or_long", "garbage", "dangling"]))
    if kind == "garbage":  # at least one character outside the (lenient) base64 alphabet
        bad = draw(st.sampled_from(list("!#$%&*,.:; \x00\"'{}é€\U0001f600")))
        return draw(st.text(max_size=8)) + bad + draw(st.text(max_size=8)), None
    if kind == "dangling":  # 4n+1 alphabet characters cannot encode whole bytes
        n = draw(st.integers(0, 6))
        return "A" * (4 * n) + draw(st.sampled_from("AQgw+/_-")), None
    raw = draw(st.binary(max_size=24) if kind == "short_or_long" else st.binary(min_size=16, max_size=16))
    std = base64.b64encode(raw).decode()
    text = {"std": std, "short_or_long": std,
            "url": base64.urlsafe_b64encode(raw).decode(),
            "raw": std.rstrip("="),
            "extra_pad": std + "=="}[kind]
    return text, raw


@st.composite
def key_cases(draw: st.DrawFn, now: datetime) -> KeyCase:
    text, raw = draw(key_text())
    today = interval(midnight(now))
    # Starts near the 15-day window (day-aligned or not) plus the odd wild value.
    start = draw(weighted((4, st.integers(-17, 1).map(lambda d: today + d * DAY)),
                          (2, st.integers(today - 17 * DAY, today + 2 * DAY)),
                          (1, st.integers(INT32_MIN, INT32_MAX))))
    period = draw(weighted((4, st.just(DAY)), (2, st.sampled_from([0, 1, 143, 145])), (1, st.integers(-2, 150)),
                           (1, st.integers(INT32_MIN, INT32_MAX))))
    edge = draw(st.integers(0, 5))
    if edge == 0:  # right at the edges of the window: the oldest acceptable end, the current interval
        oldest_end = interval(now - timedelta(hours=360))
        start = draw(st.sampled_from([oldest_end - period, oldest_end - period + 1, interval(now), interval(now) + 1]))
        start = max(INT32_MIN, min(INT32_MAX, start))
    tr = draw(weighted((4, st.integers(0, 8)), (1, st.integers(-2, 10)), (1, st.integers(-(2**63), 2**63 - 1))))
    return KeyCase(ExposureKeyInput(text, start, period, tr), raw)


NOWS = st.datetimes(min_value=datetime(2021, 1, 1), max_value=datetime(2035, 12, 31),
                    timezones=st.just(UTC))


# --- (a) decoder --------------------------------------------------------------------------------------


@settings(PROPERTY, max_examples=EXAMPLES["decode_bytes"])
@given(body=st.one_of(
    st.binary(max_size=300),
    # Mostly-JSON bytes: a valid document with a byte changed, cut short or padded.
    st.tuples(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12),
              st.integers(0, 400), st.binary(min_size=0, max_size=3))
    .map(lambda t: _mutate(json.dumps(t[0]).encode(), t[1], t[2])),
))
def test_decoder_fails_only_with_wire_error(body: bytes) -> None:
    try:
        request = decode_publish(body, MAX_BODY)
    except WireError as exc:
        assert exc.status in (400, 413)
        assert exc.message
        return
    assert isinstance(request, PublishRequest)
    _assert_well_typed(request)


def _mutate(doc: bytes, at: int, insert: bytes) -> bytes:
    at = at % (len(doc) + 1)
    return doc[:at] + insert + doc[at + len(insert):]


def _assert_well_typed(request: PublishRequest) -> None:
    """What the decoder hands on always has the types the domain relies on."""
    for name in ("health_authority_id", "verification_payload", "hmac_key", "revision_token", "padding"):
        assert isinstance(getattr(request, name), str)
    assert isinstance(request.traveler, bool)
    assert isinstance(request.symptom_onset_interval, int) and not isinstance(request.symptom_onset_interval, bool)
    assert INT32_MIN <= request.symptom_onset_interval <= INT32_MAX
    assert isinstance(request.keys, tuple)
    for k in request.keys:
        assert isinstance(k.key, str)
        assert INT32_MIN <= k.rolling_start_number <= INT32_MAX
        assert INT32_MIN <= k.rolling_period <= INT32_MAX
        assert -(2**63) <= k.transmission_risk <= 2**63 - 1
        for value in (k.rolling_start_number, k.rolling_period, k.transmission_risk):
            assert isinstance(value, int) and not isinstance(value, bool)


# Field values of every JSON type, so each field sees both its own type and every wrong one.
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)
TOP_FIELDS = {"temporaryExposureKeys": "keys", "healthAuthorityID": "str", "verificationPayload": "str",
              "hmacKey": "str", "symptomOnsetInterval": "int32", "traveler": "bool", "revisionToken": "str",
              "padding": "str"}
KEY_FIELDS = {"key": "str", "rollingStartNumber": "int32", "rollingPeriod": "int32", "transmissionRisk": "int64"}


def _well_typed(kind: str, value: Any) -> bool:
    """Go's encoding/json would store this value in a field of this kind (null leaves the zero value)."""
    if value is None:
        return True
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int32", "int64"):
        bits = 32 if kind == "int32" else 64
        return (isinstance(value, int) and not isinstance(value, bool)
                and -(2 ** (bits - 1)) <= value < 2 ** (bits - 1))
    assert kind == "keys"
    # Key members match case-insensitively too, as Go's encoding/json does (`Key`, `ROLLINGPERIOD`).
    return isinstance(value, list) and all(
        item is None or (isinstance(item, dict) and all(
            _canonical(name, KEY_FIELDS) is not None and _well_typed(KEY_FIELDS[_canonical(name, KEY_FIELDS)], v)
            for name, v in item.items()))
        for item in value)


def _field_value(kind: str) -> st.SearchStrategy[Any]:
    own = {"str": st.text(max_size=20), "bool": st.booleans(),
           "int32": st.integers(INT32_MIN - 2, INT32_MAX + 2), "int64": st.integers(-(2**63) - 2, 2**63 + 1),
           "keys": st.lists(st.none() | st.dictionaries(
               st.sampled_from([*KEY_FIELDS, "Key", "ROLLINGPERIOD", "regions"]),
               st.deferred(lambda: st.one_of(*(_field_value(k) for k in KEY_FIELDS.values()), ANY_JSON)),
               max_size=5), max_size=4)}[kind]
    return st.one_of(own, own, ANY_JSON)  # two parts own type, one part anything


PUBLISH_LIKE = st.dictionaries(
    st.sampled_from([*TOP_FIELDS, "regions", "appPackageName", "HMACKEY", "Traveler"]),
    st.deferred(lambda: st.one_of(*(_field_value(k) for k in TOP_FIELDS.values()))), max_size=8)


def _canonical(name: str, fields: dict[str, str]) -> str | None:
    for candidate in fields:
        if candidate.lower() == name.lower():
            return candidate
    return None


@settings(PROPERTY, max_examples=EXAMPLES["decode_json"])
@given(doc=st.one_of(PUBLISH_LIKE, PUBLISH_LIKE, ANY_JSON))
@example(doc={"temporaryExposureKeys": [{"rollingStartNumber": 0, "Key": ""}]})  # member names ignore case
def test_decoder_accepts_exactly_the_well_typed_bodies(doc: Any) -> None:
    body = json.dumps(doc).encode()
    # Independent verdict: an object (or null) whose every member names a field, case-insensitively,
    # and holds a value of that field's Go type.
    ok = doc is None or (isinstance(doc, dict) and all(
        _canonical(name, TOP_FIELDS) is not None and _well_typed(TOP_FIELDS[_canonical(name, TOP_FIELDS)], value)
        and (TOP_FIELDS[_canonical(name, TOP_FIELDS)] != "keys" or value is None or all(
            item is None or all(_canonical(n, KEY_FIELDS) is not None
                                and _well_typed(KEY_FIELDS[_canonical(n, KEY_FIELDS)], v) for n, v in item.items())
            for item in value))
        for name, value in doc.items()))
    if len(body) > MAX_BODY:
        with pytest.raises(WireError):
            decode_publish(body, MAX_BODY)
        return
    try:
        request = decode_publish(body, MAX_BODY)
    except WireError as exc:
        assert not ok, f"well-typed body refused: {exc.message}"
        assert exc.status == 400
        return
    assert ok, "badly typed body accepted"
    _assert_well_typed(request)


@st.composite
def publish_requests(draw: st.DrawFn) -> PublishRequest:
    keys = tuple(ExposureKeyInput(draw(st.text(max_size=30)), draw(st.integers(INT32_MIN, INT32_MAX)),
                                  draw(st.integers(INT32_MIN, INT32_MAX)), draw(st.integers(-(2**63), 2**63 - 1)))
                 for _ in range(draw(st.integers(0, 5))))
    return PublishRequest(keys=keys, health_authority_id=draw(st.text(max_size=20)),
                          verification_payload=draw(st.text(max_size=40)), hmac_key=draw(st.text(max_size=20)),
                          symptom_onset_interval=draw(st.integers(INT32_MIN, INT32_MAX)),
                          traveler=draw(st.booleans()), revision_token=draw(st.text(max_size=20)),
                          padding=draw(st.text(max_size=20)))


@settings(PROPERTY, max_examples=EXAMPLES["decode_roundtrip"])
@given(request=publish_requests(), data=st.data())
def test_decoder_round_trips_every_request(request: PublishRequest, data: st.DataObject) -> None:
    def name(canonical: str) -> str:  # Go matches field names case-insensitively
        return data.draw(st.sampled_from([canonical, canonical.lower(), canonical.upper()]))

    doc = {
        name("temporaryExposureKeys"): [
            {name("key"): k.key, name("rollingStartNumber"): k.rolling_start_number,
             name("rollingPeriod"): k.rolling_period, name("transmissionRisk"): k.transmission_risk}
            for k in request.keys],
        name("healthAuthorityID"): request.health_authority_id,
        name("verificationPayload"): request.verification_payload,
        name("hmacKey"): request.hmac_key,
        name("symptomOnsetInterval"): request.symptom_onset_interval,
        name("traveler"): request.traveler,
        name("revisionToken"): request.revision_token,
        name("padding"): request.padding,
    }
    ensure_ascii = data.draw(st.booleans())
    indent = data.draw(st.sampled_from([None, 0, 2]))
    body = json.dumps(doc, ensure_ascii=ensure_ascii, indent=indent).encode()
    # Lone surrogates cannot travel as UTF-8; Go turns their \u escapes into U+FFFD.
    expected = _replace_surrogates(request)
    assert decode_publish(body, 10 * MAX_BODY) == expected


def _fix(text: str) -> str:
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _replace_surrogates(r: PublishRequest) -> PublishRequest:
    return PublishRequest(
        keys=tuple(ExposureKeyInput(_fix(k.key), k.rolling_start_number, k.rolling_period, k.transmission_risk)
                   for k in r.keys),
        health_authority_id=_fix(r.health_authority_id), verification_payload=_fix(r.verification_payload),
        hmac_key=_fix(r.hmac_key), symptom_onset_interval=r.symptom_onset_interval, traveler=r.traveler,
        revision_token=_fix(r.revision_token), padding=_fix(r.padding))


# --- (a) transform ------------------------------------------------------------------------------------


CLAIMS = st.one_of(st.none(), st.builds(
    VerifiedClaims, health_authority_id=st.integers(1, 1000),
    report_type=st.sampled_from(["confirmed", "likely", "negative", "user-report"]),
    symptom_onset_interval=st.integers(0, INT32_MAX)))


@st.composite
def transform_inputs(draw: st.DrawFn) -> tuple[datetime, list[KeyCase], VerifiedClaims | None, int]:
    now = draw(NOWS)
    # Counts around both limits: 0 keys, 1..3 per start, 30, 31.
    n = draw(weighted((6, st.integers(0, 6)), (2, st.integers(7, 16)), (1, st.integers(28, 33))))
    cases = draw(st.lists(key_cases(now), min_size=n, max_size=n))
    if cases and draw(st.integers(0, 2)) == 0:
        # Make it likely that the keys are daily ones without overlap, so the happy path is well covered.
        today = interval(midnight(now))
        cases = [KeyCase(ExposureKeyInput(c.key.key, today - (i % 16) * DAY, DAY, c.key.transmission_risk % 9), c.raw)
                 for i, c in enumerate(cases)]
    claims = draw(CLAIMS)
    onset = draw(st.one_of(st.just(0), st.integers(interval(now) - 40 * DAY, interval(now) + DAY),
                           st.integers(INT32_MIN, INT32_MAX)))
    return now, cases, claims, onset


def _key_passes(case: KeyCase, now: datetime) -> bool:
    """Per-key rules of §2.7, in any order (the verdict does not depend on the order)."""
    k = case.key
    current = interval(now)
    oldest_end = interval(now - timedelta(hours=360))
    return (case.raw is not None and len(case.raw) == 16
            and 1 <= k.rolling_period <= 144
            and k.rolling_start_number + k.rolling_period > oldest_end
            and k.rolling_start_number <= current
            and 0 <= k.transmission_risk <= 8)


@settings(PROPERTY, max_examples=EXAMPLES["transform"])
@given(inputs=transform_inputs())
def test_transform_keeps_exactly_the_keys_that_satisfy_every_rule(inputs: Any) -> None:
    now, cases, claims, onset_in = inputs
    request = PublishRequest(keys=tuple(c.key for c in cases), symptom_onset_interval=onset_in)
    try:
        result = transform(request, app_name="com.example.app", regions=["us", " ca ", ""], claims=claims,
                           settings=SETTINGS, now=now)
    except PublishError as exc:
        # The only documented failure: 400 bad_request.
        assert (exc.status, exc.code) == (400, CODE_BAD_REQUEST)
        result = None
        failure = exc.message
    else:
        failure = ""

    onset = expected_onset(onset_in, claims, now)
    passing = [c for c in cases if _key_passes(c, now)]
    kept = [c for c in passing if abs(day_of(c.key.rolling_start_number) - day_of(onset)) <= 14]
    rejected = len(cases) - len(passing)

    # Request-level verdict, independently.
    if not cases or len(cases) > 30:
        event("refused: key count")
        assert result is None, "request with 0 or >30 keys accepted"
        return
    if not kept and rejected:
        event("refused: no usable key")
        assert result is None, "request with no usable key accepted"
        return
    per_start: dict[int, list[int]] = {}
    for c in kept:
        per_start.setdefault(c.key.rolling_start_number, []).append(c.key.rolling_period)
    starts = sorted(per_start)
    overlap = any(b < a + max(per_start[a]) for a, b in itertools.pairwise(starts))
    crowded = any(len(v) > 3 for v in per_start.values())
    if overlap or crowded:
        event("refused: overlap or crowded")
        assert result is None, "overlapping or crowded keys accepted"
        return
    assert result is not None, f"valid request refused: {failure}"
    event(f"accepted: {'some' if kept else 'no'} keys kept, {'some' if rejected else 'none'} rejected")

    # Every accepted row satisfies every rule, and every kept key is there, in request order.
    assert len(result.exposures) == len(kept) <= 30
    assert len(result.key_errors) == rejected
    assert len(result.warnings) == len(passing) - len(kept)
    current = interval(now)
    report_type = claims.report_type if claims else ""
    for c, e in zip(kept, result.exposures, strict=True):
        assert e.exposure_key == c.raw and len(e.exposure_key) == 16
        assert e.interval_number == c.key.rolling_start_number
        assert 1 <= e.interval_count == c.key.rolling_period <= 144
        assert e.interval_number <= current
        assert e.interval_number + e.interval_count > interval(now - timedelta(hours=360))
        backfill = {"confirmed": 2, "likely": 4, "negative": 6}.get(report_type, 0)
        assert e.transmission_risk == (c.key.transmission_risk or backfill)
        assert 0 <= e.transmission_risk <= 8
        assert e.report_type == report_type
        assert e.health_authority_id == (claims.health_authority_id if claims else None)
        assert e.days_since_symptom_onset == day_of(e.interval_number) - day_of(onset)
        assert -14 <= e.days_since_symptom_onset <= 14
        assert e.regions == ["CA", "US"]
        assert e.local_provenance is True and e.app_package_name == "com.example.app"
        end = e.interval_number + e.interval_count
        if end > current:  # still valid: embargoed until an hour after it expires
            embargo = datetime.fromtimestamp(end * 600, UTC) + timedelta(hours=1)
            assert e.created_at == hour_floor(embargo)
        else:
            assert e.created_at == hour_floor(now)


# --- (b) export encoder -------------------------------------------------------------------------------

KEY_ROW = st.tuples(
    st.binary(min_size=16, max_size=16),
    st.integers(0, 8),  # transmission risk
    st.integers(0, INT32_MAX),  # rolling start interval number
    st.integers(1, 144),  # rolling period
    st.sampled_from([0, 1, 2, 3, 4, 5]),  # report type enum code (0 = left out)
    st.one_of(st.none(), st.integers(-14, 14)),  # days since onset
)
WILD_ROW = st.tuples(  # anything protobuf can carry in these int32 / sint32 fields
    st.binary(min_size=16, max_size=16), st.integers(INT32_MIN, INT32_MAX), st.integers(INT32_MIN, INT32_MAX),
    st.integers(INT32_MIN, INT32_MAX), st.sampled_from([0, 1, 2, 3, 4, 5]),
    st.one_of(st.none(), st.integers(INT32_MIN, INT32_MAX)))
KEY_ID = st.text(alphabet=string.ascii_letters + string.digits + "_", max_size=8)


@st.composite
def headers(draw: st.DrawFn) -> ExportHeader:
    start = draw(st.integers(0, 2**40))
    size = draw(st.integers(1, 1000))
    infos = tuple(SignatureInfo(draw(KEY_ID), draw(KEY_ID)) for _ in range(draw(st.integers(0, 3))))
    return ExportHeader(start_timestamp=start, end_timestamp=start + draw(st.integers(0, 10**6)),
                        region=draw(st.text(max_size=6)), batch_num=draw(st.integers(1, size)), batch_size=size,
                        signature_infos=infos)


def _columns(rows: list[tuple]) -> KeyColumns:
    return KeyColumns.from_rows(rows) if rows else KeyColumns.empty()


@settings(PROPERTY, max_examples=EXAMPLES["export_roundtrip"])
@given(header=headers(), keys=st.lists(KEY_ROW, max_size=40), revised=st.lists(KEY_ROW, max_size=10))
def test_export_round_trip_gives_back_keys_and_metadata(header: ExportHeader, keys: list[tuple],
                                                        revised: list[tuple]) -> None:
    fast = encode_export_bin(header, _columns(keys), _columns(revised))
    assert fast == encode_export_bin(header, _columns(keys), _columns(revised), fast=False)
    sig = encode_export_sig([(info, b"\x30" * 70) for info in header.signature_infos],
                            header.batch_num, header.batch_size)
    parsed = read_export(build_zip(fast, sig))

    assert parsed.header == header
    assert [s.signature_info for s in parsed.signatures] == list(header.signature_infos)
    assert all((s.batch_num, s.batch_size) == (header.batch_num, header.batch_size) for s in parsed.signatures)
    for written, read in ((keys, parsed.keys), (revised, parsed.revised_keys)):
        # Written sorted by key bytes (stable), every field as given.
        expected = sorted(written, key=lambda r: r[0])
        got = [(k.key_data, k.transmission_risk, k.interval_number, k.interval_count, k.report_type, k.dsos)
               for k in read]
        assert got == expected


@settings(PROPERTY, max_examples=EXAMPLES["export_fast_vs_protobuf"])
@given(header=headers(), keys=st.lists(WILD_ROW, max_size=30), revised=st.lists(WILD_ROW, max_size=10),
       sort=st.booleans())
def test_fast_encoder_matches_protobuf_byte_for_byte(header: ExportHeader, keys: list[tuple], revised: list[tuple],
                                                     sort: bool) -> None:
    fast = encode_export_bin(header, _columns(keys), _columns(revised), sort=sort)
    slow = encode_export_bin(header, _columns(keys), _columns(revised), fast=False, sort=sort)
    assert fast == slow
    parsed = read_export(fast)
    got = [(k.key_data, k.transmission_risk, k.interval_number, k.interval_count, k.report_type, k.dsos)
           for k in parsed.keys]
    expected = sorted(keys, key=lambda r: r[0]) if sort else keys
    # An absent rolling_period reads back as the proto default 144, an absent start as 0: both as written.
    assert got == expected
    assert np.array_equal(parsed.key_columns().key, _columns(expected).key) if expected else not parsed.keys
