"""The federation Fetch server: partners pull our keys over gRPC (/Federation/Fetch), wire-compatible with the
reference server's federationout.

Differences from the reference, all invisible on the wire:
* bearer tokens are ES256 JWTs verified against the key registered for (iss, sub), not Google ID tokens;
* cursors are keyset positions (see cursor.py), so deletes and inserts between pages skip or repeat nothing;
* keys that came from a partner (its pull queries or its export files) are never served back to it;
* an authorization's include regions narrow the request, and a request for none of them is refused instead of
  being widened to every region.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from sqlalchemy.engine import Connection, Engine

from enpipeline.config import Settings
from enpipeline.db import federation_out as db
from enpipeline.federation import cursor
from enpipeline.federation.auth import (
    FederationAuthError,
    FederationAuthorization,
    bearer_token,
    token_principal,
    verify_token,
)
from enpipeline.model import (
    REPORT_TYPE_CONFIRMED,
    REPORT_TYPE_LIKELY,
    REPORT_TYPE_NEGATIVE,
    REPORT_TYPE_SELF_REPORT,
)
from enpipeline.proto import federation_pb2 as pb
from enpipeline.proto import federation_pb2_grpc as pb_grpc
from enpipeline.timeutil import truncate

log = logging.getLogger(__name__)

# How long after a window closes before it is served (see fetch()).
COMMIT_GRACE = timedelta(minutes=1)

Clock = Callable[[], datetime]

_REPORT_TYPES = {
    REPORT_TYPE_CONFIRMED: pb.ExposureKey.CONFIRMED_TEST,
    REPORT_TYPE_LIKELY: pb.ExposureKey.CONFIRMED_CLINICAL_DIAGNOSIS,
    REPORT_TYPE_NEGATIVE: pb.ExposureKey.REVOKED,
    REPORT_TYPE_SELF_REPORT: pb.ExposureKey.SELF_REPORT,
}


class FetchError(Exception):
    """A Fetch answered with a gRPC status; the message goes to the caller as the status details."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _regions(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip().upper() for v in values if v.strip())


@dataclass(frozen=True)
class Regions:
    """The regions one Fetch may see: ``include`` empty means every region."""

    include: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()

    def served(self, key_regions: Iterable[str]) -> list[str]:
        """The regions to send with a key: its own, narrowed to the include set, without the excluded ones."""
        return sorted(r for r in set(key_regions) if (not self.include or r in self.include) and r not in self.exclude)


def effective_regions(include: Iterable[str], exclude: Iterable[str],
                      authorization: FederationAuthorization) -> Regions:
    """Combine a request's regions with its partner's authorization (intersect includes, union excludes)."""
    include, exclude = _regions(include), _regions(exclude)
    overlap = include & exclude
    if overlap:
        raise FetchError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"includeRegions and excludeRegions overlap: {', '.join(sorted(overlap))}")
    allowed = _regions(authorization.include_regions)
    if allowed:
        narrowed = include & allowed if include else allowed
        if not narrowed:
            # An empty include means "every region": refusing keeps a disjoint request from seeing them all.
            raise FetchError(grpc.StatusCode.PERMISSION_DENIED,
                             f"none of the requested includeRegions is authorized (authorized: "
                             f"{', '.join(sorted(allowed))})")
        include = narrowed
    return Regions(include=include, exclude=exclude | _regions(authorization.exclude_regions))


def page_size(requested: int, maximum: int) -> int:
    """The reference's rule: the request's maxExposureKeys if 0 < value < maximum, else the maximum."""
    return requested if 0 < requested < maximum else maximum


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, str, str]:
    """A call's bearer token and its (unverified) issuer and subject; raises FetchError(UNAUTHENTICATED)."""
    try:
        token = bearer_token([v for k, v in metadata if k.lower() == "authorization"])  # type: ignore[misc]
        issuer, subject = token_principal(token)
    except FederationAuthError as exc:
        raise FetchError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
    return token, issuer, subject


