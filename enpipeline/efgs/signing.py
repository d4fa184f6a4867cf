"""EFGS batch signatures: detached CMS (PKCS#7) SignedData over the canonical byte stream, base64 encoded.

Signing uses cryptography's PKCS#7 builder. cryptography cannot verify CMS, so verification reads the SignedData
with a small BER/DER reader (other countries' gateways use BouncyCastle, whose output is BER with indefinite
lengths) and checks it the way CMS (RFC 5652 §5.4) says: the messageDigest attribute equals the hash of the
stream, and the signature over the DER signed attributes verifies with the given certificate's public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7


class SignatureError(Exception):
    """A batch signature does not verify; the message says why, in one line."""


def sign_batch(data: bytes, certificate: x509.Certificate, private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
               ) -> str:
    """The batchSignature header for ``data``: base64 of a detached CMS SignedData carrying only ``certificate``."""
    der = (pkcs7.PKCS7SignatureBuilder().set_data(data)
           .add_signer(certificate, private_key, hashes.SHA256())
           # Binary: the stream is signed as is (no MIME canonicalisation); no S/MIME capabilities attribute.
           .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary,
                                              pkcs7.PKCS7Options.NoCapabilities]))
    return base64.b64encode(der).decode("ascii")


def thumbprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER in lower-case hex, as EFGS names certificates."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def same_thumbprint(a: str, b: str) -> bool:
    # EFGS prints thumbprints with Java's BigInteger.toString(16): no leading zeros.
    return a.strip().lower().lstrip("0") == b.strip().lower().lstrip("0")


def certificate_country(certificate: x509.Certificate) -> str | None:
    """The subject's single C attribute (EFGS ties a certificate to that country), else None."""
    values = certificate.subject.get_attributes_for_oid(x509.NameOID.COUNTRY_NAME)
    return str(values[0].value) if len(values) == 1 else None


