"""JWKS sync against real Postgres and a local HTTP server: key lifecycle, failures that change nothing, CLI."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import sqlalchemy as sa

from enpipeline.db import authorities
from enpipeline.jwks import JwksSyncError, fetch_jwks, sync_health_authority_keys
from enpipeline.verification import HealthAuthorityKey
from tests import support
from tests.unit.test_jwks import doc, jwk

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(days=30)
TIMEOUT = timedelta(seconds=5)


@dataclass
class Route:
    body: bytes = b"[]"
    status: int = 200
    delay: float = 0.0  # seconds before answering
    trickle: float = 0.0  # seconds between body bytes
    content_length: bool = True
    location: str | None = None


@dataclass
class JwksServer:
    """A local HTTP server; set ``routes[path]`` to choose what each path answers."""

    base: str
    routes: dict[str, Route] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return self.base + path

    def serve(self, path: str, body: bytes, **kwargs) -> str:
        self.routes[path] = Route(body=body, **kwargs)
        return self.url(path)


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    state: JwksServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] = state.hits.get(self.path, 0) + 1
            route = state.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            if route.delay:
                state.release.wait(route.delay)
            self.send_response(route.status)
            if route.location:
                self.send_header("Location", route.location)
            self.send_header("Content-Type", "application/json")
            if route.content_length:
                self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            try:
                if route.trickle:
                    for i in range(len(route.body)):
                        if state.release.wait(route.trickle):
                            return
                        self.wfile.write(route.body[i:i + 1])
                        self.wfile.flush()
                else:
                    self.wfile.write(route.body)
            except OSError:  # the client gave up (timeouts, size cap): expected here
                pass

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = JwksServer(base=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()  # let sleeping handlers finish
        server.shutdown()
        server.server_close()
        thread.join(5)


def add_ha(engine, issuer: str, jwks_uri: str | None) -> int:
    with engine.begin() as conn:
        return authorities.add_authority(conn, issuer=issuer, audience="keyserver", name=issuer.upper(),
                                         jwks_uri=jwks_uri)


def add_key(engine, ha_id: int, version: str, key, *, start: datetime, thru: datetime | None = None) -> None:
    with engine.begin() as conn:
        authorities.add_key(conn, ha_id, version=version, public_key_pem=support.public_pem(key),
                            from_timestamp=start, thru_timestamp=thru)


def keys_of(engine, ha_id: int) -> dict[str, tuple]:
    """version -> (public key PEM, from, thru), straight from the table."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT version, public_key, from_timestamp, thru_timestamp"
                                    " FROM health_authority_key WHERE health_authority_id = :id"), {"id": ha_id})
        return {r.version: (r.public_key, r.from_timestamp, r.thru_timestamp) for r in rows}


def sync(engine, now: datetime, **kwargs):
    kwargs.setdefault("timeout", TIMEOUT)
    kwargs.setdefault("cleanup_ttl", TTL)
    return sync_health_authority_keys(engine, now, **kwargs)


def counts(result) -> dict[str, int]:
    return {k: v for k, v in result.as_row().items() if k in ("added", "restored", "revoked", "purged", "unchanged")}


# --- lifecycle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare-array", "keys-object"])
def test_adds_new_keys_and_a_second_sync_changes_nothing(engine, jwks_server, wrapped):
    k1, k2 = support.new_signing_key(), support.new_signing_key()
    ha = add_ha(engine, "gov.example", jwks_server.serve("/jwks", doc(jwk(k1, "r2v1"), jwk(k2, "r2v2"),
                                                                      wrapped=wrapped)))
    report = sync(engine, T0)
    assert [r.issuer for r in report.results] == ["gov.example"]
    assert counts(report.results[0]) == {"added": 2, "restored": 0, "revoked": 0, "purged": 0, "unchanged": 0}
    stored = keys_of(engine, ha)
    assert stored == {"r2v1": (support.public_pem(k1), T0, None), "r2v2": (support.public_pem(k2), T0, None)}

    again = sync(engine, T0 + timedelta(minutes=2))
    assert counts(again.results[0]) == {"added": 0, "restored": 0, "revoked": 0, "purged": 0, "unchanged": 2}
    assert keys_of(engine, ha) == stored
    again.raise_for_failures()


