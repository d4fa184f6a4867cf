"""Unit tests for enpipeline.export.signing: filesystem keys, Cloud KMS keys (fake client), settings."""

from __future__ import annotations

import hashlib
import logging
import pickle
import stat
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature
from google.api_core import exceptions as api_exceptions
from google.cloud import kms

from enpipeline.config import ConfigError, load_settings
from enpipeline.export.format import (
    ExportHeader,
    KeyColumns,
    SignatureInfo,
    build_export_zip,
    load_public_key,
    read_export,
    verify_export,
)
from enpipeline.export.signing import (
    FilesystemKeyManager,
    GcpKmsKeyManager,
    KmsIntegrityError,
    Signer,
    SigningKeyError,
    SigningKeyExistsError,
    crc32c,
    crc32c_pure,
    key_manager_from_settings,
)

RING = "projects/enp-test/locations/europe-west1/keyRings/exports"
# RFC 6979 A.2.5 (P-256, SHA-256, message "sample")
RFC6979_KEY = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC6979_R = 0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716
RFC6979_S = 0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8


def _verifies(pem: str, signature: bytes, data: bytes) -> bool:
    key = load_public_key(pem)
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except Exception:
        return False
    return True


# --- filesystem ---------------------------------------------------------------------------------------------------


def test_filesystem_create_writes_private_files(tmp_path):
    root = tmp_path / "keys"
    manager = FilesystemKeyManager(root)
    ref = manager.create_signing_key("export-310_v1")
    assert ref == "file:export-310_v1"
    path = root / "export-310_v1.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert sorted(p.name for p in root.iterdir()) == ["export-310_v1.pem"]  # no temp files left behind


def test_filesystem_refuses_to_overwrite(tmp_path):
    manager = FilesystemKeyManager(tmp_path)
    manager.create_signing_key("k1")
    before = (tmp_path / "k1.pem").read_bytes()
    with pytest.raises(SigningKeyExistsError, match="already exists"):
        manager.create_signing_key("k1")
    assert (tmp_path / "k1.pem").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1.pem"]


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "-dash", "sp ace", "x" * 129, "ü"])
def test_filesystem_rejects_bad_names(tmp_path, name):
    manager = FilesystemKeyManager(tmp_path)
    with pytest.raises(ValueError, match="invalid signing key name"):
        manager.create_signing_key(name)
    with pytest.raises(ValueError, match="invalid signing key name"):
        manager.signer("file:" + name)
    assert list(tmp_path.iterdir()) == []


def test_filesystem_sign_and_verify(tmp_path):
    manager = FilesystemKeyManager(tmp_path)
    signer = manager.signer(manager.create_signing_key("k"))
    assert isinstance(signer, Signer)
    data = b"EK Export v1    " + b"\x00" * 100
    signature = signer.sign(data)
    decode_dss_signature(signature)  # DER
    assert _verifies(signer.public_key_pem(), signature, data)
    assert not _verifies(signer.public_key_pem(), signature, data + b"x")
    assert signer.public_key_pem().startswith("-----BEGIN PUBLIC KEY-----")


def test_filesystem_signatures_are_deterministic_rfc6979(tmp_path):
    key = ec.derive_private_key(RFC6979_KEY, ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    (tmp_path / "rfc.pem").write_bytes(pem)
    (tmp_path / "rfc.pem").chmod(0o600)
    signer = FilesystemKeyManager(tmp_path).signer("file:rfc")
    signature = signer.sign(b"sample")
    assert decode_dss_signature(signature) == (RFC6979_R, RFC6979_S)
    assert signer.sign(b"sample") == signature
    # a second signer over the same file gives the same bytes again (a re-export is byte-identical)
    assert FilesystemKeyManager(tmp_path).signer("file:rfc").sign(b"sample") == signature
    assert signer.sign(b"other") != signature


def test_filesystem_signer_errors(tmp_path):
    manager = FilesystemKeyManager(tmp_path)
    with pytest.raises(SigningKeyError, match="not found"):
        manager.signer("file:missing")
    with pytest.raises(ValueError, match="not a filesystem key reference"):
        manager.signer("projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1")
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "p384.pem").write_bytes(p384)
    with pytest.raises(SigningKeyError, match="P-256"):
        manager.signer("file:p384")
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        manager.signer("file:junk")


