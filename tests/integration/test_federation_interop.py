"""Two enpipeline instances on loopback, set up with the operator CLI only: two databases, two Fetch servers.

Keys published to A reach B's export after B pulls; A never receives them back from B; a query that excludes
their region gets none of them. Nothing here is faked: real gRPC, real ES256 tokens, real Postgres.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enpipeline.blobstore import FilesystemBlobstore
from enpipeline.cli import main
from enpipeline.config import Settings
from enpipeline.db import exposures as exposures_db
from enpipeline.db.admin import scratch_database
from enpipeline.db.engine import make_engine
from enpipeline.db.migrate import migrate
from enpipeline.export import format as fmt
from enpipeline.export.pipeline import ExportPipeline
from enpipeline.export.signing import FilesystemKeyManager
from enpipeline.federation.auth import mint_token
from enpipeline.federation.server import build_server
from enpipeline.model import Exposure
from enpipeline.proto import federation_pb2, federation_pb2_grpc
from enpipeline.timeutil import interval_number, truncate

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


@dataclass
class Instance:
    name: str
    url: str
    engine: sa.Engine
    home: Path
    port: int = 0

    def env(self) -> dict[str, str]:
        return {"ENP_DATABASE_URL": self.url, "ENP_KEY_DIR": str(self.home / "keys"),
                "ENP_VAR_DIR": str(self.home / "var"), "ENP_BLOBSTORE": f"file://{self.home / 'blobs'}"}


def pem_pair(path: Path) -> tuple[Path, Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = path.with_suffix(".key.pem")
    public = path.with_suffix(".pub.pem")
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public, key


@pytest.fixture
def pair(server_url, tmp_path, monkeypatch, capsys):
    """Instances A and B, each with its database and a running Fetch server."""
    instances: list[Instance] = []
    servers = []
    with scratch_database(server_url, "enp_fed_a") as url_a, scratch_database(server_url, "enp_fed_b") as url_b:
        for name, url in (("A", url_a), ("B", url_b)):
            engine = make_engine(url)
            migrate(engine, now=datetime.now(UTC), retention=timedelta(days=14), days_ahead=2)
            inst = Instance(name, url, engine, tmp_path / name)
            inst.home.mkdir()
            server, port = build_server(Settings(database_url=url), engine, "127.0.0.1", 0)
            server.start()
            inst.port = port
            instances.append(inst)
            servers.append(server)

        def cli(inst: Instance, *argv: str, expect: int = 0) -> str:
            for k, v in inst.env().items():
                monkeypatch.setenv(k, v)
            code = main(list(argv))
            out, err = capsys.readouterr()
            assert code == expect, f"{inst.name}: enpipeline {' '.join(argv)} -> {code}: {err}"
            return out + err

        try:
            yield instances[0], instances[1], cli
        finally:
            for server in servers:
                server.stop(grace=None).wait(5)
            for inst in instances:
                inst.engine.dispose()


def published(now: datetime, n: int, region: str = "US") -> list[Exposure]:
    """Keys as A's publish path stored them in the hour that closed before the last one (so it is served)."""
    created = truncate(now, HOUR) - 2 * HOUR
    start = interval_number(truncate(now, DAY)) - 144 * 2
    return [Exposure(exposure_key=os.urandom(16), transmission_risk=2, app_package_name="gov.example.app",
                     regions=[region], traveler=False, interval_number=start, interval_count=144, created_at=created,
                     report_type="confirmed", days_since_symptom_onset=1) for _ in range(n)]


def store(inst: Instance, rows: list[Exposure]) -> None:
    exposures_db.PartitionGuard(inst.engine).ensure(r.created_at for r in rows)
    with inst.engine.begin() as conn:
        exposures_db.insert_exposures(conn, rows)


def keys_of(inst: Instance, where: str = "true") -> set[bytes]:
    with inst.engine.connect() as conn:
        return {bytes(k) for k in conn.execute(sa.text(f"SELECT exposure_key FROM exposure WHERE {where}")).scalars()}


