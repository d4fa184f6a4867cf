"""Every file the code writes private keys or secrets into is mode 0600 (its directory 0700) whatever the umask:
each writer runs here under umask 000, where anything left to the defaults would come out world-readable."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enpipeline.config import Settings, with_local_secrets
from tests import logscan, support


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_000() -> Iterator[None]:
    """The most permissive umask: files get exactly the mode the code asked for, or 0666/0777 if it asked for none."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_export_signing_keys(umask_000, tmp_path):
    from enpipeline.export.signing import FilesystemKeyManager

    root = tmp_path / "var" / "keys"
    FilesystemKeyManager(root).create_signing_key("us-v1")
    assert (mode(root), mode(root / "us-v1.pem")) == (0o700, 0o600)
    assert [p.name for p in root.iterdir()] == ["us-v1.pem"]   # no temporary file left behind


def test_federation_credentials_even_over_a_lax_older_file(umask_000, tmp_path):
    from enpipeline.federation.credentials import store_credentials

    root = tmp_path / "keys"
    store_credentials(root, "partner-a", _pem(support.new_signing_key()))
    assert (mode(root), mode(root / "partner-a.pem")) == (0o700, 0o600)
    (root / "partner-a.pem").chmod(0o644)                     # an operator's copy, say
    store_credentials(root, "partner-a", _pem(support.new_signing_key()))
    assert mode(root / "partner-a.pem") == 0o600


def test_efgs_target_keys(umask_000, tmp_path):
    from enpipeline.efgs import targets
    from tests.support_efgs import Country, Pki, key_pem, pem

    pki = Pki.create()
    de = Country.create("DE", pki)
    files = targets.TargetFiles(pem(de.auth_cert), key_pem(de.auth_key), pem(de.signing_cert),
                                key_pem(de.signing_key), pem(pki.cert), pem(pki.cert))
    target = targets.check_target("eu", "https://efgs.example", "DE", files, datetime.now(UTC))
    root = tmp_path / "keys"
    tls, signing = targets.store_target_keys(root, target, files)
    assert mode(root) == 0o700
    assert {mode(targets.key_file_path(root, ref)) for ref in (tls, signing)} == {0o600}


def test_local_revision_token_secrets(umask_000, tmp_path):
    var = tmp_path / "var"
    settings = with_local_secrets(Settings(var_dir=var))
    secrets = var / "secrets"
    assert mode(secrets) == 0o700
    assert {p.name: mode(p) for p in secrets.iterdir()} == {"revision-token-kek": 0o600, "revision-token-aad": 0o600}
    assert base64.b64decode((secrets / "revision-token-kek").read_text()) == settings.revision_token_kek


def test_local_revision_token_secret_is_0600_even_over_a_stale_temporary_file(umask_000, tmp_path):
    """A crash between creating the temporary file and linking it leaves the file behind; the next start must
    not take over its mode."""
    secrets = tmp_path / "var" / "secrets"
    secrets.mkdir(parents=True, mode=0o700)
    stale = secrets / f".revision-token-kek.{os.getpid()}"
    stale.write_text("stale")
    stale.chmod(0o666)
    with_local_secrets(Settings(var_dir=tmp_path / "var"))
    assert mode(secrets / "revision-token-kek") == 0o600
    assert not stale.exists()


def test_local_stack_demo_key_and_env_file(umask_000, tmp_path, engine, settings):
    from enpipeline import local

    var = tmp_path / "var"
    logscan.register_key_dir(var)  # the demo and export keys made here are looked for in the session's logs
    local._seed_demo(settings.replace(var_dir=var, key_dir=var / "keys"), var)
    demo = var / "demo"
    assert (mode(demo), mode(demo / "verification-key.pem")) == (0o700, 0o600)
    assert mode(demo / "verification-key.pub.pem") == 0o644  # public, but nobody else may swap it
    assert (mode(var / "keys"), mode(var / "keys" / "demo-us-v1.pem")) == (0o700, 0o600)  # the export signing key
    local.write_env_file(var, "postgresql://enp:s3cret-password@db.internal:5432/enp")
    assert mode(var / "enp.env") == 0o600                     # the URL may carry the database password
    (var / "enp.env").chmod(0o644)
    local.write_env_file(var, "postgresql://enp:s3cret-password@db.internal:5432/enp")
    assert mode(var / "enp.env") == 0o600


def test_local_airflow_password_secrets_and_env_file(umask_000, tmp_path):
    from enpipeline import local_airflow as af

    var = tmp_path / "var"
    values = af.settings(var, port=18081, worker_log_port=18793, trigger_log_port=18794,
                         database_url="postgresql://postgres@127.0.0.1:5432/enp",
                         meta_url="postgresql://postgres@127.0.0.1:5432/enp_airflow")
    paths = af.AirflowPaths.of(var)
    af.admin_password(paths)
    af.write_env_file(paths, values)
    assert mode(paths.home) == 0o700
    assert {p.name: mode(p) for p in (paths.passwords, paths.secrets, paths.env_file)} == {
        "passwords.json": 0o600, "secrets.json": 0o600, "airflow.env": 0o600}


def test_the_revision_keys_never_touch_the_filesystem(tmp_path, engine, settings):
    """Revision data keys live only wrapped in the database; nothing is written next to the var dir."""
    import sqlalchemy as sa

    from enpipeline.db.revision_keys import PgRevisionKeyStore
    from enpipeline.revision import KeyWrapper, create_key

    before = set(Path(settings.var_dir).rglob("*"))
    create_key(PgRevisionKeyStore(engine), KeyWrapper(settings.revision_token_kek), datetime.now(UTC))
    assert set(Path(settings.var_dir).rglob("*")) == before
    with engine.connect() as conn:
        wrapped = conn.execute(sa.text("SELECT wrapped_cipher FROM revision_key")).scalar_one()
    assert len(bytes(wrapped)) == 12 + 32 + 16   # nonce, DEK, tag: sealed, never the bare 32 bytes
