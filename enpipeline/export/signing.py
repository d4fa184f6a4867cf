"""Export signing keys: ECDSA P-256 / SHA-256 signers from the local filesystem or Google Cloud KMS.

A ``KeyManager`` creates signing keys and returns a *key reference* string to store in the database
(``signature_info.signing_key``); ``signer(key_ref)`` gives an object that signs export.bin bytes with an
ASN.1 DER ECDSA signature over SHA-256(data). Private key material never appears in reprs or logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

log = logging.getLogger(__name__)

KEY_MANAGERS = ("filesystem", "gcpkms")
FILE_REF_PREFIX = "file:"
_FILE_KEY_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# Cloud KMS: CryptoKey ids are [a-zA-Z0-9_-]{1,63}.
_KMS_KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
KMS_KEY_RING_RE = re.compile(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+")
_KMS_VERSION_RE = re.compile(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+/cryptoKeyVersions/[^/]+")


class SigningKeyError(Exception):
    """A signing key cannot be created, found or used."""


class SigningKeyExistsError(SigningKeyError):
    """create_signing_key was asked for a name that already has a key."""


class KmsIntegrityError(SigningKeyError):
    """A Cloud KMS request or response failed its CRC32C / name integrity check."""


@runtime_checkable
class Signer(Protocol):
    def sign(self, data: bytes) -> bytes:
        """ASN.1 DER ECDSA P-256 signature over SHA-256(data)."""
        ...

    def public_key_pem(self) -> str: ...


class KeyManager(Protocol):
    def create_signing_key(self, name: str) -> str:
        """Create a new P-256 signing key; return the key reference to store."""
        ...

    def signer(self, key_ref: str) -> Signer: ...


def _public_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# ---------------------------------------------------------------------------------------------------------------
# Filesystem


class FileSigner:
    """Signs with a P-256 private key loaded from a PEM file; deterministic ECDSA (RFC 6979)."""

    __slots__ = ("_key", "key_ref")

    def __init__(self, key_ref: str, private_key: ec.EllipticCurvePrivateKey):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise SigningKeyError(f"{key_ref}: signing key must be on P-256, not {private_key.curve.name}")
        self.key_ref = key_ref
        self._key = private_key

    def sign(self, data: bytes) -> bytes:
        # Deterministic signatures make a re-export of the same bytes give an identical file.
        return self._key.sign(bytes(data), ec.ECDSA(hashes.SHA256(), deterministic_signing=True))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def public_key_pem(self) -> str:
        return _public_pem(self._key.public_key())

    def __repr__(self) -> str:
        return f"FileSigner({self.key_ref!r})"

    def __reduce__(self) -> Any:  # never pickle private keys (e.g. into a task queue)
        raise TypeError("FileSigner cannot be pickled")


class FilesystemKeyManager:
    """Keys as PKCS#8 PEM files ``<root>/<name>.pem`` (mode 0600, root 0700); key refs ``file:<name>``.

    For local use and tests; production should keep keys in an HSM-backed KMS.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FilesystemKeyManager({str(self.root)!r})"

    @staticmethod
    def _check_name(name: str) -> str:
        if not isinstance(name, str) or not _FILE_KEY_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid signing key name {name!r}: use 1-128 of [A-Za-z0-9_.-], not starting with "
                             f"'.' or '-'")
        return name

    def _path(self, name: str) -> Path:
        return self.root / f"{self._check_name(name)}.pem"

    def _ensure_root(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)  # mkdir's mode is subject to the umask

    def create_signing_key(self, name: str) -> str:
        path = self._path(name)
        self._ensure_root()
        if path.exists():
            raise SigningKeyExistsError(f"signing key {name!r} already exists in {self.root}")
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        tmp = self.root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            # link() never replaces an existing file, so two creators of one name cannot overwrite each other.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise SigningKeyExistsError(f"signing key {name!r} already exists in {self.root}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        log.info("created export signing key %s in %s", name, self.root)
        return FILE_REF_PREFIX + name

    def signer(self, key_ref: str) -> FileSigner:
        if not isinstance(key_ref, str) or not key_ref.startswith(FILE_REF_PREFIX):
            raise ValueError(f"not a filesystem key reference (expected 'file:<name>'): {key_ref!r}")
        path = self._path(key_ref[len(FILE_REF_PREFIX) :])
        try:
            st = path.stat()
            data = path.read_bytes()
        except FileNotFoundError:
            raise SigningKeyError(f"signing key {key_ref!r} not found in {self.root}") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            log.warning("signing key file %s is readable by group/others (mode %o)", path, stat.S_IMODE(st.st_mode))
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise SigningKeyError(f"signing key {key_ref!r} is not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SigningKeyError(f"signing key {key_ref!r} is not an EC key")
        return FileSigner(key_ref, key)


# ---------------------------------------------------------------------------------------------------------------
# Google Cloud KMS


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c_pure(data: bytes) -> int:
    """CRC32C (Castagnoli), pure Python; used when google-crc32c is not installed."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    try:
        import google_crc32c
    except ImportError:  # pragma: no cover - google-crc32c ships with the Google client libraries
        return crc32c_pure(data)
    return int(google_crc32c.value(bytes(data)))


def _kms_types() -> Any:
    try:
        from google.cloud import kms
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise SigningKeyError("ENP_KEY_MANAGER=gcpkms needs the google-cloud-kms package") from exc
    return kms


class KmsSigner:
    """Signs with a Cloud KMS EC_SIGN_P256_SHA256 CryptoKeyVersion (the private key never leaves KMS)."""

    __slots__ = ("_client", "_public_key", "_public_pem", "_timeout", "key_ref")

    def __init__(self, client: Any, key_ref: str, *, timeout: float = 30.0):
        self._client = client
        self.key_ref = key_ref
        self._timeout = timeout
        self._public_pem: str | None = None
        self._public_key: ec.EllipticCurvePublicKey | None = None

    def __repr__(self) -> str:
        return f"KmsSigner({self.key_ref!r})"

    def public_key_pem(self) -> str:
        if self._public_pem is None:
            self._public_pem = _kms_public_key_pem(self._client, self.key_ref, self._timeout)
        return self._public_pem

    def public_key(self) -> ec.EllipticCurvePublicKey:
        if self._public_key is None:
            key = serialization.load_pem_public_key(self.public_key_pem().encode())
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
                raise SigningKeyError(f"{self.key_ref}: KMS public key is not a P-256 key")
            self._public_key = key
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        kms = _kms_types()
        digest = hashlib.sha256(bytes(data)).digest()
        request = kms.AsymmetricSignRequest(name=self.key_ref, digest=kms.Digest(sha256=digest),
                                            digest_crc32c=crc32c(digest))
        response = self._client.asymmetric_sign(request=request, timeout=self._timeout)
        # Integrity checks as recommended by Google (end-to-end CRC32C + resource name).
        if not response.verified_digest_crc32c:
            raise KmsIntegrityError(f"{self.key_ref}: KMS did not verify the request digest CRC32C")
        if response.name != self.key_ref:
            raise KmsIntegrityError(f"{self.key_ref}: KMS answered for a different key version {response.name!r}")
        if response.signature_crc32c is None or int(response.signature_crc32c) != crc32c(response.signature):
            raise KmsIntegrityError(f"{self.key_ref}: signature CRC32C mismatch in the KMS response")
        signature = bytes(response.signature)
        # Belt and braces: a signature that does not verify must never reach an export file.
        try:
            self.public_key().verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature:
            raise KmsIntegrityError(f"{self.key_ref}: KMS signature does not verify with its public key") from None
        return signature


def _kms_public_key_pem(client: Any, name: str, timeout: float) -> str:
    kms = _kms_types()
    response = client.get_public_key(request=kms.GetPublicKeyRequest(name=name), timeout=timeout)
    if response.name != name:
        raise KmsIntegrityError(f"{name}: KMS answered for a different key version {response.name!r}")
    if response.pem_crc32c is None or int(response.pem_crc32c) != crc32c(response.pem.encode()):
        raise KmsIntegrityError(f"{name}: public key CRC32C mismatch in the KMS response")
    if response.algorithm != kms.CryptoKeyVersion.CryptoKeyVersionAlgorithm.EC_SIGN_P256_SHA256:
        raise SigningKeyError(f"{name}: key algorithm is {response.algorithm!r}, need EC_SIGN_P256_SHA256")
    return str(response.pem)


class GcpKmsKeyManager:
    """Export signing keys in Cloud KMS (purpose ASYMMETRIC_SIGN, algorithm EC_SIGN_P256_SHA256).

    ``create_signing_key(name)`` creates CryptoKey ``name`` in ``key_ring`` and returns the resource name of
    its first CryptoKeyVersion, which is the key reference. ``client`` is a
    ``google.cloud.kms.KeyManagementServiceClient`` (created on first use when not given).
    """

    def __init__(self, key_ring: str, client: Any = None, *, protection_level: str = "HSM",
                 timeout: float = 30.0, ready_timeout: float = 120.0,
                 sleep: Callable[[float], None] = time.sleep):
        if not KMS_KEY_RING_RE.fullmatch(key_ring or ""):
            raise ValueError(f"key ring must be projects/<p>/locations/<l>/keyRings/<r>, got {key_ring!r}")
        if protection_level not in ("HSM", "SOFTWARE"):
            raise ValueError("protection_level must be HSM or SOFTWARE")
        self.key_ring = key_ring
        self._client = client
        self.protection_level = protection_level
        self.timeout = timeout
        self.ready_timeout = ready_timeout
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"GcpKmsKeyManager({self.key_ring!r})"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _kms_types().KeyManagementServiceClient()
        return self._client

    def create_signing_key(self, name: str) -> str:
        if not isinstance(name, str) or not _KMS_KEY_ID_RE.fullmatch(name):
            raise ValueError(f"invalid KMS key id {name!r}: use 1-63 of [A-Za-z0-9_-]")
        kms = _kms_types()
        request = kms.CreateCryptoKeyRequest(
            parent=self.key_ring,
            crypto_key_id=name,
            crypto_key=kms.CryptoKey(
                purpose=kms.CryptoKey.CryptoKeyPurpose.ASYMMETRIC_SIGN,
                version_template=kms.CryptoKeyVersionTemplate(
                    algorithm=kms.CryptoKeyVersion.CryptoKeyVersionAlgorithm.EC_SIGN_P256_SHA256,
                    protection_level=getattr(kms.ProtectionLevel, self.protection_level),
                ),
            ),
        )
        from google.api_core import exceptions as api_exceptions

        try:
            crypto_key = self.client.create_crypto_key(request=request, timeout=self.timeout)
        except api_exceptions.AlreadyExists as exc:
            raise SigningKeyExistsError(f"KMS key {name!r} already exists in {self.key_ring}") from exc
        expected = f"{self.key_ring}/cryptoKeys/{name}"
        if crypto_key.name != expected:
            raise KmsIntegrityError(f"KMS created {crypto_key.name!r}, expected {expected!r}")
        # Creating an asymmetric CryptoKey also creates its first version, generated asynchronously.
        version = f"{crypto_key.name}/cryptoKeyVersions/1"
        self._wait_until_ready(version)
        log.info("created KMS export signing key %s", version)
        return version

    def _wait_until_ready(self, version: str) -> None:
        """Poll get_public_key until the new version has left PENDING_GENERATION."""
        from google.api_core import exceptions as api_exceptions

        deadline = time.monotonic() + self.ready_timeout
        delay = 0.5
        while True:
            try:
                _kms_public_key_pem(self.client, version, self.timeout)
                return
            except api_exceptions.FailedPrecondition:
                if time.monotonic() >= deadline:
                    raise
            self._sleep(delay)
            delay = min(delay * 2, 8.0)

    def signer(self, key_ref: str) -> KmsSigner:
        if not isinstance(key_ref, str) or not _KMS_VERSION_RE.fullmatch(key_ref):
            raise ValueError(f"not a Cloud KMS CryptoKeyVersion name: {key_ref!r}")
        return KmsSigner(self.client, key_ref, timeout=self.timeout)


def key_manager_from_settings(settings: Any, *, kms_client: Any = None) -> KeyManager:
    """The KeyManager selected by ENP_KEY_MANAGER (filesystem: ENP_KEY_DIR; gcpkms: ENP_KMS_KEY_RING)."""
    kind = settings.key_manager
    if kind == "filesystem":
        return FilesystemKeyManager(settings.key_dir)
    if kind == "gcpkms":
        return GcpKmsKeyManager(settings.kms_key_ring, client=kms_client)
    raise ValueError(f"ENP_KEY_MANAGER must be one of {', '.join(KEY_MANAGERS)}, got {kind!r}")
