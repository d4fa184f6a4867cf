"""EFGS push and pull against real Postgres and an EFGS-compatible gateway over mutual TLS (tests/support_efgs.py),
which verifies our batch signatures with the openssl binary; plus our signatures checked by `openssl cms -verify`
directly, and the CLI."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from enpipeline.db import efgs as efgs_db
from enpipeline.db import exposures as exposures_db
from enpipeline.efgs.canonical import batch_bytes
from enpipeline.efgs.pull import EfgsPullError, pull_day, pull_recent, verify_shares
from enpipeline.efgs.push import EfgsPushError, push_interval, push_window
from enpipeline.efgs.signing import SignatureError, sign_batch, verify_batch_signature
from enpipeline.efgs.validation import REVOKED, PushRow, to_efgs_key
from enpipeline.model import Exposure
from enpipeline.timeutil import interval_number, truncate, utc_midnight
from tests import support_efgs as fake
from tests.support_efgs import FakeEfgs, add_target, efgs_key, upload_as

HOUR = timedelta(hours=1)


@pytest.fixture
def de(gateway: FakeEfgs, engine, efgs_settings) -> fake.Country:
    """Us: country DE, configured as target 'efgs'."""
    country = gateway.country("DE")
    add_target(engine, efgs_settings.key_dir, gateway, country)
    return country


def window() -> tuple[datetime, datetime, datetime]:
    """A closed window [start, end) and a created_at inside it."""
    hour = truncate(datetime.now(UTC), HOUR)
    return hour - 3 * HOUR, hour - HOUR, hour - 2 * HOUR


def local_key(created_at: datetime, *, days_ago: int = 2, **fields) -> Exposure:
    midnight = utc_midnight(datetime.now(UTC))
    values = {"exposure_key": os.urandom(16), "transmission_risk": 2, "app_package_name": "com.example.app",
              "regions": ["DE"], "traveler": False,
              "interval_number": interval_number(midnight - timedelta(days=days_ago)), "interval_count": 144,
              "created_at": created_at, "report_type": "confirmed", "days_since_symptom_onset": 1}
    values.update(fields)
    return Exposure(**values)


def insert(engine, rows: list[Exposure]) -> list[Exposure]:
    exposures_db.PartitionGuard(engine).ensure(r.created_at for r in rows)
    with engine.begin() as conn:
        exposures_db.insert_exposures(conn, rows)
    return rows


def batches(engine) -> list[efgs_db.UploadBatch]:
    with engine.connect() as conn:
        return sorted(efgs_db.list_batches(conn, "efgs", 1000), key=lambda b: (b.window_start, b.batch_num))


def uploads(gateway: FakeEfgs) -> list[tuple[str, int]]:
    return [(u.tag, len(u.keys)) for u in gateway.uploads]


def upload_tags(gateway: FakeEfgs) -> list[str | None]:
    return [r["batchTag"] for r in gateway.requests if r["method"] == "POST"]


def stored(engine) -> dict[bytes, sa.Row]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM exposure"))
        return {bytes(r.exposure_key): r for r in rows}


# -- push -----------------------------------------------------------------------------------------------------

def test_push_uploads_only_keys_published_here_signed_and_verified_by_the_gateway(gateway, de, engine,
                                                                               efgs_settings):
    start, end, at = window()
    mine = insert(engine, [local_key(at, regions=["DE", "FR"]), local_key(at),
                           local_key(at, days_since_symptom_onset=None)])
    insert(engine, [
        local_key(at, local_provenance=False, sync_query_id="partner-a", sync_id=1),   # pulled from a partner
        local_key(at, local_provenance=False, sync_query_id="efgs:efgs", sync_id=7),   # pulled from EFGS
        local_key(at, local_provenance=False, export_import_id=3, import_file_id=4),   # imported export file
        local_key(at, padding_seq=1, app_package_name="enpipeline-padding"),           # export padding
        local_key(at, report_type="negative"),                                           # revoked
        local_key(at - 2 * HOUR),                                                        # another window
    ])
    report = push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))

    (w,) = report.windows
    assert (w.keys, w.batches, w.uploaded, w.keys_sent, w.keys_stored, w.invalid) == (3, 1, 1, 3, 3, 0)
    (upload,) = gateway.uploads
    assert upload.tag == f"DE-{start:%Y%m%d%H%M%S}-{end:%Y%m%d%H%M%S}-1" and upload.country == "DE"
    assert sorted(k.keyData for k in upload.keys) == sorted(e.exposure_key for e in mine)
    assert {k.origin for k in upload.keys} == {"DE"}
    by_key = {k.keyData: k for k in upload.keys}
    assert list(by_key[mine[0].exposure_key].visitedCountries) == ["FR"]
    assert by_key[mine[0].exposure_key].days_since_onset_of_symptoms == 1
    assert 3986 <= by_key[mine[2].exposure_key].days_since_onset_of_symptoms <= 4014   # onset unknown here

    (b,) = batches(engine)
    assert (b.status, b.http_status, b.key_count, b.keys_sent, b.attempts) == ("UPLOADED", 201, 3, 3, 1)
    assert b.results["201"] == 3 and b.results["409"] == 0 and b.uploaded_at is not None
    assert b.key_from is None and b.key_to is None   # a final batch keeps no key bytes

    again = push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    assert again.windows[0].keys_sent == 0 and len(gateway.uploads) == 1   # converged: nothing sent twice


def test_push_splits_at_5000_keys(gateway, de, engine, efgs_settings):
    start, end, at = window()
    insert(engine, [local_key(at) for _ in range(5001)])
    report = push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    assert report.windows[0].batches == 2
    assert [n for _, n in uploads(gateway)] == [5000, 1]
    assert [t.rsplit("-", 1)[1] for t, _ in uploads(gateway)] == ["1", "2"]
    assert [(b.status, b.key_count) for b in batches(engine)] == [("UPLOADED", 5000), ("UPLOADED", 1)]


def test_a_lost_answer_is_retried_under_the_same_tag_and_409_is_success(gateway, de, engine, efgs_settings):
    start, end, at = window()
    insert(engine, [local_key(at) for _ in range(4)])
    gateway.land_then_fail = 1   # the gateway stores the batch, but we only see a 500
    with pytest.raises(EfgsPushError, match="HTTP 500"):
        push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    (b,) = batches(engine)
    assert (b.status, b.http_status) == ("FAILED", 500) and b.key_from is None and b.key_to is None
    tag = b.batch_tag

    report = push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    assert report.windows[0].uploaded == 1
    (b,) = batches(engine)
    assert (b.status, b.http_status, b.attempts) == ("UPLOADED", 409, 2)
    assert b.results["duplicate_batch_tags"] == 1 and b.results["201"] == 4
    assert upload_tags(gateway) == [tag, tag] and uploads(gateway) == [(tag, 4)]   # stored once


def test_207_keys_the_gateway_has_are_done_the_rest_go_again(gateway, de, engine, efgs_settings):
    start, end, at = window()
    rows = insert(engine, [local_key(at) for _ in range(5)])
    for row in rows[:2]:  # the gateway has these two already (e.g. from an earlier installation)
        push_row = PushRow(row.exposure_key, row.transmission_risk, row.interval_number, row.interval_count,
                           row.report_type, row.days_since_symptom_onset, tuple(row.regions), row.created_at)
        gateway.hashes.add(fake.payload_hash(to_efgs_key(push_row, "DE")))
    report = push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    w = report.windows[0]
    assert (w.uploaded, w.keys_stored, w.keys_known) == (1, 3, 2)
    (b,) = batches(engine)
    assert b.status == "UPLOADED" and (b.results["201"], b.results["409"]) == (3, 2)
    assert b.results["tags"] == [b.batch_tag, b.batch_tag + ".r1"]
    assert uploads(gateway) == [(b.batch_tag + ".r1", 3)]


def test_207_with_keys_that_keep_failing_is_failed_then_converges(gateway, de, engine, efgs_settings):
    start, end, at = window()
    rows = insert(engine, [local_key(at) for _ in range(3)])
    gateway.fail_keys = {rows[0].exposure_key}
    with pytest.raises(EfgsPushError, match="207 again"):
        push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    (b,) = batches(engine)
    assert b.status == "FAILED" and b.results["500"] == 3 and gateway.uploads == []
    assert b.results["tags"] == [b.batch_tag, b.batch_tag + ".r1", b.batch_tag + ".r2"]
    gateway.fail_keys = set()
    push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    (b,) = batches(engine)
    assert b.status == "UPLOADED" and uploads(gateway) == [(b.batch_tag, 3)]   # nothing was stored under it


def test_413_halves_the_batch_until_it_fits(gateway, de, engine, efgs_settings):
    start, end, at = window()
    insert(engine, [local_key(at) for _ in range(5)])
    gateway.max_upload = 2
    push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    (b,) = batches(engine)
    t = b.batch_tag
    assert b.status == "UPLOADED" and b.results["201"] == 5
    assert uploads(gateway) == [(t + ".a.a", 2), (t + ".a.b", 1), (t + ".b", 2)]


def test_400_is_rejected_with_the_gateways_reason(gateway, engine, efgs_settings):
    country = fake.Country.create("DE", gateway.pki)
    gateway.register(country, signing=False)   # the gateway does not know our signing certificate
    add_target(engine, efgs_settings.key_dir, gateway, country)
    start, end, at = window()
    insert(engine, [local_key(at)])
    with pytest.raises(EfgsPushError, match=r"REJECTED.*Invalid signature"):
        push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    (b,) = batches(engine)
    assert (b.status, b.http_status, b.results["400"]) == ("REJECTED", 400, 1)
    gateway.register(country)                                # the operator registers it: the retry goes through
    push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    assert batches(engine)[0].status == "UPLOADED"


def test_one_key_efgs_would_refuse_does_not_sink_the_batch(gateway, de, engine, efgs_settings):
    start, end, at = window()
    good = insert(engine, [local_key(at)])
    insert(engine, [local_key(at, days_ago=16), local_key(at, transmission_risk=9)])
    push_window(efgs_settings, engine, "efgs", start, end, datetime.now(UTC))
    (b,) = batches(engine)
    assert (b.status, b.key_count, b.keys_sent, b.results["invalid"]) == ("UPLOADED", 3, 1, 2)
    assert len(b.results["invalid_reasons"]) == 2
    assert [k.keyData for k in gateway.stored_keys()] == [good[0].exposure_key]
    # Sent as is, the old key would have sunk its whole batch:
    assert upload_as(gateway, de, [efgs_key("DE"), efgs_key("DE", days_ago=16)], "with-a-bad-key") == 400


def test_an_open_window_is_not_pushed(gateway, de, engine, efgs_settings):
    hour = truncate(datetime.now(UTC), HOUR)
    with pytest.raises(EfgsPushError, match="still open"):
        push_window(efgs_settings, engine, "efgs", hour - HOUR, hour + HOUR, datetime.now(UTC))


def test_the_dag_push_shifts_by_the_delay_and_fills_the_gap_since_the_last_window(gateway, de, engine,
                                                                                 efgs_settings):
    hour = truncate(datetime.now(UTC), HOUR)
    missed = insert(engine, [local_key(hour - 4 * HOUR)])
    current = insert(engine, [local_key(hour - 2 * HOUR)])
    push_interval(efgs_settings, engine, "efgs", hour - 6 * HOUR, hour - 5 * HOUR, datetime.now(UTC))
    assert gateway.uploads == []   # [h-7, h-6): nothing there
    # The runs for [h-5, h-4) .. [h-2, h-1) never happened; the run for [h-1, h) pushes [h-2, h-1) and the gap.
    report = push_interval(efgs_settings, engine, "efgs", hour - HOUR, hour, datetime.now(UTC))
    assert [(w.start, w.end, w.keys) for w in report.windows] == [(hour - 6 * HOUR, hour - 2 * HOUR, 1),
                                                                   (hour - 2 * HOUR, hour - HOUR, 1)]
    assert sorted(k.keyData for k in gateway.stored_keys()) == sorted([missed[0].exposure_key,
                                                                       current[0].exposure_key])
    # A later backfill of a missed interval overlaps the gap window: its keys are not pushed again.
    again = push_window(efgs_settings, engine, "efgs", hour - 5 * HOUR, hour - 3 * HOUR, datetime.now(UTC))
    assert again.windows[0].keys == 0 and len(gateway.uploads) == 2


# -- pull -----------------------------------------------------------------------------------------------------

def test_pull_follows_the_chain_verifies_each_country_and_stores_with_provenance(gateway, de, engine,
                                                                                efgs_settings):
    fr, nl = gateway.country("FR"), gateway.country("NL")
    today = datetime.now(UTC).date()
    fr_keys = [efgs_key("FR", visited=("DE",)) for _ in range(3)]
    nl_keys = [efgs_key("NL", dsos=2003), efgs_key("NL", dsos=-2)]
    assert upload_as(gateway, fr, fr_keys, "fr-1") == 201
    assert upload_as(gateway, de, [efgs_key("DE")], "de-1") == 201   # ours: the gateway leaves it out for us
    (first,) = gateway.batch()
    assert upload_as(gateway, nl, nl_keys, "nl-1") == 201
    (second,) = gateway.batch()

    report = pull_day(efgs_settings, engine, "efgs", today, datetime.now(UTC))
    assert (report.status, report.batches, report.keys, report.inserted, report.refused) == ("complete", 2, 5, 5, 0)
    rows = stored(engine)
    assert set(rows) == {k.keyData for k in fr_keys + nl_keys}
    assert {(r.local_provenance, r.sync_query_id, r.sync_id) for r in rows.values()} == {
        (False, "efgs:efgs", report.download_id)}
    fr_row, nl_rows = rows[fr_keys[0].keyData], [rows[k.keyData] for k in nl_keys]
    assert fr_row.regions == ["DE", "FR"] and fr_row.traveler is True and fr_row.report_type == "confirmed"
    assert [r.days_since_symptom_onset for r in nl_rows] == [None, -2]   # a 2000-range onset is no onset day
    with engine.connect() as conn:
        cursor = efgs_db.get_cursor(conn, "efgs", today)
        download = efgs_db.get_download(conn, report.download_id)
    assert (cursor.last_batch_tag, cursor.next_batch_tag, cursor.batches) == (second, None, 2)
    assert download.completed is not None and (download.batches, download.insertions) == (2, 5)

    # Nothing new: the last batch is asked for again only to learn whether a next one was linked.
    gateway.requests.clear()
    again = pull_day(efgs_settings, engine, "efgs", today, datetime.now(UTC))
    assert again.batches == 0 and [r["batchTag"] for r in gateway.requests] == [second]

    late = [efgs_key("FR")]
    upload_as(gateway, fr, late, "fr-2")
    (third,) = gateway.batch()
    gateway.requests.clear()
    later = pull_day(efgs_settings, engine, "efgs", today, datetime.now(UTC))
    assert (later.batches, later.inserted) == (1, 1)
    assert [r["batchTag"] for r in gateway.requests if "/audit/" not in r["path"]] == [second, third]
    assert first != third


def test_a_failed_pull_resumes_at_the_first_batch_not_stored(gateway, de, engine, efgs_settings):
    fr = gateway.country("FR")
    today = datetime.now(UTC).date()
    tags = []
    for n in range(3):
        upload_as(gateway, fr, [efgs_key("FR")], f"fr-{n}")
        tags += gateway.batch()
    gateway.audit_fail = {tags[1]}
    with pytest.raises(EfgsPullError, match="audit of batch"):
        pull_day(efgs_settings, engine, "efgs", today, datetime.now(UTC))
    assert len(stored(engine)) == 1
    with engine.connect() as conn:
        assert efgs_db.get_cursor(conn, "efgs", today).last_batch_tag == tags[0]
        (failed,) = efgs_db.list_downloads(conn, "efgs")
    assert failed.completed is None and "audit of batch" in failed.error
    gateway.audit_fail = set()
    gateway.requests.clear()
    report = pull_day(efgs_settings, engine, "efgs", today, datetime.now(UTC))
    assert (report.batches, report.inserted) == (2, 2) and len(stored(engine)) == 3
    assert [r["batchTag"] for r in gateway.requests if "/audit/" not in r["path"]] == tags[1:]


def test_a_tampered_share_or_a_wrong_certificate_refuses_that_country_only(gateway, de, engine, efgs_settings):
    fr, nl, be = gateway.country("FR"), gateway.country("NL"), gateway.country("BE")
    upload_as(gateway, fr, [efgs_key("FR") for _ in range(2)], "fr-1")
    upload_as(gateway, nl, [efgs_key("NL") for _ in range(3)], "nl-1")
    good = [efgs_key("BE") for _ in range(4)]
    upload_as(gateway, be, good, "be-1")
    gateway.batch()
    gateway.tamper = {"FR"}                                                   # FR's keys altered after signing
    gateway.audit_cert = {"NL": fake.Country.create("NL", gateway.pki).signing_cert}   # another NL certificate
    report = pull_day(efgs_settings, engine, "efgs", datetime.now(UTC).date(), datetime.now(UTC))
    assert (report.keys, report.inserted, report.refused) == (9, 4, 5)
    assert report.refused_countries == ["FR", "NL"]
    assert any("FR refused: message digest" in r for r in report.reasons)
    assert any("NL refused" in r for r in report.reasons)
    assert set(stored(engine)) == {k.keyData for k in good}
    with engine.connect() as conn:
        (download,) = efgs_db.list_downloads(conn, "efgs")
    assert (download.refused, download.refused_countries) == (5, ["FR", "NL"])


def test_audit_checks_country_amount_and_certificate_country():
    now = datetime.now(UTC)
    fr = fake.Country.create("FR", fake.Pki.create())
    anchor = fake.Pki.create()
    keys = [efgs_key("FR"), efgs_key("FR")]
    entry = {"country": "FR", "uploadedTime": now.isoformat(), "amount": 2,
             "signingCertificate": fake.pem(fr.signing_cert).decode(),
             "signingCertificateOperatorSignature": fake.operator_signature(anchor, fr.signing_cert),
             "uploaderSigningThumbprint": fake.thumbprint(fr.signing_cert),
             "batchSignature": sign_batch(batch_bytes(keys), fr.signing_cert, fr.signing_key)}
    anchors = [anchor.cert]
    assert verify_shares(keys, [entry], now, trust_anchors=anchors) == (keys, {})
    assert verify_shares(keys, [{**entry, "amount": 3}], now, trust_anchors=anchors)[1] == {
        "FR": (2, "the audit counts 3 key(s), the batch holds 2")}
    assert "no audit entry" in verify_shares(keys, [{**entry, "country": "BE"}], now,
                                             trust_anchors=anchors)[1]["FR"][1]
    other = fake.Country.create("FR", fake.Pki.create(), signing_country="BE")   # a BE certificate signing for FR
    wrong = {**entry, "signingCertificate": fake.pem(other.signing_cert).decode(), "uploaderSigningThumbprint": "",
             "signingCertificateOperatorSignature": fake.operator_signature(anchor, other.signing_cert),
             "batchSignature": sign_batch(batch_bytes(keys), other.signing_cert, other.signing_key)}
    assert "for country 'BE'" in verify_shares(keys, [wrong], now, trust_anchors=anchors)[1]["FR"][1]
    assert "thumbprint" in verify_shares(keys, [{**entry, "uploaderSigningThumbprint": "ab"}], now,
                                         trust_anchors=anchors)[1]["FR"][1]
    expired = verify_shares(keys, [entry], now + timedelta(days=60), trust_anchors=anchors)[1]["FR"][1]
    assert "not valid" in expired
    # Two uploads of one country in one batch: each share is checked against its own signature.
    more = [efgs_key("FR")]
    second = {**entry, "uploadedTime": (now + timedelta(seconds=1)).isoformat(), "amount": 1,
              "batchSignature": sign_batch(batch_bytes(more), fr.signing_cert, fr.signing_key)}
    assert verify_shares(keys + more, [second, entry], now, trust_anchors=anchors) == (keys + more, {})
    # The certificate must carry the trust anchor's signature (over its PEM text as the audit has it).
    unsigned = {**entry, "signingCertificateOperatorSignature": fake.operator_signature(fake.Pki.create(),
                                                                                         fr.signing_cert)}
    assert "not signed by the trust anchor" in verify_shares(keys, [unsigned], now,
                                                             trust_anchors=anchors)[1]["FR"][1]


def test_our_own_origin_is_dropped_even_when_the_gateway_sends_it(gateway, de, engine, efgs_settings):
    fr = gateway.country("FR")
    other_de_server = [efgs_key("DE") for _ in range(2)]
    upload_as(gateway, de, other_de_server, "de-elsewhere")
    upload_as(gateway, fr, [efgs_key("FR")], "fr-1")
    gateway.batch()
    gateway.include_own = True
    report = pull_day(efgs_settings, engine, "efgs", datetime.now(UTC).date(), datetime.now(UTC))
    assert (report.keys, report.own_origin, report.inserted) == (3, 2, 1)
    assert not set(stored(engine)) & {k.keyData for k in other_de_server}


def test_a_revoked_key_revises_only_a_key_from_the_same_target(gateway, de, engine, efgs_settings):
    fr = gateway.country("FR")
    theirs = efgs_key("FR")
    local = insert(engine, [local_key(window()[2])])[0]
    upload_as(gateway, fr, [theirs], "fr-1")
    gateway.batch()
    pull_day(efgs_settings, engine, "efgs", datetime.now(UTC).date(), datetime.now(UTC))
    revoked = [efgs_key("FR", key_data=theirs.keyData, report_type=REVOKED),
               efgs_key("FR", key_data=local.exposure_key, report_type=REVOKED)]
    upload_as(gateway, fr, revoked, "fr-2")
    gateway.batch()
    report = pull_day(efgs_settings, engine, "efgs", datetime.now(UTC).date(), datetime.now(UTC))
    assert (report.revised, report.skipped) == (1, 1)
    rows = stored(engine)
    assert rows[theirs.keyData].revised_report_type == "negative"
    assert rows[local.exposure_key].revised_report_type is None and rows[local.exposure_key].local_provenance


def test_pull_recent_covers_the_gateways_two_day_window(gateway, de, engine, efgs_settings):
    now = datetime.now(UTC)
    reports = pull_recent(efgs_settings, engine, "efgs", now)
    assert [r.day for r in reports] == [now.date() - timedelta(days=n) for n in (2, 1, 0)]
    assert {r.status for r in reports} == {"no_batches"}
    with pytest.raises(EfgsPullError, match="only the last 2 days"):
        pull_day(efgs_settings, engine, "efgs", now.date() - timedelta(days=3), now)


def test_pulled_keys_are_never_pushed_back(gateway, de, engine, efgs_settings):
    fr = gateway.country("FR")
    upload_as(gateway, fr, [efgs_key("FR")], "fr-1")
    gateway.batch()
    pull_day(efgs_settings, engine, "efgs", datetime.now(UTC).date(), datetime.now(UTC))
    (row,) = stored(engine).values()
    # Its created_at is this hour: push a window around it as the push two hours from now would.
    later = datetime.now(UTC) + 2 * HOUR
    start, end = row.created_at - 5 * HOUR, row.created_at + HOUR
    report = push_window(efgs_settings, engine, "efgs", start, end, later)
    assert report.windows[0].keys == 0 and [u.country for u in gateway.uploads] == ["FR"]


# -- signatures, independently of our own verification --------------------------------------------------------

def _openssl_verify(tmp: Path, signature_der: bytes, data: bytes, cert_pem: bytes) -> subprocess.CompletedProcess:
    (tmp / "sig.der").write_bytes(signature_der)
    (tmp / "data.bin").write_bytes(data)
    (tmp / "cert.pem").write_bytes(cert_pem)
    return subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(tmp / "sig.der"),
                           "-content", str(tmp / "data.bin"), "-CAfile", str(tmp / "cert.pem"), "-purpose", "any",
                           "-out", os.devnull], capture_output=True, text=True, timeout=30, check=False)


def test_openssl_verifies_our_batch_signature(tmp_path):
    de = fake.Country.create("DE", fake.Pki.create())
    keys = [efgs_key("DE") for _ in range(3)]
    data = batch_bytes(keys)
    signature = sign_batch(data, de.signing_cert, de.signing_key)
    der = base64.b64decode(signature)
    ok = _openssl_verify(tmp_path, der, data, fake.pem(de.signing_cert))
    assert ok.returncode == 0 and "Verification successful" in ok.stderr
    bad = _openssl_verify(tmp_path, der, data.replace(b".", b",", 1), fake.pem(de.signing_cert))
    assert bad.returncode != 0
    printed = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in",
                              str(tmp_path / "sig.der")], capture_output=True, text=True, timeout=30, check=True).stdout
    assert "eContent: <ABSENT>" in printed             # detached
    assert printed.count("cert_info:") == 1            # carrying only the signing certificate


def test_we_verify_openssls_ber_signature_and_refuse_others(tmp_path):
    """A signature made by openssl with -stream (BER, indefinite lengths, as BouncyCastle writes them; openssl
    encapsulates the content in DER output, which must then be the batch)."""
    fr = fake.Country.create("FR", fake.Pki.create())
    keys = [efgs_key("FR") for _ in range(2)]
    data = batch_bytes(keys)
    (tmp_path / "data.bin").write_bytes(data)
    (tmp_path / "cert.pem").write_bytes(fake.pem(fr.signing_cert))
    (tmp_path / "key.pem").write_bytes(fake.key_pem(fr.signing_key))
    subprocess.run(["openssl", "cms", "-sign", "-binary", "-stream", "-outform", "DER", "-in",
                    str(tmp_path / "data.bin"), "-signer", str(tmp_path / "cert.pem"), "-inkey",
                    str(tmp_path / "key.pem"), "-md", "sha256", "-out", str(tmp_path / "sig.der")],
                   check=True, capture_output=True, timeout=30)
    der = (tmp_path / "sig.der").read_bytes()
    assert der[1] == 0x80   # indefinite length
    signature = base64.b64encode(der).decode()
    verify_batch_signature(signature, data, fr.signing_cert)
    with pytest.raises(SignatureError, match="encapsulates other content"):
        verify_batch_signature(signature, batch_bytes(keys[:1]), fr.signing_cert)
    with pytest.raises(SignatureError, match="not signed with this certificate"):
        verify_batch_signature(signature, data, fake.Country.create("FR", fake.Pki.create()).signing_cert)


def test_rsa_3072_signatures_verify():
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(65537, 3072)
    de = fake.Country.create("DE", fake.Pki.create(), signing_key=key)
    data = batch_bytes([efgs_key("DE")])
    verify_batch_signature(sign_batch(data, de.signing_cert, key), data, de.signing_cert)


# -- CLI ------------------------------------------------------------------------------------------------------

def test_cli_add_push_pull_list_remove(gateway, cli, engine, tmp_path):
    de = gateway.country("DE")
    files = de.write(tmp_path / "pem", gateway.pki)
    args = ["efgs", "add-target", "--id", "eu", "--url", gateway.url, "--country", "DE",
            "--client-cert", str(files["client_cert"]), "--client-key", str(files["client_key"]),
            "--signing-cert", str(files["signing_cert"]), "--signing-key", str(files["signing_key"]),
            "--ca", str(files["ca"]), "--trust-anchor", str(tmp_path / "anchor.pem")]
    (tmp_path / "anchor.pem").write_bytes(fake.pem(gateway.trust_anchor.cert))
    code, out, err = cli(*args)
    assert code == 0, err
    key_dir = tmp_path / "keys"
    for name in ("efgs-eu-tls.pem", "efgs-eu-signing.pem"):
        assert stat.S_IMODE((key_dir / name).stat().st_mode) == 0o600
    with engine.connect() as conn:
        dump = " ".join(str(v) for row in conn.execute(sa.text("SELECT * FROM efgs_target")) for v in row)
    assert "PRIVATE KEY" not in dump and "file:efgs-eu-signing" in dump
    assert cli(*args)[0] == 1   # exists

    code, out, _ = cli("efgs", "list-targets")
    assert code == 0 and "eu" in out and gateway.url in out

    start, end, at = window()
    insert(engine, [local_key(at) for _ in range(2)])
    code, out, err = cli("efgs", "push", "--target", "eu", "--start", start.isoformat(), "--end", end.isoformat())
    assert code == 0, err
    assert "2 key(s) in 1 batch(es), 1 uploaded" in out
    code, out, _ = cli("efgs", "batches", "--target", "eu")
    assert code == 0 and "UPLOADED" in out and "201=2" in out

    fr = gateway.country("FR")
    upload_as(gateway, fr, [efgs_key("FR")], "fr-1")
    gateway.batch()
    code, out, err = cli("efgs", "pull", "--target", "eu", "--date", datetime.now(UTC).date().isoformat())
    assert code == 0, err
    assert "1 batch(es), 1 key(s): 1 inserted" in out
    code, out, _ = cli("efgs", "downloads", "--target", "eu", "--json")
    assert code == 0 and '"inserted": 1' in out and '"cursor"' in out

    code, _, err = cli("efgs", "push", "--target", "eu", "--start", end.isoformat(),
                       "--end", (end + 3 * HOUR).isoformat())
    assert code == 1 and "still open" in err
    code, _, err = cli("efgs", "pull", "--target", "nope", "--date", datetime.now(UTC).date().isoformat())
    assert code == 1 and "no such target" in err

    code, out, _ = cli("efgs", "remove-target", "--id", "eu")
    assert code == 0 and not (key_dir / "efgs-eu-tls.pem").exists() and not (key_dir / "efgs-eu-signing.pem").exists()
    assert cli("efgs", "remove-target", "--id", "eu")[0] == 1
    assert len(stored(engine)) == 3   # pulled and local keys stay


def test_cli_add_target_names_every_problem(gateway, cli, tmp_path):
    de = fake.Country.create("DE", gateway.pki, signing_country="FR")
    files = de.write(tmp_path / "pem", gateway.pki)
    other = fake.Country.create("DE", gateway.pki).write(tmp_path / "other", gateway.pki)
    code, _, err = cli("efgs", "add-target", "--id", "bad id", "--url", "http://efgs.example", "--country", "de",
                       "--client-cert", str(files["client_cert"]), "--client-key", str(other["client_key"]),
                       "--signing-cert", str(files["signing_cert"]), "--signing-key", str(files["signing_key"]))
    assert code == 1
    for part in ("--id 'bad id'", "--url", "--country 'de'", "--client-key is not the private key of --client-cert"):
        assert part in err, part
    code, _, err = cli("efgs", "add-target", "--id", "eu", "--url", gateway.url, "--country", "DE",
                       "--client-cert", str(files["client_cert"]), "--client-key", str(files["client_key"]),
                       "--signing-cert", str(files["signing_cert"]), "--signing-key", str(files["signing_key"]))
    assert code == 1 and "--signing-cert is for country 'FR', not --country 'DE'" in err
    weak = tmp_path / "weak.pem"
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    code, _, err = cli("efgs", "add-target", "--id", "eu", "--url", gateway.url, "--country", "DE",
                       "--client-cert", str(files["client_cert"]), "--client-key", str(weak),
                       "--signing-cert", str(files["signing_cert"]), "--signing-key", str(files["signing_key"]))
    assert code == 1 and "RSA-2048" in err
