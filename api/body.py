"""Reading the publish body: at most N bytes, all of it within a deadline, so slow clients cannot pin workers."""

from __future__ import annotations

import socket
import threading
from datetime import timedelta
from typing import IO, Any

from werkzeug.exceptions import ClientDisconnected

from enpipeline.publish.wire import WireError

# Go's net/http answers a client that stops sending with an i/o timeout; 408 says what happened.
TIMEOUT_MESSAGE = "http: request body not received in time"


class _Deadline:
    """Shuts the read side of the client socket when the deadline passes.

    A blocked recv() then returns end-of-file, so a worker (or gthread thread) stuck on a client that trickles
    or stops sending is released; a per-recv socket timeout would not do, since a byte now and then resets it.
    """

    def __init__(self, sock: socket.socket, seconds: float):
        self._sock = sock
        self._lock = threading.Lock()
        self._done = False
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            try:
                self._sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # already closed by the client

    def stop(self) -> bool:
        """Stops the timer; True when it had already fired."""
        with self._lock:
            self._done = True
        self._timer.cancel()
        return self.fired


def stop_reading(environ: dict[str, Any]) -> None:
    """Refuse the rest of a body that will not be read (413, 415, 408): shut the read side of the client
    socket, so gunicorn does not drain it for a next keep-alive request (a gthread thread would read for as
    long as the client keeps sending) and closes the connection after the reply."""
    sock = environ.get("gunicorn.socket")
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already closed by the client


def read_body(environ: dict[str, Any], stream: IO[bytes], limit: int, timeout: timedelta) -> bytes:
    """Up to ``limit`` bytes of the body. Raises WireError 408 when it does not arrive within ``timeout``
    (enforced under gunicorn, which exposes the client socket) and 400 "malformed json" when the client
    closes early, as the reference does for an unexpected EOF."""
    sock = environ.get("gunicorn.socket")
    deadline = _Deadline(sock, timeout.total_seconds()) if isinstance(sock, socket.socket) else None
    try:
        data = stream.read(limit)
    except (ClientDisconnected, OSError) as exc:
        if deadline is not None and deadline.stop():
            raise WireError(408, TIMEOUT_MESSAGE) from None
        raise WireError(400, "malformed json") from exc
    if deadline is not None and deadline.stop() and len(data) != _declared_length(environ):
        # Cut off: the read ended at the end-of-file the shutdown produced, short of the declared length.
        # (When the timer fires just after the last byte arrived, the body is complete and is used.)
        raise WireError(408, TIMEOUT_MESSAGE)
    return data


def _declared_length(environ: dict[str, Any]) -> int | None:
    try:
        return int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None
