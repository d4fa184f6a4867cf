"""``enpipeline cleanup run``: the retention path of the en_cleanup DAG, from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from enpipeline.cli import CliError, _engine, _now, _parse_time, _settings


def cmd_cleanup_run(args: argparse.Namespace) -> None:
    from enpipeline.blobstore import blobstore_from_url
    from enpipeline.config import with_local_secrets
    from enpipeline.retention import RetentionCleaner, RetentionError

    settings = with_local_secrets(_settings())
    now = _parse_time(args.now, "--now") or _now()
    interval_end = _parse_time(args.interval_end, "--interval-end") or now
    cleaner = RetentionCleaner(settings, _engine(settings), blobstore_from_url(settings.blobstore))
    try:
        report = cleaner.run(interval_end, now, dry_run=args.dry_run)
    except RetentionError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return
    _print_report(report)


def _print_report(r: dict[str, Any]) -> None:
    verb = "would" if r["dry_run"] else "did"
    e, m, s, k = r["exposures"], r["mark"], r["sweep"], r["revision_keys"]
    print(f"cutoff {r['cutoff']}{' (dry run: nothing changed)' if r['dry_run'] else ''}")
    print(f"partitions ahead: {r['partitions']['created']} {'missing' if r['dry_run'] else 'created'}")
    rows = f"{e['dropped_rows']} rows" if e["dropped_rows_exact"] else f"about {e['dropped_rows']} rows"
    print(f"keys: {verb} drop {len(e['dropped_partitions'])} partition(s) ({rows}, {e['dropped_bytes']} bytes)"
          f"{': ' + ', '.join(e['dropped_partitions']) if e['dropped_partitions'] else ''}; "
          f"{verb} delete {e['boundary_rows_deleted']} row(s) of the boundary day")
    print(f"exports: {verb} mark {m['batches']} batch(es) and {m['files']} file(s); "
          f"{verb} rewrite {len(r['index']['configs'])} index(es); "
          f"{verb} sweep {s['blobs_deleted']} file(s) and finish {s['batches_deleted']} batch(es)")
    created = k["created"] if k["created"] not in (None, -1) else ("a new one" if k["created"] == -1 else "none")
    print(f"revision keys: created {created}, destroyed {k['destroyed'] or 'none'}, {k['allowed_keys']} usable")


def register(sub: Any, add: Any) -> None:
    group = sub.add_parser("cleanup", help="retention: expire keys and export files").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = add(group, "run", cmd_cleanup_run,
            "drop expired key partitions, mark/index/sweep expired export files, rotate revision keys")
    p.add_argument("--dry-run", action="store_true", help="report what would be removed; change nothing")
    p.add_argument("--now", metavar="ISO", help="the current time (default: now)")
    p.add_argument("--interval-end", metavar="ISO",
                   help="end of the data interval being cleaned (default: --now); cutoff = this - ENP_RETENTION")
    p.add_argument("--json", action="store_true")

