"""Our reader and verifier against export files made by servers we did not write (../shared/realworld).

The files, their provenance and the expected results are described in realworld/README.md and manifest.json.
The folder sits beside the clone (``Path(__file__).parents[3] / "shared" / "realworld"``); ENP_REALWORLD_DIR
overrides that location.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from enpipeline.export.format import (
    ALGORITHM_ECDSA_P256_SHA256,
    EXPORT_HEADER,
    ParsedExport,
    build_zip,
    encode_export_bin,
    encode_export_sig,
    read_export,
    summarize,
    verify_export,
)
from enpipeline.export.format import load_public_key as load_key


def _realworld_dir() -> Path:
    override = os.environ.get("ENP_REALWORLD_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[3] / "shared" / "realworld"


ROOT = _realworld_dir()
AVAILABLE = (ROOT / "manifest.json").is_file()
# Locally a missing folder skips; in CI (CI=true, ../shared is always beside the clone) it must fail loudly.
pytestmark = pytest.mark.skipif(not AVAILABLE and not os.environ.get("CI"),
                                reason=f"real-world export files not found at {ROOT} (set ENP_REALWORLD_DIR)")
MANIFEST: list[dict[str, Any]] = json.loads((ROOT / "manifest.json").read_text()) if AVAILABLE else []
MALFORMED = [e for e in MANIFEST if "parse" in e]
READABLE = [e for e in MANIFEST if "parse" not in e]


def _id(entry: dict[str, Any]) -> str:
    return entry["file"].removeprefix("exports/")


@pytest.fixture(scope="module")
def public_keys() -> dict[str, Any]:
    keys = {p.name: load_key(p) for p in sorted((ROOT / "keys").glob("*.pem"))}
    assert len(keys) == 9
    return keys


def _read(entry: dict[str, Any]) -> ParsedExport:
    return read_export(ROOT / entry["file"])


def _sig_bytes(entry: dict[str, Any]) -> bytes | None:
    companion = entry.get("companion_signature_file")
    return (ROOT / companion).read_bytes() if companion else None


def test_manifest_lists_every_export_file():
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "exports").rglob("*") if p.is_file()}
    listed = {e["file"] for e in MANIFEST} | {e["companion_signature_file"] for e in MANIFEST
                                              if "companion_signature_file" in e}
    assert on_disk == listed
    assert len(MANIFEST) == 19 and len(MALFORMED) == 2


@pytest.mark.parametrize("entry", READABLE, ids=_id)
def test_counts_and_header_match_manifest(entry: dict[str, Any]):
    parsed = _read(entry)
    assert parsed.export_bin[:16] == EXPORT_HEADER
    assert len(parsed.export_bin) == entry["export_bin_len"]
    assert (parsed.region, parsed.start_timestamp, parsed.end_timestamp) == (
        entry["region"], entry["start_timestamp"], entry["end_timestamp"])
    assert (parsed.batch_num, parsed.batch_size) == (entry["batch_num"], entry["batch_size"])
    assert (len(parsed.keys), len(parsed.revised_keys)) == (entry["num_keys"], entry["num_revised_keys"])
    assert len(parsed.signature_infos) == len(entry["signature_infos_in_export_bin"])
    for got, want in zip(parsed.signature_infos, entry["signature_infos_in_export_bin"], strict=True):
        assert got.verification_key_id == want.get("verification_key_id", "")
        assert got.verification_key_version == want.get("verification_key_version", "")
        assert got.signature_algorithm == want.get("signature_algorithm", "")
    if entry["export_sig_len"] is None:
        assert not parsed.has_sig and parsed.signatures == []
        return
    assert parsed.has_sig
    want_sigs = entry["signatures_in_export_sig"]
    assert len(parsed.signatures) == len(want_sigs)
    for got, want in zip(parsed.signatures, want_sigs, strict=True):
        known = want["signature_info_known_fields"]
        assert got.signature_info.verification_key_id == known.get("verification_key_id", "")
        assert got.signature_info.verification_key_version == known.get("verification_key_version", "")
        assert got.signature_info.signature_algorithm == known.get("signature_algorithm", "")
        assert (got.batch_num, got.batch_size) == (want["batch_num"], want["batch_size"])
        assert len(got.signature) == want["signature_len"]
        assert got.is_der == want["signature_is_DER"]


@pytest.mark.parametrize("entry", READABLE, ids=_id)
def test_verification_matches_manifest(entry: dict[str, Any], public_keys: dict[str, Any]):
    parsed = _read(entry)
    verified = verify_export(parsed, public_keys)
    want = sorted({k for s in entry.get("signatures_in_export_sig", []) for k in s["verifies_with"]})
    assert sorted(v.key_name for v in verified) == want
    expected = entry["expected_verification_key"]
    if expected is None:
        assert verified == []
    else:
        assert [v.key_name for v in verified] == [expected]
        assert verified[0].index == 0
        assert verified[0].signature_info == parsed.signatures[0].signature_info


@pytest.mark.parametrize("entry", [e for e in READABLE if e["expected_verification_key"]], ids=_id)
def test_tampered_copy_fails_verification(entry: dict[str, Any], public_keys: dict[str, Any]):
    parsed = _read(entry)
    key = {entry["expected_verification_key"]: public_keys[entry["expected_verification_key"]]}
    assert len(verify_export(parsed, key)) == 1
    export_sig = _sig_bytes(entry)
    if export_sig is None:  # a zip: take export.sig out of it again
        export_sig = encode_export_sig([(s.signature_info, s.signature) for s in parsed.signatures],
                                       parsed.signatures[0].batch_num, parsed.signatures[0].batch_size)
    checked = 0
    for position in (16, len(parsed.export_bin) // 2, len(parsed.export_bin) - 1):
        tampered = bytearray(parsed.export_bin)
        tampered[position] ^= 0x01
        try:
            copy = read_export(build_zip(bytes(tampered), export_sig))
        except ValueError:
            continue  # the flip broke the protobuf itself: rejected, which is also a pass
        assert len(copy.signatures) == len(parsed.signatures)
        assert verify_export(copy, key) == [], f"flipped byte {position} still verifies"
        checked += 1
    assert checked >= 2  # the last byte and the middle byte sit inside key data, so those parse
    header_flip = bytearray(parsed.export_bin)
    header_flip[3] ^= 0x01
    with pytest.raises(ValueError, match="header"):
        read_export(build_zip(bytes(header_flip), export_sig))


def test_german_production_file_verifies_with_published_key(public_keys: dict[str, Any]):
    folder = ROOT / "exports" / "de-cwa-production" / "2020-07-22"
    parsed = read_export(folder / "export.bin", sig=folder / "export.sig")
    assert (parsed.region, len(parsed.keys), len(parsed.revised_keys)) == ("DE", 720, 0)
    assert parsed.signature_infos[0].verification_key_id == "262"
    assert parsed.signature_infos[0].verification_key_version == "v1"
    assert parsed.signature_infos[0].signature_algorithm == ALGORITHM_ECDSA_P256_SHA256
    prod = {"de-cwa-prod-262-v1.pem": public_keys["de-cwa-prod-262-v1.pem"]}
    verified = verify_export(parsed, prod, strict=True)
    assert [(v.key_name, v.encoding, v.curve) for v in verified] == [("de-cwa-prod-262-v1.pem", "der", "secp256r1")]
    assert verify_export(parsed, {"dev": public_keys["de-cwa-dev-2020.pem"]}) == []
    columns = parsed.key_columns()
    assert columns.is_sorted_by_key()
    assert sorted(set(columns.interval_count.tolist())) == [144]
    assert set((columns.interval_number % 144).tolist()) == {0}
    tr = columns.transmission_risk.tolist()
    assert {v: tr.count(v) for v in set(tr)} == {1: 380, 8: 165, 6: 65, 5: 55, 3: 55}
    assert summarize(parsed, verified)["warnings"] == []


def test_swiss_production_file_verifies_with_published_key(public_keys: dict[str, Any]):
    folder = ROOT / "exports" / "ch-swisscovid-production" / "2020-08-26T00-02Z"
    parsed = read_export(folder / "export.bin")  # sibling export.sig found automatically
    assert parsed.has_sig
    assert (parsed.region, parsed.start_timestamp, parsed.end_timestamp) == ("ch", 1598400000, 1598407200)
    assert parsed.keys[0].transmission_risk == 0 and parsed.keys[0].interval_number == 2664000
    verified = verify_export(parsed, {"ch": public_keys["ch-swisscovid-prod.pem"]}, strict=True)
    assert [v.key_name for v in verified] == ["ch"]
    assert verify_export(parsed, {"ch-dev": public_keys["ch-swisscovid-dev-test-abnahme.pem"]}) == []


def test_large_cwa_dev_file(public_keys: dict[str, Any]):
    parsed = read_export(ROOT / "exports" / "de-cwa-dev" / "cwa-dev-2020-05-31.zip")
    assert len(parsed.keys) == 24131
    columns = parsed.key_columns()
    assert not columns.is_sorted_by_key()  # synthetic load-test data, unsorted
    assert columns.sorted_by_key().is_sorted_by_key()
    assert [v.key_name for v in verify_export(parsed, public_keys)] == ["de-cwa-dev-2020.pem"]
    assert verify_export(parsed, {"prod": public_keys["de-cwa-prod-262-v1.pem"]}) == []


def test_finnish_secp256k1_files_verify_only_without_p256_pinning(public_keys: dict[str, Any]):
    fi_key = {"fi": public_keys["fi-koronavilkku-test-secp256k1.pem"]}
    for name in ("batch_test.zip", "batch_test_2.zip"):
        parsed = read_export(ROOT / "exports" / "fi-koronavilkku-test" / name)
        assert [(v.key_name, v.curve) for v in verify_export(parsed, fi_key)] == [("fi", "secp256k1")]
        assert verify_export(parsed, fi_key, strict=True) == []
    for name in ("batch_test_invalid_key.zip", "batch_test_first-version.zip"):
        parsed = read_export(ROOT / "exports" / "fi-koronavilkku-test" / name)
        assert verify_export(parsed, public_keys) == []


def test_dutch_unit_test_file_with_odd_key_lengths(public_keys: dict[str, Any]):
    parsed = read_export(ROOT / "exports" / "nl-coronamelder-test" / "ProtobufHeaderTestFile.zip")
    assert parsed.zip_entries[:2] == ("export.bin", "export.sig") and "content.sig" in parsed.zip_entries
    key = parsed.keys[0]
    assert (len(key.key_data), key.interval_number, key.interval_count, key.report_type, key.dsos) == (53, 0, 0, 1, 0)
    verified = verify_export(parsed, {"nl": public_keys["nl-backend-unittest-TestECDSA.pem"]})
    assert [v.key_name for v in verified] == ["nl"]
    with pytest.raises(ValueError, match="16-byte key_data"):
        parsed.key_columns()


def test_google_samples(public_keys: dict[str, Any]):
    folder = ROOT / "exports" / "us-google-reference"
    early = read_export(folder / "sample_diagnosis_key_file-2020-05.zip")
    assert early.signatures[0].signature_info.signature_algorithm == "ECDSA p-256 SHA-256"
    assert [v.key_name for v in verify_export(early, public_keys)] == ["us-google-sample-ExampleServer-v1.pem"]
    assert verify_export(early, public_keys, strict=True) == []  # free-text algorithm, not the OID
    unsigned = read_export(folder / "1605818700-1605819000-0001-ff23e2.zip")
    assert unsigned.has_sig and unsigned.signatures == []
    assert verify_export(unsigned, public_keys) == []
    assert "unsigned: export.sig holds no signatures" in summarize(unsigned)["warnings"]
    assert sorted({k.report_type for k in unsigned.keys}) == [1, 2]
    dsos = [k.dsos for k in unsigned.keys]
    assert None not in dsos and min(dsos) == -11 and max(dsos) == 10


@pytest.mark.parametrize("name", ["sample_diagnosis_key_file-2020-07.zip", "1605818700-1605819000-0001-ff23e2.zip",
                                  "testExport-2-records-1-of-1.zip"])
def test_we_reproduce_google_reference_server_bytes(name: str, public_keys: dict[str, Any]):
    """Re-encoding the keys of reference-server files gives the very same export.bin (both encoders)."""
    parsed = read_export(ROOT / "exports" / "us-google-reference" / name)
    keys, revised = parsed.key_columns(), parsed.revised_key_columns()
    assert encode_export_bin(parsed.header, keys, revised) == parsed.export_bin
    assert encode_export_bin(parsed.header, keys, revised, fast=False) == parsed.export_bin
    if parsed.signatures:  # so the reference server's signature verifies over our bytes
        ours = read_export(encode_export_bin(parsed.header, keys, revised),
                           sig=encode_export_sig([(s.signature_info, s.signature) for s in parsed.signatures], 1, 1))
        assert len(verify_export(ours, public_keys, strict=True)) == 1


def test_immuni_prelaunch_samples_raw_signatures_and_long_keys():
    folder = ROOT / "exports" / "it-immuni-prelaunch"
    legit = read_export(folder / "legit.zip")
    assert len(legit.keys) == 501
    assert sorted({len(k.key_data) for k in legit.keys}) == [16, 96]
    assert [len(s.signature) for s in legit.signatures] == [64] and not legit.signatures[0].is_der
    with pytest.raises(ValueError, match="500 of 501 keys"):
        legit.key_columns()
    empty = read_export(folder / "empty.zip")
    assert empty.keys == [] and len(empty.key_columns()) == 0


@pytest.mark.parametrize("entry", MALFORMED, ids=_id)
def test_malformed_immuni_zips_are_rejected_cleanly(entry: dict[str, Any]):
    with pytest.raises(ValueError, match=r"no export\.bin") as info:
        _read(entry)
    assert "entries" in str(info.value)  # the message shows what the zip does hold


def test_truncated_real_zip_is_rejected():
    data = (ROOT / "exports" / "de-cwa-dev" / "cwa-dev-2020-05-31.zip").read_bytes()
    for cut in (100, len(data) // 2, len(data) - 10):
        with pytest.raises(ValueError):
            read_export(data[:cut])


def test_the_real_world_files_are_there():
    assert AVAILABLE, f"no manifest.json under {ROOT}"
    assert len(MANIFEST) >= 19
