"""The ES256 private keys our puller signs its bearer tokens with: PEM files under ENP_KEY_DIR, never in the DB.

They are kept like the filesystem export signing keys (``<key_dir>/<name>.pem``, mode 0600, directory 0700, key
reference ``file:<name>``), so the database row holds only the reference and a backup of the database leaks no
key. They stay on the filesystem whatever ENP_KEY_MANAGER says: a KMS key cannot hand out its private half, and
the token library signs with a PEM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enpipeline.export.signing import FILE_REF_PREFIX

log = logging.getLogger(__name__)
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class CredentialsError(Exception):
    """A credentials key cannot be read, parsed or stored; the message says which and why, in one line."""


def credentials_name(query_id: str) -> str:
    """The file name (without .pem) of a query's key: prefixed so it never collides with an export signing key."""
    return f"federation-in-{query_id}"


def parse_private_key(pem: bytes, what: str) -> bytes:
    """The key as unencrypted PKCS#8 PEM, after checking it is an EC P-256 private key (what ES256 needs)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise CredentialsError(f"{what} is encrypted; give an unencrypted PEM private key") from None
    except ValueError:
        raise CredentialsError(f"{what} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CredentialsError(f"{what} must be an ECDSA P-256 private key (ES256)")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _path(key_dir: Path, name: str) -> Path:
    # The export key manager's naming rule: no path separators, no hidden or option-like names.
    if not _NAME_RE.fullmatch(name):
        raise CredentialsError(f"invalid credentials name {name!r}: use 1-128 of [A-Za-z0-9_.-], not starting "
                               "with '.' or '-'")
    return Path(key_dir) / f"{name}.pem"


def store_credentials(key_dir: Path, name: str, pem: bytes) -> str:
    """Write ``pem`` (checked, normalised to PKCS#8) as ``<key_dir>/<name>.pem`` with mode 0600; returns its ref.

    Replaces an older file of that name atomically: callers check first that no configured query uses it.
    """
    return write_key_file(key_dir, name, parse_private_key(pem, "the credentials key"))


def write_key_file(key_dir: Path, name: str, data: bytes) -> str:
    """Write ``data`` (private key material, already checked) as ``<key_dir>/<name>.pem``, mode 0600, atomically;
    returns its ``file:<name>`` reference. EFGS credentials (RSA or EC, with a certificate) are stored this way."""
    path = _path(key_dir, name)
    root = path.parent
    if not root.is_dir():
        root.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)  # mkdir's mode is subject to the umask
    tmp = root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    log.info("stored federation credentials %s in %s", name, root)
    return FILE_REF_PREFIX + name


def key_file_path(key_dir: Path, ref: str) -> Path:
    """The file behind a ``file:<name>`` reference (which need not exist)."""
    if not ref.startswith(FILE_REF_PREFIX):
        raise CredentialsError(f"credentials {ref!r} is not a filesystem key reference (file:<name>)")
    return _path(key_dir, ref[len(FILE_REF_PREFIX):])


def load_credentials(key_dir: Path, ref: str) -> bytes:
    """The PEM private key behind a ``file:<name>`` reference."""
    if not ref.startswith(FILE_REF_PREFIX):
        raise CredentialsError(f"credentials {ref!r} is not a filesystem key reference (file:<name>)")
    path = _path(key_dir, ref[len(FILE_REF_PREFIX):])
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except FileNotFoundError:
        raise CredentialsError(f"credentials {ref!r} not found in {path.parent}") from None
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials {ref!r}: {exc.strerror}") from None
    if mode & 0o077:
        log.warning("credentials file %s is readable by group/others (mode %o)", path, mode)
    return parse_private_key(data, f"credentials {ref!r}")


def remove_credentials(key_dir: Path, ref: str) -> bool:
    """Delete our copy of a removed query's key; False when there was none (or the ref is not ours)."""
    if not ref.startswith(FILE_REF_PREFIX):
        return False
    try:
        _path(key_dir, ref[len(FILE_REF_PREFIX):]).unlink()
    except (FileNotFoundError, CredentialsError):
        return False
    return True
