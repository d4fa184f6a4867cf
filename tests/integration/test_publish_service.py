"""PublishService on a real Postgres: storage, revision rules, revision tokens, concurrency, partitions."""

from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from enpipeline.db import apps, authorities
from enpipeline.db import exposures as exposures_db
from enpipeline.errors import PublishError
from enpipeline.model import AuthorizedApp, Exposure, ExposureKeyInput, PublishResult, RevisableKey
from enpipeline.proto import revision_pb2
from enpipeline.publish.service import PublishService, create_publish_service
from enpipeline.publish.wire import decode_publish
from enpipeline.timeutil import interval_number, truncate
from tests import support
from tests.support import Certificate, day_keys, fixed_now, publish_body, random_key_b64

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
INVALID_TOKEN = ("invalid_revision_token", "revision token is invalid")
MISSING_TOKEN = ("missing_revision_token", "no revision token, but sent existing keys")


# -- helpers ----------------------------------------------------------------------------------------


@pytest.fixture
def service(settings, engine: Engine, seeded) -> PublishService:
    return create_publish_service(settings, engine)


def cert(seeded: dict, report_type: str) -> Certificate:
    return Certificate(key=seeded["key"], report_type=report_type)


def publish(service: PublishService, keys: list[ExposureKeyInput], certificate: Certificate | None,
            now: datetime, **kwargs) -> PublishResult:
    body = publish_body(keys, certificate, now, **kwargs)
    return service.publish(decode_publish(json.dumps(body).encode(), 64000), now)


def publish_error(service: PublishService, keys: list[ExposureKeyInput], certificate: Certificate | None,
                  now: datetime, **kwargs) -> PublishError:
    with pytest.raises(PublishError) as info:
        publish(service, keys, certificate, now, **kwargs)
    return info.value


def kb(key: ExposureKeyInput) -> bytes:
    return base64.b64decode(key.key)


def entry(key: ExposureKeyInput) -> RevisableKey:
    return RevisableKey(kb(key), key.rolling_start_number, key.rolling_period)


def rows(engine: Engine, keys: list[ExposureKeyInput]) -> dict[bytes, Exposure]:
    with engine.connect() as conn:
        return exposures_db.read_keys(conn, [kb(k) for k in keys])


def row_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return exposures_db.count(conn)


def token_entries(service: PublishService, token: str) -> list[RevisableKey]:
    assert token, "expected a revision token"
    return service.codec.decrypt(base64.b64decode(token))


def today_interval(now: datetime) -> int:
    return interval_number(truncate(now, DAY))


def sorted_index(keys: list[ExposureKeyInput], key: ExposureKeyInput) -> int:
    """Index of ``key`` in the order the reference reports per-key errors (sorted by base64 text)."""
    return sorted(keys, key=lambda k: k.key.encode()).index(key)


def ordered_pair() -> tuple[ExposureKeyInput, ExposureKeyInput]:
    """Two day-old full-day keys (same start, allowed), the first sorting before the second."""
    a, b = sorted([random_key_b64(), random_key_b64()])
    start = today_interval(fixed_now()) - 144
    return ExposureKeyInput(a, start, 144), ExposureKeyInput(b, start, 144)


def add_app(engine: Engine, name: str, regions: tuple[str, ...], ha_ids: tuple[int, ...], **flags) -> None:
    with engine.begin() as conn:
        apps.upsert_app(conn, AuthorizedApp(app_package_name=name, allowed_regions=regions,
                                            allowed_health_authority_ids=ha_ids, **flags))


# -- plain publish -----------------------------------------------------------------------------------


