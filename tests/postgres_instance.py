"""A Postgres server that a test owns, on a TCP port of its own, so it can be stopped, crashed and restarted.

Binaries and initdb come from pgserver (the embedded Postgres wheel of requirements.txt). pgserver itself only
listens on a Unix socket and cannot be restarted on the same address, so after its initdb the server is run
with pg_ctl directly on 127.0.0.1:<port>. As root, Postgres refuses to run; pgserver creates an unprivileged
system user for that, and every pg_ctl call runs as that user too.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pgserver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RestartablePostgres:
    def __init__(self, root: Path):
        self.pgdata = root / "pgdata"
        self.pgdata.mkdir(parents=True)
        self.socket_dir = root / "socket"
        self.socket_dir.mkdir()
        self.log = self.pgdata / "server.log"
        self.port = free_port()
        # initdb (and a first start on a socket, which we stop: pgserver has no "init only").
        server = pgserver.get_server(str(self.pgdata), cleanup_mode=None)
        self._user = server.system_user
        if self._user is not None:
            import pwd

            entry = pwd.getpwnam(self._user)
            os.chown(self.socket_dir, entry.pw_uid, entry.pw_gid)
        self._pg_ctl("-w", "-m", "fast", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str, timeout: float = 60) -> str:
        return pgserver.pg_ctl(list(args), pgdata=self.pgdata, user=self._user, timeout=timeout)

    def start(self) -> float:
        """Start and wait until it accepts connections; returns how long that took."""
        started = time.monotonic()
        self._pg_ctl("-w", "-t", "60", "-o", f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir}",
                     "-l", str(self.log), "start")
        return time.monotonic() - started

    def crash(self) -> None:
        """Immediate shutdown: every backend is killed without a checkpoint, as in a power loss of the server
        process; the next start runs crash recovery from the WAL."""
        self._pg_ctl("-w", "-m", "immediate", "stop")

    def stop(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")

    def running(self) -> bool:
        try:
            self._pg_ctl("status")
        except Exception:  # pg_ctl status exits 3 when no server runs
            return False
        return True
