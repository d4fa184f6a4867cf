"""Vectorised (numpy) protobuf encoder for the repeated ``TemporaryExposureKey`` fields of an export.

This is the hot path of export writing (up to 500,000 keys per file). It produces exactly the bytes the
protoc-generated classes produce for the same keys filled by the rules of ``format.py``:

* field 1 ``key_data`` (16 bytes) and field 2 ``transmission_risk_level`` (int32) are always written;
* field 3 ``rolling_start_interval_number`` (int32) is written unless it is 0;
* field 4 ``rolling_period`` (int32) is written unless it is 144 (the proto default);
* field 5 ``report_type`` (enum) is written unless it is 0;
* field 6 ``days_since_onset_of_symptoms`` (sint32, zig-zag) is written where ``dsos_present``.

Each key becomes ``tag(field, LEN) | length | body``, fields in field-number order, as protobuf serialises
them. A body is at most 59 bytes, so its length is always a single varint byte. Negative int32 values are
sign-extended to 64 bits and take 10 varint bytes, as protobuf does.

The caller validates the columns (dtype, shape, int32 ranges); see ``KeyColumns.validate``.
"""

from __future__ import annotations

import numpy as np

KEY_LENGTH = 16
DEFAULT_ROLLING_PERIOD = 144
_WIRE_VARINT = 0
_WIRE_LEN = 2

_TAG_KEY_DATA = (1 << 3) | _WIRE_LEN  # 0x0A
_TAG_TR = (2 << 3) | _WIRE_VARINT  # 0x10
_TAG_RSIN = (3 << 3) | _WIRE_VARINT  # 0x18
_TAG_RP = (4 << 3) | _WIRE_VARINT  # 0x20
_TAG_REPORT_TYPE = (5 << 3) | _WIRE_VARINT  # 0x28
_TAG_DSOS = (6 << 3) | _WIRE_VARINT  # 0x30

# Thresholds 2**7, 2**14, ... 2**63: a varint of u has 1 + (number of thresholds <= u) bytes.
_VARINT_THRESHOLDS = [np.uint64(1) << np.uint64(7 * k) for k in range(1, 10)]


def _as_varint_u64(values: np.ndarray) -> np.ndarray:
    """int32/int64 values as the unsigned 64-bit number protobuf varint-encodes (negatives sign-extended)."""
    return values.astype(np.int64, copy=False).view(np.uint64)


def _zigzag32(values: np.ndarray) -> np.ndarray:
    """sint32 zig-zag encoding; for values in int32 range this equals zig-zag over 64 bits."""
    v = values.astype(np.int64, copy=False)
    return ((v << 1) ^ (v >> 63)).view(np.uint64)


def varint_lengths(u: np.ndarray) -> np.ndarray:
    """Number of bytes of the varint encoding of every unsigned 64-bit value in ``u`` (1..10)."""
    lengths = np.ones(u.shape, dtype=np.int64)
    if u.size == 0:
        return lengths
    top = int(u.max())
    for threshold in _VARINT_THRESHOLDS:
        if top < int(threshold):
            break
        lengths += u >= threshold
    return lengths


def _write_varints(flat: np.ndarray, at: np.ndarray, u: np.ndarray, lengths: np.ndarray) -> None:
    """Write the varint of ``u[i]`` into ``flat`` starting at index ``at[i]`` (``lengths[i]`` bytes)."""
    if u.size == 0:
        return
    max_len = int(lengths.max())
    uniform = int(lengths.min()) == max_len
    for j in range(max_len):
        byte = ((u >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        if uniform:
            if j < max_len - 1:
                byte |= np.uint8(0x80)
            flat[at + j] = byte
            continue
        byte[lengths - 1 > j] |= np.uint8(0x80)
        if j == 0:
            flat[at] = byte
        else:
            live = lengths > j
            flat[at[live] + j] = byte[live]


def encode_keys(
    field_number: int,
    key: np.ndarray,
    transmission_risk: np.ndarray,
    interval_number: np.ndarray,
    interval_count: np.ndarray,
    report_type: np.ndarray,
    dsos: np.ndarray,
    dsos_present: np.ndarray,
) -> bytes:
    """Serialise ``n`` keys as the repeated message field ``field_number`` (7 = keys, 8 = revised_keys).

    ``key`` is an (n, 16) uint8 array; the other arguments are length-n integer arrays (``dsos_present`` bool).
    Returns the concatenated ``tag | len | TemporaryExposureKey`` records, ready to append to a serialised
    ``TemporaryExposureKeyExport`` whose fields 1..(field_number - 1) precede them.
    """
    n = int(key.shape[0])
    if n == 0:
        return b""
    if key.shape != (n, KEY_LENGTH):
        raise ValueError(f"key must have shape (n, {KEY_LENGTH}), got {key.shape}")
    if not 1 <= field_number <= 15:
        raise ValueError("field_number must be 1..15 (one-byte tag)")

    # Presence and value of every optional varint field, in field-number order.
    fields: list[tuple[int, np.ndarray | None, np.ndarray]] = []  # (tag, present mask or None = all, u64 values)
    fields.append((_TAG_TR, None, _as_varint_u64(transmission_risk)))
    fields.append((_TAG_RSIN, interval_number != 0, _as_varint_u64(interval_number)))
    fields.append((_TAG_RP, interval_count != DEFAULT_ROLLING_PERIOD, _as_varint_u64(interval_count)))
    fields.append((_TAG_REPORT_TYPE, report_type != 0, _as_varint_u64(report_type)))
    fields.append((_TAG_DSOS, np.asarray(dsos_present, dtype=bool), _zigzag32(dsos)))

    # Per-row byte count of each field (0 where absent); body starts with key_data (tag, len, 16 bytes).
    field_lengths = []
    body = np.full(n, 2 + KEY_LENGTH, dtype=np.int64)
    for _tag, present, u in fields:
        lengths = 1 + varint_lengths(u)  # tag byte + varint
        if present is not None:
            lengths = np.where(present, lengths, 0)
        field_lengths.append(lengths)
        body += lengths
    if int(body.max()) > 127:  # cannot happen for int32 inputs (max 59); guards the one-byte length below
        raise ValueError("TemporaryExposureKey body longer than 127 bytes")

    row_len = body + 2  # record tag + one length byte
    width = int(row_len.max())
    buf = np.zeros((n, width), dtype=np.uint8)
    buf[:, 0] = (field_number << 3) | _WIRE_LEN
    buf[:, 1] = body.astype(np.uint8)
    buf[:, 2] = _TAG_KEY_DATA
    buf[:, 3] = KEY_LENGTH
    buf[:, 4 : 4 + KEY_LENGTH] = key

    flat = buf.reshape(-1)
    rows = np.arange(n, dtype=np.int64) * width
    pos = np.full(n, 4 + KEY_LENGTH, dtype=np.int64)  # next write position within each row
    for (tag, present, u), lengths in zip(fields, field_lengths, strict=True):
        if present is not None and not present.any():
            continue
        if present is None or present.all():
            at = rows + pos
            flat[at] = tag
            _write_varints(flat, at + 1, u, lengths - 1)
            pos += lengths
            continue
        at = (rows + pos)[present]
        flat[at] = tag
        _write_varints(flat, at + 1, u[present], lengths[present] - 1)
        pos += lengths

    if int(row_len.min()) == width:  # every record the same size: no compaction needed
        return buf.tobytes()
    keep = np.arange(width, dtype=np.int64)[None, :] < row_len[:, None]
    return buf[keep].tobytes()
