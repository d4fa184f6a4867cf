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

_delay = os.environ.get("ENP_TEST_EXPORT_UPLOAD_DELAY")
if _delay:
    # Slow every export file upload down, so that a task holds its worker slot long enough for the next task
    # to be visibly placed elsewhere (tests/dags/test_en_export_celery.py).
    import time

    from enpipeline.blobstore import FilesystemBlobstore

    _create = FilesystemBlobstore.create

    def _slow_create(self, bucket, name, data, **kwargs):
        if name.endswith(".zip"):
            time.sleep(float(_delay))
        return _create(self, bucket, name, data, **kwargs)

    FilesystemBlobstore.create = _slow_create
