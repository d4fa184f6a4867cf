"""A bounded HTTP(S) GET for documents partners publish (JWKS documents, export indexes and files).

Only http and https are reachable, also through redirects; the body is read in socket-sized pieces so both the
size cap and the overall deadline hold while a server trickles bytes, and a body shorter than its Content-Length
(the connection dropped) is an error, never a shorter document. Failures are typed, so each caller words
them for its own operators.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import timedelta
from http.client import HTTPException

_READ_CHUNK = 64 * 1024


class HttpGetError(Exception):
    """The GET failed; ``str()`` is a one-line reason."""


class BadStatus(HttpGetError):
    def __init__(self, status: int, location: str | None = None):
        super().__init__(f"HTTP status {status}")
        self.status = status
        self.location = location  # set for a redirect that was not followed


class TooLarge(HttpGetError):
    def __init__(self, limit: int, declared: int | None = None):
        super().__init__(f"more than {limit} bytes")
        self.limit = limit
        self.declared = declared  # the Content-Length, when the server announced the size


class TimedOut(HttpGetError):
    def __init__(self, seconds: float):
        super().__init__(f"timed out after {seconds:g}s")
        self.seconds = seconds


class Unreachable(HttpGetError):
    """Connection, TLS or protocol trouble (the message is the reason, on one line)."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s): urllib alone would follow one to ftp://."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"refusing to follow a redirect to {newurl!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    # Built by hand rather than build_opener() so no file:, ftp: or data: handler is ever reachable.
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(), _HttpOnlyRedirects(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _one_line(text: str) -> str:
    return " ".join(text.split())


def bounded_get(url: str, *, timeout: timedelta, max_bytes: int, headers: dict[str, str]) -> bytes:
    """The body of a 200 answer to GET ``url``, at most ``max_bytes`` long, within ``timeout`` overall.

    ``timeout`` bounds connecting and each read, and the download is abandoned once it has taken longer than
    that. (Name resolution is not covered: urllib has no timeout for it.) Callers check the URL's scheme.
    """
    seconds = timeout.total_seconds()
    deadline = time.monotonic() + seconds
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - the opener speaks http(s) only
    try:
        with _opener().open(request, timeout=seconds) as response:
            if response.status != 200:
                raise BadStatus(response.status)
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise TooLarge(max_bytes, int(declared))
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read1(min(_READ_CHUNK, max_bytes + 1 - size)):
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(max_bytes)
                if time.monotonic() > deadline:
                    raise TimedOut(seconds)
                chunks.append(chunk)
            # http.client returns a body cut short by a dropped connection as if it were whole; what the server
            # announced and did not send is still counted in ``length``.
            if response.length:
                raise Unreachable(f"connection closed after {size} of {size + response.length} bytes")
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        exc.close()
        location = exc.headers.get("Location", "") if 300 <= exc.code < 400 and exc.headers else None
        raise BadStatus(exc.code, location) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise TimedOut(seconds) from None
        raise Unreachable(_one_line(str(exc.reason))) from None
    except TimeoutError:
        raise TimedOut(seconds) from None
    except (OSError, HTTPException, ValueError) as exc:  # resets, bad status lines, malformed URLs
        raise Unreachable(_one_line(str(exc)) or type(exc).__name__) from None
