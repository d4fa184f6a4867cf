"""Revision tokens: AES-256-GCM sealed lists of revisable keys under rotating, KEK-wrapped data keys."""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enpipeline.errors import RevisionTokenError
from enpipeline.model import RevisableKey
from enpipeline.proto import revision_pb2

logger = logging.getLogger(__name__)

DEK_SIZE = 32  # AES-256 data-encryption key, as the reference's CreateRevisionKey
KEK_SIZE = 32  # AES-256 key-encryption key (our stand-in for the reference's KMS key)
KEY_AAD_SIZE = 16  # per-row random AAD bound into the DEK wrapping
NONCE_SIZE = 12  # GCM standard nonce; the reference uses cipher.NewGCM's NonceSize()
TAG_SIZE = 16
DEFAULT_MIN_LENGTH = 28  # REVISION_TOKEN_MIN_LENGTH
MAX_CACHE_DURATION = timedelta(minutes=60)  # the reference refuses longer caches
FILLER_TEK = bytes(16)

# A token naming a kid we do not know forces a reload, but an attacker can send arbitrary kids, so such
# forced reloads are spaced at least this far apart (seconds on the codec's clock).
FORCED_REFRESH_MIN_INTERVAL = 1.0

# Go's strconv.ParseInt(kid, 10, 64) accepts an optional sign and ASCII digits only; Python's int() would
# also take spaces, underscores and non-ASCII digits, so the kid is checked against this first.
_KID_RE = re.compile(r"[+-]?[0-9]+")
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class RevisionKeyRecord:
    """One row of RevisionKeys."""

    kid: int
    aad: bytes | None  # per-key random 16-byte AAD used when wrapping the DEK
    wrapped_cipher: bytes | None  # DEK wrapped by the KEK; None once destroyed
    created_at: datetime
    allowed: bool


class RevisionKeyStore(Protocol):
    """Persistence of RevisionKeys; the Postgres implementation lives with the database code."""

    def list_allowed(self) -> list[RevisionKeyRecord]:
        """Rows with allowed=true, newest created_at first."""
        ...

    def insert(self, aad: bytes, wrapped_cipher: bytes, created_at: datetime) -> int:
        """Insert an allowed key and return its kid."""
        ...

    def destroy(self, kid: int) -> None:
        """Set wrapped_cipher=NULL, aad=NULL, allowed=false."""
        ...


class RevisionKeyError(RuntimeError):
    """No usable effective key for encryption (the stored DEK could not be unwrapped): a server fault."""


class InMemoryRevisionKeyStore:
    """A RevisionKeyStore kept in a list, for tests and local fakes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[int, RevisionKeyRecord] = {}
        self._next_kid = 1  # BIGSERIAL starts at 1

    def list_allowed(self) -> list[RevisionKeyRecord]:
        with self._lock:
            rows = [r for r in self._rows.values() if r.allowed]
        # Postgres leaves created_at ties unordered; the kid tiebreak just makes the fake deterministic.
        return sorted(rows, key=lambda r: (r.created_at, r.kid), reverse=True)

    def insert(self, aad: bytes, wrapped_cipher: bytes, created_at: datetime) -> int:
        with self._lock:
            kid = self._next_kid
            self._next_kid += 1
            self._rows[kid] = RevisionKeyRecord(kid, bytes(aad), bytes(wrapped_cipher), created_at, True)
            return kid

    def destroy(self, kid: int) -> None:
        with self._lock:
            row = self._rows[kid]  # KeyError: the SQL version would update 0 rows, which is also an error
            self._rows[kid] = RevisionKeyRecord(kid, None, None, row.created_at, False)

    def get(self, kid: int) -> RevisionKeyRecord | None:
        """Any row, destroyed or not (test helper; not part of the Protocol)."""
        with self._lock:
            return self._rows.get(kid)


class KeyWrapper:
    """Wraps DEKs with a local AES-256-GCM KEK (in place of the reference's KMS); output nonce||ct||tag."""

    def __init__(self, kek: bytes) -> None:
        if not isinstance(kek, bytes | bytearray) or len(kek) != KEK_SIZE:
            raise ValueError(f"revision token KEK must be {KEK_SIZE} bytes")
        self._aead = AESGCM(bytes(kek))

    def __repr__(self) -> str:  # the KEK must never reach logs
        return "KeyWrapper(<redacted>)"

    def wrap(self, dek: bytes, aad: bytes) -> bytes:
        if len(dek) != DEK_SIZE:
            raise ValueError(f"DEK must be {DEK_SIZE} bytes")
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, bytes(dek), bytes(aad))

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < NONCE_SIZE + TAG_SIZE:
            raise RevisionTokenError("wrapped revision key is malformed")
        try:
            dek = self._aead.decrypt(bytes(wrapped[:NONCE_SIZE]), bytes(wrapped[NONCE_SIZE:]), bytes(aad))
        except InvalidTag as exc:
            raise RevisionTokenError("unable to unwrap revision key (wrong KEK or AAD)") from exc
        if len(dek) != DEK_SIZE:
            raise RevisionTokenError("unwrapped revision key has the wrong size")
        return dek


