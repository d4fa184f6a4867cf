"""Unit tests for enpipeline.config and enpipeline.durations (ENP_* settings, Go-style durations)."""

from __future__ import annotations

import base64
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from enpipeline.config import ConfigError, Settings, env_name, load_settings, with_local_secrets
from enpipeline.durations import format_duration, parse_duration

DB = "postgresql://enp:s3cr3t-pw@db.internal:5432/enp"
KEK = bytes(range(32))
AAD = b"aad-bytes-for-tests"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def problems_of(environ: dict[str, str], **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(environ, **kwargs)  # type: ignore[arg-type]
    # The exception text carries every problem too.
    for problem in info.value.problems:
        assert problem in str(info.value)
    return info.value.problems


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", timedelta(seconds=90)),
    ("15m", timedelta(minutes=15)),
    ("1h", timedelta(hours=1)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
    ("14d", timedelta(days=14)),
    ("360h", timedelta(hours=360)),
    ("1d12h", timedelta(days=1, hours=12)),
    ("1.5h", timedelta(minutes=90)),
    ("500ms", timedelta(milliseconds=500)),
    ("2m500ms", timedelta(minutes=2, milliseconds=500)),
    ("0", timedelta(0)),
    ("0s", timedelta(0)),
    ("-1h", timedelta(hours=-1)),
    ("-1h30m", -timedelta(hours=1, minutes=30)),
    (" 15m ", timedelta(minutes=15)),
])
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", [
    "", " ", "15", "1h30", "abc", "15M", "1H", "1x", "h", "-", "1h 30m", "1 h", "m15", "1e3s", "--1h",
    "9999999999d",  # beyond timedelta's range: a ValueError, not an OverflowError
    "9" * 400 + "s",
])
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(text)


@pytest.mark.parametrize(("value", "expected"), [
    (timedelta(0), "0s"),
    (timedelta(seconds=1), "1s"),
    (timedelta(seconds=59), "59s"),
    (timedelta(minutes=1), "1m0s"),
    (timedelta(seconds=90), "1m30s"),
    (timedelta(hours=1), "1h0m0s"),
    (timedelta(hours=1, minutes=2, seconds=3), "1h2m3s"),
    (timedelta(hours=1, seconds=5), "1h0m5s"),
    (timedelta(days=2), "48h0m0s"),  # Go has no day unit
    (timedelta(hours=360), "360h0m0s"),
    (timedelta(seconds=-90), "-1m30s"),
    (timedelta(seconds=-5), "-5s"),
])
def test_format_duration_like_go(value: timedelta, expected: str) -> None:
    assert format_duration(value) == expected


@pytest.mark.parametrize("text", ["90s", "15m", "1h30m", "360h", "1h2m3s"])
def test_format_parse_round_trip(text: str) -> None:
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


# --- load_settings -------------------------------------------------------------------------------


def test_defaults_are_the_reference_s() -> None:
    s = load_settings({"ENP_DATABASE_URL": DB})
    assert s.database_url == DB
    assert (s.max_keys_on_publish, s.max_same_start_interval_keys) == (30, 3)
    assert s.max_interval_age_on_publish == timedelta(hours=360)
    assert s.truncate_window == timedelta(hours=1)
    assert (s.max_symptom_onset_days, s.max_valid_symptom_onset_report_days, s.default_symptom_onset_days_ago) == (
        14, 28, 4)
    assert s.debug_release_same_day_keys is False
    assert (s.response_padding_min_bytes, s.response_padding_range) == (1024, 1024)
    assert s.max_body_bytes == 64_000
    assert s.revision_token_min_length == 28
    assert s.env == "local" and not s.is_production


def test_env_name() -> None:
    assert env_name("max_keys_on_publish") == "ENP_MAX_KEYS_ON_PUBLISH"
    assert env_name("truncate_window") == "ENP_TRUNCATE_WINDOW"


