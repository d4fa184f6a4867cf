"""The publish use case: app lookup, certificate check, transform, revision rules, one transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from enpipeline.cache import TTLCache
from enpipeline.config import Settings
from enpipeline.db import apps as apps_db
from enpipeline.db import exposures as exposures_db
from enpipeline.db.engine import is_unavailable
from enpipeline.errors import (
    CODE_HEALTH_AUTHORITY_MISSING_REGION_CONFIG,
    CODE_INTERNAL,
    CODE_UNABLE_TO_LOAD_HEALTH_AUTHORITY,
    CODE_UNKNOWN_HEALTH_AUTHORITY,
    CODE_VERIFICATION_CERTIFICATE_INVALID,
    PublishError,
    RevisionError,
    RevisionTokenError,
    VerificationError,
)
from enpipeline.model import AuthorizedApp, Exposure, PublishRequest, PublishResult, RevisableKey, VerifiedClaims
from enpipeline.publish import revise as revise_rules
from enpipeline.publish.transform import format_multierror, is_insertable, transform
from enpipeline.revision import RevisionTokenCodec
from enpipeline.timeutil import interval_number
from enpipeline.verification import HealthAuthorityLookup, decode_lenient_base64, verify_certificate

log = logging.getLogger(__name__)

UNAVAILABLE_MESSAGE = "database unavailable, please try again later"


@dataclass
class _TokenInput:
    state: revise_rules.TokenState
    keys: list[RevisableKey]


class PublishService:
    """Runs one publish; every dependency is injected so tests can swap them."""

    def __init__(self, settings: Settings, engine: Engine, codec: RevisionTokenCodec,
                 authorities: HealthAuthorityLookup):
        self.settings = settings
        self.engine = engine
        self.codec = codec
        self.authorities = authorities
        self._apps: TTLCache[AuthorizedApp | None] = TTLCache(settings.authorized_app_cache_duration)
        self._partitions = exposures_db.PartitionGuard(engine)

    # -- steps -----------------------------------------------------------------------------------

    def load_app(self, health_authority_id: str) -> AuthorizedApp:
        name = health_authority_id.lower()

        def load() -> AuthorizedApp | None:
            with self.engine.connect() as conn:
                return apps_db.get_app(conn, name)

        try:
            app = self._apps.get(name, load)
        except SQLAlchemyError as exc:
            log.error("loading authorized app failed: %s", type(exc).__name__)
            raise PublishError(503 if is_unavailable(exc) else 500, CODE_UNABLE_TO_LOAD_HEALTH_AUTHORITY,
                               "error loading health authority config: database unavailable") from exc
        if app is None:
            raise PublishError(401, CODE_UNKNOWN_HEALTH_AUTHORITY,
                               f"unauthorized health authority: {health_authority_id}")
        return app

    def regions_for(self, app: AuthorizedApp) -> list[str]:
        if app.allowed_regions:
            return [r.upper() for r in app.allowed_regions]
        if self.settings.default_region:
            return [self.settings.default_region.upper()]
        raise PublishError(500, CODE_HEALTH_AUTHORITY_MISSING_REGION_CONFIG,
                           f"unknown health authority regions for {app.app_package_name}")

    def verify(self, request: PublishRequest, app: AuthorizedApp, now: datetime) -> VerifiedClaims | None:
        try:
            return verify_certificate(request.verification_payload, app=app, keys=request.keys,
                                      hmac_key=request.hmac_key, lookup=self.authorities, now=now)
        except VerificationError as exc:
            if app.bypass_health_authority_verification:
                return None
            raise PublishError(401, CODE_VERIFICATION_CERTIFICATE_INVALID,
                               f"unable to validate diagnosis verification: {exc}") from None
        except SQLAlchemyError as exc:
            log.error("loading verification keys failed: %s", type(exc).__name__)
            raise database_error(exc) from exc

    def read_token(self, token: str) -> _TokenInput:
        if not token:
            return _TokenInput(revise_rules.TokenState.NONE, [])
        try:
            raw = decode_lenient_base64(token)
        except ValueError:
            return _TokenInput(revise_rules.TokenState.NONE, [])
        try:
            return _TokenInput(revise_rules.TokenState.VALID, self.codec.decrypt(raw))
        except RevisionTokenError as exc:
            if isinstance(exc.__cause__, SQLAlchemyError) and is_unavailable(exc.__cause__):
                # A token we could not check is not a bad token: calling it invalid would make the app
                # drop it and lose the right to revise its keys.
                log.error("loading revision keys failed: %s", type(exc.__cause__).__name__)
                raise database_error(exc.__cause__) from exc
            return _TokenInput(revise_rules.TokenState.UNREADABLE, [])

    # -- the use case ----------------------------------------------------------------------------

    def publish(self, request: PublishRequest, now: datetime) -> PublishResult:
        app = self.load_app(request.health_authority_id)
        regions = self.regions_for(app)
        # The reference sorts the keys by their base64 string while computing the HMAC; per-key
        # error messages then count in that order. Sorting here keeps those indices identical.
        request = _with_sorted_keys(request)
        claims = self.verify(request, app, now)
        token = self.read_token(request.revision_token)
        transformed = transform(request, app_name=app.app_package_name, regions=regions, claims=claims,
                                settings=self.settings, now=now)

        result = PublishResult(warnings=list(transformed.warnings))
        if transformed.key_errors:
            result.partial_failure = format_multierror(transformed.key_errors)

        incoming: dict[bytes, Exposure] = {}
        for e in transformed.exposures:
            if e.exposure_key in incoming:
                result.dropped += 1  # the same key twice in one request is stored once
                continue
            incoming[e.exposure_key] = e

        try:
            self._partitions.ensure(e.created_at for e in incoming.values() if is_insertable(e))
        except SQLAlchemyError as exc:
            log.error("creating a day partition failed: %s", type(exc).__name__)
            raise database_error(exc) from exc
        touched = self._store(app, incoming, token, result)
        result.revision_token = self._next_token(token, touched, now)
        return result

    def _store(self, app: AuthorizedApp, incoming: dict[bytes, Exposure], token: _TokenInput,
               result: PublishResult) -> list[Exposure]:
        token_keys = {k.key: k for k in token.keys}
        touched: list[Exposure] = []
        try:
            with self.engine.begin() as conn:
                exposures_db.lock_keys(conn, incoming)
                existing = exposures_db.read_for_update(conn, list(incoming))
                # As in the reference, every re-sent key passes the token checks before any revision
                # rule runs, so a token error wins over a report-type or already-revised error.
                accepted: dict[bytes, Exposure] = {}
                for key, exp in incoming.items():
                    stored = existing.get(key)
                    if stored is not None and not app.bypass_revision_token and not revise_rules.check_token(
                            stored, exp, token.state, token_keys,
                            allow_partial=self.settings.allow_partial_revisions):
                        result.dropped += 1
                        continue
                    accepted[key] = exp
                to_insert: list[Exposure] = []
                for key, exp in accepted.items():
                    stored = existing.get(key)
                    if stored is None:
                        touched.append(exp)  # new keys go into the token, negative ones included
                        if is_insertable(exp):
                            to_insert.append(exp)
                        continue
                    revised = revise_rules.revise(stored, exp)
                    if revised is None:
                        continue
                    exposures_db.revise_exposure(conn, revised)
                    result.revised += 1
                    touched.append(revised)
                result.inserted = exposures_db.insert_exposures(conn, to_insert)
        except RevisionError as exc:
            status_message = exc.message if exc.code != CODE_INTERNAL else "Internal Server Error"
            raise PublishError(400, exc.code, status_message, result.warnings) from None
        except SQLAlchemyError as exc:
            log.error("publish transaction failed: %s", type(exc).__name__)
            raise database_error(exc) from exc
        return touched

    def _next_token(self, token: _TokenInput, touched: list[Exposure], now: datetime) -> str:
        """Old token entries still relevant, then every key inserted or revised now, de-duplicated."""
        min_interval = interval_number(now - self.settings.max_interval_age_on_publish)
        entries: dict[bytes, RevisableKey] = {}
        for k in token.keys:
            if k.interval_number + k.interval_count >= min_interval:
                entries.setdefault(k.key, k)
        for e in touched:
            entries.setdefault(e.exposure_key, RevisableKey(e.exposure_key, e.interval_number, e.interval_count))
        if not entries:
            return ""
        try:
            return self.codec.encrypt(list(entries.values()), now)
        except Exception as exc:
            # The keys are already committed; like the reference, answer without a token rather than
            # failing a publish that has been stored.
            log.error("building the revision token failed: %s", type(exc).__name__)
            return ""


def database_error(exc: BaseException) -> PublishError:
    """503 when the database is unreachable or the failure is transient (the app should retry), else 500.

    Nothing was stored in either case: the transaction either never started or was rolled back.
    """
    if is_unavailable(exc):
        return PublishError(503, CODE_INTERNAL, UNAVAILABLE_MESSAGE)
    return PublishError(500, CODE_INTERNAL, "Internal Server Error")


def _with_sorted_keys(request: PublishRequest) -> PublishRequest:
    return replace(request, keys=tuple(sorted(request.keys, key=lambda k: k.key.encode())))


def create_publish_service(settings: Settings, engine: Engine) -> PublishService:
    """Wire the production dependencies (Postgres stores, caches) around a PublishService."""
    from enpipeline.db.authorities import DbHealthAuthorityLookup
    from enpipeline.db.revision_keys import PgRevisionKeyStore
    from enpipeline.revision import KeyWrapper
    from enpipeline.verification import CachedHealthAuthorityLookup

    codec = RevisionTokenCodec(PgRevisionKeyStore(engine), KeyWrapper(settings.revision_token_kek),
                               settings.revision_token_aad, min_length=settings.revision_token_min_length,
                               cache_duration=settings.revision_key_cache_duration)
    lookup = CachedHealthAuthorityLookup(DbHealthAuthorityLookup(engine), settings.verification_cache_duration)
    return PublishService(settings, engine, codec, lookup)
