"""The federation Fetch server over real gRPC (127.0.0.1) against real Postgres: auth, filters, paging, cursors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import jwt
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from enpipeline.db import exposures
from enpipeline.db import federation_out as fo
from enpipeline.federation import cursor
from enpipeline.federation.auth import FederationAuthorization, mint_token
from enpipeline.federation.server import build_server
from enpipeline.model import Exposure
from enpipeline.proto import federation_pb2 as pb
from enpipeline.proto import federation_pb2_grpc as pb_grpc
from enpipeline.timeutil import interval_number, truncate
from tests import logscan, support

HOUR = timedelta(hours=1)
NOW = support.fixed_now()            # 12:07:13 today, UTC
OPEN = truncate(NOW, HOUR)           # the open window: never served
W1, W2, W3 = OPEN - 3 * HOUR, OPEN - 2 * HOUR, OPEN - HOUR
ISS, SUB, PARTNER = "https://partner-a.example", "fetcher", "partner-a"
APP = "com.example.test"


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def key(n: int, prefix: int = 0) -> bytes:
    """A 16-byte key whose order is (prefix, n): lets a test place keys before or after a cursor."""
    return bytes([prefix]) + n.to_bytes(15, "big")


def exposure(k: bytes, at: datetime, *, regions=("US",), traveler=False, local=True, report_type="confirmed",
             dsos=None, app=APP, tr=2, **extra) -> Exposure:
    return Exposure(exposure_key=k, transmission_risk=tr, app_package_name=app, regions=list(regions),
                    traveler=traveler, interval_number=interval_number(at - timedelta(days=2)), interval_count=144,
                    created_at=at, local_provenance=local, report_type=report_type, days_since_symptom_onset=dsos,
                    **extra)


def insert(engine, rows: list[Exposure]) -> None:
    with engine.begin() as conn:
        exposures.insert_exposures(conn, rows)


def delete(engine, keys: list[bytes]) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM exposure WHERE exposure_key = ANY(:k)"), {"k": keys})


def public_pem(private_key) -> str:
    return support.public_pem(private_key)


def private_pem(private_key) -> bytes:
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


@pytest.fixture
def fed_engine(engine):
    """The emptied database, with the federation tables (not in conftest's list) emptied too."""
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE federation_out_authorization, federation_in_query, export_importer"
                             " RESTART IDENTITY CASCADE"))
    exposures.PartitionGuard(engine).ensure([W1 - timedelta(days=1), OPEN, OPEN + timedelta(days=1)])
    return engine


@pytest.fixture
def partner_key():
    return support.new_signing_key()


def authorize(engine, private_key, *, issuer=ISS, subject=SUB, partner=PARTNER, audience=None, include=(),
              exclude=()) -> FederationAuthorization:
    auth = FederationAuthorization(issuer=issuer, subject=subject, partner=partner,
                                   public_key_pem=public_pem(private_key), audience=audience,
                                   include_regions=tuple(include), exclude_regions=tuple(exclude))
    with engine.begin() as conn:
        fo.upsert_authorization(conn, auth, now=NOW)
    return auth


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def stub(fed_engine, settings, clock) -> Iterator[pb_grpc.FederationStub]:
    server, port = build_server(settings, fed_engine, "127.0.0.1", 0, clock=clock, max_workers=4)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.FederationStub(channel)
    finally:
        channel.close()
        server.stop(None)


@pytest.fixture
def token(fed_engine, partner_key, settings) -> str:
    """A valid bearer token of the default authorization (no includes or excludes, default audience)."""
    authorize(fed_engine, partner_key)
    return make_token(partner_key, settings)


def make_token(private_key, settings, *, now: datetime = NOW, **claims) -> str:
    base = {"iss": ISS, "sub": SUB, "aud": settings.federation_audience, "iat": int(now.timestamp()),
            "exp": int(now.timestamp()) + 300}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, private_key, algorithm="ES256")


def fetch(stub, token: str | None, *, metadata=None, **request) -> pb.FederationFetchResponse:
    if metadata is None:
        metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    return stub.Fetch(pb.FederationFetchRequest(**request), metadata=metadata, timeout=10)


