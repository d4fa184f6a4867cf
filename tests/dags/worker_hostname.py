"""``[core] hostname_callable`` for tests that run several Airflow workers on one machine: the name a worker
process was given in ``ENP_TEST_WORKER_HOSTNAME`` (else the machine's FQDN), so each task instance records
which worker ran it. On separate machines the default (the FQDN) already tells workers apart."""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("ENP_TEST_WORKER_HOSTNAME") or socket.getfqdn()