@pytest.mark.parametrize(("variable", "raw", "attribute", "expected"), [
    ("ENP_MAX_KEYS_ON_PUBLISH", "30", "max_keys_on_publish", 30),
    ("ENP_MAX_KEYS_ON_PUBLISH", " 7 ", "max_keys_on_publish", 7),
    ("ENP_MAX_SAME_START_INTERVAL_KEYS", "5", "max_same_start_interval_keys", 5),
    ("ENP_TRUNCATE_WINDOW", "1h", "truncate_window", timedelta(hours=1)),
    ("ENP_TRUNCATE_WINDOW", "15m", "truncate_window", timedelta(minutes=15)),
    ("ENP_MAX_INTERVAL_AGE_ON_PUBLISH", "14d", "max_interval_age_on_publish", timedelta(days=14)),
    ("ENP_MAX_INTERVAL_AGE_ON_PUBLISH", "360h", "max_interval_age_on_publish", timedelta(hours=360)),
    ("ENP_AUTHORIZED_APP_CACHE_DURATION", "90s", "authorized_app_cache_duration", timedelta(seconds=90)),
    ("ENP_DEBUG_RELEASE_SAME_DAY_KEYS", "true", "debug_release_same_day_keys", True),
    ("ENP_DEBUG_RELEASE_SAME_DAY_KEYS", "TRUE", "debug_release_same_day_keys", True),
    ("ENP_DEBUG_RELEASE_SAME_DAY_KEYS", "1", "debug_release_same_day_keys", True),
    ("ENP_DEBUG_RELEASE_SAME_DAY_KEYS", "yes", "debug_release_same_day_keys", True),
    ("ENP_DEBUG_RELEASE_SAME_DAY_KEYS", "false", "debug_release_same_day_keys", False),
    ("ENP_DEBUG_RELEASE_SAME_DAY_KEYS", "0", "debug_release_same_day_keys", False),
    ("ENP_DEBUG_RELEASE_SAME_DAY_KEYS", "", "debug_release_same_day_keys", False),
    ("ENP_MAINTENANCE_MODE", "on", "maintenance_mode", True),
    ("ENP_DEFAULT_REGION", "US", "default_region", "US"),
    ("ENP_VAR_DIR", "/srv/enp", "var_dir", Path("/srv/enp")),
    ("ENP_REVISION_TOKEN_AAD", b64(AAD), "revision_token_aad", AAD),
    ("ENP_REVISION_TOKEN_KEK", b64(KEK), "revision_token_kek", KEK),
    ("ENP_ENV", "production", "env", "production"),
])
def test_reads_enp_variables(variable: str, raw: str, attribute: str, expected: object) -> None:
    environ = {"ENP_DATABASE_URL": DB, "ENP_REVISION_TOKEN_KEK": b64(KEK), "ENP_REVISION_TOKEN_AAD": b64(AAD),
               variable: raw}
    assert getattr(load_settings(environ), attribute) == expected


def test_unprefixed_names_are_ignored() -> None:
    s = load_settings({"ENP_DATABASE_URL": DB, "MAX_KEYS_ON_PUBLISH": "2", "TRUNCATE_WINDOW": "5m",
                       "enp_max_keys_on_publish": "3"})
    assert s.max_keys_on_publish == 30
    assert s.truncate_window == timedelta(hours=1)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENP_DATABASE_URL", DB)
    monkeypatch.setenv("ENP_MAX_KEYS_ON_PUBLISH", "12")
    assert load_settings().max_keys_on_publish == 12


def test_overrides_win_over_the_environment() -> None:
    s = load_settings({"ENP_DATABASE_URL": DB, "ENP_MAX_KEYS_ON_PUBLISH": "abc"}, max_keys_on_publish=2)
    assert s.max_keys_on_publish == 2


def test_overrides_are_validated() -> None:
    assert problems_of({"ENP_DATABASE_URL": DB}, max_keys_on_publish=0) == ["ENP_MAX_KEYS_ON_PUBLISH must be > 0"]


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({
            "ENP_MAX_KEYS_ON_PUBLISH": "abc",
            "ENP_TRUNCATE_WINDOW": "soon",
            "ENP_DEBUG_RELEASE_SAME_DAY_KEYS": "maybe",
            "ENP_REVISION_TOKEN_AAD": "!!not base64!!",
            "ENP_MAX_SAME_START_INTERVAL_KEYS": "0",
            "ENP_ENV": "prod",
        })
    expected = [
        # values that cannot be read, in field order ...
        "ENP_MAX_KEYS_ON_PUBLISH must be an integer, got 'abc'",
        "ENP_TRUNCATE_WINDOW: invalid duration 'soon' (use e.g. 90s, 15m, 1h, 14d)",
        "ENP_DEBUG_RELEASE_SAME_DAY_KEYS must be true or false, got 'maybe'",
        "ENP_REVISION_TOKEN_AAD must be standard base64",
        # ... then values that were read but are not acceptable
        "ENP_ENV must be local or production, got 'prod'",
        "ENP_DATABASE_URL is not set (e.g. postgresql://user@host:5432/dbname)",
        "ENP_MAX_SAME_START_INTERVAL_KEYS must be > 0",
    ]
    assert info.value.problems == expected
    assert str(info.value) == "; ".join(expected)


def test_every_problem_names_its_variable() -> None:
    environ = {
        "ENP_MAX_KEYS_ON_PUBLISH": "abc",
        "ENP_TRUNCATE_WINDOW": "soon",
        "ENP_DEBUG_RELEASE_SAME_DAY_KEYS": "maybe",
        "ENP_REVISION_TOKEN_AAD": "!!not base64!!",
        "ENP_MAX_SAME_START_INTERVAL_KEYS": "0",
        "ENP_ENV": "prod",
    }
    problems = problems_of(environ)
    named = {variable for variable in [*environ, "ENP_DATABASE_URL"] if any(variable in p for p in problems)}
    assert named == {*environ, "ENP_DATABASE_URL"}
    assert len(problems) == 7


