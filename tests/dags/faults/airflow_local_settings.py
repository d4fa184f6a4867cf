"""Test-only Airflow cluster policy (tests/dags/test_en_export_task_faults.py): a retry delay of
``ENP_TEST_RETRY_DELAY`` seconds without backoff, so a killed task is retried at once instead of after the DAG's
30 s. Applied where Airflow parses DAG files, so the scheduler schedules the retry with it."""

import os
from datetime import timedelta
from typing import Any


def task_policy(task: Any) -> None:  # an Airflow operator, mapped or not
    delay = os.environ.get("ENP_TEST_RETRY_DELAY")
    if delay is not None:
        task.retry_delay = timedelta(seconds=float(delay))
        task.retry_exponential_backoff = 0
