"""tests/logscan.py is not vacuous: planted secrets, keys and client addresses are found, allowed text is not, and a
session whose logs leak fails with exit status 1.

Nothing here is logged or printed: the planted lines go to ``scan`` directly (or to a separate pytest process), so
the real session's scan stays clean.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests import logscan

REPO = Path(__file__).resolve().parents[2]
NO_OWN: set = set()


def _index(secrets=(), keys=()) -> logscan.SecretIndex:
    index = logscan.SecretIndex()
    for value in secrets:
        index.add("planted secret", logscan.secret_forms(value))
    for key in keys:
        index.add("planted key", logscan.private_key_forms(key))
    return index


def _kinds(line: str, index: logscan.SecretIndex | None = None, own: set = NO_OWN) -> list[str]:
    _, findings = logscan.scan([("test", line)], index or logscan.SecretIndex(), own)
    return [f.kind for f in findings]


def _record_text(message: str, *args, exc: BaseException | None = None) -> str:
    """A log record formatted as the session's handler formats it (traceback included), never emitted."""
    record = logging.LogRecord("enpipeline.planted", logging.ERROR, __file__, 1, message, args,
                               (type(exc), exc, exc.__traceback__) if exc else None)
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(record)


def test_a_secret_planted_in_a_log_record_is_found_in_every_encoding_and_redacted():
    secret = os.urandom(16)
    index = _index([secret])
    forms = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
             base64.urlsafe_b64encode(secret).decode().rstrip("=")]
    for form in forms:
        text = _record_text("unwrapping revision key with %s failed", form)
        lines, findings = logscan.scan([("planted record", text)], index, NO_OWN)
        assert lines == 1 and [f.kind for f in findings] == ["planted secret"], form
        assert form not in str(findings[0]) and "<planted secret redacted>" in findings[0].line
        assert findings[0].source == "planted record" and findings[0].line_number == 1


def test_a_secret_in_a_bytes_repr_is_found():
    secret = os.urandom(32)
    index = _index([secret])
    assert _kinds(f"_KeyCache(deks={{1: {secret!r}}}, effective_kid=1)", index) == ["planted secret"]
    assert _kinds(f"data={b'header' + secret + b'trailer'!r}", index) == ["planted secret"]
    assert _kinds(f"data={os.urandom(32)!r} and Bob's b'ordinary text'", index) == []


def test_a_secret_in_a_traceback_is_found_on_its_line():
    secret = os.urandom(32)
    try:
        raise ValueError(f"bad key {secret.hex()}")
    except ValueError as exc:
        text = _record_text("publish failed unexpectedly", exc=exc)
    _, findings = logscan.scan([("planted record", text)], _index([secret]), NO_OWN)
    assert len(findings) == 1
    assert findings[0].line_number == len(text.splitlines()) and findings[0].line.startswith("ValueError: bad key <")


def test_an_unregistered_value_is_not_a_finding():
    assert _kinds(f"kid {os.urandom(16).hex()} {base64.b64encode(os.urandom(24)).decode()}", _index([b"x" * 16])) \
        == []


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["p256", "p384"])
def test_ec_private_key_material_is_found(curve):
    key = ec.generate_private_key(curve)
    index = _index(keys=[key])
    scalar = key.private_numbers().private_value
    size = (key.curve.key_size + 7) // 8
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()
    sec1 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    leaks = {
        "pkcs8 body line": pkcs8.splitlines()[2],
        "sec1 body line": sec1.splitlines()[1],
        "der as one base64 run": base64.b64encode(der).decode(),
        "scalar hex": f"d={scalar.to_bytes(size, 'big').hex()}",
        "jwk d": f'{{"d": "{base64.urlsafe_b64encode(scalar.to_bytes(size, "big")).decode().rstrip("=")}"}}',
        "scalar decimal": f"EllipticCurvePrivateNumbers(private_value={scalar})",
    }
    for what, line in leaks.items():
        assert _kinds(line, index) == ["planted key"], what
    assert _kinds(pkcs8.splitlines()[0]) == ["private key block"]   # any key's PEM header, registered or not


def test_rsa_private_key_material_is_found():
    key = rsa.generate_private_key(65537, 2048)
    index = _index(keys=[key])
    numbers = key.private_numbers()
    assert _kinds(f"d = {numbers.d:x}", index) == ["planted key"]
    assert _kinds(f"p={numbers.p}", index) == ["planted key"]
    body = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode().splitlines()
    assert _kinds(body[5], index) == ["planted key"]
    assert _kinds("-----BEGIN RSA PRIVATE KEY-----") == ["private key block"]
    assert _kinds("-----BEGIN ENCRYPTED PRIVATE KEY-----") == ["private key block"]
    assert _kinds("-----BEGIN PUBLIC KEY-----") == []