def fetch_as(inst: Instance, key: ec.EllipticCurvePrivateKey, issuer: str, audience: str) -> list[bytes]:
    """Everything ``inst`` serves to the holder of ``key`` (follows partial responses)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    token = mint_token(pem, issuer=issuer, subject="puller", audience=audience, now=datetime.now(UTC),
                       lifetime=timedelta(minutes=5))
    served: list[bytes] = []
    state = federation_pb2.FetchState()
    with grpc.insecure_channel(f"127.0.0.1:{inst.port}") as channel:
        stub = federation_pb2_grpc.FederationStub(channel)
        while True:
            response = stub.Fetch(federation_pb2.FederationFetchRequest(state=state),
                                  metadata=[("authorization", f"Bearer {token}")], timeout=30)
            served += [k.exposureKey for k in response.keys]
            state = response.nextFetchState
            if not response.partialResponse:
                return served


def test_keys_flow_from_a_to_b_and_never_back(pair, tmp_path):
    a, b, cli = pair
    now = datetime.now(UTC)
    a_priv, a_pub, _ = pem_pair(tmp_path / "a-puller")
    b_priv, b_pub, _ = pem_pair(tmp_path / "b-puller")
    c_priv, c_pub, _ = pem_pair(tmp_path / "b-no-us")

    # Each side registers the other's puller identity under the other's partner name ...
    cli(a, "federation", "authorize", "--issuer", "b.example", "--subject", "puller", "--public-key", str(b_pub),
        "--audience", "https://a.example/federation", "--partner", "B")
    cli(a, "federation", "authorize", "--issuer", "b.example", "--subject", "no-us", "--public-key", str(c_pub),
        "--audience", "https://a.example/federation", "--partner", "B")
    cli(b, "federation", "authorize", "--issuer", "a.example", "--subject", "puller", "--public-key", str(a_pub),
        "--audience", "https://b.example/federation", "--partner", "A")
    # ... and pulls from the other with a query naming that same partner.
    cli(b, "federation", "add-query", "--id", "from-a", "--server", f"127.0.0.1:{a.port}", "--audience",
        "https://a.example/federation", "--credentials", str(b_priv), "--issuer", "b.example", "--subject", "puller",
        "--partner", "A")
    cli(b, "federation", "add-query", "--id", "from-a-no-us", "--server", f"127.0.0.1:{a.port}", "--audience",
        "https://a.example/federation", "--credentials", str(c_priv), "--issuer", "b.example", "--subject", "no-us",
        "--partner", "A", "--exclude-regions", "US")
    cli(a, "federation", "add-query", "--id", "from-b", "--server", f"127.0.0.1:{b.port}", "--audience",
        "https://b.example/federation", "--credentials", str(a_priv), "--issuer", "a.example", "--subject", "puller",
        "--partner", "B")

    a_keys = published(now, 1234)
    store(a, a_keys)
    b_own = published(now, 5)
    store(b, b_own)
    sent = {e.exposure_key for e in a_keys}

    # B pulls from A: every key arrives, with A as its source, in three pages of at most 500.
    report = json.loads(cli(b, "federation", "pull", "--query", "from-a", "--json"))
    assert report["status"] == "complete" and report["insertions"] == 1234 and report["pages"] == 3
    assert keys_of(b, "sync_query_id = 'from-a' AND NOT local_provenance") == sent
    assert json.loads(cli(b, "federation", "pull", "--query", "from-a", "--json"))["insertions"] == 0

    # The query that excludes US gets none of them.
    none = json.loads(cli(b, "federation", "pull", "--query", "from-a-no-us", "--json"))
    assert (none["insertions"], none["skipped"], none["rejected"]) == (0, 0, 0)

    # A pulls from B: it gets B's own keys and none of its own back (they would show up as skipped).
    back = json.loads(cli(a, "federation", "pull", "--query", "from-b", "--json"))
    assert (back["insertions"], back["skipped"], back["rejected"]) == (5, 0, 0)
    assert keys_of(a, "sync_query_id = 'from-b'") == {e.exposure_key for e in b_own}
    served_to_a = set(fetch_as(b, serialization.load_pem_private_key(a_priv.read_bytes(), None), "a.example",
                               "https://b.example/federation"))
    assert served_to_a == {e.exposure_key for e in b_own} and not served_to_a & sent

    # B exports the window its pulled keys landed in: A's keys are in B's signed file.
    cli(b, "signing-key", "create", "--name", "b-v1", "--key-id", "999", "--key-version", "v1")
    cli(b, "export-config", "add", "--name", "b-us", "--bucket", "exports", "--root", "exposureKeyExport-US",
        "--period", "1h", "--region", "US", "--signing-key", "b-v1")
    # Pulled keys are stamped with B's current hour; export that window as the run 3 hours from now will.
    window = truncate(datetime.now(UTC), HOUR)
    blobs = FilesystemBlobstore(b.home / "blobs")
    settings = Settings(database_url=b.url, key_dir=b.home / "keys", export_min_records=0)
    pipeline = ExportPipeline(settings, b.engine, blobs, FilesystemKeyManager(settings.key_dir))
    result = pipeline.run_window("b-us", window, window + HOUR, window + 3 * HOUR)
    assert result["stats"]["keys"] == 1234
    zips = [n for n in blobs.list("exports", "exposureKeyExport-US/") if n.endswith(".zip")]
    exported = {k.key_data for n in zips for k in fmt.read_export(blobs.get("exports", n)).keys}
    assert sent <= exported
    assert not {e.exposure_key for e in b_own} & exported  # B's own keys were published hours earlier


def test_a_partner_with_the_wrong_key_is_refused_and_its_cursor_stays(pair, tmp_path):
    a, b, cli = pair
    _, good_pub, _ = pem_pair(tmp_path / "good")
    wrong_priv, _, _ = pem_pair(tmp_path / "wrong")
    cli(a, "federation", "authorize", "--issuer", "b.example", "--subject", "puller", "--public-key", str(good_pub),
        "--audience", "https://a.example/federation", "--partner", "B")
    cli(b, "federation", "add-query", "--id", "from-a", "--server", f"127.0.0.1:{a.port}", "--audience",
        "https://a.example/federation", "--credentials", str(wrong_priv), "--issuer", "b.example", "--subject",
        "puller", "--partner", "A")
    store(a, published(datetime.now(UTC), 10))
    out = cli(b, "federation", "pull", "--query", "from-a", expect=1)
    assert "query 'from-a'" in out and "UNAUTHENTICATED" in out and len(out.strip().splitlines()) == 1
    assert keys_of(b) == set()
    with b.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT primary_cursor, last_timestamp FROM federation_in_query")).one()
        error = conn.execute(sa.text("SELECT error FROM federation_in_sync")).scalar_one()
    assert row == (None, None)
    assert "UNAUTHENTICATED" in error


