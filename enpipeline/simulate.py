"""A population of phones publishing to a running publish API over real HTTP (`enpipeline simulate`)."""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import queue
import random
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enpipeline.model import (
    REPORT_TYPE_CONFIRMED,
    REPORT_TYPE_LIKELY,
    REPORT_TYPE_NEGATIVE,
    REPORT_TYPE_SELF_REPORT,
    ExposureKeyInput,
)
from enpipeline.timeutil import INTERVALS_PER_DAY, interval_number, utc_midnight
from enpipeline.verification import compute_tekmacs

PUBLISH_PATH = "/v1/publish"
DEFAULT_URL = "http://127.0.0.1:8080"
USER_AGENT = "enpipeline-simulate/1"
KEY_DAYS = 14  # a phone uploads the keys of the 14 days before today (the reference's publish window)
# Reference apps pad with >= 1 KB plus >= 1 KB of jitter so the body size says nothing about the key count.
BODY_PADDING_MIN, BODY_PADDING_RANGE = 1024, 1024
# Initial report types of phones that will not revise. Confirmed dominates as in real deployments; likely and
# user-report are what a later test result can upgrade.
INITIAL_MIX = ((REPORT_TYPE_CONFIRMED, 0.7), (REPORT_TYPE_LIKELY, 0.2), (REPORT_TYPE_SELF_REPORT, 0.1))
# Revisions the reference allows (likely -> confirmed|negative, user-report -> confirmed|likely|negative), weighted
# towards the common case of a clinical test confirming a likely diagnosis.
REVISIONS = {
    REPORT_TYPE_LIKELY: ((REPORT_TYPE_CONFIRMED, 0.85), (REPORT_TYPE_NEGATIVE, 0.15)),
    REPORT_TYPE_SELF_REPORT: ((REPORT_TYPE_CONFIRMED, 0.6), (REPORT_TYPE_LIKELY, 0.3), (REPORT_TYPE_NEGATIVE, 0.1)),
}
# Stop early when this many requests in a row could not even connect: the server is gone, and waiting for a
# connect timeout per remaining request would only delay the verdict.
MAX_CONSECUTIVE_CONNECTION_ERRORS = 20


class SimulateError(Exception):
    """A setting or the target makes the simulation impossible; the message is one line for the operator."""


# -- who signs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthAuthority:
    """The verification server the phones' certificates come from, and the app they publish as."""

    key: ec.EllipticCurvePrivateKey
    issuer: str
    audience: str
    kid: str
    app: str

    def __repr__(self) -> str:  # the private key must never reach a log
        return (f"HealthAuthority(issuer={self.issuer!r}, audience={self.audience!r}, kid={self.kid!r},"
                f" app={self.app!r})")

    def certificate(self, keys: list[ExposureKeyInput], hmac_secret: bytes, report_type: str, now: datetime,
                    symptom_onset_interval: int | None = None) -> str:
        """An ES256 verification certificate whose tekmac covers ``keys``, as a verification server issues it."""
        tekmac = base64.b64encode(compute_tekmacs(keys, hmac_secret)[0]).decode()
        # iat a second back: the server allows no clock skew, and a certificate issued "in the future" is refused.
        claims: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "iat": int(now.timestamp()) - 1,
                                  "exp": int(now.timestamp()) + 300, "reportType": report_type, "tekmac": tekmac}
        if symptom_onset_interval is not None:
            claims["symptomOnsetInterval"] = symptom_onset_interval
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid})


