"""Unit tests for enpipeline.revision (revision-token crypto, key cache and rotation)."""

from __future__ import annotations

import base64
import os
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enpipeline.errors import RevisionTokenError
from enpipeline.model import RevisableKey
from enpipeline.proto import revision_pb2
from enpipeline.revision import (
    FORCED_REFRESH_MIN_INTERVAL,
    InMemoryRevisionKeyStore,
    KeyWrapper,
    RevisionKeyError,
    RevisionKeyRecord,
    RevisionTokenCodec,
    RotationResult,
    create_key,
    rotate_keys,
)

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
AAD = bytes(range(16, 0, -1))  # the reference test's AAD
KEK = bytes(range(32))
NEW_KEY_PERIOD = timedelta(hours=168)
DELETE_OLD_KEY_PERIOD = timedelta(hours=360)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class CountingStore(InMemoryRevisionKeyStore):
    def __init__(self) -> None:
        super().__init__()
        self.list_calls = 0
        self.fail = False

    def list_allowed(self) -> list[RevisionKeyRecord]:
        self.list_calls += 1
        if self.fail:
            raise ConnectionError("database down")
        return super().list_allowed()


def rk(seed: int, interval_number: int = 2_722_000, interval_count: int = 144) -> RevisableKey:
    return RevisableKey(key=bytes([seed]) * 16, interval_number=interval_number, interval_count=interval_count)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def wrapper() -> KeyWrapper:
    return KeyWrapper(KEK)


@pytest.fixture
def codec(store: CountingStore, wrapper: KeyWrapper, clock: FakeClock) -> RevisionTokenCodec:
    c = RevisionTokenCodec(store, wrapper, AAD, clock=clock)
    c.ensure_key(T0)
    return c


def envelope(token: str) -> revision_pb2.RevisionToken:
    env = revision_pb2.RevisionToken()
    env.ParseFromString(base64.b64decode(token, validate=True))
    return env


def dek_of(store: InMemoryRevisionKeyStore, wrapper: KeyWrapper, kid: int) -> bytes:
    rec = store.get(kid)
    assert rec is not None and rec.wrapped_cipher is not None and rec.aad is not None
    return wrapper.unwrap(rec.wrapped_cipher, rec.aad)


def open_like_reference(token: str, dek: bytes, aad: bytes) -> revision_pb2.RevisionTokenData:
    """What the Go TokenManager does, minus the filler filter: envelope -> nonce||ct -> RevisionTokenData."""
    env = envelope(token)
    plaintext = AESGCM(dek).decrypt(env.data[:12], env.data[12:], aad)
    data = revision_pb2.RevisionTokenData()
    data.ParseFromString(plaintext)
    return data


def raw(token: str) -> bytes:
    return base64.b64decode(token)


# -- round trip and format -----------------------------------------------------------------------


def test_round_trip(codec: RevisionTokenCodec) -> None:
    keys = [rk(1, 2_722_000, 144), rk(2, 2_722_144, 144), rk(3, 2_722_288, 57)]
    token = codec.encrypt(keys, T0)
    assert codec.decrypt(raw(token)) == keys


def test_empty_keys_give_empty_token(codec: RevisionTokenCodec, store: CountingStore) -> None:
    calls = store.list_calls
    assert codec.encrypt([], T0) == ""
    assert store.list_calls == calls  # no key lookup for a token that will not be sent


def test_token_is_std_base64_with_padding(codec: RevisionTokenCodec) -> None:
    for n in range(1, 6):
        token = codec.encrypt([rk(i) for i in range(n)], T0)
        assert len(token) % 4 == 0
        assert "-" not in token and "_" not in token
        assert base64.b64encode(base64.b64decode(token, validate=True)).decode() == token


def test_envelope_parses_as_revision_token_with_decimal_kid(
    codec: RevisionTokenCodec, store: CountingStore
) -> None:
    token = codec.encrypt([rk(1)], T0)
    env = envelope(token)
    (effective,) = store.list_allowed()
    assert env.kid == str(effective.kid)
    assert env.kid.isdigit()
    # data = nonce(12) || ciphertext || tag(16), and nonces are random per token
    assert len(env.data) > 12 + 16
    assert envelope(codec.encrypt([rk(1)], T0)).data[:12] != env.data[:12]