def test_synced_keys_verify_certificates(engine, jwks_server):
    k = support.new_signing_key()
    ha = add_ha(engine, "gov.example", jwks_server.serve("/jwks", doc(jwk(k, "r2v1"))))
    sync(engine, T0)
    with engine.connect() as conn:
        (key,) = authorities.get_by_id(conn, ha).keys
    assert isinstance(key, HealthAuthorityKey) and key.is_valid_at(T0 + timedelta(seconds=1))
    token = support.Certificate(key=k, kid="r2v1").sign([], b"x" * 16, T0)
    assert jwt.get_unverified_header(token)["kid"] == key.version
    jwt.decode(token, key.public_key_pem, algorithms=["ES256"], audience=support.AUDIENCE,
               options={"verify_exp": False, "verify_iat": False})


def test_vanished_key_is_revoked_at_now_once(engine, jwks_server):
    k1, k2 = support.new_signing_key(), support.new_signing_key()
    url = jwks_server.serve("/jwks", doc(jwk(k1, "a"), jwk(k2, "b")))
    ha = add_ha(engine, "gov.example", url)
    sync(engine, T0)

    jwks_server.serve("/jwks", doc(jwk(k2, "b")))
    t1 = T0 + timedelta(hours=1)
    report = sync(engine, t1)
    assert counts(report.results[0]) == {"added": 0, "restored": 0, "revoked": 1, "purged": 0, "unchanged": 1}
    assert keys_of(engine, ha)["a"][2] == t1 and keys_of(engine, ha)["b"][2] is None

    report = sync(engine, t1 + timedelta(hours=1))
    assert counts(report.results[0])["revoked"] == 0
    assert keys_of(engine, ha)["a"][2] == t1  # the first revocation time stands


def test_keys_are_matched_by_public_key_not_by_kid(engine, jwks_server):
    k = support.new_signing_key()
    ha = add_ha(engine, "gov.example", jwks_server.serve("/jwks", doc(jwk(k, "r2v1"))))
    with engine.begin() as conn:  # added by an operator, with the PEM formatted differently
        authorities.add_key(conn, ha, version="manual", public_key_pem=support.public_pem(k).replace("\n", "\r\n"),
                            from_timestamp=T0 - timedelta(days=5))
    before = keys_of(engine, ha)
    report = sync(engine, T0)
    assert counts(report.results[0])["unchanged"] == 1 and keys_of(engine, ha) == before


def test_reappearing_key_is_restored_under_its_kid(engine, jwks_server):
    k = support.new_signing_key()
    ha = add_ha(engine, "gov.example", jwks_server.serve("/jwks", doc(jwk(k, "a"))))
    sync(engine, T0)
    jwks_server.serve("/jwks", b"[]")
    sync(engine, T0 + timedelta(hours=1))
    assert keys_of(engine, ha)["a"][2] == T0 + timedelta(hours=1)

    jwks_server.serve("/jwks", doc(jwk(k, "a")))
    report = sync(engine, T0 + timedelta(hours=2))
    assert counts(report.results[0]) == {"added": 0, "restored": 1, "revoked": 0, "purged": 0, "unchanged": 0}
    assert keys_of(engine, ha) == {"a": (support.public_pem(k), T0, None)}


def test_key_that_vanishes_before_it_is_valid_is_deleted_not_revoked(engine, jwks_server):
    k, served = support.new_signing_key(), support.new_signing_key()
    ha = add_ha(engine, "gov.example", jwks_server.serve("/jwks", doc(jwk(served, "s"))))
    add_key(engine, ha, "future", k, start=T0 + timedelta(days=1))
    add_key(engine, ha, "now", support.new_signing_key(), start=T0)
    report = sync(engine, T0)  # thru = now would break CHECK (thru > from)
    assert counts(report.results[0]) == {"added": 1, "restored": 0, "revoked": 2, "purged": 0, "unchanged": 0}
    assert set(keys_of(engine, ha)) == {"s"}


def test_revoked_keys_are_purged_after_the_ttl(engine, jwks_server):
    served = support.new_signing_key()
    ha = add_ha(engine, "gov.example", jwks_server.serve("/jwks", doc(jwk(served, "s"))))
    start = T0 - timedelta(days=100)
    add_key(engine, ha, "old", support.new_signing_key(), start=start, thru=T0 - timedelta(days=30, seconds=1))
    add_key(engine, ha, "young", support.new_signing_key(), start=start, thru=T0 - timedelta(days=29))
    manual = add_ha(engine, "manual.example", None)  # no jwks_uri: never touched, even its old keys
    add_key(engine, manual, "old", support.new_signing_key(), start=start, thru=T0 - timedelta(days=60))
    manual_before = keys_of(engine, manual)

    report = sync(engine, T0)
    assert [r.issuer for r in report.results] == ["gov.example"]
    assert counts(report.results[0]) == {"added": 1, "restored": 0, "revoked": 0, "purged": 1, "unchanged": 0}
    assert set(keys_of(engine, ha)) == {"s", "young"}
    assert keys_of(engine, manual) == manual_before


