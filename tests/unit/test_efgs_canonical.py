"""EFGS's canonical byte stream (what a batch signature covers), its DSOS encoding, its upload rules and the batch
plan. The vectors below were worked out by hand from the specification (field order, base64 per field, '.'
after every field) and are asserted as literal bytes, not recomputed with the code under test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from enpipeline.efgs import validation as v
from enpipeline.efgs.canonical import batch_bytes, key_record
from enpipeline.efgs.push import batch_tag, plan_batches
from enpipeline.proto import efgs_pb2
from enpipeline.timeutil import interval_number

# keyData 00 01 .. 0f; rolling start 2,700,000 = 00 29 32 E0; period 144 = 00 00 00 90; TRL 5; visited "DE,FR";
# origin "NL"; report type 1; DSOS -3 = FF FF FF FD.
KEY_A = efgs_pb2.DiagnosisKey(keyData=bytes(range(16)), rollingStartIntervalNumber=2_700_000, rollingPeriod=144,
                              transmissionRiskLevel=5, visitedCountries=["DE", "FR"], origin="NL", reportType=1,
                              days_since_onset_of_symptoms=-3)
RECORD_A = (b"AAECAwQFBgcICQoLDA0ODw==."   # keyData
            b"ACky4A==."                   # rollingStartIntervalNumber, uint32 big-endian
            b"AAAAkA==."                   # rollingPeriod
            b"AAAABQ==."                   # transmissionRiskLevel, int32 big-endian
            b"REUsRlI=."                   # "DE,FR": joined with ',' and no trailing comma, then base64
            b"Tkw=."                       # "NL"
            b"AAAAAQ==."                   # reportType CONFIRMED_TEST
            b"/////Q==.")                  # DSOS -3, two's complement; the last field has its '.' too


def key(first_byte: int, **fields) -> efgs_pb2.DiagnosisKey:
    values = {"keyData": bytes([first_byte]) + bytes(15), "rollingStartIntervalNumber": 2_700_000,
              "rollingPeriod": 144, "transmissionRiskLevel": 0x7FFFFFFF, "origin": "DE", "reportType": 0,
              "days_since_onset_of_symptoms": 4000}
    values.update(fields)
    return efgs_pb2.DiagnosisKey(**values)


# keyData 04 00.. = "BAAA..", 08 00.. = "CAAA..". No visited countries: an empty field, so two dots in a row.
RECORD_B = b"BAAAAAAAAAAAAAAAAAAAAA==.ACky4A==.AAAAkA==.f////w==..REU=.AAAAAA==.AAAPoA==."
RECORD_C = b"CAAAAAAAAAAAAAAAAAAAAA==.ACky4A==.AAAAkA==.f////w==..REU=.AAAAAA==.AAAPoA==."


def test_one_key_record_is_the_hand_computed_vector():
    assert key_record(KEY_A) == RECORD_A
    assert batch_bytes([KEY_A]) == RECORD_A


def test_empty_visited_countries_not_provided_trl_and_dsos_range():
    assert key_record(key(0x04)) == RECORD_B


def test_records_are_sorted_by_their_base64_not_by_the_key_data():
    # base64("BAA") = "QkFB", base64("CAA") = "Q0FB": the gateway's order puts C first, although "BAAA.." < "CAAA.."
    # would put B first when sorting by base64 key data. Peers who sorted the latter way got "Invalid signature".
    assert batch_bytes([key(0x04), key(0x08)]) == RECORD_C + RECORD_B
    assert batch_bytes([key(0x08), key(0x04)]) == RECORD_C + RECORD_B


def test_every_field_is_covered():
    base = batch_bytes([KEY_A])
    changes = {"keyData": bytes(16), "rollingStartIntervalNumber": 2_700_001, "rollingPeriod": 143,
               "transmissionRiskLevel": 4, "visitedCountries": ["DE"], "origin": "BE", "reportType": 2,
               "days_since_onset_of_symptoms": -2}
    for name, value in changes.items():
        changed = efgs_pb2.DiagnosisKey()
        changed.CopyFrom(KEY_A)
        if name == "visitedCountries":
            del changed.visitedCountries[:]
            changed.visitedCountries.extend(value)
        else:
            setattr(changed, name, value)
        assert batch_bytes([changed]) != base, name


def test_visited_country_order_is_kept_as_sent():
    swapped = efgs_pb2.DiagnosisKey()
    swapped.CopyFrom(KEY_A)
    del swapped.visitedCountries[:]
    swapped.visitedCountries.extend(["FR", "DE"])
    assert b".RlIsREU=." in key_record(swapped)  # "FR,DE": the gateway joins the list as it came


# -- days since onset ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (0, v.Dsos(v.EXACT, 0)), (-14, v.Dsos(v.EXACT, -14)), (14, v.Dsos(v.EXACT, 14)),
    (15, v.Dsos(v.INVALID)), (-15, v.Dsos(v.INVALID)),
    (86, v.Dsos(v.RANGE, -14, 1)), (100, v.Dsos(v.RANGE, 0, 1)), (705, v.Dsos(v.RANGE, 5, 7)),
    (1914, v.Dsos(v.RANGE, 14, 19)), (1915, v.Dsos(v.INVALID)),
    (1986, v.Dsos(v.ONSET_UNKNOWN, -14)), (2000, v.Dsos(v.ONSET_UNKNOWN, 0)),
    (2990, v.Dsos(v.ASYMPTOMATIC, -10)), (4014, v.Dsos(v.STATUS_UNKNOWN, 14)),
    (4015, v.Dsos(v.INVALID)), (2500, v.Dsos(v.INVALID)), (0x7FFFFFFF, v.Dsos(v.INVALID)),
])
def test_dsos_ranges_decode(value, expected):
    assert v.decode_dsos(value) == expected


def test_only_a_known_onset_is_stored():
    assert v.decode_dsos(-3).days_since_onset == -3
    assert [v.decode_dsos(x).days_since_onset for x in (705, 2000, 3000, 4000, 9999)] == [None] * 5


def test_dsos_encoding_of_our_keys():
    submitted = datetime(2026, 3, 10, 15, tzinfo=UTC)
    three_days_before = interval_number(datetime(2026, 3, 7, tzinfo=UTC))
    assert v.encode_dsos(2, rolling_start=three_days_before, submitted=submitted) == 2
    assert v.encode_dsos(None, rolling_start=three_days_before, submitted=submitted) == 3997
    long_ago = interval_number(datetime(2026, 2, 1, tzinfo=UTC))
    assert v.encode_dsos(None, rolling_start=long_ago, submitted=submitted) == 3986


# -- EFGS's upload rules ------------------------------------------------------------------------------------------

NOW = datetime(2026, 3, 10, 12, tzinfo=UTC)


def good(**fields) -> efgs_pb2.DiagnosisKey:
    values = {"keyData": bytes(16), "rollingStartIntervalNumber": interval_number(NOW - timedelta(days=2)),
              "rollingPeriod": 144, "transmissionRiskLevel": 3, "origin": "DE", "reportType": 1,
              "days_since_onset_of_symptoms": 0, "visitedCountries": ["FR"]}
    values.update(fields)
    return efgs_pb2.DiagnosisKey(**values)


def test_upload_rules():
    bounds = v.rolling_start_bounds(NOW)
    check = lambda k: v.check_upload_key(k, country="DE", bounds=bounds)  # noqa: E731
    assert check(good()) is None
    assert check(good(transmissionRiskLevel=0x7FFFFFFF)) is None
    earliest = interval_number(datetime(2026, 2, 23, tzinfo=UTC))  # today's midnight - 15 days
    assert check(good(rollingStartIntervalNumber=earliest)) is None
    assert "outside" in check(good(rollingStartIntervalNumber=earliest - 1))
    assert check(good(rollingStartIntervalNumber=interval_number(NOW) + 1)) is None
    assert "outside" in check(good(rollingStartIntervalNumber=interval_number(NOW) + 2))
    assert "16" in check(good(keyData=bytes(15)))
    assert "rolling period" in check(good(rollingPeriod=0))
    assert "rolling period" in check(good(rollingPeriod=145))
    assert "transmission risk" in check(good(transmissionRiskLevel=9))
    assert "origin" in check(good(origin="FR"))
    assert "days since onset" in check(good(days_since_onset_of_symptoms=50))
    assert "visited" in check(good(visitedCountries=["fr"]))


def test_a_key_on_the_edge_of_the_gateways_day_is_held_back():
    before_midnight = datetime(2026, 3, 10, 23, 55, tzinfo=UTC)
    bounds = v.rolling_start_bounds(before_midnight)
    edge = interval_number(datetime(2026, 2, 23, tzinfo=UTC))
    # At the gateway it may already be March 11th, whose window starts on February 24th.
    assert v.check_upload_key(good(rollingStartIntervalNumber=edge), country="DE", bounds=bounds) is not None


def test_our_keys_map_to_efgs_keys():
    row = v.PushRow(bytes(16), 4, 100, 144, "likely", None, ("DE", "FR", "eu-travel", "be"),
                    datetime(2026, 3, 10, tzinfo=UTC))
    k = v.to_efgs_key(row, "DE")
    assert (k.origin, list(k.visitedCountries), k.reportType, k.transmissionRiskLevel) == ("DE", ["BE", "FR"], 2, 4)
    assert 3986 <= k.days_since_onset_of_symptoms <= 4014
    with pytest.raises(ValueError):
        v.to_efgs_key(row._replace(report_type="negative"), "DE")


def test_downloaded_keys_map_to_foreign_keys():
    fk = v.foreign_key(good(origin="FR", visitedCountries=["DE", "BE"], transmissionRiskLevel=0x7FFFFFFF,
                            days_since_onset_of_symptoms=2003), "DE")
    assert fk.transmission_risk == 0 and fk.days_since_onset is None
    assert fk.regions == ("BE", "DE", "FR") and fk.traveler is True


# -- the batch plan -----------------------------------------------------------------------------------------------

def test_plan_splits_at_5000_with_open_ended_bounds():
    keys = sorted(i.to_bytes(16, "big") for i in range(10_001))
    plan = plan_batches(keys, 5000)
    assert [count for _, _, count in plan] == [5000, 5000, 1]
    assert plan[0][0] is None and plan[0][1] == keys[5000]
    assert plan[1] == (keys[5000], keys[10_000], 5000)
    assert plan[2] == (keys[10_000], None, 1)
    assert plan_batches(keys[:5000], 5000) == [(None, None, 5000)]
    assert plan_batches([], 5000) == []


def test_batch_tags_are_deterministic_and_name_the_country_and_window():
    start = datetime(2026, 3, 10, 10, tzinfo=UTC)
    tag = batch_tag("DE", start, start + timedelta(hours=1), 2)
    assert tag == "DE-20260310100000-20260310110000-2" == batch_tag("DE", start, start + timedelta(hours=1), 2)
