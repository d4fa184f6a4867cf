"""DagBag integrity: every DAG file parses, fast and light, and en_export is configured as the design says."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.dags.airflow_env import DAGS, REPO, clean_environ

# Modules a DAG file must not pull in while being parsed (the DAG processor re-parses every file every 30 s).
HEAVY = ("google.protobuf", "cryptography", "pandas", "numpy", "enpipeline", "plugins", "psycopg2", "psycopg",
         "sqlalchemy.dialects.postgresql", "google.cloud")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Parse dags/ in a fresh process with a throwaway AIRFLOW_HOME; any enpipeline database is unreachable."""
    home = tmp_path_factory.mktemp("airflow_parse_home")
    env = {**clean_environ(), "PYTHONPATH": str(REPO), "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           # Parsing needs no metadata database; this one is never created unless something connects.
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'never-created.db'}",
           "AIRFLOW_CONN_ENP_POSTGRES": "postgresql://nobody@127.0.0.1:9/nothing",
           "ENP_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/nothing"}
    out = subprocess.run([sys.executable, "-m", "tests.dags.parse_probe", str(DAGS)], cwd=home, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("@@REPORT ")]
    data = json.loads(line[len("@@REPORT "):])
    data["home_files"] = sorted(p.name for p in home.iterdir())
    return data


def test_every_dag_file_imports_without_errors_and_is_named_after_its_dag(report):
    assert report["import_errors"] == {}
    files = sorted(p.name for p in DAGS.glob("*.py"))
    assert report["files"] == files and "en_export.py" in files
    for name in files:  # one DAG per file, file name = dag_id
        assert report["file_dags"][name] == str([name.removesuffix(".py")])
        assert Path(report["dags"][name.removesuffix(".py")]["fileloc"]).name == name


def test_en_export_has_owner_tags_retries_and_docs(report):
    dag = report["dags"]["en_export"]
    assert dag["tags"] == ["enpipeline", "export"]
    assert dag["owner"] == "enpipeline"
    assert "### en_export" in dag["doc_md"] and "(S - age, E - age]" in dag["doc_md"]
    assert dag["catchup"] is False and dag["max_active_runs"] >= 1
    for task in dag["tasks"].values():
        assert task["owner"] == "enpipeline"
        assert task["retries"] >= 2 and task["retry_delay"] > 0 and task["retry_exponential_backoff"]


def test_en_export_wiring_plan_then_mapped_shards_then_finalize(report):
    tasks = report["dags"]["en_export"]["tasks"]
    assert set(tasks) == {"plan", "export_shard", "finalize"}
    assert tasks["plan"]["upstream"] == []
    assert tasks["export_shard"]["upstream"] == ["plan"] and tasks["export_shard"]["class"] == "DecoratedMappedOperator"
    assert tasks["finalize"]["upstream"] == ["export_shard"]
    assert tasks["finalize"]["trigger_rule"] == "TriggerRule.NONE_FAILED"  # runs when plan found zero shards


def test_dag_files_parse_in_under_a_second(report):
    assert set(report["file_seconds"]) == set(report["files"])
    for name, seconds in report["file_seconds"].items():
        assert seconds < 1.0, f"{name} took {seconds:.3f}s to parse"
    assert report["parse_seconds"] < 1.0


def test_parsing_opens_no_connection_and_imports_nothing_heavy(report):
    assert report["connects"] == []
    heavy_new = [m for m in report["new_modules"] if m.startswith(HEAVY)]
    assert heavy_new == []
    loaded = [m for m in report["all_modules"] if m.split(".")[0] in ("pandas", "numpy", "enpipeline", "plugins")
              or m.startswith(("google.protobuf", "psycopg2", "cryptography.hazmat.primitives.asymmetric"))]
    assert loaded == []
    assert "never-created.db" not in report["home_files"]  # not even Airflow's own database was touched


def _intervals(facts: dict) -> list[list[datetime]]:
    """[logical date, data interval start, data interval end, run after] of each run."""
    return [[datetime.fromisoformat(x) for x in run] for run in facts["runs"]]


def test_timetable_gives_real_data_intervals_one_schedule_period_long(report):
    facts = report["dags"]["en_export"]["timetable"]
    assert facts["class"] == "CronDataIntervalTimetable" and facts["periodic"] and facts["summary"] == "0 * * * *"
    runs = _intervals(facts)
    assert len(runs) == 6
    for logical, start, end, run_after in runs:
        assert end - start == timedelta(hours=1)  # a bare cron schedule would give zero-length intervals
        assert logical == start and run_after == end  # a run starts once its interval is over
    assert all(a[2] == b[1] for a, b in itertools.pairwise(runs))  # consecutive intervals tile time
    # `airflow dags test en_export T` runs the interval that ends at (or before) T.
    assert facts["manual_at_10_17_05"] == ["2026-03-10T09:00:00+00:00", "2026-03-10T10:00:00+00:00"]


