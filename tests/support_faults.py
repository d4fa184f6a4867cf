"""Blob-store fault injection and the index invariant, for the fault tests of issue #7.

* ``IndexWatch`` wraps a blob store and checks, at every ``index.txt`` write and around every delete, that the
  index names only objects that exist and are complete export files (a zip whose export.bin parses), and that no
  delete removes an object the current index names. Every operation and every violation goes to a journal (a
  JSON-lines file, appended with one ``write`` per line so several processes can share it) and to ``events``.
* ``FlakyBlobstore`` fails a seeded fraction of creates and deletes, half of them before the write and half after
  it (the object landed, the caller still sees an error, as when an answer is lost).
* ``install_airflow_faults`` patches ``FilesystemBlobstore`` inside an Airflow process (called from
  tests/dags/faults/sitecustomize.py): the same watch, plus SIGKILL of the task process in the middle of the
  upload of chosen objects, once each.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enpipeline.blobstore import BlobNotFound, Blobstore, FilesystemBlobstore

INDEX = "index.txt"
JOURNAL = "journal.jsonl"
VIOLATIONS = "violations.jsonl"


class InjectedFault(OSError):
    """A failure the test injected (an OSError, like the network and disk errors a real store raises)."""


def _append(path: Path, record: dict[str, Any]) -> None:
    # O_APPEND and a single write: lines from concurrent task processes never interleave.
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_journal(directory: Path, name: str = JOURNAL) -> list[dict[str, Any]]:
    path = directory / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _root(name: str) -> str:
    return name.rsplit("/", 1)[0] if "/" in name else ""


def _index_of(root: str) -> str:
    return f"{root}/{INDEX}" if root else INDEX


def _names(data: bytes) -> list[str]:
    return [n for n in data.decode().split("\n") if n]


@dataclass
class IndexWatch:
    """A blob store that checks the index invariant on the store it wraps (see the module docstring)."""

    inner: Blobstore
    journal: Path | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    # Objects already found complete: an export file is written once under its name (same bytes on a rewrite).
    _complete: set[tuple[str, str]] = field(default_factory=set)

    def _record(self, record: dict[str, Any]) -> None:
        record = {"pid": os.getpid(), "t": time.time(), **record}
        self.events.append(record)
        if self.journal is not None:
            _append(self.journal / JOURNAL, record)

    def _violation(self, when: str, problem: str) -> None:
        record = {"pid": os.getpid(), "t": time.time(), "when": when, "problem": problem}
        self.violations.append(record)
        if self.journal is not None:
            _append(self.journal / VIOLATIONS, record)

    def problems(self, bucket: str, names: list[str]) -> list[str]:
        """Why each named object is not a complete export file in the wrapped store (empty when all are)."""
        from enpipeline.export import format as fmt  # here: sitecustomize imports this module in every process

        out = []
        for name in names:
            if (bucket, name) in self._complete:
                if self.inner.exists(bucket, name):
                    continue
                out.append(f"{bucket}/{name} is missing")
                continue
            try:
                data = self.inner.get(bucket, name)
            except BlobNotFound:
                out.append(f"{bucket}/{name} is missing")
                continue
            try:
                parsed = fmt.read_export(data)
            except ValueError as exc:
                out.append(f"{bucket}/{name} is not a complete export file ({len(data)} bytes): {exc}")
                continue
            if not parsed.signatures:
                out.append(f"{bucket}/{name} has no signature")
                continue
            self._complete.add((bucket, name))
        return out

    def _current_index(self, bucket: str, root: str) -> list[str]:
        try:
            return _names(self.inner.get(bucket, _index_of(root)))
        except BlobNotFound:
            return []

    def create(self, bucket: str, name: str, data: bytes, *, content_type: str, cacheable: bool) -> None:
        is_index = name.rsplit("/", 1)[-1] == INDEX
        if is_index:
            names = _names(data)
            for problem in self.problems(bucket, names):
                self._violation(f"writing {bucket}/{name}", problem)
        self.inner.create(bucket, name, data, content_type=content_type, cacheable=cacheable)
        self._record({"op": "index" if is_index else "create", "bucket": bucket, "name": name, "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest(),
                      **({"names": len(_names(data))} if is_index else {})})

    def delete(self, bucket: str, name: str) -> None:
        root = _root(name)
        if name in self._current_index(bucket, root):
            self._violation(f"deleting {bucket}/{name}", f"{bucket}/{name} is named by {_index_of(root)}")
        self.inner.delete(bucket, name)
        self._record({"op": "delete", "bucket": bucket, "name": name})
        for problem in self.problems(bucket, self._current_index(bucket, root)):
            self._violation(f"after deleting {bucket}/{name}", problem)

    def get(self, bucket: str, name: str) -> bytes:
        return self.inner.get(bucket, name)

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        return self.inner.list(bucket, prefix)

    def exists(self, bucket: str, name: str) -> bool:
        return self.inner.exists(bucket, name)


@dataclass
class FlakyBlobstore:
    """Fails a seeded fraction of creates and deletes; ``after`` of them only once the operation took effect."""

    inner: Blobstore
    seed: int
    create_rate: float = 0.3
    delete_rate: float = 0.3
    rng: random.Random = field(init=False)
    failed: dict[str, int] = field(default_factory=lambda: {"create_before": 0, "create_after": 0,
                                                            "delete_before": 0, "delete_after": 0})
    calls: dict[str, int] = field(default_factory=lambda: {"create": 0, "delete": 0})

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _fault(self, op: str, rate: float) -> str | None:
        self.calls[op] += 1
        if self.rng.random() >= rate:
            return None
        when = "after" if self.rng.random() < 0.5 else "before"
        self.failed[f"{op}_{when}"] += 1
        return when

    def create(self, bucket: str, name: str, data: bytes, *, content_type: str, cacheable: bool) -> None:
        when = self._fault("create", self.create_rate)
        if when == "before":
            raise InjectedFault(f"injected: upload of {bucket}/{name} failed")
        self.inner.create(bucket, name, data, content_type=content_type, cacheable=cacheable)
        if when == "after":
            raise InjectedFault(f"injected: upload of {bucket}/{name} landed, but its answer was lost")

    def delete(self, bucket: str, name: str) -> None:
        when = self._fault("delete", self.delete_rate)
        if when == "before":
            raise InjectedFault(f"injected: delete of {bucket}/{name} failed")
        self.inner.delete(bucket, name)
        if when == "after":
            raise InjectedFault(f"injected: delete of {bucket}/{name} happened, but its answer was lost")

    def get(self, bucket: str, name: str) -> bytes:
        return self.inner.get(bucket, name)

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        return self.inner.list(bucket, prefix)

    def exists(self, bucket: str, name: str) -> bool:
        return self.inner.exists(bucket, name)

    @property
    def faults(self) -> int:
        return sum(self.failed.values())


def retry(step: Callable[[], Any], *, attempts: int = 50) -> tuple[Any, int]:
    """Run ``step`` until it does not raise an injected fault, as Airflow's task retries would; returns
    (its result, the failed attempts)."""
    for failed in range(attempts):
        try:
            return step(), failed
        except Exception as exc:  # an injected fault, possibly wrapped by the domain code
            if not _injected(exc):
                raise
    raise AssertionError(f"still failing after {attempts} attempts")


def _injected(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, InjectedFault) or "injected: " in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# -- inside Airflow's processes (tests/dags/faults/sitecustomize.py) ------------------------------------------

class _Unpatched:
    """A FilesystemBlobstore with its original create and delete, for the watch to write through."""

    def __init__(self, store: FilesystemBlobstore, create: Callable[..., None], delete: Callable[..., None]):
        self.store, self._create, self._delete = store, create, delete

    def create(self, bucket: str, name: str, data: bytes, *, content_type: str, cacheable: bool) -> None:
        self._create(self.store, bucket, name, data, content_type=content_type, cacheable=cacheable)

    def delete(self, bucket: str, name: str) -> None:
        self._delete(self.store, bucket, name)

    def get(self, bucket: str, name: str) -> bytes:
        return self.store.get(bucket, name)

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        return self.store.list(bucket, prefix)

    def exists(self, bucket: str, name: str) -> bool:
        return self.store.exists(bucket, name)


class _HalfThenKill:
    """The temporary file of an upload: writes half of what it is given, makes that durable, then the process
    is killed, as a machine or OOM kill would stop it mid-upload."""

    def __init__(self, fh: Any, on_kill: Callable[[int, int], None]):
        self.fh, self.on_kill = fh, on_kill

    def __enter__(self) -> _HalfThenKill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def write(self, data: bytes) -> int:
        half = len(data) // 2
        self.fh.write(data[:half])
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.on_kill(half, len(data))
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("not reached")

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.fh, attr)


def install_airflow_faults(journal: Path, kills: dict[str, str]) -> None:
    """Patch FilesystemBlobstore in this process: every create/delete goes through an IndexWatch journaling to
    ``journal``; the first upload of each object in ``kills`` ({name: "partial" | "after"}) is SIGKILLed
    half-way through writing its bytes, or right after the object is complete (before the task records it)."""
    create, delete = FilesystemBlobstore.create, FilesystemBlobstore.delete

    def kill_once(name: str) -> bool:
        try:
            os.close(os.open(journal / f"killed-{hashlib.sha1(name.encode()).hexdigest()}",  # noqa: S324 - a name
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def patched_create(self: FilesystemBlobstore, bucket: str, name: str, data: bytes, *, content_type: str,
                       cacheable: bool) -> None:
        watch = IndexWatch(_Unpatched(self, create, delete), journal)
        mode = kills.get(name)
        if mode == "partial" and kill_once(name):
            real_fdopen = os.fdopen

            def record(written: int, total: int) -> None:
                watch._record({"op": "kill", "mode": mode, "bucket": bucket, "name": name, "written": written,
                               "bytes": total, "sha256": hashlib.sha256(data).hexdigest()})

            os.fdopen = lambda fd, *a, **k: _HalfThenKill(real_fdopen(fd, *a, **k), record)  # type: ignore[assignment]
            create(self, bucket, name, data, content_type=content_type, cacheable=cacheable)
            raise AssertionError("not reached")
        watch.create(bucket, name, data, content_type=content_type, cacheable=cacheable)
        if mode == "after" and kill_once(name):
            watch._record({"op": "kill", "mode": mode, "bucket": bucket, "name": name, "written": len(data),
                           "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            os.kill(os.getpid(), signal.SIGKILL)

    def patched_delete(self: FilesystemBlobstore, bucket: str, name: str) -> None:
        IndexWatch(_Unpatched(self, create, delete), journal).delete(bucket, name)

    FilesystemBlobstore.create = patched_create  # type: ignore[method-assign]
    FilesystemBlobstore.delete = patched_delete  # type: ignore[method-assign]
