"""PID 1's garbage collection (pvpy.device.apply.collect_garbage) against staging in
another process: objects staged for a revision whose trail is not written yet are
not garbage. GC runs only when no one holds the install lock; otherwise it is
deferred and tried again from PID 1's loop."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from pvpy import bootvars, paths
from pvpy.device.apply import GC_RETRY, Applier, collect_garbage
from pvpy.device.bootenv.file import FileBootEnv
from pvpy.store import Storage
from tests.test_store import install


class Host:
    """The part of ApplyHost GC reads: storage, boot env, running revision, supervisor."""

    def __init__(self, storage: Path, revision: int) -> None:
        self.storage = storage
        self.bootenv = FileBootEnv(storage / paths.BOOTENV)
        self.bootenv.write(bootvars.commit(revision))
        self.revision = revision
        self.supervisor: Any = None
        self.shutdown_pending = False


def staging(storage: Path) -> int:
    """Hold the install lock as `pvpy device update`, the API or the puller do."""
    fd = os.open(storage / paths.INSTALL_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_gc_waits_for_staging_and_removes_nothing_meanwhile(tmp_path: Path) -> None:
    storage = Storage(tmp_path).ensure()
    install(storage, 1, [b"one"])
    install(storage, 2, [b"two"])
    install(storage, 3, [b"three"])
    staged = storage.objects.put_bytes(b"an object of revision 4, its trail not written yet")
    host = Host(tmp_path, 3)

    lock = staging(tmp_path)
    assert collect_garbage(host) is None  # deferred
    assert storage.revisions() == [1, 2, 3] and storage.objects.has(staged)

    applier = Applier(host)  # type: ignore[arg-type]
    applier.collect(100.0)
    assert applier.gc_retry_at == 100.0 + GC_RETRY
    assert applier.next_deadline() == 100.0 + GC_RETRY  # PID 1 wakes for it, no polling
    os.close(lock)  # staging finished (here: gave up; its object is now garbage)

    host.supervisor = type("Idle", (), {"revisions_in_use": lambda self: set()})()
    applier.check(100.0 + GC_RETRY)
    assert applier.gc_retry_at is None and applier.next_deadline() is None
    assert storage.revisions() == [2, 3]  # running + the good one before it
    assert not storage.objects.has(staged)
