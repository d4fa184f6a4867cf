"""``enpipeline`` commands of the export pipeline: signing keys, export configs, export run/verify."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from enpipeline.cli import CliError, _engine, _now, _parse_time, _print, _settings, _split


def build_pipeline(settings):
    from enpipeline.blobstore import blobstore_from_url
    from enpipeline.export.pipeline import ExportPipeline
    from enpipeline.export.signing import key_manager_from_settings

    return ExportPipeline(settings, _engine(settings), blobstore_from_url(settings.blobstore),
                          key_manager_from_settings(settings))


# -- signing keys ------------------------------------------------------------------------------------

def cmd_signing_key_create(args: argparse.Namespace) -> None:
    from enpipeline.db import export as export_db
    from enpipeline.export.format import ALGORITHM_ECDSA_P256_SHA256
    from enpipeline.export.signing import key_manager_from_settings

    settings = _settings()
    for flag, value in (("--key-id", args.key_id), ("--key-version", args.key_version)):
        if not value.replace("_", "").isalnum() or not value.isascii():
            raise CliError(f"{flag} may only contain letters, digits and '_' (devices reject anything else)")
    start = _parse_time(args.from_, "--from") or _now()
    thru = _parse_time(args.thru, "--thru")
    engine = _engine(settings)
    with engine.connect() as conn:
        if export_db.get_signature_info(conn, args.name):
            raise CliError(f"a signing key named {args.name!r} already exists")
    manager = key_manager_from_settings(settings)
    key_ref = manager.create_signing_key(args.name)
    with engine.begin() as conn:
        export_db.add_signature_info(conn, name=args.name, signing_key=key_ref, key_id=args.key_id,
                                     key_version=args.key_version, algorithm=ALGORITHM_ECDSA_P256_SHA256,
                                     from_timestamp=start, thru_timestamp=thru, now=_now())
    pem = manager.signer(key_ref).public_key_pem()
    if args.public_key_out:
        Path(args.public_key_out).write_text(pem)
    print(f"created signing key {args.name!r} ({key_ref}); verification_key_id={args.key_id} "
          f"verification_key_version={args.key_version} algorithm={ALGORITHM_ECDSA_P256_SHA256}")
    print(f"public key{' written to ' + args.public_key_out if args.public_key_out else ''}"
          " (register it with Apple and Google):")
    print(pem.strip())


def cmd_signing_key_list(args: argparse.Namespace) -> None:
    from enpipeline.db import export as export_db

    now = _now()
    with _engine(_settings()).connect() as conn:
        rows = [{"name": i.name, "key_id": i.verification_key_id, "key_version": i.verification_key_version,
                 "algorithm": i.signature_algorithm, "from": i.from_timestamp.isoformat(),
                 "thru": i.thru_timestamp.isoformat() if i.thru_timestamp else "", "active": i.is_active(now),
                 "key": i.signing_key} for i in export_db.list_signature_infos(conn)]
    _print(rows, args.json)


def cmd_signing_key_retire(args: argparse.Namespace) -> None:
    from enpipeline.db import export as export_db

    at = _parse_time(args.at, "--at") or _now()
    with _engine(_settings()).begin() as conn:
        info = export_db.get_signature_info(conn, args.name)
        if info is None:
            raise CliError(f"no signing key named {args.name!r}")
        if at <= info.from_timestamp:
            raise CliError("--at must be after the key's start")
        export_db.set_signature_info_thru(conn, args.name, at)
    print(f"signing key {args.name!r} signs files exported until {at.isoformat()}")


# -- export configs ----------------------------------------------------------------------------------

def _signature_ids(conn, names: list[str]) -> list[int]:
    from enpipeline.db import export as export_db

    if not names:
        raise CliError("--signing-key needs at least one signing key name")
    ids = []
    for name in names:
        info = export_db.get_signature_info(conn, name)
        if info is None:
            raise CliError(f"no signing key named {name!r} (create it with `enpipeline signing-key create`)")
        ids.append(info.id)
    return ids


def cmd_export_config_add(args: argparse.Namespace) -> None:
    from enpipeline.db import export as export_db
    from enpipeline.durations import parse_duration
    from enpipeline.export.windows import validate_period

    try:
        period = validate_period(parse_duration(args.period))
    except ValueError as exc:
        raise CliError(f"--period: {exc}") from None
    if args.include_travelers and args.only_non_travelers:
        raise CliError("--include-travelers and --only-non-travelers exclude each other")
    if args.max_records is not None and args.max_records <= 0:
        raise CliError("--max-records must be positive")
    root = args.root.strip("/")
    if not root or ".." in root:
        raise CliError("--root must be a relative object prefix such as exposureKeyExport-US")
    start = _parse_time(args.from_, "--from") or datetime(2020, 1, 1, tzinfo=UTC)
    thru = _parse_time(args.thru, "--thru")
    with _engine(_settings()).begin() as conn:
        if export_db.get_export_config(conn, name=args.name):
            raise CliError(f"an export config named {args.name!r} already exists")
        cfg = export_db.ExportConfigRow(
            config_id=0, name=args.name, bucket_name=args.bucket, filename_root=root, period_seconds=period,
            output_region=args.region.upper(), input_regions=tuple(r.upper() for r in _split(args.input_regions)),
            include_travelers=args.include_travelers, only_non_travelers=args.only_non_travelers,
            exclude_regions=tuple(r.upper() for r in _split(args.exclude_regions)),
            max_records_override=args.max_records, signature_info_ids=tuple(_signature_ids(conn, _split(
                args.signing_key))), from_timestamp=start, thru_timestamp=thru, disabled=False)
        export_db.add_export_config(conn, cfg)
    print(f"added export config {args.name!r}: region {cfg.output_region}, every {args.period}, "
          f"files under {args.bucket}/{root}/")


def _config_row(cfg, infos: dict[int, str]) -> dict[str, Any]:
    return {"name": cfg.name, "region": cfg.output_region, "period_s": cfg.period_seconds,
            "bucket": cfg.bucket_name, "root": cfg.filename_root,
            "input_regions": ",".join(cfg.input_regions), "travelers": "include" if cfg.include_travelers else (
                "exclude" if cfg.only_non_travelers else "home only"),
            "exclude_regions": ",".join(cfg.exclude_regions), "max_records": cfg.max_records_override or "",
            "signing_keys": ",".join(infos.get(i, str(i)) for i in cfg.signature_info_ids),
            "from": cfg.from_timestamp.isoformat(), "thru": cfg.thru_timestamp.isoformat() if cfg.thru_timestamp
            else "", "enabled": not cfg.disabled}


def cmd_export_config_list(args: argparse.Namespace) -> None:
    from enpipeline.db import export as export_db

    with _engine(_settings()).connect() as conn:
        infos = {i.id: i.name for i in export_db.list_signature_infos(conn)}
        rows = [_config_row(c, infos) for c in export_db.list_export_configs(conn)]
    _print(rows, args.json)


def _set_disabled(name: str, disabled: bool) -> None:
    from enpipeline.db import export as export_db

    with _engine(_settings()).begin() as conn:
        if not export_db.set_export_config_disabled(conn, name, disabled):
            raise CliError(f"no export config named {name!r}")
    print(f"export config {name!r} {'disabled' if disabled else 'enabled'}")


def cmd_export_config_disable(args: argparse.Namespace) -> None:
    _set_disabled(args.name, True)


def cmd_export_config_enable(args: argparse.Namespace) -> None:
    _set_disabled(args.name, False)


def cmd_export_config_set_signing_keys(args: argparse.Namespace) -> None:
    from enpipeline.db import export as export_db

    with _engine(_settings()).begin() as conn:
        ids = _signature_ids(conn, _split(args.signing_key))
        if not export_db.set_export_config_signature_infos(conn, args.name, ids):
            raise CliError(f"no export config named {args.name!r}")
    print(f"export config {args.name!r} now signs with {args.signing_key}")


# -- export run / verify -----------------------------------------------------------------------------

def cmd_export_run(args: argparse.Namespace) -> None:
    from enpipeline.export.pipeline import ExportError

    start = _parse_time(args.start, "--start")
    end = _parse_time(args.end, "--end")
    pipeline = build_pipeline(_settings())
    try:
        result = pipeline.run_window(args.config, start, end, _now(), force=args.force)
    except ExportError as exc:
        raise CliError(str(exc)) from None
    for f in result["files"]:
        print(f"wrote {f['filename']}: {f['keys']} keys, {f['revised_keys']} revised, {f['bytes']} bytes")
    if not result["files"]:
        print("nothing to write (the window is already exported; --force rewrites it)" if result["stats"] is None
              else "no keys in this window: no file")
    if result["stats"] is not None:
        stats = result["stats"]
        print(f"batch {result['batch_id']} complete: {stats['keys']} keys ({stats.get('padding_keys', 0)} padding),"
              f" {stats['revised_keys']} revised, {stats['files']} file(s), {stats['bytes']} bytes")


def cmd_export_verify(args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives import serialization

    from enpipeline.export import format as fmt

    keys = []
    for path in args.public_key or []:
        try:
            keys.append(serialization.load_pem_public_key(Path(path).read_bytes()))
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot load --public-key {path}: {exc}") from None
    failed = 0
    for path in args.files:
        try:
            parsed = fmt.read_export(Path(path))
        except (OSError, ValueError) as exc:
            print(f"{path}: INVALID: {exc}")
            failed += 1
            continue
        summary = fmt.summarize(parsed)
        verified = fmt.verify_export(parsed, keys) if keys else []
        ok = bool(verified) if keys else None
        status = "no key given" if ok is None else ("VERIFIED" if ok else "SIGNATURE NOT VERIFIED")
        if ok is False:
            failed += 1
        if args.json:
            print(json.dumps({"file": path, "status": status, **summary}, default=str))
        else:
            print(f"{path}: {status}")
            for name, value in summary.items():
                print(f"  {name}: {value}")
    if failed:
        raise SystemExit(1)


def register(sub, add) -> None:
    sk = sub.add_parser("signing-key", help="export signing keys").add_subparsers(dest="action", required=True,
                                                                                 metavar="ACTION")
    p = add(sk, "create", cmd_signing_key_create, "create an ECDSA P-256 signing key and register its signature info")
    p.add_argument("--name", required=True)
    p.add_argument("--key-id", required=True, help="verification_key_id, usually the MCC (e.g. 310)")
    p.add_argument("--key-version", required=True, help="verification_key_version, e.g. v1")
    p.add_argument("--public-key-out", metavar="FILE")
    p.add_argument("--from", dest="from_", metavar="ISO", help="signs files from (default now)")
    p.add_argument("--thru", metavar="ISO", help="signs files until (default open-ended)")
    p = add(sk, "list", cmd_signing_key_list, "list signing keys")
    p.add_argument("--json", action="store_true")
    p = add(sk, "retire", cmd_signing_key_retire, "stop signing with a key (now or --at), e.g. after a rotation")
    p.add_argument("--name", required=True)
    p.add_argument("--at", metavar="ISO")

    ec = sub.add_parser("export-config", help="export configs").add_subparsers(dest="action", required=True,
                                                                               metavar="ACTION")
    p = add(ec, "add", cmd_export_config_add, "add an export config")
    p.add_argument("--name", required=True)
    p.add_argument("--region", required=True, help="the region written into the files")
    p.add_argument("--period", required=True, help="window length that divides 24h, e.g. 1h, 4h, 24h")
    p.add_argument("--signing-key", required=True, action="append", metavar="NAME[,NAME2]")
    p.add_argument("--root", required=True, help="object prefix, e.g. exposureKeyExport-US")
    p.add_argument("--bucket", default="exports")
    p.add_argument("--input-regions", action="append", metavar="US,CA", help="default: --region")
    p.add_argument("--include-travelers", action="store_true", help="also export travelers from any region")
    p.add_argument("--only-non-travelers", action="store_true")
    p.add_argument("--exclude-regions", action="append", metavar="X,Y")
    p.add_argument("--max-records", type=int, help="keys per file (default ENP_EXPORT_MAX_RECORDS)")
    p.add_argument("--from", dest="from_", metavar="ISO", help="first window start (default 2020-01-01)")
    p.add_argument("--thru", metavar="ISO", help="last window end (default open-ended)")
    p = add(ec, "list", cmd_export_config_list, "list export configs")
    p.add_argument("--json", action="store_true")
    p = add(ec, "disable", cmd_export_config_disable, "stop exporting a config (its files stay)")
    p.add_argument("--name", required=True)
    p = add(ec, "enable", cmd_export_config_enable, "resume a disabled config")
    p.add_argument("--name", required=True)
    p = add(ec, "set-signing-keys", cmd_export_config_set_signing_keys, "change the signing keys (rotation)")
    p.add_argument("--name", required=True)
    p.add_argument("--signing-key", required=True, action="append", metavar="NAME[,NAME2]")

    ex = sub.add_parser("export", help="export files").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = add(ex, "run", cmd_export_run, "export one window of one config (the DAG's code path)")
    p.add_argument("--config", required=True)
    p.add_argument("--start", required=True, metavar="ISO")
    p.add_argument("--end", required=True, metavar="ISO")
    p.add_argument("--force", action="store_true", help="rewrite a window that is already exported")
    p = add(ex, "verify", cmd_export_verify, "check and summarise export files (ours or anyone's)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--public-key", action="append", metavar="PEM")
    p.add_argument("--json", action="store_true")