def test_authorities_without_a_jwks_uri_are_not_synced(engine, jwks_server):
    a = add_ha(engine, "none.example", None)
    b = add_ha(engine, "empty.example", "")
    add_key(engine, a, "v1", support.new_signing_key(), start=T0 - timedelta(days=1))
    add_key(engine, b, "v1", support.new_signing_key(), start=T0 - timedelta(days=1))
    before = (keys_of(engine, a), keys_of(engine, b))
    report = sync(engine, T0)
    assert report.results == () and (keys_of(engine, a), keys_of(engine, b)) == before


def test_concurrent_syncs_do_not_collide(engine, jwks_server):
    keys = [support.new_signing_key() for _ in range(5)]
    ha = add_ha(engine, "gov.example", jwks_server.serve("/jwks", doc(*(jwk(k, f"k{i}") for i, k in enumerate(keys)))))
    reports, errors = [], []

    def run() -> None:
        try:
            reports.append(sync(engine, T0))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and all(not r.failures for r in reports)
    assert sorted(r.results[0].added for r in reports) == [0, 0, 0, 5]
    assert len(keys_of(engine, ha)) == 5


# --- failures change nothing for the failing authority ----------------------------------------------


BAD = {
    "malformed JSON": ({"body": b'[{"kid": "x"'}, "document is not valid JSON"),
    "RSA key": ({"body": b'[{"kid": "r", "kty": "RSA", "e": "AQAB", "n": "xyz"}]'}, "kty 'RSA' is not supported"),
    "missing kid": ({"body": "missing-kid"}, "key #1 has no kid"),
    "HTTP 500": ({"body": b"oops", "status": 500}, "HTTP status 500, expected 200"),
    "HTTP 204": ({"body": b"", "status": 204}, "HTTP status 204, expected 200"),
    "timeout": ({"body": b"[]", "delay": 10.0}, "timed out after 0.5s"),
    "trickling body": ({"body": b"[" + b" " * 100 + b"]", "trickle": 0.05}, "timed out after 0.5s"),
    "oversized body": ({"body": b"[" + b" " * 300_000 + b"]"}, "more than the 262144 bytes allowed"),
    "oversized, no length": ({"body": b"[" + b" " * 300_000 + b"]", "content_length": False},
                             "more than the 262144 bytes allowed"),
    "redirect to file:": ({"body": b"", "status": 302, "location": "file:///etc/passwd"},
                          "HTTP status 302: redirect to 'file:///etc/passwd' not followed"),
    "redirect to ftp:": ({"body": b"", "status": 301, "location": "ftp://127.0.0.1/jwks"},
                         "refusing to follow a redirect to 'ftp://127.0.0.1/jwks'"),
    "kid reused for a different key": ({"body": "reused-kid"}, "kid 'v1' is already stored for a different key"),
}


@pytest.mark.parametrize(("route", "reason"), list(BAD.values()), ids=list(BAD))
def test_bad_document_fails_its_authority_only_and_changes_nothing_there(engine, jwks_server, route, reason):
    old, new = support.new_signing_key(), support.new_signing_key()
    route = dict(route)
    body = route.pop("body")
    if body == "missing-kid":
        body = doc(jwk(new, None))
    elif body == "reused-kid":
        body = doc(jwk(new, "v1"))
    bad_url = jwks_server.serve("/bad", body, **route)
    bad = add_ha(engine, "bad.example", bad_url)
    # An active key that a successful sync would revoke, and a revoked one it would purge.
    add_key(engine, bad, "v1", old, start=T0 - timedelta(days=90))
    add_key(engine, bad, "gone", support.new_signing_key(), start=T0 - timedelta(days=90),
            thru=T0 - timedelta(days=45))
    healthy_key = support.new_signing_key()
    good = add_ha(engine, "good.example", jwks_server.serve("/good", doc(jwk(healthy_key, "g1"))))
    before = keys_of(engine, bad)

    started = time.monotonic()
    report = sync(engine, T0, timeout=timedelta(seconds=0.5))
    assert time.monotonic() - started < 5  # bounded, whatever the server does

    by_issuer = {r.issuer: r for r in report.results}
    assert by_issuer["good.example"].ok and by_issuer["good.example"].added == 1
    assert set(keys_of(engine, good)) == {"g1"}
    failed = by_issuer["bad.example"]
    assert failed.error is not None and reason in failed.error
    assert counts(failed) == {"added": 0, "restored": 0, "revoked": 0, "purged": 0, "unchanged": 0}
    assert keys_of(engine, bad) == before

    with pytest.raises(JwksSyncError) as info:
        report.raise_for_failures()
    message = str(info.value)
    assert "'bad.example'" in message and bad_url in message and reason in message
    assert "good.example" not in message


