"""An EFGS-compatible gateway for tests: HTTPS on 127.0.0.1 with client-certificate authentication, the gateway's
upload validation and answers (400, 409, 413, 207 with per-key statuses and nothing stored, 201), batching of
uploads into a day's batch chain, download without the caller's own country, and the audit endpoint.

It checks batch signatures for real and independently of enpipeline's code: the canonical stream is rebuilt here
from the gateway's BatchSignatureUtils (not imported from enpipeline.efgs) and the CMS signature is verified by the
``openssl cms -verify`` binary, whose signer certificate must be a registered SIGNING certificate of the uploading
country, valid now, with that country in its subject. Certificates are made with cryptography per test.

Fault knobs for tests: ``answer`` (the next uploads' forced statuses), ``land_then_fail`` (store the next upload,
then answer 500 as if the answer was lost), ``fail_keys`` (keys that get a per-key 500), ``max_upload`` (413
above it), ``tamper`` (countries whose keys are altered in downloads), ``audit_cert`` (a certificate the audit
reports instead of a country's real one), ``include_own`` (leave the caller's own keys in its downloads),
``audit_fail`` (batches whose audit answers 500), ``download_fault`` / ``audit_fault`` (batch tag -> how that
answer goes wrong: ``garbage`` 200 with bytes that are no batch (no JSON), ``truncate`` the connection dropped
half-way through the body, ``trickle`` a byte every 50 ms, ``stall`` no answer until ``release`` is set).

The audit carries each signing certificate's operator signature, made with the gateway's trust anchor key (a
separate key, ``trust_anchor``) for registered SIGNING certificates only, as the real gateway's certificate table
holds them; anything else gets a signature of the wrong key, which no trust anchor check accepts.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import itertools
import json
import os
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enpipeline.proto import efgs_pb2
from tests import logscan

MAX_AGE_DAYS = 2


# -- certificates ---------------------------------------------------------------------------------------------

def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def thumbprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def issue(subject: x509.Name, key, *, issuer: tuple[x509.Certificate, Any] | None = None, ca: bool = False,
          server_ip: str | None = None, client: bool = False, days: int = 30,
          not_before: datetime | None = None) -> x509.Certificate:
    now = datetime.now(UTC)
    start = not_before or now - timedelta(days=1)
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if server_ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address(server_ip))]),
                                        critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def name(country: str, cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, country), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Pki:
    """A test CA that issues the gateway's server certificate and the countries' TLS client certificates."""

    cert: x509.Certificate
    key: Any

    @classmethod
    def create(cls) -> Pki:
        key = ec.generate_private_key(ec.SECP256R1())
        logscan.register_private_key(key, "EFGS test CA key")
        return cls(issue(name("EU", "EFGS test CA"), key, ca=True), key)


@dataclass
class Country:
    """One country's credentials: TLS client (AUTHENTICATION) and batch signing (SIGNING) certificates."""

    code: str
    auth_cert: x509.Certificate
    auth_key: Any
    signing_cert: x509.Certificate
    signing_key: Any

    @classmethod
    def create(cls, code: str, pki: Pki, *, signing_key=None, signing_country: str | None = None) -> Country:
        auth_key = ec.generate_private_key(ec.SECP256R1())
        signing_key = signing_key or ec.generate_private_key(ec.SECP256R1())
        logscan.register_private_key(auth_key, f"EFGS {code} TLS client key")
        logscan.register_private_key(signing_key, f"EFGS {code} signing key")
        return cls(code, issue(name(code, f"{code} key server"), auth_key, issuer=(pki.cert, pki.key), client=True),
                   auth_key, issue(name(signing_country or code, f"{code} batch signing"), signing_key),
                   signing_key)

    def write(self, directory: Path, pki: Pki) -> dict[str, Path]:
        """PEM files as an operator would hand them to `enpipeline efgs add-target`."""
        directory.mkdir(parents=True, exist_ok=True)
        files = {"client_cert": pem(self.auth_cert), "client_key": key_pem(self.auth_key),
                 "signing_cert": pem(self.signing_cert), "signing_key": key_pem(self.signing_key),
                 "ca": pem(pki.cert)}
        out = {}
        for what, data in files.items():
            path = directory / f"{self.code.lower()}-{what}.pem"
            path.write_bytes(data)
            out[what] = path
        return out


# -- the gateway's own rules, rebuilt here ----------------------------------------------------------------------

