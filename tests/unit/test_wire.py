"""Unit tests for enpipeline.publish.wire: the v1 publish body decoder and response encoder.

Expected messages are those of the reference's internal/jsonutil/unmarshal.go (Go 1.19 encoding/json);
the syntax-error offsets and the accept/reject decisions were checked against that code compiled with
Go 1.19. Deliberate differences are marked DEVIATION.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from enpipeline.model import ExposureKeyInput, PublishRequest
from enpipeline.publish import wire
from enpipeline.publish.wire import WireError, check_content_type, decode_publish, publish_response, random_padding

MAX = 64_000
KEY = "z2Cx9hdz2SlxZ8GEgqTYpA=="


def decode(body: bytes | str, max_bytes: int = MAX) -> PublishRequest:
    return decode_publish(body.encode() if isinstance(body, str) else body, max_bytes)


def refused(body: bytes | str, max_bytes: int = MAX) -> WireError:
    with pytest.raises(WireError) as info:
        decode(body, max_bytes)
    return info.value


# --- Content-Type ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    "application/json",
    "application/json; charset=utf-8",
    "application/json;charset=UTF-8",
    "application/jsonfoo",  # the reference only compares the first 16 characters
])
def test_content_type_accepted(content_type: str) -> None:
    check_content_type(content_type)  # no exception


@pytest.mark.parametrize("content_type", [
    None,
    "",
    "text/plain",
    "Application/JSON",  # case-sensitive
    "application/JSON",
    "application/jso",  # shorter than 16 characters
    " application/json",
    "application/x-www-form-urlencoded",
    "text/json",
])
def test_content_type_refused_with_415(content_type: str | None) -> None:
    with pytest.raises(WireError) as info:
        check_content_type(content_type)
    assert info.value.status == 415
    assert info.value.message == "content-type is not application/json"


# --- size and emptiness ------------------------------------------------------------------------------


def test_body_over_limit_is_413() -> None:
    body = '{"padding":"' + "a" * (MAX - 13) + '"}'  # MAX + 1 bytes
    assert len(body) == MAX + 1
    err = refused(body)
    assert (err.status, err.message) == (413, "http: request body too large")


def test_body_exactly_at_limit_is_accepted() -> None:
    body = '{"padding":"' + "a" * (MAX - 14) + '"}'
    assert len(body) == MAX
    assert decode(body).padding == "a" * (MAX - 14)


def test_limit_is_a_parameter() -> None:
    assert refused("{}   ", max_bytes=4).status == 413
    assert decode("{}  ", max_bytes=4) == PublishRequest()


@pytest.mark.parametrize("body", [b"", b" ", b"\n", b"\r\n\t  \n"])
def test_empty_or_whitespace_body(body: bytes) -> None:
    err = refused(body)
    assert (err.status, err.message) == (400, "body must not be empty")


@pytest.mark.parametrize("body", [b"\x0b", b"\x0c", "\u00a0".encode(), "\u2003{}".encode()])
def test_non_json_whitespace_is_a_syntax_error_not_empty(body: bytes) -> None:
    # JSON (and Go) whitespace is only space, tab, CR and LF.
    err = refused(body)
    assert (err.status, err.message) == (400, "malformed json at position 1")


# --- syntax errors -------------------------------------------------------------------------------------
# Go's SyntaxError.Offset counts the bytes read including the offending one, i.e. its 0-based index + 1.


@pytest.mark.parametrize(("body", "position"), [
    (b'{"a" 1}', 6),
    (b'{"a":1,}', 8),
    (b'{"a":1 "b":2}', 8),
    (b"{1:2}", 2),
    (b"{,}", 2),
    (b"[1,]", 4),
    (b"[,]", 2),
    (b'{"a":01}', 7),
    (b'{"a":1.}', 8),
    (b'{"a":1e}', 8),
    (b'{"a":-a}', 7),
    (b'{"traveler":trux}', 16),
    (b'{"a\\x":1}', 5),  # bad escape: the character after the backslash
    (b'{"a\\u12g4":1}', 8),  # bad \u escape: the first non-hex digit
    (b'{"hmacKey":"a\x01"}', 14),  # control character inside a string
    (b'{"hmacKey":"a\nb"}', 14),
    (b"\xef\xbb\xbf{}", 1),  # a UTF-8 byte order mark is not allowed
    (b"x", 1),
    (b"1.x", 3),
    (b'  {"a":}', 8),  # offsets count leading whitespace
    ('{"paddin\u00e9":}'.encode(), 13),  # byte offsets: a character offset would be 12
])
def test_syntax_error_position(body: bytes, position: int) -> None:
    err = refused(body)
    assert (err.status, err.message) == (400, f"malformed json at position {position}")


@pytest.mark.parametrize(("literal", "position"), [
    (b"NaN", 25), (b"Infinity", 25), (b"-Infinity", 26), (b"nan", 26), (b"+1", 25), (b".5", 25),
])
def test_non_json_number_literals_rejected(literal: bytes, position: int) -> None:
    # Python's json module accepts NaN/Infinity; Go (and so the reference) does not.
    err = refused(b'{"symptomOnsetInterval":' + literal + b"}")
    assert (err.status, err.message) == (400, f"malformed json at position {position}")


@pytest.mark.parametrize("body", [
    b"{", b'{"', b'{"a', b'{"a"', b'{"a":', b'{"a":1', b'{"a":1,', b'{"a":1   ', b'{"hmacKey":"abc',
    b'{"hmacKey":"ab\\', b'{"hmacKey":"\\u00', b'{"traveler":tr', b'{"traveler":true', b'{"symptomOnsetInterval":-',
    b'{"symptomOnsetInterval":1.', b'{"symptomOnsetInterval":1e+', b'{"temporaryExposureKeys":[{"key":"a"}',
    b"[", b"tru", b"nul", b"-",
])
def test_truncated_body(body: bytes) -> None:
    err = refused(body)
    assert (err.status, err.message) == (400, "malformed json")


def test_nesting_depth_limit_is_go_s() -> None:
    # Go's scanner allows 10000 nested containers; deeper is a syntax error at the 10001st bracket.
    ok = b'{"padding":' + b"[" * 9999 + b"]" * 9999 + b"}"
    assert refused(ok).message == 'invalid value "padding" at position 12'
    too_deep = b'{"padding":' + b"[" * 10000 + b"]" * 10000 + b"}"
    assert refused(too_deep).message == f"malformed json at position {11 + 10000}"


def test_deep_nesting_does_not_crash() -> None:
    # Python's json module raises RecursionError here; the decoder must answer like Go instead.
    err = refused(b"[" * 5000 + b"]" * 5000)
    assert (err.status, err.message) == (400, 'invalid value "" at position 1')


# --- more than one value --------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{}{}", b"{} {}", b'{"hmacKey":"a"} {"b":1}', b"{}x", b"{} ,", b"{} 1", b"null x"])
def test_two_values(body: bytes) -> None:
    err = refused(body)
    assert (err.status, err.message) == (400, "body must contain only one JSON object")


@pytest.mark.parametrize("body", [b"{}}", b"{}]", b"{} ]", b"{}\n}garbage", b"null }"])
def test_trailing_close_bracket_is_accepted_like_go(body: bytes) -> None:
    # Quirk kept for compatibility: Go's Decoder.More() is false before ']' or '}'.
    assert decode(body) == PublishRequest()


def test_decode_error_in_first_value_wins_over_extra_content() -> None:
    assert refused(b'{"x":1} {}').message == 'unknown field "x"'
    assert refused(b'{"traveler":1}{}').message == 'invalid value "traveler" at position 13'


# --- unknown fields --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    (b'{"x":1}', 'unknown field "x"'),
    (b'{"temporaryExposureKeys":[{"key":"a","x":1}]}', 'unknown field "x"'),
    (b'{"regions":["US"]}', 'unknown field "regions"'),  # v1alpha1-only fields are not part of v1
    (b'{"appPackageName":"a"}', 'unknown field "appPackageName"'),
    (b'{"platform":"android"}', 'unknown field "platform"'),
    (b'{"temporaryExposureKeys":[{"rollingStartNumber":1,"RollingPeriod":1}],"RollingPeriod":1}',
     'unknown field "RollingPeriod"'),  # a key field is not a top-level field
    (b'{"a\\"b":1}', 'unknown field "a\\"b"'),  # echoed with Go's %q quoting
    (b'{"\\u0000":1}', 'unknown field "\\x00"'),
    (b'{"x\\u007f\\u0085":1}', 'unknown field "x\\x7f\\u0085"'),
    ('{"na\u00efve\u200b":1}'.encode(), 'unknown field "na\u00efve\\u200b"'),
    ('{"veri\ufb01cationPayload":"x"}'.encode(), 'unknown field "veri\ufb01cationPayload"'),  # no Unicode casefold
    ('{"healthAuthor\u0131tyID":"x"}'.encode(), 'unknown field "healthAuthor\u0131tyID"'),
])
def test_unknown_field(body: bytes, message: str) -> None:
    err = refused(body)
    assert (err.status, err.message) == (400, message)


# --- wrong types --------------------------------------------------------------------------------------
# Positions are Go's UnmarshalTypeError.Offset (end of a literal, or just past an opening bracket),
# checked against Go 1.19's encoding/json.


@pytest.mark.parametrize(("body", "path", "position"), [
    ('{"symptomOnsetInterval":"1"}', "symptomOnsetInterval", 27),  # string for int
    ('{"symptomOnsetInterval":1.5}', "symptomOnsetInterval", 27),  # float for int
    ('{"symptomOnsetInterval":1.0}', "symptomOnsetInterval", 27),  # Go refuses 1.0 for an int too
    ('{"symptomOnsetInterval":1e2}', "symptomOnsetInterval", 27),
    ('{"symptomOnsetInterval":2147483648}', "symptomOnsetInterval", 34),  # out of int32 range
    ('{"symptomOnsetInterval":-2147483649}', "symptomOnsetInterval", 35),
    ('{"symptomOnsetInterval":true}', "symptomOnsetInterval", 28),
    ('{"symptomOnsetInterval":[]}', "symptomOnsetInterval", 25),
    ('{"symptomOnsetInterval":' + "1" * 5000 + "}", "symptomOnsetInterval", 5024),  # no int() digit-limit crash
    ('{"traveler":"true"}', "traveler", 18),  # string for bool
    ('{"traveler":1}', "traveler", 13),
    ('{"healthAuthorityID":1}', "healthAuthorityID", 22),
    ('{"healthAuthorityID":["a"]}', "healthAuthorityID", 22),
    ('{"healthAuthorityID":{}}', "healthAuthorityID", 22),
    ('{"padding":false}', "padding", 16),
    ('{"temporaryExposureKeys":{}}', "temporaryExposureKeys", 26),  # object instead of array
    ('{"temporaryExposureKeys":"x"}', "temporaryExposureKeys", 28),
    ('{"temporaryExposureKeys":[1]}', "temporaryExposureKeys", 27),
    ('{"temporaryExposureKeys":[[]]}', "temporaryExposureKeys", 27),
    ('{"temporaryExposureKeys":[{"key":1}]}', "temporaryExposureKeys.key", 34),
    ('{"temporaryExposureKeys":[{"rollingPeriod":"144"}]}', "temporaryExposureKeys.rollingPeriod", 48),
    ('{"temporaryExposureKeys":[{"key":"a"},{"rollingStartNumber":1.5}]}',
     "temporaryExposureKeys.rollingStartNumber", 63),
    ('{"temporaryExposureKeys":[{"rollingStartNumber":2147483648}]}', "temporaryExposureKeys.rollingStartNumber", 58),
    ('{"temporaryExposureKeys":[{"transmissionRisk":9223372036854775808}]}',
     "temporaryExposureKeys.transmissionRisk", 65),
    ('{"temporaryExposureKeys":[{"transmissionRisk":"2"}]}', "temporaryExposureKeys.transmissionRisk", 49),
    ('{"TRAVELER":"x"}', "traveler", 15),  # the path uses the declared name, not the one sent
    ("[]", "", 1),  # top-level array
    ('["a"]', "", 1),
    ('"text"', "", 6),
    ("12", "", 2),
    ("true", "", 4),
    ('"a"x', "", 3),  # Go ends a top-level scalar at the next byte, then reports the type
    ("1x", "", 1),
])
def test_wrong_type(body: str, path: str, position: int) -> None:
    err = refused(body)
    assert (err.status, err.message) == (400, f'invalid value "{path}" at position {position}')


def test_first_problem_in_document_order_is_reported() -> None:
    assert refused('{"traveler":"x","zz":1}').message == 'invalid value "traveler" at position 15'
    assert refused('{"zz":1,"traveler":"x"}').message == 'unknown field "zz"'
    assert refused('{"temporaryExposureKeys":[{"key":1},{"zz":2}]}').message == (
        'invalid value "temporaryExposureKeys.key" at position 34')


@pytest.mark.parametrize(("value", "expected"), [
    ("2147483647", 2147483647), ("-2147483648", -2147483648), ("0", 0), ("-0", 0), ("144", 144),
])
def test_int32_range_edges(value: str, expected: int) -> None:
    assert decode('{"symptomOnsetInterval":' + value + "}").symptom_onset_interval == expected
    key = decode('{"temporaryExposureKeys":[{"rollingStartNumber":' + value + "}]}").keys[0]
    assert key.rolling_start_number == expected


@pytest.mark.parametrize("value", [2147483648, 9223372036854775807, -9223372036854775808])
def test_transmission_risk_is_a_64_bit_int_like_go(value: int) -> None:
    # The reference declares TransmissionRisk as Go `int`: big values decode, and the transform then
    # reports "invalid transmission risk" for the key instead of failing the whole request.
    request = decode(f'{{"temporaryExposureKeys":[{{"key":"a","transmissionRisk":{value}}}]}}')
    assert request.keys[0].transmission_risk == value


# --- field names, values, nulls ------------------------------------------------------------------------


def test_full_request_decodes() -> None:
    body = {
        "temporaryExposureKeys": [
            {"key": KEY, "rollingStartNumber": 2650000, "rollingPeriod": 144, "transmissionRisk": 3},
            {"key": "dPCphLzfG4uzXneNimkPRQ==", "rollingStartNumber": 2650144, "rollingPeriod": 100},
        ],
        "healthAuthorityID": "com.example.app",
        "verificationPayload": "a.b.c",
        "hmacKey": "aGVsbG8=",
        "symptomOnsetInterval": 2649000,
        "traveler": True,
        "revisionToken": "dG9rZW4=",
        "padding": "cGFk",
    }
    assert decode(json.dumps(body)) == PublishRequest(
        keys=(ExposureKeyInput(KEY, 2650000, 144, 3), ExposureKeyInput("dPCphLzfG4uzXneNimkPRQ==", 2650144, 100, 0)),
        health_authority_id="com.example.app",
        verification_payload="a.b.c",
        hmac_key="aGVsbG8=",
        symptom_onset_interval=2649000,
        traveler=True,
        revision_token="dG9rZW4=",
        padding="cGFk",
    )


@pytest.mark.parametrize("name", ["hmacKey", "hmackey", "HMACKey", "HMACKEY", "hMaCkEy", "hmac\u212aey"])
def test_field_names_match_case_insensitively(name: str) -> None:
    # Go folds ASCII case, plus U+212A KELVIN SIGN onto k and U+017F LONG S onto s.
    assert decode(json.dumps({name: "secret"}, ensure_ascii=False)).hmac_key == "secret"


def test_case_insensitive_names_at_both_levels() -> None:
    request = decode('{"TEMPORARYEXPOSUREKEYS":[{"KEY":"k","RollingPeriod":7,"ROLLINGSTARTNUMBER":5,'
                     '"transmissionrisk":2}],"HealthAuthorityId":"h","TRAVELER":true}')
    assert request.keys == (ExposureKeyInput("k", 5, 7, 2),)
    assert request.health_authority_id == "h"
    assert request.traveler is True
    assert decode('{"temporaryExpo\u017fureKey\u017f":[{"key":"z"}]}').keys == (ExposureKeyInput("z"),)


def test_duplicate_names_last_wins() -> None:
    assert decode('{"hmacKey":"a","HMACKEY":"b"}').hmac_key == "b"
    assert decode('{"hmacKey":"a","hmacKey":"b"}').hmac_key == "b"
    assert decode('{"hmacKey":"a","hmacKey":null}').hmac_key == "a"  # null changes nothing


def test_null_leaves_defaults() -> None:
    every_field_null = {name: None for name in ("temporaryExposureKeys", "healthAuthorityID", "verificationPayload",
                                                 "hmacKey", "symptomOnsetInterval", "traveler", "revisionToken",
                                                 "padding")}
    assert decode(json.dumps(every_field_null)) == PublishRequest()
    key = decode('{"temporaryExposureKeys":[{"key":null,"rollingStartNumber":null,"rollingPeriod":null,'
                 '"transmissionRisk":null}]}').keys[0]
    assert key == ExposureKeyInput(key="", rolling_start_number=0, rolling_period=0, transmission_risk=0)


@pytest.mark.parametrize("body", ["null", " null ", "{}", '{"temporaryExposureKeys":[]}'])
def test_no_fields_gives_empty_request(body: str) -> None:
    assert decode(body) == PublishRequest()


def test_null_or_incomplete_key_is_a_zero_value_key() -> None:
    # Go decodes null into a zero struct; the transform later rejects the key ("invalid key length, 0").
    assert decode('{"temporaryExposureKeys":[null]}').keys == (ExposureKeyInput(key=""),)
    assert decode('{"temporaryExposureKeys":[{"rollingPeriod":3}]}').keys == (
        ExposureKeyInput(key="", rolling_period=3),)


@pytest.mark.parametrize(("literal", "expected"), [
    ('"\\u00e9"', "\u00e9"),
    ('"\u00e9"', "\u00e9"),
    ('"\\ud83d\\ude00"', "\U0001f600"),
    ('"\\/\\b\\f\\n\\r\\t\\"\\\\"', '/\b\f\n\r\t"\\'),
    ('"\\ud800"', "\ufffd"),  # a lone surrogate becomes U+FFFD, as in Go
    ('"\\ud800\\u0041"', "\ufffdA"),
    ('"\\udc00\\ud800"', "\ufffd\ufffd"),
    ('"a\x7fb"', "a\x7fb"),  # DEL is not a control character for JSON
])
def test_string_escapes(literal: str, expected: str) -> None:
    assert decode('{"padding":' + literal + "}").padding == expected


def test_whitespace_around_tokens() -> None:
    request = decode(' \r\n\t{ "hmacKey" :\t"a" , "traveler"\n:\ntrue } \n')
    assert (request.hmac_key, request.traveler) == ("a", True)


@pytest.mark.parametrize(("body", "position"), [
    (b'{"hmacKey":"\xff"}', 13),
    (b'{"hmacKey":"ab\xc3"}', 15),
    (b'{"padding":"\xed\xa0\x80"}', 13),  # an encoded surrogate is not UTF-8 either
])
def test_invalid_utf8_in_strings_is_refused(body: bytes, position: int) -> None:
    # DEVIATION: Go substitutes U+FFFD for invalid UTF-8 inside strings and carries on; we refuse the body.
    err = refused(body)
    assert (err.status, err.message) == (400, f"malformed json at position {position}")


@pytest.mark.parametrize(("body", "position"), [(b"\xff", 1), (b'{"a":1,\x80}', 8), (b'{"a":\xc3\xa9}', 6)])
def test_invalid_utf8_outside_strings_is_a_syntax_error(body: bytes, position: int) -> None:
    err = refused(body)
    assert (err.status, err.message) == (400, f"malformed json at position {position}")


def test_syntax_error_wins_over_invalid_utf8_earlier_in_a_string() -> None:
    # Go checks syntax for the whole value first (it accepts the bytes); so do we.
    assert refused(b'{"padding":"\xff",}').message == "malformed json at position 16"


# --- response --------------------------------------------------------------------------------------


def test_response_field_order_and_all_fields() -> None:
    out = publish_response(revision_token="tok", inserted=3, error="e", code="partial_failure", padding="p",
                           warnings=["w1", "w2"])
    assert list(out) == ["revisionToken", "insertedExposures", "error", "code", "padding", "warnings"]
    assert json.dumps(out, separators=(",", ":")) == (
        '{"revisionToken":"tok","insertedExposures":3,"error":"e","code":"partial_failure",'
        '"padding":"p","warnings":["w1","w2"]}')


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, {}),
    ({"inserted": 0, "revision_token": "t"}, {"revisionToken": "t"}),  # insertedExposures 0 is left out
    ({"inserted": 1}, {"insertedExposures": 1}),
    ({"error": "", "code": "", "padding": "", "warnings": []}, {}),
    ({"warnings": None, "padding": "p"}, {"padding": "p"}),
    ({"error": "boom", "code": "bad_request", "padding": "p"},
     {"error": "boom", "code": "bad_request", "padding": "p"}),
    ({"padding": "p", "warnings": ["w"]}, {"padding": "p", "warnings": ["w"]}),  # revision-only-style answer
])
def test_response_omitempty(fields: dict, expected: dict) -> None:
    out = publish_response(**fields)
    assert out == expected
    assert list(out) == list(expected)


def test_response_copies_warnings() -> None:
    warnings = ["w"]
    out = publish_response(warnings=warnings)
    warnings.append("later")
    assert out["warnings"] == ["w"]


# --- padding ----------------------------------------------------------------------------------------


@pytest.fixture
def fixed_randrange(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """random_padding's size draws come from this list (and must be in range for the spread asked)."""
    choices: list[int] = []

    def choose(stop: int) -> int:
        value = choices.pop(0)
        assert 0 <= value < stop
        return value

    monkeypatch.setattr(wire.random, "randrange", choose)
    yield choices


def test_padding_bounds_exactly(fixed_randrange: list[int]) -> None:
    fixed_randrange.extend([0, 1023])
    smallest, largest = random_padding(1024, 1024), random_padding(1024, 1024)
    assert len(base64.b64decode(smallest, validate=True)) == 1024
    assert len(smallest) == 1368
    assert len(base64.b64decode(largest, validate=True)) == 2047
    assert len(largest) == 2732


def test_padding_over_many_samples() -> None:
    lengths = set()
    for _ in range(3000):
        padding = random_padding(1024, 1024)
        raw = base64.b64decode(padding, validate=True)  # std alphabet with '=' padding
        assert 1024 <= len(raw) <= 2047
        assert 1368 <= len(padding) <= 2732
        assert len(padding) == 4 * ((len(raw) + 2) // 3)
        lengths.add(len(raw))
    assert len(lengths) > 500  # sizes are spread out, not fixed
    assert min(lengths) < 1100 and max(lengths) > 1970


def test_padding_without_spread_has_the_minimum_size() -> None:
    assert {len(base64.b64decode(random_padding(100, 0))) for _ in range(20)} == {100}


def test_padding_is_random() -> None:
    assert len({random_padding(32, 0) for _ in range(50)}) == 50