def test_verified_publish_stores_every_key_with_claims_applied(service, engine, seeded):
    now = fixed_now()
    keys = day_keys(now)
    keys[3] = replace(keys[3], transmission_risk=5)  # a non-zero TR sent by the app is kept

    result = publish(service, keys, cert(seeded, "confirmed"), now)

    assert (result.inserted, result.revised, result.dropped) == (14, 0, 0)
    assert result.partial_failure == ""
    assert result.warnings == []
    stored = rows(engine, keys)
    assert len(stored) == 14
    assert row_count(engine) == 14
    today = today_interval(now)
    for k in keys:
        row = stored[kb(k)]
        days_back = (today - k.rolling_start_number) // 144
        assert row.report_type == "confirmed"
        assert row.transmission_risk == (5 if k is keys[3] else 2)
        # No onset in request or certificate: default onset is 4 days before now.
        assert row.days_since_symptom_onset == 4 - days_back
        assert row.regions == ["US"]
        assert row.health_authority_id == seeded["ha_id"]
        assert row.local_provenance is True
        assert row.app_package_name == support.APP_ID
        assert row.traveler is False
        assert (row.interval_number, row.interval_count) == (k.rolling_start_number, 144)
        assert row.created_at == truncate(now, HOUR)
        assert row.revised_at is None and row.revised_report_type is None
    assert sorted(e.key for e in token_entries(service, result.revision_token)) == sorted(kb(k) for k in keys)


def test_likely_report_backfills_transmission_risk_4(service, engine, seeded):
    now = fixed_now()
    keys = day_keys(now, 2)
    publish(service, keys, cert(seeded, "likely"), now)
    assert {r.transmission_risk for r in rows(engine, keys).values()} == {4}
    assert {r.report_type for r in rows(engine, keys).values()} == {"likely"}


def test_still_valid_keys_are_embargoed_until_after_they_expire(service, engine, seeded):
    now = fixed_now()  # 12:07:13 UTC
    today = today_interval(now)
    full_today = ExposureKeyInput(random_key_b64(), today, 144)  # valid until tomorrow 00:00
    short_today = ExposureKeyInput(random_key_b64(), today, 73)  # valid until today 12:10
    past = day_keys(now, 2)

    result = publish(service, [*past, full_today, short_today], cert(seeded, "confirmed"), now)

    assert result.inserted == 4
    stored = rows(engine, [*past, full_today, short_today])
    midnight = truncate(now, DAY)
    assert stored[kb(full_today)].created_at == midnight + DAY + HOUR
    assert stored[kb(short_today)].created_at == midnight + timedelta(hours=13)
    for k in past:
        assert stored[kb(k)].created_at == truncate(now, HOUR)


def test_partial_failure_stores_only_the_good_keys(service, engine, seeded):
    now = fixed_now()
    good = day_keys(now, 3)
    short = ExposureKeyInput(base64.b64encode(os.urandom(10)).decode(), today_interval(now) - 144 * 5, 144)
    risky = ExposureKeyInput(random_key_b64(), today_interval(now) - 144 * 6, 144, 9)
    keys = [*good, short, risky]

    result = publish(service, keys, cert(seeded, "confirmed"), now)

    assert result.inserted == 3
    errors = sorted([
        (sorted_index(keys, short), "invalid key length, 10, must be 16"),
        (sorted_index(keys, risky), "invalid transmission risk: 9, must be >= 0 && <= 8"),
    ])
    assert result.partial_failure == (
        "2 errors occurred:\n"
        f"\t* key {errors[0][0]} cannot be imported: {errors[0][1]}\n"
        f"\t* key {errors[1][0]} cannot be imported: {errors[1][1]}\n\n")
    assert set(rows(engine, keys)) == {kb(k) for k in good}
    assert row_count(engine) == 3
    assert {e.key for e in token_entries(service, result.revision_token)} == {kb(k) for k in good}


def test_negative_initial_report_is_not_stored_but_is_in_the_token(service, engine, seeded):
    now = fixed_now()
    keys = day_keys(now)

    result = publish(service, keys, cert(seeded, "negative"), now)

    assert result.inserted == 0
    assert row_count(engine) == 0
    assert sorted(token_entries(service, result.revision_token), key=lambda e: e.key) == sorted(
        (entry(k) for k in keys), key=lambda e: e.key)


# -- revisions --------------------------------------------------------------------------------------