def test_filesystem_warns_about_loose_permissions(tmp_path, caplog):
    manager = FilesystemKeyManager(tmp_path)
    manager.create_signing_key("k")
    (tmp_path / "k.pem").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="enpipeline.export.signing"):
        manager.signer("file:k")
    assert "readable by group/others" in caplog.text


def test_private_key_never_in_repr_or_logs(tmp_path, caplog):
    manager = FilesystemKeyManager(tmp_path)
    with caplog.at_level(logging.DEBUG):
        signer = manager.signer(manager.create_signing_key("k"))
        signer.sign(b"data")
    pem = (tmp_path / "k.pem").read_text()
    body = "".join(pem.strip().splitlines()[1:-1])
    scalar = serialization.load_pem_private_key(pem.encode(), None).private_numbers().private_value
    for text in (repr(signer), str(signer), repr(manager), caplog.text):
        assert "PRIVATE" not in text and body[:20] not in text and format(scalar, "x") not in text
        assert str(scalar) not in text
    assert repr(signer) == "FileSigner('file:k')"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)


# --- Cloud KMS with a fake client -----------------------------------------------------------------------------


class FakeKms:
    """Implements the three KeyManagementServiceClient methods we use, backed by real local EC keys."""

    def __init__(self, *, pending_polls: int = 0, curve: ec.EllipticCurve | None = None):
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.calls: list[tuple[str, Any]] = []
        self.pending_polls = pending_polls
        self.curve = curve or ec.SECP256R1()
        self.tamper: dict[str, Any] = {}

    def create_crypto_key(self, request: Any = None, **kwargs: Any) -> Any:
        self.calls.append(("create_crypto_key", request))
        name = f"{request.parent}/cryptoKeys/{request.crypto_key_id}"
        if f"{name}/cryptoKeyVersions/1" in self.keys:
            raise api_exceptions.AlreadyExists(f"CryptoKey {name} already exists.")
        self.keys[f"{name}/cryptoKeyVersions/1"] = ec.generate_private_key(self.curve)
        return kms.CryptoKey(name=self.tamper.get("crypto_key_name", name), purpose=request.crypto_key.purpose)

    def get_public_key(self, request: Any = None, **kwargs: Any) -> Any:
        self.calls.append(("get_public_key", request))
        if self.pending_polls > 0:
            self.pending_polls -= 1
            raise api_exceptions.FailedPrecondition("The request cannot be fulfilled: PENDING_GENERATION")
        key = self.keys[request.name]
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return kms.PublicKey(
            pem=pem,
            pem_crc32c=self.tamper.get("pem_crc32c", crc32c(pem.encode())),
            algorithm=self.tamper.get("algorithm", kms.CryptoKeyVersion.CryptoKeyVersionAlgorithm.EC_SIGN_P256_SHA256),
            name=self.tamper.get("public_key_name", request.name),
        )

    def asymmetric_sign(self, request: Any = None, **kwargs: Any) -> Any:
        self.calls.append(("asymmetric_sign", request))
        digest = request.digest.sha256
        verified = request.digest_crc32c == crc32c(digest)
        signature = self.keys[request.name].sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        signature = self.tamper.get("signature", signature)
        return kms.AsymmetricSignResponse(
            signature=signature,
            signature_crc32c=self.tamper.get("signature_crc32c", crc32c(signature)),
            verified_digest_crc32c=self.tamper.get("verified_digest_crc32c", verified),
            name=self.tamper.get("sign_name", request.name),
        )


def _created(fake: FakeKms, name: str = "export-signing") -> tuple[GcpKmsKeyManager, str]:
    manager = GcpKmsKeyManager(RING, client=fake, sleep=lambda _s: None)
    return manager, manager.create_signing_key(name)


