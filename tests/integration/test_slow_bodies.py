"""Slow, stalled, oversized and truncated request bodies against `enpipeline api` under real gunicorn.

A client that trickles its body or stops sending must not hang the server: it is cut off with 408 once
ENP_BODY_READ_TIMEOUT has passed (here 2 s), without gunicorn killing the worker, and other clients are
served meanwhile. An oversized body is refused with 413 as soon as the limit is passed (or at once, from its
Content-Length), without reading the rest. Both worker kinds are covered: sync (the default) and gthread
(`--threads`), where a stuck thread was never released before (gunicorn's worker timeout does not apply).
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import logscan

BODY_TIMEOUT = 3.0
SLACK = 2.0  # scheduling and start-up jitter on a busy 2-core machine
AT_ONCE = BODY_TIMEOUT / 2  # "served at once": well before any body deadline could have freed a worker
MAX_BODY = 64_000


@dataclass
class Server:
    port: int
    log: Path
    kind: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["sync", "gthread"])
def server(request, settings, migrated_engine, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"slow-{request.param}")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENP_")}
    env.update(ENP_DATABASE_URL=settings.database_url, ENP_VAR_DIR=str(tmp),
               ENP_REVISION_TOKEN_KEK=base64.b64encode(settings.revision_token_kek).decode(),
               ENP_REVISION_TOKEN_AAD=base64.b64encode(settings.revision_token_aad).decode(),
               ENP_BODY_READ_TIMEOUT=f"{BODY_TIMEOUT:g}s")
    threads = ["--workers", "2"] if request.param == "sync" else ["--workers", "1", "--threads", "4"]
    log_path = tmp / "api.log"
    logscan.register_log_file(log_path)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "enpipeline.cli", "api", "--host", "127.0.0.1", "--port",
                                 str(port), *threads], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    srv = Server(port, log_path, request.param)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(srv.base + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("API did not become healthy: " + log_path.read_text()[-2000:])
        yield srv
        # No worker was killed for being stuck, and nothing failed with a traceback.
        logged = log_path.read_text()
        assert "WORKER TIMEOUT" not in logged and "Traceback" not in logged, logged[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# -- raw HTTP ------------------------------------------------------------------------------------------


def open_publish(srv: Server, headers: dict[str, str], first_bytes: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "127.0.0.1", "Content-Type": "application/json",
                                                  **headers}.items())
    sock.sendall(f"POST /v1/publish HTTP/1.1\r\n{head}\r\n".encode() + first_bytes)
    return sock


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict]:
    """Status and JSON body of the one response on ``sock`` (Content-Length framed)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    assert headers["content-type"] == "application/json", headers
    return int(lines[0].split()[1]), json.loads(rest[:length])


def served(srv: Server) -> float:
    """Seconds an ordinary client waits for /health and for a (refused) publish."""
    started = time.monotonic()
    with urllib.request.urlopen(srv.base + "/health", timeout=BODY_TIMEOUT * 3) as resp:
        assert resp.status == 200
    req = urllib.request.Request(srv.base + "/v1/publish", data=b'{"healthAuthorityID":"com.example.nobody"}',
                                 headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=BODY_TIMEOUT * 3)
    assert info.value.code == 401
    return time.monotonic() - started


# -- tests ---------------------------------------------------------------------------------------------


def test_stalled_bodies_are_cut_off_and_other_clients_are_served(server):
    # As many stalled clients as the sync server has workers: each sent part of its body, then nothing.
    started = time.monotonic()
    stalled = [open_publish(server, {"Content-Length": "1000"}, b'{"padding":"') for _ in range(2)]
    time.sleep(0.2)  # let the server pick them up first
    waited = served(server)
    if server.kind == "gthread":
        assert waited < AT_ONCE, waited  # free threads serve others at once
    else:
        assert waited < BODY_TIMEOUT + SLACK, waited  # both workers are free again once the deadline passes
    for sock in stalled:
        status, payload = read_response(sock, BODY_TIMEOUT + SLACK)
        assert status == 408
        assert payload["code"] == "bad_request"
        assert payload["error"] == "error unmarshalling API call, code: 408: http: request body not received in time"
        assert sock.recv(1) == b""  # and the connection is closed
        sock.close()
    assert time.monotonic() - started < BODY_TIMEOUT + SLACK + 0.5


