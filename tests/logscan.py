"""Pytest plugin: collect every log line the test session produces and fail the session if one carries a secret.

What is collected:
* every ``logging`` record of the test process (a root handler at DEBUG, installed at session start and again
  before each test in case a library reconfigured logging), formatted with its traceback;
* pytest's captured stdout, stderr and log sections of every test phase;
* log files of the processes tests start (gunicorn, the federation server, Airflow components and task logs, the
  local stack), as the fixtures that start them register them (``register_log_file``, ``register_log_dir``), and
  output a test read itself (``record_text``).

What is a finding (scanned at session end, when every secret is known):
* a PEM private key block (``-----BEGIN ... PRIVATE KEY-----``), whoever's it is;
* key material of the private keys tests made (``register_private_key``: the PEM body lines in PKCS#8 and the
  traditional form, the private scalar or exponent in hex, base64 and decimal) and of key files found in the
  directories registered with ``register_key_dir`` (export signing keys, federation and EFGS credentials, the local
  stack's demo key and secrets);
* secrets tests used (``register_secret``: revision-token KEK and AAD, revision DEKs, the phones' HMAC secrets, ...)
  in hex, standard or URL-safe base64, padded or not, or inside a Python bytes literal (a repr);
* an IP address, by this rule: tests play clients only from the documentation ranges (192.0.2.0/24,
  198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32), so any of those in a log is a client's address that leaked;
  any other address is allowed only if it is loopback (127.0.0.0/8, ::1), unspecified (0.0.0.0, ::) or one of
  this host's own addresses (interfaces and host names), i.e. where our servers bind and connect, never a
  client's; an own address is allowed even inside a documentation range, since test clients never use one.
  Dotted numbers that are part of a longer dotted sequence (OIDs) or of a product token (``Chrome/120.0.0.0``)
  are not addresses.

A finding fails the session (exit status 1 even if every test passed) and is printed with its source and the line,
the secret redacted. The terminal summary gives lines scanned, sources and findings either way.
``-p no:tests.logscan`` turns the plugin off. (PYTEST_DONT_REWRITE: the conftest imports this module before pytest
registers it as a plugin; it has no asserts to rewrite.)
"""

from __future__ import annotations

import ast
import base64
import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MIN_NEEDLE = 16  # shorter encodings would match by chance; every registered secret is at least 12 random bytes
MAX_PRINTED = 50
_NEEDLE_CHARS = re.compile(rf"[A-Za-z0-9+/=_\-]{{{MIN_NEEDLE},}}")
_PRIVATE_KEY_BLOCK = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
# Four dotted decimals that are not part of a longer dotted run (OIDs, versions) nor follow "Name/" (user agents).
_IPV4 = re.compile(r"(?<![0-9A-Za-z.])(?<![A-Za-z]/)(\d{1,3}(?:\.\d{1,3}){3})(?![0-9A-Za-z]|\.\d)")
_IPV6 = re.compile(r"(?<![0-9A-Za-z:.])((?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4}))"
                   r"(?![0-9A-Za-z:])")
# A Python bytes literal (what a repr or an f"{value!r}" of bytes prints): decoded and matched by its hex.
_BYTES_LITERAL = re.compile(r"b'(?:[^'\\]|\\.){8,}'" + r'|b"(?:[^"\\]|\\.){8,}"')
DOCUMENTATION_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))


@dataclass(frozen=True)
class Finding:
    source: str
    line_number: int
    kind: str
    line: str  # redacted

    def __str__(self) -> str:
        return f"{self.source}:{self.line_number}: {self.kind}: {self.line}"


# -- encodings of secrets ---------------------------------------------------------------------------------------

def secret_forms(value: bytes | str) -> set[str]:
    """The texts a secret could appear as in a log: itself if text, else hex and (URL-safe) base64, unpadded."""
    if isinstance(value, str):
        return {value} if len(value) >= MIN_NEEDLE else set()
    forms = {value.hex(), value.hex().upper(), base64.b64encode(value).decode().rstrip("="),
             base64.urlsafe_b64encode(value).decode().rstrip("=")}
    return {f for f in forms if len(f) >= MIN_NEEDLE}


def _pem_body_lines(pem: bytes) -> set[str]:
    return {line.strip() for line in pem.decode("ascii", "replace").splitlines()
            if not line.startswith("-----") and len(line.strip()) >= MIN_NEEDLE}