def test_padding_to_min_length_entries(codec: RevisionTokenCodec, store: CountingStore, wrapper: KeyWrapper) -> None:
    dek = dek_of(store, wrapper, int(envelope(codec.encrypt([rk(0)], T0)).kid))
    for n in (1, 14, 28):
        keys = [rk(i + 1) for i in range(n)]
        data = open_like_reference(codec.encrypt(keys, T0), dek, AAD)
        assert len(data.revisableKeys) == 28
        fillers = data.revisableKeys[n:]
        assert all(f.temporaryExposureKey == bytes(16) for f in fillers)
        assert all(f.intervalNumber == 0 and f.intervalCount == 0 for f in fillers)
    # More keys than the minimum: no filler at all.
    data = open_like_reference(codec.encrypt([rk(i + 1) for i in range(30)], T0), dek, AAD)
    assert len(data.revisableKeys) == 30


def test_ciphertext_length_is_the_padded_plaintext_length(codec: RevisionTokenCodec) -> None:
    # The reference's padding fixes the entry count, not the byte count: a filler entry serialises to
    # 20 bytes (proto3 omits IN=0/IC=0) and a real key to 28, so 1 key and 14 keys differ by 13 * 8 bytes.
    one = envelope(codec.encrypt([rk(1)], T0)).data
    fourteen = envelope(codec.encrypt([rk(i + 1) for i in range(14)], T0)).data
    filler_entry = 2 + 2 + 16
    real_entry = len(revision_pb2.RevisionTokenData(revisableKeys=[
        revision_pb2.RevisableKey(temporaryExposureKey=bytes(16), intervalNumber=2_722_000, intervalCount=144)
    ]).SerializeToString())
    assert real_entry == 28
    assert len(one) == 12 + 16 + real_entry + 27 * filler_entry
    assert len(fourteen) == 12 + 16 + 14 * real_entry + 14 * filler_entry
    # Same key count -> same size regardless of key values with the same varint widths.
    assert len(envelope(codec.encrypt([rk(9)], T0)).data) == len(one)


def test_min_length_zero_means_no_filler(store: CountingStore, wrapper: KeyWrapper, clock: FakeClock) -> None:
    codec = RevisionTokenCodec(store, wrapper, AAD, min_length=0, clock=clock)
    token = codec.encrypt([rk(1)], T0)
    dek = dek_of(store, wrapper, int(envelope(token).kid))
    assert len(open_like_reference(token, dek, AAD).revisableKeys) == 1


def test_filler_entries_are_dropped(codec: RevisionTokenCodec) -> None:
    # Only IN==0 && IC==0 marks filler; IN=0 with IC>0 (or the reverse) is a real entry.
    keys = [rk(1), rk(2, interval_number=0, interval_count=1), rk(3, interval_number=5, interval_count=0)]
    got = codec.decrypt(raw(codec.encrypt(keys, T0)))
    assert got == keys
    assert all(k.key != bytes(16) for k in got)


def test_out_of_range_interval_is_rejected(codec: RevisionTokenCodec) -> None:
    with pytest.raises(ValueError):
        codec.encrypt([rk(1, interval_number=2**31)], T0)


# -- failures ------------------------------------------------------------------------------------


