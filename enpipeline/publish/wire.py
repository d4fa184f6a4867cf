"""The v1 publish wire format: decode a request body like Go's encoding/json, encode the response."""

from __future__ import annotations

import base64
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from enpipeline.model import ExposureKeyInput, PublishRequest

JSON_CONTENT_TYPE = "application/json"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class WireError(Exception):
    """A request the decoder refuses; ``status`` is 400, 413, 415 or 500 as in the reference."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Field:
    attr: str
    kind: str  # "str" | "int32" | "int64" | "bool" | "keys"


# JSON name -> (attribute, type), as the Go structs declare them (pkg/api/v1): `transmissionRisk` is a Go
# `int` (64-bit), the interval numbers are int32.
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
    "transmissionRisk": _Field("transmission_risk", "int64"),
}
_INT_RANGES = {"int32": (INT32_MIN, INT32_MAX), "int64": (INT64_MIN, INT64_MAX)}


def check_content_type(content_type: str | None) -> None:
    # The reference compares the first 16 characters case-sensitively.
    if not content_type or not content_type.startswith(JSON_CONTENT_TYPE):
        raise WireError(415, "content-type is not application/json")


# --- JSON syntax, scanned like Go's encoding/json Decoder ---------------------------------------------
#
# Python's json module differs from Go's in ways a client can see: it accepts NaN/Infinity, reports
# character (not byte) offsets, cannot tell a truncated body from a malformed one, and overflows the C
# stack on deeply nested arrays. So the body is scanned here with Go's grammar and error offsets
# (SyntaxError.Offset = bytes read including the offending one; EOF inside the value = "malformed json").

_WS = b" \t\r\n"
_MAX_NESTING_DEPTH = 10000  # Go's scanner limit
_SKIP_WS = re.compile(rb"[ \t\r\n]*")
_STRING_BODY = re.compile(rb'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_DIGITS = re.compile(rb"[0-9]*")
_HEX = b"0123456789abcdefABCDEF"
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Obj(list):
    """A JSON object as its (name, value) pairs in document order (Go handles duplicates in order)."""


class _Num(str):
    """A JSON number literal, kept as text so that ``1.0`` and ``1e2`` are not integers (as in Go)."""


class _Syntax(Exception):
    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


class _Eof(Exception):
    pass


def _ws(data: bytes, i: int) -> int:
    return _SKIP_WS.match(data, i).end()  # type: ignore[union-attr]


def _scan_string(data: bytes, i: int, bad_utf8: list[int]) -> tuple[str, int]:
    """The string literal starting at data[i] == '"'; returns its value and the index after it."""
    end = _STRING_BODY.match(data, i + 1).end()  # type: ignore[union-attr]
    if end >= len(data):
        raise _Eof
    c = data[end]
    if c == 0x5C:  # a backslash the pattern refused: bad escape
        if end + 1 >= len(data):
            raise _Eof
        if data[end + 1] != 0x75:  # not \u
            raise _Syntax(end + 1)
        for p in range(end + 2, end + 6):
            if p >= len(data):
                raise _Eof
            if data[p] not in _HEX:
                raise _Syntax(p)
    if c != 0x22:
        raise _Syntax(end)  # a control character inside the string
    raw = data[i:end + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Go would substitute U+FFFD; we refuse (reported after the syntax check, see decode_publish).
        bad_utf8.append(i + exc.start)
        return "", end + 1
    value = json.loads(text) if "\\" in text else text[1:-1]
    if _SURROGATE.search(value):
        # Unpaired \ud800-style escapes become U+FFFD, as Go's unquote does.
        value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return value, end + 1


def _scan_number(data: bytes, i: int) -> tuple[_Num, int]:
    n = len(data)
    j = i
    if data[j] == 0x2D:  # -
        j += 1
        if j >= n:
            raise _Eof
        if not 0x30 <= data[j] <= 0x39:
            raise _Syntax(j)
    j = j + 1 if data[j] == 0x30 else _DIGITS.match(data, j).end()  # type: ignore[union-attr]
    if j < n and data[j] == 0x2E:  # .
        j = _required_digits(data, j + 1)
    if j < n and data[j] in b"eE":
        j += 1
        if j < n and data[j] in b"+-":
            j += 1
        j = _required_digits(data, j)
    return _Num(data[i:j].decode("ascii")), j


def _required_digits(data: bytes, j: int) -> int:
    """End of the run of one or more digits at data[j] (a fraction or an exponent)."""
    if j >= len(data):
        raise _Eof
    if not 0x30 <= data[j] <= 0x39:
        raise _Syntax(j)
    return _DIGITS.match(data, j).end()  # type: ignore[union-attr]


_LITERALS = {0x74: (b"true", True), 0x66: (b"false", False), 0x6E: (b"null", None)}


def _scan_literal(data: bytes, i: int) -> tuple[Any, int]:
    word, value = _LITERALS[data[i]]
    for k in range(1, len(word)):
        if i + k >= len(data):
            raise _Eof
        if data[i + k] != word[k]:
            raise _Syntax(i + k)
    return value, i + len(word)


def _scan_key(data: bytes, i: int, bad_utf8: list[int]) -> tuple[str, int]:
    """An object member name and its ':' (whitespace before ``i`` already skipped)."""
    if i >= len(data):
        raise _Eof
    if data[i] != 0x22:
        raise _Syntax(i)
    name, i = _scan_string(data, i, bad_utf8)
    i = _ws(data, i)
    if i >= len(data):
        raise _Eof
    if data[i] != 0x3A:
        raise _Syntax(i)
    return name, _ws(data, i + 1)


def _scan_value(data: bytes, i: int, bad_utf8: list[int]) -> tuple[Any, int]:
    """The JSON value starting at data[i] (no recursion, so nesting depth cannot crash us).

    Object members are stored as (name, value, offset) and array elements as (value, offset), where
    offset is what Go reports in an UnmarshalTypeError for that value: the end of a literal, or just
    past the opening bracket of an object or array.
    """
    n = len(data)
    stack: list[list[Any]] = []  # [container, pending member name, offset of the container]
    while True:
        if i >= n:
            raise _Eof
        c = data[i]
        value: Any
        if c in (0x7B, 0x5B):  # { [
            if len(stack) >= _MAX_NESTING_DEPTH:
                raise _Syntax(i)
            offset = i + 1
            i = _ws(data, i + 1)
            if i >= n:
                raise _Eof
            if c == 0x7B:
                if data[i] != 0x7D:
                    name, i = _scan_key(data, i, bad_utf8)
                    stack.append([_Obj(), name, offset])
                    continue
                value = _Obj()
            else:
                if data[i] != 0x5D:
                    stack.append([[], None, offset])
                    continue
                value = []
            i += 1
        elif c == 0x22:
            value, i = _scan_string(data, i, bad_utf8)
            offset = i
        elif c == 0x2D or 0x30 <= c <= 0x39:
            value, i = _scan_number(data, i)
            offset = i
        elif c in _LITERALS:
            value, i = _scan_literal(data, i)
            offset = i
        else:
            raise _Syntax(i)
        # A value is complete: store it in its container and close finished containers.
        while stack:
            container, name, container_offset = stack[-1]
            container.append((name, value, offset) if isinstance(container, _Obj) else (value, offset))
            i = _ws(data, i)
            if i >= n:
                raise _Eof
            c = data[i]
            if c == 0x2C:  # ,
                i = _ws(data, i + 1)
                if isinstance(container, _Obj):
                    stack[-1][1], i = _scan_key(data, i, bad_utf8)
                break
            if c != (0x7D if isinstance(container, _Obj) else 0x5D):
                raise _Syntax(i)
            stack.pop()
            value, offset = container, container_offset
            i += 1
        else:
            return value, i


# --- decoding into the request type, with Go's field matching and errors ----------------------------

# Go matches member names case-insensitively: ASCII case plus the two non-ASCII runes that fold onto
# ASCII letters (U+017F long s, U+212A Kelvin sign). Not str.casefold, which would also map e.g. the
# "fi" ligature onto "fi".
_FOLD = {**{c: c + 32 for c in range(0x41, 0x5B)}, 0x17F: ord("s"), 0x212A: ord("k")}


def _resolve(name: str, fields: dict[str, _Field]) -> tuple[str, _Field] | None:
    if name in fields:
        return name, fields[name]
    folded = name.translate(_FOLD)
    for candidate, f in fields.items():
        if candidate.translate(_FOLD) == folded:
            return candidate, f
    return None


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(text: str) -> str:
    """Go's strconv.Quote (what ``%q`` prints), for names echoed in error messages."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


