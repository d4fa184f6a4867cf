"""The v1 publish wire format: decode a request body like Go's encoding/json, encode the response."""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from enpipeline.model import ExposureKeyInput, PublishRequest

JSON_CONTENT_TYPE = "application/json"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class WireError(Exception):
    """A request the decoder refuses; ``status`` is 400, 413, 415 or 500 as in the reference."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Field:
    attr: str
    kind: str  # "str" | "int32" | "bool" | "keys"


# JSON name -> (attribute, type). Names match case-insensitively, exact match first (Go rules).
_PUBLISH_FIELDS = {
    "temporaryExposureKeys": _Field("keys", "keys"),
    "healthAuthorityID": _Field("health_authority_id", "str"),
    "verificationPayload": _Field("verification_payload", "str"),
    "hmacKey": _Field("hmac_key", "str"),
    "symptomOnsetInterval": _Field("symptom_onset_interval", "int32"),
    "traveler": _Field("traveler", "bool"),
    "revisionToken": _Field("revision_token", "str"),
    "padding": _Field("padding", "str"),
}
_KEY_FIELDS = {
    "key": _Field("key", "str"),
    "rollingStartNumber": _Field("rolling_start_number", "int32"),
    "rollingPeriod": _Field("rolling_period", "int32"),
    "transmissionRisk": _Field("transmission_risk", "int32"),
}


def check_content_type(content_type: str | None) -> None:
    # The reference compares the first 16 characters case-sensitively.
    if not content_type or not content_type.startswith(JSON_CONTENT_TYPE):
        raise WireError(415, "content-type is not application/json")


def _resolve(name: str, fields: dict[str, _Field]) -> _Field | None:
    if name in fields:
        return fields[name]
    folded = name.casefold()
    for candidate, f in fields.items():
        if candidate.casefold() == folded:
            return f
    return None


def _convert(value: Any, f: _Field, path: str) -> Any:
    if value is None:  # Go leaves the zero value for null
        return None
    if f.kind == "str" and isinstance(value, str):
        return value
    if f.kind == "bool" and isinstance(value, bool):
        return value
    if f.kind == "int32" and isinstance(value, int) and not isinstance(value, bool) and INT32_MIN <= value <= INT32_MAX:
        return value
    if f.kind == "keys" and isinstance(value, list):
        return tuple(_decode_object(item, _KEY_FIELDS, ExposureKeyInput, path) for item in value)
    raise WireError(400, f'invalid value "{path}"')


def _decode_object(obj: Any, fields: dict[str, _Field], factory: Callable[..., Any], path: str) -> Any:
    if not isinstance(obj, dict):
        raise WireError(400, f'invalid value "{path}"')
    values: dict[str, Any] = {}
    for name, value in obj.items():
        f = _resolve(name, fields)
        if f is None:
            raise WireError(400, f'unknown field "{name}"')
        json_name = next(k for k, v in fields.items() if v is f)
        converted = _convert(value, f, f"{path}.{json_name}" if path else json_name)
        if converted is not None:
            values[f.attr] = converted
    return factory(**values)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)  # later duplicates win, as in Go


def decode_publish(body: bytes, max_bytes: int) -> PublishRequest:
    """Decode a v1 publish body, with the reference's messages for each failure."""
    if len(body) > max_bytes:
        raise WireError(413, "http: request body too large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(400, f"malformed json at position {exc.start}") from None
    if not text.strip():
        raise WireError(400, "body must not be empty")
    decoder = json.JSONDecoder(object_pairs_hook=_pairs)
    start = len(text) - len(text.lstrip())
    try:
        obj, end = decoder.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            raise WireError(400, "malformed json") from None
        raise WireError(400, f"malformed json at position {exc.pos + 1}") from None
    rest = text[end:].strip()
    if rest and rest[0] not in "]}":
        raise WireError(400, "body must contain only one JSON object")
    return _decode_object(obj, _PUBLISH_FIELDS, PublishRequest, "")


def random_padding(min_bytes: int, spread: int) -> str:
    """Base64 of min_bytes + uniform[0, spread) random bytes, so sizes do not reveal content."""
    size = min_bytes + (random.randrange(spread) if spread > 0 else 0)
    return base64.b64encode(os.urandom(size)).decode()


def publish_response(*, revision_token: str = "", inserted: int = 0, error: str = "", code: str = "",
                     padding: str = "", warnings: list[str] | None = None) -> dict[str, Any]:
    """The v1 PublishResponse with Go's omitempty semantics and field order."""
    out: dict[str, Any] = {}
    if revision_token:
        out["revisionToken"] = revision_token
    if inserted:
        out["insertedExposures"] = inserted
    if error:
        out["error"] = error
    if code:
        out["code"] = code
    if padding:
        out["padding"] = padding
    if warnings:
        out["warnings"] = list(warnings)
    return out