def test_likely_to_confirmed_revision_with_token(service, engine, seeded, ha_key):
    second_key = support.new_signing_key()
    with engine.begin() as conn:
        ha2 = authorities.add_authority(conn, issuer="test-ha-2", audience=support.AUDIENCE, name="Second HA")
        authorities.add_key(conn, ha2, version=support.KID, public_key_pem=support.public_pem(second_key),
                            from_timestamp=datetime(2020, 1, 1, tzinfo=UTC))
    add_app(engine, support.APP_ID, ("US",), (seeded["ha_id"], ha2))
    now1 = fixed_now()
    today = today_interval(now1)
    keys = day_keys(now1)
    first = publish(service, keys, cert(seeded, "likely"), now1)
    assert first.inserted == 14

    now2 = now1 + 2 * HOUR
    new_key = ExposureKeyInput(random_key_b64(), today, 72)  # ended 12:00, so not embargoed at 14:07
    onset = interval_number(truncate(now1, DAY) - 5 * DAY)
    second = publish(service, [*keys, new_key], Certificate(key=second_key, issuer="test-ha-2"), now2,
                     revision_token=first.revision_token, symptom_onset_interval=onset)

    assert second.inserted == 1  # only the new key; revisions are not "inserted"
    assert second.revised == 14
    assert second.partial_failure == ""
    stored = rows(engine, [*keys, new_key])
    assert row_count(engine) == 15
    for k in keys:
        row = stored[kb(k)]
        days_back = (today - k.rolling_start_number) // 144
        # The original values stay as they were.
        assert (row.report_type, row.transmission_risk) == ("likely", 4)
        assert row.created_at == truncate(now1, HOUR)
        assert row.days_since_symptom_onset == 4 - days_back
        # The revision.
        assert row.revised_report_type == "confirmed"
        assert row.revised_at == truncate(now2, HOUR)
        assert row.revised_transmission_risk == 2
        assert row.revised_days_since_symptom_onset == 5 - days_back
        assert row.health_authority_id == ha2
    fresh = stored[kb(new_key)]
    assert (fresh.report_type, fresh.transmission_risk, fresh.days_since_symptom_onset) == ("confirmed", 2, 5)
    assert fresh.created_at == truncate(now2, HOUR)
    assert fresh.revised_at is None
    old = token_entries(service, first.revision_token)
    assert token_entries(service, second.revision_token) == [*old, entry(new_key)]


def test_existing_keys_without_token_are_refused_with_warnings(service, engine, seeded):
    now = fixed_now()
    today = today_interval(now)
    existing = ExposureKeyInput(random_key_b64(), today - 2 * 144, 144)
    publish(service, [existing], cert(seeded, "likely"), now)
    before = rows(engine, [existing])

    onset = today - 16 * 144  # day -1 key: 15 days after onset -> dropped with a warning
    too_far = ExposureKeyInput(random_key_b64(), today - 144, 144)
    new_key = ExposureKeyInput(random_key_b64(), today - 3 * 144, 144)
    keys = [existing, too_far, new_key]
    err = publish_error(service, keys, cert(seeded, "confirmed"), now, symptom_onset_interval=onset)

    assert (err.status, err.code, err.message) == (400, *MISSING_TOKEN)
    assert err.warnings == [
        f"key {sorted_index(keys, too_far)} symptom onset is too large, 15 > 14 - saving without this key"]
    assert rows(engine, keys) == before  # nothing revised, the new key not inserted


def test_same_type_republish_without_token_is_refused(service, engine, seeded):
    now = fixed_now()
    keys = day_keys(now, 2)
    publish(service, keys, cert(seeded, "confirmed"), now)
    err = publish_error(service, keys, cert(seeded, "confirmed"), now + HOUR)
    assert (err.status, err.code, err.message) == (400, *MISSING_TOKEN)


def _valid_token_tampered(service: PublishService, keys: list[ExposureKeyInput], now: datetime) -> str:
    raw = bytearray(base64.b64decode(service.codec.encrypt([entry(k) for k in keys], now)))
    raw[-1] ^= 0x01  # last byte of the GCM tag; the envelope still parses
    return base64.b64encode(bytes(raw)).decode()


def _garbage_token(_service, _keys, _now) -> str:
    return base64.b64encode(bytes(range(1, 41))).decode()


def _unknown_kid_token(_service, _keys, _now) -> str:
    envelope = revision_pb2.RevisionToken(kid="424242", data=os.urandom(80))
    return base64.b64encode(envelope.SerializeToString()).decode()


@pytest.mark.parametrize("make_token", [_garbage_token, _unknown_kid_token, _valid_token_tampered],
                         ids=["garbage", "unknown-kid", "tampered"])
