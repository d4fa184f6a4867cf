"""Keyset cursors of the Fetch server: where a partner's primary and revised key streams have reached.

The reference encodes a row offset into its created_at-ordered result, so a key deleted (or inserted) before
the offset between two pages makes the next page skip (or repeat) keys. Here a cursor names the last key served,
as its exact (timestamp, exposure_key) position in the index order, and the next page starts strictly after it:
deletes and inserts elsewhere in the order cannot move it.

On the wire a cursor stays the reference's ``Cursor{timestamp, nextToken}``: ``timestamp`` is the unix second of
the last served key (for operators and reference clients), ``nextToken`` is ``base64url(version, kind, µs, key)``
and opaque to clients. A cursor with only a timestamp (what a reference server hands out after a complete fetch)
starts at that second, inclusive.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta

from enpipeline.timeutil import EPOCH

PRIMARY = "k"
REVISED = "r"

_VERSION = 1
_HEADER = struct.Struct(">BcQ")  # version, kind, microseconds since the epoch
_KEY_LENGTH = 16                 # exposure keys are exactly 16 bytes (CHECK in sql/0001)
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
# datetime cannot go past year 9999; a larger timestamp is a forged or corrupted cursor.
_MAX_SECONDS = int((datetime(9999, 12, 31, tzinfo=EPOCH.tzinfo) - EPOCH).total_seconds())


class InvalidCursor(ValueError):
    """A cursor the server did not hand out (or for the other key stream)."""


@dataclass(frozen=True)
class Position:
    """Everything at or before (at, key) in (timestamp, exposure_key) order has been served.

    ``key == b""`` sorts before every real key, so Position(t, b"") means "start at t, inclusive".
    """

    at: datetime
    key: bytes = b""


START = Position(EPOCH, b"")


def decode(timestamp: int, token: str, kind: str) -> Position:
    """The position a client's cursor names; raises InvalidCursor for anything we did not issue."""
    if not token:
        if not 0 <= timestamp <= _MAX_SECONDS:
            raise InvalidCursor("timestamp out of range")
        return Position(EPOCH + timedelta(seconds=timestamp), b"")
    if len(token) > 64 or not _TOKEN.fullmatch(token):
        raise InvalidCursor("not base64url")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidCursor("not base64url") from None
    if len(raw) != _HEADER.size + _KEY_LENGTH:
        raise InvalidCursor("wrong length")
    version, token_kind, micros = _HEADER.unpack_from(raw)
    if version != _VERSION:
        raise InvalidCursor(f"unknown version {version}")
    # A revised-key cursor in the primary slot (or the reverse) would silently skip keys.
    if token_kind != kind.encode():
        raise InvalidCursor("cursor of the other key stream")
    if micros > _MAX_SECONDS * 1_000_000:
        raise InvalidCursor("timestamp out of range")
    return Position(EPOCH + timedelta(microseconds=micros), raw[_HEADER.size:])


def encode(position: Position, kind: str) -> tuple[int, str]:
    """(Cursor.timestamp, Cursor.nextToken) for a position reached by serving a real key."""
    if len(position.key) != _KEY_LENGTH:
        raise ValueError("a cursor token names a served key")
    micros = (position.at - EPOCH) // timedelta(microseconds=1)
    raw = _HEADER.pack(_VERSION, kind.encode(), micros) + position.key
    return micros // 1_000_000, base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
