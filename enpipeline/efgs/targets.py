"""An EFGS target's credentials: checked when the target is added, kept as 0600 files under ENP_KEY_DIR, and turned
into a mutual-TLS context and a batch signer when a push or pull runs.

Two key pairs, as the gateway requires: the TLS client certificate (AUTHENTICATION) and the signing certificate
(SIGNING), both registered with the gateway for our country. The certificates are public and live in the
database; the private keys only in files (``efgs-<id>-tls.pem`` holds the TLS key followed by its certificate
chain, the form ``ssl.SSLContext.load_cert_chain`` reads; ``efgs-<id>-signing.pem`` the signing key).
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enpipeline.db.efgs import TARGET_ID_RE, EfgsTarget
from enpipeline.efgs.signing import certificate_country
from enpipeline.federation.credentials import (
    CredentialsError,
    key_file_path,
    remove_credentials,
    write_key_file,
)

_COUNTRY_RE = re.compile(r"[A-Z]{2}")
MIN_RSA_BITS = 3072   # the gateway's rule: RSA >= 3072 or EC >= 256, SHA-256
MIN_EC_BITS = 256


class TargetError(Exception):
    """A target's settings or credentials are unusable; the message names the flag or file and says why."""


@dataclass(frozen=True)
class TargetFiles:
    """PEM bytes as an operator hands them over (add-target reads them from files)."""

    client_cert: bytes
    client_key: bytes = field(repr=False)   # private keys never reach a repr or a log
    signing_cert: bytes
    signing_key: bytes = field(repr=False)
    ca: bytes | None = None
    trust_anchor: bytes | None = None


def tls_name(target_id: str) -> str:
    return f"efgs-{target_id}-tls"


def signing_name(target_id: str) -> str:
    return f"efgs-{target_id}-signing"


def _certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TargetError(f"{what} holds no PEM certificate") from None
    return certs