def test_undecryptable_token_with_existing_keys_is_invalid(service, engine, seeded, make_token):
    now = fixed_now()
    keys = day_keys(now, 3)
    publish(service, keys, cert(seeded, "likely"), now)
    before = rows(engine, keys)

    token = make_token(service, keys, now)
    err = publish_error(service, keys, cert(seeded, "confirmed"), now + HOUR, revision_token=token)

    assert (err.status, err.code, err.message) == (400, *INVALID_TOKEN)
    assert rows(engine, keys) == before


def test_token_that_is_not_base64_counts_as_no_token(service, engine, seeded):
    now = fixed_now()
    keys = day_keys(now, 3)
    publish(service, keys, cert(seeded, "likely"), now)
    err = publish_error(service, keys, cert(seeded, "confirmed"), now + HOUR, revision_token="not*base64!")
    assert (err.status, err.code, err.message) == (400, *MISSING_TOKEN)


@pytest.mark.parametrize("token", ["not*base64!", base64.b64encode(bytes(range(1, 41))).decode()],
                         ids=["bad-base64", "undecryptable"])
def test_bad_token_does_not_matter_when_no_key_exists(service, engine, seeded, token):
    now = fixed_now()
    keys = day_keys(now)
    result = publish(service, keys, cert(seeded, "confirmed"), now, revision_token=token)
    assert result.inserted == 14
    assert row_count(engine) == 14
    assert {e.key for e in token_entries(service, result.revision_token)} == {kb(k) for k in keys}


def test_token_covering_only_some_existing_keys(settings, service, engine, seeded):
    now = fixed_now()
    a, b = ordered_pair()
    token_a = publish(service, [a], cert(seeded, "likely"), now).revision_token
    publish(service, [b], cert(seeded, "likely"), now)
    before = rows(engine, [a, b])

    err = publish_error(service, [a, b], cert(seeded, "confirmed"), now + HOUR, revision_token=token_a)
    assert (err.status, err.code, err.message) == (400, *INVALID_TOKEN)
    assert rows(engine, [a, b]) == before

    partial = create_publish_service(settings.replace(allow_partial_revisions=True), engine)
    result = partial.publish(decode_publish(json.dumps(publish_body(
        [a, b], cert(seeded, "confirmed"), now + HOUR, revision_token=token_a)).encode(), 64000), now + HOUR)

    assert (result.inserted, result.revised, result.dropped) == (0, 1, 1)
    after = rows(engine, [a, b])
    assert after[kb(a)].revised_report_type == "confirmed"
    assert after[kb(b)] == before[kb(b)]  # silently dropped
    assert token_entries(partial, result.revision_token) == [entry(a)]


def test_token_metadata_different_from_stored_is_invalid(service, engine, seeded):
    now = fixed_now()
    key = day_keys(now, 1)[0]
    publish(service, [key], cert(seeded, "likely"), now)
    before = rows(engine, [key])

    forged = service.codec.encrypt([RevisableKey(kb(key), key.rolling_start_number, 100)], now)
    err = publish_error(service, [key], cert(seeded, "confirmed"), now + HOUR, revision_token=forged)

    assert (err.status, err.code, err.message) == (400, *INVALID_TOKEN)
    assert rows(engine, [key]) == before


@pytest.mark.parametrize(("start_delta", "period"), [(0, 100), (1, 144)], ids=["interval-count", "interval-number"])
def test_incoming_metadata_different_from_stored_is_internal_error(service, engine, seeded, start_delta, period):
    now = fixed_now()
    key = day_keys(now, 1)[0]
    token = publish(service, [key], cert(seeded, "likely"), now).revision_token
    before = rows(engine, [key])

    changed = replace(key, rolling_start_number=key.rolling_start_number + start_delta, rolling_period=period)
    err = publish_error(service, [changed], cert(seeded, "confirmed"), now + HOUR, revision_token=token)

    assert (err.status, err.code, err.message) == (400, "internal_error", "Internal Server Error")
    assert rows(engine, [key]) == before


