"""The byte stream an EFGS batch signature covers (SecReq-016..022), exactly as the gateway rebuilds it.

Not the protobuf: per key, eight fields, each base64-encoded (standard alphabet, padded) and each followed by an
ASCII ``.`` (the last one too):

    keyData . rollingStartIntervalNumber . rollingPeriod . transmissionRiskLevel . visitedCountries . origin .
    reportType . days_since_onset_of_symptoms .

The integers are 4 bytes big-endian (two's complement, so DSOS -1 is ``/////w==``); visitedCountries is the list
joined with ``,`` (no trailing comma, empty for none) and origin its ASCII bytes, both base64-encoded like the
other fields. The keys' records are concatenated in the order of **the base64 encoding of each record**, as the
gateway's BatchSignatureUtils sorts them (and CWA's fix in cwa-server #858). Sorting by the base64 key data
instead, as some descriptions put it, gives another order for some keys (see tests/unit/test_efgs_canonical.py);
the gateway would then answer "Invalid signature".
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Sequence
from typing import Protocol


class CanonicalKey(Protocol):
    """The fields of an EFGS DiagnosisKey (the generated protobuf message has them)."""

    keyData: bytes
    rollingStartIntervalNumber: int
    rollingPeriod: int
    transmissionRiskLevel: int
    visitedCountries: Sequence[str]
    origin: str
    reportType: int
    days_since_onset_of_symptoms: int


SEPARATOR = b"."


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _int(value: int) -> bytes:
    # Java's ByteBuffer.putInt: the low 32 bits, big-endian; uint32 fields above 2^31 wrap like they do there.
    return _b64(struct.pack(">I", value & 0xFFFFFFFF))


def key_record(key: CanonicalKey) -> bytes:
    """One key's share of the stream: the eight base64 fields, each followed by ``.``."""
    fields = (
        _b64(bytes(key.keyData)),
        _int(key.rollingStartIntervalNumber),
        _int(key.rollingPeriod),
        _int(key.transmissionRiskLevel),
        _b64(",".join(key.visitedCountries).encode("ascii")),
        _b64(key.origin.encode("ascii")),
        _int(int(key.reportType)),
        _int(key.days_since_onset_of_symptoms),
    )
    return b"".join(f + SEPARATOR for f in fields)


def batch_bytes(keys: Iterable[CanonicalKey]) -> bytes:
    """The bytes a batch signature covers: the keys' records sorted by their base64 encoding, concatenated."""
    records = [key_record(k) for k in keys]
    records.sort(key=_b64)
    return b"".join(records)
