"""``enpipeline importer ...``: partners whose published export files (index.txt + signed zips) we import."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from enpipeline.cli import CliError, _engine, _now, _parse_time, _print, _settings, _split

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
# What export.proto allows for verification_key_id / verification_key_version.
_KEY_PART_RE = re.compile(r"[A-Za-z0-9_]*")


@dataclass(frozen=True)
class _KeySpec:
    key_id: str
    key_version: str
    pem: str


def _read_key_spec(spec: str) -> _KeySpec:
    """``ID:VERSION:PEM_FILE`` -> the key, normalised to SubjectPublicKeyInfo PEM; any EC curve is accepted.

    Not only P-256: Finland's test files are signed with a secp256k1 key, and the registered key, not the curve,
    is what we trust. RSA and other key types cannot make ECDSA signatures, so they are refused here.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_id, sep1, rest = spec.partition(":")
    key_version, sep2, path = rest.partition(":")  # the path keeps any further ':'
    if not sep1 or not sep2 or not path:
        raise CliError(f"--public-key must be KEY_ID:KEY_VERSION:PEM_FILE (e.g. 262:v1:cwa.pem), got {spec!r}")
    for what, value in (("key id", key_id), ("key version", key_version)):
        if not _KEY_PART_RE.fullmatch(value):
            raise CliError(f"--public-key {spec}: the {what} may only contain letters, digits and '_' "
                           "(as the files' SignatureInfo)")
    if not key_version:
        raise CliError(f"--public-key {spec}: the key version must not be empty")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read --public-key file {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise CliError(f"--public-key file {path} is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CliError(f"--public-key file {path} is a {type(key).__name__.removeprefix('_')}; export files are "
                       "signed with ECDSA, so it must be an EC public key (e.g. P-256)")
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return _KeySpec(key_id, key_version, pem)


def _check_url(url: str, flag: str) -> str:
    from enpipeline.federation.importer import check_url

    try:
        return check_url(url, flag)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _importer_or_fail(conn, name: str):
    from enpipeline.db import importer as importer_db

    found = importer_db.get_importer(conn, name)
    if found is None:
        raise CliError(f"no importer named {name!r}")
    return found


def cmd_importer_add(args: argparse.Namespace) -> None:
    from enpipeline.db import importer as importer_db

    if not _NAME_RE.fullmatch(args.id):
        raise CliError("--id may only contain letters, digits, '.', '_' and '-'")
    index_url = _check_url(args.index_url, "--index-url")
    export_root = _check_url(args.export_root, "--export-root") if args.export_root else None
    partner = (args.partner or args.id).strip()
    if not partner:
        raise CliError("--partner must not be empty")
    specs = [_read_key_spec(s) for s in args.public_key]
    names = [(s.key_id, s.key_version) for s in specs]
    if len(set(names)) != len(names):
        raise CliError("two --public-key options name the same key id and version")
    regions = [r.upper() for r in _split(args.regions)]
    with _engine(_settings()).begin() as conn:
        if importer_db.get_importer(conn, args.id):
            raise CliError(f"an importer named {args.id!r} already exists")
        importer_id = importer_db.add_importer(conn, name=args.id, partner=partner, index_url=index_url,
                                               export_root=export_root, regions=regions, traveler=args.traveler,
                                               now=_now())
        for s in specs:
            importer_db.add_importer_key(conn, importer_id, key_id=s.key_id, key_version=s.key_version,
                                         public_key_pem=s.pem)
    print(f"added importer {args.id!r} (partner {partner!r}): index {index_url}, "
          f"{len(specs)} key(s): {', '.join(f'{k}/{v}' for k, v in names)}; "
          f"keys get regions {','.join(regions) if regions else 'of each file'}")


def cmd_importer_add_key(args: argparse.Namespace) -> None:
    from enpipeline.db import importer as importer_db

    spec = _read_key_spec(args.public_key)
    start = _parse_time(args.from_, "--from")
    thru = _parse_time(args.thru, "--thru")
    if start is not None and thru is not None and thru <= start:
        raise CliError("--thru must be after --from")
    with _engine(_settings()).begin() as conn:
        found = _importer_or_fail(conn, args.id)
        if any((k.key_id, k.key_version) == (spec.key_id, spec.key_version) for k in found.keys):
            raise CliError(f"importer {args.id!r} already has key {spec.key_id}/{spec.key_version}")
        importer_db.add_importer_key(conn, found.id, key_id=spec.key_id, key_version=spec.key_version,
                                     public_key_pem=spec.pem, from_timestamp=start, thru_timestamp=thru)
    print(f"added key {spec.key_id}/{spec.key_version} to importer {args.id!r}")


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value else ""


def cmd_importer_list(args: argparse.Namespace) -> None:
    from enpipeline.db import importer as importer_db

    with _engine(_settings()).connect() as conn:
        found = importer_db.list_importers(conn)
    if args.json:
        print(json.dumps([{
            "id": i.name, "partner": i.partner, "index_url": i.index_url, "export_root": i.export_root,
            "regions": list(i.regions), "traveler": i.traveler, "enabled": not i.disabled,
            "export_import_id": i.id, "created_at": i.created_at.isoformat(),
            "keys": [{"key_id": k.key_id, "key_version": k.key_version, "from": _iso(k.from_timestamp),
                      "thru": _iso(k.thru_timestamp), "public_key": k.public_key_pem} for k in i.keys],
        } for i in found], indent=2))
        return
    _print([{"id": i.name, "partner": i.partner, "index_url": i.index_url, "export_root": i.export_root or "",
             "regions": ",".join(i.regions) or "(file's)", "traveler": i.traveler, "enabled": not i.disabled,
             "keys": ",".join(f"{k.key_id}/{k.key_version}" for k in i.keys)} for i in found], False)


def cmd_importer_remove(args: argparse.Namespace) -> None:
    from enpipeline.db import importer as importer_db

    with _engine(_settings()).begin() as conn:
        if not importer_db.remove_importer(conn, args.id):
            raise CliError(f"no importer named {args.id!r}")
    print(f"removed importer {args.id!r} with its keys and file records (imported keys stay)")


def _set_disabled(name: str, disabled: bool) -> None:
    from enpipeline.db import importer as importer_db

    with _engine(_settings()).begin() as conn:
        if not importer_db.set_importer_disabled(conn, name, disabled):
            raise CliError(f"no importer named {name!r}")
    print(f"importer {name!r} {'disabled' if disabled else 'enabled'}")


def cmd_importer_disable(args: argparse.Namespace) -> None:
    _set_disabled(args.id, True)


def cmd_importer_enable(args: argparse.Namespace) -> None:
    _set_disabled(args.id, False)


def cmd_importer_run(args: argparse.Namespace) -> None:
    from enpipeline.federation.importer import ExportImportError, import_exports

    now = _parse_time(args.now, "--now") or _now()
    settings = _settings()
    try:
        report = import_exports(settings, _engine(settings), args.id, now, retry_failed=args.retry_failed)
    except ExportImportError as exc:
        if exc.report is not None:
            print(_counts_line(exc.report.as_dict()))
        raise CliError(str(exc)) from None
    print(_counts_line(report.as_dict()))


def _counts_line(counts: dict[str, Any]) -> str:
    return (f"importer {counts['importer']!r}: {counts['files_seen']} file(s) listed, "
            f"{counts['files_imported']} imported, {counts['files_skipped']} already processed, "
            f"{counts['files_failed']} failed; keys: {counts['keys_inserted']} inserted, "
            f"{counts['keys_revised']} revised, {counts['keys_rejected']} rejected, {counts['keys_skipped']} skipped")


def cmd_importer_files(args: argparse.Namespace) -> None:
    from enpipeline.db import importer as importer_db

    with _engine(_settings()).connect() as conn:
        found = _importer_or_fail(conn, args.id)
        files = importer_db.list_import_files(conn, found.id)
    rows = [{"file": f.filename, "status": f.status, "processed_at": f.processed_at.isoformat(),
             "import_file_id": f.import_file_id, "inserted": f.keys_inserted, "revised": f.keys_revised,
             "rejected": f.keys_rejected, "skipped": f.keys_skipped, "sha256": f.sha256 or "",
             "error": f.error or ""} for f in files]
    _print(rows, args.json)


def register(group: Any, add: Any) -> None:
    """Add the ``importer`` subcommands to ``group``."""
    p = add(group, "add", cmd_importer_add, "register a partner whose export files (index.txt + zips) we import")
    p.add_argument("--id", required=True, help="importer name, e.g. de-cwa")
    p.add_argument("--index-url", required=True, metavar="URL",
                   help="http(s)://, file:// or gs:// URL of the partner's index.txt")
    p.add_argument("--public-key", required=True, action="append", metavar="ID:VERSION:PEM_FILE",
                   help="a key the files are signed with, named as their SignatureInfo names it "
                        "(verification_key_id:verification_key_version); repeatable")
    p.add_argument("--export-root", metavar="URL",
                   help="URL the index entries are relative to (default: derived from --index-url; "
                        "an entry starting with the index directory's name is taken relative to its parent)")
    p.add_argument("--partner", help="the partner's name (default: the id)")
    p.add_argument("--regions", action="append", metavar="DE[,AT]",
                   help="regions stored on imported keys (default: each file's region)")
    p.add_argument("--traveler", action="store_true", help="mark imported keys as travelers")
    p = add(group, "add-key", cmd_importer_add_key, "register another signing key of an importer (rotation)")
    p.add_argument("--id", required=True)
    p.add_argument("--public-key", required=True, metavar="ID:VERSION:PEM_FILE")
    p.add_argument("--from", dest="from_", metavar="ISO", help="valid from (default: always)")
    p.add_argument("--thru", metavar="ISO", help="valid until (default: open-ended)")
    p = add(group, "list", cmd_importer_list, "list importers")
    p.add_argument("--json", action="store_true")
    p = add(group, "remove", cmd_importer_remove, "delete an importer, its keys and its file records")
    p.add_argument("--id", required=True)
    p = add(group, "disable", cmd_importer_disable, "stop importing from a partner (scheduled runs skip it)")
    p.add_argument("--id", required=True)
    p = add(group, "enable", cmd_importer_enable, "resume a disabled importer")
    p.add_argument("--id", required=True)
    p = add(group, "run", cmd_importer_run,
            "import the files of the index not processed yet (exit 1 if any file failed)")
    p.add_argument("--id", required=True)
    p.add_argument("--now", metavar="ISO", help="pretend it is this time (default now)")
    p.add_argument("--retry-failed", action="store_true",
                   help="try files recorded FAILED again (e.g. after adding a key)")
    p = add(group, "files", cmd_importer_files, "list the files an importer processed")
    p.add_argument("--id", required=True)
    p.add_argument("--json", action="store_true")
