"""Export importers (partners that publish only export files), their verification keys and processed files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

STATUS_COMPLETE = "COMPLETE"
STATUS_FAILED = "FAILED"

_IMPORTER_COLUMNS = "id, name, partner, index_url, export_root, regions, traveler, disabled, created_at"
_FILE_COLUMNS = ("import_file_id, importer_id, filename, status, processed_at, sha256, keys_inserted, keys_revised,"
                 " keys_rejected, keys_skipped, error")
# Two-int advisory-lock form keeps these locks apart from every other advisory-lock user.
_LOCK_CLASS = "hashtext('enp_export_importer')"


@dataclass(frozen=True)
class ImporterKey:
    """A public key that may sign the importer's files, named as the files' SignatureInfo names it."""

    key_id: str
    key_version: str
    public_key_pem: str
    from_timestamp: datetime | None = None
    thru_timestamp: datetime | None = None

    def is_valid_at(self, now: datetime) -> bool:
        return ((self.from_timestamp is None or self.from_timestamp <= now)
                and (self.thru_timestamp is None or now < self.thru_timestamp))


@dataclass(frozen=True)
class Importer:
    id: int
    name: str
    partner: str
    index_url: str
    export_root: str | None
    regions: tuple[str, ...]
    traveler: bool
    disabled: bool
    created_at: datetime
    keys: tuple[ImporterKey, ...] = ()


@dataclass(frozen=True)
class ImportFile:
    """One file of an importer's index that was processed (COMPLETE) or refused for good (FAILED)."""

    import_file_id: int
    importer_id: int
    filename: str
    status: str
    processed_at: datetime
    sha256: str | None
    keys_inserted: int
    keys_revised: int
    keys_rejected: int
    keys_skipped: int
    error: str | None


# -- importers ------------------------------------------------------------------------------------------

def _load(conn: Connection, where: str, params: dict) -> list[Importer]:
    rows = conn.execute(sa.text(f"SELECT {_IMPORTER_COLUMNS} FROM export_importer {where} ORDER BY name"),
                        params).all()
    if not rows:
        return []
    keys: dict[int, list[ImporterKey]] = {r.id: [] for r in rows}
    for importer_id, key in _keys_of(conn, list(keys)):
        keys[importer_id].append(key)
    return [Importer(id=r.id, name=r.name, partner=r.partner, index_url=r.index_url, export_root=r.export_root,
                     regions=tuple(r.regions or ()), traveler=r.traveler, disabled=r.disabled,
                     created_at=r.created_at, keys=tuple(keys[r.id])) for r in rows]


def add_importer(conn: Connection, *, name: str, partner: str, index_url: str, export_root: str | None,
                 regions: Sequence[str], traveler: bool, now: datetime) -> int:
    return conn.execute(
        sa.text("INSERT INTO export_importer (name, partner, index_url, export_root, regions, traveler, created_at)"
                " VALUES (:name, :partner, :index_url, :export_root, :regions, :traveler, :now) RETURNING id"),
        {"name": name, "partner": partner, "index_url": index_url, "export_root": export_root,
         "regions": list(regions), "traveler": traveler, "now": now},
    ).scalar_one()


def get_importer(conn: Connection, name: str) -> Importer | None:
    found = _load(conn, "WHERE name = :name", {"name": name})
    return found[0] if found else None


def list_importers(conn: Connection) -> list[Importer]:
    return _load(conn, "", {})


def list_importer_names(conn: Connection) -> list[str]:
    """Names of the enabled importers, sorted: what the scheduled import maps over."""
    return list(conn.execute(sa.text("SELECT name FROM export_importer WHERE NOT disabled ORDER BY name")).scalars())


def set_importer_disabled(conn: Connection, name: str, disabled: bool) -> bool:
    result = conn.execute(sa.text("UPDATE export_importer SET disabled = :d WHERE name = :name"),
                          {"d": disabled, "name": name})
    return result.rowcount == 1


def remove_importer(conn: Connection, name: str) -> bool:
    """Delete the importer with its keys and file records; keys it imported stay (their export_import_id dangles)."""
    return conn.execute(sa.text("DELETE FROM export_importer WHERE name = :name"), {"name": name}).rowcount == 1


# -- keys -----------------------------------------------------------------------------------------------