@pytest.mark.parametrize("line", [
    "publish from 198.51.100.23",
    "X-Forwarded-For: 203.0.113.7, 192.0.2.1",
    'Forwarded: for="[2001:db8::23]:4711"',
    "peer ipv6:[2001:db8:0:0:0:0:0:23]:443",
    "mapped ::ffff:198.51.100.23 here",
    "client=2001:DB8::1",
], ids=["v4", "xff", "forwarded-v6", "full-v6", "v4-mapped", "upper-v6"])
def test_documentation_range_addresses_are_client_addresses(line):
    assert _kinds(line) == ["client IP address"]


@pytest.mark.parametrize("line", ["connect to 8.8.8.8:53", "from 10.1.2.3", "peer 2a00:1450:4001::200e"],
                         ids=["public-v4", "private-v4", "public-v6"])
def test_other_foreign_addresses_are_findings(line):
    assert _kinds(line) == ["IP address that is neither loopback nor this host's"]


@pytest.mark.parametrize("line", [
    "Listening at: http://127.0.0.1:35607 (17971)",
    "bind 0.0.0.0:8080 and [::]:8080",
    "postgresql://postgres@[::1]:5432/postgres",
    "peer ipv4:127.0.0.1:40222",
    "signature algorithm 1.2.840.10045.4.3.2, digest 2.16.840.1.101.3.4.2.1",
    "Mozilla/5.0 HeadlessChrome/120.0.0.0 Safari/537.36",
    "[2026-11-29 09:54:52 +0000] 12:07:13,123 took 0.25s",
    "text[::2] and std::vector",
    "Starting gunicorn 27.0.1 with grpcio 1.85.1",
], ids=["loopback", "unspecified", "v6-loopback", "grpc-peer", "oids", "user-agent", "times", "code", "versions"])
def test_allowed_text_is_not_a_finding(line):
    assert _kinds(line) == []


def test_this_hosts_own_addresses_are_allowed():
    import ipaddress

    own = {ipaddress.ip_address("10.9.8.7")}
    assert _kinds("worker at 10.9.8.7:8793", own=own) == []
    assert _kinds("worker at 10.9.8.6:8793", own=own) != []


def test_key_directories_are_harvested(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "export-v1.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    kek = os.urandom(32)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "revision-token-kek").write_text(base64.b64encode(kek).decode())
    (tmp_path / "passwords.json").write_text('{"admin": "abcdefghijklmnop"}')
    registry = logscan.Registry()
    registry.key_dirs[tmp_path] = None
    index = logscan.build_index(registry)
    assert _kinds(f"scalar {key.private_numbers().private_value:064x}", index) == [
        "key material of export-v1.pem"]
    assert _kinds(f"kek={kek.hex()}", index) == ["key material of revision-token-kek"]
    assert _kinds("login admin / abcdefghijklmnop", index) == ["key material of passwords.json"]


def test_a_session_whose_logs_leak_fails_even_when_every_test_passes(tmp_path):
    """The plugin end to end, in a pytest process of its own (its leak never reaches this session's logs)."""
    (tmp_path / "test_leak.py").write_text(textwrap.dedent("""
        import logging, os
        from tests import logscan

        def test_leaks_a_secret():
            secret = os.urandom(16)
            logscan.register_secret(secret, "planted secret")
            logging.getLogger("leaky").debug("the key is %s", secret.hex())

        def test_clean():
            logging.getLogger("fine").info("published 14 keys")
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "pytest", "-p", "tests.logscan", "-q", "-p", "no:cacheprovider"]
    leaky = subprocess.run([*args, "test_leak.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120, check=False)
    assert leaky.returncode == 1, leaky.stdout + leaky.stderr
    assert "2 passed" in leaky.stdout
    assert "1 finding(s)" in leaky.stdout and "log scan FAILED" in leaky.stdout
    assert "log leaky during test_leak.py::test_leaks_a_secret" in leaky.stdout
    assert "the key is <planted secret redacted>" in leaky.stdout

    clean = subprocess.run([*args, "test_leak.py", "-k", "clean"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120, check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 finding(s)" in clean.stdout and "log scan: " in clean.stdout


def test_the_spool_survives_logging_being_reconfigured_and_never_fails_a_logger(tmp_path):
    """Airflow's dictConfig closes every handler; the spool must keep collecting, and must never raise into the
    code that logs (even after the session closed it)."""
    current = ["test"]
    handler = logscan._SpoolHandler(tmp_path / "spool.jsonl", current)
    record = logging.LogRecord("enpipeline.x", logging.INFO, __file__, 1, "published %d keys", (14,), None)
    handler.handle(record)
    handler.close()              # what logging.shutdown() / dictConfig do to every handler
    handler.handle(record)
    handler.finish()             # the plugin, at session end
    handler.handle(record)       # a straggling thread: dropped, no exception
    lines = (tmp_path / "spool.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("published 14 keys" in line and "during test" in line for line in lines)