def canonical(keys: list[efgs_pb2.DiagnosisKey]) -> bytes:
    """BatchSignatureUtils.generateBytesToVerify: per key eight base64 fields, each followed by '.', the keys'
    byte strings sorted by their base64, concatenated."""
    def b64(data: bytes) -> bytes:
        return base64.b64encode(data)

    def i32(value: int) -> bytes:
        return b64(struct.pack(">i", value if value < 2**31 else value - 2**32))

    records = []
    for k in keys:
        parts = [b64(k.keyData), i32(k.rollingStartIntervalNumber), i32(k.rollingPeriod),
                 i32(k.transmissionRiskLevel), b64(",".join(k.visitedCountries).encode()), b64(k.origin.encode()),
                 i32(k.reportType), i32(k.days_since_onset_of_symptoms)]
        records.append(b"".join(p + b"." for p in parts))
    return b"".join(sorted(records, key=b64))


def validation_error(keys: list[efgs_pb2.DiagnosisKey], now: datetime) -> str | None:
    """DiagnosisKeyBatchValidator: the first invalid key refuses the batch."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    minimum = int((midnight - timedelta(days=15)).timestamp()) // 600
    maximum = int(now.timestamp()) // 600 + 1
    for k in keys:
        if len(k.keyData) != 16:
            return "The keydata is not 16 bytes."
        if not minimum <= k.rollingStartIntervalNumber <= maximum:
            return "Invalid rolling start interval number."
        if not 1 <= k.rollingPeriod <= 144:
            return "Invalid rolling period."
        if not (0 <= k.transmissionRiskLevel <= 8 or k.transmissionRiskLevel == 0x7FFFFFFF):
            return "Invalid transmission risk level."
    return None


def openssl_verify(signature_b64: str, data: bytes) -> x509.Certificate | None:
    """The signer certificate when ``signature_b64`` is a valid detached CMS signature of ``data``, else None."""
    with tempfile.TemporaryDirectory(prefix="efgs-double-") as tmp:
        sig, content, signer = Path(tmp, "sig.der"), Path(tmp, "data.bin"), Path(tmp, "signer.pem")
        try:
            sig.write_bytes(base64.b64decode(signature_b64, validate=True))
        except ValueError:
            return None
        content.write_bytes(data)
        # -noverify: the gateway trusts registered signing certificates by thumbprint, not through a chain.
        out = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(sig), "-content",
                              str(content), "-noverify", "-signer", str(signer), "-out", os.devnull],
                             capture_output=True, text=True, timeout=30, check=False)
        if out.returncode != 0 or not signer.exists():
            return None
        return x509.load_pem_x509_certificate(signer.read_bytes())


def payload_hash(k: efgs_pb2.DiagnosisKey) -> str:
    return hashlib.sha256(k.SerializeToString(deterministic=True)).hexdigest()


# -- state ----------------------------------------------------------------------------------------------------

@dataclass
class Upload:
    tag: str
    country: str
    keys: list[efgs_pb2.DiagnosisKey]
    signature: str
    signing_cert: x509.Certificate
    auth_cert: x509.Certificate
    uploaded_at: datetime
    batch_tag: str | None = None   # the download batch it went into


@dataclass
class DownloadBatch:
    tag: str
    day: date
    uploads: list[Upload]
    next_tag: str | None = None


def operator_signature(anchor: Pki, certificate: x509.Certificate) -> str:
    """signingCertificateOperatorSignature: the trust anchor's SHA256withECDSA over the certificate's PEM text."""
    return base64.b64encode(anchor.key.sign(pem(certificate), ec.ECDSA(hashes.SHA256()))).decode()


@dataclass
class FakeEfgs:
    pki: Pki
    server_cert: x509.Certificate
    server_key: Any
    trust_anchor: Pki = field(default_factory=Pki.create)
    auth: dict[str, str] = field(default_factory=dict)       # thumbprint -> country (AUTHENTICATION)
    signing: dict[str, str] = field(default_factory=dict)    # thumbprint -> country (SIGNING)
    uploads: list[Upload] = field(default_factory=list)
    hashes: set[str] = field(default_factory=set)
    batches: dict[str, DownloadBatch] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    max_upload: int = 5000
    max_download: int = 5000
    answer: list[int] = field(default_factory=list)
    land_then_fail: int = 0
    fail_keys: set[bytes] = field(default_factory=set)
    tamper: set[str] = field(default_factory=set)
    audit_cert: dict[str, x509.Certificate] = field(default_factory=dict)
    include_own: bool = False
    audit_fail: set[str] = field(default_factory=set)        # download batch tags whose audit answers 500
    download_fault: dict[str, str] = field(default_factory=dict)  # batch tag -> garbage | truncate | trickle | stall
    audit_fault: dict[str, str] = field(default_factory=dict)     # the same for the batch's audit
    release: threading.Event = field(default_factory=threading.Event)  # ends every stall
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: http.server.ThreadingHTTPServer | None = None

    @classmethod
    def start(cls) -> FakeEfgs:
        pki = Pki.create()
        key = ec.generate_private_key(ec.SECP256R1())
        logscan.register_private_key(key, "EFGS gateway TLS server key")
        self = cls(pki, issue(name("EU", "efgs.test"), key, issuer=(pki.cert, pki.key), server_ip="127.0.0.1"), key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=pem(pki.cert).decode())
        with tempfile.TemporaryDirectory() as tmp:
            chain = Path(tmp, "server.pem")
            chain.write_bytes(key_pem(key) + pem(self.server_cert))
            context.load_cert_chain(str(chain))
        gateway = self

        class Handler(_Handler):
            efgs = gateway

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        self.server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-efgs",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"https://127.0.0.1:{self.server.server_address[1]}"

    def register(self, country: Country, *, signing: bool = True) -> None:
        self.auth[thumbprint(country.auth_cert)] = country.code
        if signing:
            self.signing[thumbprint(country.signing_cert)] = country.code

    def country(self, code: str, **kwargs: Any) -> Country:
        """A new country with credentials from this gateway's CA, registered."""
        c = Country.create(code, self.pki, **kwargs)
        self.register(c)
        return c

    def stored_keys(self, country: str | None = None) -> list[efgs_pb2.DiagnosisKey]:
        return [k for u in self.uploads if country in (None, u.country) for k in u.keys]

    def batch(self, day: date | None = None) -> list[str]:
        """The 5-minute batching job: unbatched uploads into download batches of the day, each upload whole,
        linked after the day's last batch. Returns the new batch tags."""
        day = day or datetime.now(UTC).date()
        with self.lock:
            pending = [u for u in self.uploads if u.batch_tag is None]
            new: list[DownloadBatch] = []
            for upload in pending:
                if not new or sum(len(u.keys) for u in new[-1].uploads) + len(upload.keys) > self.max_download:
                    n = sum(1 for b in self.batches.values() if b.day == day) + 1
                    new.append(DownloadBatch(f"{day:%Y%m%d}-{n}", day, []))
                    self.batches[new[-1].tag] = new[-1]
                new[-1].uploads.append(upload)
                upload.batch_tag = new[-1].tag
            day_batches = [b for b in self.batches.values() if b.day == day]
            for a, b in itertools.pairwise(day_batches):
                a.next_tag = b.tag
            return [b.tag for b in new]


