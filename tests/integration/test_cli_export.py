"""The export CLI contract: signing keys, export configs, `export run` and `export verify`."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from enpipeline.db import exposures as exposures_db
from enpipeline.model import Exposure
from enpipeline.timeutil import interval_number, truncate

REALWORLD = Path(os.environ.get("ENP_REALWORLD_DIR") or Path(__file__).resolve().parents[3] / "shared" / "realworld")
NOW = truncate(datetime.now(UTC), timedelta(hours=1))
START = NOW - timedelta(hours=5)
END = START + timedelta(hours=1)


def _seed(engine, n: int, at: datetime) -> None:
    rows = [Exposure(exposure_key=os.urandom(16), transmission_risk=2, app_package_name="x", regions=["US"],
                     traveler=False, interval_number=interval_number(truncate(at, timedelta(days=1))) - 144,
                     interval_count=144, created_at=at, report_type="confirmed", days_since_symptom_onset=1)
            for _ in range(n)]
    exposures_db.PartitionGuard(engine).ensure([at])
    with engine.begin() as conn:
        exposures_db.insert_exposures(conn, rows)


def test_signing_key_create_list_retire(cli, tmp_path):
    pub = tmp_path / "us-v1.pem"
    code, out, _ = cli("signing-key", "create", "--name", "us-v1", "--key-id", "310", "--key-version", "v1",
                       "--public-key-out", str(pub))
    assert code == 0 and "verification_key_id=310" in out and "BEGIN PUBLIC KEY" in out
    assert "BEGIN PUBLIC KEY" in pub.read_text()
    key_file = next((tmp_path / "keys").iterdir())
    assert key_file.stat().st_mode & 0o777 == 0o600
    code, _, err = cli("signing-key", "create", "--name", "us-v1", "--key-id", "310", "--key-version", "v2")
    assert code == 1 and "already exists" in err
    code, _, err = cli("signing-key", "create", "--name", "x", "--key-id", "31-0", "--key-version", "v1")
    assert code == 1 and "--key-id may only contain" in err
    code, out, _ = cli("signing-key", "list", "--json")
    (row,) = json.loads(out)
    assert (row["name"], row["key_id"], row["key_version"], row["active"]) == ("us-v1", "310", "v1", True)
    assert row["algorithm"] == "1.2.840.10045.4.3.2"
    code, out, _ = cli("signing-key", "retire", "--name", "us-v1")
    assert code == 0
    code, out, _ = cli("signing-key", "list", "--json")
    assert json.loads(out)[0]["active"] is False


def test_export_config_add_list_disable(cli):
    cli("signing-key", "create", "--name", "k1", "--key-id", "310", "--key-version", "v1")
    cli("signing-key", "create", "--name", "k2", "--key-id", "310", "--key-version", "v2")
    code, out, err = cli("export-config", "add", "--name", "us", "--region", "us", "--period", "4h",
                         "--signing-key", "k1,k2", "--root", "exposureKeyExport-US", "--bucket", "b",
                         "--input-regions", "US,CA", "--include-travelers", "--exclude-regions", "MX",
                         "--max-records", "1000", "--from", "2026-01-01T00:00:00Z")
    assert code == 0, err
    code, out, _ = cli("export-config", "list", "--json")
    (row,) = json.loads(out)
    assert row == {"name": "us", "region": "US", "period_s": 14400, "bucket": "b", "root": "exposureKeyExport-US",
                   "input_regions": "US,CA", "travelers": "include", "exclude_regions": "MX", "max_records": 1000,
                   "signing_keys": "k1,k2", "from": "2026-01-01T00:00:00+00:00", "thru": "", "enabled": True}
    base = {"--period": "1h", "--signing-key": "k1", "--root": "other"}
    for change, flags, message in [({"--period": "7h"}, [], "divide 24h"),
                                   ({"--period": "soon"}, [], "invalid duration"),
                                   ({"--signing-key": "nope"}, [], "no signing key named 'nope'"),
                                   ({}, ["--include-travelers", "--only-non-travelers"], "exclude each other"),
                                   ({"--root": "../x"}, [], "--root must be")]:
        options = [item for pair in {**base, **change}.items() for item in pair]
        code, _, err = cli("export-config", "add", "--name", "other", "--region", "US", *options, *flags)
        assert code == 1 and message in err, (change, flags, err)
    code, _, err = cli("export-config", "add", "--name", "us", "--region", "US", "--period", "1h",
                       "--signing-key", "k1", "--root", "elsewhere")
    assert code == 1 and "already exists" in err
    assert cli("export-config", "disable", "--name", "us")[0] == 0
    assert json.loads(cli("export-config", "list", "--json")[1])[0]["enabled"] is False
    assert cli("export-config", "enable", "--name", "us")[0] == 0
    assert cli("export-config", "set-signing-keys", "--name", "us", "--signing-key", "k2")[0] == 0
    assert json.loads(cli("export-config", "list", "--json")[1])[0]["signing_keys"] == "k2"
    code, _, err = cli("export-config", "disable", "--name", "missing")
    assert code == 1 and "no export config" in err


def test_export_run_twice_converges_and_verify_accepts_our_files(cli, engine, tmp_path):
    pub = tmp_path / "pub.pem"
    cli("signing-key", "create", "--name", "k1", "--key-id", "310", "--key-version", "v1", "--public-key-out",
        str(pub))
    cli("export-config", "add", "--name", "us", "--region", "US", "--period", "1h", "--signing-key", "k1",
        "--root", "exposureKeyExport-US")
    _seed(engine, 20, START + timedelta(minutes=5))
    window = ("--start", START.isoformat(), "--end", END.isoformat())
    code, out, err = cli("export", "run", "--config", "us", *window)
    assert code == 0, err
    assert "wrote exposureKeyExport-US/" in out and "complete:" in out
    zips = sorted((tmp_path / "blobs" / "exports" / "exposureKeyExport-US").glob("*.zip"))
    assert len(zips) == 1
    first = zips[0].read_bytes()
    code, out, _ = cli("export", "run", "--config", "us", *window)
    assert code == 0 and "already exported" in out
    code, out, _ = cli("export", "run", "--config", "us", *window, "--force")
    assert code == 0 and zips[0].read_bytes() == first
    code, out, _ = cli("export", "verify", str(zips[0]), "--public-key", str(pub), "--json")
    summary = json.loads(out)
    assert code == 0 and summary["status"] == "VERIFIED" and summary["num_keys"] >= 1000
    code, _, err = cli("export", "run", "--config", "us", "--start", (START + timedelta(minutes=1)).isoformat(),
                       "--end", (END + timedelta(minutes=1)).isoformat())
    assert code == 1 and "not one aligned period" in err
    code, _, err = cli("export", "run", "--config", "us", "--start", NOW.isoformat(),
                       "--end", (NOW + timedelta(hours=1)).isoformat())
    assert code == 1 and "still open" in err


@pytest.mark.parametrize(("export", "key"), [
    ("de-cwa-production/2020-07-22/export.bin", "de-cwa-prod-262-v1.pem"),
    ("ch-swisscovid-production/2020-08-26T00-02Z/export.bin", "ch-swisscovid-prod.pem"),
])
def test_export_verify_accepts_real_production_files_and_rejects_tampered_copies(cli, tmp_path, export, key):
    if not REALWORLD.is_dir() and not os.environ.get("CI"):
        pytest.skip(f"{REALWORLD} not found")
    source = REALWORLD / "exports" / export
    code, out, _ = cli("export", "verify", str(source), "--public-key", str(REALWORLD / "keys" / key))
    assert code == 0 and "VERIFIED" in out
    copy_dir = tmp_path / "tampered"
    copy_dir.mkdir()
    shutil.copy(source, copy_dir / "export.bin")
    shutil.copy(source.with_name("export.sig"), copy_dir / "export.sig")
    data = bytearray((copy_dir / "export.bin").read_bytes())
    data[-1] ^= 0x01
    (copy_dir / "export.bin").write_bytes(bytes(data))
    code, out, _ = cli("export", "verify", str(copy_dir / "export.bin"), "--public-key", str(REALWORLD / "keys" / key))
    assert code == 1 and "SIGNATURE NOT VERIFIED" in out
