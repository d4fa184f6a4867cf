"""Run the publish API under gunicorn (``enpipeline api``)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication

from enpipeline.config import Settings, with_local_secrets


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict[str, Any], settings: Settings):
        self._options = options
        self._settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self):
        from api.app import create_app

        return create_app(self._settings)


def _child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def serve_api(settings: Settings, *, host: str, port: int, workers: int | None = None, threads: int = 1) -> None:
    """Serve until stopped. Secrets are resolved once here so every worker shares them."""
    settings = with_local_secrets(settings)
    workers = workers or (2 * multiprocessing.cpu_count() + 1)
    # Metrics from all workers are summed through files in this directory.
    metrics_dir = tempfile.mkdtemp(prefix="enp-prometheus-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # The pool per worker only needs as many connections as it has threads.
    settings = settings.replace(db_pool_size=max(1, threads), db_pool_max_overflow=2)
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread" if threads > 1 else "sync",
        "timeout": 30,
        "graceful_timeout": 20,
        # No access log: it would record client IP addresses and user agents.
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
        "child_exit": _child_exit,
        "proc_name": "enpipeline-api",
    }
    try:
        _Gunicorn(options, settings).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
