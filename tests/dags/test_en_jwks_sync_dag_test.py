"""en_jwks_sync through ``dag.test()``: keys follow a JWKS document served over HTTP; a bad document fails the
task with the issuer and reason while a healthy authority in the same run is still synced."""

from __future__ import annotations

from datetime import UTC, datetime

from tests import support
from tests.dags.airflow_env import AirflowEnv
from tests.integration.test_jwks_sync import add_ha, jwks_server, keys_of  # noqa: F401 - jwks_server is a fixture
from tests.unit.test_jwks import doc, jwk


def test_dag_test_syncs_keys_and_fails_clearly_on_a_bad_document(airflow: AirflowEnv, engine, jwks_server):  # noqa: F811
    k1, k2 = support.new_signing_key(), support.new_signing_key()
    good = add_ha(engine, "gov.good", jwks_server.serve("/good", doc(jwk(k1, "v1"))))
    bad = add_ha(engine, "gov.bad", jwks_server.serve("/bad", doc(jwk(k2, "v1"))))
    with airflow.driver() as driver:
        run = driver.run(datetime.now(UTC), dag_id="en_jwks_sync", retries=0)
        assert run.state == "success", run.log[-5000:]
        assert set(keys_of(engine, good)) == {"v1"} and set(keys_of(engine, bad)) == {"v1"}
        assert run.returns["sync_jwks"]["-1"]["gov.good"]["added"] == 1

        jwks_server.serve("/good", doc(jwk(k1, "v1"), jwk(k2, "v2")))
        jwks_server.serve("/bad", b"<html>oops</html>")
        run = driver.run(datetime.now(UTC), dag_id="en_jwks_sync", retries=0)
        assert run.state == "failed"
        assert "gov.bad" in run.log and "JWKS sync failed for 1 of 2 health authorities" in run.log
        assert set(keys_of(engine, good)) == {"v1", "v2"}  # the healthy authority was synced anyway
        assert keys_of(engine, bad)["v1"][2] is None  # the bad document revoked nothing