def create_key(store: RevisionKeyStore, wrapper: KeyWrapper, now: datetime) -> int:
    """Generate a random DEK, wrap it under a fresh per-key AAD, store it and return its kid."""
    dek = os.urandom(DEK_SIZE)
    aad = os.urandom(KEY_AAD_SIZE)
    return store.insert(aad, wrapper.wrap(dek, aad), now)


def _newest_first(records: Sequence[RevisionKeyRecord]) -> list[RevisionKeyRecord]:
    # The store promises the order, but "effective key = first row" is security relevant, so re-sort
    # (stable, so the store's tiebreak for equal created_at survives).
    return sorted((r for r in records if r.allowed), key=lambda r: r.created_at, reverse=True)


@dataclass(frozen=True)
class _KeyCache:
    """An immutable snapshot, swapped whole so readers never need the lock."""

    deks: Mapping[int, bytes] = field(repr=False)  # kid -> unwrapped DEK, only keys that unwrapped
    effective_kid: int | None  # newest allowed kid, even if its DEK failed to unwrap
    loaded_at: float
    expires_at: float


class RevisionTokenCodec:
    """Encrypts and decrypts revision tokens with a cached view of the allowed revision keys."""

    def __init__(
        self,
        store: RevisionKeyStore,
        wrapper: KeyWrapper,
        aad: bytes,
        *,
        min_length: int = DEFAULT_MIN_LENGTH,
        cache_duration: timedelta = timedelta(minutes=1),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not aad:
            raise ValueError("revision token AAD is required")
        if min_length < 0:
            raise ValueError("min_length must be >= 0")
        if not timedelta(0) <= cache_duration <= MAX_CACHE_DURATION:
            raise ValueError("cache_duration must be between 0 and 60 minutes")
        self._store = store
        self._wrapper = wrapper
        self._aad = bytes(aad)
        self._min_length = min_length
        self._cache_seconds = cache_duration.total_seconds()
        self._clock = clock
        self._lock = threading.Lock()  # serialises reloads and first-key creation only
        self._cache: _KeyCache | None = None

    def __repr__(self) -> str:  # the AAD and DEKs must never reach logs
        return f"RevisionTokenCodec(min_length={self._min_length}, cache_seconds={self._cache_seconds})"

    # -- key cache ---------------------------------------------------------------------------------

    def _load(self, previous: _KeyCache | None) -> _KeyCache:
        records = _newest_first(self._store.list_allowed())
        known = previous.deks if previous is not None else {}
        deks: dict[int, bytes] = {}
        for rec in records:
            # Rows never change key material while allowed, so a DEK unwrapped earlier is reused: the
            # reference does the same to avoid a KMS call per key per refresh.
            if rec.kid in known:
                deks[rec.kid] = known[rec.kid]
                continue
            try:
                if rec.wrapped_cipher is None or rec.aad is None:
                    raise RevisionTokenError("allowed revision key has no key material")
                deks[rec.kid] = self._wrapper.unwrap(rec.wrapped_cipher, rec.aad)
            except RevisionTokenError:
                # One bad row must not stop every other key from decrypting; encrypt refuses on its own
                # if the bad row is the effective one. It is retried on the next reload.
                logger.error("allowed revision key %d cannot be unwrapped", rec.kid)
        now = self._clock()
        return _KeyCache(
            deks=deks,
            effective_kid=records[0].kid if records else None,
            loaded_at=now,
            expires_at=now + self._cache_seconds,
        )

    def _snapshot(self, *, force: bool = False) -> _KeyCache:
        cache = self._cache
        if cache is not None and not force and self._clock() < cache.expires_at:
            return cache
        with self._lock:
            cache = self._cache  # another thread may have reloaded while we waited
            if cache is not None:
                now = self._clock()
                if not force and now < cache.expires_at:
                    return cache
                if force and now - cache.loaded_at < FORCED_REFRESH_MIN_INTERVAL:
                    return cache
            # If the reload raises, an expired snapshot stays in place but the checks above never serve it,
            # so no possibly-destroyed key is used and every later call retries the reload.
            cache = self._load(cache)
            self._cache = cache
            return cache

    def ensure_key(self, now: datetime) -> None:
        """Create the first revision key if the table has no allowed key (startup bootstrap)."""
        with self._lock:
            if self._store.list_allowed():
                return
            kid = create_key(self._store, self._wrapper, now)
            logger.info("created first revision key %d", kid)
            self._cache = None  # make the next use reload and see the new key

    # -- tokens ------------------------------------------------------------------------------------

    def encrypt(self, keys: Sequence[RevisableKey], now: datetime) -> str:
        """Seal ``keys`` (already merged and de-duplicated by the caller) into a std-base64 token.

        Returns "" for no keys, so the API omits the token. Raises ValueError if an interval does not fit
        int32, RevisionKeyError if the effective key cannot be unwrapped; store errors propagate.
        """
        if not keys:
            return ""
        cache = self._snapshot()
        if cache.effective_kid is None:
            self.ensure_key(now)
            cache = self._snapshot()
        kid = cache.effective_kid
        dek = cache.deks.get(kid) if kid is not None else None
        if kid is None or dek is None:
            # Falling back to an older key would silently defeat rotation, so refuse instead.
            raise RevisionKeyError(f"effective revision key {kid} is not usable")

        data = revision_pb2.RevisionTokenData()
        for k in keys:
            data.revisableKeys.add(
                temporaryExposureKey=bytes(k.key),
                intervalNumber=k.interval_number,
                intervalCount=k.interval_count,
            )
        # Filler entries as in the reference, so every token holds at least min_length entries; decrypt drops
        # them. Fillers encode to 20 bytes and real entries to about 28, so the size still grows with the key
        # count: the wire format fixes the entry count, not the length.
        for _ in range(self._min_length - len(keys)):
            data.revisableKeys.add(temporaryExposureKey=FILLER_TEK, intervalNumber=0, intervalCount=0)

        nonce = os.urandom(NONCE_SIZE)
        sealed = nonce + AESGCM(dek).encrypt(nonce, data.SerializeToString(), self._aad)
        envelope = revision_pb2.RevisionToken(kid=str(kid), data=sealed)
        return base64.b64encode(envelope.SerializeToString()).decode("ascii")

    def decrypt(self, token: bytes) -> list[RevisableKey]:
        """Open an envelope (already base64-decoded); every failure, store errors included, is RevisionTokenError.

        Store errors are folded in because the reference's publish treats any unmarshal error as "token
        undecryptable"; the original exception is kept as ``__cause__``.
        """
        if not isinstance(token, bytes | bytearray | memoryview):
            raise RevisionTokenError("revision token must be bytes")
        envelope = revision_pb2.RevisionToken()
        try:
            envelope.ParseFromString(bytes(token))
        except Exception as exc:  # DecodeError in practice, but the upb and python backends differ in detail
            raise RevisionTokenError("unable to parse revision token envelope") from exc
        kid = _parse_kid(envelope.kid)

        try:
            dek = self._snapshot().deks.get(kid)
            if dek is None:
                # Another worker may have started using a key created after our last reload.
                dek = self._snapshot(force=True).deks.get(kid)
        except Exception as exc:
            raise RevisionTokenError("unable to load revision keys") from exc
        if dek is None:
            raise RevisionTokenError(f"revision token has an unknown or destroyed key id {kid}")

        sealed = envelope.data
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            raise RevisionTokenError("revision token ciphertext is malformed")
        try:
            plaintext = AESGCM(dek).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], self._aad)
        except InvalidTag as exc:
            raise RevisionTokenError("unable to decrypt revision token") from exc

        data = revision_pb2.RevisionTokenData()
        try:
            data.ParseFromString(plaintext)
        except Exception as exc:
            raise RevisionTokenError("unable to parse revision token data") from exc
        return [
            RevisableKey(key=bytes(rk.temporaryExposureKey), interval_number=rk.intervalNumber,
                         interval_count=rk.intervalCount)
            for rk in data.revisableKeys
            if not (rk.intervalNumber == 0 and rk.intervalCount == 0)  # filler, exactly as the reference
        ]