def test_illegal_transition_confirmed_to_likely(service, engine, seeded):
    now = fixed_now()
    key = day_keys(now, 1)[0]
    token = publish(service, [key], cert(seeded, "confirmed"), now).revision_token
    before = rows(engine, [key])
    extra = ExposureKeyInput(random_key_b64(), key.rolling_start_number - 144, 144)

    err = publish_error(service, [key, extra], cert(seeded, "likely"), now + HOUR, revision_token=token)

    assert (err.status, err.code) == (400, "invalid_report_type_transition")
    assert err.message == 'invalid report type transition: cannot transition from "confirmed" to "likely"'
    assert rows(engine, [key, extra]) == before  # one transaction: the new key is not stored either


def test_second_revision_is_refused_and_repeating_the_first_is_a_no_op(service, engine, seeded):
    now = fixed_now()
    keys = day_keys(now, 2)
    t1 = publish(service, keys, cert(seeded, "likely"), now).revision_token
    second = publish(service, keys, cert(seeded, "confirmed"), now + HOUR, revision_token=t1)
    assert second.revised == 2
    revised = rows(engine, keys)

    err = publish_error(service, keys, cert(seeded, "negative"), now + 2 * HOUR, revision_token=second.revision_token)
    assert (err.status, err.code, err.message) == (400, "key_already_revised", "key was already revised")
    assert rows(engine, keys) == revised

    again = publish(service, keys, cert(seeded, "confirmed"), now + 3 * HOUR, revision_token=second.revision_token)
    assert (again.inserted, again.revised) == (0, 0)
    assert rows(engine, keys) == revised


def test_revision_to_negative_is_stored_as_revision(service, engine, seeded):
    now = fixed_now()
    keys = day_keys(now, 2)
    t1 = publish(service, keys, cert(seeded, "likely"), now).revision_token
    result = publish(service, keys, cert(seeded, "negative"), now + HOUR, revision_token=t1)
    assert result.revised == 2
    for row in rows(engine, keys).values():
        assert (row.revised_report_type, row.revised_transmission_risk) == ("negative", 6)


def test_same_type_republish_is_a_no_op_that_still_returns_a_token(service, engine, seeded):
    now = fixed_now()
    keys = day_keys(now, 3)
    first = publish(service, keys, cert(seeded, "confirmed"), now)
    before = rows(engine, keys)

    again = publish(service, keys, cert(seeded, "confirmed"), now + HOUR, revision_token=first.revision_token)

    assert (again.inserted, again.revised, again.dropped) == (0, 0, 0)
    assert again.partial_failure == ""
    assert rows(engine, keys) == before
    assert row_count(engine) == 3
    assert again.revision_token != first.revision_token  # freshly sealed ...
    assert token_entries(service, again.revision_token) == token_entries(service, first.revision_token)  # same keys


def test_revision_only_publish_returns_a_new_token_with_the_old_entries(service, engine, seeded):
    now = fixed_now()
    keys = day_keys(now)
    first = publish(service, keys, cert(seeded, "likely"), now)
    old = token_entries(service, first.revision_token)
    assert len(old) == 14

    result = publish(service, keys[:2], cert(seeded, "confirmed"), now + HOUR, revision_token=first.revision_token)

    assert (result.inserted, result.revised) == (0, 2)
    assert result.revision_token and result.revision_token != first.revision_token
    assert token_entries(service, result.revision_token) == old


def test_new_token_is_old_entries_then_new_keys_deduplicated(service, engine, seeded):
    now = fixed_now()
    a = ExposureKeyInput(random_key_b64(), today_interval(now) - 2 * 144, 144)
    b, c = ordered_pair()  # both day -1; the same start interval is allowed
    first = publish(service, [a, b], cert(seeded, "likely"), now)
    old = token_entries(service, first.revision_token)
    assert sorted(e.key for e in old) == sorted([kb(a), kb(b)])

    result = publish(service, [b, c], cert(seeded, "confirmed"), now + HOUR, revision_token=first.revision_token)

    assert (result.inserted, result.revised) == (1, 1)
    assert token_entries(service, result.revision_token) == [*old, entry(c)]