def _int_bytes(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def private_key_forms(key: Any) -> set[str]:
    """What of a private key could reach a log: its PEM body lines (PKCS#8 and traditional), and its secret numbers
    (EC scalar; RSA d, p, q) in hex, base64 and decimal."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    forms: set[str] = set()
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        try:
            forms |= _pem_body_lines(key.private_bytes(serialization.Encoding.PEM, fmt,
                                                       serialization.NoEncryption()))
        except (ValueError, TypeError):  # a key type without a traditional form
            pass
    numbers: list[int] = []
    if isinstance(key, ec.EllipticCurvePrivateKey):
        value = key.private_numbers().private_value
        forms |= secret_forms(value.to_bytes((key.curve.key_size + 7) // 8, "big"))
        numbers.append(value)
    elif isinstance(key, rsa.RSAPrivateKey):
        private = key.private_numbers()
        numbers += [private.d, private.p, private.q]
        for n in numbers:
            forms |= secret_forms(_int_bytes(n))
    # Numbers as Python prints them too: decimal, and hex without the leading zero a byte string would have.
    forms |= {text for n in numbers for text in (str(n), f"{n:x}", f"{n:X}") if len(text) >= MIN_NEEDLE}
    return forms


class SecretIndex:
    """Needles indexed by their first MIN_NEEDLE characters: a line is scanned in one pass over its
    base64/hex-looking runs, however many secrets there are."""

    def __init__(self) -> None:
        self._by_prefix: dict[str, list[tuple[str, str]]] = {}
        self.needles = 0
        self.secrets = self.keys = 0  # what build_index put in, key directories' contents included

    def add(self, label: str, needles: Iterable[str]) -> None:
        for needle in needles:
            if len(needle) < MIN_NEEDLE or not _NEEDLE_CHARS.fullmatch(needle):
                continue
            bucket = self._by_prefix.setdefault(needle[:MIN_NEEDLE], [])
            if all(n != needle for n, _ in bucket):
                bucket.append((needle, label))
                self.needles += 1

    def find(self, line: str) -> list[tuple[int, int, str]]:
        """(start, end, label) of every registered needle in ``line``."""
        hits = []
        for run in _NEEDLE_CHARS.finditer(line):
            text, offset = run.group(), run.start()
            for i in range(len(text) - MIN_NEEDLE + 1):
                bucket = self._by_prefix.get(text[i:i + MIN_NEEDLE])
                if bucket:
                    for needle, label in bucket:
                        if text.startswith(needle, i):
                            hits.append((offset + i, offset + i + len(needle), label))
        return hits


# -- IP addresses -------------------------------------------------------------------------------------------------

def own_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """This host's addresses (where our test servers bind and connect from): its interfaces' and its names'."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    try:
        import psutil  # Airflow's dependency; without it the host names' addresses below still count

        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                with contextlib.suppress(ValueError):
                    found.add(ipaddress.ip_address(address.address.split("%")[0]))
    except ImportError:
        pass
    names = {socket.gethostname(), socket.getfqdn()}
    for name in names:
        try:
            for info in socket.getaddrinfo(name, None):
                found.add(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
        except (OSError, ValueError):
            continue
    return found


def ip_problem(text: str, own: set[Any]) -> str | None:
    """Why ``text`` (an IP address) must not be in a log, or None if it may be (see the module docstring)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # This host's own addresses first: a machine may itself sit in a documentation range (this one does).
    if address.is_loopback or address.is_unspecified or address in own:
        return None
    if any(address in network for network in DOCUMENTATION_NETWORKS):
        return "client IP address"
    return "IP address that is neither loopback nor this host's"


# -- the scan -----------------------------------------------------------------------------------------------------

def _redact(line: str, spans: list[tuple[int, int, str]], limit: int = 300) -> str:
    out, at = [], 0
    for start, end, label in sorted(spans):
        if start < at:
            continue
        out += [line[at:start], f"<{label} redacted>"]
        at = end
    out.append(line[at:])
    text = "".join(out)
    return text if len(text) <= limit else text[:limit] + "..."


def scan_line(line: str, index: SecretIndex, own: set[Any]) -> list[tuple[int, int, str]]:
    """Every forbidden span of one line, as (start, end, kind)."""
    spans = [(m.start(), m.end(), "private key block") for m in _PRIVATE_KEY_BLOCK.finditer(line)]
    spans += index.find(line)
    if "b'" in line or 'b"' in line:
        for m in _BYTES_LITERAL.finditer(line):
            try:
                value = ast.literal_eval(m.group())
            except (ValueError, SyntaxError):
                continue
            spans += [(m.start(), m.end(), label) for _, _, label in index.find(value.hex())]
    if any(c in line for c in ".:"):
        for pattern in (_IPV4, _IPV6):
            for m in pattern.finditer(line):
                # An IPv6 address in a log has two groups at least ("::1", "fe80::1"); "x[::2]" is a slice.
                if pattern is _IPV6 and sum(1 for g in m.group(1).split(":") if g) < 2:
                    continue
                problem = ip_problem(m.group(1), own)
                if problem:
                    spans.append((m.start(1), m.end(1), problem))
    return spans


def scan(lines: Iterable[tuple[str, str]], index: SecretIndex, own: set[Any] | None = None
         ) -> tuple[int, list[Finding]]:
    """Scan (source, text) pairs, text possibly many lines; returns (lines scanned, findings)."""
    own = own_addresses() if own is None else own
    count, findings = 0, []
    for source, text in lines:
        for number, line in enumerate(text.splitlines(), 1):
            count += 1
            spans = scan_line(line, index, own)
            if spans:
                kinds = sorted({k for _, _, k in spans})
                findings.append(Finding(source, number, ", ".join(kinds), _redact(line, spans)))
    return count, findings


# -- what tests register ----------------------------------------------------------------------------------------

@dataclass
class Registry:
    secrets: list[tuple[str, bytes | str]] = field(default_factory=list)
    keys: list[tuple[str, Any]] = field(default_factory=list)
    files: dict[Path, None] = field(default_factory=dict)
    dirs: dict[tuple[Path, str], None] = field(default_factory=dict)
    key_dirs: dict[Path, None] = field(default_factory=dict)
    texts: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


_REGISTRY = Registry()


def register_secret(value: bytes | str, label: str = "secret") -> None:
    """A secret a test used (key, AAD, HMAC secret, password): none of its encodings may be logged."""
    with _REGISTRY.lock:
        _REGISTRY.secrets.append((label, value))


def register_private_key(key: Any, label: str = "private key") -> None:
    """A private key object a test made (EC or RSA); its material is derived at session end."""
    with _REGISTRY.lock:
        _REGISTRY.keys.append((label, key))


def register_log_file(path: str | os.PathLike[str]) -> None:
    """A log file of a process a test started; read at session end (a missing file is fine)."""
    with _REGISTRY.lock:
        _REGISTRY.files[Path(path)] = None


def register_log_dir(path: str | os.PathLike[str], pattern: str = "*.log") -> None:
    """Every file matching ``pattern`` under ``path`` (recursively) at session end."""
    with _REGISTRY.lock:
        _REGISTRY.dirs[(Path(path), pattern)] = None


def register_key_dir(path: str | os.PathLike[str]) -> None:
    """A directory the code writes keys or secrets into: at session end every PEM private key, revision-token secret
    and local Airflow secret in it (recursively) is registered before the scan."""
    with _REGISTRY.lock:
        _REGISTRY.key_dirs[Path(path)] = None


def record_text(source: str, text: str) -> None:
    """Output a test read itself (a subprocess's stdout, say), scanned like a log."""
    with _REGISTRY.lock:
        _REGISTRY.texts.append((source, text))


def _harvest_key_dir(root: Path) -> Iterator[tuple[str, Any]]:
    """(label, key or secret bytes/str) for the key material in ``root``."""
    from cryptography.hazmat.primitives import serialization

    if not root.is_dir():
        return
    for path in root.rglob("*"):
        if not path.is_file() or path.stat().st_size > 1_000_000:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        label = f"key material of {path.name}"
        if b"PRIVATE KEY-----" in data:
            try:
                yield label, serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError):
                pass
        elif path.name.startswith("revision-token-"):
            try:
                yield label, base64.b64decode(data.strip(), validate=True)
            except ValueError:
                pass
        elif path.name in ("passwords.json", "secrets.json"):
            try:
                values = json.loads(data)
            except ValueError:
                continue
            for value in values.values() if isinstance(values, dict) else ():
                if isinstance(value, str):
                    yield label, value


def build_index(registry: Registry) -> SecretIndex:
    index = SecretIndex()
    with registry.lock:
        secrets, keys, key_dirs = list(registry.secrets), list(registry.keys), list(registry.key_dirs)
    for root in key_dirs:
        for label, item in _harvest_key_dir(root):
            (secrets if isinstance(item, bytes | str) else keys).append((label, item))
    for label, value in secrets:
        index.add(label, secret_forms(value))
    for label, key in keys:
        index.add(label, private_key_forms(key))
    index.secrets, index.keys = len(secrets), len(keys)
    return index


# -- the plugin -------------------------------------------------------------------------------------------------

class _SpoolHandler(logging.Handler):
    """Writes every record, formatted with its traceback, to a spool file: one JSON [source, text] per line.

    Code under test may reconfigure logging (Airflow's dictConfig, logging.shutdown) and so "close" every handler;
    that only flushes here, the spool stays open until the plugin finishes, and the plugin puts the handler back."""

    def __init__(self, path: Path, current: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self._file = path.open("w", encoding="utf-8", errors="replace")
        self._current = current
        self.records = 0
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception as exc:  # a record that cannot be formatted still gets its raw parts scanned
            text = f"{record.name}: unformattable record ({type(exc).__name__}): {record.msg!r} {record.args!r}"
        try:
            self._file.write(json.dumps([f"log {record.name} during {self._current[0]}", text]) + "\n")
        except ValueError:  # the spool is closed: the session is over; never fail the code that logged
            return
        self.records += 1

    def flush(self) -> None:
        with contextlib.suppress(ValueError):
            self._file.flush()

    def close(self) -> None:
        self.flush()
        super().close()

    def finish(self) -> None:
        self._file.close()


class _AsBefore(logging.Filter):
    """Passes what pytest's own log capture passed before the root logger went to DEBUG: a record at or above its
    logger's effective level as it was (explicit levels of loggers, else the root's old level). So a failing test's
    "Captured log" section is not flooded with every library's debug output."""

    def __init__(self, root_level: int) -> None:
        super().__init__()
        self.root_level = root_level

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger.parent is not None:   # the root is the one without a parent
            if logger.level:
                return record.levelno >= logger.level
            logger = logger.parent
        return record.levelno >= self.root_level


class LogScan:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.current = ["session start"]
        fd, spool = tempfile.mkstemp(prefix="enp-logscan-", suffix=".jsonl")
        os.close(fd)
        self.spool = Path(spool)
        self.handler = _SpoolHandler(self.spool, self.current)
        self.root_level = logging.getLogger().level
        self.sections: list[tuple[str, str]] = []
        self.lines = 0
        self.sources: Counter[str] = Counter()
        self.findings: list[Finding] = []
        self.index = SecretIndex()
        self.seconds = 0.0
        self.done = False

    def install(self) -> None:
        root = logging.getLogger()
        if self.handler not in root.handlers:
            root.addHandler(self.handler)
        if root.level > logging.DEBUG or root.level == logging.NOTSET:
            root.setLevel(logging.DEBUG)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.install()
        capture = self.config.pluginmanager.get_plugin("logging-plugin")
        for name in ("report_handler", "log_cli_handler"):
            handler = getattr(capture, name, None)
            if isinstance(handler, logging.Handler):
                handler.addFilter(_AsBefore(self.root_level or logging.WARNING))

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.current[0] = item.nodeid
        self.install()  # a test or library may have reconfigured logging (Airflow's dictConfig does)

    def pytest_runtest_call(self, item: pytest.Item) -> None:
        self.install()  # again: fixtures may have imported Airflow, which configures logging on import

    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        self.install()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Each phase's report repeats the sections of the phases before it: take only this phase's own.
        for title, content in report.sections:
            if title.endswith(f" {report.when}") and content:
                self.sections.append((f"{report.nodeid} [{title}]", content))

    def _collect(self) -> Iterator[tuple[str, str]]:
        self.handler.flush()
        with self.spool.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                source, text = json.loads(line)
                self.sources["logging records"] += 1
                yield source, text
        for source, text in self.sections:
            self.sources["captured sections"] += 1
            yield source, text
        for source, text in _REGISTRY.texts:
            self.sources["recorded outputs"] += 1
            yield source, text
        files = dict(_REGISTRY.files)
        for root, pattern in _REGISTRY.dirs:
            if root.is_dir():
                files.update(dict.fromkeys(p for p in root.rglob(pattern) if p.is_file()))
        for path in sorted(files):
            if path.is_file():
                self.sources["log files"] += 1
                yield str(path), path.read_text(encoding="utf-8", errors="replace")

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self.root_level)
        self.handler.finish()
        started = time.perf_counter()
        try:
            self.index = build_index(_REGISTRY)
            self.lines, self.findings = scan(self._collect(), self.index)
        finally:
            self.spool.unlink(missing_ok=True)
        self.seconds = time.perf_counter() - started
        self.done = True
        if self.findings and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.done:
            return
        tr = terminalreporter
        tr.write_sep("-", "log scan")
        sources = ", ".join(f"{n} {what}" for what, n in sorted(self.sources.items())) or "nothing"
        tr.write_line(f"log scan: {self.lines} lines from {sources}; looked for {self.index.keys} private keys and "
                      f"{self.index.secrets} secrets ({self.index.needles} encodings; {len(_REGISTRY.key_dirs)} "
                      f"key directories read), client and foreign IP addresses, in {self.seconds:.1f}s; "
                      f"{len(self.findings)} finding(s)")
        for finding in self.findings[:MAX_PRINTED]:
            tr.write_line(f"  {finding}", red=True)
        if len(self.findings) > MAX_PRINTED:
            tr.write_line(f"  ... and {len(self.findings) - MAX_PRINTED} more", red=True)
        if self.findings:
            tr.write_line("log scan FAILED: secrets or client addresses in the logs (see above)", red=True, bold=True)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(LogScan(config), "enp-logscan")