def _position(state_cursor: pb.Cursor, kind: str) -> cursor.Position:
    try:
        return cursor.decode(state_cursor.timestamp, state_cursor.nextToken, kind)
    except cursor.InvalidCursor:
        raise FetchError(grpc.StatusCode.INVALID_ARGUMENT, "invalid cursor") from None


def _next_cursor(previous: pb.Cursor, rows: Sequence[db.PageRow], kind: str) -> pb.Cursor:
    if not rows:  # nothing new: hand the client's cursor back unchanged
        return pb.Cursor(timestamp=previous.timestamp, nextToken=previous.nextToken)
    timestamp, token = cursor.encode(db.page_position(rows[-1]), kind)
    return pb.Cursor(timestamp=timestamp, nextToken=token)


# A page is assembled as the wire bytes of its keys and parsed once. Building one pb.ExposureKey per key from
# keyword arguments cost ~2.5 µs a key (a fifth of a Fetch before); but keys with the same values (the same
# PageRow values string: interval, TR, report type, onset, traveler, regions) differ only in their 16 key bytes.
# So each distinct values string is encoded once, by upb itself, into the bytes that go before and after the
# key, and a key costs a dict lookup and a join. The parsed response is the message the keyword arguments
# built, so it serializes to the same bytes (field order on the wire is upb's, not ours).
_KEYS_FIELD = b"\x0a"     # FederationFetchResponse.keys: field 1, length-delimited
_REVISED_FIELD = b"\x12"  # FederationFetchResponse.revisedKeys: field 2, length-delimited
_KEY_BYTES = 16           # exposure keys are exactly 16 bytes (CHECK in sql/0001)
_KEY_PREFIX = b"\x0a\x10"  # ExposureKey.exposureKey: field 1, 16 bytes long
# Distinct values strings kept per Regions, and Regions per servicer, before starting over (a few MB at most
# per Regions): a few thousand cover days of keys; the bounds only keep unusual data from growing them.
_ENCODED_VALUES = 8192
_ENCODERS = 8


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _KeyEncoder:
    """ExposureKeys in wire format for the Fetches of one Regions (a key's regions depend on it).

    Shared by the Fetch threads: a lost race only encodes a values string twice.
    """

    def __init__(self, regions: Regions):
        self._regions = regions
        self._encoded: dict[bytes, dict[str, tuple[bytes, bytes]]] = {_KEYS_FIELD: {}, _REVISED_FIELD: {}}

    def encode(self, rows: Sequence[db.PageRow], field: bytes) -> bytes:
        """``rows`` as the repeated ExposureKey ``field`` of a FederationFetchResponse."""
        encoded = self._encoded[field]
        if len(encoded) > _ENCODED_VALUES:
            encoded.clear()
        get, fromhex = encoded.get, bytes.fromhex
        out: list[bytes] = []
        append = out.append
        for key_hex, _, values in rows:
            parts = get(values)
            if parts is None:
                parts = encoded[values] = self._parts(field, values)
            if len(key_hex) != 2 * _KEY_BYTES:  # the length before the key assumes 16 bytes
                raise ValueError(f"exposure key of {len(key_hex) // 2} bytes")
            append(parts[0])
            append(fromhex(key_hex))
            append(parts[1])
        return b"".join(out)

    def _parts(self, field: bytes, values: str) -> tuple[bytes, bytes]:
        """The bytes before a key with these values (up to its key bytes) and after it (its other fields)."""
        v = db.key_values(values)
        dsos = v.days_since_symptom_onset
        rest = pb.ExposureKey(
            transmissionRisk=v.transmission_risk, intervalNumber=v.interval_number, intervalCount=v.interval_count,
            reportType=_REPORT_TYPES.get(v.report_type, pb.ExposureKey.UNKNOWN),
            daysSinceOnsetOfSymptoms=dsos or 0, hasSymptomOnset=dsos is not None,
            traveler=v.traveler, regions=self._regions.served(v.regions)).SerializeToString()
        return field + _varint(len(_KEY_PREFIX) + _KEY_BYTES + len(rest)) + _KEY_PREFIX, rest


@dataclass(frozen=True)
class _Pages:
    """What one Fetch read: its regions, the primary and revised keys to serve, and whether more are pending."""

    regions: Regions
    primary: list[db.PageRow]
    revised: list[db.PageRow]
    more: bool


