"""Export benchmark: 1.4M keys in one window, exported to the filesystem store, against a raw COPY baseline.

    .venv/bin/python bench/export_bench.py [--keys 1400000] [--max-records 500000,100000] [--database-url URL]

Prints, per max-records setting: wall time of the whole export path (plan + every shard + finalize, as
`enpipeline export run` does it, and with the shards on 2 processes as the DAG's mapped tasks run them), keys/s,
peak memory of the exporting process; and in the same run the baseline `COPY (...) TO STDOUT` of the same rows
with the ratio export/COPY. Each export runs in a fresh process so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from enpipeline.db.admin import scratch_database
from enpipeline.db.engine import make_engine

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
WINDOW_START = datetime(2026, 1, 10, 12, tzinfo=UTC)
WINDOW_END = WINDOW_START + timedelta(hours=1)
NOW = WINDOW_END + timedelta(days=1)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def seed(url: str, n: int) -> None:
    """100,000 publishes x 14 keys, inserted straight into the window (generated in SQL: fast and local)."""
    from enpipeline.db.migrate import ensure_partitions, migrate

    engine = make_engine(url, pool_size=1, max_overflow=0)
    migrate(engine, now=WINDOW_START, retention=timedelta(days=14), days_ahead=2)
    first_day = int(WINDOW_START.timestamp()) // 86400 * 144
    with engine.begin() as conn:
        ensure_partitions(conn, WINDOW_START.date(), WINDOW_START.date())
        conn.execute(sa.text(
            "INSERT INTO exposure (exposure_key, transmission_risk, app_package_name, regions, traveler,"
            " interval_number, interval_count, created_at, local_provenance, report_type, days_since_symptom_onset)"
            " SELECT decode(md5(i::text || ':' || random()::text), 'hex'), (i % 8) + 1, 'bench', '{US}', false,"
            " :day - 144 * (1 + i % 14), 144, :start + make_interval(secs => i % 3600), true,"
            " (ARRAY['confirmed', 'likely', 'user-report'])[1 + i % 3], (i % 29) - 14"
            " FROM generate_series(1, :n) AS i"), {"day": first_day, "start": WINDOW_START, "n": n})
        conn.execute(sa.text("ANALYZE exposure"))
    engine.dispose()


def copy_baseline(url: str) -> tuple[float, int]:
    engine = make_engine(url, pool_size=1, max_overflow=0)
    with engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()
        query = cursor.mogrify("SELECT * FROM exposure WHERE created_at >= %s AND created_at < %s",
                               (WINDOW_START, WINDOW_END)).decode()
        buf = io.BytesIO()
        t0 = time.perf_counter()
        cursor.copy_expert(f"COPY ({query}) TO STDOUT", buf)
        elapsed = time.perf_counter() - t0
    engine.dispose()
    return elapsed, buf.tell()


def run_export(url: str, max_records: int, parallel: int, workdir: Path) -> dict:
    """One export in a fresh process (so its peak RSS is its own); returns its figures."""
    env = {**os.environ, "ENP_DATABASE_URL": url, "ENP_KEY_DIR": str(workdir / "keys"),
           "ENP_BLOBSTORE": f"file://{workdir / 'blobs'}"}
    out = subprocess.run([sys.executable, __file__, "--child", str(max_records), str(parallel)], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"export child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(max_records: int, parallel: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from enpipeline.blobstore import blobstore_from_url
    from enpipeline.config import load_settings
    from enpipeline.db import export as export_db
    from enpipeline.export.format import ALGORITHM_ECDSA_P256_SHA256
    from enpipeline.export.pipeline import ExportPipeline
    from enpipeline.export.signing import key_manager_from_settings

    settings = load_settings()
    engine = make_engine(settings.database_url, pool_size=2, max_overflow=2)
    keys = key_manager_from_settings(settings)
    name = f"bench{max_records}p{parallel}"
    ref = keys.create_signing_key(name)
    with engine.begin() as conn:
        sig = export_db.add_signature_info(conn, name=name, signing_key=ref, key_id="310", key_version="v1",
                                           algorithm=ALGORITHM_ECDSA_P256_SHA256, from_timestamp=NOW - timedelta(
                                               days=30), thru_timestamp=None, now=NOW)
        export_db.add_export_config(conn, export_db.ExportConfigRow(
            config_id=0, name=name, bucket_name="exports", filename_root=name, period_seconds=3600,
            output_region="US", input_regions=(), include_travelers=False, only_non_travelers=False,
            exclude_regions=(), max_records_override=max_records, signature_info_ids=(sig,),
            from_timestamp=WINDOW_START - timedelta(days=1), thru_timestamp=None, disabled=False))
    pipeline = ExportPipeline(settings, engine, blobstore_from_url(settings.blobstore), keys)
    t0 = time.perf_counter()
    with engine.connect() as conn:
        cfg = export_db.get_export_config(conn, name=name)
    tasks, batch_id = pipeline.plan_window(cfg, WINDOW_START, WINDOW_END, NOW)
    t_plan = time.perf_counter() - t0
    if parallel > 1:
        with ProcessPoolExecutor(parallel, initializer=_init_worker) as pool:
            files = list(pool.map(_export_one, [t.to_dict() for t in tasks]))
    else:
        files = [pipeline.export_shard(t, NOW) for t in tasks]
    t_shards = time.perf_counter() - t0 - t_plan
    stats = pipeline.finalize([batch_id], NOW)[batch_id]
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"max_records": max_records, "parallel": parallel, "wall_s": wall, "plan_s": t_plan,
                      "shards_s": t_shards, "finalize_s": wall - t_plan - t_shards, "files": len(files),
                      "keys": stats["keys"], "bytes": stats["bytes"],
                      "peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, children) / 1024}))


_worker_pipeline = None


def _init_worker() -> None:
    global _worker_pipeline
    from enpipeline.blobstore import blobstore_from_url
    from enpipeline.config import load_settings
    from enpipeline.export.pipeline import ExportPipeline
    from enpipeline.export.signing import key_manager_from_settings

    settings = load_settings()
    _worker_pipeline = ExportPipeline(settings, make_engine(settings.database_url, pool_size=1, max_overflow=0),
                                      blobstore_from_url(settings.blobstore), key_manager_from_settings(settings))


def _export_one(task: dict) -> dict:
    from enpipeline.export.pipeline import ShardTask

    return _worker_pipeline.export_shard(ShardTask.from_dict(task), NOW)


def _reachable(url: str) -> bool:
    try:
        engine = make_engine(url, pool_size=1, max_overflow=0)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except sa.exc.OperationalError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_400_000)
    parser.add_argument("--max-records", default="500000,100000")
    parser.add_argument("--database-url", default=os.environ.get("ENP_BENCH_DATABASE_URL", LOCAL_URL))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not _reachable(args.database_url):
        raise SystemExit(f"Postgres not reachable at {args.database_url} (set --database-url)")
    with scratch_database(args.database_url, "enp_bench_export") as url, tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        seed(url, args.keys)
        log(f"seeded {args.keys:,} keys in {time.perf_counter() - t0:.1f} s")
        copy_s, copy_bytes = min(copy_baseline(url) for _ in range(3))
        results = []
        for max_records in [int(x) for x in args.max_records.split(",")]:
            for parallel in (1, 2):
                r = run_export(url, max_records, parallel, Path(tmp))
                r["keys_per_s"] = r["keys"] / r["wall_s"]
                r["ratio_to_copy"] = r["wall_s"] / copy_s
                results.append(r)
                log(f"max_records={max_records:>7,} shards on {parallel} process(es): {r['wall_s']:.2f} s "
                    f"(plan {r['plan_s']:.2f}, shards {r['shards_s']:.2f}, finalize {r['finalize_s']:.2f}), "
                    f"{r['files']} file(s), {r['keys_per_s']:,.0f} keys/s, peak {r['peak_rss_mb']:.0f} MB, "
                    f"{r['ratio_to_copy']:.1f}x COPY")
    summary = {"keys": args.keys, "copy_baseline_s": copy_s, "copy_bytes": copy_bytes, "exports": results,
               "machine_cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"\nexport benchmark: {args.keys:,} keys in one 1 h window, filesystem blob store, {os.cpu_count()} CPUs")
    print(f"baseline COPY (...) TO STDOUT of the same rows: {copy_s:.2f} s ({copy_bytes / 1e6:.0f} MB)")
    print(f"{'max_records':>11} {'procs':>5} {'files':>5} {'wall_s':>7} {'keys/s':>10} {'peak_MB':>8} {'x COPY':>7}"
          f" {'<=5 s':>6}")
    for r in results:
        verdict = "yes" if r["wall_s"] <= 5 else "no"
        print(f"{r['max_records']:>11,} {r['parallel']:>5} {r['files']:>5} {r['wall_s']:>7.2f}"
              f" {r['keys_per_s']:>10,.0f} {r['peak_rss_mb']:>8.0f} {r['ratio_to_copy']:>7.1f} {verdict:>6}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