def load_health_authority(pem_path: Path, *, issuer: str, audience: str, kid: str, app: str) -> HealthAuthority:
    """Read an ES256 (P-256) private key in PEM form; every problem is a SimulateError naming the file."""
    try:
        data = pem_path.read_bytes()
    except OSError as exc:
        raise SimulateError(f"cannot read the health authority key {pem_path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SimulateError(f"{pem_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise SimulateError(f"{pem_path} must be an ECDSA P-256 private key (certificates are ES256)")
    return HealthAuthority(key=key, issuer=issuer, audience=audience, kid=kid, app=app)


# -- options and plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulateOptions:
    """What to send and how fast. ``chaff_ratio`` is chaff requests per publish; ``revision_ratio`` the share of
    phones that publish again later with a changed report type."""

    publishes: int
    url: str = DEFAULT_URL
    rate: float | None = None
    chaff_ratio: float = 0.1
    revision_ratio: float = 0.1
    concurrency: int = 4
    seed: int | None = None
    timeout: float = 30.0

    def validate(self) -> None:
        problems = []
        if self.publishes < 1:
            problems.append(f"--publishes must be at least 1, got {self.publishes}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            problems.append(f"--rate must be a positive number of requests per second, got {self.rate}")
        if not (0 <= self.chaff_ratio <= 100):
            problems.append(f"--chaff-ratio must be 0..100 chaff requests per publish, got {self.chaff_ratio}")
        if not (0 <= self.revision_ratio <= 1):
            problems.append(f"--revision-ratio must be between 0 and 1, got {self.revision_ratio}")
        if not (1 <= self.concurrency <= 512):
            problems.append(f"--concurrency must be between 1 and 512, got {self.concurrency}")
        if not self.timeout > 0:
            problems.append(f"--timeout must be positive, got {self.timeout}")
        if problems:
            raise SimulateError("; ".join(problems))
        parse_url(self.url)


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


def parse_url(url: str) -> Target:
    """The publish endpoint: a base URL gets /v1/publish appended, a URL already naming a path is used as is."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SimulateError(f"--url must look like http://host:port, got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise SimulateError(f"--url has an invalid port: {url!r}") from None
    path = parts.path.rstrip("/") or PUBLISH_PATH
    return Target(parts.scheme, parts.hostname, port, path)


@dataclass
class Phone:
    """One device that tests positive (or reports symptoms) and uploads its keys, perhaps revising them later."""

    index: int
    report_type: str
    revise_to: str | None
    onset_days_ago: int | None  # None: asymptomatic, the server assumes an onset 4 days back
    traveler: bool
    with_today_key: bool
    keys: list[ExposureKeyInput] = field(default_factory=list)
    revision_token: str = ""


@dataclass(frozen=True)
class Job:
    kind: str  # "publish" | "revision" | "chaff"
    phone: Phone | None = None


def _pick(rng: random.Random, weighted: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


def plan_population(options: SimulateOptions, rng: random.Random) -> tuple[list[Phone], list[Job]]:
    """The phones and the order of the first wave (publishes shuffled with chaff); revisions are queued later,
    each once its phone's first publish has been answered, because it needs that answer's revision token."""
    n = options.publishes
    revisers = set(rng.sample(range(n), round(n * options.revision_ratio)))
    phones = []
    for i in range(n):
        if i in revisers:
            # A reviser first reports something a later test can change.
            report_type = _pick(rng, ((REPORT_TYPE_LIKELY, 0.8), (REPORT_TYPE_SELF_REPORT, 0.2)))
            revise_to: str | None = _pick(rng, REVISIONS[report_type])
        else:
            report_type, revise_to = _pick(rng, INITIAL_MIX), None
        symptomatic = report_type != REPORT_TYPE_SELF_REPORT or rng.random() < 0.9
        phones.append(Phone(
            index=i, report_type=report_type, revise_to=revise_to,
            onset_days_ago=rng.randint(0, 7) if symptomatic and rng.random() < 0.7 else None,
            traveler=rng.random() < 0.05,
            # Android releases today's key at once (embargoed by the server until it expires); iOS waits a day.
            with_today_key=rng.random() < 0.5))
    jobs = [Job("publish", p) for p in phones] + [Job("chaff") for _ in range(round(n * options.chaff_ratio))]
    rng.shuffle(jobs)
    return phones, jobs


# -- request bodies ----------------------------------------------------------------------------------


def _b64(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode()


def _padding(rng: random.Random) -> str:
    return _b64(BODY_PADDING_MIN + rng.randrange(BODY_PADDING_RANGE))


def phone_keys(now: datetime, with_today_key: bool) -> list[ExposureKeyInput]:
    """Full-day keys (rolling period 144) of the 14 UTC days before today, plus today's if the phone releases it.
    Transmission risk 0 lets the server fill it in from the report type, as current apps do."""
    today = interval_number(utc_midnight(now))
    first = 0 if with_today_key else 1
    # Key bytes are always fresh (not from the seed): a re-run must never collide with an earlier run's keys.
    return [ExposureKeyInput(_b64(16), today - INTERVALS_PER_DAY * d, INTERVALS_PER_DAY, 0)
            for d in range(first, KEY_DAYS + 1)]


def publish_body(authority: HealthAuthority, phone: Phone, report_type: str, now: datetime,
                 rng: random.Random) -> dict[str, Any]:
    """A v1 publish body with a fresh certificate and HMAC secret (one certificate per upload, like the apps)."""
    hmac_secret = os.urandom(16)
    onset = None
    if phone.onset_days_ago is not None:
        onset = interval_number(utc_midnight(now) - timedelta(days=phone.onset_days_ago))
    body: dict[str, Any] = {
        "temporaryExposureKeys": [{"key": k.key, "rollingStartNumber": k.rolling_start_number,
                                   "rollingPeriod": k.rolling_period} for k in phone.keys],
        "healthAuthorityID": authority.app,
        "verificationPayload": authority.certificate(phone.keys, hmac_secret, report_type, now, onset),
        "hmacKey": base64.b64encode(hmac_secret).decode(),
        "traveler": phone.traveler,
        # Apps keep random bytes in the token slot before their first publish, so the field is always present.
        "revisionToken": phone.revision_token or _b64(rng.randrange(100, 200)),
        "padding": _padding(rng),
    }
    if onset is not None:
        body["symptomOnsetInterval"] = onset
    return body


def chaff_body(app: str, now: datetime, rng: random.Random) -> dict[str, Any]:
    """A decoy shaped like a real publish (the reference asks for "a real request with a real request body"),
    but with random keys, a random stand-in certificate and random-size padding: the server reads none of it."""
    today = interval_number(utc_midnight(now))
    days = rng.randint(1, KEY_DAYS)
    return {
        "temporaryExposureKeys": [{"key": _b64(16), "rollingStartNumber": today - INTERVALS_PER_DAY * d,
                                   "rollingPeriod": INTERVALS_PER_DAY} for d in range(1, days + 1)],
        "healthAuthorityID": app,
        "verificationPayload": ".".join(_b64(n).rstrip("=") for n in (36, 300, 64)),
        "hmacKey": _b64(16),
        "revisionToken": _b64(rng.randrange(100, 200)),
        "padding": _padding(rng),
    }


# -- rate and transport ------------------------------------------------------------------------------


class TokenBucket:
    """At most ``rate`` acquisitions per second, with bursts of up to ``burst``; thread-safe.

    Each caller reserves its slot under the lock and sleeps outside it, so waiting threads queue fairly and the
    long-run rate is exact however many threads share the bucket."""

    def __init__(self, rate: float, burst: float = 1.0, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self._rate, self._burst = rate, burst
        self._clock, self._sleep = clock, sleep
        self._tokens = burst
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, waiting if needed; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= 1.0  # may go negative: a reservation that later callers queue behind
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class _Client:
    """One keep-alive connection per worker thread (servers that close after each reply are reconnected)."""

    def __init__(self, target: Target, timeout: float):
        self._target = target
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._target.scheme == "https":
                self._conn = http.client.HTTPSConnection(self._target.host, self._target.port, timeout=self._timeout,
                                                         context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self._target.host, self._target.port, timeout=self._timeout)
        return self._conn

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (1, 2):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                conn.request("POST", self._target.path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self.close()
                # A server may close an idle keep-alive connection just as we reuse it; that request never
                # reached it, so one retry on a fresh connection is safe. A fresh connection failing is real.
                if not reused or attempt == 2:
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def check_reachable(target: Target, timeout: float) -> None:
    """Fail fast with one line when nothing listens at the target, instead of N identical connection errors."""
    try:
        with socket.create_connection((target.host, target.port), timeout=min(timeout, 10.0)):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise SimulateError(f"cannot reach {target}: {reason} (is the API running? `make up` starts one)") from None


# -- results -----------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Summary:
    """What the population saw; ``ok`` is false when the server failed (5xx) or could not be reached."""

    target: str
    publishes_planned: int
    publishes_sent: int = 0
    publishes_accepted: int = 0
    keys_inserted: int = 0
    partial_failures: int = 0
    report_types: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    chaff_sent: int = 0
    chaff_answered: int = 0
    revisions_planned: int = 0
    revisions_sent: int = 0
    revisions_accepted: int = 0
    revisions_skipped: int = 0
    keys_revised: int = 0
    revision_types: Counter = field(default_factory=Counter)
    http_errors: Counter = field(default_factory=Counter)
    connection_errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, publishes and revisions
    chaff_latencies: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    aborted: str = ""

    @property
    def requests(self) -> int:
        return self.publishes_sent + self.revisions_sent + self.chaff_sent

    @property
    def ok(self) -> bool:
        return not self.http_errors and not self.connection_errors and not self.aborted

    def as_dict(self) -> dict[str, Any]:
        def ms(values: list[float]) -> dict[str, float]:
            s = sorted(values)
            return {name: round(percentile(s, p) * 1000, 2) for name, p in
                    (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))}

        wall = self.wall_seconds
        return {
            "target": self.target,
            "ok": self.ok,
            "requests": self.requests,
            "publishes": {"planned": self.publishes_planned, "sent": self.publishes_sent,
                          "accepted": self.publishes_accepted, "keys_inserted": self.keys_inserted,
                          "partial_failures": self.partial_failures, "report_types": dict(self.report_types)},
            "rejected": dict(self.rejected),
            "chaff": {"sent": self.chaff_sent, "answered": self.chaff_answered},
            "revisions": {"planned": self.revisions_planned, "sent": self.revisions_sent,
                          "accepted": self.revisions_accepted, "skipped": self.revisions_skipped,
                          "keys_revised": self.keys_revised, "transitions": dict(self.revision_types)},
            "http_errors": dict(self.http_errors),
            "connection_errors": dict(self.connection_errors),
            "latency_ms": ms(self.latencies),
            "chaff_latency_ms": ms(self.chaff_latencies),
            "wall_seconds": round(wall, 3),
            "requests_per_second": round(self.requests / wall, 2) if wall > 0 else 0.0,
            "publishes_per_second": round(self.publishes_sent / wall, 2) if wall > 0 else 0.0,
            "aborted": self.aborted,
        }


def format_summary(summary: Summary) -> str:
    """The human-readable report the CLI prints."""
    d = summary.as_dict()
    p, r, c, lat = d["publishes"], d["revisions"], d["chaff"], d["latency_ms"]

    def counts(values: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"

    def total(values: dict[str, int]) -> str:
        return f"{sum(values.values())} ({counts(values)})" if values else "0"

    partial = f", {p['partial_failures']} partial" if p["partial_failures"] else ""
    skipped = f", {r['skipped']} skipped" if r["skipped"] else ""
    lines = [
        f"simulated {p['planned']} phones against {d['target']}",
        f"  publishes    {p['sent']} sent, {p['accepted']} accepted ({p['keys_inserted']} keys inserted{partial});"
        f" report types: {counts(p['report_types'])}",
        f"  revisions    {r['sent']} sent, {r['accepted']} accepted ({r['keys_revised']} keys revised{skipped});"
        f" {counts(r['transitions'])}",
        f"  chaff        {c['sent']} sent, {c['answered']} answered",
        f"  rejected     {total(d['rejected'])}",
        f"  HTTP errors  {total(d['http_errors'])}",
        f"  conn errors  {total(d['connection_errors'])}",
        f"  latency      p50 {lat['p50']:.1f} ms  p95 {lat['p95']:.1f} ms  p99 {lat['p99']:.1f} ms"
        f"  max {lat['max']:.1f} ms  (publishes and revisions)",
        f"  wall time    {d['wall_seconds']:.2f} s: {d['requests']} requests, {d['requests_per_second']:.1f} requests/s"
        f" ({d['publishes_per_second']:.1f} publishes/s)",
    ]
    if d["aborted"]:
        lines.append(f"  aborted      {d['aborted']}")
    lines.append(f"  result       {'OK' if d['ok'] else 'FAILED: the server erred or could not be reached'}")
    return "\n".join(lines)


class ProgressLine:
    """A single ``\\r``-rewritten status line (done/total, rate, errors), at most ten times a second."""

    def __init__(self, stream: TextIO, total: int, *, clock: Callable[[], float] = time.perf_counter):
        self._stream, self._total, self._clock = stream, total, clock
        self._started = clock()
        self._shown = 0.0
        self._lock = threading.Lock()

    def update(self, done: int, rejected: int, errors: int, *, final: bool = False) -> None:
        with self._lock:
            now = self._clock()
            if not final and now - self._shown < 0.1:
                return
            self._shown = now
            elapsed = now - self._started
            rate = done / elapsed if elapsed > 0 else 0.0
            self._stream.write(f"\r{done}/{self._total} requests  {rate:7.1f}/s  rejected {rejected}  errors {errors} ")
            if final:
                self._stream.write("\n")
            self._stream.flush()


# -- the run -----------------------------------------------------------------------------------------


class _Run:
    """Shared state of one simulation: the job queue, the summary and the progress line."""

    def __init__(self, options: SimulateOptions, authority: HealthAuthority, clock: Callable[[], datetime],
                 progress: TextIO | None):
        self.options = options
        self.authority = authority
        self.clock = clock
        self.target = parse_url(options.url)
        self.rng = random.Random(options.seed)
        self.rng_lock = threading.Lock()
        phones, jobs = plan_population(options, self.rng)
        self.summary = Summary(target=str(self.target), publishes_planned=len(phones),
                               revisions_planned=sum(1 for p in phones if p.revise_to))
        self.total = len(jobs) + self.summary.revisions_planned
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        for job in jobs:
            self.jobs.put(job)
        self.lock = threading.Lock()
        self.done = 0
        self.consecutive_connection_errors = 0
        self.stop = threading.Event()
        self.bucket = TokenBucket(options.rate) if options.rate else None
        self.progress = ProgressLine(progress, self.total) if progress is not None else None

    def _child_rng(self) -> random.Random:
        # Body padding sizes vary per request; a child generator keeps the shared one's use under one lock.
        with self.rng_lock:
            return random.Random(self.rng.getrandbits(64))

    def worker(self) -> None:
        client = _Client(self.target, self.options.timeout)
        try:
            while True:
                job = self.jobs.get()
                try:
                    if job is None:
                        return
                    if self.stop.is_set():
                        self._finish_unsent(job)
                    else:
                        self._run(job, client)
                finally:
                    self.jobs.task_done()
        finally:
            client.close()

    def _finish_unsent(self, job: Job) -> None:
        with self.lock:
            if job.kind == "revision":
                self.summary.revisions_skipped += 1
            self._finish(job, accepted=False)

    def _run(self, job: Job, client: _Client) -> None:
        # Wait for the token before building the body: a slow rate must not age the certificate (exp is 5 min).
        if self.bucket is not None:
            self.bucket.acquire()
        rng = self._child_rng()
        now = self.clock()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        phone = job.phone
        if job.kind == "chaff":
            body = chaff_body(self.authority.app, now, rng)
            headers["X-Chaff"] = "1"
        else:
            assert phone is not None
            if job.kind == "publish":
                phone.keys = phone_keys(now, phone.with_today_key)
                report_type = phone.report_type
            else:
                report_type = phone.revise_to or phone.report_type
            body = publish_body(self.authority, phone, report_type, now, rng)
        data = json.dumps(body).encode()
        started = time.perf_counter()
        try:
            status, raw = client.post(data, headers)
        except (OSError, http.client.HTTPException) as exc:
            self._record_connection_error(job, exc)
            return
        self._record(job, status, raw, time.perf_counter() - started)

    def _record_connection_error(self, job: Job, exc: BaseException) -> None:
        reason = type(exc).__name__
        with self.lock:
            self._count_sent(job)
            self.summary.connection_errors[reason] += 1
            self.consecutive_connection_errors += 1
            if self.consecutive_connection_errors >= MAX_CONSECUTIVE_CONNECTION_ERRORS and not self.stop.is_set():
                self.summary.aborted = (f"{self.consecutive_connection_errors} requests in a row could not reach"
                                        f" the server (last: {reason}: {exc})")
                self.stop.set()
            self._finish(job, accepted=False)

    def _count_sent(self, job: Job) -> None:
        s = self.summary
        if job.kind == "chaff":
            s.chaff_sent += 1
        elif job.kind == "publish":
            s.publishes_sent += 1
        else:
            s.revisions_sent += 1

    def _record(self, job: Job, status: int, raw: bytes, latency: float) -> None:
        s = self.summary
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = None
        accepted = False
        with self.lock:
            self.consecutive_connection_errors = 0
            self._count_sent(job)
            (s.chaff_latencies if job.kind == "chaff" else s.latencies).append(latency)
            if status >= 500:
                s.http_errors[f"{status} {answer.get('code', '') if isinstance(answer, dict) else ''}".strip()] += 1
            elif not isinstance(answer, dict):
                s.http_errors[f"{status} unreadable body"] += 1
            elif status != 200:
                s.rejected[answer.get("code") or f"http_{status}"] += 1
            elif job.kind == "chaff":
                s.chaff_answered += 1
            else:
                accepted = self._accept(job, answer)
            self._finish(job, accepted=accepted)

    def _accept(self, job: Job, answer: dict[str, Any]) -> bool:
        s, phone = self.summary, job.phone
        assert phone is not None
        if answer.get("code") == "partial_failure":
            s.partial_failures += 1
        if job.kind == "publish":
            s.publishes_accepted += 1
            s.keys_inserted += int(answer.get("insertedExposures", 0))
            s.report_types[phone.report_type] += 1
        else:
            s.revisions_accepted += 1
            s.keys_revised += len(phone.keys)
            s.revision_types[f"{phone.report_type}->{phone.revise_to}"] += 1
        phone.revision_token = answer.get("revisionToken", "")
        return True

    def _finish(self, job: Job, *, accepted: bool) -> None:
        """Called under the lock: count the job done and queue the phone's revision if it has earned one."""
        self.done += 1
        phone = job.phone
        if job.kind == "publish" and phone is not None and phone.revise_to:
            if accepted and phone.revision_token and not self.stop.is_set():
                self.jobs.put(Job("revision", phone))
            else:
                self.summary.revisions_skipped += 1
                self.done += 1
        if self.progress is not None:
            self.progress.update(self.done, sum(self.summary.rejected.values()), self._errors())

    def _errors(self) -> int:
        return sum(self.summary.http_errors.values()) + sum(self.summary.connection_errors.values())


def run_simulation(options: SimulateOptions, authority: HealthAuthority, *, clock: Callable[[], datetime],
                   progress: TextIO | None = None) -> Summary:
    """Send the options' publishes, revisions and chaff to the API and return what came back.

    ``clock`` gives the wall-clock time certificates and key intervals are made for (the server checks them
    against its own). ``progress``, if given, receives a ``\\r`` status line.
    """
    options.validate()
    check_reachable(parse_url(options.url), options.timeout)
    run = _Run(options, authority, clock, progress)
    started = time.perf_counter()
    threads = [threading.Thread(target=run.worker, name=f"phone-{i}", daemon=True)
               for i in range(options.concurrency)]
    for t in threads:
        t.start()
    # join() returns once every job, including revisions queued while it waited, is done.
    run.jobs.join()
    for _ in threads:
        run.jobs.put(None)
    for t in threads:
        t.join()
    run.summary.wall_seconds = time.perf_counter() - started
    if run.progress is not None:
        run.progress.update(run.done, sum(run.summary.rejected.values()), run._errors(), final=True)
    return run.summary


def progress_stream() -> TextIO | None:
    """stderr when a person watches it; a progress line would only litter a log file or a pipe."""
    return sys.stderr if sys.stderr.isatty() else None