@dataclass(frozen=True)
class FetchOutcome:
    response: pb.FederationFetchResponse
    keys: int
    revised: int
    partial: bool


class FederationServicer(pb_grpc.FederationServicer):
    """Answers /Federation/Fetch for authorized partners from the exposure table."""

    def __init__(self, settings: Settings, engine: Engine, *, clock: Clock):
        self._settings = settings
        self._engine = engine
        self._clock = clock
        self._encoders: dict[Regions, _KeyEncoder] = {}

    def Fetch(self, request: pb.FederationFetchRequest, context: grpc.ServicerContext) -> pb.FederationFetchResponse:
        partner = "-"
        try:
            now = self._clock()
            bearer = _bearer(context.invocation_metadata() or ())  # a call without a token costs no connection
            # The authorization is read in the pages' snapshot: a second connection (a ping, BEGIN and ROLLBACK)
            # cost as much as the statements of a whole page.
            with self._snapshot() as conn:
                authorization = self.authenticate(conn, bearer, now)
                partner = authorization.partner
                pages = self._read(conn, request, authorization, now)
            outcome = self._respond(request, pages)
        except FetchError as exc:
            log.warning("federation fetch refused: partner=%s peer=%s code=%s: %s", partner, context.peer(),
                        exc.code.name, exc.message)
            error = exc
        except Exception:
            # The trace stays in our log; the partner learns only that it was not its fault.
            log.exception("federation fetch failed: partner=%s", partner)
            error = FetchError(grpc.StatusCode.INTERNAL, "internal error")
        else:
            log.info("federation fetch: partner=%s keys=%d revised=%d partial=%s", partner, outcome.keys,
                     outcome.revised, outcome.partial)
            return outcome.response
        context.abort(error.code, error.message)  # raises; outside the try so it is not taken for a failure
        raise AssertionError("unreachable")

    def authenticate(self, conn: Connection, bearer: tuple[str, str, str], now: datetime) -> FederationAuthorization:
        """The partner behind a bearer token (see _bearer); raises FetchError(UNAUTHENTICATED) with the reason."""
        token, issuer, subject = bearer
        try:
            authorization = db.get_authorization(conn, issuer, subject)
            if authorization is None:
                raise FederationAuthError("invalid issuer/subject")
            verify_token(token, authorization, default_audience=self._settings.federation_audience, now=now,
                         max_lifetime=self._settings.federation_max_token_lifetime)
        except FederationAuthError as exc:
            raise FetchError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        return authorization

    def fetch(self, request: pb.FederationFetchRequest, authorization: FederationAuthorization,
              now: datetime) -> FetchOutcome:
        """One page for an authenticated partner: primary keys first, then revised keys if budget remains."""
        with self._snapshot() as conn:
            pages = self._read(conn, request, authorization, now)
        return self._respond(request, pages)

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        # One read-only snapshot for both pages, so a key revised in between is not half in each.
        with self._engine.connect().execution_options(isolation_level="REPEATABLE READ",
                                                      postgresql_readonly=True) as conn, conn.begin():
            yield conn

    def _read(self, conn: Connection, request: pb.FederationFetchRequest, authorization: FederationAuthorization,
              now: datetime) -> _Pages:
        regions = effective_regions(request.includeRegions, request.excludeRegions, authorization)
        key_after = _position(request.state.keyCursor, cursor.PRIMARY)
        revised_after = _position(request.state.revisedKeyCursor, cursor.REVISED)
        limit = page_size(request.maxExposureKeys, self._settings.federation_page_size)
        # The open window is still filling up: serving part of it would move the cursor past keys yet to come.
        # A publish that began just before the hour turned may still be committing rows stamped with the
        # closed hour; the grace keeps that window unserved until such transactions are long finished.
        until = truncate(now - COMMIT_GRACE, self._settings.truncate_window)

        reads = db.FetchPages(conn, authorization.partner)
        filt = db.KeyFilter(include_regions=tuple(sorted(regions.include)),
                            exclude_regions=tuple(sorted(regions.exclude)),
                            only_travelers=request.onlyTravelers,
                            only_local_provenance=request.onlyLocalProvenance,
                            skip=reads.sources)
        # One row more than the page tells whether the stream goes on, without a count.
        primary = reads.primary_page(filt, after=key_after, until=until, limit=limit + 1)
        more = len(primary) > limit
        primary = primary[:limit]
        revised: list[db.PageRow] = []
        if not more:
            budget = limit - len(primary)
            revised = reads.revised_page(filt, after=revised_after, until=until, limit=budget + 1)
            more = len(revised) > budget
            revised = revised[:budget]
        return _Pages(regions, primary, revised, more)

    def _respond(self, request: pb.FederationFetchRequest, pages: _Pages) -> FetchOutcome:
        encoder = self._encoder(pages.regions)
        response = pb.FederationFetchResponse.FromString(
            encoder.encode(pages.primary, _KEYS_FIELD) + encoder.encode(pages.revised, _REVISED_FIELD))
        response.partialResponse = pages.more
        response.nextFetchState.CopyFrom(pb.FetchState(
            keyCursor=_next_cursor(request.state.keyCursor, pages.primary, cursor.PRIMARY),
            revisedKeyCursor=_next_cursor(request.state.revisedKeyCursor, pages.revised, cursor.REVISED)))
        return FetchOutcome(response=response, keys=len(pages.primary), revised=len(pages.revised),
                            partial=pages.more)

    def _encoder(self, regions: Regions) -> _KeyEncoder:
        encoder = self._encoders.get(regions)
        if encoder is None:
            if len(self._encoders) >= _ENCODERS:
                self._encoders.clear()
            encoder = self._encoders[regions] = _KeyEncoder(regions)
        return encoder