def test_kms_create_builds_the_right_request():
    fake = FakeKms()
    _manager, ref = _created(fake)
    assert ref == f"{RING}/cryptoKeys/export-signing/cryptoKeyVersions/1"
    method, request = fake.calls[0]
    assert method == "create_crypto_key"
    assert isinstance(request, kms.CreateCryptoKeyRequest)
    assert request.parent == RING and request.crypto_key_id == "export-signing"
    assert request.crypto_key.purpose == kms.CryptoKey.CryptoKeyPurpose.ASYMMETRIC_SIGN
    template = request.crypto_key.version_template
    assert template.algorithm == kms.CryptoKeyVersion.CryptoKeyVersionAlgorithm.EC_SIGN_P256_SHA256
    assert template.protection_level == kms.ProtectionLevel.HSM
    # it waited for the version by fetching (and checking) its public key
    assert [c[0] for c in fake.calls] == ["create_crypto_key", "get_public_key"]
    assert fake.calls[1][1].name == ref


def test_kms_create_waits_for_pending_generation():
    fake = FakeKms(pending_polls=3)
    sleeps: list[float] = []
    manager = GcpKmsKeyManager(RING, client=fake, protection_level="SOFTWARE", sleep=sleeps.append)
    ref = manager.create_signing_key("k")
    assert ref.endswith("/cryptoKeys/k/cryptoKeyVersions/1")
    assert sleeps == [0.5, 1.0, 2.0]
    assert fake.calls[0][1].crypto_key.version_template.protection_level == kms.ProtectionLevel.SOFTWARE
    never_ready = FakeKms(pending_polls=10**6)
    manager = GcpKmsKeyManager(RING, client=never_ready, ready_timeout=0.0, sleep=lambda _s: None)
    with pytest.raises(api_exceptions.FailedPrecondition):
        manager.create_signing_key("k")


def test_kms_create_refuses_existing_key_and_bad_names():
    fake = FakeKms()
    manager, _ = _created(fake, "dup")
    with pytest.raises(SigningKeyExistsError, match="already exists"):
        manager.create_signing_key("dup")
    with pytest.raises(ValueError, match="invalid KMS key id"):
        manager.create_signing_key("bad/name")
    with pytest.raises(ValueError, match="key ring"):
        GcpKmsKeyManager("projects/p/keyRings/r", client=fake)
    fake.tamper = {"crypto_key_name": f"{RING}/cryptoKeys/somewhere-else"}
    with pytest.raises(KmsIntegrityError, match="expected"):
        manager.create_signing_key("fresh")


def test_kms_sign_sends_digest_with_crc32c_and_verifies():
    fake = FakeKms()
    manager, ref = _created(fake)
    signer = manager.signer(ref)
    assert isinstance(signer, Signer)
    data = b"EK Export v1    payload"
    signature = signer.sign(data)
    sign_calls = [req for method, req in fake.calls if method == "asymmetric_sign"]
    assert len(sign_calls) == 1
    request = sign_calls[0]
    assert isinstance(request, kms.AsymmetricSignRequest)
    assert request.name == ref
    assert request.digest.sha256 == hashlib.sha256(data).digest()
    assert request.digest_crc32c == crc32c(hashlib.sha256(data).digest())
    assert not request.data  # we send the digest, never the data
    assert _verifies(signer.public_key_pem(), signature, data)
    assert _verifies(fake.keys[ref].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(), signature, data)
    assert repr(signer) == f"KmsSigner({ref!r})"


@pytest.mark.parametrize(("tamper", "match"), [
    ({"verified_digest_crc32c": False}, "did not verify the request digest"),
    ({"signature_crc32c": 12345}, "signature CRC32C mismatch"),
    ({"sign_name": f"{RING}/cryptoKeys/other/cryptoKeyVersions/1"}, "different key version"),
    ({"signature": encode_dss_signature(1, 1)}, "does not verify"),
])
def test_kms_sign_integrity_failures(tamper, match):
    fake = FakeKms()
    manager, ref = _created(fake)
    signer = manager.signer(ref)
    fake.tamper = tamper
    with pytest.raises(KmsIntegrityError, match=match):
        signer.sign(b"data")


