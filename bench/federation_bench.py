"""Federation pull benchmark: 1M keys pulled from a local Fetch server into an empty database.

    .venv/bin/python bench/federation_bench.py [--keys 1000000] [--page-size 500] [--database-url URL]

Partner A: a scratch database with N synthetic keys (`enpipeline generate`, yesterday) served by
`enpipeline federation serve` in its own process. Puller B: an empty migrated database with one query (or, with
--prefill-days, one already holding its own keys in every day partition). Timed:
`pull_query` (what the DAG's mapped task and `enpipeline federation pull` run), from the first Fetch to the last
committed page: every key validated, stored with its provenance, cursor and sync row saved per page. Prints the
wall time, keys/s, pages, and the CPU seconds of each process (puller, server, each database's backends).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from publish_bench import CpuMeter

from enpipeline.config import Settings
from enpipeline.db import federation_in, federation_out
from enpipeline.db.admin import scratch_database
from enpipeline.db.engine import make_engine, normalize_url
from enpipeline.db.migrate import migrate
from enpipeline.federation.auth import FederationAuthorization
from enpipeline.federation.credentials import store_credentials
from enpipeline.federation.pull import pull_query
from enpipeline.generate import generate_keys

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the federation server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit("the federation server did not start")


def db_name(url: str) -> str:
    return sa.engine.make_url(url).database or ""


def backend_pids(admin_url: str, database: str | None) -> list[int]:
    """Pids of the client backends of ``database``, or of the server's background processes for None."""
    engine = sa.create_engine(normalize_url(admin_url), poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            if database is None:
                sql, params = "SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'", {}
            else:
                sql, params = "SELECT pid FROM pg_stat_activity WHERE datname = :d", {"d": database}
            return list(conn.execute(sa.text(sql), params).scalars())
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--page-size", type=int, default=500, help="server's ENP_FEDERATION_PAGE_SIZE")
    parser.add_argument("--store-batch", type=int, default=Settings.federation_store_batch,
                        help="puller's ENP_FEDERATION_STORE_BATCH")
    parser.add_argument("--prefill-days", type=int, default=0,
                        help="fill the puller's database with this many days of its own keys first (steady state)")
    parser.add_argument("--prefill-keys-per-day", type=int, default=100_000)
    parser.add_argument("--database-url", default=LOCAL_URL)
    parser.add_argument("--profile", action="store_true", help="print the puller's top functions")
    parser.add_argument("--profile-server", metavar="FILE", help="write the server's cProfile stats to FILE")
    args = parser.parse_args()
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    with scratch_database(args.database_url, "enp_bench_fed_a") as url_a, \
            scratch_database(args.database_url, "enp_bench_fed_b") as url_b:
        engine_a = make_engine(url_a, pool_size=1, max_overflow=0)
        migrate(engine_a, now=now, retention=timedelta(days=14), days_ahead=1)
        started = time.perf_counter()
        generate_keys(engine_a, days=1, keys_per_day=args.keys, regions=["US"], now=now)
        with engine_a.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE exposure"))
        with engine_a.begin() as conn:
            federation_out.add_authorization(conn, FederationAuthorization(
                issuer="bench.example", subject="puller", partner="B", public_key_pem=public_pem,
                audience="https://a.example/federation"), now=now)
        engine_a.dispose()
        log(f"partner A: {args.keys:,} keys in {time.perf_counter() - started:.1f}s")

        port = free_port()
        env = {**os.environ, "ENP_DATABASE_URL": url_a, "ENP_FEDERATION_PAGE_SIZE": str(args.page_size)}
        serve = [str(Path(sys.executable).with_name("enpipeline")), "federation", "serve", "--host", "127.0.0.1",
                 "--port", str(port)]
        if args.profile_server:
            serve = [sys.executable, "-m", "cProfile", "-o", args.profile_server, *serve]
        server = subprocess.Popen(serve, env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, server)
            engine_b = make_engine(url_b, pool_size=2, max_overflow=0)
            migrate(engine_b, now=now, retention=timedelta(days=14), days_ahead=1)
            if args.prefill_days:
                # Every day partition then holds keys, as on a server that has run for two weeks: the duplicate
                # check probes each of them instead of only the partitions the first sync is filling.
                generate_keys(engine_b, days=args.prefill_days, keys_per_day=args.prefill_keys_per_day,
                              regions=["US"], now=now)
                with engine_b.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text("VACUUM ANALYZE exposure"))
                log(f"puller B: {args.prefill_days * args.prefill_keys_per_day:,} keys of its own over "
                    f"{args.prefill_days} days")
            key_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"enp-bench-fed-{os.getpid()}"
            settings = Settings(database_url=url_b, key_dir=key_dir, federation_max_pull_duration=timedelta(hours=1),
                                federation_page_size=args.page_size, federation_store_batch=args.store_batch)
            ref = store_credentials(key_dir, "federation-in-bench", private_pem)
            with engine_b.begin() as conn:
                federation_in.add_query(conn, federation_in.FederationInQuery(
                    query_id="bench", partner="A", server_addr=f"127.0.0.1:{port}",
                    audience="https://a.example/federation", credentials=ref, issuer="bench.example",
                    subject="puller"), now)
            profiler = cProfile.Profile() if args.profile else None
            meter = CpuMeter({"puller": lambda: [os.getpid()], "server": lambda: [server.pid],
                              "postgres A (serving)": lambda: backend_pids(url_a, db_name(url_a)),
                              "postgres B (storing)": lambda: backend_pids(url_b, db_name(url_b)),
                              "postgres background": lambda: backend_pids(args.database_url, None)})
            meter.start()
            started = time.perf_counter()
            if profiler:
                profiler.enable()
            report = pull_query(settings, engine_b, "bench", datetime.now(UTC))
            if profiler:
                profiler.disable()
            elapsed = time.perf_counter() - started
            cpu = meter.stop(elapsed)
            with engine_b.connect() as conn:
                stored = conn.execute(sa.text("SELECT count(*) FROM exposure WHERE sync_query_id = 'bench'")
                                      ).scalar_one()
            engine_b.dispose()
        finally:
            server.terminate()
            server.wait(30)
    print(f"pulled {report.insertions:,} keys ({stored:,} stored, {report.rejected} rejected) in {report.pages:,} "
          f"page(s) of <= {args.page_size}: {elapsed:.1f} s, {report.insertions / elapsed:,.0f} keys/s "
          f"(target <= 30 s for 1M)", flush=True)
    print("CPU, in cores busy over the pull (x wall time = CPU seconds): " + ", ".join(
        f"{name} {share:.2f} ({share * elapsed:.1f} s)" for name, share in cpu.items() if name != "cores")
        + f"; {cpu['cores']:.0f} cores", flush=True)
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
