"""The simulator's pure parts: token bucket, population plan, request bodies, percentiles, URL parsing."""

from __future__ import annotations

import base64
import io
import random
from datetime import UTC, datetime

import jwt
import pytest

from enpipeline.simulate import (
    REVISIONS,
    HealthAuthority,
    Phone,
    ProgressLine,
    SimulateError,
    SimulateOptions,
    TokenBucket,
    chaff_body,
    parse_url,
    percentile,
    phone_keys,
    plan_population,
    publish_body,
)
from enpipeline.timeutil import interval_number, utc_midnight
from enpipeline.verification import compute_tekmacs
from tests import support

NOW = datetime(2026, 3, 10, 12, 7, 13, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def test_token_bucket_paces_to_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(5.0, clock=clock, sleep=clock.sleep)
    waits = [bucket.acquire() for _ in range(11)]
    assert waits[0] == 0.0  # the first token is there at once
    assert clock.t == pytest.approx(100.0 + 10 / 5.0)  # then one every 0.2 s
    clock.t += 10  # an idle spell refills only up to the burst
    assert bucket.acquire() == 0.0 and bucket.acquire() == pytest.approx(0.2)


def test_plan_population_mix_and_determinism():
    options = SimulateOptions(publishes=200, chaff_ratio=0.2, revision_ratio=0.1)
    phones, jobs = plan_population(options, random.Random(5))
    again, jobs_again = plan_population(options, random.Random(5))
    assert [(p.report_type, p.revise_to) for p in phones] == [(p.report_type, p.revise_to) for p in again]
    assert [j.kind for j in jobs] == [j.kind for j in jobs_again]

    revisers = [p for p in phones if p.revise_to]
    assert len(revisers) == 20
    for p in revisers:  # only transitions the reference allows
        assert p.revise_to in dict(REVISIONS[p.report_type])
    assert sum(j.kind == "chaff" for j in jobs) == 40 and sum(j.kind == "publish" for j in jobs) == 200
    chaff_at = [i for i, j in enumerate(jobs) if j.kind == "chaff"]
    assert min(chaff_at) < 40 and max(chaff_at) > 200  # mixed in among the publishes, not bunched
    assert {p.report_type for p in phones} == {"confirmed", "likely", "user-report"}


def test_phone_keys_are_full_days_of_the_last_two_weeks():
    today = interval_number(utc_midnight(NOW))
    keys = phone_keys(NOW, with_today_key=False)
    assert [k.rolling_start_number for k in keys] == [today - 144 * d for d in range(1, 15)]
    assert all(k.rolling_period == 144 and k.transmission_risk == 0 for k in keys)
    assert len({k.key for k in keys}) == 14 and all(len(base64.b64decode(k.key)) == 16 for k in keys)
    assert phone_keys(NOW, with_today_key=True)[0].rolling_start_number == today


def test_publish_body_carries_a_valid_certificate():
    key = support.new_signing_key()
    authority = HealthAuthority(key=key, issuer="iss", audience="aud", kid="v7", app="com.example.app")
    assert "BEGIN" not in repr(authority)
    phone = Phone(index=0, report_type="likely", revise_to="confirmed", onset_days_ago=3, traveler=True,
                  with_today_key=False, keys=phone_keys(NOW, False))
    body = publish_body(authority, phone, "likely", NOW, random.Random(1))
    assert body["healthAuthorityID"] == "com.example.app" and body["traveler"] is True
    assert 1368 <= len(body["padding"]) <= 2732 and body["revisionToken"]
    onset = interval_number(utc_midnight(NOW)) - 3 * 144
    assert body["symptomOnsetInterval"] == onset
    header = jwt.get_unverified_header(body["verificationPayload"])
    assert header == {"alg": "ES256", "kid": "v7", "typ": "JWT"}
    claims = jwt.decode(body["verificationPayload"], key.public_key(), algorithms=["ES256"], audience="aud",
                        options={"verify_exp": False, "verify_iat": False})
    assert claims["iss"] == "iss" and claims["reportType"] == "likely" and claims["symptomOnsetInterval"] == onset
    tekmac = compute_tekmacs(phone.keys, base64.b64decode(body["hmacKey"]))[0]
    assert claims["tekmac"] == base64.b64encode(tekmac).decode()


def test_chaff_bodies_vary_in_size():
    sizes = {len(str(chaff_body("app", NOW, random.Random(i)))) for i in range(10)}
    assert len(sizes) > 5


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99), percentile(values, 100)) == \
        (50.0, 95.0, 99.0, 100.0)
    assert percentile([], 50) == 0.0 and percentile([3.0], 99) == 3.0


def test_parse_url():
    assert str(parse_url("http://localhost:8080")) == "http://localhost:8080/v1/publish"
    assert str(parse_url("https://keys.example.org/")) == "https://keys.example.org:443/v1/publish"
    assert str(parse_url("http://h:1/custom/publish")) == "http://h:1/custom/publish"
    for bad in ("localhost:8080", "ftp://h", "http://h:99999"):
        with pytest.raises(SimulateError):
            parse_url(bad)


def test_options_report_every_problem_at_once():
    with pytest.raises(SimulateError) as exc:
        SimulateOptions(publishes=0, chaff_ratio=-1, revision_ratio=2).validate()
    assert str(exc.value).count("must") == 3


def test_progress_line_rewrites_one_line():
    out = io.StringIO()
    ticks = iter([0.0, 0.05, 0.5, 1.0])
    line = ProgressLine(out, 10, clock=lambda: next(ticks))
    line.update(1, 0, 0)  # 0.05 s: throttled
    line.update(5, 1, 0)  # 0.5 s
    line.update(10, 1, 2, final=True)
    text = out.getvalue()
    assert text.startswith("\r5/10 requests") and text.endswith("\n") and text.count("\r") == 2
    assert "10/10 requests" in text and "rejected 1" in text and "errors 2" in text
