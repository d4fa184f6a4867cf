"""Federation authentication: partners present an ES256 bearer JWT signed with a key registered for them."""

from __future__ import annotations

from datetime import datetime, timedelta

import jwt


def mint_token(private_key_pem: str | bytes, *, issuer: str, subject: str, audience: str, now: datetime,
               lifetime: timedelta) -> str:
    """The bearer token a puller sends: ES256, with iss/sub/aud and a short exp."""
    issued = int(now.timestamp())
    claims = {"iss": issuer, "sub": subject, "aud": audience, "iat": issued,
              "nbf": issued, "exp": issued + int(lifetime.total_seconds())}
    return jwt.encode(claims, private_key_pem, algorithm="ES256")
