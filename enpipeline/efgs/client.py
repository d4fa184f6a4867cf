"""HTTP client of the EFGS endpoints (upload, download, audit) over mutual TLS, with the standard library.

Every answer with a status comes back as a ``Response`` (the callers decide what 201, 207, 409 or 410 mean);
only a failure to talk at all raises ``EfgsTransportError``: no connection, no answer within the timeout, a body
still arriving when the timeout has passed (a trickling server), or a body cut short by a dropped connection.
"""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import date, timedelta
from http.client import HTTPException, HTTPResponse

PROTOBUF = "application/protobuf; version=1.0"
JSON = "application/json"
MAX_BODY_BYTES = 64 * 1024 * 1024   # a 5000-key batch is ~200 KB; anything near this is not a batch
_READ_CHUNK = 64 * 1024


class EfgsTransportError(Exception):
    """No HTTP answer (connection, TLS, timeout); the message says which, in one line."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]    # names in lower case
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def text(self, limit: int = 300) -> str:
        text = " ".join(self.body.decode("utf-8", "replace").split())
        return text if len(text) <= limit else text[:limit - 3] + "..."


class EfgsClient:
    """One gateway (``base_url``, e.g. https://efgs.example.eu) as one country (the TLS context's certificate)."""

    def __init__(self, base_url: str, context: ssl.SSLContext, timeout: timedelta):
        self.base_url = base_url.rstrip("/")
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
        self._timeout = timeout.total_seconds()

    def upload(self, batch_tag: str, batch_signature: str, body: bytes) -> Response:
        return self._call("POST", "/diagnosiskeys/upload", body,
                          {"Content-Type": PROTOBUF, "Accept": JSON, "batchTag": batch_tag,
                           "batchSignature": batch_signature})

    def download(self, day: date, batch_tag: str | None = None) -> Response:
        headers = {"Accept": PROTOBUF}
        if batch_tag is not None:
            headers["batchTag"] = batch_tag
        return self._call("GET", f"/diagnosiskeys/download/{day.isoformat()}", None, headers)

    def audit(self, day: date, batch_tag: str) -> Response:
        return self._call("GET", f"/diagnosiskeys/audit/download/{day.isoformat()}/"
                                 f"{urllib.parse.quote(batch_tag, safe='')}", None, {"Accept": JSON})

    def _call(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Response:
        url = self.base_url + path
        # The socket timeout bounds each read; the deadline bounds the whole body, which a server can trickle.
        deadline = time.monotonic() + self._timeout
        request = urllib.request.Request(url, data=body, headers=headers, method=method)  # noqa: S310 - https only
        try:
            try:
                with self._opener.open(request, timeout=self._timeout) as answer:
                    return Response(answer.status, {k.lower(): v for k, v in answer.headers.items()},
                                    self._body(answer, method, url, deadline))
            except urllib.error.HTTPError as exc:  # any non-2xx: an answer, not a transport failure
                with exc:
                    return Response(exc.code, {k.lower(): v for k, v in (exc.headers or {}).items()},
                                    self._body(exc.fp, method, url, deadline) if exc.fp is not None else b"")
        except (TimeoutError, urllib.error.URLError, ssl.SSLError, ConnectionError, OSError, HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise EfgsTransportError(f"{method} {url}: {type(reason).__name__}: {reason}") from None

    def _body(self, answer: HTTPResponse, method: str, url: str, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := answer.read1(min(_READ_CHUNK, MAX_BODY_BYTES + 1 - size)):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise EfgsTransportError(f"{method} {url}: the answer is larger than {MAX_BODY_BYTES} bytes")
            if time.monotonic() > deadline:
                raise EfgsTransportError(f"{method} {url}: the answer took longer than {self._timeout:g}s "
                                         f"({size} bytes by then)")
            chunks.append(chunk)
        # http.client hands out a body cut short by a dropped connection as if it were whole; what the gateway
        # announced and did not send is still counted in ``length``.
        missing = getattr(answer, "length", None)
        if missing:
            raise EfgsTransportError(f"{method} {url}: connection closed after {size} of {size + missing} bytes")
        return b"".join(chunks)