def _parse_kid(kid: str) -> int:
    if not _KID_RE.fullmatch(kid):
        raise RevisionTokenError(f"revision token has an invalid key id {kid[:32]!r}")
    value = int(kid)
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise RevisionTokenError("revision token key id is out of range")
    return value


@dataclass(frozen=True)
class RotationResult:
    created: int | None = None
    destroyed: list[int] = field(default_factory=list)


def rotate_keys(
    store: RevisionKeyStore,
    wrapper: KeyWrapper,
    now: datetime,
    *,
    new_key_period: timedelta,
    delete_old_key_period: timedelta,
) -> RotationResult:
    """One /rotate-keys pass (the caller holds the key-rotation lock).

    A new key is made when the newest allowed key is >= ``new_key_period`` old (or none exists). A
    non-effective key is destroyed once the next-newer key has existed >= ``delete_old_key_period``,
    so tokens it sealed stay decryptable for at least that long after it stopped encrypting.
    """
    if new_key_period <= timedelta(0) or delete_old_key_period <= timedelta(0):
        raise ValueError("rotation periods must be positive")
    allowed = _newest_first(store.list_allowed())

    created: int | None = None
    if not allowed or now - allowed[0].created_at >= new_key_period:
        created = create_key(store, wrapper, now)
        effective_kid = created
        newer_created_at = now
    else:
        effective_kid = allowed[0].kid
        newer_created_at = allowed[0].created_at

    destroyed: list[int] = []
    for rec in allowed:
        if rec.kid != effective_kid and now - newer_created_at >= delete_old_key_period:
            store.destroy(rec.kid)
            destroyed.append(rec.kid)
            logger.warning("destroyed revision key %d", rec.kid)
        newer_created_at = rec.created_at
    return RotationResult(created=created, destroyed=destroyed)