def test_missing_database_url() -> None:
    assert problems_of({}) == ["ENP_DATABASE_URL is not set (e.g. postgresql://user@host:5432/dbname)"]
    assert load_settings({}, require_database=False).database_url == ""


@pytest.mark.parametrize("url", ["mysql://u@h/db", "sqlite:///x.db", "localhost:5432"])
def test_database_url_must_be_postgres(url: str) -> None:
    assert problems_of({"ENP_DATABASE_URL": url}) == ["ENP_DATABASE_URL must be a postgresql:// URL"]
    assert problems_of({"ENP_DATABASE_URL": url}, require_database=False) == [
        "ENP_DATABASE_URL must be a postgresql:// URL"]


@pytest.mark.parametrize("url", [DB, "postgres://u@h/db", "postgresql+psycopg2://u@h/db"])
def test_database_url_schemes_accepted(url: str) -> None:
    assert load_settings({"ENP_DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(("variable", "raw", "problem"), [
    ("ENP_MAX_KEYS_ON_PUBLISH", "0", "ENP_MAX_KEYS_ON_PUBLISH must be > 0"),
    ("ENP_MAX_KEYS_ON_PUBLISH", "-3", "ENP_MAX_KEYS_ON_PUBLISH must be > 0"),
    ("ENP_MAX_KEYS_ON_PUBLISH", "1.5", "ENP_MAX_KEYS_ON_PUBLISH must be an integer, got '1.5'"),
    ("ENP_MAX_BODY_BYTES", "0", "ENP_MAX_BODY_BYTES must be > 0"),
    ("ENP_BODY_READ_TIMEOUT", "0", "ENP_BODY_READ_TIMEOUT must be > 0 and below gunicorn's 30 s worker timeout"),
    ("ENP_BODY_READ_TIMEOUT", "30s", "ENP_BODY_READ_TIMEOUT must be > 0 and below gunicorn's 30 s worker timeout"),
    ("ENP_DEFAULT_SYMPTOM_ONSET_DAYS_AGO", "-1", "ENP_DEFAULT_SYMPTOM_ONSET_DAYS_AGO must be >= 0"),
    ("ENP_RESPONSE_PADDING_RANGE", "-1", "ENP_RESPONSE_PADDING_RANGE must be >= 0"),
    ("ENP_TRUNCATE_WINDOW", "0", "ENP_TRUNCATE_WINDOW must be a positive duration"),
    ("ENP_TRUNCATE_WINDOW", "-1h", "ENP_TRUNCATE_WINDOW must be a positive duration"),
    ("ENP_TRUNCATE_WINDOW", "9999999999d", "ENP_TRUNCATE_WINDOW: duration '9999999999d' is out of range"),
    ("ENP_MAX_INTERVAL_AGE_ON_PUBLISH", "0s", "ENP_MAX_INTERVAL_AGE_ON_PUBLISH must be a positive duration"),
    ("ENP_REVISION_KEY_CACHE_DURATION", "61m", "ENP_REVISION_KEY_CACHE_DURATION must be > 0 and <= 60m"),
    ("ENP_REVISION_KEY_CACHE_DURATION", "0", "ENP_REVISION_KEY_CACHE_DURATION must be > 0 and <= 60m"),
    ("ENP_REVISION_TOKEN_KEK", b64(bytes(16)), "ENP_REVISION_TOKEN_KEK must be 32 bytes (base64 of an AES-256 key)"),
    ("ENP_REVISION_TOKEN_KEK", "@@@", "ENP_REVISION_TOKEN_KEK must be standard base64"),
])
def test_invalid_values(variable: str, raw: str, problem: str) -> None:
    assert problems_of({"ENP_DATABASE_URL": DB, variable: raw}) == [problem]


def test_revision_key_cache_duration_limit_is_inclusive() -> None:
    s = load_settings({"ENP_DATABASE_URL": DB, "ENP_REVISION_KEY_CACHE_DURATION": "60m"})
    assert s.revision_key_cache_duration == timedelta(minutes=60)


# --- production -------------------------------------------------------------------------------------


def test_production_refuses_to_start_without_revision_token_secrets() -> None:
    assert problems_of({"ENP_DATABASE_URL": DB, "ENP_ENV": "production"}) == [
        "ENP_REVISION_TOKEN_KEK is required in production (base64 of 32 random bytes)",
        "ENP_REVISION_TOKEN_AAD is required in production (base64)",
    ]
    assert problems_of({"ENP_DATABASE_URL": DB, "ENP_ENV": "production", "ENP_REVISION_TOKEN_KEK": b64(KEK)}) == [
        "ENP_REVISION_TOKEN_AAD is required in production (base64)"]
    assert problems_of({"ENP_DATABASE_URL": DB, "ENP_ENV": "production", "ENP_REVISION_TOKEN_AAD": b64(AAD)}) == [
        "ENP_REVISION_TOKEN_KEK is required in production (base64 of 32 random bytes)"]