@pytest.mark.parametrize(("tamper", "error", "match"), [
    ({"pem_crc32c": 1}, KmsIntegrityError, "public key CRC32C mismatch"),
    ({"public_key_name": f"{RING}/cryptoKeys/x/cryptoKeyVersions/9"}, KmsIntegrityError, "different key version"),
    ({"algorithm": kms.CryptoKeyVersion.CryptoKeyVersionAlgorithm.EC_SIGN_P384_SHA384}, SigningKeyError,
     "EC_SIGN_P256_SHA256"),
])
def test_kms_public_key_integrity_failures(tamper, error, match):
    fake = FakeKms()
    manager, ref = _created(fake)
    fake.tamper = tamper
    with pytest.raises(error, match=match):
        manager.signer(ref).public_key_pem()
    with pytest.raises(error, match=match):
        manager.create_signing_key("another")


def test_kms_signer_rejects_bad_refs():
    manager = GcpKmsKeyManager(RING, client=FakeKms())
    for ref in ("file:k", f"{RING}/cryptoKeys/k", "projects/p/cryptoKeyVersions/1"):
        with pytest.raises(ValueError, match="CryptoKeyVersion"):
            manager.signer(ref)


def test_crc32c_known_vector_and_fallback():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c_pure(b"123456789") == 0xE3069283
    for data in (b"", b"a", bytes(range(256)) * 3):
        assert crc32c_pure(data) == crc32c(data)


def test_kms_signed_export_verifies_end_to_end():
    fake = FakeKms()
    manager, ref = _created(fake)
    signer = manager.signer(ref)
    info = SignatureInfo("310", "v1")
    header = ExportHeader(1_600_000_000, 1_600_003_600, "US", 1, 1, (info,))
    keys = KeyColumns.from_rows([(bytes([i]) * 16, 1, 2_700_000, 144, "confirmed", 0) for i in range(5)])
    parsed = read_export(build_export_zip(header, keys, KeyColumns.empty(), [(info, signer)]))
    verified = verify_export(parsed, {"kms": load_public_key(signer.public_key_pem())}, strict=True)
    assert [(v.key_name, v.encoding) for v in verified] == [("kms", "der")]


# --- settings ---------------------------------------------------------------------------------------------------


def test_key_manager_from_settings(tmp_path):
    settings = load_settings({"ENP_KEY_DIR": str(tmp_path / "k")}, require_database=False)
    assert settings.key_manager == "filesystem"
    manager = key_manager_from_settings(settings)
    assert isinstance(manager, FilesystemKeyManager) and manager.root == tmp_path / "k"
    settings = load_settings({"ENP_KEY_MANAGER": "gcpkms", "ENP_KMS_KEY_RING": RING}, require_database=False)
    fake = FakeKms()
    manager = key_manager_from_settings(settings, kms_client=fake)
    assert isinstance(manager, GcpKmsKeyManager) and manager.key_ring == RING and manager.client is fake
    with pytest.raises(ValueError, match="ENP_KEY_MANAGER"):
        key_manager_from_settings(SimpleNamespace(key_manager="vault"))


def test_settings_validation_for_key_management():
    defaults = load_settings({}, require_database=False)
    assert (defaults.key_manager, str(defaults.key_dir), defaults.kms_key_ring) == ("filesystem", "var/keys", "")
    with pytest.raises(ConfigError, match="ENP_KEY_MANAGER must be filesystem or gcpkms"):
        load_settings({"ENP_KEY_MANAGER": "aws"}, require_database=False)
    with pytest.raises(ConfigError, match="ENP_KMS_KEY_RING"):
        load_settings({"ENP_KEY_MANAGER": "gcpkms"}, require_database=False)
    with pytest.raises(ConfigError, match="ENP_KMS_KEY_RING"):
        load_settings({"ENP_KEY_MANAGER": "gcpkms", "ENP_KMS_KEY_RING": "exports"}, require_database=False)