_INT_LITERAL = re.compile(r"-?[0-9]+")


def _new_key(**values: Any) -> ExposureKeyInput:
    values.setdefault("key", "")  # a missing "key" is Go's zero value, rejected later by the transform
    return ExposureKeyInput(**values)


def _type_error(path: str, offset: int) -> WireError:
    return WireError(400, f"invalid value {go_quote(path)} at position {offset}")


def _convert(value: Any, offset: int, f: _Field, path: str) -> Any:
    if value is None:  # Go leaves the zero value for null
        return None
    if f.kind == "str" and isinstance(value, str) and not isinstance(value, _Num):
        return value
    if f.kind == "bool" and isinstance(value, bool):
        return value
    if f.kind in _INT_RANGES and isinstance(value, _Num) and _INT_LITERAL.fullmatch(value):
        low, high = _INT_RANGES[f.kind]
        if len(value) <= 20 and low <= int(value) <= high:  # longer literals overflow int64 anyway
            return int(value)
    if f.kind == "keys" and isinstance(value, list) and not isinstance(value, _Obj):
        # A null element decodes to a zero-value key (which the transform then rejects).
        return tuple(ExposureKeyInput(key="") if item is None else
                     _decode_object(item, item_offset, _KEY_FIELDS, _new_key, path)
                     for item, item_offset in value)
    raise _type_error(path, offset)


