"""Flask application factory for the publish API."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from api.body import read_body, stop_reading
from api.metrics import PublishMetrics
from enpipeline.chaff import ChaffTracker
from enpipeline.config import Settings, load_settings, with_local_secrets
from enpipeline.db.engine import is_unavailable, make_engine, ping
from enpipeline.errors import CODE_BAD_REQUEST, CODE_INTERNAL, CODE_PARTIAL_FAILURE, PublishError
from enpipeline.publish.service import UNAVAILABLE_MESSAGE, PublishService, create_publish_service
from enpipeline.publish.wire import (
    WireError,
    check_content_type,
    decode_publish,
    publish_response,
    random_padding,
)

log = logging.getLogger(__name__)

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
HEALTH_CACHE_SECONDS = 1.0
# A 503 tells the app to come back; a few seconds is how long a database restart or failover takes.
RETRY_AFTER_SECONDS = "5"

bp = Blueprint("publish", __name__)


class ApiState:
    """Everything the views need, kept on the app (one per worker process)."""

    def __init__(self, settings: Settings, service: PublishService, clock: Callable[[], datetime]):
        self.settings = settings
        self.service = service
        self.clock = clock
        self.metrics = PublishMetrics()
        self.chaff = ChaffTracker(settings.chaff_request_max_latency_ms / 1000.0)
        self.health_checked_at = 0.0
        self.health_ok = False


def _state() -> ApiState:
    return current_app.extensions["enpipeline"]


def _json(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None, *,
          compact: bool = False) -> Response:
    # Publish replies are compact like Go's encoding/json; /health and maintenance keep the reference's
    # literal bodies (`{"status": "ok"}`, `{"error": "please try again later"}`).
    body = json.dumps(payload, separators=(",", ":")) if compact else json.dumps(payload)
    response = Response(body, status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _respond(state: ApiState, status: int, **fields: Any) -> Response:
    s = state.settings
    payload = publish_response(padding=random_padding(s.response_padding_min_bytes, s.response_padding_range),
                               **fields)
    headers = {"x-api-version": "v1"}
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_SECONDS
    return _json(status, payload, headers, compact=True)


@bp.route("/v1/publish", methods=["POST"])
def publish() -> Response:
    state = _state()
    started = time.perf_counter()
    if request.headers.get("X-Chaff"):
        return _chaff(state, started)
    if state.settings.maintenance_mode:
        return _json(429, {"error": "please try again later"})

    response = _handle_publish(state)
    elapsed = time.perf_counter() - started
    state.metrics.latency.observe(elapsed)
    header_bytes = sum(len(k) + len(v) + 4 for k, v in response.headers.items())
    state.chaff.record(elapsed, header_bytes, response.calculate_content_length() or 0)
    return response


def _handle_publish(state: ApiState) -> Response:
    settings = state.settings
    try:
        check_content_type(request.headers.get("Content-Type"))
        if (request.content_length or 0) > settings.max_body_bytes:
            raise WireError(413, "http: request body too large")
        body = read_body(request.environ, request.stream, settings.max_body_bytes + 1, settings.body_read_timeout)
        publish_request = decode_publish(body, settings.max_body_bytes)
    except WireError as exc:
        if exc.status in (408, 413, 415):  # the body was not read (to its end): refuse the rest
            stop_reading(request.environ)
        code = CODE_INTERNAL if exc.status >= 500 else CODE_BAD_REQUEST
        state.metrics.publishes.labels(outcome=code).inc()
        return _respond(state, exc.status, error=f"error unmarshalling API call, code: {exc.status}: {exc.message}",
                        code=code)
    try:
        result = state.service.publish(publish_request, state.clock())
    except PublishError as exc:
        outcome = "unavailable" if exc.status == 503 else exc.code
        state.metrics.publishes.labels(outcome=outcome).inc()
        return _respond(state, exc.status, error=exc.message, code=exc.code, warnings=exc.warnings)
    except Exception as exc:
        if is_unavailable(exc):
            # The service maps its own database calls; this catches any it missed, without a traceback.
            log.error("publish failed, database unavailable: %s", type(exc).__name__)
            state.metrics.publishes.labels(outcome="unavailable").inc()
            return _respond(state, 503, error=UNAVAILABLE_MESSAGE, code=CODE_INTERNAL)
        # Never log the request: it carries keys and certificates.
        log.exception("publish failed unexpectedly")
        state.metrics.publishes.labels(outcome=CODE_INTERNAL).inc()
        return _respond(state, 500, error="Internal Server Error", code=CODE_INTERNAL)

    code = CODE_PARTIAL_FAILURE if result.partial_failure else ""
    state.metrics.publishes.labels(outcome=code or "ok").inc()
    state.metrics.keys_inserted.inc(result.inserted)
    state.metrics.keys_revised.inc(result.revised)
    return _respond(state, 200, revision_token=result.revision_token, inserted=result.inserted,
                    error=result.partial_failure, code=code, warnings=result.warnings)


def _chaff(state: ApiState, started: float) -> Response:
    """A decoy publish: nothing is read or stored; size and timing mimic recent real replies."""
    profile = state.chaff.profile()
    # `{"padding":""}` is 14 bytes; base64 grows 4/3.
    raw = max(state.settings.response_padding_min_bytes, (max(profile.body_bytes - 14, 0) * 3) // 4)
    payload = {"padding": random_padding(raw, 0)}
    time.sleep(state.chaff.delay_for(time.perf_counter() - started))
    state.metrics.publishes.labels(outcome="chaff").inc()
    return _json(200, payload, {"x-api-version": "v1"}, compact=True)


@bp.route("/health")
def health() -> Response:
    state = _state()
    if state.settings.maintenance_mode:  # the reference's maintenance middleware covers /health too
        return _json(429, {"error": "please try again later"})
    now = time.monotonic()
    if now - state.health_checked_at > HEALTH_CACHE_SECONDS:
        try:
            ping(state.service.engine)
            state.health_ok = True
        except Exception as exc:  # any failure means unhealthy; the reason goes to the log only
            log.warning("health check failed: %s", type(exc).__name__)
            state.health_ok = False
        state.health_checked_at = now
    if state.health_ok:
        return _json(200, {"status": "ok"})
    # 503 so load balancers and readiness probes take this worker out of rotation until the database is back.
    return _json(503, {"status": "database unavailable"}, {"Retry-After": RETRY_AFTER_SECONDS})


@bp.route("/metrics")
def metrics() -> Response:
    return Response(_state().metrics.render(), mimetype="text/plain; version=0.0.4")


@bp.route("/openapi.json")
def openapi() -> Response:
    return Response(OPENAPI_PATH.read_bytes(), mimetype="application/json")


def create_app(settings: Settings | None = None, *, service: PublishService | None = None,
               clock: Callable[[], datetime] | None = None) -> Flask:
    """Build the API. Without arguments it reads ENP_* settings and connects to ENP_DATABASE_URL."""
    if service is None:
        settings = with_local_secrets(settings or load_settings())
        engine = make_engine(settings.database_url, pool_size=settings.db_pool_size,
                             max_overflow=settings.db_pool_max_overflow,
                             connect_timeout=settings.db_connect_timeout, application_name="enpipeline-api")
        service = create_publish_service(settings, engine)
    settings = settings or service.settings
    app = Flask(__name__)
    app.extensions["enpipeline"] = ApiState(settings, service, clock or (lambda: datetime.now(UTC)))
    app.register_blueprint(bp)
    return app