class _Handler(http.server.BaseHTTPRequestHandler):
    efgs: FakeEfgs
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"code": str(status), "message": message}).encode())

    def _country(self) -> str | None:
        der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        if not der:
            return None
        return self.efgs.auth.get(hashlib.sha256(der).hexdigest())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        country = self._country()
        self.efgs.requests.append({"method": "POST", "path": self.path, "batchTag": self.headers.get("batchTag"),
                                   "country": country})
        if country is None:
            return self._error(403, "unknown client certificate")
        if self.path != "/diagnosiskeys/upload":
            return self._error(404, "no such endpoint")
        with self.efgs.lock:
            self._upload(country, body)

    def _upload(self, country: str, body: bytes) -> None:
        efgs = self.efgs
        if efgs.answer:
            return self._error(efgs.answer.pop(0), "forced by the test")
        tag, signature = self.headers.get("batchTag"), self.headers.get("batchSignature")
        if not tag or not signature:
            return self._error(400, "batchTag and batchSignature are required")
        if not (self.headers.get("Content-Type") or "").startswith("application/protobuf"):
            return self._error(406, "content type")
        try:
            keys = list(efgs_pb2.DiagnosisKeyBatch.FromString(body).keys)
        except Exception:
            return self._error(400, "not a DiagnosisKeyBatch")
        now = datetime.now(UTC)
        invalid = validation_error(keys, now)
        if invalid:
            return self._error(400, f"Validation of diagnosis key failed: {invalid}")
        if len(keys) > efgs.max_upload:
            return self._error(413, "Too many diagnosis keys")
        if any(u.tag == tag for u in efgs.uploads):
            return self._error(409, "BatchTag already exists.")
        signer = openssl_verify(signature, canonical(keys))
        if (signer is None or efgs.signing.get(thumbprint(signer)) != country
                or not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc
                or [a.value for a in signer.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)] != [country]
                or any(k.origin != country for k in keys)):
            return self._error(400, "Invalid signature")
        # Per-key outcomes; any 409 or 500 rolls the whole upload back, as the gateway's transaction does.
        result: dict[str, list[int]] = {"201": [], "409": [], "500": []}
        seen: set[str] = set()
        for i, k in enumerate(keys):
            h = payload_hash(k)
            if h in efgs.hashes or h in seen:
                result["409"].append(i)
            elif bytes(k.keyData) in efgs.fail_keys:
                result["500"].append(i)
            else:
                result["201"].append(i)
            seen.add(h)
        if result["409"] or result["500"]:
            result["201"] = []
            return self._send(207, json.dumps(result).encode(), {"batchTag": tag})
        auth_der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        efgs.uploads.append(Upload(tag, country, keys, signature, signer, x509.load_der_x509_certificate(auth_der),
                                   now))
        efgs.hashes.update(seen)
        if efgs.land_then_fail:
            efgs.land_then_fail -= 1
            return self._error(500, "stored, but the answer got lost")
        self._send(201, b"", {"batchTag": tag})

    def do_GET(self) -> None:
        country = self._country()
        self.efgs.requests.append({"method": "GET", "path": self.path, "batchTag": self.headers.get("batchTag"),
                                   "country": country})
        if country is None:
            return self._error(403, "unknown client certificate")
        parts = self.path.strip("/").split("/")
        with self.efgs.lock:
            if parts[:2] == ["diagnosiskeys", "download"] and len(parts) == 3:
                return self._download(country, parts[2])
            if parts[:3] == ["diagnosiskeys", "audit", "download"] and len(parts) == 5:
                return self._audit(parts[3], parts[4])
        self._error(404, "no such endpoint")

    def _day(self, text: str) -> date | None:
        try:
            day = date.fromisoformat(text)
        except ValueError:
            self._error(400, "bad date")
            return None
        if day < datetime.now(UTC).date() - timedelta(days=MAX_AGE_DAYS):
            self._error(410, "Requested date is too old!")
            return None
        return day

    def _download(self, country: str, text: str) -> None:
        efgs = self.efgs
        day = self._day(text)
        if day is None:
            return
        tag = self.headers.get("batchTag")
        if tag is None:
            first = next((b for b in efgs.batches.values() if b.day == day), None)
            if first is None:
                return self._error(404, "Could not find any batches for given date")
            tag = first.tag
        batch = efgs.batches.get(tag)
        if batch is None:
            return self._error(404, "Could not find batch with given BatchTag")
        if batch.day != day:
            return self._error(400, "Given date does not match the requested batch")
        keys = []
        for upload in batch.uploads:
            if upload.country == country and not efgs.include_own:
                continue
            for k in upload.keys:
                copy = efgs_pb2.DiagnosisKey()
                copy.CopyFrom(k)
                if upload.country in efgs.tamper:
                    copy.transmissionRiskLevel = (copy.transmissionRiskLevel + 1) % 9
                keys.append(copy)
        body = efgs_pb2.DiagnosisKeyBatch(keys=keys).SerializeToString()
        self._faulty(efgs.download_fault.get(tag), body, {"batchTag": tag, "nextBatchTag": batch.next_tag or "null"},
                     content_type="application/protobuf; version=1.0")

    def _audit(self, text: str, tag: str) -> None:
        efgs = self.efgs
        day = self._day(text)
        if day is None:
            return
        batch = efgs.batches.get(tag)
        if batch is None or batch.day != day:
            return self._error(404, "Batchtag not found")
        if tag in efgs.audit_fail:
            return self._error(500, "audit unavailable")
        entries = []
        for u in batch.uploads:
            signing = efgs.audit_cert.get(u.country, u.signing_cert)
            anchor = efgs.trust_anchor if thumbprint(signing) in efgs.signing else Pki.create()
            entries.append({
                "country": u.country, "uploadedTime": u.uploaded_at.isoformat(),
                "uploaderCertificate": pem(u.auth_cert).decode(), "uploaderThumbprint": thumbprint(u.auth_cert),
                "uploaderOperatorSignature": "not-checked-by-this-double",
                "signingCertificate": pem(signing).decode(),
                # The gateway prints thumbprints with BigInteger.toString(16): no leading zeros.
                "uploaderSigningThumbprint": thumbprint(signing).lstrip("0"),
                "signingCertificateOperatorSignature": operator_signature(anchor, signing),
                "amount": len(u.keys), "batchSignature": u.signature})
        self._faulty(efgs.audit_fault.get(tag), json.dumps(entries).encode())

    def _faulty(self, fault: str | None, body: bytes, headers: dict[str, str] | None = None,
                content_type: str = "application/json") -> None:
        """A 200 answer, or that answer going wrong as ``fault`` says (see the module docstring)."""
        if fault is None:
            return self._send(200, body, headers, content_type)
        if fault == "garbage":  # a length-delimited field longer than the message: no protobuf parser takes it
            return self._send(200, b"\x0a\xff\xff\xff\x0f<html>busy</html>", headers, content_type)
        if fault == "stall":
            self.efgs.release.wait(30)
            try:
                self._send(200, body, headers, content_type)
            except OSError:  # the client gave up long ago
                self.close_connection = True
            return None
        self.send_response(200)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if fault == "truncate":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True  # the rest never comes
                return None
            assert fault == "trickle", fault
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:  # the client gave up
            self.close_connection = True
        return None