def test_schedule_comes_from_enp_export_schedule(report):
    facts = report["en_export_every_15_minutes"]
    assert facts["class"] == "CronDataIntervalTimetable" and facts["summary"] == "*/15 * * * *"
    runs = _intervals(facts)
    assert len(runs) == 24 and all(end - start == timedelta(minutes=15) for _, start, end, _ in runs)
    assert facts["manual_at_10_17_05"] == ["2026-03-10T10:00:00+00:00", "2026-03-10T10:15:00+00:00"]


def test_every_dag_has_owner_tags_retries_timeouts_and_docs(report):
    assert {"en_export", "en_cleanup"} <= set(report["dags"])
    for dag_id, dag in report["dags"].items():
        assert dag["owner"] == "enpipeline", dag_id
        assert dag["tags"][0] == "enpipeline" and len(dag["tags"]) >= 2, dag_id
        assert f"### {dag_id}" in dag["doc_md"], dag_id
        assert dag["catchup"] is False, dag_id
        for name, task in dag["tasks"].items():
            assert task["retries"] >= 2 and task["retry_delay"] > 0, (dag_id, name)


def test_en_cleanup_wiring_each_step_its_own_task(report):
    dag = report["dags"]["en_cleanup"]
    assert dag["max_active_runs"] == 1  # two cleanups of different intervals never interleave their steps
    tasks = dag["tasks"]
    assert set(tasks) == {"ensure_partitions", "expire_keys", "mark_expired_exports", "rebuild_indexes",
                          "sweep_exports", "expire_federation_state", "rotate_revision_keys"}
    assert tasks["expire_keys"]["upstream"] == ["ensure_partitions"]
    assert tasks["rebuild_indexes"]["upstream"] == ["mark_expired_exports"]
    assert tasks["sweep_exports"]["upstream"] == ["rebuild_indexes"]  # blobs go only after the index dropped them
    assert tasks["rotate_revision_keys"]["upstream"] == []
    facts = dag["timetable"]
    assert facts["class"] == "CronDataIntervalTimetable" and facts["summary"] == "0 0 * * *"


def test_en_federation_pull_maps_over_queries_and_importers(report):
    dag = report["dags"]["en_federation_pull"]
    assert dag["tags"] == ["enpipeline", "federation"] and dag["max_active_runs"] == 1
    tasks = dag["tasks"]
    assert set(tasks) == {"list_queries", "pull", "list_importers", "import_exports"}
    assert tasks["pull"]["upstream"] == ["list_queries"] and tasks["pull"]["class"] == "DecoratedMappedOperator"
    assert tasks["import_exports"]["upstream"] == ["list_importers"]
    assert tasks["import_exports"]["class"] == "DecoratedMappedOperator"
    assert tasks["list_queries"]["upstream"] == [] and tasks["list_importers"]["upstream"] == []
    facts = dag["timetable"]
    assert facts["summary"] == "*/15 * * * *" and facts["periodic"]


def test_en_federation_push_maps_over_targets_on_a_data_interval_timetable(report):
    dag = report["dags"]["en_federation_push"]
    assert dag["tags"] == ["enpipeline", "federation"] and dag["max_active_runs"] == 1
    tasks = dag["tasks"]
    assert set(tasks) == {"list_targets", "push"}
    assert tasks["push"]["upstream"] == ["list_targets"] and tasks["push"]["class"] == "DecoratedMappedOperator"
    facts = dag["timetable"]
    assert facts["class"] == "CronDataIntervalTimetable" and facts["summary"] == "0 * * * *"
    assert all(end - start == timedelta(hours=1) for _, start, end, _ in _intervals(facts))


def test_en_efgs_pull_maps_over_targets(report):
    dag = report["dags"]["en_efgs_pull"]
    tasks = dag["tasks"]
    assert set(tasks) == {"list_targets", "pull"}
    assert tasks["pull"]["upstream"] == ["list_targets"] and tasks["pull"]["class"] == "DecoratedMappedOperator"
    assert dag["timetable"]["summary"] == "*/30 * * * *" and dag["max_active_runs"] == 1
