"""Export file format: ``export.bin`` / ``export.sig`` encoding, the zip container, reading and verification.

Pure functions, no database. Byte layout and field-filling rules follow the reference server
(protocol.md §6.5-§6.7):

* ``export.bin`` = the 16-byte header ``EK Export v1    `` + a serialised ``TemporaryExposureKeyExport``;
* ``export.sig`` = a serialised ``TEKSignatureList``, one ``TEKSignature`` per signer;
* the signature is ECDSA P-256 over SHA-256 of the whole ``export.bin`` (header included), ASN.1 DER;
* the zip holds ``export.bin`` then ``export.sig``, Deflate.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from google.protobuf.message import DecodeError

from enpipeline.export import fastenc
from enpipeline.proto import export_pb2

EXPORT_HEADER = b"EK Export v1    "
ALGORITHM_ECDSA_P256_SHA256 = "1.2.840.10045.4.3.2"
EXPORT_BIN_NAME = "export.bin"
EXPORT_SIG_NAME = "export.sig"
KEY_LENGTH = fastenc.KEY_LENGTH
DEFAULT_ROLLING_PERIOD = fastenc.DEFAULT_ROLLING_PERIOD
MAX_SIGNATURE_INFOS = 10

# Database report type (Exposure.report_type) -> export enum code; "" (unknown) -> 0 = field left out.
REPORT_TYPE_CODES: dict[str, int] = {"confirmed": 1, "likely": 2, "user-report": 3, "negative": 5}
REPORT_TYPE_NAMES: dict[int, str] = {code: name for name, code in REPORT_TYPE_CODES.items()}
# Export enum names by code (TemporaryExposureKey.ReportType).
REPORT_TYPE_ENUM_NAMES: dict[int, str] = {
    v.number: v.name for v in export_pb2.TemporaryExposureKey.ReportType.DESCRIPTOR.values
}

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT64_MAX = 2**64 - 1
# Fixed zip metadata so identical input gives identical zip bytes.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_FILE_MODE = 0o644
# Limits for reading untrusted files (a 500,000-key export.bin is about 16 MB).
MAX_EXPORT_BIN_BYTES = 64 * 1024 * 1024
MAX_EXPORT_SIG_BYTES = 1024 * 1024

_KEY_ID_RE = re.compile(r"[A-Za-z0-9_]*")


def report_type_code(value: str | int | None) -> int:
    """Export enum code for a database report type name ("confirmed", ...) or an enum code; "" / None -> 0."""
    if value is None or value == "":
        return 0
    if isinstance(value, str):
        try:
            return REPORT_TYPE_CODES[value]
        except KeyError:
            raise ValueError(f"unknown report type {value!r}; expected one of {sorted(REPORT_TYPE_CODES)}") from None
    code = int(value)
    if code not in REPORT_TYPE_ENUM_NAMES:
        raise ValueError(f"report type code {code} is not a TemporaryExposureKey.ReportType value")
    return code


@dataclass(frozen=True)
class SignatureInfo:
    """One signer as written in ``signature_infos`` / ``TEKSignature.signature_info``."""

    verification_key_id: str
    verification_key_version: str
    signature_algorithm: str = ALGORITHM_ECDSA_P256_SHA256

    def validate(self) -> None:
        for name in ("verification_key_id", "verification_key_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _KEY_ID_RE.fullmatch(value):
                raise ValueError(f"SignatureInfo.{name} must match [a-zA-Z0-9_]*, got {value!r}")

    def to_proto(self) -> export_pb2.SignatureInfo:
        # The reference writes version and id only when non-empty, and always the algorithm.
        msg = export_pb2.SignatureInfo()
        if self.verification_key_version:
            msg.verification_key_version = self.verification_key_version
        if self.verification_key_id:
            msg.verification_key_id = self.verification_key_id
        if self.signature_algorithm:
            msg.signature_algorithm = self.signature_algorithm
        return msg

    @classmethod
    def from_proto(cls, msg: export_pb2.SignatureInfo) -> SignatureInfo:
        return cls(verification_key_id=msg.verification_key_id, verification_key_version=msg.verification_key_version,
                   signature_algorithm=msg.signature_algorithm)


# ---------------------------------------------------------------------------------------------------------------
# Columnar key data


def _column(values: Any, dtype: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"KeyColumns.{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and dtype is not bool:
        if arr.dtype.kind not in "iub":
            raise ValueError(f"KeyColumns.{name} must hold integers, got dtype {arr.dtype}")
        limits = np.iinfo(dtype)
        if arr.dtype.kind != "b" and (int(arr.min()) < limits.min or int(arr.max()) > limits.max):
            raise ValueError(f"KeyColumns.{name} has values outside {np.dtype(dtype).name}")
    return np.ascontiguousarray(arr, dtype=dtype)


@dataclass(eq=False)
class KeyColumns:
    """Keys of one export list (``keys`` or ``revised_keys``) as numpy columns, one row per key.

    ``report_type`` holds export enum codes (0 = left out); ``dsos`` is meaningful only where ``dsos_present``.
    ``transmission_risk`` is always written. For revised keys pass the revised report type / DSOS and the
    *original* transmission risk (the reference exporter never reads the revised TR).
    """

    key: np.ndarray  # (n, 16) uint8
    transmission_risk: np.ndarray  # int64
    interval_number: np.ndarray  # int64, rolling_start_interval_number
    interval_count: np.ndarray  # int64, rolling_period
    report_type: np.ndarray  # int8 export enum code, 0 = leave out
    dsos: np.ndarray  # int64 days since onset of symptoms
    dsos_present: np.ndarray  # bool

    def __post_init__(self) -> None:
        key = np.asarray(self.key)
        if key.size == 0:
            key = np.zeros((0, KEY_LENGTH), np.uint8)
        if key.ndim != 2 or key.shape[1] != KEY_LENGTH:
            raise ValueError(f"KeyColumns.key must have shape (n, {KEY_LENGTH}), got {key.shape}")
        if key.dtype != np.uint8:
            raise ValueError(f"KeyColumns.key must be uint8, got {key.dtype}")
        self.key = np.ascontiguousarray(key)
        self.transmission_risk = _column(self.transmission_risk, np.int64, "transmission_risk")
        self.interval_number = _column(self.interval_number, np.int64, "interval_number")
        self.interval_count = _column(self.interval_count, np.int64, "interval_count")
        self.report_type = _column(self.report_type, np.int8, "report_type")
        self.dsos = _column(self.dsos, np.int64, "dsos")
        self.dsos_present = _column(self.dsos_present, bool, "dsos_present")
        n = self.key.shape[0]
        for name in ("transmission_risk", "interval_number", "interval_count", "report_type", "dsos",
                     "dsos_present"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"KeyColumns.{name} has {getattr(self, name).shape[0]} rows, key has {n}")

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def empty(cls) -> KeyColumns:
        return cls(key=np.zeros((0, KEY_LENGTH), np.uint8), transmission_risk=[], interval_number=[],
                   interval_count=[], report_type=[], dsos=[], dsos_present=np.zeros(0, bool))

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> KeyColumns:
        """Build from ``(key, transmission_risk, interval_number, interval_count, report_type, dsos)`` rows.

        ``key`` is 16 raw bytes, ``report_type`` a database name ("confirmed", "likely", "user-report",
        "negative", "") or an export enum code, ``dsos`` an int or None (left out).
        """
        keys: list[bytes] = []
        tr: list[int] = []
        rsin: list[int] = []
        rp: list[int] = []
        rt: list[int] = []
        dsos: list[int] = []
        present: list[bool] = []
        codes: dict[Any, int] = {}
        for i, row in enumerate(rows):
            k, t, start, count, report, onset = row
            k = bytes(k)
            if len(k) != KEY_LENGTH:
                raise ValueError(f"row {i}: key must be {KEY_LENGTH} bytes, got {len(k)}")
            keys.append(k)
            tr.append(int(t))
            rsin.append(int(start))
            rp.append(int(count))
            code = codes.get(report)
            if code is None:
                code = codes[report] = report_type_code(report)
            rt.append(code)
            present.append(onset is not None)
            dsos.append(0 if onset is None else int(onset))
        key = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_LENGTH)
        return cls(key=key, transmission_risk=np.array(tr, np.int64), interval_number=np.array(rsin, np.int64),
                   interval_count=np.array(rp, np.int64), report_type=np.array(rt, np.int8),
                   dsos=np.array(dsos, np.int64), dsos_present=np.array(present, bool))

    @classmethod
    def concat(cls, parts: Iterable[KeyColumns]) -> KeyColumns:
        parts = list(parts)
        if not parts:
            return cls.empty()
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in _COLUMNS})

    # -- access ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.key.shape[0])

    def __getitem__(self, index: slice | np.ndarray | Sequence[int]) -> KeyColumns:
        """Rows selected by a slice, an integer index array or a boolean mask (always a KeyColumns)."""
        if isinstance(index, int | np.integer):
            index = np.array([int(index)])
        return KeyColumns(**{name: getattr(self, name)[index] for name in _COLUMNS})

    take = __getitem__

    def chunks(self, size: int) -> list[KeyColumns]:
        """Consecutive slices of at most ``size`` rows (none for an empty table)."""
        if size <= 0:
            raise ValueError("chunk size must be > 0")
        return [self[i : i + size] for i in range(0, len(self), size)]

    def key_bytes(self, i: int) -> bytes:
        return self.key[i].tobytes()

    def rows(self) -> list[tuple[bytes, int, int, int, int, int | None]]:
        """Plain tuples ``(key, tr, interval_number, interval_count, report_type_code, dsos or None)``."""
        return [
            (self.key[i].tobytes(), int(self.transmission_risk[i]), int(self.interval_number[i]),
             int(self.interval_count[i]), int(self.report_type[i]),
             int(self.dsos[i]) if self.dsos_present[i] else None)
            for i in range(len(self))
        ]

    def equals(self, other: KeyColumns) -> bool:
        """Same rows in the same order (``dsos`` compared only where present)."""
        if len(self) != len(other):
            return False
        same = all(np.array_equal(getattr(self, n), getattr(other, n)) for n in _COLUMNS if n != "dsos")
        return same and np.array_equal(self.dsos[self.dsos_present], other.dsos[other.dsos_present])

    def key_sort_order(self) -> np.ndarray:
        """Stable permutation that sorts rows by raw key bytes ascending."""
        if len(self) < 2:
            return np.arange(len(self))
        words = self.key.view(">u8")  # (n, 2) big-endian words compare like the bytes
        hi = words[:, 0].astype(np.uint64)
        order = np.argsort(hi, kind="stable")
        sorted_hi = hi[order]
        if np.any(sorted_hi[1:] == sorted_hi[:-1]):  # equal first 8 bytes (rare): sort on both words
            return np.lexsort((words[:, 1], words[:, 0]))
        return order

    def is_sorted_by_key(self) -> bool:
        if len(self) < 2:
            return True
        words = self.key.view(">u8")
        hi, lo = words[:, 0], words[:, 1]
        return bool(np.all((hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))))

    def sorted_by_key(self) -> KeyColumns:
        """Rows ordered by raw key bytes ascending (as the reference exporter writes them)."""
        if self.is_sorted_by_key():
            return self
        return self[self.key_sort_order()]

    def validate(self) -> None:
        """Raise ValueError unless every value fits its protobuf field (int32 / sint32 / ReportType)."""
        for name in ("transmission_risk", "interval_number", "interval_count", "dsos"):
            col = getattr(self, name)
            if name == "dsos":
                col = col[self.dsos_present]
            if col.size and (int(col.min()) < INT32_MIN or int(col.max()) > INT32_MAX):
                raise ValueError(f"KeyColumns.{name} has values outside int32")
        if self.report_type.size:
            bad = ~np.isin(self.report_type, np.array(sorted(REPORT_TYPE_ENUM_NAMES), np.int8))
            if bad.any():
                raise ValueError(f"KeyColumns.report_type has codes outside ReportType: "
                                 f"{sorted(set(self.report_type[bad].tolist()))}")


_COLUMNS = ("key", "transmission_risk", "interval_number", "interval_count", "report_type", "dsos", "dsos_present")


# ---------------------------------------------------------------------------------------------------------------
# Encoding


@dataclass(frozen=True)
class ExportHeader:
    """Everything in ``TemporaryExposureKeyExport`` except the keys."""

    start_timestamp: int
    end_timestamp: int
    region: str
    batch_num: int
    batch_size: int
    signature_infos: tuple[SignatureInfo, ...]

    def validate(self) -> None:
        for name in ("start_timestamp", "end_timestamp"):
            value = getattr(self, name)
            if not 0 <= value <= UINT64_MAX:
                raise ValueError(f"ExportHeader.{name} must be a non-negative 64-bit value, got {value}")
        if self.end_timestamp < self.start_timestamp:
            raise ValueError("ExportHeader.end_timestamp is before start_timestamp")
        if not 1 <= self.batch_num <= INT32_MAX or not 1 <= self.batch_size <= INT32_MAX:
            raise ValueError("ExportHeader.batch_num and batch_size must be 1..2^31-1")
        if self.batch_num > self.batch_size:
            raise ValueError("ExportHeader.batch_num must be <= batch_size")
        if len(self.signature_infos) > MAX_SIGNATURE_INFOS:
            raise ValueError(f"at most {MAX_SIGNATURE_INFOS} signature infos per export file")
        for info in self.signature_infos:
            info.validate()

    def to_proto(self) -> export_pb2.TemporaryExposureKeyExport:
        msg = export_pb2.TemporaryExposureKeyExport(
            start_timestamp=self.start_timestamp, end_timestamp=self.end_timestamp, region=self.region,
            batch_num=self.batch_num, batch_size=self.batch_size)
        msg.signature_infos.extend(info.to_proto() for info in self.signature_infos)
        return msg


def _add_keys_generated(target: Any, keys: KeyColumns) -> None:
    """Append keys to a repeated TemporaryExposureKey field with the generated classes (reference rules)."""
    for i in range(len(keys)):
        k = target.add()
        k.key_data = keys.key[i].tobytes()
        k.transmission_risk_level = int(keys.transmission_risk[i])
        if keys.interval_number[i] != 0:
            k.rolling_start_interval_number = int(keys.interval_number[i])
        if keys.interval_count[i] != DEFAULT_ROLLING_PERIOD:
            k.rolling_period = int(keys.interval_count[i])
        if keys.report_type[i] != 0:
            k.report_type = int(keys.report_type[i])
        if keys.dsos_present[i]:
            k.days_since_onset_of_symptoms = int(keys.dsos[i])


def _encode_keys_fast(field_number: int, keys: KeyColumns) -> bytes:
    return fastenc.encode_keys(field_number, keys.key, keys.transmission_risk, keys.interval_number,
                               keys.interval_count, keys.report_type, keys.dsos, keys.dsos_present)


def encode_export_bin(header: ExportHeader, keys: KeyColumns, revised: KeyColumns, *, fast: bool = True,
                      sort: bool = True) -> bytes:
    """``export.bin`` bytes: the 16-byte header and the serialised ``TemporaryExposureKeyExport``.

    Both key lists are written sorted by raw key bytes (unless ``sort=False``). ``fast`` selects the numpy
    encoder; ``fast=False`` uses the protoc-generated classes. Both give identical bytes.
    """
    header.validate()
    keys.validate()
    revised.validate()
    if sort:
        keys, revised = keys.sorted_by_key(), revised.sorted_by_key()
    msg = header.to_proto()
    if not fast:
        _add_keys_generated(msg.keys, keys)
        _add_keys_generated(msg.revised_keys, revised)
        return EXPORT_HEADER + msg.SerializeToString()
    # Protobuf writes known fields in field-number order, so fields 1-6, then 7, then 8 concatenate.
    keys_field = export_pb2.TemporaryExposureKeyExport.KEYS_FIELD_NUMBER
    revised_field = export_pb2.TemporaryExposureKeyExport.REVISED_KEYS_FIELD_NUMBER
    return b"".join((EXPORT_HEADER, msg.SerializeToString(), _encode_keys_fast(keys_field, keys),
                     _encode_keys_fast(revised_field, revised)))


def encode_export_sig(signatures: Sequence[tuple[SignatureInfo, bytes]], batch_num: int, batch_size: int) -> bytes:
    """``export.sig`` bytes: a ``TEKSignatureList`` with one ``TEKSignature`` per (info, signature)."""
    if len(signatures) > MAX_SIGNATURE_INFOS:
        raise ValueError(f"at most {MAX_SIGNATURE_INFOS} signatures per export file")
    out = export_pb2.TEKSignatureList()
    for info, signature in signatures:
        info.validate()
        sig = out.signatures.add()
        sig.signature_info.CopyFrom(info.to_proto())
        sig.batch_num = batch_num
        sig.batch_size = batch_size
        sig.signature = bytes(signature)
    return out.SerializeToString()


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so external_attr carries the file mode
    info.external_attr = (0o100000 | ZIP_FILE_MODE) << 16
    return info


def build_zip(export_bin: bytes, export_sig: bytes, *, compresslevel: int = 6) -> bytes:
    """Zip with ``export.bin`` then ``export.sig`` (Deflate, fixed 1980-01-01 timestamps and attributes)."""
    if not 0 <= compresslevel <= 9:
        raise ValueError("compresslevel must be 0..9")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
        for name, data in ((EXPORT_BIN_NAME, export_bin), (EXPORT_SIG_NAME, export_sig)):
            zf.writestr(_zip_info(name), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=compresslevel)
    return buf.getvalue()


class _Signer(Protocol):
    def sign(self, data: bytes) -> bytes: ...


def build_export_zip(header: ExportHeader, keys: KeyColumns, revised: KeyColumns,
                     signers: Sequence[tuple[SignatureInfo, _Signer]], *, compresslevel: int = 6,
                     fast: bool = True) -> bytes:
    """Encode, sign and zip one export file. ``signers`` must list ``header.signature_infos`` in order."""
    if tuple(info for info, _ in signers) != tuple(header.signature_infos):
        raise ValueError("signers must correspond one-to-one, in order, to header.signature_infos")
    export_bin = encode_export_bin(header, keys, revised, fast=fast)
    signatures = [(info, signer.sign(export_bin)) for info, signer in signers]
    export_sig = encode_export_sig(signatures, header.batch_num, header.batch_size)
    return build_zip(export_bin, export_sig, compresslevel=compresslevel)


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True, slots=True)
class ExportKey:
    """One key as read from a file (any key length; rolling period 144 when the field is absent)."""

    key_data: bytes
    transmission_risk: int
    interval_number: int
    interval_count: int
    report_type: int  # export enum code, 0 = absent
    dsos: int | None
    variant_of_concern: int = 0


@dataclass(frozen=True)
class ParsedSignature:
    """One ``TEKSignature`` from ``export.sig``."""

    signature_info: SignatureInfo
    batch_num: int
    batch_size: int
    signature: bytes

    @property
    def is_der(self) -> bool:
        return _der_signature(self.signature) is not None


@dataclass
class ParsedExport:
    start_timestamp: int
    end_timestamp: int
    region: str
    batch_num: int
    batch_size: int
    signature_infos: tuple[SignatureInfo, ...]
    keys: list[ExportKey]
    revised_keys: list[ExportKey]
    signatures: list[ParsedSignature]
    export_bin: bytes = field(repr=False)
    has_sig: bool = True  # False for a loose export.bin read without a signature file
    zip_entries: tuple[str, ...] = ()

    @property
    def header(self) -> ExportHeader:
        return ExportHeader(self.start_timestamp, self.end_timestamp, self.region, self.batch_num,
                            self.batch_size, self.signature_infos)

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.export_bin).digest()

    def key_columns(self) -> KeyColumns:
        return _columns_from_keys(self.keys, "keys")

    def revised_key_columns(self) -> KeyColumns:
        return _columns_from_keys(self.revised_keys, "revised_keys")


def _columns_from_keys(keys: list[ExportKey], what: str) -> KeyColumns:
    bad = [i for i, k in enumerate(keys) if len(k.key_data) != KEY_LENGTH]
    if bad:
        raise ValueError(f"{len(bad)} of {len(keys)} {what} do not have {KEY_LENGTH}-byte key_data "
                         f"(first at index {bad[0]}: {len(keys[bad[0]].key_data)} bytes)")
    if not keys:
        return KeyColumns.empty()
    return KeyColumns.from_rows(
        (k.key_data, k.transmission_risk, k.interval_number, k.interval_count, k.report_type, k.dsos) for k in keys)


def _keys_from_proto(repeated: Any) -> list[ExportKey]:
    out = []
    for k in repeated:
        out.append(ExportKey(
            key_data=k.key_data,
            transmission_risk=k.transmission_risk_level,
            interval_number=k.rolling_start_interval_number,
            interval_count=k.rolling_period,
            report_type=int(k.report_type),
            dsos=k.days_since_onset_of_symptoms if k.HasField("days_since_onset_of_symptoms") else None,
            variant_of_concern=int(k.variant_of_concern),
        ))
    return out


def parse_export_bin(export_bin: bytes) -> export_pb2.TemporaryExposureKeyExport:
    """Check the 16-byte header and decode the protobuf (ValueError on either problem)."""
    if len(export_bin) < len(EXPORT_HEADER) or export_bin[: len(EXPORT_HEADER)] != EXPORT_HEADER:
        raise ValueError(f"export.bin does not start with the header {EXPORT_HEADER!r} "
                         f"(got {bytes(export_bin[:len(EXPORT_HEADER)])!r})")
    try:
        return export_pb2.TemporaryExposureKeyExport.FromString(export_bin[len(EXPORT_HEADER) :])
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"export.bin is not a valid TemporaryExposureKeyExport: {exc}") from None


def parse_export_sig(export_sig: bytes) -> list[ParsedSignature]:
    try:
        msg = export_pb2.TEKSignatureList.FromString(export_sig)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"export.sig is not a valid TEKSignatureList: {exc}") from None
    return [ParsedSignature(SignatureInfo.from_proto(s.signature_info), s.batch_num, s.batch_size, s.signature)
            for s in msg.signatures]


def _read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise ValueError(f"zip entry {info.filename} is {info.file_size} bytes, more than the {limit} allowed")
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"zip entry {info.filename} expands to more than {limit} bytes")
    return data


def _read_zip(data: bytes, max_bin_bytes: int) -> tuple[bytes, bytes, tuple[str, ...]]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            names = tuple(i.filename for i in infos)
            found: dict[str, zipfile.ZipInfo] = {}
            for info in infos:
                if info.filename in (EXPORT_BIN_NAME, EXPORT_SIG_NAME):
                    if info.filename in found:
                        raise ValueError(f"zip has more than one {info.filename} entry")
                    found[info.filename] = info
            missing = [n for n in (EXPORT_BIN_NAME, EXPORT_SIG_NAME) if n not in found]
            if missing:
                raise ValueError(f"zip has no {' and no '.join(missing)} at its root (entries: {list(names)})")
            export_bin = _read_entry(zf, found[EXPORT_BIN_NAME], max_bin_bytes)
            export_sig = _read_entry(zf, found[EXPORT_SIG_NAME], MAX_EXPORT_SIG_BYTES)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
        raise ValueError(f"not a readable export zip: {exc}") from None
    return export_bin, export_sig, names


def read_export(data: bytes | str | PathLike[str], *, sig: bytes | str | PathLike[str] | None = None,
                max_bin_bytes: int = MAX_EXPORT_BIN_BYTES) -> ParsedExport:
    """Read an export zip, or a loose ``export.bin`` (+ optional ``export.sig``), from bytes or a path.

    For a loose ``export.bin`` given by path without ``sig``, a sibling ``<stem>.sig`` is used when it exists.
    Raises ValueError with a readable message for anything malformed.
    """
    path: Path | None = None
    if isinstance(data, str | PathLike):
        path = Path(data)
        data = path.read_bytes()
    data = bytes(data)
    if isinstance(sig, str | PathLike):
        sig = Path(sig).read_bytes()

    zip_entries: tuple[str, ...] = ()
    if data.startswith(b"PK"):
        if sig is not None:
            raise ValueError("sig= is only for a loose export.bin, not a zip")
        export_bin, export_sig, zip_entries = _read_zip(data, max_bin_bytes)
        has_sig = True
    elif data.startswith(EXPORT_HEADER):
        export_bin = data
        if len(export_bin) > max_bin_bytes:
            raise ValueError(f"export.bin is {len(export_bin)} bytes, more than the {max_bin_bytes} allowed")
        if sig is None and path is not None and path.with_suffix(".sig").is_file():
            sig = path.with_suffix(".sig").read_bytes()
        has_sig = sig is not None
        export_sig = bytes(sig) if sig is not None else b""
    else:
        raise ValueError(f"neither a zip nor an export.bin: starts with {data[:16]!r}, "
                         f"expected {EXPORT_HEADER!r} or a zip signature")

    msg = parse_export_bin(export_bin)
    return ParsedExport(
        start_timestamp=msg.start_timestamp,
        end_timestamp=msg.end_timestamp,
        region=msg.region,
        batch_num=msg.batch_num,
        batch_size=msg.batch_size,
        signature_infos=tuple(SignatureInfo.from_proto(s) for s in msg.signature_infos),
        keys=_keys_from_proto(msg.keys),
        revised_keys=_keys_from_proto(msg.revised_keys),
        signatures=parse_export_sig(export_sig),
        export_bin=export_bin,
        has_sig=has_sig,
        zip_entries=zip_entries,
    )


# ---------------------------------------------------------------------------------------------------------------
# Verification


PublicKey = ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class VerifiedSignature:
    """A signature of ``export.sig`` that verified, and the key that verified it."""

    index: int  # position in export.sig
    signature_info: SignatureInfo
    key_name: str
    encoding: str  # "der" or "raw" (64-byte r||s)
    curve: str


def load_public_key(data: bytes | str | PathLike[str]) -> PublicKey:
    """An EC public key from PEM text/bytes, DER bytes or a file path."""
    if isinstance(data, PathLike) or (isinstance(data, str) and "-----BEGIN" not in data):
        data = Path(data).read_bytes()
    if isinstance(data, str):
        data = data.encode()
    key = (serialization.load_pem_public_key(data) if b"-----BEGIN" in data
           else serialization.load_der_public_key(data))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"not an EC public key: {type(key).__name__}")
    return key


def _der_signature(signature: bytes) -> tuple[int, int] | None:
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        return None
    # decode_dss_signature tolerates nothing but exact DER; re-encoding checks there are no trailing bytes.
    return (r, s) if encode_dss_signature(r, s) == signature else None


def _signature_candidates(signature: bytes, key: PublicKey) -> list[tuple[str, bytes]]:
    out = []
    if _der_signature(signature) is not None:
        out.append(("der", signature))
    width = (key.curve.key_size + 7) // 8
    if len(signature) == 2 * width:
        r = int.from_bytes(signature[:width], "big")
        s = int.from_bytes(signature[width:], "big")
        if r > 0 and s > 0:
            out.append(("raw", encode_dss_signature(r, s)))
    return out


def verify_export(parsed: ParsedExport, public_keys: Mapping[str, PublicKey] | Sequence[PublicKey], *,
                  strict: bool = False) -> list[VerifiedSignature]:
    """Check every signature of ``export.sig`` against every key; return those that verify (first key wins).

    A signature is ECDSA over SHA-256 of the whole ``export.bin``. DER signatures are accepted, and also the
    raw ``r||s`` form some servers wrote. Any EC curve is accepted unless ``strict``: then only DER signatures
    by P-256 keys whose SignatureInfo names the OID 1.2.840.10045.4.3.2 count (what Google's verifier
    requires). An empty result means nothing verified.
    """
    if isinstance(public_keys, Mapping):
        named = list(public_keys.items())
    else:
        named = [(f"#{i}", k) for i, k in enumerate(public_keys)]
    for name, key in named:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TypeError(f"public key {name!r} is not an EC public key ({type(key).__name__})")
    verified = []
    for index, sig in enumerate(parsed.signatures):
        if strict and sig.signature_info.signature_algorithm != ALGORITHM_ECDSA_P256_SHA256:
            continue
        hit = _verify_one(parsed.export_bin, sig.signature, named, strict)
        if hit is not None:
            name, encoding, curve = hit
            verified.append(VerifiedSignature(index, sig.signature_info, name, encoding, curve))
    return verified


def _verify_one(export_bin: bytes, signature: bytes, named: list[tuple[str, PublicKey]],
                strict: bool) -> tuple[str, str, str] | None:
    for name, key in named:
        if strict and not isinstance(key.curve, ec.SECP256R1):
            continue
        for encoding, der in _signature_candidates(signature, key):
            if strict and encoding != "der":
                continue
            try:
                key.verify(der, export_bin, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            return name, encoding, key.curve.name
    return None


# ---------------------------------------------------------------------------------------------------------------
# Summary (for `enpipeline export verify`)


def _iso(ts: int) -> str | None:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return None


def _report_type_histogram(keys: list[ExportKey]) -> dict[str, int]:
    counts = Counter(REPORT_TYPE_ENUM_NAMES.get(k.report_type, str(k.report_type)) for k in keys)
    return dict(sorted(counts.items()))


def _info_dict(info: SignatureInfo) -> dict[str, str]:
    return {"verification_key_id": info.verification_key_id,
            "verification_key_version": info.verification_key_version,
            "signature_algorithm": info.signature_algorithm}


def summarize(parsed: ParsedExport, verified: Sequence[VerifiedSignature] | None = None) -> dict[str, Any]:
    """A JSON-ready description of a parsed export, with format warnings (and verification results if given)."""
    warnings: list[str] = []
    if not parsed.has_sig:
        warnings.append("no export.sig")
    elif not parsed.signatures:
        warnings.append("unsigned: export.sig holds no signatures")
    if parsed.has_sig and len(parsed.signatures) != len(parsed.signature_infos):
        warnings.append(f"export.sig has {len(parsed.signatures)} signature(s) but export.bin lists "
                        f"{len(parsed.signature_infos)} signature_infos")
    for i, sig in enumerate(parsed.signatures):
        if not sig.is_der:
            warnings.append(f"signature {i} is not ASN.1 DER ({len(sig.signature)} bytes)")
        if sig.signature_info.signature_algorithm != ALGORITHM_ECDSA_P256_SHA256:
            warnings.append(f"signature {i} algorithm is {sig.signature_info.signature_algorithm!r}, "
                            f"not {ALGORITHM_ECDSA_P256_SHA256}")
        if (sig.batch_num, sig.batch_size) != (parsed.batch_num, parsed.batch_size):
            warnings.append(f"signature {i} says batch {sig.batch_num}/{sig.batch_size}, export.bin says "
                            f"{parsed.batch_num}/{parsed.batch_size}")
    for what, keys in (("keys", parsed.keys), ("revised_keys", parsed.revised_keys)):
        odd = sum(1 for k in keys if len(k.key_data) != KEY_LENGTH)
        if odd:
            warnings.append(f"{odd} {what} do not have {KEY_LENGTH}-byte key_data")
        if any(keys[i].key_data > keys[i + 1].key_data for i in range(len(keys) - 1)):
            warnings.append(f"{what} are not sorted by key_data")
    out: dict[str, Any] = {
        "region": parsed.region,
        "start_timestamp": parsed.start_timestamp,
        "end_timestamp": parsed.end_timestamp,
        "start_utc": _iso(parsed.start_timestamp),
        "end_utc": _iso(parsed.end_timestamp),
        "window_seconds": parsed.end_timestamp - parsed.start_timestamp,
        "batch_num": parsed.batch_num,
        "batch_size": parsed.batch_size,
        "num_keys": len(parsed.keys),
        "num_revised_keys": len(parsed.revised_keys),
        "report_types": _report_type_histogram(parsed.keys),
        "revised_report_types": _report_type_histogram(parsed.revised_keys),
        "transmission_risks": dict(sorted(Counter(k.transmission_risk for k in parsed.keys).items())),
        "export_bin_bytes": len(parsed.export_bin),
        "export_bin_sha256": parsed.digest.hex(),
        "signature_infos": [_info_dict(i) for i in parsed.signature_infos],
        "signatures": [
            {**_info_dict(s.signature_info), "batch_num": s.batch_num, "batch_size": s.batch_size,
             "signature_bytes": len(s.signature), "der": s.is_der}
            for s in parsed.signatures
        ],
        "warnings": warnings,
    }
    if parsed.zip_entries:
        out["zip_entries"] = list(parsed.zip_entries)
    if verified is not None:
        out["verified"] = [{"index": v.index, "key": v.key_name, "encoding": v.encoding, "curve": v.curve}
                           for v in verified]
    return out
