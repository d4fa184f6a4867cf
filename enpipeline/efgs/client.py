"""HTTP client of the EFGS endpoints (upload, download, audit) over mutual TLS, with the standard library.

Every answer with a status comes back as a ``Response`` (the callers decide what 201, 207, 409 or 410 mean);
only a failure to talk at all raises ``EfgsTransportError``.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import date, timedelta

PROTOBUF = "application/protobuf; version=1.0"
JSON = "application/json"
MAX_BODY_BYTES = 64 * 1024 * 1024   # a 5000-key batch is ~200 KB; anything near this is not a batch


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
        request = urllib.request.Request(url, data=body, headers=headers, method=method)  # noqa: S310 - https only
        try:
            with self._opener.open(request, timeout=self._timeout) as answer:
                return Response(answer.status, {k.lower(): v for k, v in answer.headers.items()},
                                answer.read(MAX_BODY_BYTES))
        except urllib.error.HTTPError as exc:  # any non-2xx: an answer, not a transport failure
            with exc:
                return Response(exc.code, {k.lower(): v for k, v in (exc.headers or {}).items()},
                                exc.read(MAX_BODY_BYTES) if exc.fp is not None else b"")
        except (TimeoutError, urllib.error.URLError, ssl.SSLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EfgsTransportError(f"{method} {url}: {type(reason).__name__}: {reason}") from None
