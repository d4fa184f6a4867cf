"""Test-only: on PYTHONPATH of the Airflow processes of tests/dags/test_en_export_task_faults.py, so that every
Python process Airflow starts (task processes included) patches the filesystem blob store with the faults that
``ENP_TEST_FAULTS`` describes (see tests/support_faults.py). Without that variable it does nothing."""

import json
import os

_spec = os.environ.get("ENP_TEST_FAULTS")
if _spec:
    from pathlib import Path

    from tests.support_faults import install_airflow_faults

    _faults = json.loads(_spec)
    install_airflow_faults(Path(_faults["journal"]), dict(_faults["kills"]))