def test_unreachable_server_and_credentials_kept_out_of_the_report(engine, jwks_server):
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # closed on exit: nothing listens there any more
    add_ha(engine, "down.example", f"http://user:s3cret@127.0.0.1:{port}/jwks")
    report = sync(engine, T0)
    (result,) = report.results
    assert result.error is not None and result.error.startswith("cannot fetch: ")
    assert result.jwks_uri == f"http://***@127.0.0.1:{port}/jwks"
    assert "s3cret" not in str(result) and "s3cret" not in result.error


def test_fetch_failures_in_one_authority_do_not_stop_the_others(engine, jwks_server):
    k = support.new_signing_key()
    add_ha(engine, "a.example", jwks_server.url("/missing"))
    add_ha(engine, "b.example", jwks_server.serve("/b", doc(jwk(k, "b1"))))

    def fetch(url: str, timeout: timedelta, max_bytes: int) -> bytes:
        if url.endswith("/missing"):
            raise RuntimeError("fetcher bug")
        return fetch_jwks(url, timeout, max_bytes)

    report = sync(engine, T0, fetch=fetch)
    assert [(r.issuer, r.ok) for r in report.results] == [("a.example", False), ("b.example", True)]
    assert report.results[0].error == "unexpected RuntimeError: fetcher bug"


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_sync_jwks_prints_counts_and_exits_0(cli, engine, jwks_server):
    k = support.new_signing_key()
    add_ha(engine, "gov.example", jwks_server.serve("/jwks", doc(jwk(k, "r2v1"))))
    code, out, err = cli("health-authority", "sync-jwks")
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["ISSUER", "JWKS_URI", "ADDED", "RESTORED", "REVOKED", "PURGED", "UNCHANGED", "ERROR"]
    assert row.split() == ["gov.example", jwks_server.url("/jwks"), "1", "0", "0", "0", "0"]

    code, out, _ = cli("health-authority", "sync-jwks", "--json")
    assert code == 0
    assert json.loads(out) == [{"issuer": "gov.example", "jwks_uri": jwks_server.url("/jwks"), "added": 0,
                                "restored": 0, "revoked": 0, "purged": 0, "unchanged": 1, "error": ""}]
    code, out, _ = cli("health-authority", "show", "--issuer", "gov.example", "--json")
    assert [k["version"] for k in json.loads(out)["keys"]] == ["r2v1"]


def test_cli_sync_jwks_with_nothing_to_sync(cli):
    code, out, _ = cli("health-authority", "sync-jwks")
    assert code == 0 and out.strip() == "(none)"


def test_cli_sync_jwks_exits_1_naming_the_failed_authority(cli, engine, jwks_server):
    k = support.new_signing_key()
    add_ha(engine, "good.example", jwks_server.serve("/good", doc(jwk(k, "g1"))))
    add_ha(engine, "bad.example", jwks_server.serve("/bad", b"not json"))
    code, out, err = cli("health-authority", "sync-jwks", "--json")
    assert code == 1
    rows = {r["issuer"]: r for r in json.loads(out)}
    assert rows["good.example"]["added"] == 1 and rows["good.example"]["error"] == ""
    assert rows["bad.example"]["error"].startswith("document is not valid JSON")
    lines = [line for line in err.splitlines() if line.startswith("enpipeline: error")]
    assert len(lines) == 1  # one line, however many authorities failed
    assert lines[0].startswith("enpipeline: error: JWKS sync failed for 1 of 2 health authorities: 'bad.example' (")
    assert jwks_server.url("/bad") in lines[0] and "good.example" not in lines[0]