def _private_key(pem: bytes, what: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise TargetError(f"{what} is encrypted; give an unencrypted PEM private key") from None
    except ValueError:
        raise TargetError(f"{what} is not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise TargetError(f"{what} is RSA-{key.key_size}; EFGS requires RSA >= {MIN_RSA_BITS} or EC >= 256")
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size < MIN_EC_BITS:
            raise TargetError(f"{what} is EC-{key.curve.key_size}; EFGS requires EC >= {MIN_EC_BITS}")
    else:
        raise TargetError(f"{what} must be an RSA or EC private key")
    return key


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _same_key(cert: x509.Certificate, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def check_target(target_id: str, url: str, country: str, files: TargetFiles, now: datetime) -> EfgsTarget:
    """Every check of a new target, in one pass (raises TargetError naming all problems); returns the target with
    empty credential references (store_target_keys fills them)."""
    problems: list[str] = []
    if not TARGET_ID_RE.fullmatch(target_id or ""):
        problems.append(f"--id {target_id!r} must be 1-64 of [A-Za-z0-9_.-]")
    if not re.fullmatch(r"https://[^\s/?#]+(/[^\s?#]*)?", url or ""):
        problems.append(f"--url {url!r} must be an https:// base URL without query (the gateway requires mTLS)")
    if not _COUNTRY_RE.fullmatch(country or ""):
        problems.append(f"--country {country!r} must be an ISO 3166-1 alpha-2 code in capitals, e.g. DE")
    pairs = {}
    for flag, cert_pem, key_pem in (("client", files.client_cert, files.client_key),
                                    ("signing", files.signing_cert, files.signing_key)):
        try:
            certs = _certificates(cert_pem, f"--{flag}-cert")
            key = _private_key(key_pem, f"--{flag}-key")
        except TargetError as exc:
            problems.append(str(exc))
            continue
        cert = certs[0]
        if not _same_key(cert, key):
            problems.append(f"--{flag}-key is not the private key of --{flag}-cert")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            problems.append(f"--{flag}-cert is not valid now (valid {cert.not_valid_before_utc.isoformat()} .. "
                            f"{cert.not_valid_after_utc.isoformat()})")
        pairs[flag] = (certs, key)
    if "signing" in pairs and _COUNTRY_RE.fullmatch(country or ""):
        # The gateway accepts a batch only when every key's origin is the signing certificate's C attribute.
        signed_for = certificate_country(pairs["signing"][0][0])
        if signed_for != country:
            problems.append(f"--signing-cert is for country {signed_for!r}, not --country {country!r}")
    ca_pem = None
    if files.ca is not None:
        try:
            ca_pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode()
                             for c in _certificates(files.ca, "--ca"))
        except TargetError as exc:
            problems.append(str(exc))
    anchor_pem = None
    if files.trust_anchor is not None:
        try:
            anchor_pem = check_trust_anchor(files.trust_anchor)
        except TargetError as exc:
            problems.append(str(exc))
    if problems:
        raise TargetError("; ".join(problems))
    client_certs, _ = pairs["client"]
    signing_certs, _ = pairs["signing"]
    return EfgsTarget(
        target_id=target_id, url=url.rstrip("/"), country=country,
        client_cert="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in client_certs),
        tls_credentials="", signing_cert=signing_certs[0].public_bytes(serialization.Encoding.PEM).decode(),
        signing_credentials="", ca_cert=ca_pem, trust_anchor=anchor_pem)


def check_trust_anchor(data: bytes) -> str:
    """The trust anchor certificate(s) as normalised PEM; TargetError unless each has an RSA or EC key."""
    anchors = _certificates(data, "--trust-anchor")
    bad = [a.subject.rfc4514_string() for a in anchors
           if not isinstance(a.public_key(), rsa.RSAPublicKey | ec.EllipticCurvePublicKey)]
    if bad:
        raise TargetError(f"--trust-anchor {', '.join(bad)} must have an RSA or EC key")
    return "".join(a.public_bytes(serialization.Encoding.PEM).decode() for a in anchors)


def store_target_keys(key_dir: Path, target: EfgsTarget, files: TargetFiles) -> tuple[str, str]:
    """Write the two private keys (mode 0600) and return their references (tls, signing)."""
    tls_key = _private_key(files.client_key, "--client-key")
    signing_key = _private_key(files.signing_key, "--signing-key")
    tls_ref = write_key_file(key_dir, tls_name(target.target_id), _pkcs8(tls_key) + target.client_cert.encode())
    try:
        signing_ref = write_key_file(key_dir, signing_name(target.target_id), _pkcs8(signing_key))
    except BaseException:
        remove_credentials(key_dir, tls_ref)
        raise
    return tls_ref, signing_ref


def remove_target_keys(key_dir: Path, target: EfgsTarget) -> None:
    for ref in (target.tls_credentials, target.signing_credentials):
        remove_credentials(key_dir, ref)


@dataclass(frozen=True)
class Signer:
    """What signs our batches: the signing certificate and its key."""

    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:  # the key never reaches a log
        return f"Signer({self.certificate.subject.rfc4514_string()!r})"


def load_trust_anchors(target: EfgsTarget) -> list[x509.Certificate]:
    """The target's trust anchor certificates; raises TargetError when it has none (pulls cannot run then)."""
    if not target.trust_anchor:
        raise TargetError(f"EFGS target {target.target_id!r} has no trust anchor, so other countries' signing "
                          "certificates cannot be checked; remove it and add it again with --trust-anchor")
    return x509.load_pem_x509_certificates(target.trust_anchor.encode())


def load_signer(key_dir: Path, target: EfgsTarget) -> Signer:
    try:
        pem = load_credentials_any(key_dir, target.signing_credentials)
    except CredentialsError as exc:
        raise TargetError(f"EFGS target {target.target_id!r}: {exc}") from None
    return Signer(x509.load_pem_x509_certificate(target.signing_cert.encode()),
                  _private_key(pem, f"signing key {target.signing_credentials!r}"))


def load_credentials_any(key_dir: Path, ref: str) -> bytes:
    """The PEM file behind a reference, whatever its key type (load_credentials insists on P-256)."""
    path = key_file_path(key_dir, ref)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CredentialsError(f"credentials {ref!r} not found in {path.parent}") from None
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials {ref!r}: {exc.strerror}") from None


def ssl_context(key_dir: Path, target: EfgsTarget) -> ssl.SSLContext:
    """Mutual TLS to the gateway: our client certificate, and the target's CA (else the system roots)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=target.ca_cert or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    path = key_file_path(key_dir, target.tls_credentials)
    if not path.is_file():
        raise TargetError(f"EFGS target {target.target_id!r}: TLS credentials {target.tls_credentials!r} not found "
                          f"in {path.parent}")
    try:
        context.load_cert_chain(str(path))
    except (ssl.SSLError, OSError) as exc:
        raise TargetError(f"EFGS target {target.target_id!r}: cannot load TLS credentials "
                          f"{target.tls_credentials!r}: {exc}") from None
    return context
