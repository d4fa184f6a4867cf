"""The export pipeline on real Postgres: window selection, padding, sharding, signing, index, idempotency."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from enpipeline.blobstore import MemoryBlobstore
from enpipeline.db import export as export_db
from enpipeline.db import exposures as exposures_db
from enpipeline.export import format as fmt
from enpipeline.export.pipeline import ExportError, ExportPipeline
from enpipeline.export.signing import FilesystemKeyManager
from enpipeline.model import Exposure
from enpipeline.timeutil import interval_number, truncate

DAY = timedelta(days=1)
NOW = truncate(datetime.now(UTC), timedelta(hours=1)) - timedelta(hours=1)
WINDOW_START = NOW - timedelta(hours=4)
WINDOW_END = WINDOW_START + timedelta(hours=1)


def exposure(created_at: datetime, *, regions=("US",), traveler=False, report_type="confirmed", dsos=0,
             key: bytes | None = None, **extra) -> Exposure:
    start = interval_number(truncate(created_at, DAY)) - 144
    return Exposure(exposure_key=key or os.urandom(16), transmission_risk=2, app_package_name="com.example.test",
                    regions=list(regions), traveler=traveler, interval_number=start, interval_count=144,
                    created_at=created_at, report_type=report_type, days_since_symptom_onset=dsos, **extra)


@pytest.fixture
def env(engine, settings, tmp_path):
    keys = FilesystemKeyManager(tmp_path / "keys")
    blobs = MemoryBlobstore()
    s = settings.replace(export_min_window_age=timedelta(hours=2))
    pipeline = ExportPipeline(s, engine, blobs, keys)
    ref = keys.create_signing_key("us-v1")
    public_key = _load(keys.signer(ref).public_key_pem())
    with engine.begin() as conn:
        sig_id = export_db.add_signature_info(conn, name="us-v1", signing_key=ref, key_id="310", key_version="v1",
                                              algorithm=fmt.ALGORITHM_ECDSA_P256_SHA256,
                                              from_timestamp=NOW - 30 * DAY, thru_timestamp=None, now=NOW)
    return {"pipeline": pipeline, "blobs": blobs, "keys": keys, "public_key": public_key, "sig_id": sig_id,
            "engine": engine, "settings": s}


def _load(pem: str):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_public_key(pem.encode())


def add_config(env, name="us", *, period=3600, root=None, region="US", **kw) -> export_db.ExportConfigRow:
    cfg = export_db.ExportConfigRow(
        config_id=0, name=name, bucket_name="exports", filename_root=root or f"exposureKeyExport-{name}",
        period_seconds=period, output_region=region, input_regions=tuple(kw.pop("input_regions", ())),
        include_travelers=kw.pop("include_travelers", False), only_non_travelers=kw.pop("only_non_travelers", False),
        exclude_regions=tuple(kw.pop("exclude_regions", ())), max_records_override=kw.pop("max_records", None),
        signature_info_ids=(env["sig_id"],), from_timestamp=NOW - 30 * DAY, thru_timestamp=None, disabled=False)
    assert not kw
    with env["engine"].begin() as conn:
        export_db.add_export_config(conn, cfg)
        return export_db.get_export_config(conn, name=name)


def insert(env, rows: list[Exposure]) -> None:
    exposures_db.PartitionGuard(env["engine"]).ensure(r.created_at for r in rows)
    with env["engine"].begin() as conn:
        exposures_db.insert_exposures(conn, rows)


def files(env, root="exposureKeyExport-us") -> list[fmt.ParsedExport]:
    names = [n for n in env["blobs"].list("exports", root + "/") if n.endswith(".zip")]
    return [fmt.read_export(env["blobs"].get("exports", n)) for n in names]


def all_keys(parsed: list[fmt.ParsedExport], revised=False) -> list[bytes]:
    out = []
    for p in parsed:
        out.extend(k.key_data for k in (p.revised_keys if revised else p.keys))
    return out


def test_window_is_exported_signed_sorted_padded_and_indexed(env):
    add_config(env)
    real = [exposure(WINDOW_START + timedelta(minutes=m)) for m in range(0, 60, 2)]
    outside = [exposure(WINDOW_END), exposure(WINDOW_START - timedelta(seconds=1))]
    insert(env, real + outside)
    result = env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    assert len(result["files"]) == 1
    (parsed,) = files(env)
    assert fmt.verify_export(parsed, [env["public_key"]])
    keys = all_keys([parsed])
    real_keys = {r.exposure_key for r in real}
    assert real_keys <= set(keys)
    assert not {r.exposure_key for r in outside} & set(keys)  # [start, end) exactly
    assert keys == sorted(keys) and len(keys) == len(set(keys))
    n = len(real)
    assert 1000 <= len(keys) <= n * -(-1100 // n)  # padded: every real key cloned in full passes
    assert len(keys) % n == 0
    assert parsed.header.region == "US"
    assert (parsed.header.start_timestamp, parsed.header.end_timestamp) == (
        int(WINDOW_START.timestamp()), int(WINDOW_END.timestamp()))
    assert (parsed.header.batch_num, parsed.header.batch_size) == (1, 1)
    index = env["blobs"].get("exports", "exposureKeyExport-us/index.txt").decode()
    assert index == result["files"][0]["filename"]
    meta = env["blobs"].stat("exports", "exposureKeyExport-us/index.txt")
    assert meta.cache_control == "no-cache, max-age=0"
    assert env["blobs"].stat("exports", index).cache_control == "public, max-age=86400"
    with env["engine"].connect() as conn:
        generated = conn.execute(sa.text("SELECT count(*) FROM exposure WHERE app_package_name = 'export-generated'"
                                         " AND created_at >= :s AND created_at < :e"),
                                 {"s": WINDOW_START, "e": WINDOW_END}).scalar_one()
    assert generated == len(keys) - n  # the padding is persisted


def test_rerun_converges_on_identical_files(env):
    add_config(env)
    insert(env, [exposure(WINDOW_START + timedelta(minutes=m)) for m in range(10)])
    first = env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    name = first["files"][0]["filename"]
    before = env["blobs"].get("exports", name)
    again = env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    assert again["files"] == []  # already complete: nothing rewritten
    forced = env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW, force=True)
    assert [f["filename"] for f in forced["files"]] == [name]
    assert env["blobs"].get("exports", name) == before  # same keys, same padding, deterministic signature


def test_padding_is_shared_by_configs_exporting_the_same_window(env):
    add_config(env, "us")
    add_config(env, "us2", root="second")
    insert(env, [exposure(WINDOW_START + timedelta(minutes=m)) for m in range(7)])
    env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    env["pipeline"].run_window("us2", WINDOW_START, WINDOW_END, NOW)
    assert all_keys(files(env, "exposureKeyExport-us")) == all_keys(files(env, "second"))


def test_no_padding_for_an_empty_window_and_no_file(env):
    add_config(env)
    result = env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    assert result["files"] == [] and result["stats"]["keys"] == 0
    assert env["blobs"].get("exports", "exposureKeyExport-us/index.txt") == b""


@pytest.mark.parametrize(("n", "max_records", "files_expected"), [(300, 300, 1), (301, 300, 2), (900, 300, 3)])
def test_sharding_at_exactly_max_and_max_plus_one(env, n, max_records, files_expected):
    env["pipeline"].settings = env["settings"].replace(export_min_records=0)
    add_config(env, max_records=max_records)
    rows = [exposure(WINDOW_START + timedelta(seconds=i)) for i in range(n)]
    insert(env, rows)
    result = env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    parsed = files(env)
    assert len(parsed) == len(result["files"]) == files_expected
    keys = all_keys(parsed)
    assert keys == sorted(keys) and sorted(keys) == sorted(r.exposure_key for r in rows)  # each key exactly once
    assert all(len(p.keys) <= max_records for p in parsed)
    # Each file is a batch of its own; the k-th moves its end by k-1 s so (start, end, num) stays unique.
    ends = [p.header.end_timestamp for p in parsed]
    assert ends == [int(WINDOW_END.timestamp()) + k for k in range(files_expected)]
    assert all(fmt.verify_export(p, [env["public_key"]]) for p in parsed)
    index = env["blobs"].get("exports", "exposureKeyExport-us/index.txt").decode().split("\n")
    assert index == sorted(f["filename"] for f in result["files"])


def test_revised_keys_go_into_revised_keys_after_primary_keys(env):
    env["pipeline"].settings = env["settings"].replace(export_min_records=0)
    add_config(env, max_records=4)
    earlier = WINDOW_START - DAY
    revised = [exposure(earlier, report_type="likely", revised_report_type="confirmed", revised_at=WINDOW_START,
                        revised_days_since_symptom_onset=3, revised_transmission_risk=2) for _ in range(3)]
    primary = [exposure(WINDOW_START + timedelta(minutes=1)) for _ in range(3)]
    insert(env, revised + primary)
    env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    parsed = files(env)
    assert [len(p.keys) for p in parsed] == [3, 0]
    assert [len(p.revised_keys) for p in parsed] == [1, 2]
    assert sorted(all_keys(parsed, revised=True)) == sorted(r.exposure_key for r in revised)
    rev = parsed[0].revised_keys[0]
    assert (rev.report_type, rev.dsos, rev.transmission_risk) == (1, 3, 2)  # confirmed, revised DSOS and TR


@pytest.mark.parametrize(("config", "expected"), [
    ({"region": "US"}, {"us", "us-ca", "us-traveler"}),
    ({"region": "US", "input_regions": ("US", "CA")}, {"us", "ca", "us-ca", "us-traveler", "ca-traveler"}),
    ({"region": "US", "include_travelers": True}, {"us", "us-ca", "us-traveler", "ca-traveler", "mx-traveler"}),
    ({"region": "US", "only_non_travelers": True}, {"us", "us-ca"}),
    ({"region": "US", "input_regions": ("US", "CA"), "exclude_regions": ("CA",)}, {"us", "us-traveler"}),
    ({"region": "EU", "input_regions": ("US", "CA", "MX"), "exclude_regions": ("US",), "only_non_travelers": True},
     {"ca", "mx"}),
])
def test_region_and_traveler_filters_for_any_number_of_input_regions(env, config, expected):
    env["pipeline"].settings = env["settings"].replace(export_min_records=0)
    add_config(env, **config)
    labelled = {
        "us": exposure(WINDOW_START, regions=("US",)),
        "ca": exposure(WINDOW_START, regions=("CA",)),
        "mx": exposure(WINDOW_START, regions=("MX",)),
        "us-ca": exposure(WINDOW_START, regions=("CA", "US")),
        "us-traveler": exposure(WINDOW_START, regions=("US",), traveler=True),
        "ca-traveler": exposure(WINDOW_START, regions=("CA",), traveler=True),
        "mx-traveler": exposure(WINDOW_START, regions=("MX",), traveler=True),
    }
    insert(env, list(labelled.values()))
    env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    got = set(all_keys(files(env)))
    assert {name for name, e in labelled.items() if e.exposure_key in got} == expected


def test_refuses_unaligned_and_open_windows(env):
    add_config(env)
    with pytest.raises(ExportError, match="not one aligned period"):
        env["pipeline"].run_window("us", WINDOW_START + timedelta(minutes=5), WINDOW_END + timedelta(minutes=5), NOW)
    with pytest.raises(ExportError, match="not one aligned period"):
        env["pipeline"].run_window("us", WINDOW_START, WINDOW_END + timedelta(hours=1), NOW)
    open_start = truncate(NOW, timedelta(hours=1)) - timedelta(hours=1)
    with pytest.raises(ExportError, match="still open"):
        env["pipeline"].run_window("us", open_start, open_start + timedelta(hours=1), NOW)
    with pytest.raises(ExportError, match="no export config"):
        env["pipeline"].run_window("nope", WINDOW_START, WINDOW_END, NOW)


def test_every_active_signing_key_signs_and_retired_ones_do_not(env):
    env["pipeline"].settings = env["settings"].replace(export_min_records=0)
    keys = env["keys"]
    refs = {name: keys.create_signing_key(name) for name in ("us-v2", "us-old")}
    with env["engine"].begin() as conn:
        v2 = export_db.add_signature_info(conn, name="us-v2", signing_key=refs["us-v2"], key_id="310", key_version="v2",
                                          algorithm=fmt.ALGORITHM_ECDSA_P256_SHA256, from_timestamp=NOW - DAY,
                                          thru_timestamp=None, now=NOW)
        old = export_db.add_signature_info(conn, name="us-old", signing_key=refs["us-old"], key_id="310",
                                           key_version="v0", algorithm=fmt.ALGORITHM_ECDSA_P256_SHA256,
                                           from_timestamp=NOW - 20 * DAY, thru_timestamp=NOW - DAY, now=NOW)
    cfg = add_config(env)
    with env["engine"].begin() as conn:
        export_db.set_export_config_signature_infos(conn, cfg.name, [env["sig_id"], v2, old])
    insert(env, [exposure(WINDOW_START)])
    env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    (parsed,) = files(env)
    versions = [s.signature_info.verification_key_version for s in parsed.signatures]
    assert versions == ["v2", "v1"]  # newest first; the retired key no longer signs
    assert [i.verification_key_version for i in parsed.header.signature_infos] == ["v2", "v1"]
    v2_key = _load(keys.signer(refs["us-v2"]).public_key_pem())
    assert len(fmt.verify_export(parsed, [env["public_key"], v2_key])) == 2


def test_index_lists_only_complete_files_inside_retention(env):
    env["pipeline"].settings = env["settings"].replace(export_min_records=0)
    add_config(env)
    old_start = truncate(NOW - 15 * DAY, timedelta(hours=1))
    insert(env, [exposure(WINDOW_START), exposure(old_start)])
    # The old window was exported on time; by NOW it has left retention and the index.
    hour = timedelta(hours=1)
    old = env["pipeline"].run_window("us", old_start, old_start + hour, old_start + 3 * hour)
    assert old["files"]
    new = env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    index = env["blobs"].get("exports", "exposureKeyExport-us/index.txt").decode()
    assert index == new["files"][0]["filename"]
    assert old["files"][0]["filename"] not in index
    assert not index.endswith("\n")


def test_a_window_past_retention_is_not_exported(env):
    add_config(env)
    old_start = truncate(NOW - 15 * DAY, timedelta(hours=1))
    with pytest.raises(ExportError, match="past retention"):
        env["pipeline"].run_window("us", old_start, old_start + timedelta(hours=1), NOW)
    planned = env["pipeline"].plan_interval(old_start + 2 * timedelta(hours=1), old_start + 3 * timedelta(hours=1), NOW)
    assert planned.tasks == [] and planned.batch_ids == [] and not planned.failures


def test_batch_statistics_are_stored(env):
    env["pipeline"].settings = env["settings"].replace(export_min_records=0)
    add_config(env)
    insert(env, [exposure(WINDOW_START, dsos=d, report_type=rt) for d, rt in
                 [(0, "confirmed"), (1, "confirmed"), (1, "likely"), (-2, "user-report")]])
    result = env["pipeline"].run_window("us", WINDOW_START, WINDOW_END, NOW)
    stats = result["stats"]
    assert stats["keys"] == 4 and stats["files"] == 1
    assert stats["report_type"] == {"confirmed": 2, "likely": 1, "user-report": 1}
    assert stats["days_since_onset"] == {"-2": 1, "0": 1, "1": 2}
    with env["engine"].connect() as conn:
        stored = conn.execute(sa.text("SELECT stats FROM export_batch")).scalar_one()
    assert stored["report_type"] == stats["report_type"]
    assert np.sum(list(stats["keys_per_day"].values())) == 4


def test_shards_read_only_the_padding_their_plan_counted(env):
    """Another config padding an overlapping window between this plan and its shards changes nothing here."""
    hourly = add_config(env, "us", max_records=25)
    half = add_config(env, "us-30m", period=1800, root="half")
    real = [exposure(WINDOW_START + timedelta(seconds=85 * i)) for i in range(40)]
    insert(env, real)
    pipeline = env["pipeline"]
    tasks, batch_id = pipeline.plan_window(hourly, WINDOW_START, WINDOW_END, NOW)
    for start in (WINDOW_START, WINDOW_START + timedelta(minutes=30)):  # pads both half-hours
        half_tasks, _ = pipeline.plan_window(half, start, start + timedelta(minutes=30), NOW)
        for t in half_tasks:
            pipeline.export_shard(t, NOW)
    written = [pipeline.export_shard(t, NOW) for t in tasks]
    stats = pipeline.finalize([batch_id], NOW)[batch_id]
    parsed = files(env)
    assert [f["keys"] for f in written] == [25, 15]
    assert sorted(all_keys(parsed)) == sorted(r.exposure_key for r in real)  # no padding from the other config
    assert stats["keys"] == 40 and stats["padding_keys"] == 0
    assert len(all_keys(files(env, "half"))) >= 1000