def test_bypass_revision_token_app_revises_without_token(service, engine, seeded):
    add_app(engine, "com.example.bypass", ("US",), (seeded["ha_id"],), bypass_revision_token=True)
    now = fixed_now()
    keys = day_keys(now, 3)
    publish(service, keys, cert(seeded, "likely"), now, app_id="com.example.bypass")

    result = publish(service, keys, cert(seeded, "confirmed"), now + HOUR, app_id="com.example.bypass")

    assert result.revised == 3
    assert {r.revised_report_type for r in rows(engine, keys).values()} == {"confirmed"}
    # The same keys through an app that does not bypass need the token.
    err = publish_error(service, keys, cert(seeded, "negative"), now + HOUR)
    assert err.code == "missing_revision_token"


def test_revising_a_key_of_other_provenance_is_internal_error(service, engine, seeded):
    now = fixed_now()
    key = day_keys(now, 1)[0]
    imported = Exposure(exposure_key=kb(key), transmission_risk=4, app_package_name="exportimport",
                        regions=["US"], traveler=False, interval_number=key.rolling_start_number,
                        interval_count=144, created_at=truncate(now, HOUR), local_provenance=False,
                        report_type="likely", days_since_symptom_onset=0)
    with engine.begin() as conn:
        assert exposures_db.insert_exposures(conn, [imported]) == 1
    before = rows(engine, [key])

    token = service.codec.encrypt([entry(key)], now)
    err = publish_error(service, [key], cert(seeded, "confirmed"), now + HOUR, revision_token=token)

    assert (err.status, err.code, err.message) == (400, "internal_error", "Internal Server Error")
    assert rows(engine, [key]) == before


def test_regions_are_unioned_on_revision(service, engine, seeded):
    add_app(engine, "com.example.ca", ("CA",), (seeded["ha_id"],))
    now = fixed_now()
    keys = day_keys(now, 2)
    token = publish(service, keys, cert(seeded, "likely"), now).revision_token

    result = publish(service, keys, cert(seeded, "confirmed"), now + HOUR, app_id="com.example.ca",
                     revision_token=token)

    assert result.revised == 2
    for row in rows(engine, keys).values():
        assert sorted(row.regions) == ["CA", "US"]
        assert row.app_package_name == support.APP_ID  # the row still belongs to the first app


def test_token_errors_win_over_revision_errors(service, engine, seeded):
    """The reference checks the token for every existing key before it applies any revision rule."""
    now = fixed_now()
    a, b = ordered_pair()  # a is processed first
    token_a = publish(service, [a], cert(seeded, "confirmed"), now).revision_token
    publish(service, [b], cert(seeded, "confirmed"), now)

    # a: in the token but confirmed -> likely is illegal; b: not in the token at all.
    err = publish_error(service, [a, b], cert(seeded, "likely"), now + HOUR, revision_token=token_a)

    assert (err.code, err.message) == INVALID_TOKEN


def test_stale_old_token_entries_are_dropped_from_the_new_token(service, engine, seeded):
    now = fixed_now()
    min_interval = interval_number(now - timedelta(hours=360))
    stale = RevisableKey(os.urandom(16), min_interval - 145, 144)  # ends one interval before the window
    edge = RevisableKey(os.urandom(16), min_interval - 144, 144)  # ends exactly at the window: kept
    fresh = RevisableKey(os.urandom(16), today_interval(now) - 3 * 144, 144)
    old_token = service.codec.encrypt([stale, edge, fresh], now)
    keys = day_keys(now, 2)

    result = publish(service, keys, cert(seeded, "confirmed"), now, revision_token=old_token)

    assert result.inserted == 2
    entries = token_entries(service, result.revision_token)
    assert entries[:2] == [edge, fresh]
    assert sorted(e.key for e in entries[2:]) == sorted(kb(k) for k in keys)
    assert stale.key not in {e.key for e in entries}


# -- concurrency ------------------------------------------------------------------------------------