def add_importer_key(conn: Connection, importer_id: int, *, key_id: str, key_version: str, public_key_pem: str,
                     from_timestamp: datetime | None = None, thru_timestamp: datetime | None = None) -> None:
    conn.execute(
        sa.text("INSERT INTO export_importer_key (importer_id, key_id, key_version, public_key, from_timestamp,"
                " thru_timestamp) VALUES (:i, :kid, :kv, :pk, :f, :t)"),
        {"i": importer_id, "kid": key_id, "kv": key_version, "pk": public_key_pem, "f": from_timestamp,
         "t": thru_timestamp},
    )


def list_importer_keys(conn: Connection, importer_id: int) -> list[ImporterKey]:
    return [key for _, key in _keys_of(conn, [importer_id])]


def _keys_of(conn: Connection, importer_ids: Sequence[int]) -> list[tuple[int, ImporterKey]]:
    rows = conn.execute(
        sa.text("SELECT importer_id, key_id, key_version, public_key, from_timestamp, thru_timestamp"
                " FROM export_importer_key WHERE importer_id = ANY(:ids) ORDER BY importer_id, key_id, key_version"),
        {"ids": list(importer_ids)},
    )
    return [(r.importer_id, ImporterKey(key_id=r.key_id, key_version=r.key_version, public_key_pem=r.public_key,
                                        from_timestamp=r.from_timestamp, thru_timestamp=r.thru_timestamp))
            for r in rows]


# -- run lock -------------------------------------------------------------------------------------------

def try_lock_importer(conn: Connection, importer_id: int) -> bool:
    """Take the importer's session-level run lock if it is free.

    Session level rather than transaction level because one run commits one transaction per file; the lock
    must outlive them all. It goes with the connection if the process dies.
    """
    return bool(conn.execute(
        sa.text(f"SELECT pg_try_advisory_lock({_LOCK_CLASS}, CAST(:id % 2147483648 AS INTEGER))"),
        {"id": importer_id}).scalar_one())


def unlock_importer(conn: Connection, importer_id: int) -> None:
    conn.execute(sa.text(f"SELECT pg_advisory_unlock({_LOCK_CLASS}, CAST(:id % 2147483648 AS INTEGER))"),
                 {"id": importer_id})


# -- processed files ------------------------------------------------------------------------------------

def processed_files(conn: Connection, importer_id: int) -> dict[str, str]:
    """``filename -> status`` of every file recorded for the importer."""
    rows = conn.execute(sa.text("SELECT filename, status FROM import_file WHERE importer_id = :i"),
                        {"i": importer_id})
    return {r.filename: r.status for r in rows}


def list_import_files(conn: Connection, importer_id: int) -> list[ImportFile]:
    rows = conn.execute(sa.text(f"SELECT {_FILE_COLUMNS} FROM import_file WHERE importer_id = :i"
                                " ORDER BY filename"), {"i": importer_id})
    return [ImportFile(**r._asdict()) for r in rows]


def record_import_file(conn: Connection, importer_id: int, filename: str, *, status: str, processed_at: datetime,
                       sha256: str | None, error: str | None = None) -> int:
    """Insert (or, for a retried file, overwrite) the file's record with zero counts; returns its id.

    Called first in a file's transaction, so its id can be stored on the keys that follow; a retried file keeps
    its id, so keys stored by an earlier attempt and this one name the same record.
    """
    return conn.execute(
        sa.text("INSERT INTO import_file (importer_id, filename, status, processed_at, sha256, error)"
                " VALUES (:i, :f, :s, :at, :sha, :err)"
                " ON CONFLICT (importer_id, filename) DO UPDATE SET status = EXCLUDED.status,"
                " processed_at = EXCLUDED.processed_at, sha256 = EXCLUDED.sha256, error = EXCLUDED.error,"
                " keys_inserted = 0, keys_revised = 0, keys_rejected = 0, keys_skipped = 0"
                " RETURNING import_file_id"),
        {"i": importer_id, "f": filename, "s": status, "at": processed_at, "sha": sha256, "err": error},
    ).scalar_one()


def set_import_file_counts(conn: Connection, import_file_id: int, *, inserted: int, revised: int, rejected: int,
                           skipped: int) -> None:
    conn.execute(
        sa.text("UPDATE import_file SET keys_inserted = :ins, keys_revised = :rev, keys_rejected = :rej,"
                " keys_skipped = :skip WHERE import_file_id = :id"),
        {"ins": inserted, "rev": revised, "rej": rejected, "skip": skipped, "id": import_file_id},
    )