def test_trickled_body_is_cut_off_by_the_total_deadline(server):
    """One byte every 0.2 s would take 200 s for 1,000 bytes: the deadline counts the whole body."""
    sock = open_publish(server, {"Content-Length": "1000"})
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        try:
            while not stop.is_set():
                sock.send(b" ")
                stop.wait(0.2)
        except OSError:
            pass  # the server shut its side

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        status, payload = read_response(sock, BODY_TIMEOUT + SLACK)
    finally:
        stop.set()
        sender.join(timeout=2)
        sock.close()
    elapsed = time.monotonic() - started
    assert status == 408 and payload["code"] == "bad_request"
    assert BODY_TIMEOUT - 0.3 < elapsed < BODY_TIMEOUT + SLACK, elapsed
    assert served(server) < AT_ONCE


def test_endless_chunked_body_is_refused_after_the_limit(server):
    """No Content-Length: 413 comes as soon as 64,001 bytes were read, while the client is still sending."""
    sock = open_publish(server, {"Transfer-Encoding": "chunked"})
    sock.setblocking(False)
    chunk = b"2000\r\n" + b" " * 0x2000 + b"\r\n"
    sent = 0
    started = time.monotonic()
    answered = False
    while time.monotonic() - started < 10 and sent < 50 * 1024 * 1024:
        readable, writable, _ = select.select([sock], [sock], [], 1)
        if readable:
            answered = True
            break
        if writable:
            try:
                sent += sock.send(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
    assert answered, f"no answer after sending {sent} bytes"
    sock.setblocking(True)
    status, payload = read_response(sock, 5)
    closed = closed_by_server(sock)
    sock.close()
    assert status == 413
    assert closed, "the server kept the connection to drain the rest of the body"
    assert payload["error"] == "error unmarshalling API call, code: 413: http: request body too large"
    # The server stopped reading at the limit: what was sent beyond it only sits in socket buffers.
    assert sent < 8 * 1024 * 1024, sent


def closed_by_server(sock: socket.socket, within: float = 1.5) -> bool:
    """The server ended the connection instead of keeping it for another request (which would mean
    draining the refused body first). ``within`` stays below gunicorn's 2 s keep-alive, after which an idle
    kept connection would be closed anyway."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_huge_content_length_is_refused_before_any_body(server):
    sock = open_publish(server, {"Content-Length": str(10**12)})
    started = time.monotonic()
    status, payload = read_response(sock, 5)
    assert status == 413 and payload["code"] == "bad_request"
    assert time.monotonic() - started < AT_ONCE
    assert closed_by_server(sock)
    sock.close()


def test_wrong_content_type_does_not_read_the_body(server):
    sock = open_publish(server, {"Content-Type": "text/plain", "Content-Length": str(10**9)}, b"x" * 1000)
    status, payload = read_response(sock, 5)
    assert status == 415 and payload["code"] == "bad_request"
    assert closed_by_server(sock)
    sock.close()


def test_body_shorter_than_its_content_length_is_malformed(server):
    """The client sends half its declared body and closes its side: Go's unexpected EOF, 400 malformed json."""
    sock = open_publish(server, {"Content-Length": "100"}, b'{"padding":"' + b"A" * 38)
    sock.shutdown(socket.SHUT_WR)
    status, payload = read_response(sock, BODY_TIMEOUT + SLACK)
    sock.close()
    assert status == 400
    assert payload["error"] == "error unmarshalling API call, code: 400: malformed json"


def test_chunked_body_cut_short_is_malformed(server):
    """A chunked body whose client closes mid-chunk (gunicorn's NoMoreData): 400, not a server error."""
    sock = open_publish(server, {"Transfer-Encoding": "chunked"}, b"40\r\n" + b'{"padding":"AAAA')
    sock.shutdown(socket.SHUT_WR)
    status, payload = read_response(sock, BODY_TIMEOUT + SLACK)
    sock.close()
    assert status == 400
    assert payload["error"] == "error unmarshalling API call, code: 400: malformed json"


def test_server_is_healthy_afterwards(server):
    assert served(server) < AT_ONCE
    with urllib.request.urlopen(server.base + "/metrics", timeout=5) as resp:
        assert resp.status == 200