# -- helpers for tests ------------------------------------------------------------------------------------------

def add_target(engine, key_dir: Path, gateway: FakeEfgs, country: Country, target_id: str = "efgs") -> None:
    """Configure ``country``'s credentials for ``gateway`` as an enpipeline EFGS target (what add-target does)."""
    import dataclasses

    from enpipeline.db import efgs as efgs_db
    from enpipeline.efgs import targets

    files = targets.TargetFiles(pem(country.auth_cert), key_pem(country.auth_key), pem(country.signing_cert),
                                key_pem(country.signing_key), pem(gateway.pki.cert), pem(gateway.trust_anchor.cert))
    target = targets.check_target(target_id, gateway.url, country.code, files, datetime.now(UTC))
    tls_ref, signing_ref = targets.store_target_keys(key_dir, target, files)
    with engine.begin() as conn:
        efgs_db.add_target(conn, dataclasses.replace(target, tls_credentials=tls_ref,
                                                     signing_credentials=signing_ref), datetime.now(UTC))


def upload_as(gateway: FakeEfgs, country: Country, keys: list[efgs_pb2.DiagnosisKey], tag: str) -> int:
    """Another country's key server uploads ``keys`` (signed with its signing certificate); returns the status."""
    from enpipeline.efgs.canonical import batch_bytes
    from enpipeline.efgs.client import EfgsClient
    from enpipeline.efgs.signing import sign_batch

    context = ssl.create_default_context(cadata=pem(gateway.pki.cert).decode())
    with tempfile.TemporaryDirectory() as tmp:
        chain = Path(tmp, "client.pem")
        chain.write_bytes(key_pem(country.auth_key) + pem(country.auth_cert))
        context.load_cert_chain(str(chain))
    client = EfgsClient(gateway.url, context, timedelta(seconds=30))
    signature = sign_batch(batch_bytes(keys), country.signing_cert, country.signing_key)
    return client.upload(tag, signature, efgs_pb2.DiagnosisKeyBatch(keys=keys).SerializeToString()).status


def efgs_key(origin: str, days_ago: int = 2, *, visited: tuple[str, ...] = (), report_type: int = 1,
             dsos: int = 0, key_data: bytes | None = None) -> efgs_pb2.DiagnosisKey:
    """A valid key of ``origin`` for the day ``days_ago`` days before today (a whole, expired day)."""
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return efgs_pb2.DiagnosisKey(
        keyData=key_data or os.urandom(16), rollingStartIntervalNumber=int(
            (midnight - timedelta(days=days_ago)).timestamp()) // 600, rollingPeriod=144, transmissionRiskLevel=3,
        visitedCountries=list(visited), origin=origin, reportType=report_type,  # type: ignore[arg-type]
        days_since_onset_of_symptoms=dsos)
