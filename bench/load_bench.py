"""Sustained-load benchmark: publishes at half the measured maximum for 5 minutes; errors, memory, latency.

1. Maximum: 8 closed-loop clients post verified 14-key publishes (the publish benchmark's requests: fresh keys,
   ES256 certificate, tekmac, 1 KiB padding) to `enpipeline api` under gunicorn (its default config) for
   ``--max-duration`` seconds; the rate of 200s is the maximum.
2. Sustained: an open-loop schedule at ``--fraction`` (0.5) of that maximum for ``--duration`` (300) seconds.
   Request i is due at start + i / rate whatever happened to earlier ones, so a slow server shows up as
   latency from the due time (no coordinated omission), not as a quietly lower rate. Request bodies are made
   before the timed phase, by a process pool, so the clients do no crypto while timed.
3. Memory: the resident set of the gunicorn master and every worker, sampled every ``--sample-every``
   seconds. "Flat" is judged on the workers' total: the mean of the last minute against the mean of the
   first minute after the first 30 s (imports, caches and pools fill in those), and the least-squares slope
   over the same span.
4. Afterwards every acknowledged key is looked up in the database: all must be there.

    .venv/bin/python bench/load_bench.py                # = make bench-load (about 7 minutes)
    .venv/bin/python bench/load_bench.py --duration 60  # a shorter run
    .venv/bin/python bench/load_bench.py --json

Exit status 0 when there were no errors, every acknowledged key is stored, the achieved rate is within 2% of
the target and the workers' memory grew by less than 10% (and 20 MB) between the first and last minute.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from publish_bench import (  # a sibling script, not a package
    DEFAULT_CONFIG,
    KEYS_PER_PUBLISH,
    ApiClient,
    Fixture,
    _children,
    api_server,
    bench_database,
    log,
    percentile,
    server_url,
    setup_database,
)

from enpipeline.db.engine import make_engine

SENDERS = 24  # threads of the open-loop client; more than the server's workers, so the schedule never waits
MAX_CLIENTS = 8
WARMUP_S = 5.0
SETTLE_S = 30.0  # memory before this point is start-up, not the steady state
GROWTH_LIMIT = 0.10
GROWTH_LIMIT_MB = 20.0


def _make_bodies(fixture: Fixture, n: int) -> list[bytes]:
    return ApiClient(fixture, "127.0.0.1", 1).make_items(n)


def make_bodies(fixture: Fixture, n: int) -> list[bytes]:
    """``n`` distinct signed publish bodies, made by one process per core."""
    procs = os.cpu_count() or 1
    chunk = math.ceil(n / procs)
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = pool.map(_make_bodies, [fixture] * procs, [chunk] * procs)
        return [b for part in parts for b in part][:n]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemorySampler(threading.Thread):
    def __init__(self, master: int, every: float):
        super().__init__(daemon=True)
        self.master, self.every = master, every
        self.samples: list[tuple[float, float, float, int]] = []  # (t, master MB, workers MB, worker count)
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            workers = _children(self.master)
            self.samples.append((time.monotonic() - self.t0, rss_mb(self.master),
                                 sum(rss_mb(w) for w in workers), len(workers)))
            self.stop.wait(self.every)


def closed_loop(port: int, fixture: Fixture, bodies: list[bytes], seconds: float) -> tuple[float, Counter]:
    """MAX_CLIENTS clients back to back; returns (200s per second, statuses)."""
    items = iter(bodies)
    lock = threading.Lock()
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds

    def client() -> None:
        c = ApiClient(fixture, "127.0.0.1", port)
        while time.monotonic() < deadline:
            with lock:
                body = next(items, None)
            if body is None:
                break
            status, _ = c.do(body)
            with lock:
                statuses[status] += 1
        c.close()

    threads = [threading.Thread(target=client) for _ in range(MAX_CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses.get(200, 0) / (time.monotonic() - t0), statuses


def open_loop(port: int, fixture: Fixture, bodies: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """Request i is due at start + i/rate; SENDERS threads send them. Returns the raw records."""
    due_count = int(rate * seconds)
    counter = itertools.count()
    records: list[tuple[float, float, float, int, int]] = []  # (due, sent, done, status, body index)
    errors: Counter = Counter()
    start = time.monotonic() + 0.5

    def sender() -> None:
        c = ApiClient(fixture, "127.0.0.1", port)
        while True:
            i = next(counter)
            if i >= due_count:
                break
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent = time.monotonic()
            status, error = c.do(bodies[i])
            records.append((due, sent, time.monotonic(), status, i))
            if error:
                errors[f"{status} {error}"] += 1
        c.close()

    threads = [threading.Thread(target=sender) for _ in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"start": start, "records": records, "errors": errors}


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return 60 * sum((t - mx) * (v - my) for t, v in points) / den if den else float("nan")


def stored_count(url: str, bodies: list[bytes], indexes: list[int]) -> int:
    keys = [k["key"] for i in indexes for k in json.loads(bodies[i])["temporaryExposureKeys"]]
    import base64

    raw = [base64.b64decode(k) for k in keys]
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            found = 0
            for i in range(0, len(raw), 10_000):
                found += conn.execute(sa.text("SELECT count(*) FROM exposure WHERE exposure_key = ANY(:k)"),
                                      {"k": raw[i:i + 10_000]}).scalar_one()
            return found
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", help="Postgres server for the bench database (default as publish_bench.py)")
    p.add_argument("--duration", type=float, default=300.0, help="sustained seconds (default 300)")
    p.add_argument("--max-duration", type=float, default=20.0, help="seconds to measure the maximum (default 20)")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the maximum to sustain (default 0.5)")
    p.add_argument("--sample-every", type=float, default=5.0, help="memory sample interval, seconds (default 5)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"gunicorn WORKERS:THREADS (default {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    workers, threads = (int(x) for x in args.config.split(":"))

    logdir = Path(tempfile.mkdtemp(prefix="enp-load-"))
    report: dict[str, Any] = {"config": f"{workers}x{threads}", "duration_s": args.duration,
                              "fraction": args.fraction, "cpus": os.cpu_count()}
    try:
        with server_url(args.database_url) as (base_url, _source), bench_database(base_url) as url:
            fixture = setup_database(url, 1024)
            with api_server(url, workers, threads, logdir) as (proc, port):
                log(f"API {workers}x{threads} on port {port}; making bodies for the maximum run")
                max_bodies = make_bodies(fixture, int(600 * (args.max_duration + WARMUP_S)))
                closed_loop(port, fixture, max_bodies[:int(600 * WARMUP_S)], WARMUP_S)
                max_rate, max_statuses = closed_loop(port, fixture, max_bodies[int(600 * WARMUP_S):],
                                                     args.max_duration)
                report["max"] = {"publishes_per_s": max_rate, "statuses": dict(max_statuses)}
                rate = max_rate * args.fraction
                log(f"maximum {max_rate:.1f} publishes/s ({dict(max_statuses)}); sustaining {rate:.1f}/s "
                    f"for {args.duration:.0f} s")
                bodies = make_bodies(fixture, int(rate * args.duration) + 10)

                sampler = MemorySampler(proc.pid, args.sample_every)
                sampler.start()
                run = open_loop(port, fixture, bodies, rate, args.duration)
                sampler.stop.set()
                sampler.join()

            records = run["records"]
            statuses = Counter(r[3] for r in records)
            ok = [r for r in records if r[3] == 200]
            service = sorted(r[2] - r[1] for r in records)
            response = sorted(r[2] - r[0] for r in records)
            wall = max(r[2] for r in records) - run["start"]
            lag = max(r[1] - r[0] for r in records)
            stored = stored_count(url, bodies, [r[4] for r in ok])
            report["sustained"] = {
                "target_per_s": rate, "requests": len(records), "achieved_per_s": len(ok) / wall,
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "errors": len(records) - len(ok), "error_samples": dict(run["errors"].most_common(5)),
                "max_send_lag_ms": 1000 * lag,
                "latency_ms": {name: {"p50": 1000 * percentile(v, 50), "p90": 1000 * percentile(v, 90),
                                      "p99": 1000 * percentile(v, 99), "max": 1000 * v[-1]}
                               for name, v in (("service", service), ("from_due_time", response))},
                "acknowledged_keys": len(ok) * KEYS_PER_PUBLISH, "stored_keys": stored,
            }
            samples = sampler.samples
            steady = [(t, w) for t, _, w, _ in samples if t >= SETTLE_S]
            first = [w for t, w in steady if t < SETTLE_S + 60] or [steady[0][1]]
            last = [w for t, w in steady if t >= samples[-1][0] - 60] or [steady[-1][1]]
            grew = sum(last) / len(last) - sum(first) / len(first)
            report["memory"] = {
                "samples": len(samples), "workers": samples[-1][3],
                "workers_rss_mb_first_minute": sum(first) / len(first),
                "workers_rss_mb_last_minute": sum(last) / len(last),
                "growth_mb": grew, "growth_share": grew / (sum(first) / len(first)),
                "slope_mb_per_min": slope_mb_per_min(steady),
                "master_rss_mb": [samples[0][1], samples[-1][1]],
                "series": [(round(t), round(m, 1), round(w, 1)) for t, m, w, _ in samples],
            }
    finally:
        shutil.rmtree(logdir, ignore_errors=True)

    s, m = report["sustained"], report["memory"]
    checks = {
        "zero_errors": s["errors"] == 0,
        "all_acknowledged_keys_stored": s["stored_keys"] == s["acknowledged_keys"],
        "rate_held": s["achieved_per_s"] >= 0.98 * s["target_per_s"],
        "memory_flat": m["growth_share"] < GROWTH_LIMIT and m["growth_mb"] < GROWTH_LIMIT_MB,
    }
    report["checks"] = checks
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        lat = s["latency_ms"]
        print(f"\nconfig {report['config']} on {report['cpus']} CPUs")
        print(f"maximum        {report['max']['publishes_per_s']:.1f} publishes/s (8 closed-loop clients)")
        print(f"sustained      target {s['target_per_s']:.1f}/s, achieved {s['achieved_per_s']:.1f}/s over "
              f"{args.duration:.0f} s: {s['requests']} requests, statuses {s['statuses']}, errors {s['errors']}")
        for name in ("service", "from_due_time"):
            v = lat[name]
            print(f"latency {name:13s} p50 {v['p50']:.1f}  p90 {v['p90']:.1f}  p99 {v['p99']:.1f}  "
                  f"max {v['max']:.1f} ms")
        print(f"keys           {s['acknowledged_keys']} acknowledged, {s['stored_keys']} found in the database")
        print(f"memory         workers (x{m['workers']}) {m['workers_rss_mb_first_minute']:.1f} MB first minute -> "
              f"{m['workers_rss_mb_last_minute']:.1f} MB last minute ({m['growth_mb']:+.1f} MB, "
              f"{100 * m['growth_share']:+.1f}%), slope {m['slope_mb_per_min']:+.2f} MB/min; master "
              f"{m['master_rss_mb'][0]:.1f} -> {m['master_rss_mb'][1]:.1f} MB")
        print("checks         " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