def test_production_with_secrets_starts() -> None:
    s = load_settings({"ENP_DATABASE_URL": DB, "ENP_ENV": "production", "ENP_REVISION_TOKEN_KEK": b64(KEK),
                       "ENP_REVISION_TOKEN_AAD": b64(AAD)})
    assert s.is_production
    assert (s.revision_token_kek, s.revision_token_aad) == (KEK, AAD)


def test_local_does_not_need_secrets() -> None:
    s = load_settings({"ENP_DATABASE_URL": DB})
    assert (s.revision_token_kek, s.revision_token_aad) == (b"", b"")


# --- secrets stay out of logs -------------------------------------------------------------------------


def test_secrets_absent_from_repr() -> None:
    s = load_settings({"ENP_DATABASE_URL": DB, "ENP_REVISION_TOKEN_KEK": b64(KEK), "ENP_REVISION_TOKEN_AAD": b64(AAD)})
    for text in (repr(s), str(s), f"{s}", f"{s!r}"):
        assert text.startswith("Settings(")
        assert "max_keys_on_publish=30" in text  # ordinary settings are shown
        assert "truncate_window=" in text
        for secret in (repr(KEK), repr(AAD), b64(KEK), b64(AAD), "s3cr3t-pw", DB):
            assert secret not in text
        for name in ("revision_token_kek", "revision_token_aad", "database_url"):
            assert name not in text


def test_secrets_absent_from_config_errors() -> None:
    problems = problems_of({"ENP_DATABASE_URL": "mysql://root:hunter2@h/db", "ENP_REVISION_TOKEN_KEK": b64(bytes(7))})
    assert not any("hunter2" in p or b64(bytes(7)) in p for p in problems)


# --- with_local_secrets ------------------------------------------------------------------------------


def test_with_local_secrets_generates_once_and_reuses(tmp_path: Path) -> None:
    base = Settings(var_dir=tmp_path / "var")
    first = with_local_secrets(base)
    assert len(first.revision_token_kek) == 32
    assert len(first.revision_token_aad) == 16
    secrets_dir = tmp_path / "var" / "secrets"
    kek_file, aad_file = secrets_dir / "revision-token-kek", secrets_dir / "revision-token-aad"
    assert base64.b64decode(kek_file.read_text()) == first.revision_token_kek
    assert base64.b64decode(aad_file.read_text()) == first.revision_token_aad
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secrets_dir.stat().st_mode) & 0o077 == 0
    assert sorted(p.name for p in secrets_dir.iterdir()) == ["revision-token-aad", "revision-token-kek"]  # no temp

    # A later start (a fresh Settings) gets the very same secrets back.
    second = with_local_secrets(Settings(var_dir=tmp_path / "var"))
    assert (second.revision_token_kek, second.revision_token_aad) == (first.revision_token_kek,
                                                                      first.revision_token_aad)
    # Another var_dir gets its own.
    other = with_local_secrets(Settings(var_dir=tmp_path / "other"))
    assert other.revision_token_kek != first.revision_token_kek


def test_with_local_secrets_keeps_configured_secrets(tmp_path: Path) -> None:
    configured = Settings(var_dir=tmp_path, revision_token_kek=KEK, revision_token_aad=AAD)
    assert with_local_secrets(configured) is configured
    assert not (tmp_path / "secrets").exists()


def test_with_local_secrets_fills_only_the_missing_one(tmp_path: Path) -> None:
    filled = with_local_secrets(Settings(var_dir=tmp_path, revision_token_kek=KEK))
    assert filled.revision_token_kek == KEK
    assert len(filled.revision_token_aad) == 16
    assert not (tmp_path / "secrets" / "revision-token-kek").exists()


def test_with_local_secrets_refuses_production(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="required in production"):
        with_local_secrets(Settings(env="production", var_dir=tmp_path))
    assert not (tmp_path / "secrets").exists()


def test_settings_replace_is_a_copy() -> None:
    s = Settings()
    t = s.replace(max_keys_on_publish=2)
    assert (s.max_keys_on_publish, t.max_keys_on_publish) == (30, 2)
    with pytest.raises(AttributeError):
        s.max_keys_on_publish = 5  # type: ignore[misc]


def test_environment_is_not_modified() -> None:
    before = dict(os.environ)
    load_settings({"ENP_DATABASE_URL": DB})
    assert dict(os.environ) == before