def _run_together(calls):
    """Start every call at the same moment; returns each call's result or PublishError."""
    barrier = threading.Barrier(len(calls))
    outcomes: list[object] = [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            outcomes[i] = call()
        except PublishError as exc:
            outcomes[i] = exc
        except Exception as exc:  # surfaced by the assertions below
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return outcomes


def _duplicate_keys(engine: Engine) -> list:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT exposure_key, count(*) FROM exposure GROUP BY exposure_key HAVING count(*) > 1")).all()


def test_concurrent_publishes_of_the_same_keys_store_each_key_once(service, engine, seeded):
    now = fixed_now()
    rounds = 5
    for _ in range(rounds):
        keys = day_keys(now)
        raw = json.dumps(publish_body(keys, cert(seeded, "confirmed"), now)).encode()

        outcomes = _run_together([lambda raw=raw: service.publish(decode_publish(raw, 64000), now)] * 2)

        successes = [o for o in outcomes if isinstance(o, PublishResult)]
        failures = [o for o in outcomes if not isinstance(o, PublishResult)]
        assert len(successes) == 1, outcomes
        assert successes[0].inserted == 14
        # The loser saw every key as already stored (and had no token to revise them with).
        assert len(failures) == 1 and isinstance(failures[0], PublishError), outcomes
        assert failures[0].code == "missing_revision_token"
        assert len(rows(engine, keys)) == 14
    assert _duplicate_keys(engine) == []
    assert row_count(engine) == 14 * rounds


def test_concurrent_identical_confirmed_publishes_with_token(service, engine, seeded):
    """Two revisions racing on the same keys: exactly one revises, the other sees them already revised."""
    now = fixed_now()
    keys = day_keys(now)
    token = publish(service, keys, cert(seeded, "likely"), now).revision_token
    raw = json.dumps(publish_body(keys, cert(seeded, "confirmed"), now + HOUR, revision_token=token)).encode()

    outcomes = _run_together([lambda: service.publish(decode_publish(raw, 64000), now + HOUR)] * 2)

    assert all(isinstance(o, PublishResult) for o in outcomes), outcomes
    assert sorted(o.revised for o in outcomes) == [0, 14]  # the second one is a no-op, not a double update
    assert {r.revised_report_type for r in rows(engine, keys).values()} == {"confirmed"}
    assert _duplicate_keys(engine) == []


def test_many_concurrent_distinct_publishes_are_all_stored(service, engine, seeded):
    now = fixed_now()
    batches = [day_keys(now) for _ in range(10)]
    bodies = [json.dumps(publish_body(keys, cert(seeded, "confirmed"), now)).encode() for keys in batches]

    outcomes = _run_together([lambda raw=raw: service.publish(decode_publish(raw, 64000), now) for raw in bodies])

    assert all(isinstance(o, PublishResult) and o.inserted == 14 for o in outcomes), outcomes
    assert row_count(engine) == 140
    for keys in batches:
        assert len(rows(engine, keys)) == 14
    assert _duplicate_keys(engine) == []


# -- partitions -------------------------------------------------------------------------------------


def _partition(engine: Engine, day) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT to_regclass(:n)::text"), {"n": f"exposure_p{day:%Y%m%d}"}).scalar_one()


@pytest.mark.parametrize("days_ahead", [2, 40], ids=["dropped-partition", "beyond-partitions"])
def test_publish_creates_a_missing_day_partition(service, engine, seeded, days_ahead):
    now = fixed_now() + days_ahead * DAY
    name = f"exposure_p{now:%Y%m%d}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))
    assert _partition(engine, now) is None
    keys = day_keys(now)

    try:
        result = publish(service, keys, cert(seeded, "confirmed"), now)

        assert result.inserted == 14
        assert _partition(engine, now) == name
        with engine.connect() as conn:
            assert conn.execute(sa.text(f'SELECT count(*) FROM "{name}"')).scalar_one() == 14
    finally:
        if days_ahead > 3:  # leave the session's partition layout as migrate made it
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))


# -- revision token sealing failure ------------------------------------------------------------------


def test_unusable_revision_key_does_not_fail_a_committed_publish(service, engine, seeded):
    """The reference only logs a MakeRevisionToken failure and answers without a token."""
    from enpipeline.db.revision_keys import PgRevisionKeyStore

    now = fixed_now()
    # The newest allowed key is the effective one; its wrapped DEK cannot be unwrapped.
    PgRevisionKeyStore(engine).insert(os.urandom(16), os.urandom(60), now)
    keys = day_keys(now, 3)

    result = publish(service, keys, cert(seeded, "confirmed"), now)

    assert result.inserted == 3
    assert result.revision_token == ""
    assert len(rows(engine, keys)) == 3
