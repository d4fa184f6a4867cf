"""Keyset cursor tokens of the Fetch server: round trips and refusal of anything we did not issue."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from enpipeline.federation import cursor
from enpipeline.federation.cursor import PRIMARY, REVISED, InvalidCursor, Position

AT = datetime(2026, 3, 1, 14, 0, 0, 123456, tzinfo=UTC)
KEY = bytes(range(16))


def test_round_trip_keeps_the_exact_microsecond_and_key():
    timestamp, token = cursor.encode(Position(AT, KEY), PRIMARY)
    assert timestamp == int(AT.timestamp())
    assert cursor.decode(timestamp, token, PRIMARY) == Position(AT, KEY)
    assert "=" not in token and len(token) <= 64


def test_timestamp_only_cursor_starts_at_that_second_and_empty_is_the_start():
    assert cursor.decode(1_700_000_000, "", PRIMARY) == Position(datetime.fromtimestamp(1_700_000_000, UTC), b"")
    assert cursor.decode(0, "", REVISED) == cursor.START


def test_the_token_wins_over_a_disagreeing_timestamp():
    _, token = cursor.encode(Position(AT, KEY), REVISED)
    assert cursor.decode(0, token, REVISED) == Position(AT, KEY)


@pytest.mark.parametrize("token", [
    "!!", "a", "AAAA", base64.b64encode(b"17").decode(),        # junk and the reference's offset cursor
    base64.urlsafe_b64encode(b"\x02k" + bytes(8) + KEY).decode(),  # unknown version
    base64.urlsafe_b64encode(b"\x01k" + bytes(8) + KEY[:15]).decode(),  # short key
    base64.urlsafe_b64encode(b"\x01k" + b"\xff" * 8 + KEY).decode(),   # past year 9999
    "A" * 65,
])
def test_tokens_we_did_not_issue_are_refused(token):
    with pytest.raises(InvalidCursor):
        cursor.decode(0, token, PRIMARY)


def test_a_token_of_the_other_stream_is_refused():
    _, token = cursor.encode(Position(AT, KEY), REVISED)
    with pytest.raises(InvalidCursor):
        cursor.decode(0, token, PRIMARY)


@pytest.mark.parametrize("timestamp", [-1, 10**12])
def test_out_of_range_timestamps_are_refused(timestamp):
    with pytest.raises(InvalidCursor):
        cursor.decode(timestamp, "", PRIMARY)

