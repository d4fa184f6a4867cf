"""Unit tests for enpipeline.export.format and enpipeline.export.fastenc (export file bytes, zip, reading)."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from enpipeline.export import fastenc
from enpipeline.export.format import (
    ALGORITHM_ECDSA_P256_SHA256,
    EXPORT_HEADER,
    REPORT_TYPE_CODES,
    ExportHeader,
    KeyColumns,
    SignatureInfo,
    build_export_zip,
    build_zip,
    encode_export_bin,
    encode_export_sig,
    read_export,
    summarize,
    verify_export,
)
from enpipeline.proto import export_pb2

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INFO = SignatureInfo(verification_key_id="310", verification_key_version="v1")
HEADER = ExportHeader(start_timestamp=1_600_000_000, end_timestamp=1_600_003_600, region="US", batch_num=1,
                      batch_size=1, signature_infos=(INFO,))


class LocalSigner:
    """Deterministic P-256 signer over a local key (stand-in for signing.FileSigner)."""

    def __init__(self, seed: int = 1):
        self.key = ec.derive_private_key(seed + 12345, ec.SECP256R1())

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def random_columns(rng: np.random.Generator, n: int) -> KeyColumns:
    """Columns covering every presence combination and varint length the encoder has to handle."""
    rsin_edges = np.array([0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, INT32_MAX, -1, -128,
                           INT32_MIN, 2_650_032, 2_700_000])
    rp_edges = np.array([144, 144, 144, 0, 1, 143, 145, 127, 128, 255, 16384, -1, INT32_MAX, INT32_MIN])
    tr_edges = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 127, 128, 300, INT32_MAX, -1, INT32_MIN])
    dsos_edges = np.array([0, 1, -1, 14, -14, 63, 64, -64, -65, 8191, -8192, INT32_MAX, INT32_MIN])

    def pick(edges: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return np.where(rng.random(n) < 0.5, rng.choice(edges, n), rng.integers(lo, hi, n, endpoint=True))

    return KeyColumns(
        key=rng.integers(0, 256, (n, 16), dtype=np.uint8),
        transmission_risk=pick(tr_edges, 0, 8),
        interval_number=pick(rsin_edges, INT32_MIN, INT32_MAX),
        interval_count=pick(rp_edges, 1, 144),
        report_type=rng.choice([0, 1, 2, 3, 4, 5], n),
        dsos=pick(dsos_edges, -14, 14),
        dsos_present=rng.random(n) < rng.random(),
    )


def generated_key_records(keys: KeyColumns, field_number: int) -> bytes:
    """Independent oracle: each key as its own generated message, serialised with the tag and length."""
    out = bytearray()
    for i in range(len(keys)):
        msg = export_pb2.TemporaryExposureKey(key_data=keys.key[i].tobytes(),
                                              transmission_risk_level=int(keys.transmission_risk[i]))
        if keys.interval_number[i] != 0:
            msg.rolling_start_interval_number = int(keys.interval_number[i])
        if keys.interval_count[i] != 144:
            msg.rolling_period = int(keys.interval_count[i])
        if keys.report_type[i] != 0:
            msg.report_type = int(keys.report_type[i])
        if keys.dsos_present[i]:
            msg.days_since_onset_of_symptoms = int(keys.dsos[i])
        body = msg.SerializeToString()
        out += bytes([(field_number << 3) | 2, len(body)]) + body
    return bytes(out)


def decode(export_bin: bytes) -> export_pb2.TemporaryExposureKeyExport:
    assert export_bin[:16] == EXPORT_HEADER
    return export_pb2.TemporaryExposureKeyExport.FromString(export_bin[16:])


# --- header and hand-computed bytes ---------------------------------------------------------------------------


def test_header_constant_is_the_reference_bytes():
    assert EXPORT_HEADER == bytes.fromhex("454B204578706F7274207631 20202020".replace(" ", ""))
    assert len(EXPORT_HEADER) == 16


def test_empty_export_bytes_match_hand_encoding():
    out = encode_export_bin(HEADER, KeyColumns.empty(), KeyColumns.empty())
    info = b"\x1a\x02v1" + b"\x22\x03310" + b"\x2a\x13" + ALGORITHM_ECDSA_P256_SHA256.encode()
    expected = (EXPORT_HEADER
                + b"\x09" + struct.pack("<Q", 1_600_000_000) + b"\x11" + struct.pack("<Q", 1_600_003_600)
                + b"\x1a\x02US" + b"\x20\x01" + b"\x28\x01" + b"\x32" + bytes([len(info)]) + info)
    assert out == expected
    assert encode_export_bin(HEADER, KeyColumns.empty(), KeyColumns.empty(), fast=False) == expected


def test_key_records_match_hand_encoding():
    keys = KeyColumns.from_rows([
        (bytes(range(16)), 0, 0, 144, "", None),  # minimal: key + TR only
        (b"\xab" * 16, 8, 2_650_032, 1, "negative", -1),  # every optional field
    ])
    minimal = b"\x0a\x10" + bytes(range(16)) + b"\x10\x00"
    full = (b"\x0a\x10" + b"\xab" * 16 + b"\x10\x08" + b"\x18\xb0\xdf\xa1\x01" + b"\x20\x01" + b"\x28\x05"
            + b"\x30\x01")
    expected_keys = b"\x3a" + bytes([len(minimal)]) + minimal + b"\x3a" + bytes([len(full)]) + full
    for fast in (True, False):
        out = encode_export_bin(HEADER, keys, KeyColumns.empty(), fast=fast)
        assert out.endswith(expected_keys)
        out = encode_export_bin(HEADER, KeyColumns.empty(), keys, fast=fast)
        assert out.endswith(expected_keys.replace(b"\x3a\x14", b"\x42\x14").replace(b"\x3a\x1f", b"\x42\x1f"))


def test_negative_int32_is_a_ten_byte_varint():
    keys = KeyColumns.from_rows([(bytes(16), 0, -1, 144, "", None)])
    out = encode_export_bin(HEADER, keys, KeyColumns.empty())
    assert out.endswith(b"\x18" + b"\xff" * 9 + b"\x01")
    assert out == encode_export_bin(HEADER, keys, KeyColumns.empty(), fast=False)
    assert decode(out).keys[0].rolling_start_interval_number == -1


# --- field filling rules, checked with the generated classes ---------------------------------------------------


def test_field_filling_rules():
    rows = [
        (b"\x01" * 16, 0, 0, 144, "", None),
        (b"\x02" * 16, 3, 2_700_000, 143, "confirmed", 0),
        (b"\x03" * 16, 8, 2_700_144, 144, "likely", -5),
        (b"\x04" * 16, 5, 2_700_288, 12, "user-report", 7),
        (b"\x05" * 16, 2, 2_700_432, 144, "negative", None),
    ]
    for fast in (True, False):
        msg = decode(encode_export_bin(HEADER, KeyColumns.from_rows(rows), KeyColumns.empty(), fast=fast))
        k = list(msg.keys)
        assert len(k) == 5
        # TR always written, even 0
        assert all(key.HasField("transmission_risk_level") for key in k)
        assert k[0].transmission_risk_level == 0
        # RSIN left out if 0
        assert not k[0].HasField("rolling_start_interval_number")
        assert k[1].HasField("rolling_start_interval_number") and k[1].rolling_start_interval_number == 2_700_000
        # RP left out when 144 (readers see the proto default 144)
        assert not k[0].HasField("rolling_period") and k[0].rolling_period == 144
        assert not k[2].HasField("rolling_period")
        assert k[1].HasField("rolling_period") and k[1].rolling_period == 143
        assert k[3].rolling_period == 12
        # report type: "" -> left out; names -> enum codes
        assert not k[0].HasField("report_type")
        assert [key.report_type for key in k[1:]] == [
            export_pb2.TemporaryExposureKey.CONFIRMED_TEST,
            export_pb2.TemporaryExposureKey.CONFIRMED_CLINICAL_DIAGNOSIS,
            export_pb2.TemporaryExposureKey.SELF_REPORT,
            export_pb2.TemporaryExposureKey.REVOKED,
        ]
        # DSOS written iff present (0 included), sint32
        assert [key.HasField("days_since_onset_of_symptoms") for key in k] == [False, True, True, True, False]
        assert [key.days_since_onset_of_symptoms for key in k[1:4]] == [0, -5, 7]
        # the server never sets variant_of_concern
        assert not any(key.HasField("variant_of_concern") for key in k)
        assert len(msg.revised_keys) == 0


def test_report_type_codes_are_the_export_enum():
    assert REPORT_TYPE_CODES == {"confirmed": 1, "likely": 2, "user-report": 3, "negative": 5}
    enum = export_pb2.TemporaryExposureKey.ReportType
    assert enum.Value("CONFIRMED_TEST") == 1 and enum.Value("CONFIRMED_CLINICAL_DIAGNOSIS") == 2
    assert enum.Value("SELF_REPORT") == 3 and enum.Value("RECURSIVE") == 4 and enum.Value("REVOKED") == 5


def test_header_fields_and_signature_info_rules():
    infos = (SignatureInfo("310", "v1"), SignatureInfo("", "v2"), SignatureInfo("262", ""))
    header = ExportHeader(10, 20, "DE", 1, 1, infos)
    for fast in (True, False):
        msg = decode(encode_export_bin(header, KeyColumns.empty(), KeyColumns.empty(), fast=fast))
        assert (msg.start_timestamp, msg.end_timestamp, msg.region, msg.batch_num, msg.batch_size) == (
            10, 20, "DE", 1, 1)
        si = list(msg.signature_infos)
        assert [s.signature_algorithm for s in si] == [ALGORITHM_ECDSA_P256_SHA256] * 3
        assert si[0].verification_key_id == "310" and si[0].verification_key_version == "v1"
        assert not si[1].HasField("verification_key_id") and si[1].verification_key_version == "v2"
        assert si[2].verification_key_id == "262" and not si[2].HasField("verification_key_version")


def test_revised_keys_go_to_field_8():
    keys = KeyColumns.from_rows([(b"\x01" * 16, 1, 2_700_000, 144, "likely", 2)])
    revised = KeyColumns.from_rows([(b"\x01" * 16, 1, 2_700_000, 144, "negative", None)])
    msg = decode(encode_export_bin(HEADER, keys, revised))
    assert len(msg.keys) == 1 and len(msg.revised_keys) == 1
    assert msg.revised_keys[0].report_type == export_pb2.TemporaryExposureKey.REVOKED
    assert not msg.revised_keys[0].HasField("days_since_onset_of_symptoms")
    assert msg.revised_keys[0].key_data == msg.keys[0].key_data


# --- fast encoder == generated encoder --------------------------------------------------------------------------


def test_fastenc_equals_generated_on_thousands_of_random_cases():
    rng = np.random.default_rng(20240301)
    cases = 3000
    for case in range(cases):
        n = int(rng.integers(1, 24))
        cols = random_columns(rng, n)
        field = 7 if case % 2 else 8
        fast = fastenc.encode_keys(field, cols.key, cols.transmission_risk, cols.interval_number,
                                   cols.interval_count, cols.report_type, cols.dsos, cols.dsos_present)
        assert fast == generated_key_records(cols, field), f"case {case}: {cols.rows()}"


def test_fast_and_generated_export_bin_identical_on_random_files():
    rng = np.random.default_rng(7)
    for _ in range(200):
        keys = random_columns(rng, int(rng.integers(0, 60)))
        revised = random_columns(rng, int(rng.integers(0, 20)))
        header = ExportHeader(int(rng.integers(0, 2**40)), 2**41, "X" * int(rng.integers(0, 5)), 1,
                              int(rng.integers(1, 5)), (INFO,) * int(rng.integers(0, 4)))
        assert encode_export_bin(header, keys, revised) == encode_export_bin(header, keys, revised, fast=False)


def test_fastenc_uniform_and_mixed_record_widths():
    rng = np.random.default_rng(3)
    # uniform widths take the no-compaction path; one odd row forces compaction
    cols = KeyColumns(key=rng.integers(0, 256, (1000, 16), dtype=np.uint8), transmission_risk=np.full(1000, 4),
                      interval_number=np.full(1000, 2_700_000), interval_count=np.full(1000, 144),
                      report_type=np.full(1000, 1), dsos=np.full(1000, 3), dsos_present=np.ones(1000, bool))
    assert (encode_export_bin(HEADER, cols, KeyColumns.empty())
            == encode_export_bin(HEADER, cols, KeyColumns.empty(), fast=False))
    cols.interval_count[500] = 1
    cols.dsos_present[10] = False
    cols.interval_number[20] = 0
    assert (encode_export_bin(HEADER, cols, KeyColumns.empty())
            == encode_export_bin(HEADER, cols, KeyColumns.empty(), fast=False))


def test_varint_lengths_match_python_reference():
    values = [0, 1, 127, 128, 2**14 - 1, 2**14, 2**21, 2**28, 2**35, 2**42, 2**49, 2**56, 2**63 - 1, 2**63, 2**64 - 1]
    got = fastenc.varint_lengths(np.array(values, dtype=np.uint64)).tolist()

    def ref(v: int) -> int:
        n = 1
        while v >= 0x80:
            v >>= 7
            n += 1
        return n

    assert got == [ref(v) for v in values]


@pytest.mark.slow
def test_fast_equals_generated_at_full_file_size():
    rng = np.random.default_rng(500_000)
    n = 500_000
    keys = KeyColumns(key=rng.integers(0, 256, (n, 16), dtype=np.uint8), transmission_risk=rng.integers(0, 9, n),
                      interval_number=(2_700_000 + rng.integers(0, 14, n)) * 144,
                      interval_count=np.where(rng.random(n) < 0.9, 144, rng.integers(1, 144, n)),
                      report_type=rng.choice([1, 2, 3, 5], n), dsos=rng.integers(-14, 15, n),
                      dsos_present=rng.random(n) < 0.8)
    fast = encode_export_bin(HEADER, keys, KeyColumns.empty())
    assert fast == encode_export_bin(HEADER, keys, KeyColumns.empty(), fast=False)
    assert len(decode(fast).keys) == n


# --- sorting, round trip ----------------------------------------------------------------------------------------


def test_keys_are_written_sorted_by_raw_bytes():
    rng = np.random.default_rng(11)
    keys = random_columns(rng, 300)
    keys.key[:50, :8] = 7  # equal first 8 bytes: exercises the tie-break on the second word
    revised = random_columns(rng, 40)
    msg = decode(encode_export_bin(HEADER, keys, revised))
    for written in (msg.keys, msg.revised_keys):
        data = [k.key_data for k in written]
        assert data == sorted(data)
    assert sorted(k.key_data for k in msg.keys) == sorted(keys.key[i].tobytes() for i in range(len(keys)))
    unsorted = decode(encode_export_bin(HEADER, keys, revised, sort=False))
    assert [k.key_data for k in unsorted.keys] == [keys.key[i].tobytes() for i in range(len(keys))]


def test_sorted_by_key_keeps_rows_together():
    keys = KeyColumns.from_rows([(b"\x09" * 16, 1, 10, 144, "", 1), (b"\x01" * 16, 2, 20, 100, "likely", None)])
    s = keys.sorted_by_key()
    assert s.rows() == [(b"\x01" * 16, 2, 20, 100, 2, None), (b"\x09" * 16, 1, 10, 144, 0, 1)]
    assert s.is_sorted_by_key() and not keys.is_sorted_by_key()


def test_round_trip_through_zip():
    rng = np.random.default_rng(5)
    keys, revised = random_columns(rng, 500), random_columns(rng, 50)
    signer = LocalSigner()
    data = build_export_zip(HEADER, keys, revised, [(INFO, signer)])
    parsed = read_export(data)
    assert (parsed.start_timestamp, parsed.end_timestamp, parsed.region, parsed.batch_num, parsed.batch_size) == (
        HEADER.start_timestamp, HEADER.end_timestamp, "US", 1, 1)
    assert parsed.signature_infos == (INFO,)
    assert parsed.header == HEADER
    assert parsed.key_columns().equals(keys.sorted_by_key())
    assert parsed.revised_key_columns().equals(revised.sorted_by_key())
    assert not parsed.key_columns().equals(revised)
    assert len(parsed.signatures) == 1
    sig = parsed.signatures[0]
    assert (sig.signature_info, sig.batch_num, sig.batch_size, sig.is_der) == (INFO, 1, 1, True)
    verified = verify_export(parsed, {"local": signer.key.public_key()})
    assert [(v.index, v.key_name, v.encoding, v.curve) for v in verified] == [(0, "local", "der", "secp256r1")]


def test_round_trip_loose_files(tmp_path):
    keys = KeyColumns.from_rows([(bytes([i]) * 16, i % 9, 2_700_000 + i, 144, "confirmed", i - 3) for i in range(20)])
    export_bin = encode_export_bin(HEADER, keys, KeyColumns.empty())
    signer = LocalSigner()
    export_sig = encode_export_sig([(INFO, signer.sign(export_bin))], 1, 1)
    (tmp_path / "export.bin").write_bytes(export_bin)
    (tmp_path / "export.sig").write_bytes(export_sig)
    from_path = read_export(tmp_path / "export.bin")  # picks up the sibling export.sig
    assert from_path.has_sig and len(from_path.signatures) == 1
    assert verify_export(from_path, [signer.key.public_key()])[0].key_name == "#0"
    only_bin = read_export(export_bin)
    assert not only_bin.has_sig and only_bin.signatures == []
    assert "no export.sig" in summarize(only_bin)["warnings"]
    with_sig = read_export(export_bin, sig=export_sig)
    assert with_sig.key_columns().equals(keys)


def test_from_rows_and_helpers():
    rows = [(bytes([i]) * 16, 1, 100 + i, 144, name, None if i % 2 else i)
            for i, name in enumerate(["confirmed", "likely", "user-report", "negative", ""])]
    cols = KeyColumns.from_rows(rows)
    assert cols.report_type.tolist() == [1, 2, 3, 5, 0]
    assert cols.dsos_present.tolist() == [True, False, True, False, True]
    assert len(cols) == 5 and len(KeyColumns.empty()) == 0
    both = KeyColumns.concat([cols[:2], cols[2:]])
    assert both.equals(cols)
    assert [len(c) for c in cols.chunks(2)] == [2, 2, 1]
    assert cols[3].rows() == [(bytes([3]) * 16, 1, 103, 144, 5, None)]
    assert cols[np.array([True, False, False, False, True])].rows()[1][0] == bytes([4]) * 16
    with pytest.raises(ValueError, match="unknown report type"):
        KeyColumns.from_rows([(bytes(16), 1, 1, 144, "maybe", None)])
    with pytest.raises(ValueError, match="16 bytes"):
        KeyColumns.from_rows([(bytes(15), 1, 1, 144, "", None)])


def test_validation_rejects_values_protobuf_cannot_hold():
    ok = KeyColumns.from_rows([(bytes(16), 1, 1, 144, "", None)])
    with pytest.raises(ValueError, match="shape"):
        KeyColumns(key=np.zeros((1, 15), np.uint8), transmission_risk=[1], interval_number=[1],
                   interval_count=[1], report_type=[0], dsos=[0], dsos_present=[False])
    with pytest.raises(ValueError, match="rows"):
        KeyColumns(key=np.zeros((2, 16), np.uint8), transmission_risk=[1], interval_number=[1, 1],
                   interval_count=[1, 1], report_type=[0, 0], dsos=[0, 0], dsos_present=[False, False])
    with pytest.raises(ValueError, match="report_type"):
        KeyColumns(key=np.zeros((1, 16), np.uint8), transmission_risk=[1], interval_number=[1],
                   interval_count=[1], report_type=[300], dsos=[0], dsos_present=[False])
    bad_tr = ok[np.array([0])]
    bad_tr.transmission_risk[0] = 2**31
    with pytest.raises(ValueError, match="transmission_risk"):
        encode_export_bin(HEADER, bad_tr, KeyColumns.empty())
    bad_rt = ok[np.array([0])]
    bad_rt.report_type[0] = 6
    with pytest.raises(ValueError, match="ReportType"):
        encode_export_bin(HEADER, bad_rt, KeyColumns.empty())
    with pytest.raises(ValueError, match=r"\[a-zA-Z0-9_\]"):
        encode_export_bin(ExportHeader(1, 2, "US", 1, 1, (SignatureInfo("3.1", "v1"),)), ok, KeyColumns.empty())
    with pytest.raises(ValueError, match="at most 10"):
        encode_export_bin(ExportHeader(1, 2, "US", 1, 1, (INFO,) * 11), ok, KeyColumns.empty())
    with pytest.raises(ValueError, match="batch"):
        encode_export_bin(ExportHeader(1, 2, "US", 0, 1, (INFO,)), ok, KeyColumns.empty())
    with pytest.raises(ValueError, match="before"):
        encode_export_bin(ExportHeader(5, 2, "US", 1, 1, (INFO,)), ok, KeyColumns.empty())


# --- export.sig, zip -------------------------------------------------------------------------------------------


def test_export_sig_layout():
    sig = encode_export_sig([(INFO, b"\x30\x01sig"), (SignatureInfo("262", ""), b"second")], 1, 1)
    msg = export_pb2.TEKSignatureList.FromString(sig)
    assert len(msg.signatures) == 2
    first, second = msg.signatures
    assert (first.batch_num, first.batch_size, first.signature) == (1, 1, b"\x30\x01sig")
    assert first.signature_info.verification_key_id == "310"
    assert first.signature_info.verification_key_version == "v1"
    assert first.signature_info.signature_algorithm == ALGORITHM_ECDSA_P256_SHA256
    assert not second.signature_info.HasField("verification_key_version")
    assert second.signature == b"second"


def test_zip_layout_and_determinism():
    export_bin = encode_export_bin(HEADER, KeyColumns.from_rows([(bytes(16), 1, 1, 144, "", None)]),
                                   KeyColumns.empty())
    export_sig = encode_export_sig([(INFO, b"sig")], 1, 1)
    first = build_zip(export_bin, export_sig)
    assert first == build_zip(export_bin, export_sig)
    assert first != build_zip(export_bin + b"x", export_sig)
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["export.bin", "export.sig"]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        assert all((i.external_attr >> 16) & 0o777 == 0o644 for i in infos)
        assert zf.read("export.bin") == export_bin and zf.read("export.sig") == export_sig
        assert zf.testzip() is None


def test_signed_export_zip_is_byte_identical_on_re_export():
    rng = np.random.default_rng(9)
    keys = random_columns(rng, 2000)
    one = build_export_zip(HEADER, keys, KeyColumns.empty(), [(INFO, LocalSigner())])
    two = build_export_zip(HEADER, keys[np.arange(len(keys))[::-1]], KeyColumns.empty(), [(INFO, LocalSigner())])
    assert one == two  # same keys in a different arrival order, deterministic signature


def test_build_export_zip_requires_signers_to_match_header():
    with pytest.raises(ValueError, match="one-to-one"):
        build_export_zip(HEADER, KeyColumns.empty(), KeyColumns.empty(), [])


# --- verification -----------------------------------------------------------------------------------------------


def test_tampered_export_bin_fails_verification():
    signer = LocalSigner()
    keys = KeyColumns.from_rows([(bytes([i]) * 16, 1, 2_700_000, 144, "confirmed", 0) for i in range(10)])
    export_bin = encode_export_bin(HEADER, keys, KeyColumns.empty())
    export_sig = encode_export_sig([(INFO, signer.sign(export_bin))], 1, 1)
    public = {"k": signer.key.public_key()}
    assert len(verify_export(read_export(build_zip(export_bin, export_sig)), public)) == 1
    for position in (20, len(export_bin) // 2, len(export_bin) - 1):
        tampered = bytearray(export_bin)
        tampered[position] ^= 0x01
        parsed = read_export(build_zip(bytes(tampered), export_sig))
        assert verify_export(parsed, public) == []
    other = {"other": LocalSigner(seed=2).key.public_key()}
    assert verify_export(read_export(build_zip(export_bin, export_sig)), other) == []


def test_raw_r_s_signatures_are_accepted_but_not_strictly():
    signer = LocalSigner()
    export_bin = encode_export_bin(HEADER, KeyColumns.empty(), KeyColumns.empty())
    r, s = decode_dss_signature(signer.sign(export_bin))
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    parsed = read_export(build_zip(export_bin, encode_export_sig([(INFO, raw)], 1, 1)))
    assert not parsed.signatures[0].is_der
    verified = verify_export(parsed, {"k": signer.key.public_key()})
    assert [(v.key_name, v.encoding) for v in verified] == [("k", "raw")]
    assert verify_export(parsed, {"k": signer.key.public_key()}, strict=True) == []
    assert any("not ASN.1 DER" in w for w in summarize(parsed)["warnings"])


def test_any_curve_verifies_unless_strict():
    key = ec.derive_private_key(99, ec.SECP256K1())
    export_bin = encode_export_bin(HEADER, KeyColumns.empty(), KeyColumns.empty())
    sig = key.sign(export_bin, ec.ECDSA(hashes.SHA256()))
    parsed = read_export(build_zip(export_bin, encode_export_sig([(INFO, sig)], 1, 1)))
    assert [v.curve for v in verify_export(parsed, [key.public_key()])] == ["secp256k1"]
    assert verify_export(parsed, [key.public_key()], strict=True) == []


def test_signature_is_over_the_whole_export_bin():
    signer = LocalSigner()
    export_bin = encode_export_bin(HEADER, KeyColumns.empty(), KeyColumns.empty())
    body_only_sig = signer.sign(export_bin[16:])
    parsed = read_export(build_zip(export_bin, encode_export_sig([(INFO, body_only_sig)], 1, 1)))
    assert verify_export(parsed, [signer.key.public_key()]) == []
    assert parsed.digest == hashlib.sha256(export_bin).digest()


def test_verify_rejects_non_ec_keys():
    parsed = read_export(encode_export_bin(HEADER, KeyColumns.empty(), KeyColumns.empty()))
    with pytest.raises(TypeError, match="not an EC public key"):
        verify_export(parsed, {"bad": "not a key"})  # type: ignore[dict-item]


# --- reading bad input ------------------------------------------------------------------------------------------


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def test_read_rejects_malformed_input_with_clear_errors():
    export_bin = encode_export_bin(HEADER, KeyColumns.empty(), KeyColumns.empty())
    good = build_zip(export_bin, b"")
    with pytest.raises(ValueError, match="header"):
        read_export(_zip([("export.bin", b"EK Export v2    " + export_bin[16:]), ("export.sig", b"")]))
    with pytest.raises(ValueError, match=r"neither a zip nor an export\.bin"):
        read_export(b"hello world, this is not an export")
    with pytest.raises(ValueError, match="not a readable export zip"):
        read_export(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"no export\.sig"):
        read_export(_zip([("export.bin", export_bin)]))
    with pytest.raises(ValueError, match=r"no export\.bin"):
        read_export(_zip([("dir/export.bin", export_bin), ("export.sig", b"")]))
    with pytest.warns(UserWarning, match="Duplicate name"):
        duplicated = _zip([("export.bin", export_bin), ("export.bin", export_bin), ("export.sig", b"")])
    with pytest.raises(ValueError, match=r"more than one export\.bin"):
        read_export(duplicated)
    with pytest.raises(ValueError, match="not a valid TemporaryExposureKeyExport"):
        read_export(EXPORT_HEADER + b"\xff\xff\xff")
    with pytest.raises(ValueError, match="not a valid TEKSignatureList"):
        read_export(build_zip(export_bin, b"\x0a\x05ab"))
    with pytest.raises(ValueError, match="allowed"):
        read_export(good, max_bin_bytes=10)
    corrupted = bytearray(build_zip(export_bin + b"x" * 1000, b""))
    corrupted[60] ^= 0xFF  # inside the deflate stream of export.bin
    with pytest.raises(ValueError, match="not a readable export zip: Bad CRC-32"):
        read_export(bytes(corrupted))


def test_summarize_reports_counts_and_histograms():
    keys = KeyColumns.from_rows([(bytes([i]) * 16, i % 3, 2_700_000, 144, ["confirmed", "likely"][i % 2], None)
                                 for i in range(9)])
    revised = KeyColumns.from_rows([(bytes([1]) * 16, 0, 2_700_000, 144, "negative", None)])
    signer = LocalSigner()
    parsed = read_export(build_export_zip(HEADER, keys, revised, [(INFO, signer)]))
    verified = verify_export(parsed, {"local": signer.key.public_key()})
    s = summarize(parsed, verified)
    assert (s["num_keys"], s["num_revised_keys"], s["region"]) == (9, 1, "US")
    assert s["report_types"] == {"CONFIRMED_CLINICAL_DIAGNOSIS": 4, "CONFIRMED_TEST": 5}
    assert s["revised_report_types"] == {"REVOKED": 1}
    assert s["transmission_risks"] == {0: 3, 1: 3, 2: 3}
    assert (s["start_utc"], s["end_utc"], s["window_seconds"]) == ("2020-09-13T12:26:40Z", "2020-09-13T13:26:40Z",
                                                                    3600)
    assert s["signature_infos"] == [{"verification_key_id": "310", "verification_key_version": "v1",
                                     "signature_algorithm": ALGORITHM_ECDSA_P256_SHA256}]
    assert s["signatures"][0]["der"] is True and s["signatures"][0]["batch_num"] == 1
    assert s["verified"] == [{"index": 0, "key": "local", "encoding": "der", "curve": "secp256r1"}]
    assert s["warnings"] == []
    assert s["zip_entries"] == ["export.bin", "export.sig"]
