"""Shared test helpers: certificates signed like a verification server's, publish bodies, seeding."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import Engine

from enpipeline.model import ExposureKeyInput
from enpipeline.timeutil import interval_number, truncate
from enpipeline.verification import compute_tekmacs
from tests import logscan

ISSUER = "test-ha"
AUDIENCE = "enpipeline-test"
APP_ID = "com.example.test"
KID = "v1"


def new_signing_key() -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    logscan.register_private_key(key, "test signing key")  # the session's log scan looks for it
    return key


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def random_key_b64() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def day_keys(now: datetime, days: int = 14, *, tr: int = 0, first_day_back: int = 1) -> list[ExposureKeyInput]:
    """One full-day key per past UTC day, newest first: what a phone uploads after a positive test."""
    today = interval_number(truncate(now, timedelta(days=1)))
    return [ExposureKeyInput(random_key_b64(), today - 144 * d, 144, tr)
            for d in range(first_day_back, first_day_back + days)]


@dataclass
class Certificate:
    """Claims of a verification certificate; ``sign`` makes the JWT."""

    key: ec.EllipticCurvePrivateKey
    issuer: str = ISSUER
    audience: Any = AUDIENCE
    kid: Any = KID
    report_type: str | None = "confirmed"
    symptom_onset_interval: int | None = None
    iat_offset: int = -1
    exp_offset: int | None = 300
    extra: dict[str, Any] = field(default_factory=dict)

    def sign(self, keys: list[ExposureKeyInput], hmac_secret: bytes, now: datetime) -> str:
        tekmac = base64.b64encode(compute_tekmacs(keys, hmac_secret)[0]).decode() if keys else ""
        claims: dict[str, Any] = {"iss": self.issuer, "aud": self.audience,
                                  "iat": int(now.timestamp()) + self.iat_offset, "tekmac": tekmac}
        if self.exp_offset is not None:
            claims["exp"] = int(now.timestamp()) + self.exp_offset
        if self.report_type is not None:
            claims["reportType"] = self.report_type
        if self.symptom_onset_interval is not None:
            claims["symptomOnsetInterval"] = self.symptom_onset_interval
        claims.update(self.extra)
        headers = {"kid": self.kid} if self.kid is not None else {}
        return jwt.encode(claims, self.key, algorithm="ES256", headers=headers)


def publish_body(keys: list[ExposureKeyInput], cert: Certificate | None, now: datetime, *,
                 app_id: str = APP_ID, revision_token: str = "", traveler: bool = False,
                 symptom_onset_interval: int | None = None, hmac_secret: bytes | None = None) -> dict[str, Any]:
    """A v1 publish body exactly as an app built for the reference server sends it."""
    hmac_secret = hmac_secret or os.urandom(16)
    logscan.register_secret(hmac_secret, "phone HMAC secret")
    body: dict[str, Any] = {
        "temporaryExposureKeys": [
            {"key": k.key, "rollingStartNumber": k.rolling_start_number, "rollingPeriod": k.rolling_period,
             **({"transmissionRisk": k.transmission_risk} if k.transmission_risk else {})}
            for k in keys
        ],
        "healthAuthorityID": app_id,
        "verificationPayload": cert.sign(keys, hmac_secret, now) if cert else "",
        "hmacKey": base64.b64encode(hmac_secret).decode(),
        "padding": base64.b64encode(os.urandom(64)).decode(),
    }
    if revision_token:
        body["revisionToken"] = revision_token
    if traveler:
        body["traveler"] = True
    if symptom_onset_interval is not None:
        body["symptomOnsetInterval"] = symptom_onset_interval
    return body


def fixed_now() -> datetime:
    """A stable 'now' in the middle of a UTC day, so day arithmetic in tests is predictable."""
    today = truncate(datetime.now(UTC), timedelta(days=1))
    return today + timedelta(hours=12, minutes=7, seconds=13)


@contextmanager
def exposure_insert_trigger(engine: Engine, name: str, plpgsql: str) -> Iterator[None]:
    """A real database fault on every exposure insert: a BEFORE INSERT trigger running ``plpgsql`` (a function
    body, e.g. ``RAISE EXCEPTION 'injected failure';``), dropped again afterwards."""
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql"
                             f" AS $$ BEGIN {plpgsql} END $$"))
        conn.execute(sa.text(f"CREATE TRIGGER {name} BEFORE INSERT ON exposure FOR EACH ROW EXECUTE FUNCTION {name}()"))
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TRIGGER IF EXISTS {name} ON exposure"))
            conn.execute(sa.text(f"DROP FUNCTION IF EXISTS {name}()"))


def inline_refs(node: Any, spec: dict) -> Any:
    """``node`` of an OpenAPI document with every local ``$ref`` replaced by what it points to."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return inline_refs(target, spec)
        return {k: inline_refs(v, spec) for k, v in node.items()}
    if isinstance(node, list):
        return [inline_refs(v, spec) for v in node]
    return node


def seed_app(engine: Engine, key: ec.EllipticCurvePrivateKey) -> int:
    """One health authority (ISSUER/AUDIENCE) with ``key`` active as KID, and the app APP_ID (region US) that
    trusts it; returns the authority's id."""
    from enpipeline.db import apps, authorities
    from enpipeline.model import AuthorizedApp

    with engine.begin() as conn:
        ha_id = authorities.add_authority(conn, issuer=ISSUER, audience=AUDIENCE, name="Test HA")
        authorities.add_key(conn, ha_id, version=KID, public_key_pem=public_pem(key),
                            from_timestamp=datetime(2020, 1, 1, tzinfo=UTC))
        apps.upsert_app(conn, AuthorizedApp(app_package_name=APP_ID, allowed_regions=("US",),
                                            allowed_health_authority_ids=(ha_id,)))
    return ha_id
