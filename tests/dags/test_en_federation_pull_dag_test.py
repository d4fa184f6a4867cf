"""en_federation_pull through ``dag.test()``: one mapped pull per query; a partner that pulls fine stores its keys
while a dead one fails only its own task, with the query and partner named, and the run fails; a partner that
answers garbage in the middle of a pull fails the task's first try on one line, and Airflow's retry resumes at
the page that failed (more partner faults, without Airflow: tests/integration/test_partner_faults.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from tests import support
from tests.dags.airflow_env import AirflowEnv, free_port
from tests.integration.test_federation_pull import (  # noqa: F401 - partner_factory is a fixture
    _where,
    add_query,
    clean_federation,
    partner_factory,
    query_row,
    stored,
    syncs,
    tek,
)
from tests.integration.test_partner_faults import faulty_partner_factory  # noqa: F401 - a fixture


def test_dag_test_pulls_each_query_in_its_own_mapped_task(airflow: AirflowEnv, engine, partner_factory):  # noqa: F811
    clean_federation(engine)
    with engine.begin() as conn:  # a leftover importer from another test would add tasks this test does not expect
        conn.execute(sa.text("TRUNCATE export_importer CASCADE"))
    now = datetime.now(UTC)
    key = support.new_signing_key()
    partner = partner_factory(key.public_key())
    pages = [[tek(now) for _ in range(3)], [tek(now), tek(now)]]
    partner.script(pages)
    dead = f"127.0.0.1:{free_port()}"
    add_query(engine, airflow.key_dir, "a-good", partner.addr, key, partner="good-partner")
    add_query(engine, airflow.key_dir, "b-dead", dead, key, partner="dead-partner")
    try:
        with airflow.driver() as driver:
            run = driver.run(now, dag_id="en_federation_pull", retries=0)
        assert run.state == "failed", run.log[-5000:]
        pulls = sorted((t["map_index"], t["state"]) for t in run.tasks if t["task_id"] == "pull")
        assert pulls == [(0, "success"), (1, "failed")], run.log[-5000:]
        states = run.task_states()
        assert states["list_queries"] == ["success"] and states["list_importers"] == ["success"]
        assert states["import_exports"] == ["skipped"]  # no importer configured: mapped over nothing
        assert run.returns["list_queries"]["-1"] == ["a-good", "b-dead"]
        good = run.returns["pull"]["0"]
        assert (good["query_id"], good["status"], good["pages"], good["insertions"]) == ("a-good", "complete", 2, 5)
        assert "1" not in run.returns["pull"]
        assert ("federation pull of query 'b-dead' (partner 'dead-partner', server " + dead
                + ") failed: page 1: UNAVAILABLE") in run.log

        rows = stored(engine)
        assert set(rows) == {k.exposureKey for p in pages for k in p}
        assert {r.sync_query_id for r in rows.values()} == {"a-good"}
        assert partner.claims and partner.claims[0]["aud"] == partner.audience
        assert syncs(engine, "a-good")[0].completed is not None
        (failed,) = syncs(engine, "b-dead")
        assert failed.completed is None and "UNAVAILABLE" in failed.error
    finally:
        clean_federation(engine)


def test_garbage_mid_pull_fails_the_first_try_on_one_line_and_the_retry_resumes_at_that_page(
        airflow: AirflowEnv, engine, faulty_partner_factory):  # noqa: F811
    clean_federation(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE export_importer CASCADE"))
    now = datetime.now(UTC)
    key = support.new_signing_key()
    partner = faulty_partner_factory(key.public_key())
    pages = [[tek(now) for _ in range(3)] for _ in range(3)]
    nexts = partner.fake.script(pages)
    partner.faults[2] = "garbage"
    partner.once = True  # the partner's trouble passes before Airflow's retry
    add_query(engine, airflow.key_dir, "q-mid", partner.addr, key, partner="flaky-partner")
    try:
        with airflow.driver() as driver:
            run = driver.run(now, dag_id="en_federation_pull", retries=1, retry_delay=0)
        assert run.state == "success", run.log[-5000:]
        (pull,) = [t for t in run.tasks if t["task_id"] == "pull"]
        assert (pull["state"], pull["try_number"]) == ("success", 2)
        line = (f"federation pull of query 'q-mid' (partner 'flaky-partner', server {partner.addr}) failed: "
                "page 2: INTERNAL: ")
        (failure,) = {ln[ln.index(line):] for ln in run.log.splitlines() if line in ln}
        assert "Exception deserializing response" in failure, failure
        # The retry asked for page 2 again with the cursor page 1 left, not for page 1.
        assert [_where(r.state) for r in partner.fake.requests] == [(0, ""), _where(nexts[0]), _where(nexts[0]),
                                                                    _where(nexts[1])]
        retried = run.returns["pull"]["0"]
        assert (retried["status"], retried["pages"], retried["insertions"], retried["skipped"]) == (
            "complete", 2, 6, 0)
        assert set(stored(engine)) == {k.exposureKey for p in pages for k in p} and len(stored(engine)) == 9
        assert query_row(engine, "q-mid").cursors.last_timestamp is not None
        second, first = syncs(engine, "q-mid")
        assert (first.pages, first.insertions, first.completed) == (1, 3, None) and "page 2: INTERNAL" in first.error
        assert (second.pages, second.insertions, second.error) == (2, 6, None) and second.completed is not None
    finally:
        clean_federation(engine)