def test_tampered_data_fails(codec: RevisionTokenCodec) -> None:
    env = envelope(codec.encrypt([rk(1)], T0))
    for pos in (0, 12, len(env.data) // 2, len(env.data) - 1):  # nonce, ciphertext and tag
        data = bytearray(env.data)
        data[pos] ^= 0x01
        bad = revision_pb2.RevisionToken(kid=env.kid, data=bytes(data)).SerializeToString()
        with pytest.raises(RevisionTokenError):
            codec.decrypt(bad)


def test_truncated_and_garbage_tokens_fail(codec: RevisionTokenCodec) -> None:
    token = raw(codec.encrypt([rk(1)], T0))
    env = revision_pb2.RevisionToken()
    env.ParseFromString(token)
    short = revision_pb2.RevisionToken(kid=env.kid, data=env.data[:20]).SerializeToString()
    for bad in (b"", b"\xff\xff\xff", token[:-5], short, os.urandom(64), "not bytes"):
        with pytest.raises(RevisionTokenError):
            codec.decrypt(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("kid", ["", "abc", " 1", "1 ", "1_0", "٣", "99999999999999999999"])
def test_malformed_kid_fails(codec: RevisionTokenCodec, kid: str) -> None:
    env = envelope(codec.encrypt([rk(1)], T0))
    bad = revision_pb2.RevisionToken(kid=kid, data=env.data).SerializeToString()
    with pytest.raises(RevisionTokenError):
        codec.decrypt(bad)


def test_wrong_aad_fails(codec: RevisionTokenCodec, store: CountingStore, wrapper: KeyWrapper,
                         clock: FakeClock) -> None:
    token = codec.encrypt([rk(1)], T0)
    other = RevisionTokenCodec(store, wrapper, b"another-aad-value", clock=clock)
    with pytest.raises(RevisionTokenError):
        other.decrypt(raw(token))
    assert codec.decrypt(raw(token)) == [rk(1)]


def test_unknown_kid_fails(codec: RevisionTokenCodec) -> None:
    env = envelope(codec.encrypt([rk(1)], T0))
    bad = revision_pb2.RevisionToken(kid=str(int(env.kid) + 100), data=env.data).SerializeToString()
    with pytest.raises(RevisionTokenError, match="unknown or destroyed"):
        codec.decrypt(bad)


def test_token_under_another_allowed_key_id_fails(codec: RevisionTokenCodec, store: CountingStore,
                                                  wrapper: KeyWrapper, clock: FakeClock) -> None:
    # Relabelling a token with another valid kid must not decrypt (GCM auth with the wrong DEK).
    env = envelope(codec.encrypt([rk(1)], T0))
    second = create_key(store, wrapper, T0 + DAY)
    clock.advance(61)
    relabelled = revision_pb2.RevisionToken(kid=str(second), data=env.data).SerializeToString()
    with pytest.raises(RevisionTokenError, match="decrypt"):
        codec.decrypt(relabelled)


def test_destroyed_key_fails(codec: RevisionTokenCodec, store: CountingStore, clock: FakeClock) -> None:
    token = codec.encrypt([rk(1)], T0)
    kid = int(envelope(token).kid)
    store.destroy(kid)
    rec = store.get(kid)
    assert rec is not None and rec.wrapped_cipher is None and rec.aad is None and not rec.allowed
    clock.advance(61)  # past the 1m cache
    with pytest.raises(RevisionTokenError):
        codec.decrypt(raw(token))
    # A fresh codec (another worker) never had the key either.
    with pytest.raises(RevisionTokenError):
        RevisionTokenCodec(store, KeyWrapper(KEK), AAD, clock=clock).decrypt(raw(token))


def test_store_failure_during_decrypt_is_token_error(codec: RevisionTokenCodec, store: CountingStore,
                                                     clock: FakeClock) -> None:
    token = codec.encrypt([rk(1)], T0)
    store.fail = True
    clock.advance(61)
    with pytest.raises(RevisionTokenError) as info:
        codec.decrypt(raw(token))
    assert isinstance(info.value.__cause__, ConnectionError)
    # Encrypt lets the store error through (it is a server fault, not a bad token).
    with pytest.raises(ConnectionError):
        codec.encrypt([rk(1)], T0)
    store.fail = False
    assert codec.decrypt(raw(token)) == [rk(1)]


def test_older_allowed_key_still_decrypts_after_new_key(codec: RevisionTokenCodec, store: CountingStore,
                                                        wrapper: KeyWrapper, clock: FakeClock) -> None:
    old_token = codec.encrypt([rk(1)], T0)
    old_kid = int(envelope(old_token).kid)
    new_kid = create_key(store, wrapper, T0 + 7 * DAY)
    clock.advance(61)
    new_token = codec.encrypt([rk(2)], T0 + 7 * DAY)
    assert int(envelope(new_token).kid) == new_kid != old_kid  # newest allowed key encrypts
    assert codec.decrypt(raw(old_token)) == [rk(1)]
    assert codec.decrypt(raw(new_token)) == [rk(2)]


# -- key bootstrap and cache ---------------------------------------------------------------------


def test_ensure_key_creates_only_the_first_key(store: CountingStore, wrapper: KeyWrapper, clock: FakeClock) -> None:
    codec = RevisionTokenCodec(store, wrapper, AAD, clock=clock)
    codec.ensure_key(T0)
    codec.ensure_key(T0 + DAY)
    (only,) = store.list_allowed()
    assert only.created_at == T0
    assert only.aad is not None and len(only.aad) == 16
    assert only.wrapped_cipher is not None and len(wrapper.unwrap(only.wrapped_cipher, only.aad)) == 32


def test_encrypt_bootstraps_an_empty_table(store: CountingStore, wrapper: KeyWrapper, clock: FakeClock) -> None:
    codec = RevisionTokenCodec(store, wrapper, AAD, clock=clock)
    token = codec.encrypt([rk(1)], T0)
    (only,) = store.list_allowed()
    assert envelope(token).kid == str(only.kid)
    assert codec.decrypt(raw(token)) == [rk(1)]


def test_decrypt_with_empty_table_fails_without_creating_a_key(store: CountingStore, wrapper: KeyWrapper,
                                                               clock: FakeClock) -> None:
    codec = RevisionTokenCodec(store, wrapper, AAD, clock=clock)
    bad = revision_pb2.RevisionToken(kid="1", data=os.urandom(60)).SerializeToString()
    with pytest.raises(RevisionTokenError):
        codec.decrypt(bad)
    assert store.list_allowed() == []


def test_keys_are_cached_for_cache_duration(codec: RevisionTokenCodec, store: CountingStore,
                                            clock: FakeClock) -> None:
    token = codec.encrypt([rk(1)], T0)
    calls = store.list_calls
    for _ in range(10):
        codec.decrypt(raw(codec.encrypt([rk(2)], T0)))
    codec.decrypt(raw(token))
    assert store.list_calls == calls
    clock.advance(59)
    codec.encrypt([rk(3)], T0)
    assert store.list_calls == calls
    clock.advance(2)  # now past 1 minute
    codec.encrypt([rk(3)], T0)
    assert store.list_calls == calls + 1


def test_destroyed_key_still_served_from_cache_until_expiry(codec: RevisionTokenCodec, store: CountingStore,
                                                            clock: FakeClock) -> None:
    # Same window as the reference: a destroy reaches each worker within one cache period.
    token = codec.encrypt([rk(1)], T0)
    store.destroy(int(envelope(token).kid))
    assert codec.decrypt(raw(token)) == [rk(1)]
    clock.advance(60)
    with pytest.raises(RevisionTokenError):
        codec.decrypt(raw(token))


def test_unknown_kid_triggers_one_refresh(codec: RevisionTokenCodec, store: CountingStore, wrapper: KeyWrapper,
                                         clock: FakeClock) -> None:
    codec.encrypt([rk(1)], T0)  # worker 1 has a warm cache
    new_kid = create_key(store, wrapper, T0 + 7 * DAY)  # rotation in another process
    worker2 = RevisionTokenCodec(store, wrapper, AAD, clock=clock)
    token = worker2.encrypt([rk(2)], T0 + 7 * DAY)
    assert envelope(token).kid == str(new_kid)

    clock.advance(FORCED_REFRESH_MIN_INTERVAL + 0.5)  # well inside worker 1's cache period
    calls = store.list_calls
    assert codec.decrypt(raw(token)) == [rk(2)]
    assert store.list_calls == calls + 1
    # The refreshed cache now also encrypts with the new key.
    assert envelope(codec.encrypt([rk(3)], T0 + 7 * DAY)).kid == str(new_kid)
    assert store.list_calls == calls + 1


def test_forced_refreshes_are_rate_limited(codec: RevisionTokenCodec, store: CountingStore,
                                          clock: FakeClock) -> None:
    env = envelope(codec.encrypt([rk(1)], T0))
    bogus = revision_pb2.RevisionToken(kid="424242", data=env.data).SerializeToString()
    clock.advance(FORCED_REFRESH_MIN_INTERVAL + 0.1)
    calls = store.list_calls
    for _ in range(20):
        with pytest.raises(RevisionTokenError):
            codec.decrypt(bogus)
    assert store.list_calls == calls + 1
    clock.advance(FORCED_REFRESH_MIN_INTERVAL + 0.1)
    with pytest.raises(RevisionTokenError):
        codec.decrypt(bogus)
    assert store.list_calls == calls + 2


def test_refresh_reuses_unwrapped_deks(codec: RevisionTokenCodec, store: CountingStore, clock: FakeClock,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    token = codec.encrypt([rk(1)], T0)
    unwraps: list[bytes] = []
    original = KeyWrapper.unwrap

    def counting(self: KeyWrapper, wrapped: bytes, aad: bytes) -> bytes:
        unwraps.append(aad)
        return original(self, wrapped, aad)

    monkeypatch.setattr(KeyWrapper, "unwrap", counting)
    clock.advance(120)
    assert codec.decrypt(raw(token)) == [rk(1)]
    assert unwraps == []  # reload happened, but the known kid kept its DEK (no KMS round trip)


def test_unwrappable_effective_key_refuses_encrypt(store: CountingStore, clock: FakeClock) -> None:
    good = KeyWrapper(KEK)
    old = RevisionTokenCodec(store, good, AAD, clock=clock)
    token = old.encrypt([rk(1)], T0)
    create_key(store, KeyWrapper(os.urandom(32)), T0 + DAY)  # newest row wrapped by a KEK we lack
    codec = RevisionTokenCodec(store, good, AAD, clock=clock)
    with pytest.raises(RevisionKeyError):
        codec.encrypt([rk(2)], T0 + DAY)
    # Older keys keep working for decryption.
    assert codec.decrypt(raw(token)) == [rk(1)]


def test_concurrent_use_is_consistent(codec: RevisionTokenCodec, store: CountingStore) -> None:
    errors: list[BaseException] = []
    codec.encrypt([rk(0)], T0)
    calls = store.list_calls

    def work(seed: int) -> None:
        try:
            for i in range(50):
                keys = [rk((seed * 50 + i) % 256)]
                assert codec.decrypt(raw(codec.encrypt(keys, T0))) == keys
        except BaseException as exc:  # re-raised in the main thread via the list below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.list_calls == calls


def test_codec_argument_validation(store: CountingStore, wrapper: KeyWrapper) -> None:
    with pytest.raises(ValueError):
        RevisionTokenCodec(store, wrapper, b"")
    with pytest.raises(ValueError):
        RevisionTokenCodec(store, wrapper, AAD, cache_duration=timedelta(minutes=61))
    with pytest.raises(ValueError):
        RevisionTokenCodec(store, wrapper, AAD, min_length=-1)
    assert repr(AAD) not in repr(RevisionTokenCodec(store, wrapper, AAD))
    assert repr(KEK) not in repr(wrapper) and KEK.hex() not in repr(wrapper)


# -- KeyWrapper ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_key_wrapper_rejects_wrong_size_kek(size: int) -> None:
    with pytest.raises(ValueError):
        KeyWrapper(os.urandom(size))


def test_key_wrapper_round_trip_and_format(wrapper: KeyWrapper) -> None:
    dek, aad = os.urandom(32), os.urandom(16)
    wrapped = wrapper.wrap(dek, aad)
    assert len(wrapped) == 12 + 32 + 16  # nonce || ct || tag
    assert wrapper.unwrap(wrapped, aad) == dek
    # Independently checkable with plain AES-GCM.
    assert AESGCM(KEK).decrypt(wrapped[:12], wrapped[12:], aad) == dek
    assert wrapper.wrap(dek, aad) != wrapped  # fresh nonce


def test_key_wrapper_rejects_wrong_aad_kek_and_tampering(wrapper: KeyWrapper) -> None:
    dek, aad = os.urandom(32), os.urandom(16)
    wrapped = wrapper.wrap(dek, aad)
    with pytest.raises(RevisionTokenError):
        wrapper.unwrap(wrapped, os.urandom(16))
    with pytest.raises(RevisionTokenError):
        KeyWrapper(os.urandom(32)).unwrap(wrapped, aad)
    with pytest.raises(RevisionTokenError):
        wrapper.unwrap(wrapped[:-1] + bytes([wrapped[-1] ^ 1]), aad)
    with pytest.raises(RevisionTokenError):
        wrapper.unwrap(wrapped[:20], aad)
    with pytest.raises(ValueError):
        wrapper.wrap(os.urandom(16), aad)


# -- rotation ------------------------------------------------------------------------------------


def rotate(store: InMemoryRevisionKeyStore, wrapper: KeyWrapper, now: datetime) -> RotationResult:
    return rotate_keys(store, wrapper, now, new_key_period=NEW_KEY_PERIOD,
                       delete_old_key_period=DELETE_OLD_KEY_PERIOD)


def test_rotation_timeline(store: CountingStore, wrapper: KeyWrapper, clock: FakeClock) -> None:
    codec = RevisionTokenCodec(store, wrapper, AAD, clock=clock)

    def at(day: float) -> datetime:
        clock.advance(3600)  # every step is past the codec's cache period
        return T0 + timedelta(days=day)

    day0 = rotate(store, wrapper, at(0))
    assert day0.created is not None and day0.destroyed == []
    key_a = day0.created
    token_a = codec.encrypt([rk(1)], at(0.5))
    assert envelope(token_a).kid == str(key_a)

    assert rotate(store, wrapper, at(6)) == RotationResult(created=None, destroyed=[])
    assert rotate(store, wrapper, T0 + NEW_KEY_PERIOD - timedelta(seconds=1)) == RotationResult(None, [])

    day7 = rotate(store, wrapper, at(7))
    assert day7.created is not None and day7.created != key_a and day7.destroyed == []
    key_b = day7.created
    assert envelope(codec.encrypt([rk(2)], at(7))).kid == str(key_b)
    assert codec.decrypt(raw(token_a)) == [rk(1)]

    key_c = rotate(store, wrapper, at(14)).created
    assert key_c is not None
    day21 = rotate(store, wrapper, at(21))
    assert day21.created is not None and day21.destroyed == []  # B is only 14 days old
    assert codec.decrypt(raw(token_a)) == [rk(1)]
    # One second before B turns 15 days old, A survives.
    assert rotate(store, wrapper, T0 + 7 * DAY + DELETE_OLD_KEY_PERIOD - timedelta(seconds=1)).destroyed == []
    assert codec.decrypt(raw(token_a)) == [rk(1)]

    day22 = rotate(store, wrapper, at(22))
    assert day22 == RotationResult(created=None, destroyed=[key_a])
    rec_a = store.get(key_a)
    assert rec_a is not None and not rec_a.allowed and rec_a.wrapped_cipher is None and rec_a.aad is None
    clock.advance(3600)
    with pytest.raises(RevisionTokenError):
        codec.decrypt(raw(token_a))

    assert rotate(store, wrapper, at(28)).created is not None
    assert rotate(store, wrapper, at(29)).destroyed == [key_b]  # C turned 15 days old
    assert [r.kid for r in store.list_allowed()][-1] == key_c


def test_rotation_creates_key_for_empty_table_and_keeps_newest(store: CountingStore, wrapper: KeyWrapper) -> None:
    result = rotate(store, wrapper, T0)
    assert result.created is not None and result.destroyed == []
    # Even when everything is ancient, the effective key is never destroyed by the same pass that keeps it.
    far = T0 + 400 * DAY
    result = rotate(store, wrapper, far)
    assert result.created is not None
    assert result.destroyed == []  # the previous key's next-newer key was created just now
    again = rotate(store, wrapper, far + DELETE_OLD_KEY_PERIOD)
    assert again.created is not None and again.destroyed == [1]
    assert [r.kid for r in store.list_allowed()] == [again.created, result.created]


def test_rotation_destroys_several_stale_keys(store: CountingStore, wrapper: KeyWrapper) -> None:
    kids = [create_key(store, wrapper, T0 + n * DAY) for n in range(4)]  # keys on days 0, 1, 2, 3
    result = rotate(store, wrapper, T0 + 3 * DAY + DELETE_OLD_KEY_PERIOD)
    # Day 3's key is old enough to be replaced but keeps living: its successor was created just now. Days
    # 0-2 each have a successor that is >= 15 days old. Destruction runs newest first.
    assert result.created is not None
    assert result.destroyed == [kids[2], kids[1], kids[0]]
    assert [r.kid for r in store.list_allowed()] == [result.created, kids[3]]


def test_rotation_never_destroys_the_effective_key(store: CountingStore, wrapper: KeyWrapper) -> None:
    # With a delete period shorter than the new-key period, the newest key outlives "delete" age.
    only = create_key(store, wrapper, T0)
    result = rotate_keys(store, wrapper, T0 + 10 * DAY, new_key_period=30 * DAY, delete_old_key_period=DAY)
    assert result == RotationResult(created=None, destroyed=[])
    assert [r.kid for r in store.list_allowed()] == [only]


def test_rotation_rejects_non_positive_periods(store: CountingStore, wrapper: KeyWrapper) -> None:
    with pytest.raises(ValueError):
        rotate_keys(store, wrapper, T0, new_key_period=timedelta(0), delete_old_key_period=DAY)
    assert store.list_allowed() == []


# -- interop with the reference's wire format ----------------------------------------------------


def test_decrypts_token_built_like_the_reference(codec: RevisionTokenCodec, store: CountingStore,
                                                 wrapper: KeyWrapper) -> None:
    (effective,) = store.list_allowed()
    dek = dek_of(store, wrapper, effective.kid)
    # MakeRevisionToken: padded RevisionTokenData, Seal(nonce, nonce, plaintext, aad), envelope{kid, data}.
    data = revision_pb2.RevisionTokenData()
    data.revisableKeys.add(temporaryExposureKey=bytes([1, 2, 3, 4]), intervalNumber=254321, intervalCount=144)
    data.revisableKeys.add(temporaryExposureKey=bytes([5, 6, 7, 8]), intervalNumber=254465, intervalCount=144)
    while len(data.revisableKeys) < 28:
        data.revisableKeys.add(temporaryExposureKey=bytes(16))
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(dek).encrypt(nonce, data.SerializeToString(), AAD)
    token = revision_pb2.RevisionToken(kid=str(effective.kid), data=sealed).SerializeToString()
    assert codec.decrypt(token) == [
        RevisableKey(bytes([1, 2, 3, 4]), 254321, 144),
        RevisableKey(bytes([5, 6, 7, 8]), 254465, 144),
    ]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_wire_bytes_match_hand_encoding(codec: RevisionTokenCodec, store: CountingStore,
                                        wrapper: KeyWrapper) -> None:
    # Encode the messages by hand from the .proto field numbers/types, independent of the generated classes.
    def entry(tek: bytes, n: int, c: int) -> bytes:
        body = b"\x0a" + _varint(len(tek)) + tek
        body += (b"\x10" + _varint(n)) if n else b""
        body += (b"\x18" + _varint(c)) if c else b""
        return b"\x0a" + _varint(len(body)) + body

    (effective,) = store.list_allowed()
    dek = dek_of(store, wrapper, effective.kid)
    plaintext = entry(b"\x11" * 16, 2_722_000, 144) + entry(b"\x22" * 16, 2_722_144, 100) + 26 * entry(bytes(16), 0, 0)
    nonce = bytes(12)
    sealed = nonce + AESGCM(dek).encrypt(nonce, plaintext, AAD)
    kid = str(effective.kid).encode()
    token = b"\x0a" + _varint(len(kid)) + kid + b"\x12" + _varint(len(sealed)) + sealed
    assert codec.decrypt(token) == [rk(0x11, 2_722_000, 144), rk(0x22, 2_722_144, 100)]

    # And the other direction: our plaintext is byte-identical to that hand encoding.
    ours = envelope(codec.encrypt([rk(0x11, 2_722_000, 144), rk(0x22, 2_722_144, 100)], T0))
    assert ours.kid.encode() == kid
    assert AESGCM(dek).decrypt(ours.data[:12], ours.data[12:], AAD) == plaintext
    assert base64.b64decode(codec.encrypt([rk(1)], T0))[:2 + len(kid)] == b"\x0a" + _varint(len(kid)) + kid


def test_our_token_opens_like_the_reference(codec: RevisionTokenCodec, store: CountingStore,
                                           wrapper: KeyWrapper) -> None:
    keys = [rk(7, 2_722_000, 144), rk(8, 2_722_144, 1)]
    token = codec.encrypt(keys, T0)
    env = envelope(token)
    data = open_like_reference(token, dek_of(store, wrapper, int(env.kid)), AAD)
    kept = [k for k in data.revisableKeys if not (k.intervalNumber == 0 and k.intervalCount == 0)]
    assert [(k.temporaryExposureKey, k.intervalNumber, k.intervalCount) for k in kept] == [
        (k.key, k.interval_number, k.interval_count) for k in keys
    ]
