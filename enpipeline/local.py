"""The local stack behind ``make up``/``make down``: embedded Postgres, migrations, demo seed, the API."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from enpipeline.config import load_settings

API_HOST, API_PORT = "127.0.0.1", 8080
DEMO_ISSUER = "enpipeline-demo-ha"
DEMO_AUDIENCE = "enpipeline"
DEMO_APP = "com.example.enpipeline.demo"
DEMO_KID = "v1"
DEMO_REGION = "US"
DEMO_SIGNING_KEY = "demo-us-v1"
DEMO_EXPORT_CONFIG = "us"


def _paths(var: Path) -> dict[str, Path]:
    return {
        "pgdata": var / "pgdata",
        "env": var / "enp.env",
        "api_pid": var / "run" / "api.pid",
        "api_log": var / "log" / "api.log",
        "demo_key": var / "demo" / "verification-key.pem",
        "demo_pub": var / "demo" / "verification-key.pub.pem",
    }


def start_embedded_postgres(pgdata: Path) -> str:
    """Start (or reuse) the pgserver instance in ``pgdata`` and return its URL; it outlives this process."""
    import logging

    import pgserver

    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every start-up step at INFO
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(pgdata.resolve()), cleanup_mode=None)
    return server.get_uri()


def stop_embedded_postgres(pgdata: Path) -> bool:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().splitlines()[0])
    try:
        os.kill(pid, signal.SIGINT)  # "fast" shutdown: roll back open transactions, keep data safe
    except ProcessLookupError:
        return False
    for _ in range(100):
        if not pid_file.exists():
            break
        time.sleep(0.1)
    return True


def _running(pid_file: Path) -> int | None:
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (ValueError, ProcessLookupError, PermissionError):
        return None


def _seed_demo(settings, var: Path) -> None:
    """An authorized app, a health authority and its verification key, so publishes work at once."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from enpipeline.db import apps, authorities
    from enpipeline.db.engine import make_engine
    from enpipeline.model import AuthorizedApp

    p = _paths(var)
    if not p["demo_key"].exists():
        p["demo_key"].parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        fd = os.open(p["demo_key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        p["demo_pub"].write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    with engine.begin() as conn:
        ha = authorities.get_by_issuer(conn, DEMO_ISSUER)
        ha_id = ha.id if ha else authorities.add_authority(conn, issuer=DEMO_ISSUER, audience=DEMO_AUDIENCE,
                                                           name="Demo health authority")
        if not ha or not any(k.version == DEMO_KID for k in ha.keys):
            authorities.add_key(conn, ha_id, version=DEMO_KID, public_key_pem=p["demo_pub"].read_text(),
                                from_timestamp=datetime.now(UTC) - timedelta(minutes=1))
        if apps.get_app(conn, DEMO_APP) is None:
            apps.upsert_app(conn, AuthorizedApp(app_package_name=DEMO_APP, allowed_regions=(DEMO_REGION,),
                                                allowed_health_authority_ids=(ha_id,)))
    _seed_export(settings, engine)
    engine.dispose()


def _seed_export(settings, engine) -> None:
    """A signing key and an hourly export config for the demo region."""
    from enpipeline.db import export as export_db
    from enpipeline.export.format import ALGORITHM_ECDSA_P256_SHA256
    from enpipeline.export.signing import key_manager_from_settings

    now = datetime.now(UTC)
    with engine.begin() as conn:
        info = export_db.get_signature_info(conn, DEMO_SIGNING_KEY)
        if info is None:
            ref = key_manager_from_settings(settings).create_signing_key(DEMO_SIGNING_KEY)
            sig_id = export_db.add_signature_info(
                conn, name=DEMO_SIGNING_KEY, signing_key=ref, key_id="310", key_version="v1",
                algorithm=ALGORITHM_ECDSA_P256_SHA256, from_timestamp=now - timedelta(days=1), thru_timestamp=None,
                now=now)
        else:
            sig_id = info.id
        if export_db.get_export_config(conn, name=DEMO_EXPORT_CONFIG) is None:
            export_db.add_export_config(conn, export_db.ExportConfigRow(
                config_id=0, name=DEMO_EXPORT_CONFIG, bucket_name="exports", filename_root="exposureKeyExport-US",
                period_seconds=3600, output_region=DEMO_REGION, input_regions=(), include_travelers=True,
                only_non_travelers=False, exclude_regions=(), max_records_override=None, signature_info_ids=(sig_id,),
                from_timestamp=now - timedelta(days=14), thru_timestamp=None, disabled=False))


def _wait_healthy(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (fixed local URL)
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def up(var: Path) -> None:
    from enpipeline.db.engine import make_engine
    from enpipeline.db.migrate import migrate

    var = var.resolve()
    p = _paths(var)
    given = os.environ.get("ENP_DATABASE_URL", "")
    # A URL naming our own pgdata socket (e.g. after sourcing var/enp.env) still means the embedded server.
    embedded = not given or str(p["pgdata"]) in given
    url = start_embedded_postgres(p["pgdata"]) if embedded else given
    os.environ["ENP_DATABASE_URL"] = url
    os.environ.setdefault("ENP_VAR_DIR", str(var))
    settings = load_settings()
    engine = make_engine(url, pool_size=1, max_overflow=0)
    applied = migrate(engine, now=datetime.now(UTC), retention=settings.retention,
                      days_ahead=settings.partition_days_ahead)
    engine.dispose()
    _seed_demo(settings, var)
    p["env"].write_text(f"ENP_DATABASE_URL={url}\nENP_VAR_DIR={var}\n")

    pid = _running(p["api_pid"])
    if pid is None:
        for d in ("api_pid", "api_log"):
            p[d].parent.mkdir(parents=True, exist_ok=True)
        log = open(p["api_log"], "ab")
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "enpipeline.cli", "api", "--host", API_HOST, "--port", str(API_PORT),
             "--workers", "3"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=dict(os.environ))
        p["api_pid"].write_text(str(proc.pid))
        pid = proc.pid
    healthy = _wait_healthy(f"http://{API_HOST}:{API_PORT}/health", 30)

    print("enpipeline is up")
    print(f"  database   {'embedded Postgres, data in ' + str(p['pgdata']) if embedded else 'ENP_DATABASE_URL'}"
          f"  (migrations applied now: {len(applied)})")
    print(f"  publish    http://{API_HOST}:{API_PORT}/v1/publish   (pid {pid}, "
          f"{'healthy' if healthy else 'NOT healthy yet, see the log'})")
    print(f"  health     http://{API_HOST}:{API_PORT}/health   metrics: /metrics   OpenAPI: /openapi.json")
    print(f"  logs       {p['api_log']}")
    print(f"  demo       app {DEMO_APP!r} (region {DEMO_REGION}), issuer {DEMO_ISSUER!r} kid {DEMO_KID!r},"
          f" certificate key {p['demo_key']}")
    print(f"  export     config {DEMO_EXPORT_CONFIG!r} (hourly, signing key {DEMO_SIGNING_KEY!r}); files under"
          f" {settings.blobstore}/exports/exposureKeyExport-US/")
    print(f"  admin CLI  set -a; . {p['env']}; set +a; .venv/bin/enpipeline app list")
    print(f"  try it     .venv/bin/python -m enpipeline.local publish-demo {var}")
    print("  stop       make down")
    if not healthy:
        raise SystemExit(1)


def down(var: Path) -> None:
    var = var.resolve()
    p = _paths(var)
    pid = _running(p["api_pid"])
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if _running(p["api_pid"]) is None:
                break
            time.sleep(0.1)
        print(f"stopped the API (pid {pid})")
    p["api_pid"].unlink(missing_ok=True)
    if stop_embedded_postgres(p["pgdata"]):
        print("stopped the embedded Postgres (data kept in var/pgdata)")


def status(var: Path) -> None:
    p = _paths(var.resolve())
    pid = _running(p["api_pid"])
    print(f"api: {'running, pid ' + str(pid) if pid else 'stopped'}")
    print(f"embedded postgres: {'running' if (p['pgdata'] / 'postmaster.pid').exists() else 'stopped'}")


def publish_demo(var: Path, base_url: str = f"http://{API_HOST}:{API_PORT}") -> dict:
    """Send one certificate-signed 14-key publish as the demo app would, and return the JSON answer."""
    import jwt

    from enpipeline.model import ExposureKeyInput
    from enpipeline.timeutil import interval_number, truncate
    from enpipeline.verification import compute_tekmacs

    p = _paths(var.resolve())
    now = datetime.now(UTC)
    today = interval_number(truncate(now, timedelta(days=1)))
    keys = [ExposureKeyInput(base64.b64encode(os.urandom(16)).decode(), today - 144 * d, 144, 0)
            for d in range(1, 15)]
    hmac_secret = os.urandom(16)
    tekmac = base64.b64encode(compute_tekmacs(keys, hmac_secret)[0]).decode()
    claims = {"iss": DEMO_ISSUER, "aud": DEMO_AUDIENCE, "iat": int(now.timestamp()) - 1,
              "exp": int(now.timestamp()) + 300, "reportType": "confirmed", "tekmac": tekmac}
    token = jwt.encode(claims, p["demo_key"].read_bytes(), algorithm="ES256", headers={"kid": DEMO_KID})
    body = {"temporaryExposureKeys": [{"key": k.key, "rollingStartNumber": k.rolling_start_number,
                                       "rollingPeriod": k.rolling_period} for k in keys],
            "healthAuthorityID": DEMO_APP, "verificationPayload": token,
            "hmacKey": base64.b64encode(hmac_secret).decode(), "padding": base64.b64encode(os.urandom(1024)).decode()}
    req = urllib.request.Request(f"{base_url}/v1/publish", data=json.dumps(body).encode(),  # noqa: S310
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "publish-demo":
        answer = publish_demo(Path(sys.argv[2]))
        answer.pop("padding", None)
        print(json.dumps(answer, indent=2))
    else:
        print("usage: python -m enpipeline.local publish-demo VAR_DIR", file=sys.stderr)
        sys.exit(2)
