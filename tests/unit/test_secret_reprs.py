"""Secrets never appear in a repr, a str or an error message: revision-key holders, publish requests and results,
key objects, and the errors raised on bad key material. Each text is checked with the session log scan's own
matcher (tests/logscan.py), so every encoding of every secret counts (hex, base64, a bytes repr, PEM lines, scalars).

Settings (repr, str, configuration errors) are covered by tests/unit/test_config.py::test_secrets_absent_from_repr
and ::test_secrets_absent_from_config_errors.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enpipeline.revision import InMemoryRevisionKeyStore, KeyWrapper, RevisionTokenCodec
from tests import logscan

KEK, AAD = os.urandom(32), os.urandom(16)


def assert_clean(text: str, *, secrets: tuple[bytes | str, ...] = (), keys: tuple = ()) -> None:
    index = logscan.SecretIndex()
    for value in (KEK, AAD, *secrets):
        index.add("secret", logscan.secret_forms(value))
    for key in keys:
        index.add("private key", logscan.private_key_forms(key))
    lines, findings = logscan.scan([("text", text)], index, set())
    assert lines > 0 and findings == [], [str(f) for f in findings]


def test_revision_key_holders():
    store = InMemoryRevisionKeyStore()
    wrapper = KeyWrapper(KEK)
    codec = RevisionTokenCodec(store, wrapper, AAD)
    from enpipeline.model import RevisableKey

    token = codec.encrypt([RevisableKey(os.urandom(16), 2_900_000, 144)], datetime.now(UTC))
    snapshot = codec._snapshot()  # the cached, unwrapped data keys
    deks = tuple(snapshot.deks.values())
    assert deks
    assert_clean(" ".join([repr(wrapper), str(wrapper), repr(codec), str(codec), repr(snapshot)]), secrets=deks)
    # Errors opening tokens and keys name the failure, never a key.
    from enpipeline.errors import RevisionTokenError

    messages = []
    for bad in (base64.b64decode(token)[:-1], os.urandom(40)):
        with pytest.raises(RevisionTokenError) as caught:
            codec.decrypt(bad)
        messages.append(str(caught.value))
    with pytest.raises(RevisionTokenError) as caught:
        KeyWrapper(os.urandom(32)).unwrap(store.list_allowed()[0].wrapped_cipher, store.list_allowed()[0].aad)
    messages.append(str(caught.value))
    with pytest.raises(ValueError) as wrong_size:
        KeyWrapper(KEK[:16])
    messages.append(str(wrong_size.value))
    assert_clean("\n".join(messages), secrets=deks)


def test_publish_request_and_result_hide_the_credentials():
    from enpipeline.model import PublishResult
    from enpipeline.publish.wire import decode_publish
    from tests import support

    key = support.new_signing_key()
    now = support.fixed_now()
    secret = os.urandom(16)
    body = support.publish_body(support.day_keys(now, 3), support.Certificate(key=key), now, hmac_secret=secret,
                                revision_token=base64.b64encode(os.urandom(64)).decode())
    request = decode_publish(json.dumps(body).encode(), 64_000)
    result = PublishResult(inserted=3, revision_token=body["revisionToken"])
    text = f"{request!r} {request} {result!r}"
    signature = body["verificationPayload"].rsplit(".", 1)[1]
    assert_clean(text, secrets=(secret, base64.b64decode(body["revisionToken"]), signature,
                                body["verificationPayload"]), keys=(key,))
    assert "health_authority_id='com.example.test'" in text and "inserted=3" in text


def test_key_objects_and_their_errors():
    from enpipeline.efgs import targets
    from enpipeline.export.signing import FileSigner
    from enpipeline.federation.credentials import CredentialsError, parse_private_key
    from tests.support_efgs import Country, Pki, key_pem, pem

    ec_key = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    pki = Pki.create()
    de = Country.create("DE", pki)
    files = targets.TargetFiles(pem(de.auth_cert), key_pem(de.auth_key), pem(de.signing_cert),
                                key_pem(de.signing_key), pem(pki.cert))
    signer = targets.Signer(de.signing_cert, de.signing_key)
    texts = [repr(FileSigner("file:us-v1", ec_key)), repr(files), str(files), repr(signer)]
    # Key material handed in the wrong shape: the errors say what is wrong with it, not what it is.
    pem_p384 = p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    for bad in (pem_p384, pem_p384[:-40], b"not a key at all " + os.urandom(16).hex().encode()):
        with pytest.raises(CredentialsError) as caught:
            parse_private_key(bad, "--key")
        texts.append(str(caught.value))
    swapped = targets.TargetFiles(pem(de.auth_cert), key_pem(de.signing_key), pem(de.signing_cert),
                                  key_pem(de.auth_key)[:-30], pem(pki.cert))
    with pytest.raises(targets.TargetError) as caught:
        targets.check_target("eu", "https://efgs.example", "DE", swapped, datetime.now(UTC))
    texts.append(str(caught.value))
    assert_clean("\n".join(texts), keys=(ec_key, p384, de.auth_key, de.signing_key))
    assert "client_key" not in repr(files) and "signing_key" not in repr(files)