def verify_operator_signature(certificate_text: str, signature_b64: str,
                              trust_anchors: Sequence[x509.Certificate]) -> None:
    """Check an audit entry's signingCertificateOperatorSignature: one of ``trust_anchors`` signed the signing
    certificate's PEM text exactly as the audit carries it, with the algorithm of the anchor's own signature (what
    the gateway's and the national backends' BouncyCastle code does). Raises SignatureError saying why not.

    This is what ties a country's signing certificate to the trust anchor: without it whoever controls the gateway
    could sign keys for any country with a certificate it made itself.
    """
    if not trust_anchors:
        raise SignatureError("no trust anchor to check the signing certificate against")
    try:
        signature = base64.b64decode((signature_b64 or "").strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the signing certificate's operator signature is not base64") from None
    data = certificate_text.encode("utf-8")
    for anchor in trust_anchors:
        public_key, algorithm = anchor.public_key(), anchor.signature_hash_algorithm
        if algorithm is None:
            continue
        try:
            if isinstance(public_key, ec.EllipticCurvePublicKey):
                public_key.verify(signature, data, ec.ECDSA(algorithm))
            elif isinstance(public_key, rsa.RSAPublicKey):
                public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
            else:
                continue
        except (InvalidSignature, ValueError, UnsupportedAlgorithm):
            continue
        return
    raise SignatureError("the signing certificate is not signed by the trust anchor")


def check_certificate_at(certificate: x509.Certificate, now: datetime) -> None:
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise SignatureError(f"signing certificate is not valid at {now.isoformat()} (valid "
                             f"{certificate.not_valid_before_utc.isoformat()} .. "
                             f"{certificate.not_valid_after_utc.isoformat()})")


# -- a minimal BER/DER reader ---------------------------------------------------------------------------------

@dataclass
class _Node:
    tag: int
    raw: bytes                  # the whole element as encoded
    content: bytes              # the value octets (for an indefinite-length element: its children, re-joined)
    children: list[_Node]

    @property
    def constructed(self) -> bool:
        return bool(self.tag & 0x20)


def _read(buf: bytes, pos: int, depth: int = 0) -> tuple[_Node, int]:
    if depth > 32:
        raise SignatureError("CMS structure nested too deeply")
    if pos + 2 > len(buf):
        raise SignatureError("CMS structure truncated")
    start, tag = pos, buf[pos]
    if tag & 0x1F == 0x1F:
        raise SignatureError("CMS structure uses a high tag number")
    first = buf[pos + 1]
    pos += 2
    if first == 0x80:  # indefinite length (BER): children up to the end-of-contents octets
        if not tag & 0x20:
            raise SignatureError("CMS structure has an indefinite-length primitive")
        children = []
        while True:
            if buf[pos:pos + 2] == b"\x00\x00":
                pos += 2
                break
            child, pos = _read(buf, pos, depth + 1)
            children.append(child)
        return _Node(tag, buf[start:pos], b"".join(c.raw for c in children), children), pos
    if first & 0x80:
        n = first & 0x7F
        if n > 4 or pos + n > len(buf):
            raise SignatureError("CMS structure has an invalid length")
        length = int.from_bytes(buf[pos:pos + n], "big")
        pos += n
    else:
        length = first
    end = pos + length
    if end > len(buf):
        raise SignatureError("CMS structure truncated")
    content = buf[pos:end]
    children = []
    if tag & 0x20:
        at = pos
        while at < end:
            child, at = _read(buf, at, depth + 1)
            children.append(child)
    return _Node(tag, buf[start:end], content, children), end


def _oid(node: _Node) -> str:
    if node.tag != 0x06 or not node.content:
        raise SignatureError("CMS structure: expected an OBJECT IDENTIFIER")
    data = node.content
    parts, value = [], 0
    for b in data:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(value)
            value = 0
    first = parts[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(p) for p in head + parts[1:])


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


ID_SIGNED_DATA = "1.2.840.113549.1.7.2"
ID_DATA = "1.2.840.113549.1.7.1"
ID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
ID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
_DIGESTS = {"2.16.840.1.101.3.4.2.1": hashes.SHA256, "2.16.840.1.101.3.4.2.2": hashes.SHA384,
            "2.16.840.1.101.3.4.2.3": hashes.SHA512}
_RSA = {"1.2.840.113549.1.1.1": None, "1.2.840.113549.1.1.11": hashes.SHA256,
        "1.2.840.113549.1.1.12": hashes.SHA384, "1.2.840.113549.1.1.13": hashes.SHA512}
_ECDSA = {"1.2.840.10045.2.1": None, "1.2.840.10045.4.3.2": hashes.SHA256, "1.2.840.10045.4.3.3": hashes.SHA384,
          "1.2.840.10045.4.3.4": hashes.SHA512}


@dataclass
class _SignerInfo:
    issuer_serial: tuple[bytes, int] | None
    key_identifier: bytes | None
    digest_oid: str
    signed_attrs: _Node | None
    signature_oid: str
    signature: bytes


def _parse(der: bytes) -> tuple[bytes | None, list[_SignerInfo]]:
    """The encapsulated content (None when detached) and the signer infos of a ContentInfo(SignedData)."""
    info, end = _read(der, 0)
    if end != len(der) or info.tag != 0x30 or len(info.children) < 2 or _oid(info.children[0]) != ID_SIGNED_DATA:
        raise SignatureError("not a CMS SignedData")
    wrapper = info.children[1]
    if wrapper.tag != 0xA0 or len(wrapper.children) != 1:
        raise SignatureError("not a CMS SignedData")
    signed = wrapper.children[0]
    parts = signed.children
    if signed.tag != 0x30 or len(parts) < 4:
        raise SignatureError("malformed SignedData")
    encap = parts[2]
    content = None
    if len(encap.children) > 1:
        octets = encap.children[1].children[0] if encap.children[1].children else None
        if octets is not None:
            content = octets.content if not octets.constructed else b"".join(c.content for c in octets.children)
    signer_set = parts[-1]
    if signer_set.tag != 0x31 or not signer_set.children:
        raise SignatureError("SignedData has no signer")
    signers = []
    for si in signer_set.children:
        fields = si.children
        if si.tag != 0x30 or len(fields) < 5:
            raise SignatureError("malformed SignerInfo")
        sid = fields[1]
        issuer_serial = key_id = None
        if sid.tag == 0x30 and len(sid.children) == 2:
            issuer_serial = (sid.children[0].raw, int.from_bytes(sid.children[1].content, "big", signed=True))
        elif sid.tag == 0x80:
            key_id = sid.content
        at = 3
        attrs = None
        if fields[at].tag == 0xA0:
            attrs, at = fields[at], at + 1
        if len(fields) < at + 2:
            raise SignatureError("malformed SignerInfo")
        signers.append(_SignerInfo(issuer_serial, key_id, _oid(fields[2].children[0]), attrs,
                                   _oid(fields[at].children[0]), fields[at + 1].content))
    return content, signers


def _matches(signer: _SignerInfo, certificate: x509.Certificate) -> bool:
    if signer.issuer_serial is not None:
        issuer, serial = signer.issuer_serial
        return serial == certificate.serial_number and issuer == certificate.issuer.public_bytes()
    if signer.key_identifier is not None:
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            return False
        return ski == signer.key_identifier
    return False


def verify_batch_signature(signature_b64: str, data: bytes, certificate: x509.Certificate) -> None:
    """Check that ``signature_b64`` (a batchSignature) signs ``data`` with ``certificate``'s key; raises
    SignatureError saying why not. Certificate validity and country are the caller's to check."""
    try:
        der = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("batch signature is not base64") from None
    try:
        content, signers = _parse(der)
    except (IndexError, ValueError) as exc:
        raise SignatureError(f"malformed CMS SignedData ({exc})") from None
    if content is not None and content != data:
        raise SignatureError("the signature encapsulates other content")
    signer = next((s for s in signers if _matches(s, certificate)), None)
    if signer is None:
        raise SignatureError("the batch was not signed with this certificate")
    digest = _DIGESTS.get(signer.digest_oid)
    if digest is None:
        raise SignatureError(f"unsupported digest algorithm {signer.digest_oid}")
    if signer.signed_attrs is not None:
        attrs = {}
        for attr in signer.signed_attrs.children:
            values = attr.children[1].children if len(attr.children) == 2 else []
            if len(values) != 1:
                raise SignatureError("malformed signed attribute")
            attrs[_oid(attr.children[0])] = values[0]
        if ID_CONTENT_TYPE not in attrs or _oid(attrs[ID_CONTENT_TYPE]) != ID_DATA:
            raise SignatureError("signed attributes lack content type id-data")
        expected = hashes.Hash(digest())
        expected.update(data)
        if ID_MESSAGE_DIGEST not in attrs or attrs[ID_MESSAGE_DIGEST].content != expected.finalize():
            raise SignatureError("message digest does not match the batch (keys changed after signing?)")
        # The signature covers the attributes' DER with the SET OF tag, not the [0] IMPLICIT one they carry.
        body = signer.signed_attrs.content
        message = b"\x31" + _der_length(len(body)) + body
    else:
        message = data
    public_key = certificate.public_key()
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and signer.signature_oid in _RSA:
            algorithm = _RSA[signer.signature_oid] or digest
            public_key.verify(signer.signature, message, padding.PKCS1v15(), algorithm())
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and signer.signature_oid in _ECDSA:
            algorithm = _ECDSA[signer.signature_oid] or digest
            public_key.verify(signer.signature, message, ec.ECDSA(algorithm()))
        else:
            raise SignatureError(f"unsupported signature algorithm {signer.signature_oid} for a "
                                 f"{type(public_key).__name__}")
    except InvalidSignature:
        raise SignatureError("signature does not verify with the certificate's public key") from None
    except UnsupportedAlgorithm as exc:
        raise SignatureError(f"unsupported algorithm: {exc}") from None