def fetch_error(stub, token, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        fetch(stub, token, **kwargs)
    return caught.value.code(), caught.value.details()


def drain(stub, token, *, state=None, limit=50, **request) -> tuple[list[pb.FederationFetchResponse], pb.FetchState]:
    """Call Fetch until partialResponse is false (as a puller does); returns the responses and the last state."""
    responses = []
    for _ in range(limit):
        response = fetch(stub, token, state=state, **request)
        responses.append(response)
        state = response.nextFetchState
        if not response.partialResponse:
            return responses, state
    raise AssertionError("fetch never completed")


def served(responses, field="keys") -> list[bytes]:
    return [k.exposureKey for r in responses for k in getattr(r, field)]


# --- authentication ---------------------------------------------------------------------------------


def _hs256(claims: dict, secret: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def test_valid_token_is_served(stub, token, fed_engine):
    insert(fed_engine, [exposure(key(1), W3)])
    response = fetch(stub, token)
    assert served([response]) == [key(1)] and not response.partialResponse


def test_auth_failures_are_unauthenticated_with_a_clear_one_line_reason(stub, token, fed_engine, partner_key,
                                                                        settings):
    now_s = int(NOW.timestamp())
    claims = {"iss": ISS, "sub": SUB, "aud": settings.federation_audience, "iat": now_s, "exp": now_s + 300}
    other_key = support.new_signing_key()
    cases = {
        "missing header": dict(metadata=[]),
        "duplicate header": dict(metadata=[("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")]),
        "not bearer": dict(metadata=[("authorization", f"Basic {token}")]),
        "bearer without token": dict(metadata=[("authorization", "Bearer ")]),
        "garbage": dict(metadata=[("authorization", "Bearer not.a.jwt")]),
        "alg none": dict(token=jwt.encode(claims, None, algorithm="none")),
        "hs256 with the public pem as secret": dict(token=_hs256(claims, public_pem(partner_key).encode())),
        "wrong key": dict(token=make_token(other_key, settings)),
        "unknown issuer": dict(token=make_token(partner_key, settings, iss="https://stranger.example")),
        "unknown subject": dict(token=make_token(partner_key, settings, sub="someone-else")),
        "wrong audience": dict(token=make_token(partner_key, settings, aud="https://elsewhere.example")),
        "expired": dict(token=make_token(partner_key, settings, iat=now_s - 600, exp=now_s - 60)),
        "lifetime too long": dict(token=make_token(partner_key, settings, exp=now_s + 2 * 3600)),
        "no exp": dict(token=make_token(partner_key, settings, exp=None)),
        "no iat": dict(token=make_token(partner_key, settings, iat=None)),
        "no aud": dict(token=make_token(partner_key, settings, aud=None)),
        "not yet valid": dict(token=make_token(partner_key, settings, nbf=now_s + 300)),
        "issued in the future": dict(token=make_token(partner_key, settings, iat=now_s + 300, exp=now_s + 600)),
    }
    expected = {
        "missing header": "missing authorization metadata",
        "duplicate header": "exactly once",
        "not bearer": "Bearer <token>",
        "bearer without token": "Bearer <token>",
        "garbage": "malformed token",
        "alg none": "must be signed with ES256, got 'none'",
        "hs256 with the public pem as secret": "must be signed with ES256, got 'HS256'",
        "wrong key": "invalid token signature",
        "unknown issuer": "invalid issuer/subject",
        "unknown subject": "invalid issuer/subject",
        "wrong audience": "audience does not match",
        "expired": "expired",
        "lifetime too long": "lifetime (exp - iat) exceeds 1h0m0s",
        "no exp": "missing claim(s) exp",
        "no iat": "missing claim(s) iat",
        "no aud": "missing claim(s) aud",
        "not yet valid": "not valid yet",
        "issued in the future": "issued in the future",
    }
    for name, kwargs in cases.items():
        code, details = fetch_error(stub, kwargs.get("token"), metadata=kwargs.get("metadata"))
        assert code == grpc.StatusCode.UNAUTHENTICATED, name
        assert expected[name] in details, (name, details)
        assert "\n" not in details and "Traceback" not in details and token not in details, name


def test_clock_leeway_and_audience_of_the_authorization(stub, fed_engine, partner_key, settings):
    now_s = int(NOW.timestamp())
    authorize(fed_engine, partner_key)
    # Expired 10 s ago, or nbf 10 s ahead: within the 30 s leeway for clock drift.
    fetch(stub, make_token(partner_key, settings, iat=now_s - 300, exp=now_s - 10))
    fetch(stub, make_token(partner_key, settings, nbf=now_s + 10))
    # Exactly the maximum lifetime is fine.
    fetch(stub, make_token(partner_key, settings, exp=now_s + 3600))

    authorize(fed_engine, partner_key, audience="https://us.example/federation")
    fetch(stub, make_token(partner_key, settings, aud="https://us.example/federation"))
    code, details = fetch_error(stub, make_token(partner_key, settings))  # the default audience no longer fits
    assert code == grpc.StatusCode.UNAUTHENTICATED and "audience" in details


def test_one_log_line_per_fetch_without_key_material(stub, token, fed_engine, caplog):
    insert(fed_engine, [exposure(key(i), W3) for i in range(3)])
    with caplog.at_level(logging.INFO, logger="enpipeline.federation.server"):
        fetch(stub, token)
        fetch_error(stub, "x.y.z")
    lines = [r.getMessage() for r in caplog.records if r.name == "enpipeline.federation.server"]
    assert any(f"partner={PARTNER} keys=3 revised=0 partial=False" in line for line in lines)
    assert any("UNAUTHENTICATED" in line and "malformed token" in line for line in lines)
    assert not any(token in line or "x.y.z" in line for line in lines)


# --- what is served ---------------------------------------------------------------------------------


def _regional_keys(fed_engine) -> dict[str, bytes]:
    keys = {"US": key(1), "CA": key(2), "MX": key(3), "US+MX": key(4), "FR traveler": key(5), "none": key(6)}
    insert(fed_engine, [
        exposure(keys["US"], W3, regions=("US",)), exposure(keys["CA"], W3, regions=("CA",)),
        exposure(keys["MX"], W3, regions=("MX",)), exposure(keys["US+MX"], W3, regions=("MX", "US")),
        exposure(keys["FR traveler"], W3, regions=("FR",), traveler=True), exposure(keys["none"], W3, regions=()),
    ])
    return keys


def _by_key(response) -> dict[bytes, list[str]]:
    return {k.exposureKey: list(k.regions) for k in response.keys}


def test_regions_from_request_and_authorization(stub, fed_engine, partner_key, settings):
    keys = _regional_keys(fed_engine)
    tok = make_token(partner_key, settings)

    authorize(fed_engine, partner_key)
    got = _by_key(fetch(stub, tok, includeRegions=["us"]))  # upper-cased
    # Travelers come whatever their region (as the reference), but only with regions the partner asked for.
    assert got == {keys["US"]: ["US"], keys["US+MX"]: ["US"], keys["FR traveler"]: []}

    got = _by_key(fetch(stub, tok))
    assert got[keys["US+MX"]] == ["MX", "US"] and got[keys["none"]] == [] and len(got) == 6

    code, details = fetch_error(stub, tok, includeRegions=["US", "mx"], excludeRegions=["MX"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "overlap: MX" in details

    # The authorization's includes narrow the request; with none requested, they are the include set.
    authorize(fed_engine, partner_key, include=("CA", "MX"))
    assert _by_key(fetch(stub, tok, includeRegions=["US", "CA"])) == {keys["CA"]: ["CA"], keys["FR traveler"]: []}
    assert _by_key(fetch(stub, tok)) == {keys["CA"]: ["CA"], keys["MX"]: ["MX"], keys["US+MX"]: ["MX"],
                                         keys["FR traveler"]: []}
    code, details = fetch_error(stub, tok, includeRegions=["US"])
    assert code == grpc.StatusCode.PERMISSION_DENIED and "authorized: CA, MX" in details

    # Excludes are the union of both: a key in any excluded region is not served at all.
    authorize(fed_engine, partner_key, exclude=("CA",))
    got = _by_key(fetch(stub, tok, excludeRegions=["MX"]))
    assert got == {keys["US"]: ["US"], keys["FR traveler"]: ["FR"], keys["none"]: []}
    got = _by_key(fetch(stub, tok, excludeRegions=["FR"]))  # an excluded traveler is not served
    assert keys["FR traveler"] not in got and keys["CA"] not in got and keys["US+MX"] in got


def test_only_travelers_and_only_local_provenance(stub, token, fed_engine):
    insert(fed_engine, [exposure(key(1), W3), exposure(key(2), W3, traveler=True),
                        exposure(key(3), W3, local=False, app=None),
                        exposure(key(4), W3, local=False, traveler=True, app=None)])
    assert served([fetch(stub, token, onlyTravelers=True)]) == [key(2), key(4)]
    assert served([fetch(stub, token, onlyLocalProvenance=True)]) == [key(1), key(2)]
    assert served([fetch(stub, token, onlyLocalProvenance=True, onlyTravelers=True)]) == [key(2)]
    assert served([fetch(stub, token)]) == [key(1), key(2), key(3), key(4)]


def test_export_padding_is_never_served(stub, token, fed_engine):
    insert(fed_engine, [exposure(key(1), W3), exposure(key(2), W3, app="export-generated", padding_seq=1),
                        exposure(key(3), W3, app="export-generated", padding_seq=2, report_type="confirmed",
                                 revised_report_type="negative", revised_at=W3)])
    response = fetch(stub, token)
    assert served([response]) == [key(1)] and not response.revisedKeys


def test_keys_from_the_eu_gateway_are_never_served(stub, token, fed_engine):
    """EFGS keys may only be used by the country that downloaded them: no partner gets them from us."""
    insert(fed_engine, [exposure(key(1), W3), exposure(key(2), W3, local=False, app=None, sync_query_id="efgs:eu"),
                        exposure(key(3), W3, local=False, app=None, sync_query_id="from-ca")])
    assert served([fetch(stub, token)]) == [key(1), key(3)]


def test_open_window_is_not_served_until_it_closes(stub, token, fed_engine, clock, partner_key, settings):
    insert(fed_engine, [exposure(key(1), W3), exposure(key(2), OPEN)])
    responses, state = drain(stub, token)
    assert served(responses) == [key(1)]
    again = fetch(stub, token, state=state)
    assert not again.keys and not again.partialResponse
    assert again.nextFetchState == state  # nothing new: the cursors come back unchanged

    clock.now = NOW + HOUR
    token = make_token(partner_key, settings, now=clock.now)
    assert served([fetch(stub, token, state=state)]) == [key(2)]


def test_report_types_onset_and_key_fields(stub, token, fed_engine):
    insert(fed_engine, [
        exposure(key(1), W3, report_type="confirmed", dsos=-3, tr=2),
        exposure(key(2), W3, report_type="likely", dsos=0, tr=4),
        exposure(key(3), W3, report_type="negative", dsos=None, tr=6),
        exposure(key(4), W3, report_type="user-report", dsos=14, tr=3),
        exposure(key(5), W3, report_type="", dsos=None, tr=1, traveler=True),
    ])
    k = {x.exposureKey: x for x in fetch(stub, token).keys}
    E = pb.ExposureKey
    assert [k[key(i)].reportType for i in range(1, 6)] == [
        E.CONFIRMED_TEST, E.CONFIRMED_CLINICAL_DIAGNOSIS, E.REVOKED, E.SELF_REPORT, E.UNKNOWN]
    assert [(k[key(i)].hasSymptomOnset, k[key(i)].daysSinceOnsetOfSymptoms) for i in range(1, 6)] == [
        (True, -3), (True, 0), (False, 0), (True, 14), (False, 0)]
    assert [k[key(i)].transmissionRisk for i in range(1, 6)] == [2, 4, 6, 3, 1]
    one = k[key(1)]
    assert one.intervalNumber == interval_number(W3 - timedelta(days=2)) and one.intervalCount == 144
    assert k[key(5)].traveler and not one.traveler


# --- paging and cursors -----------------------------------------------------------------------------


def test_paging_at_the_server_maximum_and_at_a_requested_size(stub, token, fed_engine):
    rows = [exposure(os.urandom(16), W1 if i % 2 else W2) for i in range(1203)]
    insert(fed_engine, rows)
    for requested in (0, 500, 501, 10_000):  # 0 and anything >= the maximum mean the maximum (500)
        responses, _ = drain(stub, token, maxExposureKeys=requested)
        assert [len(r.keys) for r in responses] == [500, 500, 203], requested
        assert [r.partialResponse for r in responses] == [True, True, False]
        assert sorted(served(responses)) == sorted(r.exposure_key for r in rows)

    responses, _ = drain(stub, token, maxExposureKeys=100, limit=20)
    assert [len(r.keys) for r in responses] == [100] * 12 + [3]
    keys = served(responses)
    assert len(keys) == len(set(keys)) == 1203

    # Order is (created_at, exposure_key), and the cursor timestamp is the last served created_at's second.
    first = fetch(stub, token, maxExposureKeys=600)
    expected = sorted((r.created_at, r.exposure_key) for r in rows)[:500]
    assert [k.exposureKey for k in first.keys] == [k for _, k in expected]
    assert first.nextFetchState.keyCursor.timestamp == int(expected[-1][0].timestamp())


def test_cursor_is_stable_under_inserts_and_deletes_between_pages(stub, token, fed_engine, clock, partner_key,
                                                                  settings):
    # 30 keys sharing one created_at (as every key of an hour does) and 10 in the next hour.
    w1 = [key(10 * i) for i in range(30)]
    w2 = [key(i, prefix=1) for i in range(10)]
    insert(fed_engine, [exposure(k, W1) for k in w1] + [exposure(k, W2) for k in w2])

    page1 = fetch(stub, token, maxExposureKeys=10)
    assert served([page1]) == w1[:10] and page1.partialResponse

    # Between pages: delete served keys (an offset cursor would now skip 2 unserved ones), delete an unserved
    # key, and insert into the same created_at both ahead of the cursor and behind it.
    delete(fed_engine, [w1[3], w1[5], w1[15]])
    ahead, behind = key(125), key(45)
    insert(fed_engine, [exposure(ahead, W1), exposure(behind, W1)])

    page2 = fetch(stub, token, maxExposureKeys=10, state=page1.nextFetchState)
    assert served([page2]) == [w1[10], w1[11], w1[12], ahead, w1[13], w1[14], w1[16], w1[17], w1[18], w1[19]]

    # More churn: delete an unserved key of the next hour; new publishes land in the open window.
    delete(fed_engine, [w2[0]])
    fresh = [key(i, prefix=2) for i in range(3)]
    insert(fed_engine, [exposure(k, OPEN) for k in fresh])

    rest, state = drain(stub, token, maxExposureKeys=10, state=page2.nextFetchState)
    clock.now = NOW + HOUR  # the open window closes: its keys come on the next pull
    later, _ = drain(stub, make_token(partner_key, settings, now=clock.now), maxExposureKeys=10, state=state)

    everything = served([page1, page2, *rest, *later])
    assert len(everything) == len(set(everything))  # nothing repeated
    assert set(everything) == (set(w1) - {w1[15]}) | {ahead} | (set(w2) - {w2[0]}) | set(fresh)  # nothing skipped
    # A key inserted behind the cursor with an old created_at cannot be seen by a keyset cursor; publishes and
    # pulls never do that (their created_at is the open window).
    assert behind not in everything


def test_reference_style_cursor_starts_at_its_second_inclusive(stub, token, fed_engine):
    insert(fed_engine, [exposure(key(1), W1), exposure(key(2), W2), exposure(key(3), W3)])
    state = pb.FetchState(keyCursor=pb.Cursor(timestamp=int(W2.timestamp())))
    response = fetch(stub, token, state=state)
    assert served([response]) == [key(2), key(3)]
    assert response.nextFetchState.keyCursor.timestamp == int(W3.timestamp())
    assert response.nextFetchState.keyCursor.nextToken  # from now on a keyset cursor


def test_invalid_cursors_are_invalid_argument(stub, token, fed_engine):
    insert(fed_engine, [exposure(key(1), W3, report_type="likely", revised_report_type="confirmed", revised_at=W3)])
    good = fetch(stub, token).nextFetchState
    revised_token = good.revisedKeyCursor.nextToken
    assert good.keyCursor.nextToken and revised_token
    tampered = base64.urlsafe_b64decode(good.keyCursor.nextToken + "==")
    bad_states = [
        pb.FetchState(keyCursor=pb.Cursor(nextToken="not a token!")),
        pb.FetchState(keyCursor=pb.Cursor(nextToken=base64.urlsafe_b64encode(b"12").decode())),  # the reference's
        pb.FetchState(keyCursor=pb.Cursor(nextToken=revised_token)),                             # other stream
        pb.FetchState(keyCursor=pb.Cursor(nextToken=base64.urlsafe_b64encode(b"\x09" + tampered[1:]).decode())),
        pb.FetchState(revisedKeyCursor=pb.Cursor(nextToken=good.keyCursor.nextToken)),
        pb.FetchState(keyCursor=pb.Cursor(timestamp=-1)),
        pb.FetchState(keyCursor=pb.Cursor(timestamp=2**62)),
    ]
    for state in bad_states:
        code, details = fetch_error(stub, token, state=state)
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid cursor"), state


def test_revised_keys_follow_primary_keys_with_their_revised_values(stub, token, fed_engine, clock, partner_key,
                                                                   settings):
    insert(fed_engine, [
        exposure(key(1), W1, report_type="likely", dsos=2, tr=4,
                 revised_report_type="confirmed", revised_at=W2, revised_days_since_symptom_onset=1,
                 revised_transmission_risk=2),
        exposure(key(2), W1, report_type="confirmed", dsos=-1, tr=2,
                 revised_report_type="negative", revised_at=W3, revised_days_since_symptom_onset=None,
                 revised_transmission_risk=6),
        exposure(key(3), W1, report_type="likely", revised_report_type="confirmed", revised_at=W2),
        exposure(key(4), W2), exposure(key(5), W2),
        # Revised in the open window: not yet.
        exposure(key(6), W2, report_type="likely", revised_report_type="negative", revised_at=OPEN),
    ])
    page1 = fetch(stub, token, maxExposureKeys=7)
    assert served([page1]) == [key(i) for i in range(1, 7)]
    assert served([page1], "revisedKeys") == [key(1)] and page1.partialResponse  # one slot left for revisions

    page2 = fetch(stub, token, maxExposureKeys=7, state=page1.nextFetchState)
    assert not page2.keys and served([page2], "revisedKeys") == [key(3), key(2)] and not page2.partialResponse
    assert page2.nextFetchState.keyCursor == page1.nextFetchState.keyCursor
    assert page2.nextFetchState.revisedKeyCursor.timestamp == int(W3.timestamp())

    r1, r2 = page1.revisedKeys[0], page2.revisedKeys[1]
    E = pb.ExposureKey
    assert (r1.reportType, r1.transmissionRisk, r1.hasSymptomOnset, r1.daysSinceOnsetOfSymptoms) == (
        E.CONFIRMED_TEST, 2, True, 1)
    assert (r2.reportType, r2.transmissionRisk, r2.hasSymptomOnset) == (E.REVOKED, 6, False)
    assert page2.revisedKeys[0].transmissionRisk == 2  # no revised TR: the original one

    clock.now = NOW + HOUR
    page3 = fetch(stub, make_token(partner_key, settings, now=clock.now), maxExposureKeys=7,
                  state=page2.nextFetchState)
    assert served([page3], "revisedKeys") == [key(6)] and page3.revisedKeys[0].reportType == E.REVOKED


def test_exactly_full_primary_page_reports_pending_revisions(stub, token, fed_engine):
    insert(fed_engine, [exposure(key(1), W3), exposure(key(2), W3, report_type="likely",
                                                        revised_report_type="confirmed", revised_at=W3)])
    page1 = fetch(stub, token, maxExposureKeys=2)
    assert len(page1.keys) == 2 and not page1.revisedKeys and page1.partialResponse
    page2 = fetch(stub, token, maxExposureKeys=2, state=page1.nextFetchState)
    assert served([page2], "revisedKeys") == [key(2)] and not page2.partialResponse


def test_a_partners_own_keys_are_never_served_back_to_it(stub, fed_engine, partner_key, settings):
    with fed_engine.begin() as conn:
        for query_id, partner in (("from-a", PARTNER), ("from-b", "partner-b")):
            conn.execute(sa.text(
                "INSERT INTO federation_in_query (query_id, partner, server_addr, audience, credentials, issuer,"
                " subject, created_at) VALUES (:q, :p, 'grpc.example:443', 'aud', 'key', 'us', 'us', :now)"),
                {"q": query_id, "p": partner, "now": NOW})
        importer_a = conn.execute(sa.text(
            "INSERT INTO export_importer (name, partner, index_url, created_at)"
            " VALUES ('a-files', :p, 'https://a.example/index.txt', :now) RETURNING id"),
            {"p": PARTNER, "now": NOW}).scalar_one()
    insert(fed_engine, [
        exposure(key(1), W3),
        exposure(key(2), W3, local=False, app=None, sync_query_id="from-a", sync_id=1),
        exposure(key(3), W3, local=False, app=None, sync_query_id="from-b", sync_id=2),
        exposure(key(4), W3, local=False, app=None, export_import_id=importer_a),
        exposure(key(5), W3, local=False, app=None, sync_query_id="from-a", report_type="likely",
                 revised_report_type="confirmed", revised_at=W3),
    ])
    authorize(fed_engine, partner_key)
    response = fetch(stub, make_token(partner_key, settings))
    assert served([response]) == [key(1), key(3)] and not response.revisedKeys

    other = support.new_signing_key()
    authorize(fed_engine, other, issuer="https://partner-b.example", partner="partner-b")
    response = fetch(stub, make_token(other, settings, iss="https://partner-b.example"))
    assert served([response]) == [key(1), key(2), key(4), key(5)] and served([response], "revisedKeys") == [key(5)]


def test_page_rows_read_back_exactly_what_is_stored(fed_engine):
    """A page row's values string and timestamp text (see fo.PageRow) parse back to the stored fields."""
    odd = ["A B", "X,Y", 'Q"Z', "BS\\L", "{BR}", "[1:2]", "NULL", "null", "", " ", "Ä,日", "x}", ","]
    rows = [
        exposure(key(1), W1 + timedelta(microseconds=1), regions=odd, report_type="a,b{c}", dsos=-14, tr=0),
        exposure(key(2), W1 + timedelta(microseconds=999_999), regions=(), report_type="", dsos=None,
                 traveler=True),
        exposure(key(3), W2, regions=("US", "US"), report_type="5", dsos=2003, tr=8, revised_report_type="{x},",
                 revised_at=W3 + timedelta(microseconds=7), revised_days_since_symptom_onset=None),
        exposure(key(4), W2, regions=("{",), report_type="confirmed", dsos=3, revised_report_type=None,
                 revised_at=W3, revised_days_since_symptom_onset=-1, revised_transmission_risk=6),
        exposure(key(5), W3, regions=("US",), report_type="likely", dsos=0, revised_report_type="confirmed",
                 revised_at=W3 + timedelta(minutes=1), revised_days_since_symptom_onset=1),
    ]
    insert(fed_engine, rows)
    stored = {r.exposure_key: r for r in rows}
    for zone in ("UTC", "Asia/Kathmandu", "America/St_Johns"):  # the timestamps' offsets differ, not the instants
        with fed_engine.begin() as conn:
            conn.execute(sa.text("SELECT set_config('TimeZone', :zone, true)"), {"zone": zone})
            primary = fo.primary_page(conn, fo.KeyFilter(), after=cursor.START, until=OPEN, limit=10)
            revised = fo.revised_page(conn, fo.KeyFilter(), after=cursor.START, until=OPEN, limit=10)
        assert [bytes.fromhex(row[0]) for row in primary] == [key(i) for i in range(1, 6)]
        for row in primary:
            e = stored[bytes.fromhex(row[0])]
            assert fo.key_values(row[2]) == (e.interval_number, e.transmission_risk, e.interval_count, e.report_type,
                                             e.days_since_symptom_onset, e.traveler, tuple(e.regions)), row
            assert fo.page_position(row) == cursor.Position(e.created_at, e.exposure_key)
        assert [bytes.fromhex(row[0]) for row in revised] == [key(4), key(3), key(5)]
        for row in revised:
            e = stored[bytes.fromhex(row[0])]
            assert fo.key_values(row[2]) == (
                e.interval_number, e.revised_transmission_risk or e.transmission_risk, e.interval_count,
                e.revised_report_type or "", e.revised_days_since_symptom_onset, e.traveler, tuple(e.regions)), row
            assert fo.page_position(row) == cursor.Position(e.revised_at, e.exposure_key)


def test_spliced_key_bytes_are_what_the_protobuf_library_builds(fed_engine):
    """The server assembles ExposureKeys from upb-encoded bytes per distinct values string plus the key bytes
    (server._KeyEncoder); each response must equal, byte for byte, the message built field by field."""
    from enpipeline.federation import server

    odd = ["A B", "X,Y", 'Q"Z', "BS\\L", "{BR}", "NULL", "", "Ä,日", "US", "CA"]
    rows = []
    for i in range(300):
        at = W1 + timedelta(microseconds=i)
        revised = i % 3 == 0
        rows.append(exposure(
            os.urandom(16), at, regions=tuple(odd[j] for j in range(len(odd)) if (i >> j) % 3 == 0),
            traveler=i % 5 == 0, report_type=("confirmed", "likely", "negative", "user-report", "", "other")[i % 6],
            dsos=(None, 0, -14, 14, 3, 2003)[i % 6], tr=i % 9,
            revised_report_type=("confirmed", None, "likely")[i % 3] if revised else None,
            revised_at=W3 + timedelta(microseconds=i) if revised else None,
            revised_days_since_symptom_onset=(None, -3)[i % 2] if revised else None,
            revised_transmission_risk=(None, 7)[i % 2] if revised else None))
    insert(fed_engine, rows)
    stored = {r.exposure_key: r for r in rows}
    with fed_engine.begin() as conn:
        primary = fo.primary_page(conn, fo.KeyFilter(), after=cursor.START, until=OPEN, limit=1000)
        revised = fo.revised_page(conn, fo.KeyFilter(), after=cursor.START, until=OPEN, limit=1000)
    assert len(primary) == 300 and len(revised) == 100

    def plain(e: Exposure, regions: server.Regions, stream: str) -> pb.ExposureKey:
        report_type, dsos, tr = e.report_type, e.days_since_symptom_onset, e.transmission_risk
        if stream == "revised":
            report_type, dsos = e.revised_report_type or "", e.revised_days_since_symptom_onset
            tr = e.revised_transmission_risk if e.revised_transmission_risk is not None else tr
        return pb.ExposureKey(
            exposureKey=e.exposure_key, transmissionRisk=tr, intervalNumber=e.interval_number,
            intervalCount=e.interval_count, reportType=server._REPORT_TYPES.get(report_type, pb.ExposureKey.UNKNOWN),
            daysSinceOnsetOfSymptoms=dsos or 0, hasSymptomOnset=dsos is not None, traveler=e.traveler,
            regions=regions.served(e.regions))

    for regions in (server.Regions(), server.Regions(include=frozenset({"US", "Ä,日"})),
                    server.Regions(exclude=frozenset({"CA", "NULL", ""})),
                    server.Regions(include=frozenset({"X,Y"}), exclude=frozenset({"US"}))):
        encoder = server._KeyEncoder(regions)
        for _ in range(2):  # the second round comes from the encoder's cache
            spliced = encoder.encode(primary, server._KEYS_FIELD) + encoder.encode(revised, server._REVISED_FIELD)
            built = pb.FederationFetchResponse(
                keys=[plain(stored[bytes.fromhex(r[0])], regions, "primary") for r in primary],
                revisedKeys=[plain(stored[bytes.fromhex(r[0])], regions, "revised") for r in revised])
            assert spliced == built.SerializeToString()
            assert pb.FederationFetchResponse.FromString(spliced) == built


def test_fetch_pages_plan_without_sorts_until_their_transaction_ends(fed_engine):
    with fed_engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO federation_in_query (query_id, partner, server_addr, audience, credentials, issuer,"
            " subject, created_at) VALUES ('q1', :p, 'grpc.example:443', 'aud', 'key', 'us', 'us', :now)"),
            {"p": PARTNER, "now": NOW})
    with fed_engine.begin() as conn:
        reads = fo.FetchPages(conn, PARTNER)
        assert reads.sources == fo.partner_sources(conn, PARTNER) == fo.PartnerSources(("q1",), ())
        reads.primary_page(fo.KeyFilter(), after=cursor.START, until=OPEN, limit=10)
        assert conn.execute(sa.text("SELECT current_setting('enable_sort')")).scalar_one() == "off"
    with fed_engine.begin() as conn:
        assert conn.execute(sa.text("SELECT current_setting('enable_sort')")).scalar_one() == "on"


def test_page_queries_are_index_range_scans_without_a_sort(fed_engine):
    rows = [exposure(os.urandom(16), W1, regions=("US", "CA")[i % 2:i % 2 + 1]) for i in range(20_000)]
    rows += [exposure(os.urandom(16), W2, report_type="likely", revised_report_type="confirmed", revised_at=W3)
             for _ in range(2_000)]
    insert(fed_engine, rows)
    with fed_engine.begin() as conn:
        conn.execute(sa.text("ANALYZE exposure"))
        selective = fo.KeyFilter(include_regions=("US",), exclude_regions=("MX",), only_travelers=True,
                                 skip=fo.PartnerSources(("q1",), (7,)))
        after = cursor.Position(W1, rows[100].exposure_key)
        for filt, stream, index in ((fo.KeyFilter(), "primary", "_created_at_exposure_key_idx"),
                                    (selective, "primary", "_created_at_exposure_key_idx"),
                                    (fo.KeyFilter(), "revised", "_revised_at_exposure_key_idx"),
                                    (selective, "revised", "_revised_at_exposure_key_idx")):
            plan = fo.explain_page(conn, stream, filt, after=after, until=OPEN, limit=501)
            assert not re.search(r"Sort\s+\(cost", plan), plan  # a Merge Append's "Sort Key" is fine
            assert "Seq Scan" not in plan and "Bitmap" not in plan, plan
            assert f"Index Scan using exposure_p{W1:%Y%m%d}{index}" in plan, plan


# --- TLS and the server lifecycle -------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - HOUR)
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(private_key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(private_pem(private_key))
    return cert_path, key_path


def test_tls(fed_engine, settings, partner_key, tmp_path):
    cert_path, key_path = _self_signed(tmp_path)
    authorize(fed_engine, partner_key)
    insert(fed_engine, [exposure(key(1), W3)])
    server, port = build_server(settings, fed_engine, "127.0.0.1", 0, tls_cert=cert_path, tls_key=key_path,
                                clock=Clock(NOW))
    server.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert_path.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            response = fetch(pb_grpc.FederationStub(channel), make_token(partner_key, settings))
            assert served([response]) == [key(1)]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # plaintext to a TLS port does not work
            with pytest.raises(grpc.RpcError) as caught:
                fetch(pb_grpc.FederationStub(channel), make_token(partner_key, settings))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)

    with pytest.raises(ValueError, match="both"):
        build_server(settings, fed_engine, "127.0.0.1", 0, tls_cert=cert_path)
    with pytest.raises(ValueError, match="not a PEM certificate"):
        build_server(settings, fed_engine, "127.0.0.1", 0, tls_cert=key_path, tls_key=key_path)


def test_a_port_in_use_is_an_error(fed_engine, settings):
    server, port = build_server(settings, fed_engine, "127.0.0.1", 0)
    server.start()
    try:
        with pytest.raises(OSError, match="cannot listen"):
            build_server(settings, fed_engine, "127.0.0.1", port)
    finally:
        server.stop(None)


def test_cli_serve_answers_and_stops_gracefully_on_sigterm(fed_engine, settings, partner_key, tmp_path):
    authorize(fed_engine, partner_key)
    env = {**os.environ, "ENP_DATABASE_URL": settings.database_url, "ENP_VAR_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "enpipeline.cli", "federation", "serve", "--port", "0",
                             "--max-workers", "2"], env=env, cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving /Federation/Fetch on 127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            # The real clock: a token minted now is valid.
            tok = mint_token(private_pem(partner_key), issuer=ISS, subject=SUB,
                             audience=settings.federation_audience, now=datetime.now(UTC),
                             lifetime=timedelta(minutes=5))
            response = fetch(pb_grpc.FederationStub(channel), tok)
            assert not response.partialResponse
            code, details = fetch_error(pb_grpc.FederationStub(channel), None)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "missing authorization" in details
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        logscan.record_text("enpipeline federation serve (stdout, stderr)", line + out + err)
        assert proc.returncode == 0, err
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- CLI: authorizations ----------------------------------------------------------------------------


def test_cli_authorize_list_remove(cli, fed_engine, partner_key, tmp_path):
    pem = tmp_path / "partner.pem"
    pem.write_text(public_pem(partner_key))
    code, out, err = cli("federation", "authorize", "--issuer", ISS, "--subject", SUB, "--public-key", str(pem),
                         "--include-regions", "us,ca", "--exclude-regions", "mx", "--note", "pilot")
    assert code == 0, err
    assert f"partner '{SUB}'" in out and "CA,US" in out and "except MX" in out and "(server default)" in out

    code, _, err = cli("federation", "authorize", "--issuer", ISS, "--subject", SUB, "--public-key", str(pem))
    assert code == 1 and "already authorized" in err and "--replace" in err and "\n" not in err.strip()

    code, out, err = cli("federation", "authorize", "--issuer", ISS, "--subject", SUB, "--public-key", str(pem),
                         "--partner", PARTNER, "--audience", "https://us.example/federation", "--replace")
    assert code == 0, err

    code, out, _ = cli("federation", "list-authorizations", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 1
    row = rows[0]
    assert (row["partner"], row["issuer"], row["subject"], row["audience"]) == (
        PARTNER, ISS, SUB, "https://us.example/federation")
    assert row["include_regions"] == [] and row["exclude_regions"] == [] and row["note"] is None
    assert len(row["key_sha256"]) == 16
    code, out, _ = cli("federation", "list-authorizations")
    assert code == 0 and "PARTNER" in out and PARTNER in out

    rsa_pem = tmp_path / "rsa.pem"
    rsa_pem.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, _, err = cli("federation", "authorize", "--issuer", "x", "--subject", "y", "--public-key", str(rsa_pem))
    assert code == 1 and "P-256" in err
    code, _, err = cli("federation", "authorize", "--issuer", "x", "--subject", "y", "--public-key", str(pem),
                       "--include-regions", "US", "--exclude-regions", "us")
    assert code == 1 and "overlap: US" in err

    code, out, _ = cli("federation", "remove-authorization", "--issuer", ISS, "--subject", SUB)
    assert code == 0 and "removed" in out
    code, _, err = cli("federation", "remove-authorization", "--issuer", ISS, "--subject", SUB)
    assert code == 1 and "no authorization" in err
    code, out, _ = cli("federation", "list-authorizations")
    assert out.strip() == "(none)"