def _system_clock() -> datetime:
    return datetime.now(UTC)


def _tls_credentials(tls_cert: str | Path, tls_key: str | Path) -> grpc.ServerCredentials:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem, key_pem = Path(tls_cert).read_bytes(), Path(tls_key).read_bytes()
    # gRPC reports a bad certificate only at the first handshake; check both now so start-up fails clearly.
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ValueError(f"TLS certificate {tls_cert} is not a PEM certificate (chain)") from None
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"TLS key {tls_key} is not an unencrypted PEM private key") from None
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def build_server(settings: Settings, engine: Engine, host: str, port: int, *, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, max_workers: int = 8,
                 clock: Clock | None = None) -> tuple[grpc.Server, int]:
    """A Fetch server bound to host:port (port 0 picks a free one), not yet started; returns it and its port.

    TLS is used when ``tls_cert`` and ``tls_key`` (PEM files) are given. Raises ValueError for bad arguments or
    TLS files and OSError when the address cannot be bound.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key")
    if max_workers < 1:
        raise ValueError("max_workers must be at least 1")
    credentials = _tls_credentials(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="federation-fetch"),
        # Without this, a second server on the same port would silently share its traffic (SO_REUSEPORT).
        options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_FederationServicer_to_server(
        FederationServicer(settings, engine, clock=clock or _system_clock), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {address}")
    return server, bound


def serve(settings: Settings, engine: Engine, host: str, port: int, *, tls_cert: str | Path | None = None,
          tls_key: str | Path | None = None, max_workers: int = 8, grace: timedelta = timedelta(seconds=10),
          on_ready: Callable[[int], None] | None = None) -> None:
    """Run the Fetch server until SIGTERM or SIGINT, then let calls in flight finish for up to ``grace``."""
    server, bound = build_server(settings, engine, host, port, tls_cert=tls_cert, tls_key=tls_key,
                                 max_workers=max_workers)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        server.start()
        log.info("federation server listening on %s:%d (%s, %d workers)", host, bound,
                 "TLS" if tls_cert else "plaintext", max_workers)
        if on_ready is not None:
            on_ready(bound)
        while not stop.wait(1.0):  # short waits keep the main thread responsive to signals
            pass
        log.info("federation server stopping (grace %ss)", int(grace.total_seconds()))
        server.stop(grace.total_seconds()).wait()
    finally:
        server.stop(None)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("federation server stopped")