def _decode_object(obj: Any, offset: int, fields: dict[str, _Field], factory: Callable[..., Any],
                   path: str) -> Any:
    if not isinstance(obj, _Obj):
        raise _type_error(path, offset)
    values: dict[str, Any] = {}
    for name, value, value_offset in obj:  # document order: the first bad member is reported, as in Go
        resolved = _resolve(name, fields)
        if resolved is None:
            raise WireError(400, f"unknown field {go_quote(name)}")
        json_name, f = resolved
        converted = _convert(value, value_offset, f, f"{path}.{json_name}" if path else json_name)
        if converted is not None:
            values[f.attr] = converted  # a later duplicate wins, as in Go
    return factory(**values)


def decode_publish(body: bytes, max_bytes: int) -> PublishRequest:
    """Decode a v1 publish body, with the reference's messages for each failure."""
    if len(body) > max_bytes:
        raise WireError(413, "http: request body too large")
    start = _ws(body, 0)
    if start >= len(body):
        raise WireError(400, "body must not be empty")
    bad_utf8: list[int] = []
    try:
        # Like Go's Decoder, only the first value is scanned; what follows is judged by More() below.
        value, end = _scan_value(body, start, bad_utf8)
    except _Eof:
        raise WireError(400, "malformed json") from None
    except _Syntax as exc:
        raise WireError(400, f"malformed json at position {exc.index + 1}") from None
    if bad_utf8:
        raise WireError(400, f"malformed json at position {bad_utf8[0] + 1}")
    # Top-level null leaves every field at its zero value, as Go does for a struct.
    top_offset = start + 1 if body[start] in b"{[" else end
    request = (PublishRequest() if value is None
               else _decode_object(value, top_offset, _PUBLISH_FIELDS, PublishRequest, ""))
    # json.Decoder.More(): anything but whitespace, ']' or '}' after the object is a second value.
    rest = _ws(body, end)
    if rest < len(body) and body[rest] not in b"]}":
        raise WireError(400, "body must contain only one JSON object")
    return request


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
